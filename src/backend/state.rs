//! What is known of one backend: its [`State`] (up, suspect, down) moved
//! by the [`Tracker`] state machine with rise and fall, the [`Role`] it
//! last reported, and the evidence that feeds them ([`CheckOutcome`]).
//!
//! A backend starts `Up` (as HAProxy assumes a server is up until its first
//! check). A failed check — or a connection to it found dead by the
//! liveness watcher — makes it `Suspect`: still routable, but every session
//! to it is probed at once. `fall` consecutive failures make it `Down`:
//! new connections go elsewhere and `on_down` applies to its sessions.
//! `rise` consecutive successes bring it back `Up`.
//!
//! A check that could not run on our side (`unknown`) counts neither way.
//! A backend that went down on unanswered connects alone says so
//! ([`Change::no_answer_only`]): the network may be lossy rather than the
//! host gone, so its sessions are probed, not all evicted. Without any
//! check, a backend made suspect by a dead session is up again once no
//! other session to it was found dead for a while.

use std::fmt;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

/// A backend's role as its last check reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// Serving.
    Up,
    /// Alive but not ready to serve (e.g. Redis `-LOADING`).
    NotReady,
    /// Answered wrongly: refused, an error, the wrong protocol, closed, or
    /// connected and then silent (a frozen process).
    Down,
    /// The connect got no answer within the timeout, or the network says
    /// the host cannot be reached.
    NoAnswer,
    /// Could not run on our side: says nothing about the backend.
    Unknown,
}

impl CheckStatus {
    pub const ALL: [CheckStatus; 5] = [
        CheckStatus::Up,
        CheckStatus::NotReady,
        CheckStatus::Down,
        CheckStatus::NoAnswer,
        CheckStatus::Unknown,
    ];

    /// The name in logs, metrics and `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Up => "up",
            CheckStatus::NotReady => "not_ready",
            CheckStatus::Down => "down",
            CheckStatus::NoAnswer => "no_answer",
            CheckStatus::Unknown => "unknown",
        }
    }

    /// Counts against the backend (towards `fall`).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            CheckStatus::NotReady | CheckStatus::Down | CheckStatus::NoAnswer
        )
    }
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub status: CheckStatus,
    /// The role reported (postgres, redis), when the check asks for it.
    pub role: Option<Role>,
    pub latency: Duration,
    /// One line for logs and /status: what was seen or what failed.
    pub detail: String,
}

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
    /// Every failed check of the run that led here was a connect that got
    /// no answer (none answered wrongly).
    pub no_answer_only: bool,
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
    /// Every failure of the current run was [`CheckStatus::NoAnswer`].
    failures_unanswered: bool,
    role: Option<Role>,
    last: Option<CheckOutcome>,
    /// Health checks run for this backend (else a suspect state expires).
    checked: bool,
    /// When the watcher last found a session to it dead.
    dead_session_at: Option<Instant>,
}

impl Tracker {
    /// A tracker; `checked` says whether health checks will feed it.
    pub fn new(rise: NonZeroU32, fall: NonZeroU32, checked: bool) -> Self {
        Tracker {
            state: State::Up,
            rise: rise.get(),
            fall: fall.get(),
            successes: 0,
            failures: 0,
            failures_unanswered: false,
            role: None,
            last: None,
            checked,
            dead_session_at: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// A reload changed `rise`, `fall` or whether checks run; the state
    /// and counts stay.
    pub fn set_thresholds(&mut self, rise: NonZeroU32, fall: NonZeroU32, checked: bool) {
        self.rise = rise.get();
        self.fall = fall.get();
        self.checked = checked;
    }

    pub fn role(&self) -> Option<Role> {
        self.role
    }

    pub fn last(&self) -> Option<&CheckOutcome> {
        self.last.as_ref()
    }

    fn change(&self, from: State, old_role: Option<Role>) -> Change {
        Change {
            from,
            to: self.state,
            role_changed: old_role != self.role,
            had_role: old_role.is_some(),
            no_answer_only: self.failures > 0 && self.failures_unanswered,
        }
    }

    /// Applies one check outcome.
    pub fn record(&mut self, outcome: CheckOutcome) -> Change {
        let from = self.state;
        let old_role = self.role;
        if outcome.status == CheckStatus::Unknown {
            // Our side could not check: nothing learned about the backend.
            self.last = Some(outcome);
            return self.change(from, old_role);
        }
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
            if self.failures == 0 {
                self.failures_unanswered = true;
            }
            self.failures += 1;
            self.failures_unanswered &= outcome.status == CheckStatus::NoAnswer;
            if self.failures >= self.fall {
                self.state = State::Down;
                self.role = None;
            } else if self.state == State::Up {
                self.state = State::Suspect;
            }
        }
        self.last = Some(outcome);
        self.change(from, old_role)
    }

    /// A connection to this backend was found dead by the watcher at `now`:
    /// an up backend becomes suspect (its checks decide the rest).
    pub fn connection_dead(&mut self, now: Instant) -> Change {
        let from = self.state;
        self.dead_session_at = Some(now);
        if self.state == State::Up {
            self.state = State::Suspect;
        }
        self.change(from, self.role)
    }

    /// Without health checks nothing else would bring a suspect backend
    /// back: it is up again once no session to it was found dead for
    /// `hold`.
    pub fn expire_suspect(&mut self, now: Instant, hold: Duration) -> Change {
        let from = self.state;
        let quiet = self
            .dead_session_at
            .is_none_or(|at| now.saturating_duration_since(at) >= hold);
        if !self.checked && self.state == State::Suspect && quiet {
            self.state = State::Up;
        }
        self.change(from, self.role)
    }
}

/// `/status` writes these as logs and metrics do: by [`as_str`](State::as_str).
macro_rules! serialize_as_str {
    ($($t:ty),*) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    )*};
}
serialize_as_str!(Role, CheckStatus, State);

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
            true,
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
        let now = Instant::now();
        assert_eq!(t.connection_dead(now).to, State::Suspect);
        // Only checks count towards `fall`.
        t.record(outcome(CheckStatus::Down, None));
        assert_eq!(t.state(), State::Suspect);
        t.record(outcome(CheckStatus::Down, None));
        assert_eq!(t.state(), State::Down);
        assert_eq!(t.connection_dead(now).to, State::Down);
    }

    #[test]
    fn a_check_that_could_not_run_here_counts_neither_way() {
        let mut t = tracker(2, 2);
        for _ in 0..5 {
            assert_eq!(t.record(outcome(CheckStatus::Unknown, None)).to, State::Up);
        }
        t.record(outcome(CheckStatus::Down, None));
        t.record(outcome(CheckStatus::Unknown, None));
        assert_eq!(t.record(outcome(CheckStatus::Down, None)).to, State::Down);
        assert_eq!(t.last().unwrap().status, CheckStatus::Down);
    }

    #[test]
    fn down_on_unanswered_connects_alone_is_told_apart_from_wrong_answers() {
        let mut t = tracker(2, 2);
        t.record(outcome(CheckStatus::NoAnswer, None));
        let c = t.record(outcome(CheckStatus::NoAnswer, None));
        assert!(c.to == State::Down && c.no_answer_only, "{c:?}");
        let mut t = tracker(2, 2);
        t.record(outcome(CheckStatus::NoAnswer, None));
        let c = t.record(outcome(CheckStatus::Down, None));
        assert!(c.to == State::Down && !c.no_answer_only, "{c:?}");
        let mut t = tracker(2, 3);
        t.record(outcome(CheckStatus::Down, None));
        t.record(outcome(CheckStatus::NoAnswer, None));
        let c = t.record(outcome(CheckStatus::NoAnswer, None));
        assert!(c.to == State::Down && !c.no_answer_only, "{c:?}");
    }

    #[test]
    fn without_checks_a_suspect_backend_is_up_again_once_quiet() {
        let hold = Duration::from_secs(10);
        let start = Instant::now();
        let mut unchecked = Tracker::new(NonZeroU32::MIN, NonZeroU32::MIN, false);
        unchecked.connection_dead(start);
        let later = |s| start + Duration::from_secs(s);
        assert_eq!(unchecked.expire_suspect(later(5), hold).to, State::Suspect);
        // Another dead session renews the suspicion.
        unchecked.connection_dead(later(6));
        assert_eq!(unchecked.expire_suspect(later(12), hold).to, State::Suspect);
        let c = unchecked.expire_suspect(later(16), hold);
        assert_eq!((c.from, c.to), (State::Suspect, State::Up));
        // With checks, only they bring it back.
        let mut checked = tracker(2, 2);
        checked.connection_dead(start);
        assert_eq!(checked.expire_suspect(later(60), hold).to, State::Suspect);
    }
}
