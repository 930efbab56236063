//! What does watching idle sessions cost? Opens N idle proxied sessions
//! (default 10,000) through the release `pulsegate` binary and, in the same
//! run, through HAProxy in TCP mode (`option tcpka`, when `haproxy` is
//! installed), and measures over a fixed window: the proxy's CPU time
//! (user + system, from /proc), the whole machine's busy time (which includes
//! the kernel sending and answering keepalive probes), loopback packets per
//! second (proving the probes happen), softnet backlog drops, RSS growth per
//! session, and how many sessions survived (the backend is alive: every
//! eviction would be a false one).
//!
//! Run: `cargo bench --bench idle_watch`. The echo backend is a separate
//! `pulsegate lab-backend` process. Knobs (env): `SESSIONS` (10000),
//! `WINDOW_SECS` (30), `PROBE_INTERVAL` ("1s"), `PEER=none` to skip HAProxy.
//! Bounded: it stops by itself after setup + 5 s warm-up + the window, per
//! proxy.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use pulsegate::lab::EchoBackend;

const USER_HZ: f64 = 100.0;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Pulsegate,
    Haproxy,
}

struct Figures {
    name: &'static str,
    processes: usize,
    core_pct: f64,
    machine_pct: f64,
    pps: f64,
    drops: u64,
    rss_per_session: f64,
    alive: usize,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches` discovery
    }
    let sessions: usize = env_or("SESSIONS", 10_000);
    let window = Duration::from_secs(env_or("WINDOW_SECS", 30));
    let probe_interval: String = env_or("PROBE_INTERVAL", "1s".to_string());
    let fd_limit = raise_fd_limit() as usize;
    assert!(
        sessions + 500 < fd_limit,
        "SESSIONS too high for RLIMIT_NOFILE {fd_limit}"
    );
    // A proxy needs two descriptors per session. Where RLIMIT_NOFILE is too
    // low for all of them in one process (20,000 in our sandbox), the
    // sessions are spread over several processes and their CPU is summed.
    let processes = (2 * sessions).div_ceil(fd_limit - 500).max(1);

    let backend_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let echo = EchoBackend::new(
        Path::new(env!("CARGO_BIN_EXE_pulsegate")),
        Duration::from_secs(30 * 60),
    );
    let mut backend = echo
        .command(backend_addr)
        .args(["--log-level", "warn"])
        .spawn()
        .expect("start the echo backend");
    wait_listening(backend_addr.port());

    let mut peers = vec![Peer::Pulsegate];
    let haproxy = Command::new("haproxy").arg("-v").output().is_ok();
    match (haproxy, std::env::var("PEER").as_deref()) {
        (_, Ok("none")) => {}
        (true, _) => peers.push(Peer::Haproxy),
        (false, _) => {
            println!("haproxy not installed (apt-get install haproxy): measuring pulsegate only")
        }
    }
    let mut results = Vec::new();
    for peer in peers {
        let f = measure(
            peer,
            sessions,
            processes,
            backend_addr,
            window,
            &probe_interval,
        );
        print_figures(&f, sessions, window);
        results.push(f);
    }
    let _ = backend.kill();
    let _ = backend.wait();

    println!("\n| proxy | idle sessions | processes | proxy CPU, % of one core | machine busy, % of one core | lo packets/s | backlog drops | RSS per session | sessions alive |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for f in &results {
        println!(
            "| {} | {sessions} | {} | {:.2} | {:.2} | {:.0} | {} | {:.0} B | {}/{sessions} |",
            f.name,
            f.processes,
            f.core_pct,
            f.machine_pct,
            f.pps,
            f.drops,
            f.rss_per_session,
            f.alive
        );
    }
}

fn measure(
    peer: Peer,
    sessions: usize,
    processes: usize,
    backend: SocketAddr,
    window: Duration,
    probe_interval: &str,
) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let mut children = Vec::new();
    for i in 0..processes {
        let port = free_port();
        let share = sessions / processes + 100;
        let child = match peer {
            Peer::Pulsegate => start_pulsegate(dir.path(), i, port, backend, share, probe_interval),
            Peer::Haproxy => start_haproxy(dir.path(), i, port, backend, share),
        };
        wait_listening(port);
        children.push((child, port));
    }
    let pids: Vec<u32> = children.iter().map(|(c, _)| c.id()).collect();
    thread::sleep(Duration::from_millis(500));
    let rss_before: u64 = pids.iter().map(|&p| rss_kib(p)).sum();

    let started = Instant::now();
    let mut clients = Vec::with_capacity(sessions);
    for (i, (_, port)) in children.iter().enumerate() {
        let share = sessions / processes + usize::from(i < sessions % processes);
        clients.extend(open_sessions(*port, share));
    }
    println!(
        "\n{}: opened {sessions} proxied sessions through {processes} process(es) in {:.1} s",
        name(peer),
        started.elapsed().as_secs_f64()
    );
    // Warm-up: every leg goes quiet, gets armed and probed at least once.
    thread::sleep(Duration::from_secs(5));
    let rss_after: u64 = pids.iter().map(|&p| rss_kib(p)).sum();

    let cpu = |pids: &[u32]| pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>();
    let (drops0, machine0) = (backlog_drops(), machine_busy_ticks());
    let (cpu0, lo0, t0) = (cpu(&pids), lo_packets(), Instant::now());
    thread::sleep(window);
    let (cpu1, lo1, elapsed) = (cpu(&pids), lo_packets(), t0.elapsed());
    let secs = elapsed.as_secs_f64();
    let figures = Figures {
        name: name(peer),
        processes,
        core_pct: 100.0 * (cpu1 - cpu0) as f64 / USER_HZ / secs,
        machine_pct: 100.0 * (machine_busy_ticks() - machine0) as f64 / USER_HZ / secs,
        pps: (lo1 - lo0) as f64 / secs,
        drops: backlog_drops() - drops0,
        rss_per_session: rss_after.saturating_sub(rss_before) as f64 * 1024.0 / sessions as f64,
        alive: clients.iter().filter(|c| still_open(c)).count(),
    };
    drop(clients);
    for (mut child, _) in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    thread::sleep(Duration::from_secs(1));
    figures
}

fn name(peer: Peer) -> &'static str {
    match peer {
        Peer::Pulsegate => "pulsegate",
        Peer::Haproxy => "haproxy (option tcpka)",
    }
}

fn print_figures(f: &Figures, sessions: usize, window: Duration) {
    println!("  window:               {} s", window.as_secs());
    println!("  proxy CPU (user+sys): {:.2} % of one core", f.core_pct);
    println!(
        "  whole machine busy:   {:.2} % of one core (incl. softirq sending/answering probes)",
        f.machine_pct
    );
    println!("  loopback packets/s:   {:.0}", f.pps);
    println!("  backlog drops:        {}", f.drops);
    println!(
        "  RSS growth:           {:.0} B per session",
        f.rss_per_session
    );
    println!("  sessions still open:  {}/{sessions}", f.alive);
}

fn start_pulsegate(
    dir: &Path,
    i: usize,
    port: u16,
    backend: SocketAddr,
    max: usize,
    probe: &str,
) -> Child {
    let config = dir.join(format!("pulsegate{i}.toml"));
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"bench\"\nbind = \"127.0.0.1:{port}\"\n\
             backends = [\"{backend}\"]\nmax_connections = {max}\n\
             [listener.liveness]\nprobe_interval = \"{probe}\"\ndead_after = \"3s\"\n"
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_pulsegate"))
        .args(["--log-level", "warn", "run", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .spawn()
        .expect("start pulsegate")
}

fn start_haproxy(dir: &Path, i: usize, port: u16, backend: SocketAddr, max: usize) -> Child {
    let config = dir.join(format!("haproxy{i}.cfg"));
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn {max}\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n  option tcpka\n\
             frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n\
             backend b\n  server s1 {backend}\n"
        ),
    )
    .unwrap();
    Command::new("haproxy")
        .args(["-db", "-q", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .spawn()
        .expect("start haproxy")
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
    // After the ")" of comm: utime and stime are the 12th and 13th fields.
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
