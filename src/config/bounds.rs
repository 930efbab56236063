//! Warnings for settings that trade safety for speed. (What the settings
//! promise, the detection bounds, is the watcher's: `liveness::bounds`.)

use std::fmt;
use std::time::Duration;

use super::{Listener, SocketSettings};

/// A user_timeout below this aborts peers that merely stop reading for a
/// while (a client streaming a large result, a database in a long COPY).
pub const SLOW_READER_ALLOWANCE: Duration = Duration::from_secs(30);

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
