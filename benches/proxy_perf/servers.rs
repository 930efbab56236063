//! What proxy_perf measures against: an echo backend (`pulsegate
//! lab-backend`, its own process), a discarding sink (threads of the bench)
//! and, per proxy, one instance in front of each. Everything listens on
//! loopback ports that were free a moment ago; every process is killed when
//! the [`Setup`] is dropped.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pulsegate::lab::EchoBackend;

use crate::common::child::Proc;
use crate::common::{self, Via};

/// The sink's read size: large, so the sink is never the bottleneck.
const SINK_BUF: usize = 1 << 20;

/// One way to reach the servers: their addresses, and the pids of the
/// proxy processes in front of them (none for `direct`).
pub struct Route {
    pub via: Via,
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    pub echo_proxy: Option<u32>,
    pub sink_proxy: Option<u32>,
}

/// The servers, the proxies and the routes through them.
pub struct Setup {
    pub routes: Vec<Route>,
    pub sink: Sink,
    /// The echo backend and the proxies; killed on drop.
    procs: Vec<Proc>,
    /// Configs and logs; removed after the processes are gone.
    _dir: tempfile::TempDir,
}

impl Setup {
    /// Starts the echo backend, the sink, and two instances of each proxy
    /// in `vias` (one per server).
    pub fn start(vias: &[Via]) -> Result<Setup> {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let echo_addr = common::free_addr()?;
        let mut echo = start_echo(echo_addr, dir.path())?;
        echo.wait_listening(echo_addr)?;
        let sink = Sink::start()?;
        let mut procs = vec![echo];
        let mut routes = Vec::new();
        for &via in vias {
            let route = match via {
                Via::Direct => Route {
                    via,
                    echo: echo_addr,
                    sink: sink.addr,
                    echo_proxy: None,
                    sink_proxy: None,
                },
                _ => {
                    let (echo_proxy, echo_front) =
                        common::start_proxy(via, "echo", echo_addr, dir.path())?;
                    let (sink_proxy, sink_front) =
                        common::start_proxy(via, "sink", sink.addr, dir.path())?;
                    let route = Route {
                        via,
                        echo: echo_front,
                        sink: sink_front,
                        echo_proxy: Some(echo_proxy.pid()),
                        sink_proxy: Some(sink_proxy.pid()),
                    };
                    procs.extend([echo_proxy, sink_proxy]);
                    route
                }
            };
            routes.push(route);
        }
        Ok(Setup {
            routes,
            sink,
            procs,
            _dir: dir,
        })
    }

    /// Fails, with its log, if a proxy or the backend has died.
    pub fn check_running(&mut self) -> Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_running)
    }
}

fn start_echo(addr: SocketAddr, dir: &Path) -> Result<Proc> {
    let exe = Path::new(env!("CARGO_BIN_EXE_pulsegate"));
    let echo = EchoBackend::new(exe, Duration::from_secs(2 * 60 * 60));
    Proc::spawn("echo-backend", echo.command(addr), dir)
}

/// A server that reads and discards, and reports each connection's byte
/// count and the instant its last byte arrived.
pub struct Sink {
    pub addr: SocketAddr,
    drained: Receiver<Drained>,
}

/// One connection the sink read to its end.
pub struct Drained {
    pub bytes: u64,
    pub last_byte: Instant,
}

impl Sink {
    fn start() -> Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
        let addr = listener.local_addr()?;
        let (tx, drained) = mpsc::channel();
        std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || accept_forever(listener, tx))?;
        Ok(Sink { addr, drained })
    }

    /// Forgets the connections that ended so far (readiness probes).
    pub fn forget_drained(&self) {
        while self.drained.try_recv().is_ok() {}
    }

    /// The next connection that carried data, once it has ended.
    pub fn next_drained(&self, timeout: Duration) -> Result<Drained> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.drained.recv_timeout(left) {
                Ok(d) if d.bytes > 0 => return Ok(d),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!("the sink saw no transfer end within {timeout:?}")
                }
                Err(RecvTimeoutError::Disconnected) => bail!("the sink's accept thread died"),
            }
        }
    }
}

fn accept_forever(listener: TcpListener, tx: Sender<Drained>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let tx = tx.clone();
                std::thread::spawn(move || drain(stream, tx));
            }
            // e.g. EMFILE: wait rather than spin.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn drain(mut stream: TcpStream, tx: Sender<Drained>) {
    let mut buf = vec![0u8; SINK_BUF];
    let mut bytes = 0u64;
    let mut last_byte = Instant::now();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                bytes += n as u64;
                last_byte = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = tx.send(Drained { bytes, last_byte });
}
