//! The warm pool: per backend, `min_idle` pre-connected upstream
//! connections, probed by the kernel while they wait (TCP_KEEPIDLE =
//! `probe_interval`), recycled at `max_idle_age`, replenished with jittered
//! backoff, and handed to a new client without a connect round trip.
//!
//! A spare is only handed out after a last look: still ESTABLISHED, not
//! closed or reset by the backend (a non-blocking peek), and its latest
//! keepalive probe answered. A client never gets one that failed its probe.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendId, BackendSet};
use crate::config::{Listener, PoolConfig, SocketSettings};
use crate::sockopt::{self, TcpInfo};
use crate::upstream;

/// How often each backend's spares are looked over.
const TEND_EVERY: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct Spare {
    stream: TcpStream,
    born: Instant,
}

/// The spares of one listener's backends.
pub struct Pool {
    spares: Vec<Mutex<VecDeque<Spare>>>,
    taken: Vec<Notify>,
    config: PoolConfig,
    probe_interval: Duration,
    keepalive_idle: Duration,
}

impl Pool {
    /// A pool for `listener`, or `None` when `min_idle` is 0.
    pub fn new(listener: &Listener) -> Option<Arc<Pool>> {
        let settings = &listener.settings;
        (settings.pool.min_idle > 0).then(|| {
            Arc::new(Pool {
                spares: listener.backends.iter().map(|_| Mutex::default()).collect(),
                taken: listener.backends.iter().map(|_| Notify::new()).collect(),
                config: settings.pool,
                probe_interval: settings.liveness.probe_interval,
                keepalive_idle: settings.upstream.keepalive_idle,
            })
        })
    }

    fn spares(&self, backend: BackendId) -> std::sync::MutexGuard<'_, VecDeque<Spare>> {
        self.spares[backend.index()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A healthy spare of `backend`, if there is one; unfit ones found on
    /// the way are closed.
    pub fn take(&self, backend: BackendId) -> Option<TcpStream> {
        let mut spares = self.spares(backend);
        while let Some(spare) = spares.pop_front() {
            if self.fit(&spare) {
                drop(spares);
                self.taken[backend.index()].notify_one();
                // Back to the configured keepalive: the watcher takes over.
                let _ = sockopt::set_keepalive_idle(&spare.stream, self.keepalive_idle);
                return Some(spare.stream);
            }
        }
        None
    }

    /// Closes every spare (a reload replaced this pool).
    pub fn close_all(&self) {
        for spares in &self.spares {
            spares
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    /// Spares ready for `backend` now.
    pub fn idle(&self, backend: BackendId) -> usize {
        self.spares(backend).len()
    }

    fn fit(&self, spare: &Spare) -> bool {
        spare.born.elapsed() < self.config.max_idle_age
            && open(&spare.stream)
            && sockopt::tcp_info(&spare.stream).is_ok_and(|info| self.answered(&info))
    }

    /// Established, and no keepalive probe out: the last one was answered
    /// (a probe in flight for one round trip also counts as out — the spare
    /// is then discarded, erring on the safe side).
    fn answered(&self, info: &TcpInfo) -> bool {
        info.state == TcpInfo::ESTABLISHED && info.probes == 0
    }

    /// Keeps `backend` stocked until `stop`: closes spares that aged or
    /// failed, connects new ones while the backend is routable.
    pub async fn tend(
        self: Arc<Self>,
        backends: Arc<BackendSet>,
        backend: BackendId,
        settings: SocketSettings,
        connect_timeout: Duration,
        stop: CancellationToken,
    ) {
        let mut failures = 0u32;
        loop {
            let pause = self
                .tend_once(
                    &backends,
                    backend,
                    &settings,
                    connect_timeout,
                    &mut failures,
                )
                .await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.taken[backend.index()].notified() => {}
            }
        }
    }

    async fn tend_once(
        &self,
        backends: &BackendSet,
        backend: BackendId,
        settings: &SocketSettings,
        connect_timeout: Duration,
        failures: &mut u32,
    ) -> Duration {
        let routable = backends.state(backend).routable();
        self.spares(backend).retain(|s| routable && self.fit(s));
        backends
            .meters(backend)
            .pool_idle
            .set(self.idle(backend) as f64);
        if !routable || self.idle(backend) >= self.config.min_idle as usize {
            return TEND_EVERY;
        }
        let candidate = upstream::ConnectTarget {
            id: backend,
            backend: backends.addr(backend),
            addrs: backends.addresses(backend),
            meters: None,
        };
        match upstream::connect(vec![candidate], settings, connect_timeout).await {
            Ok(up) => {
                *failures = 0;
                // Probe it while it waits, every probe_interval of quiet.
                let _ = sockopt::set_keepalive_idle(&up.stream, self.probe_interval);
                self.spares(backend).push_back(Spare {
                    stream: up.stream,
                    born: Instant::now(),
                });
                Duration::ZERO
            }
            Err(e) => {
                *failures += 1;
                let pause = backoff(*failures);
                tracing::debug!(backend = %backends.label(backend), error = %e,
                    retry_in_ms = pause.as_millis() as u64, "cannot refill the warm pool");
                pause
            }
        }
    }
}

/// Not closed or reset by the backend: a non-blocking peek finds nothing
/// (or unread bytes such as a MySQL greeting), not EOF or an error.
fn open(stream: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    match SockRef::from(stream).peek(&mut byte) {
        Ok(n) => n > 0,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// 100 ms doubling up to 5 s, ± a random quarter, so many proxies do not
/// reconnect to a recovering backend in lockstep.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1u32 << failures.min(6))
        .min(MAX_BACKOFF);
    let quarter = base.as_millis() as u64 / 4;
    let noise =
        std::collections::hash_map::RandomState::new().hash_one(failures) % (2 * quarter + 1);
    base + Duration::from_millis(noise) - Duration::from_millis(quarter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(250));
        assert!(backoff(3) >= Duration::from_millis(600));
        for n in 0..40 {
            assert!(backoff(n) <= MAX_BACKOFF + MAX_BACKOFF / 4);
        }
    }
}
