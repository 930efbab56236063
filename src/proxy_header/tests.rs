use std::net::{Ipv6Addr, SocketAddrV6};

use proptest::prelude::*;

use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a test address")
}

fn header(bytes: &[u8]) -> Header {
    match parse(bytes) {
        Ok(Parsed::Header(h)) => h,
        other => panic!("{:?}: {other:?}", bytes.escape_ascii().to_string()),
    }
}

fn error(bytes: &[u8]) -> HeaderError {
    match parse(bytes) {
        Err(e) => e,
        other => panic!("{:?}: {other:?}", bytes.escape_ascii().to_string()),
    }
}

/// The v2 header of the spec's layout, from its parts.
fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[ver_cmd, fam]);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[test]
fn the_specs_v1_examples() {
    let h = header(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n");
    assert_eq!(h.source, Some(addr("255.255.255.255:65535")));
    assert_eq!(h.consumed, 56);
    let worst = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    let h = header(worst);
    assert_eq!(h.consumed, 104);
    assert_eq!(
        h.destination,
        Some(addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"))
    );
    // The spec's longest line: 107 bytes.
    let worst = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(header(worst).consumed, V1_MAX);
    let h = header(b"PROXY UNKNOWN\r\n");
    assert_eq!((h.source, h.destination, h.consumed), (None, None, 15));
    // Whatever follows UNKNOWN is ignored.
    let h = header(b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\nGET /");
    assert_eq!((h.source, h.consumed), (None, 33));
    let h = header(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n");
    assert_eq!(h.source, Some(addr("192.168.0.1:56324")));
    assert_eq!(h.destination, Some(addr("192.168.0.11:443")));
    assert_eq!(h.consumed, 47);
}

#[test]
fn v1_errors_name_what_is_wrong() {
    let cases: &[(&[u8], HeaderError)] = &[
        (
            b"GET / HTTP/1.1\r\n",
            HeaderError::NotProxy("GET / HTTP/1.1\\r\\n".into()),
        ),
        (
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
            HeaderError::V1Protocol("TCP5".into()),
        ),
        (
            b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
            HeaderError::V1Protocol("".into()),
        ),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", v1_syntax()),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", v1_syntax()),
        (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", v1_syntax()),
        (b"PROXY TCP4\r\n", v1_syntax()),
        (
            b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
            HeaderError::V1Address("::1".into(), "IPv4"),
        ),
        (
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            HeaderError::V1Address("1.2.3.4".into(), "IPv6"),
        ),
        (
            b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n",
            HeaderError::V1Address("1.2.3.256".into(), "IPv4"),
        ),
        (
            b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n",
            HeaderError::V1Address("01.2.3.4".into(), "IPv4"),
        ),
        (
            b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
            HeaderError::V1Port("65536".into()),
        ),
        (
            b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
            HeaderError::V1Port("+1".into()),
        ),
        (
            b"PROXY TCP4 1.2.3.4 1.2.3.4 080 2\r\n",
            HeaderError::V1Port("080".into()),
        ),
        (
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 -2\r\n",
            HeaderError::V1Port("-2".into()),
        ),
        (
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 \r\n",
            HeaderError::V1Port("".into()),
        ),
        (b"PROXY TCP4 1.2.3.4\r1.2.3.4 1 2\r\n", v1_syntax_cr()),
        (
            b"PROXY TCP4 1.2.3.4\n1.2.3.4 1 2\r\n",
            HeaderError::V1Byte(b'\n'),
        ),
        (
            b"PROXY TCP4 1.2.3.4\x001.2.3.4 1 2\r\n",
            HeaderError::V1Byte(0),
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(&error(bytes), expected, "{}", bytes.escape_ascii());
    }
    let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100]].concat();
    assert_eq!(error(&long), HeaderError::V1TooLong);
    // A CRLF just past 107 bytes is too late; at 107 it is in time.
    let late = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 92], b"\r\n"].concat();
    assert_eq!(late.len(), V1_MAX + 1);
    assert_eq!(error(&late), HeaderError::V1TooLong);
    let in_time = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 91], b"\r\n"].concat();
    assert_eq!(header(&in_time).consumed, V1_MAX);
}

fn v1_syntax() -> HeaderError {
    HeaderError::V1Syntax("expected `PROXY TCP4|TCP6 SRC DST SPORT DPORT` with single spaces")
}

fn v1_syntax_cr() -> HeaderError {
    HeaderError::V1Syntax("CR not followed by LF")
}

#[test]
fn the_specs_v2_layouts() {
    let mut inet = vec![192, 0, 2, 7, 10, 0, 0, 1];
    inet.extend_from_slice(&4242u16.to_be_bytes());
    inet.extend_from_slice(&5432u16.to_be_bytes());
    let h = header(&[v2(0x21, 0x11, &inet), b"data".to_vec()].concat());
    assert_eq!(h.source, Some(addr("192.0.2.7:4242")));
    assert_eq!(h.destination, Some(addr("10.0.0.1:5432")));
    assert_eq!(h.consumed, 28);

    let mut inet6 = Vec::new();
    inet6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
    inet6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    inet6.extend_from_slice(&[0, 80, 1, 187]);
    let h = header(&v2(0x21, 0x21, &inet6));
    assert_eq!(h.source, Some(addr("[2001:db8::7]:80")));
    assert_eq!(h.destination, Some(addr("[::1]:443")));
    assert_eq!(h.consumed, 52);

    // TLVs (here a NOOP and an ALPN) are skipped within the length.
    let with_tlvs = [inet.clone(), vec![0x04, 0, 2, 0, 0, 0x01, 0, 2, b'h', b'2']].concat();
    let h = header(&[v2(0x21, 0x11, &with_tlvs), b"x".to_vec()].concat());
    assert_eq!(
        (h.source, h.consumed),
        (Some(addr("192.0.2.7:4242")), 16 + 22)
    );

    // LOCAL: no addresses, whatever the family says; its body is skipped.
    for fam in [0x00, 0x11, 0x21, 0x31] {
        let h = header(&v2(0x20, fam, &[1, 2, 3]));
        assert_eq!((h.source, h.destination, h.consumed), (None, None, 19));
    }
    // PROXY over UNSPEC: an unknown protocol; keep the socket's addresses.
    let h = header(&v2(0x21, 0x00, &[]));
    assert_eq!((h.source, h.consumed), (None, 16));
}

#[test]
fn v2_errors_name_what_is_wrong() {
    let inet = [0u8; 12];
    let cases: Vec<(Vec<u8>, HeaderError)> = vec![
        (v2(0x11, 0x11, &inet), HeaderError::V2Version(1)),
        (v2(0x31, 0x11, &inet), HeaderError::V2Version(3)),
        (v2(0x22, 0x11, &inet), HeaderError::V2Command(2)),
        (v2(0x2f, 0x11, &inet), HeaderError::V2Command(0xf)),
        (v2(0x21, 0x12, &inet), HeaderError::V2Family(0x12)),
        (v2(0x21, 0x31, &[0; 216]), HeaderError::V2Family(0x31)),
        (v2(0x21, 0x41, &inet), HeaderError::V2Family(0x41)),
        (v2(0x21, 0x10, &inet), HeaderError::V2Family(0x10)),
        (
            v2(0x21, 0x11, &[0; 11]),
            HeaderError::V2Short {
                length: 11,
                needed: 12,
            },
        ),
        (
            v2(0x21, 0x21, &[0; 35]),
            HeaderError::V2Short {
                length: 35,
                needed: 36,
            },
        ),
        (v2(0x21, 0x11, &[0; 1025]), HeaderError::V2TooLong(1025)),
        (v2(0x21, 0x11, &[0; 14]), HeaderError::V2Tlv),
        (
            v2(0x21, 0x11, &[&inet[..], &[1, 0, 5, 0]].concat()),
            HeaderError::V2Tlv,
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(error(&bytes), expected, "{}", bytes.escape_ascii());
    }
    // The longest accepted.
    let longest = v2(
        0x21,
        0x11,
        &[&inet[..], &[4, 0x03, 0xf1], &[0; 0x3f1]].concat(),
    );
    assert_eq!(longest.len(), V2_MAX);
    assert_eq!(header(&longest).consumed, V2_MAX);
    // A wrong version is refused before the rest of the header arrives.
    assert_eq!(
        error(&[&V2_SIGNATURE[..], &[0x11]].concat()),
        HeaderError::V2Version(1)
    );
}

#[test]
fn incomplete_until_the_header_is_whole() {
    assert_eq!(parse(b""), Ok(Parsed::Incomplete));
    assert_eq!(parse(b"PROX"), Ok(Parsed::Incomplete));
    assert_eq!(
        parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"),
        Ok(Parsed::Incomplete)
    );
    assert_eq!(parse(b"\r\n\r\n"), Ok(Parsed::Incomplete));
    assert!(matches!(parse(b"\r\n\r\nX"), Err(HeaderError::NotProxy(_))));
    assert!(matches!(parse(b"PROXY\t"), Err(HeaderError::NotProxy(_))));
}

#[test]
fn ipv4_mapped_pairs_are_written_as_ipv4() {
    let mapped = |s: &str| {
        let v4: SocketAddr = addr(s);
        let IpAddr::V4(ip) = v4.ip() else {
            unreachable!()
        };
        SocketAddr::V6(SocketAddrV6::new(ip.to_ipv6_mapped(), v4.port(), 0, 0))
    };
    let pair = (mapped("127.0.0.2:5000"), mapped("127.0.0.1:3306"));
    assert_eq!(
        encode(ProxyVersion::V1, Some(pair)),
        b"PROXY TCP4 127.0.0.2 127.0.0.1 5000 3306\r\n"
    );
    let h = header(&encode(ProxyVersion::V2, Some(pair)));
    assert_eq!(h.source, Some(addr("127.0.0.2:5000")));
    assert_eq!(h.consumed, 28);
    // A mixed pair is written as IPv6.
    let mixed = (addr("127.0.0.2:5000"), addr("[2001:db8::1]:3306"));
    assert_eq!(
        encode(ProxyVersion::V1, Some(mixed)),
        b"PROXY TCP6 ::ffff:127.0.0.2 2001:db8::1 5000 3306\r\n"
    );
}

#[test]
fn checks_send_local_and_unknown() {
    assert_eq!(encode(ProxyVersion::V1, None), b"PROXY UNKNOWN\r\n");
    assert_eq!(
        encode(ProxyVersion::V2, None),
        [&V2_SIGNATURE[..], &[0x20, 0x00, 0, 0]].concat()
    );
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
    ]
}

/// What a receiver should see for a pair: IPv4 when both can be.
fn expected(pair: (SocketAddr, SocketAddr)) -> (SocketAddr, SocketAddr) {
    same_family(pair.0, pair.1)
}

fn version() -> impl Strategy<Value = ProxyVersion> {
    prop_oneof![Just(ProxyVersion::V1), Just(ProxyVersion::V2)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn encoded_headers_parse_back(
        version in version(),
        source in socket_addr(),
        destination in socket_addr(),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let encoded = encode(version, Some((source, destination)));
        let h = header(&[encoded.clone(), tail].concat());
        let (s, d) = expected((source, destination));
        prop_assert_eq!(h.source, Some(s));
        prop_assert_eq!(h.destination, Some(d));
        prop_assert_eq!(h.consumed, encoded.len());
        let max = if version == ProxyVersion::V1 { V1_MAX } else { V2_MAX };
        prop_assert!(encoded.len() <= max);
    }

    #[test]
    fn every_truncation_is_incomplete(
        version in version(),
        pair in proptest::option::of((socket_addr(), socket_addr())),
    ) {
        let encoded = encode(version, pair);
        for cut in 0..encoded.len() {
            prop_assert_eq!(parse(&encoded[..cut]), Ok(Parsed::Incomplete), "cut at {}", cut);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        if let Ok(Parsed::Header(h)) = parse(&bytes) {
            prop_assert!(h.consumed <= bytes.len() && h.consumed <= MAX_LEN);
        }
    }

    #[test]
    fn damaged_headers_never_panic(
        version in version(),
        pair in proptest::option::of((socket_addr(), socket_addr())),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut encoded = encode(version, pair);
        let i = at.index(encoded.len());
        encoded[i] = byte;
        if let Ok(Parsed::Header(h)) = parse(&encoded) {
            prop_assert!(h.consumed <= encoded.len());
        }
    }

    #[test]
    fn v1_like_text_never_panics(text in "PROXY (TCP4|TCP6|UNKNOWN)[ 0-9a-f.:]{0,110}(\r\n)?") {
        if let Ok(Parsed::Header(h)) = parse(text.as_bytes()) {
            prop_assert!(h.consumed <= text.len());
        }
    }
}
