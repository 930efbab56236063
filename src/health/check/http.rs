//! The `http` check: `GET path` over HTTP/1.1 (no TLS) with hyper; the
//! backend is up when the status is one of `expect_status` ("200-399",
//! "200", "200,204,300-302"). The body is not read.

use std::net::SocketAddr;
use std::ops::RangeInclusive;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{CheckError, Finding};
use crate::config::{parse_status_ranges, CheckConfig};

fn accepts(ranges: &[RangeInclusive<u16>], status: StatusCode) -> bool {
    ranges.iter().any(|r| r.contains(&status.as_u16()))
}

/// Runs the check: one request on a fresh connection, `Connection: close`.
pub(super) async fn check(
    config: &CheckConfig,
    addr: SocketAddr,
    stream: TcpStream,
) -> Result<Finding, CheckError> {
    let ranges = match parse_status_ranges(&config.expect_status) {
        Ok(ranges) => ranges,
        Err(e) => return Ok(Finding::down(format!("expect_status: {e}"))),
    };
    let host = config.host.clone().unwrap_or_else(|| addr.to_string());
    let request = match Request::get(config.path.as_str())
        .header(HOST, host)
        .header(USER_AGENT, "pulsegate-check")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
    {
        Ok(request) => request,
        Err(e) => return Ok(Finding::down(format!("path `{}`: {e}", config.path))),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(CheckError::Http)?;
    let mut connection = std::pin::pin!(connection);
    let mut response = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        response = &mut response => response,
        ended = &mut connection => {
            ended.map_err(CheckError::Http)?;
            // With `Connection: close` the connection can finish in the same
            // poll that delivered the response: it is ready by now.
            response.await
        }
    };
    let response = response.map_err(CheckError::Http)?;
    Ok(status_finding(
        response.status(),
        &config.expect_status,
        &ranges,
    ))
}

fn status_finding(status: StatusCode, expected: &str, ranges: &[RangeInclusive<u16>]) -> Finding {
    let shown = match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    };
    if accepts(ranges, status) {
        Finding::up(None, format!("HTTP {shown}"))
    } else {
        Finding::down(format!("HTTP {shown}, expected {expected}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_names_the_status() {
        let ranges = parse_status_ranges("200-399").unwrap();
        let up = status_finding(StatusCode::OK, "200-399", &ranges);
        assert_eq!(up, Finding::up(None, "HTTP 200 OK"));
        let down = status_finding(StatusCode::SERVICE_UNAVAILABLE, "200-399", &ranges);
        assert_eq!(
            down.detail,
            "HTTP 503 Service Unavailable, expected 200-399"
        );
    }
}
