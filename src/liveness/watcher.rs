//! The sweeper of one listener: visits every session's legs on a schedule,
//! arms on-demand probes, applies the death rule, and carries out the
//! orders of health checks, the resolver and reloads. Suspicions are
//! judged with their host in [`judge`].

mod hosts;
mod judge;
mod orders;
mod suspicions;

pub use suspicions::{Suspect, Suspicions};

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::leg::{Action, Evidence, LegState, Rule};
use super::{leg_index, now_ms, Watched};
use crate::backend::{BackendId, BackendSet};
use crate::config::{Liveness, SocketSettings};
use crate::evict::{EvictReason, Leg, Verdict};
use crate::sockopt::{self, TcpInfo};
use crate::telemetry::metrics::ListenerMeters;

use hosts::{HostKey, Hosts};

/// Each sweep period is cut into this many slices, and every session is
/// visited in its own slice. Arming in one burst would synchronise the
/// kernel's keepalive timers of every idle leg: 10,000 probes leaving in the
/// same jiffy overflow the receive backlog (`netdev_max_backlog`, 1000 by
/// default) and get dropped, which reads as unanswered probes. Spread over
/// the slices, each leg keeps its own phase.
const SLICES: usize = 16;
/// An unchecked backend made suspect by a dead session stays suspect at
/// least this long (and three times probe_interval + dead_after).
const SUSPECT_HOLD_MIN: Duration = Duration::from_secs(10);

enum Order {
    Watch(Weak<Watched>),
    /// A session handed over by the previous generation's sweeper.
    Adopt(Box<Entry>),
    /// A reload: give every session to `to`, renumbered by `remap` (old
    /// index → new index, `None`: the backend was removed, and the session
    /// is evicted like a down backend's, busy ones after `grace`).
    HandOver {
        to: WatcherHandle,
        remap: Vec<Option<BackendId>>,
        grace: Duration,
    },
    /// Probe every session of this backend now.
    ProbeBackend(BackendId),
    /// The backend is down: evict its idle sessions now and its busy ones
    /// after `grace` (`only`: just the sessions connected to these
    /// addresses of it).
    EvictBackend {
        backend: BackendId,
        grace: Duration,
        only: Option<Vec<SocketAddr>>,
    },
    /// The backend's name no longer resolves to these addresses: probe the
    /// sessions connected to them now; those that do not answer are evicted
    /// with reason `address_removed`.
    ProbeAddresses {
        backend: BackendId,
        gone: Vec<SocketAddr>,
    },
    /// Fresh connects to a host, made to corroborate a suspicion, ended.
    Connected(hosts::ConnectReport),
}

/// Talks to a listener's watcher.
#[derive(Clone)]
pub struct WatcherHandle {
    tx: mpsc::UnboundedSender<Order>,
}

impl WatcherHandle {
    pub fn watch(&self, session: &Arc<Watched>) {
        // Sends fail only once the watcher stopped, after every session ended.
        let _ = self.tx.send(Order::Watch(Arc::downgrade(session)));
    }

    /// Probes every session of `backend` at once (the on-demand probe); the
    /// ones that do not answer are judged with their host as usual.
    pub fn probe_backend(&self, backend: BackendId) {
        let _ = self.tx.send(Order::ProbeBackend(backend));
    }

    /// Evicts the sessions of a down backend: idle ones now, busy ones
    /// (data in flight, or a request waiting for its answer) after `grace`.
    pub fn evict_backend(&self, backend: BackendId, grace: Duration) {
        let _ = self.tx.send(Order::EvictBackend {
            backend,
            grace,
            only: None,
        });
    }

    /// Evicts, like [`WatcherHandle::evict_backend`], only the sessions of
    /// `backend` connected to `addrs` (addresses of a DNS backend found in
    /// another role).
    pub fn evict_addresses(&self, backend: BackendId, addrs: Vec<SocketAddr>, grace: Duration) {
        let _ = self.tx.send(Order::EvictBackend {
            backend,
            grace,
            only: Some(addrs),
        });
    }

    /// Hands every session over to the sweeper of the new generation (see
    /// `Order::HandOver`); this one then only forwards late arrivals.
    pub fn hand_over(&self, to: WatcherHandle, remap: Vec<Option<BackendId>>, grace: Duration) {
        let _ = self.tx.send(Order::HandOver { to, remap, grace });
    }

    fn adopt(&self, entry: Entry) {
        let _ = self.tx.send(Order::Adopt(Box::new(entry)));
    }

    /// The sessions of `backend` connected to addresses its name no longer
    /// resolves to are probed now; those that fail their probe are evicted
    /// (reason `address_removed`), the others live on.
    pub fn probe_addresses(&self, backend: BackendId, gone: Vec<SocketAddr>) {
        let _ = self.tx.send(Order::ProbeAddresses { backend, gone });
    }
}

struct Entry {
    session: Weak<Watched>,
    /// Identifies the session while it lives (its address).
    id: usize,
    legs: [LegState; 2],
    /// Each leg's peer ([`leg_index`]), read once: it names the leg's host.
    peers: [Option<SocketAddr>; 2],
    /// Set by a backend going down while this session was busy: when, and
    /// with which reason.
    evict_at: Option<(u64, EvictReason)>,
    /// Its address left its backend's DNS answer: if it dies, that is why.
    address_removed: bool,
}

impl Entry {
    fn new(session: Weak<Watched>) -> Self {
        let peers = session
            .upgrade()
            .map_or([None, None], |s| s.peers.map(Some));
        Entry {
            id: session.as_ptr() as usize,
            session,
            legs: [LegState::default(); 2],
            peers,
            evict_at: None,
            address_removed: false,
        }
    }

    fn host(&self, leg: Leg) -> Option<HostKey> {
        self.peers[leg_index(leg)].map(|p| HostKey::new(leg, p))
    }
}

/// A leg suspected at this visit, to be judged with its host.
struct Suspected {
    session: Arc<Watched>,
    id: usize,
    leg: Leg,
    peer: SocketAddr,
    evidence: Evidence,
    info: TcpInfo,
    /// When its own evidence first sufficed.
    since_ms: u64,
    address_removed: bool,
}

struct Sweeper {
    slots: Vec<Vec<Entry>>,
    registered: usize,
    rules: [Rule; 2],
    liveness: Liveness,
    backends: Arc<BackendSet>,
    meters: Arc<ListenerMeters>,
    hosts: Hosts,
    suspicions: Arc<Suspicions>,
    /// Where connect reports come back (weak: the sweeper must not keep
    /// its own channel open).
    own_tx: mpsc::WeakUnboundedSender<Order>,
    /// Backends found with a dead connection during this sweep.
    suspects: Vec<BackendId>,
    /// Set by a hand-over: where sessions go now, and their renumbering.
    successor: Option<(WatcherHandle, Vec<Option<BackendId>>)>,
}

/// Starts the sweeper of one listener. It stops by itself once every
/// [`WatcherHandle`] is dropped and every watched session has ended.
pub fn spawn_watcher(
    liveness: Liveness,
    upstream: SocketSettings,
    client: SocketSettings,
    backends: Arc<BackendSet>,
    meters: Arc<ListenerMeters>,
    suspicions: Arc<Suspicions>,
    tasks: &TaskTracker,
) -> WatcherHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let sweeper = Sweeper {
        slots: (0..SLICES).map(|_| Vec::new()).collect(),
        registered: 0,
        rules: [
            Rule::new(&liveness, &client),
            Rule::new(&liveness, &upstream),
        ],
        liveness,
        backends,
        meters,
        hosts: Hosts::default(),
        suspicions,
        own_tx: tx.downgrade(),
        suspects: Vec::new(),
        successor: None,
    };
    tasks.spawn(sweeper.run(rx));
    WatcherHandle { tx }
}

impl Sweeper {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Order>) {
        let mut tick = tokio::time::interval(self.liveness.sweep_period() / SLICES as u32);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for slice in (0..SLICES).cycle() {
            tick.tick().await;
            loop {
                match rx.try_recv() {
                    Ok(order) => self.obey(order),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        if self.slots.iter().all(Vec::is_empty) {
                            self.suspicions.lock().clear();
                            return;
                        }
                        break;
                    }
                }
            }
            self.sweep(slice).await;
            self.report_suspect_backends();
            if slice == 0 {
                self.publish_link_estimates();
                self.hosts.forget_stale(now_ms());
                self.expire_suspect_backends();
            }
        }
    }

    fn report_suspect_backends(&mut self) {
        for backend in std::mem::take(&mut self.suspects) {
            let change = self.backends.connection_dead(backend);
            if change.state_changed() {
                // The same event the health checks log, so operators
                // and tools see every state change in one place.
                tracing::warn!(backend = %self.backends.label(backend), from = %change.from,
                    to = %change.to, cause = "a session to it was found dead",
                    "backend state changed");
                self.obey(Order::ProbeBackend(backend));
                // A name-addressed backend may have moved: look it up now,
                // as a failed check does.
                self.backends.resolve_now(backend);
            }
        }
    }

    /// Without health checks, a backend made suspect by a dead session is
    /// up again once no other session to it was found dead for a while.
    fn expire_suspect_backends(&self) {
        let hold = (self.liveness.probe_interval + self.liveness.dead_after) * 3;
        let hold = hold.max(SUSPECT_HOLD_MIN);
        for backend in self.backends.ids() {
            let change = self.backends.expire_suspect(backend, hold);
            if change.state_changed() {
                tracing::warn!(backend = %self.backends.label(backend), from = %change.from,
                    to = %change.to, cause = "no session to it found dead since",
                    quiet_for = %humantime::format_duration(hold), "backend state changed");
            }
        }
    }

    fn obey(&mut self, order: Order) {
        match order {
            Order::Watch(session) => self.add(Entry::new(session)),
            Order::Adopt(entry) => self.add(*entry),
            Order::HandOver { to, remap, grace } => self.hand_over(to, remap, grace),
            Order::ProbeBackend(backend) => self.probe_backend(backend, None),
            Order::EvictBackend {
                backend,
                grace,
                only,
            } => self.evict_backend(backend, grace, only.as_deref()),
            Order::ProbeAddresses { backend, gone } => self.probe_backend(backend, Some(&gone)),
            Order::Connected(report) => self.connected(report),
        }
    }

    fn add(&mut self, entry: Entry) {
        if let Some((to, remap)) = &self.successor {
            orders::forward(entry, to, remap, Duration::ZERO);
            return;
        }
        self.slots[self.registered % SLICES].push(entry);
        self.registered += 1;
    }

    async fn sweep(&mut self, slice: usize) {
        let mut suspected = Vec::new();
        let mut i = 0;
        while i < self.slots[slice].len() {
            let entry = &mut self.slots[slice][i];
            let Some(session) = entry.session.upgrade() else {
                self.suspicions.clear_session(entry.id);
                self.slots[slice].swap_remove(i);
                continue;
            };
            if session.verdict().is_none() {
                if let Some((_, reason)) = entry.evict_at.filter(|&(t, _)| now_ms() >= t) {
                    session.evict(Verdict::decided(Leg::Upstream, reason));
                } else {
                    for leg in [Leg::Upstream, Leg::Client] {
                        if let Some(s) = self.visit(slice, i, &session, leg, false) {
                            suspected.push(s);
                        }
                    }
                }
            }
            drop(session);
            i += 1;
            if i % 1024 == 0 {
                tokio::task::yield_now().await;
            }
        }
        for s in suspected {
            self.judge(s);
        }
    }

    /// Samples one leg of the entry at `slots[slice][index]` if it is due
    /// (or `force`d), applies the death rule and what it implies (keepalive
    /// re-arm, pending mark, the host's loss and last answer); returns the
    /// leg if its own evidence now suffices to ask for a verdict.
    fn visit(
        &mut self,
        slice: usize,
        index: usize,
        session: &Arc<Watched>,
        leg: Leg,
        force: bool,
    ) -> Option<Suspected> {
        let entry = &mut self.slots[slice][index];
        let idx = leg_index(leg);
        let now = now_ms();
        let marks = session.pending(leg);
        let pending = marks.0;
        let state = &mut entry.legs[idx];
        if !force && !state.due(now) && pending == 0 {
            return None;
        }
        let socket = session.socket(leg);
        // An error means the socket is already closed; the relay reports it.
        let info = sockopt::tcp_info(socket).ok()?;
        let was_suspected = state.suspected_since().is_some();
        let a = state.assess(&info, now, pending, &self.rules[idx]);
        let since_ms = state.suspected_since();
        if a.probe_unanswered {
            self.meters.probe_unanswered(leg);
        }
        let result = match a.action {
            Action::None => Ok(()),
            Action::Arm => {
                self.meters.probe_sent(leg);
                sockopt::set_keepalive_idle(socket, self.liveness.probe_interval)
            }
            Action::Restore => sockopt::set_keepalive_idle(
                socket,
                Duration::from_millis(self.rules[idx].keepidle_ms),
            ),
        };
        if let Err(e) = result {
            tracing::debug!(leg = %leg, error = %e, "cannot re-arm keepalive");
        }
        if a.clear_pending {
            session.clear_pending(leg, marks);
        }
        let (id, address_removed) = (entry.id, entry.address_removed);
        let (host, peer) = (entry.host(leg), entry.peers[idx]);
        if let Some(key) = host {
            self.hosts.observe(key, &a, now);
        }
        if let (Leg::Upstream, Some(at), Some(backend)) = (leg, a.heard_at_ms, session.backend()) {
            self.backends.heard(backend, at);
        }
        if was_suspected && a.suspect.is_none() {
            // Answered after all: the suspicion is lifted.
            self.meters.suspicion_ended(leg, false);
            self.suspicions.clear(id, leg);
        }
        let evidence = a.suspect?;
        Some(Suspected {
            session: session.clone(),
            id,
            leg,
            peer: peer?,
            evidence,
            info,
            since_ms: since_ms.unwrap_or(now),
            address_removed,
        })
    }
}
