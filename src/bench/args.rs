//! The `bench failover` command line, its validation, and the plan it
//! resolves to (every default filled in, the pulsegate config written).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use super::{servers, BenchError};

/// What the clients speak, and so which backends run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// A 32-byte line echoed by `pulsegate lab-backend` (nothing to install);
    /// pulsegate checks it with `kind = "tcp"`.
    Echo,
    /// Alternating `SET` (a write) and `GET` against two `redis-server`s
    /// (`kind = "redis"` check).
    Redis,
    /// Alternating an `INSERT` (a write) and `SELECT 1` (simple queries)
    /// against two PostgreSQL servers made with
    /// `initdb` (`kind = "postgres"` check).
    Postgres,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Echo => "echo",
            WorkloadKind::Redis => "redis",
            WorkloadKind::Postgres => "postgres",
        }
    }

    /// The `[listener.check]` kind that fits the protocol.
    fn check_kind(self) -> &'static str {
        match self {
            WorkloadKind::Echo => "tcp",
            WorkloadKind::Redis => "redis",
            WorkloadKind::Postgres => "postgres",
        }
    }
}

/// What happens to the primary backend at `--fault-at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FaultKind {
    /// Its port is blackholed both ways (iptables DROP), then it is
    /// SIGKILLed: its FIN/RST never arrive, every connection is half-open.
    Blackhole,
    /// Only packets *to* its port are dropped; it stays alive and its
    /// replies still flow (a one-way partition).
    BlackholeOneway,
    /// SIGSTOP: the process freezes, its kernel still ACKs.
    Freeze,
    /// SIGKILL without DROP: the kernel delivers FIN/RST.
    Kill,
    /// SIGKILL, then started again after `--restart-after`.
    Restart,
    /// `--loss` % of the packets on the link to the backends are lost at
    /// random (`--loss-direction`): every backend stays alive.
    Loss,
    /// The link to the backends gets `--latency` (± `--jitter`) slower in
    /// each direction: every backend stays alive.
    Latency,
    /// The primary is partitioned away (both directions) for `--flap-for`,
    /// then reachable again; it stays alive.
    Flap,
    /// One established connection to the primary per route (a proxy's
    /// upstream connection, or a direct client's) is silently dropped, as
    /// a NAT that forgot it; the primary and every other connection live.
    Flow,
    /// The roles swap with no connection closed: the secondary (a replica
    /// from the start) becomes the primary and the primary takes no more
    /// writes. Redis: `REPLICAOF NO ONE` on the replica, `REPLICAOF` on the
    /// primary. PostgreSQL (the secondary a streaming replica): the primary
    /// fenced read-only (`default_transaction_read_only`), the replica
    /// promoted. pulsegate runs with `role = "primary"`.
    RoleFlip,
    /// A managed failover: the old primary is taken out (silenced on the
    /// link for echo; demoted for redis and postgres, as `role-flip`) and
    /// the backends' name is re-pointed to the secondary's address (the
    /// hosts file in the namespace). Every route is given the name: the
    /// proxies in their configs, direct clients resolve it at each connect.
    DnsMove,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Blackhole => "blackhole",
            FaultKind::BlackholeOneway => "blackhole-oneway",
            FaultKind::Freeze => "freeze",
            FaultKind::Kill => "kill",
            FaultKind::Restart => "restart",
            FaultKind::Loss => "loss",
            FaultKind::Latency => "latency",
            FaultKind::Flap => "flap",
            FaultKind::Flow => "flow",
            FaultKind::RoleFlip => "role-flip",
            FaultKind::DnsMove => "dns-move",
        }
    }

    /// Every fault, in the order the matrix runs them.
    pub const ALL: [FaultKind; 11] = [
        FaultKind::Blackhole,
        FaultKind::BlackholeOneway,
        FaultKind::Freeze,
        FaultKind::Kill,
        FaultKind::Restart,
        FaultKind::Loss,
        FaultKind::Latency,
        FaultKind::Flap,
        FaultKind::Flow,
        FaultKind::RoleFlip,
        FaultKind::DnsMove,
    ];

    /// Whether `workload` can have this fault (the roles need servers
    /// that have roles).
    pub fn fits(self, workload: WorkloadKind) -> bool {
        self != FaultKind::RoleFlip || workload != WorkloadKind::Echo
    }

    /// Which sessions the fault may rightly end: a session that ends
    /// outside this is a false eviction (see [`Expected`]).
    pub(crate) fn expected(self) -> Expected {
        match self {
            FaultKind::Loss | FaultKind::Latency => Expected::Nothing,
            FaultKind::Flow => Expected::OneFlow,
            _ => Expected::PrimarySessions,
        }
    }
}

/// What a fault may rightly cost the sessions it touches, to tell
/// evictions it explains from false ones. Sessions that end before the
/// fault are always false evictions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expected {
    /// Every backend stays alive and reachable (loss, latency): every
    /// session that ends is a false eviction.
    Nothing,
    /// One flow per route is dropped: that one session may end.
    OneFlow,
    /// The primary is dead, frozen, partitioned or demoted: its sessions
    /// may end after the fault.
    PrimarySessions,
}

/// How a client reaches the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum RouteKind {
    /// Through pulsegate, which fails over.
    Pulsegate,
    /// Through HAProxy (Debian package `haproxy`), with a config the bench
    /// writes for the same goal (or `--haproxy-config`).
    Haproxy,
    /// Through PgBouncer (Debian package `pgbouncer`) in session mode, in
    /// front of the primary (it does not fail over); postgres workload only.
    Pgbouncer,
    /// Straight to the primary, as an application without a proxy.
    Direct,
}

impl RouteKind {
    /// How many routes there are (the size of per-route arrays).
    pub const COUNT: usize = 4;

    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Pulsegate => "pulsegate",
            RouteKind::Haproxy => "haproxy",
            RouteKind::Pgbouncer => "pgbouncer",
            RouteKind::Direct => "direct",
        }
    }

    /// Its slot in per-route arrays.
    pub fn index(self) -> usize {
        match self {
            RouteKind::Pulsegate => 0,
            RouteKind::Haproxy => 1,
            RouteKind::Pgbouncer => 2,
            RouteKind::Direct => 3,
        }
    }
}

/// Which packets `--fault loss` drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LossDirection {
    /// Both ways.
    Both,
    /// Only packets towards the backends.
    ToBackend,
    /// Only packets from the backends.
    FromBackend,
}

/// `pulsegate bench failover`: a load test of failover.
///
/// In a private network namespace (needs root), two backends run (primary,
/// secondary), pulsegate sits in front of them in failover order, and
/// `--clients` clients per path do request/response through pulsegate and,
/// at the same time, directly to the primary. At `--fault-at` the primary
/// fails. Every request's start, latency and outcome is recorded; the
/// summary, `report.json` and `timeline.svg` (in `--out`) show the time to
/// detect, the time until every client was served again, failed and hung
/// requests, and latency percentiles before, during and after the fault.
#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// The protocol and backends: echo (built in), redis (redis-server),
    /// postgres (PostgreSQL server binaries).
    #[arg(long, value_enum, default_value_t = WorkloadKind::Echo)]
    pub workload: WorkloadKind,
    /// What happens to the primary.
    #[arg(long, value_enum, default_value_t = FaultKind::Blackhole)]
    pub fault: FaultKind,
    /// The routes measured side by side, each with its own clients, on the
    /// same backends and the same fault: pulsegate, haproxy, pgbouncer,
    /// direct.
    /// [default: pulsegate,direct (postgres: pulsegate,pgbouncer,direct);
    /// with --matrix also haproxy]
    #[arg(long, value_enum, value_delimiter = ',')]
    pub via: Vec<RouteKind>,
    /// Run every fault of --faults in turn (each in a fresh lab, with the
    /// same settings) and write one summary table of fault × route
    /// (DIR/matrix.md and DIR/matrix.json), each run's files in `DIR/<fault>`.
    #[arg(long)]
    pub matrix: bool,
    /// With --matrix: the faults to run [default: every fault the workload
    /// can have].
    #[arg(long, value_enum, value_delimiter = ',', requires = "matrix")]
    pub faults: Vec<FaultKind>,
    /// With --via haproxy: run HAProxy with this config instead of the one
    /// the bench writes (it must listen on 127.0.0.1:6433 and use the
    /// backends the run prints).
    #[arg(long, value_name = "FILE")]
    pub haproxy_config: Option<PathBuf>,
    /// With --fault loss: the percentage of packets lost (0 to 100).
    #[arg(long, default_value_t = 2.0)]
    pub loss: f64,
    /// With --fault loss: which way packets are lost.
    #[arg(long, value_enum, default_value_t = LossDirection::Both)]
    pub loss_direction: LossDirection,
    /// With --fault latency: the delay added each way.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// With --fault latency: each packet's delay varies by ± this much.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub jitter: Duration,
    /// With --fault flap: how long the primary stays partitioned away.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub flap_for: Duration,
    /// Concurrent clients per route.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub clients: u32,
    /// How long the load runs, e.g. 20s [default: 20s; with --matrix 8s
    /// per fault].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// When the fault is injected, counted from the start of the load
    /// [default: a third of --duration].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub fault_at: Option<Duration>,
    /// With --fault restart: how long the primary stays dead.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub restart_after: Duration,
    /// Requests per second per client (paced); 0 sends the next request as
    /// soon as the previous one is answered.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub rate: u32,
    /// A request not answered within this long counts as hung, and its
    /// client reconnects.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub hang_bound: Duration,
    /// pulsegate's `liveness.probe_interval` (whole seconds).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,
    /// pulsegate's `liveness.dead_after` (at least 1s).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub dead_after: Duration,
    /// pulsegate's health check interval (and timeout); fall 2, rise 2.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub check_interval: Duration,
    /// pulsegate's `routing.down_grace`: how long busy sessions of a down
    /// backend may finish before they are evicted.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub down_grace: Duration,
    /// Directory for report.json, timeline.svg and the pulsegate config.
    #[arg(long, value_name = "DIR", default_value = "bench-failover")]
    pub out: PathBuf,
    /// Where to write the JSON report [default: DIR/report.json].
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Where to write the SVG timeline [default: DIR/timeline.svg].
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,
    /// Also write every request (path, client, start, latency, outcome) to
    /// DIR/requests.csv.
    #[arg(long)]
    pub csv: bool,
    /// No progress bar (for CI logs); the summary is still printed.
    #[arg(long)]
    pub quiet: bool,
}

/// pulsegate's listener inside the lab (the near namespace).
pub(crate) const PROXY_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 6432);
/// HAProxy's listener inside the lab.
pub(crate) const HAPROXY_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 6433);
/// The name every route is given for the backends with `--fault
/// dns-move` (resolved through the lab's hosts file).
pub(crate) const DNS_NAME: &str = "db.pulsegate.lab";

/// PgBouncer's listener inside the lab.
pub(crate) const PGBOUNCER_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 6434);

/// How long a run's load lasts by default, alone and in a matrix.
const DURATION: Duration = Duration::from_secs(20);
const MATRIX_DURATION: Duration = Duration::from_secs(8);

/// Every setting of one run, validated.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub workload: WorkloadKind,
    pub fault: FaultKind,
    /// The routes, each once, in the order given.
    pub routes: Vec<RouteKind>,
    pub haproxy_config: Option<PathBuf>,
    /// `--loss` as a fraction (0.02 for 2 %).
    pub loss: f64,
    pub loss_direction: LossDirection,
    pub latency: Duration,
    pub jitter: Duration,
    pub flap_for: Duration,
    pub clients: u32,
    pub duration: Duration,
    pub fault_at: Duration,
    pub restart_after: Duration,
    /// Time between request starts of one client; zero for a closed loop.
    pub pace: Duration,
    pub rate: u32,
    pub hang_bound: Duration,
    pub probe_interval: Duration,
    pub dead_after: Duration,
    pub check_interval: Duration,
    pub down_grace: Duration,
    pub out: PathBuf,
    pub json: PathBuf,
    pub svg: PathBuf,
    pub csv: Option<PathBuf>,
    pub quiet: bool,
    pub primary: SocketAddr,
    pub secondary: SocketAddr,
}

impl Plan {
    /// Fills in defaults and checks the flags against each other and
    /// against pulsegate's own config rules; [`BenchError::Args`] names the
    /// flag at fault.
    pub fn from_args(args: &FailoverArgs) -> Result<Plan, BenchError> {
        Plan::for_fault(args, args.fault)
    }

    /// The plan of one run of `fault` with the settings of `args` (one
    /// row of a matrix).
    pub fn for_fault(args: &FailoverArgs, fault: FaultKind) -> Result<Plan, BenchError> {
        let duration = args.duration.unwrap_or(if args.matrix {
            MATRIX_DURATION
        } else {
            DURATION
        });
        let fault_at = args.fault_at.unwrap_or(duration / 3);
        let postgres = args.workload == WorkloadKind::Postgres;
        let via: &[RouteKind] = match (args.via.is_empty(), args.matrix, postgres) {
            (false, _, _) => &args.via,
            (true, false, false) => &[RouteKind::Pulsegate, RouteKind::Direct],
            (true, false, true) => &[
                RouteKind::Pulsegate,
                RouteKind::Pgbouncer,
                RouteKind::Direct,
            ],
            (true, true, false) => &[RouteKind::Pulsegate, RouteKind::Haproxy, RouteKind::Direct],
            (true, true, true) => &[
                RouteKind::Pulsegate,
                RouteKind::Haproxy,
                RouteKind::Pgbouncer,
                RouteKind::Direct,
            ],
        };
        let out = if args.matrix {
            args.out.join(fault.as_str())
        } else {
            args.out.clone()
        };
        let [primary, secondary] = servers::backend_addrs(args.workload);
        let mut routes = Vec::new();
        for &route in via {
            if !routes.contains(&route) {
                routes.push(route);
            }
        }
        let plan = Plan {
            workload: args.workload,
            fault,
            routes,
            haproxy_config: args.haproxy_config.clone(),
            loss: args.loss / 100.0,
            loss_direction: args.loss_direction,
            latency: args.latency,
            jitter: args.jitter,
            flap_for: args.flap_for,
            clients: args.clients,
            duration,
            fault_at,
            restart_after: args.restart_after,
            pace: match args.rate {
                0 => Duration::ZERO,
                rate => Duration::from_secs(1) / rate,
            },
            rate: args.rate,
            hang_bound: args.hang_bound,
            probe_interval: args.probe_interval,
            dead_after: args.dead_after,
            check_interval: args.check_interval,
            down_grace: args.down_grace,
            json: match (&args.json, args.matrix) {
                (Some(json), false) => json.clone(),
                _ => out.join("report.json"),
            },
            svg: match (&args.svg, args.matrix) {
                (Some(svg), false) => svg.clone(),
                _ => out.join("timeline.svg"),
            },
            csv: args.csv.then(|| out.join("requests.csv")),
            out,
            quiet: args.quiet,
            primary,
            secondary,
        };
        plan.check()?;
        Ok(plan)
    }

    fn check(&self) -> Result<(), BenchError> {
        let bad = |msg: String| Err(BenchError::Args(msg));
        let s = |d: Duration| humantime::format_duration(d).to_string();
        if self.duration < Duration::from_secs(1) {
            return bad(format!(
                "--duration {} is too short to see a failover; use at least 1s (e.g. 6s for a smoke run)",
                s(self.duration)
            ));
        }
        if self.fault_at.is_zero() || self.fault_at >= self.duration {
            return bad(format!(
                "--fault-at {} must lie inside the run (after 0s, before --duration {})",
                s(self.fault_at),
                s(self.duration)
            ));
        }
        if self.routes.is_empty() {
            return bad("--via names no route; use e.g. --via pulsegate,haproxy,direct".into());
        }
        if self.haproxy_config.is_some() && !self.routes.contains(&RouteKind::Haproxy) {
            return bad("--haproxy-config is only used with --via ...,haproxy,...".into());
        }
        if self.routes.contains(&RouteKind::Pgbouncer) && self.workload != WorkloadKind::Postgres {
            return bad(format!(
                "--via pgbouncer needs --workload postgres (PgBouncer speaks PostgreSQL only; \
                 this run's workload is {})",
                self.workload.as_str()
            ));
        }
        if !self.fault.fits(self.workload) {
            return bad(format!(
                "--fault {} needs servers with roles: use --workload redis or postgres (the {} \
                 workload has none)",
                self.fault.as_str(),
                self.workload.as_str()
            ));
        }
        if !(self.loss > 0.0 && self.loss <= 1.0) {
            return bad(format!(
                "--loss {} must be a percentage above 0 and at most 100, e.g. 2",
                self.loss * 100.0
            ));
        }
        if self.latency.is_zero() || self.jitter > self.latency {
            return bad(format!(
                "--latency {} must be above zero and --jitter {} at most as large",
                s(self.latency),
                s(self.jitter)
            ));
        }
        if self.fault == FaultKind::Flap
            && (self.flap_for.is_zero() || self.fault_at + self.flap_for >= self.duration)
        {
            return bad(format!(
                "--flap-for {} must be above zero and heal the partition before the run ends \
                 (--fault-at {} + --flap-for < --duration {})",
                s(self.flap_for),
                s(self.fault_at),
                s(self.duration)
            ));
        }
        if self.hang_bound.is_zero() {
            return bad("--hang-bound must be above zero, e.g. 5s".into());
        }
        if self.fault == FaultKind::Restart
            && (self.restart_after.is_zero() || self.fault_at + self.restart_after >= self.duration)
        {
            return bad(format!(
                "--restart-after {} must be above zero and restart the primary before the run ends \
                 (--fault-at {} + --restart-after < --duration {})",
                s(self.restart_after),
                s(self.fault_at),
                s(self.duration)
            ));
        }
        crate::config::parse(&self.proxy_toml(), "bench-failover.toml").map_err(|e| {
            BenchError::Args(format!(
                "--probe-interval, --dead-after, --check-interval or --down-grace make an \
                 invalid pulsegate config: {e}"
            ))
        })?;
        Ok(())
    }

    /// Whether the routes are given the backends' name ([`DNS_NAME`])
    /// instead of their addresses.
    pub fn by_name(&self) -> bool {
        self.fault == FaultKind::DnsMove
    }

    /// Whether the servers have roles that the fault changes (pulsegate
    /// then runs with `role = "primary"`).
    pub fn roles_change(&self) -> bool {
        matches!(self.fault, FaultKind::RoleFlip | FaultKind::DnsMove)
            && self.workload != WorkloadKind::Echo
    }

    /// The primary as pulsegate's log names it.
    pub fn primary_label(&self) -> String {
        if self.by_name() {
            format!("{DNS_NAME}:{}", self.primary.port())
        } else {
            self.primary.to_string()
        }
    }

    /// The lab's hosts file with the name on `addr`.
    pub fn hosts(&self, addr: SocketAddr) -> String {
        format!("127.0.0.1 localhost\n{} {DNS_NAME}\n", addr.ip())
    }

    /// The fault in words, with its parameters.
    pub fn describe_fault(&self) -> String {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        match self.fault {
            FaultKind::Blackhole => "the primary silenced both ways, then killed".into(),
            FaultKind::BlackholeOneway => "packets to the primary dropped; it lives".into(),
            FaultKind::Freeze => "the primary frozen (SIGSTOP)".into(),
            FaultKind::Kill => "the primary killed (its kernel resets)".into(),
            FaultKind::Restart => format!(
                "the primary killed, restarted after {}",
                d(self.restart_after)
            ),
            FaultKind::Loss => format!(
                "{} % random loss {} on the link to the backends",
                self.loss * 100.0,
                match self.loss_direction {
                    LossDirection::Both => "both ways",
                    LossDirection::ToBackend => "towards them",
                    LossDirection::FromBackend => "from them",
                }
            ),
            FaultKind::Latency => format!(
                "{} ± {} added each way on the link to the backends",
                d(self.latency),
                d(self.jitter)
            ),
            FaultKind::Flap => format!("the primary partitioned away for {}", d(self.flap_for)),
            FaultKind::Flow => "one connection to the primary per route silently dropped".into(),
            FaultKind::DnsMove => format!(
                "the name {DNS_NAME} moved to the secondary, the old primary {}",
                match self.workload {
                    WorkloadKind::Echo => "silenced on the link",
                    _ => "demoted (no connection closed)",
                }
            ),
            FaultKind::RoleFlip => match self.workload {
                WorkloadKind::Postgres => {
                    "the primary fenced read-only, its streaming replica promoted".into()
                }
                _ => "the replica promoted, the primary made its replica".into(),
            },
        }
    }

    /// pulsegate's config for the run: both backends in failover order, a
    /// health check that fits the workload, the liveness settings from the
    /// flags, pulsegate's defaults for everything else.
    pub fn proxy_toml(&self) -> String {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        format!(
            "# Written by `pulsegate bench failover`: the config the run measured.\n\
             [[listener]]\n\
             name = \"bench\"\n\
             bind = \"{bind}\"\n\
             {backends}\
             \n\
             [listener.liveness]\n\
             probe_interval = \"{probe}\"\n\
             dead_after = \"{dead}\"\n\
             \n\
             [listener.check]\n\
             kind = \"{kind}\"\n\
             {check_user}\
             interval = \"{check}\"\n\
             timeout = \"{check}\"\n\
             jitter = \"0s\"\n\
             rise = 2\n\
             fall = 2\n\
             \n\
             [listener.routing]\n\
             balance = \"first_healthy\"\n\
             on_down = \"evict\"\n\
             down_grace = \"{grace}\"\n\
             {role}",
            bind = PROXY_ADDR,
            backends = if self.by_name() {
                format!(
                    "backends = [\"{}\"]   # a name that a failover moves\n\
                     resolve_interval = \"1s\"\n",
                    self.primary_label()
                )
            } else {
                format!(
                    "backends = [\"{}\", \"{}\"]   # failover order\n",
                    self.primary, self.secondary
                )
            },
            probe = d(self.probe_interval),
            dead = d(self.dead_after),
            kind = self.workload.check_kind(),
            check = d(self.check_interval),
            grace = d(self.down_grace),
            check_user = if self.roles_change() && self.workload == WorkloadKind::Postgres {
                // A login, so the check learns the role.
                format!("user = \"{}\"\n", servers::PG_USER)
            } else {
                String::new()
            },
            role = if self.roles_change() {
                "role = \"primary\"   # only the server whose check says primary\n"
            } else {
                ""
            },
        )
    }
}

/// `pulsegate bench failover ARGV` parsed, for the bench's unit tests.
#[cfg(test)]
pub(crate) fn parse(argv: &[&str]) -> Result<FailoverArgs, clap::Error> {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FailoverArgs,
    }
    Cli::try_parse_from(std::iter::once("failover").chain(argv.iter().copied())).map(|c| c.args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(argv: &[&str]) -> Result<Plan, BenchError> {
        let args = parse(argv).map_err(|e| BenchError::Args(e.to_string()))?;
        Plan::from_args(&args)
    }

    #[test]
    fn defaults_resolve_and_make_a_valid_proxy_config() {
        let p = plan(&[]).unwrap();
        assert_eq!(p.workload, WorkloadKind::Echo);
        assert_eq!(p.fault, FaultKind::Blackhole);
        assert_eq!(p.clients, 64);
        assert_eq!(p.fault_at, Duration::from_secs(20) / 3);
        assert_eq!(p.pace, Duration::from_millis(20));
        assert_eq!(p.json, PathBuf::from("bench-failover/report.json"));
        let config = crate::config::parse(&p.proxy_toml(), "t.toml").unwrap();
        assert_eq!(
            config.listeners[0].settings.liveness.dead_after,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn inconsistent_flags_are_refused_with_the_flag_named() {
        let err = |argv: &[&str]| match plan(argv) {
            Err(BenchError::Args(msg)) => msg,
            other => panic!("{argv:?} gave {other:?}"),
        };
        assert!(err(&["--duration", "6s", "--fault-at", "6s"]).contains("--fault-at"));
        assert!(err(&["--hang-bound", "0s"]).contains("--hang-bound"));
        assert!(err(&[
            "--fault",
            "restart",
            "--duration",
            "4s",
            "--fault-at",
            "2s",
            "--restart-after",
            "3s"
        ])
        .contains("--restart-after"));
        assert!(err(&["--probe-interval", "1500ms"]).contains("probe_interval"));
        assert!(err(&["--clients", "0"]).contains("clients"));
        assert!(plan(&["--rate", "0", "--duration", "6s", "--fault-at", "2s"]).is_ok());
    }
}
