//! No false alarm under load: `redis-benchmark` and `pgbench` run for
//! `LOAD_SECS` seconds each (default 20) through the pulsegate binary,
//! configured with the product defaults plus a `[listener.check]` of the
//! backend's kind, against a redis-server and a PostgreSQL started by the
//! test. Both tools must report zero errors, pulsegate must log zero
//! evictions and no backend state change, and the checks must have run
//! during the load.
//!
//! Needs `redis-server` + `redis-tools` (redis-benchmark, redis-cli) and
//! `postgresql-15` (postgres, initdb, pgbench) + `postgresql-client-15`;
//! a missing one prints "skipping: <reason>" (fails under `CI=true`).
//! Everything listens on free 127.0.0.1 ports with data in temp dirs, so
//! the tests run beside the rest of the suite.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pulsegate::lab::servers::find_program;
use pulsegate::lab::servers::postgres::USER as PG_USER;
use support::or_skip;
use support::servers::{run_bounded, state_changes, HostProxy, PgCluster, RedisServer};

/// How long each load runs: `LOAD_SECS`, default 20.
fn load_duration() -> Duration {
    let secs = std::env::var("LOAD_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// Product defaults, plus a check of `kind`.
fn config(name: &str, bind: SocketAddr, backend: SocketAddr, kind: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\nbackends = [\"{backend}\"]\n\n\
         [listener.check]\nkind = \"{kind}\"\n"
    )
}

/// The proxy's log must hold no eviction, and the backend must never be
/// marked down. A single slow check on a saturated 2-core CI machine may
/// make it *suspect* for one interval (seen once: up → suspect → up); that
/// only triggers probes, which a live backend answers, so it is no alarm.
fn assert_no_false_alarm(proxy: &HostProxy) {
    let events = proxy.events();
    let evictions: Vec<_> = events.iter().filter(|e| e["event"] == "eviction").collect();
    eprintln!("pulsegate evictions: {}", evictions.len());
    assert!(
        evictions.is_empty(),
        "evictions under load: {evictions:#?}\nlog:\n{}",
        proxy.log()
    );
    let changes = state_changes(&events);
    eprintln!("pulsegate backend state changes: {changes:?}");
    assert!(
        changes.iter().all(|(_, _, to)| to != "down"),
        "the backend was marked down under load: {changes:?}"
    );
    // Learning the role at the first check is logged at info, not as an alarm.
    let warnings: Vec<_> = events
        .iter()
        .filter(|e| e["level"] == "WARN" || e["level"] == "ERROR")
        .filter(|e| e["message"] != "backend state changed")
        .collect();
    assert!(warnings.is_empty(), "warnings under load: {warnings:#?}");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ------------------------------------------------------------------ redis

fn redis_cli(addr: SocketAddr, args: &[&str]) -> String {
    let mut command = Command::new("redis-cli");
    command
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args);
    let out = run_bounded(command, Duration::from_secs(10));
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    text(&out.stdout)
}

/// `name:value` from an INFO text.
fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
}

/// The `calls=` of `cmdstat_<command>` in INFO commandstats.
fn command_calls(info: &str, command: &str) -> u64 {
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))
        .and_then(|rest| rest.split(',').find_map(|kv| kv.strip_prefix("calls=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn redis_benchmark_through_pulsegate_without_false_alarm() {
    let tools = [
        ("redis-benchmark", "redis-tools"),
        ("redis-cli", "redis-tools"),
    ];
    for (program, package) in tools {
        if or_skip(find_program(program, package)).is_none() {
            return;
        }
    }
    let Some(redis) = or_skip(RedisServer::start(None, &[])) else {
        return;
    };
    let redis_addr = redis.addr();
    let proxy = HostProxy::start(&support::exe(), |bind| {
        config("redis", bind, redis_addr, "redis")
    });
    let load = load_duration();

    // Repeated redis-benchmark runs (16 clients, keep-alive) until the
    // load time is used up; PING is left out so that every PING the
    // server counts is one of pulsegate's checks.
    let tests = "set,get,incr,lpush,rpop,hset";
    let per_run = 10_000u64;
    let started = Instant::now();
    let (mut runs, mut requests, mut failures) = (0u32, 0u64, Vec::new());
    let mut rps: Vec<(String, f64)> = Vec::new();
    while started.elapsed() < load {
        let mut command = Command::new("redis-benchmark");
        command
            .args(["-h", &proxy.addr.ip().to_string()])
            .args(["-p", &proxy.addr.port().to_string()])
            .args(["-c", "16", "-n", &per_run.to_string(), "-t", tests, "--csv"]);
        let out = run_bounded(command, load + Duration::from_secs(60));
        runs += 1;
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        if !out.status.success() || stderr.to_lowercase().contains("error") {
            failures.push(format!("run {runs}: {}: {stderr}{stdout}", out.status));
            break;
        }
        for line in stdout.lines().skip(1) {
            let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
            if let (Some(test), Some(value)) = (fields.first(), fields.get(1)) {
                if let Ok(value) = value.parse::<f64>() {
                    rps.push((test.to_string(), value));
                    requests += per_run;
                }
            }
        }
    }
    let elapsed = started.elapsed();
    let info = redis_cli(redis_addr, &["INFO", "all"]);
    let error_replies = info_field(&info, "total_error_replies");
    let checks = command_calls(&info, "ping");

    let mut per_test: Vec<(String, f64, usize)> = Vec::new();
    for (test, value) in &rps {
        match per_test.iter_mut().find(|(t, _, _)| t == test) {
            Some(entry) => {
                entry.1 += value;
                entry.2 += 1;
            }
            None => per_test.push((test.clone(), *value, 1)),
        }
    }
    eprintln!(
        "redis-benchmark through pulsegate: {runs} runs, {requests} requests in {:.1} s \
         ({:.0} req/s overall), failures {}, server error replies {error_replies:?}, \
         pulsegate checks (PING) {checks}",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64(),
        failures.len(),
    );
    for (test, sum, n) in &per_test {
        eprintln!("  {test}: {:.0} req/s (mean of {n} runs)", sum / *n as f64);
    }
    assert!(failures.is_empty(), "redis-benchmark failed: {failures:#?}");
    assert!(requests > 0, "redis-benchmark reported nothing");
    assert_eq!(error_replies, Some(0), "redis error replies");
    // The default check runs every 1 s ± 100 ms: at least one per 2 s.
    let expected = elapsed.as_secs() / 2;
    assert!(
        checks >= expected,
        "only {checks} checks in {elapsed:?}: did the checks run during the load?"
    );
    assert_no_false_alarm(&proxy);
}

// --------------------------------------------------------------- postgres

/// `pgbench ARGS` through pulsegate, bounded; its output (both streams).
fn pgbench(program: &Path, proxy: SocketAddr, args: &[&str], timeout: Duration) -> String {
    let mut command = Command::new(program);
    command
        .args([
            "-h",
            &proxy.ip().to_string(),
            "-p",
            &proxy.port().to_string(),
        ])
        .args(["-U", PG_USER])
        .args(args)
        .arg("postgres")
        .env("PGCONNECT_TIMEOUT", "10");
    let out = run_bounded(command, timeout);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}\n{all}",
        out.status
    );
    all
}

/// The number after `prefix` on the line that starts with it.
fn figure(output: &str, prefix: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn pgbench_through_pulsegate_without_false_alarm() {
    let Some(cluster) = or_skip(PgCluster::init()) else {
        return;
    };
    let Some(pgbench_program) = or_skip(cluster.install().client("pgbench")) else {
        return;
    };
    // log_connections: every connection, pulsegate's checks included, is
    // one "connection received" line of the server's log.
    let pg = cluster
        .start_on_host(&["log_connections=on", "max_connections=50"])
        .expect("start postgres");
    let proxy = HostProxy::start(&support::exe(), |bind| {
        config("pg", bind, pg.addr(), "postgres")
    });
    let load = load_duration();

    let init = pgbench(
        &pgbench_program,
        proxy.addr,
        &["-i", "-s", "1", "-q"],
        Duration::from_secs(120),
    );
    assert!(init.contains("done"), "pgbench -i: {init}");

    let received_before = pg.log().matches("connection received").count();
    let secs = load.as_secs().to_string();
    let started = Instant::now();
    let run = pgbench(
        &pgbench_program,
        proxy.addr,
        &["-c", "8", "-j", "2", "-T", &secs, "-P", "5"],
        load + Duration::from_secs(60),
    );
    let elapsed = started.elapsed();
    let received = pg.log().matches("connection received").count() - received_before;
    let processed = figure(&run, "number of transactions actually processed:");
    let failed = figure(&run, "number of failed transactions:");
    let tps = figure(&run, "tps =");
    let latency = figure(&run, "latency average =");
    eprintln!(
        "pgbench -c 8 -T {secs} through pulsegate: {processed:?} transactions, \
         failed {failed:?}, tps {tps:?}, latency average {latency:?} ms, \
         {received} server connections during the run (8 pgbench + pulsegate's checks), \
         {:.1} s",
        elapsed.as_secs_f64()
    );
    let progress: Vec<&str> = run.lines().filter(|l| l.starts_with("progress:")).collect();
    for line in progress {
        eprintln!("  {line}");
    }
    assert!(processed.is_some_and(|n| n > 0.0), "pgbench output:\n{run}");
    // pgbench 15 prints the failed count; older ones abort on an error.
    assert!(failed.is_none_or(|n| n == 0.0), "pgbench failures:\n{run}");
    assert!(!run.contains("aborted"), "pgbench clients aborted:\n{run}");
    let checks = received.saturating_sub(8) as u64;
    let expected = elapsed.as_secs() / 2;
    assert!(
        checks >= expected,
        "only {checks} check connections in {elapsed:?}: did the checks run during the load?"
    );
    assert_no_false_alarm(&proxy);
}
