//! How fast is a proxied connection? Measures, side by side in one run, a
//! client talking to its server directly, through HAProxy (TCP mode,
//! `benches/haproxy.cfg`) and through the release `pulsegate` binary
//! (`benches/pulsegate.toml`), on loopback:
//!
//! - one stream's throughput: `THROUGHPUT_GIB` (4) GiB written in 1 MiB
//!   writes through one connection into a discarding sink, wall time to the
//!   sink's last byte;
//! - ping-pong latency of one connection, 64-byte messages: p50, p99,
//!   p99.9 over `PINGPONG_ROUNDS` (200000) round trips after
//!   `PINGPONG_WARMUP` (20000), the routes taking turns in
//!   `PINGPONG_SLICES` (10) slices;
//! - requests/s of `RPS_CONNS` (64) connections, 64-byte request and
//!   response, over `RPS_SECS` (5) s, the routes taking turns in
//!   `RPS_SLICES` (5) slices (each with its share of the warm-up); the
//!   figure is the median of the slices' rates;
//! - new connections/s (connect, one 64-byte exchange, close) from
//!   `CONN_THREADS` (4) client threads over `CONN_SECS` (5) s;
//!
//! each after `WARMUP_SECS` (1) s of the same load, plus the CPU each proxy
//! used meanwhile. `PEER=none` skips HAProxy; `HAPROXY_NBTHREAD` (2) and
//! `HAPROXY_SPLICE=1` change its config. The routes take turns within each
//! test, so a change in background load hits all three alike.
//!
//! Run: `cargo bench --bench proxy_perf` (or `benches/run` for every bench
//! and the docs). Prints a markdown report and writes it to
//! `<target>/bench-results/proxy_perf.md`.

#[path = "../common/mod.rs"]
mod common;
mod report;
mod servers;
mod workloads;

use std::time::Duration;

use anyhow::{Context, Result};

use common::cpu::CpuMeter;
use common::Via;
use servers::{Route, Setup};
use workloads::{ConnRate, Latency, PingPong};

/// The run's sizes and durations, from the environment.
pub struct Knobs {
    pub throughput_gib: f64,
    pub pingpong_warmup: u64,
    pub pingpong_rounds: u64,
    pub pingpong_slices: u64,
    pub rps_conns: usize,
    pub rps_window: Duration,
    pub rps_slices: u32,
    pub conn_threads: usize,
    pub conn_window: Duration,
    pub warmup: Duration,
}

impl Knobs {
    fn from_env() -> Result<Knobs> {
        Knobs {
            throughput_gib: common::knob("THROUGHPUT_GIB", 4.0)?,
            pingpong_warmup: common::knob("PINGPONG_WARMUP", 20_000)?,
            pingpong_rounds: common::knob("PINGPONG_ROUNDS", 200_000)?,
            pingpong_slices: common::knob("PINGPONG_SLICES", 10)?,
            rps_conns: common::knob("RPS_CONNS", 64)?,
            rps_window: common::knob_secs("RPS_SECS", 5)?,
            rps_slices: common::knob("RPS_SLICES", 5)?,
            conn_threads: common::knob("CONN_THREADS", 4)?,
            conn_window: common::knob_secs("CONN_SECS", 5)?,
            warmup: common::knob_secs("WARMUP_SECS", 1)?,
        }
        .validated()
    }

    /// Refuses sizes that would measure nothing (or divide by zero).
    fn validated(self) -> Result<Knobs> {
        let problems = [
            (self.throughput_gib > 0.0, "THROUGHPUT_GIB must be above 0"),
            (
                self.pingpong_rounds > 0,
                "PINGPONG_ROUNDS must be at least 1",
            ),
            (self.rps_conns > 0, "RPS_CONNS must be at least 1"),
            (!self.rps_window.is_zero(), "RPS_SECS must be at least 1"),
            (self.rps_slices > 0, "RPS_SLICES must be at least 1"),
            (self.conn_threads > 0, "CONN_THREADS must be at least 1"),
            (!self.conn_window.is_zero(), "CONN_SECS must be at least 1"),
        ];
        match problems.iter().find(|(ok, _)| !ok) {
            Some((_, problem)) => anyhow::bail!("{problem}"),
            None => Ok(self),
        }
    }

    fn throughput_bytes(&self) -> u64 {
        (self.throughput_gib * (1u64 << 30) as f64) as u64
    }
}

/// Everything measured through one route (a test that fails stops the
/// bench, so `None` only means "not measured yet").
pub struct Figures {
    pub via: Via,
    pub throughput: Option<f64>,
    pub latency: Option<Latency>,
    pub rps: Option<f64>,
    pub conns: Option<ConnRate>,
    /// The proxy's CPU in each test, % of one core, in [`Test::ALL`] order.
    pub cpu: [Option<f64>; 4],
    /// The proxy's CPU per unit of work in each test ([`Test::unit`]).
    pub cpu_per_unit: [Option<f64>; 4],
    /// The whole machine's busy time in each test, % of all its cores.
    pub machine: [Option<f64>; 4],
}

/// The four tests, in the order they run.
#[derive(Clone, Copy)]
pub enum Test {
    Throughput,
    PingPong,
    Requests,
    Connections,
}

impl Test {
    pub const ALL: [Test; 4] = [
        Test::Throughput,
        Test::PingPong,
        Test::Requests,
        Test::Connections,
    ];

    /// What the proxy's CPU is counted per.
    pub fn unit(self) -> &'static str {
        match self {
            Test::Throughput => "CPU s per GiB",
            Test::PingPong => "CPU µs per round trip",
            Test::Requests => "CPU µs per request",
            Test::Connections => "CPU µs per connection",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Test::Throughput => "one-stream throughput",
            Test::PingPong => "ping-pong latency",
            Test::Requests => "requests/s",
            Test::Connections => "new connections/s",
        }
    }
}

fn main() -> Result<()> {
    if common::listing_only() {
        return Ok(());
    }
    let knobs = Knobs::from_env()?;
    let machine = common::machine::describe();
    let mut setup = Setup::start(&common::routes_to_measure())?;
    let mut figures: Vec<Figures> = setup.routes.iter().map(|r| Figures::new(r.via)).collect();
    for test in Test::ALL {
        if let Test::PingPong = test {
            ping_pong_in_turns(&setup.routes, &knobs, &mut figures)?;
        } else if let Test::Requests = test {
            requests_in_turns(&setup.routes, &knobs, &mut figures)?;
        } else {
            for (route, figures) in setup.routes.iter().zip(&mut figures) {
                run_test(test, route, &setup.sink, &knobs, figures)
                    .with_context(|| format!("{} via {}", test.label(), route.via.label()))?;
            }
        }
        setup.check_running()?;
    }
    drop(setup);
    let markdown = report::render(&knobs, &machine, &figures)?;
    println!("\n{markdown}");
    let path = common::write_results("proxy_perf", &markdown)?;
    println!("written to {}", path.display());
    Ok(())
}

impl Figures {
    fn new(via: Via) -> Figures {
        Figures {
            via,
            throughput: None,
            latency: None,
            rps: None,
            conns: None,
            cpu: [None; 4],
            cpu_per_unit: [None; 4],
            machine: [None; 4],
        }
    }
}

/// Runs one test (not ping-pong) through one route and records its figures
/// and the proxy's CPU.
fn run_test(
    test: Test,
    route: &Route,
    sink: &servers::Sink,
    knobs: &Knobs,
    figures: &mut Figures,
) -> Result<()> {
    let proxy = match test {
        Test::Throughput => route.sink_proxy,
        _ => route.echo_proxy,
    };
    let mut cpu = CpuMeter::new(proxy);
    let shown = cpu.measure(|| match test {
        Test::Throughput => {
            let gib_s = workloads::throughput(route.sink, sink, knobs.throughput_bytes())?;
            figures.throughput = Some(gib_s);
            Ok(format!("{gib_s:.2} GiB/s"))
        }
        Test::Connections => {
            let (threads, warmup, window) = (knobs.conn_threads, knobs.warmup, knobs.conn_window);
            let rate = workloads::connections_per_sec(route.echo, threads, warmup, window)?;
            let shown = format!("{:.0} connections/s, {} failed", rate.per_sec, rate.errors);
            figures.conns = Some(rate);
            Ok(shown)
        }
        Test::PingPong | Test::Requests => {
            anyhow::bail!("ping-pong and requests/s run in turns, see *_in_turns")
        }
    })?;
    figures.cpu[test as usize] = cpu.percent();
    figures.machine[test as usize] = cpu.machine_percent();
    figures.cpu_per_unit[test as usize] = match test {
        Test::Throughput => cpu
            .used_secs()
            .zip(Some(knobs.throughput_gib))
            .map(|(s, g)| s / g),
        Test::Connections => (cpu.percent())
            .zip(figures.conns.as_ref())
            .map(|(c, r)| c * 1e4 / r.per_sec),
        Test::PingPong | Test::Requests => None,
    };
    progress(test, route.via, &shown, &cpu);
    Ok(())
}

/// Ping-pong through every route: one connection each, warmed up, then
/// the recorded rounds in slices, the routes taking turns.
fn ping_pong_in_turns(routes: &[Route], knobs: &Knobs, figures: &mut [Figures]) -> Result<()> {
    let slices = knobs.pingpong_slices.max(1);
    let mut runs = Vec::new();
    for route in routes {
        let mut client = PingPong::connect(route.echo)?;
        let mut cpu = CpuMeter::new(route.echo_proxy);
        cpu.measure(|| client.run(knobs.pingpong_warmup, false))?;
        runs.push((client, cpu, route.via));
    }
    for slice in 0..slices {
        let rounds =
            knobs.pingpong_rounds / slices + u64::from(slice < knobs.pingpong_rounds % slices);
        for (client, cpu, via) in &mut runs {
            cpu.measure(|| client.run(rounds, true))
                .with_context(|| format!("ping-pong via {}", via.label()))?;
        }
    }
    for ((client, cpu, via), figures) in runs.iter().zip(figures) {
        let l = client.latency();
        figures.latency = Some(l);
        figures.cpu[Test::PingPong as usize] = cpu.percent();
        figures.machine[Test::PingPong as usize] = cpu.machine_percent();
        let round_trips = (knobs.pingpong_warmup + knobs.pingpong_rounds) as f64;
        figures.cpu_per_unit[Test::PingPong as usize] =
            cpu.used_secs().map(|s| s * 1e6 / round_trips);
        let shown = format!(
            "p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs",
            l.p50, l.p99, l.p999
        );
        progress(Test::PingPong, *via, &shown, cpu);
    }
    Ok(())
}

/// Requests/s through every route in `RPS_SLICES` slices, the routes taking
/// turns slice by slice (as ping-pong does), so a change in the machine's
/// background load hits every route alike; each route's figure is the
/// median of its slices' rates, and its CPU per request the proxy's CPU
/// share over all slices (warm-ups included, as in the other tests) over
/// that rate. Each slice connects afresh and warms up for its share of
/// `WARMUP_SECS` before counting.
fn requests_in_turns(routes: &[Route], knobs: &Knobs, figures: &mut [Figures]) -> Result<()> {
    let slices = knobs.rps_slices;
    let (warmup, window) = (knobs.warmup / slices, knobs.rps_window / slices);
    let mut runs: Vec<(CpuMeter, Vec<f64>)> = routes
        .iter()
        .map(|r| (CpuMeter::new(r.echo_proxy), Vec::new()))
        .collect();
    for _ in 0..slices {
        for (route, (cpu, rates)) in routes.iter().zip(&mut runs) {
            let rate = cpu
                .measure(|| {
                    workloads::requests_per_sec(route.echo, knobs.rps_conns, warmup, window)
                })
                .with_context(|| format!("requests/s via {}", route.via.label()))?;
            rates.push(rate);
        }
    }
    let i = Test::Requests as usize;
    for ((route, (cpu, mut rates)), figures) in routes.iter().zip(runs).zip(figures) {
        rates.sort_by(f64::total_cmp);
        let rps = rates[rates.len() / 2];
        figures.rps = Some(rps);
        figures.cpu[i] = cpu.percent();
        figures.machine[i] = cpu.machine_percent();
        figures.cpu_per_unit[i] = cpu.percent().map(|c| c * 1e4 / rps);
        let shown = format!(
            "{rps:.0} requests/s (median of {slices} slices, {:.0}–{:.0})",
            rates[0],
            rates[rates.len() - 1]
        );
        progress(Test::Requests, route.via, &shown, &cpu);
    }
    Ok(())
}

fn progress(test: Test, via: Via, shown: &str, cpu: &CpuMeter) {
    let cpu = cpu.percent().map_or(String::new(), |c| {
        format!(" (proxy CPU {c:.0} % of one core)")
    });
    println!("{:<22} {:<10} {shown}{cpu}", test.label(), via.label());
}
