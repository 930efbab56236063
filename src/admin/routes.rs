//! The admin routes: which path answers which method, who needs the
//! token, and how each is answered through [`Control`].

use std::sync::Arc;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use tracing::{debug, info, warn};

use super::{AdminSettings, Control, Reply, Token};

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
pub(super) struct Admin {
    control: Arc<dyn Control>,
    token: Option<Token>,
    token_protects_metrics: bool,
    max_body_bytes: usize,
}

impl Admin {
    pub(super) fn new(settings: &AdminSettings, control: Arc<dyn Control>) -> Self {
        Admin {
            control,
            token: settings.token.clone(),
            token_protects_metrics: settings.token_protects_metrics,
            max_body_bytes: settings.max_body_bytes,
        }
    }

    /// Routes, checks method and token, reads the body, then answers.
    pub(super) async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
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
pub(super) fn json_response(reply: Reply) -> Response<Full<Bytes>> {
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
