//! What db_clients measures against: one redis-server, one PostgreSQL
//! cluster (filled once with `pgbench -i`), and per proxy route one proxy
//! instance in front of each. Everything listens on loopback ports that
//! were free a moment ago; every process is stopped when the [`Setup`] is
//! dropped, also when the bench fails.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};

use crate::common::{self, child::Proc, Via};
use crate::{postgres, redis, Knobs};

/// The programs the bench drives, all found before anything starts.
pub struct Tools {
    pub redis: redis::Tools,
    pub postgres: postgres::Tools,
}

/// The versions the report names.
pub struct Versions {
    /// "redis-benchmark 7.0.15 against redis-server 7.0.15".
    pub redis: String,
    /// "pgbench (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)".
    pub pgbench: String,
}

impl Tools {
    /// Finds every program, failing with the Debian package of the first
    /// one missing.
    pub fn find() -> Result<Tools> {
        Ok(Tools {
            redis: redis::Tools::find()?,
            postgres: postgres::Tools::find()?,
        })
    }

    pub fn versions(&self) -> Result<Versions> {
        Ok(Versions {
            redis: self.redis.versions()?,
            pgbench: self.postgres.version()?,
        })
    }
}

/// One way to reach the servers: their addresses, and the pids of the
/// proxy processes in front of them (none for direct).
pub struct Route {
    pub via: Via,
    pub redis: SocketAddr,
    pub postgres: SocketAddr,
    pub redis_proxy: Option<u32>,
    pub postgres_proxy: Option<u32>,
}

/// The servers, the proxies and the routes through them. Fields drop in
/// order: the proxies first, then the servers, then the directory holding
/// their configs and logs.
pub struct Setup {
    pub routes: Vec<Route>,
    proxies: Vec<Proc>,
    redis: redis::Server,
    postgres: postgres::Server,
    dir: tempfile::TempDir,
}

impl Setup {
    /// Starts redis-server and PostgreSQL, fills PostgreSQL with
    /// `pgbench -i -s PGBENCH_SCALE` (directly), and starts two instances of
    /// each proxy in `vias`.
    pub fn start(vias: &[Via], tools: &Tools, knobs: &Knobs) -> Result<Setup> {
        let dir = tempfile::Builder::new()
            .prefix("db_clients")
            .tempdir()
            .context("creating a temporary directory")?;
        let redis = redis::Server::start(&tools.redis, dir.path())?;
        let postgres = postgres::Server::start(&tools.postgres)?;
        println!(
            "redis-server on {}, PostgreSQL on {}; pgbench -i -s {}",
            redis.addr, postgres.addr, knobs.pgbench_scale
        );
        postgres::initialise(
            &tools.postgres,
            postgres.addr,
            knobs.pgbench_scale,
            dir.path(),
        )?;
        let mut proxies = Vec::new();
        let mut routes = Vec::new();
        for &via in vias {
            routes.push(match via {
                Via::Direct => Route {
                    via,
                    redis: redis.addr,
                    postgres: postgres.addr,
                    redis_proxy: None,
                    postgres_proxy: None,
                },
                _ => {
                    let (redis_proxy, redis_front) =
                        common::start_proxy(via, "redis", redis.addr, dir.path())?;
                    let (pg_proxy, pg_front) =
                        common::start_proxy(via, "postgres", postgres.addr, dir.path())?;
                    let route = Route {
                        via,
                        redis: redis_front,
                        postgres: pg_front,
                        redis_proxy: Some(redis_proxy.pid()),
                        postgres_proxy: Some(pg_proxy.pid()),
                    };
                    proxies.extend([redis_proxy, pg_proxy]);
                    route
                }
            });
        }
        Ok(Setup {
            routes,
            proxies,
            redis,
            postgres,
            dir,
        })
    }

    /// Where the clients' output and the processes' logs go.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Fails, with its log, if a proxy or a server has died.
    pub fn check_running(&mut self) -> Result<()> {
        self.proxies.iter_mut().try_for_each(Proc::check_running)?;
        self.redis.check_running()?;
        self.postgres.check_running()
    }
}
