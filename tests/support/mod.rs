//! Test helpers on top of `pulsegate::lab`: the rule for a missing
//! prerequisite ([`or_skip`], [`require`]), getting a lab, starting the
//! echo backend and pulsegate in it, pulsegate in the test's own process
//! ([`in_process_proxy`]), client sockets with bounded waits, and the
//! eviction events of pulsegate's JSON log. Submodules: [`servers`] (real
//! servers and pulsegate on the host), [`fleet`] (many client sessions),
//! [`admin`] (an HTTP client for the admin server).
// Every test file compiles this whole tree and uses its own part of it:
// what one file leaves unused is not dead code.
#![allow(dead_code)]

pub mod admin;
pub mod fleet;
pub mod servers;

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pulsegate::lab::servers::ServerError;
use pulsegate::lab::{EchoBackend, Lab, LabError, LabProcess, LinkedLab, ProxyConfig, ReadPause};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Every test has its own namespace, so fixed ports never collide.
pub const BACKEND_PORT: u16 = 7000;
pub const PROXY_PORT: u16 = 6432;
/// How long a helper waits for something that should take milliseconds.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

pub fn backend_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], BACKEND_PORT))
}

pub fn proxy_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PROXY_PORT))
}

/// The pulsegate binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pulsegate"))
}

/// The one rule for a test whose prerequisite is missing here (not root,
/// a server not installed): `Some(())` when `available`; else, under
/// `CI=true`, a failure (CI must run every test, not skip it), and
/// elsewhere "skipping: <why>" and `None`, so the test returns early.
/// `why` says what is missing and how to install it (for a program, the
/// Debian package).
pub fn require(available: bool, why: impl Display) -> Option<()> {
    if available {
        return Some(());
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {why}");
    }
    eprintln!("skipping: {why}");
    None
}

/// An error that may say a prerequisite of the test is missing here.
pub trait Prerequisite: Display {
    /// True when it says what is missing (rather than what failed).
    fn is_missing(&self) -> bool;
}

impl Prerequisite for LabError {
    fn is_missing(&self) -> bool {
        matches!(self, LabError::Unavailable(_))
    }
}

impl Prerequisite for ServerError {
    fn is_missing(&self) -> bool {
        matches!(self, ServerError::Missing(_))
    }
}

/// [`require`] for something made or found: the value, or `None` when the
/// error says a prerequisite is missing (a failure under `CI=true`); any
/// other error fails the test.
pub fn or_skip<T, E: Prerequisite>(made: Result<T, E>) -> Option<T> {
    match made {
        Ok(value) => Some(value),
        Err(e) if e.is_missing() => require(false, e).and(None),
        Err(e) => panic!("cannot set up the test: {e}"),
    }
}

/// A fresh lab, or `None` like [`or_skip`] where namespaces cannot be made.
pub fn lab_or_skip(tag: &str) -> Option<Lab> {
    or_skip(Lab::new(tag))
}

/// Two namespaces joined by the lab's emulated link (proxy near, backends
/// far), or `None` like [`lab_or_skip`].
pub fn linked_lab_or_skip(tag: &str) -> Option<LinkedLab> {
    or_skip(LinkedLab::new(tag))
}

/// Starts `pulsegate lab-backend --listen 127.0.0.1:7000` and waits until
/// it listens; `pause` makes it stop reading after that many bytes.
pub fn start_echo_backend(lab: &Lab, pause: Option<(u64, Duration)>) -> LabProcess {
    start_echo_backend_on(lab, backend_addr(), pause)
}

/// [`start_echo_backend`] on `addr` (e.g. the far side of a linked lab).
pub fn start_echo_backend_on(
    lab: &Lab,
    addr: SocketAddr,
    pause: Option<(u64, Duration)>,
) -> LabProcess {
    let mut echo = EchoBackend::new(&exe(), Duration::from_secs(5 * 60));
    echo.pause = pause.map(|(after_bytes, duration)| ReadPause {
        after_bytes,
        duration,
    });
    lab.start_echo_backend(&echo, addr)
        .expect("start the echo backend")
}

/// The echo server in this process ([`pulsegate::lab::echo_server`]), on
/// a free loopback port for the rest of the test run.
pub fn echo_backend() -> SocketAddr {
    pulsegate::lab::spawn_echo_server().expect("start the echo server")
}

/// Starts `pulsegate --log-format json run` on 127.0.0.1:6432 in front of
/// `backend` (probe_interval 1s, dead_after 1s, user_timeout 60s on both
/// legs, so only the watcher can decide) and waits until it listens.
pub fn start_proxy(lab: &Lab, backend: SocketAddr) -> LabProcess {
    let config = ProxyConfig::new(proxy_addr(), backend);
    lab.start_pulsegate(&exe(), &config)
        .expect("start pulsegate")
}

/// A default blocking client socket connected from inside the lab.
pub fn connect(lab: &Lab, addr: SocketAddr) -> TcpStream {
    lab.enter(|| TcpStream::connect_timeout(&addr, SETUP_TIMEOUT))
        .expect("enter the lab")
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// A listener bound inside the lab.
pub fn listen(lab: &Lab, addr: SocketAddr) -> TcpListener {
    lab.enter(|| TcpListener::bind(addr))
        .expect("enter the lab")
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// Accepts one connection within `timeout`.
pub fn accept(listener: &TcpListener, timeout: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no connection within {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Sends a line and expects it echoed, proving the path works.
pub fn exchange_line(stream: &mut TcpStream) {
    let line = b"hello\n";
    stream.set_read_timeout(Some(SETUP_TIMEOUT)).unwrap();
    stream.write_all(line).unwrap();
    let mut reply = [0u8; 6];
    stream.read_exact(&mut reply).expect("echo of the line");
    assert_eq!(&reply, line);
}

/// Blackholes `port` and SIGKILLs `process`: the peer vanishes without a
/// FIN or RST reaching anyone. Returns when the DROP rules were installed,
/// the instant detection times are measured from.
pub fn vanish(lab: &Lab, port: u16, process: &LabProcess) -> Instant {
    lab.drop_port(port).expect("install DROP rules");
    let fault = Instant::now();
    process.kill().expect("SIGKILL");
    fault
}

/// How a blocking read ended.
#[derive(Debug)]
pub enum ReadEnd {
    Error(io::Error),
    Eof,
    /// Unexpected bytes arrived.
    Data(usize),
    /// Nothing happened within the timeout.
    Nothing,
}

/// Blocks in `read` for at most `timeout`; returns how it ended and when.
pub fn read_end(stream: &mut TcpStream, timeout: Duration) -> (ReadEnd, Instant) {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let end = match stream.read(&mut buf) {
        Ok(0) => ReadEnd::Eof,
        Ok(n) => ReadEnd::Data(n),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            ReadEnd::Nothing
        }
        Err(e) => ReadEnd::Error(e),
    };
    (end, Instant::now())
}

/// One eviction event of pulsegate's JSON log.
#[derive(Debug, Clone)]
pub struct Eviction {
    pub reason: String,
    pub dead_leg: String,
    pub json: serde_json::Value,
}

/// The eviction events in `proxy`'s log so far. Every complete line must
/// be a JSON object (a partial last line is left for later).
pub fn evictions(proxy: &LabProcess) -> Vec<Eviction> {
    let log = proxy.stderr();
    let complete = log.rsplit_once('\n').map_or("", |(done, _)| done);
    complete
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"))
        })
        .filter(|json| json["event"] == "eviction")
        .map(|json| {
            assert_eq!(json["target"], "pulsegate::evict", "{json}");
            Eviction {
                reason: json["reason"].as_str().unwrap_or_default().to_string(),
                dead_leg: json["dead_leg"].as_str().unwrap_or_default().to_string(),
                json,
            }
        })
        .collect()
}

/// Waits (at most `timeout`) for exactly one eviction event and returns it.
pub fn wait_eviction(proxy: &LabProcess, timeout: Duration) -> Eviction {
    let deadline = Instant::now() + timeout;
    loop {
        let found = evictions(proxy);
        if let Some(first) = found.first() {
            assert_eq!(found.len(), 1, "one session, one eviction: {found:#?}");
            return first.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no eviction event within {timeout:?}; pulsegate's log:\n{}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The result of pushing bytes through an echo path.
pub struct Transfer {
    pub sent: Vec<u8>,
    pub received: Vec<u8>,
    pub bytes_received: u64,
    pub elapsed: Duration,
}

/// Writes `total` random bytes then a FIN on one thread while reading the
/// echo to EOF on this one, hashing both sides. Every read and write waits
/// at most `io_timeout`, so a stuck path fails instead of hanging.
pub fn echo_transfer(stream: TcpStream, total: usize, io_timeout: Duration) -> Transfer {
    let started = Instant::now();
    stream.set_read_timeout(Some(io_timeout)).unwrap();
    stream.set_write_timeout(Some(io_timeout)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || -> io::Result<Vec<u8>> {
        let mut hash = Sha256::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            rand::rng().fill_bytes(&mut chunk[..n]);
            writer.write_all(&chunk[..n])?;
            hash.update(&chunk[..n]);
            left -= n;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(hash.finalize().to_vec())
    });
    let mut reader = stream;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes_received = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                bytes_received += n as u64;
            }
            Err(e) => panic!("reading the echo after {bytes_received} bytes: {e}"),
        }
    }
    let sent = sender
        .join()
        .expect("writer thread")
        .expect("writing through the proxy");
    Transfer {
        sent,
        received: hash.finalize().to_vec(),
        bytes_received,
        elapsed: started.elapsed(),
    }
}

/// The TOML of one listener `name` on an ephemeral loopback port in
/// front of `backends`, with `more` (its other keys and tables) after.
pub fn listener_toml(name: &str, backends: &[SocketAddr], more: &str) -> String {
    let list = backends
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nbackends = [{list}]\n{more}\n"
    )
}

/// pulsegate serving in this test's process.
pub struct InProcessProxy {
    /// Where its (first) listener is bound.
    pub addr: SocketAddr,
    /// Cancel to drain and stop it.
    pub shutdown: CancellationToken,
    /// Ends when it has stopped.
    pub task: JoinHandle<()>,
}

/// Runs pulsegate in this test's process with the config `toml` (e.g.
/// [`listener_toml`]; a listener bound to `127.0.0.1:0` gets an ephemeral
/// port).
pub async fn in_process_proxy(toml: &str) -> InProcessProxy {
    let config = pulsegate::config::parse(toml, "test.toml").expect("valid test config");
    let bound = pulsegate::proxy::bind_all(&config).await.expect("bind");
    let addr = bound[0].1.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(pulsegate::proxy::serve(bound, shutdown.clone()));
    InProcessProxy {
        addr,
        shutdown,
        task,
    }
}
