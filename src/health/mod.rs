//! Backend health: checks on their own schedule, the up / suspect / down
//! state machine with rise and fall, and the role each backend reports.

pub mod check;
