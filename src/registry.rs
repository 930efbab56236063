//! What the admin API reads of the running proxy: each listener's current
//! config generation, the recent evictions with their evidence, the config
//! generation and the last reload's outcome. Listeners publish here; the
//! admin server only reads, through short locks that the data path never
//! waits on (sessions only append an eviction).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::backend::state::Role;
use crate::config::Readiness;
use crate::evict::{SessionLabels, Verdict};
use crate::session::ListenerContext;

/// The proxy's shared, observable state.
pub struct Registry {
    listeners: RwLock<BTreeMap<String, Published>>,
    evictions: Mutex<VecDeque<Value>>,
    keep_evictions: usize,
    generation: AtomicU64,
    last_reload: Mutex<Option<Value>>,
    draining: AtomicBool,
}

struct Published {
    /// Which running instance published it: a listener whose bind changed
    /// is a new instance under the same name.
    instance: u64,
    ctx: Arc<ListenerContext>,
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
    pub fn publish(&self, instance: u64, ctx: Arc<ListenerContext>) {
        let name = ctx.name.to_string();
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, Published { instance, ctx });
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
        let event = eviction_json(labels, verdict, age, idle);
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
        let record = json!({
            "at": timestamp(SystemTime::now()),
            "ok": error.is_none(),
            "error": error,
        });
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

    fn contexts(&self) -> Vec<Arc<ListenerContext>> {
        self.listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|p| p.ctx.clone())
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
        let contexts = self.contexts();
        if contexts.is_empty() && !self.draining() {
            why.push("no listener is running".to_string());
        }
        for ctx in contexts {
            // A listener on its way out (drain, or removed by a reload)
            // takes no new clients: its backends no longer matter here.
            if ctx.config.settings.readiness == Readiness::Always || ctx.shared.draining() {
                continue;
            }
            if let Err(e) = ctx.router.usable(&ctx.backends) {
                why.push(format!("listener `{}`: {e}", ctx.name));
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }

    /// The `/status` document.
    pub fn status(&self) -> Value {
        let listeners: Vec<Value> = self.contexts().iter().map(|c| listener_json(c)).collect();
        let evictions: Vec<Value> = self
            .evictions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .rev()
            .cloned()
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config_generation": self.generation(),
            "draining": self.draining(),
            "last_reload": self.last_reload.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            "listeners": listeners,
            "recent_evictions": evictions,
        })
    }
}

fn listener_json(ctx: &ListenerContext) -> Value {
    let backends: Vec<Value> = ctx
        .backends
        .ids()
        .map(|i| {
            let last = ctx.backends.last_check(i).map(|c| {
                json!({
                    "status": c.status.as_str(),
                    "latency_ms": c.latency.as_secs_f64() * 1000.0,
                    "detail": c.detail,
                })
            });
            json!({
                "backend": ctx.backends.label(i),
                "addresses": ctx.backends.addresses(i).iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "state": ctx.backends.state(i).as_str(),
                "role": ctx.backends.role(i).map_or("unknown", Role::as_str),
                "active_sessions": ctx.backends.active(i),
                "pool_idle": ctx.pool.as_ref().map_or(0, |p| p.idle(i)),
                "last_check": last,
            })
        })
        .collect();
    let suspects: Vec<Value> = ctx
        .shared
        .suspicions
        .snapshot()
        .iter()
        .map(suspect_json)
        .collect();
    json!({
        "name": &*ctx.name,
        "bind": ctx.config.bind.to_string(),
        "sessions": ctx.shared.sessions(),
        "draining": ctx.shared.draining(),
        "max_connections": ctx.config.settings.max_connections.get(),
        "health_checks": ctx.config.settings.check.as_ref().map(|c| format!("{:?}", c.kind).to_lowercase()),
        "routable": ctx.router.usable(&ctx.backends).is_ok(),
        "backends": backends,
        "under_suspicion": suspects,
    })
}

/// A leg whose own silence asks for a verdict, while it waits for
/// corroboration: what it owes, what it lost, what it waits for.
fn suspect_json(s: &crate::liveness::Suspect) -> Value {
    json!({
        "client": s.client.map(|c| c.to_string()),
        "backend": s.backend,
        "leg": s.leg.as_str(),
        "reason": s.reason.as_str(),
        "silent_ms": s.silent_for.as_millis() as u64,
        "exchanges_lost": s.lost,
        "exchanges_needed": s.needed,
        "waiting_for": s.waiting_for,
        "tcp_info": tcp_info_json(&s.evidence),
    })
}

fn tcp_info_json(i: &crate::sockopt::TcpInfo) -> Value {
    json!({
        "rtt_us": i.rtt_us,
        "rto_us": i.rto_us,
        "last_ack_recv_ms": i.last_ack_recv_ms,
        "probes": i.probes,
        "unacked": i.unacked,
        "retransmits": i.retransmits,
        "total_retrans": i.total_retrans,
    })
}

fn eviction_json(
    labels: &SessionLabels,
    verdict: &Verdict,
    age: Duration,
    idle: Duration,
) -> Value {
    let evidence = verdict.evidence.as_ref().map(tcp_info_json);
    json!({
        "at": timestamp(SystemTime::now()),
        "listener": &*labels.listener,
        "backend": labels.backend,
        "client": labels.client.to_string(),
        "dead_leg": verdict.leg.as_str(),
        "reason": verdict.reason.as_str(),
        "age_ms": age.as_millis() as u64,
        "idle_ms": idle.as_millis() as u64,
        "detection_ms": verdict.detection_time().map(|d| d.as_millis() as u64),
        "tcp_info": evidence,
    })
}

fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
