//! What does watching idle sessions cost? Starts the release `pulsegate`
//! binary, opens N idle proxied sessions (default 10,000) and measures, over
//! a fixed window, the proxy's CPU time (user + system, from /proc), the
//! loopback packets per second (the probes and their ACKs, showing that
//! probing really happens), and the proxy's RSS growth per session.
//!
//! Run: `cargo bench --bench idle_watch`. The echo backend is a separate
//! `pulsegate lab-backend` process. Knobs (env):
//! `SESSIONS` (10000), `WINDOW_SECS` (30), `PROBE_INTERVAL` ("1s").
//! Bounded: it stops by itself after setup + warm-up + the window.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches` discovery
    }
    let sessions: usize = env_or("SESSIONS", 10_000);
    let window = Duration::from_secs(env_or("WINDOW_SECS", 30));
    let probe_interval: String = env_or("PROBE_INTERVAL", "1s".to_string());
    let fd_limit = raise_fd_limit();
    // A proxy needs two descriptors per session. Where RLIMIT_NOFILE is too
    // low for all of them in one process (20,000 in our sandbox), the
    // sessions are spread over several proxies and their CPU is summed.
    let proxies = (2 * sessions).div_ceil(fd_limit as usize - 500).max(1);
    assert!(
        sessions + 500 < fd_limit as usize,
        "SESSIONS too high for RLIMIT_NOFILE {fd_limit}"
    );

    let dir = tempfile::tempdir().unwrap();
    let backend_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut backend = Command::new(env!("CARGO_BIN_EXE_pulsegate"))
        .args([
            "--log-level",
            "warn",
            "lab-backend",
            "--max-lifetime",
            "10m",
            "--listen",
        ])
        .arg(backend_addr.to_string())
        .spawn()
        .expect("start the echo backend");
    wait_listening(backend_addr.port());

    let mut children = Vec::new();
    for i in 0..proxies {
        let port = free_port();
        let config = dir.path().join(format!("bench{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[[listener]]\nname = \"bench\"\nbind = \"127.0.0.1:{port}\"\n\
                 backends = [\"{backend_addr}\"]\nmax_connections = {}\n\
                 [listener.liveness]\nprobe_interval = \"{probe_interval}\"\ndead_after = \"3s\"\n",
                sessions + 100
            ),
        )
        .unwrap();
        children.push((start_proxy(&config, port), port));
    }
    let pids: Vec<u32> = children.iter().map(|(c, _)| c.id()).collect();
    let rss_before: u64 = pids.iter().map(|&p| rss_kib(p)).sum();

    let started = Instant::now();
    let mut clients = Vec::with_capacity(sessions);
    for (i, (_, port)) in children.iter().enumerate() {
        let share = sessions / proxies + usize::from(i < sessions % proxies);
        clients.extend(open_sessions(*port, share));
    }
    println!(
        "opened {sessions} proxied sessions through {proxies} pulsegate process(es) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Warm-up: every leg goes quiet, gets armed and probed at least once.
    thread::sleep(Duration::from_secs(5));
    let rss_after: u64 = pids.iter().map(|&p| rss_kib(p)).sum();

    let cpu = |pids: &[u32]| pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>();
    let drops0 = backlog_drops();
    let machine0 = machine_busy_ticks();
    let (cpu0, lo0, t0) = (cpu(&pids), lo_packets(), Instant::now());
    thread::sleep(window);
    let (cpu1, lo1, elapsed) = (cpu(&pids), lo_packets(), t0.elapsed());
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let cpu_secs = (cpu1 - cpu0) as f64 / ticks_per_sec;
    let core_pct = 100.0 * cpu_secs / elapsed.as_secs_f64();
    let pps = (lo1 - lo0) as f64 / elapsed.as_secs_f64();
    let per_session = rss_after.saturating_sub(rss_before) as f64 * 1024.0 / sessions as f64;
    let alive = clients.iter().filter(|c| still_open(c)).count();
    let drops = backlog_drops() - drops0;
    let machine_pct =
        100.0 * (machine_busy_ticks() - machine0) as f64 / ticks_per_sec / elapsed.as_secs_f64();

    println!("window:                 {:.1} s", elapsed.as_secs_f64());
    println!("probe_interval:         {probe_interval}");
    println!("proxy CPU (user+sys):   {cpu_secs:.2} s = {core_pct:.2} % of one core");
    println!("whole machine busy:     {machine_pct:.2} % of one core (incl. softirq sending/answering probes, the idle backend and this bench)");
    println!("loopback packets/s:     {pps:.0} (keepalive probes + their ACKs, both legs)");
    println!(
        "proxy RSS:              {rss_before} KiB before → {rss_after} KiB with sessions = {per_session:.0} B per session"
    );
    println!("backlog drops:          {drops} (netdev_max_backlog overflows during the window)");
    println!("sessions still open:    {alive}/{sessions} (a live backend: every eviction is a false one)");
    println!(
        "| {sessions} idle sessions, probe_interval {probe_interval} | {core_pct:.2} % of one core | {pps:.0} pkt/s on lo | {per_session:.0} B RSS/session |"
    );
    for (mut child, _) in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = backend.kill();
    let _ = backend.wait();
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns it.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_proxy(config: &std::path::Path, port: u16) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_pulsegate"))
        .args(["--log-level", "warn", "run", "-c"])
        .arg(config)
        .stdout(Stdio::null())
        .spawn()
        .expect("start pulsegate");
    wait_listening(port);
    child
}

fn open_sessions(port: u16, n: usize) -> Vec<TcpStream> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("client {i}: {e}"));
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        c.write_all(b"!").unwrap();
        c.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("client {i}: no echo through the proxy: {e}"));
        clients.push(c);
    }
    clients
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the ")" of comm: state is field 3; utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn lo_packets() -> u64 {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap();
    dev.lines()
        .find(|l| l.trim_start().starts_with("lo:"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Open and not reset: a non-blocking peek finds nothing to read yet.
fn still_open(c: &TcpStream) -> bool {
    c.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!(c.peek(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock);
    c.set_nonblocking(false).unwrap();
    open
}

/// Packets dropped because a CPU's input backlog was full (all CPUs).
fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

/// Non-idle CPU ticks of the whole machine (user, nice, system, irq, softirq, steal).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum()
}
