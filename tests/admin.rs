//! Operating pulsegate through its admin server, with the proxy running
//! in this test process (`pulsegate::Server` on sockets bound to port 0):
//! metrics after real traffic, `/status`, auth, per-listener readiness,
//! reloads (the SIGHUP path and `POST /reload`) under live traffic, a reload
//! that resizes the accept queue, refused reloads, drain-and-stay, and slow
//! admin clients that must not stall the data path. The binary itself
//! (signals, exit codes, a process that exits after its drain) is tested in
//! tests/process.rs; the namespace tests (eviction metrics, `/readyz` and a
//! blackholed backend) are in tests/admin_lab.rs.
//!
//! Every proxy of this binary shares the process-wide metrics recorder, so
//! each test names its listeners after itself, and the tests that reload
//! (the config generation and reload counters have no listener label) take
//! [`RELOADS`] and compare counters before and after.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use support::admin::{self, call, sample, wait_for};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "s3cret-admin-token";

/// Held by the tests that reload or read the reload metrics.
static RELOADS: Mutex<()> = Mutex::new(());

fn reloads_alone() -> MutexGuard<'static, ()> {
    RELOADS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The addresses a test's config is written with: the admin server's and
/// each listener's, all bound by the test on port 0 before the config is.
struct Ports {
    admin: SocketAddr,
    listeners: Vec<SocketAddr>,
}

/// pulsegate served in this process, on its own runtime, from a config
/// file (so reloads re-read it). Shut down and waited for on drop.
struct InProcess {
    ports: Ports,
    handle: pulsegate::Handle,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    dir: tempfile::TempDir,
    /// With [`InProcess::start_keeping_listeners`]: a duplicate of each
    /// listener socket's descriptor (the same socket), to read what the
    /// kernel has for it.
    listening: Vec<TcpListener>,
}

impl InProcess {
    /// Binds the admin socket and `listeners` sockets on 127.0.0.1 port 0,
    /// writes `toml(ports)` and serves it. Each `[[listener]]` must bind
    /// one of `ports.listeners`.
    fn start(listeners: usize, toml: impl FnOnce(&Ports) -> String) -> InProcess {
        InProcess::launch(listeners, toml, false)
    }

    /// Like [`InProcess::start`], keeping a duplicate of each listening
    /// socket's descriptor for [`InProcess::accept_queue`]. The duplicate
    /// keeps the socket listening after pulsegate closes its own, so tests
    /// that wait for a listener to close use `start`.
    fn start_keeping_listeners(listeners: usize, toml: impl FnOnce(&Ports) -> String) -> InProcess {
        InProcess::launch(listeners, toml, true)
    }

    fn launch(listeners: usize, toml: impl FnOnce(&Ports) -> String, keep: bool) -> InProcess {
        let bind = || TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let admin_socket = bind();
        let sockets: Vec<TcpListener> = (0..listeners).map(|_| bind()).collect();
        let ports = Ports {
            admin: admin_socket.local_addr().unwrap(),
            listeners: sockets.iter().map(|s| s.local_addr().unwrap()).collect(),
        };
        let listening = sockets
            .iter()
            .filter(|_| keep)
            .map(|s| s.try_clone().expect("dup a listener socket"))
            .collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pulsegate.toml");
        std::fs::write(&path, toml(&ports)).expect("write the config");
        let config = pulsegate::config::load(&path).expect("a valid test config");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let _entered = runtime.enter();
        let tokio_socket = |s: TcpListener| {
            s.set_nonblocking(true).unwrap();
            tokio::net::TcpListener::from_std(s).unwrap()
        };
        let mut sockets: Vec<Option<TcpListener>> = sockets.into_iter().map(Some).collect();
        let bound_listeners = config
            .listeners
            .iter()
            .map(|l| {
                let at = ports.listeners.iter().position(|a| *a == l.bind);
                let socket = at.and_then(|i| sockets[i].take()).unwrap_or_else(|| {
                    panic!(
                        "listener `{}` binds {}, not one of the test's ports",
                        l.name, l.bind
                    )
                });
                (l.clone(), tokio_socket(socket))
            })
            .collect();
        let admin = config
            .raw
            .admin
            .as_ref()
            .zip(config.admin_bind)
            .map(|(a, bind)| {
                assert_eq!(bind, ports.admin, "[admin] binds the test's admin port");
                let settings =
                    pulsegate::admin::AdminSettings::from_config(a, bind).expect("admin settings");
                (settings, tokio_socket(admin_socket))
            });
        let bound = pulsegate::Bound {
            config,
            listeners: bound_listeners,
            admin,
        };
        let server = pulsegate::Server::start(bound, Some(path));
        let handle = server.handle();
        let shutdown = CancellationToken::new();
        let served = runtime.spawn(server.run(shutdown.clone()));
        drop(_entered);
        InProcess {
            ports,
            handle,
            shutdown,
            served: Some(served),
            runtime: Some(runtime),
            dir,
            listening,
        }
    }

    /// The `i`th listener's accept queue as the kernel has it now.
    fn accept_queue(&self, i: usize) -> pulsegate::sockopt::AcceptQueue {
        let socket = self
            .listening
            .get(i)
            .expect("started with start_keeping_listeners");
        pulsegate::sockopt::accept_queue(socket).expect("TCP_INFO of a listener")
    }

    /// The address of the `i`th listener socket.
    fn addr(&self, i: usize) -> SocketAddr {
        self.ports.listeners[i]
    }

    fn admin(&self) -> SocketAddr {
        self.ports.admin
    }

    /// The config file it reloads from (rewrite it, then reload).
    fn config_path(&self) -> PathBuf {
        self.dir.path().join("pulsegate.toml")
    }

    /// What SIGHUP does in the binary: reload, waiting for the outcome.
    fn reload(&self) -> Result<pulsegate::admin::ReloadSummary, pulsegate::admin::ReloadError> {
        let runtime = self.runtime.as_ref().expect("runtime");
        runtime.block_on(self.handle.reload())
    }

    /// True while `Server::run` has not returned.
    fn running(&self) -> bool {
        self.served.as_ref().is_some_and(|s| !s.is_finished())
    }

    /// What SIGTERM does in the binary: drain, then return.
    fn shut_down(&self) {
        self.shutdown.cancel();
    }

    /// Whether `Server::run` returned within `timeout`.
    fn stopped_within(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // Sessions still open are evicted at their drain_timeout; a test
        // that ends (or fails) with some open does not wait for that.
        let _ = self.stopped_within(Duration::from_secs(2));
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
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
    // It reads the config generation, which a reload elsewhere would move.
    let _alone = reloads_alone();
    let echo = echo_server();
    let (dead, _held) = closed_port();
    let token = write_token();
    let proxy = InProcess::start(2, |ports| {
        format!(
            r#"
[admin]
bind = "{admin}"
token_file = "{token}"

[[listener]]
name = "traffic"
bind = "{bind}"
backends = ["{echo}"]
[listener.check]
kind = "tcp"
interval = "200ms"

[[listener]]
name = "traffic_dead"
bind = "{dead_bind}"
backends = ["{dead}"]
"#,
            admin = ports.admin,
            bind = ports.listeners[0],
            dead_bind = ports.listeners[1],
            token = token.path().display(),
            echo = echo.addr,
        )
    });
    let admin_addr = proxy.admin();

    const SESSIONS: usize = 5;
    const BYTES: usize = 3000;
    for i in 0..SESSIONS {
        let mut s = TcpStream::connect(proxy.addr(0)).unwrap();
        echo_exact(&mut s, BYTES, i as u8);
    }
    // A client of the listener whose backend refuses: reset, counted.
    let mut refused = TcpStream::connect(proxy.addr(1)).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(matches!(refused.read(&mut [0u8; 1]), Ok(0) | Err(_)));

    let sessions = SESSIONS as f64;
    let app = [("listener", "traffic")];
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
    let be = [("listener", "traffic"), ("backend", backend.as_str())];
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{text}"))
    };
    assert_eq!(get("pulsegate_connections_accepted_total", &app), sessions);
    assert_eq!(get("pulsegate_connections_active", &app), 0.0);
    let up = [("listener", "traffic"), ("direction", "client_to_upstream")];
    let down = [("listener", "traffic"), ("direction", "upstream_to_client")];
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
    let dead_label = [("listener", "traffic_dead"), ("reason", "connect_failed")];
    assert_eq!(get("pulsegate_connections_refused_total", &dead_label), 1.0);
    let dead_backend = dead.to_string();
    assert_eq!(
        get(
            "pulsegate_upstream_connect_failures_total",
            &[
                ("listener", "traffic_dead"),
                ("backend", dead_backend.as_str())
            ]
        ),
        1.0
    );
    assert_eq!(
        get(
            "pulsegate_evictions_total",
            &[("listener", "traffic"), ("reason", "probe_unanswered")]
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
    let app_status = listeners.iter().find(|l| l["name"] == "traffic").unwrap();
    assert_eq!(app_status["sessions"], 0);
    assert_eq!(app_status["bind"], proxy.addr(0).to_string());
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
    let _alone = reloads_alone();
    let echo = echo_server();
    let (dead, _held) = closed_port();
    let config = move |ports: &Ports, dead_readiness: &str| {
        format!(
            r#"
[admin]
bind = "{admin}"

[[listener]]
name = "gated_app"
bind = "{bind}"
backends = ["{echo}"]

[[listener]]
name = "gated_dead"
bind = "{dead_bind}"
backends = ["{dead}"]
readiness = "{dead_readiness}"
[listener.check]
kind = "tcp"
interval = "200ms"
fall = 2
"#,
            admin = ports.admin,
            bind = ports.listeners[0],
            dead_bind = ports.listeners[1],
            echo = echo.addr,
        )
    };
    let proxy = InProcess::start(2, |ports| config(ports, "backend"));
    let admin_addr = proxy.admin();
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
    assert!(reasons.contains("`gated_dead`"), "{reasons}");
    assert!(!reasons.contains("`gated_app`"), "{reasons}");

    // The operator decides `dead` does not gate readiness: reload.
    std::fs::write(proxy.config_path(), config(&proxy.ports, "always")).unwrap();
    let r = call(admin_addr, "POST", "/reload", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["changed"], serde_json::json!(["gated_dead"]));
    assert_eq!(r.json()["generation"], 2);
    assert_eq!(call(admin_addr, "GET", "/readyz", None).status, 200);
}

/// A reload that changes `backlog` resizes the accept queue of the open
/// listening socket (a second `listen(2)`): no rebind, the session opened
/// before keeps flowing and new clients are served on the same socket.
#[test]
fn a_reload_resizes_the_accept_queue_in_place() {
    let _alone = reloads_alone();
    let echo = echo_server();
    let config = move |ports: &Ports, backlog: u32| {
        format!(
            r#"
[[listener]]
name = "backlog_resized"
bind = "{bind}"
backends = ["{echo}"]
backlog = {backlog}
"#,
            bind = ports.listeners[0],
            echo = echo.addr,
        )
    };
    let capped = |backlog: u32| pulsegate::sockopt::somaxconn().map_or(backlog, |c| backlog.min(c));
    // This harness binds the sockets itself, with std's backlog of 128: the
    // config says the same, so a reload to 128 would change nothing.
    let proxy = InProcess::start_keeping_listeners(1, |ports| config(ports, 128));
    assert_eq!(proxy.accept_queue(0).limit, capped(128));
    let mut before = TcpStream::connect(proxy.addr(0)).unwrap();
    echo_exact(&mut before, 64, 1);

    for backlog in [50, 1000] {
        std::fs::write(proxy.config_path(), config(&proxy.ports, backlog)).unwrap();
        let summary = proxy.reload().expect("the reload applies");
        assert_eq!(summary.changed, ["backlog_resized"], "backlog {backlog}");
        assert_eq!(
            proxy.accept_queue(0).limit,
            capped(backlog),
            "the kernel's queue limit after a reload to backlog = {backlog}"
        );
        echo_exact(&mut before, 64, backlog as u8);
        let mut after = TcpStream::connect(proxy.addr(0)).unwrap();
        echo_exact(&mut after, 64, 7);
    }
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        3,
        "one upstream per client"
    );
}

#[test]
fn reload_under_traffic_keeps_sessions_to_kept_backends() {
    let _alone = reloads_alone();
    let (a, b, c) = (
        echo_server_greeting(Some(b'A')),
        echo_server_greeting(Some(b'B')),
        echo_server_greeting(Some(b'C')),
    );
    let config = move |ports: &Ports, backends: &str| {
        format!(
            r#"
[admin]
bind = "{admin}"

[[listener]]
name = "rolling"
bind = "{bind}"
backends = [{backends}]
[listener.routing]
balance = "round_robin"
down_grace = "500ms"
"#,
            admin = ports.admin,
            bind = ports.listeners[0],
        )
    };
    let ab = format!("\"{}\", \"{}\"", a.addr, b.addr);
    let proxy = InProcess::start(1, |ports| config(ports, &ab));
    let admin_addr = proxy.admin();
    let reloads_before = reload_counts(admin_addr);

    const SESSIONS: usize = 50;
    let stop = Arc::new(AtomicBool::new(false));
    let reloaded = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(SESSIONS + 1));
    let mut clients = Vec::new();
    for i in 0..SESSIONS {
        let flags = (stop.clone(), reloaded.clone(), started.clone());
        let addr = proxy.addr(0);
        clients.push(std::thread::spawn(move || {
            session_loop(addr, i as u8, &flags.2, &flags.1, &flags.0)
        }));
    }
    started.wait();

    // An invalid file changes nothing, says why, and stays in /status.
    std::fs::write(
        proxy.config_path(),
        config(&proxy.ports, "\"not an address\""),
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

    // Replace B by C as SIGHUP does (tests/process.rs sends the signal)
    // while every session is exchanging data.
    let ac = format!("\"{}\", \"{}\"", a.addr, c.addr);
    std::fs::write(proxy.config_path(), config(&proxy.ports, &ac)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let summary = proxy.reload().expect("the reload applies");
    assert_eq!(summary.changed, ["rolling"]);
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
        let mut s = TcpStream::connect(proxy.addr(0)).unwrap();
        reached.push(greeting(&mut s));
        echo_exact(&mut s, 100, i);
    }
    assert!(
        reached.contains(&b'C') && !reached.contains(&b'B'),
        "{reached:?}"
    );
    assert_eq!(b.accepted.load(Ordering::SeqCst), b_before);
    let text = call(admin_addr, "GET", "/metrics", None).body;
    let removed = [("listener", "rolling"), ("reason", "backend_removed")];
    assert_eq!(
        sample(&text, "pulsegate_evictions_total", &removed),
        Some(to_b as f64),
        "{text}"
    );
    let reloads = reload_counts(admin_addr);
    assert_eq!(reloads.ok, reloads_before.ok + 1.0, "{text}");
    assert_eq!(reloads.invalid, reloads_before.invalid + 1.0, "{text}");
    assert!(proxy.running());
}

/// `pulsegate_config_reloads_total` by result. The counters are the
/// process's: compare them before and after, holding [`RELOADS`].
#[derive(Debug, Clone, Copy)]
struct ReloadCounts {
    ok: f64,
    invalid: f64,
    failed: f64,
}

fn reload_counts(admin: SocketAddr) -> ReloadCounts {
    let text = call(admin, "GET", "/metrics", None).body;
    let count = |result: &str| {
        sample(
            &text,
            "pulsegate_config_reloads_total",
            &[("result", result)],
        )
        .unwrap_or_else(|| panic!("no reload counter for {result}:\n{text}"))
    };
    ReloadCounts {
        ok: count("ok"),
        invalid: count("invalid"),
        failed: count("failed"),
    }
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

/// The process that stays up drained, and exits at SIGTERM, is in
/// tests/process.rs; here the drain itself, and the server returning once
/// told to shut down.
#[test]
fn drain_and_stay_then_shutdown_returns() {
    // Its refused reload counts as failed.
    let _alone = reloads_alone();
    let echo = echo_server();
    let proxy = InProcess::start(1, |ports| {
        format!(
            "[admin]\nbind = \"{}\"\n\n[[listener]]\nname = \"staying\"\nbind = \"{}\"\n\
             backends = [\"{}\"]\ndrain_timeout = \"10s\"\n",
            ports.admin, ports.listeners[0], echo.addr
        )
    });
    let admin_addr = proxy.admin();
    let mut session = TcpStream::connect(proxy.addr(0)).unwrap();
    echo_exact(&mut session, 500, 1);

    let r = call(admin_addr, "POST", "/drain?then=stay", None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["then"], "stay");
    // No new clients; the open session goes on; not ready; reloads refused.
    wait_for(
        "listener closed",
        Duration::from_secs(5),
        || match TcpStream::connect(proxy.addr(0)) {
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
    assert!(proxy.running(), "then=stay: the server stays up");
    assert_eq!(call(admin_addr, "GET", "/healthz", None).status, 200);

    proxy.shut_down();
    assert!(
        proxy.stopped_within(Duration::from_secs(5)),
        "the server returns once told to shut down"
    );
    assert!(
        TcpStream::connect(admin_addr).is_err(),
        "the admin server stopped with it"
    );
}

#[test]
fn slow_and_malformed_admin_clients_do_not_stall_the_data_path() {
    let echo = echo_server();
    let proxy = InProcess::start(1, |ports| {
        format!(
            "[admin]\nbind = \"{}\"\nrequest_timeout = \"1s\"\n\n[[listener]]\n\
             name = \"slow_admin\"\nbind = \"{}\"\nbackends = [\"{}\"]\n",
            ports.admin, ports.listeners[0], echo.addr
        )
    });
    let admin_addr = proxy.admin();
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
        let mut s = TcpStream::connect(proxy.addr(0)).unwrap();
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
    let token = write_token();
    let proxy = InProcess::start(1, |ports| {
        format!(
            "[admin]\nbind = \"{}\"\ntoken_file = \"{}\"\n\n[[listener]]\n\
             name = \"probed\"\nbind = \"{}\"\nbackends = [\"{}\"]\n",
            ports.admin,
            token.path().display(),
            ports.listeners[0],
            echo.addr
        )
    });
    let admin_addr = proxy.admin();
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

/// Listeners added by a reload bind what the new file says; with port 0
/// there, `/status` tells where each one landed. Moving `b` from
/// 127.0.0.1 to 127.0.0.2 changes its bind (all of 127/8 is loopback).
#[test]
fn reload_adds_moves_and_removes_listeners() {
    let _alone = reloads_alone();
    let echo = echo_server();
    let listener = |name: &str, bind: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\nbackends = [\"{}\"]\n",
            echo.addr
        )
    };
    let proxy = InProcess::start(1, |ports| {
        format!(
            "[admin]\nbind = \"{}\"\n\n{}",
            ports.admin,
            listener("a", &ports.listeners[0].to_string())
        )
    });
    let admin_addr = proxy.admin();
    let head = format!("[admin]\nbind = \"{admin_addr}\"\n\n");
    let a_bind = proxy.addr(0);
    let a = listener("a", &a_bind.to_string());
    let reloads_before = reload_counts(admin_addr);
    let mut a_session = TcpStream::connect(a_bind).unwrap();
    echo_exact(&mut a_session, 100, 1);

    // A reload that cannot bind (the port is taken) changes nothing.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let config = format!("{head}{a}\n{}", listener("b", &taken_addr.to_string()));
    std::fs::write(proxy.config_path(), config).unwrap();
    let r = call(admin_addr, "POST", "/reload", None);
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(r.body.contains("cannot bind"), "{}", r.body);
    let reloads = reload_counts(admin_addr);
    assert_eq!(reloads.failed, reloads_before.failed + 1.0);
    assert_eq!(reloads.ok, reloads_before.ok);
    assert!(bound_at(admin_addr, "b").is_none(), "b was not added");
    drop(taken);

    // Add b.
    let config = format!("{head}{a}\n{}", listener("b", "127.0.0.1:0"));
    std::fs::write(proxy.config_path(), config).unwrap();
    let r = call(admin_addr, "POST", "/reload", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["added"], serde_json::json!(["b"]));
    let b_bind = bound_at(admin_addr, "b").expect("b is listed");
    assert_ne!(b_bind.port(), 0, "/status shows the port b is bound to");
    let mut b_session = TcpStream::connect(b_bind).unwrap();
    echo_exact(&mut b_session, 100, 2);

    // Remove a, move b: a stops accepting but its open session lives on
    // (drain); b answers on its new address and its old session lives on.
    let config = format!("{head}{}", listener("b", "127.0.0.2:0"));
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
    let b_moved = bound_at(admin_addr, "b").expect("b is listed");
    assert_eq!(b_moved.ip(), std::net::Ipv4Addr::new(127, 0, 0, 2));
    assert_ne!(b_moved.port(), 0);
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
    assert_eq!(a["bind"], a_bind.to_string());
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
    let reloads = reload_counts(admin_addr);
    assert_eq!(reloads.ok, reloads_before.ok + 2.0);
}

/// Where `/status` says the listener `name` is bound, if it is listed.
fn bound_at(admin: SocketAddr, name: &str) -> Option<SocketAddr> {
    let status = call(admin, "GET", "/status", None).json();
    let listener = status["listeners"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == name)?
        .clone();
    let bind = listener["bind"].as_str()?;
    Some(
        bind.parse()
            .unwrap_or_else(|e| panic!("bind {bind:?}: {e}")),
    )
}
