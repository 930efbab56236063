//! A fleet of client sessions through one proxy, as an application's pool
//! holds them: most idle, some doing a 32-byte request/echo every
//! `every`. Every session end is recorded with its time and how the client
//! saw it (RST, EOF, ...), as it happens: one thread polls all the idle
//! sockets, and each busy session has its own thread. With `replace`, a
//! session that died is opened again, so the population stays the same
//! for the whole hold and the count is a rate. At the end every surviving
//! idle session must answer one more request, so a session left hanging
//! counts too, whatever the proxy logged.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use pulsegate::lab::Lab;

/// Sessions opened side by side at most (each thread blocks for a few
/// round trips on a far or lossy link).
const OPEN_BATCH: usize = 100;
/// Tries to open one session before the fleet gives up (a lost SYN on a
/// lossy link can make a proxy's upstream connect time out).
const OPEN_ATTEMPTS: u32 = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Threads that reopen dead idle sessions.
const REOPENERS: usize = 8;
/// How often the idle poller and waiting threads look at the stop flag.
const TICK: Duration = Duration::from_millis(100);
/// The request every session sends: 32 bytes, echoed back.
const LINE: &[u8; 32] = b"pulsegate fleet request 0123456\n";

/// What a fleet is made of.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub idle: usize,
    pub busy: usize,
    /// Pause between a busy session's requests.
    pub every: Duration,
    /// How long one request may take before the session counts as broken.
    pub request_timeout: Duration,
    /// Open a dead session again (idle or busy), keeping the population.
    pub replace: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Idle,
    Busy,
}

/// One session that ended.
#[derive(Debug, Clone)]
pub struct Death {
    pub kind: Kind,
    pub at: Instant,
    /// `RST`, `EOF`, `timeout` (no answer within the request timeout), ...
    pub how: String,
    /// Found only by the final request at the end of the hold.
    pub silent: bool,
}

impl Death {
    /// The client's request timed out: the session hangs, but nobody told
    /// the client anything.
    pub fn timed_out(&self) -> bool {
        self.how == "timeout"
    }
}

/// What became of a fleet.
#[derive(Debug, Clone)]
pub struct FleetReport {
    pub spec: Spec,
    pub deaths: Vec<Death>,
    pub busy_requests: u64,
    /// Sessions opened again after one died.
    pub reopened: u64,
    /// Tries to open a session that failed (at the start or a reopen).
    pub open_failures: u64,
    /// From the first session opened to the end of the hold.
    pub exposure: Duration,
}

impl FleetReport {
    pub fn sessions(&self) -> usize {
        self.spec.idle + self.spec.busy
    }

    pub fn deaths_of(&self, kind: Kind) -> usize {
        self.deaths.iter().filter(|d| d.kind == kind).count()
    }

    /// Session ends per 1,000 sessions per 10 minutes.
    pub fn rate(&self) -> f64 {
        let sessions = self.sessions().max(1) as f64;
        let minutes10 = self.exposure.as_secs_f64().max(1.0) / 600.0;
        self.deaths.len() as f64 * 1000.0 / sessions / minutes10
    }
}

/// The running sessions of one proxy.
pub struct Fleet {
    shared: Arc<Shared>,
    poller: Option<JoinHandle<Vec<TcpStream>>>,
    reopeners: Vec<JoinHandle<()>>,
    busy: Vec<JoinHandle<Option<TcpStream>>>,
    started: Instant,
}

struct Shared {
    proxy: SocketAddr,
    spec: Spec,
    stop: AtomicBool,
    /// Bumped by [`Fleet::kick`]: every busy session sends at once.
    kick: Mutex<u64>,
    kicked: Condvar,
    deaths: Mutex<Vec<Death>>,
    /// Reopened idle sessions, for the poller to pick up.
    fresh: Mutex<Vec<TcpStream>>,
    /// Idle sessions waiting to be reopened.
    to_reopen: Mutex<usize>,
    reopen_wanted: Condvar,
    reopened: AtomicU64,
    open_failures: AtomicU64,
    busy_requests: AtomicU64,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn died(&self, kind: Kind, at: Instant, how: String) {
        lock(&self.deaths).push(Death {
            kind,
            at,
            how,
            silent: false,
        });
    }
}

impl Fleet {
    /// Opens `spec.idle` idle sessions to `proxy` from inside `lab` (each
    /// proves its path with one request, then stays quiet) and starts
    /// watching them. The busy ones start with [`Fleet::start_busy`].
    pub fn start(lab: &Lab, proxy: SocketAddr, spec: Spec) -> Result<Fleet> {
        let shared = Arc::new(Shared {
            proxy,
            spec,
            stop: AtomicBool::new(false),
            kick: Mutex::new(0),
            kicked: Condvar::new(),
            deaths: Mutex::default(),
            fresh: Mutex::default(),
            to_reopen: Mutex::new(0),
            reopen_wanted: Condvar::new(),
            reopened: AtomicU64::new(0),
            open_failures: AtomicU64::new(0),
            busy_requests: AtomicU64::new(0),
        });
        let started = Instant::now();
        let idle = lab.enter(|| open_many(&shared, spec.idle))??;
        let poller = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fleet-poller".into())
                .spawn(move || poll_idle(&shared, idle))
                .context("starting the idle poller")?
        };
        // Threads started by a thread inside the namespace are inside it
        // too, so they can open sessions on their own.
        let reopeners = if spec.replace {
            lab.enter(|| {
                (0..REOPENERS)
                    .map(|_| {
                        let shared = shared.clone();
                        std::thread::Builder::new()
                            .name("fleet-reopen".into())
                            .spawn(move || reopen_idle(&shared))
                    })
                    .collect::<io::Result<Vec<_>>>()
            })??
        } else {
            Vec::new()
        };
        Ok(Fleet {
            shared,
            poller: Some(poller),
            reopeners,
            busy: Vec::new(),
            started,
        })
    }

    /// Opens the busy sessions and starts their request loops.
    pub fn start_busy(&mut self, lab: &Lab) -> Result<()> {
        let shared = &self.shared;
        let busy = lab.enter(|| -> Result<Vec<JoinHandle<Option<TcpStream>>>> {
            let streams = open_many(shared, shared.spec.busy)?;
            streams
                .into_iter()
                .enumerate()
                .map(|(i, stream)| {
                    let shared = shared.clone();
                    std::thread::Builder::new()
                        .name("fleet-busy".into())
                        .spawn(move || busy_loop(&shared, stream, i))
                        .context("starting a busy session")
                })
                .collect()
        })??;
        self.busy = busy;
        Ok(())
    }

    /// Every busy session sends its next request now (e.g. right after a
    /// fault), not at its next turn.
    pub fn kick(&self) {
        *lock(&self.shared.kick) += 1;
        self.shared.kicked.notify_all();
    }

    /// The session ends so far.
    pub fn deaths(&self) -> Vec<Death> {
        lock(&self.shared.deaths).clone()
    }

    /// Stops every loop and keeps the surviving sessions open (a proxy
    /// logs nothing about them yet), so its log can be read as the hold
    /// left it.
    pub fn stop(mut self) -> Result<Stopped> {
        let exposure = self.started.elapsed();
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.kicked.notify_all();
        self.shared.reopen_wanted.notify_all();
        let mut busy = Vec::new();
        for handle in self.busy.drain(..) {
            let stream = handle
                .join()
                .map_err(|_| anyhow!("a busy session thread panicked"))?;
            busy.extend(stream);
        }
        for handle in self.reopeners.drain(..) {
            handle
                .join()
                .map_err(|_| anyhow!("a reopening thread panicked"))?;
        }
        let mut idle = self
            .poller
            .take()
            .context("the poller was already joined")?
            .join()
            .map_err(|_| anyhow!("the idle poller panicked"))?;
        // Reopened after the poller's last look.
        idle.append(&mut lock(&self.shared.fresh));
        let report = FleetReport {
            spec: self.shared.spec,
            deaths: self.deaths(),
            busy_requests: self.shared.busy_requests.load(Ordering::Relaxed),
            reopened: self.shared.reopened.load(Ordering::Relaxed),
            open_failures: self.shared.open_failures.load(Ordering::Relaxed),
            exposure,
        };
        Ok(Stopped { report, idle, busy })
    }
}

/// A stopped fleet whose surviving sessions are still open.
pub struct Stopped {
    report: FleetReport,
    idle: Vec<TcpStream>,
    busy: Vec<TcpStream>,
}

impl Stopped {
    /// What became of the fleet; with `final_check`, each surviving idle
    /// session must first answer one request (a failure is a silent
    /// death). The sessions close when this returns.
    pub fn report(self, final_check: bool) -> FleetReport {
        let mut report = self.report;
        if final_check {
            report
                .deaths
                .extend(final_requests(self.idle, report.spec.request_timeout));
        }
        drop(self.busy);
        report
    }
}

impl Drop for Fleet {
    /// A fleet dropped without [`Fleet::stop`] (an error elsewhere) still
    /// stops its threads; they end within a request timeout.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.kicked.notify_all();
        self.shared.reopen_wanted.notify_all();
    }
}

/// Opens `n` sessions, `OPEN_BATCH` at a time. Runs inside the namespace.
fn open_many(shared: &Shared, n: usize) -> Result<Vec<TcpStream>> {
    let mut streams = Vec::with_capacity(n);
    while streams.len() < n {
        let batch = OPEN_BATCH.min(n - streams.len());
        let opened: Vec<Result<TcpStream>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..batch)
                .map(|_| scope.spawn(|| open_with_retries(shared)))
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(anyhow!("an opening thread panicked")))
                })
                .collect()
        });
        for stream in opened {
            streams.push(stream?);
        }
    }
    Ok(streams)
}

fn open_with_retries(shared: &Shared) -> Result<TcpStream> {
    let mut last = None;
    for _ in 0..OPEN_ATTEMPTS {
        match open(shared.proxy, shared.spec.request_timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                shared.open_failures.fetch_add(1, Ordering::Relaxed);
                last = Some(e);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    let e = last.map_or("no attempt".into(), |e| e.to_string());
    Err(anyhow!(
        "cannot open a session to {} in {OPEN_ATTEMPTS} tries: {e}",
        shared.proxy
    ))
}

/// Connects and proves the path with one request.
fn open(proxy: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&proxy, CONNECT_TIMEOUT)?;
    request(&mut stream, timeout)?;
    Ok(stream)
}

/// One 32-byte request and its echo, within `timeout`.
pub fn request(s: &mut TcpStream, timeout: Duration) -> io::Result<()> {
    s.set_read_timeout(Some(timeout))?;
    s.write_all(LINE)?;
    let mut reply = [0u8; 32];
    s.read_exact(&mut reply)?;
    if &reply != LINE {
        return Err(io::Error::other("the echo differs from the request"));
    }
    Ok(())
}

/// How the client saw its session end.
fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionReset => "RST".into(),
        io::ErrorKind::UnexpectedEof => "EOF".into(),
        io::ErrorKind::BrokenPipe => "EPIPE".into(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".into(),
        _ => e.to_string(),
    }
}

/// Polls every idle session for an end (readable: EOF, RST or, wrongly,
/// data) until the fleet stops; returns the survivors.
fn poll_idle(shared: &Shared, mut idle: Vec<TcpStream>) -> Vec<TcpStream> {
    let events = libc::POLLIN | libc::POLLRDHUP;
    while !shared.stopped() {
        idle.append(&mut lock(&shared.fresh));
        let mut fds: Vec<libc::pollfd> = idle
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a live, correctly sized array of pollfd whose
        // descriptors stay open (owned by `idle`) during the call.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                TICK.as_millis() as i32,
            )
        };
        if ready <= 0 {
            continue; // timeout or EINTR
        }
        let now = Instant::now();
        let ended: Vec<(usize, String)> = fds
            .iter()
            .enumerate()
            .filter(|(_, fd)| fd.revents != 0)
            .filter_map(|(i, _)| ended(&idle[i]).map(|how| (i, how)))
            .collect();
        // Highest index first, so swap_remove moves only survivors.
        for (i, how) in ended.into_iter().rev() {
            drop(idle.swap_remove(i));
            shared.died(Kind::Idle, now, how);
            if shared.spec.replace {
                *lock(&shared.to_reopen) += 1;
                shared.reopen_wanted.notify_one();
            }
        }
    }
    idle
}

/// How a readable idle session ended, or `None` if it did not.
fn ended(stream: &TcpStream) -> Option<String> {
    let mut buf = [0u8; 64];
    // SAFETY: recv into a local buffer of the given length on an open fd.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Some("EOF".into()),
        n if n > 0 => Some(format!("{n} unexpected bytes")),
        _ => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
                _ => Some(describe(&e)),
            }
        }
    }
}

/// Reopens idle sessions as the poller asks, until the fleet stops.
fn reopen_idle(shared: &Shared) {
    loop {
        {
            let mut wanted = lock(&shared.to_reopen);
            while *wanted == 0 && !shared.stopped() {
                wanted = shared
                    .reopen_wanted
                    .wait_timeout(wanted, TICK)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if shared.stopped() {
                return;
            }
            *wanted -= 1;
        }
        if let Some(stream) = reopen(shared) {
            lock(&shared.fresh).push(stream);
        }
    }
}

/// Opens a session again, retrying each second until it works or the
/// fleet stops.
fn reopen(shared: &Shared) -> Option<TcpStream> {
    while !shared.stopped() {
        match open(shared.proxy, shared.spec.request_timeout) {
            Ok(stream) => {
                shared.reopened.fetch_add(1, Ordering::Relaxed);
                return Some(stream);
            }
            Err(_) => {
                shared.open_failures.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    None
}

/// A busy session: a request every `every` (or at once when kicked) until
/// the fleet stops; a failure is recorded, then the session is reopened
/// (with `replace`) or the loop ends. Returns the session if it lives.
fn busy_loop(shared: &Shared, stream: TcpStream, i: usize) -> Option<TcpStream> {
    let every = shared.spec.every;
    let mut stream = Some(stream);
    let mut seen_kick = *lock(&shared.kick);
    // Spread the sessions over the period.
    std::thread::sleep(every * (i as u32 % 10) / 10);
    while !shared.stopped() {
        match stream.as_mut() {
            Some(s) => match request(s, shared.spec.request_timeout) {
                Ok(()) => {
                    shared.busy_requests.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    shared.died(Kind::Busy, Instant::now(), describe(&e));
                    stream = None;
                    if !shared.spec.replace {
                        return None;
                    }
                }
            },
            None => stream = reopen(shared),
        }
        let kick = lock(&shared.kick);
        let kick = shared
            .kicked
            .wait_timeout_while(kick, every, |k| *k == seen_kick && !shared.stopped())
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        seen_kick = *kick;
    }
    stream
}

/// One request on each surviving idle session, side by side; the ones
/// that fail are silent deaths.
fn final_requests(idle: Vec<TcpStream>, timeout: Duration) -> Vec<Death> {
    let mut deaths = Vec::new();
    let mut idle = idle;
    while !idle.is_empty() {
        let batch: Vec<TcpStream> = idle.drain(..idle.len().min(OPEN_BATCH * 2)).collect();
        let failed: Vec<Death> = std::thread::scope(|scope| {
            let threads: Vec<_> = batch
                .into_iter()
                .map(|mut s| scope.spawn(move || request(&mut s, timeout)))
                .collect();
            threads
                .into_iter()
                .filter_map(|t| match t.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(describe(&e)),
                    Err(_) => Some("final request thread panicked".into()),
                })
                .map(|how| Death {
                    kind: Kind::Idle,
                    at: Instant::now(),
                    how,
                    silent: true,
                })
                .collect()
        });
        deaths.extend(failed);
    }
    deaths
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
