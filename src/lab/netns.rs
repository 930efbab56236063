//! Network namespaces through iproute2: prerequisites, unique names,
//! creation, deletion, and the clean-up of namespaces left by processes
//! that died without dropping their lab.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::LabError;

/// Where iproute2 keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Every lab namespace starts with this, then `<pid>-`.
const PREFIX: &str = "pg-";
/// Tags are cut to this many characters to keep names short.
const MAX_TAG: usize = 16;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// The external commands the lab runs, found once.
#[derive(Debug, Clone)]
pub(super) struct Tools {
    pub ip: PathBuf,
    pub iptables: PathBuf,
}

/// Checks capabilities and commands, naming exactly what is missing.
pub(super) fn check_prerequisites() -> Result<Tools, LabError> {
    let missing = missing_capabilities();
    if !missing.is_empty() {
        return Err(LabError::Unavailable(format!(
            "creating network namespaces and firewall rules needs root \
             (capabilities CAP_SYS_ADMIN and CAP_NET_ADMIN); this process lacks {}. \
             Run as root, e.g. `sudo pulsegate demo` or `sudo -E cargo test`",
            missing.join(" and ")
        )));
    }
    let find = |name: &str, package: &str| {
        which(name).ok_or_else(|| {
            LabError::Unavailable(format!(
                "the `{name}` command was not found in PATH, /usr/sbin or /sbin; \
                 install the {package} package (e.g. `apt-get install {package}`)"
            ))
        })
    };
    Ok(Tools {
        ip: find("ip", "iproute2")?,
        iptables: find("iptables", "iptables")?,
    })
}

/// The names of the needed capabilities missing from the effective set.
fn missing_capabilities() -> Vec<&'static str> {
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    [
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect()
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `pg-<pid>-<n>-<tag>`, unique within this process and across processes.
pub(super) fn unique_name(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(MAX_TAG)
        .collect();
    format!("{PREFIX}{}-{n}-{tag}", std::process::id())
}

/// The file that pins namespace `name`, for `setns`.
pub(super) fn path(name: &str) -> String {
    format!("{NETNS_DIR}/{name}")
}

pub(super) fn create(tools: &Tools, name: &str) -> Result<(), LabError> {
    run(&tools.ip, &["netns", "add", name]).map_err(|e| match e {
        LabError::Command { detail, .. } => LabError::Unavailable(format!(
            "`ip netns add` failed ({detail}); the lab needs root on a kernel \
             with network namespaces"
        )),
        other => other,
    })?;
    if let Err(e) = run(&tools.ip, &["-n", name, "link", "set", "lo", "up"]) {
        delete(tools, name);
        return Err(e);
    }
    Ok(())
}

/// Fails with [`LabError::Unavailable`] if iptables cannot work inside the
/// namespace (e.g. no nf_tables support in the kernel).
pub(super) fn check_firewall(tools: &Tools, name: &str) -> Result<(), LabError> {
    match run_in(tools, name, &tools.iptables, &["-w", "-S", "INPUT"]) {
        Ok(_) => Ok(()),
        Err(e) => Err(LabError::Unavailable(format!(
            "iptables does not work inside a network namespace here ({e}); \
             the lab needs iptables with a working nf_tables or legacy backend"
        ))),
    }
}

/// Best effort: a namespace that cannot be deleted is reported, not fatal.
/// Deletes the namespace, and its `/etc/netns/<name>` files if
/// [`super::Lab::set_hosts`] made any.
pub(super) fn delete(tools: &Tools, name: &str) {
    if let Err(e) = run(&tools.ip, &["netns", "del", name]) {
        eprintln!("lab: cannot delete network namespace {name}: {e}");
    }
    let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(name));
}

/// Kills what still runs in, and deletes, every `pg-<pid>-*` namespace
/// whose process is gone (a test run that was killed cannot clean up).
pub(super) fn remove_stale(tools: &Tools) {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        kill_members(tools, &name);
        delete(tools, &name);
    }
}

/// A zombie counts as dead: a SIGKILLed test whose parent has not reaped
/// it yet can no longer clean up.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The pid in a lab namespace name, `pg-<pid>-...`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn kill_members(tools: &Tools, name: &str) {
    let Ok(pids) = run(&tools.ip, &["netns", "pids", name]) else {
        return;
    };
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Runs `program args` inside namespace `name`.
pub(super) fn run_in(
    tools: &Tools,
    name: &str,
    program: &Path,
    args: &[&str],
) -> Result<String, LabError> {
    let mut full = vec!["netns", "exec", name];
    let program = program.to_string_lossy();
    full.push(&program);
    full.extend_from_slice(args);
    run(&tools.ip, &full)
}

/// Runs a command to completion; its stdout on success.
pub(super) fn run(program: &Path, args: &[&str]) -> Result<String, LabError> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(LabError::io(format!("cannot run `{shown}`")))?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: shown,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_unique_and_carry_the_pid() {
        let a = unique_name("Half open/Test with a very long tag");
        let b = unique_name("x");
        assert_ne!(a, b);
        assert!(a.len() <= 40, "{a}");
        assert!(
            a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{a}"
        );
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert_eq!(owner_pid("pg-x-1-y"), None);
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn liveness_of_owner_processes() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }
}
