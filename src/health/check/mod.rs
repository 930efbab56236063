//! One health check of one backend address, on a fresh connection: `tcp`
//! (connect), `postgres`, `mysql`, `redis`, `http`. A check never panics on
//! what a backend sends; every outcome carries a one-line detail for logs.
//!
//! Each protocol lives in its own submodule, split into pure parsers of what
//! the backend sends (unit- and property-tested beside them) and the little
//! I/O that feeds them. The whole check runs under `config.timeout`.
//!
//! How a check fails matters as much as whether it does. A backend that
//! *answered wrongly* (refused the connection, sent an error, spoke the
//! wrong protocol, or accepted the connection and then said nothing — a
//! frozen process) is [`CheckStatus::Down`]. A connect that got *no
//! answer* is [`CheckStatus::NoAnswer`]: the host, or only the network on
//! the way, is silent, which the sessions' own probes can tell apart. A
//! check that could not even run on our side (out of file descriptors, no
//! route from here, an unreadable password) is [`CheckStatus::Unknown`]
//! and says nothing about the backend.

mod http;
mod mysql;
mod postgres;
mod redis;
mod tcp;

/// What a check returns, defined with the backend state it feeds.
pub use crate::backend::state::{CheckOutcome, CheckStatus, Role};

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{CheckConfig, CheckKind, ProxyVersion};
use crate::telemetry::one_line;
use crate::upstream::ConnectFailure;

/// Runs one check of `addr` under `config.timeout`.
pub async fn check(config: &CheckConfig, addr: SocketAddr) -> CheckOutcome {
    check_sending_header(config, addr, None).await
}

/// [`check`] for a listener with `send_proxy`, whose backends may then
/// require a PROXY header: the check's connection starts with a v2 LOCAL
/// or a v1 `PROXY UNKNOWN` header, so the backend keeps the check's own
/// address (as HAProxy's `check-send-proxy` does).
pub async fn check_sending_header(
    config: &CheckConfig,
    addr: SocketAddr,
    send_proxy: Option<ProxyVersion>,
) -> CheckOutcome {
    let started = Instant::now();
    let finding = connect_and_run(config, addr, send_proxy).await;
    CheckOutcome {
        status: finding.status,
        role: finding.role,
        latency: started.elapsed(),
        detail: finding.detail,
    }
}

async fn connect_and_run(
    config: &CheckConfig,
    addr: SocketAddr,
    send_proxy: Option<ProxyVersion>,
) -> Finding {
    let started = tokio::time::Instant::now();
    let deadline = started + config.timeout;
    let timeout = humantime::format_duration(config.timeout);
    let mut stream = match tokio::time::timeout_at(deadline, connect(addr, config.timeout)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return connect_failure(&e),
        Err(_) => {
            return Finding::no_answer(format!("connect: no answer within timeout ({timeout})"))
        }
    };
    if let Some(version) = send_proxy {
        let header = crate::proxy_header::encode(version, None);
        if let Err(e) = stream.write_all(&header).await {
            return Finding::down(format!("cannot write the PROXY header: {e}"));
        }
    }
    let answer_by = answer_deadline(deadline, started.elapsed());
    let waited = if answer_by > deadline {
        format!(
            "{} (the timeout {timeout} stretched to {ANSWER_ROUND_TRIPS} round trips of this path)",
            humantime::format_duration(round_ms(answer_by - started))
        )
    } else {
        format!("timeout ({timeout})")
    };
    match tokio::time::timeout_at(answer_by, run(config, addr, stream)).await {
        Ok(Ok(finding)) => finding,
        Ok(Err(e @ CheckError::Password(_))) => {
            Finding::unknown(format!("cannot run the check here: {}", one_line(&e)))
        }
        Ok(Err(e)) => Finding::down(one_line(&e)),
        Err(_) => Finding::down(format!("connected, but no answer within {waited}")),
    }
}

/// Round trips a check's exchange may need after the connect (PostgreSQL:
/// startup, authentication, the role query).
const ANSWER_ROUND_TRIPS: u32 = 4;

/// When a connected check must have its answer: by the configured
/// timeout, or — on a path whose round trip is a large part of the
/// timeout (a far or lossy link) — within [`ANSWER_ROUND_TRIPS`] of the
/// round trip the connect just measured. A backend that answers, however
/// far, is not down; a frozen one still gets no more than a few of its
/// path's round trips (on a LAN: the configured timeout).
fn answer_deadline(deadline: tokio::time::Instant, connect_took: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    deadline.max(now + connect_took * ANSWER_ROUND_TRIPS)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

fn connect_failure(e: &io::Error) -> Finding {
    match ConnectFailure::of(e) {
        ConnectFailure::Refused => Finding::down(format!("connect: {e}")),
        ConnectFailure::NoAnswer => Finding::no_answer(format!("connect: {e}")),
        ConnectFailure::Local => Finding::unknown(format!("connect failed on our side: {e}")),
    }
}

async fn run(
    config: &CheckConfig,
    addr: SocketAddr,
    stream: TcpStream,
) -> Result<Finding, CheckError> {
    match config.kind {
        CheckKind::Tcp => tcp::check(stream).await,
        CheckKind::Postgres => postgres::check(config, stream).await,
        CheckKind::Mysql => mysql::check(config, stream).await,
        CheckKind::Redis => redis::check(config, stream).await,
        CheckKind::Http => http::check(config, addr, stream).await,
    }
}

/// What one protocol check concluded, before latency is added.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Finding {
    status: CheckStatus,
    role: Option<Role>,
    detail: String,
}

impl Finding {
    fn up(role: Option<Role>, detail: impl Into<String>) -> Self {
        Finding {
            status: CheckStatus::Up,
            role,
            detail: detail.into(),
        }
    }

    fn not_ready(detail: impl Into<String>) -> Self {
        Finding {
            status: CheckStatus::NotReady,
            role: None,
            detail: detail.into(),
        }
    }

    fn down(detail: impl Into<String>) -> Self {
        Finding {
            status: CheckStatus::Down,
            role: None,
            detail: detail.into(),
        }
    }

    fn no_answer(detail: impl Into<String>) -> Self {
        Finding {
            status: CheckStatus::NoAnswer,
            role: None,
            detail: detail.into(),
        }
    }

    fn unknown(detail: impl Into<String>) -> Self {
        Finding {
            status: CheckStatus::Unknown,
            role: None,
            detail: detail.into(),
        }
    }
}

/// Why a check could not reach a finding once connected: these all mean
/// Down, but for `Password` (our side: Unknown).
#[derive(Debug, thiserror::Error)]
enum CheckError {
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

/// Connect attempts per check: a new SYN every third of the timeout while
/// none is answered.
const CONNECT_ATTEMPTS: u32 = 3;

/// Connects to `addr`, with TCP_NODELAY (checks are small exchanges). The
/// kernel re-sends a lost SYN only after a second, longer than most check
/// timeouts, so one lost packet would fail the check: while no attempt is
/// answered, another starts every `timeout / 3`, and the first to connect
/// wins. A refusal or a local failure ends it at once (the host answered;
/// or trying again cannot help).
async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stagger = timeout / CONNECT_ATTEMPTS;
    let mut attempts = tokio::task::JoinSet::new();
    let mut last_error = None;
    for n in 1..=CONNECT_ATTEMPTS {
        attempts.spawn(TcpStream::connect(addr));
        let next = tokio::time::sleep(stagger);
        tokio::pin!(next);
        loop {
            tokio::select! {
                done = attempts.join_next() => match done {
                    // Every attempt so far failed: start the next one now.
                    None => break,
                    Some(Ok(Ok(stream))) => {
                        // Only latency is at stake: a check works without it.
                        let _ = stream.set_nodelay(true);
                        return Ok(stream);
                    }
                    Some(Ok(Err(e))) if ConnectFailure::of(&e) != ConnectFailure::NoAnswer => {
                        return Err(e)
                    }
                    Some(Ok(Err(e))) => last_error = Some(e),
                    Some(Err(e)) => last_error = Some(io::Error::other(e)),
                },
                _ = &mut next, if n < CONNECT_ATTEMPTS => break,
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no answer to any attempt")))
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
        let e = CheckError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "Connection reset by peer",
        ));
        assert_eq!(one_line(&e), "i/o: Connection reset by peer");
    }

    #[test]
    fn a_failed_connect_says_whether_the_backend_answered() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            connect_failure(&os(libc::ECONNREFUSED)).status,
            CheckStatus::Down
        );
        assert_eq!(
            connect_failure(&os(libc::EHOSTUNREACH)).status,
            CheckStatus::NoAnswer
        );
        assert_eq!(
            connect_failure(&os(libc::EMFILE)).status,
            CheckStatus::Unknown
        );
    }

    #[tokio::test]
    async fn a_far_path_stretches_the_answer_wait_a_near_one_does_not() {
        let before = tokio::time::Instant::now();
        let deadline = before + Duration::from_millis(500);
        // Loopback: a connect of 0.1 ms leaves the configured timeout.
        assert_eq!(
            answer_deadline(deadline, Duration::from_micros(100)),
            deadline
        );
        // 400 ms round trips: four of them from now.
        let far = answer_deadline(deadline, Duration::from_millis(400));
        let after = tokio::time::Instant::now();
        assert!(far >= before + Duration::from_millis(1600));
        assert!(far <= after + Duration::from_millis(1600));
    }
}
