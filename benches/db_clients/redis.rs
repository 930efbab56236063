//! Redis for db_clients: a `redis-server` the bench starts itself on a free
//! loopback port (no persistence, in the foreground, killed with the
//! bench), and `redis-benchmark` runs against it, read from its `--csv`
//! output.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use pulsegate::lab::servers::redis::Redis;
use pulsegate::lab::servers::{find_program, HostServer};

use crate::programs;

/// redis-benchmark's concurrent connections (`-c`).
pub const CLIENTS: u32 = 50;
/// Requests in flight per connection in the pipelined tests (`-P`).
pub const PIPELINE: u32 = 16;
/// The slowest rate a run may have before it counts as stuck: its
/// deadline is the request count at this rate, plus a minute.
const SLOWEST_RPS: u64 = 1_000;

/// The installed Redis programs.
pub struct Tools {
    pub server: PathBuf,
    pub benchmark: PathBuf,
}

impl Tools {
    /// Finds `redis-server` and `redis-benchmark`, naming the Debian
    /// package of the one missing.
    pub fn find() -> Result<Tools> {
        Ok(Tools {
            server: Redis::find()?,
            benchmark: find_program("redis-benchmark", "redis-tools")?,
        })
    }

    /// "redis-benchmark 7.0.15 against redis-server 7.0.15".
    pub fn versions(&self) -> Result<String> {
        let benchmark = programs::version(&self.benchmark)?;
        // "Redis server v=7.0.15 sha=... malloc=... bits=64 build=...".
        let server = programs::version(&self.server)?;
        let server = server
            .split_whitespace()
            .find_map(|word| word.strip_prefix("v="))
            .map_or(server.clone(), |v| format!("redis-server {v}"));
        Ok(format!("{benchmark} against {server}"))
    }
}

/// A running redis-server, stopped on drop.
pub struct Server {
    pub addr: SocketAddr,
    server: HostServer,
}

impl Server {
    /// Starts redis-server on a free loopback port, writing nothing to disk
    /// (`--save "" --appendonly no`, working directory `dir`, its log
    /// there), as `pulsegate::lab::servers` starts it for the tests, and
    /// waits until it listens.
    pub fn start(tools: &Tools, dir: &Path) -> Result<Server> {
        let redis = Redis {
            program: tools.server.clone(),
            dir: dir.to_path_buf(),
            replica_of: None,
            args: Vec::new(),
        };
        let server = redis.start_on_host()?;
        Ok(Server {
            addr: server.addr(),
            server,
        })
    }

    /// Fails, with its log, if redis-server has exited.
    pub fn check_running(&mut self) -> Result<()> {
        Ok(self.server.check_running()?)
    }
}

/// One redis-benchmark test's figures.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Runs `redis-benchmark -t <test> -c 50 -n <requests> [-P <pipeline>]
/// --csv` against `addr` and returns that test's row. One test per run
/// (not `-t set,get`), so that the proxy's CPU is measured per test and the
/// routes take turns test by test; redis-benchmark opens fresh connections
/// for each test either way, so the load is the same.
pub fn benchmark(
    tools: &Tools,
    addr: SocketAddr,
    test: &str,
    requests: u64,
    pipeline: Option<u32>,
    dir: &Path,
) -> Result<Figures> {
    let mut command = Command::new(&tools.benchmark);
    command
        .args(["-h", &addr.ip().to_string()])
        .args(["-p", &addr.port().to_string()])
        .args(["-c", &CLIENTS.to_string()])
        .args(["-n", &requests.to_string()])
        .args(["-t", test]);
    if let Some(pipeline) = pipeline {
        command.args(["-P", &pipeline.to_string()]);
    }
    command.arg("--csv");
    let timeout = Duration::from_secs(60 + requests / SLOWEST_RPS);
    let output = programs::run_bounded(command, "redis-benchmark", timeout, dir)?;
    parse_csv(&output, test).with_context(|| format!("redis-benchmark -t {test} against {addr}"))
}

/// The row of `test` ("set" or "get") in redis-benchmark's `--csv` output:
/// a header line (`"test","rps","avg_latency_ms",...,"p50_latency_ms",...`
/// in redis-benchmark 6.2 and 7), then one line per test. Columns are found
/// by their header name, not their position; a line that does not parse is
/// an error naming it.
pub fn parse_csv(output: &str, test: &str) -> Result<Figures> {
    // A terminal progress line ends in \r; keep what follows the last one.
    let lines: Vec<&str> = output
        .lines()
        .map(|l| l.rsplit('\r').next().unwrap_or(l).trim())
        .filter(|l| !l.is_empty())
        .collect();
    let header_at = lines
        .iter()
        .position(|l| fields(l).first() == Some(&"test"))
        .with_context(|| {
            format!(
                "no CSV header (\"test\",\"rps\",...,\"p50_latency_ms\",...) in its output \
                 (redis-benchmark 6.2 or later prints one): {output:?}"
            )
        })?;
    let header = fields(lines[header_at]);
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("its CSV header has no {name:?} column: {header:?}"))
    };
    let (rps, p50, p99) = (
        column("rps")?,
        column("p50_latency_ms")?,
        column("p99_latency_ms")?,
    );
    for line in &lines[header_at + 1..] {
        let row = fields(line);
        if !row
            .first()
            .is_some_and(|name| name.eq_ignore_ascii_case(test))
        {
            continue;
        }
        let number = |i: usize| -> Result<f64> {
            let cell = row.get(i).with_context(|| {
                format!(
                    "line {line:?} has {} fields, the header {}",
                    row.len(),
                    header.len()
                )
            })?;
            let value: f64 = cell
                .parse()
                .with_context(|| format!("line {line:?}: field {:?} is not a number", header[i]))?;
            if !value.is_finite() || value < 0.0 {
                bail!("line {line:?}: field {:?} is {value}", header[i]);
            }
            Ok(value)
        };
        return Ok(Figures {
            rps: number(rps)?,
            p50_ms: number(p50)?,
            p99_ms: number(p99)?,
        });
    }
    bail!("no line for {test:?} in its CSV output: {output:?}")
}

/// The fields of one CSV line, their double quotes removed (redis-benchmark
/// quotes every field and never puts a comma inside one).
fn fields(line: &str) -> Vec<&str> {
    line.split(',')
        .map(|f| f.trim().trim_matches('"'))
        .collect()
}
