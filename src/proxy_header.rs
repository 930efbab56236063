//! The PROXY protocol (HAProxy's spec, versions 1 and 2): the header a
//! proxy writes at the start of a connection to say which client it
//! carries, written on upstream connections (`send_proxy`) and read from a
//! load balancer in front of pulsegate (`accept_proxy`).
//!
//! [`encode`] writes either version; [`parse`] reads one from the front of
//! a buffer, strictly: it never panics, never looks past the header, says
//! [`Parsed::Incomplete`] while the bytes so far could still begin a valid
//! header, and names what is wrong otherwise. [`read_from`] takes a header
//! off a socket without consuming a byte after it (the client's first
//! packet stays for whoever reads next).
//!
//! Limits: a v1 line is at most [`V1_MAX`] bytes with its CRLF (the
//! spec's 107); a v2 header at most [`V2_MAX`] bytes (16 fixed, then an
//! address block and TLVs of up to 1024 bytes; the spec allows 65535, but
//! no sender needs more than a few TLVs and a client may not make us hold
//! more). TLVs are checked to fit the length exactly and then skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyVersion;

/// The longest v1 header, CRLF included (spec, section 2.1).
pub const V1_MAX: usize = 107;
/// The longest v2 header we accept: 16 fixed bytes and 1024 of addresses
/// and TLVs.
pub const V2_MAX: usize = V2_FIXED + 1024;
/// The most bytes a header of either version can take.
pub const MAX_LEN: usize = V2_MAX;

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;
const V1_PREFIX: &[u8] = b"PROXY ";

const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;
const AF_UNSPEC: u8 = 0x0;
const AF_INET: u8 = 0x1;
const AF_INET6: u8 = 0x2;
const PROTO_UNSPEC: u8 = 0x0;
const PROTO_STREAM: u8 = 0x1;
const INET_BLOCK: usize = 12;
const INET6_BLOCK: usize = 36;

/// A header read from the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The client, as the sender saw it; `None` for a v2 LOCAL or a v1
    /// UNKNOWN header (use the socket's own peer address).
    pub source: Option<SocketAddr>,
    /// The address the client connected to; `None` as for `source`.
    pub destination: Option<SocketAddr>,
    /// The header's length: the bytes after it belong to the client.
    pub consumed: usize,
}

/// What [`parse`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes so far begin a valid header; more are needed.
    Incomplete,
    Header(Header),
}

/// Why bytes are not a PROXY header. The text names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a PROXY protocol header (starts with `{0}`)")]
    NotProxy(String),
    #[error("v1 header has no CRLF within {V1_MAX} bytes")]
    V1TooLong,
    #[error("v1 header has a byte that is not printable ASCII: 0x{0:02x}")]
    V1Byte(u8),
    #[error("v1 header: {0}")]
    V1Syntax(&'static str),
    #[error("v1 header: unknown protocol `{0}` (TCP4, TCP6 or UNKNOWN)")]
    V1Protocol(String),
    #[error("v1 header: `{0}` is not an {1} address")]
    V1Address(String, &'static str),
    #[error("v1 header: `{0}` is not a port from 0 to 65535")]
    V1Port(String),
    #[error("v2 header: version {0} (only 2 exists)")]
    V2Version(u8),
    #[error("v2 header: command 0x{0:x} (LOCAL 0x0 or PROXY 0x1)")]
    V2Command(u8),
    #[error("v2 header: family/transport 0x{0:02x} (INET or INET6 over STREAM, or UNSPEC)")]
    V2Family(u8),
    #[error("v2 header: length {length} is shorter than its {needed}-byte address block")]
    V2Short { length: usize, needed: usize },
    #[error("v2 header: length {0} is above the {max} bytes accepted", max = V2_MAX - V2_FIXED)]
    V2TooLong(usize),
    #[error("v2 header: a TLV overruns the header's length")]
    V2Tlv,
}

/// Reads a header from the front of `buf`, looking at no byte after it.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if starts_like(buf, &V2_SIGNATURE) {
        if buf.len() < V2_SIGNATURE.len() {
            return Ok(Parsed::Incomplete);
        }
        return parse_v2(buf);
    }
    if starts_like(buf, V1_PREFIX) {
        return parse_v1(buf);
    }
    let shown = &buf[..buf.len().min(16)];
    Err(HeaderError::NotProxy(shown.escape_ascii().to_string()))
}

/// `buf` and `prefix` agree on their common length.
fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let mut end = None;
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\r' => match window.get(i + 1) {
                Some(b'\n') => {
                    end = Some(i);
                    break;
                }
                Some(_) => return Err(HeaderError::V1Syntax("CR not followed by LF")),
                None => {}
            },
            0x20..=0x7e => {}
            other => return Err(HeaderError::V1Byte(other)),
        }
    }
    let Some(end) = end else {
        return if buf.len() >= V1_MAX {
            Err(HeaderError::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    // Printable ASCII up to here: UTF-8.
    let line =
        std::str::from_utf8(&window[..end]).map_err(|_| HeaderError::V1Syntax("not ASCII"))?;
    let consumed = end + 2;
    let rest = &line[V1_PREFIX.len()..];
    let (protocol, addresses) = rest.split_once(' ').unwrap_or((rest, ""));
    let family = match protocol {
        // The spec: whatever follows UNKNOWN up to the CRLF is ignored.
        "UNKNOWN" => {
            return Ok(Parsed::Header(Header {
                source: None,
                destination: None,
                consumed,
            }))
        }
        "TCP4" => Family::V4,
        "TCP6" => Family::V6,
        other => return Err(HeaderError::V1Protocol(other.to_string())),
    };
    let fields: Vec<&str> = addresses.split(' ').collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(HeaderError::V1Syntax(
            "expected `PROXY TCP4|TCP6 SRC DST SPORT DPORT` with single spaces",
        ));
    };
    let source = SocketAddr::new(family.address(src)?, port(sport)?);
    let destination = SocketAddr::new(family.address(dst)?, port(dport)?);
    Ok(Parsed::Header(Header {
        source: Some(source),
        destination: Some(destination),
        consumed,
    }))
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn address(self, text: &str) -> Result<IpAddr, HeaderError> {
        match self {
            Family::V4 => text
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| HeaderError::V1Address(text.to_string(), "IPv4")),
            Family::V6 => text
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| HeaderError::V1Address(text.to_string(), "IPv6")),
        }
    }
}

/// Decimal digits only, no leading zero (but `0` itself), at most 65535.
fn port(text: &str) -> Result<u16, HeaderError> {
    let bad = || HeaderError::V1Port(text.to_string());
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return Err(bad());
    }
    text.parse::<u16>().map_err(|_| bad())
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.len() < V2_FIXED {
        // Judge the bytes that are there before waiting for the rest.
        if let Some(&ver_cmd) = buf.get(12) {
            check_ver_cmd(ver_cmd)?;
        }
        return Ok(Parsed::Incomplete);
    }
    let command = check_ver_cmd(buf[12])?;
    let fam = buf[13];
    let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if length > V2_MAX - V2_FIXED {
        return Err(HeaderError::V2TooLong(length));
    }
    let (family, transport) = (fam >> 4, fam & 0x0f);
    let block = match (command, family, transport) {
        // The spec: a LOCAL header's family and addresses are ignored.
        (CMD_LOCAL, _, _) => None,
        (_, AF_UNSPEC, PROTO_UNSPEC | PROTO_STREAM) => None,
        (_, AF_INET, PROTO_STREAM) => Some(INET_BLOCK),
        (_, AF_INET6, PROTO_STREAM) => Some(INET6_BLOCK),
        _ => return Err(HeaderError::V2Family(fam)),
    };
    let needed = block.unwrap_or(0);
    if length < needed {
        return Err(HeaderError::V2Short { length, needed });
    }
    let consumed = V2_FIXED + length;
    if buf.len() < consumed {
        return Ok(Parsed::Incomplete);
    }
    let body = &buf[V2_FIXED..consumed];
    if command == CMD_PROXY {
        check_tlvs(&body[needed..])?;
    }
    let (source, destination) = match block {
        Some(INET_BLOCK) => {
            let ip = |at: usize| {
                IpAddr::from(<[u8; 4]>::try_from(&body[at..at + 4]).unwrap_or_default())
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(8))),
                Some(SocketAddr::new(ip(4), port(10))),
            )
        }
        Some(_) => {
            let ip = |at: usize| {
                IpAddr::from(<[u8; 16]>::try_from(&body[at..at + 16]).unwrap_or_default())
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(32))),
                Some(SocketAddr::new(ip(16), port(34))),
            )
        }
        None => (None, None),
    };
    Ok(Parsed::Header(Header {
        source,
        destination,
        consumed,
    }))
}

/// The command of a version-2 header.
fn check_ver_cmd(ver_cmd: u8) -> Result<u8, HeaderError> {
    let (version, command) = (ver_cmd >> 4, ver_cmd & 0x0f);
    if version != 2 {
        return Err(HeaderError::V2Version(version));
    }
    if command != CMD_LOCAL && command != CMD_PROXY {
        return Err(HeaderError::V2Command(command));
    }
    Ok(command)
}

/// Type (1 byte), length (2), value: each must end within `tlvs`.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), HeaderError> {
    while !tlvs.is_empty() {
        let [_, hi, lo, ..] = *tlvs else {
            return Err(HeaderError::V2Tlv);
        };
        let end = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        tlvs = tlvs.get(end..).ok_or(HeaderError::V2Tlv)?;
    }
    Ok(())
}

/// The header for a connection from `source` to `destination`; `None`
/// writes v1 `PROXY UNKNOWN` or a v2 LOCAL header (a health check: the
/// receiver keeps the socket's own addresses). IPv4 pairs (IPv4-mapped
/// IPv6 included) are written as TCP4/INET; a mixed pair as TCP6/INET6.
pub fn encode(version: ProxyVersion, addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let addresses = addresses.map(|(s, d)| same_family(s, d));
    match version {
        ProxyVersion::V1 => encode_v1(addresses),
        ProxyVersion::V2 => encode_v2(addresses),
    }
}

fn encode_v1(addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let line = match addresses {
        None => "PROXY UNKNOWN\r\n".to_string(),
        Some((s, d)) => {
            let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
        }
    };
    line.into_bytes()
}

fn encode_v2(addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    match addresses {
        None => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
            out.extend_from_slice(&[0x21, (AF_INET << 4) | PROTO_STREAM, 0, INET_BLOCK as u8]);
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        Some((s, d)) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V6(ip) => ip,
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            };
            out.extend_from_slice(&[0x21, (AF_INET6 << 4) | PROTO_STREAM, 0, INET6_BLOCK as u8]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

/// Both IPv4 when both can be (IPv4-mapped IPv6 unmapped), else both IPv6.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v4 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    };
    match (v4(source), v4(destination)) {
        (Some(s), Some(d)) => (
            SocketAddr::new(s.into(), source.port()),
            SocketAddr::new(d.into(), destination.port()),
        ),
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
                IpAddr::V6(_) => a,
            };
            (v6(source), v6(destination))
        }
    }
}

/// Why no header could be read off a socket.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("closed by the client after {0} bytes, before a complete header")]
    Closed(usize),
    #[error("i/o")]
    Io(#[source] std::io::Error),
}

/// Takes a PROXY header off `stream`, leaving every byte after it unread.
///
/// It peeks, then consumes only bytes the header is known to hold (those
/// before a v1 CRLF, or within a v2 header's length), so the client's first
/// packet stays in the socket. A caller bounds the wait with a timeout.
pub async fn read_from(stream: &mut TcpStream) -> Result<Header, ReadError> {
    let mut taken = Vec::with_capacity(V1_MAX);
    let mut peeked = vec![0u8; MAX_LEN];
    loop {
        let room = MAX_LEN - taken.len();
        let n = stream
            .peek(&mut peeked[..room])
            .await
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Closed(taken.len()));
        }
        let mut candidate = taken.clone();
        candidate.extend_from_slice(&peeked[..n]);
        match parse(&candidate)? {
            Parsed::Header(header) => {
                let rest = header.consumed - taken.len();
                stream
                    .read_exact(&mut peeked[..rest])
                    .await
                    .map_err(ReadError::Io)?;
                return Ok(header);
            }
            // Every byte seen belongs to the header: take them, so the next
            // peek waits for new ones.
            Parsed::Incomplete => {
                stream
                    .read_exact(&mut peeked[..n])
                    .await
                    .map_err(ReadError::Io)?;
                taken.extend_from_slice(&peeked[..n]);
            }
        }
    }
}

#[cfg(test)]
mod tests;
