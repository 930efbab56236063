//! Configuration: the TOML file that is pulsegate's user interface.
//!
//! The shape (`[[listener]]`, `[listener.liveness]`, `[listener.upstream]`,
//! `[listener.client]`) is the contract documented in README.md, section Configuration. serde checks
//! keys and types (unknown keys are refused), `validate` checks values and
//! cross-field rules, and every problem of both is reported at once, each
//! with the file, line, key and a one-line fix.
//!
//! `config` imports nothing from the rest of the crate: it is the leaf of
//! the module graph, and parses its own values (`expect_status` too).

mod bounds;
mod decode;
mod error;
mod expect_status;
mod key_path;
mod validate;

pub use bounds::Warning;
pub use error::{ConfigError, Problem};
pub use expect_status::parse_status_ranges;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// One `[[listener]]` table per proxied service.
    #[serde(rename = "listener", default)]
    pub listeners: Vec<ListenerConfig>,
    /// `[admin]`: the admin HTTP server (absent: no admin server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
}

/// `[admin]`: metrics, health, status, drain and reload over HTTP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback by default: the admin API can drain the proxy.
    #[serde(default = "defaults::admin_bind")]
    pub bind: String,
    /// A file holding the bearer token (trailing newline ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
    /// An environment variable holding the bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// Whether `/metrics` needs the token too (`/healthz` and `/readyz`
    /// never do: kubelet probes send none).
    #[serde(default = "defaults::yes")]
    pub token_protects_metrics: bool,
    /// Serve a bind reachable from other hosts without a token. Anyone who
    /// reaches the port can then drain (stop) or reload the proxy; refused
    /// unless this says the risk is accepted (`check` still warns).
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// How many recent evictions `/status` shows.
    #[serde(default = "defaults::recent_evictions")]
    pub recent_evictions: usize,
    /// Deadline for a whole admin request, headers and body included.
    #[serde(default = "defaults::admin_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// What a listener's backends speak, as far as pulsegate looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Bytes: relayed, never read.
    #[default]
    Tcp,
    /// PostgreSQL: cancel requests go to the server that runs the session
    /// they cancel.
    Postgres,
}

/// A PROXY protocol version to write on upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header: `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// The binary header.
    V2,
}

/// What `/readyz` needs from a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// Ready only while a new connection would find a usable backend.
    #[default]
    Backend,
    /// Ready while listening, whatever its backends' health.
    Always,
}

/// One `[[listener]]`: a bind address and the backends it forwards to.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    /// Kept as text until `validate` so that a bad address is reported with
    /// the others instead of stopping the decoder.
    pub bind: String,
    /// Backends in failover order: `host:port`, `[v6]:port` or `name:port`.
    pub backends: Vec<String>,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: NonZeroU32,
    /// The listening socket's accept queue (`listen(2)`'s backlog): how
    /// many clients may finish their handshake before pulsegate accepts
    /// them. A pool reconnecting at once after an eviction or a failover
    /// arrives as a burst; a burst above the queue loses SYNs, and each
    /// client so dropped waits a 1 s SYN retransmission. The kernel caps it
    /// at `net.core.somaxconn`.
    #[serde(default = "defaults::backlog")]
    pub backlog: u32,
    #[serde(default)]
    pub on_evict: OnEvict,
    #[serde(default = "defaults::drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Backends named by host name are re-resolved this often (and at once
    /// when one turns suspect); managed databases fail over by moving a name.
    #[serde(default = "defaults::resolve_interval", with = "humantime_serde")]
    pub resolve_interval: Duration,
    #[serde(default)]
    pub liveness: Liveness,
    #[serde(default)]
    pub upstream: SocketSettings,
    #[serde(default)]
    pub client: SocketSettings,
    /// `[listener.check]`: health checks of each backend (absent: none, every
    /// backend counts as up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckConfig>,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub pool: PoolConfig,
    /// What `/readyz` needs from this listener.
    #[serde(default)]
    pub readiness: Readiness,
    /// What the backends speak, when pulsegate should know it without a
    /// check of that kind (a `postgres` check implies `postgres`).
    #[serde(default)]
    pub protocol: Protocol,
    /// Every client connection starts with a PROXY protocol header (v1 or
    /// v2) from a load balancer; its source becomes the client's address.
    #[serde(default)]
    pub accept_proxy: bool,
    /// With `accept_proxy`: how long a client may take to send its header.
    #[serde(default = "defaults::proxy_header_timeout", with = "humantime_serde")]
    pub proxy_header_timeout: Duration,
    /// Write a PROXY protocol header of this version on each upstream
    /// connection (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_proxy: Option<ProxyVersion>,
}

/// `[listener.pool]`: pre-connected spare upstream connections per backend,
/// probed while idle, handed to new clients without a connect round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Spare connections kept per backend; 0 disables the pool.
    #[serde(default)]
    pub min_idle: u32,
    /// A spare connection older than this is closed and replaced: keep it
    /// below the backend's own handshake timeout (PostgreSQL's
    /// `authentication_timeout` is 60 s, MySQL's `connect_timeout` 10 s).
    #[serde(default = "defaults::max_idle_age", with = "humantime_serde")]
    pub max_idle_age: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_idle: 0,
            max_idle_age: defaults::max_idle_age(),
        }
    }
}

/// `[listener.check]`: how each backend is health-checked, on a fresh
/// connection every `interval` (± `jitter`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    pub kind: CheckKind,
    #[serde(default = "defaults::check_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "defaults::check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    #[serde(default = "defaults::rise")]
    pub rise: NonZeroU32,
    /// Consecutive failures that bring an up backend down.
    #[serde(default = "defaults::fall")]
    pub fall: NonZeroU32,
    /// Each check waits `interval` ± a random part of this, so checks of
    /// many proxies do not hit a backend in lockstep.
    #[serde(default = "defaults::check_jitter", with = "humantime_serde")]
    pub jitter: Duration,
    /// postgres / mysql / redis: log in as this user (redis: ACL user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The password, inline. Prefer `password_env` or `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Name of an environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// A file holding the password (trailing newline ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<std::path::PathBuf>,
    /// postgres / mysql: the database to connect to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// http: the path to GET.
    #[serde(default = "defaults::http_path")]
    pub path: String,
    /// http: accepted status codes, e.g. "200-399" or "200".
    #[serde(default = "defaults::expect_status")]
    pub expect_status: String,
    /// http: the Host header (default: the backend address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// What a check speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Tcp,
    Postgres,
    Mysql,
    Redis,
    Http,
}

/// `[listener.routing]`: where new connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    #[serde(default)]
    pub balance: Balance,
    /// Only backends whose last check reported this role (postgres, redis).
    #[serde(default)]
    pub role: RoleWanted,
    #[serde(default)]
    pub on_down: OnDown,
    /// Sessions with data in flight to a down backend get this long.
    #[serde(default = "defaults::down_grace", with = "humantime_serde")]
    pub down_grace: Duration,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            balance: Balance::default(),
            role: RoleWanted::default(),
            on_down: OnDown::default(),
            down_grace: defaults::down_grace(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The first healthy backend in configured order (failover).
    #[default]
    FirstHealthy,
    RoundRobin,
    LeastConnections,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleWanted {
    #[default]
    Any,
    Primary,
    Replica,
}

/// What happens to the sessions of a backend that goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// Idle sessions at once, sessions with data in flight after `down_grace`.
    #[default]
    Evict,
    /// Leave sessions alone (only new connections go elsewhere).
    Keep,
}

/// `[listener.liveness]`: the watcher's on-demand probes and death rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Liveness {
    /// An idle leg is probed (TCP_KEEPIDLE re-arm) after this much quiet, and
    /// again every `probe_interval` while it stays quiet. Whole seconds: the
    /// kernel's keepalive timer counts seconds.
    #[serde(default = "defaults::probe_interval", with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A leg that owes an ACK (data in flight or a probe out) and receives
    /// none for this long is dead.
    #[serde(default = "defaults::dead_after", with = "humantime_serde")]
    pub dead_after: Duration,
}

/// `[listener.upstream]` and `[listener.client]`: kernel socket options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SocketSettings {
    /// Kernel keepalive when pulsegate is not probing (whole seconds).
    #[serde(default = "defaults::keepalive_idle", with = "humantime_serde")]
    pub keepalive_idle: Duration,
    #[serde(default = "defaults::keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(default = "defaults::keepalive_count")]
    pub keepalive_count: u32,
    /// TCP_USER_TIMEOUT: the kernel's backstop. It also aborts a live peer
    /// that stops reading for this long, so keep it above any reader stall
    /// you tolerate.
    #[serde(default = "defaults::user_timeout", with = "humantime_serde")]
    pub user_timeout: Duration,
    #[serde(default = "defaults::nodelay")]
    pub nodelay: bool,
}

/// What happens to the surviving leg when the other one is evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnEvict {
    /// SO_LINGER 0 then close: the peer gets RST and its pool reconnects at once.
    #[default]
    Reset,
    /// An orderly close (FIN).
    Close,
}

/// A backend address as written: an IP socket address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendAddr {
    Ip(SocketAddr),
    Dns { host: String, port: u16 },
}

impl FromStr for BackendAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(BackendAddr::Ip(addr));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` has no port; write it as host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{s}`: port `{port}` is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(format!("`{s}`: port 0 cannot be connected to"));
        }
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(valid_label) {
            return Err(format!(
                "`{s}` is neither an IP address with a port nor a valid host name \
                 (IPv6 is written [::1]:5432)"
            ));
        }
        Ok(BackendAddr::Dns {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddr::Ip(addr) => write!(f, "{addr}"),
            BackendAddr::Dns { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            probe_interval: defaults::probe_interval(),
            dead_after: defaults::dead_after(),
        }
    }
}

impl Liveness {
    /// How often the watcher samples TCP_INFO: half the shorter of the two
    /// settings, so that a decision is late by at most that much.
    pub fn sweep_period(&self) -> Duration {
        (self.probe_interval.min(self.dead_after) / 2).max(Duration::from_millis(50))
    }
}

impl Default for SocketSettings {
    fn default() -> Self {
        SocketSettings {
            keepalive_idle: defaults::keepalive_idle(),
            keepalive_interval: defaults::keepalive_interval(),
            keepalive_count: defaults::keepalive_count(),
            user_timeout: defaults::user_timeout(),
            nodelay: defaults::nodelay(),
        }
    }
}

/// Defaults that are safe in production: detection in seconds, and a kernel
/// backstop loose enough not to abort a slow reader.
pub mod defaults {
    use std::num::NonZeroU32;
    use std::time::Duration;

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn max_connections() -> NonZeroU32 {
        NonZeroU32::new(10_000).expect("non-zero literal")
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn probe_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn dead_after() -> Duration {
        Duration::from_secs(3)
    }
    pub fn keepalive_idle() -> Duration {
        Duration::from_secs(5)
    }
    pub fn keepalive_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn keepalive_count() -> u32 {
        3
    }
    pub fn user_timeout() -> Duration {
        Duration::from_secs(120)
    }
    pub fn nodelay() -> bool {
        true
    }
    pub fn check_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn check_timeout() -> Duration {
        Duration::from_millis(800)
    }
    pub fn check_jitter() -> Duration {
        Duration::from_millis(100)
    }
    pub fn rise() -> NonZeroU32 {
        NonZeroU32::new(2).expect("non-zero literal")
    }
    pub fn fall() -> NonZeroU32 {
        NonZeroU32::new(2).expect("non-zero literal")
    }
    pub fn max_idle_age() -> Duration {
        Duration::from_secs(30)
    }
    pub fn resolve_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn down_grace() -> Duration {
        Duration::from_secs(5)
    }
    pub fn backlog() -> u32 {
        4096
    }
    pub fn proxy_header_timeout() -> Duration {
        Duration::from_secs(3)
    }
    pub fn admin_bind() -> String {
        "127.0.0.1:9900".to_string()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn recent_evictions() -> usize {
        100
    }
    pub fn admin_request_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn http_path() -> String {
        "/".to_string()
    }
    pub fn expect_status() -> String {
        "200-399".to_string()
    }
}

/// A listener whose addresses have been checked and parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub backends: Vec<BackendAddr>,
    pub settings: ListenerSettings,
}

impl Listener {
    /// The `[[listener]]` table this listener is written as (a config
    /// built in code, e.g. for tests, renders its effective TOML from it).
    pub fn written(&self) -> ListenerConfig {
        let s = self.settings.clone();
        ListenerConfig {
            name: self.name.clone(),
            bind: self.bind.to_string(),
            backends: self.backends.iter().map(ToString::to_string).collect(),
            connect_timeout: s.connect_timeout,
            max_connections: s.max_connections,
            backlog: s.backlog,
            on_evict: s.on_evict,
            drain_timeout: s.drain_timeout,
            resolve_interval: s.resolve_interval,
            liveness: s.liveness,
            upstream: s.upstream,
            client: s.client,
            check: s.check,
            routing: s.routing,
            pool: s.pool,
            readiness: s.readiness,
            protocol: s.protocol,
            accept_proxy: s.accept_proxy,
            proxy_header_timeout: s.proxy_header_timeout,
            send_proxy: s.send_proxy,
        }
    }
}

/// A validated listener's settings: everything of its `[[listener]]` but
/// the name and addresses, which [`Listener`] holds parsed (so the text as
/// written cannot be used by mistake).
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerSettings {
    pub connect_timeout: Duration,
    pub max_connections: NonZeroU32,
    pub backlog: u32,
    pub on_evict: OnEvict,
    pub drain_timeout: Duration,
    pub resolve_interval: Duration,
    pub liveness: Liveness,
    pub upstream: SocketSettings,
    pub client: SocketSettings,
    pub check: Option<CheckConfig>,
    pub routing: Routing,
    pub pool: PoolConfig,
    pub readiness: Readiness,
    pub protocol: Protocol,
    pub accept_proxy: bool,
    pub proxy_header_timeout: Duration,
    pub send_proxy: Option<ProxyVersion>,
}

impl ListenerSettings {
    /// The settings of a `[[listener]]` as written (its addresses are
    /// validated apart).
    pub(crate) fn of(raw: &ListenerConfig) -> Self {
        let ListenerConfig {
            name: _,
            bind: _,
            backends: _,
            connect_timeout,
            max_connections,
            backlog,
            on_evict,
            drain_timeout,
            resolve_interval,
            liveness,
            upstream,
            client,
            check,
            routing,
            pool,
            readiness,
            protocol,
            accept_proxy,
            proxy_header_timeout,
            send_proxy,
        } = raw.clone();
        ListenerSettings {
            connect_timeout,
            max_connections,
            backlog,
            on_evict,
            drain_timeout,
            resolve_interval,
            liveness,
            upstream,
            client,
            check,
            routing,
            pool,
            readiness,
            protocol,
            accept_proxy,
            proxy_header_timeout,
            send_proxy,
        }
    }
}

/// A config that passed `validate`: the only kind the proxy accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidConfig {
    pub raw: Config,
    pub listeners: Vec<Listener>,
    /// The admin server's address, when `[admin]` is present.
    pub admin_bind: Option<SocketAddr>,
    pub warnings: Vec<Warning>,
}

impl ValidConfig {
    /// The effective configuration, every default filled in, as TOML.
    pub fn effective_toml(&self) -> String {
        toml::to_string_pretty(&self.raw).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<ValidConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates config text; `origin` names it in messages.
pub fn parse(text: &str, origin: &str) -> Result<ValidConfig, ConfigError> {
    validate::parse_and_validate(text, origin)
}
