//! The routing decision: which backends a new connection tries, in which
//! order. Usable backends are those not down and, when `role` asks for
//! one, reporting that role; up ones come before suspect ones, each group
//! in the `balance` order (configured order, round-robin, or fewest
//! connections).
//!
//! [`order`] is the pure decision over a snapshot; a listener generation's
//! [`Router`] takes the snapshot from its [`BackendSet`] and keeps the
//! round-robin turn.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::state::{Role, State};
use crate::backend::{BackendId, BackendSet};
use crate::config::{Balance, RoleWanted, Routing};

/// What routing sees of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub state: State,
    pub role: Option<Role>,
    pub active: usize,
}

/// No backend may take a new connection; the text says why, per backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no usable backend: {0}")]
pub struct NoBackend(pub String);

/// The routing of one listener generation.
pub struct Router {
    routing: Routing,
    /// The round-robin turn.
    next: AtomicUsize,
}

impl Router {
    pub fn new(routing: Routing) -> Self {
        Router {
            routing,
            next: AtomicUsize::new(0),
        }
    }

    /// The backends a new connection should try, best first.
    pub fn route(&self, backends: &BackendSet) -> Result<Vec<BackendId>, NoBackend> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        self.route_turn(backends, turn)
    }

    /// Whether a new connection would find a backend, without taking a
    /// round-robin turn (for `/readyz` and `/status`).
    pub fn usable(&self, backends: &BackendSet) -> Result<(), NoBackend> {
        self.route_turn(backends, 0).map(drop)
    }

    fn route_turn(&self, backends: &BackendSet, turn: usize) -> Result<Vec<BackendId>, NoBackend> {
        let ids: Vec<BackendId> = backends.ids().collect();
        let standings: Vec<Standing> = ids
            .iter()
            .map(|&id| {
                let (state, role) = backends.state_and_role(id);
                Standing {
                    state,
                    role,
                    active: backends.active(id),
                }
            })
            .collect();
        match order(&standings, &self.routing, turn) {
            Ok(order) => Ok(order.into_iter().map(|i| ids[i]).collect()),
            Err(why) => {
                let per_backend = standings
                    .iter()
                    .zip(&ids)
                    .map(|(s, &id)| {
                        format!("{} {}{}", backends.label(id), s.state, role_suffix(s.role))
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                Err(NoBackend(format!("{why} ({per_backend})")))
            }
        }
    }
}

/// Whether a backend reporting `role` is one `routing` sends clients to.
pub fn wants(routing: &Routing, role: Option<Role>) -> bool {
    role_matches(routing.role, role)
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
    standings: &[Standing],
    routing: &Routing,
    turn: usize,
) -> Result<Vec<usize>, &'static str> {
    let mut usable: Vec<usize> = (0..standings.len())
        .filter(|&i| standings[i].state.routable() && role_matches(routing.role, standings[i].role))
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
        Balance::LeastConnections => usable.sort_by_key(|&i| standings[i].active),
    }
    // Stable: keeps the balance order within each group.
    usable.sort_by_key(|&i| standings[i].state == State::Suspect);
    Ok(usable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(state: State, role: Option<Role>, active: usize) -> Standing {
        Standing {
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
        let listener = &config.listeners[0];
        let set = BackendSet::new(listener);
        let router = Router::new(listener.settings.routing);
        let first = |order: Vec<BackendId>| order[0].index();
        assert_eq!(first(router.route(&set).unwrap()), 0);
        // /readyz and /status ask often; new clients must still alternate.
        for _ in 0..3 {
            router.usable(&set).unwrap();
        }
        assert_eq!(first(router.route(&set).unwrap()), 1);
        assert_eq!(first(router.route(&set).unwrap()), 0);
    }
}
