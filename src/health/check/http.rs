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
use crate::config::CheckConfig;

/// Status codes hyper accepts: three digits, 100 to 999.
const VALID_STATUS: RangeInclusive<u16> = 100..=999;

/// Parses `expect_status`: comma-separated codes and `low-high` ranges.
/// An error names the part that is wrong.
pub fn parse_status_ranges(text: &str) -> Result<Vec<RangeInclusive<u16>>, String> {
    if text.trim().is_empty() {
        return Err("expect_status is empty; write e.g. \"200-399\" or \"200,204\"".to_string());
    }
    text.split(',')
        .map(|part| parse_range(part.trim()))
        .collect()
}

fn parse_range(part: &str) -> Result<RangeInclusive<u16>, String> {
    let (low, high) = match part.split_once('-') {
        Some((low, high)) => (status(low.trim(), part)?, status(high.trim(), part)?),
        None => {
            let code = status(part, part)?;
            (code, code)
        }
    };
    if low > high {
        return Err(format!(
            "`{part}`: the range runs backwards ({low} > {high})"
        ));
    }
    Ok(low..=high)
}

fn status(text: &str, part: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(code) if VALID_STATUS.contains(&code) && text.len() == 3 => Ok(code),
        _ => Err(format!(
            "`{part}` is not a status code (100-999) or a range like 200-399"
        )),
    }
}

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
    use proptest::prelude::*;

    #[test]
    fn ranges_single_codes_and_lists() {
        assert_eq!(parse_status_ranges("200-399"), Ok(vec![200..=399]));
        assert_eq!(parse_status_ranges("200"), Ok(vec![200..=200]));
        assert_eq!(
            parse_status_ranges("200,204,300-302"),
            Ok(vec![200..=200, 204..=204, 300..=302])
        );
        assert_eq!(
            parse_status_ranges(" 200 , 300 - 302 "),
            Ok(vec![200..=200, 300..=302])
        );
    }

    #[test]
    fn bad_parts_are_named() {
        for (text, named) in [
            ("", "empty"),
            ("  ", "empty"),
            ("200,abc", "`abc`"),
            ("200,", "``"),
            ("99", "`99`"),
            ("1000", "`1000`"),
            ("+200", "`+200`"),
            ("0200", "`0200`"),
            ("200-", "`200-`"),
            ("200-300-400", "`200-300-400`"),
            ("399-200", "`399-200`"),
        ] {
            let e = parse_status_ranges(text).unwrap_err();
            assert!(e.contains(named), "{text:?} gave {e:?}");
        }
    }

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

    proptest! {
        #[test]
        fn any_text_never_panics(text in "\\PC{0,40}") {
            let _ = parse_status_ranges(&text);
        }

        #[test]
        fn written_ranges_round_trip(
            ranges in proptest::collection::vec((100u16..=999, 0u16..=50), 1..6)
        ) {
            let ranges: Vec<RangeInclusive<u16>> = ranges
                .into_iter()
                .map(|(low, width)| low..=(low + width).min(999))
                .collect();
            let text = ranges
                .iter()
                .map(|r| if r.start() == r.end() { r.start().to_string() } else { format!("{}-{}", r.start(), r.end()) })
                .collect::<Vec<_>>()
                .join(",");
            prop_assert_eq!(parse_status_ranges(&text), Ok(ranges));
        }
    }
}
