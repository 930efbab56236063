//! Where the CPU went during a test (proxy_perf, db_clients): the proxy's
//! own time (user + system, from /proc/PID/stat) and the whole machine's
//! busy time (/proc/stat), summed over the spans the test ran. On a machine
//! whose cores the client, the proxy and the server share, the second says
//! whether the machine was the limit; the first, how much of it the proxy
//! took.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::{child, machine};

/// CPU accounting for one test through one route.
pub struct CpuMeter {
    /// The proxy's pid; `None` for direct.
    pid: Option<u32>,
    used: Duration,
    wall: Duration,
    machine_busy: u64,
    machine_total: u64,
}

impl CpuMeter {
    pub fn new(pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            pid,
            used: Duration::ZERO,
            wall: Duration::ZERO,
            machine_busy: 0,
            machine_total: 0,
        }
    }

    /// Runs `work`, adding its wall time, the proxy's CPU time and the
    /// machine's busy time.
    pub fn measure<T>(&mut self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let before = self.pid.map(child::cpu_time).transpose()?;
        let (busy0, total0) = machine::cpu_ticks();
        let started = Instant::now();
        let value = work()?;
        self.wall += started.elapsed();
        let (busy1, total1) = machine::cpu_ticks();
        self.machine_busy += busy1.saturating_sub(busy0);
        self.machine_total += total1.saturating_sub(total0);
        if let (Some(pid), Some(before)) = (self.pid, before) {
            self.used += child::cpu_time(pid)?.saturating_sub(before);
        }
        Ok(value)
    }

    /// The proxy's CPU seconds, or `None` for direct.
    pub fn used_secs(&self) -> Option<f64> {
        self.pid.map(|_| self.used.as_secs_f64())
    }

    /// The proxy's CPU, % of one core, or `None` for direct.
    pub fn percent(&self) -> Option<f64> {
        let wall = self.wall.as_secs_f64();
        (self.pid.is_some() && wall > 0.0).then(|| 100.0 * self.used.as_secs_f64() / wall)
    }

    /// The whole machine's busy time, % of all its cores.
    pub fn machine_percent(&self) -> Option<f64> {
        (self.machine_total > 0)
            .then(|| 100.0 * self.machine_busy as f64 / self.machine_total as f64)
    }
}
