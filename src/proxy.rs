//! The proxy as a whole: bind every listener first (so a config that cannot
//! be served is refused before anything starts), then serve them all until
//! shutdown.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Listener, ValidConfig};
use crate::listener;

/// A listener's address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("listener `{name}`: cannot bind {bind}: {source}")]
pub struct BindError {
    pub name: String,
    pub bind: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// Binds every listener of the config; fails if any one cannot be bound.
pub async fn bind_all(config: &ValidConfig) -> Result<Vec<(Listener, TcpListener)>, BindError> {
    let mut bound = Vec::new();
    for l in &config.listeners {
        let tcp = TcpListener::bind(l.bind)
            .await
            .map_err(|source| BindError {
                name: l.name.clone(),
                bind: l.bind,
                source,
            })?;
        bound.push((l.clone(), tcp));
    }
    Ok(bound)
}

/// Serves already-bound listeners until `shutdown` is cancelled and every
/// listener has drained.
pub async fn serve(bound: Vec<(Listener, TcpListener)>, shutdown: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    for (config, tcp) in bound {
        tasks.spawn(listener::serve(config, tcp, shutdown.clone()));
    }
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            tracing::error!(error = %e, "a listener task failed");
        }
    }
}
