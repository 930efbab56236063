//! The backends of one listener: their addresses, health state and role
//! ([`state`]), connection counts and meters ([`meters`]). Which of them a
//! new connection tries is [`crate::routing`]'s decision, made from what
//! this module records.

pub mod book;
pub mod meters;
pub mod state;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use self::book::{AddressBook, Lookup, Seen};
use self::meters::BackendMeters;
use self::state::{Change, CheckOutcome, Role, State, Tracker};
use crate::config::{BackendAddr, Listener, RoleWanted};

/// One backend.
pub struct Backend {
    pub addr: BackendAddr,
    /// Its addresses: as last resolved, and those new connections go to
    /// (fixed for IP backends; see [`book`]).
    book: Mutex<AddressBook>,
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

impl Backend {
    fn book(&self) -> std::sync::MutexGuard<'_, AddressBook> {
        // The book is consistent after every method: a panic elsewhere
        // while it was locked leaves nothing half-done.
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A backend's place in its listener's list, valid for one config
/// generation: a reload renumbers them ([`BackendSet::remap_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(usize);

impl BackendId {
    /// The position in the listener's `backends` list, from 0.
    pub fn index(self) -> usize {
        self.0
    }

    /// The id at `index`; only the crate's own bookkeeping (atomics that
    /// store the index) builds one from a number.
    pub(crate) fn from_index(index: usize) -> Self {
        BackendId(index)
    }
}

/// The backends of a listener.
///
/// A backend kept across a config reload (same address as written) is the
/// same [`Backend`]: its health, role, addresses and session count carry
/// over, so a reload does not reset what the checks learned.
pub struct BackendSet {
    backends: Vec<Arc<Backend>>,
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
        let gate = |addr: &BackendAddr| match (addr, listener.settings.routing.role, checked) {
            (BackendAddr::Dns { .. }, RoleWanted::Primary, true) => Some(Role::Primary),
            (BackendAddr::Dns { .. }, RoleWanted::Replica, true) => Some(Role::Replica),
            _ => None,
        };
        let (rise, fall) = listener
            .settings
            .check
            .as_ref()
            .map(|c| (c.rise, c.fall))
            .unwrap_or((
                crate::config::defaults::rise(),
                crate::config::defaults::fall(),
            ));
        let set = BackendSet {
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
                        if let BackendAddr::Dns { .. } = addr {
                            kept.book().set_gate(gate(addr));
                        }
                    }
                    kept.unwrap_or_else(|| {
                        Arc::new(Backend {
                            book: Mutex::new(match addr {
                                BackendAddr::Ip(ip) => AddressBook::fixed(vec![*ip]),
                                BackendAddr::Dns { .. } => AddressBook::named(gate(addr)),
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
        };
        for id in set.ids() {
            let book = set.book_of(id);
            set.meter_addresses(id, &book);
        }
        set
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Every backend, in the configured order.
    pub fn ids(&self) -> impl Iterator<Item = BackendId> {
        (0..self.backends.len()).map(BackendId)
    }

    /// Where each backend of `self` sits in `next` (by address as written);
    /// `None` for backends that `next` no longer lists.
    pub fn remap_to(&self, next: &BackendSet) -> Vec<Option<BackendId>> {
        self.backends
            .iter()
            .map(|b| {
                next.backends
                    .iter()
                    .position(|n| Arc::ptr_eq(n, b))
                    .map(BackendId)
            })
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

    pub fn meters(&self, backend: BackendId) -> &BackendMeters {
        &self.backends[backend.0].meters
    }

    /// Sessions open to `backend` now.
    pub fn active(&self, backend: BackendId) -> usize {
        self.backends[backend.0].active.load(Ordering::Relaxed)
    }

    /// The last check's outcome, if one ran.
    pub fn last_check(&self, backend: BackendId) -> Option<CheckOutcome> {
        self.tracker(backend).last().cloned()
    }

    pub fn addr(&self, backend: BackendId) -> &BackendAddr {
        &self.backends[backend.0].addr
    }

    /// The addresses new connections to the backend go to: as last
    /// resolved, or (gated, see [`book`]) those verified in the wanted
    /// role. Empty: never resolved, or nothing verified yet.
    pub fn addresses(&self, backend: BackendId) -> Vec<SocketAddr> {
        self.book_of(backend).serving().to_vec()
    }

    /// The latest lookup's answer (an IP backend: its address).
    pub fn resolved(&self, backend: BackendId) -> Vec<SocketAddr> {
        self.book_of(backend).answer().to_vec()
    }

    /// Addresses of the answer that do not serve yet (gated backends).
    pub fn held_back(&self, backend: BackendId) -> Vec<SocketAddr> {
        self.book_of(backend).held_back()
    }

    /// Whether new addresses wait for a check to confirm their role.
    pub fn gated(&self, backend: BackendId) -> bool {
        self.book_of(backend).gated()
    }

    /// Whether a connection without known addresses may look the name up
    /// itself (not when a check must verify addresses first).
    pub fn may_resolve_at_connect(&self, backend: BackendId) -> bool {
        !self.gated(backend)
    }

    /// Records a lookup's answer (see [`AddressBook::lookup`]).
    pub fn lookup(&self, backend: BackendId, answer: Vec<SocketAddr>) -> Lookup {
        let mut book = self.book_of(backend);
        let lookup = book.lookup(answer);
        self.meter_addresses(backend, &book);
        lookup
    }

    /// The addresses a check round should look at (see
    /// [`AddressBook::to_check`]).
    pub fn to_check(&self, backend: BackendId) -> Vec<SocketAddr> {
        self.book_of(backend).to_check()
    }

    /// Records what a check round found at each address; returns those
    /// that stopped serving for being down or in another role.
    pub fn addresses_checked(
        &self,
        backend: BackendId,
        seen: &[(SocketAddr, Seen)],
    ) -> Vec<SocketAddr> {
        let mut book = self.book_of(backend);
        let dropped = book.checked(seen);
        self.meter_addresses(backend, &book);
        dropped
    }

    fn meter_addresses(&self, backend: BackendId, book: &AddressBook) {
        self.backends[backend.0]
            .meters
            .set_addresses(book.serving().len(), book.held_back().len());
    }

    fn book_of(&self, backend: BackendId) -> std::sync::MutexGuard<'_, AddressBook> {
        self.backends[backend.0].book()
    }

    /// Asks the resolver of `backend` to look its name up now.
    pub fn resolve_now(&self, backend: BackendId) {
        self.backends[backend.0].resolve_now.notify_one();
    }

    /// Resolves when [`BackendSet::resolve_now`] is called for `backend`.
    pub async fn resolve_requested(&self, backend: BackendId) {
        self.backends[backend.0].resolve_now.notified().await;
    }

    /// A client of `backend` was answered "read-only" (see
    /// [`crate::health::hint`]): counted, and its check asked to run now.
    pub fn wrong_role_reply(&self, backend: BackendId) {
        self.backends[backend.0]
            .meters
            .wrong_role_replies
            .increment(1);
        self.check_now(backend);
    }

    /// Asks the check of `backend` to run now (no more than once per
    /// quarter interval: see `health::monitor`).
    pub fn check_now(&self, backend: BackendId) {
        self.backends[backend.0].check_now.notify_one();
    }

    /// Resolves when [`BackendSet::check_now`] was called for `backend`
    /// (at once if it was since the last wait).
    pub async fn check_requested(&self, backend: BackendId) {
        self.backends[backend.0].check_now.notified().await;
    }

    pub fn label(&self, backend: BackendId) -> &str {
        &self.backends[backend.0].label
    }

    fn tracker(&self, backend: BackendId) -> std::sync::MutexGuard<'_, Tracker> {
        // A panic while holding the lock cannot leave a Tracker half-updated
        // in a way that matters more than losing health data.
        self.backends[backend.0]
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn state(&self, backend: BackendId) -> State {
        self.tracker(backend).state()
    }

    pub fn role(&self, backend: BackendId) -> Option<Role> {
        self.tracker(backend).role()
    }

    /// State and role read together (one lock).
    pub fn state_and_role(&self, backend: BackendId) -> (State, Option<Role>) {
        let t = self.tracker(backend);
        (t.state(), t.role())
    }

    pub fn record(&self, backend: BackendId, outcome: CheckOutcome) -> Change {
        let b = &self.backends[backend.0];
        b.meters.check(outcome.status, outcome.latency);
        let mut t = self.tracker(backend);
        let change = t.record(outcome);
        b.meters.set_state(t.state(), t.role());
        change
    }

    pub fn connection_dead(&self, backend: BackendId) -> Change {
        let mut t = self.tracker(backend);
        let change = t.connection_dead(Instant::now());
        self.backends[backend.0]
            .meters
            .set_state(t.state(), t.role());
        change
    }

    /// Brings an unchecked suspect backend back up once no session to it
    /// was found dead for `hold` (see [`Tracker::expire_suspect`]).
    pub fn expire_suspect(&self, backend: BackendId, hold: Duration) -> Change {
        let mut t = self.tracker(backend);
        let change = t.expire_suspect(Instant::now(), hold);
        self.backends[backend.0]
            .meters
            .set_state(t.state(), t.role());
        change
    }

    /// A session to `backend` was answered at `at_ms` (watcher's clock).
    pub fn heard(&self, backend: BackendId, at_ms: u64) {
        self.backends[backend.0]
            .heard_at_ms
            .fetch_max(at_ms, Ordering::Relaxed);
    }

    /// When a session to `backend` was last answered (0: never seen).
    pub fn heard_at(&self, backend: BackendId) -> u64 {
        self.backends[backend.0].heard_at_ms.load(Ordering::Relaxed)
    }

    /// Counts a new connection to `backend` until the guard drops.
    pub fn opened(&self, backend: BackendId) -> ActiveGuard {
        let backend = self.backends[backend.0].clone();
        let now = backend.active.fetch_add(1, Ordering::Relaxed) + 1;
        backend.meters.active.set(now as f64);
        ActiveGuard { backend }
    }
}
