//! DNS following: a backend named by host name is re-resolved every
//! `resolve_interval` and at once when it turns suspect. A changed address
//! set takes effect for new connections at once (managed databases fail
//! over by moving a name, and a cached address is how a proxy stays on the
//! old writer) — unless the listener routes to a role: then a new address
//! is checked at once and used only when the check confirms its role, and
//! a name flickering back to an old address changes nothing (see
//! [`crate::backend::book`]).
//!
//! Sessions are another matter: a name that rotates its answers (a reader
//! endpoint, a multivalue record, a lookup that briefly lost its AAAA) must
//! not churn them. An address counts as removed only once it has been
//! missing from [`REMOVAL_LOOKUPS`] lookups in a row; its sessions are then
//! probed at once, and only those that do not answer are evicted (reason
//! `address_removed`). Whether a live server behind the old address still
//! has the wanted role is for the role check to say.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::{BackendId, BackendSet};
use crate::config::{BackendAddr, Routing};
use crate::liveness::WatcherHandle;
use crate::upstream;

/// Lookups in a row an address must be missing from before its sessions
/// are probed as removed.
pub const REMOVAL_LOOKUPS: u32 = 3;

/// The resolver of one DNS-named backend.
pub struct Resolver {
    pub listener: Arc<str>,
    pub backends: Arc<BackendSet>,
    pub backend: BackendId,
    pub interval: Duration,
    pub routing: Routing,
    pub watcher: WatcherHandle,
}

impl Resolver {
    /// Resolves at once, then every interval or on request, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let BackendAddr::Dns { .. } = self.backends.addr(self.backend) else {
            return; // an IP address never changes
        };
        // Addresses that left the answer: lookups in a row they were missing.
        let mut missing = HashMap::new();
        loop {
            self.resolve_once(&mut missing).await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.backends.resolve_requested(self.backend) => {}
            }
        }
    }

    async fn resolve_once(&self, missing: &mut HashMap<SocketAddr, u32>) {
        let label = self.backends.label(self.backend);
        let timeout = self.interval.max(Duration::from_secs(1));
        match upstream::resolve(self.backends.addr(self.backend), timeout).await {
            Ok(addrs) => {
                let before = self.backends.resolved(self.backend);
                let lookup = self.backends.lookup(self.backend, addrs);
                let now = self.backends.resolved(self.backend);
                if !lookup.fresh.is_empty() {
                    tracing::warn!(listener = %self.listener, backend = %label,
                        before = ?before, after = ?now, new = ?lookup.fresh,
                        serving = ?self.backends.addresses(self.backend),
                        "backend name resolves to new addresses: checking their role before using them");
                    self.backends.check_now(self.backend);
                } else if now != before && !self.backends.gated(self.backend) {
                    tracing::warn!(listener = %self.listener, backend = %label,
                        before = ?before, after = ?now, "backend name resolves to new addresses");
                } else if now != before {
                    tracing::info!(listener = %self.listener, backend = %label,
                        before = ?before, after = ?now,
                        serving = ?self.backends.addresses(self.backend),
                        "backend name returns known addresses again: serving addresses unchanged unless a check says a role changed");
                }
                let gone = lookup.gone;
                let mut removed = count_missing(missing, &gone, &now);
                // An address that still serves (gated: verified in the role,
                // nothing verified has replaced it) is not removed.
                let serving = self.backends.addresses(self.backend);
                removed.retain(|a| !serving.contains(a));
                if !removed.is_empty() {
                    tracing::warn!(listener = %self.listener, backend = %label, addresses = ?removed,
                        lookups = REMOVAL_LOOKUPS,
                        "addresses missing from the name's answer for several lookups in a row: probing their sessions");
                    self.watcher.probe_addresses(self.backend, removed);
                }
            }
            // Keep the last known addresses: a resolver hiccup is no reason
            // to stop connecting to a backend that may be fine.
            Err(e) => tracing::warn!(listener = %self.listener, backend = %label, error = %e,
                "cannot resolve backend name; keeping its last addresses"),
        }
    }
}

/// Counts one more lookup for every address `gone` from it or still
/// missing, forgets those back in `now`; returns the addresses that have
/// now been missing for [`REMOVAL_LOOKUPS`] lookups in a row (once each).
fn count_missing(
    missing: &mut HashMap<SocketAddr, u32>,
    gone: &[SocketAddr],
    now: &[SocketAddr],
) -> Vec<SocketAddr> {
    missing.retain(|addr, _| !now.contains(addr));
    for addr in gone {
        missing.entry(*addr).or_insert(0);
    }
    let mut removed = Vec::new();
    for (addr, count) in missing.iter_mut() {
        *count += 1;
        if *count == REMOVAL_LOOKUPS {
            removed.push(*addr);
        }
    }
    missing.retain(|_, count| *count < REMOVAL_LOOKUPS);
    removed.sort();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 5432))
    }

    #[test]
    fn an_address_is_removed_only_after_missing_several_lookups_in_a_row() {
        let mut missing = HashMap::new();
        // 10.0.0.1 leaves the answer.
        assert!(count_missing(&mut missing, &[a(1)], &[a(2)]).is_empty());
        assert!(count_missing(&mut missing, &[], &[a(2)]).is_empty());
        assert_eq!(count_missing(&mut missing, &[], &[a(2)]), vec![a(1)]);
        // Reported once.
        assert!(count_missing(&mut missing, &[], &[a(2)]).is_empty());
    }

    #[test]
    fn a_name_that_rotates_its_answers_removes_nothing() {
        let mut missing = HashMap::new();
        for round in 0..20 {
            let (gone, now) = if round % 2 == 0 {
                (vec![a(1)], vec![a(2)])
            } else {
                (vec![a(2)], vec![a(1)])
            };
            assert!(
                count_missing(&mut missing, &gone, &now).is_empty(),
                "round {round}"
            );
        }
    }
}
