//! PostgreSQL for db_clients: one cluster made with `initdb` in a temporary
//! directory (trust authentication, superuser `postgres`), a postmaster on
//! a free loopback port, `pgbench -i` once, and `pgbench` runs read from
//! their summary. PostgreSQL refuses to run as root, so as root the
//! server programs run as the `postgres` account, as
//! src/bench/servers/postgres.rs does.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::common::{self, child::Proc};
use crate::programs;
use pulsegate::bench::postgres::{is_root, newest_bin, postgres_account};

/// The superuser of the cluster, and the account the server runs as when
/// the bench is root.
const USER: &str = "postgres";
/// Enough for pgbench's clients through all three routes and `-C`'s
/// connections that are still closing when the next ones open.
pub const MAX_CONNECTIONS: u32 = 200;
/// pgbench's clients (`-c`) and threads (`-j`).
pub const CLIENTS: u32 = 16;
pub const THREADS: u32 = 2;
/// How long the postmaster gets to accept connections after it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown (SIGINT) gets before the postmaster is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The server programs, the client, and the account to run the server as.
pub struct Tools {
    bin: PathBuf,
    pgbench: PathBuf,
    account: Option<(u32, u32)>,
}

impl Tools {
    /// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and
    /// `postgres` (else the directory of the `initdb` on PATH), its
    /// `pgbench` (else the one on PATH), and as root the `postgres` account.
    pub fn find() -> Result<Tools> {
        let bin = match newest_bin() {
            Some(bin) => bin,
            None => server_bin_on_path()?,
        };
        let pgbench = match bin.join("pgbench") {
            beside if beside.is_file() => beside,
            _ => programs::find("pgbench", "postgresql")?,
        };
        let account = if is_root() {
            Some(postgres_account().context(
                "there is no `postgres` account to run PostgreSQL as (it refuses to run as \
                 root); the postgresql package creates it (apt-get install postgresql)",
            )?)
        } else {
            None
        };
        Ok(Tools {
            bin,
            pgbench,
            account,
        })
    }

    /// "pgbench (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)".
    pub fn version(&self) -> Result<String> {
        programs::version(&self.pgbench)
    }

    /// `name` from the server's bin directory, else from PATH (pg_isready
    /// is in the client package, postgresql-client).
    fn program(&self, name: &str, package: &str) -> Result<PathBuf> {
        match self.bin.join(name) {
            beside if beside.is_file() => Ok(beside),
            _ => programs::find(name, package),
        }
    }

    /// `command` runs as the `postgres` account when the bench is root.
    /// The uid is set in the child itself (std also drops root's
    /// supplementary groups), so the spawned pid is the program's own and
    /// stopping it stops the postmaster.
    fn as_account(&self, command: &mut Command) {
        if let Some((uid, gid)) = self.account {
            command.uid(uid).gid(gid);
        }
    }
}

/// A running cluster: its postmaster, stopped with a fast shutdown on drop,
/// then its directory removed.
pub struct Server {
    pub addr: SocketAddr,
    proc: Proc,
    /// Holds `data/` and the unix socket; removed after the postmaster.
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.proc.stop(Signal::SIGINT, STOP_GRACE);
    }
}

impl Server {
    /// `initdb` into a temporary directory, then a postmaster on a free
    /// loopback port (`max_connections` 200, no fsync), its log in
    /// `log_dir`; returns once it accepts connections. Not in a session of
    /// its own: a Ctrl-C on the bench's terminal reaches it too, and SIGINT
    /// is PostgreSQL's fast shutdown.
    pub fn start(tools: &Tools, log_dir: &Path) -> Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("db_clients-pg")
            .tempdir()
            .context("creating PostgreSQL's temporary directory")?;
        if let Some((uid, gid)) = tools.account {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("chown {} to {USER}", dir.path().display()))?;
        }
        init(tools, dir.path(), log_dir)?;
        let addr = common::free_addr()?;
        let mut proc = Proc::spawn("postgres", postmaster(tools, dir.path(), addr), log_dir)?;
        proc.wait_listening(addr)?;
        wait_ready(tools, &mut proc, addr)?;
        Ok(Server {
            addr,
            proc,
            _dir: dir,
        })
    }

    /// Fails, with the postmaster's log, if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.proc.check_running()
    }
}

/// `initdb -D <dir>/data` with trust authentication and superuser
/// `postgres`, without syncing to disk (the cluster is thrown away).
fn init(tools: &Tools, dir: &Path, log_dir: &Path) -> Result<()> {
    let mut initdb = Command::new(tools.program("initdb", "postgresql")?);
    initdb
        .arg("-D")
        .arg(dir.join("data"))
        .args(["--auth=trust", "-U", USER])
        .args(["--no-sync", "-E", "UTF8", "--locale=C"])
        .current_dir(dir);
    tools.as_account(&mut initdb);
    programs::run_bounded(initdb, "initdb", Duration::from_secs(120), log_dir)?;
    Ok(())
}

/// The postmaster's command: listening on `addr` and a unix socket in
/// `dir`, with durability off (the data is thrown away; the bench measures
/// the network path, not the disk).
fn postmaster(tools: &Tools, dir: &Path, addr: SocketAddr) -> Command {
    let mut command = Command::new(tools.bin.join("postgres"));
    command.arg("-D").arg(dir.join("data"));
    command.args(["-p", &addr.port().to_string()]);
    command.arg("-k").arg(dir);
    let settings = [
        format!("listen_addresses={}", addr.ip()),
        format!("max_connections={MAX_CONNECTIONS}"),
        "fsync=off".into(),
        "synchronous_commit=off".into(),
        "full_page_writes=off".into(),
    ];
    for setting in &settings {
        command.args(["-c", setting]);
    }
    command.current_dir(dir);
    tools.as_account(&mut command);
    command
}

/// Waits until the postmaster accepts connections (`pg_isready`): it
/// listens before its startup ends, and a client that connects then is
/// refused with "the database system is starting up".
fn wait_ready(tools: &Tools, proc: &mut Proc, addr: SocketAddr) -> Result<()> {
    let pg_isready = tools.program("pg_isready", "postgresql-client")?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        proc.check_running()?;
        let status = Command::new(&pg_isready)
            .args(connection_args(addr))
            .args(["-d", "postgres", "-t", "1"])
            .output()
            .with_context(|| format!("running {}", pg_isready.display()))?
            .status;
        if status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "PostgreSQL on {addr} does not accept connections after {READY_TIMEOUT:?}: {}",
                proc.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `-h`, `-p` and `-U` for a client of the cluster at `addr`.
fn connection_args(addr: SocketAddr) -> Vec<String> {
    vec![
        "-h".into(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
        "-U".into(),
        USER.into(),
    ]
}

/// `pgbench -i -s <scale>` against `addr`: the tables every route then
/// reads. Done once, directly.
pub fn initialise(tools: &Tools, addr: SocketAddr, scale: u32, dir: &Path) -> Result<()> {
    let mut command = Command::new(&tools.pgbench);
    command
        .args(["-i", "-q", "-s", &scale.to_string()])
        .args(pgbench_target(addr));
    let timeout = Duration::from_secs(60 + 30 * u64::from(scale));
    programs::run_bounded(command, "pgbench-init", timeout, dir)
        .with_context(|| format!("pgbench -i -s {scale}"))?;
    Ok(())
}

/// pgbench's connection arguments: `-h`, `-p`, `-U`, then the database
/// (`postgres`), which pgbench takes as its last argument.
fn pgbench_target(addr: SocketAddr) -> Vec<String> {
    let mut args = connection_args(addr);
    args.push("postgres".into());
    args
}

/// What one pgbench run printed in its summary.
#[derive(Clone, Debug)]
pub struct Figures {
    pub tps: f64,
    /// "number of transactions actually processed".
    pub transactions: u64,
    /// "latency average = … ms", when printed.
    pub latency_avg_ms: Option<f64>,
    /// The `tps = …` line the rate was read from.
    pub tps_line: String,
}

/// `pgbench -S [-C] -c 16 -j 2 -T <secs> -n` against `addr`: select-only
/// transactions on 16 connections, or with `reconnect` a new connection
/// for every transaction. `-n`: no vacuum before the run (the tables are
/// only read).
pub fn run(
    tools: &Tools,
    addr: SocketAddr,
    secs: u64,
    reconnect: bool,
    dir: &Path,
) -> Result<Figures> {
    let mut command = Command::new(&tools.pgbench);
    command.args(["-S", "-n"]);
    if reconnect {
        command.arg("-C");
    }
    command
        .args(["-c", &CLIENTS.to_string(), "-j", &THREADS.to_string()])
        .args(["-T", &secs.to_string()])
        .args(pgbench_target(addr));
    let timeout = Duration::from_secs(secs + 120);
    let output = programs::run_bounded(command, "pgbench", timeout, dir)?;
    parse_summary(&output, reconnect).with_context(|| format!("pgbench against {addr}"))
}

/// The figures of pgbench's summary. The rate is the `tps = …` line that
/// counts what the test is about, worded differently across versions:
///
/// - a steady load (no `-C`): connecting once is not part of it, so the
///   line without it: "(without initial connection time)" in PostgreSQL 14
///   to 17, "(excluding connections establishing)" in 13;
/// - a new connection per transaction (`-C`): connecting is the load, so
///   the line with it: "(including reconnection times)" in 14 to 17,
///   "(including connections establishing)" in 13.
pub fn parse_summary(output: &str, reconnect: bool) -> Result<Figures> {
    let wanted: [&str; 2] = if reconnect {
        [
            "including reconnection times",
            "including connections establishing",
        ]
    } else {
        [
            "without initial connection time",
            "excluding connections establishing",
        ]
    };
    let tps_lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("tps ="))
        .collect();
    let tps_line = tps_lines
        .iter()
        .find(|l| wanted.iter().any(|w| l.contains(w)))
        .with_context(|| {
            format!(
                "no `tps = … ({})` line in its summary; its tps lines: {tps_lines:?}",
                wanted.join(")` or `(")
            )
        })?;
    let tps = number_after(tps_line, "tps =")?;
    let transactions = output
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("number of transactions actually processed:")
        })
        .context("no \"number of transactions actually processed\" line in its summary")?;
    // "59946", or "59946/60000" when run with -t.
    let transactions = transactions.trim().split('/').next().unwrap_or_default();
    let transactions: u64 = transactions.parse().with_context(|| {
        format!("\"number of transactions actually processed: {transactions}\" is not a count")
    })?;
    let latency_avg_ms = output
        .lines()
        .find(|l| l.trim().starts_with("latency average ="))
        .map(|l| number_after(l, "latency average ="))
        .transpose()?;
    Ok(Figures {
        tps,
        transactions,
        latency_avg_ms,
        tps_line: tps_line.to_string(),
    })
}

/// The number after `prefix` in `line` ("tps = 30159.658124 (…)"), or an
/// error naming the line.
fn number_after(line: &str, prefix: &str) -> Result<f64> {
    let value = line
        .trim()
        .strip_prefix(prefix)
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("line {line:?} does not start with {prefix:?}"))?;
    let value: f64 = value
        .parse()
        .with_context(|| format!("line {line:?}: {value:?} is not a number"))?;
    if !value.is_finite() || value < 0.0 {
        bail!("line {line:?}: {value} is not a rate");
    }
    Ok(value)
}

/// The directory of the `initdb` on PATH (symlinks resolved), when
/// `postgres` is beside it: other layouts than Debian's.
fn server_bin_on_path() -> Result<PathBuf> {
    let initdb = programs::find("initdb", "postgresql")?;
    let real = std::fs::canonicalize(&initdb)
        .with_context(|| format!("resolving {}", initdb.display()))?;
    let bin = real
        .parent()
        .with_context(|| format!("{} has no directory", real.display()))?;
    if !bin.join("postgres").is_file() {
        bail!(
            "{} has no `postgres` beside it; install the postgresql package \
             (apt-get install postgresql)",
            real.display()
        );
    }
    Ok(bin.to_path_buf())
}
