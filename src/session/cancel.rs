//! PostgreSQL cancel requests reach the server that runs the query.
//!
//! On a listener whose check is `postgres` (or with `protocol =
//! "postgres"`), each session's BackendKeyData
//! is read as it passes ([`crate::pgwire::KeyWatch`]) and the (process id,
//! secret key) → server address kept while the session lives. A new
//! connection whose first packet is a CancelRequest for a known key is
//! connected to that server, whatever the balance would choose; an unknown
//! key (a session on TLS, or one already ended) is routed as usual. The
//! secret is never logged and is forgotten when its session ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;

use super::proxy_protocol::{send_header, ClientEnds};
use super::ListenerContext;
use crate::config::{CheckKind, Protocol};
use crate::pgwire::{self, CancelKey, KeyWatch};
use crate::upstream::{self, ConnectTarget, Upstream};

/// How long a new client of a postgres listener may take to send its first
/// packet before it is routed without looking at it (clients speak first).
const FIRST_PACKET_WAIT: Duration = Duration::from_secs(1);

/// The cancel keys of a listener's open sessions, each with the server
/// address its session runs on.
#[derive(Default)]
pub struct CancelKeys(Mutex<HashMap<CancelKey, SocketAddr>>);

impl CancelKeys {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, SocketAddr>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, key: CancelKey, server: SocketAddr) {
        self.map().insert(key, server);
    }

    fn remove(&self, key: CancelKey) {
        self.map().remove(&key);
    }

    fn get(&self, key: CancelKey) -> Option<SocketAddr> {
        self.map().get(&key).copied()
    }
}

/// Whether the listener's backends speak PostgreSQL (`protocol`, or its
/// check, says so).
pub fn is_postgres(ctx: &ListenerContext) -> bool {
    let settings = &ctx.config.settings;
    settings.protocol == Protocol::Postgres
        || settings
            .check
            .as_ref()
            .is_some_and(|c| c.kind == CheckKind::Postgres)
}

/// The first bytes a client sent (up to 16, enough for a CancelRequest),
/// without taking them from the socket.
pub async fn first_bytes(client: &TcpStream) -> Vec<u8> {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(FIRST_PACKET_WAIT, client.peek(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].to_vec(),
        _ => Vec::new(),
    }
}

/// A connection to the server whose session `first` cancels, when `first`
/// is a CancelRequest for a key of this listener, with the `send_proxy`
/// header for `ends` written; `None` to route it as usual.
pub async fn to_session_server(
    ctx: &ListenerContext,
    first: &[u8],
    ends: ClientEnds,
) -> Option<Upstream> {
    let key = pgwire::cancel_request(first)?;
    let Some(server) = ctx.shared.cancel_keys.get(key) else {
        ctx.shared.meters.cancel_request(false);
        tracing::debug!(listener = %ctx.name, pid = key.pid,
            "cancel request for no session of this listener; routing it as usual");
        return None;
    };
    let id = ctx
        .backends
        .ids()
        .find(|&id| ctx.backends.addresses(id).contains(&server))?;
    let target = ConnectTarget {
        id,
        backend: ctx.backends.addr(id),
        addrs: vec![server],
        meters: Some(ctx.backends.meters(id)),
    };
    let settings = &ctx.config.settings;
    match upstream::connect(vec![target], &settings.upstream, settings.connect_timeout).await {
        Ok(mut upstream) => {
            if let Err(e) = send_header(ctx, &mut upstream.stream, ends).await {
                tracing::warn!(listener = %ctx.name, pid = key.pid, server = %server, error = %e,
                    "cannot write the PROXY header to the server of the session to cancel; \
                     routing the request as usual");
                return None;
            }
            ctx.shared.meters.cancel_request(true);
            tracing::debug!(listener = %ctx.name, pid = key.pid, server = %server,
                "cancel request sent to the server its session runs on");
            Some(upstream)
        }
        Err(e) => {
            tracing::warn!(listener = %ctx.name, pid = key.pid, server = %server, error = %e,
                "cannot reach the server of the session to cancel; routing the request as usual");
            None
        }
    }
}

/// Reads one session's key as its server's bytes pass, and keeps it while
/// the session lives.
pub struct SessionKey<'a> {
    ctx: &'a ListenerContext,
    server: SocketAddr,
    watch: KeyWatch,
    kept: Option<CancelKey>,
}

impl<'a> SessionKey<'a> {
    /// For a session whose client sent `first` and that runs on `server`.
    pub fn new(ctx: &'a ListenerContext, first: &[u8], server: SocketAddr) -> Self {
        SessionKey {
            ctx,
            server,
            watch: KeyWatch::new(first),
            kept: None,
        }
    }

    /// Looks at bytes from the server.
    pub fn see(&mut self, bytes: &[u8]) {
        if !self.watch.watching() {
            return;
        }
        self.watch.feed(bytes);
        if let Some(key) = self.watch.key() {
            self.ctx.shared.cancel_keys.insert(key, self.server);
            self.kept = Some(key);
        } else if self.watch.gave_up() == Some(pgwire::GaveUp::Encrypted) {
            self.ctx.shared.meters.cancel_key_unreadable();
        }
    }
}

impl Drop for SessionKey<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.kept {
            self.ctx.shared.cancel_keys.remove(key);
        }
    }
}
