use super::*;
use proptest::prelude::*;

/// A reply back to RESP2 bytes, for the round-trip properties.
fn encode(reply: &Reply) -> Vec<u8> {
    match reply {
        Reply::Simple(s) => format!("+{s}\r\n").into_bytes(),
        Reply::Error(s) => format!("-{s}\r\n").into_bytes(),
        Reply::Integer(i) => format!(":{i}\r\n").into_bytes(),
        Reply::Bulk(None) => b"$-1\r\n".to_vec(),
        Reply::Bulk(Some(bytes)) => {
            let mut out = format!("${}\r\n", bytes.len()).into_bytes();
            out.extend_from_slice(bytes);
            out.extend_from_slice(b"\r\n");
            out
        }
        Reply::Array(None) => b"*-1\r\n".to_vec(),
        Reply::Array(Some(items)) => {
            let mut out = format!("*{}\r\n", items.len()).into_bytes();
            for item in items {
                out.extend(encode(item));
            }
            out
        }
    }
}

fn arb_reply() -> impl Strategy<Value = Reply> {
    let line = "[^\r\n]{0,20}";
    let leaf = prop_oneof![
        line.prop_map(Reply::Simple),
        line.prop_map(Reply::Error),
        any::<i64>().prop_map(Reply::Integer),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)).prop_map(Reply::Bulk),
        Just(Reply::Array(None)),
    ];
    // Depth 4 keeps every generated reply far inside the limits.
    leaf.prop_recursive(4, 64, 6, |inner| {
        proptest::collection::vec(inner, 0..6).prop_map(|items| Reply::Array(Some(items)))
    })
}

fn parsed(bytes: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    parse_reply(bytes)
}

#[test]
fn simple_error_integer_bulk() {
    assert_eq!(
        parsed(b"+PONG\r\n"),
        Ok(Some((Reply::Simple("PONG".into()), 7)))
    );
    assert_eq!(
        parsed(b"-LOADING Redis is loading the dataset in memory\r\n")
            .unwrap()
            .unwrap()
            .0,
        Reply::Error("LOADING Redis is loading the dataset in memory".into())
    );
    assert_eq!(parsed(b":-12\r\n"), Ok(Some((Reply::Integer(-12), 6))));
    assert_eq!(
        parsed(b"$6\r\nmaster\r\n"),
        Ok(Some((Reply::Bulk(Some(b"master".to_vec())), 12)))
    );
    assert_eq!(parsed(b"$-1\r\n"), Ok(Some((Reply::Bulk(None), 5))));
    assert_eq!(
        parsed(b"$0\r\n\r\n"),
        Ok(Some((Reply::Bulk(Some(vec![])), 6)))
    );
}

#[test]
fn role_replies_of_a_master_and_a_replica() {
    let master = b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n";
    let (reply, used) = parsed(master).unwrap().unwrap();
    assert_eq!(used, master.len());
    assert_eq!(
        role_finding(Ok(reply)),
        Finding::up(Some(Role::Primary), "PONG; role master")
    );
    let replica = b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:14\r\n";
    let (reply, _) = parsed(replica).unwrap().unwrap();
    assert_eq!(
        role_finding(Ok(reply)),
        Finding::up(Some(Role::Replica), "PONG; role replica (link connected)")
    );
    let sentinel = b"*2\r\n$8\r\nsentinel\r\n*0\r\n";
    let (reply, _) = parsed(sentinel).unwrap().unwrap();
    let finding = role_finding(Ok(reply));
    assert_eq!(finding.status, crate::health::check::CheckStatus::Down);
    assert!(finding.detail.contains("Sentinel"), "{}", finding.detail);
}

#[test]
fn ping_verdicts() {
    use crate::health::check::CheckStatus;
    assert_eq!(ping_finding(Ok(Reply::Simple("PONG".into()))), None);
    let loading = ping_finding(Ok(Reply::Error("LOADING Redis is loading".into()))).unwrap();
    assert_eq!(loading.status, CheckStatus::NotReady);
    let noauth = ping_finding(Ok(Reply::Error("NOAUTH Authentication required.".into()))).unwrap();
    assert_eq!(noauth.status, CheckStatus::Down);
    assert_eq!(noauth.detail, "PING: NOAUTH Authentication required.");
}

#[test]
fn incomplete_until_the_last_byte() {
    let whole = b"*2\r\n$5\r\nslave\r\n*1\r\n:1\r\n";
    for cut in 0..whole.len() {
        assert_eq!(parsed(&whole[..cut]), Ok(None), "cut at {cut}");
    }
    assert!(parsed(whole).unwrap().is_some());
}

#[test]
fn limits_are_enforced() {
    assert_eq!(
        parsed(b"$1048577\r\n"),
        Err(RespError::BulkTooLarge(1_048_577))
    );
    assert_eq!(parsed(b"$-2\r\n"), Err(RespError::BadNumber("-2".into())));
    assert_eq!(parsed(b"*99999999\r\n"), Err(RespError::TooLarge));
    assert_eq!(parsed(&b"*1\r\n".repeat(9)), Err(RespError::TooDeep));
    assert_eq!(parsed(&b"*1\r\n".repeat(8)), Ok(None));
    let mut long = b"+".to_vec();
    long.resize(MAX_REPLY, b'a');
    assert_eq!(parsed(&long), Err(RespError::TooLarge));
    // A 1 MiB bulk is accepted by the length check but cannot fit a reply.
    let mut big = b"$1048576\r\n".to_vec();
    big.resize(MAX_REPLY + 10, b'x');
    assert_eq!(parsed(&big), Err(RespError::TooLarge));
}

#[test]
fn malformed_input_is_named() {
    let http = parsed(b"HTTP/1.1 400 Bad Request\r\n").unwrap_err();
    assert!(matches!(http, RespError::BadType(ref s) if s.starts_with("HTTP/1.1")));
    assert_eq!(parsed(b":12a\r\n"), Err(RespError::BadNumber("12a".into())));
    assert_eq!(parsed(b"$3\r\nabcd\r\n"), Err(RespError::MissingCrlf));
    assert!(parsed(b":99999999999999999999999\r\n").is_err());
}

#[test]
fn commands_are_arrays_of_bulk_strings() {
    assert_eq!(encode_command(&[b"PING"]), b"*1\r\n$4\r\nPING\r\n");
    assert_eq!(
        encode_command(&[b"AUTH", b"app", b"s3cret"]),
        b"*3\r\n$4\r\nAUTH\r\n$3\r\napp\r\n$6\r\ns3cret\r\n"
    );
}

proptest! {
    #[test]
    fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(Some((_, used))) = parsed(&bytes) {
            prop_assert!(used <= bytes.len());
        }
    }

    #[test]
    fn resp_shaped_bytes_never_panic(
        parts in proptest::collection::vec(
            prop_oneof![
                Just(b"*".to_vec()), Just(b"$".to_vec()), Just(b"+".to_vec()),
                Just(b"-".to_vec()), Just(b":".to_vec()), Just(b"\r\n".to_vec()),
                Just(b"-1".to_vec()), Just(b"3".to_vec()), Just(b"abc".to_vec()),
            ],
            0..40,
        )
    ) {
        let _ = parsed(&parts.concat());
    }

    #[test]
    fn well_formed_replies_round_trip(reply in arb_reply(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
        let mut bytes = encode(&reply);
        let len = bytes.len();
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(parsed(&bytes), Ok(Some((reply.clone(), len))));
        // Every strict prefix is incomplete, never an error.
        let cut = len / 2;
        prop_assert_eq!(parsed(&bytes[..cut]), Ok(None));
    }

    #[test]
    fn commands_parse_back(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..30), 1..5)) {
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let expected = Reply::Array(Some(args.iter().cloned().map(|a| Reply::Bulk(Some(a))).collect()));
        let bytes = encode_command(&refs);
        prop_assert_eq!(parsed(&bytes), Ok(Some((expected, bytes.len()))));
    }
}
