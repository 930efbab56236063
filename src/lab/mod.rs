//! The lab: private network namespaces with real sockets, real processes
//! and real packet drops, and the real servers run in them or on loopback,
//! for `pulsegate demo`, the tests and the benches. Not on the proxy path.
//!
//! A [`Lab`] owns one namespace with only `lo` in it, so every experiment
//! has its own ports and firewall and can run beside the others:
//!
//! - [`Lab::enter`] runs a closure on a thread inside the namespace; the
//!   sockets it creates live there and may then be used from any thread;
//! - [`Lab::spawn`] starts a program inside it (`ip netns exec`), with its
//!   output captured in the lab's work directory;
//! - [`Lab::drop_port`] blackholes every TCP segment to or from a port,
//!   which on loopback makes both ends of its connections vanish silently
//!   (across a [`LinkedLab`]'s link, [`Link::drop_endpoint`] does it one
//!   way or both);
//! - [`Lab::tcp_state`] reads a socket's kernel state, as `ss` would;
//! - [`Lab::start_pulsegate`] runs the proxy with a [`ProxyConfig`], and
//!   [`Lab::start_echo_backend`] the echo server process to kill
//!   ([`run_backend`] is that process, [`spawn_echo_server`] the same echo
//!   in this process);
//! - [`servers`] makes and starts redis-server and PostgreSQL, in a lab or
//!   on this host's loopback;
//! - dropping the `Lab` kills its processes and deletes the namespace (its
//!   firewall rules go with it), also while a test panics.
//!
//! The lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and the `ip`
//! (iproute2) and `iptables` commands; [`Lab::new`] checks them first and
//! says what is missing with [`LabError::Unavailable`].

mod backend;
pub mod link;
mod netns;
mod process;
mod proxy;
pub mod servers;
mod sockets;

pub use backend::{
    echo_server, run_backend, spawn_echo_server, BackendArgs, EchoBackend, ReadPause,
};
pub use link::{Direction, Impairment, Link};
pub use process::LabProcess;
pub use proxy::{read_evictions, EvictionLine, ProxyConfig};
pub use sockets::{read_own_namespace as tcp_sockets_here, socket_inodes_of, TcpEntry, TcpState};

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sched::CloneFlags;

use netns::Tools;

/// Why the lab could not do something.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// This machine or user cannot run the lab; the text says what is needed.
    #[error("the network-namespace lab is unavailable: {0}")]
    Unavailable(String),
    /// A helper command (`ip`, `iptables`) failed.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// A file or process operation failed; `what` says which.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// `setns` into the lab's namespace failed.
    #[error("cannot enter network namespace {namespace}: {source}")]
    Enter {
        namespace: String,
        #[source]
        source: nix::Error,
    },
    /// A bounded wait ran out.
    #[error("timed out after {waited:?}: {what}")]
    Timeout { what: String, waited: Duration },
}

impl LabError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
        let what = what.into();
        move |source| LabError::Io { what, source }
    }
}

/// One private network namespace and everything started in it.
pub struct Lab {
    name: String,
    tools: Tools,
    /// Holds the processes' output and generated files.
    dir: PathBuf,
    children: Mutex<Vec<Arc<Mutex<std::process::Child>>>>,
    spawned: AtomicU32,
}

impl Lab {
    /// Checks privileges and tools, removes namespaces left by dead
    /// processes, then creates a namespace `pg-<pid>-<n>-<tag>` with `lo` up.
    pub fn new(tag: &str) -> Result<Lab, LabError> {
        let tools = netns::check_prerequisites()?;
        netns::remove_stale(&tools);
        let name = netns::unique_name(tag);
        netns::create(&tools, &name)?;
        // From here on, Drop deletes the namespace whatever fails next.
        let lab = Lab {
            dir: std::env::temp_dir().join("pulsegate-lab").join(&name),
            name,
            tools,
            children: Mutex::new(Vec::new()),
            spawned: AtomicU32::new(0),
        };
        std::fs::create_dir_all(&lab.dir)
            .map_err(LabError::io(format!("cannot create {}", lab.dir.display())))?;
        netns::check_firewall(&lab.tools, &lab.name)?;
        Ok(lab)
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lab's work directory (process output, configs). Removed on drop
    /// unless a panic is unwinding, so a failed test leaves its logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `f` on a new thread that has joined the namespace and returns
    /// its result. A panic in `f` is resumed on the caller's thread.
    pub fn enter<T, F>(&self, f: F) -> Result<T, LabError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = netns::path(&self.name);
        let ns = File::open(&path).map_err(LabError::io(format!("cannot open {path}")))?;
        let joined = std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                        .map_err(|source| LabError::Enter {
                            namespace: self.name.clone(),
                            source,
                        })
                        .map(|()| f())
                })
                .join()
        });
        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Starts `command` inside the namespace. The child's pid is the
    /// program's own (`ip netns exec` execs it); its stdout and stderr go
    /// to files in [`Lab::dir`] named after the program. The lab kills it
    /// when dropped.
    pub fn spawn(&self, command: Command) -> Result<LabProcess, LabError> {
        let program = Path::new(command.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "process".into());
        self.spawn_as(&program, command)
    }

    /// [`Lab::spawn`], with output files named `<n>-<label>.stdout|.stderr`.
    pub fn spawn_as(&self, label: &str, command: Command) -> Result<LabProcess, LabError> {
        let seq = self.spawned.fetch_add(1, Ordering::Relaxed) + 1;
        let output = self.dir.join(format!("{seq}-{label}"));
        let process = process::spawn(&self.tools.ip, &self.name, &output, command)?;
        self.children
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(process.child_handle());
        Ok(process)
    }

    /// Runs `command` inside the namespace to its end (at most `timeout`)
    /// and fails with what it printed when it exits unsuccessfully; its
    /// output files are named after `label` as for [`Lab::spawn_as`].
    pub fn run_to_end(
        &self,
        label: &str,
        command: Command,
        timeout: Duration,
    ) -> Result<(), LabError> {
        let shown = format!("{command:?}");
        let process = self.spawn_as(label, command)?;
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            if let Some(status) = process.exit_status() {
                break status;
            }
            if std::time::Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: format!("{shown} to finish"),
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if status.success() {
            return Ok(());
        }
        Err(LabError::Command {
            command: shown,
            detail: format!(
                "exited with {status}: {} {}",
                process.stdout().trim(),
                process.stderr().trim()
            ),
        })
    }

    /// Writes the namespace's own `/etc/hosts`: programs started later with
    /// [`Lab::spawn`] (`ip netns exec` bind-mounts `/etc/netns/<name>/hosts`
    /// over `/etc/hosts`) resolve names through it. Rewriting it in place
    /// changes what running programs resolve next, so a test controls DNS.
    pub fn set_hosts(&self, contents: &str) -> Result<(), LabError> {
        let hosts = self.hosts_file();
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).map_err(LabError::io(format!("create {}", dir.display())))?;
        // Truncate and write the same file: a rename would leave running
        // programs looking at the old, still bind-mounted, inode.
        std::fs::write(&hosts, contents).map_err(LabError::io(format!("write {}", hosts.display())))
    }

    /// The file [`Lab::set_hosts`] writes, for a program of this process
    /// that resolves names as the lab's programs do.
    pub fn hosts_file(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name).join("hosts")
    }

    /// Blackholes TCP to and from `port` (iptables DROP in INPUT on
    /// `--dport` and `--sport`): on loopback both ends of every connection
    /// of that port stop hearing each other, with no FIN or RST.
    pub fn drop_port(&self, port: u16) -> Result<(), LabError> {
        self.port_rules("-A", port)
    }

    /// Blackholes every TCP segment to or from `ip` (iptables DROP in INPUT
    /// on `-d` and `-s`): on loopback, a host with that address vanishes.
    pub fn drop_host(&self, ip: std::net::IpAddr) -> Result<(), LabError> {
        let ip = ip.to_string();
        for direction in ["-d", "-s"] {
            let args = [
                "-w", "-A", "INPUT", "-p", "tcp", direction, &ip, "-j", "DROP",
            ];
            netns::run_in(&self.tools, &self.name, &self.tools.iptables, &args)?;
        }
        Ok(())
    }

    /// Removes the rules [`Lab::drop_port`] added.
    pub fn undrop_port(&self, port: u16) -> Result<(), LabError> {
        self.port_rules("-D", port)
    }

    fn port_rules(&self, op: &str, port: u16) -> Result<(), LabError> {
        let port = port.to_string();
        for direction in ["--dport", "--sport"] {
            let args = [
                "-w", op, "INPUT", "-p", "tcp", direction, &port, "-j", "DROP",
            ];
            netns::run_in(&self.tools, &self.name, &self.tools.iptables, &args)?;
        }
        Ok(())
    }

    /// Every TCP socket of the namespace (IPv4 and IPv6), as in `ss -tan`.
    pub fn tcp_sockets(&self) -> Result<Vec<TcpEntry>, LabError> {
        self.enter(sockets::read_own_namespace)?
    }

    /// The state of the TCP socket bound to `local` (a listening socket
    /// only if no connection has that local address), or `None` if the
    /// kernel no longer has one.
    pub fn tcp_state(&self, local: SocketAddr) -> Result<Option<TcpState>, LabError> {
        let entries = self.tcp_sockets()?;
        Ok(sockets::state_of(&entries, local))
    }

    /// Runs `ip -n <namespace> args…` and returns its output.
    pub fn ip(&self, args: &[&str]) -> Result<String, LabError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        netns::run(&self.tools.ip, &full)
    }

    /// Writes a file into the lab's work directory and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> Result<PathBuf, LabError> {
        let path = self.dir.join(name);
        std::fs::write(&path, contents)
            .map_err(LabError::io(format!("cannot write {}", path.display())))?;
        Ok(path)
    }

    fn kill_children(&self) {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(PoisonError::into_inner));
        for child in children {
            process::kill_and_reap(&child);
        }
    }
}

/// Two labs joined by an emulated link ([`link`]): the *near* namespace
/// holds the proxy and its clients, the *far* one the backends, and every
/// packet between them crosses the [`Link`], where it can be delayed,
/// dropped or cut. Backends listen on [`link::FAR_ADDR`]; loopback traffic
/// inside either namespace is not impaired.
pub struct LinkedLab {
    // Declared first so it is dropped first: the forwarder stops before
    // the namespaces go.
    link: Link,
    near: Lab,
    far: Lab,
}

impl LinkedLab {
    /// Creates both namespaces and the link between them (a perfect link
    /// until [`Link::set`] says otherwise).
    pub fn new(tag: &str) -> Result<LinkedLab, LabError> {
        let near = Lab::new(tag)?;
        let far = Lab::new(&format!("{tag}-far"))?;
        let link = Link::new(&near, &far)?;
        Ok(LinkedLab { link, near, far })
    }

    /// The proxy's side.
    pub fn near(&self) -> &Lab {
        &self.near
    }

    /// The backends' side.
    pub fn far(&self) -> &Lab {
        &self.far
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    /// `port` on the far side's link address, where backends listen.
    pub fn far_addr(port: u16) -> SocketAddr {
        SocketAddr::from((link::FAR_ADDR, port))
    }

    /// `port` on the far side's second address ([`link::FAR_SECOND_ADDR`]):
    /// a second host behind the same link.
    pub fn far_second_addr(port: u16) -> SocketAddr {
        SocketAddr::from((link::FAR_SECOND_ADDR, port))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_children();
        netns::delete(&self.tools, &self.name);
        if std::thread::panicking() {
            eprintln!(
                "lab {}: keeping its files in {}",
                self.name,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
