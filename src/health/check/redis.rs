//! The `redis` check: `AUTH` (when a password is configured), `PING` and
//! `ROLE`, pipelined in one write. `+PONG` is up, `-LOADING` not ready, any
//! other error down; `ROLE` tells a master from a replica.
//!
//! Replies go through a small RESP2 parser that never panics and bounds what
//! a backend can make us hold: bulk strings up to 1 MiB, nesting up to 8,
//! a whole reply up to 64 KiB.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{excerpt, password, read_more, CheckError, Finding, Role};
use crate::config::CheckConfig;

/// The longest bulk string accepted.
pub(crate) const MAX_BULK: i64 = 1024 * 1024;
/// The deepest nesting of arrays accepted.
pub(crate) const MAX_DEPTH: usize = 8;
/// The longest whole reply accepted.
pub(crate) const MAX_REPLY: usize = 64 * 1024;
/// Digits (and sign) of the longest integer or length line accepted.
const MAX_NUMBER_LEN: usize = 20;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR …`
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nabc`, or `$-1` (null).
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n…`, or `*-1` (null).
    Array(Option<Vec<Reply>>),
}

/// Why bytes are not a RESP reply we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RespError {
    #[error("`{0}` does not start a RESP reply")]
    BadType(String),
    #[error("bad number `{0}` in a RESP reply")]
    BadNumber(String),
    #[error("bulk string of {0} bytes, more than {MAX_BULK}")]
    BulkTooLarge(i64),
    #[error("bulk string not followed by CRLF")]
    MissingCrlf,
    #[error("replies nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("reply longer than {MAX_REPLY} bytes")]
    TooLarge,
}

/// Parses one reply from the start of `buf`: `Ok(Some((reply, used)))`, or
/// `Ok(None)` when more bytes are needed.
pub(crate) fn parse_reply(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(MAX_REPLY)];
    match parse_at(window, 0, 0)? {
        Some(done) => Ok(Some(done)),
        None if buf.len() >= MAX_REPLY => Err(RespError::TooLarge),
        None => Ok(None),
    }
}

/// A reply and the bytes it used, `None` if incomplete, or why not RESP.
pub(crate) type Parsed = Result<Option<(Reply, usize)>, RespError>;

/// One line of RESP: its type byte, its text, and where the next starts.
struct Line<'a> {
    kind: u8,
    text: &'a [u8],
    next: usize,
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Parsed {
    let Some(Line { kind, text, next }) = line_at(buf, at)? else {
        return Ok(None);
    };
    match kind {
        b'+' => Ok(Some((Reply::Simple(lossy(text)), next))),
        b'-' => Ok(Some((Reply::Error(lossy(text)), next))),
        b':' => Ok(Some((Reply::Integer(number(text)?), next))),
        b'$' => parse_bulk(buf, number(text)?, next),
        b'*' => parse_array(buf, number(text)?, next, depth),
        // line_at lets only the five type bytes through.
        _ => Err(RespError::BadType(excerpt(&[kind]))),
    }
}

/// The line starting at `at`, once its CRLF has arrived. A non-RESP first
/// byte fails at once, so that a peer speaking another protocol is named
/// without waiting for a CRLF.
fn line_at(buf: &[u8], at: usize) -> Result<Option<Line<'_>>, RespError> {
    let rest = buf.get(at..).unwrap_or_default();
    let kind = match rest.first() {
        None => return Ok(None),
        Some(&kind @ (b'+' | b'-' | b':' | b'$' | b'*')) => kind,
        Some(_) => return Err(RespError::BadType(excerpt(rest))),
    };
    Ok(rest.windows(2).position(|w| w == b"\r\n").map(|end| Line {
        kind,
        text: &rest[1..end],
        next: at + end + 2,
    }))
}

fn parse_bulk(buf: &[u8], len: i64, start: usize) -> Parsed {
    if len == -1 {
        return Ok(Some((Reply::Bulk(None), start)));
    }
    let len = checked_len(len, MAX_BULK, RespError::BulkTooLarge(len))?;
    let end = start + len;
    let Some(after) = buf.get(end..end + 2) else {
        return Ok(None);
    };
    if after != b"\r\n" {
        return Err(RespError::MissingCrlf);
    }
    Ok(Some((Reply::Bulk(Some(buf[start..end].to_vec())), end + 2)))
}

fn parse_array(buf: &[u8], count: i64, start: usize, depth: usize) -> Parsed {
    if count == -1 {
        return Ok(Some((Reply::Array(None), start)));
    }
    if depth >= MAX_DEPTH {
        return Err(RespError::TooDeep);
    }
    // Each element takes at least 3 bytes, so more could never fit.
    let count = checked_len(count, (MAX_REPLY / 3) as i64, RespError::TooLarge)?;
    let mut items = Vec::with_capacity(count.min(16));
    let mut at = start;
    for _ in 0..count {
        let Some((item, next)) = parse_at(buf, at, depth + 1)? else {
            return Ok(None);
        };
        items.push(item);
        at = next;
    }
    Ok(Some((Reply::Array(Some(items)), at)))
}

/// A length between 0 and `max`, or `too_big`; negative lengths other
/// than the null -1 (handled by the caller) are malformed.
fn checked_len(len: i64, max: i64, too_big: RespError) -> Result<usize, RespError> {
    match len {
        _ if len < 0 => Err(RespError::BadNumber(len.to_string())),
        _ if len > max => Err(too_big),
        _ => usize::try_from(len).map_err(|_| RespError::BadNumber(len.to_string())),
    }
}

fn number(text: &[u8]) -> Result<i64, RespError> {
    let bad = || RespError::BadNumber(excerpt(text));
    if text.len() > MAX_NUMBER_LEN {
        return Err(bad());
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)
}

fn lossy(text: &[u8]) -> String {
    String::from_utf8_lossy(text).into_owned()
}

/// A command as a RESP array of bulk strings.
pub(crate) fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Runs the check: one write of every command, then the replies in order.
pub(super) async fn check(config: &CheckConfig, stream: TcpStream) -> Result<Finding, CheckError> {
    let password = password(config).map_err(CheckError::Password)?;
    let mut request = Vec::new();
    if let Some(password) = &password {
        let mut auth: Vec<&[u8]> = vec![b"AUTH"];
        auth.extend(config.user.as_deref().map(str::as_bytes));
        auth.push(password.as_bytes());
        request.extend(encode_command(&auth));
    }
    request.extend(encode_command(&[b"PING"]));
    request.extend(encode_command(&[b"ROLE"]));

    let mut stream = stream;
    stream.write_all(&request).await.map_err(CheckError::Io)?;
    let mut replies = Replies::new(stream);
    if password.is_some() {
        if let Some(refused) = auth_finding(replies.next("the AUTH reply").await?) {
            return Ok(refused);
        }
    }
    if let Some(failed) = ping_finding(replies.next("the PING reply").await?) {
        return Ok(failed);
    }
    Ok(role_finding(replies.next("the ROLE reply").await?))
}

/// Replies read one by one from a connection.
struct Replies {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Replies {
    fn new(stream: TcpStream) -> Self {
        Replies {
            stream,
            buf: Vec::new(),
        }
    }

    /// The next reply, or a Down finding if the bytes are not RESP.
    async fn next(&mut self, what: &str) -> Result<Result<Reply, Finding>, CheckError> {
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(Ok(reply));
                }
                Ok(None) => read_more(&mut self.stream, &mut self.buf, what).await?,
                Err(e) => return Ok(Err(Finding::down(format!("{what}: {e}")))),
            }
        }
    }
}

fn auth_finding(reply: Result<Reply, Finding>) -> Option<Finding> {
    match reply {
        Ok(Reply::Simple(_)) => None,
        Ok(Reply::Error(message)) => Some(Finding::down(format!("AUTH refused: {message}"))),
        Ok(other) => Some(Finding::down(format!("AUTH answered {}", describe(&other)))),
        Err(down) => Some(down),
    }
}

fn ping_finding(reply: Result<Reply, Finding>) -> Option<Finding> {
    match reply {
        Ok(Reply::Simple(pong)) if pong == "PONG" => None,
        Ok(Reply::Error(message)) if message.starts_with("LOADING") => {
            Some(Finding::not_ready(format!("PING: {message}")))
        }
        Ok(Reply::Error(message)) => Some(Finding::down(format!("PING: {message}"))),
        Ok(other) => Some(Finding::down(format!("PING answered {}", describe(&other)))),
        Err(down) => Some(down),
    }
}

/// PING passed, so the server is up; ROLE adds the role when it can.
fn role_finding(reply: Result<Reply, Finding>) -> Finding {
    let first = match &reply {
        Ok(Reply::Array(Some(items))) => items.first(),
        _ => None,
    };
    let role = match first {
        Some(Reply::Bulk(Some(name))) => name.as_slice(),
        Some(Reply::Simple(name)) => name.as_bytes(),
        _ => b"",
    };
    match (role, &reply) {
        (b"master", _) => Finding::up(Some(Role::Primary), "PONG; role master"),
        (b"slave" | b"replica", Ok(Reply::Array(Some(items)))) => Finding::up(
            Some(Role::Replica),
            format!("PONG; role replica (link {})", replica_link(items)),
        ),
        (b"slave" | b"replica", _) => Finding::up(Some(Role::Replica), "PONG; role replica"),
        (b"sentinel", _) => {
            Finding::down("a Redis Sentinel, not a data server (ROLE answered sentinel)")
        }
        (_, Ok(Reply::Error(message))) => {
            Finding::up(None, format!("PONG; ROLE refused: {message}"))
        }
        (_, Ok(other)) => Finding::up(None, format!("PONG; ROLE answered {}", describe(other))),
        (_, Err(down)) => Finding::up(None, format!("PONG; {}", down.detail)),
    }
}

/// A replica's link to its master as ROLE reports it: `connect`,
/// `connecting`, `sync` or `connected`.
fn replica_link(items: &[Reply]) -> String {
    match items.get(3) {
        Some(Reply::Bulk(Some(state))) => excerpt(state),
        _ => "unknown".to_string(),
    }
}

/// A reply named for a detail line.
fn describe(reply: &Reply) -> String {
    match reply {
        Reply::Simple(s) => format!("+{}", excerpt(s.as_bytes())),
        Reply::Error(s) => format!("-{}", excerpt(s.as_bytes())),
        Reply::Integer(i) => format!(":{i}"),
        Reply::Bulk(None) | Reply::Array(None) => "null".to_string(),
        Reply::Bulk(Some(bytes)) => format!("\"{}\"", excerpt(bytes)),
        Reply::Array(Some(items)) => format!("an array of {}", items.len()),
    }
}

#[cfg(test)]
mod tests;
