//! A reconnect burst: when pulsegate resets the sessions of a dead backend,
//! or a failover moves them, the applications' pools reconnect all at
//! once. Every connection of the burst must land in the listener's accept
//! queue at the first SYN; one that finds the queue full loses its SYN (or
//! its handshake's last ACK) and waits a 1 s retransmission, which is the
//! whole failover budget of a fast pool.
//!
//! The evidence is the kernel's own: after its echo came back, each
//! client's TCP_INFO `total_retrans` must be 0. On loopback nothing but a
//! full accept queue makes a handshake retransmit, so this is not a timing
//! assertion. The second test shows the same burst does lose SYNs behind
//! a 128-entry queue (the backlog tokio's and std's `bind` use), so the
//! first one can fail.
//!
//! The proxy runs in this test's process on the same single-threaded
//! runtime as the clients, so it cannot accept while the burst is being
//! connected: the whole burst waits in the accept queue at once, however
//! fast or loaded the machine is. That makes both outcomes deterministic.
//!
//! Runs on loopback (no root needed); it holds
//! about 4 × CLIENTS descriptors, within the 20,000 the test machines allow.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use pulsegate::sockopt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{in_process_proxy, listener_toml};

/// Clients in the burst: several times tokio's default backlog of 128,
/// well under the default 4096.
const CLIENTS: usize = 1000;

/// How long one client may take to be served: room for a SYN retransmitted
/// after 1 s and more, so a lost SYN shows in `total_retrans`, not as a
/// timeout.
const SERVED_WITHIN: Duration = Duration::from_secs(15);

/// Connects `CLIENTS` sockets without yielding to the runtime (each
/// non-blocking connect returns at once), then has each exchange 8 bytes
/// through the proxy and reports how many of them retransmitted anything.
async fn burst(proxy: SocketAddr) -> usize {
    let somaxconn = sockopt::somaxconn().expect("/proc/sys/net/core/somaxconn");
    assert!(
        somaxconn as usize > CLIENTS,
        "net.core.somaxconn is {somaxconn}: the kernel caps every accept queue below \
         this test's burst of {CLIENTS}; raise it (sysctl -w net.core.somaxconn=4096)"
    );
    let mut sockets = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("client socket");
        socket.set_nonblocking(true).expect("non-blocking");
        match socket.connect(&proxy.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => panic!("connect to {proxy}: {e}"),
        }
        sockets.push(socket);
    }
    let clients = sockets.into_iter().enumerate().map(|(i, socket)| {
        tokio::spawn(async move {
            let mut stream =
                TcpStream::from_std(std::net::TcpStream::from(socket)).expect("register client");
            stream.writable().await.expect("connected");
            let message = format!("{i:07}\n");
            stream.write_all(message.as_bytes()).await.expect("send");
            let mut echo = [0u8; 8];
            stream.read_exact(&mut echo).await.expect("echo");
            assert_eq!(&echo, message.as_bytes(), "client {i} got another's bytes");
            sockopt::tcp_info(&stream).expect("TCP_INFO").total_retrans
        })
    });
    let mut retransmitted = 0;
    for client in clients.collect::<Vec<_>>() {
        let total_retrans = tokio::time::timeout(SERVED_WITHIN, client)
            .await
            .expect("a client was not served within 15 s")
            .expect("client task");
        if total_retrans > 0 {
            retransmitted += 1;
        }
    }
    retransmitted
}

#[tokio::test]
async fn a_burst_of_1000_reconnects_needs_no_retransmitted_handshake() {
    let backend = support::echo_backend();
    // The product default (backlog = 4096), nothing else set.
    let proxy = in_process_proxy(&listener_toml("burst", &[backend], "")).await;
    let retransmitted = burst(proxy.addr).await;
    assert_eq!(
        retransmitted, 0,
        "{retransmitted} of {CLIENTS} clients retransmitted their handshake: \
         the accept queue overflowed"
    );
    proxy.shutdown.cancel();
    let _ = proxy.task.await;
}

#[tokio::test]
async fn behind_a_128_entry_accept_queue_the_same_burst_loses_handshakes() {
    let backend = support::echo_backend();
    let proxy = in_process_proxy(&listener_toml("small", &[backend], "backlog = 128")).await;
    let retransmitted = burst(proxy.addr).await;
    assert!(
        retransmitted > 0,
        "no client of {CLIENTS} retransmitted behind a 128-entry queue: \
         the burst did not test the queue"
    );
    proxy.shutdown.cancel();
    let _ = proxy.task.await;
}
