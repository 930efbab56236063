//! `pulsegate check`: the effective config and what it promises.

use std::fmt::Write;

use crate::config::{DetectionBounds, FailoverBounds, ValidConfig};

/// Renders the report printed by `pulsegate check`.
pub fn report(config: &ValidConfig) -> String {
    let mut out = String::new();
    out.push_str("# effective configuration (every default filled in)\n");
    out.push_str(&config.effective_toml());
    out.push_str("\n# worst-case detection of a dead peer\n");
    for l in &config.listeners {
        let b = DetectionBounds::of(l);
        let lv = &l.settings.liveness;
        let fmt = |d| humantime::format_duration(d).to_string();
        let _ = writeln!(out, "listener \"{}\" ({}):", l.name, l.bind);
        let _ = writeln!(
            out,
            "  dead upstream or client, idle session:     {} (probe_interval {} + max(dead_after {}, keepalive_interval {}) + sweep {})",
            fmt(b.idle),
            fmt(lv.probe_interval),
            fmt(lv.dead_after),
            fmt(l.settings.upstream.keepalive_interval.max(l.settings.client.keepalive_interval)),
            fmt(lv.sweep_period())
        );
        let _ = writeln!(
            out,
            "  dead upstream or client, data in flight:   {} (dead_after {} + sweep {})",
            fmt(b.busy),
            fmt(lv.dead_after),
            fmt(lv.sweep_period())
        );
        let _ = writeln!(
            out,
            "  kernel backstop (TCP_USER_TIMEOUT):        upstream {}, client {}",
            fmt(b.backstop.0),
            fmt(b.backstop.1)
        );
        match FailoverBounds::of(l) {
            Some(f) => {
                let _ = writeln!(
                    out,
                    "  leaving a dead backend (checks):           new connections {}, idle sessions {}, busy sessions {}",
                    fmt(f.new_connections),
                    fmt(f.idle_sessions),
                    fmt(f.busy_sessions)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  leaving a dead backend:                    no [listener.check]: every new connection tries backends in order, a silent one costs connect_timeout ({})",
                    fmt(l.settings.connect_timeout)
                );
            }
        }
    }
    for w in &config.warnings {
        let _ = writeln!(out, "\n{w}");
    }
    out
}
