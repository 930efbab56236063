//! One health check of one backend address, on a fresh connection: `tcp`
//! (connect), `postgres`, `mysql`, `redis`, `http`. A check never panics on
//! what a backend sends; every outcome carries a one-line detail for logs.
//!
//! Each protocol lives in its own submodule, split into pure parsers of what
//! the backend sends (unit- and property-tested beside them) and the little
//! I/O that feeds them. The whole check runs under `config.timeout`.

mod http;
mod mysql;
mod postgres;
mod redis;
mod tcp;

pub use http::parse_status_ranges;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::{CheckConfig, CheckKind};
use crate::telemetry::one_line;

/// A backend's role as its last check reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// Serving.
    Up,
    /// Alive but not ready to serve (e.g. Redis `-LOADING`).
    NotReady,
    /// Refused, timed out, or answered with an error.
    Down,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub status: CheckStatus,
    /// The role reported (postgres, redis), when the check asks for it.
    pub role: Option<Role>,
    pub latency: Duration,
    /// One line for logs and /status: what was seen or what failed.
    pub detail: String,
}

/// Runs one check of `addr` under `config.timeout`.
pub async fn check(config: &CheckConfig, addr: SocketAddr) -> CheckOutcome {
    let started = Instant::now();
    let result = tokio::time::timeout(config.timeout, run(config, addr)).await;
    let latency = started.elapsed();
    let verdict = match result {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(e)) => Verdict::down(one_line(&e)),
        Err(_) => Verdict::down(format!(
            "no answer within timeout ({})",
            humantime::format_duration(config.timeout)
        )),
    };
    CheckOutcome {
        status: verdict.status,
        role: verdict.role,
        latency,
        detail: verdict.detail,
    }
}

async fn run(config: &CheckConfig, addr: SocketAddr) -> Result<Verdict, CheckError> {
    match config.kind {
        CheckKind::Tcp => tcp::check(addr).await,
        CheckKind::Postgres => postgres::check(config, addr).await,
        CheckKind::Mysql => mysql::check(config, addr).await,
        CheckKind::Redis => redis::check(config, addr).await,
        CheckKind::Http => http::check(config, addr).await,
    }
}

/// What one protocol check concluded, before latency is added.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    status: CheckStatus,
    role: Option<Role>,
    detail: String,
}

impl Verdict {
    fn up(role: Option<Role>, detail: impl Into<String>) -> Self {
        Verdict {
            status: CheckStatus::Up,
            role,
            detail: detail.into(),
        }
    }

    fn not_ready(detail: impl Into<String>) -> Self {
        Verdict {
            status: CheckStatus::NotReady,
            role: None,
            detail: detail.into(),
        }
    }

    fn down(detail: impl Into<String>) -> Self {
        Verdict {
            status: CheckStatus::Down,
            role: None,
            detail: detail.into(),
        }
    }
}

/// Why a check could not reach a verdict: these all mean Down.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("connect")]
    Connect(#[source] std::io::Error),
    #[error("i/o")]
    Io(#[source] std::io::Error),
    #[error("closed the connection {0}")]
    Closed(String),
    #[error("cannot read the password")]
    Password(#[source] PasswordError),
    #[error("http")]
    Http(#[source] hyper::Error),
}

/// Why the configured password could not be had.
#[derive(Debug, thiserror::Error)]
enum PasswordError {
    #[error("password_env `{0}` is not set (or not UTF-8)")]
    EnvMissing(String),
    #[error("password_file `{path}`")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Connects to `addr`, with TCP_NODELAY (checks are small exchanges).
async fn connect(addr: SocketAddr) -> Result<TcpStream, CheckError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(CheckError::Connect)?;
    // Only latency is at stake: a check works without it.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Appends what the peer sends next to `buf`; `what` names the awaited
/// message in the error if the peer closes instead.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<(), CheckError> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await.map_err(CheckError::Io)?;
    if n == 0 {
        return Err(CheckError::Closed(format!(
            "after {} bytes, before {what}",
            buf.len()
        )));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// The password from `password`, `password_env` or `password_file` (first
/// one set wins), trailing newline trimmed; `None` when none is set.
fn password(config: &CheckConfig) -> Result<Option<String>, PasswordError> {
    if let Some(password) = &config.password {
        return Ok(Some(password.clone()));
    }
    if let Some(name) = &config.password_env {
        let value = std::env::var(name).map_err(|_| PasswordError::EnvMissing(name.clone()))?;
        return Ok(Some(trim_newline(value)));
    }
    if let Some(path) = &config.password_file {
        let value = std::fs::read_to_string(path).map_err(|source| PasswordError::File {
            path: path.clone(),
            source,
        })?;
        return Ok(Some(trim_newline(value)));
    }
    Ok(None)
}

fn trim_newline(mut value: String) -> String {
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    value
}

/// Bytes as a short printable excerpt for a detail line: at most 48 bytes,
/// non-printable ones escaped.
fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 48;
    let shown = &bytes[..bytes.len().min(MAX)];
    let mut text = shown.escape_ascii().to_string();
    if bytes.len() > MAX {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_one_trailing_newline_only() {
        assert_eq!(trim_newline("secret\n".into()), "secret");
        assert_eq!(trim_newline("secret\r\n".into()), "secret");
        assert_eq!(trim_newline("secret".into()), "secret");
        assert_eq!(trim_newline("se cret \n\n".into()), "se cret \n");
    }

    #[test]
    fn excerpt_escapes_and_cuts() {
        assert_eq!(excerpt(b"S\x00\xff"), "S\\x00\\xff");
        assert_eq!(excerpt(&[b'a'; 60]).chars().count(), 49);
    }

    #[test]
    fn one_line_joins_sources() {
        let e = CheckError::Connect(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        ));
        assert_eq!(one_line(&e), "connect: Connection refused");
    }
}
