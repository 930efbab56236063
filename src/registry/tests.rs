//! The registry over fake listeners: readiness gathered from each, and the
//! `/status` document's field names and words, which users rely on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::status::{BackendStatus, CheckRecord, ListenerStatus};
use super::{ListenerView, Registry};
use crate::backend::state::{CheckStatus, State};
use crate::config::CheckKind;
use crate::evict::{EvictReason, Leg, SessionLabels, Verdict};
use crate::sockopt::TcpInfo;

/// A listener that is ready or not, as told.
struct FakeListener {
    name: &'static str,
    not_ready: Option<&'static str>,
}

impl ListenerView for FakeListener {
    fn name(&self) -> &str {
        self.name
    }

    fn status(&self) -> ListenerStatus {
        ListenerStatus {
            name: self.name.to_string(),
            bind: SocketAddr::from(([127, 0, 0, 1], 6432)),
            sessions: 2,
            draining: false,
            max_connections: 100,
            health_checks: Some(CheckKind::Postgres),
            routable: self.not_ready.is_none(),
            backends: vec![BackendStatus {
                backend: "db:5432".to_string(),
                addresses: vec![SocketAddr::from(([10, 0, 0, 1], 5432))],
                held_back: vec![SocketAddr::from(([10, 0, 0, 2], 5432))],
                state: State::Suspect,
                role: None,
                active_sessions: 2,
                pool_idle: 0,
                last_check: Some(CheckRecord {
                    status: CheckStatus::NotReady,
                    latency_ms: 1.5,
                    detail: "the database system is starting up".to_string(),
                }),
            }],
            under_suspicion: Vec::new(),
        }
    }

    fn readiness(&self) -> Result<(), String> {
        self.not_ready.map_or(Ok(()), |why| Err(why.to_string()))
    }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

fn evict(registry: &Registry, client_port: u16, reason: EvictReason) {
    let labels = SessionLabels {
        listener: Arc::from("app"),
        backend: "db:5432".to_string(),
        client: SocketAddr::from(([192, 0, 2, 7], client_port)),
        upstream_local: None,
    };
    let verdict = Verdict {
        evidence: Some(TcpInfo {
            probes: 3,
            rtt_us: 250,
            ..TcpInfo::default()
        }),
        ..Verdict::decided(Leg::Upstream, reason)
    };
    registry.record_eviction(
        &labels,
        &verdict,
        Duration::from_millis(4200),
        Duration::from_millis(3100),
    );
}

#[test]
fn readiness_gathers_every_listener_s_reason() {
    let registry = Registry::new(10);
    assert_eq!(
        registry.readiness(),
        Err(vec!["no listener is running".to_string()])
    );
    let ready = FakeListener {
        name: "a",
        not_ready: None,
    };
    let stuck = FakeListener {
        name: "b",
        not_ready: Some("no backend is up"),
    };
    registry.publish(1, Arc::new(ready));
    assert_eq!(registry.readiness(), Ok(()));
    registry.publish(2, Arc::new(stuck));
    assert_eq!(
        registry.readiness(),
        Err(vec!["listener `b`: no backend is up".to_string()])
    );
    registry.withdraw(2, "b");
    registry.set_draining();
    assert_eq!(
        registry.readiness(),
        Err(vec!["draining: not accepting new connections".to_string()])
    );
}

#[test]
fn a_newer_instance_of_a_listener_is_not_withdrawn_by_the_older_one() {
    let registry = Registry::new(10);
    let listener = || {
        Arc::new(FakeListener {
            name: "a",
            not_ready: None,
        })
    };
    registry.publish(1, listener());
    registry.publish(2, listener());
    registry.withdraw(1, "a");
    assert_eq!(registry.status().listeners.len(), 1);
    registry.withdraw(2, "a");
    assert!(registry.status().listeners.is_empty());
}

/// The field names of `/status` are a contract (README, "Admin API"), and
/// its words are the metrics' words: `not_ready`, never `notready`.
#[test]
fn status_keeps_its_field_names_and_the_metrics_vocabulary() {
    let registry = Registry::new(10);
    registry.publish(
        1,
        Arc::new(FakeListener {
            name: "app",
            not_ready: None,
        }),
    );
    evict(&registry, 40000, EvictReason::ProbeUnanswered);
    registry.reload_done(Some("bad file".to_string()));
    let status = serde_json::to_value(registry.status()).expect("serializable");

    assert_eq!(
        keys(&status),
        [
            "config_generation",
            "draining",
            "last_reload",
            "listeners",
            "recent_evictions",
            "version"
        ]
    );
    assert_eq!(keys(&status["last_reload"]), ["at", "error", "ok"]);
    assert_eq!(status["last_reload"]["ok"], false);
    assert_eq!(status["last_reload"]["error"], "bad file");

    let listener = &status["listeners"][0];
    assert_eq!(
        keys(listener),
        [
            "backends",
            "bind",
            "draining",
            "health_checks",
            "max_connections",
            "name",
            "routable",
            "sessions",
            "under_suspicion"
        ]
    );
    assert_eq!(listener["bind"], "127.0.0.1:6432");
    assert_eq!(listener["health_checks"], "postgres");
    let backend = &listener["backends"][0];
    assert_eq!(
        keys(backend),
        [
            "active_sessions",
            "addresses",
            "backend",
            "held_back",
            "last_check",
            "pool_idle",
            "role",
            "state"
        ]
    );
    assert_eq!(backend["addresses"], json!(["10.0.0.1:5432"]));
    assert_eq!(backend["held_back"], json!(["10.0.0.2:5432"]));
    assert_eq!(backend["state"], "suspect");
    assert_eq!(backend["role"], "unknown");
    assert_eq!(
        backend["last_check"],
        json!({ "status": "not_ready", "latency_ms": 1.5, "detail": "the database system is starting up" })
    );

    let eviction = &status["recent_evictions"][0];
    assert_eq!(
        keys(eviction),
        [
            "age_ms",
            "at",
            "backend",
            "client",
            "dead_leg",
            "detection_ms",
            "idle_ms",
            "listener",
            "reason",
            "tcp_info"
        ]
    );
    assert_eq!(eviction["reason"], "probe_unanswered");
    assert_eq!(eviction["dead_leg"], "upstream");
    assert_eq!(eviction["client"], "192.0.2.7:40000");
    assert_eq!(eviction["age_ms"], 4200);
    assert_eq!(
        keys(&eviction["tcp_info"]),
        [
            "last_ack_recv_ms",
            "probes",
            "retransmits",
            "rto_us",
            "rtt_us",
            "total_retrans",
            "unacked"
        ]
    );
    assert_eq!(eviction["tcp_info"]["probes"], 3);
}

#[test]
fn recent_evictions_keep_the_newest_first() {
    let registry = Registry::new(2);
    for (port, reason) in [
        (1, EvictReason::Drain),
        (2, EvictReason::BackendDown),
        (3, EvictReason::HostSilent),
    ] {
        evict(&registry, port, reason);
    }
    let status = serde_json::to_value(registry.status()).expect("serializable");
    let reasons: Vec<&str> = status["recent_evictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["host_silent", "backend_down"]);

    let none_kept = Registry::new(0);
    evict(&none_kept, 1, EvictReason::Drain);
    assert!(none_kept.status().recent_evictions.is_empty());
}
