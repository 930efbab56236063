//! PLACEHOLDER: the admin server is being written. Serves nothing yet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Control, Token};

/// How the admin server runs.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub bind: SocketAddr,
    pub token: Option<Token>,
    /// When false, `/metrics` is served without the token (Prometheus
    /// scrapes by pod annotation cannot send one).
    pub token_protects_metrics: bool,
    /// Whole-request deadline, including reading the headers and body.
    pub request_timeout: Duration,
    /// Requests bodies above this are refused with 413.
    pub max_body_bytes: usize,
    /// Admin connections served at once; more wait in the accept queue.
    pub max_connections: usize,
}

/// Serves admin requests on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    settings: AdminSettings,
    control: Arc<dyn Control>,
    shutdown: CancellationToken,
) {
    let _ = (listener, settings, control);
    shutdown.cancelled().await;
}
