//! The `tcp` check: a backend is up when a connection to it succeeds.

use std::net::SocketAddr;

use super::{connect, CheckError, Verdict};

/// Connects, then closes at once.
pub(super) async fn check(addr: SocketAddr) -> Result<Verdict, CheckError> {
    let _stream = connect(addr).await?;
    Ok(Verdict::up(None, "connected"))
}
