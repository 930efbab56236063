//! What one listener generation shows the admin API: its entry in
//! `/status` and its part of readiness, in the registry's types.

use crate::config::Readiness;
use crate::registry::status::{BackendStatus, CheckRecord, ListenerStatus, SuspectStatus};
use crate::registry::ListenerView;

use super::ListenerContext;

impl ListenerView for ListenerContext {
    fn name(&self) -> &str {
        &self.name
    }

    fn status(&self) -> ListenerStatus {
        let backends = &self.backends;
        ListenerStatus {
            name: self.name.to_string(),
            bind: self.bound,
            sessions: self.shared.sessions(),
            draining: self.shared.draining(),
            max_connections: self.config.settings.max_connections.get(),
            health_checks: self.config.settings.check.as_ref().map(|c| c.kind),
            routable: self.router.usable(backends).is_ok(),
            backends: backends
                .ids()
                .map(|i| BackendStatus {
                    backend: backends.label(i).to_string(),
                    addresses: backends.addresses(i),
                    held_back: backends.held_back(i),
                    state: backends.state(i),
                    role: backends.role(i),
                    active_sessions: backends.active(i),
                    pool_idle: self.pool.as_ref().map_or(0, |p| p.idle(i)),
                    last_check: backends.last_check(i).as_ref().map(CheckRecord::from),
                })
                .collect(),
            under_suspicion: self
                .shared
                .suspicions
                .snapshot()
                .iter()
                .map(SuspectStatus::from)
                .collect(),
        }
    }

    fn readiness(&self) -> Result<(), String> {
        // A listener on its way out (drain, or removed by a reload) takes
        // no new clients: its backends no longer matter here.
        if self.config.settings.readiness == Readiness::Always || self.shared.draining() {
            return Ok(());
        }
        self.router
            .usable(&self.backends)
            .map_err(|e| e.to_string())
    }
}
