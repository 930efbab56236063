//! Backend health: checks on their own schedule ([`monitor`]), the
//! up / suspect / down state machine with rise and fall ([`Tracker`]), and
//! the role each backend last reported.
//!
//! A backend starts `Up` (as HAProxy assumes a server is up until its first
//! check). A failed check — or a connection to it found dead by the
//! liveness watcher — makes it `Suspect`: still routable, but every session
//! to it is probed at once. `fall` consecutive failures make it `Down`:
//! new connections go elsewhere and `on_down` applies to its sessions.
//! `rise` consecutive successes bring it back `Up`.

pub mod check;
pub mod monitor;

use std::fmt;
use std::num::NonZeroU32;

pub use check::{CheckOutcome, CheckStatus, Role};

/// Where a backend stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Up,
    Suspect,
    Down,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Suspect => "suspect",
            State::Down => "down",
        }
    }

    /// New connections may go to this backend.
    pub fn routable(self) -> bool {
        self != State::Down
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a new piece of evidence changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub from: State,
    pub to: State,
    /// The role moved (including to or from "unknown").
    pub role_changed: bool,
    /// A role was known before this change (so a change is news, not the
    /// first check learning it).
    pub had_role: bool,
}

impl Change {
    pub fn state_changed(&self) -> bool {
        self.from != self.to
    }
}

/// The state machine of one backend.
#[derive(Debug, Clone)]
pub struct Tracker {
    state: State,
    rise: u32,
    fall: u32,
    successes: u32,
    failures: u32,
    role: Option<Role>,
    last: Option<CheckOutcome>,
}

impl Tracker {
    pub fn new(rise: NonZeroU32, fall: NonZeroU32) -> Self {
        Tracker {
            state: State::Up,
            rise: rise.get(),
            fall: fall.get(),
            successes: 0,
            failures: 0,
            role: None,
            last: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// A reload changed `rise` or `fall`; the state and counts stay.
    pub fn set_thresholds(&mut self, rise: NonZeroU32, fall: NonZeroU32) {
        self.rise = rise.get();
        self.fall = fall.get();
    }

    pub fn role(&self) -> Option<Role> {
        self.role
    }

    pub fn last(&self) -> Option<&CheckOutcome> {
        self.last.as_ref()
    }

    /// Applies one check outcome.
    pub fn record(&mut self, outcome: CheckOutcome) -> Change {
        let from = self.state;
        let old_role = self.role;
        if outcome.status == CheckStatus::Up {
            self.role = outcome.role;
            self.failures = 0;
            self.successes += 1;
            if self.state == State::Suspect
                || (self.state == State::Down && self.successes >= self.rise)
            {
                self.state = State::Up;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= self.fall {
                self.state = State::Down;
                self.role = None;
            } else if self.state == State::Up {
                self.state = State::Suspect;
            }
        }
        self.last = Some(outcome);
        Change {
            from,
            to: self.state,
            role_changed: old_role != self.role,
            had_role: old_role.is_some(),
        }
    }

    /// A connection to this backend was found dead by the watcher: an up
    /// backend becomes suspect (its checks decide the rest).
    pub fn connection_dead(&mut self) -> Change {
        let from = self.state;
        if self.state == State::Up {
            self.state = State::Suspect;
        }
        Change {
            from,
            to: self.state,
            role_changed: false,
            had_role: self.role.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn outcome(status: CheckStatus, role: Option<Role>) -> CheckOutcome {
        CheckOutcome {
            status,
            role,
            latency: Duration::from_millis(1),
            detail: String::new(),
        }
    }

    fn tracker(rise: u32, fall: u32) -> Tracker {
        Tracker::new(
            NonZeroU32::new(rise).unwrap(),
            NonZeroU32::new(fall).unwrap(),
        )
    }

    #[test]
    fn up_suspect_down_and_back_with_rise_and_fall() {
        let mut t = tracker(2, 3);
        let down = || outcome(CheckStatus::Down, None);
        let up = || outcome(CheckStatus::Up, None);
        assert_eq!(t.state(), State::Up);
        assert_eq!(t.record(down()).to, State::Suspect);
        assert_eq!(t.record(down()).to, State::Suspect);
        let c = t.record(down());
        assert_eq!((c.from, c.to), (State::Suspect, State::Down));
        assert_eq!(t.record(up()).to, State::Down, "rise = 2");
        assert_eq!(t.record(down()).to, State::Down);
        assert_eq!(t.record(up()).to, State::Down);
        assert_eq!(t.record(up()).to, State::Up);
    }

    #[test]
    fn a_blip_shorter_than_fall_recovers_at_once() {
        let mut t = tracker(2, 2);
        assert_eq!(
            t.record(outcome(CheckStatus::Down, None)).to,
            State::Suspect
        );
        assert_eq!(t.record(outcome(CheckStatus::Up, None)).to, State::Up);
    }

    #[test]
    fn not_ready_counts_as_a_failure() {
        let mut t = tracker(1, 1);
        assert_eq!(
            t.record(outcome(CheckStatus::NotReady, None)).to,
            State::Down
        );
    }

    #[test]
    fn role_changes_are_reported_and_down_forgets_the_role() {
        let mut t = tracker(1, 1);
        let c = t.record(outcome(CheckStatus::Up, Some(Role::Primary)));
        assert!(c.role_changed);
        assert!(
            !t.record(outcome(CheckStatus::Up, Some(Role::Primary)))
                .role_changed
        );
        let c = t.record(outcome(CheckStatus::Up, Some(Role::Replica)));
        assert!(c.role_changed && !c.state_changed());
        t.record(outcome(CheckStatus::Down, None));
        assert_eq!(t.role(), None);
    }

    #[test]
    fn a_dead_connection_makes_an_up_backend_suspect_only() {
        let mut t = tracker(2, 2);
        assert_eq!(t.connection_dead().to, State::Suspect);
        // Only checks count towards `fall`.
        t.record(outcome(CheckStatus::Down, None));
        assert_eq!(t.state(), State::Suspect);
        t.record(outcome(CheckStatus::Down, None));
        assert_eq!(t.state(), State::Down);
        assert_eq!(t.connection_dead().to, State::Down);
    }
}
