//! The check loop of one backend: every `interval` (± `jitter`) resolve its
//! address, run the check on a fresh connection, feed the outcome to the
//! backend's state machine, and act on what changed.
//!
//! A client answered "read-only" by the backend (see [`super::hint`]), or
//! a lookup that returns a new address, has it checked at once, no more
//! than once per quarter interval.
//!
//! A DNS backend of a listener that routes to a role has every address its
//! name returned lately checked, and each check result feeds its address
//! book ([`crate::backend::book`]): new connections go only to addresses
//! verified in the wanted role. The backend's own state follows the check
//! of the address it serves from; an address that stops serving for being
//! in another role has its sessions evicted as `on_down` says. When its
//! last verified address stops serving (a failover under way: the old
//! primary fenced, the new one not yet promoted), it is checked every
//! quarter interval for [`QUICK_ROUNDS`] intervals, so the promotion is
//! seen a quarter interval after it, not up to a whole one.
//!
//! A check whose connect got no answer while sessions to the same backend
//! were answered is the network losing a packet, not the backend going
//! away: it counts as `unknown`. A backend that goes down on unanswered
//! connects alone has its sessions probed (those that do not answer are
//! evicted); one that answered wrongly (refused, an error, a frozen
//! process), or that answered in a role the listener does not route to,
//! has them all evicted, as `on_down` says.

use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::check;
use crate::backend::book::Seen;
use crate::backend::state::{Change, CheckOutcome, CheckStatus, Role, State};
use crate::backend::{BackendId, BackendSet};
use crate::config::{CheckConfig, OnDown, ProxyVersion, Routing};
use crate::liveness::{now_ms, WatcherHandle};
use crate::routing;
use crate::upstream;

/// Intervals during which a gated backend that lost its last verified
/// address is checked every quarter interval.
pub const QUICK_ROUNDS: u32 = 10;

/// Everything a backend's check loop needs.
pub struct Monitor {
    pub listener: Arc<str>,
    pub backends: Arc<BackendSet>,
    pub backend: BackendId,
    pub check: CheckConfig,
    /// The listener's `send_proxy`: checks then send a LOCAL header.
    pub send_proxy: Option<ProxyVersion>,
    pub routing: Routing,
    pub watcher: WatcherHandle,
    /// Shared by the listener's monitors: a backend whose role changed
    /// wakes the others to check at once (a failover moves two roles, and
    /// each monitor would otherwise see its half on its own schedule).
    pub recheck: Arc<tokio::sync::Notify>,
}

impl Monitor {
    /// Checks at once, then every interval, until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let mut last_status = None;
        // Since when a gated backend has had no verified address, after
        // having one: quick rounds until then + QUICK_ROUNDS intervals.
        let mut lost_at: Option<tokio::time::Instant> = None;
        loop {
            let started_ms = now_ms();
            let started = tokio::time::Instant::now();
            // The next check starts one interval after this one started,
            // not after it ended: a slow check (a login on a loaded or far
            // server) must not stretch the time to notice a change.
            let mut next = started + self.next_delay();
            let served_before = !self.backends.addresses(self.backend).is_empty();
            let (outcome, dropped) = tokio::select! {
                _ = stop.cancelled() => return,
                round = self.check_round() => round,
            };
            if self.backends.gated(self.backend) {
                lost_at = self.quick_rounds(lost_at, served_before, started);
                if lost_at.is_some() {
                    next = started + self.check.interval / 4;
                }
            }
            let local = outcome.status == CheckStatus::Unknown;
            let outcome = self.corroborate(outcome, started_ms);
            if local && last_status != Some(CheckStatus::Unknown) {
                tracing::warn!(listener = %self.listener, backend = %self.backends.label(self.backend),
                    detail = %outcome.detail, "health check could not run on our side; not counted");
            }
            last_status = Some(outcome.status);
            let status = outcome.status;
            let detail = outcome.detail.clone();
            let change = self.backends.record(self.backend, outcome);
            let evicted_all = self.react(change, status, &detail);
            if !dropped.is_empty() && !evicted_all {
                self.addresses_dropped(dropped);
            }
            let hinted = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(next) => false,
                _ = self.recheck.notified() => false,
                _ = self.backends.check_requested(self.backend) => true,
            };
            if hinted {
                // A client was answered "read-only": look now, but at most
                // once per quarter interval, whatever the replies say.
                let earliest = started + self.check.interval / 4;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(earliest) => {}
                }
                tracing::debug!(listener = %self.listener, backend = %self.backends.label(self.backend),
                    "checking the backend now (a client was answered read-only, or its name returned a new address)");
            }
        }
    }

    /// Whether a gated backend is in its quick rounds (see
    /// [`QUICK_ROUNDS`]): since when it has had no verified address.
    fn quick_rounds(
        &self,
        lost_at: Option<tokio::time::Instant>,
        served_before: bool,
        started: tokio::time::Instant,
    ) -> Option<tokio::time::Instant> {
        if !self.backends.addresses(self.backend).is_empty() {
            return None;
        }
        let since = match lost_at {
            Some(since) => since,
            None if served_before => {
                tracing::warn!(listener = %self.listener, backend = %self.backends.label(self.backend),
                    "no address of the backend is verified in the wanted role: checking every quarter interval for a while");
                started
            }
            None => return None,
        };
        (started.duration_since(since) < self.check.interval * QUICK_ROUNDS).then_some(since)
    }

    fn next_delay(&self) -> Duration {
        let jitter_ms = self.check.jitter.as_millis() as u64;
        if jitter_ms == 0 {
            return self.check.interval;
        }
        let noise = std::collections::hash_map::RandomState::new().hash_one(self.backend);
        let offset = Duration::from_millis(noise % (2 * jitter_ms + 1));
        (self.check.interval + offset).saturating_sub(self.check.jitter)
    }

    /// One round of checks: the outcome that feeds the backend's state,
    /// and (gated backends) the addresses that stopped serving for being in
    /// another role.
    async fn check_round(&self) -> (CheckOutcome, Vec<SocketAddr>) {
        if !self.backends.gated(self.backend) {
            return (self.check_once().await, Vec::new());
        }
        let mut addrs = self.backends.to_check(self.backend);
        if addrs.is_empty() {
            // Not resolved yet: look the name up here, as the resolver would.
            match upstream::resolve(self.backends.addr(self.backend), self.check.timeout).await {
                Ok(answer) => {
                    self.backends.lookup(self.backend, answer);
                    addrs = self.backends.to_check(self.backend);
                }
                Err(e) => return (cannot_resolve(&e), Vec::new()),
            }
        }
        let outcomes = check_all(&self.check, &addrs, self.send_proxy).await;
        let seen: Vec<(SocketAddr, Seen)> = addrs
            .iter()
            .zip(&outcomes)
            .map(|(&addr, outcome)| (addr, seen(outcome)))
            .collect();
        let dropped = self.backends.addresses_checked(self.backend, &seen);
        // The backend's state follows the address it now serves from; with
        // none, the first address checked (which then is not usable).
        let serving = self.backends.addresses(self.backend);
        let pick = serving
            .first()
            .and_then(|s| addrs.iter().position(|a| a == s))
            .unwrap_or(0);
        let mut outcome = outcomes
            .into_iter()
            .nth(pick)
            .unwrap_or_else(|| cannot_resolve(&std::io::Error::other("the name has no addresses")));
        if addrs.len() > 1 {
            outcome.detail = format!("{}: {}", addrs[pick], outcome.detail);
        }
        (outcome, dropped)
    }

    async fn check_once(&self) -> CheckOutcome {
        let known = self.backends.addresses(self.backend).first().copied();
        let addr = match known {
            Some(addr) => Ok(addr),
            // The first address the name resolves to today.
            None => upstream::resolve(self.backends.addr(self.backend), self.check.timeout)
                .await
                .and_then(|addrs| {
                    addrs.first().copied().ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses")
                    })
                }),
        };
        match addr {
            Ok(addr) => check::check_sending_header(&self.check, addr, self.send_proxy).await,
            Err(e) => cannot_resolve(&e),
        }
    }

    /// Sessions to addresses that stopped serving for being in another
    /// role are on the wrong server: evicted as `on_down` says.
    fn addresses_dropped(&self, dropped: Vec<SocketAddr>) {
        let label = self.backends.label(self.backend);
        tracing::warn!(listener = %self.listener, backend = %label, addresses = ?dropped,
            serving = ?self.backends.addresses(self.backend),
            "addresses of the backend found in another role: no longer used");
        if self.routing.on_down == OnDown::Evict {
            self.watcher
                .evict_addresses(self.backend, dropped, self.routing.down_grace);
        }
    }

    /// A connect that got no answer, while a session to the backend was
    /// answered during the check, proves only loss on the way: unknown.
    fn corroborate(&self, mut outcome: CheckOutcome, started_ms: u64) -> CheckOutcome {
        if outcome.status == CheckStatus::NoAnswer
            && self.backends.heard_at(self.backend) >= started_ms
        {
            outcome.status = CheckStatus::Unknown;
            outcome.detail = format!(
                "{}; but sessions to it were answered meanwhile: loss on the way, not counted",
                outcome.detail
            );
        }
        outcome
    }

    /// Logs and acts on what a check changed; true when every session of
    /// the backend was told to leave.
    fn react(&self, change: Change, status: CheckStatus, detail: &str) -> bool {
        let label = self.backends.label(self.backend);
        let role = self.backends.role(self.backend);
        let role_name = role.map_or("unknown", Role::as_str);
        if change.state_changed() {
            tracing::warn!(listener = %self.listener, backend = %label, from = %change.from,
                to = %change.to, check = ?status, detail, role = role_name, "backend state changed");
        } else if change.role_changed && change.had_role {
            tracing::warn!(listener = %self.listener, backend = %label, role = role_name,
                "backend role changed");
        } else if change.role_changed {
            tracing::info!(listener = %self.listener, backend = %label, role = role_name,
                "backend role learned");
        }
        if change.role_changed && change.had_role {
            // The other half of a failover (a promotion, a demotion) is
            // likely under way on another backend: look at them now rather
            // than on their own schedules.
            self.recheck.notify_waiters();
        }
        if change.from == State::Up && change.to == State::Suspect {
            self.watcher.probe_backend(self.backend);
            self.backends.resolve_now(self.backend);
        }
        let lost_role = change.role_changed && !routing::wants(&self.routing, role);
        let went_down = change.state_changed() && change.to == State::Down;
        if self.routing.on_down != OnDown::Evict {
            return false;
        }
        if went_down && change.no_answer_only {
            // Maybe the host is gone, maybe only the network loses packets:
            // the sessions' own probes tell, each for itself.
            tracing::warn!(listener = %self.listener, backend = %label,
                "backend down on unanswered connects alone: probing its sessions, evicting only those that do not answer");
            self.watcher.probe_backend(self.backend);
            false
        } else if went_down || (lost_role && change.to != State::Down) {
            self.watcher
                .evict_backend(self.backend, self.routing.down_grace);
            true
        } else {
            false
        }
    }
}

/// Runs the check on every address at once; outcomes in the same order.
async fn check_all(
    config: &CheckConfig,
    addrs: &[SocketAddr],
    send_proxy: Option<ProxyVersion>,
) -> Vec<CheckOutcome> {
    let mut set = tokio::task::JoinSet::new();
    for (i, &addr) in addrs.iter().enumerate() {
        let config = config.clone();
        set.spawn(async move {
            let outcome = check::check_sending_header(&config, addr, send_proxy).await;
            (i, outcome)
        });
    }
    let mut outcomes: Vec<Option<CheckOutcome>> = vec![None; addrs.len()];
    while let Some(joined) = set.join_next().await {
        if let Ok((i, outcome)) = joined {
            outcomes[i] = Some(outcome);
        }
    }
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| CheckOutcome {
                status: CheckStatus::Unknown,
                role: None,
                latency: Duration::ZERO,
                detail: "the check task failed".into(),
            })
        })
        .collect()
}

/// What the address book learns from one check outcome.
fn seen(outcome: &CheckOutcome) -> Seen {
    match outcome.status {
        CheckStatus::Up => Seen::Up(outcome.role),
        CheckStatus::Unknown => Seen::Nothing,
        CheckStatus::Down | CheckStatus::NoAnswer | CheckStatus::NotReady => Seen::NotUsable,
    }
}

fn cannot_resolve(e: &std::io::Error) -> CheckOutcome {
    CheckOutcome {
        status: CheckStatus::Down,
        role: None,
        latency: Duration::ZERO,
        detail: format!("cannot resolve: {e}"),
    }
}
