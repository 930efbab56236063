//! What the admin server may ask of the running proxy.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use hyper::StatusCode;
use subtle::ConstantTimeEq;

/// An answer to an admin request: a status code and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

impl Reply {
    pub fn ok(body: serde_json::Value) -> Self {
        Reply {
            status: StatusCode::OK,
            body,
        }
    }

    /// A short JSON error: `{"error": message}`.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Reply {
            status,
            body: serde_json::json!({ "error": message.into() }),
        }
    }
}

/// The proxy as the admin server sees it. Every method returns quickly;
/// none blocks on the data path.
pub trait Control: Send + Sync + 'static {
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
    /// 200 with a JSON document of listeners, backends, sessions, recent
    /// evictions, config generation and last reload error.
    fn status(&self) -> Reply;
    /// 200 when every listener that asks for it has a usable backend (and
    /// the proxy is not draining), else 503 with the reasons.
    fn ready(&self) -> Reply;
    /// Stops accepting and lets sessions finish; then exits when
    /// `then_exit`, or stays up (drained) otherwise. 202.
    fn drain(&self, then_exit: bool) -> Reply;
    /// Re-reads and applies the config file: 200 with what changed, 400
    /// with the problems (nothing changed), 409 while draining.
    fn reload(&self) -> Pin<Box<dyn Future<Output = Reply> + Send + '_>>;
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
