//! The `/status` document as types: what the admin API promises, field by
//! field. States, roles, check results, legs and eviction reasons are
//! written with the words the metrics and the logs use (`not_ready`,
//! `probe_unanswered`).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

use crate::backend::state::{CheckOutcome, CheckStatus, Role, State};
use crate::config::CheckKind;
use crate::evict::{EvictReason, Leg, SessionLabels, Verdict};
use crate::liveness::Suspect;
use crate::sockopt::TcpInfo;

/// `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    /// 1 at start, +1 per applied reload.
    pub config_generation: u64,
    pub draining: bool,
    /// `None` until the first reload.
    pub last_reload: Option<ReloadRecord>,
    pub listeners: Vec<ListenerStatus>,
    /// Newest first.
    pub recent_evictions: Vec<EvictionRecord>,
}

/// How the last reload went.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadRecord {
    /// RFC 3339, milliseconds.
    pub at: String,
    pub ok: bool,
    /// Why it changed nothing, when it did not apply.
    pub error: Option<String>,
}

/// One running listener (one that drains is still listed).
#[derive(Debug, Clone, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    /// The address it is bound to: with port 0 in the config, the port the
    /// kernel chose.
    pub bind: SocketAddr,
    /// Client connections open now.
    pub sessions: usize,
    pub draining: bool,
    pub max_connections: u32,
    /// The check's protocol, when `[listener.check]` is set.
    pub health_checks: Option<CheckKind>,
    /// Whether a new client would find a backend now.
    pub routable: bool,
    pub backends: Vec<BackendStatus>,
    /// Legs waiting for their verdict's corroboration, longest silent first.
    pub under_suspicion: Vec<SuspectStatus>,
}

/// One backend of a listener.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    /// As written in the config.
    pub backend: String,
    /// Where new connections go: what its name resolves to now, or (a DNS
    /// backend routed by role) the addresses a check verified in the role.
    pub addresses: Vec<SocketAddr>,
    /// A DNS backend routed by role: addresses its name returns that are
    /// not used (not yet checked, or checked in another role).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held_back: Vec<SocketAddr>,
    pub state: State,
    /// `unknown` until a check that learns roles has answered.
    #[serde(serialize_with = "role_or_unknown")]
    pub role: Option<Role>,
    pub active_sessions: usize,
    pub pool_idle: usize,
    pub last_check: Option<CheckRecord>,
}

/// A backend's last health check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRecord {
    pub status: CheckStatus,
    pub latency_ms: f64,
    pub detail: String,
}

impl From<&CheckOutcome> for CheckRecord {
    fn from(c: &CheckOutcome) -> Self {
        CheckRecord {
            status: c.status,
            latency_ms: c.latency.as_secs_f64() * 1000.0,
            detail: c.detail.clone(),
        }
    }
}

/// A leg whose own silence asks for a verdict, while it waits for
/// corroboration: what it owes, what it lost, what it waits for.
#[derive(Debug, Clone, Serialize)]
pub struct SuspectStatus {
    pub client: Option<SocketAddr>,
    pub backend: String,
    pub leg: Leg,
    pub reason: EvictReason,
    pub silent_ms: u64,
    pub exchanges_lost: u32,
    pub exchanges_needed: u32,
    pub waiting_for: &'static str,
    pub tcp_info: TcpInfoRecord,
}

impl From<&Suspect> for SuspectStatus {
    fn from(s: &Suspect) -> Self {
        SuspectStatus {
            client: s.client,
            backend: s.backend.clone(),
            leg: s.leg,
            reason: s.reason,
            silent_ms: millis(s.silent_for),
            exchanges_lost: s.lost,
            exchanges_needed: s.needed,
            waiting_for: s.waiting_for,
            tcp_info: TcpInfoRecord::from(&s.evidence),
        }
    }
}

/// The `TCP_INFO` figures a verdict is judged on.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TcpInfoRecord {
    pub rtt_us: u32,
    pub rto_us: u32,
    pub last_ack_recv_ms: u32,
    pub probes: u8,
    pub unacked: u32,
    pub retransmits: u8,
    pub total_retrans: u32,
}

impl From<&TcpInfo> for TcpInfoRecord {
    fn from(i: &TcpInfo) -> Self {
        TcpInfoRecord {
            rtt_us: i.rtt_us,
            rto_us: i.rto_us,
            last_ack_recv_ms: i.last_ack_recv_ms,
            probes: i.probes,
            unacked: i.unacked,
            retransmits: i.retransmits,
            total_retrans: i.total_retrans,
        }
    }
}

/// One eviction, as `/status` keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct EvictionRecord {
    /// RFC 3339, milliseconds.
    pub at: String,
    pub listener: String,
    pub backend: String,
    pub client: SocketAddr,
    pub dead_leg: Leg,
    pub reason: EvictReason,
    pub age_ms: u64,
    pub idle_ms: u64,
    /// From the first unanswered probe or unACKed byte to the verdict.
    pub detection_ms: Option<u64>,
    /// The dead leg's figures when the verdict was reached.
    pub tcp_info: Option<TcpInfoRecord>,
}

impl EvictionRecord {
    pub fn new(labels: &SessionLabels, verdict: &Verdict, age: Duration, idle: Duration) -> Self {
        EvictionRecord {
            at: timestamp(SystemTime::now()),
            listener: labels.listener.to_string(),
            backend: labels.backend.clone(),
            client: labels.client,
            dead_leg: verdict.leg,
            reason: verdict.reason,
            age_ms: millis(age),
            idle_ms: millis(idle),
            detection_ms: verdict.detection_time().map(millis),
            tcp_info: verdict.evidence.as_ref().map(TcpInfoRecord::from),
        }
    }
}

pub(super) fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn role_or_unknown<S: Serializer>(role: &Option<Role>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(role.map_or("unknown", Role::as_str))
}
