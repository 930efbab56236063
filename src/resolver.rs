//! DNS following: a backend named by host name is re-resolved every
//! `resolve_interval` and at once when it turns suspect. A changed address
//! set takes effect for new connections at once; sessions to addresses that
//! left the set are evicted as `on_down` says (managed databases fail over
//! by moving a name, and a cached address is how a proxy stays on the old
//! writer).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::BackendSet;
use crate::config::{BackendAddr, OnDown, Routing};
use crate::liveness::WatcherHandle;
use crate::upstream;

/// The resolver of one DNS-named backend.
pub struct Resolver {
    pub listener: Arc<str>,
    pub backends: Arc<BackendSet>,
    pub backend: usize,
    pub interval: Duration,
    pub routing: Routing,
    pub watcher: WatcherHandle,
}

impl Resolver {
    /// Resolves at once, then every interval or on request, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let BackendAddr::Dns { .. } = self.backends.addr(self.backend) else {
            return; // an IP address never changes
        };
        loop {
            self.resolve_once().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.backends.resolve_requested(self.backend) => {}
            }
        }
    }

    async fn resolve_once(&self) {
        let label = self.backends.label(self.backend);
        let timeout = self.interval.max(Duration::from_secs(1));
        match upstream::resolve(self.backends.addr(self.backend), timeout).await {
            Ok(addrs) => {
                let before = self.backends.addresses(self.backend);
                let gone = self.backends.set_addresses(self.backend, addrs);
                let now = self.backends.addresses(self.backend);
                if now != before {
                    tracing::warn!(listener = %self.listener, backend = %label,
                        before = ?before, after = ?now, "backend name resolves to new addresses");
                }
                if !gone.is_empty() && self.routing.on_down == OnDown::Evict {
                    self.watcher
                        .evict_addresses(self.backend, gone, self.routing.down_grace);
                }
            }
            // Keep the last known addresses: a resolver hiccup is no reason
            // to stop connecting to a backend that may be fine.
            Err(e) => tracing::warn!(listener = %self.listener, backend = %label, error = %e,
                "cannot resolve backend name; keeping its last addresses"),
        }
    }
}
