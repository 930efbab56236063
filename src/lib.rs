//! pulsegate: a TCP proxy that finds and evicts half-open connections
//! before they hang a client.
//!
//! Modules follow the data's path (docs/DESIGN.md draws them and their
//! import graph, which has no cycles):
//!
//! - [`config`] — the TOML file, its defaults, validation and the detection
//!   bounds it promises; [`preflight`] renders them for `pulsegate check`.
//! - [`server`] — startup as a library call: [`run`] serves listeners and
//!   an admin socket already bound, until drained or told to shut down
//!   (`main.rs` keeps the command line, signals and exit codes).
//! - [`proxy`] — binds every listener, serves them, applies reloads and
//!   drains; [`registry`] is the state the admin API reads, and types the
//!   `/status` document.
//! - [`listener`] — the accept loop, `max_connections`, drain on shutdown.
//! - [`session`] — one client: upstream connect, relay, eviction.
//! - [`backend`] — a listener's backends: addresses, the up / suspect /
//!   down state machine and role, connection counts and meters;
//!   [`routing`] decides which of them a new connection tries;
//!   [`health`] runs their checks and feeds the state machine.
//! - [`resolver`] — DNS following for backends named by host name.
//! - [`upstream`] — connect to the first backend that accepts; [`pool`]
//!   keeps probed spare connections ready per backend.
//! - [`pgwire`] — the PostgreSQL messages that route cancel requests;
//!   [`proxy_header`] — the PROXY protocol header (v1, v2) that carries
//!   the client's address from a load balancer and to the backends.
//! - [`relay`] — exact byte copy both ways with half-close: small reads
//!   copied, bulk spliced.
//! - [`liveness`] — the watcher: on-demand probes, the death rule, and
//!   verdicts corroborated by the host and adapted to the link's loss.
//! - [`evict`] — eviction reasons and the structured eviction event.
//! - [`sockopt`] — every socket option, and the one `unsafe` TCP_INFO read.
//! - [`admin`] — the admin HTTP server (metrics, health, readiness,
//!   status, drain, reload) and `pulsegate admin`; the proxy answers it in
//!   domain values through [`admin::Control`], and only its routes know
//!   status codes.
//! - [`telemetry`] — logging, and the Prometheus metrics catalog.
//! - [`lab`] — network namespaces, firewall rules, processes, an emulated
//!   lossy or far link, and the real servers (echo, redis-server,
//!   PostgreSQL) for the demo, the tests and the benches (not on the proxy
//!   path).
//! - [`demo`] — `pulsegate demo`, the seed experiment in one command.
//! - `bench` — `pulsegate bench failover`, a load test of failover in the
//!   lab (the `bench` cargo feature, on by default).
#![deny(unsafe_code)]

pub mod admin;
pub mod backend;
#[cfg(feature = "bench")]
pub mod bench;
pub mod config;
pub mod demo;
pub mod evict;
pub mod health;
pub mod lab;
pub mod listener;
pub mod liveness;
pub mod pgwire;
pub mod pool;
pub mod preflight;
pub mod proxy;
pub mod proxy_header;
pub mod registry;
pub mod relay;
pub mod resolver;
pub mod routing;
pub mod server;
pub mod session;
pub mod sockopt;
pub mod telemetry;
pub mod upstream;

pub use server::{run, Bound, Handle, Server};
