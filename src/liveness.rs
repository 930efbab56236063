//! The liveness watcher: on-demand keepalive probes, the death rule, and
//! verdicts corroborated by the host, applied to both legs of every
//! session of a listener.
//!
//! One sweeper task per listener (`watcher`) samples TCP_INFO. A quiet
//! leg is put in *probe mode*: TCP_KEEPIDLE is lowered to `probe_interval`,
//! which makes the kernel probe at once if the leg has been quiet that
//! long, and again after every `probe_interval` of quiet. The configured
//! keepalive is restored when data flows again.
//!
//! The death rule ([`leg`]): a leg that owes an ACK (data in flight or a
//! probe out) and has been answered by nothing for `dead_after`, counted
//! from when that debt began, and whose kernel has tried again (a second
//! probe out, or two retransmissions, i.e. two of the leg's own RTOs), is
//! *suspected*. A peer that keeps ACKing is alive however slowly it reads.
//!
//! A suspicion becomes a verdict only when corroborated ([`verdict`]): by
//! the other legs to the same host and by fresh connects to it (a dead host
//! silences them all; then every leg to it is evicted at once), or by
//! enough unanswered exchanges of its own for the loss measured on that
//! link. Legs whose verdict cannot change before a known time are not
//! sampled until then, which keeps the cost of 10,000 idle sessions low.

pub mod bounds;
pub mod leg;
pub mod verdict;
mod watcher;

pub use leg::{Action, Assessment, DebtKind, Evidence, LegState, Rule};
pub use watcher::{spawn_watcher, Suspect, Suspicions, WatcherHandle};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::backend::BackendId;
use crate::evict::{EvictReason, Leg, Verdict};

/// Milliseconds on a monotonic clock that starts at 1 (0 means "unset").
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The parts of a session that the relay and the watcher share.
pub struct Watched {
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// The client's address as the session knows it: the socket's peer, or
    /// the source of the PROXY header it sent (`accept_proxy`).
    pub client_addr: SocketAddr,
    /// Per leg (index [`leg_index`]): the socket's peer, as `accept` and
    /// `connect` returned it (the watcher groups legs by host with it).
    pub peers: [SocketAddr; 2],
    /// Per leg (index [`leg_index`]): when the relay first wrote to it since
    /// the watcher last saw it owe nothing. 0 = nothing written since.
    pending_since: [AtomicU64; 2],
    /// Per leg: writes the relay made to it, counted. The watcher clears a
    /// pending mark only if the count did not move since just before the
    /// sample that saw the leg owe nothing (a count, not a time: no clock
    /// read per write).
    writes: [AtomicU64; 2],
    /// Last time a byte was read from either leg.
    last_activity: AtomicU64,
    /// Which leg the last bytes came from ([`leg_index`]): bytes from the
    /// client last mean a request may be waiting for its answer.
    last_read_from: AtomicU64,
    /// The index of the backend this session is connected to, in the
    /// current config generation's backend list ([`REMOVED`] once a reload
    /// removed it).
    backend: AtomicUsize,
    /// A busy session of a backend that is going away (down, lost its
    /// role, removed): [`STAYING`], [`AWAITING_ANSWER`] or [`ANSWERED`].
    leaving: AtomicU8,
    leaving_reason: OnceLock<EvictReason>,
    verdict: OnceLock<Verdict>,
    wake: Notify,
}

/// [`Watched::leaving`]: not leaving.
const STAYING: u8 = 0;
/// Leaving once the request in flight has its answer and the client asks
/// again.
const AWAITING_ANSWER: u8 = 1;
/// Leaving at the client's next request.
const ANSWERED: u8 = 2;

/// The backend index of a session whose backend a reload removed.
const REMOVED: usize = usize::MAX;

/// Array index of a leg in [`Watched`].
pub fn leg_index(leg: Leg) -> usize {
    match leg {
        Leg::Client => 0,
        Leg::Upstream => 1,
    }
}

impl Watched {
    pub fn new(
        client: TcpStream,
        client_addr: SocketAddr,
        upstream: TcpStream,
        peers: [SocketAddr; 2],
        backend: BackendId,
    ) -> Self {
        let now = now_ms();
        Watched {
            client,
            upstream,
            client_addr,
            peers,
            pending_since: [AtomicU64::new(0), AtomicU64::new(0)],
            writes: [AtomicU64::new(0), AtomicU64::new(0)],
            last_activity: AtomicU64::new(now),
            last_read_from: AtomicU64::new(leg_index(Leg::Upstream) as u64),
            backend: AtomicUsize::new(backend.index()),
            leaving: AtomicU8::new(STAYING),
            leaving_reason: OnceLock::new(),
            verdict: OnceLock::new(),
            wake: Notify::new(),
        }
    }

    /// Index of its backend in the current generation's list.
    pub fn backend(&self) -> Option<BackendId> {
        match self.backend.load(Ordering::Relaxed) {
            REMOVED => None,
            index => Some(BackendId::from_index(index)),
        }
    }

    /// A reload renumbered the backends (or removed this one: `None`).
    pub fn set_backend(&self, backend: Option<BackendId>) {
        let index = backend.map_or(REMOVED, BackendId::index);
        self.backend.store(index, Ordering::Relaxed);
    }

    pub fn socket(&self, leg: Leg) -> &TcpStream {
        match leg {
            Leg::Client => &self.client,
            Leg::Upstream => &self.upstream,
        }
    }

    /// Called by the relay after each write to `leg` (once the bytes are
    /// in the kernel, so a sample that sees nothing owed came before it).
    pub fn note_write(&self, leg: Leg) {
        let i = leg_index(leg);
        // One task writes to a leg (the pump towards it): a load and a
        // store, no locked read-modify-write.
        let writes = self.writes[i].load(Ordering::Relaxed);
        self.writes[i].store(writes.wrapping_add(1), Ordering::Release);
        if self.pending_since[i].load(Ordering::Relaxed) == 0 {
            self.pending_since[i].store(now_ms(), Ordering::Relaxed);
        }
    }

    /// The relay's first write to `leg` since it was last seen clear, and
    /// how many writes it made so far; read before sampling the leg.
    pub(crate) fn pending(&self, leg: Leg) -> (u64, u64) {
        let i = leg_index(leg);
        let writes = self.writes[i].load(Ordering::Acquire);
        (self.pending_since[i].load(Ordering::Relaxed), writes)
    }

    /// Clears the pending mark `seen` of `leg`, unless the relay wrote
    /// again since [`Watched::pending`] returned `writes` (before the
    /// sample that saw the leg clear).
    pub(crate) fn clear_pending(&self, leg: Leg, (seen, writes): (u64, u64)) {
        let i = leg_index(leg);
        if self.writes[i].load(Ordering::Acquire) != writes {
            return;
        }
        let _ =
            self.pending_since[i].compare_exchange(seen, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Called by the relay after it read bytes from `leg`.
    pub fn note_read(&self, leg: Leg) {
        self.last_activity.store(now_ms(), Ordering::Relaxed);
        self.last_read_from
            .store(leg_index(leg) as u64, Ordering::Relaxed);
    }

    /// The client spoke last: a request may be waiting for its answer.
    pub fn client_spoke_last(&self) -> bool {
        self.last_read_from.load(Ordering::Relaxed) == leg_index(Leg::Client) as u64
    }

    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_activity.load(Ordering::Relaxed)))
    }

    /// The session's backend is going away but the session is busy: it
    /// ends when its client asks again after the answer in flight (that
    /// request would reach the server that is going away), or at the
    /// grace deadline the watcher keeps, whichever comes first. A client
    /// that streams without waiting for answers (an upload) is not cut
    /// short: only a request after an answer ends the session.
    pub fn leave(&self, reason: EvictReason) {
        let _ = self.leaving_reason.set(reason);
        let state = if self.client_spoke_last() {
            AWAITING_ANSWER
        } else {
            ANSWERED
        };
        let _ = self
            .leaving
            .compare_exchange(STAYING, state, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Called by the relay when it read from `leg`, before forwarding:
    /// returns the eviction reason if these bytes are a client's next
    /// request in a leaving session (they are then not forwarded, and the
    /// session is evicted).
    pub fn leaving_at_read(&self, leg: Leg) -> Option<EvictReason> {
        match (self.leaving.load(Ordering::Relaxed), leg) {
            (STAYING, _) => None,
            (AWAITING_ANSWER, Leg::Upstream) => {
                self.leaving.store(ANSWERED, Ordering::Relaxed);
                None
            }
            (ANSWERED, Leg::Client) => {
                let reason = self.leaving_reason.get().copied()?;
                self.evict(Verdict::decided(Leg::Upstream, reason));
                Some(reason)
            }
            _ => None,
        }
    }

    /// Records a verdict (the first one wins) and wakes the session.
    pub fn evict(&self, verdict: Verdict) {
        if self.verdict.set(verdict).is_ok() {
            self.wake.notify_one();
        }
    }

    pub fn verdict(&self) -> Option<Verdict> {
        self.verdict.get().copied()
    }

    /// Resolves once a verdict was recorded.
    pub async fn evicted(&self) -> Verdict {
        loop {
            if let Some(v) = self.verdict() {
                return v;
            }
            self.wake.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn watched() -> Watched {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (upstream, peer) = listener.accept().await.unwrap();
        Watched::new(
            client,
            peer,
            upstream,
            [addr, peer],
            BackendId::from_index(0),
        )
    }

    #[tokio::test]
    async fn a_write_after_the_sample_keeps_the_pending_mark() {
        let w = watched().await;
        assert_eq!(w.pending(Leg::Upstream), (0, 0));
        w.note_write(Leg::Upstream);
        let marks = w.pending(Leg::Upstream);
        assert_ne!(marks.0, 0);
        // The watcher sampled the leg clear, then the relay wrote again
        // before the mark was cleared: the new bytes are owed.
        w.note_write(Leg::Upstream);
        w.clear_pending(Leg::Upstream, marks);
        assert_eq!(w.pending(Leg::Upstream).0, marks.0);
        // No write since the marks were read: cleared.
        let marks = w.pending(Leg::Upstream);
        w.clear_pending(Leg::Upstream, marks);
        assert_eq!(w.pending(Leg::Upstream).0, 0);
        assert_eq!(w.pending(Leg::Client), (0, 0), "legs are apart");
    }

    #[tokio::test]
    async fn a_leaving_session_ends_at_a_request_after_an_answer_only() {
        let reason = EvictReason::BackendDown;
        // The client is uploading (it spoke last): more of it goes on.
        let w = watched().await;
        w.note_read(Leg::Client);
        w.leave(reason);
        assert_eq!(w.leaving_at_read(Leg::Client), None);
        w.note_read(Leg::Client);
        assert_eq!(w.leaving_at_read(Leg::Client), None);
        assert!(w.verdict().is_none());
        // The answer comes; the client's next request ends the session.
        assert_eq!(w.leaving_at_read(Leg::Upstream), None);
        w.note_read(Leg::Upstream);
        assert_eq!(w.leaving_at_read(Leg::Client), Some(reason));
        assert_eq!(w.verdict().map(|v| v.reason), Some(reason));

        // Already answered when it was told to leave (busy only by bytes
        // the client had not ACKed yet): its next request ends it.
        let w = watched().await;
        w.note_read(Leg::Upstream);
        w.leave(reason);
        assert_eq!(w.leaving_at_read(Leg::Upstream), None);
        assert_eq!(w.leaving_at_read(Leg::Client), Some(reason));

        // Not leaving: nothing happens.
        let w = watched().await;
        assert_eq!(w.leaving_at_read(Leg::Client), None);
        assert!(w.verdict().is_none());
    }
}
