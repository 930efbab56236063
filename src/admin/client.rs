//! A one-shot HTTP/1.1 client for the admin server, behind
//! `pulsegate admin drain|reload|status` and Kubernetes preStop hooks.
//!
//! One request per TCP connection (`Connection: close`), plain `http://`
//! only: the admin port is meant for loopback or a pod network.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, HOST, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Responses above this are refused: `/metrics` is the largest by far.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Why an admin request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://HOST:PORT`.
    #[error("admin URL {url:?} is not usable: {reason} (expected http://HOST:PORT)")]
    InvalidUrl { url: String, reason: String },
    /// The path and query do not form a request target.
    #[error("admin request path {path:?} is not usable: {reason}")]
    InvalidPath { path: String, reason: String },
    /// The token cannot be sent in a header (its text is not shown).
    #[error("the admin token contains characters not allowed in an HTTP header")]
    InvalidToken,
    /// Nothing accepted the connection (refused, unreachable, DNS).
    #[error("could not connect to the admin server at {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or the server did not speak HTTP/1.1.
    #[error("HTTP exchange with the admin server at {address} failed")]
    Http {
        address: String,
        #[source]
        source: hyper::Error,
    },
    /// The response body exceeded the client's cap.
    #[error("admin server at {address} sent a response larger than {MAX_RESPONSE_BYTES} bytes")]
    ResponseTooLarge { address: String },
    /// No complete answer within the timeout.
    #[error("admin server at {address} did not answer within {after:?}")]
    Timeout { address: String, after: Duration },
}

/// Where the admin server listens, from an `http://HOST:PORT` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// As written in the URL (brackets kept for IPv6): the `Host` header.
    authority: String,
    /// Without brackets: what the resolver wants.
    host: String,
    port: u16,
}

/// Sends one request to the admin server at `url` (`http://HOST:PORT`,
/// a trailing `/` allowed) and returns the status code and body text.
///
/// `token` is the bearer token's text, trimmed of surrounding whitespace
/// as [`super::Token::new`] trims it, so the contents of a token file can be
/// passed as read. `timeout` covers connecting, sending and reading the
/// whole response. Non-2xx statuses are answers, not errors.
pub async fn request(
    url: &str,
    method: Method,
    path_and_query: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), ClientError> {
    let target = parse_url(url)?;
    let request = build_request(&target, method, path_and_query, token)?;
    match tokio::time::timeout(timeout, exchange(&target, request)).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout {
            address: target.authority,
            after: timeout,
        }),
    }
}

/// Parses `http://HOST:PORT` (IPv6 in brackets), with clear errors.
fn parse_url(url: &str) -> Result<Target, ClientError> {
    let invalid = |reason: &str| ClientError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => return Err(invalid("only http:// is supported")),
        None => return Err(invalid("the scheme http:// is missing")),
    }
    let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("user information is not supported"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid("give the path separately, not in the URL"));
    }
    let port = authority.port_u16().ok_or_else(|| invalid("no port"))?;
    if port == 0 {
        return Err(invalid("port 0"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    Ok(Target {
        authority: authority.as_str().to_owned(),
        host: host.to_owned(),
        port,
    })
}

/// The request with `Host`, the bearer token and `Connection: close`.
fn build_request(
    target: &Target,
    method: Method,
    path_and_query: &str,
    token: Option<&str>,
) -> Result<Request<Empty<Bytes>>, ClientError> {
    let invalid = |reason: &str| ClientError::InvalidPath {
        path: path_and_query.to_owned(),
        reason: reason.to_owned(),
    };
    if !path_and_query.starts_with('/') {
        return Err(invalid("it must start with /"));
    }
    let uri = Uri::builder()
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| invalid("it contains characters not allowed in a URL"))?;
    let host = HeaderValue::from_str(&target.authority).map_err(|_| ClientError::InvalidUrl {
        url: target.authority.clone(),
        reason: "host is not a valid header value".to_owned(),
    })?;

    let mut request = Request::new(Empty::new());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.insert(HOST, host);
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    headers.insert(USER_AGENT, HeaderValue::from_static("pulsegate-admin"));
    if let Some(token) = token.map(str::trim).filter(|token| !token.is_empty()) {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ClientError::InvalidToken)?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    Ok(request)
}

/// Connects, sends `request` and reads the whole response, driving the
/// connection in this task so nothing outlives a timeout.
async fn exchange(
    target: &Target,
    request: Request<Empty<Bytes>>,
) -> Result<(u16, String), ClientError> {
    let address = target.authority.clone();
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| ClientError::Connect {
            address: address.clone(),
            source,
        })?;
    let http_error = |source| ClientError::Http {
        address: address.clone(),
        source,
    };
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_error)?;
    let response = async {
        let response = sender.send_request(request).await.map_err(http_error)?;
        let status = response.status().as_u16();
        let body = read_response_body(response.into_body(), &address).await?;
        Ok((status, body))
    };
    let mut connection = std::pin::pin!(connection);
    let mut response = std::pin::pin!(response);
    tokio::select! {
        biased;
        result = &mut response => result,
        // The connection ended first (the server closed, or it failed):
        // whatever was received is buffered, and the response says whether
        // it was complete.
        _ = connection.as_mut() => response.await,
    }
}

/// The body as text (lossy: the admin server sends UTF-8), at most
/// [`MAX_RESPONSE_BYTES`].
async fn read_response_body(
    body: hyper::body::Incoming,
    address: &str,
) -> Result<String, ClientError> {
    match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
        Ok(collected) => Ok(String::from_utf8_lossy(&collected.to_bytes()).into_owned()),
        Err(error) => match error.downcast::<hyper::Error>() {
            Ok(source) => Err(ClientError::Http {
                address: address.to_owned(),
                source: *source,
            }),
            Err(_) => Err(ClientError::ResponseTooLarge {
                address: address.to_owned(),
            }),
        },
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn parses_host_and_port() {
        let target = parse_url("http://127.0.0.1:9900").expect("valid");
        assert_eq!((target.host.as_str(), target.port), ("127.0.0.1", 9900));
        let target = parse_url("http://localhost:9900/").expect("valid");
        assert_eq!(target.authority, "localhost:9900");
        let target = parse_url("http://[::1]:9900").expect("valid");
        assert_eq!(
            (target.host.as_str(), target.authority.as_str()),
            ("::1", "[::1]:9900")
        );
    }

    #[test]
    fn refuses_urls_it_cannot_use_and_names_them() {
        for (url, reason) in [
            ("https://127.0.0.1:9900", "only http://"),
            ("127.0.0.1:9900", "scheme"),
            ("http://127.0.0.1", "no port"),
            ("http://127.0.0.1:9900/status", "path"),
            ("http://user@127.0.0.1:9900", "user"),
            ("http://127.0.0.1:0", "port 0"),
            ("not a url", "not a URL"),
        ] {
            let error = parse_url(url).expect_err(url).to_string();
            assert!(
                error.contains(url) && error.contains(reason),
                "{url}: {error}"
            );
        }
    }

    #[test]
    fn request_carries_token_and_refuses_bad_paths() {
        let target = parse_url("http://127.0.0.1:1").expect("valid");
        let request = build_request(&target, Method::POST, "/drain?then=stay", Some("s3cret\n"))
            .expect("valid request");
        assert_eq!(request.headers()[AUTHORIZATION], "Bearer s3cret");
        assert_eq!(request.uri(), "/drain?then=stay");
        assert!(build_request(&target, Method::GET, "status", None).is_err());
        assert!(build_request(&target, Method::GET, "/a b", None).is_err());
        assert!(matches!(
            build_request(&target, Method::GET, "/status", Some("bad\ntoken")),
            Err(ClientError::InvalidToken)
        ));
    }
}
