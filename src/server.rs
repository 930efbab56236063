//! Startup: what `pulsegate run` does between binding its sockets and
//! exiting, as a library entry point that takes them already bound (as
//! mini-redis's `server::run(listener, shutdown)` does), so tests bind
//! port 0 and run several proxies in one process.
//!
//! [`run`] (or [`Server::start`], then [`Server::run`]) installs the metrics
//! recorder, serves the listeners and the admin API, applies reloads and
//! drains, and returns once the proxy is drained and should exit. The
//! binary keeps the command line, the signals and the exit codes: it turns
//! SIGTERM into the shutdown token and SIGHUP into [`Handle::reload`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminSettings, AfterDrain, ReloadError, ReloadSummary};
use crate::config::{Listener, ValidConfig};
use crate::proxy::{self, BindError, Proxy};
use crate::telemetry;

/// How often the histograms' memory is trimmed between scrapes.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// What a proxy serves, bound before anything starts: a config that cannot
/// be served is refused before a single client is accepted.
pub struct Bound {
    pub config: ValidConfig,
    /// Each `[[listener]]` with its listening socket.
    pub listeners: Vec<(Listener, TcpListener)>,
    /// The admin server's settings and socket, when `[admin]` is set.
    pub admin: Option<(AdminSettings, TcpListener)>,
}

/// A socket of the config could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Listener(#[from] BindError),
    #[error("admin server: cannot bind {bind}: {source}")]
    Admin {
        bind: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Bound {
    /// Binds every listener of `config`, then the admin server when
    /// `admin` is given.
    pub async fn bind(
        config: ValidConfig,
        admin: Option<AdminSettings>,
    ) -> Result<Bound, StartError> {
        let listeners = proxy::bind_all(&config).await?;
        let admin = match admin {
            Some(settings) => {
                let socket =
                    TcpListener::bind(settings.bind)
                        .await
                        .map_err(|source| StartError::Admin {
                            bind: settings.bind,
                            source,
                        })?;
                Some((settings, socket))
            }
            None => None,
        };
        Ok(Bound {
            config,
            listeners,
            admin,
        })
    }
}

/// Serves `bound` until the proxy is drained and should exit: after
/// `shutdown` is cancelled (a drain, then exit), or after `POST /drain`.
/// `config_path` is the file reloads re-read (`None`: reloads are refused).
pub async fn run(bound: Bound, config_path: Option<PathBuf>, shutdown: CancellationToken) {
    Server::start(bound, config_path).run(shutdown).await;
}

/// A running proxy and its admin server.
pub struct Server {
    proxy: Arc<Proxy>,
    admin: Option<JoinHandle<()>>,
    /// Stops the admin server and the metrics upkeep.
    stop: CancellationToken,
}

/// Asks a running [`Server`] for a reload or a drain (what SIGHUP and the
/// admin API ask for). Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    proxy: Arc<Proxy>,
}

impl Server {
    /// Starts serving: the metrics recorder (process-wide, installed once;
    /// every server of the process shares it), the listeners and the admin
    /// server. Must be called within a tokio runtime.
    pub fn start(bound: Bound, config_path: Option<PathBuf>) -> Server {
        let stop = CancellationToken::new();
        let metrics = match telemetry::metrics::install() {
            Ok(handle) => {
                tokio::spawn(metrics_upkeep(handle.clone(), stop.clone()));
                Some(handle)
            }
            Err(e) => {
                tracing::warn!("{e}; /metrics will be empty");
                None
            }
        };
        let proxy = Proxy::start(bound.config, bound.listeners, config_path, metrics);
        let admin = bound.admin.map(|(settings, socket)| {
            tokio::spawn(admin::serve(socket, settings, proxy.clone(), stop.clone()))
        });
        Server { proxy, admin, stop }
    }

    pub fn handle(&self) -> Handle {
        Handle {
            proxy: self.proxy.clone(),
        }
    }

    /// Serves until every listener has drained and the proxy should exit.
    /// A drain begins when `shutdown` is cancelled or the admin API asks
    /// for one; a drain that said `then=stay` keeps the admin server up
    /// until `shutdown` is cancelled. Returns once the admin server has
    /// stopped too.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => self.proxy.drain(AfterDrain::Exit),
            () = self.proxy.drained() => {}
        }
        self.proxy.drained().await;
        tracing::info!("all listeners drained");
        if !self.proxy.exit_after_drain() {
            tracing::info!("staying up drained (POST /drain?then=stay); SIGTERM exits");
            shutdown.cancelled().await;
        }
        self.stop.cancel();
        if let Some(admin) = self.admin {
            // It ends within its shutdown grace; a panic there was logged.
            let _ = admin.await;
        }
    }
}

impl Handle {
    /// Re-reads the config file and applies it; the outcome is also
    /// logged, counted and shown in `/status`.
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        self.proxy.reload().await
    }

    /// Begins a drain, as `POST /drain` does.
    pub fn drain(&self, then: AfterDrain) {
        self.proxy.drain(then);
    }
}

/// Keeps the histograms' memory bounded between scrapes.
async fn metrics_upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    let mut tick = tokio::time::interval(METRICS_UPKEEP);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}
