//! A network emulator at kernel level: two namespaces joined by a TUN
//! device in each and a forwarder that carries every IP packet across,
//! delaying, dropping, reordering or cutting it on the way.
//!
//! This kernel has no `netem` qdisc, and a user-space TCP proxy (Toxiproxy)
//! cannot make a peer's kernel see loss or delay: its own TCP stack hides
//! both. Here the packets themselves are held back or thrown away, so both
//! TCP stacks see what a real lossy or far link does to them —
//! retransmissions, RTO backoff, unanswered keepalive probes, SYN retries.
//!
//! ```text
//!  near namespace                 forwarder (threads of this       far namespace
//!  (proxy, clients)                process, one per direction)     (backends)
//!  10.200.0.1 pgl0 ──read──► delay · jitter · loss · burst ──write──► pgl0 10.200.0.2
//!                  ◄─write── · reorder · cut · flow drop ◄──read───
//! ```
//!
//! Each direction has its own [`Impairment`], changeable while traffic
//! flows ([`Link::set`]); one 4-tuple can be dropped silently, as a NAT that
//! forgot a flow would ([`Link::drop_flow`]), and so can everything of one
//! endpoint, one way or both ([`Link::drop_endpoint`]). [`Link::counters`] says what
//! was forwarded and dropped, so an experiment can prove its fault was real.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use rand::Rng;
use tun_rs::{DeviceBuilder, SyncDevice};

use super::{Lab, LabError};

/// The near side's address on the link (where the proxy connects from).
pub const NEAR_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The far side's address on the link (where backends listen).
pub const FAR_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// A second far address on the same link, for a second host (a failover
/// that moves a name from one address to another).
pub const FAR_SECOND_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
/// The TUN device's name in both namespaces.
const DEVICE: &str = "pgl0";
/// Packets held per direction at most; beyond it the link tail-drops (and
/// counts it), as a router's full queue would.
const QUEUE_MAX: usize = 100_000;
/// Longest sleep of a forwarder thread with nothing queued: how soon it
/// notices [`Link`] being dropped.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// A kernel's transmit queue of this many packets absorbs the bursts of
/// thousands of keepalive probes leaving in one timer tick.
const TX_QUEUE_LEN: u32 = 10_000;

/// One direction of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Near → far (towards the backends).
    ToFar,
    /// Far → near (towards the proxy).
    ToNear,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::ToFar, Direction::ToNear];

    fn index(self) -> usize {
        match self {
            Direction::ToFar => 0,
            Direction::ToNear => 1,
        }
    }
}

/// Bursty loss after Gilbert and Elliott: the link flips between a good
/// state (loss as [`Impairment::loss`] says) and a bad one (every packet
/// lost), with these per-packet probabilities of changing state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    /// Good → bad.
    pub enter: f64,
    /// Bad → good (1 / mean burst length in packets).
    pub leave: f64,
}

/// What one direction of the link does to the packets it carries.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// Added to every packet.
    pub delay: Duration,
    /// Each packet's delay varies uniformly by ± this much.
    pub jitter: Duration,
    /// Probability (0 to 1) that a packet is dropped at random.
    pub loss: f64,
    /// Loss in bursts on top of `loss`.
    pub burst: Option<Burst>,
    /// Let jitter reorder packets; otherwise a packet never overtakes the
    /// one before it (a single path with a varying queue).
    pub reorder: bool,
    /// Drop everything: a partition.
    pub cut: bool,
}

impl Impairment {
    /// A perfect link.
    pub fn none() -> Self {
        Impairment::default()
    }

    /// Random loss of `fraction` (0.02 = 2 %).
    pub fn loss(fraction: f64) -> Self {
        Impairment {
            loss: fraction,
            ..Impairment::default()
        }
    }

    /// A fixed delay with jitter.
    pub fn delay(delay: Duration, jitter: Duration) -> Self {
        Impairment {
            delay,
            jitter,
            ..Impairment::default()
        }
    }

    /// Everything dropped.
    pub fn cut() -> Self {
        Impairment {
            cut: true,
            ..Impairment::default()
        }
    }

    /// This impairment with random loss of `fraction` too.
    pub fn with_loss(self, fraction: f64) -> Self {
        Impairment {
            loss: fraction,
            ..self
        }
    }
}

/// What one direction has carried so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub forwarded: u64,
    /// Dropped by loss, burst, cut or a dropped flow.
    pub dropped: u64,
    /// Dropped because the queue was full.
    pub overflowed: u64,
}

/// Two TUN devices and the forwarder between them. Dropping it stops the
/// forwarder and closes the devices (the kernel then removes them).
pub struct Link {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    impairments: [Mutex<Impairment>; 2],
    /// Flows dropped in both directions, as (one end, other end).
    dropped_flows: Mutex<Vec<(SocketAddrV4, SocketAddrV4)>>,
    /// Endpoints whose packets are dropped, per direction (indexed by
    /// [`Direction::index`]).
    dropped_endpoints: Mutex<Vec<(SocketAddrV4, [bool; 2])>>,
    forwarded: [AtomicU64; 2],
    dropped: [AtomicU64; 2],
    overflowed: [AtomicU64; 2],
}

impl Link {
    /// Creates `pgl0` in `near` ([`NEAR_ADDR`]) and in `far` ([`FAR_ADDR`]),
    /// each with a route to the other's address through it, and starts the
    /// forwarder with a perfect link.
    pub fn new(near: &Lab, far: &Lab) -> Result<Link, LabError> {
        let near_dev = Arc::new(create_device(near, NEAR_ADDR, FAR_ADDR)?);
        let far_dev = Arc::new(create_device(far, FAR_ADDR, NEAR_ADDR)?);
        let second = format!("{FAR_SECOND_ADDR}/32");
        far.ip(&["addr", "add", &second, "dev", DEVICE])?;
        near.ip(&["route", "add", &second, "dev", DEVICE])?;
        let shared = Arc::new(Shared::default());
        let mut threads = Vec::new();
        for (direction, from, to) in [
            (Direction::ToFar, near_dev.clone(), far_dev.clone()),
            (Direction::ToNear, far_dev, near_dev),
        ] {
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("lab-link-{direction:?}"))
                .spawn(move || Forwarder::new(direction, shared).run(&from, &to))
                .map_err(LabError::io("cannot start the link forwarder thread"))?;
            threads.push(thread);
        }
        Ok(Link { shared, threads })
    }

    /// Sets what `direction` does to packets from now on (packets already
    /// queued keep the delay they were given).
    pub fn set(&self, direction: Direction, impairment: Impairment) {
        *lock(&self.shared.impairments[direction.index()]) = impairment;
    }

    /// Sets both directions alike.
    pub fn set_both(&self, impairment: Impairment) {
        for d in Direction::BOTH {
            self.set(d, impairment);
        }
    }

    /// What `direction` does now.
    pub fn impairment(&self, direction: Direction) -> Impairment {
        *lock(&self.shared.impairments[direction.index()])
    }

    /// Silently drops every packet of the TCP flow between `a` and `b`,
    /// both ways, while the rest of the link carries on: a NAT or
    /// firewall that forgot one connection.
    pub fn drop_flow(&self, a: SocketAddr, b: SocketAddr) -> Result<(), LabError> {
        let pair = (v4(a)?, v4(b)?);
        lock(&self.shared.dropped_flows).push(pair);
        Ok(())
    }

    /// Carries the flows given to [`Link::drop_flow`] again.
    pub fn restore_flows(&self) {
        lock(&self.shared.dropped_flows).clear();
    }

    /// Silently drops every TCP packet that `directions` carry from or to
    /// `endpoint` (an address and port, e.g. one backend), while the rest
    /// of the link carries on: one server of a host partitioned away
    /// (both directions), or only what is sent to it
    /// (`[Direction::ToFar]` for a far server: a one-way partition).
    pub fn drop_endpoint(
        &self,
        endpoint: SocketAddr,
        directions: &[Direction],
    ) -> Result<(), LabError> {
        let mut which = [false; 2];
        for d in directions {
            which[d.index()] = true;
        }
        lock(&self.shared.dropped_endpoints).push((v4(endpoint)?, which));
        Ok(())
    }

    /// Carries the endpoints given to [`Link::drop_endpoint`] again.
    pub fn restore_endpoints(&self) {
        lock(&self.shared.dropped_endpoints).clear();
    }

    /// What `direction` has carried and dropped so far.
    pub fn counters(&self, direction: Direction) -> Counters {
        let i = direction.index();
        Counters {
            forwarded: self.shared.forwarded[i].load(Ordering::Relaxed),
            dropped: self.shared.dropped[i].load(Ordering::Relaxed),
            overflowed: self.shared.overflowed[i].load(Ordering::Relaxed),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn v4(addr: SocketAddr) -> Result<SocketAddrV4, LabError> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => Err(LabError::Io {
            what: format!("cannot drop flow of {a}"),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the link carries IPv4 only"),
        }),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Creates the TUN device inside `lab`'s namespace (a device belongs to
/// the namespace of the thread that creates it) and configures it as a
/// point-to-point link from `local` to `peer`.
fn create_device(lab: &Lab, local: Ipv4Addr, peer: Ipv4Addr) -> Result<SyncDevice, LabError> {
    let device = lab
        .enter(|| {
            DeviceBuilder::new()
                .name(DEVICE)
                .mtu(1500)
                .tx_queue_len(TX_QUEUE_LEN)
                .build_sync()
        })?
        .map_err(|e| {
            LabError::Unavailable(format!(
                "cannot create TUN device {DEVICE} in network namespace {} ({e}); the \
                 emulated link needs /dev/net/tun (the `tun` kernel module; \
                 `modprobe tun`, or `mkdir -p /dev/net && mknod /dev/net/tun c 10 200`)",
                lab.name()
            ))
        })?;
    device
        .set_nonblocking(true)
        .map_err(LabError::io("cannot make the TUN device non-blocking"))?;
    let (local, peer) = (local.to_string(), peer.to_string());
    lab.ip(&["addr", "add", &local, "peer", &peer, "dev", DEVICE])?;
    lab.ip(&["link", "set", DEVICE, "up"])?;
    Ok(device)
}

/// A packet waiting for its time.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    due: Instant,
    /// Arrival order: ties leave in the order they came.
    seq: u64,
    packet: Vec<u8>,
}

/// One direction's forwarding loop.
struct Forwarder {
    direction: Direction,
    shared: Arc<Shared>,
    queue: BinaryHeap<Reverse<Held>>,
    seq: u64,
    /// When the last queued packet leaves (in-order mode never schedules
    /// one before it).
    last_due: Instant,
    /// Gilbert–Elliott state: in a loss burst.
    in_burst: bool,
}

impl Forwarder {
    fn new(direction: Direction, shared: Arc<Shared>) -> Self {
        Forwarder {
            direction,
            shared,
            queue: BinaryHeap::new(),
            seq: 0,
            last_due: Instant::now(),
            in_burst: false,
        }
    }

    fn run(mut self, from: &SyncDevice, to: &SyncDevice) {
        let mut buf = vec![0u8; 65_536];
        let mut rng = rand::rng();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let wait = self
                .queue
                .peek()
                .map_or(IDLE_POLL, |Reverse(h)| {
                    h.due.saturating_duration_since(Instant::now())
                })
                .min(IDLE_POLL);
            let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
            // Round up: waking a millisecond early would only spin.
            let ms = wait.as_micros().div_ceil(1000) as u16;
            let _ = nix::poll::poll(&mut fds, PollTimeout::from(ms));
            let impairment = *lock(&self.shared.impairments[self.direction.index()]);
            loop {
                match from.recv(&mut buf) {
                    Ok(n) => self.admit(&buf[..n], &impairment, &mut rng),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // WouldBlock, or the device went away: send what is due.
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            while self.queue.peek().is_some_and(|Reverse(h)| h.due <= now) {
                if let Some(Reverse(held)) = self.queue.pop() {
                    // A full transmit queue on the far side drops it, as a
                    // real link would.
                    let _ = to.send(&held.packet);
                    self.shared.forwarded[self.direction.index()].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Drops `packet` or queues it with its delay.
    fn admit(&mut self, packet: &[u8], imp: &Impairment, rng: &mut impl Rng) {
        let i = self.direction.index();
        if self.lose(imp, rng) || self.flow_dropped(packet) || self.endpoint_dropped(packet) {
            self.shared.dropped[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.queue.len() >= QUEUE_MAX {
            self.shared.overflowed[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut delay = imp.delay;
        if !imp.jitter.is_zero() {
            let spread = imp.jitter.as_secs_f64();
            let offset = rng.random_range(-spread..=spread);
            delay = Duration::from_secs_f64((delay.as_secs_f64() + offset).max(0.0));
        }
        let mut due = Instant::now() + delay;
        if !imp.reorder {
            due = due.max(self.last_due);
        }
        self.last_due = self.last_due.max(due);
        self.seq += 1;
        self.queue.push(Reverse(Held {
            due,
            seq: self.seq,
            packet: packet.to_vec(),
        }));
    }

    fn lose(&mut self, imp: &Impairment, rng: &mut impl Rng) -> bool {
        if imp.cut {
            return true;
        }
        if let Some(burst) = imp.burst {
            let flip = if self.in_burst {
                burst.leave
            } else {
                burst.enter
            };
            if rng.random_bool(flip.clamp(0.0, 1.0)) {
                self.in_burst = !self.in_burst;
            }
            if self.in_burst {
                return true;
            }
        }
        imp.loss > 0.0 && rng.random_bool(imp.loss.clamp(0.0, 1.0))
    }

    fn flow_dropped(&self, packet: &[u8]) -> bool {
        let flows = lock(&self.shared.dropped_flows);
        if flows.is_empty() {
            return false;
        }
        let Some((src, dst)) = tcp_endpoints(packet) else {
            return false;
        };
        flows
            .iter()
            .any(|&(a, b)| (a, b) == (src, dst) || (b, a) == (src, dst))
    }
}

impl Forwarder {
    fn endpoint_dropped(&self, packet: &[u8]) -> bool {
        let endpoints = lock(&self.shared.dropped_endpoints);
        if endpoints.is_empty() {
            return false;
        }
        let Some((src, dst)) = tcp_endpoints(packet) else {
            return false;
        };
        let i = self.direction.index();
        endpoints
            .iter()
            .any(|&(e, which)| which[i] && (e == src || e == dst))
    }
}

/// The source and destination of an IPv4 TCP packet (`None` for anything
/// else, or a packet too short to tell).
fn tcp_endpoints(packet: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4)> {
    const TCP: u8 = 6;
    let version = packet.first()? >> 4;
    if version != 4 || *packet.get(9)? != TCP {
        return None;
    }
    let header = usize::from(packet[0] & 0x0f) * 4;
    let ports = packet.get(header..header + 4)?;
    let addr =
        |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    let port = |at: usize| u16::from_be_bytes([ports[at], ports[at + 1]]);
    Some((
        SocketAddrV4::new(addr(12), port(0)),
        SocketAddrV4::new(addr(16), port(2)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_packet(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45; // IPv4, 20-byte header
        p[9] = 6;
        p[12..16].copy_from_slice(&src.ip().octets());
        p[16..20].copy_from_slice(&dst.ip().octets());
        p[20..22].copy_from_slice(&src.port().to_be_bytes());
        p[22..24].copy_from_slice(&dst.port().to_be_bytes());
        p
    }

    #[test]
    fn reads_the_endpoints_of_a_tcp_packet_and_nothing_else() {
        let a = SocketAddrV4::new(NEAR_ADDR, 40000);
        let b = SocketAddrV4::new(FAR_ADDR, 7000);
        assert_eq!(tcp_endpoints(&tcp_packet(a, b)), Some((a, b)));
        let mut udp = tcp_packet(a, b);
        udp[9] = 17;
        assert_eq!(tcp_endpoints(&udp), None);
        assert_eq!(tcp_endpoints(&[0x60; 40]), None, "IPv6");
        assert_eq!(tcp_endpoints(&[0x45; 10]), None, "truncated");
        assert_eq!(tcp_endpoints(&[]), None);
    }

    fn shared() -> Arc<Shared> {
        Arc::new(Shared::default())
    }

    #[test]
    fn loss_drops_about_the_asked_fraction() {
        let shared = shared();
        let mut f = Forwarder::new(Direction::ToFar, shared.clone());
        let mut rng = rand::rng();
        let imp = Impairment::loss(0.05);
        for _ in 0..20_000 {
            f.admit(&[0x45; 40], &imp, &mut rng);
        }
        let dropped = shared.dropped[0].load(Ordering::Relaxed);
        assert!((700..1300).contains(&dropped), "{dropped} of 20000 at 5 %");
        assert_eq!(f.queue.len() as u64 + dropped, 20_000);
    }

    #[test]
    fn in_order_jitter_never_lets_a_packet_overtake() {
        let mut f = Forwarder::new(Direction::ToNear, shared());
        let mut rng = rand::rng();
        let imp = Impairment::delay(Duration::from_millis(100), Duration::from_millis(50));
        for _ in 0..1000 {
            f.admit(&[0x45; 40], &imp, &mut rng);
        }
        let mut previous = (Instant::now(), 0);
        while let Some(Reverse(h)) = f.queue.pop() {
            assert!(
                h.seq > previous.1,
                "packet {} left before {}",
                h.seq,
                previous.1
            );
            assert!(h.due >= previous.0);
            previous = (h.due, h.seq);
        }
    }

    #[test]
    fn a_dropped_flow_is_dropped_both_ways_and_only_it() {
        let shared = shared();
        let a = SocketAddrV4::new(NEAR_ADDR, 40000);
        let b = SocketAddrV4::new(FAR_ADDR, 7000);
        let other = SocketAddrV4::new(NEAR_ADDR, 40001);
        lock(&shared.dropped_flows).push((a, b));
        let f = Forwarder::new(Direction::ToFar, shared);
        assert!(f.flow_dropped(&tcp_packet(a, b)));
        assert!(f.flow_dropped(&tcp_packet(b, a)));
        assert!(!f.flow_dropped(&tcp_packet(other, b)));
    }

    #[test]
    fn a_dropped_endpoint_is_dropped_in_the_directions_asked_and_only_it() {
        let shared = shared();
        let client = SocketAddrV4::new(NEAR_ADDR, 40000);
        let primary = SocketAddrV4::new(FAR_ADDR, 7001);
        let secondary = SocketAddrV4::new(FAR_ADDR, 7002);
        lock(&shared.dropped_endpoints).push((primary, [true, false]));
        let to_far = Forwarder::new(Direction::ToFar, shared.clone());
        let to_near = Forwarder::new(Direction::ToNear, shared);
        assert!(to_far.endpoint_dropped(&tcp_packet(client, primary)));
        assert!(!to_near.endpoint_dropped(&tcp_packet(primary, client)));
        assert!(!to_far.endpoint_dropped(&tcp_packet(client, secondary)));
    }

    #[test]
    fn bursts_lose_runs_of_packets() {
        let shared = shared();
        let mut f = Forwarder::new(Direction::ToFar, shared.clone());
        let mut rng = rand::rng();
        let imp = Impairment {
            burst: Some(Burst {
                enter: 0.01,
                leave: 0.2,
            }),
            ..Impairment::none()
        };
        let mut lost = Vec::new();
        for _ in 0..20_000 {
            lost.push(f.lose(&imp, &mut rng));
        }
        let total = lost.iter().filter(|&&l| l).count();
        let runs = lost.windows(2).filter(|w| !w[0] && w[1]).count().max(1);
        // Stationary loss enter / (enter + leave) ≈ 4.8 %, mean run 5.
        assert!((500..1500).contains(&total), "{total}");
        assert!(total / runs >= 3, "mean burst {}", total / runs);
    }
}
