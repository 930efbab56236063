//! db_clients' markdown report: per workload, the three routes side by
//! side (each route's median over the rounds, with its min–max range) and
//! pulsegate's ratio to HAProxy; the CPU each proxy used per unit of work;
//! and the targets each figure is checked against, with a verdict.

use std::fmt::Write;

use anyhow::Result;

use crate::common::{self, machine, Via};
use crate::setup::Versions;
use crate::{postgres, redis, Knobs, Results, Sample, Test};

const ROUTES: [Via; 3] = [Via::Direct, Via::Haproxy, Via::Pulsegate];

/// Picks one figure of a sample.
type Pick = fn(&Sample) -> Option<f64>;

/// The whole report.
pub fn render(
    knobs: &Knobs,
    machine: &str,
    versions: &Versions,
    results: &Results,
) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "{}\n", preamble(knobs, machine, versions)?)?;
    for workload in workloads(knobs) {
        writeln!(out, "{}\n", workload.title)?;
        writeln!(out, "{}", workload_table(&workload, results))?;
    }
    writeln!(
        out,
        "Where the CPU went while each test ran (medians): the whole machine's busy time \
         (% of both cores: 100 % means the machine was the limit), the proxy's own time \
         (% of one core) and the proxy's time per request, transaction or connection:\n"
    )?;
    writeln!(out, "{}", cpu_table(results))?;
    writeln!(out, "Targets:\n")?;
    write!(out, "{}", targets_table(results))?;
    Ok(out)
}

fn preamble(knobs: &Knobs, machine: &str, versions: &Versions) -> Result<String> {
    let haproxy = common::haproxy_version().unwrap_or_else(|| "HAProxy: not installed".into());
    Ok(format!(
        "Measured {date} by `cargo bench --bench db_clients` on {machine}. {redis}; \
         {pgbench} against its PostgreSQL (fsync off, max_connections {max_conns}, \
         scale {scale}); {haproxy} ({settings}, `benches/haproxy.cfg`); pulsegate with \
         `benches/pulsegate.toml` ({workers}). Each proxy route has one instance in front of \
         redis-server and one in front of PostgreSQL. Client, proxies and servers share the \
         machine's cores. Knobs: {knobs}. {rounds}",
        date = machine::today(),
        redis = versions.redis,
        pgbench = versions.pgbench,
        scale = knobs.pgbench_scale,
        max_conns = postgres::MAX_CONNECTIONS,
        settings = common::haproxy_settings()?,
        workers = common::pulsegate_workers(),
        knobs = knobs.describe(),
        rounds = rounds_sentence(knobs.rounds),
    ))
}

/// How the rounds were run and what a cell holds.
fn rounds_sentence(rounds: usize) -> String {
    match rounds {
        1 => "Every test ran once, the routes one after another.".into(),
        n => format!(
            "Every test ran {n} times, the routes taking turns in each round; each cell is \
             the median over the rounds, with the min–max range in brackets."
        ),
    }
}

/// One table of the report: a title and its rows.
struct Workload {
    title: String,
    rows: Vec<Row>,
}

/// One row: a figure of one test.
struct Row {
    test: Test,
    label: String,
    pick: Pick,
    decimals: usize,
    /// Shown as the amount added over direct (direct's cell empty).
    added: bool,
}

fn workloads(knobs: &Knobs) -> [Workload; 4] {
    let rate: Pick = |s| Some(s.rate);
    let p50: Pick = |s| s.p50_us;
    let p99: Pick = |s| s.p99_us;
    let avg: Pick = |s| s.latency_avg_ms;
    let row = |test, label, pick, decimals, added| Row {
        test,
        label,
        pick,
        decimals,
        added,
    };
    let redis_rows = |set: Test, get: Test, with_added: bool| {
        let mut rows = Vec::new();
        for (test, name) in [(set, "SET"), (get, "GET")] {
            rows.push(row(test, format!("{name} requests/s"), rate, 0, false));
            rows.push(row(test, format!("{name} p50 latency, µs"), p50, 0, false));
            rows.push(row(test, format!("{name} p99 latency, µs"), p99, 0, false));
            if with_added {
                let (p50_label, p99_label) = (
                    format!("{name} p50 added over direct, µs"),
                    format!("{name} p99 added over direct, µs"),
                );
                rows.push(row(test, p50_label, p50, 0, true));
                rows.push(row(test, p99_label, p99, 0, true));
            }
        }
        rows
    };
    [
        Workload {
            title: format!(
                "`redis-benchmark -c {} -n {}`, one run per test (`-t set`, `-t get`):",
                redis::CLIENTS,
                knobs.redis_requests
            ),
            rows: redis_rows(Test::Set, Test::Get, true),
        },
        Workload {
            title: format!(
                "`redis-benchmark -P {} -c {} -n {}`, pipelined:",
                redis::PIPELINE,
                redis::CLIENTS,
                knobs.redis_pipelined_requests
            ),
            rows: redis_rows(Test::SetPipelined, Test::GetPipelined, false),
        },
        Workload {
            title: format!(
                "`pgbench -S -c {} -j {} -T {} -n`, select-only on steady connections:",
                postgres::CLIENTS,
                postgres::THREADS,
                knobs.pgbench_secs
            ),
            rows: vec![
                row(Test::Select, "transactions/s".into(), rate, 0, false),
                row(Test::Select, "latency average, ms".into(), avg, 3, false),
            ],
        },
        Workload {
            title: format!(
                "`pgbench -S -C -c {} -j {} -T {} -n`, a new connection per transaction:",
                postgres::CLIENTS,
                postgres::THREADS,
                knobs.pgbench_secs
            ),
            rows: vec![
                row(
                    Test::SelectReconnect,
                    "transactions/s".into(),
                    rate,
                    0,
                    false,
                ),
                row(
                    Test::SelectReconnect,
                    "latency average (with connecting), ms".into(),
                    avg,
                    3,
                    false,
                ),
            ],
        },
    ]
}

/// A figure's median over the rounds and its range.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

/// `pick` over every round of `test` through `via`, or `None` when it was
/// not measured.
fn spread(results: &Results, test: Test, via: Via, pick: Pick) -> Option<Spread> {
    let mut values: Vec<f64> = results
        .samples
        .iter()
        .filter(|(t, v, _)| *t == test && *v == via)
        .filter_map(|(_, _, s)| pick(s))
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: values[0],
        max: values[n - 1],
    })
}

/// The median of `pick` for direct, HAProxy and pulsegate.
fn medians(results: &Results, test: Test, pick: Pick) -> [Option<f64>; 3] {
    ROUTES.map(|via| spread(results, test, via, pick).map(|s| s.median))
}

/// The amount added over direct's median: direct's own cell becomes empty.
fn added([direct, haproxy, pulsegate]: [Option<f64>; 3]) -> [Option<f64>; 3] {
    let over = |v: Option<f64>| Some(v? - direct?);
    [None, over(haproxy), over(pulsegate)]
}

fn workload_table(workload: &Workload, results: &Results) -> String {
    let mut rows = vec![
        "| figure | direct | HAProxy | pulsegate | pulsegate ÷ HAProxy |".to_string(),
        "| --- | --- | --- | --- | --- |".to_string(),
    ];
    for row in &workload.rows {
        let d = row.decimals;
        let (cells, [_, haproxy, pulsegate]) = if row.added {
            let values = added(medians(results, row.test, row.pick));
            let cells = values.map(|v| v.map_or("–".into(), |v| format!("{v:+.d$}")));
            (cells, values)
        } else {
            let cells = ROUTES.map(|via| {
                spread(results, row.test, via, row.pick).map_or("–".into(), |s| spread_cell(s, d))
            });
            (cells, medians(results, row.test, row.pick))
        };
        rows.push(format!(
            "| {} | {} | {} | {} | {} |",
            row.label,
            cells[0],
            cells[1],
            cells[2],
            common::ratio(pulsegate, haproxy)
        ));
    }
    rows.join("\n") + "\n"
}

/// "52012 (50110–53020)", or the median alone when the rounds agree or
/// there was one.
fn spread_cell(s: Spread, decimals: usize) -> String {
    let median = format!("{:.decimals$}", s.median);
    let (min, max) = (
        format!("{:.decimals$}", s.min),
        format!("{:.decimals$}", s.max),
    );
    if min == max {
        median
    } else {
        format!("{median} ({min}–{max})")
    }
}

fn cpu_table(results: &Results) -> String {
    let mut rows = vec![
        "| test | machine busy: direct / HAProxy / pulsegate | proxy CPU: HAProxy / pulsegate | \
         proxy CPU per unit, µs: HAProxy / pulsegate | unit |"
            .to_string(),
        "| --- | --- | --- | --- | --- |".to_string(),
    ];
    let cells = |test: Test, vias: &[Via], pick: Pick, decimals: usize| {
        vias.iter()
            .map(|&via| {
                spread(results, test, via, pick)
                    .map_or("–".into(), |s| format!("{:.decimals$}", s.median))
            })
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let proxies = [Via::Haproxy, Via::Pulsegate];
    for test in Test::ALL {
        rows.push(format!(
            "| {} | {} % | {} % | {} | {} |",
            test.label(),
            cells(test, &ROUTES, |s| s.machine_pct, 0),
            cells(test, &proxies, |s| s.proxy_cpu_pct, 0),
            cells(test, &proxies, |s| s.proxy_cpu_us, 1),
            test.unit(),
        ));
    }
    let mut table = rows.join("\n") + "\n";
    if !results.tps_lines.is_empty() {
        let lines: Vec<String> = results
            .tps_lines
            .iter()
            .map(|(test, line)| {
                let wording = line.find('(').map_or(line.as_str(), |at| &line[at..]);
                format!("`tps = … {wording}` line for {}", test.label())
            })
            .collect();
        table += &format!("\npgbench's rate is its {}.\n", lines.join(" and its "));
    }
    table
}

fn targets_table(results: &Results) -> String {
    let rate: Pick = |s| Some(s.rate);
    let mut rows = vec![
        "| target | measured | verdict |".to_string(),
        "| --- | --- | --- |".to_string(),
    ];
    let rate_targets = [
        (Test::Set, 1.1),
        (Test::Get, 1.1),
        (Test::Select, 1.05),
        (Test::SelectReconnect, 1.0),
    ];
    for (test, factor) in rate_targets {
        let unit = test.rate_unit();
        let [_, haproxy, pulsegate] = medians(results, test, rate);
        let name = match test {
            Test::Set | Test::Get => format!("{}, -c {}", test.label(), redis::CLIENTS),
            _ => test.label().to_string(),
        };
        rows.push(common::target_row(
            &format!("{name}: {unit} ≥ {factor:.2}× HAProxy's"),
            compare(pulsegate, haproxy, unit, 0, false),
            pulsegate.zip(haproxy).map(|(p, h)| p >= factor * h),
        ));
    }
    let percentiles: [(&str, Pick); 2] = [("p50", |s| s.p50_us), ("p99", |s| s.p99_us)];
    for test in [Test::Set, Test::Get] {
        for (name, pick) in percentiles {
            let [_, haproxy, pulsegate] = added(medians(results, test, pick));
            rows.push(common::target_row(
                &format!(
                    "{}, -c {}: latency added over direct ≤ HAProxy's, {name}",
                    test.label(),
                    redis::CLIENTS
                ),
                compare(pulsegate, haproxy, "µs added", 0, true),
                pulsegate.zip(haproxy).map(|(p, h)| p <= h),
            ));
        }
    }
    rows.join("\n") + "\n"
}

/// "52012 vs 47100 requests/s (1.10×)": pulsegate's figure, then
/// HAProxy's.
fn compare(
    pulsegate: Option<f64>,
    haproxy: Option<f64>,
    unit: &str,
    decimals: usize,
    signed: bool,
) -> String {
    let (Some(p), Some(h)) = (pulsegate, haproxy) else {
        return "not measured".into();
    };
    let ratio = match common::ratio(pulsegate, haproxy).as_str() {
        "–" => String::new(),
        ratio => format!(" ({ratio}×)"),
    };
    if signed {
        format!("{p:+.decimals$} vs {h:+.decimals$} {unit}{ratio}")
    } else {
        format!("{p:.decimals$} vs {h:.decimals$} {unit}{ratio}")
    }
}
