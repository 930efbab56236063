//! Verdicts that need corroboration: when a leg's own silence is enough to
//! call it dead, and when it must be backed by the rest of what pulsegate
//! knows about the host at the other end.
//!
//! A host that died silences every connection to it at once; a lost probe
//! silences one. So a leg that went unanswered is judged with its host:
//!
//! - if another leg to the same host was answered after this one went
//!   silent, or a fresh connect to the host is answered, the host is alive
//!   and this leg is dead only on its own evidence: enough unanswered
//!   exchanges that, at the loss measured on this link, a live connection
//!   would show them less than once in a million session-hours (a flow a
//!   NAT forgot is still found, only later);
//! - if nothing to the host answers — its other legs owe ACKs too, and the
//!   fresh connects go unanswered — and the exchanges lost across all of
//!   them reach that same count, the host is gone and every leg to it is
//!   evicted at once.
//!
//! Pure: the watcher gathers the evidence, these functions weigh it.

/// The rate of false verdicts pulsegate is built to stay under: one per
/// million session-hours.
pub const FALSE_VERDICTS_PER_SESSION_HOUR: f64 = 1e-6;
/// The loss assumed for a link before (and however little) it has shown
/// any: a probe exchange lost one time in a thousand.
pub const LOSS_FLOOR: f64 = 0.001;
/// Above this estimated exchange loss the count stops growing: a link that
/// loses a quarter of its exchanges is not one to keep sessions on.
pub const LOSS_CEILING: f64 = 0.25;
/// Never more unanswered exchanges than this are asked for; with a 1 s
/// keepalive interval it bounds the detection of a dead flow on a live host.
pub const MAX_NEEDED: u32 = 12;
/// Fewest: a single unanswered exchange is never proof.
pub const MIN_NEEDED: u32 = 2;
/// Loss counts lose half their weight every this many milliseconds, so the
/// estimate follows a link that gets better or worse within minutes.
const HALF_LIFE_MS: f64 = 60_000.0;
/// Fresh connects asked for at most per corroboration.
pub const MAX_CONNECTS: u32 = 6;

/// How many exchanges in a row must go unanswered before a live
/// connection's silence is less likely than [`FALSE_VERDICTS_PER_SESSION_HOUR`],
/// when an exchange (a probe and its answer) is lost with probability
/// `loss` and a leg is probed every `probe_interval_ms`.
///
/// A live leg probed `n` times an hour shows `k` losses in a row starting
/// at any of them with probability about `n · loss^k`.
pub fn needed(loss: f64, probe_interval_ms: u64) -> u32 {
    let loss = loss.clamp(LOSS_FLOOR, LOSS_CEILING);
    let per_hour = 3_600_000.0 / probe_interval_ms.max(1) as f64;
    let k = (FALSE_VERDICTS_PER_SESSION_HOUR / per_hour).ln() / loss.ln();
    (k.ceil() as u32).clamp(MIN_NEEDED, MAX_NEEDED)
}

/// The highest exchange loss at which [`needed`] still meets its target
/// with [`MAX_NEEDED`] exchanges: the worst link pulsegate tolerates.
pub fn tolerated_loss(probe_interval_ms: u64) -> f64 {
    let per_hour = 3_600_000.0 / probe_interval_ms.max(1) as f64;
    (FALSE_VERDICTS_PER_SESSION_HOUR / per_hour)
        .powf(1.0 / f64::from(MAX_NEEDED))
        .min(LOSS_CEILING)
}

/// A link's loss, learned from what its legs' kernels report: keepalive
/// probes answered or not, and data segments re-sent. Old observations
/// fade with a half-life of a minute.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkLoss {
    probes: f64,
    probes_lost: f64,
    segments: f64,
    retransmitted: f64,
    at_ms: u64,
}

impl LinkLoss {
    /// Adds one sample's observations, made at `now_ms`.
    pub fn record(&mut self, trials: &super::leg::Trials, now_ms: u64) {
        if trials == &super::leg::Trials::default() {
            return;
        }
        self.fade(now_ms);
        self.probes += f64::from(trials.probes_answered + trials.probes_lost);
        self.probes_lost += f64::from(trials.probes_lost);
        self.segments += f64::from(trials.segments);
        self.retransmitted += f64::from(trials.retransmitted);
    }

    fn fade(&mut self, now_ms: u64) {
        if self.at_ms != 0 && now_ms > self.at_ms {
            let keep = 0.5f64.powf((now_ms - self.at_ms) as f64 / HALF_LIFE_MS);
            self.probes *= keep;
            self.probes_lost *= keep;
            self.segments *= keep;
            self.retransmitted *= keep;
        }
        self.at_ms = now_ms;
    }

    /// The estimated chance that one exchange (a probe or segment and its
    /// answer) is lost. A re-sent segment means it or its ACK was lost, so
    /// the segment rate is doubled for a round trip. A handful of
    /// observations weigh little: they are mixed with [`LOSS_FLOOR`] as if
    /// it had been seen over 20 exchanges.
    pub fn exchange_loss(&self) -> f64 {
        const PRIOR: f64 = 20.0;
        let probe = (self.probes_lost + PRIOR * LOSS_FLOOR) / (self.probes + PRIOR);
        let segment =
            2.0 * (self.retransmitted + PRIOR * LOSS_FLOOR / 2.0) / (self.segments + PRIOR);
        probe.max(segment).clamp(LOSS_FLOOR, 1.0)
    }
}

/// What the rest of pulsegate knows about the host of a suspected leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostEvidence {
    /// Another leg to the host, or a fresh connect, was answered after
    /// this leg went silent.
    pub answered: bool,
    /// Exchanges lost on the host's other legs while this one was silent:
    /// each other leg owing an ACK for longer than an answer takes counts
    /// as one.
    pub witnesses: u32,
    /// Fresh connects made after this leg went silent that went
    /// unanswered.
    pub connects_unanswered: u32,
    /// Fresh connects to the host are under way.
    pub connects_pending: bool,
    /// The host was already judged gone, and nothing answered since.
    pub judged_dead: bool,
}

/// What corroboration concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Dead on the leg's own evidence (its host may live).
    EvictAlone,
    /// The host is gone: evict this leg and every other leg to it.
    EvictHost,
    /// Not yet: wait for more of the leg's own evidence (or the host's).
    Wait,
    /// Not yet: ask the host with this many fresh connects.
    Connect(u32),
}

/// Weighs a suspected leg's `own_lost` exchanges against the `needed`
/// count, with what is known of its host. `can_connect` says whether a
/// fresh connect can ask the host (an upstream; never a client).
pub fn decide(own_lost: u32, needed: u32, host: &HostEvidence, can_connect: bool) -> Decision {
    if own_lost >= needed {
        return Decision::EvictAlone;
    }
    if host.answered {
        return Decision::Wait;
    }
    if host.judged_dead {
        return Decision::EvictHost;
    }
    let total = own_lost + host.witnesses + host.connects_unanswered;
    if total >= needed {
        return Decision::EvictHost;
    }
    if can_connect && !host.connects_pending && host.connects_unanswered == 0 {
        return Decision::Connect((needed - total).clamp(1, MAX_CONNECTS));
    }
    Decision::Wait
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::leg::Trials;

    #[test]
    fn the_count_grows_with_the_loss_of_the_link() {
        // probe_interval 1 s: 3,600 chances an hour, so loss^k ≤ 2.8e-10.
        assert_eq!(needed(0.0, 1000), 4, "a clean link (the floor, 0.1 %)");
        assert_eq!(needed(0.02, 1000), 6);
        assert_eq!(needed(1.0 - 0.98f64 * 0.98, 1000), 7, "2 % each way");
        assert_eq!(needed(1.0 - 0.95f64 * 0.95, 1000), 10, "5 % each way");
        assert_eq!(needed(0.9, 1000), MAX_NEEDED);
        // Probed less often, fewer chances to be unlucky.
        assert!(needed(0.04, 30_000) < needed(0.04, 1000));
        let worst = tolerated_loss(1000);
        assert!((0.15..0.17).contains(&worst), "{worst}");
        assert_eq!(needed(worst * 0.99, 1000), MAX_NEEDED);
    }

    #[test]
    fn the_loss_estimate_follows_what_the_kernel_saw() {
        let mut loss = LinkLoss::default();
        assert!((loss.exchange_loss() - LOSS_FLOOR).abs() < 1e-9);
        let mut t = 1;
        for i in 0..2000 {
            t += 50;
            let lost = i % 25 == 0; // 4 %
            loss.record(
                &Trials {
                    probes_answered: u32::from(!lost),
                    probes_lost: u32::from(lost),
                    ..Trials::default()
                },
                t,
            );
        }
        let q = loss.exchange_loss();
        assert!((0.03..0.05).contains(&q), "{q}");
        // Data: 1 % of segments re-sent reads as 2 % of round trips lost.
        let mut data = LinkLoss::default();
        data.record(
            &Trials {
                segments: 10_000,
                retransmitted: 100,
                ..Trials::default()
            },
            1,
        );
        let q = data.exchange_loss();
        assert!((0.018..0.022).contains(&q), "{q}");
        // Ten minutes of silence later, the old loss has faded away.
        data.record(
            &Trials {
                segments: 100,
                ..Trials::default()
            },
            600_001,
        );
        assert!(data.exchange_loss() < 0.005, "{}", data.exchange_loss());
    }

    #[test]
    fn a_few_observations_do_not_make_a_link_look_lossy() {
        let mut loss = LinkLoss::default();
        loss.record(
            &Trials {
                probes_lost: 1,
                ..Trials::default()
            },
            1,
        );
        // One lost probe in one: far less than 100 %.
        assert!(loss.exchange_loss() < 0.06, "{}", loss.exchange_loss());
    }

    #[test]
    fn a_host_that_answers_others_leaves_the_leg_to_its_own_evidence() {
        let alive = HostEvidence {
            answered: true,
            witnesses: 10,
            ..HostEvidence::default()
        };
        assert_eq!(decide(2, 4, &alive, true), Decision::Wait);
        assert_eq!(decide(4, 4, &alive, true), Decision::EvictAlone);
    }

    #[test]
    fn a_silent_host_is_judged_on_all_its_legs_together() {
        let silent = HostEvidence {
            witnesses: 3,
            ..HostEvidence::default()
        };
        assert_eq!(decide(1, 4, &silent, false), Decision::EvictHost);
        let few = HostEvidence {
            witnesses: 1,
            ..HostEvidence::default()
        };
        assert_eq!(decide(1, 4, &few, true), Decision::Connect(2));
        assert_eq!(
            decide(1, 4, &few, false),
            Decision::Wait,
            "clients cannot be connected to"
        );
        let pending = HostEvidence {
            connects_pending: true,
            ..few
        };
        assert_eq!(decide(1, 4, &pending, true), Decision::Wait);
        let confirmed = HostEvidence {
            connects_unanswered: 2,
            ..few
        };
        assert_eq!(decide(1, 4, &confirmed, true), Decision::EvictHost);
        let judged = HostEvidence {
            judged_dead: true,
            ..HostEvidence::default()
        };
        assert_eq!(decide(0, 4, &judged, true), Decision::EvictHost);
    }

    #[test]
    fn connects_that_were_not_enough_are_not_asked_again_and_again() {
        let done = HostEvidence {
            connects_unanswered: 1,
            ..HostEvidence::default()
        };
        // 1 own + 1 connect < 7 on a lossy link: wait for own evidence.
        assert_eq!(decide(1, 7, &done, true), Decision::Wait);
        assert_eq!(decide(7, 7, &done, true), Decision::EvictAlone);
    }
}
