//! Real database clients through the proxies. A database drop-in carries
//! small requests on many connections, so this measures, side by side in
//! one run, the clients people benchmark their databases with reaching
//! their server directly, through HAProxy (TCP mode, `benches/haproxy.cfg`)
//! and through the release `pulsegate` binary (`benches/pulsegate.toml`),
//! on loopback:
//!
//! - `redis-benchmark -t set` and `-t get`, 50 connections, against a
//!   `redis-server` the bench starts (no persistence): `REDIS_REQUESTS`
//!   (200000) requests per test, and pipelined (`-P 16`)
//!   `REDIS_PIPELINED_REQUESTS` (500000); requests/s, p50 and p99 latency;
//! - `pgbench -S` (select-only, 16 clients, 2 threads, `PGBENCH_SECS` (10)
//!   s) against a PostgreSQL cluster the bench makes with `initdb` and
//!   fills once with `pgbench -i -s PGBENCH_SCALE` (10); and the same with
//!   `-C`, a new connection per transaction; transactions/s and average
//!   latency;
//!
//! plus the CPU each proxy used per request, transaction or connection.
//! Each route has its own proxy instances (one in front of redis-server,
//! one in front of PostgreSQL). Every test runs `ROUNDS` (3) times, the
//! routes taking turns within each round (each round starting with the
//! next route), and the report gives each route's median and the min–max
//! range. `PEER=none` skips HAProxy; `HAPROXY_NBTHREAD` (2) and
//! `HAPROXY_SPLICE=1` change its config. Needs redis-server (package
//! redis-server), redis-benchmark (redis-tools) and PostgreSQL's initdb,
//! postgres, pg_isready and pgbench (postgresql); as root, PostgreSQL runs
//! as the `postgres` account.
//!
//! Run: `cargo bench --bench db_clients` (or `benches/run` for every bench
//! and the docs). Prints a markdown report and writes it to
//! `<target>/bench-results/db_clients.md`.

#[path = "../common/mod.rs"]
mod common;
mod postgres;
mod programs;
mod redis;
mod report;
mod setup;

use anyhow::{Context, Result};

use common::cpu::CpuMeter;
use common::Via;
use setup::{Route, Setup, Tools};

/// The run's sizes, durations and repetitions, from the environment.
pub struct Knobs {
    pub redis_requests: u64,
    pub redis_pipelined_requests: u64,
    pub pgbench_secs: u64,
    pub pgbench_scale: u32,
    pub rounds: usize,
}

impl Knobs {
    fn from_env() -> Result<Knobs> {
        Knobs {
            redis_requests: common::knob("REDIS_REQUESTS", 200_000)?,
            redis_pipelined_requests: common::knob("REDIS_PIPELINED_REQUESTS", 500_000)?,
            pgbench_secs: common::knob("PGBENCH_SECS", 10)?,
            pgbench_scale: common::knob("PGBENCH_SCALE", 10)?,
            rounds: common::knob("ROUNDS", 3)?,
        }
        .validated()
    }

    /// Refuses sizes that would measure nothing.
    fn validated(self) -> Result<Knobs> {
        let problems = [
            (self.redis_requests > 0, "REDIS_REQUESTS must be at least 1"),
            (
                self.redis_pipelined_requests > 0,
                "REDIS_PIPELINED_REQUESTS must be at least 1",
            ),
            (self.pgbench_secs > 0, "PGBENCH_SECS must be at least 1"),
            (self.pgbench_scale > 0, "PGBENCH_SCALE must be at least 1"),
            (self.rounds > 0, "ROUNDS must be at least 1"),
        ];
        match problems.iter().find(|(ok, _)| !ok) {
            Some((_, problem)) => anyhow::bail!("{problem}"),
            None => Ok(self),
        }
    }

    /// "REDIS_REQUESTS=200000, ..., ROUNDS=3", for the report.
    pub fn describe(&self) -> String {
        format!(
            "REDIS_REQUESTS={}, REDIS_PIPELINED_REQUESTS={}, PGBENCH_SECS={}, \
             PGBENCH_SCALE={}, ROUNDS={}",
            self.redis_requests,
            self.redis_pipelined_requests,
            self.pgbench_secs,
            self.pgbench_scale,
            self.rounds
        )
    }
}

/// The tests, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    Set,
    Get,
    SetPipelined,
    GetPipelined,
    Select,
    SelectReconnect,
}

impl Test {
    pub const ALL: [Test; 6] = [
        Test::Set,
        Test::Get,
        Test::SetPipelined,
        Test::GetPipelined,
        Test::Select,
        Test::SelectReconnect,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Test::Set => "redis-benchmark SET",
            Test::Get => "redis-benchmark GET",
            Test::SetPipelined => "redis-benchmark SET -P 16",
            Test::GetPipelined => "redis-benchmark GET -P 16",
            Test::Select => "pgbench -S",
            Test::SelectReconnect => "pgbench -S -C",
        }
    }

    /// What the rate and the proxy's CPU are counted per.
    pub fn unit(self) -> &'static str {
        match self {
            Test::Set | Test::Get | Test::SetPipelined | Test::GetPipelined => "request",
            Test::Select => "transaction",
            Test::SelectReconnect => "connection",
        }
    }

    /// What the rate counts.
    pub fn rate_unit(self) -> &'static str {
        match self.redis() {
            Some(_) => "requests/s",
            None => "transactions/s",
        }
    }

    /// redis-benchmark's `-t` and `-P`, or `None` for pgbench.
    fn redis(self) -> Option<(&'static str, Option<u32>)> {
        match self {
            Test::Set => Some(("set", None)),
            Test::Get => Some(("get", None)),
            Test::SetPipelined => Some(("set", Some(redis::PIPELINE))),
            Test::GetPipelined => Some(("get", Some(redis::PIPELINE))),
            Test::Select | Test::SelectReconnect => None,
        }
    }
}

/// One run of one test through one route.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Requests/s (redis-benchmark) or transactions/s (pgbench).
    pub rate: f64,
    /// redis-benchmark's latency percentiles, µs.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// pgbench's average latency, ms.
    pub latency_avg_ms: Option<f64>,
    /// The proxy's CPU, % of one core (`None` for direct).
    pub proxy_cpu_pct: Option<f64>,
    /// The proxy's CPU per request, transaction or connection, µs.
    pub proxy_cpu_us: Option<f64>,
    /// The whole machine's busy time, % of all its cores.
    pub machine_pct: Option<f64>,
}

/// Every sample of the run, and what the report says about how it was
/// measured.
pub struct Results {
    pub samples: Vec<(Test, Via, Sample)>,
    /// The `tps = …` lines the pgbench rates were read from, one per test.
    pub tps_lines: Vec<(Test, String)>,
}

impl Results {
    fn has_tps_line(&self, test: Test) -> bool {
        self.tps_lines.iter().any(|(t, _)| *t == test)
    }
}

fn main() -> Result<()> {
    if common::listing_only() {
        return Ok(());
    }
    let knobs = Knobs::from_env()?;
    let tools = Tools::find()?;
    let versions = tools.versions()?;
    let machine = common::machine::describe();
    let vias = common::routes_to_measure();
    let mut setup = Setup::start(&vias, &tools, &knobs)?;
    let mut results = Results {
        samples: Vec::new(),
        tps_lines: Vec::new(),
    };
    for test in Test::ALL {
        for round in 0..knobs.rounds {
            // Each round starts with the next route, so no route always
            // runs first (on a cold cache) or last.
            let n = setup.routes.len();
            for i in 0..n {
                let route = &setup.routes[(round + i) % n];
                let (sample, tps_line) = run_once(test, route, &setup, &tools, &knobs)
                    .with_context(|| format!("{} via {}", test.label(), route.via.label()))?;
                progress(test, route.via, round, &knobs, &sample);
                if let Some(line) = tps_line.filter(|_| !results.has_tps_line(test)) {
                    results.tps_lines.push((test, line));
                }
                results.samples.push((test, route.via, sample));
            }
        }
        setup.check_running()?;
    }
    drop(setup);
    let markdown = report::render(&knobs, &machine, &versions, &results)?;
    println!("\n{markdown}");
    let path = common::write_results("db_clients", &markdown)?;
    println!("written to {}", path.display());
    Ok(())
}

/// Runs `test` once through `route`, measuring the CPU of the proxy in
/// front of the server it loads. For pgbench, also the `tps = …` line the
/// rate was read from.
fn run_once(
    test: Test,
    route: &Route,
    setup: &Setup,
    tools: &Tools,
    knobs: &Knobs,
) -> Result<(Sample, Option<String>)> {
    let dir = setup.dir();
    let Some((name, pipeline)) = test.redis() else {
        let reconnect = test == Test::SelectReconnect;
        let mut cpu = CpuMeter::new(route.postgres_proxy);
        let figures = cpu.measure(|| {
            let secs = knobs.pgbench_secs;
            postgres::run(&tools.postgres, route.postgres, secs, reconnect, dir)
        })?;
        let transactions = figures.transactions.max(1) as f64;
        let sample = Sample {
            rate: figures.tps,
            p50_us: None,
            p99_us: None,
            latency_avg_ms: figures.latency_avg_ms,
            proxy_cpu_pct: cpu.percent(),
            proxy_cpu_us: cpu.used_secs().map(|s| s * 1e6 / transactions),
            machine_pct: cpu.machine_percent(),
        };
        return Ok((sample, Some(figures.tps_line)));
    };
    let requests = match pipeline {
        Some(_) => knobs.redis_pipelined_requests,
        None => knobs.redis_requests,
    };
    let mut cpu = CpuMeter::new(route.redis_proxy);
    let figures =
        cpu.measure(|| redis::benchmark(&tools.redis, route.redis, name, requests, pipeline, dir))?;
    let sample = Sample {
        rate: figures.rps,
        p50_us: Some(figures.p50_ms * 1e3),
        p99_us: Some(figures.p99_ms * 1e3),
        latency_avg_ms: None,
        proxy_cpu_pct: cpu.percent(),
        proxy_cpu_us: cpu.used_secs().map(|s| s * 1e6 / requests as f64),
        machine_pct: cpu.machine_percent(),
    };
    Ok((sample, None))
}

fn progress(test: Test, via: Via, round: usize, knobs: &Knobs, sample: &Sample) {
    let mut shown = format!("{:.0} {}", sample.rate, test.rate_unit());
    if let (Some(p50), Some(p99)) = (sample.p50_us, sample.p99_us) {
        shown += &format!(", p50 {p50:.0} µs, p99 {p99:.0} µs");
    }
    if let Some(avg) = sample.latency_avg_ms {
        shown += &format!(", latency average {avg:.3} ms");
    }
    if let (Some(pct), Some(us)) = (sample.proxy_cpu_pct, sample.proxy_cpu_us) {
        shown += &format!(
            " (proxy CPU {pct:.0} % of one core, {us:.1} µs per {})",
            test.unit()
        );
    }
    println!(
        "{:<26} {:<10} round {}/{}: {shown}",
        test.label(),
        via.label(),
        round + 1,
        knobs.rounds
    );
}
