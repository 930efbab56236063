//! The echo backend of the demo, the benches and the tests: `pulsegate
//! lab-backend`, a tiny echo server (or an idle client) run as a separate
//! process so an experiment can SIGKILL or SIGSTOP a real peer
//! ([`EchoBackend`], [`Lab::start_echo_backend`]), and the same echo
//! server in this process where no peer needs killing
//! ([`spawn_echo_server`]).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Lab, LabError, LabProcess};

/// The line the idle client sends and expects back.
const HELLO: &[u8] = b"hello\n";

/// Command-line arguments of the hidden `lab-backend` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// Serve echo on this address.
    #[arg(
        long,
        value_name = "ADDR",
        required_unless_present = "connect",
        conflicts_with = "connect"
    )]
    pub listen: Option<SocketAddr>,
    /// Be a client instead: connect here, exchange one line ("hello"),
    /// print "connected LOCAL -> ADDR", then hold the connection idle.
    #[arg(long, value_name = "ADDR")]
    pub connect: Option<SocketAddr>,
    /// Echo server: stop reading a connection once it has received this
    /// many bytes (a live but slow reader) ...
    #[arg(
        long,
        value_name = "BYTES",
        requires = "pause_for",
        requires = "listen"
    )]
    pub pause_reading_after: Option<u64>,
    /// ... for this long (e.g. "10s"), then read on.
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = humantime::parse_duration,
        requires = "pause_reading_after"
    )]
    pub pause_for: Option<Duration>,
    /// Exit by itself after this long, so no lab process outlives its test.
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = humantime::parse_duration,
        default_value = "5m"
    )]
    pub max_lifetime: Duration,
}

/// How long an echo backend gets to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run `pulsegate lab-backend` as an echo server.
#[derive(Debug, Clone)]
pub struct EchoBackend {
    /// The pulsegate binary.
    pub exe: PathBuf,
    /// It exits by itself after this long, so none outlives its run.
    pub lifetime: Duration,
    /// Stop reading each connection for a while (a live but slow reader).
    pub pause: Option<ReadPause>,
}

impl EchoBackend {
    pub fn new(exe: &Path, lifetime: Duration) -> EchoBackend {
        EchoBackend {
            exe: exe.to_path_buf(),
            lifetime,
            pause: None,
        }
    }

    /// `<exe> lab-backend --listen ADDR --max-lifetime …`.
    pub fn command(&self, addr: SocketAddr) -> Command {
        let mut command = Command::new(&self.exe);
        command.args(["lab-backend", "--listen", &addr.to_string()]);
        command.args(["--max-lifetime", &millis(self.lifetime)]);
        if let Some(pause) = self.pause {
            command.args(["--pause-reading-after", &pause.after_bytes.to_string()]);
            command.args(["--pause-for", &millis(pause.duration)]);
        }
        command
    }
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

impl Lab {
    /// Starts `echo` on `addr` in the namespace (its output files labelled
    /// `backend`) and waits until it listens.
    pub fn start_echo_backend(
        &self,
        echo: &EchoBackend,
        addr: SocketAddr,
    ) -> Result<LabProcess, LabError> {
        let backend = self.spawn_as("backend", echo.command(addr))?;
        self.wait_ready(&backend, addr, START_TIMEOUT)?;
        Ok(backend)
    }
}

/// [`echo_server`] on a free 127.0.0.1 port, served by a thread (and
/// runtime) of its own for the rest of this process; its address.
pub fn spawn_echo_server() -> io::Result<SocketAddr> {
    let listener = crate::sockopt::listen(([127, 0, 0, 1], 0).into(), 4096)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("echo {addr}"))
        .spawn(move || {
            runtime.block_on(async {
                match TcpListener::from_std(listener) {
                    Ok(listener) => echo_server(listener, None).await,
                    Err(e) => Err(e),
                }
            })
        })?;
    Ok(addr)
}

/// A pause in reading, to play a peer that is alive but stops reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPause {
    /// Bytes a connection receives before the pause.
    pub after_bytes: u64,
    pub duration: Duration,
}

/// Runs `lab-backend` until `max_lifetime`, on a single-threaded runtime.
pub fn run_backend(args: BackendArgs) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pause = match (args.pause_reading_after, args.pause_for) {
        (Some(after_bytes), Some(duration)) => Some(ReadPause {
            after_bytes,
            duration,
        }),
        _ => None,
    };
    runtime.block_on(async {
        let work = async {
            match (args.listen, args.connect) {
                (Some(addr), _) => {
                    // A queue as deep as pulsegate's own default, so a burst
                    // of connections measures the proxy, not this server.
                    let listener = TcpListener::from_std(crate::sockopt::listen(addr, 4096)?)?;
                    println!("listening on {}", listener.local_addr()?);
                    echo_server(listener, pause).await
                }
                (None, Some(addr)) => idle_client(addr).await,
                (None, None) => Err(io::Error::other("give --listen or --connect")),
            }
        };
        match tokio::time::timeout(args.max_lifetime, work).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    })
}

/// Echoes every connection of `listener` byte for byte; a FIN is answered
/// with a FIN once everything was echoed. Runs until the task is dropped.
pub async fn echo_server(listener: TcpListener, pause: Option<ReadPause>) -> io::Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(async move {
                    if let Err(e) = echo(stream, pause).await {
                        eprintln!("echo {peer}: {e}");
                    }
                });
            }
            Err(e) => {
                // e.g. EMFILE: wait instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn echo(mut stream: TcpStream, pause: Option<ReadPause>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    let mut pause = pause;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
        received += n as u64;
        if let Some(p) = pause.filter(|p| received >= p.after_bytes) {
            pause = None;
            tokio::time::sleep(p.duration).await;
        }
    }
}

/// Connects, proves the path works with one echoed line, then holds the
/// connection without sending a byte until killed.
async fn idle_client(addr: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(HELLO).await?;
    let mut reply = [0u8; HELLO.len()];
    stream.read_exact(&mut reply).await?;
    if reply != HELLO {
        return Err(io::Error::other(format!("unexpected reply {reply:?}")));
    }
    println!("connected {} -> {addr}", stream.local_addr()?);
    std::future::pending::<()>().await;
    Ok(())
}
