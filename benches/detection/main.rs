//! How long after a backend vanishes does its client find out? In a
//! private network namespace (`pulsegate::lab`), a backend is blackholed
//! (iptables DROP on its port) and SIGKILLed, so no FIN or RST ever
//! arrives, while a client holds an idle session and a busy one (it sends
//! a request right after the fault) directly, through HAProxy
//! (`benches/haproxy.cfg`: timeouts of 1 min, `option tcpka`) and through
//! pulsegate (`benches/pulsegate.toml`: probe_interval 1s, dead_after 3s).
//! Measures the time from the DROP rules to the client's read ending in RST
//! or EOF: the median of `DETECT_REPS` (5) trials, each capped at
//! `DETECT_CAP_SECS` (15) s. Target: pulsegate within the bounds `pulsegate
//! check` prints for a host gone (`liveness::bounds`), idle and busy.
//!
//! Needs root (namespaces, iptables) and `ip` and `iptables`; otherwise it
//! prints "skipping: <reason>" and writes no results. `PEER=none` skips
//! HAProxy.
//!
//! Run: `cargo bench --bench detection` (or `benches/run`). Prints a
//! markdown report and writes it to `<target>/bench-results/detection.md`.

#[path = "../common/mod.rs"]
mod common;
mod trial;

use std::time::Duration;

use anyhow::{Context, Result};
use pulsegate::lab::{Lab, LabError};

use common::Via;
use trial::{Mode, Outcome};

fn main() -> Result<()> {
    if common::listing_only() {
        return Ok(());
    }
    let reps: u32 = common::knob("DETECT_REPS", 5)?;
    let cap = common::knob_secs("DETECT_CAP_SECS", 15)?;
    let machine = common::machine::describe();
    let target = detection_target()?;
    let vias = common::routes_to_measure();
    let mut outcomes = Vec::new();
    for rep in 0..reps {
        let lab = match Lab::new("detect") {
            Ok(lab) => lab,
            Err(LabError::Unavailable(reason)) => {
                println!("skipping: {reason}");
                return Ok(());
            }
            Err(e) => return Err(e).context("setting up the lab"),
        };
        // Idling 1.5 s to 2.5 s before the fault spreads it over
        // pulsegate's probe cycle (probe_interval = 1 s).
        let idle_for = Duration::from_millis(1500) + Duration::from_secs(1) * rep / reps.max(1);
        let trial = trial::run(&lab, &vias, idle_for, cap)
            .with_context(|| format!("trial {} in lab {}", rep + 1, lab.name()))?;
        for o in &trial {
            println!("trial {}: {}", rep + 1, progress(o, cap));
        }
        outcomes.extend(trial);
    }
    let markdown = render(&machine, &vias, &outcomes, reps, cap, target);
    println!("\n{markdown}");
    let path = common::write_results("detection", &markdown)?;
    println!("written to {}", path.display());
    Ok(())
}

/// What `pulsegate check` promises for the config pulsegate runs with, for
/// a host gone: (idle, busy) sessions.
fn detection_target() -> Result<(Duration, Duration)> {
    let any = "127.0.0.1:1".parse()?;
    let text = common::pulsegate_config(any, any)?;
    let config = pulsegate::config::parse(&text, "benches/pulsegate.toml")
        .map_err(|e| anyhow::anyhow!("benches/pulsegate.toml is invalid: {e}"))?;
    let listener = config
        .listeners
        .first()
        .context("benches/pulsegate.toml has no listener")?;
    let bounds = pulsegate::liveness::bounds::DetectionBounds::of(listener);
    Ok((bounds.idle, bounds.busy))
}

fn progress(o: &Outcome, cap: Duration) -> String {
    let when = o
        .detected
        .map_or(format!("not within {} s", cap.as_secs()), |d| {
            format!("{:.2} s", d.as_secs_f64())
        });
    let reason = o
        .reason
        .as_deref()
        .map_or(String::new(), |r| format!(", {r}"));
    format!(
        "{:<9} {}: {when} ({}{reason})",
        o.via.label(),
        o.mode.label(),
        o.how
    )
}

fn render(
    machine: &str,
    vias: &[Via],
    outcomes: &[Outcome],
    reps: u32,
    cap: Duration,
    (idle_target, busy_target): (Duration, Duration),
) -> String {
    let haproxy = common::haproxy_version().unwrap_or_else(|| "HAProxy: not installed".into());
    let mut out = format!(
        "Measured {date} by `cargo bench --bench detection` on {machine}. {haproxy}. \
         Median of {reps} trials, each in a fresh namespace and capped at {cap} s; \
         idle sessions were quiet 1.5 s to 2.5 s before the fault.\n\n\
         | session | direct | HAProxy | pulsegate | target | verdict |\n\
         | --- | --- | --- | --- | --- | --- |\n",
        date = common::machine::today(),
        cap = cap.as_secs(),
    );
    for (mode, target) in [(Mode::Idle, idle_target), (Mode::Busy, busy_target)] {
        let cell = |via: Via| {
            let samples: Vec<&Outcome> = outcomes
                .iter()
                .filter(|o| o.via == via && o.mode == mode)
                .collect();
            if vias.contains(&via) {
                summary(&samples, cap)
            } else {
                "not measured".into()
            }
        };
        let pulsegate: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| o.via == Via::Pulsegate && o.mode == mode)
            .collect();
        out += &format!(
            "| {} | {} | {} | {} | ≤ {:.2} s | {} |\n",
            mode.label(),
            cell(Via::Direct),
            cell(Via::Haproxy),
            cell(Via::Pulsegate),
            target.as_secs_f64(),
            verdict(&pulsegate, target),
        );
    }
    out + &format!("\npulsegate, every trial: {}\n", every_trial(outcomes))
}

/// "3.95 s (3.52–4.31), RST" or "not detected within 15 s (0/5)".
fn summary(samples: &[&Outcome], cap: Duration) -> String {
    let mut times: Vec<Option<Duration>> = samples.iter().map(|o| o.detected).collect();
    // Undetected counts as longer than any detection.
    times.sort_by_key(|t| t.unwrap_or(Duration::MAX));
    let detected: Vec<Duration> = times.iter().flatten().copied().collect();
    let median = times.get(times.len() / 2).copied().flatten();
    let mut hows: Vec<&str> = samples
        .iter()
        .filter(|o| o.detected.is_some())
        .map(|o| o.how.as_str())
        .collect();
    hows.dedup();
    match (median, detected.first(), detected.last()) {
        (Some(median), Some(min), Some(max)) => format!(
            "{:.2} s ({:.2}–{:.2}), {}/{} by {}",
            median.as_secs_f64(),
            min.as_secs_f64(),
            max.as_secs_f64(),
            detected.len(),
            samples.len(),
            hows.join("/"),
        ),
        _ => format!(
            "not detected within {} s ({}/{} detected)",
            cap.as_secs(),
            detected.len(),
            samples.len()
        ),
    }
}

fn verdict(samples: &[&Outcome], target: Duration) -> String {
    let late: Vec<Option<Duration>> = samples
        .iter()
        .map(|o| o.detected)
        .filter(|d| d.is_none_or(|d| d > target))
        .collect();
    match late.len() {
        _ if samples.is_empty() => "not measured".into(),
        0 => format!("met: {}/{} within", samples.len(), samples.len()),
        n => format!("**not met**: {n}/{} later", samples.len()),
    }
}

/// Each pulsegate session's time and eviction reason, in trial order.
fn every_trial(outcomes: &[Outcome]) -> String {
    let list = |mode: Mode| -> String {
        outcomes
            .iter()
            .filter(|o| o.via == Via::Pulsegate && o.mode == mode)
            .map(|o| {
                let when = o
                    .detected
                    .map_or("–".into(), |d| format!("{:.2} s", d.as_secs_f64()));
                format!(
                    "{when} ({})",
                    o.reason.as_deref().unwrap_or("no eviction logged")
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("idle {}; busy {}.", list(Mode::Idle), list(Mode::Busy))
}
