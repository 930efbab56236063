//! When pulsegate noticed the fault, read from its JSON log: evictions
//! (`"event":"eviction"`) and the primary's `"backend state changed"`
//! events, each timed by its `timestamp` against the fault's wall-clock
//! time. Events after the end of the load are left out: the clients
//! closing their connections then are no detection.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The health monitor's message for a backend's state change.
const STATE_CHANGED: &str = "backend state changed";
/// The liveness watcher's message when a dead connection made a backend
/// suspect.
const WATCHER_SUSPECT: &str = "backend suspect: probing all its sessions now";
/// The health monitor's message when a check reports another role.
const ROLE_CHANGED: &str = "backend role changed";

/// pulsegate's reaction to the fault, times since the fault.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Detection {
    pub first_eviction: Option<Duration>,
    pub first_eviction_reason: Option<String>,
    /// Evictions after the fault, and by reason.
    pub evictions: u64,
    pub eviction_reasons: BTreeMap<String, u64>,
    /// Evictions before the fault: false alarms.
    pub evictions_before_fault: u64,
    pub primary_suspect: Option<Duration>,
    pub primary_down: Option<Duration>,
    /// The primary reported up again after it was suspect or down.
    pub primary_up_again: Option<Duration>,
    /// A check found the primary in another role.
    pub primary_role_changed: Option<Duration>,
}

impl Detection {
    /// The first sign that pulsegate saw the fault: an eviction, the
    /// primary turning suspect or down, or its role changing.
    pub fn detected(&self) -> Option<Duration> {
        [
            self.first_eviction,
            self.primary_suspect,
            self.primary_down,
            self.primary_role_changed,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// The part of the log that counts: from the fault until `until` after it
/// (the end of the load), about the backend `primary`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window<'a> {
    pub fault: SystemTime,
    pub until: Duration,
    pub primary: &'a str,
}

/// Reads pulsegate's log at `log` (a missing file reads as empty).
pub(crate) fn read(log: &Path, window: Window) -> Detection {
    let text = std::fs::read(log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    parse(&text, window)
}

/// The detection in a JSON log's text; lines that are not JSON objects
/// with a timestamp are skipped.
pub(crate) fn parse(text: &str, window: Window) -> Detection {
    let mut d = Detection::default();
    for line in text.lines() {
        let Ok(json) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(at) = json["timestamp"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        else {
            continue;
        };
        let Ok(since) = at.duration_since(window.fault) else {
            if json["event"] == "eviction" {
                d.evictions_before_fault += 1;
            }
            continue;
        };
        if since > window.until {
            break;
        }
        if json["event"] == "eviction" {
            d.note_eviction(since, json["reason"].as_str().unwrap_or("unknown"));
        } else if json["backend"] == window.primary {
            match json["message"].as_str() {
                Some(STATE_CHANGED) => d.note_state(since, json["to"].as_str().unwrap_or_default()),
                // A dead connection makes the backend suspect through the
                // watcher, which logs this instead of a state change.
                Some(WATCHER_SUSPECT) => d.note_state(since, "suspect"),
                Some(ROLE_CHANGED) if d.primary_role_changed.is_none() => {
                    d.primary_role_changed = Some(since)
                }
                _ => {}
            }
        }
    }
    d
}

impl Detection {
    fn note_eviction(&mut self, since: Duration, reason: &str) {
        self.evictions += 1;
        *self.eviction_reasons.entry(reason.to_string()).or_default() += 1;
        if self.first_eviction.is_none() {
            self.first_eviction = Some(since);
            self.first_eviction_reason = Some(reason.to_string());
        }
    }

    fn note_state(&mut self, since: Duration, to: &str) {
        match to {
            "suspect" if self.primary_suspect.is_none() => self.primary_suspect = Some(since),
            "down" if self.primary_down.is_none() => self.primary_down = Some(since),
            "up" if self.primary_up_again.is_none()
                && (self.primary_suspect.is_some() || self.primary_down.is_some()) =>
            {
                self.primary_up_again = Some(since)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"timestamp":"2025-03-01T10:00:00.500000Z","level":"INFO","message":"listening","target":"pulsegate::listener"}
{"timestamp":"2025-03-01T10:00:00.900000Z","level":"WARN","event":"eviction","reason":"peer_reset","target":"pulsegate::evict"}
{"timestamp":"2025-03-01T10:00:01.600000Z","level":"INFO","message":"backend suspect: probing all its sessions now","backend":"127.0.0.1:7001","sessions":60}
{"timestamp":"2025-03-01T10:00:02.100000Z","level":"WARN","message":"backend state changed","backend":"127.0.0.1:7002","from":"up","to":"suspect"}
{"timestamp":"2025-03-01T10:00:02.250000Z","level":"WARN","event":"eviction","reason":"probe_unanswered","target":"pulsegate::evict"}
{"timestamp":"2025-03-01T10:00:02.300000Z","level":"WARN","event":"eviction","reason":"backend_down","target":"pulsegate::evict"}
{"timestamp":"2025-03-01T10:00:02.400000Z","level":"WARN","message":"backend state changed","backend":"127.0.0.1:7001","from":"suspect","to":"down"}
not json
{"timestamp":"2025-03-01T10:00:04.000000Z","level":"WARN","message":"backend role changed","backend":"127.0.0.1:7001","role":"replica"}
{"timestamp":"2025-03-01T10:00:05.000000Z","level":"WARN","message":"backend state changed","backend":"127.0.0.1:7001","from":"down","to":"up"}
"#;

    fn window(fault_offset: Duration, until: Duration) -> Window<'static> {
        let fault = humantime::parse_rfc3339("2025-03-01T10:00:01.000000Z").unwrap();
        Window {
            fault: fault + fault_offset,
            until,
            primary: "127.0.0.1:7001",
        }
    }

    #[test]
    fn times_pulsegates_reaction_from_the_fault() {
        let d = parse(LOG, window(Duration::ZERO, Duration::from_secs(60)));
        assert_eq!(d.evictions_before_fault, 1);
        assert_eq!(d.evictions, 2);
        assert_eq!(d.first_eviction, Some(Duration::from_millis(1250)));
        assert_eq!(d.first_eviction_reason.as_deref(), Some("probe_unanswered"));
        assert_eq!(d.eviction_reasons["backend_down"], 1);
        assert_eq!(d.primary_suspect, Some(Duration::from_millis(600)));
        assert_eq!(d.primary_down, Some(Duration::from_millis(1400)));
        assert_eq!(d.primary_up_again, Some(Duration::from_secs(4)));
        assert_eq!(d.primary_role_changed, Some(Duration::from_secs(3)));
        assert_eq!(d.detected(), Some(Duration::from_millis(600)));
    }

    #[test]
    fn nothing_noticed_is_none() {
        let d = parse(
            LOG,
            window(Duration::from_secs(60), Duration::from_secs(60)),
        );
        assert_eq!(d.detected(), None);
        assert_eq!(d.evictions_before_fault, 3);
    }

    #[test]
    fn events_after_the_end_of_the_load_do_not_count() {
        let d = parse(LOG, window(Duration::ZERO, Duration::from_millis(1275)));
        assert_eq!(d.evictions, 1);
        assert_eq!(d.primary_down, None);
        assert_eq!(d.primary_up_again, None);
    }
}
