//! The markdown report: the machine and both configs, one table per case
//! group with pulsegate and HAProxy side by side, and the targets with
//! their verdicts; plus the one-line progress reports printed as the
//! cases finish.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use crate::cases::{
    DeathSample, DeathTrial, FlowOutcome, HoldOutcome, HoldResult, FLOW_QUIET, FLOW_SETTLE,
};
use crate::common::{self, Via};
use crate::fleet::{Death, Kind};
use crate::proxies::{self, ProxyRecord, BACKEND_PORT};
use crate::Knobs;

/// Every result of the run.
#[derive(Default)]
pub struct Results {
    pub holds: Vec<HoldResult>,
    pub deaths: Vec<DeathGroup>,
    /// Per trial, one outcome per proxy.
    pub flows: Vec<Vec<FlowOutcome>>,
}

/// The trials of one host-death case.
pub struct DeathGroup {
    pub id: u32,
    pub label: &'static str,
    pub trials: Vec<DeathTrial>,
    pub idle_target: Duration,
    pub busy_target: Duration,
}

/// Detection times of one proxy's sessions of one kind over the trials.
pub struct Detection {
    /// Median over trials of each trial's median; `None`: not detected.
    pub median: Option<Duration>,
    /// Median over trials of each trial's slowest session.
    pub max: Option<Duration>,
    /// The slowest session of all trials.
    pub worst: Option<Duration>,
    pub samples: Vec<Option<Duration>>,
    /// How the clients saw it: RST ×n, EOF ×n.
    pub hows: BTreeMap<String, usize>,
}

impl DeathGroup {
    pub fn detection(&self, via: Via, kind: Kind) -> Option<Detection> {
        let per_trial: Vec<Vec<&DeathSample>> = self
            .trials
            .iter()
            .map(|t| {
                t.samples
                    .iter()
                    .filter(|s| s.via == via && s.kind == kind)
                    .collect()
            })
            .filter(|s: &Vec<&DeathSample>| !s.is_empty())
            .collect();
        if per_trial.is_empty() {
            return None;
        }
        let times = |samples: &[&DeathSample]| sorted(samples.iter().map(|s| s.detected));
        let medians = sorted(per_trial.iter().map(|s| median(&times(s))));
        let maxes = sorted(per_trial.iter().map(|s| last(&times(s))));
        let all = sorted(per_trial.iter().flatten().map(|s| s.detected));
        let mut hows = BTreeMap::new();
        for s in per_trial.iter().flatten() {
            *hows.entry(s.how.clone()).or_default() += 1;
        }
        Some(Detection {
            median: median(&medians),
            max: median(&maxes),
            worst: last(&all),
            samples: all,
            hows,
        })
    }
}

/// Sorted, the undetected (`None`) last.
fn sorted(times: impl Iterator<Item = Option<Duration>>) -> Vec<Option<Duration>> {
    let mut v: Vec<Option<Duration>> = times.collect();
    v.sort_by_key(|t| t.unwrap_or(Duration::MAX));
    v
}

fn median(sorted: &[Option<Duration>]) -> Option<Duration> {
    sorted.get(sorted.len() / 2).copied().flatten()
}

fn last(sorted: &[Option<Duration>]) -> Option<Duration> {
    sorted.last().copied().flatten()
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// "1.62 s", or "none within 20 s".
fn time_or(d: Option<Duration>, cap: Duration) -> String {
    d.map_or(format!("none within {} s", cap.as_secs()), secs)
}

fn tally<'a>(items: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut map = BTreeMap::new();
    for item in items {
        *map.entry(item.to_string()).or_default() += 1;
    }
    map
}

/// "RST ×3, EOF ×1", or `none` when empty.
fn list(map: &BTreeMap<String, usize>, none: &str) -> String {
    if map.is_empty() {
        return none.into();
    }
    let mut items: Vec<(&String, &usize)> = map.iter().collect();
    items.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    items
        .iter()
        .map(|(k, n)| format!("{k} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**not met**"
    }
}

fn outcome(result: &HoldResult, via: Via) -> Option<&HoldOutcome> {
    result.outcomes.iter().find(|o| o.via == via)
}

/// One line per proxy after a hold.
pub fn hold_progress(r: &HoldResult) -> String {
    r.outcomes
        .iter()
        .map(|o| {
            format!(
                "case {}: {}: {} session ends among {} sessions kept open ({:.1} per 1,000 \
                 per 10 min); {}",
                r.case.id,
                o.via.label(),
                o.fleet.deaths.len(),
                o.fleet.sessions(),
                o.fleet.rate(),
                ends_label(o.via, &o.record),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn death_progress(t: &DeathTrial, vias: &[Via]) -> String {
    let mut parts = Vec::new();
    for &via in vias {
        for kind in [Kind::Idle, Kind::Busy] {
            let times = sorted(
                t.samples
                    .iter()
                    .filter(|s| s.via == via && s.kind == kind)
                    .map(|s| s.detected),
            );
            let show = |d: Option<Duration>| d.map_or("–".into(), secs);
            parts.push(format!(
                "{} {}: median {}, max {}",
                via.label(),
                kind_label(kind),
                show(median(&times)),
                show(last(&times))
            ));
        }
    }
    parts.join("; ")
}

pub fn flow_progress(outcomes: &[FlowOutcome]) -> String {
    outcomes
        .iter()
        .map(|o| {
            format!(
                "{} (flow from {}): {} ({}), {} other sessions ended",
                o.via.label(),
                o.flow,
                o.detected.map_or("not detected".into(), secs),
                o.how,
                o.others
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Idle => "idle",
        Kind::Busy => "busy",
    }
}

fn ends_label(via: Via, record: &ProxyRecord) -> String {
    match via {
        Via::Haproxy => format!(
            "session ends in HAProxy's log by termination state: {}",
            list(&record.ends, "none")
        ),
        _ => format!("eviction lines by reason: {}", list(&record.ends, "none")),
    }
}

/// How the clients saw their sessions end: "RST ×3, EOF ×1 (2 found by
/// the final request)".
fn hows(deaths: &[Death]) -> String {
    let map = tally(deaths.iter().map(|d| d.how.as_str()));
    let silent = deaths.iter().filter(|d| d.silent).count();
    let mut text = list(&map, "none");
    if silent > 0 {
        let _ = write!(text, " ({silent} found only by the final request)");
    }
    text
}

/// pulsegate's commit, and the source files changed since it.
fn build_description() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            // Not trimmed at the start: a porcelain line begins with its
            // status, which may be a space.
            .map(|o| String::from_utf8_lossy(&o.stdout).trim_end().to_string())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "pulsegate (commit unknown)".into();
    };
    let changed: Vec<String> = git(&["status", "--porcelain", "--", "src"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.get(3..).map(|p| format!("`{p}`")))
        .collect();
    if changed.is_empty() {
        format!("pulsegate at commit {commit}")
    } else {
        format!(
            "pulsegate at commit {commit} with uncommitted changes to {}",
            changed.join(", ")
        )
    }
}

pub fn render(
    knobs: &Knobs,
    machine: &str,
    nofile: u64,
    vias: &[Via],
    results: &Results,
) -> String {
    let haproxy = if vias.contains(&Via::Haproxy) {
        common::haproxy_version().unwrap_or_else(|| "HAProxy".into())
    } else {
        "HAProxy not measured".into()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Measured {date} by `cargo bench --bench false_evictions` on {machine}; \
         {build}; {haproxy}; RLIMIT_NOFILE {nofile}.",
        date = common::machine::today(),
        build = build_description(),
    );
    let short = knobs.case_secs < Duration::from_secs(600) || knobs.idle < 1000 || knobs.busy < 50;
    if short && !results.holds.is_empty() {
        let _ = writeln!(
            out,
            "\n**Preliminary**: holds of {} s (the clean one {} s) with {} idle + {} busy \
             sessions per proxy, not the 10 minutes and 1,000 + 50 sessions the targets ask for.",
            knobs.case_secs.as_secs(),
            knobs.clean_secs.as_secs(),
            knobs.idle,
            knobs.busy
        );
    }
    let _ = writeln!(
        out,
        "\nBoth proxies run at the same time in the near namespace of a `LinkedLab` \
         (two network namespaces joined by TUN devices and a forwarder that drops, delays \
         and cuts real packets), each with its own clients, in front of the same far echo \
         backend on the same emulated link; the clients reach their proxy over the near \
         namespace's loopback, unimpaired. An idle session exchanged one 32-byte \
         request/echo when it opened and then stays quiet; a busy one does one every \
         100 ms. The backend never goes away in cases 0–3, so every session that ends \
         there is a false eviction; it is counted (how its client saw it: RST, EOF, or a \
         request unanswered for 15 s) and opened again, so the figure is a rate per \
         1,000 sessions per 10 minutes. At the end each surviving idle session must answer \
         one more request."
    );
    render_targets(&mut out, knobs, vias, results);
    render_holds(&mut out, vias, results);
    render_deaths(&mut out, knobs, vias, results);
    render_flows(&mut out, knobs, vias, results);
    render_configs(&mut out, vias);
    let _ = writeln!(
        out,
        "\nThe plot `false_evictions.svg` beside this file shows false evictions (per 1,000 \
         sessions per 10 min; cases 0 and 1) against the median idle detection time on host \
         death (cases 4 and 5), one point per proxy per link condition."
    );
    out
}

fn render_targets(out: &mut String, knobs: &Knobs, vias: &[Via], results: &Results) {
    let _ = writeln!(
        out,
        "\n### Targets (pulsegate)\n\n| target | pulsegate | HAProxy | verdict |\n| --- | --- | --- | --- |"
    );
    let other = |f: &dyn Fn(Via) -> String| {
        if vias.contains(&Via::Haproxy) {
            f(Via::Haproxy)
        } else {
            "not measured".into()
        }
    };
    for r in &results.holds {
        let Some(p) = outcome(r, Via::Pulsegate) else {
            continue;
        };
        let ended = |via: Via| {
            outcome(r, via).map_or("–".into(), |o| format!("{} ended", o.fleet.deaths.len()))
        };
        let _ = writeln!(
            out,
            "| case {}: no false eviction, {} ({} s) | {} | {} | {} |",
            r.case.id,
            r.case.label,
            r.case.hold.as_secs(),
            ended(Via::Pulsegate),
            other(&ended),
            verdict(p.fleet.deaths.is_empty() && p.exited.is_none()),
        );
        if r.case.check {
            let down = |via: Via| {
                outcome(r, via).map_or("–".into(), |o| {
                    format!("marked down {} times", o.record.marked_down)
                })
            };
            let _ = writeln!(
                out,
                "| case {}: the live backend never marked down | {} | {} | {} |",
                r.case.id,
                down(Via::Pulsegate),
                other(&down),
                verdict(p.record.marked_down == 0),
            );
        }
    }
    for g in &results.deaths {
        for (kind, target) in [(Kind::Idle, g.idle_target), (Kind::Busy, g.busy_target)] {
            let Some(p) = g.detection(Via::Pulsegate, kind) else {
                continue;
            };
            let over = p
                .samples
                .iter()
                .filter(|t| t.is_none_or(|t| t > target))
                .count();
            let cell = |via: Via| {
                g.detection(via, kind)
                    .map_or("–".into(), |d| time_or(d.max, knobs.death_cap))
            };
            let _ = writeln!(
                out,
                "| case {}: host death, {}: {} sessions reset within {:.1} s (max, median of {} trials) | {} ({over} of {} sessions over) | {} | {} |",
                g.id,
                g.label,
                kind_label(kind),
                target.as_secs_f64(),
                g.trials.len(),
                cell(Via::Pulsegate),
                p.samples.len(),
                other(&cell),
                verdict(p.max.is_some_and(|m| m <= target)),
            );
        }
    }
    if !results.flows.is_empty() {
        let flow = |via: Via| -> Option<(Option<Duration>, usize)> {
            let outcomes: Vec<&FlowOutcome> = results
                .flows
                .iter()
                .flatten()
                .filter(|o| o.via == via)
                .collect();
            if outcomes.is_empty() {
                return None;
            }
            let worst = last(&sorted(outcomes.iter().map(|o| o.detected)));
            Some((worst, outcomes.iter().map(|o| o.others).sum()))
        };
        let cell = |via: Via| {
            flow(via).map_or("–".into(), |(worst, others)| {
                format!(
                    "{} (slowest), {others} other sessions ended",
                    time_or(worst, knobs.flow_cap)
                )
            })
        };
        if let Some((worst, others)) = flow(Via::Pulsegate) {
            let _ = writeln!(
                out,
                "| case 6: one dropped flow reset within 10 s, no other session affected ({} trials) | {} | {} | {} |",
                results.flows.len(),
                cell(Via::Pulsegate),
                other(&cell),
                verdict(worst.is_some_and(|w| w <= Duration::from_secs(10)) && others == 0),
            );
        }
    }
}

fn render_holds(out: &mut String, vias: &[Via], results: &Results) {
    if results.holds.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n### Cases 0–3: false evictions (live backend)\n\n\
         | case | link | check | sessions per proxy | hold | {} |\n| --- | --- | --- | --- | --- |{}",
        vias.iter().map(|v| v.label()).collect::<Vec<_>>().join(" | "),
        " --- |".repeat(vias.len()),
    );
    for r in &results.holds {
        let first = &r.outcomes[0].fleet.spec;
        let cells: Vec<String> = vias
            .iter()
            .map(|&via| {
                outcome(r, via).map_or("–".into(), |o| {
                    format!(
                        "{} ended ({:.1} per 1,000 per 10 min)",
                        o.fleet.deaths.len(),
                        o.fleet.rate()
                    )
                })
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} idle + {} busy | {} s | {} |",
            r.case.id,
            r.case.label,
            if r.case.check {
                "TCP, every 1 s"
            } else {
                "none"
            },
            first.idle,
            first.busy,
            r.case.hold.as_secs(),
            cells.join(" | ")
        );
    }
    let _ = writeln!(out, "\nIn detail:\n");
    for r in &results.holds {
        let [to_far, to_near] = r.link;
        let _ = writeln!(
            out,
            "- Case {} ({}): the link dropped {} of {} packets towards the backend and {} of {} back.",
            r.case.id,
            r.case.label,
            to_far.dropped,
            to_far.forwarded + to_far.dropped,
            to_near.dropped,
            to_near.forwarded + to_near.dropped,
        );
        for o in &r.outcomes {
            let f = &o.fleet;
            let mut line = format!(
                "  - {}: {} idle and {} busy sessions ended, seen by their clients as {}; \
                 {} busy requests answered; {} sessions reopened ({} failed tries to open); {}",
                o.via.label(),
                f.deaths_of(Kind::Idle),
                f.deaths_of(Kind::Busy),
                hows(&f.deaths),
                f.busy_requests,
                f.reopened,
                f.open_failures,
                ends_label(o.via, &o.record),
            );
            if r.case.check {
                match o.via {
                    Via::Haproxy => {
                        let _ = write!(
                            line,
                            "; backend marked down {} times ({} failed checks, down {} s in all)",
                            o.record.marked_down,
                            o.record.suspect_or_failed_checks,
                            o.record.downtime_secs.unwrap_or(0)
                        );
                    }
                    _ => {
                        let _ = write!(
                            line,
                            "; backend marked down {} times (suspect {} times)",
                            o.record.marked_down, o.record.suspect_or_failed_checks
                        );
                    }
                }
            }
            if let Some(log) = &o.kept_log {
                let _ = write!(line, "; its log is kept in {}", log.display());
            }
            if let Some(status) = &o.exited {
                let _ = write!(line, "; **the proxy exited during the hold ({status})**");
            }
            let _ = writeln!(out, "{line}.");
        }
    }
    if vias.contains(&Via::Haproxy) {
        let _ = writeln!(
            out,
            "\nHAProxy's termination states (its configuration manual, 8.5): the first \
             letter says what ended the session (`S`: the server side, here its keepalive or \
             TCP_USER_TIMEOUT gave up, or a connect failed; `D`: HAProxy, because the server \
             was marked down, `on-marked-down shutdown-sessions`; `C`: the client; `-`: a \
             normal end), the second in which phase (`C`: while connecting to the server, \
             `D`: while data could flow, `-`: at a normal end). Its log also has a line for \
             each failed try to reopen a session (`SC` when a SYN went unanswered for \
             `timeout connect`)."
        );
    }
}

fn render_deaths(out: &mut String, knobs: &Knobs, vias: &[Via], results: &Results) {
    if results.deaths.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n### Cases 4–5: host death (link cut both ways)\n\n\
         Each trial in a fresh lab: {} idle + {} busy sessions per proxy, quiet 4 s to 5 s \
         (busy ones ping-ponging), then the link is cut both ways; busy sessions send a \
         request right after the cut. Time from the cut until the client's read ends \
         (RST or EOF), capped at {} s. Median and max are each the median over the trials \
         of that trial's median and slowest session; worst is the slowest session of all \
         trials. No health check in these cases.\n",
        knobs.death_idle,
        knobs.death_busy,
        knobs.death_cap.as_secs()
    );
    let _ = writeln!(
        out,
        "| case | link | session | {} | pulsegate target |\n| --- | --- | --- |{} --- |",
        vias.iter()
            .map(|v| format!("{} median / max / worst", v.label()))
            .collect::<Vec<_>>()
            .join(" | "),
        " --- |".repeat(vias.len()),
    );
    for g in &results.deaths {
        for (kind, target) in [(Kind::Idle, g.idle_target), (Kind::Busy, g.busy_target)] {
            let cells: Vec<String> = vias
                .iter()
                .map(|&via| {
                    g.detection(via, kind).map_or("–".into(), |d| {
                        format!(
                            "{} / {} / {}",
                            time_or(d.median, knobs.death_cap),
                            time_or(d.max, knobs.death_cap),
                            time_or(d.worst, knobs.death_cap)
                        )
                    })
                })
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | ≤ {:.1} s |",
                g.id,
                g.label,
                kind_label(kind),
                cells.join(" | "),
                target.as_secs_f64()
            );
        }
    }
    let _ = writeln!(out, "\nIn detail:\n");
    for g in &results.deaths {
        for &via in vias {
            let mut parts = Vec::new();
            for kind in [Kind::Idle, Kind::Busy] {
                if let Some(d) = g.detection(via, kind) {
                    parts.push(format!(
                        "{} seen as {}",
                        kind_label(kind),
                        list(&d.hows, "nothing")
                    ));
                }
            }
            let early: usize = g
                .trials
                .iter()
                .flat_map(|t| &t.early)
                .filter(|(v, _)| *v == via)
                .map(|(_, n)| n)
                .sum();
            let mut ends = BTreeMap::new();
            for t in &g.trials {
                for (_, record) in t.records.iter().filter(|(v, _)| *v == via) {
                    for (k, n) in &record.ends {
                        *ends.entry(k.clone()).or_default() += n;
                    }
                }
            }
            let record = ProxyRecord {
                ends,
                ..ProxyRecord::default()
            };
            let _ = writeln!(
                out,
                "- Case {} ({}), {}: {}; {}; {early} sessions ended before the cut.",
                g.id,
                g.label,
                via.label(),
                parts.join(", "),
                ends_label(via, &record),
            );
        }
    }
}

fn render_flows(out: &mut String, knobs: &Knobs, vias: &[Via], results: &Results) {
    if results.flows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n### Case 6: one flow silently dropped, host alive\n\n\
         Each trial in a fresh lab on a clean link: {} idle + {} busy sessions per proxy, \
         each proxy with its own far echo backend port so that an upstream connection's \
         remote port tells whose it is. After {} s of quiet, the link drops every packet of \
         one idle session's upstream 4-tuple per proxy, both ways (a NAT that forgot it), and \
         carries everything else. Time from the drop until the first session's client is \
         reset (capped at {} s), then {} s more to see whether any other session ends, then \
         every idle session must answer one request.\n",
        knobs.flow_idle,
        knobs.flow_busy,
        FLOW_QUIET.as_secs(),
        knobs.flow_cap.as_secs(),
        FLOW_SETTLE.as_secs(),
    );
    let _ = writeln!(
        out,
        "| | {} |\n| --- |{}",
        vias.iter()
            .map(|v| v.label())
            .collect::<Vec<_>>()
            .join(" | "),
        " --- |".repeat(vias.len())
    );
    let of = |via: Via| -> Vec<&FlowOutcome> {
        results
            .flows
            .iter()
            .flatten()
            .filter(|o| o.via == via)
            .collect()
    };
    let row = |name: &str, f: &dyn Fn(&[&FlowOutcome]) -> String| {
        let cells: Vec<String> = vias.iter().map(|&v| f(&of(v))).collect();
        format!("| {name} | {} |\n", cells.join(" | "))
    };
    out.push_str(&row("time to reset: median (each trial)", &|o| {
        let times = sorted(o.iter().map(|o| o.detected));
        let each: Vec<String> = o
            .iter()
            .map(|o| o.detected.map_or("–".into(), secs))
            .collect();
        format!(
            "{} ({})",
            time_or(median(&times), knobs.flow_cap),
            each.join(", ")
        )
    }));
    out.push_str(&row("seen by the client as", &|o| {
        list(&tally(o.iter().map(|o| o.how.as_str())), "nothing")
    }));
    out.push_str(&row("other sessions that ended", &|o| {
        let others: usize = o.iter().map(|o| o.others).sum();
        let sessions: usize = o.iter().map(|o| o.sessions.saturating_sub(1)).sum();
        format!("{others} of {sessions}")
    }));
    out.push_str(&row("eviction naming the flow (reason)", &|o| {
        if o.first().is_some_and(|o| o.via == Via::Haproxy) {
            return "(no per-session log reason)".into();
        }
        list(
            &tally(o.iter().map(|o| o.reason.as_deref().unwrap_or("none"))),
            "none",
        )
    }));
    let _ = writeln!(
        out,
        "\npulsegate target: ≤ 10 s, no other session affected."
    );
}

fn render_configs(out: &mut String, vias: &[Via]) {
    let backend = pulsegate::lab::LinkedLab::far_addr(BACKEND_PORT);
    let pulsegate = proxies::pulsegate_config(backend, false);
    let check = proxies::pulsegate_config(backend, true);
    let check_extra = check.strip_prefix(pulsegate.trim_end()).unwrap_or(&check);
    let _ = writeln!(
        out,
        "\n### Configs\n\npulsegate (`pulsegate --log-format json run -c FILE`):\n\n\
         ```toml\n{}\n```\n\ncase 2 adds:\n\n```toml\n{}\n```",
        pulsegate.trim_end(),
        check_extra.trim()
    );
    if vias.contains(&Via::Haproxy) {
        let stats = std::path::Path::new("<lab dir>/haproxy.sock");
        let haproxy = proxies::haproxy_config(backend, false, stats);
        let check = proxies::haproxy_config(backend, true, stats);
        let server = check
            .lines()
            .find(|l| l.trim_start().starts_with("server "))
            .unwrap_or_default()
            .trim();
        let _ = writeln!(
            out,
            "\nHAProxy (`haproxy -db -f FILE`):\n\n```\n{}\n```\n\ncase 2's server line:\n\n\
             ```\n    {server}\n```\n\n(In case 6 HAProxy's backend is the far host's port \
             {}.)",
            haproxy.trim_end(),
            proxies::HAPROXY_BACKEND_PORT
        );
    }
}
