//! The kernel's view of the namespace's TCP sockets, read from
//! `/proc/thread-self/net/tcp{,6}` by a thread inside the namespace (what
//! `ss -tan` shows, without running it).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::LabError;

/// A TCP state as the kernel names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
}

impl TcpState {
    /// From the hex code in `/proc/net/tcp` (include/net/tcp_states.h).
    fn from_code(code: u8) -> Option<Self> {
        use TcpState::*;
        const ALL: [TcpState; 12] = [
            Established,
            SynSent,
            SynRecv,
            FinWait1,
            FinWait2,
            TimeWait,
            Close,
            CloseWait,
            LastAck,
            Listen,
            Closing,
            NewSynRecv,
        ];
        ALL.get(usize::from(code).checked_sub(1)?).copied()
    }

    /// The name `ss` prints, in upper case like netstat.
    pub fn as_str(self) -> &'static str {
        use TcpState::*;
        match self {
            Established => "ESTABLISHED",
            SynSent => "SYN_SENT",
            SynRecv => "SYN_RECV",
            FinWait1 => "FIN_WAIT1",
            FinWait2 => "FIN_WAIT2",
            TimeWait => "TIME_WAIT",
            Close => "CLOSE",
            CloseWait => "CLOSE_WAIT",
            LastAck => "LAST_ACK",
            Listen => "LISTEN",
            Closing => "CLOSING",
            NewSynRecv => "NEW_SYN_RECV",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One TCP socket of the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// Bytes sent and not yet acknowledged (or queued, for a listener).
    pub send_queue: u32,
    /// Bytes received and not yet read by the application.
    pub recv_queue: u32,
    /// The socket's inode, as a process's `/proc/<pid>/fd/*` links name
    /// it (`socket:[inode]`); 0 once no process holds it (`TIME_WAIT`).
    pub inode: u64,
}

/// The inodes of the sockets that process `pid` holds open, from its
/// `/proc/<pid>/fd` links (empty if the process is gone).
pub fn socket_inodes_of(pid: u32) -> std::collections::HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Default::default();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Every TCP socket of the calling thread's network namespace. Inside a
/// lab, call it on a thread in the namespace (`/proc/net`, i.e.
/// `/proc/self/net`, would show the main thread's namespace instead).
pub fn read_own_namespace() -> Result<Vec<TcpEntry>, LabError> {
    let mut entries = Vec::new();
    for file in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        match std::fs::read_to_string(file) {
            Ok(text) => entries.extend(parse_table(&text)),
            // A kernel without IPv6 has no tcp6.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LabError::Io {
                    what: format!("cannot read {file}"),
                    source,
                })
            }
        }
    }
    Ok(entries)
}

/// The connection with local address `local`, else a listener on it.
pub(super) fn state_of(entries: &[TcpEntry], local: SocketAddr) -> Option<TcpState> {
    entries
        .iter()
        .filter(|e| e.local == local)
        .min_by_key(|e| e.state == TcpState::Listen)
        .map(|e| e.state)
}

/// Parses the body of `/proc/net/tcp` or `/proc/net/tcp6`; lines that do
/// not parse are skipped.
fn parse_table(text: &str) -> Vec<TcpEntry> {
    text.lines().skip(1).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<TcpEntry> {
    let mut fields = line.split_whitespace().skip(1);
    let local = parse_addr(fields.next()?)?;
    let remote = parse_addr(fields.next()?)?;
    let state = TcpState::from_code(u8::from_str_radix(fields.next()?, 16).ok()?)?;
    let (tx, rx) = fields.next()?.split_once(':')?;
    // Then: timer, retransmits, uid, timeout, inode.
    let inode = fields.nth(4)?.parse().ok()?;
    Some(TcpEntry {
        local,
        remote,
        state,
        send_queue: u32::from_str_radix(tx, 16).ok()?,
        recv_queue: u32::from_str_radix(rx, 16).ok()?,
        inode,
    })
}

/// `0100007F:1F90` → 127.0.0.1:8080. The kernel prints each 32-bit word of
/// the address as a host-order integer, so its native bytes are the
/// address's bytes in network order.
fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..addr.len()).step_by(8) {
        let word = u32::from_str_radix(addr.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1B58 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:C350 0100007F:1B58 01 00000005:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";

    #[test]
    fn parses_ipv4_listeners_and_connections() {
        let entries = parse_table(TCP);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].local, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(entries[0].state, TcpState::Listen);
        assert_eq!(entries[1].local, "127.0.0.1:50000".parse().unwrap());
        assert_eq!(entries[1].remote, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(entries[1].state, TcpState::Established);
        assert_eq!(entries[1].send_queue, 5);
        assert_eq!(entries[1].inode, 2);
        let local = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(state_of(&entries, local), Some(TcpState::Listen));
        assert_eq!(state_of(&entries, "127.0.0.1:1".parse().unwrap()), None);
    }

    #[test]
    fn parses_ipv6() {
        let entries = parse_table(TCP6);
        assert_eq!(entries[0].local, "[::1]:8080".parse().unwrap());
        assert_eq!(entries[0].state, TcpState::Listen);
    }

    #[test]
    fn reads_the_current_namespace() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let entries = read_own_namespace().unwrap();
        assert_eq!(state_of(&entries, addr), Some(TcpState::Listen));
        let mine = socket_inodes_of(std::process::id());
        let entry = entries.iter().find(|e| e.local == addr).unwrap();
        assert!(
            mine.contains(&entry.inode),
            "inode {} not ours",
            entry.inode
        );
    }
}
