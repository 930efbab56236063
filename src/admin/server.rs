//! The admin HTTP/1.1 server: accept loop, per-connection hyper tasks, the
//! tower stack (tracing, timeout, concurrency limit) and the routes.
//!
//! Every connection holds one of `max_connections` slots until it closes.
//! The slot is taken *before* `accept`, so when all slots are busy new
//! connections wait in the kernel's accept queue rather than being refused.
//! Beyond them, [`PROBE_RESERVE`] more connections are served for the
//! probes alone (`/healthz`, `/readyz`): one request each, which must
//! arrive within [`PROBE_HEADER_TIMEOUT`]. A kubelet gives up on a probe
//! after a second by default; it must not queue behind slow clients.
//! No slot is held for long by a client that misbehaves: headers (and the
//! wait for the next request on a keep-alive connection) must arrive within
//! `request_timeout`, the body and the handler have another
//! `request_timeout`, and a connection is wound down after a minute
//! (`MAX_CONNECTION_AGE`) whatever it does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Body, Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::limit::ConcurrencyLimitLayer;
use tower::timeout::{error::Elapsed, TimeoutLayer};
use tower::{Service, ServiceBuilder};
use tower_http::trace::{
    DefaultMakeSpan, DefaultOnFailure, DefaultOnRequest, DefaultOnResponse, TraceLayer,
};
use tracing::{debug, info, warn, Instrument, Level};

use super::routes::{json_response, Admin, Reply};
use super::{Control, Token};
use crate::config::AdminConfig;

/// How long an accept error (EMFILE, ENOBUFS, ...) pauses the accept loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long in-flight requests may run once a connection is told to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// After this long a connection is closed gracefully (after its current
/// request), so even a client that stops reading a response frees its slot.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// Read buffer cap per connection, which bounds the request head.
const MAX_READ_BUFFER: usize = 64 * 1024;
/// Connections served beyond `max_connections`, for probes only.
pub const PROBE_RESERVE: usize = 32;
/// A reserve connection must send its request head within this: a probe
/// sends it at once, and a stalled client frees the slot quickly.
const PROBE_HEADER_TIMEOUT: Duration = Duration::from_millis(250);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the admin server runs.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub bind: SocketAddr,
    pub token: Option<Token>,
    /// When false, `/metrics` is served without the token (Prometheus
    /// scrapes by pod annotation cannot send one).
    pub token_protects_metrics: bool,
    /// Deadline for the request head (and for the idle wait between
    /// keep-alive requests), then again for the body and the handler.
    pub request_timeout: Duration,
    /// Requests bodies above this are refused with 413.
    pub max_body_bytes: usize,
    /// Admin connections served at once; more wait in the accept queue.
    /// Zero is treated as one.
    pub max_connections: usize,
}

impl AdminSettings {
    /// The settings of a validated `[admin]` table (`bind` already parsed),
    /// with the token read from its file or environment variable. The
    /// error says what is missing and how to fix it.
    pub fn from_config(admin: &AdminConfig, bind: SocketAddr) -> Result<Self, String> {
        Ok(AdminSettings {
            bind,
            token: read_token(admin)?,
            token_protects_metrics: admin.token_protects_metrics,
            request_timeout: admin.request_timeout,
            max_body_bytes: 64 * 1024,
            max_connections: 64,
        })
    }
}

fn read_token(admin: &AdminConfig) -> Result<Option<Token>, String> {
    if let Some(file) = &admin.token_file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            format!(
                "admin.token_file {}: cannot read it: {e}; fix the path or its permissions",
                file.display()
            )
        })?;
        let token = Token::new(&text).ok_or_else(|| {
            format!(
                "admin.token_file {} is empty; put the token in it",
                file.display()
            )
        })?;
        return Ok(Some(token));
    }
    let Some(var) = &admin.token_env else {
        return Ok(None);
    };
    let text = std::env::var(var).map_err(|_| {
        format!("admin.token_env: the environment variable {var} is not set (or not UTF-8); set it to the token")
    })?;
    let token = Token::new(&text).ok_or_else(|| {
        format!("admin.token_env: the environment variable {var} is empty; set it to the token")
    })?;
    Ok(Some(token))
}

/// Serves admin requests on `listener` until `shutdown` is cancelled, then
/// stops accepting, gives open connections a second to finish their
/// current request, and returns.
pub async fn serve<C: Control>(
    listener: TcpListener,
    settings: AdminSettings,
    control: Arc<C>,
    shutdown: CancellationToken,
) {
    let max_connections = settings.max_connections.max(1);
    let address = listener.local_addr().unwrap_or(settings.bind);
    info!(
        %address,
        token_required = settings.token.is_some(),
        max_connections,
        "admin server listening"
    );

    let http = connection_builder(&settings);
    let admin = Arc::new(Admin::new(&settings, control));
    let request_timeout = settings.request_timeout;
    // Built once and cloned per connection: clones share the limit's
    // semaphore. With HTTP/1.1 a connection runs one request at a time, so
    // the connection slots already bound this; the layer is the backstop
    // that keeps the bound if that ever changes.
    let service = ServiceBuilder::new()
        .layer(trace_layer())
        .map_result(move |result| timeout_to_reply(result, request_timeout))
        .layer(TimeoutLayer::new(request_timeout))
        .layer(ConcurrencyLimitLayer::new(max_connections))
        .service_fn({
            let admin = Arc::clone(&admin);
            move |request| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(admin.handle(request).await) }
            }
        });

    let probe_http = probe_connection_builder(&settings);
    let probe_service = ServiceBuilder::new()
        .layer(trace_layer())
        .map_result(move |result| timeout_to_reply(result, request_timeout))
        .layer(TimeoutLayer::new(request_timeout))
        .service_fn({
            let admin = Arc::clone(&admin);
            move |request: Request<Incoming>| {
                let admin = Arc::clone(&admin);
                async move {
                    Ok::<_, Infallible>(if is_probe(&request) {
                        admin.handle(request).await
                    } else {
                        json_response(Reply::error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "admin server busy: every connection slot is taken; \
                             only /healthz and /readyz are answered now",
                        ))
                    })
                }
            }
        });

    let slots = Slots {
        normal: Arc::new(Semaphore::new(max_connections)),
        reserve: Arc::new(Semaphore::new(PROBE_RESERVE)),
    };
    let connections = TaskTracker::new();
    while let Some((stream, peer, slot)) = next_connection(&listener, &slots, &shutdown).await {
        let span = tracing::debug_span!("admin_connection", %peer);
        match slot {
            Slot::Normal(slot) => connections.spawn(
                serve_connection(
                    http.clone(),
                    stream,
                    service.clone(),
                    shutdown.clone(),
                    slot,
                )
                .instrument(span),
            ),
            Slot::Reserve(slot) => connections.spawn(
                serve_connection(
                    probe_http.clone(),
                    stream,
                    probe_service.clone(),
                    shutdown.clone(),
                    slot,
                )
                .instrument(span),
            ),
        };
    }
    drop(listener);
    connections.close();
    let deadline = SHUTDOWN_GRACE + Duration::from_millis(500);
    if tokio::time::timeout(deadline, connections.wait())
        .await
        .is_err()
    {
        warn!("admin connections still open after the shutdown grace period");
    }
    info!("admin server stopped");
}

/// hyper's HTTP/1 settings: a header deadline (needs the timer) that also
/// closes idle keep-alive connections, and a bounded read buffer.
fn connection_builder(settings: &AdminSettings) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.request_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_READ_BUFFER);
    http
}

/// A reserve connection: one request, whose head must come at once.
fn probe_connection_builder(settings: &AdminSettings) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.request_timeout.min(PROBE_HEADER_TIMEOUT))
        .keep_alive(false)
        .max_buf_size(MAX_READ_BUFFER);
    http
}

/// A kubelet's probe: what the reserve serves.
fn is_probe<B>(request: &Request<B>) -> bool {
    request.method() == hyper::Method::GET && matches!(request.uri().path(), "/healthz" | "/readyz")
}

/// Request tracing at debug level, without headers: the `Authorization`
/// header carries the token.
fn trace_layer() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    DefaultMakeSpan,
    DefaultOnRequest,
    DefaultOnResponse,
> {
    TraceLayer::new_for_http()
        .make_span_with(
            DefaultMakeSpan::new()
                .level(Level::DEBUG)
                .include_headers(false),
        )
        .on_request(DefaultOnRequest::new().level(Level::DEBUG))
        .on_response(
            DefaultOnResponse::new()
                .level(Level::DEBUG)
                .include_headers(false),
        )
        .on_failure(DefaultOnFailure::new().level(Level::DEBUG))
}

/// Turns the timeout layer's error into a JSON 503, so a slow request gets
/// an answer instead of a dropped connection. Never returns `Err` (the
/// type stays `BoxError` because readiness errors share it).
fn timeout_to_reply(
    result: Result<Response<Full<Bytes>>, BoxError>,
    request_timeout: Duration,
) -> Result<Response<Full<Bytes>>, BoxError> {
    Ok(match result {
        Ok(response) => response,
        Err(error) if error.is::<Elapsed>() => {
            warn!(?request_timeout, "admin request timed out");
            let message = format!("request not completed within {request_timeout:?}");
            json_response(Reply::error(StatusCode::SERVICE_UNAVAILABLE, message))
        }
        Err(error) => {
            warn!(%error, "admin request failed");
            json_response(Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            ))
        }
    })
}

/// The connection slots: `normal` for every route, `reserve` for probes.
struct Slots {
    normal: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
}

enum Slot {
    Normal(OwnedSemaphorePermit),
    Reserve(OwnedSemaphorePermit),
}

/// Waits for a free connection slot (a normal one first, else one of the
/// probe reserve), then for a connection. `None` once `shutdown` is
/// cancelled.
async fn next_connection(
    listener: &TcpListener,
    slots: &Slots,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr, Slot)> {
    let slot = if let Ok(slot) = Arc::clone(&slots.normal).try_acquire_owned() {
        Slot::Normal(slot)
    } else if let Ok(slot) = Arc::clone(&slots.reserve).try_acquire_owned() {
        debug!("admin connection limit reached; serving probes only on the reserve");
        Slot::Reserve(slot)
    } else {
        debug!(
            "admin connection limit and probe reserve reached; new connections wait to be accepted"
        );
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            slot = Arc::clone(&slots.normal).acquire_owned() => Slot::Normal(slot.ok()?),
            slot = Arc::clone(&slots.reserve).acquire_owned() => Slot::Reserve(slot.ok()?),
        }
    };
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => return Some((stream, peer, slot)),
            Err(error) => {
                warn!(%error, "admin accept failed; pausing {ACCEPT_BACKOFF:?}");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// Runs one connection until the client closes it, it fails, it reaches
/// `MAX_CONNECTION_AGE`, or shutdown; the last two finish the current
/// request within `SHUTDOWN_GRACE`. Holds `_slot` throughout.
async fn serve_connection<S, B>(
    http: http1::Builder,
    stream: TcpStream,
    service: S,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    let mut connection = std::pin::pin!(connection);
    let finished = tokio::select! {
        result = connection.as_mut() => Some(result),
        () = shutdown.cancelled() => None,
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => None,
    };
    let result = match finished {
        Some(result) => result,
        None => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, connection).await {
                Ok(result) => result,
                Err(_) => {
                    debug!("admin connection dropped after the grace period");
                    return;
                }
            }
        }
    };
    if let Err(error) = result {
        // Malformed requests, header timeouts and resets all end up here;
        // hyper has already answered (400/431) or closed as appropriate.
        debug!(%error, "admin connection closed with an error");
    }
}
