//! The `postgres` check. Without a `user`: an SSLRequest, answered by one
//! byte (`S` or `N`) by any PostgreSQL (or pgbouncer) that is accepting
//! connections, with no login and nothing in the server's log. With a
//! `user`: a real login through tokio-postgres and `SELECT
//! pg_is_in_recovery(), current_setting('transaction_read_only')`: a
//! server in recovery is a replica, and so is a primary that takes no
//! writes (`default_transaction_read_only = on`, as failover tools fence
//! the old writer before its replica is promoted) — what libpq's
//! `target_session_attrs=read-write` also asks.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::{NoTls, SimpleQueryMessage};

use super::{excerpt, one_line, password, read_more, CheckError, Finding};
use crate::config::CheckConfig;
use crate::health::check::Role;

/// SSLRequest: length 8, then the code 80877103 (1234 << 16 | 5679).
pub(crate) const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Whether the server is a standby, and whether a new session on it may
/// write.
const ROLE_QUERY: &str = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')";

/// SQLSTATE 57P03, cannot_connect_now: starting up, shutting down, or a
/// standby not yet accepting connections.
const CANNOT_CONNECT_NOW: &str = "57P03";

/// A server's answer to an SSLRequest, when it is a PostgreSQL answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslAnswer {
    /// `S`: the server would start TLS.
    Willing,
    /// `N`: the server does not do TLS; plain startup would follow.
    Unwilling,
}

/// Why an answer to an SSLRequest is not PostgreSQL's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SslAnswerError {
    #[error("closed without answering the SSLRequest")]
    Empty,
    #[error("answered the SSLRequest with an error: {0}")]
    ServerError(String),
    #[error("answered the SSLRequest with `{shown}` ({len} bytes), not one byte S or N")]
    Unexpected { shown: String, len: usize },
}

/// Classifies everything the server sent in answer to an SSLRequest.
pub(crate) fn parse_ssl_answer(bytes: &[u8]) -> Result<SslAnswer, SslAnswerError> {
    match bytes {
        [] => Err(SslAnswerError::Empty),
        [b'S'] => Ok(SslAnswer::Willing),
        [b'N'] => Ok(SslAnswer::Unwilling),
        [b'E', rest @ ..] => Err(SslAnswerError::ServerError(error_message(rest))),
        _ => Err(SslAnswerError::Unexpected {
            shown: excerpt(bytes),
            len: bytes.len(),
        }),
    }
}

/// The text of an ErrorResponse body (after its `E`): the `M` field of a
/// protocol-3 message (which starts with a 4-byte length, so a 0 byte), or
/// the text of an old-style one.
fn error_message(body: &[u8]) -> String {
    if body.first() != Some(&0) {
        let text = body.split(|&b| b == 0).next().unwrap_or_default();
        return String::from_utf8_lossy(text).trim_end().to_string();
    }
    let mut rest = body.get(4..).unwrap_or_default();
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        if kind == b'M' {
            return String::from_utf8_lossy(&tail[..end]).into_owned();
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    "(no message)".to_string()
}

/// Runs the check: SSLRequest without a user, a login with one.
pub(super) async fn check(config: &CheckConfig, stream: TcpStream) -> Result<Finding, CheckError> {
    match &config.user {
        None => ssl_probe(stream).await,
        Some(user) => {
            let password = password(config).map_err(CheckError::Password)?;
            let database = config.database.as_deref().unwrap_or(user);
            login(stream, user, password.as_deref(), database).await
        }
    }
}

async fn ssl_probe(mut stream: TcpStream) -> Result<Finding, CheckError> {
    stream
        .write_all(&SSL_REQUEST)
        .await
        .map_err(CheckError::Io)?;
    let mut answer = Vec::new();
    match read_more(&mut stream, &mut answer, "answering the SSLRequest").await {
        Ok(()) | Err(CheckError::Closed(_)) => {}
        Err(e) => return Err(e),
    }
    Ok(match parse_ssl_answer(&answer) {
        Ok(SslAnswer::Willing) => Finding::up(None, "answered the SSLRequest: S (TLS offered)"),
        Ok(SslAnswer::Unwilling) => Finding::up(None, "answered the SSLRequest: N (no TLS)"),
        Err(e) => Finding::down(e.to_string()),
    })
}

async fn login(
    stream: TcpStream,
    user: &str,
    password: Option<&str>,
    database: &str,
) -> Result<Finding, CheckError> {
    let mut pg = tokio_postgres::Config::new();
    pg.user(user)
        .dbname(database)
        .application_name("pulsegate-check");
    if let Some(password) = password {
        pg.password(password);
    }
    let (client, connection) = match pg.connect_raw(stream, NoTls).await {
        Ok(pair) => pair,
        Err(e) => return Ok(login_failure(&e)),
    };
    let mut connection = std::pin::pin!(connection);
    let answer = {
        let mut query = std::pin::pin!(client.simple_query(ROLE_QUERY));
        tokio::select! {
            answer = &mut query => answer,
            // The connection ends only on an error, which fails the query too.
            _ = &mut connection => query.await,
        }
    };
    drop(client);
    // Let the connection send Terminate, so the server logs no lost client.
    let _ = connection.await;
    Ok(match answer {
        Ok(messages) => recovery_finding(&messages),
        Err(e) => Finding::down(format!("{ROLE_QUERY}: {}", server_says(&e))),
    })
}

/// Down with the server's message; NotReady while it starts or stops.
fn login_failure(e: &tokio_postgres::Error) -> Finding {
    let not_ready = e
        .as_db_error()
        .is_some_and(|db| db.code().code() == CANNOT_CONNECT_NOW);
    let detail = format!("login failed: {}", server_says(e));
    if not_ready {
        Finding::not_ready(detail)
    } else {
        Finding::down(detail)
    }
}

/// "FATAL 28P01: password authentication failed for user …", or the client
/// side error chain when the server said nothing.
fn server_says(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => one_line(e),
    }
}

/// The role from [`ROLE_QUERY`]'s one row: in recovery (`t`), a replica;
/// else read-only (`on`), a fenced primary that takes no writes, also a
/// replica; else (`f`, `off`) the primary.
fn recovery_finding(messages: &[SimpleQueryMessage]) -> Finding {
    let row = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => {
            Some((row.get(0).map(str::to_owned), row.get(1).map(str::to_owned)))
        }
        _ => None,
    });
    let (recovery, read_only) = row.unwrap_or_default();
    role_finding(recovery.as_deref(), read_only.as_deref())
}

fn role_finding(recovery: Option<&str>, read_only: Option<&str>) -> Finding {
    match (recovery, read_only) {
        (Some("t"), _) => Finding::up(
            Some(Role::Replica),
            "logged in; pg_is_in_recovery = t (replica)",
        ),
        (Some("f"), Some("on")) => Finding::up(
            Some(Role::Replica),
            "logged in; not in recovery but transaction_read_only = on (takes no writes)",
        ),
        (Some("f"), Some("off")) => Finding::up(
            Some(Role::Primary),
            "logged in; pg_is_in_recovery = f, transaction_read_only = off (primary)",
        ),
        other => Finding::down(format!(
            "{ROLE_QUERY} returned {other:?}, expected (t or f, on or off)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_read_only_primary_is_no_primary() {
        let role = |r, ro| role_finding(r, ro).role;
        assert_eq!(role(Some("f"), Some("off")), Some(Role::Primary));
        assert_eq!(role(Some("t"), Some("on")), Some(Role::Replica));
        assert_eq!(role(Some("f"), Some("on")), Some(Role::Replica));
        let odd = role_finding(Some("f"), None);
        assert_eq!(
            odd.status,
            super::super::CheckStatus::Down,
            "{}",
            odd.detail
        );
        assert_eq!(
            role_finding(None, None).status,
            super::super::CheckStatus::Down
        );
    }

    /// A protocol-3 ErrorResponse with the usual fields.
    fn error_response(message: &str) -> Vec<u8> {
        let mut fields = Vec::new();
        for (kind, value) in [(b'S', "FATAL"), (b'C', "08P01"), (b'M', message)] {
            fields.push(kind);
            fields.extend_from_slice(value.as_bytes());
            fields.push(0);
        }
        fields.push(0);
        let mut out = vec![b'E'];
        out.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(&fields);
        out
    }

    #[test]
    fn ssl_request_is_length_8_and_code_80877103() {
        assert_eq!(u32::from_be_bytes(SSL_REQUEST[..4].try_into().unwrap()), 8);
        assert_eq!(
            u32::from_be_bytes(SSL_REQUEST[4..].try_into().unwrap()),
            80_877_103
        );
    }

    #[test]
    fn one_byte_s_or_n_is_postgres() {
        assert_eq!(parse_ssl_answer(b"S"), Ok(SslAnswer::Willing));
        assert_eq!(parse_ssl_answer(b"N"), Ok(SslAnswer::Unwilling));
    }

    #[test]
    fn anything_else_is_named() {
        assert_eq!(parse_ssl_answer(b""), Err(SslAnswerError::Empty));
        let ssh = parse_ssl_answer(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap_err();
        assert!(
            ssh.to_string().contains("SSH-2.0-OpenSSH_9.2\\r\\n"),
            "{ssh}"
        );
        let redis = parse_ssl_answer(b"-ERR unknown command\r\n").unwrap_err();
        assert!(redis.to_string().contains("-ERR unknown"), "{redis}");
    }

    #[test]
    fn error_response_message_is_extracted() {
        let e = parse_ssl_answer(&error_response("unsupported frontend protocol"));
        assert_eq!(
            e,
            Err(SslAnswerError::ServerError(
                "unsupported frontend protocol".into()
            ))
        );
        // Old servers sent `E` and a plain text.
        assert_eq!(
            parse_ssl_answer(b"EUnsupported frontend protocol.\n\0"),
            Err(SslAnswerError::ServerError(
                "Unsupported frontend protocol.".into()
            ))
        );
        assert_eq!(
            parse_ssl_answer(b"E\0\0\0\x05\0"),
            Err(SslAnswerError::ServerError("(no message)".into()))
        );
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let answer = parse_ssl_answer(&bytes);
            prop_assert_eq!(answer.is_ok(), bytes == b"S" || bytes == b"N");
        }

        #[test]
        fn error_responses_are_recognised(message in "[^\u{0}]{0,80}") {
            prop_assert_eq!(
                parse_ssl_answer(&error_response(&message)),
                Err(SslAnswerError::ServerError(message.clone()))
            );
        }
    }
}
