//! Health checks and failover with real loopback backends: a backend that
//! stops accepting goes down after `fall` checks, its idle sessions are
//! evicted (or kept with `on_down = "keep"`), busy ones get `down_grace`,
//! new clients go to the next backend, and the first comes back after
//! `rise` checks.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An echo backend that tags its answers with `name`, so a client can tell
/// which backend served it; `silent` ones read but never answer (a long
/// query).
struct Backend {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Backend {
    async fn start(name: &'static str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if &buf[..n] == b"slow" {
                            continue; // a query that takes forever
                        }
                        let _ = s.write_all(name.as_bytes()).await;
                    }
                });
            }
        });
        Backend { addr, accept }
    }

    /// Stops accepting: new connections and checks are refused; sessions
    /// already accepted stay connected.
    fn stop_listening(&self) {
        self.accept.abort();
    }
}

async fn proxy(backends: &[SocketAddr], extra: &str) -> (SocketAddr, CancellationToken) {
    let more = format!(
        "[listener.check]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n\
         jitter = \"0s\"\nrise = 2\nfall = 2\n{extra}"
    );
    let proxy = support::in_process_proxy(&support::listener_toml("t", backends, &more)).await;
    (proxy.addr, proxy.shutdown)
}

/// Sends `msg` and returns the backend's tag.
async fn ask(c: &mut TcpStream) -> std::io::Result<String> {
    c.write_all(b"who").await?;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

async fn served_by(proxy: SocketAddr) -> std::io::Result<String> {
    let mut c = TcpStream::connect(proxy).await?;
    ask(&mut c).await
}

/// Waits until a new client is served by `name`.
async fn until_served_by(proxy: SocketAddr, name: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if served_by(proxy).await.ok().as_deref() == Some(name) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "never served by {name}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn read_outcome(c: &mut TcpStream, within: Duration) -> Option<std::io::Result<usize>> {
    let mut b = [0u8; 16];
    tokio::time::timeout(within, c.read(&mut b)).await.ok()
}

#[tokio::test]
async fn down_backend_is_left_and_its_idle_sessions_evicted_then_it_returns() {
    let a = Backend::start("a", "127.0.0.1:0".parse().unwrap()).await;
    let b = Backend::start("b", "127.0.0.1:0".parse().unwrap()).await;
    let (p, _stop) = proxy(&[a.addr, b.addr], "").await;
    let mut idle = TcpStream::connect(p).await.unwrap();
    assert_eq!(ask(&mut idle).await.unwrap(), "a", "first_healthy picks a");

    a.stop_listening();
    let moved = until_served_by(p, "b", Duration::from_secs(3)).await;
    eprintln!(
        "new clients reach b {:.2} s after a stopped",
        moved.as_secs_f64()
    );
    // interval 200ms × fall 2 + timeout, plus margin.
    assert!(moved < Duration::from_millis(1500), "{moved:?}");
    // The idle session to a (which would otherwise live on) is reset.
    let r = read_outcome(&mut idle, Duration::from_secs(2)).await;
    assert!(
        matches!(&r, Some(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "idle session of a down backend is reset: {r:?}"
    );

    let _a_again = Backend::start("a", a.addr).await;
    let back = until_served_by(p, "a", Duration::from_secs(3)).await;
    eprintln!(
        "a serves again {:.2} s after it came back (rise 2)",
        back.as_secs_f64()
    );
    assert!(
        back >= Duration::from_millis(200),
        "rise = 2 needs two checks: {back:?}"
    );
}

#[tokio::test]
async fn on_down_keep_leaves_sessions_alone() {
    let a = Backend::start("a", "127.0.0.1:0".parse().unwrap()).await;
    let b = Backend::start("b", "127.0.0.1:0".parse().unwrap()).await;
    let (p, _stop) = proxy(&[a.addr, b.addr], "[listener.routing]\non_down = \"keep\"").await;
    let mut kept = TcpStream::connect(p).await.unwrap();
    assert_eq!(ask(&mut kept).await.unwrap(), "a");
    a.stop_listening();
    until_served_by(p, "b", Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ask(&mut kept).await.unwrap(),
        "a",
        "kept session still served by a"
    );
}

#[tokio::test]
async fn busy_session_of_a_down_backend_gets_down_grace() {
    let a = Backend::start("a", "127.0.0.1:0".parse().unwrap()).await;
    let b = Backend::start("b", "127.0.0.1:0".parse().unwrap()).await;
    let (p, _stop) = proxy(&[a.addr, b.addr], "[listener.routing]\ndown_grace = \"2s\"").await;
    let mut busy = TcpStream::connect(p).await.unwrap();
    assert_eq!(ask(&mut busy).await.unwrap(), "a");
    busy.write_all(b"slow").await.unwrap(); // a query in progress
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.stop_listening();
    let down_at = Instant::now() + until_served_by(p, "b", Duration::from_secs(3)).await;
    // Not evicted during the grace period...
    assert!(
        read_outcome(&mut busy, Duration::from_millis(1200))
            .await
            .is_none(),
        "evicted too early"
    );
    // ...then evicted.
    let r = read_outcome(&mut busy, Duration::from_secs(3)).await;
    assert!(
        matches!(r, Some(Err(_)) | Some(Ok(0))),
        "evicted after down_grace: {r:?}"
    );
    let waited = down_at.elapsed();
    eprintln!(
        "busy session evicted {:.2} s after the backend was seen down",
        waited.as_secs_f64()
    );
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
}

#[tokio::test]
async fn no_healthy_backend_refuses_fast() {
    let a = Backend::start("a", "127.0.0.1:0".parse().unwrap()).await;
    let (p, _stop) = proxy(&[a.addr], "").await;
    assert_eq!(served_by(p).await.unwrap(), "a");
    a.stop_listening();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = Instant::now();
    let mut c = TcpStream::connect(p).await.unwrap();
    let r = read_outcome(&mut c, Duration::from_secs(2)).await;
    assert!(matches!(r, Some(Err(_)) | Some(Ok(0))), "refused: {r:?}");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "refused fast: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn round_robin_alternates_and_least_connections_fills_the_emptier_backend() {
    let a = Backend::start("a", "127.0.0.1:0".parse().unwrap()).await;
    let b = Backend::start("b", "127.0.0.1:0".parse().unwrap()).await;
    let (rr, _stop_rr) = proxy(
        &[a.addr, b.addr],
        "[listener.routing]\nbalance = \"round_robin\"",
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(served_by(rr).await.unwrap());
    }
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "round_robin alternates: {seen:?}"
    );

    let (lc, _stop_lc) = proxy(
        &[a.addr, b.addr],
        "[listener.routing]\nbalance = \"least_connections\"",
    )
    .await;
    // Sessions held open: each new one goes to the backend with fewer, so
    // four end up two and two (first_healthy would put all four on a).
    let mut held = Vec::new();
    let mut counts = std::collections::HashMap::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(lc).await.unwrap();
        let name = ask(&mut c).await.unwrap();
        *counts.entry(name).or_insert(0) += 1;
        held.push(c);
    }
    assert_eq!(counts.get("a"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&2), "{counts:?}");
    // Close b's two sessions: a has 2, b none, so the next two both go to
    // b (round_robin would send one to a, first_healthy both).
    let mut kept = Vec::new();
    for mut c in held {
        if ask(&mut c).await.unwrap() == "a" {
            kept.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut next = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(lc).await.unwrap();
        next.push(ask(&mut c).await.unwrap());
        kept.push(c);
    }
    assert_eq!(
        next,
        ["b", "b"],
        "least_connections fills the emptier backend"
    );
}
