//! The four measurements of proxy_perf, each against one address: one
//! stream's throughput into the sink, ping-pong latency of one connection,
//! requests/s of many connections, and new connections/s. Every wait is
//! bounded, so a stuck proxy fails the bench instead of hanging it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::servers::Sink;

/// Request and response size of the latency, requests/s and connections/s
/// tests.
pub const MESSAGE: usize = 64;
/// The client's write size in the throughput test.
const WRITE_SIZE: usize = 1 << 20;
/// The longest any single read, write or connect may take.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const GIB: f64 = (1u64 << 30) as f64;

/// Writes `bytes` through one connection to the sink in 1 MiB writes;
/// returns GiB/s from the first write to the sink's last byte.
pub fn throughput(addr: SocketAddr, sink: &Sink, bytes: u64) -> Result<f64> {
    sink.forget_drained();
    let mut stream = connect(addr)?;
    let chunk = vec![0x5au8; WRITE_SIZE];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(WRITE_SIZE as u64) as usize;
        stream
            .write_all(&chunk[..n])
            .with_context(|| format!("writing to {addr} with {left} bytes to go"))?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let drained = sink.next_drained(IO_TIMEOUT)?;
    if drained.bytes != bytes {
        bail!("the sink received {} of {bytes} bytes", drained.bytes);
    }
    let secs = drained.last_byte.duration_since(started).as_secs_f64();
    Ok(bytes as f64 / GIB / secs)
}

/// Round-trip percentiles in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// One connection that sends a 64-byte message and waits for its echo,
/// round after round, recording each round trip. Runs in slices, so that
/// the routes can take turns and a change in background load hits them
/// alike.
pub struct PingPong {
    addr: SocketAddr,
    stream: TcpStream,
    histogram: Histogram<u64>,
}

impl PingPong {
    pub fn connect(addr: SocketAddr) -> Result<PingPong> {
        Ok(PingPong {
            addr,
            stream: connect(addr)?,
            // 1 ns .. 60 s, 3 significant digits.
            histogram: Histogram::new_with_bounds(1, 60_000_000_000, 3)?,
        })
    }

    /// `rounds` round trips, recorded in the histogram if `record`.
    pub fn run(&mut self, rounds: u64, record: bool) -> Result<()> {
        let request = [b'p'; MESSAGE];
        let mut response = [0u8; MESSAGE];
        for _ in 0..rounds {
            let sent = Instant::now();
            self.stream.write_all(&request)?;
            self.stream
                .read_exact(&mut response)
                .with_context(|| format!("no echo from {}", self.addr))?;
            if record {
                let nanos = sent.elapsed().as_nanos() as u64;
                self.histogram.saturating_record(nanos);
            }
        }
        Ok(())
    }

    /// The recorded round trips' percentiles.
    pub fn latency(&self) -> Latency {
        let micros = |q: f64| self.histogram.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            p50: micros(0.5),
            p99: micros(0.99),
            p999: micros(0.999),
        }
    }
}

/// `conns` connections, each sending 64-byte requests and awaiting the
/// 64-byte response, one outstanding per connection, on one client thread
/// (tokio, current-thread). Counts completed requests over `window`, after
/// `warmup`.
pub fn requests_per_sec(
    addr: SocketAddr,
    conns: usize,
    warmup: Duration,
    window: Duration,
) -> Result<f64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..conns {
            let stream = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
                .with_context(|| format!("connecting to {addr} timed out"))?
                .with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true)?;
            clients.spawn(request_loop(stream, done.clone(), stop.clone()));
        }
        tokio::time::sleep(warmup).await;
        let (before, started) = (done.load(Ordering::Relaxed), Instant::now());
        tokio::time::sleep(window).await;
        let (after, elapsed) = (done.load(Ordering::Relaxed), started.elapsed());
        stop.store(true, Ordering::Relaxed);
        let joined = tokio::time::timeout(IO_TIMEOUT, clients.join_all()).await;
        for result in joined.context("clients did not stop")? {
            result.with_context(|| format!("a client of {addr} failed"))?;
        }
        Ok((after - before) as f64 / elapsed.as_secs_f64())
    })
}

async fn request_loop(
    mut stream: tokio::net::TcpStream,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    let request = [b'r'; MESSAGE];
    let mut response = [0u8; MESSAGE];
    while !stop.load(Ordering::Relaxed) {
        let exchange = async {
            stream.write_all(&request).await?;
            stream.read_exact(&mut response).await
        };
        match tokio::time::timeout(IO_TIMEOUT, exchange).await {
            Ok(result) => result?,
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        };
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// The result of the connection-rate test.
pub struct ConnRate {
    pub per_sec: f64,
    /// Cycles that failed (and were not counted), and the first error.
    pub errors: u64,
    pub first_error: Option<String>,
}

/// `threads` client threads, each in a loop: connect, one 64-byte
/// exchange, close. Counts completed cycles over `window`, after `warmup`.
pub fn connections_per_sec(
    addr: SocketAddr,
    threads: usize,
    warmup: Duration,
    window: Duration,
) -> Result<ConnRate> {
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let (before, after, elapsed, failures) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| connect_loop(addr, &done, &stop)))
            .collect();
        std::thread::sleep(warmup);
        let (before, started) = (done.load(Ordering::Relaxed), Instant::now());
        std::thread::sleep(window);
        let (after, elapsed) = (done.load(Ordering::Relaxed), started.elapsed());
        stop.store(true, Ordering::Relaxed);
        let failures: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        (before, after, elapsed, failures)
    });
    let mut rate = ConnRate {
        per_sec: (after - before) as f64 / elapsed.as_secs_f64(),
        errors: 0,
        first_error: None,
    };
    for failure in failures {
        let (errors, first) = failure.map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        rate.errors += errors;
        rate.first_error = rate.first_error.or(first);
    }
    if after == before {
        bail!(
            "no connection through {addr} completed: {}",
            rate.first_error.unwrap_or_default()
        );
    }
    Ok(rate)
}

/// One client thread of [`connections_per_sec`]: returns its failed cycles
/// and the first failure.
fn connect_loop(addr: SocketAddr, done: &AtomicU64, stop: &AtomicBool) -> (u64, Option<String>) {
    let (mut errors, mut first) = (0, None);
    while !stop.load(Ordering::Relaxed) {
        match one_connection(addr) {
            Ok(()) => {
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                errors += 1;
                first.get_or_insert_with(|| e.to_string());
                // e.g. no ephemeral port free: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    (errors, first)
}

fn one_connection(addr: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&[b'c'; MESSAGE])?;
    let mut response = [0u8; MESSAGE];
    stream.read_exact(&mut response)
}

/// A blocking client connection with bounded reads and writes, Nagle off.
fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}
