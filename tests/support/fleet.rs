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

/// The sessions of a fleet, running.
pub struct Fleet {
    idle: Vec<TcpStream>,
    busy: Vec<JoinHandle<BusyOutcome>>,
    stop: Arc<AtomicBool>,
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
    pub fn start(lab: &Lab, proxy: SocketAddr, idle: usize, busy: usize, every: Duration) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        // Opened side by side: on a far link each takes a few round trips.
        let idle = std::thread::scope(|scope| {
            let opening: Vec<_> = (0..idle)
                .map(|_| {
                    let mut s = super::connect(lab, proxy);
                    scope.spawn(move || {
                        request(&mut s).expect("a new idle session answers");
                        s
                    })
                })
                .collect();
            opening
                .into_iter()
                .map(|t| t.join().expect("opening an idle session"))
                .collect()
        });
        let busy = (0..busy)
            .map(|i| {
                let mut s = super::connect(lab, proxy);
                let stop = stop.clone();
                std::thread::spawn(move || busy_loop(&mut s, i, every, &stop))
            })
            .collect();
        Fleet { idle, busy, stop }
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
