//! The relay over real loopback sockets: exact bytes both ways, half-close
//! in each direction, many sessions, backend failover on connect, limits,
//! and drain on shutdown.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::{echo_backend, in_process_proxy, listener_toml, InProcessProxy};

/// An in-process proxy with one listener on an ephemeral port.
async fn proxy(backends: &[SocketAddr], extra: &str) -> InProcessProxy {
    in_process_proxy(&listener_toml("test", backends, extra)).await
}

fn refusing_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    rand::rng().fill_bytes(&mut v);
    v
}

fn digest(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_at_once_arrive_exact() {
    const LEN: usize = 64 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let to_client = random_bytes(LEN);
    let to_backend = random_bytes(LEN);
    let (want_down, want_up) = (digest(&to_client), digest(&to_backend));
    let backend = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            w.write_all(&to_client).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::with_capacity(LEN);
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        digest(&got)
    });
    let p = proxy(&[backend_addr], "").await;
    let (mut r, mut w) = TcpStream::connect(p.addr).await.unwrap().into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&to_backend).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(LEN);
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), LEN);
    assert_eq!(digest(&got), want_down, "backend → client bytes differ");
    assert_eq!(
        backend.await.unwrap(),
        want_up,
        "client → backend bytes differ"
    );
}

#[tokio::test]
async fn client_fin_is_forwarded_while_the_backend_keeps_answering() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap(); // ends only on the forwarded FIN
        let reply = format!("got {} bytes", request.len()).repeat(1000);
        s.write_all(reply.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        reply
    });
    let p = proxy(&[addr], "").await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(&[7u8; 100_000]).await.unwrap();
    c.shutdown().await.unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, backend.await.unwrap());
    assert!(reply.starts_with("got 100000 bytes"));
}

#[tokio::test]
async fn backend_fin_is_forwarded_while_the_client_keeps_sending() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"banner").await.unwrap();
        s.shutdown().await.unwrap(); // the backend is done talking
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let p = proxy(&[addr], "").await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let mut banner = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut banner))
        .await
        .expect("the backend's FIN reaches the client")
        .unwrap();
    assert_eq!(banner, b"banner");
    let payload = random_bytes(1 << 20);
    c.write_all(&payload).await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(digest(&backend.await.unwrap()), digest(&payload));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_sessions_each_get_their_own_bytes_back() {
    let backend = echo_backend();
    let p = proxy(&[backend], "").await;
    let mut clients = Vec::new();
    for i in 0..200u32 {
        let addr = p.addr;
        clients.push(tokio::spawn(async move {
            let payload: Vec<u8> = (0..65_536u32).map(|j| (i * 31 + j) as u8).collect();
            let (mut r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
            let sent = payload.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            got == payload
        }));
    }
    for (i, c) in clients.into_iter().enumerate() {
        assert!(c.await.unwrap(), "session {i} got other bytes back");
    }
}

/// The relay copies small reads and splices bulk, switching per read:
/// a session that goes from small messages to bulk and back, in both
/// directions at once (the echo), must get every byte back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_bulk_and_small_again_arrive_exact() {
    let backend = echo_backend();
    let p = proxy(&[backend], "").await;
    let mut client = TcpStream::connect(p.addr).await.unwrap();
    let mut sizes = Vec::new();
    // Small request/response exchanges, each below the copy buffer.
    for i in 0..300usize {
        sizes.push(1 + (i * 97) % 3000);
    }
    // Bulk, written while the echo comes back: reads fill the buffer.
    sizes.push(24 << 20);
    // Sizes around the switch point (16 KiB), then small again.
    sizes.extend([16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 64 * 1024]);
    for i in 0..300usize {
        sizes.push(1 + (i * 31) % 200);
    }
    for (i, &len) in sizes.iter().enumerate() {
        let sent = random_bytes(len);
        let (mut r, mut w) = client.split();
        let write = async {
            w.write_all(&sent).await.unwrap();
        };
        let read = async {
            let mut got = vec![0; len];
            r.read_exact(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(write, read);
        assert!(
            got == sent,
            "exchange {i} ({len} bytes) came back different"
        );
    }
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(
        rest.is_empty(),
        "bytes after the last exchange: {}",
        rest.len()
    );
}

#[tokio::test]
async fn refused_first_backend_fails_over_to_the_second() {
    let backend = echo_backend();
    let p = proxy(&[refusing_addr(), backend], "").await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
        .await
        .expect("answer through the second backend")
        .unwrap();
    assert_eq!(&buf, b"hello");
}

#[tokio::test]
async fn client_is_closed_promptly_when_every_backend_refuses() {
    let p = proxy(
        &[refusing_addr(), refusing_addr()],
        "connect_timeout = \"1s\"",
    )
    .await;
    let started = Instant::now();
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let result = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf))
        .await
        .expect("client closed within connect_timeout + margin");
    assert!(
        matches!(result, Ok(0) | Err(_)),
        "no bytes for a failed session: {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn max_connections_refuses_the_excess_and_serves_the_rest() {
    let backend = echo_backend();
    let p = proxy(&[backend], "max_connections = 2").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        held.push(c);
    }
    let mut extra = TcpStream::connect(p.addr).await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut b))
        .await
        .expect("the excess client is refused at once");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    // A slot frees up: a new client is served again.
    drop(held.pop());
    let served = async {
        loop {
            let mut c = TcpStream::connect(p.addr).await.unwrap();
            if c.write_all(b"y").await.is_ok() && matches!(c.read(&mut b).await, Ok(1)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("served again");
}

#[tokio::test]
async fn upstream_reset_resets_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s); // RST
    });
    let p = proxy(&[addr], "").await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(3), c.read(&mut b))
        .await
        .expect("client learns at once");
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the backend's RST is passed on as RST"
    );
}

#[tokio::test]
async fn shutdown_drains_live_sessions_then_resets_the_rest() {
    let backend = echo_backend();
    let p = proxy(&[backend], "drain_timeout = \"1s\"").await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.unwrap();
    p.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new clients once draining...
    assert!(
        TcpStream::connect(p.addr).await.is_err(),
        "listener closed on shutdown"
    );
    // ...but the open session still relays until the drain deadline.
    c.write_all(b"b").await.unwrap();
    c.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"b");
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(3), c.read(&mut b))
        .await
        .expect("closed at the drain deadline");
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    tokio::time::timeout(Duration::from_secs(2), p.task)
        .await
        .expect("serve returns after the drain")
        .unwrap();
}

#[tokio::test]
async fn backend_closing_an_idle_session_ends_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(b"ok").await.unwrap();
        // Idle longer than probe_interval, then an idle timeout closes it
        // (write side only: the socket stays open to tell the cases apart).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        s.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(s);
    });
    let p = proxy(&[addr], "[listener.liveness]\nprobe_interval = \"1s\"").await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    c.read_exact(&mut b).await.unwrap();
    let mut rest = [0u8; 8];
    let eof = tokio::time::timeout(Duration::from_secs(3), c.read(&mut rest))
        .await
        .expect("the backend's close reaches the client");
    assert_eq!(eof.unwrap(), 0);
    // The session is over: the proxy's socket is closed, so the client's
    // next write is answered with RST instead of being relayed.
    let _ = c.write_all(b"more").await;
    let after = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.write_all(b"more").await
    })
    .await
    .expect("no hang");
    assert!(after.is_err(), "write after the session ended must fail");
    backend.abort();
}
