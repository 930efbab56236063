//! The backends of one listener: their health, role and connection counts,
//! and the routing decision — which backends a new connection tries, in
//! which order — made from them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{BackendAddr, Balance, Listener, RoleWanted, Routing};
use crate::health::{Change, CheckOutcome, Role, State, Tracker};
use crate::telemetry::metrics::BackendMeters;

/// One backend.
pub struct Backend {
    pub addr: BackendAddr,
    /// Its addresses as last resolved (fixed for IP backends).
    addrs: Mutex<Vec<SocketAddr>>,
    /// Wakes the resolver of a DNS backend at once (it turned suspect).
    resolve_now: tokio::sync::Notify,
    /// Wakes its check loop at once (a client was answered "read-only").
    check_now: tokio::sync::Notify,
    label: String,
    tracker: Mutex<Tracker>,
    active: AtomicUsize,
    /// When a session to it was last answered (the watcher's clock,
    /// `liveness::now_ms`): a check that got no answer while its sessions
    /// did is the network's loss, not the backend's death.
    heard_at_ms: AtomicU64,
    meters: BackendMeters,
}

/// What routing sees of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub state: State,
    pub role: Option<Role>,
    pub active: usize,
}

/// No backend may take a new connection; the text says why, per backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no usable backend: {0}")]
pub struct NoBackend(pub String);

/// The backends of a listener.
///
/// A backend kept across a config reload (same address as written) is the
/// same [`Backend`]: its health, role, addresses and session count carry
/// over, so a reload does not reset what the checks learned.
pub struct BackendSet {
    backends: Vec<Arc<Backend>>,
    routing: Routing,
    next: AtomicUsize,
}

/// Counts a connection to a backend while it lives.
pub struct ActiveGuard {
    backend: Arc<Backend>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let now = self.backend.active.fetch_sub(1, Ordering::Relaxed) - 1;
        self.backend.meters.active.set(now as f64);
    }
}

impl BackendSet {
    pub fn new(listener: &Listener) -> Self {
        Self::renewed(listener, None)
    }

    /// The backends of `listener`, reusing those of `previous` that it
    /// still lists (their rise and fall are updated).
    pub fn renewed(listener: &Listener, previous: Option<&BackendSet>) -> Self {
        let checked = listener.settings.check.is_some();
        let (rise, fall) = listener
            .settings
            .check
            .as_ref()
            .map(|c| (c.rise, c.fall))
            .unwrap_or((
                crate::config::defaults::rise(),
                crate::config::defaults::fall(),
            ));
        BackendSet {
            backends: listener
                .backends
                .iter()
                .map(|addr| {
                    let kept = previous
                        .and_then(|p| p.backends.iter().find(|b| &b.addr == addr))
                        .cloned();
                    if let Some(kept) = &kept {
                        kept.tracker
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .set_thresholds(rise, fall, checked);
                    }
                    kept.unwrap_or_else(|| {
                        Arc::new(Backend {
                            addrs: Mutex::new(match addr {
                                BackendAddr::Ip(ip) => vec![*ip],
                                BackendAddr::Dns { .. } => Vec::new(),
                            }),
                            resolve_now: tokio::sync::Notify::new(),
                            check_now: tokio::sync::Notify::new(),
                            addr: addr.clone(),
                            label: addr.to_string(),
                            tracker: Mutex::new(Tracker::new(rise, fall, checked)),
                            active: AtomicUsize::new(0),
                            heard_at_ms: AtomicU64::new(0),
                            meters: BackendMeters::new(&listener.name, &addr.to_string()),
                        })
                    })
                })
                .collect(),
            routing: listener.settings.routing,
            next: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Where each backend of `self` sits in `next` (by address as written);
    /// `None` for backends that `next` no longer lists.
    pub fn remap_to(&self, next: &BackendSet) -> Vec<Option<usize>> {
        self.backends
            .iter()
            .map(|b| next.backends.iter().position(|n| Arc::ptr_eq(n, b)))
            .collect()
    }

    /// Backends of `self` that `next` no longer lists: their gauges go to 0.
    pub fn retire_missing(&self, next: &BackendSet) {
        for b in &self.backends {
            if !next.backends.iter().any(|n| Arc::ptr_eq(n, b)) {
                b.meters.retire();
            }
        }
    }

    pub fn meters(&self, backend: usize) -> &BackendMeters {
        &self.backends[backend].meters
    }

    /// Sessions open to `backend` now.
    pub fn active(&self, backend: usize) -> usize {
        self.backends[backend].active.load(Ordering::Relaxed)
    }

    /// The last check's outcome, if one ran.
    pub fn last_check(&self, backend: usize) -> Option<CheckOutcome> {
        self.tracker(backend).last().cloned()
    }

    pub fn addr(&self, backend: usize) -> &BackendAddr {
        &self.backends[backend].addr
    }

    /// The backend's addresses as last resolved (empty: never resolved).
    pub fn addresses(&self, backend: usize) -> Vec<SocketAddr> {
        self.backends[backend]
            .addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stores a new address set; returns the addresses that left it.
    pub fn set_addresses(&self, backend: usize, mut new: Vec<SocketAddr>) -> Vec<SocketAddr> {
        new.sort();
        new.dedup();
        let mut addrs = self.backends[backend]
            .addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let gone = addrs.iter().filter(|a| !new.contains(a)).copied().collect();
        *addrs = new;
        gone
    }

    /// Asks the resolver of `backend` to look its name up now.
    pub fn resolve_now(&self, backend: usize) {
        self.backends[backend].resolve_now.notify_one();
    }

    /// Resolves when [`BackendSet::resolve_now`] is called for `backend`.
    pub async fn resolve_requested(&self, backend: usize) {
        self.backends[backend].resolve_now.notified().await;
    }

    /// A client of `backend` was answered "read-only" (see
    /// [`crate::health::hint`]): counted, and its check asked to run now.
    pub fn wrong_role_reply(&self, backend: usize) {
        let backend = &self.backends[backend];
        backend.meters.wrong_role_replies.increment(1);
        backend.check_now.notify_one();
    }

    /// Resolves when [`BackendSet::wrong_role_reply`] was called for
    /// `backend` (at once if it was since the last wait).
    pub async fn check_requested(&self, backend: usize) {
        self.backends[backend].check_now.notified().await;
    }

    pub fn label(&self, backend: usize) -> &str {
        &self.backends[backend].label
    }

    fn tracker(&self, backend: usize) -> std::sync::MutexGuard<'_, Tracker> {
        // A panic while holding the lock cannot leave a Tracker half-updated
        // in a way that matters more than losing health data.
        self.backends[backend]
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn state(&self, backend: usize) -> State {
        self.tracker(backend).state()
    }

    pub fn role(&self, backend: usize) -> Option<Role> {
        self.tracker(backend).role()
    }

    pub fn record(&self, backend: usize, outcome: CheckOutcome) -> Change {
        let b = &self.backends[backend];
        b.meters.check(outcome.status, outcome.latency);
        let mut t = self.tracker(backend);
        let change = t.record(outcome);
        b.meters.set_state(t.state(), t.role());
        change
    }

    pub fn connection_dead(&self, backend: usize) -> Change {
        let mut t = self.tracker(backend);
        let change = t.connection_dead(Instant::now());
        self.backends[backend].meters.set_state(t.state(), t.role());
        change
    }

    /// Brings an unchecked suspect backend back up once no session to it
    /// was found dead for `hold` (see [`Tracker::expire_suspect`]).
    pub fn expire_suspect(&self, backend: usize, hold: Duration) -> Change {
        let mut t = self.tracker(backend);
        let change = t.expire_suspect(Instant::now(), hold);
        self.backends[backend].meters.set_state(t.state(), t.role());
        change
    }

    /// A session to `backend` was answered at `at_ms` (watcher's clock).
    pub fn heard(&self, backend: usize, at_ms: u64) {
        self.backends[backend]
            .heard_at_ms
            .fetch_max(at_ms, Ordering::Relaxed);
    }

    /// When a session to `backend` was last answered (0: never seen).
    pub fn heard_at(&self, backend: usize) -> u64 {
        self.backends[backend].heard_at_ms.load(Ordering::Relaxed)
    }

    /// Counts a new connection to `backend` until the guard drops.
    pub fn opened(&self, backend: usize) -> ActiveGuard {
        let backend = self.backends[backend].clone();
        let now = backend.active.fetch_add(1, Ordering::Relaxed) + 1;
        backend.meters.active.set(now as f64);
        ActiveGuard { backend }
    }

    /// Whether `role` is the one this listener routes to.
    pub fn wants(&self, role: Option<Role>) -> bool {
        role_matches(self.routing.role, role)
    }

    /// The backends a new connection should try, best first.
    pub fn route(&self) -> Result<Vec<usize>, NoBackend> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        self.route_turn(turn)
    }

    /// Whether a new connection would find a backend, without taking a
    /// round-robin turn (for `/readyz` and `/status`).
    pub fn usable(&self) -> Result<(), NoBackend> {
        self.route_turn(0).map(drop)
    }

    fn route_turn(&self, turn: usize) -> Result<Vec<usize>, NoBackend> {
        let candidates: Vec<Candidate> = (0..self.backends.len())
            .map(|i| {
                let t = self.tracker(i);
                Candidate {
                    state: t.state(),
                    role: t.role(),
                    active: self.backends[i].active.load(Ordering::Relaxed),
                }
            })
            .collect();
        order(&candidates, &self.routing, turn).map_err(|why| {
            let per_backend = candidates
                .iter()
                .zip(&self.backends)
                .map(|(c, b)| format!("{} {}{}", b.label, c.state, role_suffix(c.role)))
                .collect::<Vec<_>>()
                .join(", ");
            NoBackend(format!("{why} ({per_backend})"))
        })
    }
}

fn role_suffix(role: Option<Role>) -> &'static str {
    match role {
        Some(Role::Primary) => " primary",
        Some(Role::Replica) => " replica",
        None => "",
    }
}

fn role_matches(wanted: RoleWanted, role: Option<Role>) -> bool {
    match wanted {
        RoleWanted::Any => true,
        RoleWanted::Primary => role == Some(Role::Primary),
        RoleWanted::Replica => role == Some(Role::Replica),
    }
}

/// The routing decision over a snapshot: usable backends (not down, with
/// the wanted role), up ones before suspect ones, in the balance order.
/// `turn` rotates round-robin.
pub fn order(
    candidates: &[Candidate],
    routing: &Routing,
    turn: usize,
) -> Result<Vec<usize>, &'static str> {
    let mut usable: Vec<usize> = (0..candidates.len())
        .filter(|&i| {
            candidates[i].state.routable() && role_matches(routing.role, candidates[i].role)
        })
        .collect();
    if usable.is_empty() {
        return Err(if routing.role == RoleWanted::Any {
            "every backend is down"
        } else {
            "no healthy backend reports the wanted role"
        });
    }
    match routing.balance {
        Balance::FirstHealthy => {}
        Balance::RoundRobin => {
            let n = usable.len();
            usable.rotate_left(turn % n);
        }
        Balance::LeastConnections => usable.sort_by_key(|&i| candidates[i].active),
    }
    // Stable: keeps the balance order within each group.
    usable.sort_by_key(|&i| candidates[i].state == State::Suspect);
    Ok(usable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(state: State, role: Option<Role>, active: usize) -> Candidate {
        Candidate {
            state,
            role,
            active,
        }
    }

    fn routing(balance: Balance, role: RoleWanted) -> Routing {
        Routing {
            balance,
            role,
            ..Routing::default()
        }
    }

    #[test]
    fn first_healthy_skips_down_and_puts_suspect_last() {
        let cands = [
            c(State::Down, None, 0),
            c(State::Suspect, None, 0),
            c(State::Up, None, 0),
        ];
        let r = routing(Balance::FirstHealthy, RoleWanted::Any);
        assert_eq!(order(&cands, &r, 0), Ok(vec![2, 1]));
    }

    #[test]
    fn role_filter_follows_the_reported_role() {
        let cands = [
            c(State::Up, Some(Role::Replica), 0),
            c(State::Up, Some(Role::Primary), 0),
            c(State::Up, None, 0),
        ];
        assert_eq!(
            order(
                &cands,
                &routing(Balance::FirstHealthy, RoleWanted::Primary),
                0
            ),
            Ok(vec![1])
        );
        assert_eq!(
            order(
                &cands,
                &routing(Balance::FirstHealthy, RoleWanted::Replica),
                0
            ),
            Ok(vec![0])
        );
        let no_primary = [
            c(State::Up, Some(Role::Replica), 0),
            c(State::Down, None, 0),
        ];
        assert!(order(
            &no_primary,
            &routing(Balance::FirstHealthy, RoleWanted::Primary),
            0
        )
        .is_err());
    }

    #[test]
    fn round_robin_rotates_and_least_connections_sorts() {
        let cands = [
            c(State::Up, None, 5),
            c(State::Up, None, 1),
            c(State::Up, None, 3),
        ];
        let rr = routing(Balance::RoundRobin, RoleWanted::Any);
        assert_eq!(order(&cands, &rr, 0), Ok(vec![0, 1, 2]));
        assert_eq!(order(&cands, &rr, 1), Ok(vec![1, 2, 0]));
        assert_eq!(order(&cands, &rr, 5), Ok(vec![2, 0, 1]));
        let lc = routing(Balance::LeastConnections, RoleWanted::Any);
        assert_eq!(order(&cands, &lc, 0), Ok(vec![1, 2, 0]));
    }

    #[test]
    fn all_down_is_refused_with_a_reason() {
        let cands = [c(State::Down, None, 0)];
        assert_eq!(
            order(&cands, &routing(Balance::FirstHealthy, RoleWanted::Any), 0),
            Err("every backend is down")
        );
    }

    #[test]
    fn asking_whether_a_backend_is_usable_takes_no_round_robin_turn() {
        let config = crate::config::parse(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n\
             backends = [\"127.0.0.1:2\", \"127.0.0.1:3\"]\n\
             [listener.routing]\nbalance = \"round_robin\"\n",
            "test",
        )
        .expect("valid config");
        let set = BackendSet::new(&config.listeners[0]);
        assert_eq!(set.route().unwrap()[0], 0);
        // /readyz and /status ask often; new clients must still alternate.
        for _ in 0..3 {
            set.usable().unwrap();
        }
        assert_eq!(set.route().unwrap()[0], 1);
        assert_eq!(set.route().unwrap()[0], 0);
    }
}
