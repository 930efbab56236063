//! The two backends of a run (primary, secondary) as lab processes: the
//! echo server (`pulsegate lab-backend`), `redis-server`, or PostgreSQL,
//! all as [`crate::lab`] starts them. A fault kills, freezes or restarts
//! the primary through [`Backend`].

pub(crate) use crate::lab::servers::postgres::USER as PG_USER;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::args::{Plan, WorkloadKind};
use super::BenchError;
use crate::lab::servers::children_of;
use crate::lab::servers::postgres::{Cluster, Install, Login};
use crate::lab::servers::redis::Redis;
use crate::lab::{EchoBackend, Lab, LabProcess, LinkedLab};

/// How long a backend may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGKILLed backend may take to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Primary and secondary addresses per workload, two hosts in the lab's
/// far namespace: every route reaches them across the emulated link.
pub(crate) fn backend_addrs(workload: WorkloadKind) -> [SocketAddr; 2] {
    let port = match workload {
        WorkloadKind::Echo => 7001,
        WorkloadKind::Redis => 6379,
        WorkloadKind::Postgres => 5433,
    };
    // Two hosts on the same port, so a name can move from one to the other.
    [LinkedLab::far_addr(port), LinkedLab::far_second_addr(port)]
}

/// How to start (and restart) one backend.
#[derive(Debug, Clone)]
enum Program {
    Echo(EchoBackend),
    Redis(Redis),
    Postgres {
        cluster: Cluster,
        max_connections: u32,
    },
}

impl Program {
    fn command(&self, addr: SocketAddr) -> Command {
        match self {
            Program::Echo(echo) => echo.command(addr),
            Program::Redis(redis) => redis.command(addr),
            Program::Postgres {
                cluster,
                max_connections,
            } => {
                let max_connections = format!("max_connections={max_connections}");
                // In a session of its own, a Ctrl-C on the bench's terminal
                // does not reach it: the bench stops it itself.
                cluster.postmaster_in_own_session(addr, &[&max_connections])
            }
        }
    }

    /// PostgreSQL forks a process per connection (and each makes itself a
    /// session leader, so a process-group signal would miss it): signals
    /// go to the postmaster and to every process it forked.
    fn forks(&self) -> bool {
        matches!(self, Program::Postgres { .. })
    }
}

/// One backend process in the lab.
pub(crate) struct Backend {
    pub label: &'static str,
    pub addr: SocketAddr,
    program: Program,
    process: LabProcess,
}

impl Backend {
    fn start(
        lab: &Lab,
        label: &'static str,
        addr: SocketAddr,
        program: Program,
    ) -> Result<Backend, BenchError> {
        let process = spawn(lab, label, addr, &program)?;
        Ok(Backend {
            label,
            addr,
            program,
            process,
        })
    }

    /// SIGKILL (with every process it forked), then waits until the
    /// process is gone.
    pub fn kill(&self) -> Result<(), BenchError> {
        self.send_kill()?;
        self.wait_gone()
    }

    /// SIGKILL without waiting: once sent, no process of the backend runs
    /// its own code again (the kernel may still deliver what it wrote).
    pub fn send_kill(&self) -> Result<(), BenchError> {
        self.signal(Signal::SIGKILL)
    }

    /// Waits until the killed process has exited, and reaps it.
    pub fn wait_gone(&self) -> Result<(), BenchError> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while self.process.exit_status().is_none() {
            if Instant::now() >= deadline {
                return Err(BenchError::Setup(format!(
                    "{} backend (pid {}) survived SIGKILL for {EXIT_TIMEOUT:?}",
                    self.label,
                    self.process.pid()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// SIGSTOP: frozen, while its kernel keeps answering.
    pub fn freeze(&self) -> Result<(), BenchError> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`Backend::freeze`]; a process that is gone is fine.
    pub fn thaw(&self) {
        let _ = self.signal(Signal::SIGCONT);
    }

    /// Runs SQL statements on a PostgreSQL backend (psql, from inside
    /// `lab`); other backends have no SQL.
    pub fn sql(&self, lab: &Lab, statements: &[&str]) -> Result<(), BenchError> {
        match &self.program {
            Program::Postgres { cluster, .. } => Ok(cluster.sql(lab, self.addr, statements)?),
            _ => Err(BenchError::Setup(format!(
                "the {} backend speaks no SQL",
                self.label
            ))),
        }
    }

    /// Starts the program again on the same address (after a kill) and
    /// waits until it listens.
    pub fn restart(&mut self, lab: &Lab) -> Result<(), BenchError> {
        self.process = spawn(lab, self.label, self.addr, &self.program)?;
        Ok(())
    }

    /// Sends `signal` to the backend's process and, for PostgreSQL, to
    /// every process the postmaster forked. The postmaster is stopped
    /// first: it then forks nothing new, and its children stay its
    /// children (an exited parent's are handed to init) while they are
    /// listed.
    fn signal(&self, signal: Signal) -> Result<(), BenchError> {
        if !self.program.forks() {
            return Ok(self.process.signal(signal)?);
        }
        self.process.signal(Signal::SIGSTOP)?;
        for child in children_of(self.process.pid()) {
            // A child that already exited is fine.
            let _ = nix::sys::signal::kill(child, signal);
        }
        if signal != Signal::SIGSTOP {
            self.process.signal(signal)?;
        }
        Ok(())
    }
}

impl Drop for Backend {
    /// The lab kills the processes it started, but not PostgreSQL's forked
    /// backends: kill them all first.
    fn drop(&mut self) {
        if self.program.forks() && self.process.exit_status().is_none() {
            let _ = self.signal(Signal::SIGKILL);
        }
    }
}

fn spawn(
    lab: &Lab,
    label: &'static str,
    addr: SocketAddr,
    program: &Program,
) -> Result<LabProcess, BenchError> {
    let process = lab.spawn_as(label, program.command(addr))?;
    lab.wait_ready(&process, addr, START_TIMEOUT)?;
    Ok(process)
}

/// The primary and the secondary.
pub(crate) struct Backends {
    pub primary: Backend,
    pub secondary: Backend,
}

/// Finds what `plan.workload` needs (naming the Debian package when it is
/// missing) and starts both backends in `lab`.
pub(crate) fn start(lab: &Lab, exe: &Path, plan: &Plan) -> Result<Backends, BenchError> {
    let [primary, secondary] = match plan.workload {
        WorkloadKind::Echo => {
            let lifetime = plan.duration + Duration::from_secs(120);
            let program = Program::Echo(EchoBackend::new(exe, lifetime));
            [program.clone(), program]
        }
        WorkloadKind::Redis => {
            let server = Redis::new(lab.dir())?;
            // For a role flip the secondary starts as the primary's replica.
            let replica = Redis {
                replica_of: plan.roles_change().then_some(plan.primary),
                ..server.clone()
            };
            [Program::Redis(server), Program::Redis(replica)]
        }
        WorkloadKind::Postgres => {
            let install = Install::find()?;
            // Every client of every route may hold a connection, plus the
            // proxies' checks, the replication and the fault's own session.
            let routes = u32::try_from(plan.routes.len()).unwrap_or(u32::MAX);
            let max_connections = routes.saturating_mul(plan.clients).saturating_add(30);
            // initdb once, then a copy: two independent clusters.
            let primary = install.init(&lab.dir().join("pg-primary"), Login::Trust)?;
            primary.trust_remote_hosts()?;
            let secondary = primary.copy_to(&lab.dir().join("pg-secondary"))?;
            [primary, secondary].map(|cluster| Program::Postgres {
                cluster,
                max_connections,
            })
        }
    };
    let primary = Backend::start(lab, "primary", plan.primary, primary)?;
    if let (Program::Postgres { cluster, .. }, true) = (&secondary, plan.roles_change()) {
        // When the roles change the secondary is a streaming replica.
        cluster.replicate_from(lab, plan.primary)?;
    }
    Ok(Backends {
        primary,
        secondary: Backend::start(lab, "secondary", plan.secondary, secondary)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_workload_has_two_distinct_ports() {
        for w in [
            WorkloadKind::Echo,
            WorkloadKind::Redis,
            WorkloadKind::Postgres,
        ] {
            let [a, b] = backend_addrs(w);
            assert_ne!(a, b);
            assert_ne!(a, super::super::args::PROXY_ADDR);
            assert_eq!(a.port(), b.port(), "two hosts, one port");
        }
    }
}
