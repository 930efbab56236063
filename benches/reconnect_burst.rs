//! A reconnect burst through each route: `BURST` clients (default 2000)
//! connect at once, as an application's pools do after pulsegate resets
//! their sessions or a failover moves them, and each exchanges 8 bytes
//! with an echo server behind the route. Per round and route: how long
//! until half and until all of the burst were served, and how many
//! clients had to retransmit their handshake (their TCP_INFO
//! `total_retrans`: on loopback only a full accept queue makes a
//! handshake retransmit, and each costs a 1 s SYN timeout).
//!
//! ```sh
//! cargo bench --bench reconnect_burst
//! # BURST (2000), ROUNDS (3), PEER=none, HAPROXY_NBTHREAD (2)
//! ```
//!
//! The echo server (`pulsegate lab-backend`) listens with a 4096-entry
//! queue, so the routes are limited by the proxy's own queue. Every route
//! runs each round, taking turns; cells are medians over the rounds.

#[path = "common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::child::Proc;
use common::Via;
use pulsegate::lab::EchoBackend;

/// What one burst through one route came to.
struct Burst {
    /// Time from the first connect until half, and until all, were served.
    half: Duration,
    all: Duration,
    /// Clients whose handshake (or first bytes) had to be retransmitted.
    retransmitted: usize,
}

fn main() -> Result<()> {
    if common::listing_only() {
        return Ok(());
    }
    let burst: usize = common::knob("BURST", 2000)?;
    let rounds: usize = common::knob("ROUNDS", 3)?;
    if burst == 0 || rounds == 0 {
        bail!("BURST and ROUNDS must be at least 1");
    }
    let machine = common::machine::describe();
    let dir = tempfile::tempdir()?;
    let echo_addr = common::free_addr()?;
    let mut echo = start_echo(echo_addr, dir.path())?;
    echo.wait_listening(echo_addr)?;
    let vias = common::routes_to_measure();
    let mut proxies = Vec::new();
    let mut routes = Vec::new();
    for &via in &vias {
        match via {
            Via::Direct => routes.push((via, echo_addr)),
            _ => {
                let (proxy, addr) = common::start_proxy(via, "echo", echo_addr, dir.path())?;
                proxies.push(proxy);
                routes.push((via, addr));
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut results: Vec<Vec<Burst>> = routes.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, &(via, addr)) in routes.iter().enumerate() {
            let b = runtime
                .block_on(one_burst(addr, burst))
                .with_context(|| format!("burst through {}", via.label()))?;
            eprintln!(
                "round {round} {:>9}: half served {:.0} ms, all {:.0} ms, {} retransmitted",
                via.label(),
                ms(b.half),
                ms(b.all),
                b.retransmitted
            );
            results[i].push(b);
            // Let the previous burst's sockets leave TIME_WAIT's way and
            // the proxies finish closing before the next route's turn.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let markdown = render(&machine, burst, rounds, &routes, &results)?;
    print!("{markdown}");
    let path = common::write_results("reconnect_burst", &markdown)?;
    eprintln!("results: {}", path.display());
    Ok(())
}

fn start_echo(addr: SocketAddr, dir: &Path) -> Result<Proc> {
    let exe = Path::new(env!("CARGO_BIN_EXE_pulsegate"));
    let echo = EchoBackend::new(exe, Duration::from_secs(60 * 60));
    Proc::spawn("echo-backend", echo.command(addr), dir)
}

/// Connects `clients` sockets without yielding (each non-blocking connect
/// returns at once), then serves each one exchange of 8 bytes.
async fn one_burst(addr: SocketAddr, clients: usize) -> Result<Burst> {
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(clients);
    for _ in 0..clients {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e).context("connect"),
        }
        sockets.push(socket);
    }
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            tokio::spawn(async move {
                let mut stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
                stream.writable().await?;
                let message = format!("{i:07}\n");
                stream.write_all(message.as_bytes()).await?;
                let mut echo = [0u8; 8];
                stream.read_exact(&mut echo).await?;
                if echo != message.as_bytes() {
                    bail!("client {i} got bytes that were not its own");
                }
                let retrans = pulsegate::sockopt::tcp_info(&stream)?.total_retrans;
                Ok::<_, anyhow::Error>((started.elapsed(), retrans > 0))
            })
        })
        .collect();
    let mut served = Vec::with_capacity(clients);
    let mut retransmitted = 0;
    for task in tasks {
        let (at, retrans) = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .context("a client was not served within 30 s")???;
        served.push(at);
        retransmitted += usize::from(retrans);
    }
    served.sort();
    Ok(Burst {
        half: served[served.len() / 2],
        all: served[served.len() - 1],
        retransmitted,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn render(
    machine: &str,
    burst: usize,
    rounds: usize,
    routes: &[(Via, SocketAddr)],
    results: &[Vec<Burst>],
) -> Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "Measured {} by `cargo bench --bench reconnect_burst` on {machine}. {} ({}, \
         `benches/haproxy.cfg`: its backlog is its maxconn, 8000, capped by somaxconn); pulsegate with \
         `benches/pulsegate.toml` (its default backlog, 4096). {burst} clients connect at once \
         through each route to `pulsegate lab-backend` (echo, 4096-entry queue) and exchange 8 \
         bytes each; {rounds} rounds, the routes taking turns; each cell is the median over the \
         rounds, with the min–max range in brackets.\n",
        common::machine::today(),
        common::haproxy_version().unwrap_or_else(|| "(not installed)".into()),
        common::haproxy_settings()?,
    )?;
    writeln!(
        out,
        "| route | half served, ms | all served, ms | clients that retransmitted their handshake |"
    )?;
    writeln!(out, "| --- | --- | --- | --- |")?;
    for ((via, _), bursts) in routes.iter().zip(results) {
        let cell = |get: &dyn Fn(&Burst) -> f64, decimals: usize| {
            let values: Vec<f64> = bursts.iter().map(get).collect();
            let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!(
                "{:.*} ({:.*}–{:.*})",
                decimals,
                median(values),
                decimals,
                lo,
                decimals,
                hi
            )
        };
        writeln!(
            out,
            "| {} | {} | {} | {} |",
            via.label(),
            cell(&|b| ms(b.half), 0),
            cell(&|b| ms(b.all), 0),
            cell(&|b| b.retransmitted as f64, 0),
        )?;
    }
    Ok(out)
}
