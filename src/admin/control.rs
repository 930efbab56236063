//! What the admin server may ask of the running proxy, and the answers it
//! gets: domain values (a readiness, a reload summary or error), never
//! HTTP. [`super::routes`] alone turns them into status codes and bodies.

use std::fmt;
use std::future::Future;

use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::config::ConfigError;

/// The proxy as the admin server sees it. Every method but `reload`
/// returns at once; none blocks on the data path.
pub trait Control: Send + Sync + 'static {
    /// The `/status` document.
    type Status: Serialize;

    /// Prometheus text exposition.
    fn metrics(&self) -> String;
    /// Listeners, backends, sessions, recent evictions, config generation
    /// and the last reload.
    fn status(&self) -> Self::Status;
    /// Whether every listener that asks for it has a usable backend (and
    /// the proxy is not draining).
    fn readiness(&self) -> Readiness;
    /// Stops accepting and lets sessions finish; then exits, or stays up
    /// drained.
    fn drain(&self, then: AfterDrain);
    /// Re-reads and applies the config file.
    fn reload(&self) -> impl Future<Output = Result<ReloadSummary, ReloadError>> + Send;
}

/// Whether the proxy takes new clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Why not, one line per reason.
    NotReady(Vec<String>),
}

/// What the process does once a drain is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterDrain {
    /// The default: a drain is how the proxy stops.
    Exit,
    /// Stay up drained (the admin server still answers) until told to exit.
    Stay,
}

/// What a reload changed, by listener name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadSummary {
    pub generation: u64,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Settings that a reload does not apply (they need a restart).
    pub notes: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the new config is invalid; the running config stays:\n{0}")]
    Invalid(#[from] ConfigError),
    /// Valid, but it cannot be served (a new address cannot be bound).
    #[error("the new config cannot be applied; the running config stays: {0}")]
    Apply(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("draining: reloads are refused once a drain has begun")]
    Draining,
    #[error("no config file to reload from (the proxy was started from a config in memory)")]
    NoFile,
    /// The reload task did not finish (it panicked, or the runtime is
    /// shutting down).
    #[error("the reload did not finish: {0}")]
    Interrupted(String),
}

/// The admin bearer token. Compared in constant time; never printed.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl Token {
    /// A token from its text, trimmed of surrounding whitespace (files
    /// usually end with a newline). `None` if it is empty.
    pub fn new(text: &str) -> Option<Self> {
        let t = text.trim();
        (!t.is_empty()).then(|| Token(t.as_bytes().to_vec()))
    }

    /// Whether `presented` is this token, in time that does not depend on
    /// where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.ct_eq(presented).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}
