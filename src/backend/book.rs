//! Which addresses of a DNS-named backend new connections go to.
//!
//! Ungated (an IP backend, or a listener that routes to any role), that is
//! simply the latest lookup's answer. Gated — a DNS backend of a listener
//! with `role = "primary"` or `"replica"` — an address is used only once a
//! check *on that address* found it up in the wanted role. After a managed
//! database fails over, its name flips between the old and the new address
//! for tens of seconds; following each flip would send writes to the
//! demoted server. So:
//!
//! - An address a lookup newly returns is *fresh*: it is checked at once,
//!   and takes over once a check confirms its role. Until then the
//!   addresses that serve keep serving, even if the name stopped returning
//!   them.
//! - An address the name returns again after it was replaced (a flicker
//!   back to the old server) is not fresh: it changes nothing, unless its
//!   check says its role changed (it went from another role, or none, to
//!   the wanted one) — then it is fresh again.
//! - A serving address whose check finds it in another role stops serving
//!   at once; if nothing verified is left, any address of the answer that
//!   is verified takes over. A serving address that fails its check is the
//!   backend's state machine's to judge (`fall`, and a check unanswered
//!   while sessions are answered is loss, not death), not the book's: one
//!   lost check on a lossy link must not move or evict anything.
//!
//! The book is pure bookkeeping; [`crate::resolver`] feeds it lookups and
//! [`crate::health::monitor`] check results.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::state::Role;

/// Lookups an address may be missing from and still count as the name's:
/// it is checked every round, and may take over when verified. Covers a
/// name that flips between addresses for tens of seconds.
const RECENT_LOOKUPS: u32 = 10;
/// Lookups an address may be missing from before its record is forgotten
/// (it is then fresh if it comes back). Long, so that a flickering name
/// never makes an old address new again.
const FORGET_AFTER_LOOKUPS: u32 = 120;
/// Records kept at most; beyond, the longest-missing ones are forgotten.
const MAX_RECORDS: usize = 64;

/// What a check found at one address, as the book needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// It answered, in this role (`None`: the check reports no role).
    Up(Option<Role>),
    /// It is down, not ready, or did not answer. Marks an address that
    /// does not serve unusable; a serving one is left to the backend's
    /// state machine.
    NotUsable,
    /// The check could not run on our side: nothing learned.
    Nothing,
}

#[derive(Debug, Clone)]
struct Record {
    /// Up in the wanted role at its last check (and checked since it was
    /// last left out of the checks).
    usable: bool,
    /// Its last check (that could run) found it up in the wanted role:
    /// unlike `usable`, a failed check of a serving address clears it.
    confirmed: bool,
    /// The role its last answering check reported.
    role: Option<Role>,
    /// May take over from the serving addresses once usable.
    fresh: bool,
    /// Lookups in a row it was missing from.
    missing: u32,
}

/// The addresses of one backend: the latest answer, and those that serve.
#[derive(Debug, Clone)]
pub struct AddressBook {
    /// `Some(role)`: gated on that role.
    gate: Option<Role>,
    answer: Vec<SocketAddr>,
    serving: Vec<SocketAddr>,
    records: HashMap<SocketAddr, Record>,
}

/// What a lookup changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lookup {
    /// Addresses that left the answer.
    pub gone: Vec<SocketAddr>,
    /// Gated: addresses never seen (or forgotten) before: check them now.
    pub fresh: Vec<SocketAddr>,
}

impl AddressBook {
    /// A book for an IP backend: `addrs` serve, always.
    pub fn fixed(addrs: Vec<SocketAddr>) -> Self {
        AddressBook {
            gate: None,
            serving: addrs.clone(),
            answer: addrs,
            records: HashMap::new(),
        }
    }

    /// A book for a DNS backend, gated on `gate` when set.
    pub fn named(gate: Option<Role>) -> Self {
        AddressBook {
            gate,
            answer: Vec::new(),
            serving: Vec::new(),
            records: HashMap::new(),
        }
    }

    /// Gated on a role (a reload may change the listener's routing).
    pub fn set_gate(&mut self, gate: Option<Role>) {
        if self.gate != gate {
            self.gate = gate;
            self.records.clear();
            self.serving = if gate.is_none() {
                self.answer.clone()
            } else {
                Vec::new()
            };
        }
    }

    pub fn gated(&self) -> bool {
        self.gate.is_some()
    }

    /// Where new connections go.
    pub fn serving(&self) -> &[SocketAddr] {
        &self.serving
    }

    /// The latest lookup's answer.
    pub fn answer(&self) -> &[SocketAddr] {
        &self.answer
    }

    /// Gated: addresses of the answer that do not serve (waiting for a
    /// check, or checked and not in the wanted role).
    pub fn held_back(&self) -> Vec<SocketAddr> {
        if !self.gated() {
            return Vec::new();
        }
        self.answer
            .iter()
            .filter(|a| !self.serving.contains(a))
            .copied()
            .collect()
    }

    /// What the checks look at: gated, the serving addresses, then those
    /// of the answer, then those the name returned in the last
    /// [`RECENT_LOOKUPS`] lookups (so a flip of roles is seen in one round
    /// whatever the name says at that moment); ungated, the answer's first.
    pub fn to_check(&self) -> Vec<SocketAddr> {
        if !self.gated() {
            return self.answer.first().copied().into_iter().collect();
        }
        let mut out = self.serving.clone();
        for addr in &self.answer {
            if !out.contains(addr) {
                out.push(*addr);
            }
        }
        let mut recent: Vec<SocketAddr> = self
            .records
            .iter()
            .filter(|(a, r)| r.missing < RECENT_LOOKUPS && !out.contains(a))
            .map(|(a, _)| *a)
            .collect();
        recent.sort();
        out.extend(recent);
        out
    }

    fn recent(&self, addr: &SocketAddr) -> bool {
        self.records
            .get(addr)
            .is_some_and(|r| r.missing < RECENT_LOOKUPS)
    }

    /// A lookup answered `new`.
    pub fn lookup(&mut self, mut new: Vec<SocketAddr>) -> Lookup {
        new.sort();
        new.dedup();
        let gone = self
            .answer
            .iter()
            .filter(|a| !new.contains(a))
            .copied()
            .collect();
        self.answer = new;
        let Some(_) = self.gate else {
            self.serving = self.answer.clone();
            return Lookup {
                gone,
                fresh: Vec::new(),
            };
        };
        let mut fresh = Vec::new();
        for record in self.records.values_mut() {
            record.missing += 1;
        }
        for addr in &self.answer {
            let record = self.records.entry(*addr).or_insert_with(|| {
                fresh.push(*addr);
                Record {
                    usable: false,
                    confirmed: false,
                    role: None,
                    fresh: true,
                    missing: 0,
                }
            });
            record.missing = 0;
        }
        self.forget_old();
        self.settle();
        Lookup { gone, fresh }
    }

    /// A check round looked at `addrs` (those of [`AddressBook::to_check`])
    /// and found `seen` at each. Returns the addresses that stopped serving
    /// because they are in another role (their sessions are on the wrong
    /// server).
    pub fn checked(&mut self, seen: &[(SocketAddr, Seen)]) -> Vec<SocketAddr> {
        let Some(wanted) = self.gate else {
            return Vec::new();
        };
        // An address left out of this round is not known to be usable now.
        for (addr, record) in self.records.iter_mut() {
            if !seen.iter().any(|(a, _)| a == addr) {
                record.usable = false;
                record.confirmed = false;
            }
        }
        for &(addr, found) in seen {
            let Some(record) = self.records.get_mut(&addr) else {
                continue; // forgotten meanwhile
            };
            match found {
                Seen::Up(role) => {
                    if role == Some(wanted) && record.role != Some(wanted) {
                        // Verified for the first time, or its role changed
                        // to the wanted one since it was last seen.
                        record.fresh = true;
                    }
                    record.role = role.or(record.role);
                    record.usable = role == Some(wanted);
                    record.confirmed = record.usable;
                }
                Seen::NotUsable => {
                    record.confirmed = false;
                    if !self.serving.contains(&addr) {
                        record.usable = false;
                    }
                }
                Seen::Nothing => {}
            }
        }
        let before = self.serving.clone();
        self.settle();
        before
            .into_iter()
            .filter(|a| !self.serving.contains(a) && !self.usable(a))
            .collect()
    }

    fn usable(&self, addr: &SocketAddr) -> bool {
        self.records.get(addr).is_some_and(|r| r.usable)
    }

    /// Recomputes the serving addresses from the records.
    fn settle(&mut self) {
        let mut fresh: Vec<SocketAddr> = self
            .records
            .iter()
            .filter(|(a, r)| r.fresh && r.usable && self.recent(a))
            .map(|(a, _)| *a)
            .collect();
        fresh.sort();
        if !fresh.is_empty() {
            // Fresh verified addresses take over; serving ones the name
            // still returns and that passed their check (a multi-address
            // answer) stay beside them.
            let mut next: Vec<SocketAddr> = self
                .serving
                .iter()
                .filter(|a| {
                    self.answer.contains(a) && self.records.get(a).is_some_and(|r| r.confirmed)
                })
                .copied()
                .collect();
            for addr in &fresh {
                if !next.contains(addr) {
                    next.push(*addr);
                }
            }
            next.sort();
            for addr in self.serving.iter().chain(&fresh) {
                if let Some(record) = self.records.get_mut(addr) {
                    record.fresh = false;
                }
            }
            self.serving = next;
            return;
        }
        let records = &self.records;
        self.serving
            .retain(|a| records.get(a).is_some_and(|r| r.usable));
        if self.serving.is_empty() {
            // Nothing verified serves any more: whatever the answer has
            // that a check verified, else what the name returned lately.
            self.serving = self
                .answer
                .iter()
                .filter(|a| records.get(a).is_some_and(|r| r.usable))
                .copied()
                .collect();
            if self.serving.is_empty() {
                self.serving = records
                    .iter()
                    .filter(|(_, r)| r.usable && r.missing < RECENT_LOOKUPS)
                    .map(|(a, _)| *a)
                    .collect();
                self.serving.sort();
            }
            for addr in &self.serving {
                if let Some(record) = self.records.get_mut(addr) {
                    record.fresh = false;
                }
            }
        }
    }

    /// Forgets addresses missing for long (never serving ones), and the
    /// longest-missing beyond [`MAX_RECORDS`].
    fn forget_old(&mut self) {
        let serving = &self.serving;
        self.records
            .retain(|a, r| r.missing < FORGET_AFTER_LOOKUPS || serving.contains(a));
        if self.records.len() > MAX_RECORDS {
            let mut by_missing: Vec<(u32, SocketAddr)> = self
                .records
                .iter()
                .filter(|(a, _)| !serving.contains(a))
                .map(|(a, r)| (r.missing, *a))
                .collect();
            by_missing.sort_by(|x, y| y.cmp(x));
            let excess = self.records.len() - MAX_RECORDS;
            for (_, addr) in by_missing.into_iter().take(excess) {
                self.records.remove(&addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Seen = Seen::Up(Some(Role::Primary));
    const R: Seen = Seen::Up(Some(Role::Replica));

    fn a(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 5432))
    }

    fn gated() -> AddressBook {
        AddressBook::named(Some(Role::Primary))
    }

    /// Checks what `to_check` names, each found as `found` says.
    fn round(book: &mut AddressBook, found: impl Fn(SocketAddr) -> Seen) -> Vec<SocketAddr> {
        let seen: Vec<_> = book.to_check().into_iter().map(|x| (x, found(x))).collect();
        book.checked(&seen)
    }

    #[test]
    fn ungated_the_answer_serves_at_once() {
        let mut book = AddressBook::named(None);
        let lookup = book.lookup(vec![a(2), a(1), a(1)]);
        assert_eq!(lookup.gone, vec![]);
        assert_eq!(book.serving(), [a(1), a(2)]);
        assert_eq!(book.to_check(), vec![a(1)]);
        assert_eq!(book.lookup(vec![a(3)]).gone, vec![a(1), a(2)]);
        assert_eq!(book.serving(), [a(3)]);
        assert!(book.held_back().is_empty());
    }

    #[test]
    fn a_new_address_serves_only_once_a_check_confirms_its_role() {
        let mut book = gated();
        assert_eq!(book.lookup(vec![a(1)]).fresh, vec![a(1)]);
        assert!(book.serving().is_empty(), "unverified at start");
        round(&mut book, |_| P);
        assert_eq!(book.serving(), [a(1)]);

        // The name moves to a(2): a(1) keeps serving until a(2) is checked.
        let lookup = book.lookup(vec![a(2)]);
        assert_eq!(lookup.fresh, vec![a(2)]);
        assert_eq!(lookup.gone, vec![a(1)]);
        assert_eq!(book.serving(), [a(1)]);
        assert_eq!(book.held_back(), vec![a(2)]);
        assert_eq!(book.to_check(), vec![a(1), a(2)]);
        // a(2) is a replica: nothing changes.
        assert!(round(&mut book, |x| if x == a(2) { R } else { P }).is_empty());
        assert_eq!(book.serving(), [a(1)]);
        // a(2) is promoted, a(1) demoted: a(2) serves, a(1)'s sessions go.
        let dropped = round(&mut book, |x| if x == a(2) { P } else { R });
        assert_eq!(dropped, vec![a(1)]);
        assert_eq!(book.serving(), [a(2)]);
    }

    #[test]
    fn a_flickering_name_never_moves_writes_to_the_replica() {
        let mut book = gated();
        book.lookup(vec![a(1)]);
        round(&mut book, |x| if x == a(1) { P } else { R });
        for flip in 0..40 {
            let answer = if flip % 2 == 0 { a(2) } else { a(1) };
            book.lookup(vec![answer]);
            assert_eq!(book.serving(), [a(1)], "flip {flip}");
            let dropped = round(&mut book, |x| if x == a(1) { P } else { R });
            assert!(dropped.is_empty(), "flip {flip}");
            assert_eq!(book.serving(), [a(1)], "flip {flip}");
        }
    }

    #[test]
    fn an_old_primary_flickering_back_changes_nothing_until_its_role_changes() {
        let mut book = gated();
        book.lookup(vec![a(1)]);
        round(&mut book, |_| P);
        // Moved to a(2), which is verified: it takes over, though a(1)
        // still says primary (not fenced yet).
        book.lookup(vec![a(2)]);
        round(&mut book, |_| P);
        assert_eq!(book.serving(), [a(2)]);
        // The name flickers back to a(1), still claiming primary: nothing.
        for _ in 0..5 {
            book.lookup(vec![a(1)]);
            round(&mut book, |_| P);
            assert_eq!(book.serving(), [a(2)]);
            book.lookup(vec![a(2)]);
            round(&mut book, |_| P);
            assert_eq!(book.serving(), [a(2)]);
        }
        // a(1) is demoted, later promoted again (a failback) while the name
        // returns it: now its role changed, and it takes over.
        book.lookup(vec![a(1)]);
        round(&mut book, |x| if x == a(1) { R } else { P });
        assert_eq!(book.serving(), [a(2)]);
        round(&mut book, |_| P);
        assert_eq!(book.serving(), [a(1)]);
    }

    #[test]
    fn a_failed_check_of_the_serving_address_moves_nothing() {
        let mut book = gated();
        book.lookup(vec![a(1), a(2)]);
        round(&mut book, |x| if x == a(1) { P } else { R });
        assert_eq!(book.serving(), [a(1)]);
        // A lost check (or a real failure: the backend's state machine
        // judges that, with `fall`) moves nothing and drops nothing.
        for _ in 0..3 {
            assert!(round(&mut book, |x| if x == a(1) { Seen::NotUsable } else { R }).is_empty());
            assert_eq!(book.serving(), [a(1)]);
        }
        // a(2) promoted meanwhile: it takes over.
        round(&mut book, |x| if x == a(1) { Seen::NotUsable } else { P });
        assert_eq!(book.serving(), [a(2)]);
        // A check that could not run changes nothing.
        assert!(round(&mut book, |_| Seen::Nothing).is_empty());
        assert_eq!(book.serving(), [a(2)]);
        // A failed check of an address that does not serve makes it unusable.
        round(&mut book, |x| if x == a(1) { Seen::NotUsable } else { R });
        assert!(book.serving().is_empty());
    }

    #[test]
    fn a_role_flip_is_followed_whatever_the_name_says_at_that_moment() {
        let mut book = gated();
        book.lookup(vec![a(1)]);
        round(&mut book, |x| if x == a(1) { P } else { R });
        book.lookup(vec![a(2)]);
        round(&mut book, |x| if x == a(1) { P } else { R });
        // The name says a(1) again; a(2) is still checked (it is recent).
        book.lookup(vec![a(1)]);
        assert_eq!(book.to_check(), vec![a(1), a(2)]);
        // The roles flip: a(2) serves in the same round, though the name
        // does not return it right now.
        let dropped = round(&mut book, |x| if x == a(2) { P } else { R });
        assert_eq!(dropped, vec![a(1)]);
        assert_eq!(book.serving(), [a(2)]);
    }

    #[test]
    fn an_address_the_name_stopped_returning_is_checked_a_while_then_not() {
        let mut book = gated();
        book.lookup(vec![a(1), a(2)]);
        round(&mut book, |_| P);
        assert_eq!(book.serving(), [a(1), a(2)]);
        // a(2) leaves the answer: it serves on, and is checked, until a
        // check finds it in another role.
        book.lookup(vec![a(1)]);
        assert_eq!(book.to_check(), vec![a(1), a(2)]);
        let dropped = round(&mut book, |x| if x == a(2) { R } else { P });
        assert_eq!(dropped, vec![a(2)]);
        assert_eq!(book.serving(), [a(1)]);
        for _ in 2..RECENT_LOOKUPS {
            book.lookup(vec![a(1)]);
            assert_eq!(book.to_check(), vec![a(1), a(2)]);
            round(&mut book, |x| if x == a(2) { R } else { P });
        }
        // No longer recent: not checked, and not usable until checked again.
        book.lookup(vec![a(1)]);
        assert_eq!(book.to_check(), vec![a(1)]);
        round(&mut book, |_| P);
        book.lookup(vec![a(2)]);
        assert_eq!(book.serving(), [a(1)]);
        assert_eq!(book.to_check(), vec![a(1), a(2)]);
    }

    #[test]
    fn records_stay_bounded() {
        let mut book = gated();
        for n in 0..200u16 {
            let addr = SocketAddr::from(([10, 0, (n >> 8) as u8, n as u8], 5432));
            book.lookup(vec![addr]);
        }
        assert!(book.records.len() <= MAX_RECORDS);
    }

    #[test]
    fn a_reload_that_changes_the_gate_starts_over() {
        let mut book = gated();
        book.lookup(vec![a(1)]);
        round(&mut book, |_| P);
        book.set_gate(None);
        assert_eq!(book.serving(), [a(1)]);
        book.set_gate(Some(Role::Replica));
        assert!(book.serving().is_empty());
        book.lookup(vec![a(1)]);
        round(&mut book, |_| R);
        assert_eq!(book.serving(), [a(1)]);
    }
}
