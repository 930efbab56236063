//! The fault: what happens to the primary backend at `--fault-at`, applied
//! from a plain thread while the load runs.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::args::{FaultKind, Plan};
use super::load::Live;
use super::servers::Backend;
use super::BenchError;
use crate::lab::Lab;

/// When the fault took effect.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FaultTimes {
    /// Since the start of the load: when the DROP rule was in place or the
    /// signal had been sent (from then on the primary answers nothing new).
    pub at: Duration,
    /// The same instant on the wall clock, to compare with pulsegate's log.
    pub wall: SystemTime,
    /// `restart`: when the primary listened again, since the start.
    pub restarted: Option<Duration>,
}

/// Sleeps until `t0 + plan.fault_at`, then breaks the primary as
/// `plan.fault` says.
pub(crate) fn inject(
    lab: &Lab,
    primary: &mut Backend,
    plan: &Plan,
    t0: Instant,
    live: &Live,
) -> Result<FaultTimes, BenchError> {
    sleep_until(t0 + plan.fault_at, live)?;
    let port = primary.addr.port();
    let mark = || (Instant::now(), SystemTime::now());
    let (at, wall) = match plan.fault {
        FaultKind::Blackhole => {
            // DROP first: the kernel's FIN/RST for the killed process
            // must never arrive.
            lab.drop_port(port)?;
            let at = mark();
            primary.kill()?;
            at
        }
        FaultKind::BlackholeOneway => {
            lab.drop_port_inbound(port)?;
            mark()
        }
        FaultKind::Freeze => {
            primary.freeze()?;
            mark()
        }
        FaultKind::Kill | FaultKind::Restart => {
            primary.send_kill()?;
            let at = mark();
            primary.wait_gone()?;
            at
        }
    };
    live.fault_injected.store(true, Ordering::Relaxed);
    let restarted = if plan.fault == FaultKind::Restart {
        sleep_until(at + plan.restart_after, live)?;
        primary.restart(lab)?;
        Some(Instant::now().saturating_duration_since(t0))
    } else {
        None
    };
    Ok(FaultTimes {
        at: at.saturating_duration_since(t0),
        wall,
        restarted,
    })
}

/// Sleeps until `at`, giving up with [`BenchError::Interrupted`] once
/// Ctrl-C stopped the load.
fn sleep_until(at: Instant, live: &Live) -> Result<(), BenchError> {
    loop {
        if live.interrupted.load(Ordering::Relaxed) {
            return Err(BenchError::Interrupted);
        }
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}
