//! The admin HTTP/1.1 server: accept loop, per-connection hyper tasks, the
//! tower stack (tracing, timeout, concurrency limit) and the routes.
//!
//! Every connection holds one of `max_connections` slots until it closes.
//! The slot is taken *before* `accept`, so when all slots are busy new
//! connections wait in the kernel's accept queue rather than being refused.
//! No slot is held for long by a client that misbehaves: headers (and the
//! wait for the next request on a keep-alive connection) must arrive within
//! `request_timeout`, the body and the handler have another
//! `request_timeout`, and a connection is wound down after a minute
//! (`MAX_CONNECTION_AGE`) whatever it does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
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

use super::{Control, Reply, Token};

/// How long an accept error (EMFILE, ENOBUFS, ...) pauses the accept loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long in-flight requests may run once a connection is told to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// After this long a connection is closed gracefully (after its current
/// request), so even a client that stops reading a response frees its slot.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// Read buffer cap per connection, which bounds the request head.
const MAX_READ_BUFFER: usize = 64 * 1024;

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

/// Serves admin requests on `listener` until `shutdown` is cancelled, then
/// stops accepting, gives open connections a second to finish their
/// current request, and returns.
pub async fn serve(
    listener: TcpListener,
    settings: AdminSettings,
    control: Arc<dyn Control>,
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
        .service_fn(move |request| {
            let admin = Arc::clone(&admin);
            async move { Ok::<_, Infallible>(admin.handle(request).await) }
        });

    let slots = Arc::new(Semaphore::new(max_connections));
    let connections = TaskTracker::new();
    while let Some((stream, peer, slot)) = next_connection(&listener, &slots, &shutdown).await {
        let span = tracing::debug_span!("admin_connection", %peer);
        let task = serve_connection(
            http.clone(),
            stream,
            service.clone(),
            shutdown.clone(),
            slot,
        );
        connections.spawn(task.instrument(span));
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

/// Waits for a free connection slot, then for a connection. `None` once
/// `shutdown` is cancelled.
async fn next_connection(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let slot = match Arc::clone(slots).try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            debug!("admin connection limit reached; new connections wait to be accepted");
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                slot = Arc::clone(slots).acquire_owned() => slot.ok()?,
            }
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

/// The admin endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Healthz,
    Readyz,
    Status,
    Drain,
    Reload,
}

impl Route {
    fn from_path(path: &str) -> Option<Route> {
        Some(match path {
            "/metrics" => Route::Metrics,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/status" => Route::Status,
            "/drain" => Route::Drain,
            "/reload" => Route::Reload,
            _ => return None,
        })
    }

    /// The one method the route answers, as written in `Allow`.
    fn method(self) -> &'static str {
        match self {
            Route::Metrics | Route::Healthz | Route::Readyz | Route::Status => "GET",
            Route::Drain | Route::Reload => "POST",
        }
    }

    /// Probes stay open so the kubelet needs no secret.
    fn needs_token(self, token_protects_metrics: bool) -> bool {
        match self {
            Route::Healthz | Route::Readyz => false,
            Route::Metrics => token_protects_metrics,
            Route::Status | Route::Drain | Route::Reload => true,
        }
    }
}

/// What the request handler needs from the settings, plus the proxy.
struct Admin {
    control: Arc<dyn Control>,
    token: Option<Token>,
    token_protects_metrics: bool,
    max_body_bytes: usize,
}

impl Admin {
    fn new(settings: &AdminSettings, control: Arc<dyn Control>) -> Self {
        Admin {
            control,
            token: settings.token.clone(),
            token_protects_metrics: settings.token_protects_metrics,
            max_body_bytes: settings.max_body_bytes,
        }
    }

    /// Routes, checks method and token, reads the body, then answers.
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(route) = Route::from_path(request.uri().path()) else {
            return json_response(Reply::error(StatusCode::NOT_FOUND, "no such endpoint"));
        };
        if request.method().as_str() != route.method() {
            return method_not_allowed(route);
        }
        if route.needs_token(self.token_protects_metrics) && !self.authorized(request.headers()) {
            warn!(
                ?route,
                "admin request refused: missing or wrong bearer token"
            );
            return unauthorized();
        }
        let (parts, body) = request.into_parts();
        if parts.method == Method::POST {
            if let Err(reply) = read_body(body, self.max_body_bytes).await {
                return json_response(reply);
            }
        }
        self.respond(route, parts.uri.query()).await
    }

    /// Whether the request carries the configured token (always, if none).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        headers
            .get(AUTHORIZATION)
            .and_then(|value| bearer_credentials(value.as_bytes()))
            .is_some_and(|presented| token.matches(presented))
    }

    /// Asks the proxy and renders its answer.
    async fn respond(&self, route: Route, query: Option<&str>) -> Response<Full<Bytes>> {
        let reply = match route {
            Route::Metrics => return metrics_response(self.control.metrics()),
            Route::Healthz => Reply::ok(serde_json::json!({ "status": "ok" })),
            Route::Readyz => self.control.ready(),
            Route::Status => self.control.status(),
            Route::Drain => match drain_then_exit(query) {
                Ok(then_exit) => {
                    info!(then_exit, "admin drain requested");
                    self.control.drain(then_exit)
                }
                Err(message) => Reply::error(StatusCode::BAD_REQUEST, message),
            },
            Route::Reload => {
                info!("admin reload requested");
                self.control.reload().await
            }
        };
        json_response(reply)
    }
}

/// The credentials of an `Authorization: Bearer <credentials>` value; the
/// scheme is case-insensitive (RFC 7235).
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|byte| *byte == b' ')?;
    let (scheme, rest) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

/// `then_exit` for `POST /drain` from its query: `then=exit` (the default)
/// or `then=stay`. Anything else is refused rather than guessed at, since
/// the default stops the process.
fn drain_then_exit(query: Option<&str>) -> Result<bool, String> {
    let mut then_exit = None;
    for pair in query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "then" {
            return Err(format!(
                "unknown query parameter {key:?}; only then=exit or then=stay is accepted"
            ));
        }
        let wanted = match value {
            "exit" => true,
            "stay" => false,
            other => {
                return Err(format!(
                    "then={other:?} is not allowed; use then=exit or then=stay"
                ))
            }
        };
        if then_exit.replace(wanted).is_some() {
            return Err("then is given more than once".to_owned());
        }
    }
    Ok(then_exit.unwrap_or(true))
}

/// Reads and discards the body, refusing more than `limit` bytes (413). It
/// runs under the request timeout, so a stalled body ends in a 503.
async fn read_body(body: Incoming, limit: usize) -> Result<(), Reply> {
    let too_large = || {
        let message = format!("request body is larger than {limit} bytes");
        Reply::error(StatusCode::PAYLOAD_TOO_LARGE, message)
    };
    if body.size_hint().lower() > u64::try_from(limit).unwrap_or(u64::MAX) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(_) => Ok(()),
        Err(error) if error.is::<LengthLimitError>() => Err(too_large()),
        Err(error) => {
            debug!(%error, "admin request body could not be read");
            Err(Reply::error(
                StatusCode::BAD_REQUEST,
                "could not read the request body",
            ))
        }
    }
}

/// A [`Reply`] as a JSON response.
fn json_response(reply: Reply) -> Response<Full<Bytes>> {
    let mut body = reply.body.to_string();
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = reply.status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The Prometheus text exposition.
fn metrics_response(text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn method_not_allowed(route: Route) -> Response<Full<Bytes>> {
    let message = format!("method not allowed; use {}", route.method());
    let mut response = json_response(Reply::error(StatusCode::METHOD_NOT_ALLOWED, message));
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(route.method()));
    response
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = json_response(Reply::error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token",
    ));
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"pulsegate-admin\""),
    );
    response
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn drain_defaults_to_exit() {
        assert_eq!(drain_then_exit(None), Ok(true));
        assert_eq!(drain_then_exit(Some("")), Ok(true));
        assert_eq!(drain_then_exit(Some("then=exit")), Ok(true));
        assert_eq!(drain_then_exit(Some("then=stay")), Ok(false));
    }

    #[test]
    fn drain_refuses_what_it_does_not_know() {
        for query in [
            "then=later",
            "then",
            "than=stay",
            "then=stay&then=exit",
            "then=STAY",
        ] {
            let error = drain_then_exit(Some(query)).expect_err(query);
            assert!(error.contains("then"), "{query}: {error}");
        }
        let error = drain_then_exit(Some("then=later")).expect_err("bad value");
        assert!(error.contains("then=exit") && error.contains("then=stay"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_trimmed() {
        assert_eq!(bearer_credentials(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"Basic abc"), None);
        assert_eq!(bearer_credentials(b"Bearer"), None);
        assert_eq!(bearer_credentials(b""), None);
    }

    #[test]
    fn routes_have_one_method_and_probes_are_open() {
        let route = Route::from_path("/drain").expect("known path");
        assert_eq!(route.method(), "POST");
        assert!(route.needs_token(false));
        assert!(!Route::Healthz.needs_token(true));
        assert!(!Route::Readyz.needs_token(true));
        assert!(Route::Metrics.needs_token(true));
        assert!(!Route::Metrics.needs_token(false));
        assert_eq!(Route::from_path("/drain/"), None);
    }
}
