//! proxy_perf's markdown report: the figures of the three routes side by
//! side with pulsegate's ratios to direct and to HAProxy, the proxies' CPU,
//! and the targets each figure is checked against, with a verdict.

use std::fmt::Write;

use anyhow::Result;

use crate::common::{self, machine, Via};
use crate::workloads::Latency;
use crate::{Figures, Knobs, Test};

/// The whole report.
pub fn render(knobs: &Knobs, machine: &str, figures: &[Figures]) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "{}\n", preamble(knobs, machine)?)?;
    writeln!(out, "{}", figures_table(knobs, figures))?;
    write!(out, "{}", failures(figures))?;
    writeln!(
        out,
        "Where the CPU went while each test ran: the whole machine's busy time \
         (% of both cores: 100 % means the machine was the limit), the proxy's own \
         time (% of one core) and the proxy's time per unit of work:\n"
    )?;
    writeln!(out, "{}", cpu_table(figures))?;
    writeln!(out, "Targets:\n")?;
    write!(out, "{}", targets_table(figures))?;
    Ok(out)
}

fn preamble(knobs: &Knobs, machine: &str) -> Result<String> {
    let haproxy = common::haproxy_version().unwrap_or_else(|| "HAProxy: not installed".into());
    Ok(format!(
        "Measured {date} by `cargo bench --bench proxy_perf` on {machine}. \
         {haproxy} ({settings}, `benches/haproxy.cfg`); pulsegate with \
         `benches/pulsegate.toml` ({workers}). Client, \
         proxy and servers share the machine's cores. Loads: {gib} GiB through \
         one connection; {rounds} round trips after {pp_warm} unrecorded; \
         {conns} connections for {rps} s in {slices} slices, the routes taking turns \
         (the median slice's rate); {threads} client threads for {conn} s; the last \
         two after {warm} s of the same load.",
        date = machine::today(),
        settings = common::haproxy_settings()?,
        workers = common::pulsegate_workers(),
        gib = knobs.throughput_gib,
        rounds = knobs.pingpong_rounds,
        pp_warm = knobs.pingpong_warmup,
        conns = knobs.rps_conns,
        rps = knobs.rps_window.as_secs(),
        slices = knobs.rps_slices,
        threads = knobs.conn_threads,
        conn = knobs.conn_window.as_secs(),
        warm = knobs.warmup.as_secs(),
    ))
}

/// The figures of `via`, if it was measured.
fn of(figures: &[Figures], via: Via) -> Option<&Figures> {
    figures.iter().find(|f| f.via == via)
}

/// One figure of direct, HAProxy and pulsegate.
fn three(figures: &[Figures], get: impl Fn(&Figures) -> Option<f64>) -> [Option<f64>; 3] {
    [Via::Direct, Via::Haproxy, Via::Pulsegate].map(|via| of(figures, via).and_then(&get))
}

fn figures_table(knobs: &Knobs, figures: &[Figures]) -> String {
    let mut rows = vec![
        "| figure | direct | HAProxy | pulsegate | pulsegate ÷ direct | pulsegate ÷ HAProxy |"
            .to_string(),
        "| --- | --- | --- | --- | --- | --- |".to_string(),
    ];
    let gib_s = three(figures, |f| f.throughput);
    rows.push(row("one-stream throughput, GiB/s", gib_s, 2, false));
    type Pick = fn(&Latency) -> f64;
    let percentiles: [(&str, Pick); 3] = [
        ("p50", |l| l.p50),
        ("p99", |l| l.p99),
        ("p99.9", |l| l.p999),
    ];
    for (name, pick) in percentiles {
        let values = three(figures, |f| f.latency.as_ref().map(pick));
        rows.push(row(&format!("ping-pong {name}, µs"), values, 1, false));
    }
    for (name, pick) in percentiles {
        let values = three(figures, |f| f.latency.as_ref().map(pick));
        rows.push(row(
            &format!("{name} added over direct, µs"),
            added(values),
            1,
            true,
        ));
    }
    let rps = three(figures, |f| f.rps);
    rows.push(row(
        &format!("requests/s, {} connections", knobs.rps_conns),
        rps,
        0,
        false,
    ));
    let conns = three(figures, |f| f.conns.as_ref().map(|c| c.per_sec));
    let label = format!("new connections/s, {} client threads", knobs.conn_threads);
    rows.push(row(&label, conns, 0, false));
    rows.join("\n") + "\n"
}

/// Latency added over direct: direct's own cell becomes empty.
fn added([direct, haproxy, pulsegate]: [Option<f64>; 3]) -> [Option<f64>; 3] {
    let over = |v: Option<f64>| Some(v? - direct?);
    [None, over(haproxy), over(pulsegate)]
}

fn row(
    label: &str,
    [direct, haproxy, pulsegate]: [Option<f64>; 3],
    decimals: usize,
    signed: bool,
) -> String {
    let cell = |v: Option<f64>| match v {
        Some(v) if signed => format!("{v:+.decimals$}"),
        Some(v) => format!("{v:.decimals$}"),
        None => "–".into(),
    };
    format!(
        "| {label} | {} | {} | {} | {} | {} |",
        cell(direct),
        cell(haproxy),
        cell(pulsegate),
        common::ratio(pulsegate, direct),
        common::ratio(pulsegate, haproxy),
    )
}

/// Notes on connection cycles that failed, if any.
fn failures(figures: &[Figures]) -> String {
    let mut notes = String::new();
    for f in figures {
        if let Some(c) = f.conns.as_ref().filter(|c| c.errors > 0) {
            let first = c.first_error.as_deref().unwrap_or("?");
            notes += &format!(
                "New connections, {}: {} cycles failed and are not counted (first: {first}).\n\n",
                f.via.label(),
                c.errors
            );
        }
    }
    notes
}

fn cpu_table(figures: &[Figures]) -> String {
    let mut rows = vec![
        "| test | machine busy: direct / HAProxy / pulsegate | proxy CPU: HAProxy / pulsegate | \
         proxy CPU per unit: HAProxy / pulsegate | unit |"
            .to_string(),
        "| --- | --- | --- | --- | --- |".to_string(),
    ];
    for test in Test::ALL {
        let i = test as usize;
        let cells = |vias: &[Via], get: &dyn Fn(&Figures) -> Option<f64>, decimals: usize| {
            vias.iter()
                .map(|&via| {
                    of(figures, via)
                        .and_then(get)
                        .map_or("–".into(), |v| format!("{v:.decimals$}"))
                })
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let all = [Via::Direct, Via::Haproxy, Via::Pulsegate];
        let proxies = [Via::Haproxy, Via::Pulsegate];
        rows.push(format!(
            "| {} | {} % | {} % | {} | {} |",
            test.label(),
            cells(&all, &|f| f.machine[i], 0),
            cells(&proxies, &|f| f.cpu[i], 0),
            cells(&proxies, &|f| f.cpu_per_unit[i], 1),
            test.unit(),
        ));
    }
    rows.join("\n") + "\n"
}

fn targets_table(figures: &[Figures]) -> String {
    let [direct, haproxy, pulsegate] = three(figures, |f| f.throughput);
    let mut rows = vec![
        "| target | measured | verdict |".to_string(),
        "| --- | --- | --- |".to_string(),
        common::target_row(
            "throughput ≥ HAProxy's",
            compare(pulsegate, haproxy, "GiB/s", 2),
            pulsegate.zip(haproxy).map(|(p, h)| p >= h),
        ),
        common::target_row(
            "throughput ≥ 70 % of direct",
            compare(pulsegate, direct, "GiB/s", 2),
            pulsegate.zip(direct).map(|(p, d)| p >= 0.7 * d),
        ),
    ];
    type Pick = fn(&Latency) -> f64;
    let percentiles: [(&str, Pick); 2] = [("p50", |l| l.p50), ("p99", |l| l.p99)];
    for (name, pick) in percentiles {
        let [_, haproxy, pulsegate] = added(three(figures, |f| f.latency.as_ref().map(pick)));
        rows.push(common::target_row(
            &format!("latency added over direct ≤ HAProxy's, {name}"),
            compare(pulsegate, haproxy, "µs added", 1),
            pulsegate.zip(haproxy).map(|(p, h)| p <= h),
        ));
    }
    rows.join("\n") + "\n"
}

/// "1.40 vs 1.80 GiB/s (0.78×)": pulsegate's figure, then the other's.
fn compare(pulsegate: Option<f64>, other: Option<f64>, unit: &str, decimals: usize) -> String {
    let (Some(p), Some(o)) = (pulsegate, other) else {
        return "not measured".into();
    };
    let ratio = common::ratio(pulsegate, other);
    let ratio = if ratio == "–" {
        String::new()
    } else {
        format!(" ({ratio}×)")
    };
    format!("{p:.decimals$} vs {o:.decimals$} {unit}{ratio}")
}
