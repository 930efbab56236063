//! Every socket option pulsegate sets, in one place, and the one `unsafe`
//! call: reading `struct tcp_info` with getsockopt(TCP_INFO).
//!
//! Failure policy: options that carry the liveness contract (keepalive,
//! TCP_USER_TIMEOUT, the probe re-arm) are errors the caller must handle;
//! TCP_NODELAY is a latency nicety and only warns.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use crate::config::SocketSettings;

/// Applies keepalive, TCP_USER_TIMEOUT and TCP_NODELAY from config.
pub fn apply(socket: &impl AsFd, settings: &SocketSettings) -> io::Result<()> {
    let sock = SockRef::from(socket);
    let keepalive = TcpKeepalive::new()
        .with_time(settings.keepalive_idle)
        .with_interval(settings.keepalive_interval)
        .with_retries(settings.keepalive_count);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(settings.user_timeout))?;
    if let Err(e) = sock.set_tcp_nodelay(settings.nodelay) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY; continuing without it");
    }
    Ok(())
}

/// Sets TCP_KEEPIDLE. Lowering it on an idle socket with keepalive on
/// re-arms the kernel's keepalive timer: if the socket has been quiet longer
/// than `idle`, a probe leaves at once (docs/DESIGN.md, "The on-demand probe").
pub fn set_keepalive_idle(socket: &impl AsFd, idle: Duration) -> io::Result<()> {
    SockRef::from(socket).set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))
}

/// SO_LINGER 0: the next close sends RST instead of FIN.
pub fn set_reset_on_close(socket: &impl AsFd) -> io::Result<()> {
    SockRef::from(socket).set_linger(Some(Duration::ZERO))
}

/// The fields of the kernel's `struct tcp_info` that pulsegate reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// Kernel TCP state (1 = ESTABLISHED, 7 = CLOSE, 8 = CLOSE_WAIT, ...).
    pub state: u8,
    /// Retransmissions of the oldest unACKed segment (icsk_retransmits).
    pub retransmits: u8,
    /// Keepalive or zero-window probes sent and not answered.
    pub probes: u8,
    pub backoff: u8,
    /// Segments sent and not yet ACKed.
    pub unacked: u32,
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub last_ack_recv_ms: u32,
    pub rtt_us: u32,
    /// The current retransmission timeout (µs): how long the kernel waits
    /// for an ACK before it re-sends.
    pub rto_us: u32,
    pub total_retrans: u32,
    /// Segments received, and those of them that carried data: the rest
    /// are pure ACKs, which a peer sends only when it hears us.
    pub segs_in: u32,
    pub data_segs_in: u32,
    /// Data segments sent (retransmissions included).
    pub data_segs_out: u32,
    /// Bytes queued but not yet sent (e.g. held back by a zero window).
    pub notsent_bytes: u32,
    /// Bytes the peer has acknowledged so far (0 on kernels before 4.1).
    /// Unlike `last_ack_recv_ms`, only ACKs that acknowledge new data move
    /// it: a peer that cannot hear us but keeps retransmitting its own
    /// data refreshes `last_ack_recv_ms` and never this.
    pub bytes_acked: u64,
}

impl TcpInfo {
    pub const ESTABLISHED: u8 = 1;
}

/// Mirror of the start of the kernel's `struct tcp_info`
/// (include/uapi/linux/tcp.h), up to `tcpi_min_rtt`. The kernel copies
/// min(our length, its length), so newer kernels with more fields are fine.
#[repr(C)]
#[derive(Default)]
struct RawTcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
}

/// Reads TCP_INFO for a connected TCP socket.
pub fn tcp_info(socket: &impl AsFd) -> io::Result<TcpInfo> {
    let raw = raw_tcp_info(socket)?;
    Ok(TcpInfo {
        state: raw.state,
        retransmits: raw.retransmits,
        probes: raw.probes,
        backoff: raw.backoff,
        unacked: raw.unacked,
        last_data_sent_ms: raw.last_data_sent,
        last_data_recv_ms: raw.last_data_recv,
        last_ack_recv_ms: raw.last_ack_recv,
        rtt_us: raw.rtt,
        rto_us: raw.rto,
        total_retrans: raw.total_retrans,
        segs_in: raw.segs_in,
        bytes_acked: raw.bytes_acked,
        // Older kernels stop before these fields (< 4.6, < 4.6); len tells,
        // and the fields it did not reach stay 0.
        notsent_bytes: raw.notsent_bytes,
        data_segs_in: raw.data_segs_in,
        data_segs_out: raw.data_segs_out,
    })
}

/// A listening socket's accept queue, from its TCP_INFO (for a socket in
/// LISTEN state the kernel reports the queue where a connection's
/// `unacked` and `sacked` would be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptQueue {
    /// Handshakes completed and not yet accepted.
    pub queued: u32,
    /// The limit in force: the backlog given to `listen(2)`, capped by
    /// `net.core.somaxconn`.
    pub limit: u32,
}

/// Reads the accept queue of a listening TCP socket.
pub fn accept_queue(listener: &impl AsFd) -> io::Result<AcceptQueue> {
    let raw = raw_tcp_info(listener)?;
    Ok(AcceptQueue {
        queued: raw.unacked,
        limit: raw.sacked,
    })
}

/// getsockopt(TCP_INFO): the one `unsafe` call.
#[allow(unsafe_code)]
fn raw_tcp_info(socket: &impl AsFd) -> io::Result<RawTcpInfo> {
    use std::os::fd::AsRawFd;

    let fd = socket.as_fd().as_raw_fd();
    let mut raw = RawTcpInfo::default();
    let mut len = std::mem::size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: `fd` is a live descriptor borrowed from `socket` for the whole
    // call; `raw` is a properly aligned, writable `RawTcpInfo` and `len` is
    // its exact size, so the kernel writes at most `len` bytes into it and
    // stores the number written back in `len`. Every bit pattern is a valid
    // value of its plain-integer fields.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut raw as *mut RawTcpInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(raw)
}

/// A listening socket on `addr` with room for `backlog` completed
/// handshakes (SO_REUSEADDR, as tokio's own `bind` sets it).
pub fn listen(addr: std::net::SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog_arg(backlog))?;
    Ok(socket.into())
}

/// Changes a listening socket's backlog in place: Linux applies a second
/// `listen(2)` to the queue of a socket already listening.
pub fn set_backlog(listener: &impl AsFd, backlog: u32) -> io::Result<()> {
    SockRef::from(listener).listen(backlog_arg(backlog))
}

fn backlog_arg(backlog: u32) -> i32 {
    i32::try_from(backlog).unwrap_or(i32::MAX)
}

/// `net.core.somaxconn`: the kernel's cap on every listen backlog (None if
/// it cannot be read).
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn tcp_info_of_a_live_loopback_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        apply(&client, &SocketSettings::default()).unwrap();
        let info = tcp_info(&client).unwrap();
        assert_eq!(info.state, TcpInfo::ESTABLISHED);
        assert_eq!(info.unacked, 0);
        assert_eq!(info.probes, 0);
        let sock = SockRef::from(&client);
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(5));
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(120))
        );
        set_keepalive_idle(&client, Duration::from_secs(1)).unwrap();
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(1));
    }

    /// The backlog given to `listen` is the accept queue's limit (capped by
    /// somaxconn), handshakes wait in it until accepted, and a second
    /// `listen` changes the limit in place.
    #[test]
    fn listen_sets_the_accept_queue_and_a_second_listen_changes_it() {
        let cap = somaxconn().expect("/proc/sys/net/core/somaxconn");
        let listener = listen("127.0.0.1:0".parse().unwrap(), 200).unwrap();
        let queue = accept_queue(&listener).unwrap();
        assert_eq!(queue.limit, 200.min(cap));
        assert_eq!(queue.queued, 0);
        let addr = listener.local_addr().unwrap();
        let waiting: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(accept_queue(&listener).unwrap().queued, 3);
        set_backlog(&listener, 17).unwrap();
        assert_eq!(accept_queue(&listener).unwrap().limit, 17.min(cap));
        drop(waiting);
        // A backlog beyond what listen(2) takes is passed as its maximum.
        assert_eq!(backlog_arg(u32::MAX), i32::MAX);
    }

    /// The listener sets the client-leg options once on its listening
    /// socket and relies on the kernel copying them into every accepted
    /// connection; this is that property, on the kernel the tests run on.
    #[test]
    fn accepted_sockets_inherit_the_listeners_options() {
        let settings = SocketSettings {
            keepalive_idle: Duration::from_secs(7),
            keepalive_interval: Duration::from_secs(3),
            keepalive_count: 5,
            user_timeout: Duration::from_millis(12_345),
            nodelay: true,
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        apply(&listener, &settings).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let sock = SockRef::from(&accepted);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 5);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(12_345))
        );
        assert!(sock.tcp_nodelay().unwrap());
    }
}
