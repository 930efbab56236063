//! The sweeper: one task per listener that visits every session's legs,
//! applies the death rule, and carries out the health subsystem's orders
//! (probe every session of a suspect backend now; evict the sessions of a
//! down backend).
//!
//! A config reload hands every session over to the new generation's
//! sweeper, renumbered to the new backend list and with its legs' probe
//! state, and the old sweeper then only forwards sessions that were still
//! starting under the old generation.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{leg_index, now_ms, Action, LegState, Rule, Watched, REMOVED};
use crate::backend::BackendSet;
use crate::config::{Liveness, SocketSettings};
use crate::evict::{EvictReason, Leg, Verdict};
use crate::sockopt;
use crate::telemetry::metrics::ListenerMeters;

/// Each sweep period is cut into this many slices, and every session is
/// visited in its own slice. Arming in one burst would synchronise the
/// kernel's keepalive timers of every idle leg: 10,000 probes leaving in the
/// same jiffy overflow the receive backlog (`netdev_max_backlog`, 1000 by
/// default) and get dropped, which reads as unanswered probes. Spread over
/// the slices, each leg keeps its own phase.
const SLICES: usize = 16;

enum Order {
    Watch(Weak<Watched>),
    /// A session handed over by the previous generation's sweeper.
    Adopt(Entry),
    /// A reload: give every session to `to`, renumbered by `remap` (old
    /// index → new index, `None`: the backend was removed, and the session
    /// is evicted like a down backend's, busy ones after `grace`).
    HandOver {
        to: WatcherHandle,
        remap: Vec<Option<usize>>,
        grace: Duration,
    },
    /// Probe every session of this backend now.
    ProbeBackend(usize),
    /// The backend is down: evict its idle sessions now and its busy ones
    /// after `grace`.
    EvictBackend {
        backend: usize,
        grace: Duration,
    },
    /// The backend's name no longer resolves to these addresses: evict the
    /// sessions connected to them, like `EvictBackend`.
    EvictAddresses {
        backend: usize,
        gone: Vec<SocketAddr>,
        grace: Duration,
    },
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

    /// Probes every session of `backend` at once (the on-demand probe).
    pub fn probe_backend(&self, backend: usize) {
        let _ = self.tx.send(Order::ProbeBackend(backend));
    }

    /// Evicts the sessions of a down backend: idle ones now, busy ones
    /// (data in flight, or a request waiting for its answer) after `grace`.
    pub fn evict_backend(&self, backend: usize, grace: Duration) {
        let _ = self.tx.send(Order::EvictBackend { backend, grace });
    }

    /// Hands every session over to the sweeper of the new generation (see
    /// `Order::HandOver`); this one then only forwards late arrivals.
    pub fn hand_over(&self, to: WatcherHandle, remap: Vec<Option<usize>>, grace: Duration) {
        let _ = self.tx.send(Order::HandOver { to, remap, grace });
    }

    fn adopt(&self, entry: Entry) {
        let _ = self.tx.send(Order::Adopt(entry));
    }

    /// Evicts the sessions of `backend` connected to addresses its name no
    /// longer resolves to: idle ones now, busy ones after `grace`.
    pub fn evict_addresses(&self, backend: usize, gone: Vec<SocketAddr>, grace: Duration) {
        let _ = self.tx.send(Order::EvictAddresses {
            backend,
            gone,
            grace,
        });
    }
}

struct Entry {
    session: Weak<Watched>,
    legs: [LegState; 2],
    /// Set by a backend going down while this session was busy: when, and
    /// with which reason.
    evict_at: Option<(u64, EvictReason)>,
}

struct Sweeper {
    slots: Vec<Vec<Entry>>,
    registered: usize,
    rules: [Rule; 2],
    liveness: Liveness,
    backends: Arc<BackendSet>,
    meters: Arc<ListenerMeters>,
    /// Backends found with a dead connection during this sweep.
    suspects: Vec<usize>,
    /// Set by a hand-over: where sessions go now, and their renumbering.
    successor: Option<(WatcherHandle, Vec<Option<usize>>)>,
}

/// Starts the sweeper of one listener. It stops by itself once every
/// [`WatcherHandle`] is dropped and every watched session has ended.
pub fn spawn_watcher(
    liveness: Liveness,
    upstream: SocketSettings,
    client: SocketSettings,
    backends: Arc<BackendSet>,
    meters: Arc<ListenerMeters>,
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
        suspects: Vec::new(),
        successor: None,
    };
    tokio::spawn(sweeper.run(rx));
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
                            return;
                        }
                        break;
                    }
                }
            }
            self.sweep(slice).await;
            for backend in std::mem::take(&mut self.suspects) {
                let change = self.backends.connection_dead(backend);
                if change.state_changed() {
                    // The same event the health checks log, so operators
                    // and tools see every state change in one place.
                    tracing::warn!(backend = %self.backends.label(backend), from = %change.from,
                        to = %change.to, cause = "a session to it was found dead",
                        "backend state changed");
                    self.obey(Order::ProbeBackend(backend));
                }
            }
        }
    }

    fn obey(&mut self, order: Order) {
        match order {
            Order::Watch(session) => self.add(Entry {
                session,
                legs: [LegState::default(); 2],
                evict_at: None,
            }),
            Order::Adopt(entry) => self.add(entry),
            Order::HandOver { to, remap, grace } => self.hand_over(to, remap, grace),
            Order::ProbeBackend(backend) => self.probe_backend(backend),
            Order::EvictBackend { backend, grace } => {
                self.evict_sessions(backend, grace, None, EvictReason::BackendDown)
            }
            Order::EvictAddresses {
                backend,
                gone,
                grace,
            } => self.evict_sessions(backend, grace, Some(&gone), EvictReason::AddressRemoved),
        }
    }

    fn add(&mut self, entry: Entry) {
        if let Some((to, remap)) = &self.successor {
            forward(entry, to, remap, Duration::ZERO);
            return;
        }
        self.slots[self.registered % SLICES].push(entry);
        self.registered += 1;
    }

    fn hand_over(&mut self, to: WatcherHandle, remap: Vec<Option<usize>>, grace: Duration) {
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

    fn sessions_of(&mut self, backend: usize) -> impl Iterator<Item = (&mut Entry, Arc<Watched>)> {
        self.slots.iter_mut().flatten().filter_map(move |e| {
            let session = e.session.upgrade()?;
            (session.backend() == backend && session.verdict().is_none()).then_some((e, session))
        })
    }

    /// The on-demand probe of every session of a suspect backend: the
    /// kernel's minimum TCP_KEEPIDLE (1 s) makes every leg quiet for a second
    /// or more send its probe at once, whatever `probe_interval` is.
    fn probe_backend(&mut self, backend: usize) {
        const MIN_KEEPIDLE: Duration = Duration::from_secs(1);
        let mut probed = 0;
        let meters = self.meters.clone();
        for (entry, session) in self.sessions_of(backend) {
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
        tracing::info!(backend = %self.backends.label(backend), sessions = probed,
            "backend suspect: probing all its sessions now");
    }

    /// Evicts the sessions of `backend` (only those connected to `only`
    /// addresses, when given): idle ones now, busy ones after `grace`.
    fn evict_sessions(
        &mut self,
        backend: usize,
        grace: Duration,
        only: Option<&[SocketAddr]>,
        reason: EvictReason,
    ) {
        let now = now_ms();
        let (mut now_count, mut later) = (0, 0);
        for (entry, session) in self.sessions_of(backend) {
            let peer = session.upstream.peer_addr().ok();
            if only.is_some_and(|only| peer.is_none_or(|p| !only.contains(&p))) {
                continue;
            }
            if busy(&session) {
                entry.evict_at = Some((now + grace.as_millis() as u64, reason));
                later += 1;
            } else {
                session.evict(Verdict::decided(Leg::Upstream, reason));
                now_count += 1;
            }
        }
        tracing::warn!(backend = %self.backends.label(backend), reason = reason.as_str(),
            idle_evicted = now_count, busy_after_grace = later,
            grace = %humantime::format_duration(grace), "evicting sessions of a backend");
    }

    async fn sweep(&mut self, slice: usize) {
        let mut i = 0;
        while i < self.slots[slice].len() {
            let entry = &mut self.slots[slice][i];
            let Some(session) = entry.session.upgrade() else {
                self.slots[slice].swap_remove(i);
                continue;
            };
            if session.verdict().is_none() {
                if let Some((_, reason)) = entry.evict_at.filter(|&(t, _)| now_ms() >= t) {
                    session.evict(Verdict::decided(Leg::Upstream, reason));
                } else if let Some(leg) = check_session(
                    &session,
                    &mut entry.legs,
                    &self.rules,
                    &self.liveness,
                    &self.meters,
                ) {
                    if leg == Leg::Upstream && session.backend() != REMOVED {
                        self.suspects.push(session.backend());
                    }
                }
            }
            drop(session);
            i += 1;
            if i % 1024 == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// A request waiting for its answer (the client spoke last), or bytes not
/// yet delivered on either leg: such a session gets `down_grace`.
fn busy(session: &Watched) -> bool {
    let in_flight = |leg| {
        sockopt::tcp_info(session.socket(leg)).is_ok_and(|i| i.unacked > 0 || i.notsent_bytes > 0)
    };
    session.client_spoke_last() || in_flight(Leg::Upstream) || in_flight(Leg::Client)
}

/// Sends one session to the next generation's sweeper, renumbered; a
/// session whose backend was removed is evicted (idle: now; busy: after
/// `grace`). Returns whether it kept its backend (`None`: it had ended).
fn forward(
    mut entry: Entry,
    to: &WatcherHandle,
    remap: &[Option<usize>],
    grace: Duration,
) -> Option<bool> {
    let session = entry.session.upgrade()?;
    let old = session.backend();
    let new = remap.get(old).copied().flatten();
    session.set_backend(new.unwrap_or(REMOVED));
    if new.is_none() && session.verdict().is_none() && entry.evict_at.is_none() {
        if grace.is_zero() || !busy(&session) {
            session.evict(Verdict::decided(Leg::Upstream, EvictReason::BackendRemoved));
        } else {
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

/// Visits both legs of a session; returns the leg it found dead, if any.
fn check_session(
    session: &Watched,
    legs: &mut [LegState; 2],
    rules: &[Rule; 2],
    liveness: &Liveness,
    meters: &ListenerMeters,
) -> Option<Leg> {
    let now = now_ms();
    for leg in [Leg::Upstream, Leg::Client] {
        let idx = leg_index(leg);
        let pending = session.pending_since[idx].load(Ordering::Relaxed);
        let state = &mut legs[idx];
        if !state.due(now) && pending == 0 {
            continue;
        }
        let socket = session.socket(leg);
        // An error means the socket is already closed; the relay reports it.
        let Ok(info) = sockopt::tcp_info(socket) else {
            continue;
        };
        let a = state.assess(&info, now, pending, &rules[idx]);
        if a.probe_unanswered {
            meters.probe_unanswered(leg);
        }
        let result = match a.action {
            Action::None => Ok(()),
            Action::Arm => {
                meters.probe_sent(leg);
                sockopt::set_keepalive_idle(socket, liveness.probe_interval)
            }
            Action::Restore => {
                sockopt::set_keepalive_idle(socket, Duration::from_millis(rules[idx].keepidle_ms))
            }
        };
        if let Err(e) = result {
            tracing::debug!(leg = %leg, error = %e, "cannot re-arm keepalive");
        }
        if a.clear_pending {
            let _ = session.pending_since[idx].compare_exchange(
                pending,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        if let Some(reason) = a.dead {
            session.evict(Verdict {
                leg,
                reason,
                evidence: Some(info),
                silent_for: Some(Duration::from_millis(a.silent_ms)),
            });
            return Some(leg);
        }
    }
    None
}
