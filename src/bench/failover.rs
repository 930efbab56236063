//! `pulsegate bench failover`, start to finish: a lab, two backends,
//! pulsegate in front of them, the load on both routes with the fault
//! injected on schedule, then the report (terminal table, JSON, SVG).
//! Every process is killed and the namespace deleted on every path out,
//! by the drops of [`Backends`](super::servers::Backends) and [`Lab`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::args::{FailoverArgs, FaultKind, Plan, PROXY_ADDR};
use super::fault::{self, FaultTimes};
use super::load::{self, Live, LoadPlan, LoadResult};
use super::report::{self, Report};
use super::servers::{self, Backends};
use super::{detect, plot, table, BenchError};
use crate::lab::{Lab, LabError};

/// How long the backends and pulsegate get to answer a first request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time between planning the start and starting, for the runtime to come
/// up and every client to be spawned.
const LEAD: Duration = Duration::from_millis(300);

/// Runs the bench described by `args`, prints the summary and writes the
/// report files; returns the report.
pub fn run_failover(args: &FailoverArgs) -> Result<Report, BenchError> {
    let plan = Plan::from_args(args)?;
    let exe =
        std::env::current_exe().map_err(BenchError::io("cannot locate the pulsegate binary"))?;
    let lab = Lab::new("bench").map_err(|e| match e {
        LabError::Unavailable(reason) => LabError::Unavailable(format!(
            "{reason} (here: `sudo pulsegate bench failover ...`)"
        )),
        other => other,
    })?;
    create_dir(&plan.out)?;
    println!(
        "pulsegate bench failover: in network namespace {}, starting two {} backends and pulsegate",
        lab.name(),
        plan.workload.as_str()
    );
    let mut backends = servers::start(&lab, &exe, &plan)?;
    let config = plan.proxy_toml();
    write(&plan.out.join("pulsegate.toml"), &config)?;
    let proxy = lab.start_pulsegate_with(&exe, PROXY_ADDR, &config)?;
    let targets = [plan.primary, plan.secondary, PROXY_ADDR];
    lab.enter(|| load::wait_answering(plan.workload, &targets, READY_TIMEOUT))??;
    intro(&plan, &backends, proxy.pid());

    let (load, fault) = run_with_fault(&lab, &mut backends, &plan)?;
    if plan.fault == FaultKind::Freeze {
        backends.primary.thaw();
    }
    if load.interrupted {
        return Err(BenchError::Interrupted);
    }
    let fault = fault?;
    let _ = std::fs::copy(proxy.stderr_path(), plan.out.join("pulsegate.log"));
    let primary = plan.primary.to_string();
    let window = detect::Window {
        fault: fault.wall,
        until: plan.duration.saturating_sub(fault.at),
        primary: &primary,
    };
    let detection = detect::read(proxy.stderr_path(), window);
    let report = report::build(&plan, &load.records, &fault, &detection, config);
    write_outputs(&plan, &report, &load)?;
    print!("\n{}", table::render(&report));
    println!(
        "\nwrote {} and {}; pulsegate's config and log are in {}",
        plan.json.display(),
        plan.svg.display(),
        plan.out.display()
    );
    Ok(report)
}

/// The load on both routes in the lab, and the fault from another thread
/// at the same time.
fn run_with_fault(
    lab: &Lab,
    backends: &mut Backends,
    plan: &Plan,
) -> Result<(LoadResult, Result<FaultTimes, BenchError>), BenchError> {
    let live = Arc::new(Live::default());
    let progress = load::progress_bar(plan.duration, plan.quiet);
    let t0 = Instant::now() + LEAD;
    let load_plan = LoadPlan {
        workload: plan.workload,
        clients: plan.clients,
        pace: plan.pace,
        hang_bound: plan.hang_bound,
        t0,
        end: t0 + plan.duration,
        targets: [PROXY_ADDR, plan.primary],
        fault: plan.fault,
        fault_at: plan.fault_at,
    };
    let primary = &mut backends.primary;
    let live_now: &Live = &live;
    std::thread::scope(|scope| {
        let injector = scope.spawn(move || fault::inject(lab, primary, plan, t0, live_now));
        let loaded = lab.enter(|| load::run(&load_plan, live.clone(), &progress));
        let fault = injector
            .join()
            .unwrap_or_else(|_| Err(BenchError::Setup("the fault thread panicked".into())));
        progress.finish_and_clear();
        Ok((loaded??, fault))
    })
}

fn intro(plan: &Plan, backends: &Backends, proxy_pid: u32) {
    let s = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    println!(
        "  primary {}, secondary {}; pulsegate on {PROXY_ADDR} (pid {proxy_pid})",
        backends.primary.addr, backends.secondary.addr,
    );
    println!(
        "  {} clients through pulsegate + {} direct to the primary for {}; fault `{}` at {}",
        plan.clients,
        plan.clients,
        s(plan.duration),
        plan.fault.as_str(),
        s(plan.fault_at)
    );
}

fn write_outputs(plan: &Plan, report: &Report, load: &LoadResult) -> Result<(), BenchError> {
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| BenchError::Setup(format!("cannot serialize the report: {e}")))?;
    write(&plan.json, &json)?;
    if let Some(csv) = &plan.csv {
        write(csv, &report::csv(&load.records))?;
    }
    if let Some(dir) = plan.svg.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir(dir)?;
    }
    plot::draw(report, &plan.svg)
}

fn create_dir(dir: &Path) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(BenchError::io(format!("cannot create {}", dir.display())))
}

fn write(path: &Path, contents: &str) -> Result<(), BenchError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir(dir)?;
    }
    std::fs::write(path, contents)
        .map_err(BenchError::io(format!("cannot write {}", path.display())))
}
