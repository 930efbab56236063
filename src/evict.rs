//! Eviction: pulsegate closing a session it judged dead, with a reason and
//! the TCP_INFO evidence that decided it, logged as one structured event.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::sockopt::TcpInfo;

/// Why a session was evicted. One vocabulary for logs and (later) metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvictReason {
    /// An idle leg did not answer its keepalive probe within `dead_after`.
    ProbeUnanswered,
    /// Data in flight was not ACKed within `dead_after`, and re-sent twice.
    RetransmitUnanswered,
    /// Every connection to its host went silent at once and fresh connects
    /// to it went unanswered: the host is gone (judged on another session's
    /// evidence, corroborated by this one's).
    HostSilent,
    /// The peer sent RST.
    PeerReset,
    /// The peer closed while pulsegate still had bytes for it.
    PeerClosed,
    /// The kernel aborted the connection (TCP_USER_TIMEOUT or keepalive).
    UserTimeout,
    /// Its backend went down (health checks) and `on_down = "evict"`.
    BackendDown,
    /// Its backend's name no longer resolves to the address it is on, and
    /// it did not answer its probe.
    AddressRemoved,
    /// Its backend was removed from the listener by a config reload.
    BackendRemoved,
    /// Still open when the drain deadline passed during shutdown.
    Drain,
    /// Any other socket error.
    SocketError,
}

impl EvictReason {
    pub const ALL: [EvictReason; 11] = [
        EvictReason::ProbeUnanswered,
        EvictReason::RetransmitUnanswered,
        EvictReason::HostSilent,
        EvictReason::PeerReset,
        EvictReason::PeerClosed,
        EvictReason::UserTimeout,
        EvictReason::BackendDown,
        EvictReason::AddressRemoved,
        EvictReason::BackendRemoved,
        EvictReason::Drain,
        EvictReason::SocketError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::ProbeUnanswered => "probe_unanswered",
            EvictReason::RetransmitUnanswered => "retransmit_unanswered",
            EvictReason::HostSilent => "host_silent",
            EvictReason::PeerReset => "peer_reset",
            EvictReason::PeerClosed => "peer_closed",
            EvictReason::UserTimeout => "user_timeout",
            EvictReason::BackendDown => "backend_down",
            EvictReason::AddressRemoved => "address_removed",
            EvictReason::BackendRemoved => "backend_removed",
            EvictReason::Drain => "drain",
            EvictReason::SocketError => "socket_error",
        }
    }

    /// Classifies a socket error seen by the relay.
    pub fn from_io(error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => EvictReason::PeerReset,
            ErrorKind::BrokenPipe => EvictReason::PeerClosed,
            ErrorKind::TimedOut => EvictReason::UserTimeout,
            _ if error.raw_os_error() == Some(libc::ETIMEDOUT) => EvictReason::UserTimeout,
            _ => EvictReason::SocketError,
        }
    }
}

impl fmt::Display for EvictReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    Client,
    Upstream,
}

impl Leg {
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Client => "client",
            Leg::Upstream => "upstream",
        }
    }
}

/// `/status` writes reasons and legs as logs and metrics do.
impl serde::Serialize for EvictReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl serde::Serialize for Leg {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for Leg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision to evict: which leg died, why, and the evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub leg: Leg,
    pub reason: EvictReason,
    /// TCP_INFO of the dead leg when it was judged (absent for drain, or
    /// when the socket was already gone).
    pub evidence: Option<TcpInfo>,
    /// For a verdict of silence: how long the leg had owed an ACK (from
    /// the first unanswered probe or unACKed byte) when it was judged.
    pub silent_for: Option<Duration>,
}

impl Verdict {
    /// A verdict decided by health, DNS, a reload or a drain, not by the
    /// session's own evidence.
    pub fn decided(leg: Leg, reason: EvictReason) -> Self {
        Verdict {
            leg,
            reason,
            evidence: None,
            silent_for: None,
        }
    }

    /// How long detection took: the watcher's own measure for verdicts of
    /// silence; for a kernel abort (TCP_USER_TIMEOUT), the time since the
    /// last ACK. `None` for verdicts not made from silence.
    pub fn detection_time(&self) -> Option<Duration> {
        match self.reason {
            EvictReason::UserTimeout => self.silent_for.or_else(|| {
                self.evidence
                    .map(|i| Duration::from_millis(u64::from(i.last_ack_recv_ms)))
            }),
            _ => self.silent_for,
        }
    }
}

/// Who the session was between, for the eviction event.
#[derive(Debug, Clone)]
pub struct SessionLabels {
    pub listener: std::sync::Arc<str>,
    pub backend: String,
    pub client: SocketAddr,
    pub upstream_local: Option<SocketAddr>,
}

/// Logs the one structured event of an eviction.
pub fn log_eviction(labels: &SessionLabels, verdict: &Verdict, age: Duration, idle: Duration) {
    let info = verdict.evidence.unwrap_or_default();
    let upstream = labels
        .upstream_local
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::warn!(
        target: "pulsegate::evict",
        event = "eviction",
        listener = %labels.listener,
        backend = %labels.backend,
        client = %labels.client,
        upstream = %upstream,
        dead_leg = verdict.leg.as_str(),
        reason = verdict.reason.as_str(),
        age_ms = age.as_millis() as u64,
        idle_ms = idle.as_millis() as u64,
        rtt_us = info.rtt_us,
        last_ack_recv_ms = info.last_ack_recv_ms,
        probes = info.probes,
        unacked = info.unacked,
        retransmits = info.retransmits,
        "evicted session: {} leg {}",
        verdict.leg,
        verdict.reason,
    );
}
