//! The liveness watcher: on-demand keepalive probes and the death rule of
//! DESIGN.md, applied to both legs of every session of a listener.
//!
//! One sweeper task per listener samples TCP_INFO. A quiet leg is put in
//! *probe mode*: TCP_KEEPIDLE is lowered to `probe_interval`, which makes the
//! kernel probe at once if the leg has been quiet that long, and again after
//! every `probe_interval` of quiet. The configured keepalive is restored when
//! data flows again. The death rule: a leg that owes an ACK (data in flight
//! or a probe out) and has received none for `dead_after`, counted from when
//! that debt began, is dead; a probe debt also needs a second probe out, so
//! one lost probe never evicts. A peer that keeps ACKing is alive however slowly
//! it reads. Legs whose verdict cannot change before a known time are not
//! sampled until then, which keeps the cost of 10,000 idle sessions low.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::{Liveness, SocketSettings};
use crate::evict::{EvictReason, Leg, Verdict};
use crate::sockopt::TcpInfo;

/// Tolerance for timing decisions. A session's visit comes round every sweep
/// period ± a millisecond, and a deadline set at one visit tends to fall a
/// few ms after a later one (probes leave at the phase of the visit that
/// armed them): without slack the verdict slips a whole sweep, about half
/// the time. 25 ms is 2.5 % of the smallest allowed `dead_after` and far
/// from the 0.86 s gaps of a live zero-window reader.
const SLACK_MS: u64 = 25;

/// Milliseconds on a monotonic clock that starts at 1 (0 means "unset").
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The parts of a session that the relay and the watcher share.
pub struct Watched {
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// Per leg (index [`leg_index`]): when the relay first wrote to it since
    /// the watcher last saw it owe nothing. 0 = nothing written since.
    pending_since: [AtomicU64; 2],
    /// Last time a byte was read from either leg.
    last_activity: AtomicU64,
    /// Which leg the last bytes came from ([`leg_index`]): bytes from the
    /// client last mean a request may be waiting for its answer.
    last_read_from: AtomicU64,
    /// Index of the backend this session is connected to, in the current
    /// config generation's backend list ([`REMOVED`] once a reload removed
    /// it).
    backend: AtomicUsize,
    verdict: OnceLock<Verdict>,
    wake: Notify,
}

/// The backend index of a session whose backend a reload removed.
pub const REMOVED: usize = usize::MAX;

/// Array index of a leg in [`Watched`].
pub fn leg_index(leg: Leg) -> usize {
    match leg {
        Leg::Client => 0,
        Leg::Upstream => 1,
    }
}

impl Watched {
    pub fn new(client: TcpStream, upstream: TcpStream, backend: usize) -> Self {
        let now = now_ms();
        Watched {
            client,
            upstream,
            pending_since: [AtomicU64::new(0), AtomicU64::new(0)],
            last_activity: AtomicU64::new(now),
            last_read_from: AtomicU64::new(leg_index(Leg::Upstream) as u64),
            backend: AtomicUsize::new(backend),
            verdict: OnceLock::new(),
            wake: Notify::new(),
        }
    }

    /// Index of its backend in the current generation's list.
    pub fn backend(&self) -> usize {
        self.backend.load(Ordering::Relaxed)
    }

    /// A reload renumbered the backends (or removed this one: [`REMOVED`]).
    pub fn set_backend(&self, backend: usize) {
        self.backend.store(backend, Ordering::Relaxed);
    }

    pub fn socket(&self, leg: Leg) -> &TcpStream {
        match leg {
            Leg::Client => &self.client,
            Leg::Upstream => &self.upstream,
        }
    }

    /// Called by the relay before it writes to `leg`.
    pub fn note_write(&self, leg: Leg) {
        let slot = &self.pending_since[leg_index(leg)];
        if slot.load(Ordering::Relaxed) == 0 {
            slot.store(now_ms(), Ordering::Relaxed);
        }
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

/// Durations of the death rule in milliseconds, for cheap arithmetic.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub probe_ms: u64,
    pub dead_after_ms: u64,
    pub sweep_ms: u64,
    /// The configured TCP_KEEPIDLE of this leg, restored after probe mode.
    pub keepidle_ms: u64,
}

impl Rule {
    pub fn new(liveness: &Liveness, socket: &SocketSettings) -> Self {
        Rule {
            probe_ms: liveness.probe_interval.as_millis() as u64,
            dead_after_ms: liveness.dead_after.as_millis() as u64,
            sweep_ms: liveness.sweep_period().as_millis() as u64,
            keepidle_ms: socket.keepalive_idle.as_millis() as u64,
        }
    }
}

/// What the watcher must do to a leg after assessing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// Lower TCP_KEEPIDLE to `probe_interval`: probe now and while quiet.
    Arm,
    /// Restore the configured TCP_KEEPIDLE: data flows again.
    Restore,
}

/// The outcome of one assessment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessment {
    pub action: Action,
    pub dead: Option<EvictReason>,
    /// How long the leg has owed an ACK (0 when it owes none).
    pub silent_ms: u64,
    /// A keepalive probe debt began at this sample (for the metrics).
    pub probe_unanswered: bool,
    /// The leg owes nothing: the relay's pending mark may be cleared.
    pub clear_pending: bool,
}

/// The watcher's memory of one leg.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LegState {
    /// TCP_KEEPIDLE is lowered (to `probe_idle_ms`).
    probing: bool,
    armed_at_ms: u64,
    /// The TCP_KEEPIDLE in effect while probing: `probe_interval`, or the
    /// kernel's minimum of 1 s when a suspect backend is probed on order.
    probe_idle_ms: u64,
    /// When the current ACK debt began, once known.
    debt_start_ms: Option<u64>,
    /// The verdict cannot change before this time unless the relay writes.
    next_check_ms: u64,
    /// `bytes_acked` at the last sample, and when it last moved (0: never
    /// seen to): data is only answered by ACKs that make progress.
    acked_seen: u64,
    progress_at_ms: u64,
}

impl LegState {
    /// The on-demand probe was just armed by order (a suspect backend) with
    /// TCP_KEEPIDLE = `idle_ms`: probe mode, and sample at the next visit.
    pub fn force_probe(&mut self, now_ms: u64, idle_ms: u64) {
        self.probing = true;
        self.armed_at_ms = now_ms;
        self.probe_idle_ms = idle_ms;
        self.next_check_ms = 0;
    }

    pub fn due(&self, now_ms: u64) -> bool {
        now_ms + SLACK_MS >= self.next_check_ms
    }

    /// Applies the death rule to one TCP_INFO sample taken at `now_ms`;
    /// `pending_ms` is the relay's first write since the leg was clear.
    pub fn assess(
        &mut self,
        info: &TcpInfo,
        now_ms: u64,
        pending_ms: u64,
        rule: &Rule,
    ) -> Assessment {
        let owes_data = info.unacked > 0;
        let owes_probe = info.probes > 0;
        let last_recv_ago = u64::from(info.last_data_recv_ms.min(info.last_ack_recv_ms));
        if info.bytes_acked != self.acked_seen {
            self.acked_seen = info.bytes_acked;
            self.progress_at_ms = now_ms.saturating_sub(u64::from(info.last_ack_recv_ms));
        }
        if !owes_data && !owes_probe {
            return self.assess_clear(info, now_ms, pending_ms, last_recv_ago, rule);
        }
        self.next_check_ms = now_ms + rule.sweep_ms;
        let window_probe = !owes_data && info.notsent_bytes > 0;
        let new_debt = self.debt_start_ms.is_none();
        let start = *self.debt_start_ms.get_or_insert_with(|| {
            if owes_data && pending_ms != 0 {
                pending_ms
            } else if owes_probe && !window_probe {
                // A keepalive probe leaves `keepidle` after the last thing
                // received, or at once when armed on a leg quiet longer.
                let keepidle = if self.probing {
                    self.probe_idle_ms
                } else {
                    rule.keepidle_ms
                };
                let fired = (now_ms.saturating_sub(last_recv_ago) + keepidle).max(self.armed_at_ms);
                fired.min(now_ms)
            } else {
                now_ms
            }
        });
        // Data in flight is answered only by an ACK that acknowledges some
        // of it: a one-way partition lets the peer's retransmissions in,
        // which refresh last_ack_recv without any progress. Probes are
        // answered by any ACK.
        let last_answer_ago = if owes_data {
            match self.progress_at_ms {
                0 => u64::MAX,
                at => now_ms.saturating_sub(at),
            }
        } else {
            u64::from(info.last_ack_recv_ms)
        };
        let silence = now_ms.saturating_sub(start).min(last_answer_ago);
        // A probe owes a verdict only once a second one went unanswered too:
        // a live receiver answers zero-window probes only every ~0.5-0.9 s,
        // and one keepalive probe can be lost (with 10,000 idle legs the
        // kernel's timer wheel sends ~1,250 probes in one 64 ms bucket, which
        // can overflow loopback's netdev_max_backlog). Data in flight needs
        // no such rule: the kernel retransmits it every RTO.
        let enough_probes = owes_data || info.probes >= 2;
        let dead =
            (silence + SLACK_MS >= rule.dead_after_ms && enough_probes).then_some(if owes_data {
                EvictReason::RetransmitUnanswered
            } else {
                EvictReason::ProbeUnanswered
            });
        Assessment {
            action: Action::None,
            dead,
            silent_ms: silence,
            probe_unanswered: new_debt && owes_probe && !owes_data && !window_probe,
            clear_pending: false,
        }
    }

    fn assess_clear(
        &mut self,
        info: &TcpInfo,
        now_ms: u64,
        pending_ms: u64,
        last_recv_ago: u64,
        rule: &Rule,
    ) -> Assessment {
        self.debt_start_ms = None;
        // Quiet means no data either way; probe ACKs do not count as traffic.
        let quiet_ms = u64::from(info.last_data_recv_ms.min(info.last_data_sent_ms));
        let quiet = quiet_ms >= rule.probe_ms;
        let action = match (quiet, self.probing) {
            (true, false) => {
                self.probing = true;
                self.armed_at_ms = now_ms;
                self.probe_idle_ms = rule.probe_ms;
                Action::Arm
            }
            (false, true) => {
                self.probing = false;
                Action::Restore
            }
            _ => Action::None,
        };
        self.next_check_ms = if self.probing && info.notsent_bytes == 0 {
            // Nothing can be declared dead before the next probe has gone
            // unanswered for dead_after.
            let next_probe =
                (now_ms.saturating_sub(last_recv_ago) + self.probe_idle_ms).max(now_ms);
            next_probe + rule.dead_after_ms
        } else if info.notsent_bytes == 0 {
            // Active: arm once the leg has been quiet for probe_interval.
            now_ms + rule.probe_ms.saturating_sub(quiet_ms).max(rule.sweep_ms)
        } else {
            now_ms + rule.sweep_ms
        };
        Assessment {
            action,
            dead: None,
            silent_ms: 0,
            probe_unanswered: false,
            clear_pending: pending_ms != 0,
        }
    }
}

mod watcher;

pub use watcher::{spawn_watcher, WatcherHandle};

#[cfg(test)]
mod tests;
