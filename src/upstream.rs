//! Connecting to a backend: the first one, in configured order, that
//! accepts within `connect_timeout`, with socket options set before the SYN.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use crate::backend::meters::BackendMeters;
use crate::backend::BackendId;
use crate::config::{BackendAddr, SocketSettings};
use crate::sockopt;

/// What a failed connect says about the host at the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The host answered with a refusal (RST): it is alive, its port is not.
    Refused,
    /// Nothing came back in time, or the network says the host cannot be
    /// reached: the host, or the way to it, is gone.
    NoAnswer,
    /// Our own side could not even try: out of file descriptors, local
    /// ports or memory, no route from here, a local firewall. Says nothing
    /// about the host.
    Local,
}

impl ConnectFailure {
    /// Classifies a connect error (a timeout is [`ConnectFailure::NoAnswer`]).
    pub fn of(error: &io::Error) -> Self {
        use libc::*;
        match error.raw_os_error() {
            Some(ECONNREFUSED | ECONNRESET) => ConnectFailure::Refused,
            Some(
                EMFILE | ENFILE | ENOBUFS | ENOMEM | EADDRNOTAVAIL | EADDRINUSE | ENETUNREACH
                | EACCES | EPERM | EAFNOSUPPORT,
            ) => ConnectFailure::Local,
            Some(_) => ConnectFailure::NoAnswer,
            None => match error.kind() {
                io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => {
                    ConnectFailure::Refused
                }
                _ => ConnectFailure::NoAnswer,
            },
        }
    }
}

/// Every backend refused or timed out.
#[derive(Debug, thiserror::Error)]
#[error("no backend accepted the connection: {}", .attempts.join("; "))]
pub struct ConnectError {
    /// One line per address tried: `address: what happened`.
    pub attempts: Vec<String>,
}

/// A connected upstream socket and which backend it belongs to.
pub struct Upstream {
    pub stream: TcpStream,
    pub backend: BackendId,
    pub peer: SocketAddr,
    /// Taken from the warm pool rather than connected for this client.
    pub pooled: bool,
}

/// A backend to connect to: which one, how it was written, and its
/// addresses as last resolved (empty: not resolved yet, look it up now).
pub struct ConnectTarget<'a> {
    pub id: BackendId,
    pub backend: &'a BackendAddr,
    pub addrs: Vec<SocketAddr>,
    /// Where connect latency and failures are counted.
    pub meters: Option<&'a BackendMeters>,
}

/// Tries the backends in the order given (as routing chose them); each
/// address gets `timeout`.
pub async fn connect(
    backends: Vec<ConnectTarget<'_>>,
    settings: &SocketSettings,
    timeout: Duration,
) -> Result<Upstream, ConnectError> {
    let mut attempts = Vec::new();
    for ConnectTarget {
        id,
        backend,
        addrs,
        meters,
    } in backends
    {
        let addrs = if addrs.is_empty() {
            match resolve(backend, timeout).await {
                Ok(addrs) => addrs,
                Err(e) => {
                    attempts.push(format!("{backend}: cannot resolve: {e}"));
                    continue;
                }
            }
        } else {
            addrs
        };
        for addr in addrs {
            let started = std::time::Instant::now();
            let result = connect_one(addr, settings, timeout).await;
            if let Some(m) = meters {
                match &result {
                    Ok(_) => m.connect_duration.record(started.elapsed().as_secs_f64()),
                    Err(_) => m.connect_failures.increment(1),
                }
            }
            match result {
                Ok(stream) => {
                    return Ok(Upstream {
                        stream,
                        backend: id,
                        peer: addr,
                        pooled: false,
                    })
                }
                Err(e) => attempts.push(format!("{backend} ({addr}): {e}")),
            }
        }
    }
    Err(ConnectError { attempts })
}

/// The addresses of a backend today (a DNS lookup for names).
pub async fn resolve(backend: &BackendAddr, timeout: Duration) -> io::Result<Vec<SocketAddr>> {
    match backend {
        BackendAddr::Ip(addr) => Ok(vec![*addr]),
        BackendAddr::Dns { host, port } => {
            let lookup = tokio::net::lookup_host((host.as_str(), *port));
            let addrs: Vec<_> = tokio::time::timeout(timeout, lookup)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "DNS lookup timed out"))??
                .collect();
            if addrs.is_empty() {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no addresses"));
            }
            Ok(addrs)
        }
    }
}

async fn connect_one(
    addr: SocketAddr,
    settings: &SocketSettings,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sockopt::apply(&socket, settings)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no answer within connect_timeout ({})",
                humantime::format_duration(timeout)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_say_whether_the_host_answered() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            ConnectFailure::of(&os(libc::ECONNREFUSED)),
            ConnectFailure::Refused
        );
        assert_eq!(ConnectFailure::of(&os(libc::EMFILE)), ConnectFailure::Local);
        assert_eq!(
            ConnectFailure::of(&os(libc::ENETUNREACH)),
            ConnectFailure::Local
        );
        assert_eq!(
            ConnectFailure::of(&os(libc::EHOSTUNREACH)),
            ConnectFailure::NoAnswer
        );
        assert_eq!(
            ConnectFailure::of(&os(libc::ETIMEDOUT)),
            ConnectFailure::NoAnswer
        );
        let timeout = io::Error::new(io::ErrorKind::TimedOut, "no answer");
        assert_eq!(ConnectFailure::of(&timeout), ConnectFailure::NoAnswer);
    }
}
