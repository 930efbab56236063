//! Wrong-role replies seen on the data path.
//!
//! With `role = "primary"`, a failover is seen by the next check, up to one
//! interval after the server was demoted or fenced; meanwhile every write
//! on its sessions is answered "read-only". That answer passes through the
//! relay on its way to the client, so the relay looks for it in what the
//! backend sends (PostgreSQL's SQLSTATE `25006`, Redis's `-READONLY`,
//! MySQL's and MariaDB's error 1290) and asks the backend's check to run at
//! once.
//!
//! A hint never evicts anything and never changes a backend's role: only
//! the check's answer does. Bytes that merely look like the error (a row
//! that contains them) cost one extra check, and the monitor acts on hints
//! at most once per quarter interval. What the relay does not read (bulk
//! moved by splice, a marker cut in two by a read boundary) is left to the
//! check on its own schedule.

use memchr::memmem::Finder;

use crate::backend::{BackendId, BackendSet};
use crate::config::{CheckConfig, CheckKind, RoleWanted};

/// PostgreSQL's ErrorResponse field `C` (SQLSTATE) for
/// `read_only_sql_transaction`: a fenced primary
/// (`default_transaction_read_only`) and a hot standby both send it for a
/// write. The field is NUL-terminated, so `25006` in a longer code or in
/// a message text does not match.
const POSTGRES_READ_ONLY: &[u8] = b"C25006\0";
/// Redis's error for a write to a replica.
const REDIS_READ_ONLY: &[u8] = b"-READONLY ";
/// The start of a MySQL/MariaDB ERR packet's payload for error 1290
/// (`ER_OPTION_PREVENTS_STATEMENT`, little-endian `0a 05`) with SQLSTATE
/// `HY000`: what a write gets from a server running with `read_only` (or
/// MySQL's `super_read_only`). The same code names other options that
/// forbid a statement; a false hint costs one extra check.
const MYSQL_READ_ONLY: &[u8] = b"\xff\x0a\x05#HY000";

/// The read-only reply of one protocol.
pub struct ReadOnlySign {
    finder: Finder<'static>,
}

impl ReadOnlySign {
    /// The sign to look for on a listener, if a check of its kind learns
    /// roles and the listener routes to primaries only.
    pub fn for_listener(check: Option<&CheckConfig>, role: RoleWanted) -> Option<Self> {
        if role != RoleWanted::Primary {
            return None;
        }
        let marker = match check?.kind {
            CheckKind::Postgres => POSTGRES_READ_ONLY,
            CheckKind::Redis => REDIS_READ_ONLY,
            CheckKind::Mysql => MYSQL_READ_ONLY,
            CheckKind::Tcp | CheckKind::Http => return None,
        };
        Some(ReadOnlySign {
            finder: Finder::new(marker),
        })
    }

    /// Whether `bytes` from the backend contain the read-only reply.
    pub fn seen_in(&self, bytes: &[u8]) -> bool {
        self.finder.find(bytes).is_some()
    }
}

/// One session's watch on what its backend answers.
pub struct ReplyWatch<'a> {
    pub sign: &'a ReadOnlySign,
    pub backends: &'a BackendSet,
    pub backend: BackendId,
}

impl ReplyWatch<'_> {
    /// Looks at one chunk on its way from the backend to the client.
    pub fn see(&self, bytes: &[u8]) {
        if self.sign.seen_in(bytes) {
            self.backends.wrong_role_reply(self.backend);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: CheckKind) -> CheckConfig {
        let mut check: CheckConfig = toml::from_str("kind = \"tcp\"").unwrap();
        check.kind = kind;
        check
    }

    /// An ErrorResponse for an INSERT in a read-only transaction, laid out
    /// as PostgreSQL 15 sends it, then ReadyForQuery. (tests/checks.rs has
    /// a real fenced server answer through pulsegate.)
    fn postgres_read_only_error() -> Vec<u8> {
        let fields: &[&[u8]] = &[
            b"SERROR\0",
            b"VERROR\0",
            b"C25006\0",
            b"Mcannot execute INSERT in a read-only transaction\0",
            b"Fpostgres.c\0",
            b"L1016\0",
            b"RPreventCommandIfReadOnly\0",
            b"\0",
        ];
        let body: Vec<u8> = fields.concat();
        let mut msg = vec![b'E'];
        msg.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        msg.extend_from_slice(&body);
        msg.extend_from_slice(b"Z\0\0\0\x05I");
        msg
    }

    #[test]
    fn postgres_read_only_error_is_seen() {
        let sign =
            ReadOnlySign::for_listener(Some(&check(CheckKind::Postgres)), RoleWanted::Primary)
                .unwrap();
        assert!(sign.seen_in(&postgres_read_only_error()));
        // Another error (unique violation 23505), and the digits in a row.
        assert!(!sign.seen_in(b"E\0\0\0\x10SERROR\0C23505\0\0"));
        assert!(!sign.seen_in(b"D\0\0\0\x0f\0\x01\0\0\0\x05250060"));
    }

    #[test]
    fn redis_readonly_error_is_seen() {
        let sign = ReadOnlySign::for_listener(Some(&check(CheckKind::Redis)), RoleWanted::Primary)
            .unwrap();
        assert!(sign.seen_in(b"+OK\r\n-READONLY You can't write against a read only replica.\r\n"));
        assert!(!sign.seen_in(b"$8\r\nREADONLY\r\n"));
    }

    #[test]
    fn mysql_read_only_error_is_seen() {
        let sign = ReadOnlySign::for_listener(Some(&check(CheckKind::Mysql)), RoleWanted::Primary)
            .unwrap();
        // An ERR packet as MariaDB 10.11 sends it for an INSERT under
        // read_only=1 (header: payload length, sequence 1).
        let message = b"The MariaDB server is running with the --read-only option so it cannot execute this statement";
        let mut packet = vec![9 + message.len() as u8, 0, 0, 1];
        packet.extend_from_slice(b"\xff\x0a\x05#HY000");
        packet.extend_from_slice(message);
        assert!(sign.seen_in(&packet));
        // Another error (duplicate key, 1062 = 0x0426), and a row's text.
        assert!(!sign.seen_in(b"\x1d\0\0\x01\xff\x26\x04#23000Duplicate entry"));
        assert!(!sign.seen_in(b"\x07\0\0\x04\x06HY0001290"));
    }

    #[test]
    fn only_listeners_that_route_to_primaries_by_a_role_check_watch() {
        let redis = check(CheckKind::Redis);
        assert!(ReadOnlySign::for_listener(Some(&redis), RoleWanted::Any).is_none());
        assert!(ReadOnlySign::for_listener(Some(&redis), RoleWanted::Replica).is_none());
        assert!(ReadOnlySign::for_listener(None, RoleWanted::Primary).is_none());
        for kind in [CheckKind::Tcp, CheckKind::Http] {
            assert!(ReadOnlySign::for_listener(Some(&check(kind)), RoleWanted::Primary).is_none());
        }
    }
}
