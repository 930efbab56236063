//! A server process on this host's loopback, outside any lab: a free
//! port, its output in a log file, and a clean stop on drop.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{kill_group, ServerError};

/// How long a server may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports tried before giving up: another process may take a free port
/// between the moment it was free and the server's bind.
const PORT_TRIES: usize = 3;
/// How long a server gets to stop on SIGINT before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A server process on a 127.0.0.1 port. Dropping it continues it (if it
/// was stopped), sends its stop signal (SIGINT: PostgreSQL's fast
/// shutdown, and redis-server stops on it too; see
/// [`HostServer::stop_with`]) and waits a moment, then SIGKILLs it and
/// every process it forked.
pub struct HostServer {
    name: String,
    pid: u32,
    /// Locked to signal it only while it is known not to be reaped.
    child: Mutex<Child>,
    addr: SocketAddr,
    log: PathBuf,
    stop_signal: Signal,
}

impl HostServer {
    /// Starts `command(addr)` for a loopback address whose port was free a
    /// moment ago, its stdout and stderr in `<log_dir>/<name>.log`, and
    /// waits until it accepts connections. If it exits first (another
    /// process took the port), it is tried on another port, three times in
    /// all.
    pub fn start(
        name: &str,
        log_dir: &Path,
        mut command: impl FnMut(SocketAddr) -> Command,
    ) -> Result<HostServer, ServerError> {
        let log = log_dir.join(format!("{name}.log"));
        for _ in 0..PORT_TRIES {
            let addr = free_loopback_addr()?;
            let out = fs::File::create(&log)
                .map_err(ServerError::io(format!("cannot create {}", log.display())))?;
            let err = out
                .try_clone()
                .map_err(ServerError::io(format!("cannot reopen {}", log.display())))?;
            let child = command(addr)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(ServerError::io(format!("cannot start {name}")))?;
            let server = HostServer {
                name: name.to_string(),
                pid: child.id(),
                child: Mutex::new(child),
                addr,
                log: log.clone(),
                stop_signal: Signal::SIGINT,
            };
            if server.wait_listening()? {
                return Ok(server);
            }
            eprintln!("{name} on {addr} did not start:\n{}", server.log());
        }
        Err(ServerError::Failed(format!(
            "{name} did not start after {PORT_TRIES} tries; its log is {}",
            log.display()
        )))
    }

    /// True once it accepts connections; false if it exits first.
    fn wait_listening(&self) -> Result<bool, ServerError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.exited() {
                return Ok(false);
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Err(ServerError::Failed(format!(
                    "{} not listening on {} after {START_TIMEOUT:?}:\n{}",
                    self.name,
                    self.addr,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it with `signal` on drop instead of SIGINT (MariaDB ignores
    /// SIGINT and shuts down on SIGTERM).
    pub fn stop_with(mut self, signal: Signal) -> Self {
        self.stop_signal = signal;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything it wrote so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The file that receives its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Sends `signal` unless it already exited (so a reused pid is never
    /// signalled).
    pub fn signal(&self, signal: Signal) -> Result<(), ServerError> {
        let mut child = self.lock();
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ServerError::Failed(format!(
                "cannot send {signal} to {}: it already exited ({status})",
                self.name
            )));
        }
        kill(Pid::from_raw(self.pid as i32), signal).map_err(|e| ServerError::Io {
            what: format!("cannot send {signal} to {} (pid {})", self.name, self.pid),
            source: e.into(),
        })
    }

    /// Fails, with its log, if it has exited.
    pub fn check_running(&self) -> Result<(), ServerError> {
        let status = self.lock().try_wait();
        match status {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(ServerError::Failed(format!(
                "{} exited with {status}: {}",
                self.name,
                self.log().trim()
            ))),
            Err(e) => Err(ServerError::Io {
                what: format!("cannot wait for {}", self.name),
                source: e,
            }),
        }
    }

    fn exited(&self) -> bool {
        !matches!(self.lock().try_wait(), Ok(None))
    }

    fn lock(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        if !self.exited() {
            let pid = Pid::from_raw(self.pid as i32);
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, self.stop_signal);
            let deadline = Instant::now() + STOP_GRACE;
            while !self.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !self.exited() {
                eprintln!(
                    "{} did not stop on {} within {STOP_GRACE:?}; killing it:\n{}",
                    self.name,
                    self.stop_signal,
                    self.log()
                );
                kill_group(self.pid, Signal::SIGKILL);
            }
        }
        let mut child = self.lock();
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// 127.0.0.1 with a port nobody listened on a moment ago.
fn free_loopback_addr() -> Result<SocketAddr, ServerError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(ServerError::io(
        "cannot bind a loopback port to find a free one",
    ))?;
    listener
        .local_addr()
        .map_err(ServerError::io("cannot read a loopback port"))
}
