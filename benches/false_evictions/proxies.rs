//! The proxies and the echo backend of one experiment in a `LinkedLab`:
//! the echo backend far (`pulsegate lab-backend`), pulsegate and HAProxy
//! near, both running at once on their own ports in front of it; their
//! configs (written here, printed in the report); and what their logs and
//! HAProxy's stats socket say afterwards.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pulsegate::lab::{read_evictions, EchoBackend, Lab, LabProcess, LinkedLab, ProxyConfig};

use crate::common::Via;

pub const PULSEGATE_PORT: u16 = 6432;
pub const HAPROXY_PORT: u16 = 6500;
/// The far echo backend both proxies share.
pub const BACKEND_PORT: u16 = 7000;
/// HAProxy's own echo backend where each proxy gets one (the dropped-flow
/// case), so the remote port of an upstream connection tells whose it is.
pub const HAPROXY_BACKEND_PORT: u16 = 7001;
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The HAProxy backend and server names, as `show stat` prints them.
const HAPROXY_BACKEND: &str = "echo";
const HAPROXY_SERVER: &str = "far";

/// Where `via`'s clients connect, inside the near namespace.
pub fn listen_addr(via: Via) -> SocketAddr {
    let port = match via {
        Via::Haproxy => HAPROXY_PORT,
        _ => PULSEGATE_PORT,
    };
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// pulsegate's config: the fast settings (probe_interval 1s, dead_after
/// 1s, user_timeout 60s on both legs), connect_timeout 5s (room for two
/// SYN retransmissions on a lossy link), and with `check` a TCP check
/// every second.
pub fn pulsegate_config(backend: SocketAddr, check: bool) -> String {
    let mut config = ProxyConfig::new(listen_addr(Via::Pulsegate), backend);
    config.connect_timeout = Duration::from_secs(5);
    if check {
        config.extra = "\n[listener.check]\nkind = \"tcp\"\ninterval = \"1s\"\n".into();
    }
    config.to_toml()
}

/// HAProxy tuned for fast detection: server-side keepalive probing after
/// 1 s of quiet, every 1 s, 2 probes; TCP_USER_TIMEOUT 3 s on the server
/// connections; no inactivity timeout below an hour; with `check` a TCP
/// check every second (2 failures: down, and its sessions are killed).
/// Logs each session's end (`option tcplog`) to stderr; `stats` is its
/// stats socket.
pub fn haproxy_config(backend: SocketAddr, check: bool, stats: &Path) -> String {
    let check = if check {
        " check inter 1s fall 2 rise 2 on-marked-down shutdown-sessions"
    } else {
        ""
    };
    format!(
        "global
    nbthread 2
    maxconn 4000
    log stderr format raw daemon info
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    option srvtcpka
    srvtcpka-idle 1s
    srvtcpka-intvl 1s
    srvtcpka-cnt 2

frontend clients
    bind {bind}
    default_backend {HAPROXY_BACKEND}

backend {HAPROXY_BACKEND}
    server {HAPROXY_SERVER} {backend} tcp-ut 3s{check}
",
        stats = stats.display(),
        bind = listen_addr(Via::Haproxy),
    )
}

/// A proxy running in the near namespace.
pub struct Proxy {
    pub via: Via,
    pub process: LabProcess,
    /// The far address it forwards to.
    pub backend: SocketAddr,
    /// HAProxy's stats socket.
    stats: Option<PathBuf>,
}

/// Everything one experiment runs; the lab kills it all when dropped.
pub struct Running {
    _backends: Vec<LabProcess>,
    pub proxies: Vec<Proxy>,
}

/// Starts the far echo backend (one per proxy with `own_backends`) and
/// the proxies of `vias` near, and waits until all listen.
pub fn start(lab: &LinkedLab, vias: &[Via], check: bool, own_backends: bool) -> Result<Running> {
    let mut backends = Vec::new();
    let mut proxies = Vec::new();
    for (i, &via) in vias.iter().enumerate() {
        let port = if own_backends && via == Via::Haproxy {
            HAPROXY_BACKEND_PORT
        } else {
            BACKEND_PORT
        };
        let backend = LinkedLab::far_addr(port);
        if i == 0 || own_backends {
            backends.push(start_backend(lab.far(), backend)?);
        }
        let proxy = match via {
            Via::Haproxy => {
                let stats = lab.near().dir().join("haproxy.sock");
                let config = haproxy_config(backend, check, &stats);
                Proxy {
                    via,
                    process: start_haproxy(lab.near(), &config)?,
                    backend,
                    stats: Some(stats),
                }
            }
            _ => {
                let exe = PathBuf::from(env!("CARGO_BIN_EXE_pulsegate"));
                let bind = listen_addr(Via::Pulsegate);
                let config = pulsegate_config(backend, check);
                let process = lab
                    .near()
                    .start_pulsegate_with(&exe, bind, &config)
                    .context("starting pulsegate")?;
                Proxy {
                    via,
                    process,
                    backend,
                    stats: None,
                }
            }
        };
        proxies.push(proxy);
    }
    Ok(Running {
        _backends: backends,
        proxies,
    })
}

fn start_backend(far: &Lab, addr: SocketAddr) -> Result<LabProcess> {
    let exe = Path::new(env!("CARGO_BIN_EXE_pulsegate"));
    let echo = EchoBackend::new(exe, Duration::from_secs(30 * 60));
    far.start_echo_backend(&echo, addr)
        .with_context(|| format!("the echo backend on {addr}"))
}

fn start_haproxy(near: &Lab, config: &str) -> Result<LabProcess> {
    let path = near.write_file("haproxy.cfg", config)?;
    let mut command = Command::new("haproxy");
    command.args(["-db", "-f"]).arg(path);
    let haproxy = near.spawn_as("haproxy", command)?;
    near.wait_ready(&haproxy, listen_addr(Via::Haproxy), SETUP_TIMEOUT)
        .context("starting HAProxy")?;
    Ok(haproxy)
}

/// What a proxy's own records say about the sessions it ended and the
/// backend's state, read from its log (and HAProxy's stats socket).
#[derive(Debug, Clone, Default)]
pub struct ProxyRecord {
    /// pulsegate: eviction lines by `reason`; HAProxy: session-end log
    /// lines by termination state (`SD`, `KD`, `--`, ...).
    pub ends: BTreeMap<String, usize>,
    /// Times the backend was marked down.
    pub marked_down: usize,
    /// pulsegate: times it turned suspect; HAProxy: failed checks.
    pub suspect_or_failed_checks: usize,
    /// HAProxy: seconds the server was down, from its stats.
    pub downtime_secs: Option<u64>,
}

impl Proxy {
    /// Reads the proxy's log (and stats) now.
    pub fn record(&self) -> Result<ProxyRecord> {
        match self.via {
            Via::Haproxy => self.haproxy_record(),
            _ => Ok(pulsegate_record(&self.process)),
        }
    }

    fn haproxy_record(&self) -> Result<ProxyRecord> {
        let log = self.process.stderr();
        let mut ends = BTreeMap::new();
        for state in log.lines().filter_map(termination_state) {
            *ends.entry(state.to_string()).or_default() += 1;
        }
        let stats = self
            .stats
            .as_deref()
            .context("HAProxy without a stats socket")?;
        let stat = show_stat(stats)?;
        let number = |key: &str| -> Result<u64> {
            let v = stat
                .get(key)
                .with_context(|| format!("no {key} in HAProxy's show stat"))?;
            Ok(v.parse().unwrap_or(0))
        };
        Ok(ProxyRecord {
            ends,
            marked_down: number("chkdown")? as usize,
            suspect_or_failed_checks: number("chkfail")? as usize,
            downtime_secs: Some(number("downtime")?),
        })
    }
}

/// pulsegate's eviction lines by reason and its backend state changes.
fn pulsegate_record(process: &LabProcess) -> ProxyRecord {
    let mut ends = BTreeMap::new();
    for e in read_evictions(process.stderr_path()) {
        *ends.entry(e.reason).or_default() += 1;
    }
    let mut record = ProxyRecord {
        ends,
        ..ProxyRecord::default()
    };
    for line in process.stderr().lines() {
        let Ok(json) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if json["message"] != "backend state changed" {
            continue;
        }
        match json["to"].as_str() {
            Some("down") => record.marked_down += 1,
            Some("suspect") => record.suspect_or_failed_checks += 1,
            _ => {}
        }
    }
    record
}

/// The termination state of an `option tcplog` line ("client:port [date]
/// frontend backend/server Tw/Tc/Tt bytes STATE actconn/... queues"), or
/// `None` for any other line.
fn termination_state(line: &str) -> Option<&str> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let timers = fields.iter().position(|f| {
        let parts: Vec<&str> = f.split('/').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| p.trim_start_matches('+').parse::<i64>().is_ok())
    })?;
    let state = fields.get(timers + 2)?;
    (state.len() == 2 && fields.get(timers + 1)?.parse::<u64>().is_ok()).then_some(state)
}

/// HAProxy's `show stat` row of the far server, as field name → value.
fn show_stat(socket: &Path) -> Result<BTreeMap<String, String>> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to HAProxy's stats socket {}", socket.display()))?;
    stream.set_read_timeout(Some(SETUP_TIMEOUT))?;
    stream.write_all(b"show stat\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let mut lines = text.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .with_context(|| format!("unexpected show stat output: {text}"))?;
    let names: Vec<&str> = header.split(',').collect();
    for line in lines {
        let values: Vec<&str> = line.split(',').collect();
        if values.first() == Some(&HAPROXY_BACKEND) && values.get(1) == Some(&HAPROXY_SERVER) {
            return Ok(names
                .iter()
                .zip(values)
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect());
        }
    }
    bail!("no {HAPROXY_BACKEND}/{HAPROXY_SERVER} row in show stat: {text}")
}
