//! The metric handles of one backend of one listener, resolved once (see
//! [`crate::telemetry::metrics`] for the catalog and docs/metrics.md).

use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use super::state::{CheckStatus, Role, State};
use crate::telemetry::metrics::{
    BACKEND_ACTIVE, BACKEND_ADDRESSES, BACKEND_ROLE, BACKEND_STATE, CHECKS, CHECK_DURATION,
    CONNECT_DURATION, CONNECT_FAILURES, LINK_LOSS, POOL_IDLE, VERDICT_EXCHANGES,
    WRONG_ROLE_REPLIES,
};

/// The handles of one backend of one listener.
pub struct BackendMeters {
    pub connect_duration: Histogram,
    pub connect_failures: Counter,
    checks: [Counter; 5],
    pub check_duration: Histogram,
    state: [Gauge; 3],
    role: [Gauge; 3],
    pub active: Gauge,
    pub pool_idle: Gauge,
    pub wrong_role_replies: Counter,
    link_loss: Gauge,
    verdict_exchanges: Gauge,
    /// Addresses serving and held back (see [`super::book`]).
    addresses: [Gauge; 2],
}

const STATES: [State; 3] = [State::Up, State::Suspect, State::Down];
const ROLES: [&str; 3] = ["primary", "replica", "unknown"];

impl BackendMeters {
    pub fn new(listener: &str, backend: &str) -> Self {
        let (l, b) = (listener.to_string(), backend.to_string());
        let check = |result: &'static str| counter!(CHECKS, "listener" => l.clone(), "backend" => b.clone(), "result" => result);
        let meters = BackendMeters {
            connect_duration: histogram!(CONNECT_DURATION, "listener" => l.clone(), "backend" => b.clone()),
            connect_failures: counter!(CONNECT_FAILURES, "listener" => l.clone(), "backend" => b.clone()),
            checks: CheckStatus::ALL.map(|s| check(s.as_str())),
            check_duration: histogram!(CHECK_DURATION, "listener" => l.clone(), "backend" => b.clone()),
            state: STATES.map(|s| {
                gauge!(BACKEND_STATE, "listener" => l.clone(), "backend" => b.clone(), "state" => s.as_str())
            }),
            role: ROLES.map(|r| {
                gauge!(BACKEND_ROLE, "listener" => l.clone(), "backend" => b.clone(), "role" => r)
            }),
            active: gauge!(BACKEND_ACTIVE, "listener" => l.clone(), "backend" => b.clone()),
            pool_idle: gauge!(POOL_IDLE, "listener" => l.clone(), "backend" => b.clone()),
            wrong_role_replies: counter!(WRONG_ROLE_REPLIES, "listener" => l.clone(), "backend" => b.clone()),
            link_loss: gauge!(LINK_LOSS, "listener" => l.clone(), "backend" => b.clone()),
            verdict_exchanges: gauge!(VERDICT_EXCHANGES, "listener" => l.clone(), "backend" => b.clone()),
            addresses: ["serving", "held_back"].map(|u| {
                gauge!(BACKEND_ADDRESSES, "listener" => l.clone(), "backend" => b.clone(), "use" => u)
            }),
        };
        meters.connect_failures.increment(0);
        meters.wrong_role_replies.increment(0);
        for c in &meters.checks {
            c.increment(0);
        }
        meters.active.set(0.0);
        meters.pool_idle.set(0.0);
        meters.set_addresses(0, 0);
        meters.set_state(State::Up, None);
        meters
    }

    /// How many of the backend's addresses serve, and how many its name
    /// returns that no check has verified in the wanted role.
    pub fn set_addresses(&self, serving: usize, held_back: usize) {
        self.addresses[0].set(serving as f64);
        self.addresses[1].set(held_back as f64);
    }

    pub fn check(&self, status: CheckStatus, latency: Duration) {
        let i = CheckStatus::ALL
            .iter()
            .position(|&s| s == status)
            .unwrap_or(0);
        self.checks[i].increment(1);
        self.check_duration.record(latency.as_secs_f64());
    }

    /// The link's estimated exchange loss, and the unanswered exchanges in
    /// a row a verdict on a lone connection needs at that loss.
    pub fn set_link(&self, loss: f64, needed: u32) {
        self.link_loss.set(loss);
        self.verdict_exchanges.set(f64::from(needed));
    }

    /// Sets the state and role gauges (1 for the current value, 0 else).
    pub fn set_state(&self, state: State, role: Option<Role>) {
        for (g, s) in self.state.iter().zip(STATES) {
            g.set(if s == state { 1.0 } else { 0.0 });
        }
        let role = role.map_or("unknown", Role::as_str);
        for (g, r) in self.role.iter().zip(ROLES) {
            g.set(if r == role { 1.0 } else { 0.0 });
        }
    }

    /// The backend left the config: its gauges read 0 from now on (the
    /// exporter cannot unregister a series).
    pub fn retire(&self) {
        for g in self.state.iter().chain(&self.role) {
            g.set(0.0);
        }
        self.active.set(0.0);
        self.pool_idle.set(0.0);
        self.set_addresses(0, 0);
    }
}
