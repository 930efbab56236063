//! The clients' side of each workload: connecting, one request/response,
//! and the record of what became of a request.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::args::WorkloadKind;
use super::servers::PG_USER;

/// The key the redis workload reads, and its value.
const REDIS_KEY: &str = "pulsegate:bench";
const REDIS_VALUE: &str = "a value of 24 bytes here";
/// The table the postgres workload writes to.
const PG_TABLE: &str = "pulsegate_bench";
/// Longest redis reply line accepted (the replies here are tiny).
const MAX_LINE: u64 = 4096;

pub(crate) use super::args::RouteKind as Route;

/// How a request failed (its client then reconnects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Failure {
    /// Connection refused.
    Refused,
    /// Connection reset (or aborted, or a broken pipe).
    Reset,
    /// The peer closed the connection (EOF).
    Closed,
    /// An answer that is not the expected one (a redis `-ERR`, a
    /// PostgreSQL error, a wrong echo).
    Protocol,
    /// A write answered by a server in the wrong role (a redis
    /// `-READONLY`, PostgreSQL's "read-only transaction").
    ReadOnly,
    /// Any other error.
    Other,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Reset => "reset",
            Failure::Closed => "closed",
            Failure::Protocol => "protocol",
            Failure::ReadOnly => "read_only",
            Failure::Other => "other",
        }
    }

    fn from_io(e: &std::io::Error) -> Failure {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => Failure::Refused,
            ConnectionReset | ConnectionAborted | BrokenPipe => Failure::Reset,
            UnexpectedEof => Failure::Closed,
            _ => Failure::Other,
        }
    }

    fn from_postgres(e: &tokio_postgres::Error) -> Failure {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            return if *db.code() == tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION {
                Failure::ReadOnly
            } else if code.starts_with("08") || code.starts_with("57P") {
                // A connection exception or a shutdown, sent just before
                // the server side closes: PgBouncer's "server conn
                // crashed?" (08P01), an administrator's termination (57P01).
                Failure::Closed
            } else {
                Failure::Protocol
            };
        }
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                return Failure::from_io(io);
            }
            source = cause.source();
        }
        if e.is_closed() {
            Failure::Closed
        } else {
            Failure::Other
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::from_io(&e)
    }
}

/// What became of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Outcome {
    Ok,
    Failed(Failure),
    /// No answer within the hang bound.
    Hung,
    /// Still waiting when the run ended (younger than the hang bound).
    Unfinished,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed(f) => f.as_str(),
            Outcome::Hung => "hung",
            Outcome::Unfinished => "unfinished",
        }
    }
}

/// One request, as its client saw it. `latency` is how long the client
/// waited for the answer or the error, connecting included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub route: Route,
    pub client: u32,
    /// Since the start of the load.
    pub start: Duration,
    pub latency: Duration,
    pub outcome: Outcome,
    /// Sent on a connection that had already answered a request (so a
    /// reset or close here ended a live session).
    pub reused: bool,
}

impl Record {
    /// When the client had its answer, since the start of the load.
    pub fn end(&self) -> Duration {
        self.start + self.latency
    }
}

/// An open client connection of one workload.
pub(crate) enum Conn {
    Echo(TcpStream),
    Redis(BufReader<TcpStream>),
    Postgres(PgConn),
}

/// A tokio-postgres client and the task driving its connection.
pub(crate) struct PgConn {
    client: tokio_postgres::Client,
    driver: JoinHandle<()>,
}

impl Drop for PgConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Opens a connection for `workload` (for PostgreSQL: logged in).
pub(crate) async fn connect(workload: WorkloadKind, addr: SocketAddr) -> Result<Conn, Failure> {
    if workload == WorkloadKind::Postgres {
        return connect_postgres(addr).await.map(Conn::Postgres);
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(match workload {
        WorkloadKind::Redis => Conn::Redis(BufReader::new(stream)),
        _ => Conn::Echo(stream),
    })
}

async fn connect_postgres(addr: SocketAddr) -> Result<PgConn, Failure> {
    let (client, connection) = tokio_postgres::Config::new()
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(PG_USER)
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| Failure::from_postgres(&e))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(PgConn { client, driver })
}

impl Conn {
    /// One request and its full answer; `seq` varies the request.
    pub async fn request(&mut self, seq: u64) -> Result<(), Failure> {
        match self {
            Conn::Echo(stream) => echo(stream, seq).await,
            Conn::Redis(stream) if seq.is_multiple_of(2) => {
                // A write, so a server in the wrong role shows itself.
                let set = format!(
                    "*3\r\n$3\r\nSET\r\n${}\r\n{REDIS_KEY}\r\n${}\r\n{REDIS_VALUE}\r\n",
                    REDIS_KEY.len(),
                    REDIS_VALUE.len()
                );
                redis(stream, &set).await
            }
            Conn::Redis(stream) => {
                let get = format!("*2\r\n$3\r\nGET\r\n${}\r\n{REDIS_KEY}\r\n", REDIS_KEY.len());
                redis(stream, &get).await
            }
            Conn::Postgres(pg) if seq.is_multiple_of(2) => {
                // A write, so a server in the wrong role shows itself.
                pg.client
                    .simple_query(&format!("INSERT INTO {PG_TABLE} VALUES ({seq})"))
                    .await
                    .map_err(|e| Failure::from_postgres(&e))?;
                Ok(())
            }
            Conn::Postgres(pg) => {
                let rows = pg
                    .client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(|e| Failure::from_postgres(&e))?;
                let has_row = rows
                    .iter()
                    .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)));
                has_row.then_some(()).ok_or(Failure::Protocol)
            }
        }
    }

    /// Puts what the workload reads in place (the redis key).
    pub async fn prepare(&mut self) -> Result<(), Failure> {
        match self {
            Conn::Redis(stream) => {
                let set = format!(
                    "*3\r\n$3\r\nSET\r\n${}\r\n{REDIS_KEY}\r\n${}\r\n{REDIS_VALUE}\r\n",
                    REDIS_KEY.len(),
                    REDIS_VALUE.len()
                );
                redis(stream, &set).await
            }
            Conn::Postgres(pg) => pg
                .client
                .simple_query(&format!("CREATE TABLE IF NOT EXISTS {PG_TABLE} (n bigint)"))
                .await
                .map(drop)
                .map_err(|e| Failure::from_postgres(&e)),
            Conn::Echo(_) => Ok(()),
        }
    }
}

/// Sends a 32-byte line and expects it back byte for byte.
async fn echo(stream: &mut TcpStream, seq: u64) -> Result<(), Failure> {
    let line = format!("{seq:031}\n");
    stream.write_all(line.as_bytes()).await?;
    let mut reply = [0u8; 32];
    stream.read_exact(&mut reply).await?;
    (reply == line.as_bytes())
        .then_some(())
        .ok_or(Failure::Protocol)
}

/// Sends one RESP command and reads one reply (simple string, error or
/// bulk string).
async fn redis(stream: &mut BufReader<TcpStream>, command: &str) -> Result<(), Failure> {
    stream.get_mut().write_all(command.as_bytes()).await?;
    let mut line = Vec::new();
    let n = (&mut *stream)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(Failure::Closed);
    }
    match resp_header(&line)? {
        None => Ok(()),
        Some(len) => {
            let mut body = vec![0u8; len + 2];
            stream.read_exact(&mut body).await?;
            Ok(())
        }
    }
}

/// The first line of a RESP reply: `Ok(None)` for a complete answer
/// (`+OK`, `$-1`), `Ok(Some(n))` when a bulk string of n bytes (plus CRLF)
/// follows, `Err` for an error reply or garbage.
fn resp_header(line: &[u8]) -> Result<Option<usize>, Failure> {
    let text = std::str::from_utf8(line).map_err(|_| Failure::Protocol)?;
    let text = text.strip_suffix("\r\n").ok_or(Failure::Protocol)?;
    match text.as_bytes().first() {
        Some(b'+') => Ok(None),
        Some(b'-') if text.starts_with("-READONLY") => Err(Failure::ReadOnly),
        Some(b'$') if text == "$-1" => Ok(None),
        Some(b'$') => text[1..]
            .parse::<usize>()
            .map(Some)
            .map_err(|_| Failure::Protocol),
        _ => Err(Failure::Protocol),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_headers() {
        assert_eq!(resp_header(b"+PONG\r\n"), Ok(None));
        assert_eq!(resp_header(b"$-1\r\n"), Ok(None));
        assert_eq!(resp_header(b"$24\r\n"), Ok(Some(24)));
        assert_eq!(resp_header(b"-LOADING\r\n"), Err(Failure::Protocol));
        assert_eq!(
            resp_header(b"-READONLY You can't write against a read only replica.\r\n"),
            Err(Failure::ReadOnly)
        );
        assert_eq!(resp_header(b"+PONG"), Err(Failure::Protocol));
        assert_eq!(resp_header(b"$x\r\n"), Err(Failure::Protocol));
    }

    #[test]
    fn io_errors_are_classified() {
        use std::io::{Error, ErrorKind};
        assert_eq!(
            Failure::from(Error::from(ErrorKind::ConnectionRefused)),
            Failure::Refused
        );
        assert_eq!(
            Failure::from(Error::from(ErrorKind::BrokenPipe)),
            Failure::Reset
        );
        assert_eq!(
            Failure::from(Error::from(ErrorKind::UnexpectedEof)),
            Failure::Closed
        );
        assert_eq!(
            Failure::from(Error::from(ErrorKind::TimedOut)),
            Failure::Other
        );
    }

    #[tokio::test]
    async fn echo_round_trip_against_the_lab_echo_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(crate::lab::echo_server(listener, None));
        let mut conn = connect(WorkloadKind::Echo, addr).await.unwrap();
        for seq in 0..3 {
            conn.request(seq).await.unwrap();
        }
        server.abort();
    }
}
