//! The death rule of one leg over its TCP_INFO samples: when it owes an
//! ACK, since when, how many of its exchanges went unanswered, and whether
//! its own evidence is enough to ask for a verdict. Pure: every decision
//! takes the time as an argument, so it is tested without sockets.
//!
//! A leg's own evidence only *suspects*; [`super::verdict`] decides whether
//! the suspicion is corroborated (by the other legs to the same host, by a
//! fresh connect, or by enough unanswered exchanges of its own for the loss
//! measured on that link).

use crate::config::{Liveness, SocketSettings};
use crate::evict::EvictReason;
use crate::sockopt::TcpInfo;

/// Tolerance for timing decisions. A session's visit comes round every sweep
/// period ± a millisecond, and a deadline set at one visit tends to fall a
/// few ms after a later one (probes leave at the phase of the visit that
/// armed them): without slack the verdict slips a whole sweep, about half
/// the time. 25 ms is 2.5 % of the smallest allowed `dead_after` and far
/// from the 0.86 s gaps of a live zero-window reader.
pub const SLACK_MS: u64 = 25;

/// The shortest time a sent probe or segment is given to be answered
/// before it counts as lost: Linux's minimum RTO.
const MIN_ANSWER_MS: u64 = 200;

/// Durations of the death rule in milliseconds, for cheap arithmetic.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub probe_ms: u64,
    pub dead_after_ms: u64,
    pub sweep_ms: u64,
    /// The configured TCP_KEEPIDLE of this leg, restored after probe mode.
    pub keepidle_ms: u64,
    /// TCP_KEEPINTVL: how far apart the kernel re-sends an unanswered probe.
    pub keepintvl_ms: u64,
}

impl Rule {
    pub fn new(liveness: &Liveness, socket: &SocketSettings) -> Self {
        Rule {
            probe_ms: liveness.probe_interval.as_millis() as u64,
            dead_after_ms: liveness.dead_after.as_millis() as u64,
            sweep_ms: liveness.sweep_period().as_millis() as u64,
            keepidle_ms: socket.keepalive_idle.as_millis() as u64,
            keepintvl_ms: socket.keepalive_interval.as_millis() as u64,
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

/// What a leg owes, which decides what answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebtKind {
    /// A keepalive probe is out: any ACK answers it.
    Keepalive,
    /// Bytes wait for a zero window to open; window probes are out.
    Window,
    /// Data is in flight: only an ACK that acknowledges some of it, or a
    /// pure ACK (the peer heard us), answers it.
    Data,
}

impl DebtKind {
    pub fn reason(self) -> EvictReason {
        match self {
            DebtKind::Data => EvictReason::RetransmitUnanswered,
            DebtKind::Keepalive | DebtKind::Window => EvictReason::ProbeUnanswered,
        }
    }
}

/// A leg's own evidence of death, once it suffices to ask for a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    pub kind: DebtKind,
    /// When its silence began: the later of when it began to owe an ACK
    /// and when it was last answered. Anything its host answered after
    /// this proves the host alive.
    pub silent_since_ms: u64,
    /// How long it has owed one without an answer.
    pub silent_ms: u64,
    /// Its exchanges known to be lost: probes or transmissions that went
    /// unanswered for longer than an answer takes.
    pub lost: u32,
}

impl Evidence {
    pub fn reason(&self) -> EvictReason {
        self.kind.reason()
    }
}

/// One sample's contribution to the link's loss estimate. Only losses
/// that were made good count: a probe that went unanswered before one was
/// answered, a segment re-sent and then acknowledged. The silence of a
/// connection that is dying is not loss on the link, and counting it would
/// make a dead host look like a lossy one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trials {
    /// Keepalive probes seen answered since the last sample.
    pub probes_answered: u32,
    /// Keepalive probes seen unanswered (a probe debt began).
    pub probes_lost: u32,
    /// Data segments sent, and retransmitted, since the last sample.
    pub segments: u32,
    pub retransmitted: u32,
}

/// The outcome of one assessment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessment {
    pub action: Action,
    /// The leg's own evidence suffices to ask for a verdict.
    pub suspect: Option<Evidence>,
    /// How long the leg has owed an ACK (0 when it owes none).
    pub silent_ms: u64,
    /// A keepalive probe debt began at this sample (for the metrics).
    pub probe_unanswered: bool,
    /// The leg owes nothing: the relay's pending mark may be cleared.
    pub clear_pending: bool,
    /// When the peer last answered something that counts as an answer.
    pub heard_at_ms: Option<u64>,
    pub trials: Trials,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Debt {
    kind: DebtKind,
    start_ms: u64,
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
    debt: Option<Debt>,
    /// The verdict cannot change before this time unless the relay writes.
    pub(super) next_check_ms: u64,
    /// `bytes_acked` and the pure ACKs received at the last sample, and
    /// when the peer last answered data (0: never seen to).
    acked_seen: u64,
    pure_acks_seen: u32,
    progress_at_ms: u64,
    /// The last sample's time and counters, for the loss estimate.
    sampled_ms: u64,
    segs_out_seen: u32,
    retrans_seen: u32,
    /// Segments sent and re-sent since the leg was last seen answered,
    /// and the most keepalive probes out during the current debt: counted
    /// once answered.
    unsettled: Trials,
    probes_max: u8,
    /// When the leg's own evidence first sufficed (0: it does not now).
    suspected_at_ms: u64,
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

    /// When the leg's own evidence first sufficed for a verdict, if it does.
    pub fn suspected_since(&self) -> Option<u64> {
        (self.suspected_at_ms != 0).then_some(self.suspected_at_ms)
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
        self.count_segments(info);
        let progressed = self.note_answers(info, now_ms);
        let kind = if info.unacked > 0 {
            DebtKind::Data
        } else if info.probes > 0 && info.notsent_bytes > 0 {
            DebtKind::Window
        } else if info.probes > 0 {
            DebtKind::Keepalive
        } else {
            let settled = self.settle();
            let mut a = self.assess_clear(info, now_ms, pending_ms, rule);
            a.trials.segments = settled.segments;
            a.trials.retransmitted = settled.retransmitted;
            a.trials.probes_lost = settled.probes_lost;
            self.sampled_ms = now_ms;
            return a;
        };
        self.next_check_ms = now_ms + rule.sweep_ms;
        // A new debt, or one of another kind (a write after an unanswered
        // probe owes from the write, not from the probe).
        let new_debt = self.debt.is_none_or(|d| d.kind != kind);
        if new_debt {
            let start_ms = self.debt_start(kind, info, now_ms, pending_ms, rule);
            self.debt = Some(Debt { kind, start_ms });
            self.suspected_at_ms = 0;
        }
        let start = self.debt.map_or(now_ms, |d| d.start_ms);
        let last_answer_ago = match kind {
            DebtKind::Data => match self.progress_at_ms {
                0 => u64::MAX,
                at => now_ms.saturating_sub(at),
            },
            DebtKind::Keepalive | DebtKind::Window => u64::from(info.last_ack_recv_ms),
        };
        let silence = now_ms.saturating_sub(start).min(last_answer_ago);
        let lost = lost_exchanges(kind, info, start, now_ms, rule);
        // Own evidence suffices to ask once the leg has been silent for
        // dead_after and the kernel has tried again: a second probe out (one
        // probe can be lost, and a live zero-window reader answers only every
        // ~0.5-0.9 s), or two retransmissions, i.e. two RTOs of this leg,
        // however far its peer is.
        let tried_again = match kind {
            DebtKind::Data => info.retransmits >= 2,
            DebtKind::Keepalive | DebtKind::Window => info.probes >= 2,
        };
        let suspect = (silence + SLACK_MS >= rule.dead_after_ms && tried_again).then(|| {
            if self.suspected_at_ms == 0 {
                self.suspected_at_ms = now_ms;
            }
            Evidence {
                kind,
                silent_since_ms: now_ms.saturating_sub(silence),
                silent_ms: silence,
                lost,
            }
        });
        let probe_unanswered = new_debt && kind == DebtKind::Keepalive;
        if kind == DebtKind::Keepalive {
            self.probes_max = self.probes_max.max(info.probes);
        }
        // Data still moving, nothing waiting on an RTO: what was re-sent
        // so far was made good.
        let trials = if kind == DebtKind::Data && progressed && info.retransmits == 0 {
            self.settle()
        } else {
            Trials::default()
        };
        self.sampled_ms = now_ms;
        Assessment {
            action: Action::None,
            suspect,
            silent_ms: silence,
            probe_unanswered,
            clear_pending: false,
            heard_at_ms: self.heard_at(kind, info, now_ms),
            trials,
        }
    }

    /// Adds the data segments sent and re-sent since the last sample to
    /// what awaits an answer.
    fn count_segments(&mut self, info: &TcpInfo) {
        let first = self.sampled_ms == 0;
        let segments = info.data_segs_out.wrapping_sub(self.segs_out_seen);
        let retransmitted = info.total_retrans.wrapping_sub(self.retrans_seen);
        self.segs_out_seen = info.data_segs_out;
        self.retrans_seen = info.total_retrans;
        if !first {
            self.unsettled.segments += segments;
            self.unsettled.retransmitted += retransmitted.min(segments);
        }
    }

    /// The leg was answered: what it lost on the way counts now. A probe
    /// debt lost every probe but the one answered (and at least the one
    /// that made it a debt).
    fn settle(&mut self) -> Trials {
        let mut settled = std::mem::take(&mut self.unsettled);
        if self.probes_max > 0 {
            settled.probes_lost = u32::from(self.probes_max.saturating_sub(1).max(1));
            self.probes_max = 0;
        }
        settled
    }

    /// Data in flight is answered only by ACKs that make progress, or by a
    /// pure ACK: a one-way partition lets the peer's retransmissions in,
    /// which refresh `last_ack_recv` without acknowledging anything, while a
    /// receiver under memory pressure answers with window-0 ACKs that
    /// acknowledge nothing either but prove it hears us.
    /// Returns whether data was answered since the last sample.
    fn note_answers(&mut self, info: &TcpInfo, now_ms: u64) -> bool {
        let answered_at = now_ms.saturating_sub(u64::from(info.last_ack_recv_ms));
        let pure_acks = info.segs_in.wrapping_sub(info.data_segs_in);
        let mut progressed = false;
        if info.bytes_acked != self.acked_seen {
            self.acked_seen = info.bytes_acked;
            self.progress_at_ms = answered_at;
            progressed = true;
        } else if self.sampled_ms != 0 && pure_acks != self.pure_acks_seen {
            self.progress_at_ms = self.progress_at_ms.max(answered_at);
            progressed = true;
        }
        self.pure_acks_seen = pure_acks;
        progressed
    }

    fn debt_start(
        &self,
        kind: DebtKind,
        info: &TcpInfo,
        now_ms: u64,
        pending_ms: u64,
        rule: &Rule,
    ) -> u64 {
        match kind {
            DebtKind::Data if pending_ms != 0 => {
                // Never before the debt it replaces ended (a stale mark).
                pending_ms
                    .max(self.debt.map_or(0, |d| d.start_ms))
                    .min(now_ms)
            }
            DebtKind::Keepalive => {
                // A keepalive probe leaves `keepidle` after the last thing
                // received, or at once when armed on a leg quiet longer.
                let keepidle = if self.probing {
                    self.probe_idle_ms
                } else {
                    rule.keepidle_ms
                };
                let last_recv_ago = u64::from(info.last_data_recv_ms.min(info.last_ack_recv_ms));
                let fired = (now_ms.saturating_sub(last_recv_ago) + keepidle).max(self.armed_at_ms);
                fired.min(now_ms)
            }
            DebtKind::Data | DebtKind::Window => now_ms,
        }
    }

    fn heard_at(&self, kind: DebtKind, info: &TcpInfo, now_ms: u64) -> Option<u64> {
        match kind {
            DebtKind::Data => (self.progress_at_ms != 0).then_some(self.progress_at_ms),
            DebtKind::Keepalive | DebtKind::Window => {
                Some(now_ms.saturating_sub(u64::from(info.last_ack_recv_ms)))
            }
        }
    }

    fn assess_clear(
        &mut self,
        info: &TcpInfo,
        now_ms: u64,
        pending_ms: u64,
        rule: &Rule,
    ) -> Assessment {
        self.debt = None;
        self.suspected_at_ms = 0;
        let last_recv_ago = u64::from(info.last_data_recv_ms.min(info.last_ack_recv_ms));
        // A probe of a quiet leg was answered since the last sample.
        let answered = self.probing
            && self.sampled_ms != 0
            && u64::from(info.last_ack_recv_ms) < now_ms.saturating_sub(self.sampled_ms)
            && u64::from(info.last_data_recv_ms) >= rule.probe_ms;
        // Quiet means no data either way; probe ACKs do not count as traffic.
        let quiet_ms = u64::from(info.last_data_recv_ms.min(info.last_data_sent_ms));
        let quiet = if self.probing && self.probe_idle_ms < rule.probe_ms {
            // A probe forced by order (a suspect backend) stays armed until
            // it is answered or data flows: the kernel sends it from its
            // timer a moment after the setsockopt, so a sample may come
            // first and see no probe out yet.
            let answered_since_armed =
                u64::from(info.last_ack_recv_ms) < now_ms.saturating_sub(self.armed_at_ms);
            quiet_ms >= self.probe_idle_ms && !answered_since_armed
        } else {
            quiet_ms >= rule.probe_ms
        };
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
            suspect: None,
            silent_ms: 0,
            probe_unanswered: false,
            clear_pending: pending_ms != 0,
            heard_at_ms: Some(now_ms.saturating_sub(u64::from(info.last_ack_recv_ms))),
            trials: Trials {
                // A quiet leg sends a probe every probe_idle: as many were
                // answered since the last sample.
                probes_answered: if answered {
                    (now_ms.saturating_sub(self.sampled_ms) / self.probe_idle_ms.max(1))
                        .clamp(1, 10) as u32
                } else {
                    0
                },
                ..Trials::default()
            },
        }
    }
}

/// How long an answer to something sent on this leg takes at most, before
/// it counts as lost: the leg's RTO (which the kernel keeps at SRTT plus
/// four deviations), and never less than Linux's minimum RTO.
pub fn answer_window_ms(info: &TcpInfo) -> u64 {
    (u64::from(info.rto_us) / 1000).max(MIN_ANSWER_MS)
}

/// The leg's exchanges known to be lost. Data: each retransmission is sent
/// because the previous transmission went unanswered for an RTO. Probes:
/// every probe out except the latest, which counts once it has been out
/// longer than an answer takes (on a 300 ms link, a retry that just left
/// proves nothing yet).
fn lost_exchanges(kind: DebtKind, info: &TcpInfo, start: u64, now_ms: u64, rule: &Rule) -> u32 {
    let probes = u32::from(info.probes);
    match kind {
        DebtKind::Data => u32::from(info.retransmits),
        DebtKind::Window => probes.saturating_sub(1),
        DebtKind::Keepalive => {
            let latest = start + u64::from(probes.saturating_sub(1)) * rule.keepintvl_ms;
            let in_flight = now_ms.saturating_sub(latest) < answer_window_ms(info);
            probes.saturating_sub(u32::from(in_flight))
        }
    }
}

#[cfg(test)]
mod tests;
