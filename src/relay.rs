//! The byte relay: copies each direction exactly and in order, ends at the
//! source's FIN, and tells the liveness watcher when it reads and writes.
//!
//! Each direction picks its path per read, as HAProxy's `splice-auto`
//! does:
//!
//! - **Small messages are copied** through a 16 KiB scratch buffer that
//!   belongs to the worker thread, not to the session: one `read` and one
//!   `write` per message. Splicing a 64-byte query costs more than copying
//!   it (a pipe, page references, two splice calls), and database traffic
//!   is mostly such messages.
//! - **Bulk is spliced.** A read that fills the scratch buffer means the
//!   stream is moving bulk: the direction switches to splicing socket →
//!   pipe → socket (`splice(2)`), so those bytes never enter user space,
//!   until its reads are small again. The pipe comes from a small process-wide
//!   pool and goes back, empty, when the source runs dry.
//!
//! An idle session therefore holds no buffer and no pipe (no memory, no
//! descriptors). Bytes leave user space within the step that read them;
//! only when the destination cannot take them all (a slow reader) does the
//! rest wait in a buffer allocated for that moment. A short read means the
//! source is drained, so the relay tells tokio so at once (as tokio's own
//! `poll_read` does) instead of paying a read that returns `EAGAIN`.
//!
//! If the kernel refuses to splice (`EINVAL`: a socket type it cannot
//! splice), or no pipe can be had (the process is out of file descriptors:
//! a pipe takes two), the direction keeps copying: running short of
//! descriptors slows a session down, it never ends it.

use std::cell::RefCell;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, PoisonError};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::evict::Leg;
use crate::liveness::Watched;

/// The scratch buffer of the copy path, and the read size that marks a
/// stream as moving bulk.
const COPY_SIZE: usize = 16 * 1024;
/// Pipe capacity asked for: larger pipes move more per syscall. The kernel
/// may grant less (`/proc/sys/fs/pipe-max-size`, per-user limits), which
/// only costs speed.
const PIPE_SIZE: usize = 256 * 1024;
/// Empty pipes kept for reuse; beyond this they are closed. Only
/// directions moving bulk at the same instant hold one, so a few dozen
/// serve thousands of sessions.
const POOL_MAX: usize = 64;

/// The process-wide pool of empty pipes.
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

thread_local! {
    /// The copy path's buffer: one per worker thread, zeroed once, borrowed
    /// only within a step that does not wait (so no session owns it).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_SIZE].into_boxed_slice());
}

/// Looks at each chunk the copy path relays (not at spliced bulk).
pub type Observer<'a> = dyn FnMut(&[u8]) + Send + 'a;

/// A socket error, attributed to the leg it happened on.
#[derive(Debug)]
pub struct LegError {
    pub leg: Leg,
    pub error: io::Error,
}

/// Relays `from` → `to` until `from` sends FIN, adding each chunk to
/// `bytes` and showing each copied chunk to `observe`. Returns the number of bytes relayed. The caller forwards the
/// FIN ([`finish`]), or closes `to` when this was the last direction open:
/// the close sends the FIN, one syscall fewer per connection.
pub async fn pump(
    session: &Watched,
    from: Leg,
    to: Leg,
    bytes: &metrics::Counter,
    mut observe: Option<&mut Observer<'_>>,
) -> Result<u64, LegError> {
    let src = session.socket(from);
    let read_err = |error| LegError { leg: from, error };
    let write_err = |error| LegError { leg: to, error };
    let mut total = 0u64;
    let mut may_splice = true;
    loop {
        src.readable().await.map_err(read_err)?;
        let copied = match copy_step(session, from, to, &mut observe) {
            Ok(copied) => copied,
            Err(Failed::Read(e)) => return Err(read_err(e)),
            Err(Failed::Write(e)) => return Err(write_err(e)),
        };
        let (n, full) = match copied {
            Copied::Dry => continue,
            Copied::End => return Ok(total),
            // The session is evicted (see `Watched::leave`); its task ends
            // it, this direction only waits to be dropped.
            Copied::Leaving => std::future::pending().await,
            Copied::All { n, full } => (n, full),
            Copied::Part { n, full, rest } => {
                write_all(session, to, &rest).await.map_err(write_err)?;
                (n, full)
            }
        };
        total += n as u64;
        bytes.increment(n as u64);
        if !(full && may_splice) {
            continue;
        }
        match splice_burst(session, from, to, bytes, &mut total).await {
            Ok(Burst::Dry) => {}
            Ok(Burst::End) => return Ok(total),
            Err(Fallback::Unsupported) => {
                tracing::debug!("splice unsupported for this session; copying in user space");
                may_splice = false;
            }
            Err(Fallback::NoPipe(e)) => {
                // Out of descriptors now; bulk later may find a pipe again.
                tracing::debug!(error = %e, "no pipe for splicing; copying in user space");
            }
            Err(Fallback::Error(e)) => return Err(e),
        }
    }
}

/// What one copy step did.
enum Copied {
    /// The source had nothing after all (readiness was stale).
    Dry,
    /// The source sent FIN.
    End,
    /// A client's next request in a session whose backend is going away:
    /// not forwarded, the session is evicted.
    Leaving,
    /// `n` bytes read and all written; `full`: the read filled the scratch
    /// buffer (bulk is moving).
    All { n: usize, full: bool },
    /// `n` bytes read; the destination took only part, `rest` still waits.
    Part { n: usize, full: bool, rest: Vec<u8> },
}

/// Which side of a copy step failed.
enum Failed {
    Read(io::Error),
    Write(io::Error),
}

/// One read from `from` into the thread's scratch buffer and one write of
/// it to `to`, without waiting: the buffer is free again when this
/// returns. Whatever `to` could not take is returned in a new buffer.
fn copy_step(
    session: &Watched,
    from: Leg,
    to: Leg,
    observe: &mut Option<&mut Observer<'_>>,
) -> Result<Copied, Failed> {
    let (src, dst) = (session.socket(from), session.socket(to));
    SCRATCH.with_borrow_mut(|buf| {
        let n = match read_draining(src, buf) {
            Ok(0) => return Ok(Copied::End),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Copied::Dry),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Copied::Dry),
            Err(e) => return Err(Failed::Read(e)),
        };
        if session.leaving_at_read(from).is_some() {
            return Ok(Copied::Leaving);
        }
        session.note_read(from);
        if let Some(observe) = observe.as_mut() {
            observe(&buf[..n]);
        }
        let full = n == buf.len();
        let sent = match dst.try_write(&buf[..n]) {
            Ok(0) => return Err(Failed::Write(io::ErrorKind::WriteZero.into())),
            Ok(sent) => {
                session.note_write(to);
                sent
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(Failed::Write(e)),
        };
        Ok(if sent == n {
            Copied::All { n, full }
        } else {
            let rest = buf[sent..n].to_vec();
            Copied::Part { n, full, rest }
        })
    })
}

/// Reads from `src` into `buf`. A read shorter than `buf` drained the
/// socket's receive queue, so its read readiness is cleared with it (by
/// reporting `WouldBlock` to tokio's `try_io`, which clears it only if no
/// new readiness arrived meanwhile): the next wait goes straight to the
/// poller instead of paying a read that returns `EAGAIN`.
fn read_draining(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut drained = None;
    let read = src.try_io(Interest::READABLE, || {
        let n = (&*SockRef::from(src)).read(buf)?;
        if 0 < n && n < buf.len() {
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match drained {
        Some(n) => Ok(n),
        None => read,
    }
}

/// Why a splice burst stopped without finishing.
enum Fallback {
    /// The kernel cannot splice these sockets; nothing was lost, copy instead.
    Unsupported,
    /// No pipe could be made (EMFILE, ENFILE, ENOMEM); the pipe held
    /// nothing, so nothing was lost: copy instead.
    NoPipe(io::Error),
    Error(LegError),
}

/// How a splice burst ended.
enum Burst {
    /// The source sends small messages again: back to copying.
    Dry,
    /// The source sent FIN.
    End,
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

/// Splices `from` → `to` while the stream moves bulk: until a splice
/// moves less than the copy path's buffer would hold (small messages
/// again: back to copying) or the source sends FIN. While the source is
/// momentarily dry the pipe goes back to the pool, so a stream waiting for
/// its next burst holds none.
///
/// Unlike the copy path, a short splice does not clear readiness: during
/// the drain of a large chunk more bytes usually arrive, and the next
/// splice takes them at once instead of waiting for the poller.
async fn splice_burst(
    session: &Watched,
    from: Leg,
    to: Leg,
    bytes: &metrics::Counter,
    total: &mut u64,
) -> Result<Burst, Fallback> {
    let src = session.socket(from);
    let read_err = |error| Fallback::Error(LegError { leg: from, error });
    // Only ever held empty between iterations: what a splice put in is
    // drained before the next one, and the pipe is dropped (closed) on an
    // error.
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
                if let Some(p) = pipe.take() {
                    p.give_back();
                }
                return Ok(Burst::End);
            }
            Ok(n) => {
                session.note_read(from);
                drain(p, session, to, n)
                    .await
                    .map_err(|error| Fallback::Error(LegError { leg: to, error }))?;
                *total += n as u64;
                bytes.increment(n as u64);
                if n < COPY_SIZE {
                    if let Some(p) = pipe.take() {
                        p.give_back();
                    }
                    return Ok(Burst::Dry);
                }
            }
            // Dry for now: the (empty) pipe goes back to the pool.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(p) = pipe.take() {
                    p.give_back();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Nothing was read: copying on loses no bytes.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Err(Fallback::Unsupported),
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

/// Forwards a FIN (a write shutdown of `dst`). A peer that already went away makes this fail with
/// ENOTCONN, which changes nothing: the other direction reports its end.
pub fn finish(dst: &TcpStream) {
    if let Err(e) = SockRef::from(dst).shutdown(Shutdown::Write) {
        tracing::debug!(error = %e, "forwarding FIN failed");
    }
}
