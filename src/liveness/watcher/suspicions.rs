//! The legs of a listener under suspicion, as `GET /status` shows them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::evict::{EvictReason, Leg};
use crate::sockopt::TcpInfo;

/// A leg whose own evidence suffices to ask for a verdict, as `/status`
/// shows it while it waits for corroboration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspect {
    pub client: Option<SocketAddr>,
    pub backend: String,
    pub leg: Leg,
    pub reason: EvictReason,
    pub silent_for: Duration,
    /// Its own exchanges known lost, and how many a verdict needs.
    pub lost: u32,
    pub needed: u32,
    /// What the verdict waits for.
    pub waiting_for: &'static str,
    pub evidence: TcpInfo,
}

/// The legs of a listener under suspicion now, for `/status`. Shared by
/// every config generation's sweeper (sessions move between them).
#[derive(Default)]
pub struct Suspicions {
    legs: Mutex<HashMap<(usize, Leg), Suspect>>,
}

impl Suspicions {
    /// The legs under suspicion, longest silent first.
    pub fn snapshot(&self) -> Vec<Suspect> {
        let mut all: Vec<Suspect> = self.lock().values().cloned().collect();
        all.sort_by_key(|s| std::cmp::Reverse(s.silent_for));
        all
    }

    pub(super) fn set(&self, session: usize, suspect: Suspect) {
        self.lock().insert((session, suspect.leg), suspect);
    }

    pub(super) fn clear(&self, session: usize, leg: Leg) {
        self.lock().remove(&(session, leg));
    }

    pub(super) fn clear_session(&self, session: usize) {
        let mut legs = self.lock();
        for leg in [Leg::Client, Leg::Upstream] {
            legs.remove(&(session, leg));
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, Leg), Suspect>> {
        self.legs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
