//! What the sweeper knows of each host at the other end of its legs: the
//! loss measured on the way to it, when it last answered anything, whether
//! it was judged gone, and the fresh connects that ask it directly.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::Order;
use crate::evict::Leg;
use crate::liveness::leg::{Assessment, SLACK_MS};
use crate::liveness::now_ms;
use crate::liveness::verdict::LinkLoss;
use crate::upstream::ConnectFailure;

/// A host forgotten after this long without an answer or a session.
const FORGET_AFTER_MS: u64 = 10 * 60 * 1000;
/// Connects that have not reported after this long are given up on.
const CONNECTS_STALE_MS: u64 = 10_000;

/// The far end that legs share, as seen from one side. Upstream legs are
/// grouped by backend address (IP and port: two servers on one machine,
/// or a firewall that drops one port, fail apart); client legs by the
/// client's IP (each connection has its own ephemeral port). The two
/// sides are kept apart even when they share an address, as on loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct HostKey {
    pub leg: Leg,
    pub ip: IpAddr,
    /// The backend's port; 0 for clients.
    pub port: u16,
}

impl HostKey {
    pub fn new(leg: Leg, peer: SocketAddr) -> Self {
        let port = match leg {
            Leg::Upstream => peer.port(),
            Leg::Client => 0,
        };
        HostKey {
            leg,
            ip: peer.ip(),
            port,
        }
    }
}

impl std::fmt::Display for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.leg {
            Leg::Upstream => write!(f, "{}", SocketAddr::new(self.ip, self.port)),
            Leg::Client => write!(f, "{} (client)", self.ip),
        }
    }
}

/// Fresh connects made to corroborate a suspicion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Connects {
    #[default]
    None,
    Pending {
        started_ms: u64,
    },
    Done {
        started_ms: u64,
        answered: u32,
        unanswered: u32,
    },
}

#[derive(Debug, Default)]
pub(crate) struct Host {
    pub loss: LinkLoss,
    /// The latest answer any leg to it is known to have received.
    pub heard_at_ms: u64,
    /// Judged gone, silent since this time; cleared by any later answer.
    pub judged_dead_at: Option<u64>,
    pub connects: Connects,
}

impl Host {
    /// Something to this host was answered at `at_ms`.
    pub fn hear(&mut self, at_ms: u64) {
        self.heard_at_ms = self.heard_at_ms.max(at_ms);
        if self
            .judged_dead_at
            .is_some_and(|dead| at_ms > dead + SLACK_MS)
        {
            self.judged_dead_at = None;
        }
    }
}

/// The hosts of one listener's legs.
#[derive(Debug, Default)]
pub(crate) struct Hosts {
    map: HashMap<HostKey, Host>,
}

impl Hosts {
    pub fn get(&mut self, key: HostKey) -> &mut Host {
        self.map.entry(key).or_default()
    }

    pub fn peek(&self, key: HostKey) -> Option<&Host> {
        self.map.get(&key)
    }

    /// Takes in what one sample of a leg to `key` showed.
    pub fn observe(&mut self, key: HostKey, a: &Assessment, now_ms: u64) {
        let host = self.get(key);
        host.loss.record(&a.trials, now_ms);
        if let Some(at) = a.heard_at_ms {
            host.hear(at);
        }
    }

    /// Drops hosts not heard from for ten minutes and with nothing under
    /// way (client addresses come and go).
    pub fn forget_stale(&mut self, now_ms: u64) {
        self.map.retain(|_, h| {
            h.judged_dead_at.is_some()
                || matches!(h.connects, Connects::Pending { started_ms } if now_ms < started_ms + CONNECTS_STALE_MS)
                || now_ms < h.heard_at_ms + FORGET_AFTER_MS
        });
    }
}

/// What a round of fresh connects found.
pub(crate) struct ConnectReport {
    pub key: HostKey,
    pub started_ms: u64,
    pub answered: u32,
    pub unanswered: u32,
    /// Connects our own side could not make (out of descriptors, ...).
    pub unknown: u32,
}

/// Makes `count` connects to `peer` at once, each given `window` to be
/// answered, and reports to the sweeper. A SYN answered by a SYN-ACK or a
/// RST means the host is there; silence means it, or the way to it, is
/// not; a local failure means nothing.
pub(crate) fn spawn_connects(
    key: HostKey,
    peer: SocketAddr,
    count: u32,
    window: Duration,
    report_to: mpsc::WeakUnboundedSender<Order>,
) {
    let started_ms = now_ms();
    tokio::spawn(async move {
        let mut attempts = tokio::task::JoinSet::new();
        for _ in 0..count {
            attempts.spawn(tokio::time::timeout(window, TcpStream::connect(peer)));
        }
        let mut report = ConnectReport {
            key,
            started_ms,
            answered: 0,
            unanswered: 0,
            unknown: 0,
        };
        while let Some(done) = attempts.join_next().await {
            match done {
                Ok(Ok(Ok(_connected))) => report.answered += 1,
                Ok(Ok(Err(e))) => match ConnectFailure::of(&e) {
                    ConnectFailure::Refused => report.answered += 1,
                    ConnectFailure::NoAnswer => report.unanswered += 1,
                    ConnectFailure::Local => report.unknown += 1,
                },
                Ok(Err(_elapsed)) => report.unanswered += 1,
                Err(_join) => report.unknown += 1,
            }
        }
        if let Some(tx) = report_to.upgrade() {
            let _ = tx.send(Order::Connected(report));
        }
    });
}
