//! The backends of one listener: their health, role and connection counts,
//! and the routing decision — which backends a new connection tries, in
//! which order — made from them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::config::{BackendAddr, Balance, Listener, RoleWanted, Routing};
use crate::health::{Change, CheckOutcome, Role, State, Tracker};

/// One backend.
pub struct Backend {
    pub addr: BackendAddr,
    /// Its addresses as last resolved (fixed for IP backends).
    addrs: Mutex<Vec<SocketAddr>>,
    /// Wakes the resolver of a DNS backend at once (it turned suspect).
    resolve_now: tokio::sync::Notify,
    label: String,
    tracker: Mutex<Tracker>,
    active: AtomicUsize,
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
pub struct BackendSet {
    backends: Vec<Backend>,
    routing: Routing,
    next: AtomicUsize,
}

/// Counts a connection to a backend while it lives.
pub struct ActiveGuard<'a> {
    backend: &'a Backend,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BackendSet {
    pub fn new(listener: &Listener) -> Self {
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
                .map(|addr| Backend {
                    addrs: Mutex::new(match addr {
                        BackendAddr::Ip(ip) => vec![*ip],
                        BackendAddr::Dns { .. } => Vec::new(),
                    }),
                    resolve_now: tokio::sync::Notify::new(),
                    addr: addr.clone(),
                    label: addr.to_string(),
                    tracker: Mutex::new(Tracker::new(rise, fall)),
                    active: AtomicUsize::new(0),
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
        self.tracker(backend).record(outcome)
    }

    pub fn connection_dead(&self, backend: usize) -> Change {
        self.tracker(backend).connection_dead()
    }

    /// Counts a new connection to `backend` until the guard drops.
    pub fn opened(&self, backend: usize) -> ActiveGuard<'_> {
        let backend = &self.backends[backend];
        backend.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard { backend }
    }

    /// Whether `role` is the one this listener routes to.
    pub fn wants(&self, role: Option<Role>) -> bool {
        role_matches(self.routing.role, role)
    }

    /// The backends a new connection should try, best first.
    pub fn route(&self) -> Result<Vec<usize>, NoBackend> {
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
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
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
}
