//! What the settings promise: the worst-case time to detect a dead peer,
//! and warnings for settings that trade safety for speed.

use std::fmt;
use std::time::Duration;

use super::{Listener, SocketSettings};

/// A user_timeout below this aborts peers that merely stop reading for a
/// while (a client streaming a large result, a database in a long COPY).
pub const SLOW_READER_ALLOWANCE: Duration = Duration::from_secs(30);

/// Worst-case detection times for one listener (the same for both legs,
/// since both legs are watched under the same liveness settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectionBounds {
    /// A quiet connection whose peer vanished: the next probe goes out within
    /// `probe_interval`; it is dead once it is unanswered for `dead_after`
    /// and its retry (sent `keepalive_interval` later) is out too, and the
    /// watcher's sweep sees it within one sweep period.
    pub idle: Duration,
    /// Data in flight to a vanished peer: unACKed for `dead_after`, plus one
    /// sweep period.
    pub busy: Duration,
    /// The kernel's own abort (TCP_USER_TIMEOUT) should the watcher not act,
    /// per leg: (upstream, client).
    pub backstop: (Duration, Duration),
}

impl DetectionBounds {
    pub fn of(listener: &Listener) -> Self {
        let lv = &listener.settings.liveness;
        let sweep = lv.sweep_period();
        let retry = listener
            .settings
            .upstream
            .keepalive_interval
            .max(listener.settings.client.keepalive_interval);
        DetectionBounds {
            idle: lv.probe_interval + lv.dead_after.max(retry) + sweep,
            busy: lv.dead_after + sweep,
            backstop: (
                listener.settings.upstream.user_timeout,
                listener.settings.client.user_timeout,
            ),
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
    /// TCP_KEEPIDLE 1 s), dead once the probe and its retry go unanswered —
    /// or the watcher's own bound, if smaller.
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
            + lv.sweep_period();
        Some(FailoverBounds {
            new_connections: period * check.fall.get() + check.timeout,
            idle_sessions: suspect_path.min(detection.idle),
            busy_sessions: detection.busy,
        })
    }
}

/// A setting that is valid but probably not what the operator wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "warning: {}: {}", self.key, self.message)
    }
}

pub(super) fn warnings(listeners: &[Listener]) -> Vec<Warning> {
    let mut out = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        for (leg, s) in [
            ("upstream", &l.settings.upstream),
            ("client", &l.settings.client),
        ] {
            slow_reader_warning(&mut out, &format!("listener[{i}].{leg}.user_timeout"), s);
        }
    }
    out
}

fn slow_reader_warning(out: &mut Vec<Warning>, key: &str, s: &SocketSettings) {
    if s.user_timeout < SLOW_READER_ALLOWANCE {
        out.push(Warning {
            key: key.to_string(),
            message: format!(
                "{} is short. TCP_USER_TIMEOUT also aborts a live peer that merely stops \
                 reading (zero window) for that long, e.g. an app streaming a large result \
                 or a database busy in a long COPY. pulsegate's watcher already detects \
                 vanished peers within seconds without this risk; keep user_timeout as a \
                 backstop of at least {}s unless you accept cutting slow readers.",
                humantime::format_duration(s.user_timeout),
                SLOW_READER_ALLOWANCE.as_secs()
            ),
        });
    }
}
