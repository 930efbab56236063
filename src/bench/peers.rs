//! The other proxies a run measures beside pulsegate, started in the near
//! namespace: HAProxy, with a config written for the same goal as
//! pulsegate's settings (or the user's own, `--haproxy-config`), and
//! PgBouncer in session mode for the postgres workload.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::args::{FaultKind, Plan, WorkloadKind, DNS_NAME, HAPROXY_ADDR, PGBOUNCER_ADDR};
use super::servers::PG_USER;
use super::BenchError;
use crate::lab::servers::find_program;
use crate::lab::{Lab, LabProcess};

/// How long HAProxy may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// HAProxy's config for `plan`, tuned for what pulsegate's settings aim
/// at: keepalive probes on the server side after `probe_interval` of
/// quiet, `TCP_USER_TIMEOUT` on the server connections, a health check as
/// often as pulsegate's (fall 2, rise 2) whose failure shuts the server's
/// sessions, the secondary as a backup server, and no inactivity timeout
/// below an hour. Printed in the report so it can be argued with.
pub(crate) fn haproxy_config(plan: &Plan) -> String {
    let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
    let secs = |d: Duration| d.as_secs().max(1);
    let check = match (plan.workload, plan.fault) {
        (WorkloadKind::Redis, FaultKind::RoleFlip | FaultKind::DnsMove) => {
            "    option tcp-check\n    \
             tcp-check send \"info replication\\r\\n\"\n    \
             tcp-check expect string role:master\n"
                .to_string()
        }
        (WorkloadKind::Redis, _) => "    option redis-check\n".to_string(),
        (WorkloadKind::Postgres, _) => format!("    option pgsql-check user {PG_USER}\n"),
        (WorkloadKind::Echo, _) => String::new(),
    };
    format!(
        "# Written by `pulsegate bench failover` for the same goal as pulsegate's
# settings in this run; pass --haproxy-config FILE to measure your own.
global
    nbthread 2
    maxconn 4000
    log stderr format raw daemon info

defaults
    mode tcp
    log global
    option tcplog
    option redispatch
    retries 3
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    # Server-side keepalive: probes after {idle} s of quiet, every 1 s,
    # 2 unanswered ones end the connection.
    option srvtcpka
    srvtcpka-idle {idle}s
    srvtcpka-intvl 1s
    srvtcpka-cnt 2

listen bench
    bind {bind}
{check}    # A failed check (twice, every {inter}) marks the server down and
    # shuts its sessions; unacknowledged data for 3 s ends a connection
    # (tcp-ut on each server line: set on default-server, HAProxy 2.6 took
    # it but a dropped flow's client still hung for 5 s).
    default-server inter {inter} fastinter {inter} downinter {inter} rise 2 fall 2 on-marked-down shutdown-sessions
{servers}",
        idle = secs(plan.probe_interval),
        bind = HAPROXY_ADDR,
        inter = ms(plan.check_interval),
        servers = if plan.by_name() {
            // Resolved once at startup (no `resolvers` section: the lab
            // has no DNS server, only a hosts file), as HAProxy does by
            // default.
            format!("    server db {}:{} check tcp-ut 3s\n", DNS_NAME, plan.primary.port())
        } else {
            format!(
                "    server primary {} check tcp-ut 3s\n    \
                 server secondary {} check backup tcp-ut 3s\n",
                plan.primary, plan.secondary
            )
        },
    )
}

/// A peer proxy running in the lab, and the config it runs with.
pub(crate) struct Peer {
    pub process: LabProcess,
    pub config: String,
}

/// Finds `haproxy` (else names the Debian package), writes its config
/// (or reads the user's), checks it with `haproxy -c` and starts it in
/// `lab`, waiting until it listens on [`HAPROXY_ADDR`].
pub(crate) fn start_haproxy(lab: &Lab, plan: &Plan) -> Result<Peer, BenchError> {
    let program = find_program("haproxy", "haproxy")?;
    let (path, config) = match &plan.haproxy_config {
        Some(path) => {
            let config = std::fs::read_to_string(path).map_err(BenchError::io(format!(
                "cannot read --haproxy-config {}",
                path.display()
            )))?;
            (path.clone(), config)
        }
        None => {
            let config = haproxy_config(plan);
            (lab.write_file("haproxy.cfg", &config)?, config)
        }
    };
    validate_in(lab, &program, &path)?;
    let mut command = Command::new(&program);
    command.arg("-db").arg("-f").arg(&path);
    let process = lab.spawn_as("haproxy", command)?;
    lab.wait_ready(&process, HAPROXY_ADDR, START_TIMEOUT)
        .map_err(|e| {
            BenchError::Setup(format!(
                "HAProxy did not listen on {HAPROXY_ADDR} (its config must bind there): {e}"
            ))
        })?;
    Ok(Peer { process, config })
}

/// PgBouncer's config for `plan`: session mode (a client keeps its server
/// connection, as through pulsegate), in front of the primary only —
/// PgBouncer 1.18 does not fail over between servers, so it is deployed in
/// front of a name or address that a failover moves — with its own
/// keepalive (after `probe_interval` of quiet, every 1 s, 2 probes) and
/// `tcp_user_timeout` (3 s) on both sides, and a 5 s server connect
/// timeout.
pub(crate) fn pgbouncer_config(plan: &Plan, dir: &Path) -> String {
    format!(
        ";; Written by `pulsegate bench failover` for the same goal as pulsegate's
;; settings in this run.
[databases]
postgres = host={host} port={port} dbname=postgres

[pgbouncer]
listen_addr = {listen_host}
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {userlist}
pool_mode = session
max_client_conn = {max_client}
default_pool_size = {pool}
ignore_startup_parameters = extra_float_digits
server_connect_timeout = 5
server_login_retry = 1
tcp_keepalive = 1
tcp_keepidle = {idle}
tcp_keepintvl = 1
tcp_keepcnt = 2
tcp_user_timeout = 3000
stats_period = 3600
",
        host = if plan.by_name() {
            DNS_NAME.to_string()
        } else {
            plan.primary.ip().to_string()
        },
        port = plan.primary.port(),
        listen_host = PGBOUNCER_ADDR.ip(),
        listen_port = PGBOUNCER_ADDR.port(),
        userlist = dir.join("pgbouncer-users.txt").display(),
        max_client = plan.clients * 2 + 100,
        pool = plan.clients + 20,
        idle = plan.probe_interval.as_secs().max(1),
    )
}

/// Finds `pgbouncer` (else names the Debian package), writes its config
/// and user list, and starts it in `lab` — as the `postgres` account when
/// root, since PgBouncer refuses to run as root — waiting until it listens
/// on [`PGBOUNCER_ADDR`].
pub(crate) fn start_pgbouncer(lab: &Lab, plan: &Plan) -> Result<Peer, BenchError> {
    let program = find_program("pgbouncer", "pgbouncer")?;
    lab.write_file("pgbouncer-users.txt", &format!("\"{PG_USER}\" \"\"\n"))?;
    let config = pgbouncer_config(plan, lab.dir());
    let path = lab.write_file("pgbouncer.ini", &config)?;
    let mut command = Command::new("setpriv");
    if super::postgres::is_root() {
        let (uid, gid) = super::postgres::postgres_account().ok_or_else(|| {
            BenchError::Missing(
                "there is no `postgres` account to run PgBouncer as (it refuses root); the \
                 postgresql package creates it"
                    .into(),
            )
        })?;
        command.args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
        ]);
    }
    command.arg("--").arg(&program).arg(&path);
    let process = lab.spawn_as("pgbouncer", command)?;
    lab.wait_ready(&process, PGBOUNCER_ADDR, START_TIMEOUT)
        .map_err(|e| BenchError::Setup(format!("PgBouncer did not start: {e}")))?;
    Ok(Peer { process, config })
}

/// `haproxy -c -f path` inside `lab` (where its names resolve): a config
/// HAProxy refuses is a clear error.
fn validate_in(lab: &Lab, program: &Path, path: &Path) -> Result<(), BenchError> {
    let mut command = Command::new(program);
    command.arg("-c").arg("-f").arg(path);
    lab.run_to_end("haproxy-check", command, START_TIMEOUT)
        .map_err(|e| {
            BenchError::Setup(format!(
                "HAProxy refuses the config {}: {e}",
                path.display()
            ))
        })
}

/// `haproxy -c -f path` here: a config HAProxy refuses is a clear error.
#[cfg(test)]
fn validate(program: &Path, path: &Path) -> Result<(), BenchError> {
    let output = Command::new(program)
        .arg("-c")
        .arg("-f")
        .arg(path)
        .output()
        .map_err(BenchError::io(format!("cannot run {}", program.display())))?;
    if output.status.success() {
        return Ok(());
    }
    Err(BenchError::Setup(format!(
        "HAProxy refuses the config {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(argv: &[&str]) -> Plan {
        Plan::from_args(&super::super::args::parse(argv).unwrap()).unwrap()
    }

    #[test]
    fn the_config_names_both_servers_the_backup_and_the_check() {
        let config = haproxy_config(&plan(&["--via", "pulsegate,haproxy,direct"]));
        assert!(config.contains(&format!("bind {HAPROXY_ADDR}")));
        assert!(config.contains("server primary 10.200.0.2:7001 check tcp-ut 3s\n"));
        assert!(config.contains("server secondary 10.200.0.3:7001 check backup tcp-ut 3s"));
        let named = haproxy_config(&plan(&["--via", "haproxy", "--fault", "dns-move"]));
        assert!(
            named.contains("server db db.pulsegate.lab:7001 check tcp-ut 3s\n"),
            "{named}"
        );
        assert!(config.contains("on-marked-down shutdown-sessions"));
        assert!(config.contains("inter 500ms"));
        let redis = haproxy_config(&plan(&["--workload", "redis", "--fault", "role-flip"]));
        assert!(redis.contains("expect string role:master"));
    }

    #[test]
    fn pgbouncer_sits_in_front_of_the_primary_in_session_mode() {
        let p = plan(&["--workload", "postgres", "--via", "pulsegate,pgbouncer"]);
        let config = pgbouncer_config(&p, Path::new("/lab"));
        assert!(config.contains("postgres = host=10.200.0.2 port=5433 dbname=postgres"));
        assert!(config.contains("pool_mode = session"));
        assert!(config.contains("listen_port = 6434"));
        assert!(config.contains("auth_file = /lab/pgbouncer-users.txt"));
    }

    #[test]
    fn haproxy_accepts_the_configs_it_is_given() {
        let Ok(program) = find_program("haproxy", "haproxy") else {
            eprintln!("skipping: haproxy is not installed (apt-get install haproxy)");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        for argv in [
            &["--via", "haproxy"][..],
            &["--via", "haproxy", "--workload", "redis"],
            &[
                "--via",
                "haproxy",
                "--workload",
                "redis",
                "--fault",
                "role-flip",
            ],
            &["--via", "haproxy", "--workload", "postgres"],
        ] {
            let path = dir.path().join("haproxy.cfg");
            std::fs::write(&path, haproxy_config(&plan(argv))).unwrap();
            validate(&program, &path).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        }
    }
}
