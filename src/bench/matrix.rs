//! `pulsegate bench failover --matrix`: every fault of `--faults` in turn,
//! each a short run in a fresh lab with the same settings and routes, and
//! one summary of fault × route (Markdown and JSON): what each kind of
//! failure cost through each route, the page for a design review.

use std::fmt::Write;

use serde::Serialize;

use super::args::{FailoverArgs, FaultKind, Plan};
use super::failover::{create_dir, run_plan, write};
use super::report::Report;
use super::BenchError;

/// One cell row of the matrix: one fault through one route.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixRow {
    pub fault: &'static str,
    pub description: String,
    pub route: &'static str,
    /// Seconds from the fault until every client was served again; none
    /// if some client never was within the run.
    pub served_again_s: Option<f64>,
    pub clients_served_again: u32,
    pub clients: u32,
    pub requests: u64,
    pub failed: u64,
    pub hung: u64,
    pub unfinished: u64,
    pub sessions_ended: u64,
    pub false_evictions: u64,
    pub wrong_role: u64,
    pub wrong_role_last_s: Option<f64>,
    /// pulsegate only: its first sign of the fault, from its log.
    pub detected_s: Option<f64>,
    /// Requests that ended after the fault: p99 and worst (ms).
    pub since_fault_p99_ms: Option<f64>,
    pub since_fault_max_ms: Option<f64>,
    pub fault_at_s: f64,
    pub fault_applied_s: Option<f64>,
}

/// `matrix.json`: the settings shared by every run and the rows.
#[derive(Debug, Clone, Serialize)]
pub struct Matrix {
    pub workload: &'static str,
    pub clients_per_route: u32,
    pub rate_per_client: u32,
    pub duration_s: f64,
    pub hang_bound_s: f64,
    pub rows: Vec<MatrixRow>,
}

/// The faults a matrix runs: those asked for, else every fault the
/// workload can have.
fn faults(args: &FailoverArgs) -> Vec<FaultKind> {
    if args.faults.is_empty() {
        FaultKind::ALL
            .into_iter()
            .filter(|f| f.fits(args.workload))
            .collect()
    } else {
        let mut faults = Vec::new();
        for &f in &args.faults {
            if !faults.contains(&f) {
                faults.push(f);
            }
        }
        faults
    }
}

/// Runs the matrix described by `args` (all plans are checked first, so
/// a bad flag fails before the first run), prints the summary and writes
/// `matrix.md` and `matrix.json` into `--out`.
pub(crate) fn run_matrix(args: &FailoverArgs) -> Result<Vec<Report>, BenchError> {
    if args.json.is_some() || args.svg.is_some() {
        return Err(BenchError::Args(
            "--json and --svg name one run's files; with --matrix each run writes \
             DIR/<fault>/report.json and timeline.svg"
                .into(),
        ));
    }
    let plans = faults(args)
        .into_iter()
        .map(|fault| Plan::for_fault(args, fault))
        .collect::<Result<Vec<_>, _>>()?;
    create_dir(&args.out)?;
    let mut reports = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        println!(
            "\n=== matrix run {} of {}: fault {} ===",
            i + 1,
            plans.len(),
            plan.fault.as_str()
        );
        reports.push(run_plan(plan)?);
    }
    let matrix = summarize(&reports);
    let json = serde_json::to_string_pretty(&matrix)
        .map_err(|e| BenchError::Setup(format!("cannot serialize the matrix: {e}")))?;
    write(&args.out.join("matrix.json"), &json)?;
    let markdown = markdown(&matrix);
    write(&args.out.join("matrix.md"), &markdown)?;
    println!("\n{markdown}");
    println!(
        "wrote {} and {}; each run's report, timeline and logs are in {}/<fault>",
        args.out.join("matrix.md").display(),
        args.out.join("matrix.json").display(),
        args.out.display()
    );
    Ok(reports)
}

/// The rows of every report, fault by fault, route by route.
pub(crate) fn summarize(reports: &[Report]) -> Matrix {
    let first = reports.first();
    let settings = |f: fn(&Report) -> f64| first.map(f).unwrap_or_default();
    Matrix {
        workload: first.map_or("", |r| r.settings.workload),
        clients_per_route: first.map_or(0, |r| r.settings.clients_per_route),
        rate_per_client: first.map_or(0, |r| r.settings.rate_per_client),
        duration_s: settings(|r| r.settings.duration_s),
        hang_bound_s: settings(|r| r.settings.hang_bound_s),
        rows: reports
            .iter()
            .flat_map(|report| {
                report.routes.iter().map(move |route| MatrixRow {
                    fault: report.fault.kind,
                    description: report.fault.description.clone(),
                    route: route.route,
                    served_again_s: route.served_again_s,
                    clients_served_again: route.clients_served_again,
                    clients: route.clients,
                    requests: route.requests,
                    failed: route.failed,
                    hung: route.hung,
                    unfinished: route.unfinished,
                    sessions_ended: route.sessions_ended,
                    false_evictions: route.false_evictions,
                    wrong_role: route.wrong_role,
                    wrong_role_last_s: route.wrong_role_last_s,
                    detected_s: (route.route == "pulsegate")
                        .then(|| report.detection.as_ref()?.detected_s)
                        .flatten(),
                    since_fault_p99_ms: route.since_fault.p99_ms,
                    since_fault_max_ms: route.since_fault.max_ms,
                    fault_at_s: report.fault.at_s,
                    fault_applied_s: route.fault_applied_s,
                })
            })
            .collect(),
    }
}

/// The matrix as a Markdown table, with a line on the settings and what
/// each column means.
pub(crate) fn markdown(m: &Matrix) -> String {
    let mut out = String::new();
    let rate = match m.rate_per_client {
        0 => "back to back".to_string(),
        n => format!("{n} req/s each"),
    };
    let _ = writeln!(
        out,
        "Workload `{}`, {} clients per route ({rate}), {} s per run, hang bound {} s.\n",
        m.workload, m.clients_per_route, m.duration_s, m.hang_bound_s
    );
    out.push_str(
        "| fault | route | all served again | failed | hung | unfinished | sessions ended | \
         false evictions | wrong role | p99 / worst since the fault |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in &m.rows {
        let wrong = match (r.wrong_role, r.wrong_role_last_s) {
            (0, _) => "0".to_string(),
            (n, Some(last)) => format!("{n} (last +{last:.2} s)"),
            (n, None) => n.to_string(),
        };
        let ms = |v: Option<f64>| match v {
            None => "-".to_string(),
            Some(ms) if ms >= 1000.0 => format!("{:.2} s", ms / 1000.0),
            Some(ms) if ms >= 10.0 => format!("{ms:.0} ms"),
            Some(ms) => format!("{ms:.1} ms"),
        };
        let worst = format!(
            "{} / {}",
            ms(r.since_fault_p99_ms),
            ms(r.since_fault_max_ms)
        );
        let served = match r.served_again_s {
            Some(v) => format!("{v:.2} s"),
            None => format!("never ({}/{})", r.clients_served_again, r.clients),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {served} | {} | {} | {} | {} | {} | {wrong} | {worst} |",
            r.fault, r.route, r.failed, r.hung, r.unfinished, r.sessions_ended, r.false_evictions,
        );
    }
    out.push_str(
        "\n*all served again*: from the fault until every client of the route had an answer \
         to a request started after the fault and after its own last failed or hung \
         request. *sessions ended*: requests on a connection that had answered before and \
         that ended in a reset or close (the proxy or the kernel gave up on the session). \
         *false evictions*: those the fault does not explain: any before the fault, any \
         under `loss` and `latency` (every backend alive and reachable), any beyond the one \
         dropped connection under `flow`. *wrong role*: writes answered read-only after the \
         fault (`role-flip`, `dns-move`).\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> FailoverArgs {
        super::super::args::parse(argv).unwrap()
    }

    #[test]
    fn the_default_faults_are_those_the_workload_can_have() {
        let echo = faults(&args(&["--matrix"]));
        assert!(!echo.contains(&FaultKind::RoleFlip));
        assert_eq!(echo.len(), FaultKind::ALL.len() - 1);
        let redis = faults(&args(&["--matrix", "--workload", "redis"]));
        assert!(redis.contains(&FaultKind::RoleFlip));
        let asked = faults(&args(&["--matrix", "--faults", "loss,flow,loss"]));
        assert_eq!(asked, [FaultKind::Loss, FaultKind::Flow]);
    }

    #[test]
    fn matrix_plans_run_short_through_every_route_into_their_own_directory() {
        let a = args(&["--matrix", "--faults", "loss", "--out", "m"]);
        let plan = Plan::for_fault(&a, FaultKind::Loss).unwrap();
        assert_eq!(plan.duration, std::time::Duration::from_secs(8));
        assert_eq!(plan.routes.len(), 3);
        assert_eq!(plan.json, std::path::PathBuf::from("m/loss/report.json"));
    }

    #[test]
    fn a_bad_fault_for_the_workload_is_refused_before_any_run() {
        let a = args(&["--matrix", "--faults", "loss,role-flip"]);
        match run_matrix(&a) {
            Err(BenchError::Args(msg)) => assert!(msg.contains("--workload redis"), "{msg}"),
            other => panic!("{other:?}"),
        }
        let a = args(&["--matrix", "--json", "x.json"]);
        assert!(matches!(run_matrix(&a), Err(BenchError::Args(_))));
    }
}
