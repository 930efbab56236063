//! `pulsegate admin …`: the admin API from the command line, for operators
//! and for hooks that cannot run curl (a distroless image's HEALTHCHECK, a
//! Kubernetes preStop exec).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper::Method;

use super::client::{self, ClientError};
use crate::telemetry::one_line;

/// What to ask the admin server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    /// `GET /healthz`: exit 0 when the proxy is serving.
    Health,
    /// `GET /readyz`: exit 0 when ready.
    Ready,
    /// `GET /status`, printed.
    Status,
    /// `GET /metrics`, printed.
    Metrics,
    /// `POST /reload`: exit 0 applied, 2 refused as invalid.
    Reload,
    /// `POST /drain`; with `wait`, block until the drain finished (the
    /// process exited, or with `stay` every listener stopped).
    Drain { stay: bool, wait: Option<Duration> },
}

/// Where the admin server is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the token when no file is given.
    pub token_env: String,
    pub timeout: Duration,
}

/// Exit codes of `pulsegate admin`.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INVALID: u8 = 2;

/// Runs one admin command, printing the answer; returns the exit code.
pub async fn run(target: &Target, command: &AdminCommand) -> u8 {
    let token = match read_token(target) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let token = token.as_deref();
    let ask = |method: Method, path: String| async move {
        client::request(&target.url, method, &path, token, target.timeout).await
    };
    let (method, path) = match command {
        AdminCommand::Health => (Method::GET, "/healthz".to_string()),
        AdminCommand::Ready => (Method::GET, "/readyz".to_string()),
        AdminCommand::Status => (Method::GET, "/status".to_string()),
        AdminCommand::Metrics => (Method::GET, "/metrics".to_string()),
        AdminCommand::Reload => (Method::POST, "/reload".to_string()),
        AdminCommand::Drain { stay, .. } => (
            Method::POST,
            format!("/drain?then={}", if *stay { "stay" } else { "exit" }),
        ),
    };
    let (status, body) = match ask(method, path).await {
        Ok(reply) => reply,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return EXIT_FAILED;
        }
    };
    if matches!(command, AdminCommand::Health | AdminCommand::Ready) {
        if status != 200 {
            eprintln!("{body}");
        }
    } else {
        println!("{}", body.trim_end());
    }
    let code = match (command, status) {
        (_, 200..=299) => EXIT_OK,
        (AdminCommand::Reload, 400) => EXIT_INVALID,
        _ => EXIT_FAILED,
    };
    if let (
        AdminCommand::Drain {
            wait: Some(wait),
            stay,
        },
        EXIT_OK,
    ) = (command, code)
    {
        return wait_drained(target, token, *stay, *wait).await;
    }
    code
}

/// Polls until the drain is over: the process is gone (connection
/// refused), or, when it stays up, no listener is left in `/status`.
async fn wait_drained(target: &Target, token: Option<&str>, stay: bool, wait: Duration) -> u8 {
    let deadline = Instant::now() + wait;
    loop {
        match client::request(&target.url, Method::GET, "/status", token, target.timeout).await {
            Err(ClientError::Connect { .. }) if !stay => return EXIT_OK,
            Ok((200, body)) if stay && no_listeners(&body) => return EXIT_OK,
            _ => {}
        }
        if Instant::now() >= deadline {
            eprintln!(
                "drain still in progress after {}; giving up waiting",
                humantime::format_duration(wait)
            );
            return EXIT_FAILED;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn no_listeners(status: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(status)
        .ok()
        .and_then(|s| s["listeners"].as_array().map(Vec::is_empty))
        .unwrap_or(false)
}

fn read_token(target: &Target) -> Result<Option<String>, String> {
    if let Some(file) = &target.token_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("--token-file {}: {e}", file.display()))?;
        return Ok(Some(text));
    }
    Ok(std::env::var(&target.token_env)
        .ok()
        .filter(|t| !t.trim().is_empty()))
}
