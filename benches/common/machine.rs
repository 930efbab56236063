//! What the results were measured on, in one line for the result files:
//! CPU model, cores, memory, kernel, and how busy the machine was just
//! before the bench started (other work on a 2-core machine moves every
//! figure, so a busy machine marks the results preliminary).

use std::process::Command;
use std::time::Duration;

/// How long the machine is watched before a bench, to see if it is quiet.
const QUIET_CHECK: Duration = Duration::from_secs(2);
/// Busier than this (% of all cores) before the run: results are
/// preliminary.
const QUIET_MAX_PCT: f64 = 10.0;

/// "2 cores (AMD EPYC 7B13), 24 GiB RAM, Linux 6.18.0; its cores 1 % busy
/// in the 2 s before the run (load average 0.05 0.10 0.08)", saying "so these figures
/// are preliminary" when the machine was busy. Takes 2 s.
pub fn describe() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let busy = busy_pct(QUIET_CHECK);
    let warning = if busy > QUIET_MAX_PCT {
        ", **so these figures are preliminary**"
    } else {
        ""
    };
    format!(
        "{cores} cores ({cpu}), {mem} GiB RAM, Linux {kernel}; its cores {busy:.0} % busy in \
         the {secs} s before the run{warning} (load average {load})",
        cpu = cpu_model(),
        mem = mem_gib(),
        kernel = read_trimmed("/proc/sys/kernel/osrelease"),
        secs = QUIET_CHECK.as_secs(),
        load = load_average(),
    )
}

/// The machine's non-idle time over `window`, % of all its cores.
fn busy_pct(window: Duration) -> f64 {
    let (busy0, total0) = cpu_ticks();
    std::thread::sleep(window);
    let (busy1, total1) = cpu_ticks();
    let total = total1.saturating_sub(total0).max(1);
    100.0 * busy1.saturating_sub(busy0) as f64 / total as f64
}

/// (busy, total) ticks of all CPUs, from the first line of /proc/stat.
pub fn cpu_ticks() -> (u64, u64) {
    let stat = read_trimmed("/proc/stat");
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: idle and iowait are
    // the idle ones.
    let total: u64 = ticks.iter().take(8).sum();
    let idle: u64 = ticks.iter().skip(3).take(2).sum();
    (total - idle, total)
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    let text = read_trimmed("/proc/loadavg");
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Today's date (UTC), as `date -u +%F` prints it.
pub fn today() -> String {
    Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "unknown date".into())
}

fn cpu_model() -> String {
    read_trimmed("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".into(), |(_, model)| model.trim().to_string())
}

fn mem_gib() -> u64 {
    let kib: u64 = read_trimmed("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (kib as f64 / (1 << 20) as f64).round() as u64
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
