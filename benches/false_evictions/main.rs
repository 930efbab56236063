//! Both halves of the promise, side by side with a tuned HAProxy, on the
//! lab's emulated link (`pulsegate::lab::LinkedLab`: two namespaces joined
//! by TUN devices and a forwarder that delays, drops and cuts packets, so
//! both kernels see real loss): no live session is ever evicted, and a dead
//! host is still found fast. Both proxies run at once in the near
//! namespace, each with its own clients, in front of the same far echo
//! backend on the same link: pulsegate with the fast settings
//! (probe_interval 1s, dead_after 1s, user_timeout 60s), HAProxy with
//! server-side keepalive after 1 s, every 1 s, 2 probes, `tcp-ut 3s` and
//! `timeout tunnel 1h` (both configs are printed in the report).
//!
//! Cases (`CASES`, default `0,1,2,3,4,5,6`, picks some):
//!
//! 0. clean link, `IDLE_SESSIONS` (1000) idle + `BUSY_SESSIONS` (50) busy
//!    sessions per proxy (busy: a 32-byte request and its echo every
//!    100 ms) for `CLEAN_SECS` (120) s: false evictions (the baseline and
//!    the plot's clean point);
//! 1. 2 % random loss both ways, same sessions, `CASE_SECS` (600) s;
//! 2. 5 % loss both ways with a TCP check every second on both proxies:
//!    false evictions, and whether the backend was ever marked down;
//! 3. 100 ms ± 10 ms each way (200 ms RTT) and 1 % loss;
//! 4. host death (the link cut both ways) on a clean link: per session,
//!    the time from the cut until its client's read ends; idle sessions
//!    and busy ones (these send a request right after the cut); median and
//!    max, median of `DEATH_TRIALS` (3) trials, each in a fresh lab with
//!    40 idle + 10 busy sessions per proxy, capped at `DEATH_CAP_SECS`
//!    (20) s;
//! 5. host death under 2 % loss;
//! 6. one upstream flow per proxy silently dropped by the link (a NAT
//!    that forgot it), host alive, clean link: the time until that
//!    session's client is reset, and whether any other session ended;
//!    `FLOW_TRIALS` (3) trials of 20 idle + 5 busy sessions per proxy,
//!    capped at `FLOW_CAP_SECS` (30) s.
//!
//! In the holds a session that ends is counted (with how its client saw
//! it, and the proxy's eviction reasons or termination states) and opened
//! again, so the figure is a rate: ends per 1,000 sessions per 10 minutes.
//! At the end each surviving idle session must answer one more request.
//!
//! `SMOKE=1`: holds of 30 s with 200 idle + 20 busy sessions (about 5
//! minutes in all). `PEER=none` skips HAProxy. Needs root (namespaces,
//! TUN devices); otherwise it prints "skipping: <reason>".
//!
//! Run: `cargo bench --bench false_evictions` (or `benches/run`). Prints a
//! markdown report and writes it to
//! `<target>/bench-results/false_evictions.md`, with a plot of false
//! evictions against idle detection time in `false_evictions.svg`.

#[path = "../common/mod.rs"]
mod common;

mod cases;
mod fleet;
mod plot;
mod proxies;
mod report;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pulsegate::lab::Impairment;

use cases::{DeathTrial, HoldCase};
use common::Via;
use report::{DeathGroup, Results};

/// The run's sizes and durations, from the environment.
pub struct Knobs {
    pub smoke: bool,
    pub cases: BTreeSet<u32>,
    pub clean_secs: Duration,
    pub case_secs: Duration,
    pub idle: usize,
    pub busy: usize,
    pub death_trials: u32,
    pub death_idle: usize,
    pub death_busy: usize,
    pub death_cap: Duration,
    pub flow_trials: u32,
    pub flow_idle: usize,
    pub flow_busy: usize,
    pub flow_cap: Duration,
}

impl Knobs {
    fn from_env() -> Result<Knobs> {
        let smoke = std::env::var("SMOKE").as_deref() == Ok("1");
        let (secs, idle, busy) = if smoke {
            (30, 200, 20)
        } else {
            (600, 1000, 50)
        };
        let cases: String = common::knob("CASES", "0,1,2,3,4,5,6".to_string())?;
        let cases = cases
            .split(',')
            .filter(|c| !c.trim().is_empty())
            .map(|c| match c.trim().parse::<u32>() {
                Ok(n) if n <= 6 => Ok(n),
                _ => bail!("CASES={cases:?}: give case numbers 0 to 6, comma-separated"),
            })
            .collect::<Result<_>>()?;
        let knobs = Knobs {
            smoke,
            cases,
            clean_secs: common::knob_secs("CLEAN_SECS", if smoke { 30 } else { 120 })?,
            case_secs: common::knob_secs("CASE_SECS", secs)?,
            idle: common::knob("IDLE_SESSIONS", idle)?,
            busy: common::knob("BUSY_SESSIONS", busy)?,
            death_trials: common::knob("DEATH_TRIALS", 3)?,
            death_idle: 40,
            death_busy: 10,
            death_cap: common::knob_secs("DEATH_CAP_SECS", 20)?,
            flow_trials: common::knob("FLOW_TRIALS", 3)?,
            flow_idle: 20,
            flow_busy: 5,
            flow_cap: common::knob_secs("FLOW_CAP_SECS", 30)?,
        };
        if knobs.idle + knobs.busy == 0 || knobs.death_trials == 0 || knobs.flow_trials == 0 {
            bail!("IDLE_SESSIONS + BUSY_SESSIONS, DEATH_TRIALS and FLOW_TRIALS must be above 0");
        }
        Ok(knobs)
    }

    fn runs(&self, case: u32) -> bool {
        self.cases.contains(&case)
    }
}

fn main() -> Result<()> {
    if common::listing_only() {
        return Ok(());
    }
    let knobs = Knobs::from_env()?;
    // Check the lab before anything takes time.
    if cases::new_lab("fe-probe")?.is_none() {
        return Ok(());
    }
    let nofile = raise_nofile_limit()?;
    let machine = common::machine::describe();
    let vias = vias();
    let mut results = Results::default();
    for case in hold_cases(&knobs) {
        println!("case {}: {}", case.id, case.label);
        let result = cases::hold(&case, &vias, knobs.idle, knobs.busy)
            .with_context(|| format!("case {} ({})", case.id, case.label))?;
        println!("{}", report::hold_progress(&result));
        results.holds.push(result);
    }
    for (id, label, loss, idle_target, busy_target) in [
        (4, "clean link", 0.0, 2.0, 1.5),
        (5, "2 % loss", 0.02, 3.0, 2.5),
    ] {
        if !knobs.runs(id) {
            continue;
        }
        let mut trials: Vec<DeathTrial> = Vec::new();
        for n in 0..knobs.death_trials {
            // Quiet 4 s to 5 s before the cut, spread over the 1 s probe
            // cycles of both proxies.
            let quiet = Duration::from_secs(4) + Duration::from_secs(1) * n / knobs.death_trials;
            let trial = cases::death_trial(
                &vias,
                loss,
                knobs.death_idle,
                knobs.death_busy,
                quiet,
                knobs.death_cap,
            )
            .with_context(|| format!("case {id} ({label}), trial {}", n + 1))?;
            println!(
                "case {id}: host death, {label}, trial {}: {}",
                n + 1,
                report::death_progress(&trial, &vias)
            );
            trials.push(trial);
        }
        results.deaths.push(DeathGroup {
            id,
            label,
            trials,
            idle_target: Duration::from_secs_f64(idle_target),
            busy_target: Duration::from_secs_f64(busy_target),
        });
    }
    if knobs.runs(6) {
        for n in 0..knobs.flow_trials {
            let trial = cases::flow_trial(&vias, knobs.flow_idle, knobs.flow_busy, knobs.flow_cap)
                .with_context(|| format!("case 6 (dropped flow), trial {}", n + 1))?;
            println!(
                "case 6: dropped flow, trial {}: {}",
                n + 1,
                report::flow_progress(&trial)
            );
            results.flows.push(trial);
        }
    }
    let markdown = report::render(&knobs, &machine, nofile, &vias, &results);
    println!("\n{markdown}");
    let path = common::write_results("false_evictions", &markdown)?;
    println!("written to {}", path.display());
    let svg = path.with_extension("svg");
    if plot::draw(&results, &vias, &svg)? {
        println!("plot written to {}", svg.display());
    } else {
        println!("no plot: it pairs cases 0 and 4, or 1 and 5, and neither pair ran");
    }
    Ok(())
}

/// pulsegate always; HAProxy unless `PEER=none` or it is not installed.
fn vias() -> Vec<Via> {
    let mut vias = vec![Via::Pulsegate];
    if std::env::var("PEER").as_deref() == Ok("none") {
        println!("PEER=none: HAProxy is not measured");
    } else if common::haproxy_version().is_none() {
        println!("haproxy is not installed (apt-get install haproxy): HAProxy is not measured");
    } else {
        vias.push(Via::Haproxy);
    }
    vias
}

fn hold_cases(knobs: &Knobs) -> Vec<HoldCase> {
    let far =
        Impairment::delay(Duration::from_millis(100), Duration::from_millis(10)).with_loss(0.01);
    let all = [
        (0, "clean link", "fe-clean", Impairment::none(), false),
        (1, "2 % loss", "fe-loss2", Impairment::loss(0.02), false),
        (
            2,
            "5 % loss, TCP check every 1 s",
            "fe-loss5",
            Impairment::loss(0.05),
            true,
        ),
        (3, "200 ms RTT ± 20 ms, 1 % loss", "fe-far", far, false),
    ];
    all.into_iter()
        .filter(|(id, ..)| knobs.runs(*id))
        .map(|(id, label, tag, impairment, check)| HoldCase {
            id,
            label,
            tag,
            impairment,
            check,
            hold: if id == 0 {
                knobs.clean_secs
            } else {
                knobs.case_secs
            },
        })
        .collect()
}

/// Raises RLIMIT_NOFILE to 65,536 (as root the hard limit may rise too),
/// else the soft limit to the hard one: the bench holds ~2,000 client
/// sockets, and the proxies and the backend it starts inherit the limit.
/// Returns the soft limit now in force.
fn raise_nofile_limit() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const WANTED: u64 = 65_536;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= WANTED {
        return Ok(soft);
    }
    if setrlimit(Resource::RLIMIT_NOFILE, WANTED, WANTED.max(hard)).is_ok() {
        return Ok(WANTED);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}
