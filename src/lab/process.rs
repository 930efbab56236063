//! Processes started inside a lab namespace: signals, output, reaping.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::LabError;

/// A program running in a lab's namespace. The [`Lab`](super::Lab) kills
/// and reaps it when dropped; the handle can kill, stop and continue it
/// earlier.
pub struct LabProcess {
    pid: u32,
    child: Arc<Mutex<Child>>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl LabProcess {
    /// The program's pid (not a wrapper's: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL, then reap. The process vanishes without a chance to close
    /// its sockets in an orderly way (the kernel still sends FIN or RST).
    pub fn kill(&self) -> Result<(), LabError> {
        let mut child = lock(&self.child);
        child
            .kill()
            .map_err(LabError::io(format!("cannot kill pid {}", self.pid)))?;
        child
            .wait()
            .map_err(LabError::io(format!("cannot reap pid {}", self.pid)))?;
        Ok(())
    }

    /// SIGSTOP: the process freezes; its kernel sockets keep answering.
    pub fn stop(&self) -> Result<(), LabError> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`LabProcess::stop`].
    pub fn cont(&self) -> Result<(), LabError> {
        self.signal(Signal::SIGCONT)
    }

    /// Sends `signal` unless the process already exited (so a reused pid is
    /// never signalled).
    pub fn signal(&self, signal: Signal) -> Result<(), LabError> {
        let mut child = lock(&self.child);
        if let Some(status) = child.try_wait().ok().flatten() {
            return Err(LabError::Io {
                what: format!("cannot send {signal} to pid {}", self.pid),
                source: std::io::Error::other(format!("it already exited ({status})")),
            });
        }
        nix::sys::signal::kill(Pid::from_raw(self.pid as i32), signal).map_err(|e| LabError::Io {
            what: format!("cannot send {signal} to pid {}", self.pid),
            source: e.into(),
        })
    }

    /// The exit status, if the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    /// The file that receives the process's stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// The file that receives the process's stdout.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr)
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout)
    }

    pub(super) fn child_handle(&self) -> Arc<Mutex<Child>> {
        self.child.clone()
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn lock(child: &Mutex<Child>) -> std::sync::MutexGuard<'_, Child> {
    child.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Rebuilds `command` as `ip netns exec <namespace> <program> <args>`,
/// keeping its environment and working directory, and starts it with its
/// output in `<output>.stdout` and `<output>.stderr`.
pub(super) fn spawn(
    ip: &Path,
    namespace: &str,
    output: &Path,
    command: Command,
) -> Result<LabProcess, LabError> {
    let program = Path::new(command.get_program());
    let with_suffix = |suffix: &str| {
        let mut path = output.as_os_str().to_owned();
        path.push(suffix);
        PathBuf::from(path)
    };
    let (stdout, stderr) = (with_suffix(".stdout"), with_suffix(".stderr"));
    let create = |path: &Path| {
        File::create(path).map_err(LabError::io(format!("cannot create {}", path.display())))
    };
    let mut wrapped = Command::new(ip);
    wrapped
        .args(["netns", "exec", namespace])
        .arg(program)
        .args(command.get_args())
        .stdin(Stdio::null())
        .stdout(create(&stdout)?)
        .stderr(create(&stderr)?);
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(cwd) = command.get_current_dir() {
        wrapped.current_dir(cwd);
    }
    let child = wrapped
        .spawn()
        .map_err(LabError::io(format!("cannot start {}", program.display())))?;
    Ok(LabProcess {
        pid: child.id(),
        child: Arc::new(Mutex::new(child)),
        stdout,
        stderr,
    })
}

/// SIGKILL (also ends a stopped process) and reap; errors mean it is
/// already gone.
pub(super) fn kill_and_reap(child: &Mutex<Child>) {
    let mut child = lock(child);
    let _ = child.kill();
    let _ = child.wait();
}
