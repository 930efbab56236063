//! pulsegate itself as a lab process: a one-listener config, starting
//! `pulsegate run` in the namespace, and reading its eviction events.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Lab, LabError, LabProcess};

/// How long pulsegate gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A config with one listener in front of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub bind: SocketAddr,
    pub backend: SocketAddr,
    pub probe_interval: Duration,
    pub dead_after: Duration,
    /// TCP_USER_TIMEOUT on both legs: kept high so that only the watcher
    /// decides within an experiment.
    pub user_timeout: Duration,
    pub connect_timeout: Duration,
    /// More TOML appended to the listener (e.g. `[listener.check]`).
    pub extra: String,
}

impl ProxyConfig {
    /// Fast detection: probe_interval 1s, dead_after 1s, user_timeout 60s.
    pub fn new(bind: SocketAddr, backend: SocketAddr) -> Self {
        ProxyConfig {
            bind,
            backend,
            probe_interval: Duration::from_secs(1),
            dead_after: Duration::from_secs(1),
            user_timeout: Duration::from_secs(60),
            connect_timeout: crate::config::defaults::connect_timeout(),
            extra: String::new(),
        }
    }

    /// The config file's text.
    pub fn to_toml(&self) -> String {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        format!(
            "[[listener]]\n\
             name = \"lab\"\n\
             bind = \"{bind}\"\n\
             backends = [\"{backend}\"]\n\
             connect_timeout = \"{connect}\"\n\
             \n\
             [listener.liveness]\n\
             probe_interval = \"{probe}\"\n\
             dead_after = \"{dead}\"\n\
             \n\
             [listener.upstream]\n\
             user_timeout = \"{ut}\"\n\
             \n\
             [listener.client]\n\
             user_timeout = \"{ut}\"\n\
             {extra}\n",
            bind = self.bind,
            backend = self.backend,
            probe = d(self.probe_interval),
            dead = d(self.dead_after),
            ut = d(self.user_timeout),
            connect = d(self.connect_timeout),
            extra = self.extra,
        )
    }
}

impl Lab {
    /// Writes `config`, starts `<exe> --log-format json run -c FILE` in the
    /// namespace and waits until it listens. Its JSON log is the process's
    /// stderr ([`LabProcess::stderr_path`]).
    pub fn start_pulsegate(
        &self,
        exe: &Path,
        config: &ProxyConfig,
    ) -> Result<LabProcess, LabError> {
        self.start_pulsegate_with(exe, config.bind, &config.to_toml())
    }

    /// Like [`Lab::start_pulsegate`], with the config file's text as given;
    /// `bind` is the listener to wait for. Logs at `info`, or at the level
    /// `PULSEGATE_LAB_LOG` names (e.g. `debug` to see every verdict
    /// weighed).
    pub fn start_pulsegate_with(
        &self,
        exe: &Path,
        bind: SocketAddr,
        toml: &str,
    ) -> Result<LabProcess, LabError> {
        let level = std::env::var("PULSEGATE_LAB_LOG").unwrap_or_else(|_| "info".into());
        self.start_pulsegate_logging(exe, bind, toml, &level)
    }

    /// Like [`Lab::start_pulsegate_with`], with a `--log-level` filter.
    pub fn start_pulsegate_logging(
        &self,
        exe: &Path,
        bind: SocketAddr,
        toml: &str,
        log_level: &str,
    ) -> Result<LabProcess, LabError> {
        let file = self.write_file(&format!("pulsegate-{}.toml", bind.port()), toml)?;
        let mut command = Command::new(exe);
        command
            .args([
                "--log-format",
                "json",
                "--log-level",
                log_level,
                "run",
                "-c",
            ])
            .arg(&file);
        let process = self.spawn_as(&format!("pulsegate-{}", bind.port()), command)?;
        self.wait_ready(&process, bind, START_TIMEOUT)?;
        Ok(process)
    }

    /// Waits until something listens on `addr` in the namespace; fails at
    /// once, with its stderr, if `process` exits first.
    pub fn wait_ready(
        &self,
        process: &LabProcess,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = process.exit_status() {
                return Err(LabError::Command {
                    command: format!("pid {} (expected to listen on {addr})", process.pid()),
                    detail: format!("exited with {status}: {}", process.stderr().trim()),
                });
            }
            let listening = self
                .tcp_sockets()?
                .iter()
                .any(|e| e.state == super::TcpState::Listen && e.local == addr);
            if listening {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: format!("nothing listens on {addr}: {}", process.stderr().trim()),
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The parts of one eviction event that the demo shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictionLine {
    /// `probe_unanswered`, `retransmit_unanswered`, `peer_reset`, ...
    pub reason: String,
    /// `client` or `upstream`.
    pub dead_leg: String,
    /// The whole JSON line.
    pub raw: String,
}

/// The eviction events (`"event":"eviction"`) of a JSON log so far. A
/// deliberately small reader of flat string fields, enough for the
/// identifiers pulsegate logs there; tests parse the full JSON.
pub fn read_evictions(log: &Path) -> Vec<EvictionLine> {
    let text = std::fs::read(log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter(|line| string_field(line, "event") == Some("eviction"))
        .map(|line| EvictionLine {
            reason: string_field(line, "reason").unwrap_or("?").to_string(),
            dead_leg: string_field(line, "dead_leg").unwrap_or("?").to_string(),
            raw: line.to_string(),
        })
        .collect()
}

/// The value of `"key":"value"` in a one-line JSON object, if it has no
/// escapes.
fn string_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let value = &line[start..];
    let end = value.find('"')?;
    let value = &value[..end];
    (!value.contains('\\')).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_valid_for_pulsegate() {
        let config = ProxyConfig::new(
            "127.0.0.1:6432".parse().unwrap(),
            "127.0.0.1:7000".parse().unwrap(),
        );
        let valid = crate::config::parse(&config.to_toml(), "lab.toml").unwrap();
        let l = &valid.listeners[0];
        assert_eq!(l.settings.liveness.dead_after, Duration::from_secs(1));
        assert_eq!(l.settings.client.user_timeout, Duration::from_secs(60));
        assert_eq!(l.settings.upstream.user_timeout, Duration::from_secs(60));
    }

    #[test]
    fn reads_flat_string_fields() {
        let line = r#"{"level":"WARN","event":"eviction","dead_leg":"upstream","reason":"probe_unanswered","probes":2}"#;
        assert_eq!(string_field(line, "reason"), Some("probe_unanswered"));
        assert_eq!(string_field(line, "dead_leg"), Some("upstream"));
        assert_eq!(string_field(line, "probes"), None);
        assert_eq!(string_field(line, "missing"), None);
    }
}
