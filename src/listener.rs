//! One listener: the accept loop, `max_connections`, survival of
//! EMFILE/ENFILE without spinning, config reloads, and the drain.
//!
//! A reload that keeps a listener's name and bind address is applied in
//! place as a new *generation*: new sessions use the new settings and
//! backend list; backends kept by the reload keep their health state and
//! their sessions (handed to the new watcher); sessions to removed backends
//! are evicted with reason `backend_removed`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::BackendSet;
use crate::config::Listener;
use crate::health::hint::ReadOnlySign;
use crate::health::monitor::Monitor;
use crate::liveness;
use crate::pool::Pool;
use crate::registry::Registry;
use crate::resolver::Resolver;
use crate::routing::Router;
use crate::session::{self, ListenerContext, ListenerShared};
use crate::sockopt;
use crate::telemetry::metrics::Refusal;

/// How long the accept loop pauses when the process is out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Refusals and accept errors are summarised at most this often.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// A running listener's instance number, unique in the process.
static INSTANCES: AtomicU64 = AtomicU64::new(1);

/// What a listener task is given.
pub struct ListenerTask {
    pub config: Listener,
    pub tcp: TcpListener,
    /// Stop accepting and drain (shutdown, or the listener was removed).
    pub stop: CancellationToken,
    /// New configs for this listener (same name and bind), each with a
    /// channel to say it was applied.
    pub updates: mpsc::UnboundedReceiver<Update>,
    pub registry: Arc<Registry>,
}

/// A new config for a running listener; `applied` is told once new
/// sessions use it.
pub struct Update {
    pub config: Listener,
    pub applied: oneshot::Sender<()>,
}

/// One config generation of a listener and the tasks that serve it.
struct Generation {
    ctx: Arc<ListenerContext>,
    /// Stops its health checks, resolvers and pool tending.
    monitors: CancellationToken,
}

/// How long a stopped listener waits for its background tasks (checks,
/// resolvers, pool tending, watchers) once its sessions are gone; they
/// stop within moments of being told.
const TASKS_STOP_TIMEOUT: Duration = Duration::from_secs(2);

impl Generation {
    fn start(
        config: Listener,
        tcp: &TcpListener,
        shared: &Arc<ListenerShared>,
        previous: Option<&Generation>,
        tasks: &TaskTracker,
    ) -> Self {
        let settings = &config.settings;
        let client_options_preset = preset_client_options(tcp, &config);
        let backends = Arc::new(BackendSet::renewed(
            &config,
            previous.map(|p| &*p.ctx.backends),
        ));
        let ctx = Arc::new(ListenerContext {
            name: shared.name.clone(),
            bound: tcp.local_addr().unwrap_or(config.bind),
            watcher: liveness::spawn_watcher(
                settings.liveness,
                settings.upstream,
                settings.client,
                backends.clone(),
                shared.meters.clone(),
                shared.suspicions.clone(),
                tasks,
            ),
            pool: Pool::new(&config),
            router: Router::new(settings.routing),
            read_only_sign: ReadOnlySign::for_listener(
                settings.check.as_ref(),
                settings.routing.role,
            ),
            backends,
            shared: shared.clone(),
            client_options_preset,
            config,
        });
        let monitors = CancellationToken::new();
        start_monitors(&ctx, &monitors, tasks);
        Generation { ctx, monitors }
    }

    /// Ends this generation in favour of `next`: its sessions move to the
    /// next watcher, its checks and spares stop.
    fn retire(self, next: &Generation) {
        let old = &self.ctx.backends;
        let new = &next.ctx.backends;
        let remap = old.remap_to(new);
        old.retire_missing(new);
        self.ctx.watcher.hand_over(
            next.ctx.watcher.clone(),
            remap,
            next.ctx.config.settings.routing.down_grace,
        );
        self.monitors.cancel();
        if let Some(pool) = &self.ctx.pool {
            pool.close_all();
        }
    }
}

/// Serves one bound listener until `stop` is cancelled, applying the
/// updates it is sent, then drains: sessions may finish until
/// `drain_timeout`, after which the rest are evicted with reason `drain`.
/// Returns when every session has ended.
///
/// The listener is started and published in the registry before this
/// returns its future, so whoever started it (a reload) sees it in
/// `/status` at once.
pub fn serve(task: ListenerTask) -> impl std::future::Future<Output = ()> {
    let ListenerTask {
        config,
        tcp,
        stop,
        updates,
        registry,
    } = task;
    let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::new(ListenerShared::new(&config.name, registry.clone()));
    // Every generation's background tasks, so the listener ends only after
    // they have.
    let tasks = TaskTracker::new();
    let current = Generation::start(config, &tcp, &shared, None, &tasks);
    registry.publish(instance, current.ctx.clone());
    let cfg = &current.ctx.config;
    tracing::info!(listener = %shared.name, bind = %current.ctx.bound,
        backends = ?cfg.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(), "listening");
    let started = Started {
        instance,
        current,
        tcp,
        stop,
        updates,
        registry,
        shared,
        tasks,
    };
    started.run()
}

/// A listener started and published, before its accept loop runs.
struct Started {
    instance: u64,
    current: Generation,
    tcp: TcpListener,
    stop: CancellationToken,
    updates: mpsc::UnboundedReceiver<Update>,
    registry: Arc<Registry>,
    shared: Arc<ListenerShared>,
    /// Every generation's background tasks.
    tasks: TaskTracker,
}

impl Started {
    /// The accept loop, then the drain.
    async fn run(self) {
        let Started {
            instance,
            mut current,
            tcp,
            stop,
            mut updates,
            registry,
            shared,
            tasks,
        } = self;
        let sessions = TaskTracker::new();
        let mut accepting = Accepting::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                update = updates.recv() => match update {
                    Some(Update { config, applied }) => {
                        current = apply(current, config, &tcp, &shared, &tasks);
                        registry.publish(instance, current.ctx.clone());
                        let _ = applied.send(());
                    }
                    None => break,
                },
                _ = accepting.next(&current.ctx, &tcp, &sessions) => {}
            }
        }
        drop(tcp);
        shared.set_draining();
        drain(&current.ctx, &sessions).await;
        current.monitors.cancel();
        registry.withdraw(instance, &shared.name);
        drop(current);
        tasks.close();
        if tokio::time::timeout(TASKS_STOP_TIMEOUT, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(listener = %shared.name, tasks = tasks.len(),
            "background tasks still running after the listener stopped");
        }
        tracing::info!(listener = %shared.name, "listener stopped");
    }
}

/// Moves the listener to a new generation built from `config`.
fn apply(
    current: Generation,
    config: Listener,
    tcp: &TcpListener,
    shared: &Arc<ListenerShared>,
    tasks: &TaskTracker,
) -> Generation {
    if config.settings.backlog != current.ctx.config.settings.backlog {
        match sockopt::set_backlog(tcp, config.settings.backlog) {
            Ok(()) => warn_if_backlog_capped(&config),
            Err(e) => tracing::warn!(listener = %shared.name, error = %e,
                backlog = config.settings.backlog, "cannot change the accept queue's backlog; \
                 the old one stays until a restart"),
        }
    }
    let next = Generation::start(config, tcp, shared, Some(&current), tasks);
    tracing::info!(listener = %shared.name,
        backends = ?next.ctx.config.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        "listener reconfigured");
    current.retire(&next);
    next
}

/// Stops accepting (already done by the caller) and waits for the sessions,
/// evicting those still open at `drain_timeout`.
async fn drain(ctx: &ListenerContext, sessions: &TaskTracker) {
    let drain_timeout = ctx.config.settings.drain_timeout;
    sessions.close();
    let open = sessions.len();
    if open > 0 {
        tracing::info!(listener = %ctx.name, sessions = open,
            drain_timeout = %humantime::format_duration(drain_timeout),
            "stopped accepting; draining sessions");
    }
    if tokio::time::timeout(drain_timeout, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(listener = %ctx.name, sessions = sessions.len(),
            "drain_timeout passed; closing remaining sessions");
        ctx.shared.drain_deadline.cancel();
        sessions.wait().await;
    }
}

/// The kernel silently caps every backlog at `net.core.somaxconn` (128 on
/// kernels before 5.4): say so, since the queue is then smaller than the
/// config reads.
pub(crate) fn warn_if_backlog_capped(l: &Listener) {
    let backlog = l.settings.backlog;
    if let Some(cap) = sockopt::somaxconn().filter(|&cap| cap < backlog) {
        tracing::warn!(listener = %l.name, backlog, somaxconn = cap,
            "the kernel caps this listener's accept queue at net.core.somaxconn; \
             a reconnect burst above it loses SYNs (1 s retransmission each); \
             raise it with `sysctl -w net.core.somaxconn={backlog}`");
    }
}

/// Sets the client-leg options (keepalive, TCP_USER_TIMEOUT, TCP_NODELAY)
/// on the listening socket: Linux copies a listener's socket options into
/// each connection it accepts, so the six setsockopt calls per client are
/// made once per generation instead. A connection whose handshake finished
/// just before a reload changed them keeps the old values; it is accepted
/// within microseconds of the change. Returns false (each session then
/// sets them itself) if the listening socket refused one.
fn preset_client_options(tcp: &TcpListener, config: &Listener) -> bool {
    match sockopt::apply(tcp, &config.settings.client) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(listener = %config.name, error = %e,
                "cannot set client socket options on the listening socket; \
                 setting them on each accepted client instead");
            false
        }
    }
}

/// One resolver per DNS-named backend, a pool tender per backend when the
/// pool is on, and one check loop per backend when `[listener.check]` is
/// configured.
fn start_monitors(ctx: &Arc<ListenerContext>, stop: &CancellationToken, tasks: &TaskTracker) {
    for backend in ctx.backends.ids() {
        let resolver = Resolver {
            listener: ctx.name.clone(),
            backends: ctx.backends.clone(),
            backend,
            interval: ctx.config.settings.resolve_interval,
            routing: ctx.config.settings.routing,
            watcher: ctx.watcher.clone(),
        };
        tasks.spawn(resolver.run(stop.clone()));
    }
    if let Some(pool) = &ctx.pool {
        for backend in ctx.backends.ids() {
            tasks.spawn(pool.clone().tend(
                ctx.backends.clone(),
                backend,
                ctx.config.settings.upstream,
                ctx.config.settings.connect_timeout,
                stop.clone(),
            ));
        }
    }
    let Some(check) = &ctx.config.settings.check else {
        return;
    };
    let recheck = Arc::new(tokio::sync::Notify::new());
    for backend in ctx.backends.ids() {
        let monitor = Monitor {
            listener: ctx.name.clone(),
            backends: ctx.backends.clone(),
            backend,
            check: check.clone(),
            send_proxy: ctx.config.settings.send_proxy,
            routing: ctx.config.settings.routing,
            watcher: ctx.watcher.clone(),
            recheck: recheck.clone(),
        };
        tasks.spawn(monitor.run(stop.clone()));
    }
}

/// The accept side: what it remembers between accepts (log bursts).
#[derive(Default)]
struct Accepting {
    refused: Burst,
    failures: Burst,
}

impl Accepting {
    /// Accepts one client and starts its session, or refuses it. Cancel
    /// safe: a `select!` may drop it between accepts.
    async fn next(
        &mut self,
        ctx: &Arc<ListenerContext>,
        tcp: &TcpListener,
        sessions: &TaskTracker,
    ) {
        let (client, client_addr) = match tcp.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                if is_resource_exhaustion(&e) {
                    if self.failures.hit() {
                        tracing::error!(listener = %ctx.name, error = %e, count = self.failures.take(),
                            "cannot accept: out of file descriptors or memory; pausing accepts");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                } else {
                    tracing::debug!(listener = %ctx.name, error = %e, "accept failed");
                }
                return;
            }
        };
        let max = ctx.config.settings.max_connections.get() as usize;
        if ctx.shared.sessions() >= max {
            let _ = sockopt::set_reset_on_close(&client);
            drop(client);
            ctx.shared.meters.refused(Refusal::MaxConnections);
            if self.refused.hit() {
                tracing::warn!(listener = %ctx.name, refused = self.refused.take(),
                    max_connections = max, "refusing clients: max_connections reached");
            }
            return;
        }
        let counted = ctx.shared.accepted();
        let ctx = ctx.clone();
        sessions.spawn(async move {
            session::run(client, client_addr, ctx).await;
            drop(counted);
        });
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Counts events and says when to log them: once per burst, then at most
/// once per [`LOG_EVERY`] with the count since.
#[derive(Default)]
struct Burst {
    count: u64,
    last_log: Option<Instant>,
}

impl Burst {
    fn hit(&mut self) -> bool {
        self.count += 1;
        match self.last_log {
            Some(t) if t.elapsed() < LOG_EVERY => false,
            _ => {
                self.last_log = Some(Instant::now());
                true
            }
        }
    }

    fn take(&mut self) -> u64 {
        std::mem::take(&mut self.count)
    }
}
