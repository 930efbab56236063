//! The admin routes: which path answers which method, who needs the
//! token, and how each is answered through [`Control`]. The one place
//! where the proxy's answers (a readiness, a reload summary or error, a
//! drain) become HTTP status codes and JSON bodies.

use std::sync::Arc;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::{AdminSettings, AfterDrain, Control, Readiness, ReloadError, ReloadSummary, Token};
use crate::config::ConfigError;

/// An answer to an admin request: a status code and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Reply {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

impl Reply {
    /// `body` as JSON with `status`; a 500 if it cannot be rendered.
    pub fn json(status: StatusCode, body: &impl Serialize) -> Self {
        match serde_json::to_value(body) {
            Ok(body) => Reply { status, body },
            Err(error) => {
                warn!(%error, "admin reply could not be rendered as JSON");
                Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }

    /// A short JSON error: `{"error": message}`.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Reply {
            status,
            body: serde_json::json!({ "error": message.into() }),
        }
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
pub(super) struct Admin<C> {
    control: Arc<C>,
    token: Option<Token>,
    token_protects_metrics: bool,
    max_body_bytes: usize,
}

impl<C: Control> Admin<C> {
    pub(super) fn new(settings: &AdminSettings, control: Arc<C>) -> Self {
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
            Route::Healthz => Reply::json(StatusCode::OK, &serde_json::json!({ "status": "ok" })),
            Route::Readyz => readiness_reply(self.control.readiness()),
            Route::Status => Reply::json(StatusCode::OK, &self.control.status()),
            Route::Drain => match after_drain(query) {
                Ok(then) => {
                    info!(
                        then_exit = then == AfterDrain::Exit,
                        "admin drain requested"
                    );
                    self.control.drain(then);
                    drain_reply(then)
                }
                Err(message) => Reply::error(StatusCode::BAD_REQUEST, message),
            },
            Route::Reload => {
                info!("admin reload requested");
                reload_reply(self.control.reload().await)
            }
        };
        json_response(reply)
    }
}

/// `/readyz`: 200 when ready, 503 with the reasons otherwise.
fn readiness_reply(readiness: Readiness) -> Reply {
    #[derive(Serialize)]
    struct Body<'a> {
        ready: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        reasons: Option<&'a [String]>,
    }
    match &readiness {
        Readiness::Ready => Reply::json(
            StatusCode::OK,
            &Body {
                ready: true,
                reasons: None,
            },
        ),
        Readiness::NotReady(reasons) => Reply::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Body {
                ready: false,
                reasons: Some(reasons),
            },
        ),
    }
}

/// `POST /drain`: 202, the drain has begun.
fn drain_reply(then: AfterDrain) -> Reply {
    #[derive(Serialize)]
    struct Body {
        draining: bool,
        then: AfterDrain,
    }
    Reply::json(
        StatusCode::ACCEPTED,
        &Body {
            draining: true,
            then,
        },
    )
}

/// `POST /reload`: 200 with what changed; 400 with every problem of an
/// invalid file; 409 while draining; 500 when it could not be applied.
fn reload_reply(outcome: Result<ReloadSummary, ReloadError>) -> Reply {
    #[derive(Serialize)]
    struct Invalid {
        error: &'static str,
        problems: Vec<String>,
    }
    match outcome {
        Ok(summary) => Reply::json(StatusCode::OK, &summary),
        Err(ReloadError::Invalid(e)) => Reply::json(
            StatusCode::BAD_REQUEST,
            &Invalid {
                error: "invalid config; the running config stays",
                problems: problems(&e),
            },
        ),
        Err(e @ ReloadError::Draining) => Reply::error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ (ReloadError::Apply(_) | ReloadError::NoFile | ReloadError::Interrupted(_))) => {
            Reply::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

/// The problems of a refused config, one line each.
fn problems(e: &ConfigError) -> Vec<String> {
    match e {
        ConfigError::Invalid { origin, problems } => problems
            .iter()
            .map(|p| match p.line {
                Some(line) => format!("{origin}:{line}: {}: {} (fix: {})", p.key, p.message, p.fix),
                None => format!("{origin}: {}: {} (fix: {})", p.key, p.message, p.fix),
            })
            .collect(),
        other => vec![other.to_string()],
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

/// What follows `POST /drain`, from its query: `then=exit` (the default)
/// or `then=stay`. Anything else is refused rather than guessed at, since
/// the default stops the process.
fn after_drain(query: Option<&str>) -> Result<AfterDrain, String> {
    let mut then = None;
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
            "exit" => AfterDrain::Exit,
            "stay" => AfterDrain::Stay,
            other => {
                return Err(format!(
                    "then={other:?} is not allowed; use then=exit or then=stay"
                ))
            }
        };
        if then.replace(wanted).is_some() {
            return Err("then is given more than once".to_owned());
        }
    }
    Ok(then.unwrap_or(AfterDrain::Exit))
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
        assert_eq!(after_drain(None), Ok(AfterDrain::Exit));
        assert_eq!(after_drain(Some("")), Ok(AfterDrain::Exit));
        assert_eq!(after_drain(Some("then=exit")), Ok(AfterDrain::Exit));
        assert_eq!(after_drain(Some("then=stay")), Ok(AfterDrain::Stay));
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
            let error = after_drain(Some(query)).expect_err(query);
            assert!(error.contains("then"), "{query}: {error}");
        }
        let error = after_drain(Some("then=later")).expect_err("bad value");
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
    fn ready_is_200_and_not_ready_is_503_with_its_reasons() {
        let ready = readiness_reply(Readiness::Ready);
        assert_eq!(ready.status, StatusCode::OK);
        assert_eq!(ready.body, serde_json::json!({ "ready": true }));
        let reasons = vec!["draining: not accepting new connections".to_string()];
        let not_ready = readiness_reply(Readiness::NotReady(reasons.clone()));
        assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            not_ready.body,
            serde_json::json!({ "ready": false, "reasons": reasons })
        );
    }

    #[test]
    fn a_drain_is_202_and_says_what_follows() {
        let exit = drain_reply(AfterDrain::Exit);
        assert_eq!(exit.status, StatusCode::ACCEPTED);
        assert_eq!(
            exit.body,
            serde_json::json!({ "draining": true, "then": "exit" })
        );
        let stay = drain_reply(AfterDrain::Stay);
        assert_eq!(stay.status, StatusCode::ACCEPTED);
        assert_eq!(stay.body["then"], "stay");
    }

    #[test]
    fn an_applied_reload_is_200_with_its_summary() {
        let summary = ReloadSummary {
            generation: 2,
            changed: vec!["app".into()],
            notes: vec!["[admin] changed".into()],
            ..ReloadSummary::default()
        };
        let reply = reload_reply(Ok(summary));
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.body,
            serde_json::json!({
                "generation": 2, "added": [], "removed": [], "changed": ["app"],
                "unchanged": [], "notes": ["[admin] changed"],
            })
        );
    }

    #[test]
    fn an_invalid_config_is_400_with_every_problem() {
        let problem = |key: &str, line| crate::config::Problem {
            key: key.into(),
            line,
            message: "is wrong".into(),
            fix: "set it right".into(),
        };
        let invalid = ConfigError::Invalid {
            origin: "p.toml".into(),
            problems: vec![problem("listener[0].bind", Some(3)), problem("admin", None)],
        };
        let reply = reload_reply(Err(ReloadError::Invalid(invalid)));
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            reply.body,
            serde_json::json!({
                "error": "invalid config; the running config stays",
                "problems": [
                    "p.toml:3: listener[0].bind: is wrong (fix: set it right)",
                    "p.toml: admin: is wrong (fix: set it right)",
                ],
            })
        );
    }

    #[test]
    fn a_reload_while_draining_is_409_and_one_that_fails_is_500() {
        let draining = reload_reply(Err(ReloadError::Draining));
        assert_eq!(draining.status, StatusCode::CONFLICT);
        assert!(draining.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("draining")));
        let taken = std::io::Error::new(std::io::ErrorKind::AddrInUse, "cannot bind 127.0.0.1:1");
        for (error, says) in [
            (ReloadError::Apply(Box::new(taken)), "cannot bind"),
            (ReloadError::NoFile, "no config file"),
            (ReloadError::Interrupted("panicked".into()), "panicked"),
        ] {
            let reply = reload_reply(Err(error));
            assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{says}");
            assert!(
                reply.body["error"]
                    .as_str()
                    .is_some_and(|e| e.contains(says)),
                "{}",
                reply.body
            );
        }
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
