//! `pulsegate check`: the effective config and what it promises (a
//! preflight report; "check" elsewhere means a backend health check).

use std::fmt::Write;

use crate::config::ValidConfig;
use crate::liveness::bounds::{DetectionBounds, FailoverBounds};

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
        let retry = l
            .settings
            .upstream
            .keepalive_interval
            .max(l.settings.client.keepalive_interval);
        let _ = writeln!(
            out,
            "  host gone (its other sessions or a fresh connect corroborate):"
        );
        let _ = writeln!(
            out,
            "    idle session:     {} (probe_interval {} + max(dead_after {}, keepalive_interval {}) + fresh connects 250ms + sweep {})",
            fmt(b.idle),
            fmt(lv.probe_interval),
            fmt(lv.dead_after),
            fmt(retry),
            fmt(lv.sweep_period())
        );
        let _ = writeln!(
            out,
            "    data in flight:   {} (max(dead_after {}, two retransmissions 600ms) + fresh connects 250ms + sweep {})",
            fmt(b.busy),
            fmt(lv.dead_after),
            fmt(lv.sweep_period())
        );
        let _ = writeln!(
            out,
            "  one idle connection dead alone (a flow a NAT forgot, a lone client), judged on its own probes:"
        );
        let _ = writeln!(
            out,
            "    clean link:       {} ({} unanswered probes, keepalive_interval {} apart)",
            fmt(b.alone_clean),
            b.needed_clean,
            fmt(retry)
        );
        let _ = writeln!(
            out,
            "    worst tolerated:  {} ({} unanswered probes, at {:.0} % of probe exchanges lost, about {:.0} % each way)",
            fmt(b.alone_worst),
            crate::liveness::verdict::MAX_NEEDED,
            b.tolerated_loss * 100.0,
            (1.0 - (1.0 - b.tolerated_loss).sqrt()) * 100.0
        );
        let _ = writeln!(
            out,
            "  false evictions:                         under one per million session-hours up to that loss; verdicts ask more unanswered probes as the measured loss grows"
        );
        let _ = writeln!(
            out,
            "  kernel backstop (TCP_USER_TIMEOUT):      upstream {}, client {}",
            fmt(b.backstop.0),
            fmt(b.backstop.1)
        );
        match FailoverBounds::of(l) {
            Some(f) => {
                let _ = writeln!(
                    out,
                    "  leaving a dead backend (checks):         new connections {}, idle sessions {}, busy sessions {}",
                    fmt(f.new_connections),
                    fmt(f.idle_sessions),
                    fmt(f.busy_sessions)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  leaving a dead backend:                  no [listener.check]: every new connection tries backends in order, a silent one costs connect_timeout ({})",
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
