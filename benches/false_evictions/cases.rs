//! The three kinds of experiment, each in its own `LinkedLab` with both
//! proxies running side by side on the same link to the same far backend:
//!
//! - a hold: idle and busy sessions for a long while on an impaired link
//!   with the backend alive, so every session that ends is a false
//!   eviction;
//! - a host death: the link is cut both ways (the far host is gone, no
//!   FIN or RST will ever come), and each session's client is timed until
//!   its read ends;
//! - a dropped flow: one upstream connection per proxy is silently
//!   dropped by the link (a NAT that forgot it) while the host lives, and
//!   that session's client is timed until it is reset.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pulsegate::lab::link::Counters;
use pulsegate::lab::{read_evictions, Direction, Impairment, LabError, LinkedLab, TcpState};

use crate::common::{self, Via};
use crate::fleet::{Death, Fleet, FleetReport, Kind, Spec, Stopped};
use crate::proxies::{self, ProxyRecord};

/// A busy session's pause between requests.
const BUSY_EVERY: Duration = Duration::from_millis(100);
/// How long a request may take on an impaired link before the session
/// counts as broken (far above any retransmission a live link needs).
const HOLD_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// After a dropped flow was found, how long the other sessions are
/// watched for collateral damage.
pub const FLOW_SETTLE: Duration = Duration::from_secs(5);
/// Sessions quiet this long before a flow is dropped.
pub const FLOW_QUIET: Duration = Duration::from_secs(3);

/// A fresh linked lab; `Ok(None)` where namespaces cannot be made (the
/// reason printed).
pub fn new_lab(tag: &str) -> Result<Option<LinkedLab>> {
    match LinkedLab::new(tag) {
        Ok(lab) => Ok(Some(lab)),
        Err(LabError::Unavailable(reason)) => {
            println!("skipping: {reason}");
            Ok(None)
        }
        Err(e) => Err(e).context("setting up the linked lab"),
    }
}

fn lab(tag: &str) -> Result<LinkedLab> {
    new_lab(tag)?.context("the lab became unavailable")
}

/// One hold: what the link does, and for how long.
#[derive(Debug, Clone)]
pub struct HoldCase {
    /// The case's number in the report.
    pub id: u32,
    pub label: &'static str,
    pub tag: &'static str,
    pub impairment: Impairment,
    /// Both proxies run a TCP check of the backend every second.
    pub check: bool,
    pub hold: Duration,
}

/// What became of one proxy's sessions in a hold.
pub struct HoldOutcome {
    pub via: Via,
    pub fleet: FleetReport,
    pub record: ProxyRecord,
    /// The proxy's exit status, if it died during the hold.
    pub exited: Option<String>,
    /// pulsegate's log, kept beside the report when it ended sessions.
    pub kept_log: Option<PathBuf>,
}

pub struct HoldResult {
    pub case: HoldCase,
    pub outcomes: Vec<HoldOutcome>,
    /// Per direction (to far, to near).
    pub link: [Counters; 2],
}

/// Runs `idle` + `busy` sessions per proxy on the impaired link for the
/// case's hold. Dead sessions are reopened, so the count is a rate.
pub fn hold(case: &HoldCase, vias: &[Via], idle: usize, busy: usize) -> Result<HoldResult> {
    let lab = lab(case.tag)?;
    let running = proxies::start(&lab, vias, case.check, false)?;
    lab.link().set_both(case.impairment);
    let spec = Spec {
        idle,
        busy,
        every: BUSY_EVERY,
        request_timeout: HOLD_REQUEST_TIMEOUT,
        replace: true,
    };
    let opening = Instant::now();
    let mut fleets = Vec::new();
    for proxy in &running.proxies {
        let mut fleet = Fleet::start(lab.near(), proxies::listen_addr(proxy.via), spec)
            .with_context(|| format!("opening the idle sessions via {}", proxy.via.label()))?;
        fleet
            .start_busy(lab.near())
            .with_context(|| format!("opening the busy sessions via {}", proxy.via.label()))?;
        fleets.push(fleet);
    }
    println!(
        "case {}: {idle} idle + {busy} busy sessions per proxy opened in {:.1} s; holding {} s",
        case.id,
        opening.elapsed().as_secs_f64(),
        case.hold.as_secs()
    );
    let started = Instant::now();
    let every = if case.hold >= Duration::from_secs(300) {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(10)
    };
    while started.elapsed() < case.hold {
        std::thread::sleep(every.min(case.hold.saturating_sub(started.elapsed())));
        let so_far: Vec<String> = running
            .proxies
            .iter()
            .zip(&fleets)
            .map(|(p, f)| format!("{} {} ended", p.via.label(), f.deaths().len()))
            .collect();
        println!(
            "case {}: {:>4} s: {}; link dropped {} packets",
            case.id,
            started.elapsed().as_secs(),
            so_far.join(", "),
            dropped(&lab)
        );
    }
    let stopped: Vec<Stopped> = fleets.into_iter().map(Fleet::stop).collect::<Result<_>>()?;
    // The logs now, before the final requests and the clients' closes add
    // lines of their own.
    let records: Vec<ProxyRecord> = running
        .proxies
        .iter()
        .map(|p| p.record())
        .collect::<Result<_>>()?;
    let link = [
        lab.link().counters(Direction::ToFar),
        lab.link().counters(Direction::ToNear),
    ];
    let mut outcomes = Vec::new();
    for ((proxy, stopped), record) in running.proxies.iter().zip(stopped).zip(records) {
        let fleet = stopped.report(true);
        // The lab deletes its files when dropped: keep the log that
        // explains a false eviction of pulsegate's.
        let kept_log = if proxy.via == Via::Pulsegate && !fleet.deaths.is_empty() {
            Some(keep_log(proxy.process.stderr_path(), case.id)?)
        } else {
            None
        };
        outcomes.push(HoldOutcome {
            via: proxy.via,
            exited: proxy.process.exit_status().map(|s| s.to_string()),
            fleet,
            record,
            kept_log,
        });
    }
    Ok(HoldResult {
        case: case.clone(),
        outcomes,
        link,
    })
}

/// Copies pulsegate's log to `<results>/false_evictions-case<id>-pulsegate.log`.
fn keep_log(log: &Path, case: u32) -> Result<PathBuf> {
    let dir = common::results_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kept = dir.join(format!("false_evictions-case{case}-pulsegate.log"));
    std::fs::copy(log, &kept)
        .with_context(|| format!("copying {} to {}", log.display(), kept.display()))?;
    Ok(kept)
}

fn dropped(lab: &LinkedLab) -> u64 {
    Direction::BOTH
        .iter()
        .map(|&d| lab.link().counters(d).dropped)
        .sum()
}

/// One session's detection time after a fault.
#[derive(Debug, Clone)]
pub struct DeathSample {
    pub via: Via,
    pub kind: Kind,
    /// From the fault to the client's read (or request) ending; `None`
    /// if it had not ended at the cap.
    pub detected: Option<Duration>,
    pub how: String,
}

/// One host-death trial.
pub struct DeathTrial {
    pub samples: Vec<DeathSample>,
    /// Per proxy: sessions that ended before the cut (false evictions).
    pub early: Vec<(Via, usize)>,
    pub records: Vec<(Via, ProxyRecord)>,
}

/// A fresh lab, `idle` + `busy` sessions per proxy with `loss` on the link
/// (0: clean), quiet for `quiet`, then the link is cut both ways. Busy
/// sessions ping-pong until the cut and send a request right after it.
pub fn death_trial(
    vias: &[Via],
    loss: f64,
    idle: usize,
    busy: usize,
    quiet: Duration,
    cap: Duration,
) -> Result<DeathTrial> {
    let lab = lab(if loss > 0.0 { "death-loss" } else { "death" })?;
    let running = proxies::start(&lab, vias, false, false)?;
    if loss > 0.0 {
        lab.link().set_both(Impairment::loss(loss));
    }
    let spec = Spec {
        idle,
        busy,
        every: BUSY_EVERY,
        // Longer than the cap: a request that times out was not detected.
        request_timeout: cap + Duration::from_secs(5),
        replace: false,
    };
    let mut fleets = Vec::new();
    for proxy in &running.proxies {
        let mut fleet = Fleet::start(lab.near(), proxies::listen_addr(proxy.via), spec)?;
        fleet.start_busy(lab.near())?;
        fleets.push(fleet);
    }
    std::thread::sleep(quiet);
    let early: Vec<usize> = fleets.iter().map(|f| f.deaths().len()).collect();
    lab.link().set_both(Impairment::cut());
    let cut = Instant::now();
    for fleet in &fleets {
        fleet.kick();
    }
    let everyone = idle + busy;
    while cut.elapsed() < cap && fleets.iter().any(|f| f.deaths().len() < everyone) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut trial = DeathTrial {
        samples: Vec::new(),
        early: Vec::new(),
        records: Vec::new(),
    };
    for ((proxy, fleet), early) in running.proxies.iter().zip(fleets).zip(early) {
        let via = proxy.via;
        trial.records.push((via, proxy.record()?));
        trial.early.push((via, early));
        let deaths = fleet.stop()?.report(false).deaths;
        for (kind, count) in [(Kind::Idle, idle), (Kind::Busy, busy)] {
            let after: Vec<&Death> = deaths
                .iter()
                .filter(|d| d.kind == kind && d.at >= cut && !d.timed_out())
                .filter(|d| d.at - cut <= cap)
                .collect();
            let before = deaths.iter().filter(|d| d.kind == kind && d.at < cut);
            let missing = count.saturating_sub(after.len() + before.count());
            trial.samples.extend(after.iter().map(|d| DeathSample {
                via,
                kind,
                detected: Some(d.at - cut),
                how: d.how.clone(),
            }));
            trial.samples.extend((0..missing).map(|_| DeathSample {
                via,
                kind,
                detected: None,
                how: "nothing".into(),
            }));
        }
    }
    Ok(trial)
}

/// One proxy's dropped-flow outcome.
#[derive(Debug, Clone)]
pub struct FlowOutcome {
    pub via: Via,
    /// The dropped flow's near end (the proxy's upstream socket).
    pub flow: SocketAddr,
    /// From the drop to the first session's end.
    pub detected: Option<Duration>,
    pub how: String,
    /// Other sessions that ended (or failed their final request).
    pub others: usize,
    pub sessions: usize,
    /// pulsegate: the eviction's reason, if an eviction names the flow.
    pub reason: Option<String>,
}

/// A fresh lab on a clean link, each proxy with its own far backend port;
/// `idle` + `busy` sessions per proxy; one idle session's upstream flow
/// per proxy is dropped by the link.
pub fn flow_trial(
    vias: &[Via],
    idle: usize,
    busy: usize,
    cap: Duration,
) -> Result<Vec<FlowOutcome>> {
    let lab = lab("flow")?;
    let running = proxies::start(&lab, vias, false, true)?;
    let spec = Spec {
        idle,
        busy,
        every: BUSY_EVERY,
        request_timeout: HOLD_REQUEST_TIMEOUT,
        replace: false,
    };
    let mut fleets = Vec::new();
    for proxy in &running.proxies {
        fleets.push(Fleet::start(
            lab.near(),
            proxies::listen_addr(proxy.via),
            spec,
        )?);
    }
    // Only idle sessions have upstream connections yet.
    let idle_upstreams = lab.near().tcp_sockets()?;
    for fleet in &mut fleets {
        fleet.start_busy(lab.near())?;
    }
    std::thread::sleep(FLOW_QUIET);
    let mut flows = Vec::new();
    for proxy in &running.proxies {
        let entry = idle_upstreams
            .iter()
            .find(|e| e.remote == proxy.backend && e.state == TcpState::Established)
            .with_context(|| format!("no upstream connection of {}", proxy.via.label()))?;
        lab.link().drop_flow(entry.local, entry.remote)?;
        flows.push(entry.local);
    }
    let dropped = Instant::now();
    while dropped.elapsed() < cap && fleets.iter().any(|f| f.deaths().is_empty()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(FLOW_SETTLE);
    let mut outcomes = Vec::new();
    for ((proxy, fleet), flow) in running.proxies.iter().zip(fleets).zip(flows) {
        let reason = match proxy.via {
            Via::Haproxy => None,
            _ => read_evictions(proxy.process.stderr_path())
                .into_iter()
                .find(|e| e.raw.contains(&format!("\"upstream\":\"{flow}\"")))
                .map(|e| e.reason),
        };
        let mut deaths = fleet.stop()?.report(true).deaths;
        deaths.sort_by_key(|d| d.at);
        // The first session to end after the drop is the dropped flow's
        // (a pulsegate eviction naming the flow confirms it); any other
        // end, before or after, is collateral.
        let after_drop = deaths.iter().find(|d| d.at >= dropped);
        let first = after_drop.filter(|d| !d.silent && !d.timed_out());
        outcomes.push(FlowOutcome {
            via: proxy.via,
            flow,
            detected: first.map(|d| d.at - dropped).filter(|&d| d <= cap),
            how: first.map_or("nothing".into(), |d| d.how.clone()),
            others: deaths.len() - usize::from(after_drop.is_some()),
            sessions: idle + busy,
            reason,
        });
    }
    Ok(outcomes)
}
