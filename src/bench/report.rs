//! The numbers of a run: per route (pulsegate, haproxy, direct) the
//! requests by outcome, the time until every client was served again, the
//! sessions that ended under their clients and how many of them the fault
//! does not explain (false evictions), writes that reached a server in the
//! wrong role, and latency percentiles (hdrhistogram) before, during and
//! after the fault; pulsegate's detection figures; a bucketed timeline.
//! Serialized as the JSON report.
//!
//! A session *ended under its client* when a request on a connection that
//! had already answered one failed with a reset or a close: the proxy (or
//! the kernel) gave up on it. It is a *false eviction* when it ended before
//! the fault, at any time under a fault that leaves every backend alive
//! and reachable (`loss`, `latency`), or beyond the one dropped connection
//! under `flow`.
//!
//! Phases are per route and by when a request *ended*: `before` ended
//! before the fault; `after` started once every client of the route had
//! been served again; `during` is everything else (so a request caught by
//! the fault counts there). Latency is how long the caller waited for an
//! answer or an error, connecting included; a hung request counts as the
//! hang bound; requests cut by the end of the run are left out.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::args::{Expected, Plan};
use super::detect::Detection;
use super::fault::FaultTimes;
use super::workload::{Failure, Outcome, Record, Route};

/// Timeline buckets per run (at least [`MIN_BUCKET`] wide).
const BUCKETS: u32 = 200;
const MIN_BUCKET: Duration = Duration::from_millis(10);

/// Everything `report.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pulsegate_version: &'static str,
    pub settings: Settings,
    pub fault: FaultReport,
    /// pulsegate's reaction, from its log (none without the route).
    pub detection: Option<DetectionReport>,
    /// One object per route, in the order of `--via`.
    pub routes: Vec<RouteReport>,
    pub timeline: Vec<Bucket>,
    /// The timeline's bucket width.
    pub bucket_s: f64,
    /// The configs the proxies ran with.
    pub configs: Configs,
}

impl Report {
    /// The report of `route` ("pulsegate", "haproxy", "direct").
    pub fn route(&self, route: &str) -> Option<&RouteReport> {
        self.routes.iter().find(|r| r.route == route)
    }
}

/// The proxies' configs, as they ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Configs {
    pub pulsegate: Option<String>,
    pub haproxy: Option<String>,
    pub pgbouncer: Option<String>,
}

/// The run's settings (durations in seconds).
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub workload: &'static str,
    pub clients_per_route: u32,
    /// Requests per second per client; 0 for a closed loop.
    pub rate_per_client: u32,
    pub duration_s: f64,
    pub hang_bound_s: f64,
    pub probe_interval_s: f64,
    pub dead_after_s: f64,
    pub check_interval_s: f64,
    pub down_grace_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub kind: &'static str,
    /// What the fault was, in words ("2 % loss both ways").
    pub description: String,
    /// Since the start of the load.
    pub at_s: f64,
    /// `restart`: when the primary listened again, since the start.
    pub restarted_s: Option<f64>,
    /// `flap`: when the partition healed, since the start.
    pub healed_s: Option<f64>,
}

/// pulsegate's reaction, in seconds after the fault.
#[derive(Debug, Clone, Serialize)]
pub struct DetectionReport {
    /// The first of: an eviction, the primary suspect, the primary down.
    pub detected_s: Option<f64>,
    pub first_eviction_s: Option<f64>,
    pub first_eviction_reason: Option<String>,
    pub evictions: u64,
    pub eviction_reasons: BTreeMap<String, u64>,
    pub evictions_before_fault: u64,
    pub primary_suspect_s: Option<f64>,
    pub primary_down_s: Option<f64>,
    pub primary_up_again_s: Option<f64>,
    pub primary_role_changed_s: Option<f64>,
}

/// One route's results.
#[derive(Debug, Clone, Serialize)]
pub struct RouteReport {
    /// "pulsegate", "haproxy" or "direct".
    pub route: &'static str,
    /// When the fault reached this route, since the start of the load
    /// (the same instant for every route, except `flow`, which drops one
    /// connection per route in turn; none if it found no connection of
    /// this route to drop).
    pub fault_applied_s: Option<f64>,
    /// `flow`: the connection dropped, "near end -> far end".
    pub dropped_flow: Option<String>,
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub hung: u64,
    /// Still waiting (for less than the hang bound) when the run ended.
    pub unfinished: u64,
    /// Failed requests by how they failed (refused, reset, closed, ...).
    pub failures: BTreeMap<&'static str, u64>,
    pub clients: u32,
    /// Clients answered after the fault and after their last failure (see
    /// [`served_again`]).
    pub clients_served_again: u32,
    /// Seconds from the fault until every client was (none if some never
    /// was within the run).
    pub served_again_s: Option<f64>,
    /// The first failed or hung request a client of the route saw after
    /// the fault (when it ended), in seconds after the fault.
    pub first_failure_s: Option<f64>,
    /// Sessions that ended under their clients (see the module docs).
    pub sessions_ended: u64,
    /// Those the fault does not explain.
    pub false_evictions: u64,
    /// Writes answered by a server in the wrong role after the fault.
    pub wrong_role: u64,
    /// The last of them, in seconds after the fault.
    pub wrong_role_last_s: Option<f64>,
    pub before: PhaseStats,
    pub during: PhaseStats,
    pub after: PhaseStats,
    /// Every request that ended at or after the fault (`during` and
    /// `after` together): what a gray fault costs for as long as it lasts.
    pub since_fault: PhaseStats,
}

/// Requests of one phase and their latency percentiles (milliseconds;
/// none when the phase has no finished request).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PhaseStats {
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub hung: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// One route in one slice of time. Latencies go by when a request
/// started; failures by when the client saw them (the error, or the hang
/// bound running out).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Bucket {
    pub route: &'static str,
    /// The bucket's start, since the start of the load.
    pub t_s: f64,
    /// Requests started here and answered.
    pub ok: u64,
    /// Median latency of the requests started here that ended.
    pub p50_ms: Option<f64>,
    /// Worst latency of the requests started here that ended.
    pub max_ms: Option<f64>,
    /// Longest wait of a request started here and still waiting when the
    /// run ended (a lower bound of its latency).
    pub waiting_ms: Option<f64>,
    /// Requests that failed here.
    pub failed: u64,
    /// Requests whose hang bound ran out here.
    pub hung: u64,
    /// Requests started here and still waiting when the run ended.
    pub unfinished: u64,
}

/// Builds the report of a run.
pub(crate) fn build(
    plan: &Plan,
    records: &[Record],
    fault: &FaultTimes,
    detection: Option<&Detection>,
    configs: Configs,
) -> Report {
    let bucket = (plan.duration / BUCKETS).max(MIN_BUCKET);
    let routes = plan
        .routes
        .iter()
        .map(|&route| {
            let applied = fault
                .applied
                .iter()
                .find(|(r, _)| *r == route)
                .map(|&(_, at)| at);
            let mut report = route_report(records, route, plan.clients, fault.at, plan.duration);
            report.fault_applied_s = applied.map(secs);
            report.dropped_flow = fault
                .flows
                .iter()
                .find(|(r, _, _)| *r == route)
                .map(|(_, near, far)| format!("{near} -> {far}"));
            report.false_evictions =
                false_evictions(records, route, plan.fault.expected(), fault.at);
            report
        })
        .collect();
    Report {
        pulsegate_version: env!("CARGO_PKG_VERSION"),
        settings: Settings {
            workload: plan.workload.as_str(),
            clients_per_route: plan.clients,
            rate_per_client: plan.rate,
            duration_s: secs(plan.duration),
            hang_bound_s: secs(plan.hang_bound),
            probe_interval_s: secs(plan.probe_interval),
            dead_after_s: secs(plan.dead_after),
            check_interval_s: secs(plan.check_interval),
            down_grace_s: secs(plan.down_grace),
        },
        fault: FaultReport {
            kind: plan.fault.as_str(),
            description: plan.describe_fault(),
            at_s: secs(fault.at),
            restarted_s: fault.restarted.map(secs),
            healed_s: fault.healed.map(secs),
        },
        detection: detection.map(|detection| DetectionReport {
            detected_s: detection.detected().map(secs),
            first_eviction_s: detection.first_eviction.map(secs),
            first_eviction_reason: detection.first_eviction_reason.clone(),
            evictions: detection.evictions,
            eviction_reasons: detection.eviction_reasons.clone(),
            evictions_before_fault: detection.evictions_before_fault,
            primary_suspect_s: detection.primary_suspect.map(secs),
            primary_down_s: detection.primary_down.map(secs),
            primary_up_again_s: detection.primary_up_again.map(secs),
            primary_role_changed_s: detection.primary_role_changed.map(secs),
        }),
        routes,
        timeline: timeline(records, bucket),
        bucket_s: secs(bucket),
        configs,
    }
}

/// A request on a live session that the proxy or the kernel ended: a
/// reset or a close on a connection that had answered before.
pub(crate) fn ended_a_session(r: &Record) -> bool {
    r.reused
        && matches!(
            r.outcome,
            Outcome::Failed(Failure::Reset) | Outcome::Failed(Failure::Closed)
        )
}

/// The sessions of `route` that ended and that the fault does not
/// explain (see the module docs).
pub(crate) fn false_evictions(
    records: &[Record],
    route: Route,
    expected: Expected,
    fault: Duration,
) -> u64 {
    let ended = records
        .iter()
        .filter(|r| r.route == route && ended_a_session(r));
    let (before, after) = ended.fold((0u64, 0u64), |(b, a), r| {
        if r.end() < fault {
            (b + 1, a)
        } else {
            (b, a + 1)
        }
    });
    before
        + match expected {
            Expected::Nothing => after,
            Expected::OneFlow => after.saturating_sub(1),
            Expected::PrimarySessions => 0,
        }
}

pub(crate) fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e6
}

fn route_report(
    records: &[Record],
    route: Route,
    clients: u32,
    fault: Duration,
    duration: Duration,
) -> RouteReport {
    let mine: Vec<&Record> = records.iter().filter(|r| r.route == route).collect();
    let served = served_again(&mine, clients, fault);
    let recovered = served.all_at.unwrap_or(duration.max(fault));
    let phase = |p: Phase| {
        phase_stats(
            mine.iter()
                .copied()
                .filter(|r| phase_of(r, fault, recovered) == p),
        )
    };
    let mut failures = BTreeMap::new();
    for r in &mine {
        if let Outcome::Failed(f) = r.outcome {
            *failures.entry(f.as_str()).or_default() += 1;
        }
    }
    let count =
        |want: fn(&Outcome) -> bool| mine.iter().filter(|r| want(&r.outcome)).count() as u64;
    let wrong_role: Vec<&&Record> = mine
        .iter()
        .filter(|r| r.outcome == Outcome::Failed(Failure::ReadOnly) && r.start >= fault)
        .collect();
    RouteReport {
        route: route.as_str(),
        fault_applied_s: None,
        dropped_flow: None,
        requests: mine.len() as u64,
        ok: count(|o| *o == Outcome::Ok),
        failed: count(|o| matches!(o, Outcome::Failed(_))),
        hung: count(|o| *o == Outcome::Hung),
        unfinished: count(|o| *o == Outcome::Unfinished),
        failures,
        clients,
        clients_served_again: served.clients,
        served_again_s: served.all_at.map(|at| secs(at.saturating_sub(fault))),
        first_failure_s: mine
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_) | Outcome::Hung))
            .map(|r| r.end())
            .filter(|&end| end >= fault)
            .min()
            .map(|end| secs(end - fault)),
        sessions_ended: mine.iter().filter(|r| ended_a_session(r)).count() as u64,
        false_evictions: 0,
        wrong_role: wrong_role.len() as u64,
        wrong_role_last_s: wrong_role
            .iter()
            .map(|r| r.end().saturating_sub(fault))
            .max()
            .map(secs),
        before: phase(Phase::Before),
        during: phase(Phase::During),
        after: phase(Phase::After),
        since_fault: phase_stats(mine.iter().copied().filter(|r| r.end() >= fault)),
    }
}

/// When the clients of a route were served again after the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServedAgain {
    /// Clients with an OK request started after the fault and after their
    /// last failed or hung request.
    pub clients: u32,
    /// When the last of all `clients` had its first such answer, since the
    /// start; none if some client never had one.
    pub all_at: Option<Duration>,
}

/// A client is served again by the first answer to a request it started
/// after the fault *and* after its last failure (a request that failed or
/// hung and ended after the fault): a client answered once and then hung on
/// a dropped connection, or refused writes on every other request, is not
/// served again.
pub(crate) fn served_again(records: &[&Record], clients: u32, fault: Duration) -> ServedAgain {
    let mut last_failure: BTreeMap<u32, Duration> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_) | Outcome::Hung) && r.end() >= fault)
    {
        let end = r.end();
        last_failure
            .entry(r.client)
            .and_modify(|e| *e = (*e).max(end))
            .or_insert(end);
    }
    let mut first_ok: BTreeMap<u32, Duration> = BTreeMap::new();
    for r in records.iter().filter(|r| {
        r.outcome == Outcome::Ok
            && r.start >= fault
            && last_failure
                .get(&r.client)
                .is_none_or(|&failed| r.start >= failed)
    }) {
        let end = r.end();
        first_ok
            .entry(r.client)
            .and_modify(|e| *e = (*e).min(end))
            .or_insert(end);
    }
    let served = u32::try_from(first_ok.len()).unwrap_or(u32::MAX);
    ServedAgain {
        clients: served,
        all_at: (served >= clients)
            .then(|| first_ok.values().copied().max())
            .flatten(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Before,
    During,
    After,
}

pub(crate) fn phase_of(r: &Record, fault: Duration, recovered: Duration) -> Phase {
    if r.end() < fault {
        Phase::Before
    } else if r.start >= recovered {
        Phase::After
    } else {
        Phase::During
    }
}

pub(crate) fn phase_stats<'a>(records: impl Iterator<Item = &'a Record>) -> PhaseStats {
    let mut stats = PhaseStats::default();
    // 1 µs to 1 hour at 3 significant digits; always valid bounds.
    let Ok(mut histogram) = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3) else {
        return stats;
    };
    for r in records {
        match r.outcome {
            Outcome::Ok => stats.ok += 1,
            Outcome::Failed(_) => stats.failed += 1,
            Outcome::Hung => stats.hung += 1,
            Outcome::Unfinished => continue,
        }
        stats.requests += 1;
        histogram.saturating_record(micros(r.latency).max(1));
    }
    if !histogram.is_empty() {
        let ms = |us: u64| Some(us as f64 / 1000.0);
        stats.p50_ms = ms(histogram.value_at_quantile(0.50));
        stats.p99_ms = ms(histogram.value_at_quantile(0.99));
        stats.p999_ms = ms(histogram.value_at_quantile(0.999));
        stats.max_ms = ms(histogram.max());
    }
    stats
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

type Slots = BTreeMap<(Route, u64), (Bucket, Vec<u64>)>;

/// Per route and bucket: see [`Bucket`].
fn timeline(records: &[Record], width: Duration) -> Vec<Bucket> {
    let mut slots = Slots::new();
    for r in records {
        let latency = micros(r.latency);
        let ms = latency as f64 / 1000.0;
        let (started, latencies) = slot(&mut slots, r.route, r.start, width);
        if r.outcome == Outcome::Unfinished {
            started.unfinished += 1;
            started.waiting_ms = Some(started.waiting_ms.unwrap_or(0.0).max(ms));
            continue;
        }
        if r.outcome == Outcome::Ok {
            started.ok += 1;
        }
        started.max_ms = Some(started.max_ms.unwrap_or(0.0).max(ms));
        latencies.push(latency);
        let (ended, _) = slot(&mut slots, r.route, r.end(), width);
        match r.outcome {
            Outcome::Failed(_) => ended.failed += 1,
            Outcome::Hung => ended.hung += 1,
            _ => {}
        }
    }
    slots
        .into_values()
        .map(|(mut bucket, mut latencies)| {
            latencies.sort_unstable();
            bucket.p50_ms = latencies
                .get(latencies.len() / 2)
                .map(|&us| us as f64 / 1000.0);
            bucket
        })
        .collect()
}

/// The bucket of `route` that holds `at`.
fn slot(slots: &mut Slots, route: Route, at: Duration, width: Duration) -> &mut (Bucket, Vec<u64>) {
    let index = micros(at) / micros(width).max(1);
    slots.entry((route, index)).or_insert_with(|| {
        let bucket = Bucket {
            route: route.as_str(),
            t_s: secs(width * u32::try_from(index).unwrap_or(u32::MAX)),
            ..Bucket::default()
        };
        (bucket, Vec::new())
    })
}

/// `route,client,start_s,latency_s,outcome` per request.
pub(crate) fn csv(records: &[Record]) -> String {
    let mut out = String::from("route,client,start_s,latency_s,outcome\n");
    for r in records {
        out.push_str(&format!(
            "{},{},{:.6},{:.6},{}\n",
            r.route.as_str(),
            r.client,
            r.start.as_secs_f64(),
            r.latency.as_secs_f64(),
            r.outcome.as_str()
        ));
    }
    out
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
