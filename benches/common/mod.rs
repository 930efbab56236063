//! Shared by the proxy benches (`proxy_perf`, `detection`, `db_clients`, ...):
//! knobs from the environment, the three ways a client reaches its server
//! ([`Via`]), the proxies' configs rendered from `benches/haproxy.cfg` and
//! `benches/pulsegate.toml` and the proxies started with them, child
//! processes that die with the bench (also when it fails or panics), the
//! CPU a proxy used during a test ([`cpu`]), and the result files that
//! `benches/run` splices into docs/BENCHMARKS.md.
#![allow(dead_code)] // each bench uses its own subset

pub mod child;
pub mod cpu;
pub mod machine;

use std::fmt::Display;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The config HAProxy runs with, with `{{…}}` placeholders.
pub const HAPROXY_TEMPLATE: &str = include_str!("../haproxy.cfg");
/// The config pulsegate runs with, with `{{…}}` placeholders.
pub const PULSEGATE_TEMPLATE: &str = include_str!("../pulsegate.toml");

/// `key` from the environment, or `default` when unset. A value that does
/// not parse is an error naming the variable, never silently the default.
pub fn knob<T>(key: &str, default: T) -> Result<T>
where
    T: FromStr,
    T::Err: Display,
{
    match std::env::var(key) {
        Err(_) => Ok(default),
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("environment variable {key}={text:?}: {e}")),
    }
}

/// A knob holding whole seconds.
pub fn knob_secs(key: &str, default: u64) -> Result<Duration> {
    knob(key, default).map(Duration::from_secs)
}

/// True when the bench runs only to be listed or as a test, not to
/// measure: `cargo bench -- --list`, or `cargo test --benches` /
/// `--all-targets`, which run a `harness = false` bench with no arguments,
/// where `cargo bench` always passes `--bench`.
pub fn listing_only() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    args.iter().any(|a| a == "--list") || !args.iter().any(|a| a == "--bench")
}

/// How a client reaches its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Direct,
    Haproxy,
    Pulsegate,
}

impl Via {
    pub fn label(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Haproxy => "HAProxy",
            Via::Pulsegate => "pulsegate",
        }
    }
}

/// The routes to measure: direct and pulsegate always, HAProxy unless
/// `PEER=none` or it is not installed (said on stdout).
pub fn routes_to_measure() -> Vec<Via> {
    let mut vias = vec![Via::Direct];
    if std::env::var("PEER").as_deref() == Ok("none") {
        println!("PEER=none: HAProxy is not measured");
    } else if haproxy_version().is_none() {
        println!("haproxy is not installed (apt-get install haproxy): HAProxy is not measured");
    } else {
        vias.push(Via::Haproxy);
    }
    vias.push(Via::Pulsegate);
    vias
}

/// HAProxy's version ("HAProxy 2.6.12-1+deb12u4"), or `None` when
/// `haproxy` cannot be run.
pub fn haproxy_version() -> Option<String> {
    let output = Command::new("haproxy").arg("-v").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.lines().next()?.split_whitespace().nth(2)?;
    Some(format!("HAProxy {version}"))
}

/// HAProxy's threads: `HAPROXY_NBTHREAD`, 2 by default (pulsegate's
/// runtime has one worker per core, two here).
pub fn haproxy_threads() -> Result<u32> {
    knob("HAPROXY_NBTHREAD", 2)
}

/// `HAPROXY_SPLICE=1` adds `option splice-auto` (off by default, as in
/// HAProxy's own defaults).
pub fn haproxy_splice() -> bool {
    std::env::var("HAPROXY_SPLICE").as_deref() == Ok("1")
}

/// One line describing the HAProxy settings that vary between runs.
pub fn haproxy_settings() -> Result<String> {
    let splice = if haproxy_splice() {
        "option splice-auto"
    } else {
        "no splicing"
    };
    Ok(format!("nbthread {}, {splice}", haproxy_threads()?))
}

/// pulsegate's runtime threads: tokio's `TOKIO_WORKER_THREADS` if set.
pub fn pulsegate_workers() -> String {
    match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(n) => format!("TOKIO_WORKER_THREADS={n}"),
        Err(_) => "tokio, one worker thread per core".into(),
    }
}

/// HAProxy's config: `benches/haproxy.cfg` listening on `bind` in front of
/// `backend`.
pub fn haproxy_config(bind: SocketAddr, backend: SocketAddr) -> Result<String> {
    let extra = if haproxy_splice() {
        "    option splice-auto"
    } else {
        ""
    };
    render(
        HAPROXY_TEMPLATE,
        &[
            ("NBTHREAD", &haproxy_threads()?.to_string()),
            ("EXTRA", extra),
            ("BIND", &bind.to_string()),
            ("BACKEND", &backend.to_string()),
        ],
    )
}

/// pulsegate's config: `benches/pulsegate.toml` listening on `bind` in
/// front of `backend`.
pub fn pulsegate_config(bind: SocketAddr, backend: SocketAddr) -> Result<String> {
    render(
        PULSEGATE_TEMPLATE,
        &[
            ("BIND", &bind.to_string()),
            ("BACKEND", &backend.to_string()),
        ],
    )
}

/// Fills every `{{KEY}}` of `template`; a placeholder left unfilled is an
/// error, so a template and its bench cannot drift apart silently.
pub fn render(template: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut text = template.to_string();
    for (key, value) in values {
        text = text.replace(&format!("{{{{{key}}}}}"), value);
    }
    if let Some(start) = text.find("{{") {
        let rest = &text[start..];
        let placeholder = &rest[..rest.find("}}").map_or(rest.len(), |end| end + 2)];
        bail!("config template placeholder {placeholder} was not filled");
    }
    Ok(text)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(listener.local_addr()?.port())
}

/// A loopback address on a port that was free a moment ago.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// Starts `via`'s proxy in front of `backend` on a free loopback port,
/// its config and log in `dir` (named after `label`), and waits until it
/// listens. Killed when the returned [`child::Proc`] is dropped.
pub fn start_proxy(
    via: Via,
    label: &str,
    backend: SocketAddr,
    dir: &Path,
) -> Result<(child::Proc, SocketAddr)> {
    let bind = free_addr()?;
    let name = format!("{}-{label}", via.label().to_lowercase());
    let (config, mut command) = match via {
        Via::Haproxy => {
            let config = dir.join(format!("{name}.cfg"));
            std::fs::write(&config, haproxy_config(bind, backend)?)?;
            let mut command = Command::new("haproxy");
            command.args(["-db", "-f"]).arg(&config);
            (config, command)
        }
        Via::Pulsegate => {
            let config = dir.join(format!("{name}.toml"));
            std::fs::write(&config, pulsegate_config(bind, backend)?)?;
            let mut command = Command::new(env!("CARGO_BIN_EXE_pulsegate"));
            command.args(["run", "-c"]).arg(&config);
            (config, command)
        }
        Via::Direct => bail!("direct has no proxy"),
    };
    command.current_dir(dir);
    let mut proxy = child::Proc::spawn(&name, command, dir)
        .with_context(|| format!("config {}", config.display()))?;
    proxy.wait_listening(bind)?;
    Ok((proxy, bind))
}

/// Where result files go: `$BENCH_RESULTS`, else `bench-results` in the
/// target directory this bench was built in (`target/` or
/// `$CARGO_TARGET_DIR`).
pub fn results_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("BENCH_RESULTS") {
        return Ok(PathBuf::from(dir));
    }
    // The bench runs as <target>/release/deps/<name>-<hash>.
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let target = exe
        .ancestors()
        .nth(3)
        .with_context(|| format!("no target directory above {}", exe.display()))?;
    Ok(target.join("bench-results"))
}

/// Writes `markdown` to `<results_dir>/<name>.md` and returns the path.
pub fn write_results(name: &str, markdown: &str) -> Result<PathBuf> {
    let dir = results_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.md"));
    std::fs::write(&path, markdown).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `part / whole` with two decimals, or a dash where a ratio means
/// nothing (a figure missing, or not positive: e.g. a latency "added" that
/// came out negative because direct was unlucky).
pub fn ratio(part: Option<f64>, whole: Option<f64>) -> String {
    match (part, whole) {
        (Some(p), Some(w)) if p > 0.0 && w > 0.0 => format!("{:.2}", p / w),
        _ => "–".into(),
    }
}

/// A row of a report's Targets table: the target, what was measured, and
/// the verdict (`None`: not measured in this run).
pub fn target_row(name: &str, measured: String, met: Option<bool>) -> String {
    let verdict = match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    };
    format!("| {name} | {measured} | {verdict} |")
}
