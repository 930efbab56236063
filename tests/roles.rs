//! Role-aware failover with real redis-server processes: pulsegate routes
//! to the master only; when the replica is promoted and the old master
//! demoted, new connections follow within two check intervals and sessions
//! to the demoted node are evicted.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pulsegate::lab::servers::find_program;
use support::servers::RedisServer;
use support::{in_process_proxy, listener_toml, or_skip, InProcessProxy};
use tokio_util::sync::CancellationToken;

const CHECK_INTERVAL: Duration = Duration::from_millis(300);

/// A redis-server on a free loopback port, stopped on drop.
struct Redis {
    port: u16,
    server: RedisServer,
}

impl Redis {
    /// A primary, or a replica of the one on port `replica_of`; DEBUG
    /// enabled (a slow command on demand). `None` (skipping, or failing
    /// under CI) when redis-server or redis-cli is not installed.
    fn start(replica_of: Option<u16>) -> Option<Redis> {
        or_skip(find_program("redis-cli", "redis-tools"))?;
        let primary = replica_of.map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        let server = or_skip(RedisServer::start(
            primary,
            &["--enable-debug-command", "yes"],
        ))?;
        let redis = Redis {
            port: server.addr().port(),
            server,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cmd(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                redis.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(redis)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Runs one command with redis-cli; its trimmed output.
    fn cmd(&self, args: &[&str]) -> Option<String> {
        cli(self.port, args)
    }

    fn signal(&self, signal: Signal) {
        self.server.signal(signal).expect("signal redis-server");
    }
}

fn cli(port: u16, args: &[&str]) -> Option<String> {
    // `timeout`: a connection routed to a frozen server must not hang the test.
    let out = Command::new("timeout")
        .args(["2", "redis-cli", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A primary `a` and, with `b_replica`, `b` as its replica (else another
/// primary), or `None` when redis is not installed (see [`Redis::start`]).
fn two_servers(b_replica: bool) -> Option<(Redis, Redis)> {
    let a = Redis::start(None)?;
    let b = Redis::start(b_replica.then_some(a.port))?;
    Some((a, b))
}

/// The port of the redis-server that answers a new connection through
/// the proxy.
fn served_port(proxy: u16) -> Option<String> {
    cli(proxy, &["CONFIG", "GET", "port"]).and_then(|s| s.lines().nth(1).map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_follow_the_master_and_old_sessions_are_evicted() {
    let Some((a, b)) = two_servers(true) else {
        return;
    };
    // b is listed first: role = "primary" must override the order.
    let (proxy, stop) = start_proxy(
        &[b.addr(), a.addr()],
        "interval = \"300ms\"\ntimeout = \"300ms\"\nrise = 1\nfall = 2\n\
         [listener.routing]\nrole = \"primary\"\ndown_grace = \"1s\"",
    )
    .await;

    tokio::task::spawn_blocking(move || {
        // The first check runs at once; give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while served_port(proxy).as_deref() != Some(&a.port.to_string()) {
            assert!(Instant::now() < deadline, "never routed to the master a");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            cli(proxy, &["SET", "k", "v"]).as_deref(),
            Some("OK"),
            "redis-cli through pulsegate"
        );
        // A pooled connection, idle on the old master.
        let mut pooled = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
        pooled.write_all(b"PING\r\n").unwrap();
        let mut buf = [0u8; 64];
        let n = pooled.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"+PONG\r\n");

        let deadline = Instant::now() + Duration::from_secs(10);
        while b.cmd(&["GET", "k"]).as_deref() != Some("v") {
            assert!(Instant::now() < deadline, "the replica never caught up");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Failover: promote b, demote a.
        assert_eq!(b.cmd(&["REPLICAOF", "NO", "ONE"]).as_deref(), Some("OK"));
        assert_eq!(
            a.cmd(&["REPLICAOF", "127.0.0.1", &b.port.to_string()])
                .as_deref(),
            Some("OK")
        );
        let moved = Instant::now();
        let deadline = moved + Duration::from_secs(5);
        while served_port(proxy).as_deref() != Some(&b.port.to_string()) {
            assert!(Instant::now() < deadline, "never followed the new master b");
            std::thread::sleep(Duration::from_millis(20));
        }
        let followed = moved.elapsed();
        eprintln!(
            "new connections reach the new master {:.2} s after the failover",
            followed.as_secs_f64()
        );
        // Two check intervals (+ the check's own time and scheduling margin).
        assert!(
            followed <= 2 * CHECK_INTERVAL + Duration::from_millis(400),
            "{followed:?}"
        );

        // The idle pooled session to the demoted node is evicted (RST).
        pooled
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let r = pooled.read(&mut buf);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the session to the demoted master is reset: {r:?}"
        );
        assert_eq!(
            cli(proxy, &["GET", "k"]).as_deref(),
            Some("v"),
            "data written before failover"
        );
        drop((a, b));
    })
    .await
    .unwrap();
    stop.cancel();
}

/// With `role = "primary"`, a write answered `-READONLY` on its way
/// through pulsegate has the demoted master checked at once, and the
/// promoted one right after (a role change wakes the other checks): new
/// connections reach the new master well within 1.5 s of that reply,
/// while the check interval is 4 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readonly_reply_has_the_roles_checked_at_once() {
    let Some((a, b)) = two_servers(true) else {
        return;
    };
    let (proxy, stop) = start_proxy(
        &[a.addr(), b.addr()],
        "interval = \"4s\"\ntimeout = \"1s\"\nrise = 1\nfall = 2\n\
         [listener.routing]\nrole = \"primary\"\ndown_grace = \"1s\"",
    )
    .await;
    let started = Instant::now();
    tokio::task::spawn_blocking(move || {
        wait_served_by(proxy, a.port, Duration::from_secs(3));
        let mut session = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
        session
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut set = |value: &str| {
            let cmd = format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n{value}\r\n", value.len());
            session.write_all(cmd.as_bytes()).unwrap();
            let mut buf = [0u8; 128];
            let n = session.read(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        assert_eq!(set("v"), "+OK\r\n");

        // Past the first checks' quarter interval: a hint is acted on at
        // once. The next scheduled checks are about 2.9 s after the flip.
        std::thread::sleep((started + Duration::from_millis(1100)).saturating_duration_since(Instant::now()));
        assert_eq!(b.cmd(&["REPLICAOF", "NO", "ONE"]).as_deref(), Some("OK"));
        assert_eq!(
            a.cmd(&["REPLICAOF", "127.0.0.1", &b.port.to_string()])
                .as_deref(),
            Some("OK")
        );
        let reply = set("w");
        let answered = Instant::now();
        assert!(reply.starts_with("-READONLY "), "{reply:?}");
        wait_served_by(proxy, b.port, Duration::from_secs(3));
        let followed = answered.elapsed();
        eprintln!(
            "new connections reach the new master {:.2} s after the first -READONLY reply (check interval 4 s)",
            followed.as_secs_f64()
        );
        assert!(followed < Duration::from_millis(1500), "{followed:?}");
        drop((a, b));
    })
    .await
    .unwrap();
    stop.cancel();
}

/// pulsegate in this process in front of `backends`, with a redis check
/// (`check`: its other keys, then more tables); its port and shutdown.
async fn start_proxy(backends: &[SocketAddr], check: &str) -> (u16, CancellationToken) {
    let check = format!("[listener.check]\nkind = \"redis\"\njitter = \"0s\"\n{check}");
    let InProcessProxy { addr, shutdown, .. } =
        in_process_proxy(&listener_toml("redis", backends, &check)).await;
    (addr.port(), shutdown)
}

fn pooled_ping(proxy: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    assert_eq!(ping(&mut s).unwrap(), "+PONG\r\n");
    s
}

fn ping(s: &mut TcpStream) -> std::io::Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Whether a new connection through the proxy reaches the redis on
/// `port`, giving up after 150 ms (a frozen server never answers).
fn quickly_served_by(proxy: u16, port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", proxy)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(150)));
    if s.write_all(b"CONFIG GET port\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 128];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).contains(&format!("\r\n{port}\r\n"))
}

fn wait_served_by(proxy: u16, port: u16, within: Duration) -> Duration {
    let started = Instant::now();
    while !quickly_served_by(proxy, port) {
        assert!(
            started.elapsed() < within,
            "never served by redis on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_backend_is_marked_down_by_its_check_and_comes_back() {
    let Some((a, b)) = two_servers(false) else {
        return;
    };
    let (proxy, stop) = start_proxy(
        &[a.addr(), b.addr()],
        "interval = \"300ms\"\ntimeout = \"300ms\"\nrise = 2\nfall = 2",
    )
    .await;
    tokio::task::spawn_blocking(move || {
        wait_served_by(proxy, a.port, Duration::from_secs(5));
        let mut pooled = pooled_ping(proxy);
        a.signal(Signal::SIGSTOP);
        let frozen = Instant::now();
        // Its kernel still ACKs, so only the application check can tell.
        let moved = wait_served_by(proxy, b.port, Duration::from_secs(5));
        eprintln!(
            "frozen redis left for new connections after {:.2} s",
            moved.as_secs_f64()
        );
        // interval × fall + timeout (0.9 s), plus the check client's own time.
        assert!(moved < Duration::from_millis(1500), "{moved:?}");
        pooled
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut buf = [0u8; 8];
        let r = pooled.read(&mut buf);
        assert!(
            r.is_err() || matches!(r, Ok(0)),
            "idle session of the frozen node evicted: {r:?}"
        );
        eprintln!(
            "its idle session was evicted {:.2} s after the freeze",
            frozen.elapsed().as_secs_f64()
        );
        a.signal(Signal::SIGCONT);
        // b stays first_healthy's second choice: a comes back first in order.
        let back = wait_served_by(proxy, a.port, Duration::from_secs(5));
        eprintln!(
            "thawed redis serves again after {:.2} s (rise 2)",
            back.as_secs_f64()
        );
        drop((a, b));
    })
    .await
    .unwrap();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_but_alive_backend_is_not_marked_down() {
    let Some((a, b)) = two_servers(false) else {
        return;
    };
    // The check's timeout is above the 1.5 s that the server will be busy.
    let (proxy, stop) = start_proxy(
        &[a.addr(), b.addr()],
        "interval = \"500ms\"\ntimeout = \"3s\"\nrise = 1\nfall = 1",
    )
    .await;
    tokio::task::spawn_blocking(move || {
        wait_served_by(proxy, a.port, Duration::from_secs(5));
        let mut pooled = pooled_ping(proxy);
        // A slow command on another connection blocks redis for 1.5 s,
        // across at least two checks.
        let port = a.port;
        let slow = std::thread::spawn(move || cli(port, &["DEBUG", "SLEEP", "1.5"]));
        assert_eq!(slow.join().unwrap().as_deref(), Some("OK"));
        assert_eq!(
            ping(&mut pooled).unwrap(),
            "+PONG\r\n",
            "the pooled session survived"
        );
        assert_eq!(
            served_port(proxy).as_deref(),
            Some(a.port.to_string().as_str()),
            "a stayed up"
        );
        drop((a, b));
    })
    .await
    .unwrap();
    stop.cancel();
}

/// The bench's `role-flip` fault (`pulsegate bench failover --fault
/// role-flip`) swaps the roles without closing a client connection: the
/// connections opened before it still answer, a write on the demoted
/// server is refused read-only, and the promoted one takes writes.
#[cfg(feature = "bench")]
#[test]
fn the_benchs_role_flip_swaps_roles_and_leaves_every_connection_open() {
    let Some((a, b)) = two_servers(true) else {
        return;
    };
    let mut on_a = TcpStream::connect(a.addr()).unwrap();
    let mut on_b = TcpStream::connect(b.addr()).unwrap();
    let ask = |stream: &mut TcpStream, command: &str| -> String {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(command.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).expect("the connection is still open");
        assert!(n > 0, "the server closed the connection");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(ask(&mut on_a, "SET k v\r\n"), "+OK\r\n");
    assert!(ask(&mut on_b, "SET k v\r\n").starts_with("-READONLY"));

    pulsegate::bench::flip_redis_roles(a.addr(), b.addr()).expect("role flip");

    assert_eq!(ask(&mut on_a, "PING\r\n"), "+PONG\r\n");
    assert!(ask(&mut on_a, "SET k w\r\n").starts_with("-READONLY"));
    assert_eq!(ask(&mut on_b, "SET k w\r\n"), "+OK\r\n");
    assert!(b
        .cmd(&["INFO", "replication"])
        .unwrap()
        .contains("role:master"));
    assert!(a
        .cmd(&["INFO", "replication"])
        .unwrap()
        .contains("role:slave"));
}

/// A stand-in redis server whose role the test sets: it answers a check's
/// pipelined `PING` + `ROLE` with `+PONG` and its role (its first check
/// only after `first_delay`), a client's `WHO` with its name (and closes),
/// `SLOW` with `+DONE` after a second and `PING` with `+PONG` (and stays
/// open). It records when each check arrived, and counts client `PING`s.
struct FakeRedis {
    addr: SocketAddr,
    primary: std::sync::Arc<std::sync::atomic::AtomicBool>,
    checks: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    pings: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeRedis {
    async fn start(name: &'static str, primary: bool, first_delay: Duration) -> FakeRedis {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeRedis {
            addr: listener.local_addr().unwrap(),
            primary: Arc::new(AtomicBool::new(primary)),
            checks: Arc::new(Mutex::new(Vec::new())),
            pings: Arc::default(),
        };
        let (role, checks, pings) = (
            fake.primary.clone(),
            fake.checks.clone(),
            fake.pings.clone(),
        );
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((mut stream, _)) = listener.accept().await {
                let delay = if std::mem::take(&mut first) {
                    first_delay
                } else {
                    Duration::ZERO
                };
                let (role, checks, pings) = (role.clone(), checks.clone(), pings.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 256];
                    loop {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&request);
                        if text.contains("WHO\r\n") {
                            let _ = stream.write_all(format!("+{name}\r\n").as_bytes()).await;
                            return;
                        }
                        if text == "SLOW\r\n" {
                            request.clear();
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let _ = stream.write_all(b"+DONE\r\n").await;
                            continue;
                        }
                        if text == "PING\r\n" {
                            request.clear();
                            pings.fetch_add(1, Ordering::SeqCst);
                            let _ = stream.write_all(b"+PONG\r\n").await;
                            continue;
                        }
                        if text.contains("ROLE\r\n") {
                            checks.lock().unwrap().push(Instant::now());
                            tokio::time::sleep(delay).await;
                            let reply = if role.load(Ordering::SeqCst) {
                                "+PONG\r\n*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n"
                            } else {
                                "+PONG\r\n*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n\
                                 $9\r\nconnected\r\n:0\r\n"
                            };
                            let _ = stream.write_all(reply.as_bytes()).await;
                            return;
                        }
                    }
                });
            }
        });
        fake
    }

    fn set_primary(&self, primary: bool) {
        self.primary
            .store(primary, std::sync::atomic::Ordering::SeqCst);
    }

    fn checks(&self) -> usize {
        self.checks.lock().unwrap().len()
    }
}

/// Which server a new connection through the proxy reaches, if any.
fn who(proxy: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"WHO\r\n").ok()?;
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// A failover moves two roles, and each backend's monitor sees its half on
/// its own schedule. Here the two schedules are half an interval apart
/// (the first check of `a` is answered 1.5 s late, once): the demotion of
/// `a` is seen about 0.4 s after the flip, the promotion of `b` on its own
/// schedule only about 0.9 s after it. A role change wakes the other
/// monitors, so `b` is checked at once and new connections reach it when
/// the demotion is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_change_has_the_other_backends_checked_at_once() {
    let a = FakeRedis::start("a", true, Duration::from_millis(1500)).await;
    let b = FakeRedis::start("b", false, Duration::ZERO).await;
    let (proxy, stop) = start_proxy(
        &[a.addr, b.addr],
        "interval = \"1s\"\ntimeout = \"3s\"\nrise = 1\nfall = 2\n\
         [listener.routing]\nrole = \"primary\"",
    )
    .await;
    let followed = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while who(proxy).as_deref() != Some("+a") {
            assert!(
                Instant::now() < deadline,
                "never routed to the primary a: {:?}",
                who(proxy)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Flip 0.1 s after one of b's checks: b's next is 0.9 s away, a's
        // about 0.4 s.
        std::thread::sleep(Duration::from_secs(1));
        let seen = b.checks();
        while b.checks() == seen {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        let flipped = Instant::now();
        a.set_primary(false);
        b.set_primary(true);
        while who(proxy).as_deref() != Some("+b") {
            assert!(
                flipped.elapsed() < Duration::from_secs(5),
                "never followed b"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let followed = flipped.elapsed();
        drop((a, b));
        followed
    })
    .await
    .unwrap();
    stop.cancel();
    eprintln!(
        "new connections reach the promoted b {:.2} s after the flip",
        followed.as_secs_f64()
    );
    assert!(
        followed < Duration::from_millis(700),
        "followed after {followed:?}: b was checked on its own schedule"
    );
}

/// A busy session of a backend that lost the wanted role keeps its
/// request in flight (its answer is relayed), but its client's next
/// request is not sent to the demoted server: the session is evicted
/// then, not `down_grace` (here 10 s) later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_session_of_a_demoted_server_ends_at_its_next_request() {
    let a = FakeRedis::start("a", true, Duration::ZERO).await;
    let b = FakeRedis::start("b", false, Duration::ZERO).await;
    let (proxy, stop) = start_proxy(
        &[a.addr, b.addr],
        "interval = \"200ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 2\n\
         [listener.routing]\nrole = \"primary\"\ndown_grace = \"10s\"",
    )
    .await;
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while who(proxy).as_deref() != Some("+a") {
            assert!(Instant::now() < deadline, "never routed to the primary a");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut session = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
        session
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        assert_eq!(ping(&mut session).unwrap(), "+PONG\r\n");
        // A request in flight (answered in 1 s) when a is demoted.
        session.write_all(b"SLOW\r\n").unwrap();
        let asked = Instant::now();
        a.set_primary(false);
        b.set_primary(true);
        while who(proxy).as_deref() != Some("+b") {
            assert!(
                asked.elapsed() < Duration::from_secs(1),
                "the flip was not seen while the request was in flight"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut buf = [0u8; 64];
        let n = session
            .read(&mut buf)
            .expect("the answer in flight is relayed");
        assert_eq!(&buf[..n], b"+DONE\r\n");
        let pings_before = a.pings.load(std::sync::atomic::Ordering::SeqCst);
        let next = ping(&mut session);
        assert!(
            matches!(&next, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the next request ends the session: {next:?}"
        );
        assert_eq!(
            a.pings.load(std::sync::atomic::Ordering::SeqCst),
            pings_before,
            "the request reached the demoted server"
        );
        drop((a, b));
    })
    .await
    .unwrap();
    stop.cancel();
}

// ---------------------------------------------------------------- mariadb

/// A MariaDB server reporting `version` in its greeting (so a client can
/// tell which one it reached), with the check user `pulsegate_check`
/// (password `check-pw`), read-only from the start when `read_only`.
struct MariaDbServer {
    server: pulsegate::lab::servers::HostServer,
    mariadb: pulsegate::lab::servers::mariadb::MariaDb,
    _dir: tempfile::TempDir,
}

fn start_mariadb(version: &str, read_only: bool) -> Option<MariaDbServer> {
    let dir = tempfile::tempdir().expect("temp dir");
    // An application user whose grants stop at its database: SUPER (or
    // READ_ONLY ADMIN) would let it write through read_only.
    let mut init =
        "CREATE USER IF NOT EXISTS 'pulsegate_check'@'127.0.0.1' IDENTIFIED BY 'check-pw';\n\
                    CREATE DATABASE IF NOT EXISTS app;\n\
                    CREATE TABLE IF NOT EXISTS app.t (v INT);\n\
                    CREATE USER IF NOT EXISTS 'app'@'127.0.0.1' IDENTIFIED BY 'app-pw';\n\
                    GRANT ALL ON app.* TO 'app'@'127.0.0.1';\n"
            .to_string();
    if read_only {
        init.push_str("SET GLOBAL read_only = 1;\n");
    }
    let mut mariadb = or_skip(pulsegate::lab::servers::mariadb::MariaDb::install(
        dir.path(),
        &init,
    ))?;
    mariadb.args.push(format!("--version={version}"));
    let server = mariadb.start_on_host().expect("start mariadbd");
    Some(MariaDbServer {
        server,
        mariadb,
        _dir: dir,
    })
}

/// The server version in the greeting a new connection through the proxy
/// gets, if any within 300 ms.
fn greeting_version(proxy: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).ok()?;
    // Header (4), protocol 10, then the version up to its NUL.
    let version = buf.get(5..n)?;
    let end = version.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&version[..end]).into_owned())
}

/// pulsegate in this process in front of `backends` with a mysql check
/// logged in as `pulsegate_check` every `interval`, routing to the
/// primary; its port and shutdown.
async fn mariadb_proxy(backends: [SocketAddr; 2], interval: Duration) -> (u16, CancellationToken) {
    let check = format!(
        "[listener.check]\nkind = \"mysql\"\ninterval = \"{}ms\"\ntimeout = \"400ms\"\n\
         jitter = \"0s\"\nuser = \"pulsegate_check\"\npassword = \"check-pw\"\n\
         [listener.routing]\nrole = \"primary\"\non_down = \"evict\"\n",
        interval.as_millis()
    );
    let InProcessProxy { addr, shutdown, .. } =
        in_process_proxy(&listener_toml("mariadb", &backends, &check)).await;
    (addr.port(), shutdown)
}

/// Waits until new connections through the proxy reach the MariaDB that
/// reports `version`; how long that took.
fn wait_greeted_by(proxy: u16, version: &str, within: Duration) -> Duration {
    let started = Instant::now();
    while greeting_version(proxy).as_deref() != Some(version) {
        assert!(started.elapsed() < within, "never served by {version}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// MariaDB's role is `@@global.read_only`, read by the mysql check logged
/// in with a password. When the primary is fenced (`read_only=1`) and the
/// replica opened (`read_only=0`), new connections reach the new primary
/// within one check interval, and an idle session on the fenced server is
/// reset at once (`on_down = "evict"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_read_only_moves_new_connections_and_evicts_sessions() {
    let Some(a) = start_mariadb("10.11-server-a", false) else {
        return;
    };
    let Some(b) = start_mariadb("10.11-server-b", true) else {
        return;
    };
    let interval = Duration::from_millis(500);
    let (proxy, shutdown) = mariadb_proxy([a.server.addr(), b.server.addr()], interval).await;
    let served = tokio::task::spawn_blocking(move || {
        wait_greeted_by(proxy, "10.11-server-a", Duration::from_secs(10));
        // An idle session on the primary: it has read the greeting.
        let mut idle = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
        let mut buf = [0u8; 256];
        assert!(idle.read(&mut buf).unwrap() > 0);
        idle
    })
    .await
    .unwrap();

    a.mariadb.sql("SET GLOBAL read_only = 1").expect("fence a");
    b.mariadb.sql("SET GLOBAL read_only = 0").expect("open b");
    let flipped = Instant::now();
    let (followed, idle_end) = tokio::task::spawn_blocking(move || {
        wait_greeted_by(proxy, "10.11-server-b", Duration::from_secs(5));
        let followed = flipped.elapsed();
        let mut idle = served;
        idle.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 64];
        (followed, idle.read(&mut buf))
    })
    .await
    .unwrap();
    eprintln!(
        "mariadb read_only flip: new connections on the new primary after {:.3} s; idle session: {idle_end:?}",
        followed.as_secs_f64()
    );
    assert!(
        followed < interval + Duration::from_millis(500),
        "followed after {followed:?} (check interval {interval:?})"
    );
    assert!(
        matches!(&idle_end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the idle session on the fenced server was not reset: {idle_end:?}"
    );
    shutdown.cancel();
    drop((a, b));
}

/// `INSERT INTO app.t` as the application user, with the mariadb client,
/// through the proxy.
fn mariadb_insert(client: &std::path::Path, proxy: u16) -> std::process::Output {
    let mut command = Command::new(client);
    command.args(["--no-defaults", "--protocol=tcp", "--host=127.0.0.1"]);
    command.arg(format!("--port={proxy}"));
    command.args(["--user=app", "--password=app-pw", "--connect-timeout=3"]);
    command.args(["--execute", "INSERT INTO app.t VALUES (1)"]);
    support::servers::run_bounded(command, Duration::from_secs(10))
}

/// With a check interval of 4 s, a write answered error 1290 ("running
/// with the --read-only option") on its way through pulsegate has the
/// fenced server checked at once, and the opened one right after: new
/// connections reach the new primary well within 1.5 s of that reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_read_only_error_has_the_roles_checked_at_once() {
    let Some(client) = or_skip(find_program("mariadb", "mariadb-client")) else {
        return;
    };
    let Some(a) = start_mariadb("10.11-server-a", false) else {
        return;
    };
    let Some(b) = start_mariadb("10.11-server-b", true) else {
        return;
    };
    let (proxy, shutdown) =
        mariadb_proxy([a.server.addr(), b.server.addr()], Duration::from_secs(4)).await;
    let (elapsed, reply) = tokio::task::spawn_blocking(move || {
        wait_greeted_by(proxy, "10.11-server-a", Duration::from_secs(10));
        let written = mariadb_insert(&client, proxy);
        assert!(written.status.success(), "{written:?}");
        // Past the quarter interval since the first check (hints are acted
        // on no sooner), and well before the next scheduled one at 4 s.
        std::thread::sleep(Duration::from_millis(1200));
        a.mariadb.sql("SET GLOBAL read_only = 1").expect("fence a");
        b.mariadb.sql("SET GLOBAL read_only = 0").expect("open b");
        let refused = mariadb_insert(&client, proxy);
        let replied = Instant::now();
        wait_greeted_by(proxy, "10.11-server-b", Duration::from_secs(6));
        let elapsed = replied.elapsed();
        drop((a, b));
        (
            elapsed,
            String::from_utf8_lossy(&refused.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    eprintln!(
        "mariadb read-only reply: new connections on the new primary {:.3} s after it",
        elapsed.as_secs_f64()
    );
    assert!(
        reply.contains("1290"),
        "the write was not refused read-only: {reply}"
    );
    assert!(
        elapsed < Duration::from_millis(1500),
        "followed {elapsed:?} after the read-only reply; the interval is 4 s"
    );
    shutdown.cancel();
}
