//! PostgreSQL for db_clients: one cluster made with `initdb` in a temporary
//! directory (trust authentication, superuser `postgres`) and a postmaster
//! on a free loopback port, both as `pulsegate::lab::servers` makes them
//! for the tests and the failover bench; `pgbench -i` once, and `pgbench`
//! runs read from their summary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pulsegate::lab::servers::postgres::{Install, Login, USER};
use pulsegate::lab::servers::HostServer;

use crate::programs;

/// Enough for pgbench's clients through all three routes and `-C`'s
/// connections that are still closing when the next ones open.
pub const MAX_CONNECTIONS: u32 = 200;
/// pgbench's clients (`-c`) and threads (`-j`).
pub const CLIENTS: u32 = 16;
pub const THREADS: u32 = 2;

/// The server programs and pgbench.
pub struct Tools {
    install: Install,
    pgbench: PathBuf,
}

impl Tools {
    /// PostgreSQL's server programs (and as root the `postgres` account to
    /// run them as) and its `pgbench`, naming the Debian package of what
    /// is missing.
    pub fn find() -> Result<Tools> {
        let install = Install::find()?;
        let pgbench = install.client("pgbench")?;
        Ok(Tools { install, pgbench })
    }

    /// "pgbench (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)".
    pub fn version(&self) -> Result<String> {
        programs::version(&self.pgbench)
    }
}

/// A running cluster: its postmaster, stopped with a fast shutdown on
/// drop, then its directory removed.
pub struct Server {
    pub addr: SocketAddr,
    postmaster: HostServer,
    /// Holds `data/`, the unix socket and the logs; removed after the
    /// postmaster.
    _dir: tempfile::TempDir,
}

impl Server {
    /// `initdb` into a temporary directory, then a postmaster on a free
    /// loopback port (`max_connections` 200, no fsync) in the bench's own
    /// session, so a Ctrl-C on the bench's terminal stops it too; returns
    /// once it accepts connections.
    pub fn start(tools: &Tools) -> Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("db_clients-pg")
            .tempdir()
            .context("creating PostgreSQL's temporary directory")?;
        let cluster = tools.install.init(dir.path(), Login::Trust)?;
        let max_connections = format!("max_connections={MAX_CONNECTIONS}");
        let postmaster = cluster.start_on_host(&[&max_connections])?;
        Ok(Server {
            addr: postmaster.addr(),
            postmaster,
            _dir: dir,
        })
    }

    /// Fails, with the postmaster's log, if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        Ok(self.postmaster.check_running()?)
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
