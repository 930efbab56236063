//! The `mysql` check: read the server's first packet. A protocol-10
//! handshake means the server accepts connections; an ERR packet ("Too many
//! connections", "Host … is blocked") means it refuses us.
//!
//! With a `user` (one without a password, as HAProxy's `mysql-check user`),
//! the check also logs in and says `COM_QUIT`. That matters: a server counts
//! every connection closed before authenticating against the client host,
//! and after `max_connect_errors` of them in a row (100 by default) it blocks
//! the host — pulsegate's host, for every client it proxies. Only a
//! successful login resets the count; a refused one does not add to it.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{excerpt, password, read_more, CheckError, Finding};
use crate::config::CheckConfig;

/// The largest packet we accept; real greetings are ~100 bytes.
pub(crate) const MAX_PACKET: usize = 64 * 1024;

/// The protocol version of every MySQL and MariaDB since 3.21.
const PROTOCOL_10: u8 = 10;
const OK_MARKER: u8 = 0x00;
const MORE_DATA_MARKER: u8 = 0x01;
const SWITCH_MARKER: u8 = 0xfe;
const ERR_MARKER: u8 = 0xff;
/// caching_sha2_password's AuthMoreData "fast authentication succeeded".
const FAST_AUTH_OK: u8 = 0x03;

/// Client capabilities: PROTOCOL_41, SECURE_CONNECTION, PLUGIN_AUTH.
const CAPABILITIES: u32 = 0x0200 | 0x8000 | 0x0008_0000;
const CONNECT_WITH_DB: u32 = 0x0008;
/// utf8mb4_general_ci.
const CHARSET: u8 = 45;
const NATIVE_PASSWORD: &str = "mysql_native_password";
const COM_QUIT: u8 = 0x01;

/// An ERR packet's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrPacket {
    pub code: u16,
    pub sql_state: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ErrPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error {}", self.code)?;
        if let Some(state) = &self.sql_state {
            write!(f, " ({state})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A server's first packet, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Greeting {
    /// A protocol-10 handshake: the server would let us log in.
    Handshake { server_version: String },
    /// An ERR packet: the server refuses the connection.
    Error(ErrPacket),
}

/// The server's answer to a login (HandshakeResponse or auth data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthReply {
    Ok,
    Error(ErrPacket),
    /// AuthSwitchRequest: answer for this plugin instead.
    Switch {
        plugin: String,
    },
    /// AuthMoreData: a plugin's own exchange.
    More(Vec<u8>),
}

/// Why bytes are not the MySQL packet expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PacketError {
    #[error("packet announces {len} bytes, more than expected (`{shown}`)")]
    TooLarge { len: usize, shown: String },
    #[error("empty packet")]
    Empty,
    #[error("first packet is protocol {0}, not 10")]
    Protocol(u8),
    #[error("handshake has no NUL-terminated server version")]
    NoVersion,
    #[error("ERR packet too short for an error code")]
    ShortError,
    #[error("sent `{0}`, not a MySQL packet")]
    NotMysql(String),
}

/// One packet split off the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Packet<'a> {
    pub seq: u8,
    pub payload: &'a [u8],
    /// Header and payload: what to drop from the buffer.
    pub used: usize,
}

/// Splits one packet (3-byte little-endian length, sequence id, payload)
/// off `buf`: `Ok(None)` until all of it has arrived.
pub(crate) fn split_packet(buf: &[u8]) -> Result<Option<Packet<'_>>, PacketError> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    if len > MAX_PACKET {
        return Err(too_large_or_foreign(buf, len));
    }
    Ok(buf.get(4..4 + len).map(|payload| Packet {
        seq: header[3],
        payload,
        used: 4 + len,
    }))
}

/// A huge length usually means the bytes were text from another protocol
/// (an HTTP or SSH banner read as a length): name them then.
fn too_large_or_foreign(buf: &[u8], len: usize) -> PacketError {
    if buf[..3].iter().all(|b| b.is_ascii_graphic()) {
        PacketError::NotMysql(excerpt(buf))
    } else {
        PacketError::TooLarge {
            len,
            shown: excerpt(buf),
        }
    }
}

/// Parses the start of a connection: `Ok(None)` until the whole first
/// packet has arrived.
pub(crate) fn parse_greeting(buf: &[u8]) -> Result<Option<Greeting>, PacketError> {
    let Some(packet) = split_packet(buf)? else {
        return Ok(None);
    };
    match packet.payload.split_first() {
        None => Err(PacketError::Empty),
        Some((&PROTOCOL_10, rest)) => parse_handshake(rest).map(Some),
        Some((&ERR_MARKER, rest)) => parse_err(rest).map(|e| Some(Greeting::Error(e))),
        Some((&other, _)) if other < 32 => Err(PacketError::Protocol(other)),
        Some(_) => Err(PacketError::NotMysql(excerpt(buf))),
    }
}

/// After the protocol byte: the server version up to its NUL.
fn parse_handshake(rest: &[u8]) -> Result<Greeting, PacketError> {
    let version = nul_terminated(rest).ok_or(PacketError::NoVersion)?;
    Ok(Greeting::Handshake {
        server_version: String::from_utf8_lossy(version).into_owned(),
    })
}

fn nul_terminated(bytes: &[u8]) -> Option<&[u8]> {
    bytes.iter().position(|&b| b == 0).map(|end| &bytes[..end])
}

/// After 0xFF: code (u16 LE), optional `#` and 5-byte SQL state, message.
fn parse_err(rest: &[u8]) -> Result<ErrPacket, PacketError> {
    let (code, rest) = match rest {
        [lo, hi, rest @ ..] => (u16::from_le_bytes([*lo, *hi]), rest),
        _ => return Err(PacketError::ShortError),
    };
    let (sql_state, message) = match rest {
        [b'#', state @ ..] if state.len() >= 5 => (
            Some(String::from_utf8_lossy(&state[..5]).into_owned()),
            &state[5..],
        ),
        _ => (None, rest),
    };
    Ok(ErrPacket {
        code,
        sql_state,
        message: String::from_utf8_lossy(message).into_owned(),
    })
}

/// Classifies the payload of a packet answering a login.
pub(crate) fn parse_auth_reply(payload: &[u8]) -> Result<AuthReply, PacketError> {
    match payload.split_first() {
        None => Err(PacketError::Empty),
        Some((&OK_MARKER, _)) => Ok(AuthReply::Ok),
        Some((&ERR_MARKER, rest)) => parse_err(rest).map(AuthReply::Error),
        Some((&SWITCH_MARKER, rest)) => Ok(AuthReply::Switch {
            plugin: String::from_utf8_lossy(nul_terminated(rest).unwrap_or(rest)).into_owned(),
        }),
        Some((&MORE_DATA_MARKER, rest)) => Ok(AuthReply::More(rest.to_vec())),
        Some(_) => Err(PacketError::NotMysql(excerpt(payload))),
    }
}

/// A packet with its header.
pub(crate) fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .min(0xff_ffff);
    let mut out = len.to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

/// HandshakeResponse41 for `user` with an empty password.
pub(crate) fn handshake_response(user: &str, database: Option<&str>) -> Vec<u8> {
    let capabilities = CAPABILITIES | database.map_or(0, |_| CONNECT_WITH_DB);
    let mut out = capabilities.to_le_bytes().to_vec();
    out.extend_from_slice(&(16u32 << 20).to_le_bytes()); // max packet: 16 MiB
    out.push(CHARSET);
    out.extend_from_slice(&[0; 23]);
    push_nul_terminated(&mut out, user);
    out.push(0); // auth response length: no password
    if let Some(database) = database {
        push_nul_terminated(&mut out, database);
    }
    push_nul_terminated(&mut out, NATIVE_PASSWORD);
    out
}

fn push_nul_terminated(out: &mut Vec<u8>, text: &str) {
    out.extend(text.bytes().filter(|&b| b != 0));
    out.push(0);
}

/// The empty password as `plugin` sends it: caching_sha2_password sends
/// one NUL, mysql_native_password (and most others) nothing.
fn empty_password_for(plugin: &str) -> &'static [u8] {
    if plugin == "caching_sha2_password" {
        &[0]
    } else {
        &[]
    }
}

/// Reads the first packet and judges it; logs in when a user is set.
pub(super) async fn check(config: &CheckConfig, stream: TcpStream) -> Result<Finding, CheckError> {
    let user = config.user.as_deref();
    if user.is_some() && password(config).map_err(CheckError::Password)?.is_some() {
        return Ok(Finding::down(
            "the mysql check logs in only as a user without a password; \
             remove the password or the user",
        ));
    }
    let mut conn = Conn::new(stream);
    let (seq, greeting) = match conn.greeting().await? {
        Ok(pair) => pair,
        Err(e) => return Ok(Finding::down(e.to_string())),
    };
    match (greeting, user) {
        (Greeting::Error(e), _) => Ok(Finding::down(format!("refused with {e}"))),
        (Greeting::Handshake { server_version }, None) => Ok(Finding::up(
            None,
            format!("handshake from {server_version}"),
        )),
        (Greeting::Handshake { server_version }, Some(user)) => {
            let database = config.database.as_deref();
            conn.login(seq, user, database, &server_version).await
        }
    }
}

/// Packets read from and written to one connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    async fn greeting(&mut self) -> Result<Result<(u8, Greeting), PacketError>, CheckError> {
        loop {
            match parse_greeting(&self.buf) {
                Ok(Some(greeting)) => {
                    let seq = self.buf[3];
                    self.buf.clear();
                    return Ok(Ok((seq, greeting)));
                }
                Ok(None) => read_more(&mut self.stream, &mut self.buf, "a greeting").await?,
                Err(e) => return Ok(Err(e)),
            }
        }
    }

    /// The next packet's sequence id and payload.
    async fn next(&mut self) -> Result<Result<(u8, Vec<u8>), PacketError>, CheckError> {
        loop {
            match split_packet(&self.buf) {
                Ok(Some(p)) => {
                    let (seq, payload, used) = (p.seq, p.payload.to_vec(), p.used);
                    self.buf.drain(..used);
                    return Ok(Ok((seq, payload)));
                }
                Ok(None) => read_more(&mut self.stream, &mut self.buf, "a login reply").await?,
                Err(e) => return Ok(Err(e)),
            }
        }
    }

    async fn send(&mut self, seq: u8, payload: &[u8]) -> Result<(), CheckError> {
        let bytes = packet(seq, payload);
        self.stream.write_all(&bytes).await.map_err(CheckError::Io)
    }

    /// Logs in with an empty password (following at most one plugin
    /// switch), then quits.
    async fn login(
        &mut self,
        greeting_seq: u8,
        user: &str,
        database: Option<&str>,
        server_version: &str,
    ) -> Result<Finding, CheckError> {
        let response = handshake_response(user, database);
        self.send(greeting_seq.wrapping_add(1), &response).await?;
        let mut switched = false;
        for _ in 0..4 {
            let (seq, payload) = match self.next().await? {
                Ok(pair) => pair,
                Err(e) => return Ok(Finding::down(format!("login: {e}"))),
            };
            let reply = match parse_auth_reply(&payload) {
                Ok(reply) => reply,
                Err(e) => return Ok(Finding::down(format!("login: {e}"))),
            };
            match reply {
                AuthReply::Ok => {
                    // Best effort: the server logs no aborted connection.
                    let _ = self.send(0, &[COM_QUIT]).await;
                    let detail = format!("logged in as {user} to {server_version}");
                    return Ok(Finding::up(None, detail));
                }
                AuthReply::Error(e) => {
                    return Ok(Finding::down(format!("login as {user} refused with {e}")))
                }
                AuthReply::Switch { plugin } if !switched => {
                    switched = true;
                    let answer = empty_password_for(&plugin);
                    self.send(seq.wrapping_add(1), answer).await?;
                }
                AuthReply::More(data) if data == [FAST_AUTH_OK] => {}
                other => {
                    let detail =
                        format!("login as {user}: the server wants a password ({other:?})");
                    return Ok(Finding::down(detail));
                }
            }
        }
        Ok(Finding::down(format!(
            "login as {user}: no answer after 4 packets"
        )))
    }
}

#[cfg(test)]
mod tests;
