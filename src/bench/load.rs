//! The load: `clients` tasks per route doing request/response on a pace,
//! each request bounded by the hang bound, every request recorded; the
//! live counters and the progress bar that shows them.
//!
//! [`run`] must be called on a thread inside the lab's namespace (see
//! [`crate::lab::Lab::enter`]): the runtime's worker threads are spawned
//! from it and so inherit the namespace, and every client socket is made
//! there.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::args::{FaultKind, WorkloadKind};
use super::workload::{self, Conn, Outcome, Record, Route};
use super::BenchError;

/// After a failed request a client waits at least this long before it
/// reconnects, as a connection pool would.
const RETRY_DELAY: Duration = Duration::from_millis(20);
/// How often the progress bar is redrawn.
const TICK: Duration = Duration::from_millis(100);
/// Most records a client reserves room for up front.
const MAX_RESERVED: usize = 100_000;

/// What the client tasks need to know.
#[derive(Debug, Clone)]
pub(crate) struct LoadPlan {
    pub workload: WorkloadKind,
    pub clients: u32,
    pub pace: Duration,
    pub hang_bound: Duration,
    /// The start of the load; record times count from here.
    pub t0: Instant,
    pub end: Instant,
    /// The routes and where each connects.
    pub targets: Vec<(Route, Target)>,
    pub fault: FaultKind,
    pub fault_at: Duration,
}

/// Where a route's clients connect: an address, or a name looked up in a
/// hosts file at every connect (as an application that resolves the
/// name of its database each time it opens a connection).
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Addr(SocketAddr),
    Hosts {
        file: PathBuf,
        name: &'static str,
        port: u16,
    },
}

impl Target {
    /// The address to connect to now.
    pub fn resolve(&self) -> Result<SocketAddr, workload::Failure> {
        match self {
            Target::Addr(addr) => Ok(*addr),
            Target::Hosts { file, name, port } => {
                let hosts = std::fs::read_to_string(file)?;
                lookup(&hosts, name)
                    .map(|ip| SocketAddr::new(ip, *port))
                    .ok_or(workload::Failure::Other)
            }
        }
    }
}

/// The address of `name` in a hosts file's text (the first line naming it).
fn lookup(hosts: &str, name: &str) -> Option<IpAddr> {
    hosts
        .lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let ip = fields.next()?;
            fields.any(|n| n == name).then(|| ip.parse().ok()).flatten()
        })
}

/// Counts shared by the clients, the fault thread and the progress bar.
#[derive(Debug, Default)]
pub(crate) struct Live {
    ok: [AtomicU64; Route::COUNT],
    failed: [AtomicU64; Route::COUNT],
    hung: [AtomicU64; Route::COUNT],
    /// Set by the fault thread once the fault is in place.
    pub fault_injected: AtomicBool,
    /// Set when Ctrl-C or SIGTERM stopped the load, so the fault thread
    /// gives up.
    pub interrupted: AtomicBool,
}

impl Live {
    fn count(&self, route: Route, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Failed(_) => &self.failed,
            Outcome::Hung => &self.hung,
            Outcome::Unfinished => return,
        };
        counter[route.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// "pulsegate ok 1234 err 0 hung 0 | direct ok ...".
    fn message(&self, routes: &[(Route, Target)]) -> String {
        routes
            .iter()
            .map(|&(r, _)| {
                let i = r.index();
                format!(
                    "{} ok {} err {} hung {}",
                    r.as_str(),
                    self.ok[i].load(Ordering::Relaxed),
                    self.failed[i].load(Ordering::Relaxed),
                    self.hung[i].load(Ordering::Relaxed)
                )
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// How the load ended.
pub(crate) struct LoadResult {
    pub records: Vec<Record>,
    /// Ctrl-C stopped it early.
    pub interrupted: bool,
}

/// Runs the load until `plan.end` (or Ctrl-C), drawing `progress`.
pub(crate) fn run(
    plan: &LoadPlan,
    live: Arc<Live>,
    progress: &ProgressBar,
) -> Result<LoadResult, BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(BenchError::io("cannot start the load's async runtime"))?;
    runtime.block_on(async {
        let stop = CancellationToken::new();
        let ctrl_c = tokio::spawn(watch_ctrl_c(stop.clone(), live.clone()));
        let ticker = tokio::spawn(tick(plan.clone(), live.clone(), progress.clone()));
        let mut tasks = tokio::task::JoinSet::new();
        for (route, target) in &plan.targets {
            let (route, target) = (*route, target.clone());
            for id in 0..plan.clients {
                let client = Client {
                    plan: plan.clone(),
                    route,
                    target: target.clone(),
                    id,
                    live: live.clone(),
                    stop: stop.clone(),
                };
                tasks.spawn(client.run());
            }
        }
        let mut records = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let mut mine =
                done.map_err(|e| BenchError::Setup(format!("a client task failed: {e}")))?;
            records.append(&mut mine);
        }
        ticker.abort();
        ctrl_c.abort();
        records.sort_by_key(|r| (r.start, r.route, r.client));
        Ok(LoadResult {
            records,
            interrupted: stop.is_cancelled(),
        })
    })
}

/// Ctrl-C or SIGTERM (`timeout`, `kill`) stop the load early, so the run
/// still ends through the lab's cleanup.
async fn watch_ctrl_c(stop: CancellationToken, live: Arc<Live>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        live.interrupted.store(true, Ordering::Relaxed);
        stop.cancel();
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    live.interrupted.store(true, Ordering::Relaxed);
    stop.cancel();
}

async fn tick(plan: LoadPlan, live: Arc<Live>, progress: ProgressBar) {
    let mut interval = tokio::time::interval(TICK);
    loop {
        interval.tick().await;
        let elapsed = plan.t0.elapsed();
        progress.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
        let phase = if live.fault_injected.load(Ordering::Relaxed) {
            format!(
                "fault {} injected at {:.1}s",
                plan.fault.as_str(),
                plan.fault_at.as_secs_f64()
            )
        } else {
            format!(
                "fault {} at {:.1}s",
                plan.fault.as_str(),
                plan.fault_at.as_secs_f64()
            )
        };
        progress.set_prefix(phase);
        progress.set_message(live.message(&plan.targets));
    }
}

/// A progress bar over the run's duration, or a hidden one.
pub(crate) fn progress_bar(duration: Duration, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {prefix}\n      {wide_msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// One client: one connection at a time, reconnecting after a failure.
struct Client {
    plan: LoadPlan,
    route: Route,
    target: Target,
    id: u32,
    live: Arc<Live>,
    stop: CancellationToken,
}

impl Client {
    async fn run(self) -> Vec<Record> {
        let plan = &self.plan;
        let target = &self.target;
        let expected =
            plan.end.saturating_duration_since(plan.t0).as_nanos() / plan.pace.as_nanos().max(1);
        let mut records = Vec::with_capacity(
            usize::try_from(expected)
                .unwrap_or(MAX_RESERVED)
                .min(MAX_RESERVED),
        );
        let mut conn = None;
        // Spread the clients over one pace period, so requests do not
        // arrive in bursts.
        let mut next = plan.t0 + plan.pace * self.id / plan.clients;
        for seq in 0u64.. {
            if !self.pause_until(next).await {
                break;
            }
            let started = Instant::now();
            if started >= plan.end {
                break;
            }
            let reused = conn.is_some();
            let outcome = tokio::select! {
                answered = tokio::time::timeout(plan.hang_bound, attempt(&mut conn, plan.workload, target, seq)) => {
                    match answered {
                        Ok(Ok(())) => Outcome::Ok,
                        Ok(Err(failure)) => Outcome::Failed(failure),
                        Err(_) => Outcome::Hung,
                    }
                }
                _ = tokio::time::sleep_until(plan.end.into()) => Outcome::Unfinished,
                _ = self.stop.cancelled() => Outcome::Unfinished,
            };
            records.push(Record {
                route: self.route,
                client: self.id,
                start: started.saturating_duration_since(plan.t0),
                latency: started.elapsed(),
                outcome,
                reused,
            });
            self.live.count(self.route, outcome);
            next = started + plan.pace;
            match outcome {
                Outcome::Ok => {}
                Outcome::Unfinished => break,
                Outcome::Failed(_) | Outcome::Hung => {
                    conn = None;
                    next = next.max(Instant::now() + RETRY_DELAY);
                }
            }
        }
        records
    }

    /// Sleeps until `at`; false if the run ends first.
    async fn pause_until(&self, at: Instant) -> bool {
        if at >= self.plan.end {
            tokio::select! {
                _ = tokio::time::sleep_until(self.plan.end.into()) => {}
                _ = self.stop.cancelled() => {}
            }
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => true,
            _ = self.stop.cancelled() => false,
        }
    }
}

/// Connects if needed, then one request.
async fn attempt(
    conn: &mut Option<Conn>,
    workload: WorkloadKind,
    target: &Target,
    seq: u64,
) -> Result<(), workload::Failure> {
    let open = match conn {
        Some(open) => open,
        None => conn.insert(workload::connect(workload, target.resolve()?).await?),
    };
    open.request(seq).await
}

/// Waits (at most `timeout`) until every address in `targets` answers a
/// request of `workload`, preparing each backend (e.g. the redis key). Runs
/// on a thread inside the lab.
pub(crate) fn wait_answering(
    workload: WorkloadKind,
    targets: &[SocketAddr],
    timeout: Duration,
) -> Result<(), BenchError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::io("cannot start an async runtime"))?;
    runtime.block_on(async {
        for &target in targets {
            let answered = tokio::time::timeout(timeout, answer_once(workload, target)).await;
            if answered.is_err() {
                return Err(BenchError::Setup(format!(
                    "{target} did not answer a {} request within {timeout:?}",
                    workload.as_str()
                )));
            }
        }
        Ok(())
    })
}

async fn answer_once(workload: WorkloadKind, target: SocketAddr) {
    loop {
        if let Ok(mut conn) = workload::connect(workload, target).await {
            if conn.prepare().await.is_ok() && conn.request(0).await.is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_found_in_a_hosts_file() {
        let hosts = "127.0.0.1 localhost\n# 10.0.0.9 db.lab\n10.200.0.3 other db.lab  # moved\n";
        assert_eq!(lookup(hosts, "db.lab"), Some("10.200.0.3".parse().unwrap()));
        assert_eq!(lookup(hosts, "missing.lab"), None);
        assert_eq!(lookup("garbage db.lab\n", "db.lab"), None);
    }
}
