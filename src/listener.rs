//! The accept loop of one listener: socket options, `max_connections`, and
//! survival of EMFILE/ENFILE without spinning.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::BackendSet;
use crate::config::Listener;
use crate::health::monitor::Monitor;
use crate::liveness;
use crate::pool::Pool;
use crate::resolver::Resolver;
use crate::session::{self, ListenerContext};
use crate::sockopt;

/// How long the accept loop pauses when the process is out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Refusals and accept errors are summarised at most this often.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Serves one bound listener until `shutdown` is cancelled, then drains:
/// sessions may finish until `drain_timeout`, after which the rest are
/// evicted with reason `drain`. Returns when every session has ended.
pub async fn serve(config: Listener, tcp: TcpListener, shutdown: CancellationToken) {
    let settings = &config.settings;
    let backends = Arc::new(BackendSet::new(&config));
    let ctx = Arc::new(ListenerContext {
        name: Arc::from(config.name.as_str()),
        watcher: liveness::spawn_watcher(
            settings.liveness,
            settings.upstream,
            settings.client,
            backends.clone(),
        ),
        pool: Pool::new(&config),
        backends,
        drain_deadline: CancellationToken::new(),
        config: config.clone(),
    });
    let checks_stop = CancellationToken::new();
    start_monitors(&ctx, &checks_stop);
    let limit = Arc::new(Semaphore::new(settings.max_connections.get() as usize));
    let sessions = TaskTracker::new();
    tracing::info!(listener = %ctx.name, bind = %config.bind,
        backends = ?config.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(), "listening");

    accept_loop(&ctx, &tcp, &limit, &sessions, &shutdown).await;
    drop(tcp);
    sessions.close();
    let open = sessions.len();
    if open > 0 {
        tracing::info!(listener = %ctx.name, sessions = open,
            drain_timeout = %humantime::format_duration(settings.drain_timeout),
            "stopped accepting; draining sessions");
    }
    if tokio::time::timeout(settings.drain_timeout, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(listener = %ctx.name, sessions = sessions.len(),
            "drain_timeout passed; closing remaining sessions");
        ctx.drain_deadline.cancel();
        sessions.wait().await;
    }
    checks_stop.cancel();
    tracing::info!(listener = %ctx.name, "listener stopped");
}

/// One resolver per DNS-named backend, and one check loop per backend when
/// `[listener.check]` is configured.
fn start_monitors(ctx: &Arc<ListenerContext>, stop: &CancellationToken) {
    for backend in 0..ctx.backends.len() {
        let resolver = Resolver {
            listener: ctx.name.clone(),
            backends: ctx.backends.clone(),
            backend,
            interval: ctx.config.settings.resolve_interval,
            routing: ctx.config.settings.routing,
            watcher: ctx.watcher.clone(),
        };
        tokio::spawn(resolver.run(stop.clone()));
    }
    if let Some(pool) = &ctx.pool {
        for backend in 0..ctx.backends.len() {
            tokio::spawn(pool.clone().tend(
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
    for backend in 0..ctx.backends.len() {
        let monitor = Monitor {
            listener: ctx.name.clone(),
            backends: ctx.backends.clone(),
            backend,
            check: check.clone(),
            routing: ctx.config.settings.routing,
            watcher: ctx.watcher.clone(),
        };
        tokio::spawn(monitor.run(stop.clone()));
    }
}

async fn accept_loop(
    ctx: &Arc<ListenerContext>,
    tcp: &TcpListener,
    limit: &Arc<Semaphore>,
    sessions: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let mut refused = Burst::default();
    let mut failures = Burst::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = tcp.accept() => accepted,
        };
        let (client, client_addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                if is_resource_exhaustion(&e) {
                    if failures.hit() {
                        tracing::error!(listener = %ctx.name, error = %e, count = failures.take(),
                            "cannot accept: out of file descriptors or memory; pausing accepts");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                } else {
                    tracing::debug!(listener = %ctx.name, error = %e, "accept failed");
                }
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            let _ = sockopt::set_reset_on_close(&client);
            drop(client);
            if refused.hit() {
                tracing::warn!(listener = %ctx.name, refused = refused.take(),
                    max_connections = ctx.config.settings.max_connections.get(),
                    "refusing clients: max_connections reached");
            }
            continue;
        };
        let ctx = ctx.clone();
        sessions.spawn(async move {
            session::run(client, client_addr, ctx).await;
            drop(permit);
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
