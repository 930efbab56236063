//! Half-open connections in private network namespaces: real sockets, the
//! real kernel, real DROP rules. A peer "vanishes" when its port is
//! blackholed and its process SIGKILLed, so its FIN or RST never arrives.
//!
//! Config under test: probe_interval 1s, dead_after 1s, user_timeout 60s on
//! both legs (so only pulsegate's watcher can decide). Detection times are
//! measured from the moment the DROP rules were installed and printed.
//! Without root these tests print "skipping: <reason>" (and fail under CI).

mod support;

use std::io::{self, ErrorKind, Write};
use std::net::Shutdown;
use std::process::Command;
use std::time::{Duration, Instant};

use pulsegate::lab::TcpState;
use support::*;

/// The promise under test: a dead peer is acted on within this long. The
/// settings' own worst case (`pulsegate check`) for a host that vanished
/// is probe_interval + dead_after + a fresh connect's 0.25 s + one sweep =
/// 2.75 s; the rest is margin.
const DETECTION_BOUND: Duration = Duration::from_millis(3250);
/// A lone client leg has no corroboration (no other session from its host,
/// and a client cannot be connected to): it is judged on four unanswered
/// probes of its own, what a clean link needs for fewer than one false
/// verdict per million session-hours. `pulsegate check`: probe_interval +
/// 3 × keepalive_interval + an RTO + one sweep = 4.7 s.
const LONE_CLIENT_BOUND: Duration = Duration::from_millis(5500);
/// How long a blocking read may wait for an eviction before failing.
const READ_LIMIT: Duration = Duration::from_secs(10);
/// The watcher's own reasons; `user_timeout` would mean the kernel decided.
const WATCHER_REASONS: [&str; 2] = ["probe_unanswered", "retransmit_unanswered"];

/// (a) The problem: without pulsegate, a client whose backend vanished
/// stays ESTABLISHED, with nothing to read and no error.
#[test]
fn direct_client_stays_established_after_backend_vanishes() {
    let Some(lab) = lab_or_skip("direct") else {
        return;
    };
    let backend = start_echo_backend(&lab, None);
    let mut client = connect(&lab, backend_addr());
    exchange_line(&mut client);
    let local = client.local_addr().unwrap();

    let fault = vanish(&lab, BACKEND_PORT, &backend);
    client.set_nonblocking(true).unwrap();
    for second in 1..=10u64 {
        sleep_until(fault + Duration::from_secs(second));
        let state = lab.tcp_state(local).unwrap();
        assert_eq!(state, Some(TcpState::Established), "at +{second}s");
        let mut byte = [0u8; 1];
        let peek = client.peek(&mut byte);
        assert!(
            matches!(&peek, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "at +{second}s the direct client should see nothing at all, got {peek:?}"
        );
    }
    eprintln!(
        "direct client: still ESTABLISHED, no data, no error {:.1} s after the backend vanished",
        fault.elapsed().as_secs_f64()
    );
}

/// (b) An idle proxied client is reset once the upstream's probe goes
/// unanswered.
#[test]
fn idle_proxied_client_is_reset_when_backend_vanishes() {
    let Some(lab) = lab_or_skip("idle") else {
        return;
    };
    let backend = start_echo_backend(&lab, None);
    let proxy = start_proxy(&lab, backend_addr());
    let mut client = connect(&lab, proxy_addr());
    exchange_line(&mut client);
    // An idle pooled connection, as a pool would hold it.
    std::thread::sleep(Duration::from_millis(1500));

    let fault = vanish(&lab, BACKEND_PORT, &backend);
    let (end, at) = read_end(&mut client, READ_LIMIT);
    let detected = at - fault;
    eprintln!(
        "idle proxied client: {end:?} {:.2} s after the fault",
        secs(detected)
    );
    assert_reset(&end);
    assert!(detected < DETECTION_BOUND, "reset after {detected:?}");

    let eviction = wait_eviction(&proxy, Duration::from_secs(2));
    assert_eq!(eviction.reason, "probe_unanswered", "{}", eviction.json);
    assert_eq!(eviction.dead_leg, "upstream", "{}", eviction.json);
}

/// (c) A proxied client that writes after the fault gets an error quickly:
/// the data pulsegate relays upstream is never ACKed.
#[test]
fn busy_proxied_client_gets_an_error_when_backend_vanishes() {
    let Some(lab) = lab_or_skip("busy") else {
        return;
    };
    let backend = start_echo_backend(&lab, None);
    let proxy = start_proxy(&lab, backend_addr());
    let mut client = connect(&lab, proxy_addr());
    exchange_line(&mut client);

    let fault = vanish(&lab, BACKEND_PORT, &backend);
    let (end, at) = match client.write_all(b"are you there?\n") {
        Ok(()) => read_end(&mut client, READ_LIMIT),
        Err(e) => (ReadEnd::Error(e), Instant::now()),
    };
    let detected = at - fault;
    eprintln!(
        "busy proxied client: {end:?} {:.2} s after the fault",
        secs(detected)
    );
    assert_reset(&end);
    assert!(detected < DETECTION_BOUND, "error after {detected:?}");

    let eviction = wait_eviction(&proxy, Duration::from_secs(2));
    eprintln!("busy proxied client: eviction reason {}", eviction.reason);
    assert!(
        WATCHER_REASONS.contains(&eviction.reason.as_str()),
        "the watcher should decide, not the kernel: {}",
        eviction.json
    );
    assert_eq!(eviction.dead_leg, "upstream", "{}", eviction.json);
}

/// (d) The mirror case: the client process vanishes; pulsegate frees the
/// backend connection and the backend sees it end.
#[test]
fn vanished_client_frees_its_backend_connection() {
    let Some(lab) = lab_or_skip("client") else {
        return;
    };
    let listener = listen(&lab, backend_addr());
    let proxy = start_proxy(&lab, backend_addr());
    let mut command = Command::new(exe());
    command.args(["lab-backend", "--connect", &proxy_addr().to_string()]);
    command.args(["--max-lifetime", "2m"]);
    let client = lab
        .spawn_as("client", command)
        .expect("start the client process");
    let mut backend_side = accept(&listener, SETUP_TIMEOUT);
    let mut hello = [0u8; 6];
    backend_side.set_read_timeout(Some(SETUP_TIMEOUT)).unwrap();
    io::Read::read_exact(&mut backend_side, &mut hello).expect("the client's hello");
    backend_side.write_all(&hello).unwrap();
    wait_for_output(&client, "connected");
    std::thread::sleep(Duration::from_millis(1500));

    let fault = vanish(&lab, PROXY_PORT, &client);
    let (end, at) = read_end(&mut backend_side, READ_LIMIT);
    let detected = at - fault;
    eprintln!(
        "vanished client: backend saw {end:?} {:.2} s after the fault",
        secs(detected)
    );
    assert!(
        matches!(&end, ReadEnd::Eof)
            || matches!(&end, ReadEnd::Error(e) if e.kind() == ErrorKind::ConnectionReset),
        "the backend should see EOF or ECONNRESET, got {end:?}"
    );
    assert!(
        detected < LONE_CLIENT_BOUND,
        "backend freed after {detected:?}"
    );

    let eviction = wait_eviction(&proxy, Duration::from_secs(2));
    assert!(
        WATCHER_REASONS.contains(&eviction.reason.as_str()),
        "{}",
        eviction.json
    );
    assert_eq!(eviction.dead_leg, "client", "{}", eviction.json);
}

/// (e1) No false positive: a live backend that stops reading for 10 s while
/// the client pushes 32 MiB (zero window, its kernel still ACKing) loses
/// nothing, and every byte comes back.
#[test]
fn slow_reader_is_not_evicted() {
    let Some(lab) = lab_or_skip("slowread") else {
        return;
    };
    let pause = Duration::from_secs(10);
    let _backend = start_echo_backend(&lab, Some((1 << 20, pause)));
    let proxy = start_proxy(&lab, backend_addr());
    let client = connect(&lab, proxy_addr());

    let started = Instant::now();
    let transfer =
        std::thread::spawn(move || echo_transfer(client, 32 << 20, Duration::from_secs(30)));
    sleep_until(started + pause / 2);
    assert_backend_stalled(&lab, "slow reader");
    let transfer = transfer.join().expect("transfer thread");
    eprintln!(
        "slow reader: 32 MiB echoed through a 10 s read stall in {:.1} s",
        transfer.elapsed.as_secs_f64()
    );
    assert_eq!(transfer.bytes_received, 32 << 20);
    assert_eq!(transfer.sent, transfer.received, "SHA-256 of the echo");
    assert!(
        transfer.elapsed >= pause - Duration::from_millis(500),
        "the backend should have stalled the transfer"
    );
    assert_no_eviction(&proxy);
}

/// (e2) No false positive: a SIGSTOPped backend's kernel still answers, so
/// neither a session with data sent nor an idle one is evicted, and both
/// work after SIGCONT.
#[test]
fn stopped_backend_is_not_evicted() {
    let Some(lab) = lab_or_skip("sigstop") else {
        return;
    };
    let backend = start_echo_backend(&lab, None);
    let proxy = start_proxy(&lab, backend_addr());
    let mut busy = connect(&lab, proxy_addr());
    exchange_line(&mut busy);
    let mut idle = connect(&lab, proxy_addr());
    exchange_line(&mut idle);

    let stop = Duration::from_secs(10);
    backend.stop().expect("SIGSTOP");
    let stopped = Instant::now();
    let transfer = std::thread::spawn(|| echo_transfer(busy, 4 << 20, Duration::from_secs(30)));
    sleep_until(stopped + stop / 2);
    assert_backend_stalled(&lab, "stopped backend");
    sleep_until(stopped + stop);
    backend.cont().expect("SIGCONT");
    let transfer = transfer.join().expect("transfer thread");
    eprintln!(
        "stopped backend: 4 MiB echoed across a 10 s SIGSTOP, done {:.1} s after the stop",
        stopped.elapsed().as_secs_f64()
    );
    assert_eq!(transfer.bytes_received, 4 << 20);
    assert_eq!(transfer.sent, transfer.received, "SHA-256 of the echo");
    exchange_line(&mut idle);
    idle.shutdown(Shutdown::Write).unwrap();
    assert_no_eviction(&proxy);
}

/// The lab's own promise, which every test above relies on: `drop_port`
/// blackholes a port in both directions, and `undrop_port` heals it (the
/// kernel's retransmissions then deliver what was lost).
#[test]
fn drop_port_blackholes_both_ways_and_undrop_heals() {
    let Some(lab) = lab_or_skip("drop") else {
        return;
    };
    let listener = listen(&lab, backend_addr());
    let mut client = connect(&lab, backend_addr());
    let mut server = accept(&listener, SETUP_TIMEOUT);

    lab.drop_port(BACKEND_PORT).unwrap();
    client.write_all(b"c").unwrap();
    server.write_all(b"s").unwrap();
    let quiet = Duration::from_millis(500);
    assert!(matches!(read_end(&mut server, quiet).0, ReadEnd::Nothing));
    assert!(matches!(read_end(&mut client, quiet).0, ReadEnd::Nothing));

    lab.undrop_port(BACKEND_PORT).unwrap();
    let mut byte = [0u8; 1];
    for (stream, expected) in [(&mut server, b'c'), (&mut client, b's')] {
        stream.set_read_timeout(Some(SETUP_TIMEOUT)).unwrap();
        io::Read::read_exact(stream, &mut byte).expect("retransmitted after undrop");
        assert_eq!(byte[0], expected);
    }
}

fn assert_reset(end: &ReadEnd) {
    assert!(
        matches!(end, ReadEnd::Error(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected ECONNRESET, got {end:?}"
    );
}

/// Proves a no-false-positive test really stalled the path: the backend's
/// kernel holds unread bytes and pulsegate's upstream socket has bytes it
/// cannot deliver (window full), while nothing is evicted.
fn assert_backend_stalled(lab: &pulsegate::lab::Lab, what: &str) {
    let sockets = lab.tcp_sockets().unwrap();
    let unread: u32 = sockets
        .iter()
        .filter(|e| e.local == backend_addr() && e.state == TcpState::Established)
        .map(|e| e.recv_queue)
        .sum();
    let undelivered: u32 = sockets
        .iter()
        .filter(|e| e.remote == backend_addr())
        .map(|e| e.send_queue)
        .sum();
    eprintln!(
        "{what}: mid-stall, backend has {unread} bytes unread, \
         pulsegate {undelivered} bytes queued for it"
    );
    assert!(
        unread > 0 && undelivered > 0,
        "{what}: the path did not stall"
    );
}

fn assert_no_eviction(proxy: &pulsegate::lab::LabProcess) {
    let found = evictions(proxy);
    assert!(found.is_empty(), "false eviction(s): {found:#?}");
}

fn wait_for_output(process: &pulsegate::lab::LabProcess, text: &str) {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    while !process.stdout().contains(text) {
        assert!(
            Instant::now() < deadline,
            "process never printed {text:?}; stderr: {}",
            process.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sleep_until(when: Instant) {
    std::thread::sleep(when.saturating_duration_since(Instant::now()));
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
