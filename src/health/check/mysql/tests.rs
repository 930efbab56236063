use super::*;
use proptest::prelude::*;

/// The greeting of MariaDB 10.11 (Debian 12), as captured on loopback.
const MARIADB_GREETING: &[u8] = b"d\x00\x00\x00\n5.5.5-10.11.19-MariaDB-0+deb12u1\x00\
    \x03\x00\x00\x00IiWX22D=\x00\xfe\xf7\x08\x02\x00\xff\x81\x15\x00\x00\x00\x00\x00\x00\
    \x1d\x00\x00\x00G.N~R[SpYLS:\x00mysql_native_password\x00";

/// What the same server sent a host missing from its grant tables.
const MARIADB_HOST_NOT_ALLOWED: &[u8] =
    b"D\x00\x00\x00\xffj\x04Host '127.0.0.1' is not allowed to connect to this MariaDB server";

/// What it sent a host with too many aborted connections.
const MARIADB_HOST_BLOCKED: &[u8] = b"j\x00\x00\x00\xffi\x04Host '127.0.0.2' is blocked because \
    of many connection errors; unblock with 'mariadb-admin flush-hosts'";

/// And a login as an unknown user.
const MARIADB_ACCESS_DENIED: &[u8] = b"M\x00\x00\x02\xff\x15\x04#28000Access denied for user \
    'nosuchuser'@'127.0.0.2' (using password: NO)";

fn err_packet(code: u16, sql_state: Option<&str>, message: &str) -> Vec<u8> {
    let mut payload = vec![ERR_MARKER];
    payload.extend_from_slice(&code.to_le_bytes());
    if let Some(state) = sql_state {
        payload.push(b'#');
        payload.extend_from_slice(state.as_bytes());
    }
    payload.extend_from_slice(message.as_bytes());
    packet(0, &payload)
}

fn err(code: u16, sql_state: Option<&str>, message: &str) -> ErrPacket {
    ErrPacket {
        code,
        sql_state: sql_state.map(str::to_owned),
        message: message.to_owned(),
    }
}

#[test]
fn mariadb_handshake_is_up() {
    assert_eq!(MARIADB_GREETING.len(), 4 + 100);
    assert_eq!(
        parse_greeting(MARIADB_GREETING),
        Ok(Some(Greeting::Handshake(Handshake {
            server_version: "5.5.5-10.11.19-MariaDB-0+deb12u1".into(),
            scramble: b"IiWX22D=G.N~R[SpYLS:".to_vec(),
            plugin: Some("mysql_native_password".into()),
        })))
    );
}

#[test]
fn a_greeting_cut_short_still_names_the_server() {
    // Everything after the version is optional to the parser: the check
    // without a password needs only the version.
    let mut payload = vec![PROTOCOL_10];
    payload.extend_from_slice(b"8.0.36\0\x01\x00\x00\x00abcdefgh");
    let Ok(Some(Greeting::Handshake(handshake))) = parse_greeting(&packet(0, &payload)) else {
        panic!("not a handshake");
    };
    assert_eq!(handshake.scramble, b"abcdefgh");
    assert_eq!(handshake.plugin, None);
}

/// Known answers, computed apart with Python's hashlib for this password
/// and the captured greeting's scramble.
#[test]
fn password_scrambles_match_the_servers_formulas() {
    let scramble = b"IiWX22D=G.N~R[SpYLS:";
    let hex = |bytes: Vec<u8>| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let native = auth_response("mysql_native_password", "app-pw", scramble).unwrap();
    assert_eq!(hex(native), "46cabbf0e5ee26caf539e6b554726848f6afa822");
    let sha2 = auth_response("caching_sha2_password", "app-pw", scramble).unwrap();
    assert_eq!(
        hex(sha2),
        "2071c8e6e98bd3fc568e76a79a9087729292b4c9db78e9380f19f834a0bff906"
    );
    assert_eq!(
        auth_response("mysql_native_password", "", scramble),
        Ok(vec![])
    );
    assert_eq!(
        auth_response("caching_sha2_password", "", scramble),
        Ok(vec![0])
    );
    let ed25519 = auth_response("client_ed25519", "pw", scramble).unwrap_err();
    assert!(
        ed25519.to_string().contains("`client_ed25519`"),
        "{ed25519}"
    );
}

/// A text result set answering `SELECT @@global.read_only`, one payload
/// per packet: column count, column definition, EOF, row, EOF (the
/// real-server side is in tests/checks.rs).
fn read_only_answer(value: &[u8]) -> Vec<Vec<u8>> {
    let mut row = vec![value.len() as u8];
    row.extend_from_slice(value);
    vec![
        vec![1],
        b"\x03def\x00\x00\x00\x12@@global.read_only\x00\x0c?\x00\x01\x00\x00\x00\x08\x80\x00\x00\x00\x00"
            .to_vec(),
        b"\xfe\x00\x00\x02\x00".to_vec(),
        row,
        b"\xfe\x00\x00\x02\x00".to_vec(),
    ]
}

fn role_of(packets: Vec<Vec<u8>>) -> Result<Option<Role>, String> {
    let mut reply = ReadOnlyReply::new();
    for payload in packets {
        if let Some(role) = reply.feed(&payload)? {
            return Ok(Some(role));
        }
    }
    Ok(None)
}

#[test]
fn read_only_gives_the_role() {
    assert_eq!(role_of(read_only_answer(b"0")), Ok(Some(Role::Primary)));
    assert_eq!(role_of(read_only_answer(b"1")), Ok(Some(Role::Replica)));
    let odd = role_of(read_only_answer(b"ON")).unwrap_err();
    assert!(odd.contains("`ON`"), "{odd}");
    let refused = role_of(vec![err_packet(1227, Some("42000"), "denied")[4..].to_vec()]);
    assert!(refused.unwrap_err().contains("error 1227"));
    let no_row = role_of(vec![
        vec![1],
        b"\x03def".to_vec(),
        b"\xfe\x00\x00\x02\x00".to_vec(),
        b"\xfe\x00\x00\x02\x00".to_vec(),
    ]);
    assert!(no_row.unwrap_err().contains("no row"));
    assert!(role_of(vec![vec![2]])
        .unwrap_err()
        .contains("not one column"));
}

#[test]
fn waits_for_the_whole_packet() {
    for cut in 0..MARIADB_GREETING.len() {
        assert_eq!(parse_greeting(&MARIADB_GREETING[..cut]), Ok(None), "{cut}");
    }
}

#[test]
fn mariadb_refusals_are_errors() {
    let not_allowed = "Host '127.0.0.1' is not allowed to connect to this MariaDB server";
    assert_eq!(
        parse_greeting(MARIADB_HOST_NOT_ALLOWED),
        Ok(Some(Greeting::Error(err(1130, None, not_allowed))))
    );
    let Ok(Some(Greeting::Error(blocked))) = parse_greeting(MARIADB_HOST_BLOCKED) else {
        panic!("not an error");
    };
    assert_eq!(blocked.code, 1129);
    assert!(blocked.message.contains("is blocked"), "{blocked}");
}

#[test]
fn err_packets_with_and_without_sql_state() {
    assert_eq!(
        parse_greeting(&err_packet(1040, Some("08004"), "Too many connections")),
        Ok(Some(Greeting::Error(err(
            1040,
            Some("08004"),
            "Too many connections"
        ))))
    );
    assert_eq!(
        err(1040, Some("08004"), "Too many connections").to_string(),
        "error 1040 (08004): Too many connections"
    );
    assert_eq!(
        err(1129, None, "Host is blocked").to_string(),
        "error 1129: Host is blocked"
    );
}

#[test]
fn other_protocols_are_named() {
    let http = parse_greeting(b"HTTP/1.1 400 Bad Request\r\n").unwrap_err();
    assert!(matches!(http, PacketError::NotMysql(ref s) if s.starts_with("HTTP/1.1")));
    assert_eq!(
        parse_greeting(&packet(0, &[9, b'x', 0])),
        Err(PacketError::Protocol(9))
    );
    assert_eq!(parse_greeting(&packet(0, &[])), Err(PacketError::Empty));
    assert_eq!(
        parse_greeting(&packet(0, b"\x0a5.7")),
        Err(PacketError::NoVersion)
    );
    assert_eq!(
        parse_greeting(&packet(0, b"\xff\x01")),
        Err(PacketError::ShortError)
    );
    assert_eq!(
        parse_greeting(b"\xff\xff\xff\x00"),
        Err(PacketError::TooLarge {
            len: 0xff_ffff,
            shown: "\\xff\\xff\\xff\\x00".into()
        })
    );
}

#[test]
fn auth_replies() {
    let ok = b"\x07\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00";
    let packet = split_packet(ok).unwrap().unwrap();
    assert_eq!((packet.seq, packet.used), (2, ok.len()));
    assert_eq!(parse_auth_reply(packet.payload), Ok(AuthReply::Ok));

    let denied = split_packet(MARIADB_ACCESS_DENIED).unwrap().unwrap();
    assert_eq!(
        parse_auth_reply(denied.payload),
        Ok(AuthReply::Error(err(
            1045,
            Some("28000"),
            "Access denied for user 'nosuchuser'@'127.0.0.2' (using password: NO)"
        )))
    );
    assert_eq!(
        parse_auth_reply(b"\xfecaching_sha2_password\x00nonce-nonce-nonce-nonc\x00"),
        Ok(AuthReply::Switch {
            plugin: "caching_sha2_password".into(),
            scramble: b"nonce-nonce-nonce-nonc".to_vec()
        })
    );
    assert_eq!(
        parse_auth_reply(b"\x01\x03"),
        Ok(AuthReply::More(vec![FAST_AUTH_OK]))
    );
    assert_eq!(parse_auth_reply(b""), Err(PacketError::Empty));
}

#[test]
fn handshake_response_layout() {
    let response = handshake_response("check", Some("app"), "mysql_native_password", &[]);
    let caps = u32::from_le_bytes(response[..4].try_into().unwrap());
    assert_eq!(caps, CAPABILITIES | CONNECT_WITH_DB);
    assert_eq!(response[8], CHARSET);
    assert!(response[9..32].iter().all(|&b| b == 0));
    assert_eq!(&response[32..], b"check\0\0app\0mysql_native_password\0");
    let without_db = handshake_response("check", None, "mysql_native_password", &[]);
    assert_eq!(&without_db[32..], b"check\0\0mysql_native_password\0");
    let with_password = handshake_response("check", None, "caching_sha2_password", &[7; 32]);
    assert_eq!(with_password[32..38], *b"check\0");
    assert_eq!(with_password[38], 32);
    assert_eq!(with_password[39..71], [7; 32]);
    assert_eq!(&with_password[71..], b"caching_sha2_password\0");
}

proptest! {
    #[test]
    fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_greeting(&bytes);
        if let Ok(Some(packet)) = split_packet(&bytes) {
            prop_assert!(packet.used <= bytes.len());
            let _ = parse_auth_reply(packet.payload);
        }
        let _ = parse_auth_reply(&bytes);
        let mut reply = ReadOnlyReply::new();
        for chunk in bytes.chunks(7) {
            if reply.feed(chunk).is_err() {
                break;
            }
        }
    }

    #[test]
    fn handshakes_round_trip(
        version in "[^\u{0}]{0,60}",
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut payload = vec![PROTOCOL_10];
        payload.extend_from_slice(version.as_bytes());
        payload.push(0);
        payload.extend_from_slice(&tail);
        let parsed = parse_greeting(&packet(0, &payload));
        prop_assert!(
            matches!(&parsed, Ok(Some(Greeting::Handshake(h))) if h.server_version == version),
            "{:?}", parsed
        );
    }

    #[test]
    fn errors_round_trip(
        code in any::<u16>(),
        state in proptest::option::of("[0-9A-Z]{5}"),
        message in "[^#]{0,80}",
    ) {
        let expected = err(code, state.as_deref(), &message);
        let bytes = err_packet(code, state.as_deref(), &message);
        prop_assert_eq!(parse_greeting(&bytes), Ok(Some(Greeting::Error(expected.clone()))));
        let packet = split_packet(&bytes).unwrap().unwrap();
        prop_assert_eq!(parse_auth_reply(packet.payload), Ok(AuthReply::Error(expected)));
    }

    #[test]
    fn packets_split_back(seq in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let bytes = packet(seq, &payload);
        let packet = split_packet(&bytes).unwrap().unwrap();
        prop_assert_eq!((packet.seq, packet.payload, packet.used), (seq, payload.as_slice(), bytes.len()));
    }
}
