//! The metrics catalog (documented in docs/metrics.md): every name, its
//! labels and buckets, and pre-resolved handles so the data path pays one
//! atomic add per update, not a registry lookup.
//!
//! Metrics go through the `metrics` facade. [`install`] puts the Prometheus
//! recorder in place (the `run` command does); without it every update is a
//! no-op, which is what unit tests and in-process tests get. Labels are
//! bounded by the config: listener and backend names as written, reasons,
//! states and directions from fixed vocabularies; never a client address.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::evict::{EvictReason, Leg};

pub const BUILD_INFO: &str = "pulsegate_build_info";
pub const CONFIG_GENERATION: &str = "pulsegate_config_generation";
pub const CONFIG_RELOADS: &str = "pulsegate_config_reloads_total";
pub const ACCEPTED: &str = "pulsegate_connections_accepted_total";
pub const ACTIVE: &str = "pulsegate_connections_active";
pub const REFUSED: &str = "pulsegate_connections_refused_total";
pub const SESSION_DURATION: &str = "pulsegate_session_duration_seconds";
pub const BYTES: &str = "pulsegate_bytes_total";
pub const CONNECT_DURATION: &str = "pulsegate_upstream_connect_duration_seconds";
pub const CONNECT_FAILURES: &str = "pulsegate_upstream_connect_failures_total";
pub const EVICTIONS: &str = "pulsegate_evictions_total";
pub const DETECTION: &str = "pulsegate_detection_duration_seconds";
pub const CHECKS: &str = "pulsegate_checks_total";
pub const CHECK_DURATION: &str = "pulsegate_check_duration_seconds";
pub const BACKEND_STATE: &str = "pulsegate_backend_state";
pub const BACKEND_ROLE: &str = "pulsegate_backend_role";
pub const WRONG_ROLE_REPLIES: &str = "pulsegate_backend_wrong_role_replies_total";
pub const PG_CANCELS: &str = "pulsegate_postgres_cancel_requests_total";
pub const PG_KEYS_UNREADABLE: &str = "pulsegate_postgres_cancel_keys_unreadable_total";
pub const PROXY_HEADER_REJECTED: &str = "pulsegate_proxy_header_rejected_total";
pub const BACKEND_ACTIVE: &str = "pulsegate_backend_active_connections";
pub const POOL_IDLE: &str = "pulsegate_pool_idle_connections";
pub const BACKEND_ADDRESSES: &str = "pulsegate_backend_addresses";
pub const PROBES_SENT: &str = "pulsegate_probes_sent_total";
pub const PROBES_UNANSWERED: &str = "pulsegate_probes_unanswered_total";
pub const SUSPICIONS: &str = "pulsegate_suspicions_total";
pub const CORROBORATION: &str = "pulsegate_verdict_corroboration_seconds";
pub const CORROBORATION_CONNECTS: &str = "pulsegate_corroboration_connects_total";
pub const LINK_LOSS: &str = "pulsegate_backend_link_loss_ratio";
pub const VERDICT_EXCHANGES: &str = "pulsegate_backend_verdict_exchanges";

/// Buckets for sub-second latencies (connects, checks).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for detection times: around `dead_after` + `probe_interval`.
const DETECTION_BUCKETS: &[f64] = &[
    0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets for session lifetimes: pooled connections live for hours.
const SESSION_BUCKETS: &[f64] = &[
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    NoBackend,
    ConnectFailed,
}

/// Why a client's PROXY protocol header (`accept_proxy`) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderRejection {
    /// The connection did not start like a PROXY header at all.
    Missing,
    /// It started like one but broke the grammar or a limit.
    Invalid,
    /// No complete header within `proxy_header_timeout`.
    Timeout,
    /// The client closed (or the socket failed) before a complete header.
    Closed,
}

impl HeaderRejection {
    pub const ALL: [HeaderRejection; 4] = [
        HeaderRejection::Missing,
        HeaderRejection::Invalid,
        HeaderRejection::Timeout,
        HeaderRejection::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HeaderRejection::Missing => "missing",
            HeaderRejection::Invalid => "invalid",
            HeaderRejection::Timeout => "timeout",
            HeaderRejection::Closed => "closed",
        }
    }
}

/// Installs the Prometheus recorder (once per process) and returns the
/// handle that renders the exposition.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(DETECTION.into()), DETECTION_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(SESSION_DURATION.into()),
                        SESSION_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                })
                .and_then(|b| b.install_recorder())
                .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
            describe();
            for result in ["ok", "invalid", "failed"] {
                counter!(CONFIG_RELOADS, "result" => result).increment(0);
            }
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Ok(handle)
        })
        .clone()
}

fn describe() {
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which pulsegate runs."
    );
    describe_gauge!(
        CONFIG_GENERATION,
        "Config generation: 1 at start, +1 per applied reload."
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Reload attempts by result (ok, invalid, failed)."
    );
    describe_counter!(ACCEPTED, "Client connections accepted.");
    describe_gauge!(
        ACTIVE,
        "Client connections open now (sessions, and clients waiting for an upstream)."
    );
    describe_counter!(REFUSED, "Client connections refused, by reason.");
    describe_histogram!(
        SESSION_DURATION,
        Unit::Seconds,
        "Lifetime of relayed sessions."
    );
    describe_counter!(BYTES, Unit::Bytes, "Bytes relayed, by direction.");
    describe_histogram!(
        CONNECT_DURATION,
        Unit::Seconds,
        "Time to connect to a backend (successful connects)."
    );
    describe_counter!(
        CONNECT_FAILURES,
        "Failed connects to a backend (refused, timed out, unreachable)."
    );
    describe_counter!(EVICTIONS, "Sessions evicted, by reason.");
    describe_histogram!(
        DETECTION,
        Unit::Seconds,
        "From the first unanswered probe or unACKed byte to eviction."
    );
    describe_counter!(
        CHECKS,
        "Health checks run, by result (up, not_ready, down: answered wrongly, no_answer: the connect got none, unknown: could not run on our side)."
    );
    describe_histogram!(CHECK_DURATION, Unit::Seconds, "Health check latency.");
    describe_gauge!(
        BACKEND_STATE,
        "1 for the backend's current state (up, suspect, down), 0 for the others."
    );
    describe_gauge!(
        BACKEND_ROLE,
        "1 for the backend's last reported role (primary, replica, unknown), 0 for the others."
    );
    describe_counter!(
        WRONG_ROLE_REPLIES,
        "Read-only replies from the backend (PostgreSQL 25006, Redis -READONLY, MySQL/MariaDB error 1290) seen on their way to a client, with role = primary; each asks for a check at once."
    );
    describe_counter!(
        PG_CANCELS,
        "PostgreSQL cancel requests (postgres listeners), by route: session_server (the server that runs the query) or unknown_key (routed as usual)."
    );
    describe_counter!(
        PG_KEYS_UNREADABLE,
        "PostgreSQL sessions whose cancel key could not be read (TLS or GSS encryption): their cancels are routed as usual."
    );
    describe_counter!(
        PROXY_HEADER_REJECTED,
        "Clients of an accept_proxy listener closed without an upstream connect because their PROXY header was missing, invalid, late (timeout) or cut short (closed)."
    );
    describe_gauge!(BACKEND_ACTIVE, "Sessions open to the backend.");
    describe_gauge!(
        POOL_IDLE,
        "Idle spare connections in the warm pool for the backend."
    );
    describe_gauge!(
        BACKEND_ADDRESSES,
        "The backend's addresses by use: serving (new connections go there) or held_back (its DNS name returns them, but no check has verified them in the wanted role)."
    );
    describe_counter!(
        PROBES_SENT,
        "On-demand keepalive probes armed on quiet legs."
    );
    describe_counter!(
        PROBES_UNANSWERED,
        "Keepalive probes seen unanswered (a probe debt began)."
    );
    describe_counter!(
        SUSPICIONS,
        "Legs whose own silence sufficed to ask for a verdict, by outcome: evicted, or answered after all."
    );
    describe_histogram!(
        CORROBORATION,
        Unit::Seconds,
        "From a leg's suspicion to its eviction: what corroboration added, by basis (own: its own exchanges; host: its host judged gone)."
    );
    describe_counter!(
        CORROBORATION_CONNECTS,
        "Fresh connects made to ask a suspected host, by result (answered, unanswered, unknown: failed on our side)."
    );
    describe_gauge!(
        LINK_LOSS,
        "Estimated chance that a probe or segment to the backend, or its answer, is lost."
    );
    describe_gauge!(
        VERDICT_EXCHANGES,
        "Unanswered exchanges in a row that a verdict on one connection to the backend needs at its measured loss."
    );
}

/// Records the config generation and a reload's result.
pub fn config_generation(generation: u64) {
    gauge!(CONFIG_GENERATION).set(generation as f64);
}

/// Counts a reload attempt: `ok`, `invalid` (refused config) or `failed`
/// (valid but could not be applied, e.g. a port already in use).
pub fn reload_result(result: &'static str) {
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

/// The handles of one listener.
pub struct ListenerMeters {
    pub accepted: Counter,
    pub active: Gauge,
    refused: [Counter; 3],
    pub session_duration: Histogram,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    evictions: Vec<Counter>,
    detection: Vec<Histogram>,
    probes_sent: [Counter; 2],
    probes_unanswered: [Counter; 2],
    /// Per leg: [evicted, answered].
    suspicions: [[Counter; 2]; 2],
    corroboration: [Histogram; 2],
    /// answered, unanswered, unknown.
    connects: [Counter; 3],
    /// Cancel requests: to the session's server, unknown key.
    pg_cancels: [Counter; 2],
    pg_keys_unreadable: Counter,
    /// By [`HeaderRejection::ALL`].
    proxy_header_rejected: [Counter; 4],
}

impl ListenerMeters {
    /// Registers every series of the listener, so dashboards see zeros
    /// instead of gaps before the first event.
    pub fn new(listener: &str) -> Self {
        let l = listener.to_string();
        let refused =
            |reason: &'static str| counter!(REFUSED, "listener" => l.clone(), "reason" => reason);
        let per_leg = |name: &'static str| {
            [Leg::Client, Leg::Upstream]
                .map(|leg| counter!(name, "listener" => l.clone(), "leg" => leg.as_str()))
        };
        let meters = ListenerMeters {
            accepted: counter!(ACCEPTED, "listener" => l.clone()),
            active: gauge!(ACTIVE, "listener" => l.clone()),
            refused: [
                refused("max_connections"),
                refused("no_backend"),
                refused("connect_failed"),
            ],
            session_duration: histogram!(SESSION_DURATION, "listener" => l.clone()),
            bytes_up: counter!(BYTES, "listener" => l.clone(), "direction" => "client_to_upstream"),
            bytes_down: counter!(BYTES, "listener" => l.clone(), "direction" => "upstream_to_client"),
            evictions: EvictReason::ALL
                .iter()
                .map(|r| counter!(EVICTIONS, "listener" => l.clone(), "reason" => r.as_str()))
                .collect(),
            detection: EvictReason::ALL
                .iter()
                .map(|r| histogram!(DETECTION, "listener" => l.clone(), "reason" => r.as_str()))
                .collect(),
            probes_sent: per_leg(PROBES_SENT),
            probes_unanswered: per_leg(PROBES_UNANSWERED),
            suspicions: [Leg::Client, Leg::Upstream].map(|leg| {
                ["evicted", "answered"].map(|outcome| {
                    counter!(SUSPICIONS, "listener" => l.clone(), "leg" => leg.as_str(), "outcome" => outcome)
                })
            }),
            corroboration: ["own", "host"]
                .map(|basis| histogram!(CORROBORATION, "listener" => l.clone(), "basis" => basis)),
            connects: ["answered", "unanswered", "unknown"].map(|result| {
                counter!(CORROBORATION_CONNECTS, "listener" => l.clone(), "result" => result)
            }),
            pg_cancels: ["session_server", "unknown_key"]
                .map(|route| counter!(PG_CANCELS, "listener" => l.clone(), "route" => route)),
            pg_keys_unreadable: counter!(PG_KEYS_UNREADABLE, "listener" => l.clone()),
            proxy_header_rejected: HeaderRejection::ALL.map(|r| {
                counter!(PROXY_HEADER_REJECTED, "listener" => l.clone(), "reason" => r.as_str())
            }),
        };
        for c in meters.refused.iter().chain(&meters.evictions) {
            c.increment(0);
        }
        for c in meters
            .probes_sent
            .iter()
            .chain(&meters.probes_unanswered)
            .chain(meters.suspicions.iter().flatten())
            .chain(&meters.connects)
        {
            c.increment(0);
        }
        meters.accepted.increment(0);
        meters.bytes_up.increment(0);
        meters.bytes_down.increment(0);
        meters
    }

    /// A PostgreSQL cancel request, sent to its session's server or not.
    pub fn cancel_request(&self, to_session_server: bool) {
        self.pg_cancels[usize::from(!to_session_server)].increment(1);
    }

    /// A client closed for want of a valid PROXY header.
    pub fn proxy_header_rejected(&self, why: HeaderRejection) {
        let i = HeaderRejection::ALL
            .iter()
            .position(|&r| r == why)
            .unwrap_or(0);
        self.proxy_header_rejected[i].increment(1);
    }

    /// A PostgreSQL session whose cancel key is encrypted.
    pub fn cancel_key_unreadable(&self) {
        self.pg_keys_unreadable.increment(1);
    }

    pub fn refused(&self, why: Refusal) {
        let i = match why {
            Refusal::MaxConnections => 0,
            Refusal::NoBackend => 1,
            Refusal::ConnectFailed => 2,
        };
        self.refused[i].increment(1);
    }

    /// Counts an eviction and, when the verdict came from silence, how long
    /// detection took.
    pub fn evicted(&self, reason: EvictReason, detection: Option<Duration>) {
        let i = reason_index(reason);
        self.evictions[i].increment(1);
        if let Some(d) = detection {
            self.detection[i].record(d.as_secs_f64());
        }
    }

    pub fn probe_sent(&self, leg: Leg) {
        self.probes_sent[leg_slot(leg)].increment(1);
    }

    pub fn probe_unanswered(&self, leg: Leg) {
        self.probes_unanswered[leg_slot(leg)].increment(1);
    }

    /// A suspected leg was evicted, or answered after all.
    pub fn suspicion_ended(&self, leg: Leg, evicted: bool) {
        self.suspicions[leg_slot(leg)][usize::from(!evicted)].increment(1);
    }

    /// What corroboration added to a verdict: from suspicion to eviction,
    /// on the leg's own evidence (`own`) or its host's (`host`).
    pub fn corroborated(&self, basis: &str, added: Duration) {
        let i = usize::from(basis != "own");
        self.corroboration[i].record(added.as_secs_f64());
    }

    /// Counts a round of fresh connects to a suspected host.
    pub fn corroboration_connects(&self, answered: u32, unanswered: u32, unknown: u32) {
        for (c, n) in self.connects.iter().zip([answered, unanswered, unknown]) {
            c.increment(u64::from(n));
        }
    }
}

fn reason_index(reason: EvictReason) -> usize {
    EvictReason::ALL
        .iter()
        .position(|&r| r == reason)
        .unwrap_or(0)
}

fn leg_slot(leg: Leg) -> usize {
    match leg {
        Leg::Client => 0,
        Leg::Upstream => 1,
    }
}
