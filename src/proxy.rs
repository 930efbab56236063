//! The proxy as a whole: binds every listener first (so a config that
//! cannot be served is refused before anything starts), serves them, and
//! applies reloads and drains — the operations the admin API and the
//! signals ask for.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::admin::{AfterDrain, ReloadError, ReloadSummary};
use crate::admin::{Control, Readiness};
use crate::config::{self, Listener, ValidConfig};
use crate::listener::{self, ListenerTask, Update};
use crate::registry::{status::Status, Registry};
use crate::sockopt;
use crate::telemetry::metrics;

/// How long a reload waits for a listener to take its new config.
const APPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    bind_each(config.listeners.iter()).await
}

async fn bind_each<'a>(
    listeners: impl Iterator<Item = &'a Listener>,
) -> Result<Vec<(Listener, TcpListener)>, BindError> {
    let mut bound = Vec::new();
    for l in listeners {
        let tcp = sockopt::listen(l.bind, l.settings.backlog)
            .and_then(TcpListener::from_std)
            .map_err(|source| BindError {
                name: l.name.clone(),
                bind: l.bind,
                source,
            })?;
        listener::warn_if_backlog_capped(l);
        bound.push((l.clone(), tcp));
    }
    Ok(bound)
}

/// A listener task the proxy runs.
struct Running {
    config: Listener,
    updates: mpsc::UnboundedSender<Update>,
    stop: CancellationToken,
}

/// The running proxy.
pub struct Proxy {
    /// The config file reloads read.
    path: Option<PathBuf>,
    registry: Arc<Registry>,
    /// The running listeners by name, and the config they run; held for a
    /// whole reload so that reloads apply one at a time.
    state: Mutex<(HashMap<String, Running>, ValidConfig)>,
    tasks: TaskTracker,
    /// Cancelled by a drain: every listener stops accepting.
    drain: CancellationToken,
    exit_after_drain: AtomicBool,
    metrics: Option<PrometheusHandle>,
    /// Itself, so that a reload can run on its own task.
    me: std::sync::Weak<Proxy>,
}

impl Proxy {
    /// Starts serving already-bound listeners. `path` is the file that
    /// reloads re-read; `metrics` renders `/metrics` when installed.
    pub fn start(
        config: ValidConfig,
        bound: Vec<(Listener, TcpListener)>,
        path: Option<PathBuf>,
        metrics: Option<PrometheusHandle>,
    ) -> Arc<Proxy> {
        let keep = config
            .raw
            .admin
            .as_ref()
            .map_or(crate::config::defaults::recent_evictions(), |a| {
                a.recent_evictions
            });
        Arc::new_cyclic(|me| {
            let mut proxy = Proxy {
                path,
                registry: Arc::new(Registry::new(keep)),
                state: Mutex::new((HashMap::new(), config)),
                tasks: TaskTracker::new(),
                drain: CancellationToken::new(),
                exit_after_drain: AtomicBool::new(true),
                metrics,
                me: me.clone(),
            };
            metrics::config_generation(proxy.registry.generation());
            let running = bound
                .into_iter()
                .map(|(config, tcp)| {
                    let r = proxy.spawn_listener(config, tcp);
                    (r.config.name.clone(), r)
                })
                .collect();
            proxy.state.get_mut().0 = running;
            proxy
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    fn spawn_listener(&self, config: Listener, tcp: TcpListener) -> Running {
        let (updates, rx) = mpsc::unbounded_channel();
        let stop = self.drain.child_token();
        self.tasks.spawn(listener::serve(ListenerTask {
            config: config.clone(),
            tcp,
            stop: stop.clone(),
            updates: rx,
            registry: self.registry.clone(),
        }));
        Running {
            config,
            updates,
            stop,
        }
    }

    /// Re-reads the config file and applies it: listeners added, removed
    /// (drained) or changed in place. Nothing changes if the file is
    /// invalid or a new address cannot be bound.
    ///
    /// The reload runs to completion on its own task; the caller only waits
    /// for it. A caller that gives up (an admin request past its timeout)
    /// cannot leave the stored config and the listeners' generations half
    /// updated.
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        let Some(me) = self.me.upgrade() else {
            return Err(ReloadError::Interrupted("the proxy is stopping".into()));
        };
        tokio::spawn(async move { me.reload_to_completion().await })
            .await
            .unwrap_or_else(|e| Err(ReloadError::Interrupted(e.to_string())))
    }

    async fn reload_to_completion(&self) -> Result<ReloadSummary, ReloadError> {
        let result = self.try_reload().await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(ReloadError::Invalid(_)) => "invalid",
            Err(_) => "failed",
        };
        metrics::reload_result(outcome);
        match &result {
            Ok(summary) => {
                tracing::info!(generation = summary.generation, added = ?summary.added,
                    removed = ?summary.removed, changed = ?summary.changed, "config reloaded");
                for note in &summary.notes {
                    tracing::warn!("{note}");
                }
                self.registry.reload_done(None);
            }
            Err(e) => {
                tracing::error!("reload refused: {e}");
                self.registry.reload_done(Some(e.to_string()));
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<ReloadSummary, ReloadError> {
        if self.drain.is_cancelled() {
            return Err(ReloadError::Draining);
        }
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let new = config::load(path)?;
        let mut state = self.state.lock().await;
        let (running, current) = &mut *state;
        let plan = Plan::new(running, &new);
        // Bind first: if any new address is taken, nothing changes.
        let bound = bind_each(plan.to_bind.iter())
            .await
            .map_err(|e| ReloadError::Apply(Box::new(e)))?;
        let mut summary = ReloadSummary {
            added: plan.added,
            removed: plan.removed,
            changed: plan.changed,
            unchanged: plan.unchanged,
            ..ReloadSummary::default()
        };
        for name in &plan.to_stop {
            if let Some(old) = running.remove(name) {
                old.stop.cancel();
            }
        }
        for (config, tcp) in bound {
            let r = self.spawn_listener(config, tcp);
            running.insert(r.config.name.clone(), r);
        }
        let mut applied = Vec::new();
        for config in plan.to_update {
            if let Some(r) = running.get_mut(&config.name) {
                let (tx, rx) = oneshot::channel();
                // A send fails only if the task ended, i.e. it is draining.
                let _ = r.updates.send(Update {
                    config: config.clone(),
                    applied: tx,
                });
                applied.push(rx);
                r.config = config;
            }
        }
        // Answer once new sessions use the new config. A listener task
        // answers between two accepts; an error means it ended (drained).
        for rx in applied {
            let _ = tokio::time::timeout(APPLY_TIMEOUT, rx).await;
        }
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        if current.raw.admin != new.raw.admin {
            summary
                .notes
                .push("[admin] changed: admin settings apply at the next restart".to_string());
        }
        *current = new;
        summary.generation = self.registry.next_generation();
        metrics::config_generation(summary.generation);
        Ok(summary)
    }

    /// Stops accepting on every listener and lets sessions finish (each
    /// listener's `drain_timeout`); [`Proxy::drained`] resolves after.
    /// `then` says what the process does once drained; a drain that asked
    /// to stay is not undone by a later one that asks to exit.
    pub fn drain(&self, then: AfterDrain) {
        let then_exit = then == AfterDrain::Exit;
        if !then_exit {
            self.exit_after_drain.store(false, Ordering::Relaxed);
        }
        if !self.drain.is_cancelled() {
            tracing::info!(
                then_exit,
                "draining: stopped accepting, sessions may finish"
            );
        }
        self.registry.set_draining();
        self.drain.cancel();
    }

    /// Resolves once a drain has begun and every listener has drained.
    pub async fn drained(&self) {
        self.drain.cancelled().await;
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Whether the process should exit once drained (`POST /drain?then=stay`
    /// says no).
    pub fn exit_after_drain(&self) -> bool {
        self.exit_after_drain.load(Ordering::Relaxed)
    }
}

/// What a reload does to each listener.
#[derive(Default)]
struct Plan {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
    unchanged: Vec<String>,
    /// New listeners, and listeners whose bind address moved.
    to_bind: Vec<Listener>,
    /// Removed listeners, and the old instance of moved ones.
    to_stop: Vec<String>,
    /// Same name and bind, other settings changed: applied in place.
    to_update: Vec<Listener>,
}

impl Plan {
    fn new(running: &HashMap<String, Running>, new: &ValidConfig) -> Self {
        let mut plan = Plan::default();
        let wanted: BTreeMap<&str, &Listener> =
            new.listeners.iter().map(|l| (l.name.as_str(), l)).collect();
        let mut names: Vec<&String> = running.keys().collect();
        names.sort();
        for name in names {
            if !wanted.contains_key(name.as_str()) {
                plan.removed.push(name.clone());
                plan.to_stop.push(name.clone());
            }
        }
        for (name, l) in wanted {
            match running.get(name) {
                None => {
                    plan.added.push(name.to_string());
                    plan.to_bind.push(l.clone());
                }
                Some(r) if r.config == *l => plan.unchanged.push(name.to_string()),
                Some(r) if r.config.bind != l.bind => {
                    plan.changed.push(name.to_string());
                    plan.to_stop.push(name.to_string());
                    plan.to_bind.push(l.clone());
                }
                Some(_) => {
                    plan.changed.push(name.to_string());
                    plan.to_update.push(l.clone());
                }
            }
        }
        plan
    }
}

impl Control for Proxy {
    type Status = Status;

    fn metrics(&self) -> String {
        match &self.metrics {
            Some(handle) => handle.render(),
            None => "# metrics recorder not installed\n".to_string(),
        }
    }

    fn status(&self) -> Status {
        self.registry.status()
    }

    fn readiness(&self) -> Readiness {
        match self.registry.readiness() {
            Ok(()) => Readiness::Ready,
            Err(reasons) => Readiness::NotReady(reasons),
        }
    }

    fn drain(&self, then: AfterDrain) {
        Proxy::drain(self, then);
    }

    fn reload(&self) -> impl Future<Output = Result<ReloadSummary, ReloadError>> + Send {
        Proxy::reload(self)
    }
}

/// Serves already-bound listeners until `shutdown` is cancelled and every
/// listener has drained: the proxy without reloads or admin server, for
/// tests and embedding.
pub async fn serve(bound: Vec<(Listener, TcpListener)>, shutdown: CancellationToken) {
    let listeners: Vec<Listener> = bound.iter().map(|(l, _)| l.clone()).collect();
    let config = ValidConfig {
        raw: config::Config {
            listeners: listeners.iter().map(Listener::written).collect(),
            admin: None,
        },
        listeners,
        admin_bind: None,
        warnings: Vec::new(),
    };
    let proxy = Proxy::start(config, bound, None, None);
    shutdown.cancelled().await;
    proxy.drain(AfterDrain::Exit);
    proxy.drained().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener_config(port: u16, dead_after: &str) -> String {
        format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:{port}\"\nbackends = [\"127.0.0.1:9\"]\n\
             [listener.liveness]\ndead_after = \"{dead_after}\"\n"
        )
    }

    /// An admin request that times out drops its reload future; the reload
    /// must still finish, or the listener would run the new config while
    /// the stored config and the generation say the old one.
    #[tokio::test]
    async fn a_reload_whose_caller_gives_up_still_completes() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pulsegate.toml");
        std::fs::write(&path, listener_config(port, "3s")).unwrap();
        let config = config::load(&path).unwrap();
        let bound = bind_all(&config).await.unwrap();
        let proxy = Proxy::start(config, bound, Some(path.clone()), None);
        assert_eq!(proxy.registry().generation(), 1);

        std::fs::write(&path, listener_config(port, "1s")).unwrap();
        {
            let reload = proxy.reload();
            tokio::pin!(reload);
            // One poll, then the caller gives up.
            tokio::select! {
                biased;
                _ = &mut reload => panic!("the reload finished in one poll: this test proves nothing"),
                () = std::future::ready(()) => {}
            }
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        while proxy.registry().generation() != 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the abandoned reload never completed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let state = proxy.state.lock().await;
        assert_eq!(
            state.1.listeners[0].settings.liveness.dead_after,
            std::time::Duration::from_secs(1),
            "the stored config is the new one"
        );
        drop(state);
        proxy.drain(AfterDrain::Exit);
        proxy.drained().await;
    }
}
