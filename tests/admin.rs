//! Operating pulsegate through its admin server, against the real binary:
//! metrics after real traffic, `/status`, auth, per-listener readiness,
//! reloads (SIGHUP and `POST /reload`) under live traffic, refused reloads,
//! drain-and-stay, and slow admin clients that must not stall the data path.
//! The namespace tests (eviction metrics, `/readyz` and a blackholed
//! backend) are in tests/admin_lab.rs.

#[path = "support/admin.rs"]
mod admin;
#[path = "support/servers.rs"]
mod servers;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use admin::{call, sample, wait_for};
use nix::sys::signal::Signal;
use servers::{free_port, HostProxy};

const TOKEN: &str = "s3cret-admin-token";

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pulsegate"))
}

/// An echo server on a free port; counts the connections it accepted.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

fn echo_server() -> Echo {
    echo_server_greeting(None)
}

/// An echo server that first sends `greeting` (one byte) on every
/// connection, so that a client learns which backend it reached.
fn echo_server_greeting(greeting: Option<u8>) -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                if let Some(g) = greeting {
                    if stream.write_all(&[g]).is_err() {
                        return;
                    }
                }
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
    Echo { addr, accepted }
}

/// A port nobody listens on, held (bound, never listening) so that no
/// other test can take it while the returned socket lives: connects to it
/// are refused.
fn closed_port() -> (SocketAddr, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (addr, socket)
}

/// Sends `n` bytes and reads them back; panics on any difference.
fn echo_exact(stream: &mut TcpStream, n: usize, seed: u8) {
    let data: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&data).unwrap();
    let mut back = vec![0u8; n];
    stream.read_exact(&mut back).expect("echo");
    assert!(back == data, "echoed bytes differ");
}

fn write_token() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(f, "{TOKEN}").unwrap();
    f
}

fn metrics(admin: SocketAddr) -> String {
    let r = call(admin, "GET", "/metrics", Some(TOKEN));
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

#[test]
fn metrics_and_status_follow_real_traffic() {
    let echo = echo_server();
    let (dead, _held) = closed_port();
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let token = write_token();
    let dead_bind = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = HostProxy::start(&exe(), |bind| {
        format!(
            r#"
[admin]
bind = "{admin_addr}"
token_file = "{token}"

[[listener]]
name = "app"
bind = "{bind}"
backends = ["{echo}"]
[listener.check]
kind = "tcp"
interval = "200ms"

[[listener]]
name = "dead"
bind = "{dead_bind}"
backends = ["{dead}"]
"#,
            token = token.path().display(),
            echo = echo.addr,
        )
    });

    const SESSIONS: usize = 5;
    const BYTES: usize = 3000;
    for i in 0..SESSIONS {
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        echo_exact(&mut s, BYTES, i as u8);
    }
    // A client of the listener whose backend refuses: reset, counted.
    let mut refused = TcpStream::connect(dead_bind).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(matches!(refused.read(&mut [0u8; 1]), Ok(0) | Err(_)));

    // HostProxy's start-up probe (connect, close) was one more session.
    let sessions = (SESSIONS + 1) as f64;
    let app = [("listener", "app")];
    let text = wait_for(
        "every session ended and counted",
        Duration::from_secs(5),
        || {
            let text = metrics(admin_addr);
            match sample(&text, "pulsegate_session_duration_seconds_count", &app) {
                Some(n) if n == sessions => Ok(text),
                other => Err(other),
            }
        },
    );
    let backend = echo.addr.to_string();
    let be = [("listener", "app"), ("backend", backend.as_str())];
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{text}"))
    };
    assert_eq!(get("pulsegate_connections_accepted_total", &app), sessions);
    assert_eq!(get("pulsegate_connections_active", &app), 0.0);
    let up = [("listener", "app"), ("direction", "client_to_upstream")];
    let down = [("listener", "app"), ("direction", "upstream_to_client")];
    assert_eq!(get("pulsegate_bytes_total", &up), (SESSIONS * BYTES) as f64);
    assert_eq!(
        get("pulsegate_bytes_total", &down),
        (SESSIONS * BYTES) as f64
    );
    assert_eq!(
        get("pulsegate_upstream_connect_duration_seconds_count", &be),
        sessions
    );
    assert_eq!(get("pulsegate_backend_active_connections", &be), 0.0);
    let mut up_state = be.to_vec();
    up_state.push(("state", "up"));
    assert_eq!(get("pulsegate_backend_state", &up_state), 1.0);
    let mut checks_up = be.to_vec();
    checks_up.push(("result", "up"));
    assert!(get("pulsegate_checks_total", &checks_up) >= 1.0);
    assert!(get("pulsegate_check_duration_seconds_count", &be) >= 1.0);
    let dead_label = [("listener", "dead"), ("reason", "connect_failed")];
    assert_eq!(get("pulsegate_connections_refused_total", &dead_label), 1.0);
    let dead_backend = dead.to_string();
    assert_eq!(
        get(
            "pulsegate_upstream_connect_failures_total",
            &[("listener", "dead"), ("backend", dead_backend.as_str())]
        ),
        1.0
    );
    assert_eq!(
        get(
            "pulsegate_evictions_total",
            &[("listener", "app"), ("reason", "probe_unanswered")]
        ),
        0.0
    );
    assert_eq!(get("pulsegate_config_generation", &[]), 1.0);
    assert_eq!(get("pulsegate_build_info", &[]), 1.0);
    assert!(text.contains("# TYPE pulsegate_detection_duration_seconds histogram"));

    // /status: the same picture as JSON.
    let status = call(admin_addr, "GET", "/status", Some(TOKEN)).json();
    assert_eq!(status["config_generation"], 1);
    let listeners = status["listeners"].as_array().unwrap();
    let app_status = listeners.iter().find(|l| l["name"] == "app").unwrap();
    assert_eq!(app_status["sessions"], 0);
    let b = &app_status["backends"][0];
    assert_eq!(b["backend"], backend);
    assert_eq!(b["state"], "up");
    assert_eq!(b["last_check"]["status"], "up");
    assert!(b["last_check"]["latency_ms"].as_f64().unwrap() >= 0.0);

    // Auth: the token guards /metrics and /status, not the probes.
    assert_eq!(call(admin_addr, "GET", "/metrics", None).status, 401);
    assert_eq!(
        call(admin_addr, "GET", "/status", Some("wrong")).status,
        401
    );
    assert_eq!(call(admin_addr, "GET", "/healthz", None).status, 200);
    assert_eq!(call(admin_addr, "GET", "/nope", Some(TOKEN)).status, 404);
    let wrong_method = call(admin_addr, "GET", "/reload", Some(TOKEN));
    assert_eq!(wrong_method.status, 405);
    assert!(wrong_method.json()["error"].is_string());
    drop(proxy);
}

#[test]
fn readiness_is_per_listener_and_follows_reload() {
    let echo = echo_server();
    let (dead, _held) = closed_port();
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dead_bind = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = move |bind: SocketAddr, dead_readiness: &str| {
        format!(
            r#"
[admin]
bind = "{admin_addr}"

[[listener]]
name = "app"
bind = "{bind}"
backends = ["{echo}"]

[[listener]]
name = "dead"
bind = "{dead_bind}"
backends = ["{dead}"]
readiness = "{dead_readiness}"
[listener.check]
kind = "tcp"
interval = "200ms"
fall = 2
"#,
            echo = echo.addr,
        )
    };
    let proxy = HostProxy::start(&exe(), |bind| config(bind, "backend"));
    // The `dead` listener's only backend refuses: not ready, and says why.
    let reply = wait_for("/readyz 503", Duration::from_secs(5), || {
        let r = call(admin_addr, "GET", "/readyz", None);
        if r.status == 503 {
            Ok(r)
        } else {
            Err(r)
        }
    });
    let reasons = reply.json()["reasons"].to_string();
    assert!(reasons.contains("dead"), "{reasons}");
    assert!(!reasons.contains("`app`"), "{reasons}");

    // The operator decides `dead` does not gate readiness: reload.
    std::fs::write(proxy.config_path(), config(proxy.addr, "always")).unwrap();
    let r = call(admin_addr, "POST", "/reload", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["changed"], serde_json::json!(["dead"]));
    assert_eq!(r.json()["generation"], 2);
    assert_eq!(call(admin_addr, "GET", "/readyz", None).status, 200);
}

#[test]
fn reload_under_traffic_keeps_sessions_to_kept_backends() {
    let (a, b, c) = (
        echo_server_greeting(Some(b'A')),
        echo_server_greeting(Some(b'B')),
        echo_server_greeting(Some(b'C')),
    );
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = move |bind: SocketAddr, backends: &str| {
        format!(
            r#"
[admin]
bind = "{admin_addr}"

[[listener]]
name = "app"
bind = "{bind}"
backends = [{backends}]
[listener.routing]
balance = "round_robin"
down_grace = "500ms"
"#
        )
    };
    let ab = format!("\"{}\", \"{}\"", a.addr, b.addr);
    let mut proxy = HostProxy::start(&exe(), |bind| config(bind, &ab));

    const SESSIONS: usize = 50;
    let stop = Arc::new(AtomicBool::new(false));
    let reloaded = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(SESSIONS + 1));
    let mut clients = Vec::new();
    for i in 0..SESSIONS {
        let flags = (stop.clone(), reloaded.clone(), started.clone());
        let addr = proxy.addr;
        clients.push(std::thread::spawn(move || {
            session_loop(addr, i as u8, &flags.2, &flags.1, &flags.0)
        }));
    }
    started.wait();

    // An invalid file changes nothing, says why, and stays in /status.
    std::fs::write(
        proxy.config_path(),
        config(proxy.addr, "\"not an address\""),
    )
    .unwrap();
    let refused = call(admin_addr, "POST", "/reload", None);
    assert_eq!(refused.status, 400, "{}", refused.body);
    let problems = refused.json()["problems"].to_string();
    assert!(problems.contains("backends"), "{problems}");
    let status = call(admin_addr, "GET", "/status", None).json();
    assert_eq!(status["config_generation"], 1);
    assert_eq!(status["last_reload"]["ok"], false);
    assert!(status["last_reload"]["error"]
        .as_str()
        .unwrap()
        .contains("not an address"));

    // Replace B by C with SIGHUP while every session is exchanging data.
    let ac = format!("\"{}\", \"{}\"", a.addr, c.addr);
    std::fs::write(proxy.config_path(), config(proxy.addr, &ac)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    proxy.signal(Signal::SIGHUP);
    wait_for("generation 2", Duration::from_secs(5), || {
        let s = call(admin_addr, "GET", "/status", None).json();
        if s["config_generation"] == 2 {
            Ok(())
        } else {
            Err(s["last_reload"].clone())
        }
    });
    reloaded.store(true, Ordering::SeqCst);
    // Busy sessions (a request, or bytes not yet ACKed: a client's delayed
    // ACK counts) of the removed backend get down_grace (500 ms), and are
    // evicted at the next sweep after it (500 ms here): 2.5 s is ample.
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::SeqCst);
    let results: Vec<SessionResult> = clients.into_iter().map(|t| t.join().unwrap()).collect();

    let on = |backend: u8| results.iter().filter(move |r| r.backend == backend);
    let (to_a, to_b) = (on(b'A').count(), on(b'B').count());
    assert_eq!(to_a + to_b, SESSIONS, "{results:#?}");
    assert!(
        to_a >= 10 && to_b >= 10,
        "round robin spread them: {results:#?}"
    );
    for r in on(b'A') {
        assert!(
            r.error.is_none(),
            "a session to the kept backend ended: {r:?}"
        );
        assert!(
            r.rounds_after_reload > 0,
            "a kept session kept relaying: {r:?}"
        );
    }
    for r in on(b'B') {
        assert!(
            r.error.is_some(),
            "a session to the removed backend survived: {r:?}"
        );
    }
    // New sessions go to A and C only.
    let b_before = b.accepted.load(Ordering::SeqCst);
    let mut reached = Vec::new();
    for i in 0..4 {
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        reached.push(greeting(&mut s));
        echo_exact(&mut s, 100, i);
    }
    assert!(
        reached.contains(&b'C') && !reached.contains(&b'B'),
        "{reached:?}"
    );
    assert_eq!(b.accepted.load(Ordering::SeqCst), b_before);
    let text = call(admin_addr, "GET", "/metrics", None).body;
    let removed = [("listener", "app"), ("reason", "backend_removed")];
    assert_eq!(
        sample(&text, "pulsegate_evictions_total", &removed),
        Some(to_b as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, "pulsegate_config_reloads_total", &[("result", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "pulsegate_config_reloads_total",
            &[("result", "invalid")]
        ),
        Some(1.0)
    );
    assert!(proxy.running());
}

/// Reads the one-byte greeting of the backend this connection reached.
fn greeting(s: &mut TcpStream) -> u8 {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; 1];
    s.read_exact(&mut g).expect("the backend's greeting");
    g[0]
}

#[derive(Debug)]
struct SessionResult {
    /// The greeting of the backend it reached.
    backend: u8,
    rounds: u64,
    rounds_after_reload: u64,
    error: Option<String>,
}

/// One client: 1 KiB ping-pong every 20 ms, every byte checked, until
/// `stop`. An error ends it (that is how a removed backend's session ends).
fn session_loop(
    addr: SocketAddr,
    seed: u8,
    started: &Barrier,
    reloaded: &AtomicBool,
    stop: &AtomicBool,
) -> SessionResult {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut result = SessionResult {
        backend: greeting(&mut s),
        rounds: 0,
        rounds_after_reload: 0,
        error: None,
    };
    let mut first = true;
    let mut buf = vec![0u8; 1024];
    while !stop.load(Ordering::SeqCst) {
        let data: Vec<u8> = (0..1024u32)
            .map(|i| (i as u8) ^ seed ^ (result.rounds as u8))
            .collect();
        let outcome = s.write_all(&data).and_then(|()| s.read_exact(&mut buf));
        if let Err(e) = outcome {
            result.error = Some(e.to_string());
            break;
        }
        assert_eq!(
            buf, data,
            "session {seed}: bytes differ at round {}",
            result.rounds
        );
        result.rounds += 1;
        if reloaded.load(Ordering::SeqCst) {
            result.rounds_after_reload += 1;
        }
        if first {
            first = false;
            started.wait();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if first {
        started.wait();
    }
    result
}

#[test]
fn drain_and_stay_then_sigterm_exits() {
    let echo = echo_server();
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut proxy = HostProxy::start(&exe(), |bind| {
        format!(
            "[admin]\nbind = \"{admin_addr}\"\n\n[[listener]]\nname = \"app\"\nbind = \"{bind}\"\n\
             backends = [\"{}\"]\ndrain_timeout = \"10s\"\n",
            echo.addr
        )
    });
    let mut session = TcpStream::connect(proxy.addr).unwrap();
    echo_exact(&mut session, 500, 1);

    let r = call(admin_addr, "POST", "/drain?then=stay", None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["then"], "stay");
    // No new clients; the open session goes on; not ready; reloads refused.
    wait_for(
        "listener closed",
        Duration::from_secs(5),
        || match TcpStream::connect(proxy.addr) {
            Err(e) => Ok(e),
            Ok(_) => Err("still accepting"),
        },
    );
    echo_exact(&mut session, 500, 2);
    let ready = call(admin_addr, "GET", "/readyz", None);
    assert_eq!(ready.status, 503);
    assert!(ready.json()["reasons"].to_string().contains("draining"));
    assert_eq!(call(admin_addr, "POST", "/reload", None).status, 409);

    // Once the session ends the listener is gone, and the process stays.
    drop(session);
    wait_for("drained", Duration::from_secs(5), || {
        let s = call(admin_addr, "GET", "/status", None).json();
        if s["listeners"].as_array().is_some_and(Vec::is_empty) {
            Ok(())
        } else {
            Err(s)
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(proxy.running(), "then=stay: the process stays up");
    assert_eq!(call(admin_addr, "GET", "/healthz", None).status, 200);

    proxy.signal(Signal::SIGTERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn slow_and_malformed_admin_clients_do_not_stall_the_data_path() {
    let echo = echo_server();
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = HostProxy::start(&exe(), |bind| {
        format!(
            "[admin]\nbind = \"{admin_addr}\"\nrequest_timeout = \"1s\"\n\n[[listener]]\n\
             name = \"app\"\nbind = \"{bind}\"\nbackends = [\"{}\"]\n",
            echo.addr
        )
    });
    // More stalled admin connections than the server serves at once, each
    // stuck half-way through its headers, plus garbage and an oversized body.
    let stalled = stall_admin_clients(admin_addr, 80);
    let mut garbage = TcpStream::connect(admin_addr).unwrap();
    garbage.write_all(b"\x00\x01\x02 nonsense\r\n\r\n").unwrap();
    let big = vec![b'x'; 200 * 1024];
    let r = admin::request(admin_addr, "POST", "/reload", None, &big);
    if let Ok(r) = r {
        // The reset that can follow a 413 may also eat the reply. With every
        // slot stalled it lands on the probe reserve: a quick 503 instead.
        assert!(matches!(r.status, 413 | 503), "{}: {}", r.status, r.body);
    }

    // Meanwhile the proxy relays at once, every byte exact.
    for i in 0..20 {
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        echo_exact(&mut s, 64 * 1024, i);
    }
    // And the admin server answers again once the stalled clients time out
    // (request_timeout = 1 s): nothing is stuck for good.
    let healthz = wait_for("/healthz answered", Duration::from_secs(10), || {
        admin::request(admin_addr, "GET", "/healthz", None, b"").map_err(|e| e.to_string())
    });
    assert_eq!(healthz.status, 200);
    drop(stalled);
}

/// `n` admin clients stuck half-way through their request headers.
fn stall_admin_clients(admin: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(admin).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect()
}

/// A kubelet gives up on a probe after a second: with every admin slot held
/// by a client stalled half-way through its headers, `/healthz` and
/// `/readyz` are still answered at once, from the probe reserve (measured
/// before: 4.5 s, the stalled clients' request_timeout). Other routes get a
/// quick 503 meanwhile.
#[test]
fn probes_are_answered_at_once_while_slow_clients_hold_every_admin_slot() {
    let echo = echo_server();
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let token = write_token();
    let _proxy = HostProxy::start(&exe(), |bind| {
        format!(
            "[admin]\nbind = \"{admin_addr}\"\ntoken_file = \"{}\"\n\n[[listener]]\n\
             name = \"app\"\nbind = \"{bind}\"\nbackends = [\"{}\"]\n",
            token.path().display(),
            echo.addr
        )
    });
    let stalled = stall_admin_clients(admin_addr, 80);
    std::thread::sleep(Duration::from_millis(300));
    for path in ["/healthz", "/readyz", "/healthz"] {
        let started = Instant::now();
        let reply = admin::request(admin_addr, "GET", path, None, b"").expect(path);
        let took = started.elapsed();
        eprintln!(
            "{path} with 80 stalled admin clients: {} after {took:?}",
            reply.status
        );
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert!(took < Duration::from_millis(500), "{path} took {took:?}");
    }
    let busy = admin::request(admin_addr, "GET", "/status", None, b"").expect("/status");
    assert_eq!(busy.status, 503, "{}", busy.body);
    assert!(
        busy.body.contains("only /healthz and /readyz"),
        "{}",
        busy.body
    );
    drop(stalled);
}

#[test]
fn reload_adds_moves_and_removes_listeners() {
    let echo = echo_server();
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let port = || SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (b_bind, b_moved) = (port(), port());
    let listener = |name: &str, bind: SocketAddr| {
        format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\nbackends = [\"{}\"]\n",
            echo.addr
        )
    };
    let head = format!("[admin]\nbind = \"{admin_addr}\"\n\n");
    let proxy = HostProxy::start(&exe(), |bind| format!("{head}{}", listener("a", bind)));
    let a_bind = proxy.addr;
    let mut a_session = TcpStream::connect(a_bind).unwrap();
    echo_exact(&mut a_session, 100, 1);

    // A reload that cannot bind (the port is taken) changes nothing.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let config = format!(
        "{head}{}\n{}",
        listener("a", a_bind),
        listener("b", taken_addr)
    );
    std::fs::write(proxy.config_path(), config).unwrap();
    let r = call(admin_addr, "POST", "/reload", None);
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(r.body.contains("cannot bind"), "{}", r.body);
    let text = call(admin_addr, "GET", "/metrics", None).body;
    let failed = [("result", "failed")];
    assert_eq!(
        sample(&text, "pulsegate_config_reloads_total", &failed),
        Some(1.0)
    );
    drop(taken);

    // Add b.
    let config = format!("{head}{}\n{}", listener("a", a_bind), listener("b", b_bind));
    std::fs::write(proxy.config_path(), config).unwrap();
    let r = call(admin_addr, "POST", "/reload", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["added"], serde_json::json!(["b"]));
    let mut b_session = TcpStream::connect(b_bind).unwrap();
    echo_exact(&mut b_session, 100, 2);

    // Remove a, move b: a stops accepting but its open session lives on
    // (drain); b answers on its new address and its old session lives on.
    let config = format!("{head}{}", listener("b", b_moved));
    std::fs::write(proxy.config_path(), config).unwrap();
    let r = call(admin_addr, "POST", "/reload", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["removed"], serde_json::json!(["a"]));
    assert_eq!(r.json()["changed"], serde_json::json!(["b"]));
    wait_for(
        "a and b's old address closed",
        Duration::from_secs(5),
        || match (TcpStream::connect(a_bind), TcpStream::connect(b_bind)) {
            (Err(_), Err(_)) => Ok(()),
            _ => Err("still accepting"),
        },
    );
    let mut moved = TcpStream::connect(b_moved).unwrap();
    echo_exact(&mut moved, 100, 3);
    echo_exact(&mut a_session, 100, 4);
    echo_exact(&mut b_session, 100, 5);
    // /status: a drains (its session is open), b runs on its new address.
    let status = call(admin_addr, "GET", "/status", None).json();
    let listeners = status["listeners"].as_array().unwrap();
    let find = |name: &str| listeners.iter().find(|l| l["name"] == name).cloned();
    let a = find("a").expect("a is listed while it drains");
    assert_eq!(a["draining"], true, "{status:#}");
    assert_eq!(a["sessions"], 1);
    let b = find("b").unwrap();
    assert_eq!(b["bind"], b_moved.to_string());
    assert_eq!(b["draining"], false);
    // Once a's last session ends, a is gone.
    drop(a_session);
    wait_for("a drained", Duration::from_secs(5), || {
        let s = call(admin_addr, "GET", "/status", None).json();
        let names: Vec<String> = s["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap_or_default().to_string())
            .collect();
        if names == ["b"] {
            Ok(())
        } else {
            Err(names)
        }
    });
}
