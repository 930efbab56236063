//! The terminal summary of a [`Report`]: plain aligned text.

use std::fmt::Write;

use super::report::{PhaseStats, Report, RouteReport};

/// The summary printed at the end of a run.
pub(crate) fn render(r: &Report) -> String {
    let mut out = String::new();
    header(&mut out, r);
    detection(&mut out, r);
    outcomes(&mut out, r);
    latencies(&mut out, r);
    out
}

fn header(out: &mut String, r: &Report) {
    let s = &r.settings;
    let _ = writeln!(
        out,
        "pulsegate bench failover: workload {}, fault {} at {:.2} s of a {} s run",
        s.workload, r.fault.kind, r.fault.at_s, s.duration_s
    );
    let _ = writeln!(out, "  fault: {}", r.fault.description);
    let rate = match s.rate_per_client {
        0 => "back to back".to_string(),
        n => format!("{n} req/s each"),
    };
    let routes: Vec<&str> = r.routes.iter().map(|x| x.route).collect();
    let _ = writeln!(
        out,
        "  {} clients per route ({}), {rate}; hang bound {} s",
        s.clients_per_route,
        routes.join(", "),
        s.hang_bound_s
    );
    let _ = writeln!(
        out,
        "  pulsegate: probe_interval {} s, dead_after {} s, check every {} s (fall 2), down_grace {} s",
        s.probe_interval_s, s.dead_after_s, s.check_interval_s, s.down_grace_s
    );
    if let Some(at) = r.fault.restarted_s {
        let _ = writeln!(out, "  primary restarted at {at:.2} s");
    }
    if let Some(at) = r.fault.healed_s {
        let _ = writeln!(out, "  partition healed at {at:.2} s");
    }
}

fn detection(out: &mut String, r: &Report) {
    let Some(d) = &r.detection else {
        return;
    };
    let _ = writeln!(
        out,
        "\npulsegate's detection (after the fault, from its log)"
    );
    let eviction = match (&d.first_eviction_s, &d.first_eviction_reason) {
        (Some(at), Some(reason)) => {
            format!("{} ({reason}; {} in all)", after(Some(*at)), d.evictions)
        }
        _ => "none".to_string(),
    };
    let rows = [
        ("first sign", after(d.detected_s)),
        ("first eviction", eviction),
        ("primary suspect", after(d.primary_suspect_s)),
        ("primary down", after(d.primary_down_s)),
    ];
    for (label, value) in rows {
        let _ = writeln!(out, "  {label:<22}{value}");
    }
    if d.primary_role_changed_s.is_some() {
        let _ = writeln!(
            out,
            "  {:<22}{}",
            "primary role changed",
            after(d.primary_role_changed_s)
        );
    }
    if d.primary_up_again_s.is_some() {
        let _ = writeln!(
            out,
            "  {:<22}{}",
            "primary up again",
            after(d.primary_up_again_s)
        );
    }
    if d.evictions_before_fault > 0 {
        let _ = writeln!(
            out,
            "  evictions before the fault (false alarms): {}",
            d.evictions_before_fault
        );
    }
}

fn outcomes(out: &mut String, r: &Report) {
    let mut head = format!("\n  {:<30}", "requests");
    for route in &r.routes {
        let _ = write!(head, "{:>14}", route.route);
    }
    let _ = writeln!(out, "{head}");
    let row = |out: &mut String, label: &str, f: &dyn Fn(&RouteReport) -> String| {
        let mut line = format!("  {label:<30}");
        for route in &r.routes {
            let _ = write!(line, "{:>14}", f(route));
        }
        let _ = writeln!(out, "{line}");
    };
    row(out, "sent", &|x| x.requests.to_string());
    row(out, "ok", &|x| x.ok.to_string());
    row(out, "failed", &|x| x.failed.to_string());
    let hung = format!("hung (> {} s)", r.settings.hang_bound_s);
    row(out, &hung, &|x| x.hung.to_string());
    row(out, "unfinished at the end", &|x| x.unfinished.to_string());
    row(out, "sessions ended under clients", &|x| {
        x.sessions_ended.to_string()
    });
    row(out, "false evictions", &|x| x.false_evictions.to_string());
    if r.routes.iter().any(|x| x.wrong_role > 0) || r.fault.kind == "role-flip" {
        row(out, "writes to the wrong role", &|x| {
            x.wrong_role.to_string()
        });
        row(out, "last wrong-role write", &|x| {
            after(x.wrong_role_last_s)
        });
    }
    row(out, "first failure seen", &|x| after(x.first_failure_s));
    row(out, "clients served again", &|x| {
        format!("{}/{}", x.clients_served_again, x.clients)
    });
    row(out, "all served again after", &|x| match x.served_again_s {
        Some(s) => format!("{s:.2} s"),
        None => "never".to_string(),
    });
}

fn latencies(out: &mut String, r: &Report) {
    let _ = writeln!(
        out,
        "\n  {:<20}{:>9}{:>10}{:>10}{:>10}{:>10}",
        "latency (ms)", "requests", "p50", "p99", "p99.9", "max"
    );
    for route in &r.routes {
        for (phase, stats) in [
            ("before", &route.before),
            ("during", &route.during),
            ("after", &route.after),
        ] {
            let label = format!("{:<10}{phase}", route.route);
            let _ = writeln!(out, "  {label:<20}{}", phase_row(stats));
        }
    }
}

fn phase_row(s: &PhaseStats) -> String {
    let ms = |v: Option<f64>| match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
        None => "-".to_string(),
    };
    format!(
        "{:>9}{:>10}{:>10}{:>10}{:>10}",
        s.requests,
        ms(s.p50_ms),
        ms(s.p99_ms),
        ms(s.p999_ms),
        ms(s.max_ms)
    )
}

fn after(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) => format!("+{s:.2} s"),
        None => "not seen".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_aligned_and_missing_values_are_dashes() {
        let s = PhaseStats {
            requests: 12,
            ok: 12,
            p50_ms: Some(0.213),
            p99_ms: Some(1500.4),
            ..PhaseStats::default()
        };
        assert_eq!(
            phase_row(&s),
            "       12      0.21      1500         -         -"
        );
        assert_eq!(after(None), "not seen");
        assert_eq!(after(Some(1.234)), "+1.23 s");
    }
}
