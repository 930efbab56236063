//! Backend health checks: one protocol check of one address ([`check`]),
//! the check loop of each backend ([`monitor`]), and the read-only replies
//! on the data path that ask for a check at once ([`hint`]). What the
//! checks conclude is recorded in the backend's state machine
//! ([`crate::backend::state`]).

pub mod check;
pub mod hint;
pub mod monitor;
