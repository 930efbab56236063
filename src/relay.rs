//! The byte relay: copies each direction exactly and in order, forwards a
//! FIN as a write shutdown, and tells the liveness watcher when it writes.
//!
//! On Linux the bytes never enter user space: each direction splices
//! socket → pipe → socket (`splice(2)`), which saves two copies per byte and
//! is what lets a proxy keep up with a direct connection. A direction holds
//! a pipe only while data flows: it takes an empty one from a small
//! process-wide pool when bytes arrive and gives it back, empty, as soon as
//! its source runs dry. An idle session holds no pipe (no memory, no
//! descriptors), and a busy one costs no pipe creation and no timer per
//! message. If the kernel refuses to splice (`EINVAL`: a socket type it
//! cannot splice), or no pipe can be had (the process is out of file
//! descriptors: a pipe takes two), the direction falls back to a user-space
//! buffer that likewise exists only while data flows: running short of
//! descriptors slows a session down, it never ends it.

use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, PoisonError};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::evict::Leg;
use crate::liveness::Watched;

/// User-space buffer of the fallback copy.
const BUF_SIZE: usize = 64 * 1024;
/// Pipe capacity asked for: larger pipes move more per syscall. The kernel
/// may grant less (`/proc/sys/fs/pipe-max-size`, per-user limits), which
/// only costs speed.
const PIPE_SIZE: usize = 256 * 1024;
/// Empty pipes kept for reuse; beyond this they are closed. Only
/// directions moving data at the same instant hold one, so a few dozen
/// serve thousands of sessions.
const POOL_MAX: usize = 64;

/// The process-wide pool of empty pipes.
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

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
    let mut total = 0;
    match splice_pump(session, from, to, bytes, &mut total).await {
        Ok(()) => return Ok(total),
        Err(Fallback::Error(e)) => return Err(e),
        Err(Fallback::Unsupported) => {
            tracing::debug!("splice unsupported for this session; copying in user space")
        }
        Err(Fallback::NoPipe(e)) => {
            tracing::debug!(error = %e, "no pipe for splicing; copying in user space")
        }
    }
    copy_pump(session, from, to, bytes, &mut total).await?;
    Ok(total)
}

/// Why the splice relay stopped without finishing.
enum Fallback {
    /// The kernel cannot splice these sockets; nothing was lost, copy instead.
    Unsupported,
    /// No pipe could be made (EMFILE, ENFILE, ENOMEM); the pipe held
    /// nothing, so nothing was lost: copy instead.
    NoPipe(io::Error),
    Error(LegError),
}

/// A pipe's two ends.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// An empty pipe: from the pool, or a new one.
    fn take() -> io::Result<Pipe> {
        let pooled = POOL.lock().unwrap_or_else(PoisonError::into_inner).pop();
        pooled.map_or_else(Pipe::new, Ok)
    }

    /// Returns an empty pipe to the pool (or closes it when the pool is
    /// full).
    fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }

    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Best effort: a smaller pipe still works.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Pipe { read, write })
    }
}

fn splice_flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE
}

async fn splice_pump(
    session: &Watched,
    from: Leg,
    to: Leg,
    bytes: &metrics::Counter,
    total: &mut u64,
) -> Result<(), Fallback> {
    let src = session.socket(from);
    let dst = session.socket(to);
    let read_err = |error| Fallback::Error(LegError { leg: from, error });
    // Only ever held empty between iterations: a pipe with bytes in it is
    // drained before the next read, and dropped (closed) on an error.
    let mut pipe: Option<Pipe> = None;
    loop {
        src.readable().await.map_err(read_err)?;
        let p = match &pipe {
            Some(p) => p,
            None => pipe.insert(Pipe::take().map_err(Fallback::NoPipe)?),
        };
        let moved = src.try_io(Interest::READABLE, || {
            splice(src, None, &p.write, None, PIPE_SIZE, splice_flags()).map_err(io::Error::from)
        });
        match moved {
            Ok(0) => {
                finish(dst);
                if let Some(p) = pipe.take() {
                    p.give_back();
                }
                return Ok(());
            }
            Ok(n) => {
                session.note_read(from);
                drain(p, session, to, n)
                    .await
                    .map_err(|error| Fallback::Error(LegError { leg: to, error }))?;
                *total += n as u64;
                bytes.increment(n as u64);
            }
            // Ran dry: the (empty) pipe goes back to the pool.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(p) = pipe.take() {
                    p.give_back();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Nothing was read: the fallback loses no bytes.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && *total == 0 => {
                return Err(Fallback::Unsupported)
            }
            Err(e) => return Err(read_err(e)),
        }
    }
}

/// Moves `n` bytes from the pipe to leg `to`, telling the watcher after
/// each write.
async fn drain(pipe: &Pipe, session: &Watched, to: Leg, mut n: usize) -> io::Result<()> {
    let dst = session.socket(to);
    while n > 0 {
        dst.writable().await?;
        let sent = dst.try_io(Interest::WRITABLE, || {
            splice(&pipe.read, None, dst, None, n, splice_flags()).map_err(io::Error::from)
        });
        match sent {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => {
                session.note_write(to);
                n -= k;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The portable relay: read into a buffer that exists only while data
/// flows, write it all out.
async fn copy_pump(
    session: &Watched,
    from: Leg,
    to: Leg,
    bytes: &metrics::Counter,
    total: &mut u64,
) -> Result<(), LegError> {
    let src = session.socket(from);
    let dst = session.socket(to);
    let read_err = |error| LegError { leg: from, error };
    let mut buf: Vec<u8> = Vec::new();
    loop {
        src.readable().await.map_err(read_err)?;
        // Reads go into spare capacity: allocated, never zero-filled.
        buf.clear();
        buf.reserve(BUF_SIZE);
        match src.try_read_buf(&mut buf) {
            Ok(0) => {
                finish(dst);
                return Ok(());
            }
            Ok(n) => {
                session.note_read(from);
                write_all(session, to, &buf[..n])
                    .await
                    .map_err(|error| LegError { leg: to, error })?;
                *total += n as u64;
                bytes.increment(n as u64);
            }
            // Ran dry: give the buffer back, an idle session holds none.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf = Vec::new(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
}

async fn write_all(session: &Watched, to: Leg, mut bytes: &[u8]) -> io::Result<()> {
    let dst = session.socket(to);
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                session.note_write(to);
                bytes = &bytes[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Forwards a FIN. A peer that already went away makes this fail with
/// ENOTCONN, which changes nothing: the other direction reports its end.
fn finish(dst: &TcpStream) {
    if let Err(e) = SockRef::from(dst).shutdown(Shutdown::Write) {
        tracing::debug!(error = %e, "forwarding FIN failed");
    }
}
