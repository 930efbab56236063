//! `pulsegate bench failover`, start to finish: a linked lab (backends in
//! the far namespace, clients and proxies in the near one, an emulated
//! link between), two backends, the proxies of the routes in front of
//! them, the load on every route with the fault injected on schedule,
//! then the report (terminal table, JSON, SVG). Every process is killed
//! and the namespaces deleted on every path out, by the drops of
//! [`Backends`](super::servers::Backends) and [`LinkedLab`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::args::{
    FailoverArgs, FaultKind, Plan, DNS_NAME, HAPROXY_ADDR, PGBOUNCER_ADDR, PROXY_ADDR,
};
use super::fault::{self, FaultTimes, Scene};
use super::load::{self, Live, LoadPlan, LoadResult, Target};
use super::report::{self, Report};
use super::servers::{self, Backends};
use super::workload::Route;
use super::{detect, matrix, peers, plot, table, BenchError};
use crate::lab::{LabError, LinkedLab};

/// How long the backends and pulsegate get to answer a first request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time between planning the start and starting, for the runtime to come
/// up and every client to be spawned.
const LEAD: Duration = Duration::from_millis(300);

/// Runs the bench described by `args` (one fault, or with `--matrix`
/// each fault in turn), prints the summary and writes the report files;
/// returns the reports.
pub fn run_failover(args: &FailoverArgs) -> Result<Vec<Report>, BenchError> {
    if args.matrix {
        return matrix::run_matrix(args);
    }
    let plan = Plan::from_args(args)?;
    Ok(vec![run_plan(&plan)?])
}

/// Runs one planned bench (one fault, every route).
pub(crate) fn run_plan(plan: &Plan) -> Result<Report, BenchError> {
    let exe =
        std::env::current_exe().map_err(BenchError::io("cannot locate the pulsegate binary"))?;
    let lab = LinkedLab::new("bench").map_err(|e| match e {
        LabError::Unavailable(reason) => LabError::Unavailable(format!(
            "{reason} (here: `sudo pulsegate bench failover ...`)"
        )),
        other => other,
    })?;
    create_dir(&plan.out)?;
    println!(
        "pulsegate bench failover: backends in network namespace {}, clients and proxies in {}, \
         joined by an emulated link; starting two {} backends",
        lab.far().name(),
        lab.near().name(),
        plan.workload.as_str()
    );
    let mut backends = servers::start(lab.far(), &exe, plan)?;
    if plan.by_name() {
        lab.near().set_hosts(&plan.hosts(plan.primary))?;
    }
    let config = plan.proxy_toml();
    write(&plan.out.join("pulsegate.toml"), &config)?;
    let mut owners = vec![];
    let mut proxy = None;
    // HAProxy, PgBouncer.
    let mut peers = vec![];
    let mut targets = vec![];
    for &route in &plan.routes {
        let (target, pid) = match route {
            Route::Pulsegate => {
                let process = lab.near().start_pulsegate_with(&exe, PROXY_ADDR, &config)?;
                let pid = process.pid();
                proxy = Some(process);
                (PROXY_ADDR, pid)
            }
            Route::Haproxy | Route::Pgbouncer => {
                let (started, addr, file) = if route == Route::Haproxy {
                    let started = peers::start_haproxy(lab.near(), plan)?;
                    (started, HAPROXY_ADDR, "haproxy.cfg")
                } else {
                    let started = peers::start_pgbouncer(lab.near(), plan)?;
                    (started, PGBOUNCER_ADDR, "pgbouncer.ini")
                };
                write(&plan.out.join(file), &started.config)?;
                let pid = started.process.pid();
                peers.push((route, started));
                (addr, pid)
            }
            Route::Direct => (plan.primary, std::process::id()),
        };
        owners.push((route, pid));
        let target = match route {
            Route::Direct if plan.by_name() => Target::Hosts {
                file: lab.near().hosts_file(),
                name: DNS_NAME,
                port: plan.primary.port(),
            },
            _ => Target::Addr(target),
        };
        targets.push((route, target));
    }
    let mut ready = vec![plan.primary, plan.secondary];
    ready.extend(targets.iter().filter_map(|(_, t)| t.resolve().ok()));
    if plan.roles_change() {
        // The replica answers reads, but the clients write: only the
        // primary and the proxies are asked.
        ready.retain(|&addr| addr != plan.secondary);
    }
    lab.near()
        .enter(|| load::wait_answering(plan.workload, &ready, READY_TIMEOUT))??;
    intro(plan, &backends, &owners);

    let scene = Scene {
        lab: &lab,
        backends: &mut backends,
        owners,
    };
    let (load, fault) = run_with_fault(&lab, scene, plan, targets)?;
    if plan.fault == FaultKind::Freeze {
        backends.primary.thaw();
    }
    if load.interrupted {
        return Err(BenchError::Interrupted);
    }
    let fault = fault?;
    let primary = plan.primary_label();
    let detection = match (&proxy, fault.wall) {
        (Some(proxy), Some(wall)) => {
            let _ = std::fs::copy(proxy.stderr_path(), plan.out.join("pulsegate.log"));
            let window = detect::Window {
                fault: wall,
                until: plan.duration.saturating_sub(fault.at),
                primary: &primary,
            };
            Some(detect::read(proxy.stderr_path(), window))
        }
        _ => None,
    };
    let mut configs = report::Configs {
        pulsegate: proxy.is_some().then_some(config),
        ..report::Configs::default()
    };
    for (route, peer) in peers {
        let slot = match route {
            Route::Haproxy => &mut configs.haproxy,
            _ => &mut configs.pgbouncer,
        };
        let log = plan.out.join(format!("{}.log", route.as_str()));
        let _ = std::fs::copy(peer.process.stderr_path(), log);
        *slot = Some(peer.config);
    }
    let report = report::build(plan, &load.records, &fault, detection.as_ref(), configs);
    write_outputs(plan, &report, &load)?;
    print!("\n{}", table::render(&report));
    println!(
        "\nwrote {} and {}; the proxies' configs and logs are in {}",
        plan.json.display(),
        plan.svg.display(),
        plan.out.display()
    );
    Ok(report)
}

/// The load on every route in the near namespace, and the fault from
/// another thread at the same time.
fn run_with_fault(
    lab: &LinkedLab,
    scene: Scene<'_>,
    plan: &Plan,
    targets: Vec<(Route, Target)>,
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
        targets,
        fault: plan.fault,
        fault_at: plan.fault_at,
    };
    let live_now: &Live = &live;
    std::thread::scope(|scope| {
        let injector = scope.spawn(move || fault::inject(scene, plan, t0, live_now));
        let loaded = lab
            .near()
            .enter(|| load::run(&load_plan, live.clone(), &progress));
        let fault = injector
            .join()
            .unwrap_or_else(|_| Err(BenchError::Setup("the fault thread panicked".into())));
        progress.finish_and_clear();
        Ok((loaded??, fault))
    })
}

fn intro(plan: &Plan, backends: &Backends, owners: &[(Route, u32)]) {
    let s = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let routes: Vec<String> = owners
        .iter()
        .map(|&(route, pid)| match route {
            Route::Pulsegate => format!("pulsegate on {PROXY_ADDR} (pid {pid})"),
            Route::Haproxy => format!("HAProxy on {HAPROXY_ADDR} (pid {pid})"),
            Route::Pgbouncer => format!("PgBouncer on {PGBOUNCER_ADDR} (pid {pid})"),
            Route::Direct => "direct to the primary".to_string(),
        })
        .collect();
    println!(
        "  primary {}, secondary {}; routes: {}",
        backends.primary.addr,
        backends.secondary.addr,
        routes.join(", ")
    );
    println!(
        "  {} clients per route for {}; fault `{}` at {}",
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

pub(super) fn create_dir(dir: &Path) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(BenchError::io(format!("cannot create {}", dir.display())))
}

pub(super) fn write(path: &Path, contents: &str) -> Result<(), BenchError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir(dir)?;
    }
    std::fs::write(path, contents)
        .map_err(BenchError::io(format!("cannot write {}", path.display())))
}
