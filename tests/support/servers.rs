//! Real servers for the failover and load tests: PostgreSQL clusters made
//! with `initdb` in a temporary directory (never the system service), the
//! commands that start them (in a lab namespace or on the host), and the
//! "skip or fail under CI" rule for missing binaries.
//!
//! Declared by each test file with
//! `#[path = "support/servers.rs"] mod servers;`.
#![allow(dead_code)] // each test file uses its own subset

use std::fs;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a server may take to start before the test gives up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `Some(())` when `available`; else prints "skipping: <reason>" and gives
/// `None`, or panics under `CI=true` (CI must run the test, not skip it).
pub fn require(available: bool, reason: &str) -> Option<()> {
    if available {
        return Some(());
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {reason}");
    }
    eprintln!("skipping: {reason}");
    None
}

/// True when `program` (a path, or a name on PATH) exists as a file.
pub fn installed(program: &str) -> bool {
    let path = Path::new(program);
    if path.is_absolute() {
        return path.is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A loopback port nobody listens on right now (racy: callers retry).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// True once `addr` accepts a connection, false after `timeout`.
pub fn accepts(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
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

// --------------------------------------------------------------- postgres

/// The newest installed PostgreSQL's `bin` directory.
pub fn postgres_bin() -> Option<PathBuf> {
    let mut bins: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    bins.sort();
    bins.pop().map(|(_, bin)| bin)
}

/// The uid and gid of the `postgres` account.
pub fn postgres_account() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

/// The superuser of the clusters made here (trust authentication).
pub const PG_USER: &str = "postgres";

/// A PostgreSQL data directory made by `initdb` (trust auth, superuser
/// `postgres`) in a temporary directory, removed on drop. As root the
/// server runs as the `postgres` account (PostgreSQL refuses root); as
/// another user it runs as that user.
pub struct PgCluster {
    bin: PathBuf,
    /// uid/gid to run as when the test runs as root.
    account: Option<(u32, u32)>,
    dir: TempDir,
}

impl PgCluster {
    /// initdb in a fresh temp dir, or `None` (after "skipping: ...") when
    /// PostgreSQL or, as root, the `postgres` account is missing.
    pub fn init() -> Option<PgCluster> {
        let bin = postgres_bin();
        require(
            bin.is_some(),
            "PostgreSQL is not installed (apt-get install postgresql-15)",
        )?;
        let bin = bin?;
        let account = if is_root() {
            let account = postgres_account();
            require(account.is_some(), "there is no `postgres` account")?;
            require(
                installed("setpriv") && installed("setsid"),
                "setpriv/setsid are missing (apt-get install util-linux)",
            )?;
            account
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("pulsegate-pg-")
            .tempdir()
            .expect("temp dir");
        if let Some((uid, gid)) = account {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the temp dir");
        }
        let cluster = PgCluster { bin, account, dir };
        let mut initdb = Command::new(cluster.bin.join("initdb"));
        initdb.current_dir(cluster.dir.path());
        if let Some((uid, gid)) = account {
            initdb.uid(uid).gid(gid);
        }
        initdb
            .arg("-D")
            .arg(cluster.data())
            .args(["--auth=trust", "-U", PG_USER])
            .args(["--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C"]);
        let out = run_bounded(initdb, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(cluster)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory of the server's unix socket (`-k`), private to it.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's own log (`log_destination=stderr` goes to the spawner).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `setsid [setpriv --reuid postgres ...] postgres -D DATA -p PORT ...`:
    /// the program execs all the way down, so the spawned pid is the
    /// postmaster's, and `setsid` makes it a process-group leader, so
    /// [`kill_group`] reaches its backends too. `extra` are `-c` settings.
    pub fn postgres_command(&self, listen: IpAddr, port: u16, extra: &[&str]) -> Command {
        let mut command = Command::new("setsid");
        if let Some((uid, gid)) = self.account {
            command.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "--",
            ]);
        }
        command.arg(self.bin.join("postgres"));
        command.arg("-D").arg(self.data());
        command.arg("-p").arg(port.to_string());
        command.arg("-k").arg(self.socket_dir());
        command.args(["-c", &format!("listen_addresses={listen}")]);
        for setting in [
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
        ] {
            command.args(["-c", setting]);
        }
        for setting in extra {
            command.args(["-c", setting]);
        }
        command.current_dir(self.dir.path());
        command
    }

    /// A client program of this PostgreSQL (`psql`, `pgbench`).
    pub fn client(&self, program: &str) -> PathBuf {
        self.bin.join(program)
    }
}

/// `signal` to the process group led by `leader` and to every child of
/// `leader`. PostgreSQL's backends each make themselves a session leader,
/// so the postmaster's group alone misses them: the leader is stopped
/// first (so it cannot fork or restart children meanwhile), then its
/// children found in /proc and its group get the signal. Errors mean the
/// processes are already gone.
pub fn kill_group(leader: u32, signal: Signal) {
    let pid = Pid::from_raw(leader as i32);
    let _ = kill(pid, Signal::SIGSTOP);
    for child in children_of(leader) {
        let _ = kill(Pid::from_raw(child as i32), signal);
    }
    let _ = killpg(pid, signal);
    let _ = kill(pid, signal);
    let _ = kill(pid, Signal::SIGCONT);
}

/// The processes whose parent is `parent`, from /proc/PID/stat.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                // The command name is in parentheses and may hold spaces:
                // the fields after the last ')' are state, then ppid.
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// A PostgreSQL server started on the host by the test: fast shutdown
/// (SIGINT) on drop, then SIGKILL to its whole group if it lingers.
pub struct PgServer {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl PgServer {
    /// Starts `cluster` on a free 127.0.0.1 port (retrying if another
    /// process wins the port) and waits until it accepts connections.
    pub fn start(cluster: &PgCluster, extra: &[&str]) -> PgServer {
        let log = cluster.dir().join("server.log");
        for _ in 0..3 {
            let port = free_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let out = fs::File::create(&log).expect("create the server log");
            let mut command = cluster.postgres_command(addr.ip(), port, extra);
            let child = command
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup the log"))
                .stderr(out)
                .spawn()
                .expect("start postgres");
            let mut server = PgServer {
                child,
                addr,
                log: log.clone(),
            };
            if server.wait_accepting() {
                server.wait_ready(cluster);
                return server;
            }
            eprintln!(
                "postgres on {addr} did not start:\n{}",
                fs::read_to_string(&server.log).unwrap_or_default()
            );
        }
        panic!("postgres did not start after 3 tries");
    }

    fn wait_accepting(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "postgres not listening on {} after {START_TIMEOUT:?}:\n{}",
            self.addr,
            fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Listening is not ready: until recovery ends, logins get "the
    /// database system is starting up". Waits for `pg_isready`.
    fn wait_ready(&mut self, cluster: &PgCluster) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mut command = Command::new(cluster.client("pg_isready"));
            command.args(["-h", &self.addr.ip().to_string()]).args([
                "-p",
                &self.addr.port().to_string(),
                "-t",
                "2",
            ]);
            let out = run_bounded(command, Duration::from_secs(10));
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres on {} not ready after {START_TIMEOUT:?}: {}\n{}",
                self.addr,
                String::from_utf8_lossy(&out.stdout),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let pid = self.child.id();
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        kill_group(pid, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ redis

/// A redis-server on a free 127.0.0.1 port, nothing persisted, killed on
/// drop.
pub struct RedisServer {
    child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("pulsegate-redis-")
            .tempdir()
            .expect("temp dir");
        for _ in 0..3 {
            let port = free_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut command = Command::new("redis-server");
            command.arg("--dir").arg(dir.path());
            command.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
            command.args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
            command.args(["--logfile", "", "--protected-mode", "no"]);
            let mut child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            let deadline = Instant::now() + START_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return RedisServer {
                        child,
                        addr,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("redis-server on {addr} did not start; retrying");
        }
        panic!("redis-server did not start after 3 tries");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
