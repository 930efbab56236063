//! The `mysql` check: read the server's first packet. A protocol-10
//! handshake means the server accepts connections; an ERR packet ("Too many
//! connections", "Host … is blocked") means it refuses us.
//!
//! With a `user` the check also logs in (with the password, if one is
//! configured: `mysql_native_password`, or `caching_sha2_password`'s fast
//! path), asks `SELECT @@global.read_only` for the role (`1`: a replica, or
//! a primary fenced read-only; `0`: a primary) and says `COM_QUIT`. The
//! login matters beyond the role: a server counts every connection closed
//! before authenticating against the client host, and after
//! `max_connect_errors` of them in a row (100 by default) it blocks the host
//! — pulsegate's host, for every client it proxies. Only a successful login
//! resets the count; a refused one does not add to it.

use sha1::Sha1;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{excerpt, password, read_more, CheckError, Finding, Role};
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
/// caching_sha2_password's AuthMoreData "full authentication needed": the
/// password in the clear over TLS, or RSA-encrypted.
const FULL_AUTH_NEEDED: u8 = 0x04;
/// EOF packets (a result set's end of columns, end of rows) start with
/// 0xFE and are shorter than 9 bytes.
const EOF_MARKER: u8 = 0xfe;

/// Client capabilities: PROTOCOL_41, SECURE_CONNECTION, PLUGIN_AUTH.
const CAPABILITIES: u32 = 0x0200 | 0x8000 | 0x0008_0000;
const CONNECT_WITH_DB: u32 = 0x0008;
/// utf8mb4_general_ci.
const CHARSET: u8 = 45;
const NATIVE_PASSWORD: &str = "mysql_native_password";
const CACHING_SHA2_PASSWORD: &str = "caching_sha2_password";
const COM_QUIT: u8 = 0x01;
const COM_QUERY: u8 = 0x03;
/// The role query: `1` on a replica (and on a primary fenced with
/// `read_only=1`), `0` on a primary that takes writes.
pub(crate) const ROLE_QUERY: &str = "SELECT @@global.read_only";

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
    Handshake(Handshake),
    /// An ERR packet: the server refuses the connection.
    Error(ErrPacket),
}

/// What a protocol-10 handshake offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Handshake {
    pub server_version: String,
    /// The nonce a password is scrambled with (20 bytes from any server
    /// since 4.1; empty if the greeting was cut short).
    pub scramble: Vec<u8>,
    /// The server's default authentication plugin, if it names one.
    pub plugin: Option<String>,
}

/// The server's answer to a login (HandshakeResponse or auth data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthReply {
    Ok,
    Error(ErrPacket),
    /// AuthSwitchRequest: answer for this plugin, with this nonce, instead.
    Switch {
        plugin: String,
        scramble: Vec<u8>,
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

/// After the protocol byte: the server version up to its NUL, then
/// (leniently: a field cut short is left empty) the connection id, the
/// scramble's first 8 bytes, capabilities, and past the reserved bytes the
/// scramble's rest and the plugin name.
fn parse_handshake(rest: &[u8]) -> Result<Greeting, PacketError> {
    let version = nul_terminated(rest).ok_or(PacketError::NoVersion)?;
    let after_version = &rest[version.len() + 1..];
    let (scramble, plugin) = scramble_and_plugin(after_version);
    Ok(Greeting::Handshake(Handshake {
        server_version: String::from_utf8_lossy(version).into_owned(),
        scramble,
        plugin,
    }))
}

/// Connection id (4), scramble part 1 (8), filler (1), capabilities low
/// (2), charset (1), status (2), capabilities high (2), scramble length
/// (1), reserved (10), scramble part 2 (max(13, length - 8), NUL last),
/// plugin name (NUL-terminated or to the end).
fn scramble_and_plugin(bytes: &[u8]) -> (Vec<u8>, Option<String>) {
    let Some(part1) = bytes.get(4..12) else {
        return (Vec::new(), None);
    };
    let mut scramble = part1.to_vec();
    let Some(&announced) = bytes.get(20) else {
        return (scramble, None);
    };
    let part2_len = usize::from(announced).saturating_sub(8).max(13);
    let Some(part2) = bytes.get(31..31 + part2_len) else {
        return (scramble, None);
    };
    // The last byte of part 2 is a NUL, not nonce.
    scramble.extend_from_slice(&part2[..part2_len - 1]);
    let tail = &bytes[31 + part2_len..];
    let name = nul_terminated(tail).unwrap_or(tail);
    let plugin = (!name.is_empty()).then(|| String::from_utf8_lossy(name).into_owned());
    (scramble, plugin)
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
        Some((&SWITCH_MARKER, rest)) => {
            let name = nul_terminated(rest).unwrap_or(rest);
            let data = rest.get(name.len() + 1..).unwrap_or_default();
            // The nonce, without the NUL most servers end it with.
            let scramble = data.strip_suffix(&[0]).unwrap_or(data).to_vec();
            Ok(AuthReply::Switch {
                plugin: String::from_utf8_lossy(name).into_owned(),
                scramble,
            })
        }
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

/// HandshakeResponse41 for `user`, answering for `plugin` with `auth`
/// (the scrambled password; empty: no password).
pub(crate) fn handshake_response(
    user: &str,
    database: Option<&str>,
    plugin: &str,
    auth: &[u8],
) -> Vec<u8> {
    let capabilities = CAPABILITIES | database.map_or(0, |_| CONNECT_WITH_DB);
    let mut out = capabilities.to_le_bytes().to_vec();
    out.extend_from_slice(&(16u32 << 20).to_le_bytes()); // max packet: 16 MiB
    out.push(CHARSET);
    out.extend_from_slice(&[0; 23]);
    push_nul_terminated(&mut out, user);
    // Scrambles are 20 or 32 bytes: the length always fits its one byte.
    out.push(auth.len() as u8);
    out.extend_from_slice(auth);
    if let Some(database) = database {
        push_nul_terminated(&mut out, database);
    }
    push_nul_terminated(&mut out, plugin);
    out
}

/// A plugin the check cannot log in with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the server wants authentication plugin `{0}`, which the check does not speak; \
     give the check user mysql_native_password or caching_sha2_password"
)]
pub(crate) struct UnsupportedPlugin(pub String);

/// What `plugin` sends for `password` with the server's `scramble`.
pub(crate) fn auth_response(
    plugin: &str,
    password: &str,
    scramble: &[u8],
) -> Result<Vec<u8>, UnsupportedPlugin> {
    match plugin {
        NATIVE_PASSWORD if password.is_empty() => Ok(Vec::new()),
        NATIVE_PASSWORD => Ok(native_scramble(password.as_bytes(), scramble)),
        // caching_sha2_password says "no password" with one NUL.
        CACHING_SHA2_PASSWORD if password.is_empty() => Ok(vec![0]),
        CACHING_SHA2_PASSWORD => Ok(sha2_scramble(password.as_bytes(), scramble)),
        other => Err(UnsupportedPlugin(other.to_string())),
    }
}

/// mysql_native_password: SHA1(password) XOR SHA1(scramble ‖ SHA1(SHA1(password))).
fn native_scramble(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    let once = Sha1::digest(password);
    let twice = Sha1::digest(once);
    let mask = Sha1::new()
        .chain_update(scramble)
        .chain_update(twice)
        .finalize();
    once.iter().zip(mask).map(|(a, b)| a ^ b).collect()
}

/// caching_sha2_password's fast path: SHA256(password) XOR
/// SHA256(SHA256(SHA256(password)) ‖ scramble).
fn sha2_scramble(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    let once = Sha256::digest(password);
    let twice = Sha256::digest(once);
    let mask = Sha256::new()
        .chain_update(twice)
        .chain_update(scramble)
        .finalize();
    once.iter().zip(mask).map(|(a, b)| a ^ b).collect()
}

/// Where reading the role query's result set stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResultStage {
    ColumnCount,
    Columns,
    Row,
}

/// The role from the packets answering [`ROLE_QUERY`], fed one payload at
/// a time: `Ok(None)` while more are needed. A text result set is a
/// column count, column definitions, an EOF, the row, an EOF (the check
/// does not ask for CLIENT_DEPRECATE_EOF).
#[derive(Debug)]
pub(crate) struct ReadOnlyReply {
    stage: ResultStage,
}

impl ReadOnlyReply {
    pub(crate) fn new() -> Self {
        ReadOnlyReply {
            stage: ResultStage::ColumnCount,
        }
    }

    pub(crate) fn feed(&mut self, payload: &[u8]) -> Result<Option<Role>, String> {
        match (self.stage, payload.first()) {
            (_, None) => Err("an empty packet in the answer".into()),
            (_, Some(&ERR_MARKER)) => {
                let e = parse_err(&payload[1..]).map_err(|e| e.to_string())?;
                Err(format!("refused with {e}"))
            }
            (ResultStage::ColumnCount, Some(&1)) => {
                self.stage = ResultStage::Columns;
                Ok(None)
            }
            (ResultStage::ColumnCount, Some(_)) => {
                Err(format!("answered `{}`, not one column", excerpt(payload)))
            }
            (ResultStage::Columns, Some(&EOF_MARKER)) if payload.len() < 9 => {
                self.stage = ResultStage::Row;
                Ok(None)
            }
            (ResultStage::Columns, Some(_)) => Ok(None),
            (ResultStage::Row, Some(&EOF_MARKER)) if payload.len() < 9 => {
                Err("the result has no row".into())
            }
            // The row: one length-encoded string (NULL is 0xFB).
            (ResultStage::Row, Some(&len)) => match (len, payload.get(1..)) {
                (1, Some(b"0")) => Ok(Some(Role::Primary)),
                (1, Some(b"1")) => Ok(Some(Role::Replica)),
                _ => Err(format!(
                    "read_only is `{}`, not 0 or 1",
                    excerpt(&payload[1..])
                )),
            },
        }
    }
}

fn push_nul_terminated(out: &mut Vec<u8>, text: &str) {
    out.extend(text.bytes().filter(|&b| b != 0));
    out.push(0);
}

/// Reads the first packet and judges it; logs in when a user is set.
pub(super) async fn check(config: &CheckConfig, stream: TcpStream) -> Result<Finding, CheckError> {
    let user = config.user.as_deref();
    let password = match user {
        Some(_) => password(config).map_err(CheckError::Password)?,
        None => None,
    };
    let mut conn = Conn::new(stream);
    let (seq, greeting) = match conn.greeting().await? {
        Ok(pair) => pair,
        Err(e) => return Ok(Finding::down(e.to_string())),
    };
    match (greeting, user) {
        (Greeting::Error(e), _) => Ok(Finding::down(format!("refused with {e}"))),
        (Greeting::Handshake(handshake), None) => Ok(Finding::up(
            None,
            format!("handshake from {}", handshake.server_version),
        )),
        (Greeting::Handshake(handshake), Some(user)) => {
            let login = Login {
                user,
                password: password.as_deref().unwrap_or_default(),
                database: config.database.as_deref(),
            };
            conn.login(seq, &login, &handshake).await
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

    /// Logs in (following at most one plugin switch), asks the role, then
    /// quits.
    async fn login(
        &mut self,
        greeting_seq: u8,
        login: &Login<'_>,
        handshake: &Handshake,
    ) -> Result<Finding, CheckError> {
        let user = login.user;
        let version = &handshake.server_version;
        // Answer for the server's default plugin when we speak it (saves
        // the switch round trip), else for mysql_native_password.
        let plugin = match handshake.plugin.as_deref() {
            Some(p @ (NATIVE_PASSWORD | CACHING_SHA2_PASSWORD)) => p,
            _ => NATIVE_PASSWORD,
        };
        if !login.password.is_empty() && handshake.scramble.len() < 20 {
            return Ok(Finding::down(format!(
                "login as {user}: the greeting carries no 20-byte scramble to answer with"
            )));
        }
        let auth = auth_response(plugin, login.password, &handshake.scramble).unwrap_or_default();
        let response = handshake_response(user, login.database, plugin, &auth);
        self.send(greeting_seq.wrapping_add(1), &response).await?;
        let mut switched = false;
        for _ in 0..4 {
            let (seq, reply) = match self.next().await? {
                Ok((seq, payload)) => (seq, parse_auth_reply(&payload)),
                Err(e) => return Ok(Finding::down(format!("login: {e}"))),
            };
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => return Ok(Finding::down(format!("login: {e}"))),
            };
            match reply {
                AuthReply::Ok => return self.role(user, version).await,
                AuthReply::Error(e) => {
                    return Ok(Finding::down(format!("login as {user} refused with {e}")))
                }
                AuthReply::Switch { plugin, scramble } if !switched => {
                    switched = true;
                    let answer = match auth_response(&plugin, login.password, &scramble) {
                        Ok(answer) => answer,
                        Err(e) => return Ok(Finding::down(format!("login as {user}: {e}"))),
                    };
                    self.send(seq.wrapping_add(1), &answer).await?;
                }
                AuthReply::More(data) if data == [FAST_AUTH_OK] => {}
                AuthReply::More(data) if data == [FULL_AUTH_NEEDED] => {
                    return Ok(Finding::down(format!(
                        "login as {user}: caching_sha2_password wants the full exchange \
                         (TLS or RSA), which the check does not do; log in as this user once \
                         with a client over TLS to fill the server's cache, or give it \
                         mysql_native_password"
                    )));
                }
                other => {
                    let detail = format!("login as {user}: unexpected answer {other:?}");
                    return Ok(Finding::down(detail));
                }
            }
        }
        Ok(Finding::down(format!(
            "login as {user}: no answer after 4 packets"
        )))
    }

    /// After a login: [`ROLE_QUERY`], then `COM_QUIT`.
    async fn role(&mut self, user: &str, version: &str) -> Result<Finding, CheckError> {
        let mut query = vec![COM_QUERY];
        query.extend_from_slice(ROLE_QUERY.as_bytes());
        self.send(0, &query).await?;
        let mut reply = ReadOnlyReply::new();
        // A handful of packets; more means something else answered.
        for _ in 0..8 {
            let payload = match self.next().await? {
                Ok((_, payload)) => payload,
                Err(e) => return Ok(Finding::down(format!("role query: {e}"))),
            };
            match reply.feed(&payload) {
                Ok(None) => continue,
                Ok(Some(role)) => {
                    // Best effort: the server logs no aborted connection.
                    let _ = self.send(0, &[COM_QUIT]).await;
                    let detail = format!(
                        "logged in as {user} to {version}; read_only={}",
                        u8::from(role == Role::Replica)
                    );
                    return Ok(Finding::up(Some(role), detail));
                }
                Err(e) => return Ok(Finding::down(format!("role query ({ROLE_QUERY}): {e}"))),
            }
        }
        Ok(Finding::down(format!(
            "role query ({ROLE_QUERY}): no row after 8 packets"
        )))
    }
}

/// Who the check logs in as.
struct Login<'a> {
    user: &'a str,
    /// Empty: no password.
    password: &'a str,
    database: Option<&'a str>,
}

#[cfg(test)]
mod tests;
