//! `pulsegate bench failover`, run for real in a short smoke version (the
//! one CI runs): the echo workload with a blackholed primary (pulsegate's
//! clients are served again within the watcher's bound while the direct
//! ones hang) and with a killed primary (RST/FIN delivered: pulsegate
//! fails over at once, direct clients are refused), plus the exit codes
//! for bad flags and missing privileges.
//!
//! The runs need root (the lab); without it they print "skipping:
//! <reason>", and under `CI=true` they fail instead.

#![cfg(feature = "bench")]

mod support;

use std::path::Path;
use std::process::{Command, Output};

use pulsegate::lab::servers::find_program;
use serde_json::Value;

/// Runs `pulsegate bench failover ARGS --quiet --out DIR`.
fn bench(args: &[&str], out: &Path) -> Output {
    Command::new(support::exe())
        .args(["bench", "failover", "--quiet", "--out"])
        .arg(out)
        .args(args)
        .output()
        .expect("run pulsegate bench failover")
}

/// The run succeeded; its report.json, parsed.
fn report(output: &Output, out: &Path) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("all served again after"),
        "no summary table:\n{stdout}"
    );
    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json");
    serde_json::from_str(&text).expect("report.json is JSON")
}

/// The report's object for `name` ("pulsegate", "haproxy", "direct").
fn route<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|x| x["route"] == name))
        .unwrap_or_else(|| panic!("no route {name} in the report: {}", r["routes"]))
}

fn secs(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("not a number of seconds: {v}"))
}

fn assert_svg(out: &Path) {
    let svg = std::fs::read_to_string(out.join("timeline.svg")).expect("timeline.svg");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "not an SVG"
    );
    assert!(
        svg.contains("fault (blackhole)") || svg.contains("fault (kill)"),
        "no fault marker"
    );
}

/// Skips (or under CI=true fails) when the lab cannot run here.
fn lab_available(tag: &str) -> bool {
    support::lab_or_skip(tag).is_some()
}

#[test]
fn blackholed_primary_pulsegate_clients_are_served_again_direct_ones_hang() {
    if !lab_available("bench-probe") {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let args = [
        "--workload",
        "echo",
        "--fault",
        "blackhole",
        "--clients",
        "8",
        "--duration",
        "6s",
        "--fault-at",
        "2s",
        "--hang-bound",
        "2s",
    ];
    let output = bench(&args, out.path());
    let r = report(&output, out.path());
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));

    let detected = secs(&r["detection"]["detected_s"]);
    // The check (every 500 ms, timeout 500 ms) or the watcher (probe 1 s,
    // dead_after 1 s, sweep 0.5 s) sees it first.
    assert!(
        detected > 0.0 && detected < 2.6,
        "detected after {detected} s"
    );
    assert!(
        secs(&r["detection"]["first_eviction_s"]) < 3.0,
        "{}",
        r["detection"]
    );
    assert_eq!(
        r["detection"]["evictions_before_fault"], 0,
        "false evictions"
    );

    let pulsegate = route(&r, "pulsegate");
    assert_eq!(pulsegate["clients_served_again"], 8, "{pulsegate}");
    let served = secs(&pulsegate["served_again_s"]);
    // probe_interval + dead_after + margin.
    assert!(
        served < 3.5,
        "pulsegate clients served again after {served} s"
    );
    assert_eq!(pulsegate["hung"], 0, "a pulsegate client hung: {pulsegate}");
    assert!(
        pulsegate["after"]["requests"].as_u64().unwrap() > 100,
        "{pulsegate}"
    );

    let direct = route(&r, "direct");
    assert!(
        direct["served_again_s"].is_null(),
        "direct recovered? {direct}"
    );
    assert_eq!(direct["clients_served_again"], 0, "{direct}");
    let stuck = direct["hung"].as_u64().unwrap() + direct["unfinished"].as_u64().unwrap();
    assert!(stuck >= 8, "every direct client should hang: {direct}");
    assert_svg(out.path());
    assert!(out.path().join("pulsegate.toml").exists());
}

#[test]
fn killed_primary_pulsegate_fails_over_at_once_direct_clients_are_refused() {
    if !lab_available("bench-probe") {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let args = [
        "--fault",
        "kill",
        "--clients",
        "8",
        "--duration",
        "4s",
        "--fault-at",
        "1500ms",
    ];
    let output = bench(&args, out.path());
    let r = report(&output, out.path());
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));

    // The kernel's FIN/RST arrive: evicted as peer_closed/peer_reset.
    assert!(
        secs(&r["detection"]["detected_s"]) < 1.0,
        "{}",
        r["detection"]
    );
    let pulsegate = route(&r, "pulsegate");
    assert!(secs(&pulsegate["served_again_s"]) < 1.0, "{pulsegate}");
    assert_eq!(pulsegate["hung"], 0, "{pulsegate}");
    let direct = route(&r, "direct");
    assert!(direct["served_again_s"].is_null(), "{direct}");
    assert!(
        direct["failures"]["refused"].as_u64().unwrap_or(0) > 0,
        "{direct}"
    );
    assert_eq!(direct["hung"], 0, "{direct}");
    assert_svg(out.path());
}

#[test]
fn inconsistent_flags_exit_2_naming_the_flag() {
    let out = tempfile::tempdir().unwrap();
    let output = bench(&["--duration", "6s", "--fault-at", "7s"], out.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--fault-at"), "{stderr}");
}

/// As an unprivileged user (when the test runs as root and can switch to
/// `nobody` with setpriv) the bench says which privilege it needs and
/// exits 3.
#[test]
fn without_root_it_names_the_privilege_and_exits_3() {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        // Then the bench itself is the unprivileged run.
        let out = tempfile::tempdir().unwrap();
        let output = bench(&[], out.path());
        assert_eq!(output.status.code(), Some(3), "{output:?}");
        return;
    }
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(support::exe())
        .args([
            "bench",
            "failover",
            "--quiet",
            "--out",
            "/nonexistent/bench",
        ])
        .output();
    let output = match output {
        Ok(o)
            if o.status.code() == Some(3)
                || !String::from_utf8_lossy(&o.stderr).contains("setpriv") =>
        {
            o
        }
        other => {
            eprintln!("skipping: cannot run the binary as nobody here: {other:?}");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );
}

/// `haproxy` on PATH or in /usr/sbin; under CI=true it must be there.
fn haproxy_or_skip() -> bool {
    support::or_skip(find_program("haproxy", "haproxy")).is_some()
}

/// The short matrix CI runs: echo, three faults (loss, flow, blackhole),
/// pulsegate, HAProxy and direct side by side. Every route is in every
/// report, the fault reached every route at the same instant, the counts
/// add up, and pulsegate's row meets its targets: no false eviction under
/// 2 % loss, the dropped flow found within 10 s, every client served again
/// within 2 s of a blackhole.
#[test]
fn a_short_matrix_measures_every_route_under_the_same_fault() {
    if !lab_available("bench-probe") || !haproxy_or_skip() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let args = [
        "--matrix",
        "--faults",
        "loss,flow,blackhole",
        "--via",
        "pulsegate,haproxy,direct",
        "--clients",
        "8",
        "--duration",
        "8s",
        "--fault-at",
        "2s",
    ];
    let output = bench(&args, out.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "matrix failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let markdown = std::fs::read_to_string(out.path().join("matrix.md")).expect("matrix.md");
    assert!(markdown.contains("| flow | haproxy |"), "{markdown}");
    let matrix: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("matrix.json")).unwrap())
            .unwrap();
    assert_eq!(matrix["rows"].as_array().unwrap().len(), 9, "{matrix}");

    for fault in ["loss", "flow", "blackhole"] {
        let dir = out.path().join(fault);
        let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
        let r: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(r["fault"]["kind"], fault);
        let at = secs(&r["fault"]["at_s"]);
        for name in ["pulsegate", "haproxy", "direct"] {
            let x = route(&r, name);
            let applied = secs(&x["fault_applied_s"]);
            assert!(
                (applied - at).abs() <= 0.05,
                "{fault}: the fault reached {name} at {applied} s, not at {at} s"
            );
            let n = |k: &str| x[k].as_u64().unwrap_or_else(|| panic!("{k} in {x}"));
            assert!(n("requests") > 500, "{fault} {name}: {x}");
            assert_eq!(
                n("ok") + n("failed") + n("hung") + n("unfinished"),
                n("requests"),
                "{fault} {name}: outcomes do not add up: {x}"
            );
            let phases: u64 = ["before", "during", "after"]
                .iter()
                .map(|p| x[p]["requests"].as_u64().unwrap())
                .sum();
            assert_eq!(phases, n("requests") - n("unfinished"), "{fault} {name}");
            assert!(n("false_evictions") <= n("sessions_ended"), "{x}");
        }
        assert!(dir.join("timeline.svg").exists());
        assert!(dir.join("haproxy.cfg").exists());
        assert!(r["configs"]["haproxy"]
            .as_str()
            .unwrap()
            .contains("on-marked-down shutdown-sessions"));
    }

    let report = |fault: &str| -> Value {
        let text = std::fs::read_to_string(out.path().join(fault).join("report.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    // 2 % loss: no live session of pulsegate's ended.
    let loss = report("loss");
    let pulsegate = route(&loss, "pulsegate");
    assert_eq!(pulsegate["false_evictions"], 0, "{pulsegate}");
    assert_eq!(pulsegate["sessions_ended"], 0, "{pulsegate}");
    assert_eq!(loss["detection"]["evictions"], 0, "{}", loss["detection"]);
    // The dropped flow: one connection per route, each its own.
    let flow = report("flow");
    let flows: std::collections::BTreeSet<&str> = ["pulsegate", "haproxy", "direct"]
        .iter()
        .map(|name| {
            route(&flow, name)["dropped_flow"]
                .as_str()
                .unwrap_or_else(|| panic!("no flow of {name} dropped"))
        })
        .collect();
    assert_eq!(flows.len(), 3, "{flows:?}");
    // Exactly one session ended through pulsegate, found within 10 s.
    let pulsegate = route(&flow, "pulsegate");
    assert_eq!(pulsegate["false_evictions"], 0, "{pulsegate}");
    assert_eq!(pulsegate["sessions_ended"], 1, "{pulsegate}");
    let found = secs(&pulsegate["served_again_s"]);
    assert!(found < 10.0, "the dropped flow found after {found} s");
    // Direct clients have no one to reset the dropped flow: one hangs.
    assert!(route(&flow, "direct")["hung"].as_u64().unwrap() >= 1);
    // Blackhole: every pulsegate client served again within 2 s.
    let blackhole = report("blackhole");
    let pulsegate = route(&blackhole, "pulsegate");
    let served = secs(&pulsegate["served_again_s"]);
    assert!(served < 2.0, "served again after {served} s: {pulsegate}");
    assert_eq!(pulsegate["hung"], 0, "{pulsegate}");
    assert!(route(&blackhole, "direct")["served_again_s"].is_null());
}

/// `role-flip` with pulsegate's `role = "primary"`: no write reaches the
/// demoted server more than one check interval (500 ms) after the flip;
/// directly, every client keeps writing to it.
fn role_flip(workload: &str, via: &str) -> Value {
    let out = tempfile::tempdir().unwrap();
    let args = [
        "--workload",
        workload,
        "--fault",
        "role-flip",
        "--via",
        via,
        "--clients",
        "8",
        "--duration",
        "6s",
        "--fault-at",
        "2s",
    ];
    let output = bench(&args, out.path());
    let r = report(&output, out.path());
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    let pulsegate = route(&r, "pulsegate");
    // The first read-only reply has the backend checked at once, and its
    // sessions end at their next request: +0.01 s (redis) and +0.05 to
    // +0.27 s (postgres) with 16 clients per route through four routes on
    // two cores; the target is one check interval.
    if let Some(last) = pulsegate["wrong_role_last_s"].as_f64() {
        assert!(
            last <= 0.5,
            "a write reached the demoted server {last} s after the flip"
        );
    }
    if pulsegate["false_evictions"] != 0 {
        // What pulsegate said about those sessions, to tell its evictions
        // (and their reasons) from ends it did not decide.
        let log = std::fs::read_to_string(out.path().join("pulsegate.log")).unwrap_or_default();
        let said: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("evict") || l.contains("WARN") || l.contains("ERROR"))
            .take(40)
            .collect();
        panic!(
            "sessions ended before the flip that it does not explain: {pulsegate}\n\
             pulsegate's log:\n{}",
            said.join("\n")
        );
    }
    assert!(
        pulsegate["after"]["ok"].as_u64().unwrap() > 100,
        "writes go to the new primary: {pulsegate}"
    );
    let direct = route(&r, "direct");
    assert!(direct["wrong_role"].as_u64().unwrap() > 100, "{direct}");
    assert!(
        secs(&direct["wrong_role_last_s"]) > 3.0,
        "direct clients write to the demoted server until the end: {direct}"
    );
    r
}

#[test]
fn redis_role_flip_no_write_reaches_the_demoted_server_through_pulsegate() {
    if !lab_available("bench-probe") || !haproxy_or_skip() {
        return;
    }
    let r = role_flip("redis", "pulsegate,haproxy,direct");
    // HAProxy's check asks for role:master: it follows too, measured.
    assert!(route(&r, "haproxy")["requests"].as_u64().unwrap() > 500);
}

#[test]
fn postgres_role_flip_through_pulsegate_and_pgbouncer() {
    if !lab_available("bench-probe") {
        return;
    }
    if support::or_skip(find_program("pgbouncer", "pgbouncer")).is_none() {
        return;
    }
    let r = role_flip("postgres", "pulsegate,pgbouncer,direct");
    // PgBouncer sits in front of the primary and has no notion of roles.
    let pgbouncer = route(&r, "pgbouncer");
    assert!(
        pgbouncer["wrong_role"].as_u64().unwrap() > 100,
        "{pgbouncer}"
    );
    assert!(r["configs"]["pgbouncer"]
        .as_str()
        .unwrap()
        .contains("pool_mode = session"));
}

/// `dns-move` (echo): the old primary is silenced and the name moved to
/// the secondary. pulsegate, given the name, follows it and evicts the
/// silent sessions; direct clients resolve the name at every connect, so
/// they are served again once their hung request gives up.
#[test]
fn a_moved_name_is_followed_through_pulsegate() {
    if !lab_available("bench-probe") {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let args = [
        "--fault",
        "dns-move",
        "--clients",
        "8",
        "--duration",
        "7s",
        "--fault-at",
        "2s",
        "--hang-bound",
        "2s",
    ];
    let output = bench(&args, out.path());
    let r = report(&output, out.path());
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    let config = r["configs"]["pulsegate"].as_str().unwrap();
    assert!(config.contains("db.pulsegate.lab:7001"), "{config}");
    let pulsegate = route(&r, "pulsegate");
    let served = secs(&pulsegate["served_again_s"]);
    // Probe 1 s + dead_after 1 s, with the name re-resolved every second.
    assert!(served < 3.0, "served again after {served} s: {pulsegate}");
    assert_eq!(pulsegate["hung"], 0, "{pulsegate}");
    let direct = route(&r, "direct");
    assert_eq!(direct["clients_served_again"], 8, "{direct}");
    assert!(secs(&direct["served_again_s"]) >= 2.0, "{direct}");
}

/// SIGTERM (`timeout`, `kill`) during the load ends the run as Ctrl-C
/// does: exit 1 saying so, every process it started gone, its namespaces
/// deleted.
#[test]
fn sigterm_during_the_load_cleans_up() {
    if !lab_available("bench-probe") {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(support::exe())
        .args(["bench", "failover", "--quiet", "--clients", "4"])
        .args(["--duration", "60s", "--out"])
        .arg(out.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the bench");
    let pid = child.id();
    // The intro's last line is printed as the load starts.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("clients per route for") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(n > 0, "the bench ended before its load started");
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !listed.contains(&format!("pg-{pid}-")),
        "namespaces left behind: {listed}"
    );
    let left = Command::new("pgrep")
        .args(["-f", &format!("pulsegate-lab/pg-{pid}-")])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
