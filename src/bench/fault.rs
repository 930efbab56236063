//! The fault: what happens to the primary backend, or to the link to the
//! backends, at `--fault-at`, applied from a plain thread while the load
//! runs. Every route crosses the same link to the same backends, so one
//! fault reaches all of them at the same instant; only `flow` acts per
//! route (one connection of each), and it records when it hit each one.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::args::{FaultKind, LossDirection, Plan, WorkloadKind};
use super::load::Live;
use super::servers::{Backend, Backends};
use super::workload::Route;
use super::BenchError;
use crate::lab::{socket_inodes_of, Direction, Impairment, LinkedLab, TcpEntry, TcpState};

/// `flow`: connections must exist in two snapshots this far apart to be
/// picked, so a health check's short-lived connection never is.
const FLOW_SETTLE: Duration = Duration::from_millis(200);
/// How long a command to a redis server may take (role flip).
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// When the fault took effect.
#[derive(Debug, Clone, Default)]
pub(crate) struct FaultTimes {
    /// Since the start of the load: when the fault was in place (the DROP
    /// rule, the signal sent, the impairment set, the roles swapped).
    pub at: Duration,
    /// The same instant on the wall clock, to compare with pulsegate's log.
    pub wall: Option<SystemTime>,
    /// `restart`: when the primary listened again, since the start.
    pub restarted: Option<Duration>,
    /// `flap`: when the partition healed, since the start.
    pub healed: Option<Duration>,
    /// When the fault reached each route, since the start (`flow`: when
    /// that route's connection was dropped; else `at` for all).
    pub applied: Vec<(Route, Duration)>,
    /// `flow`: the connection dropped per route (its near and far ends).
    pub flows: Vec<(Route, SocketAddr, SocketAddr)>,
}

/// What the fault acts on.
pub(crate) struct Scene<'a> {
    pub lab: &'a LinkedLab,
    pub backends: &'a mut Backends,
    /// The process whose sockets are each route's connections to the
    /// backends (the proxy's; for `direct`, this process).
    pub owners: Vec<(Route, u32)>,
}

/// Sleeps until `t0 + plan.fault_at`, then applies `plan.fault`.
pub(crate) fn inject(
    scene: Scene<'_>,
    plan: &Plan,
    t0: Instant,
    live: &Live,
) -> Result<FaultTimes, BenchError> {
    let lab = scene.lab;
    let link = lab.link();
    let primary = &mut scene.backends.primary;
    let mark = || (Instant::now(), SystemTime::now());
    if plan.fault == FaultKind::Flow {
        // The snapshots are taken before the fault instant.
        sleep_until(
            (t0 + plan.fault_at).checked_sub(FLOW_SETTLE).unwrap_or(t0),
            live,
        )?;
    } else {
        sleep_until(t0 + plan.fault_at, live)?;
    }
    let mut times = FaultTimes::default();
    let (at, wall) = match plan.fault {
        FaultKind::Blackhole => {
            // Silence first: the kernel's FIN/RST for the killed process
            // must never arrive.
            link.drop_endpoint(primary.addr, &Direction::BOTH)?;
            let at = mark();
            primary.kill()?;
            at
        }
        FaultKind::BlackholeOneway => {
            link.drop_endpoint(primary.addr, &[Direction::ToFar])?;
            mark()
        }
        FaultKind::Freeze => {
            primary.freeze()?;
            mark()
        }
        FaultKind::Kill | FaultKind::Restart => {
            primary.send_kill()?;
            let at = mark();
            primary.wait_gone()?;
            at
        }
        FaultKind::Loss => {
            let lossy = Impairment::loss(plan.loss);
            match plan.loss_direction {
                LossDirection::Both => link.set_both(lossy),
                LossDirection::ToBackend => link.set(Direction::ToFar, lossy),
                LossDirection::FromBackend => link.set(Direction::ToNear, lossy),
            }
            mark()
        }
        FaultKind::Latency => {
            link.set_both(Impairment::delay(plan.latency, plan.jitter));
            mark()
        }
        FaultKind::Flap => {
            link.drop_endpoint(primary.addr, &Direction::BOTH)?;
            mark()
        }
        FaultKind::Flow => {
            let first = lab.near().tcp_sockets()?;
            sleep_until(t0 + plan.fault_at, live)?;
            let second = lab.near().tcp_sockets()?;
            let mut at = None;
            for &(route, pid) in &scene.owners {
                let Some(flow) = pick_flow(&first, &second, pid, plan.primary) else {
                    continue;
                };
                link.drop_flow(flow.local, flow.remote)?;
                let now = mark();
                at.get_or_insert(now);
                times
                    .applied
                    .push((route, now.0.saturating_duration_since(t0)));
                times.flows.push((route, flow.local, flow.remote));
            }
            at.ok_or_else(|| {
                BenchError::Setup(format!(
                    "--fault flow found no established connection to the primary {} on any \
                     route; use more --clients or a later --fault-at",
                    plan.primary
                ))
            })?
        }
        FaultKind::RoleFlip => flip_roles(lab, primary, &scene.backends.secondary, plan)?,
        FaultKind::DnsMove => {
            let at = if plan.workload == WorkloadKind::Echo {
                lab.link().drop_endpoint(plan.primary, &Direction::BOTH)?;
                mark()
            } else {
                flip_roles(lab, primary, &scene.backends.secondary, plan)?
            };
            lab.near().set_hosts(&plan.hosts(plan.secondary))?;
            at
        }
    };
    live.fault_injected.store(true, Ordering::Relaxed);
    times.at = at.saturating_duration_since(t0);
    times.wall = Some(wall);
    if times.applied.is_empty() {
        times.applied = scene
            .owners
            .iter()
            .map(|&(route, _)| (route, times.at))
            .collect();
    }
    match plan.fault {
        FaultKind::Restart => {
            sleep_until(at + plan.restart_after, live)?;
            primary.restart(lab.far())?;
            times.restarted = Some(Instant::now().saturating_duration_since(t0));
        }
        FaultKind::Flap => {
            sleep_until(at + plan.flap_for, live)?;
            link.restore_endpoints();
            times.healed = Some(Instant::now().saturating_duration_since(t0));
        }
        _ => {}
    }
    Ok(times)
}

/// Swaps the roles with no connection closed, and says when the primary
/// stopped taking writes.
fn flip_roles(
    lab: &LinkedLab,
    primary: &Backend,
    secondary: &Backend,
    plan: &Plan,
) -> Result<(Instant, SystemTime), BenchError> {
    if plan.workload == WorkloadKind::Postgres {
        // Fence the old writer first, then promote: no write lands on
        // both, as failover tools do it.
        primary.sql(
            lab.far(),
            &[
                "ALTER SYSTEM SET default_transaction_read_only = on",
                "SELECT pg_reload_conf()",
            ],
        )?;
        let at = (Instant::now(), SystemTime::now());
        secondary.sql(lab.far(), &["SELECT pg_promote(true, 30)"])?;
        return Ok(at);
    }
    lab.far()
        .enter(|| flip_redis_roles(plan.primary, plan.secondary))??;
    Ok((Instant::now(), SystemTime::now()))
}

/// An established connection from process `pid` to `primary` seen in both
/// snapshots (so not a health check's), the one with the lowest local
/// port.
fn pick_flow(
    first: &[TcpEntry],
    second: &[TcpEntry],
    pid: u32,
    primary: SocketAddr,
) -> Option<TcpEntry> {
    let mine = socket_inodes_of(pid);
    let live = |e: &&TcpEntry| {
        e.remote == primary && e.state == TcpState::Established && mine.contains(&e.inode)
    };
    let earlier: HashSet<u64> = first.iter().filter(live).map(|e| e.inode).collect();
    second
        .iter()
        .filter(live)
        .filter(|e| earlier.contains(&e.inode))
        .min_by_key(|e| e.local.port())
        .cloned()
}

/// The `role-flip` fault on redis: `REPLICAOF NO ONE` to `replica`, then
/// `REPLICAOF <replica>` to `primary`. Neither server closes a client
/// connection; from then on a write to `primary` is answered `-READONLY`.
/// Connects from the calling thread's network namespace.
pub fn flip_redis_roles(primary: SocketAddr, replica: SocketAddr) -> Result<(), BenchError> {
    redis_command(replica, "REPLICAOF NO ONE")?;
    let (ip, port) = (replica.ip(), replica.port());
    redis_command(primary, &format!("REPLICAOF {ip} {port}"))
}

/// Sends one inline command to the redis server at `addr` and expects
/// `+OK`.
fn redis_command(addr: SocketAddr, command: &str) -> Result<(), BenchError> {
    let failed = |detail: String| {
        BenchError::Setup(format!("`{command}` to redis at {addr} failed: {detail}"))
    };
    let send = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, REDIS_TIMEOUT)?;
        stream.set_read_timeout(Some(REDIS_TIMEOUT))?;
        stream.write_all(format!("{command}\r\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line)
    };
    match send() {
        Ok(line) if line.starts_with("+OK") => Ok(()),
        Ok(line) => Err(failed(format!("it answered {:?}", line.trim_end()))),
        Err(e) => Err(failed(e.to_string())),
    }
}

/// Sleeps until `at`, giving up with [`BenchError::Interrupted`] once
/// Ctrl-C stopped the load.
fn sleep_until(at: Instant, live: &Live) -> Result<(), BenchError> {
    loop {
        if live.interrupted.load(Ordering::Relaxed) {
            return Err(BenchError::Interrupted);
        }
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(local: &str, remote: &str, state: TcpState, inode: u64) -> TcpEntry {
        TcpEntry {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state,
            send_queue: 0,
            recv_queue: 0,
            inode,
        }
    }

    #[test]
    fn picks_a_lasting_established_connection_of_the_process_to_the_primary() {
        // Sockets this test process holds, so their inodes are "ours".
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let b = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let ours: Vec<u64> = {
            let me = socket_inodes_of(std::process::id());
            let table = crate::lab::tcp_sockets_here().unwrap();
            [&a, &b]
                .iter()
                .map(|s| {
                    let local = s.local_addr().unwrap();
                    table
                        .iter()
                        .find(|e| e.local == local && me.contains(&e.inode))
                        .unwrap()
                        .inode
                })
                .collect()
        };
        let primary = "10.200.0.2:7001";
        let first = [
            entry("10.200.0.1:40002", primary, TcpState::Established, ours[0]),
            entry("10.200.0.1:40001", primary, TcpState::Established, 1),
        ];
        let second = [
            entry("10.200.0.1:40002", primary, TcpState::Established, ours[0]),
            // New since the first snapshot: a check's connection.
            entry("10.200.0.1:40000", primary, TcpState::Established, ours[1]),
            // Not ours.
            entry("10.200.0.1:40001", primary, TcpState::Established, 1),
        ];
        let picked = pick_flow(
            &first,
            &second,
            std::process::id(),
            primary.parse().unwrap(),
        );
        assert_eq!(picked.unwrap().local.port(), 40002);
        let none = pick_flow(
            &first,
            &second,
            std::process::id(),
            "10.200.0.2:9".parse().unwrap(),
        );
        assert!(none.is_none());
    }
}
