//! A fleet of client sessions through a proxy, as an application's pool
//! holds them: most idle, some doing request/response all along. At the
//! end every session is asked to prove it is still alive, so a session
//! that was evicted (reset, closed) is counted, whatever the proxy logged.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pulsegate::lab::Lab;

/// How long one request may take on an impaired link before the session
/// counts as broken (far above any retransmission a live link needs).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How many times a session is opened before the fleet gives up on it.
const OPEN_TRIES: usize = 3;

/// The sessions of a fleet, running.
pub struct Fleet {
    idle: Vec<TcpStream>,
    busy: Vec<JoinHandle<BusyOutcome>>,
    stop: Arc<AtomicBool>,
    failed_opens: Vec<io::Error>,
}

/// What a busy session saw.
#[derive(Debug)]
pub struct BusyOutcome {
    pub requests: u64,
    /// The error that ended it, and when.
    pub failure: Option<(io::Error, Instant)>,
}

/// What became of the fleet.
#[derive(Debug)]
pub struct FleetReport {
    pub idle: usize,
    /// Idle sessions that failed their final request, with the error.
    pub idle_dead: Vec<(usize, io::Error)>,
    pub busy: usize,
    pub busy_requests: u64,
    /// Busy sessions that failed, with the error and when.
    pub busy_dead: Vec<(usize, io::Error, Instant)>,
    /// Sessions whose first request failed and that were opened again
    /// (see [`Fleet::start`]).
    pub failed_opens: usize,
}

impl FleetReport {
    pub fn dead(&self) -> usize {
        self.idle_dead.len() + self.busy_dead.len()
    }
}

impl Fleet {
    /// Opens `idle` sessions (each proves its path with one request, then
    /// stays quiet) and `busy` ones (a 32-byte request, its echo, then a
    /// pause of `every`, until [`Fleet::finish`]), from inside `lab`.
    ///
    /// A session whose first request fails never carried anything: on a
    /// lossy link the proxy's own connect to the backend can lose its SYN
    /// until `connect_timeout`, and the proxy then resets the client. It is
    /// opened again, as an application's pool would, up to [`OPEN_TRIES`]
    /// times; the failures are kept ([`Fleet::failed_opens`]) for the test
    /// to hold against what the proxy logged.
    pub fn start(lab: &Lab, proxy: SocketAddr, idle: usize, busy: usize, every: Duration) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        let (mut sessions, failed_opens) = open_proven(lab, proxy, idle + busy);
        let busy_sessions = sessions.split_off(idle);
        let busy = busy_sessions
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                let stop = stop.clone();
                std::thread::spawn(move || busy_loop(&mut s, i, every, &stop))
            })
            .collect();
        Fleet {
            idle: sessions,
            busy,
            stop,
            failed_opens,
        }
    }

    /// The first requests that failed while the fleet opened (each such
    /// session was opened again).
    pub fn failed_opens(&self) -> &[io::Error] {
        &self.failed_opens
    }

    /// Stops the busy sessions, then sends one request on every idle one.
    pub fn finish(self) -> FleetReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = FleetReport {
            idle: self.idle.len(),
            idle_dead: Vec::new(),
            busy: self.busy.len(),
            busy_requests: 0,
            busy_dead: Vec::new(),
            failed_opens: self.failed_opens.len(),
        };
        for (i, handle) in self.busy.into_iter().enumerate() {
            let outcome = handle.join().expect("busy session thread");
            report.busy_requests += outcome.requests;
            if let Some((e, at)) = outcome.failure {
                report.busy_dead.push((i, e, at));
            }
        }
        let asked: Vec<_> = self
            .idle
            .into_iter()
            .map(|mut s| std::thread::spawn(move || request(&mut s)))
            .collect();
        for (i, t) in asked.into_iter().enumerate() {
            if let Err(e) = t.join().expect("final request thread") {
                report.idle_dead.push((i, e));
            }
        }
        report
    }

    /// The idle sessions, e.g. to watch them for a reset.
    pub fn idle_sessions(&self) -> &[TcpStream] {
        &self.idle
    }
}

/// Opens `n` sessions through `proxy` from inside `lab`, each proven by
/// one request; returns them and the first requests that failed.
fn open_proven(lab: &Lab, proxy: SocketAddr, n: usize) -> (Vec<TcpStream>, Vec<io::Error>) {
    let mut open = Vec::with_capacity(n);
    let mut failed = Vec::new();
    let mut wanted = n;
    for _ in 0..OPEN_TRIES {
        if wanted == 0 {
            break;
        }
        // Side by side: on a far link each takes a few round trips.
        let tried: Vec<io::Result<TcpStream>> = std::thread::scope(|scope| {
            let opening: Vec<_> = (0..wanted)
                .map(|_| {
                    let mut s = super::connect(lab, proxy);
                    scope.spawn(move || request(&mut s).map(|()| s))
                })
                .collect();
            opening
                .into_iter()
                .map(|t| t.join().expect("opening a session"))
                .collect()
        });
        for result in tried {
            match result {
                Ok(s) => open.push(s),
                Err(e) => failed.push(e),
            }
        }
        wanted = n - open.len();
    }
    assert_eq!(
        open.len(),
        n,
        "{wanted} of {n} sessions failed their first request {OPEN_TRIES} times: {failed:?}"
    );
    (open, failed)
}

fn busy_loop(s: &mut TcpStream, i: usize, every: Duration, stop: &AtomicBool) -> BusyOutcome {
    let mut requests = 0;
    // Spread the sessions over the period.
    std::thread::sleep(every * (i as u32 % 10) / 10);
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = request(s) {
            return BusyOutcome {
                requests,
                failure: Some((e, Instant::now())),
            };
        }
        requests += 1;
        std::thread::sleep(every);
    }
    BusyOutcome {
        requests,
        failure: None,
    }
}

/// One 32-byte request and its echo.
pub fn request(s: &mut TcpStream) -> io::Result<()> {
    const LINE: &[u8; 32] = b"pulsegate fleet request 0123456\n";
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.write_all(LINE)?;
    let mut reply = [0u8; 32];
    s.read_exact(&mut reply)?;
    if &reply != LINE {
        return Err(io::Error::other("the echo differs from the request"));
    }
    Ok(())
}
