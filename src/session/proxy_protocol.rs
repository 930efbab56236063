//! The PROXY protocol on a session's two legs: `accept_proxy` takes the
//! header a load balancer put in front of the client's bytes (its source is
//! then the client's address everywhere: logs, `/status`, evictions, and
//! what `send_proxy` forwards), and `send_proxy` writes one on the
//! upstream connection before any client byte, whether that connection
//! was made for this client or is a pool spare handed out now.

use std::io;
use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::ListenerContext;
use crate::proxy_header::{self, HeaderError, ReadError};
use crate::sockopt;
use crate::telemetry::metrics::HeaderRejection;

/// Where a client's connection comes from and goes to, as the session
/// tells its backend.
#[derive(Debug, Clone, Copy)]
pub struct ClientEnds {
    /// The client: the socket's peer, or a PROXY header's source.
    pub client: SocketAddr,
    /// What the client connected to: this socket's local address, or a
    /// PROXY header's destination (the listener's bound address when the
    /// listener neither reads nor writes headers: nothing uses it then).
    pub destination: SocketAddr,
}

/// The client's ends: with `accept_proxy`, read from its PROXY header
/// (the socket's own for a LOCAL or UNKNOWN header). `None` when the header
/// is missing, invalid or late: the client is then logged, counted and to
/// be closed without an upstream connect.
pub async fn client_ends(
    ctx: &ListenerContext,
    client: &mut TcpStream,
    peer: SocketAddr,
) -> Option<ClientEnds> {
    let settings = &ctx.config.settings;
    // Only a header needs the address the client connected to: spare the
    // getsockname on every other connection.
    let destination = if settings.accept_proxy || settings.send_proxy.is_some() {
        client.local_addr().unwrap_or(ctx.bound)
    } else {
        ctx.bound
    };
    let own = ClientEnds {
        client: peer,
        destination,
    };
    if !settings.accept_proxy {
        return Some(own);
    }
    let read = tokio::select! {
        read = tokio::time::timeout(settings.proxy_header_timeout, proxy_header::read_from(client)) => read,
        _ = ctx.shared.drain_deadline.cancelled() => return None,
    };
    let rejection = match read {
        Ok(Ok(header)) => {
            return Some(match (header.source, header.destination) {
                (Some(client), Some(destination)) => ClientEnds {
                    client,
                    destination,
                },
                _ => own,
            })
        }
        Ok(Err(e)) => (rejection_of(&e), e.to_string()),
        Err(_) => (
            HeaderRejection::Timeout,
            format!(
                "no complete PROXY header within proxy_header_timeout ({})",
                humantime::format_duration(settings.proxy_header_timeout)
            ),
        ),
    };
    let (why, detail) = rejection;
    tracing::warn!(listener = %ctx.name, peer = %peer, reason = why.as_str(), error = %detail,
        "closing client: accept_proxy needs a valid PROXY protocol header first");
    ctx.shared.meters.proxy_header_rejected(why);
    let _ = sockopt::set_reset_on_close(client);
    None
}

fn rejection_of(e: &ReadError) -> HeaderRejection {
    match e {
        ReadError::Header(HeaderError::NotProxy(_)) => HeaderRejection::Missing,
        ReadError::Header(_) => HeaderRejection::Invalid,
        ReadError::Closed(_) | ReadError::Io(_) => HeaderRejection::Closed,
    }
}

/// Writes the listener's `send_proxy` header (if it has one) on `upstream`,
/// before any byte of the client's. A failure means this upstream
/// connection cannot be used.
pub async fn send_header(
    ctx: &ListenerContext,
    upstream: &mut TcpStream,
    ends: ClientEnds,
) -> io::Result<()> {
    let Some(version) = ctx.config.settings.send_proxy else {
        return Ok(());
    };
    let header = proxy_header::encode(version, Some((ends.client, ends.destination)));
    // A new connection's send buffer is empty: this completes at once
    // unless the socket is already broken.
    let timeout = ctx.config.settings.connect_timeout;
    match tokio::time::timeout(timeout, upstream.write_all(&header)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the PROXY header could not be written within connect_timeout",
        )),
    }
}
