//! The byte relay: copies each direction exactly and in order, forwards a
//! FIN as a write shutdown, and tells the liveness watcher when it writes.
//!
//! Buffers exist only while data flows: a direction waits for readiness with
//! no buffer and frees it whenever the socket runs dry, so an idle session
//! holds no relay memory.

use std::io;
use std::net::Shutdown;

use socket2::SockRef;

use crate::evict::Leg;
use crate::liveness::Watched;

const BUF_SIZE: usize = 64 * 1024;

/// A socket error, attributed to the leg it happened on.
#[derive(Debug)]
pub struct LegError {
    pub leg: Leg,
    pub error: io::Error,
}

/// Relays `from` → `to` until `from` sends FIN (forwarded as a write
/// shutdown of `to`), adding each chunk to `bytes`. Returns the number of
/// bytes relayed.
pub async fn pump(
    session: &Watched,
    from: Leg,
    to: Leg,
    bytes: &metrics::Counter,
) -> Result<u64, LegError> {
    let src = session.socket(from);
    let dst = session.socket(to);
    let read_err = |error| LegError { leg: from, error };
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        src.readable().await.map_err(read_err)?;
        // Reads go into spare capacity: allocated, never zero-filled.
        buf.clear();
        buf.reserve(BUF_SIZE);
        match src.try_read_buf(&mut buf) {
            Ok(0) => {
                finish(dst);
                return Ok(total);
            }
            Ok(n) => {
                session.note_read(from);
                session.note_write(to);
                write_all(dst, &buf[..n])
                    .await
                    .map_err(|error| LegError { leg: to, error })?;
                total += n as u64;
                bytes.increment(n as u64);
            }
            // Ran dry: give the buffer back, an idle session holds none.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf = Vec::new(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
}

async fn write_all(dst: &tokio::net::TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Forwards a FIN. A peer that already went away makes this fail with
/// ENOTCONN, which changes nothing: the other direction reports its end.
fn finish(dst: &tokio::net::TcpStream) {
    if let Err(e) = SockRef::from(dst).shutdown(Shutdown::Write) {
        tracing::debug!(error = %e, "forwarding FIN failed");
    }
}
