//! Real servers for the tests and the benches: redis-server ([`redis`]),
//! PostgreSQL clusters ([`postgres`]) and MariaDB ([`mariadb`]) with their
//! files in a directory of their own, never the system services. Each is a
//! [`Command`] to run inside a [`Lab`](super::Lab) (`Lab::spawn_as`,
//! `Lab::wait_ready`) or on this host's loopback as a [`HostServer`].
//!
//! A program that is not installed is [`ServerError::Missing`], whose text
//! names the Debian package to install.

mod host;
pub mod mariadb;
pub mod postgres;
pub mod redis;

pub use host::HostServer;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::LabError;

/// Why a server could not be found, made or started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A program is not installed; the text names the Debian package.
    #[error("{0}")]
    Missing(String),
    /// A program failed or did not finish; the text has what it printed.
    #[error("{0}")]
    Failed(String),
    /// A file or process operation failed; `what` says which.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// Starting or waiting for it in a lab failed.
    #[error(transparent)]
    Lab(#[from] LabError),
}

impl ServerError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> ServerError {
        let what = what.into();
        move |source| ServerError::Io { what, source }
    }
}

/// `name` on PATH or in /usr/sbin, /usr/bin, else [`ServerError::Missing`]
/// naming `package`.
pub fn find_program(name: &str, package: &str) -> Result<PathBuf, ServerError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            ServerError::Missing(format!(
                "`{name}` was not found in PATH, /usr/sbin or /usr/bin; \
                 install the {package} package (e.g. `apt-get install {package}`)"
            ))
        })
}

/// True when this process runs as root (`/proc/self` belongs to its uid).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Runs `command` to its end with its output in `log`, killing it after
/// `timeout`; fails with the log when it does not succeed.
pub fn run_to_end(mut command: Command, log: &Path, timeout: Duration) -> Result<(), ServerError> {
    let shown = format!("{command:?}");
    let file = fs::File::create(log)
        .map_err(ServerError::io(format!("cannot create {}", log.display())))?;
    let err = file
        .try_clone()
        .map_err(ServerError::io(format!("cannot reopen {}", log.display())))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(ServerError::io(format!("cannot start {shown}")))?;
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(ServerError::io(format!("cannot wait for {shown}")))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ServerError::Failed(format!(
                "{shown} did not finish within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.success() {
        return Ok(());
    }
    let output = fs::read_to_string(log).unwrap_or_default();
    Err(ServerError::Failed(format!(
        "{shown} failed ({status}): {}",
        output.trim()
    )))
}

/// `signal` to the process group led by `leader` and to every child of
/// `leader`. PostgreSQL's backends each make themselves a session leader,
/// so the postmaster's group alone misses them: the leader is stopped
/// first (so it cannot fork or restart children meanwhile), then its
/// children and its group get the signal, then the leader is continued.
/// Errors mean the processes are already gone.
pub fn kill_group(leader: u32, signal: Signal) {
    let pid = Pid::from_raw(leader as i32);
    let _ = kill(pid, Signal::SIGSTOP);
    for child in children_of(leader) {
        let _ = kill(child, signal);
    }
    let _ = killpg(pid, signal);
    let _ = kill(pid, signal);
    let _ = kill(pid, Signal::SIGCONT);
}

/// The processes whose parent is `pid`, from `/proc/<pid>/stat`.
pub fn children_of(pid: u32) -> Vec<Pid> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&candidate| {
            fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| parent_in_stat(&stat))
                == Some(pid)
        })
        .map(Pid::from_raw)
        .collect()
}

/// The parent pid in a `/proc/<pid>/stat` line: the second field after
/// the command name, which is in parentheses and may hold anything.
fn parent_in_stat(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_parent_in_a_stat_line() {
        let stat = "4242 (postgres: x) y) S 4200 4242 4242 0 -1 4194560";
        assert_eq!(parent_in_stat(stat), Some(4200));
        assert_eq!(parent_in_stat("garbage"), None);
        let me = std::process::id();
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let found = children_of(me).contains(&Pid::from_raw(child.id() as i32));
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        assert!(found);
    }

    #[test]
    fn a_missing_program_names_its_package() {
        let err = find_program("surely-not-installed-xyz", "xyz-server").unwrap_err();
        assert!(matches!(err, ServerError::Missing(_)), "{err:?}");
        assert!(
            err.to_string().contains("apt-get install xyz-server"),
            "{err}"
        );
    }
}
