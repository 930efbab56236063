//! What the admin API reads of the running proxy: each listener's current
//! config generation, the recent evictions with their evidence, the config
//! generation and the last reload's outcome. Listeners publish here; the
//! admin server only reads, through short locks that the data path never
//! waits on (sessions only append an eviction). The document it answers
//! with is typed in [`status`]; each listener renders its own part through
//! [`ListenerView`], so the registry needs nothing of the session side.

pub mod status;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use crate::evict::{SessionLabels, Verdict};
use status::{EvictionRecord, ListenerStatus, ReloadRecord, Status};

/// A running listener as the registry sees it: its part of `/status` and
/// of readiness. The listener side implements it for each config
/// generation it publishes.
pub trait ListenerView: Send + Sync {
    fn name(&self) -> &str;
    /// Its entry in `/status`, as of now.
    fn status(&self) -> ListenerStatus;
    /// `Err` with the reason when it gates readiness (not `readiness =
    /// "always"`, not on its way out) and no backend could take a new
    /// connection.
    fn readiness(&self) -> Result<(), String>;
}

/// The proxy's shared, observable state.
pub struct Registry {
    listeners: RwLock<BTreeMap<String, Published>>,
    evictions: Mutex<VecDeque<EvictionRecord>>,
    keep_evictions: usize,
    generation: AtomicU64,
    last_reload: Mutex<Option<ReloadRecord>>,
    draining: AtomicBool,
}

struct Published {
    /// Which running instance published it: a listener whose bind changed
    /// is a new instance under the same name.
    instance: u64,
    view: Arc<dyn ListenerView>,
}

impl Registry {
    /// A registry keeping the last `keep_evictions` evictions.
    pub fn new(keep_evictions: usize) -> Self {
        Registry {
            listeners: RwLock::default(),
            evictions: Mutex::default(),
            keep_evictions,
            generation: AtomicU64::new(1),
            last_reload: Mutex::default(),
            draining: AtomicBool::new(false),
        }
    }

    /// A listener instance started or moved to a new config generation.
    pub fn publish(&self, instance: u64, view: Arc<dyn ListenerView>) {
        let name = view.name().to_string();
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, Published { instance, view });
    }

    /// A listener instance stopped; a newer instance of the same name stays.
    pub fn withdraw(&self, instance: u64, name: &str) {
        let mut listeners = self
            .listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if listeners.get(name).is_some_and(|p| p.instance == instance) {
            listeners.remove(name);
        }
    }

    /// Records an eviction for `/status` (the oldest falls off).
    pub fn record_eviction(
        &self,
        labels: &SessionLabels,
        verdict: &Verdict,
        age: Duration,
        idle: Duration,
    ) {
        if self.keep_evictions == 0 {
            return;
        }
        let event = EvictionRecord::new(labels, verdict, age, idle);
        let mut events = self
            .evictions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if events.len() >= self.keep_evictions {
            events.pop_front();
        }
        events.push_back(event);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// A reload was applied: the generation moves on.
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Remembers a reload's outcome (`error` is `None` when it applied).
    pub fn reload_done(&self, error: Option<String>) {
        let record = ReloadRecord {
            at: status::timestamp(SystemTime::now()),
            ok: error.is_none(),
            error,
        };
        *self
            .last_reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(record);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn views(&self) -> Vec<Arc<dyn ListenerView>> {
        self.listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|p| p.view.clone())
            .collect()
    }

    /// `Ok` when ready: not draining, and every listener whose readiness
    /// asks for it has a backend a new connection could use. `Err` lists
    /// the reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if self.draining() {
            why.push("draining: not accepting new connections".to_string());
        }
        let views = self.views();
        if views.is_empty() && !self.draining() {
            why.push("no listener is running".to_string());
        }
        for view in views {
            if let Err(e) = view.readiness() {
                why.push(format!("listener `{}`: {e}", view.name()));
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }

    /// The `/status` document.
    pub fn status(&self) -> Status {
        let evictions = self
            .evictions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .rev()
            .cloned()
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            config_generation: self.generation(),
            draining: self.draining(),
            last_reload: self
                .last_reload
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            listeners: self.views().iter().map(|v| v.status()).collect(),
            recent_evictions: evictions,
        }
    }
}
