//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`, `/status`,
//! `POST /drain` and `POST /reload`, on hyper 1 behind a tower stack
//! (timeout, concurrency limit, request tracing). It sees the proxy only
//! through [`Control`], so nothing an admin client sends reaches the data
//! path except through those calls. The proxy answers in domain values;
//! `routes` alone maps them to status codes.

mod client;
pub mod command;
mod control;
mod routes;
mod server;
#[cfg(test)]
mod tests;

pub use client::{request, ClientError};
pub use control::{AfterDrain, Control, Readiness, ReloadError, ReloadSummary, Token};
pub use server::{serve, AdminSettings};
