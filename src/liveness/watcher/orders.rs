//! The orders a sweeper carries out for others: a reload's hand-over, a
//! suspect backend's probes, a down backend's evictions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{Entry, Sweeper, WatcherHandle};
use crate::backend::BackendId;
use crate::evict::{EvictReason, Leg, Verdict};
use crate::liveness::{leg_index, now_ms, Watched};
use crate::sockopt;

impl Sweeper {
    pub(super) fn hand_over(
        &mut self,
        to: WatcherHandle,
        remap: Vec<Option<BackendId>>,
        grace: Duration,
    ) {
        let entries: Vec<Entry> = self.slots.iter_mut().flat_map(std::mem::take).collect();
        let (mut kept, mut removed) = (0, 0);
        for entry in entries {
            match forward(entry, &to, &remap, grace) {
                Some(true) => kept += 1,
                Some(false) => removed += 1,
                None => {}
            }
        }
        tracing::debug!(
            sessions = kept,
            removed_backend = removed,
            "sessions handed to the new config generation"
        );
        self.successor = Some((to, remap));
    }

    fn sessions_of(
        &mut self,
        backend: BackendId,
    ) -> impl Iterator<Item = (&mut Entry, Arc<Watched>)> {
        self.slots.iter_mut().flatten().filter_map(move |e| {
            let session = e.session.upgrade()?;
            (session.backend() == Some(backend) && session.verdict().is_none())
                .then_some((e, session))
        })
    }

    /// The on-demand probe of every session of a suspect backend (only
    /// those connected to `only`, when given, which a name no longer
    /// resolves to): the kernel's minimum TCP_KEEPIDLE (1 s) makes every
    /// leg quiet for a second or more send its probe at once, whatever
    /// `probe_interval` is.
    pub(super) fn probe_backend(&mut self, backend: BackendId, only: Option<&[SocketAddr]>) {
        const MIN_KEEPIDLE: Duration = Duration::from_secs(1);
        let mut probed = 0;
        let meters = self.meters.clone();
        for (entry, session) in self.sessions_of(backend) {
            let peer = entry.peers[leg_index(Leg::Upstream)];
            if only.is_some_and(|only| peer.is_none_or(|p| !only.contains(&p))) {
                continue;
            }
            entry.address_removed |= only.is_some();
            for leg in [Leg::Upstream, Leg::Client] {
                let socket = session.socket(leg);
                if sockopt::set_keepalive_idle(socket, MIN_KEEPIDLE).is_ok() {
                    meters.probe_sent(leg);
                    entry.legs[leg_index(leg)]
                        .force_probe(now_ms(), MIN_KEEPIDLE.as_millis() as u64);
                }
            }
            probed += 1;
        }
        let label = self.backends.label(backend).to_string();
        match only {
            None => tracing::info!(backend = %label, sessions = probed,
                "backend suspect: probing all its sessions now"),
            Some(gone) => tracing::info!(backend = %label, sessions = probed, addresses = ?gone,
                "backend name no longer resolves to these addresses: probing their sessions now"),
        }
    }

    /// Evicts the sessions of a down backend (`only`: those connected to
    /// these addresses of it): idle ones now, busy ones at their client's
    /// next request after the answer in flight, or after `grace` (see
    /// [`Watched::leave`]).
    pub(super) fn evict_backend(
        &mut self,
        backend: BackendId,
        grace: Duration,
        only: Option<&[SocketAddr]>,
    ) {
        let now = now_ms();
        let reason = EvictReason::BackendDown;
        let (mut now_count, mut later) = (0, 0);
        for (entry, session) in self.sessions_of(backend) {
            let peer = entry.peers[leg_index(Leg::Upstream)];
            if only.is_some_and(|only| peer.is_none_or(|p| !only.contains(&p))) {
                continue;
            }
            if busy(&session) {
                session.leave(reason);
                entry.evict_at = Some((now + grace.as_millis() as u64, reason));
                later += 1;
            } else {
                session.evict(Verdict::decided(Leg::Upstream, reason));
                now_count += 1;
            }
        }
        if now_count + later == 0 {
            return;
        }
        tracing::warn!(backend = %self.backends.label(backend), reason = reason.as_str(),
            addresses = ?only, idle_evicted = now_count, busy_leaving = later,
            grace = %humantime::format_duration(grace),
            "evicting sessions of a backend (busy ones at their next request or after the grace)");
    }
}

/// A request waiting for its answer (the client spoke last), or bytes not
/// yet delivered on either leg: such a session gets `down_grace`.
pub(super) fn busy(session: &Watched) -> bool {
    let in_flight = |leg| {
        sockopt::tcp_info(session.socket(leg)).is_ok_and(|i| i.unacked > 0 || i.notsent_bytes > 0)
    };
    session.client_spoke_last() || in_flight(Leg::Upstream) || in_flight(Leg::Client)
}

/// Sends one session to the next generation's sweeper, renumbered; a
/// session whose backend was removed is evicted (idle: now; busy: after
/// `grace`). Returns whether it kept its backend (`None`: it had ended).
pub(super) fn forward(
    mut entry: Entry,
    to: &WatcherHandle,
    remap: &[Option<BackendId>],
    grace: Duration,
) -> Option<bool> {
    let session = entry.session.upgrade()?;
    let new = session
        .backend()
        .and_then(|old| remap.get(old.index()).copied().flatten());
    session.set_backend(new);
    if new.is_none() && session.verdict().is_none() && entry.evict_at.is_none() {
        if grace.is_zero() || !busy(&session) {
            session.evict(Verdict::decided(Leg::Upstream, EvictReason::BackendRemoved));
        } else {
            session.leave(EvictReason::BackendRemoved);
            entry.evict_at = Some((
                now_ms() + grace.as_millis() as u64,
                EvictReason::BackendRemoved,
            ));
        }
    }
    drop(session);
    to.adopt(entry);
    Some(new.is_some())
}
