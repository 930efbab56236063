//! `pulsegate demo`: the problem and the fix in one command.
//!
//! In a private network namespace ([`crate::lab`]) an echo backend process
//! serves two idle clients, one directly and one through pulsegate. The
//! backend then vanishes: its port is blackholed (iptables DROP) and the
//! process SIGKILLed, so its FIN never arrives. A live timeline shows the
//! direct client hanging, ESTABLISHED, while pulsegate resets the proxied
//! one within seconds and logs why.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::lab::{
    read_evictions, EchoBackend, EvictionLine, Lab, LabError, LabProcess, ProxyConfig,
};

const BACKEND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7000);
const PROXY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 6432);
/// How long the timeline runs after the fault.
const TIMELINE: Duration = Duration::from_secs(12);
const STEP: Duration = Duration::from_millis(500);
/// Bounded waits for set-up steps that take milliseconds.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Exit code when the lab cannot run here (missing privileges or tools).
const EXIT_UNAVAILABLE: u8 = 3;

/// Runs the demo, printing as it goes. The lab (namespace, processes) is
/// cleaned up on every path, including Ctrl-C.
pub fn run() -> anyhow::Result<()> {
    let lab = Lab::new("demo")?;
    let interrupted = watch_ctrl_c();
    let exe = std::env::current_exe().context("cannot locate the pulsegate binary")?;
    println!("pulsegate demo: in network namespace {}", lab.name());

    let echo = EchoBackend::new(&exe, Duration::from_secs(120));
    let backend = lab.start_echo_backend(&echo, BACKEND)?;
    let config = ProxyConfig::new(PROXY, BACKEND);
    let proxy = lab.start_pulsegate(&exe, &config)?;
    println!(
        "  echo backend on {BACKEND} (pid {}); pulsegate on {PROXY} (pid {}), \
         probe_interval 1s, dead_after 1s",
        backend.pid(),
        proxy.pid()
    );
    let direct = connect_and_greet(&lab, BACKEND).context("direct client")?;
    let proxied = connect_and_greet(&lab, PROXY).context("proxied client")?;
    println!(
        "  direct client  {} -> {BACKEND}: sent \"hello\", got it back",
        direct.local_addr()?
    );
    println!(
        "  proxied client {} -> {PROXY}: sent \"hello\", got it back",
        proxied.local_addr()?
    );
    println!("  both clients now sit idle, like pooled connections");
    pause(Duration::from_millis(1500), &interrupted)?;

    lab.drop_port(BACKEND.port())?;
    let fault = Instant::now();
    backend.kill()?;
    println!(
        "\nt=+0.0s  backend vanishes: port {} blackholed (DROP both ways), backend SIGKILLed",
        BACKEND.port()
    );
    let reset = watch_for_reset(&proxied)?;
    let outcome = timeline(&lab, &proxy, &direct, fault, &reset, &interrupted)?;
    summary(&outcome, fault.elapsed());
    match outcome.proxied_reset {
        Some(_) => Ok(()),
        None => bail!(
            "pulsegate did not reset the proxied client within {}s; its log:\n{}",
            TIMELINE.as_secs(),
            proxy.stderr()
        ),
    }
}

/// 3 when the lab is unavailable (privileges, tools), else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let unavailable = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<LabError>(),
            Some(LabError::Unavailable(_))
        )
    });
    if unavailable {
        EXIT_UNAVAILABLE
    } else {
        1
    }
}

/// A default client socket in the lab that has exchanged one line.
fn connect_and_greet(lab: &Lab, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut stream = lab
        .enter(|| TcpStream::connect_timeout(&addr, SETUP_TIMEOUT))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(SETUP_TIMEOUT))?;
    stream.write_all(b"hello\n")?;
    let mut reply = [0u8; 6];
    stream.read_exact(&mut reply).context("no echo")?;
    Ok(stream)
}

/// A blocking read on a clone of the proxied client, as an application
/// waiting for its next response would do; reports how and when it ended.
fn watch_for_reset(
    client: &TcpStream,
) -> anyhow::Result<mpsc::Receiver<(Instant, io::Result<usize>)>> {
    let mut reader = client.try_clone()?;
    reader.set_read_timeout(Some(TIMELINE + Duration::from_secs(2)))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let result = reader.read(&mut buf);
        let _ = tx.send((Instant::now(), result));
    });
    Ok(rx)
}

struct Outcome {
    /// When the proxied client saw its connection reset, after the fault.
    proxied_reset: Option<Duration>,
    eviction: Option<EvictionLine>,
}

/// Prints one line every [`STEP`] for [`TIMELINE`].
fn timeline(
    lab: &Lab,
    proxy: &LabProcess,
    direct: &TcpStream,
    fault: Instant,
    reset: &mpsc::Receiver<(Instant, io::Result<usize>)>,
    interrupted: &AtomicBool,
) -> anyhow::Result<Outcome> {
    let direct_local = direct.local_addr()?;
    direct.set_nonblocking(true)?;
    let mut outcome = Outcome {
        proxied_reset: None,
        eviction: None,
    };
    let mut step = 1;
    while STEP * step <= TIMELINE {
        pause(
            (fault + STEP * step).saturating_duration_since(Instant::now()),
            interrupted,
        )?;
        let proxied = match (outcome.proxied_reset, reset.try_recv()) {
            (None, Ok((at, result))) => {
                let after = at.saturating_duration_since(fault);
                outcome.proxied_reset = Some(after);
                outcome.eviction = wait_eviction(proxy);
                describe_end(&result, after, outcome.eviction.as_ref())
            }
            (Some(after), _) => format!("closed (reset at +{:.1}s)", after.as_secs_f64()),
            (None, Err(_)) => "ESTABLISHED, read() blocked".to_string(),
        };
        let direct_state = match lab.tcp_state(direct_local)? {
            Some(state) => state.to_string(),
            None => "gone".to_string(),
        };
        let at = format!("t=+{:.1}s", (STEP * step).as_secs_f64());
        println!(
            "{at:<9} direct: {direct_state}, {} | proxied: {proxied}",
            peek_direct(direct)
        );
        step += 1;
    }
    Ok(outcome)
}

/// What a non-blocking peek on the direct client shows.
fn peek_direct(direct: &TcpStream) -> &'static str {
    let mut byte = [0u8; 1];
    match direct.peek(&mut byte) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => "nothing to read, no error",
        Ok(0) => "EOF",
        Ok(_) => "data",
        Err(_) => "error",
    }
}

fn describe_end(
    result: &io::Result<usize>,
    after: Duration,
    eviction: Option<&EvictionLine>,
) -> String {
    let how = match result {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
            "RESET, read() -> ECONNRESET".to_string()
        }
        Err(e) => format!("error ({e})"),
        Ok(0) => "closed (EOF)".to_string(),
        Ok(_) => "unexpected data".to_string(),
    };
    let why = eviction
        .map(|e| format!("; pulsegate: {} ({} leg)", e.reason, e.dead_leg))
        .unwrap_or_default();
    format!("{how} at +{:.1}s{why}", after.as_secs_f64())
}

/// pulsegate logs the eviction before it resets the client; allow a moment.
fn wait_eviction(proxy: &LabProcess) -> Option<EvictionLine> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(first) = read_evictions(proxy.stderr_path()).into_iter().next() {
            return Some(first);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn summary(outcome: &Outcome, elapsed: Duration) {
    println!("\nSummary");
    println!(
        "  direct client:  still ESTABLISHED {:.1} s after its backend vanished, with nothing to \
         read and no error.\n                  Idle, it would hang forever (no keepalive); with a \
         request in flight, ~15 min\n                  of retransmits (tcp_retries2 = 15).",
        elapsed.as_secs_f64()
    );
    match (outcome.proxied_reset, &outcome.eviction) {
        (Some(after), Some(e)) => println!(
            "  proxied client: pulsegate reset it after {:.1} s, reason {} (dead leg: {}); its pool \
             would reconnect at once.",
            after.as_secs_f64(),
            e.reason,
            e.dead_leg
        ),
        (Some(after), None) => println!(
            "  proxied client: reset after {:.1} s (no eviction event found in pulsegate's log)",
            after.as_secs_f64()
        ),
        (None, _) => println!("  proxied client: NOT reset within the timeline"),
    }
    if let Some(e) = &outcome.eviction {
        println!("\npulsegate's eviction event (its JSON log):\n  {}", e.raw);
    }
}

/// Sleeps, but gives up as soon as Ctrl-C was pressed, so the lab is
/// dropped (and cleaned up) on the way out.
fn pause(duration: Duration, interrupted: &AtomicBool) -> anyhow::Result<()> {
    let until = Instant::now() + duration;
    loop {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted; the lab was cleaned up");
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Catches SIGINT on a helper thread instead of dying at once, so that
/// `Lab`'s Drop runs. Best effort: without it, a later lab removes the
/// leftovers.
fn watch_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    if let Ok(runtime) = runtime {
        std::thread::spawn(move || {
            runtime.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    set.store(true, Ordering::Relaxed);
                }
            })
        });
    }
    flag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_privileges_exit_with_3_even_under_context() {
        let unavailable = anyhow::Error::new(LabError::Unavailable("needs root".into()))
            .context("setting up the demo");
        assert_eq!(exit_code(&unavailable), EXIT_UNAVAILABLE);
        let other = anyhow::Error::new(LabError::Timeout {
            what: "nothing listens".into(),
            waited: SETUP_TIMEOUT,
        });
        assert_eq!(exit_code(&other), 1);
    }
}
