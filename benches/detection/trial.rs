//! One detection trial in a fresh lab namespace: an echo backend, HAProxy,
//! pulsegate (one process per session kind, so that one session's eviction
//! cannot hasten the other's: a dead session makes pulsegate probe every
//! other session to its backend) and an idle and a busy client session per
//! route. Then the backend vanishes (DROP rules on its port, then SIGKILL,
//! so no FIN or RST arrives) and every session is watched, concurrently,
//! until its client sees RST or EOF, or until the cap.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pulsegate::lab::{read_evictions, EchoBackend, Lab, LabProcess};

use crate::common::{self, Via};

const BACKEND_PORT: u16 = 7000;
const HAPROXY_PORT: u16 = 6500;
/// pulsegate listens here for the idle session, and one port up for the
/// busy one.
const PULSEGATE_PORT: u16 = 6432;
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for pulsegate to log the eviction it acted on.
const LOG_WAIT: Duration = Duration::from_secs(2);

/// What a session does when the backend vanishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Quiet since its last exchange, as a pooled connection waits.
    Idle,
    /// Sends a request right after the fault and waits for the answer.
    Busy,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Busy => "busy",
        }
    }
}

/// How one session learned (or did not learn) that its backend vanished.
pub struct Outcome {
    pub via: Via,
    pub mode: Mode,
    /// From the DROP rules to the client's read ending; `None` if it had
    /// not ended at the cap.
    pub detected: Option<Duration>,
    /// `RST`, `EOF`, another error, or `nothing`.
    pub how: String,
    /// pulsegate's eviction reason, from its JSON log.
    pub reason: Option<String>,
}

struct Session {
    via: Via,
    mode: Mode,
    stream: TcpStream,
    /// pulsegate's JSON log, for the eviction reason.
    log: Option<PathBuf>,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Runs one trial; sessions idle for `idle_for` before the fault, and each
/// is watched for at most `cap` after it.
pub fn run(lab: &Lab, vias: &[Via], idle_for: Duration, cap: Duration) -> Result<Vec<Outcome>> {
    let backend = start_backend(lab)?;
    let mut proxies = Vec::new(); // kept alive until the trial ends
    let mut sessions = Vec::new();
    for &via in vias {
        for mode in [Mode::Idle, Mode::Busy] {
            let (addr, log) = match via {
                Via::Direct => (local(BACKEND_PORT), None),
                Via::Haproxy => {
                    if mode == Mode::Idle {
                        proxies.push(start_haproxy(lab)?);
                    }
                    (local(HAPROXY_PORT), None)
                }
                Via::Pulsegate => {
                    let bind = local(PULSEGATE_PORT + u16::from(mode == Mode::Busy));
                    let proxy = start_pulsegate(lab, bind)?;
                    let log = proxy.stderr_path().to_path_buf();
                    proxies.push(proxy);
                    (bind, Some(log))
                }
            };
            let stream = connect_and_exchange(lab, addr)
                .with_context(|| format!("{} session via {}", mode.label(), via.label()))?;
            sessions.push(Session {
                via,
                mode,
                stream,
                log,
            });
        }
    }
    std::thread::sleep(idle_for);
    lab.drop_port(BACKEND_PORT)?;
    let fault = Instant::now();
    backend.kill()?;
    std::thread::scope(|scope| {
        let watchers: Vec<_> = sessions
            .into_iter()
            .map(|session| scope.spawn(move || watch(session, fault, cap)))
            .collect();
        watchers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a watcher thread panicked"))?
            })
            .collect()
    })
}

fn start_backend(lab: &Lab) -> Result<LabProcess> {
    let exe = Path::new(env!("CARGO_BIN_EXE_pulsegate"));
    let echo = EchoBackend::new(exe, Duration::from_secs(5 * 60));
    Ok(lab.start_echo_backend(&echo, local(BACKEND_PORT))?)
}

fn start_haproxy(lab: &Lab) -> Result<LabProcess> {
    let config = common::haproxy_config(local(HAPROXY_PORT), local(BACKEND_PORT))?;
    let path = lab.write_file("haproxy.cfg", &config)?;
    let mut command = Command::new("haproxy");
    command.args(["-db", "-f"]).arg(path);
    let haproxy = lab.spawn_as("haproxy", command)?;
    lab.wait_ready(&haproxy, local(HAPROXY_PORT), SETUP_TIMEOUT)?;
    Ok(haproxy)
}

fn start_pulsegate(lab: &Lab, bind: SocketAddr) -> Result<LabProcess> {
    let config = common::pulsegate_config(bind, local(BACKEND_PORT))?;
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pulsegate"));
    Ok(lab.start_pulsegate_with(&exe, bind, &config)?)
}

/// A client socket inside the lab that has had one line echoed.
fn connect_and_exchange(lab: &Lab, addr: SocketAddr) -> Result<TcpStream> {
    let mut stream = lab
        .enter(|| TcpStream::connect_timeout(&addr, SETUP_TIMEOUT))?
        .with_context(|| format!("connecting to {addr}"))?;
    let line = b"hello\n";
    stream.set_read_timeout(Some(SETUP_TIMEOUT))?;
    stream.write_all(line)?;
    let mut echo = [0u8; 6];
    stream
        .read_exact(&mut echo)
        .context("no echo of the first line")?;
    if &echo != line {
        bail!("echo {echo:?} instead of {line:?}");
    }
    Ok(stream)
}

/// Watches one session from the fault until its read ends or the cap.
fn watch(mut session: Session, fault: Instant, cap: Duration) -> Result<Outcome> {
    let written = match session.mode {
        Mode::Busy => session.stream.write_all(b"are you there?\n"),
        Mode::Idle => Ok(()),
    };
    let (how, at) = match written {
        Err(e) => (describe(&e), Some(Instant::now())),
        Ok(()) => read_end(&mut session.stream, fault + cap)?,
    };
    let reason = match (&session.log, at) {
        (Some(log), Some(_)) => eviction_reason(log),
        _ => None,
    };
    Ok(Outcome {
        via: session.via,
        mode: session.mode,
        detected: at.map(|at| at - fault),
        how,
        reason,
    })
}

/// Blocks in `read` until `deadline`: how the read ended and when, or
/// `nothing` and `None` at the deadline.
fn read_end(stream: &mut TcpStream, deadline: Instant) -> Result<(String, Option<Instant>)> {
    let left = deadline.saturating_duration_since(Instant::now());
    stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut buf = [0u8; 256];
    let result = stream.read(&mut buf);
    let now = Instant::now();
    Ok(match result {
        Ok(0) => ("EOF".into(), Some(now)),
        Ok(n) => bail!("{n} bytes arrived from a backend that was killed"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            ("nothing".into(), None)
        }
        Err(e) => (describe(&e), Some(now)),
    })
}

fn describe(error: &std::io::Error) -> String {
    match error.kind() {
        ErrorKind::ConnectionReset => "RST".into(),
        _ => error.to_string(),
    }
}

/// The reason of the first eviction in pulsegate's log, waiting briefly
/// for the line to be written.
fn eviction_reason(log: &std::path::Path) -> Option<String> {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        if let Some(eviction) = read_evictions(log).into_iter().next() {
            return Some(eviction.reason);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
