//! What a listener's settings promise: how long a dead peer can go
//! unnoticed, for a host that is gone (its other sessions and a fresh
//! connect corroborate at once) and for one connection that died alone (a
//! flow a NAT forgot, a lone client: only its own unanswered probes count,
//! as many as the link's loss requires), on a clean link and on the worst
//! link the verdict rule tolerates. `pulsegate check` prints them.

use std::time::Duration;

use super::verdict::{self, LOSS_FLOOR, MAX_NEEDED};
use crate::config::Listener;

/// Linux's minimum RTO: the first retransmission of a segment on a fast
/// link, and the least time an answer is waited for.
pub const MIN_RTO: Duration = Duration::from_millis(200);
/// Fresh connects asked to corroborate a suspicion get three round trips,
/// and never less than this.
pub const CONNECT_WINDOW_MIN: Duration = Duration::from_millis(250);
/// ... nor more than this.
pub const CONNECT_WINDOW_MAX: Duration = Duration::from_secs(2);

/// Worst-case detection times for one listener (the same for both legs,
/// since both are watched under the same liveness settings), on a fast
/// link (RTT well under the minimum RTO).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectionBounds {
    /// The host is gone, idle session: its next probe leaves within
    /// `probe_interval`; it is suspected once that probe went unanswered
    /// for `dead_after` and its retry (`keepalive_interval` later) is out;
    /// its other sessions, or a fresh connect, corroborate within the
    /// connect window; the sweep sees it within a period.
    pub idle: Duration,
    /// The host is gone, data in flight: unanswered for `dead_after` and
    /// re-sent twice (three minimum RTOs), then corroborated as above.
    pub busy: Duration,
    /// One idle connection dead alone, on a clean link: as many unanswered
    /// probes as [`verdict::needed`] asks at [`LOSS_FLOOR`], one every
    /// `keepalive_interval`, the last one given an RTO (and never less
    /// than `dead_after` of silence).
    pub alone_clean: Duration,
    /// The same on the worst link tolerated ([`verdict::tolerated_loss`]):
    /// [`MAX_NEEDED`] unanswered probes.
    pub alone_worst: Duration,
    /// Probes a verdict on a lone connection needs on a clean link.
    pub needed_clean: u32,
    /// The probe-exchange loss (probe or answer lost) up to which false
    /// verdicts stay under one per million session-hours.
    pub tolerated_loss: f64,
    /// The kernel's own abort (TCP_USER_TIMEOUT) should the watcher not
    /// act, per leg: (upstream, client).
    pub backstop: (Duration, Duration),
}

impl DetectionBounds {
    pub fn of(listener: &Listener) -> Self {
        let s = &listener.settings;
        let lv = &s.liveness;
        let sweep = lv.sweep_period();
        let retry = s
            .upstream
            .keepalive_interval
            .max(s.client.keepalive_interval);
        let probe_ms = lv.probe_interval.as_millis() as u64;
        let needed_clean = verdict::needed(LOSS_FLOOR, probe_ms);
        let alone = |probes: u32| {
            lv.probe_interval + lv.dead_after.max(retry * (probes - 1) + MIN_RTO) + sweep
        };
        DetectionBounds {
            idle: lv.probe_interval + lv.dead_after.max(retry) + CONNECT_WINDOW_MIN + sweep,
            busy: lv.dead_after.max(MIN_RTO * 3) + CONNECT_WINDOW_MIN + sweep,
            alone_clean: alone(needed_clean),
            alone_worst: alone(MAX_NEEDED),
            needed_clean,
            tolerated_loss: verdict::tolerated_loss(probe_ms),
            backstop: (s.upstream.user_timeout, s.client.user_timeout),
        }
    }
}

/// Worst-case times to leave a dead backend, from its health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverBounds {
    /// Until new connections avoid it: `fall` failed checks, each up to
    /// `interval + jitter` apart, the last one taking `timeout`.
    pub new_connections: Duration,
    /// Until an idle session to it is evicted: the first failed check makes
    /// the backend suspect and probes its sessions at once (kernel minimum
    /// TCP_KEEPIDLE 1 s); they are suspected once the probe and its retry go
    /// unanswered, and evicted together once corroborated — or the
    /// watcher's own bound, if smaller.
    pub idle_sessions: Duration,
    /// Until a session with data in flight is evicted (the watcher's own).
    pub busy_sessions: Duration,
}

impl FailoverBounds {
    pub fn of(listener: &Listener) -> Option<Self> {
        let check = listener.settings.check.as_ref()?;
        let detection = DetectionBounds::of(listener);
        let lv = &listener.settings.liveness;
        let period = check.interval + check.jitter;
        let retry = listener.settings.upstream.keepalive_interval;
        let suspect_path = period
            + check.timeout
            + Duration::from_secs(1)
            + lv.dead_after.max(retry)
            + CONNECT_WINDOW_MIN
            + lv.sweep_period();
        Some(FailoverBounds {
            new_connections: period * check.fall.get() + check.timeout,
            idle_sessions: suspect_path.min(detection.idle),
            busy_sessions: detection.busy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_settings_promise_what_the_tests_and_benchmarks_measure() {
        let config = crate::config::parse(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:2\"]\n\
             [listener.liveness]\nprobe_interval = \"1s\"\ndead_after = \"1s\"\n",
            "test",
        )
        .unwrap();
        let b = DetectionBounds::of(&config.listeners[0]);
        assert_eq!(b.idle, Duration::from_millis(2750));
        assert_eq!(b.busy, Duration::from_millis(1750));
        assert_eq!(b.needed_clean, 4);
        assert_eq!(b.alone_clean, Duration::from_millis(4700));
        assert_eq!(b.alone_worst, Duration::from_millis(12_700));
        assert!((0.15..0.17).contains(&b.tolerated_loss));
    }
}
