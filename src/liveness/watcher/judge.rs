//! Judging a suspected leg with its host: gathering what the host's other
//! legs and fresh connects say ([`crate::liveness::verdict`] weighs it),
//! then evicting the leg, every leg to a host judged gone, or waiting.

use std::time::Duration;

use super::hosts::{self, Connects, HostKey};
use super::{Suspect, Suspected, Sweeper};
use crate::evict::{EvictReason, Leg, Verdict};
use crate::liveness::bounds::{CONNECT_WINDOW_MAX, CONNECT_WINDOW_MIN};
use crate::liveness::leg::answer_window_ms;
use crate::liveness::verdict::{self, Decision, HostEvidence};
use crate::liveness::{leg_index, now_ms};
use crate::sockopt::{self, TcpInfo};

/// Other legs of a host sampled at most to corroborate one suspicion: far
/// more than any verdict needs, and a bound on the cost when thousands of
/// legs go silent together.
const SIBLINGS_SAMPLED: usize = 64;

/// When a leg was last answered, judging from one sample; `None` when what
/// it received cannot count: data in flight that the kernel already had to
/// re-send is answered only by progress, which one sample cannot show.
fn heard_at(info: &TcpInfo, now_ms: u64) -> Option<u64> {
    if info.unacked > 0 && info.retransmits > 0 {
        return None;
    }
    Some(now_ms.saturating_sub(u64::from(info.last_ack_recv_ms)))
}

/// What one sample of another leg to the same host says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sibling {
    /// Answered at or after `since` (when the suspected leg went silent):
    /// the host was there then. At or after, not strictly: probes armed
    /// together (a suspect backend's) leave in the same millisecond, and a
    /// sibling answered within it proves the host answered while the
    /// suspected leg's probe was lost.
    Answered,
    /// Owes an ACK and has gone unanswered for longer than an answer takes:
    /// a keepalive probe out for an RTO past its departure (or a retry
    /// out), or data the kernel had to re-send.
    Witness,
    /// Neither: answered before, and not asked since.
    Neutral,
}

fn sibling(info: &TcpInfo, now_ms: u64, since: u64, probe_ms: u64) -> Sibling {
    if heard_at(info, now_ms).is_some_and(|at| at >= since) {
        return Sibling::Answered;
    }
    let probe_late = u64::from(info.last_ack_recv_ms) >= probe_ms + answer_window_ms(info);
    let witness = info.probes >= 2
        || (info.probes == 1 && probe_late)
        || (info.unacked > 0 && info.retransmits >= 1);
    if witness {
        Sibling::Witness
    } else {
        Sibling::Neutral
    }
}

impl Sweeper {
    /// Weighs a suspected leg with its host and acts on the decision.
    pub(super) fn judge(&mut self, s: Suspected) {
        if s.session.verdict().is_some() {
            return;
        }
        let key = HostKey::new(s.leg, s.peer);
        let probe_ms = self.rules[leg_index(s.leg)].probe_ms;
        let needed = verdict::needed(self.hosts.get(key).loss.exchange_loss(), probe_ms);
        let host = self.host_evidence(key, &s);
        let heard_ago_ms = now_ms().saturating_sub(self.hosts.get(key).heard_at_ms);
        let decision = verdict::decide(s.evidence.lost, needed, &host, s.leg == Leg::Upstream);
        tracing::debug!(leg = %s.leg, peer = %s.peer, silent_ms = s.evidence.silent_ms,
            heard_ago_ms,
            lost = s.evidence.lost, needed, host = ?host, decision = ?decision, "suspected leg weighed");
        match decision {
            Decision::EvictAlone => {
                self.convict(&s, "own");
                if !host.answered {
                    self.suspect_backend(&s);
                }
            }
            Decision::EvictHost => {
                if self.condemn_host(key, &s) {
                    self.convict(&s, "host");
                    self.suspect_backend(&s);
                } else {
                    self.publish(&s, needed, "its host: another connection to it answered");
                }
            }
            Decision::Connect(count) => {
                self.ask_host(key, &s, count);
                self.publish(&s, needed, "fresh connects to its host");
            }
            Decision::Wait if host.answered => self.publish(
                &s,
                needed,
                "more unanswered probes of its own: its host answers",
            ),
            Decision::Wait => self.publish(&s, needed, "more evidence from its host"),
        }
    }

    /// What the host of `s` says: its last answer and fresh connects as
    /// recorded, then a sample of its other legs.
    fn host_evidence(&mut self, key: HostKey, s: &Suspected) -> HostEvidence {
        let since = s.evidence.silent_since_ms;
        let now = now_ms();
        let host = self.hosts.get(key);
        let mut evidence = HostEvidence {
            // Strictly after: the record includes this leg's own last answer,
            // which is when its silence began.
            answered: host.heard_at_ms > since,
            judged_dead: host.judged_dead_at.is_some(),
            ..HostEvidence::default()
        };
        match host.connects {
            Connects::Pending { .. } => evidence.connects_pending = true,
            Connects::Done {
                started_ms,
                answered,
                unanswered,
            } if started_ms >= since => {
                evidence.answered |= answered > 0;
                evidence.connects_unanswered = unanswered;
            }
            _ => {}
        }
        if evidence.answered || evidence.judged_dead {
            return evidence;
        }
        let probe_ms = self.rules[leg_index(key.leg)].probe_ms;
        let mut latest = 0;
        let siblings = self
            .slots
            .iter()
            .flatten()
            .filter(|e| e.id != s.id && e.host(key.leg) == Some(key))
            .filter_map(|e| e.session.upgrade())
            .filter(|session| session.verdict().is_none())
            .take(SIBLINGS_SAMPLED);
        for session in siblings {
            let Ok(info) = sockopt::tcp_info(session.socket(key.leg)) else {
                continue;
            };
            latest = latest.max(heard_at(&info, now).unwrap_or(0));
            match sibling(&info, now, since, probe_ms) {
                Sibling::Answered => {
                    evidence.answered = true;
                    break;
                }
                Sibling::Witness => evidence.witnesses += 1,
                Sibling::Neutral => {}
            }
        }
        self.hosts.get(key).hear(latest);
        evidence
    }

    /// Judges the host of `s` gone: every other leg to it is evicted with
    /// reason `host_silent`. Returns false, evicting nothing, if one of them
    /// turns out to have been answered after `s` went silent.
    fn condemn_host(&mut self, key: HostKey, s: &Suspected) -> bool {
        let since = s.evidence.silent_since_ms;
        let now = now_ms();
        let mut doomed = Vec::new();
        for entry in self.slots.iter().flatten() {
            if entry.id == s.id || entry.host(key.leg) != Some(key) {
                continue;
            }
            let Some(session) = entry.session.upgrade() else {
                continue;
            };
            if session.verdict().is_some() {
                continue;
            }
            let info = sockopt::tcp_info(session.socket(key.leg)).ok();
            if let Some(at) = info.and_then(|i| heard_at(&i, now)) {
                if at >= since {
                    self.hosts.get(key).hear(at);
                    tracing::info!(host = %key,
                        "a suspected host answered another connection: not judged gone");
                    return false;
                }
            }
            doomed.push((session, info, entry.id, entry.address_removed));
        }
        self.hosts.get(key).judged_dead_at = Some(since);
        let silent_for = Duration::from_millis(now.saturating_sub(since));
        let others = doomed.len();
        for (session, info, id, address_removed) in doomed {
            let reason = if address_removed {
                EvictReason::AddressRemoved
            } else {
                EvictReason::HostSilent
            };
            session.evict(Verdict {
                leg: key.leg,
                reason,
                evidence: info,
                silent_for: Some(silent_for),
            });
            self.suspicions.clear(id, key.leg);
        }
        tracing::warn!(host = %key, silent_ms = silent_for.as_millis() as u64,
            other_sessions = others,
            "host silent: no connection to it answers, nor does a fresh connect; evicting every session to it");
        true
    }

    /// Evicts the suspected leg on the evidence gathered.
    fn convict(&mut self, s: &Suspected, basis: &'static str) {
        let reason = if s.address_removed {
            EvictReason::AddressRemoved
        } else {
            s.evidence.reason()
        };
        s.session.evict(Verdict {
            leg: s.leg,
            reason,
            evidence: Some(s.info),
            silent_for: Some(Duration::from_millis(s.evidence.silent_ms)),
        });
        self.meters.suspicion_ended(s.leg, true);
        self.meters.corroborated(
            basis,
            Duration::from_millis(now_ms().saturating_sub(s.since_ms)),
        );
        self.suspicions.clear(s.id, s.leg);
    }

    /// A dead upstream leg makes its backend suspect (unless its host was
    /// seen to answer: then only that flow died).
    fn suspect_backend(&mut self, s: &Suspected) {
        if let (Leg::Upstream, Some(backend)) = (s.leg, s.session.backend()) {
            self.suspects.push(backend);
        }
    }

    fn ask_host(&mut self, key: HostKey, s: &Suspected, count: u32) {
        let window = Duration::from_micros(3 * u64::from(s.info.rtt_us))
            .clamp(CONNECT_WINDOW_MIN, CONNECT_WINDOW_MAX);
        self.hosts.get(key).connects = Connects::Pending {
            started_ms: now_ms(),
        };
        hosts::spawn_connects(key, s.peer, count, window, self.own_tx.clone());
    }

    /// Takes in a round of fresh connects, then judges again at once the
    /// legs to that host that wait under suspicion.
    pub(super) fn connected(&mut self, report: hosts::ConnectReport) {
        self.meters
            .corroboration_connects(report.answered, report.unanswered, report.unknown);
        let host = self.hosts.get(report.key);
        host.connects = Connects::Done {
            started_ms: report.started_ms,
            answered: report.answered,
            unanswered: report.unanswered,
        };
        if report.answered > 0 {
            host.hear(now_ms());
        }
        let waiting: Vec<(usize, usize)> = self
            .slots
            .iter()
            .enumerate()
            .flat_map(|(slice, entries)| {
                entries.iter().enumerate().filter_map(move |(i, e)| {
                    let suspected = e.legs[leg_index(report.key.leg)]
                        .suspected_since()
                        .is_some();
                    (suspected && e.host(report.key.leg) == Some(report.key)).then_some((slice, i))
                })
            })
            .collect();
        let mut suspected = Vec::new();
        for (slice, i) in waiting {
            let Some(session) = self.slots[slice][i].session.upgrade() else {
                continue;
            };
            if session.verdict().is_none() {
                suspected.extend(self.visit(slice, i, &session, report.key.leg, true));
            }
        }
        for s in suspected {
            self.judge(s);
        }
    }

    fn publish(&self, s: &Suspected, needed: u32, waiting_for: &'static str) {
        let backend = match s.session.backend() {
            None => "(removed by a reload)".to_string(),
            Some(b) => self.backends.label(b).to_string(),
        };
        self.suspicions.set(
            s.id,
            Suspect {
                client: Some(s.session.client_addr),
                backend,
                leg: s.leg,
                reason: s.evidence.reason(),
                silent_for: Duration::from_millis(s.evidence.silent_ms),
                lost: s.evidence.lost,
                needed,
                waiting_for,
                evidence: s.info,
            },
        );
    }

    /// Sets each backend's loss and evidence gauges from its hosts.
    pub(super) fn publish_link_estimates(&self) {
        let probe_ms = self.rules[leg_index(Leg::Upstream)].probe_ms;
        for backend in self.backends.ids() {
            let loss = self
                .backends
                .addresses(backend)
                .iter()
                .filter_map(|a| self.hosts.peek(HostKey::new(Leg::Upstream, *a)))
                .map(|h| h.loss.exchange_loss())
                .reduce(f64::max);
            if let Some(loss) = loss {
                self.backends
                    .meters(backend)
                    .set_link(loss, verdict::needed(loss, probe_ms));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(unacked: u32, retransmits: u8, probes: u8, last_ack_recv_ms: u32) -> TcpInfo {
        TcpInfo {
            unacked,
            retransmits,
            probes,
            last_ack_recv_ms,
            rto_us: 204_000,
            ..TcpInfo::default()
        }
    }

    #[test]
    fn a_sibling_answered_only_counts_if_its_acks_can_be_answers() {
        assert_eq!(heard_at(&info(0, 0, 0, 300), 10_000), Some(9_700));
        assert_eq!(heard_at(&info(3, 0, 0, 300), 10_000), Some(9_700));
        // Re-sending: the ACKs it gets may be a one-way partition's.
        assert_eq!(heard_at(&info(3, 1, 0, 300), 10_000), None);
    }

    #[test]
    fn a_sibling_witnesses_only_once_an_answer_is_late() {
        // The suspected leg went silent at 8_950; now is 10_000.
        let says = |i: TcpInfo| sibling(&i, 10_000, 8_950, 1000);
        // Probe left 1 s after the last answer (at 8_900); 100 ms out: not
        // late yet.
        assert_eq!(says(info(0, 0, 1, 1100)), Sibling::Neutral);
        assert_eq!(
            says(info(0, 0, 1, 1000)),
            Sibling::Answered,
            "answered at 9_000"
        );
        assert_eq!(says(info(0, 0, 1, 2300)), Sibling::Witness);
        assert_eq!(
            says(info(0, 0, 2, 1100)),
            Sibling::Witness,
            "a retry is out"
        );
        assert_eq!(says(info(4, 1, 0, 2500)), Sibling::Witness, "data re-sent");
        assert_eq!(says(info(4, 0, 0, 2500)), Sibling::Neutral);
        assert_eq!(says(info(0, 0, 0, 2000)), Sibling::Neutral, "owes nothing");
    }

    #[test]
    fn a_sibling_answered_in_the_millisecond_the_silence_began_proves_the_host_alive() {
        // A suspect backend's probes were armed together at 9_000: this
        // leg's was lost, a sibling's answered within the same millisecond.
        assert_eq!(
            sibling(&info(0, 0, 0, 1000), 10_000, 9_000, 1000),
            Sibling::Answered
        );
        assert_eq!(
            sibling(&info(0, 0, 0, 1001), 10_000, 9_000, 1000),
            Sibling::Neutral
        );
        // Still re-sending: whatever ACKs it gets prove nothing.
        assert_eq!(
            sibling(&info(3, 1, 0, 10), 10_000, 9_000, 1000),
            Sibling::Witness
        );
    }
}
