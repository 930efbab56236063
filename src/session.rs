//! One proxied session: connect upstream, relay both ways under the
//! watcher's eye, and end it cleanly or by eviction. What a listener
//! generation shows in `/status` is rendered in `session/status.rs`.

mod cancel;
mod proxy_protocol;
mod status;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendId, BackendSet};
use crate::config::{Listener, OnEvict};
use crate::evict::{self, EvictReason, Leg, SessionLabels, Verdict};
use crate::health::hint::{ReadOnlySign, ReplyWatch};
use crate::liveness::{Suspicions, Watched, WatcherHandle};
use crate::pool::Pool;
use crate::registry::Registry;
use crate::relay;
use crate::routing::Router;
use crate::sockopt;
use crate::telemetry::metrics::{ListenerMeters, Refusal};
use crate::upstream;
use proxy_protocol::ClientEnds;

/// What every session of one config generation of a listener shares. A
/// reload makes a new one; sessions keep the one they started with.
pub struct ListenerContext {
    pub config: Listener,
    pub name: Arc<str>,
    /// The address the listening socket is bound to: `config.bind`, or the
    /// port the kernel chose when that asks for port 0.
    pub bound: SocketAddr,
    pub watcher: WatcherHandle,
    pub backends: Arc<BackendSet>,
    /// Which backends a new client tries (keeps the round-robin turn).
    pub router: Router,
    /// Spare upstream connections, when `[listener.pool]` asks for them.
    pub pool: Option<Arc<Pool>>,
    pub shared: Arc<ListenerShared>,
    /// What a read-only reply looks like, when the listener routes to
    /// primaries by a check that learns roles (see [`crate::health::hint`]).
    pub read_only_sign: Option<ReadOnlySign>,
    /// The client-leg socket options are set on the listening socket, and
    /// accepted clients inherit them (see `listener::preset_client_options`).
    pub client_options_preset: bool,
}

/// What a listener's sessions share across config generations.
pub struct ListenerShared {
    pub name: Arc<str>,
    /// Cancelled when the drain deadline passes.
    pub drain_deadline: CancellationToken,
    pub meters: Arc<ListenerMeters>,
    pub registry: Arc<Registry>,
    /// Legs waiting for a verdict's corroboration, for `/status`.
    pub suspicions: Arc<Suspicions>,
    /// PostgreSQL cancel keys of the open sessions (postgres listeners).
    pub cancel_keys: cancel::CancelKeys,
    sessions: AtomicUsize,
    /// Stopped accepting (shutdown, or removed or moved by a reload) and
    /// waiting for its sessions.
    draining: AtomicBool,
}

impl ListenerShared {
    pub fn new(name: &str, registry: Arc<Registry>) -> Self {
        ListenerShared {
            name: Arc::from(name),
            drain_deadline: CancellationToken::new(),
            meters: Arc::new(ListenerMeters::new(name)),
            registry,
            suspicions: Arc::default(),
            cancel_keys: cancel::CancelKeys::default(),
            sessions: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        }
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Client connections open now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Counts an accepted client until the guard drops.
    pub fn accepted(self: &Arc<Self>) -> SessionGuard {
        self.meters.accepted.increment(1);
        let now = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        self.meters.active.set(now as f64);
        SessionGuard {
            shared: self.clone(),
        }
    }
}

/// Counts an open client connection (see [`ListenerShared::accepted`]).
pub struct SessionGuard {
    shared: Arc<ListenerShared>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let now = self.shared.sessions.fetch_sub(1, Ordering::Relaxed) - 1;
        self.shared.meters.active.set(now as f64);
    }
}

/// Runs one session to its end. Never panics on network input; every way
/// it ends is logged. `peer` is the client socket's peer; with
/// `accept_proxy`, the PROXY header's source replaces it.
pub async fn run(mut client: TcpStream, peer: SocketAddr, ctx: Arc<ListenerContext>) {
    let started = Instant::now();
    let cfg = &ctx.config;
    if ctx.client_options_preset {
        // Inherited from the listening socket.
    } else if let Err(e) = sockopt::apply(&client, &cfg.settings.client) {
        tracing::warn!(listener = %ctx.name, client = %peer, error = %e,
            "cannot set client socket options; closing");
        return;
    }
    let Some(ends) = proxy_protocol::client_ends(&ctx, &mut client, peer).await else {
        return;
    };
    let client_addr = ends.client;
    let postgres = cancel::is_postgres(&ctx);
    let first = if postgres {
        cancel::first_bytes(&client).await
    } else {
        Vec::new()
    };
    let cancel_route = if postgres {
        cancel::to_session_server(&ctx, &first, ends).await
    } else {
        None
    };
    let upstream = match cancel_route {
        Some(upstream) => upstream,
        None => match acquire_upstream(&ctx, &client, ends).await {
            Some(upstream) => upstream,
            None => return,
        },
    };
    tracing::debug!(listener = %ctx.name, client = %client_addr,
        backend = %ctx.backends.label(upstream.backend), upstream = %upstream.peer,
        pooled = upstream.pooled, "session started");
    let _counted = ctx.backends.opened(upstream.backend);
    let session = Arc::new(Watched::new(
        client,
        client_addr,
        upstream.stream,
        [peer, upstream.peer],
        upstream.backend,
    ));
    ctx.watcher.watch(&session);
    let meters = &ctx.shared.meters;
    let replies = ctx.read_only_sign.as_ref().map(|sign| ReplyWatch {
        sign,
        backends: &ctx.backends,
        backend: upstream.backend,
    });
    let mut key = postgres.then(|| cancel::SessionKey::new(&ctx, &first, upstream.peer));
    let observing = replies.is_some() || key.is_some();
    let mut observe = |bytes: &[u8]| {
        if let Some(replies) = &replies {
            replies.see(bytes);
        }
        if let Some(key) = key.as_mut() {
            key.see(bytes);
        }
    };
    let observer: Option<&mut relay::Observer<'_>> = observing.then_some(&mut observe);

    let outcome = tokio::select! {
        result = relay_both(&session, cfg.settings.liveness.probe_interval, meters, observer) => result.err(),
        verdict = session.evicted() => Some(verdict),
        _ = ctx.shared.drain_deadline.cancelled() => Some(Verdict::decided(Leg::Client, EvictReason::Drain)),
    };
    meters
        .session_duration
        .record(started.elapsed().as_secs_f64());
    match outcome {
        None => tracing::debug!(listener = %ctx.name, client = %client_addr,
            duration_ms = started.elapsed().as_millis() as u64, "session ended"),
        Some(verdict) => {
            let (age, idle) = (started.elapsed(), session.idle_for());
            // Built only now: the upstream's local address costs a
            // syscall, and only an eviction reports it.
            let labels = SessionLabels {
                listener: ctx.name.clone(),
                backend: ctx.backends.label(upstream.backend).to_string(),
                client: client_addr,
                upstream_local: session.upstream.local_addr().ok(),
            };
            evict::log_eviction(&labels, &verdict, age, idle);
            meters.evicted(verdict.reason, verdict.detection_time());
            ctx.shared
                .registry
                .record_eviction(&labels, &verdict, age, idle);
            close_legs(&session, &verdict, cfg.settings.on_evict);
        }
    }
    // Dropping the last reference closes both sockets now: the watcher only
    // holds a weak one.
}

/// A spare of `backend` from the pool, connected to an address the backend
/// still serves from; spares to other addresses (the name moved, or the
/// address was found in another role) are closed.
fn serving_spare(
    ctx: &ListenerContext,
    pool: &Pool,
    backend: BackendId,
) -> Option<(TcpStream, SocketAddr)> {
    let serving = ctx.backends.addresses(backend);
    while let Some(stream) = pool.take(backend) {
        match stream.peer_addr() {
            Ok(peer) if serving.contains(&peer) => return Some((stream, peer)),
            peer => tracing::debug!(listener = %ctx.name, backend = %ctx.backends.label(backend),
                peer = ?peer.ok(), "closing a spare to an address the backend no longer serves from"),
        }
    }
    None
}

/// Routes a new client and gets its upstream connection: a spare from the
/// warm pool, or a connect to the backends in routing order, with the
/// `send_proxy` header written. When there is none, the client is set to
/// be reset (on drop) and the reason logged.
async fn acquire_upstream(
    ctx: &ListenerContext,
    client: &TcpStream,
    ends: ClientEnds,
) -> Option<upstream::Upstream> {
    let client_addr = ends.client;
    let order = match ctx.router.route(&ctx.backends) {
        Ok(order) => order,
        Err(e) => {
            tracing::warn!(listener = %ctx.name, client = %client_addr, error = %e,
                "refusing client: no backend to send it to");
            ctx.shared.meters.refused(Refusal::NoBackend);
            let _ = sockopt::set_reset_on_close(client);
            return None;
        }
    };
    if let Some(spare) = take_spare(ctx, order[0], ends).await {
        return Some(spare);
    }
    let candidates = order
        .iter()
        .filter_map(|&id| {
            let addrs = ctx.backends.addresses(id);
            // A gated backend with no verified address yet has nothing to
            // try: looking its name up here would skip the role check.
            if addrs.is_empty() && !ctx.backends.may_resolve_at_connect(id) {
                return None;
            }
            Some(upstream::ConnectTarget {
                id,
                backend: ctx.backends.addr(id),
                addrs,
                meters: Some(ctx.backends.meters(id)),
            })
        })
        .collect();
    let settings = &ctx.config.settings;
    let connected = tokio::select! {
        result = upstream::connect(candidates, &settings.upstream, settings.connect_timeout) => result,
        _ = ctx.shared.drain_deadline.cancelled() => return None,
    };
    let mut upstream = match connected {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::warn!(listener = %ctx.name, client = %client_addr, error = %e,
                "closing client: no backend available");
            ctx.shared.meters.refused(Refusal::ConnectFailed);
            let _ = sockopt::set_reset_on_close(client);
            return None;
        }
    };
    if let Err(e) = proxy_protocol::send_header(ctx, &mut upstream.stream, ends).await {
        tracing::warn!(listener = %ctx.name, client = %client_addr, upstream = %upstream.peer,
            error = %e, "closing client: cannot write the PROXY header to the backend");
        ctx.shared.meters.refused(Refusal::ConnectFailed);
        let _ = sockopt::set_reset_on_close(client);
        return None;
    }
    Some(upstream)
}

/// A spare of `backend` from the warm pool, its `send_proxy` header
/// written now (spares are connected before anyone knows whose they will
/// be). A spare the header cannot be written to is closed, and the client
/// gets a fresh connect instead, as for a dead spare.
async fn take_spare(
    ctx: &ListenerContext,
    backend: BackendId,
    ends: ClientEnds,
) -> Option<upstream::Upstream> {
    let pool = ctx.pool.as_ref()?;
    let (mut stream, peer) = serving_spare(ctx, pool, backend)?;
    ctx.backends
        .meters(backend)
        .pool_idle
        .set(pool.idle(backend) as f64);
    if let Err(e) = proxy_protocol::send_header(ctx, &mut stream, ends).await {
        tracing::warn!(listener = %ctx.name, client = %ends.client, upstream = %peer, error = %e,
            "cannot write the PROXY header to a pooled spare; connecting afresh");
        let _ = sockopt::set_reset_on_close(&stream);
        return None;
    }
    Some(upstream::Upstream {
        peer,
        stream,
        backend,
        pooled: true,
    })
}

/// Relays both directions until both have ended; the first socket error
/// ends the session with a verdict against the leg it happened on.
///
/// A FIN is forwarded and the other direction keeps flowing (half-close),
/// except when the upstream closes a session that was idle for `idle_after`:
/// that is a backend dropping a pooled connection (idle timeout, restart),
/// and the session ends at once so the client's pool sees the close and no
/// half-closed socket is left behind.
///
/// `observe`, when given, looks at what the backend answers.
async fn relay_both(
    session: &Watched,
    idle_after: Duration,
    meters: &ListenerMeters,
    observe: Option<&mut relay::Observer<'_>>,
) -> Result<(), Verdict> {
    let up = relay::pump(session, Leg::Client, Leg::Upstream, &meters.bytes_up, None);
    let down = relay::pump(
        session,
        Leg::Upstream,
        Leg::Client,
        &meters.bytes_down,
        observe,
    );
    tokio::pin!(up, down);
    // The first direction to end forwards its FIN (half-close: the other
    // keeps flowing). The last one does not: the session ends and closing
    // the sockets sends the FIN.
    let idle_before_fin = tokio::select! {
        result = &mut up => {
            result.map_err(|e| verdict_of(session, e))?;
            relay::finish(session.socket(Leg::Upstream));
            return down.await.map(drop).map_err(|e| verdict_of(session, e));
        }
        result = &mut down => {
            let idle = session.idle_for();
            result.map_err(|e| verdict_of(session, e))?;
            idle
        }
    };
    if idle_before_fin >= idle_after {
        tracing::debug!(
            idle_ms = idle_before_fin.as_millis() as u64,
            "upstream closed an idle session; ending it"
        );
        return Ok(());
    }
    relay::finish(session.socket(Leg::Client));
    up.await.map(drop).map_err(|e| verdict_of(session, e))
}

fn verdict_of(session: &Watched, e: relay::LegError) -> Verdict {
    Verdict {
        leg: e.leg,
        reason: EvictReason::from_io(&e.error),
        evidence: sockopt::tcp_info(session.socket(e.leg)).ok(),
        silent_for: None,
    }
}

/// The dead leg is aborted (its peer is gone; RST frees the socket at once
/// instead of retransmitting a FIN into the void); the surviving leg is
/// reset or closed as `on_evict` says. A drain has no dead leg.
fn close_legs(session: &Watched, verdict: &Verdict, on_evict: OnEvict) {
    for leg in [Leg::Client, Leg::Upstream] {
        let dead = leg == verdict.leg && verdict.reason != EvictReason::Drain;
        if dead || on_evict == OnEvict::Reset {
            if let Err(e) = sockopt::set_reset_on_close(session.socket(leg)) {
                tracing::debug!(leg = %leg, error = %e, "cannot set SO_LINGER 0");
            }
        }
    }
}
