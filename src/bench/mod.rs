//! `pulsegate bench`: load tests run from the binary (not on the proxy path).
//!
//! `bench failover` puts a request/response load on two backends in a
//! linked lab ([`crate::lab::LinkedLab`]: backends far, clients and proxies
//! near, every packet between them crossing an emulated link), through
//! each route of `--via` (pulsegate, HAProxy, PgBouncer, direct) at the
//! same time, applies one fault to all of them at the same instant and
//! measures what each client went through; `--matrix` runs every fault:
//!
//! - `args` — the command line, its validation and the resolved plan;
//! - `servers` — the backends (echo, redis-server, PostgreSQL) as lab
//!   processes that a fault can kill, freeze, restart or demote;
//! - `peers` — HAProxy and PgBouncer, their configs and start;
//! - `workload` — the clients' protocols and one request's outcome;
//! - `load` — the client tasks, the live counters and the progress bar;
//! - `fault` — the fault, applied to the primary or the link on schedule;
//! - `detect` — when pulsegate noticed, from its JSON log;
//! - `report` — per route the outcomes, recovery, false evictions, wrong-
//!   role writes and percentiles per phase; the JSON report; `table`
//!   prints its summary, `plot` draws the SVG timeline (a lane per route);
//! - `failover` — one run, start to finish; `matrix` — every fault in turn
//!   and the summary table of fault × route.

mod args;
mod detect;
mod failover;
mod fault;
mod load;
mod matrix;
mod peers;
mod plot;
mod report;
mod servers;
mod table;
mod workload;

pub use args::{FailoverArgs, FaultKind, LossDirection, RouteKind, WorkloadKind};
pub use failover::run_failover;
pub use fault::flip_redis_roles;
pub use matrix::{Matrix, MatrixRow};
pub use report::Report;
/// PostgreSQL's server binaries and the account to run them as, as
/// [`crate::lab::servers`] finds them.
pub mod postgres {
    pub use crate::lab::servers::is_root;
    pub use crate::lab::servers::postgres::{newest_bin, postgres_account};
}

use crate::lab::servers::ServerError;
use crate::lab::LabError;

/// Exit code for invalid arguments.
const EXIT_ARGS: u8 = 2;
/// Exit code when the lab cannot run here (privileges, tools).
const EXIT_UNAVAILABLE: u8 = 3;
/// Exit code for every other failure.
const EXIT_RUNTIME: u8 = 1;

/// Why a bench could not run or report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The command line is inconsistent; the text names the flag.
    #[error("{0}")]
    Args(String),
    /// The lab (namespace, firewall, processes) failed or is unavailable.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A program the workload needs is not installed; the text names the
    /// Debian package.
    #[error("{0}")]
    Missing(String),
    /// A backend or pulsegate could not be set up.
    #[error("{0}")]
    Setup(String),
    /// A file or process operation failed; `what` says which.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Ctrl-C or SIGTERM stopped the run.
    #[error("interrupted (Ctrl-C or SIGTERM); the lab was cleaned up")]
    Interrupted,
    /// The timeline could not be drawn.
    #[error("cannot draw the timeline: {0}")]
    Plot(String),
}

impl BenchError {
    /// 2 for bad arguments, 3 when the lab is unavailable (not root,
    /// missing `ip`/`iptables`), else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Args(_) => EXIT_ARGS,
            BenchError::Lab(LabError::Unavailable(_)) => EXIT_UNAVAILABLE,
            _ => EXIT_RUNTIME,
        }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}

impl From<ServerError> for BenchError {
    /// A missing program stays [`BenchError::Missing`] (its text names the
    /// package); a failed one is a setup error.
    fn from(e: ServerError) -> BenchError {
        match e {
            ServerError::Missing(text) => BenchError::Missing(text),
            ServerError::Failed(text) => BenchError::Setup(text),
            ServerError::Io { what, source } => BenchError::Io { what, source },
            ServerError::Lab(e) => BenchError::Lab(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_demo_convention() {
        assert_eq!(BenchError::Args("x".into()).exit_code(), 2);
        let unavailable = BenchError::Lab(LabError::Unavailable("needs root".into()));
        assert_eq!(unavailable.exit_code(), 3);
        assert_eq!(BenchError::Setup("x".into()).exit_code(), 1);
        assert_eq!(BenchError::Missing("x".into()).exit_code(), 1);
    }
}
