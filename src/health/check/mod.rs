//! One health check of one backend address, on a fresh connection: `tcp`
//! (connect), `postgres`, `mysql`, `redis`, `http`. A check never panics on
//! what a backend sends; every outcome carries a one-line detail for logs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::config::{CheckConfig, CheckKind};

/// A backend's role as its last check reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
}

/// What a check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// Serving.
    Up,
    /// Alive but not ready to serve (e.g. Redis `-LOADING`).
    NotReady,
    /// Refused, timed out, or answered with an error.
    Down,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub status: CheckStatus,
    /// The role reported (postgres, redis), when the check asks for it.
    pub role: Option<Role>,
    pub latency: Duration,
    /// One line for logs and /status: what was seen or what failed.
    pub detail: String,
}

/// Runs one check of `addr` under `config.timeout`.
pub async fn check(config: &CheckConfig, addr: SocketAddr) -> CheckOutcome {
    let started = Instant::now();
    let result = tokio::time::timeout(config.timeout, run(config, addr)).await;
    let latency = started.elapsed();
    match result {
        Ok(Ok((status, role, detail))) => CheckOutcome {
            status,
            role,
            latency,
            detail,
        },
        Ok(Err(e)) => CheckOutcome {
            status: CheckStatus::Down,
            role: None,
            latency,
            detail: e.to_string(),
        },
        Err(_) => CheckOutcome {
            status: CheckStatus::Down,
            role: None,
            latency,
            detail: format!(
                "no answer within timeout ({})",
                humantime::format_duration(config.timeout)
            ),
        },
    }
}

type Verdict = (CheckStatus, Option<Role>, String);

async fn run(config: &CheckConfig, addr: SocketAddr) -> std::io::Result<Verdict> {
    match config.kind {
        CheckKind::Tcp => {
            let _stream = TcpStream::connect(addr).await?;
            Ok((CheckStatus::Up, None, "connected".to_string()))
        }
        // Filled in by the protocol checks; until then they check TCP only.
        _ => {
            let _stream = TcpStream::connect(addr).await?;
            Ok((
                CheckStatus::Up,
                None,
                "connected (protocol check not built yet)".to_string(),
            ))
        }
    }
}
