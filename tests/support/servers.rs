//! Real servers for the tests on this host's loopback, on top of
//! `pulsegate::lab::servers`: PostgreSQL clusters and redis-servers with
//! their files in temporary directories, pulsegate itself as a process
//! with its JSON log ([`HostProxy`]), and client programs run to their
//! end with a deadline ([`run_bounded`]).

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pulsegate::lab::servers::postgres::{Cluster, Install, Login};
use pulsegate::lab::servers::redis::Redis;
use pulsegate::lab::servers::{HostServer, ServerError};
use tempfile::TempDir;

/// How long a server may take to start before the test gives up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A loopback port nobody listens on right now (racy: callers retry).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// Runs `command` to completion, killing it after `timeout`; its output.
/// Panics if it cannot be started or does not finish in time.
pub fn run_bounded(mut command: Command, timeout: Duration) -> Output {
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    // Drain the pipes on threads so a chatty child never blocks.
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut err = child.stderr.take().expect("stderr pipe");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A temporary directory for a server's files.
fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

// --------------------------------------------------------------- postgres

/// A PostgreSQL cluster made by `initdb` in a temporary directory, removed
/// on drop: declare the servers started from it after it, so they stop
/// first.
pub struct PgCluster {
    cluster: Cluster,
    _dir: TempDir,
}

impl PgCluster {
    /// A cluster with trust authentication and superuser `postgres`.
    pub fn init() -> Result<PgCluster, ServerError> {
        PgCluster::init_with(Login::Trust)
    }

    pub fn init_with(login: Login) -> Result<PgCluster, ServerError> {
        let install = Install::find()?;
        let dir = temp_dir("pulsegate-pg-");
        let cluster = install.init(dir.path(), login)?;
        Ok(PgCluster { cluster, _dir: dir })
    }
}

impl Deref for PgCluster {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

// ------------------------------------------------------------------ redis

/// A redis-server on a free loopback port ([`HostServer`]) with its files
/// in a temporary directory.
pub struct RedisServer {
    // Declared first: it stops before its directory goes.
    server: HostServer,
    _dir: TempDir,
}

impl RedisServer {
    /// A primary, or a replica of `replica_of`, with `args` added.
    pub fn start(
        replica_of: Option<SocketAddr>,
        args: &[&str],
    ) -> Result<RedisServer, ServerError> {
        let dir = temp_dir("pulsegate-redis-");
        let mut redis = Redis::new(dir.path())?;
        redis.replica_of = replica_of;
        redis.args = args.iter().map(|a| a.to_string()).collect();
        let server = redis.start_on_host()?;
        Ok(RedisServer { server, _dir: dir })
    }
}

impl Deref for RedisServer {
    type Target = HostServer;

    fn deref(&self) -> &HostServer {
        &self.server
    }
}

// -------------------------------------------------------------- pulsegate

/// `pulsegate --log-format json run -c FILE` on the host, with its JSON
/// log in a temp file; SIGTERM on drop (SIGKILL if it lingers).
pub struct HostProxy {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl HostProxy {
    /// Writes `toml(bind)` for a free port and starts the binary `exe`,
    /// retrying on another port if it cannot bind.
    pub fn start(exe: &Path, toml: impl Fn(SocketAddr) -> String) -> HostProxy {
        let dir = tempfile::Builder::new()
            .prefix("pulsegate-proxy-")
            .tempdir()
            .expect("temp dir");
        let log = dir.path().join("pulsegate.log");
        let file = dir.path().join("pulsegate.toml");
        for _ in 0..3 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            fs::write(&file, toml(addr)).expect("write the config");
            let out = fs::File::create(&log).expect("create the log");
            let mut child = Command::new(exe)
                .args(["--log-format", "json", "--log-level", "info", "run", "-c"])
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup the log"))
                .stderr(out)
                .spawn()
                .expect("start pulsegate");
            let deadline = Instant::now() + START_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return HostProxy {
                        child,
                        addr,
                        log,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "pulsegate on {addr} did not start:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("pulsegate did not start after 3 tries");
    }

    /// Everything pulsegate logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The complete JSON lines of the log so far, parsed; panics on a line
    /// that is not JSON.
    pub fn events(&self) -> Vec<serde_json::Value> {
        json_lines(&self.log())
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal pulsegate");
    }

    /// Waits at most `timeout` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The config file pulsegate was started with (rewrite it, then
    /// reload).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("pulsegate.toml")
    }
}

impl Drop for HostProxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The complete lines of a JSON log, each parsed (a partial last line is
/// left out); panics on a line that is not JSON.
pub fn json_lines(log: &str) -> Vec<serde_json::Value> {
    let complete = log.rsplit_once('\n').map_or("", |(done, _)| done);
    complete
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"))
        })
        .collect()
}

/// The `"backend state changed"` events of a JSON log, as
/// (backend, from, to).
pub fn state_changes(events: &[serde_json::Value]) -> Vec<(String, String, String)> {
    let field = |json: &serde_json::Value, key: &str| {
        json[key]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| json[key].to_string())
    };
    events
        .iter()
        .filter(|json| json["message"] == "backend state changed")
        .map(|json| {
            (
                field(json, "backend"),
                field(json, "from"),
                field(json, "to"),
            )
        })
        .collect()
}
