//! The database programs db_clients drives (redis-benchmark, pgbench):
//! their versions, and runs with a deadline, so that a client stuck behind
//! a broken proxy fails the bench instead of hanging it.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The first line `program --version` prints ("redis-benchmark 7.0.15").
pub fn version(program: &Path) -> Result<String> {
    let output = Command::new(program)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", program.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .next()
        .map(|line| line.trim().to_string())
        .filter(|line| !line.is_empty())
        .with_context(|| format!("{} --version printed nothing", program.display()))
}

/// A child that is killed and reaped when dropped, so a client never
/// outlives the bench, whether it ends, fails or panics.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `command` to its end and returns what it printed on stdout. Its
/// stdout and stderr go to `<dir>/<label>.out` and `.err` (files, not
/// pipes, so a chatty program cannot block on a full pipe). Fails, with
/// both, when it exits unsuccessfully or is still running after `timeout`
/// (then it is killed).
pub fn run_bounded(
    mut command: Command,
    label: &str,
    timeout: Duration,
    dir: &Path,
) -> Result<String> {
    let shown = format!("{command:?}");
    let out_path = dir.join(format!("{label}.out"));
    let err_path = dir.join(format!("{label}.err"));
    let out =
        File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let err =
        File::create(&err_path).with_context(|| format!("creating {}", err_path.display()))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let mut running = Running(child);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = running.0.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            bail!(
                "{shown} was still running after {timeout:?} and was killed{}",
                printed(&out_path, &err_path)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        bail!("{shown} failed ({status}){}", printed(&out_path, &err_path));
    }
    std::fs::read_to_string(&out_path).with_context(|| format!("reading {}", out_path.display()))
}

/// What a failed program printed, for its error: the last lines of its
/// stderr and stdout.
fn printed(out: &Path, err: &Path) -> String {
    let tail = |path: &Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    let (err, out) = (tail(err), tail(out));
    let mut shown = String::new();
    if !err.trim().is_empty() {
        shown += &format!("\nstderr:\n{err}");
    }
    if !out.trim().is_empty() {
        shown += &format!("\nstdout:\n{out}");
    }
    shown
}
