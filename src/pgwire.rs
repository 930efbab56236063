//! The little of PostgreSQL's wire protocol a proxy needs to route cancel
//! requests: recognising a CancelRequest as a connection's first packet,
//! and reading the BackendKeyData a server sends while a session starts.
//!
//! A client cancels a query by opening a new connection whose only packet
//! is a CancelRequest carrying the process id and secret key the server
//! gave its session; the server that runs the query must get it. The key
//! passes in the clear before any query, unless the session negotiated TLS
//! (then it cannot be read, and the cancel is routed like any connection).
//! Pure parsers, tested without sockets; never panics on any bytes.

use std::fmt;

/// The length and code of a CancelRequest (16 bytes in all).
const CANCEL_REQUEST: (u32, u32) = (16, 80_877_102);
/// The code of an SSLRequest and of a GSSENCRequest (8 bytes each): the
/// server answers each with one byte before anything else.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// How far into a session's first server bytes the key is looked for.
const KEY_SEARCH_LIMIT: usize = 64 * 1024;

/// A session's process id and secret key. Never printed: its `Debug`
/// shows the process id only.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: u32,
    secret: u32,
}

impl fmt::Debug for CancelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CancelKey {{ pid: {}, secret: <redacted> }}", self.pid)
    }
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The key of a CancelRequest, if `first` (a connection's first bytes, at
/// least 16 of them) is one.
pub fn cancel_request(first: &[u8]) -> Option<CancelKey> {
    if first.len() < 16 || (be32(first), be32(&first[4..])) != CANCEL_REQUEST {
        return None;
    }
    Some(CancelKey {
        pid: be32(&first[8..]),
        secret: be32(&first[12..]),
    })
}

/// Reads a session's server bytes, as they pass, until the BackendKeyData
/// or the point where it cannot come any more.
#[derive(Debug)]
pub struct KeyWatch {
    state: Watch,
    /// Bytes of a message header (type and length) or of the key data
    /// split across reads.
    partial: Vec<u8>,
    /// Body bytes of the current message still to skip.
    skip: usize,
    seen: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// The client asked for TLS or GSS encryption: one answer byte first.
    AnswerByte,
    /// Reading message headers.
    Messages,
    Found(CancelKey),
    /// Encrypted, too far, or malformed: no key will be read.
    GaveUp(GaveUp),
}

/// Why a session's key could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// The session is encrypted (TLS or GSS).
    Encrypted,
    /// No key within the first bytes, or bytes that are not the protocol.
    NotFound,
}

impl KeyWatch {
    /// A watch for a session whose client first sent `first` (what was
    /// read of its first packet: 8 bytes tell an SSLRequest).
    pub fn new(first: &[u8]) -> Self {
        let asks_encryption = first.len() >= 8
            && be32(first) == 8
            && matches!(be32(&first[4..]), SSL_REQUEST | GSSENC_REQUEST);
        KeyWatch {
            state: if asks_encryption {
                Watch::AnswerByte
            } else {
                Watch::Messages
            },
            partial: Vec::new(),
            skip: 0,
            seen: 0,
        }
    }

    /// The key, once read.
    pub fn key(&self) -> Option<CancelKey> {
        match self.state {
            Watch::Found(key) => Some(key),
            _ => None,
        }
    }

    /// Why no key will be read, once that is known.
    pub fn gave_up(&self) -> Option<GaveUp> {
        match self.state {
            Watch::GaveUp(why) => Some(why),
            _ => None,
        }
    }

    /// Whether more bytes could still tell something.
    pub fn watching(&self) -> bool {
        matches!(self.state, Watch::AnswerByte | Watch::Messages)
    }

    /// Looks at the next bytes from the server.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.watching() {
            if self.seen > KEY_SEARCH_LIMIT {
                self.state = Watch::GaveUp(GaveUp::NotFound);
                return;
            }
            if self.state == Watch::AnswerByte {
                self.seen += 1;
                self.state = match bytes[0] {
                    b'N' => Watch::Messages,
                    b'S' | b'G' => Watch::GaveUp(GaveUp::Encrypted),
                    // An error instead (a server too old for the request).
                    _ => Watch::GaveUp(GaveUp::NotFound),
                };
                bytes = &bytes[1..];
                continue;
            }
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                self.seen += n;
                bytes = &bytes[n..];
                continue;
            }
            // A header (5 bytes), or a key message (5 + 8).
            let want = if self.partial.first() == Some(&b'K') {
                13
            } else {
                5
            };
            let n = (want - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..n]);
            self.seen += n;
            bytes = &bytes[n..];
            if self.partial.len() < want {
                continue;
            }
            self.header();
        }
        if self.watching() && self.seen > KEY_SEARCH_LIMIT {
            self.state = Watch::GaveUp(GaveUp::NotFound);
        }
    }

    /// A complete header (or key message) is in `partial`.
    fn header(&mut self) {
        let kind = self.partial[0];
        let len = be32(&self.partial[1..5]) as usize;
        if !(4..=KEY_SEARCH_LIMIT).contains(&len) {
            self.state = Watch::GaveUp(GaveUp::NotFound);
            return;
        }
        match kind {
            b'K' if len == 12 && self.partial.len() == 13 => {
                self.state = Watch::Found(CancelKey {
                    pid: be32(&self.partial[5..]),
                    secret: be32(&self.partial[9..]),
                });
            }
            b'K' if len == 12 => return, // read the key's 8 bytes next
            // Ready for queries, or an error: no key comes after these.
            b'Z' | b'E' | b'K' => self.state = Watch::GaveUp(GaveUp::NotFound),
            _ => self.skip = len - 4,
        }
        self.partial.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// What a server sends after a successful login: AuthenticationOk,
    /// ParameterStatus, BackendKeyData (pid 4242, secret 0xdeadbeef),
    /// ReadyForQuery.
    fn login_reply() -> Vec<u8> {
        let mut key = 4242u32.to_be_bytes().to_vec();
        key.extend_from_slice(&0xdead_beef_u32.to_be_bytes());
        [
            message(b'R', &0u32.to_be_bytes()),
            message(b'S', b"server_version\x0015.0\x00"),
            message(b'K', &key),
            message(b'Z', b"I"),
        ]
        .concat()
    }

    fn startup() -> Vec<u8> {
        let mut m = 40u32.to_be_bytes().to_vec();
        m.extend_from_slice(&196_608u32.to_be_bytes());
        m
    }

    #[test]
    fn the_key_is_read_however_the_bytes_are_cut() {
        let reply = login_reply();
        for cut in 1..reply.len() {
            let mut watch = KeyWatch::new(&startup());
            watch.feed(&reply[..cut]);
            watch.feed(&reply[cut..]);
            let key = watch
                .key()
                .unwrap_or_else(|| panic!("cut at {cut}: {watch:?}"));
            assert_eq!((key.pid, key.secret), (4242, 0xdead_beef));
        }
        // One byte at a time.
        let mut watch = KeyWatch::new(&startup());
        for b in &reply {
            watch.feed(std::slice::from_ref(b));
        }
        assert_eq!(watch.key().map(|k| k.pid), Some(4242));
    }

    #[test]
    fn an_ssl_request_answered_n_is_read_and_answered_s_is_given_up() {
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        let mut watch = KeyWatch::new(&ssl);
        watch.feed(b"N");
        watch.feed(&login_reply());
        assert_eq!(watch.key().map(|k| k.pid), Some(4242));
        let mut watch = KeyWatch::new(&ssl);
        watch.feed(b"S\x16\x03\x01");
        assert_eq!(watch.gave_up(), Some(GaveUp::Encrypted));
        assert!(!watch.watching());
    }

    #[test]
    fn an_error_or_garbage_gives_up_without_panicking() {
        let mut watch = KeyWatch::new(&startup());
        watch.feed(&message(b'E', b"SFATAL\x00C28P01\x00\x00"));
        assert_eq!(watch.gave_up(), Some(GaveUp::NotFound));
        for garbage in [
            &b"\x00\x00\x00\x00\x00"[..],
            b"K\x00\x00\x00\x05x",
            b"\xff\xff\xff\xff\xff\xff",
        ] {
            let mut watch = KeyWatch::new(&startup());
            watch.feed(garbage);
            watch.feed(&[0u8; 100]);
            assert!(watch.key().is_none());
        }
        // Endless bodies are skipped only so far.
        let mut watch = KeyWatch::new(&startup());
        watch.feed(&message(b'S', &vec![b'x'; 70_000]));
        assert_eq!(watch.gave_up(), Some(GaveUp::NotFound));
    }

    #[test]
    fn a_cancel_request_is_recognised_and_its_secret_never_printed() {
        let mut cancel = 16u32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&80_877_102u32.to_be_bytes());
        cancel.extend_from_slice(&4242u32.to_be_bytes());
        cancel.extend_from_slice(&0xdead_beef_u32.to_be_bytes());
        let key = cancel_request(&cancel).unwrap();
        assert_eq!((key.pid, key.secret), (4242, 0xdead_beef));
        assert!(!format!("{key:?}").contains(&0xdead_beef_u32.to_string()));
        assert!(cancel_request(&startup()).is_none());
        assert!(cancel_request(&cancel[..15]).is_none());
    }
}
