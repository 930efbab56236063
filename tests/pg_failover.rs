//! Failover between two real PostgreSQL servers, in a private network
//! namespace: pulsegate (`first_healthy`, postgres checks every 300 ms,
//! fall 2, rise 2) sends `psql` to server A; when A vanishes (its port
//! blackholed both ways, then the postmaster and its backends SIGKILLed) an
//! idle client session to A is reset within the watcher's bound, A is
//! marked down, and a new `psql` reaches B; when A comes back, new
//! connections go to A again after `rise` checks.
//!
//! Needs root (namespaces, iptables, running postgres as the `postgres`
//! account) and PostgreSQL 15 (`postgresql-15` for the server,
//! `postgresql-client-15` for psql); without them the test prints
//! "skipping: <reason>", and fails under `CI=true`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pulsegate::lab::servers::kill_group;
use pulsegate::lab::servers::postgres::USER as PG_USER;
use pulsegate::lab::{Lab, LabProcess};
use support::servers::{json_lines, state_changes, PgCluster};
use support::{connect, exe, lab_or_skip, or_skip, proxy_addr};

const A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5433);
const B: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5434);

/// probe_interval 1 s + max(dead_after 1 s, keepalive_interval 1 s) +
/// sweep 0.5 s, from the README.
const IDLE_BOUND: Duration = Duration::from_millis(2500);

/// A postgres postmaster running in the lab. Drop: fast shutdown, then
/// SIGKILL to its process group, before the cluster's directory goes.
struct LabPostgres {
    process: LabProcess,
}

impl LabPostgres {
    fn start(lab: &Lab, cluster: &PgCluster, addr: SocketAddr, label: &str) -> LabPostgres {
        let command = cluster.postmaster_in_own_session(addr, &["max_connections=30"]);
        let process = lab.spawn_as(label, command).expect("start postgres");
        let server = LabPostgres { process };
        lab.wait_ready(&server.process, addr, support::servers::START_TIMEOUT)
            .unwrap_or_else(|e| panic!("postgres {label} on {addr}: {e}"));
        server
    }

    /// Host crash: SIGKILL to the postmaster and all its backends at once.
    fn crash(&self) {
        kill_group(self.process.pid(), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.process.exit_status().is_none() {
            assert!(Instant::now() < deadline, "postgres survived SIGKILL");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LabPostgres {
    fn drop(&mut self) {
        if self.process.signal(Signal::SIGINT).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.process.exit_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        kill_group(self.process.pid(), Signal::SIGKILL);
        let _ = self.process.kill();
    }
}

/// Runs `psql -XAt -c SQL` against pulsegate inside the lab, bounded: its
/// trimmed stdout, or `Err(stderr)`.
fn psql(lab: &Lab, program: &Path, sql: &str) -> Result<String, String> {
    let mut command = Command::new(program);
    command
        .args(["-XAt", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(proxy_addr().ip().to_string())
        .args(["-p", &proxy_addr().port().to_string(), "-U", PG_USER])
        .args(["-d", "postgres", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5");
    let process = lab.spawn_as("psql", command).expect("start psql");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = process.exit_status() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = process.kill();
            return Err(format!(
                "psql did not finish within 10 s: {}",
                process.stderr()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if status.success() {
        Ok(process.stdout().trim().to_string())
    } else {
        Err(format!("{status}: {}", process.stderr().trim()))
    }
}

/// Repeats `psql select inet_server_port()` until it answers `port` or
/// `within` passes; the time it first did.
fn wait_served_by(lab: &Lab, psql_program: &Path, port: u16, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    let mut last = Err(String::new());
    loop {
        let answer = psql(lab, psql_program, "select inet_server_port()");
        if answer.as_deref() == Ok(port.to_string().as_str()) {
            return Instant::now();
        }
        last = answer.or(last);
        assert!(
            Instant::now() < deadline,
            "no psql through pulsegate reached port {port} within {within:?}; last: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many "backend state changed" events pulsegate logged so far.
fn changes_so_far(proxy: &LabProcess) -> usize {
    state_changes(&json_lines(&proxy.stderr())).len()
}

/// Waits for a "backend state changed" event of `backend` to `to` among
/// the events after the first `since`; the time it was seen.
fn wait_state(
    proxy: &LabProcess,
    since: usize,
    backend: SocketAddr,
    to: &str,
    within: Duration,
) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let changes = state_changes(&json_lines(&proxy.stderr()));
        if changes
            .iter()
            .skip(since)
            .any(|(b, _, t)| *b == backend.to_string() && t == to)
        {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{backend} was not reported {to} within {within:?}; pulsegate's log:\n{}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn config() -> String {
    format!(
        "[[listener]]\n\
         name = \"pg\"\n\
         bind = \"{proxy}\"\n\
         backends = [\"{A}\", \"{B}\"]\n\
         \n\
         [listener.liveness]\n\
         probe_interval = \"1s\"\n\
         dead_after = \"1s\"\n\
         \n\
         [listener.check]\n\
         kind = \"postgres\"\n\
         interval = \"300ms\"\n\
         timeout = \"300ms\"\n\
         jitter = \"0s\"\n\
         fall = 2\n\
         rise = 2\n\
         \n\
         [listener.routing]\n\
         balance = \"first_healthy\"\n",
        proxy = proxy_addr(),
    )
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[test]
fn psql_fails_over_from_a_vanished_postgres_and_back() {
    let Some(lab) = lab_or_skip("pgfail") else {
        return;
    };
    let Some(cluster_a) = or_skip(PgCluster::init()) else {
        return;
    };
    let Some(psql_program) = or_skip(cluster_a.install().client("psql")) else {
        return;
    };
    let cluster_b = PgCluster::init().expect("a second cluster");
    let mut a = Some(LabPostgres::start(&lab, &cluster_a, A, "postgres-a"));
    let _b = LabPostgres::start(&lab, &cluster_b, B, "postgres-b");
    let proxy = lab
        .start_pulsegate_with(&exe(), proxy_addr(), &config())
        .expect("start pulsegate");

    // psql through pulsegate works, and first_healthy picks A.
    let started = Instant::now();
    wait_served_by(&lab, &psql_program, A.port(), Duration::from_secs(10));
    eprintln!(
        "psql through pulsegate reaches A after {}",
        secs(started.elapsed())
    );
    assert_eq!(
        psql(&lab, &psql_program, "select 1").as_deref(),
        Ok("1"),
        "psql -c 'select 1' through pulsegate"
    );

    // An idle pooled session to A: a tokio-postgres client on a socket
    // made in the lab.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let socket = connect(&lab, proxy_addr());
    socket.set_nonblocking(true).unwrap();
    let (client, ended) = runtime.block_on(async {
        let stream = tokio::net::TcpStream::from_std(socket).unwrap();
        let mut pg = tokio_postgres::Config::new();
        pg.user(PG_USER).dbname("postgres");
        let (client, connection) = tokio::time::timeout(
            Duration::from_secs(10),
            pg.connect_raw(stream, tokio_postgres::NoTls),
        )
        .await
        .expect("startup through pulsegate within 10 s")
        .expect("startup through pulsegate");
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let result = connection.await;
            let _ = tx.send((result, Instant::now()));
        });
        let row = tokio::time::timeout(
            Duration::from_secs(10),
            client.query_one("select inet_server_port()", &[]),
        )
        .await
        .expect("query within 10 s")
        .expect("query through pulsegate");
        assert_eq!(
            row.get::<_, i32>(0),
            i32::from(A.port()),
            "the session is on A"
        );
        (client, rx)
    });
    std::thread::sleep(Duration::from_millis(1500)); // both legs go quiet

    // A vanishes: blackholed both ways, then the whole server SIGKILLed.
    let before_fault = changes_so_far(&proxy);
    lab.drop_port(A.port()).expect("DROP A's port");
    let fault = Instant::now();
    a.as_ref().unwrap().crash();

    let (result, reset_at) = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(15), ended).await })
        .expect("the idle session was not reset within 15 s")
        .expect("connection task");
    let detected = reset_at - fault;
    eprintln!(
        "idle session to A ended {} after the fault (bound {}): {result:?}",
        secs(detected),
        secs(IDLE_BOUND)
    );
    let error = result.expect_err("the idle session ends with an error");
    let reset = std::error::Error::source(&error)
        .and_then(|e| e.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    assert_eq!(
        reset,
        Some(std::io::ErrorKind::ConnectionReset),
        "the idle session is reset: {error:?}"
    );
    assert!(detected < Duration::from_secs(4), "{detected:?}");
    assert!(client.is_closed());

    let down_at = wait_state(&proxy, before_fault, A, "down", Duration::from_secs(5));
    eprintln!("A reported down {} after the fault", secs(down_at - fault));
    let on_b = wait_served_by(&lab, &psql_program, B.port(), Duration::from_secs(10));
    eprintln!("new psql reaches B {} after the fault", secs(on_b - fault));
    // Now that A is down, every new connection goes straight to B.
    let direct = Instant::now();
    assert_eq!(
        psql(&lab, &psql_program, "show port").as_deref(),
        Ok(B.port().to_string().as_str())
    );
    eprintln!("psql while A is down takes {}", secs(direct.elapsed()));

    let evictions = support::evictions(&proxy);
    assert_eq!(
        evictions.len(),
        1,
        "one session, one eviction: {evictions:#?}"
    );
    eprintln!(
        "eviction: reason {} dead_leg {}",
        evictions[0].reason, evictions[0].dead_leg
    );

    // A comes back on the same data directory and port.
    drop(a.take());
    let before_restart = changes_so_far(&proxy);
    lab.undrop_port(A.port()).expect("remove the DROP rules");
    let restart = Instant::now();
    let a = LabPostgres::start(&lab, &cluster_a, A, "postgres-a-again");
    let listening = Instant::now();
    eprintln!(
        "A restarted (crash recovery) in {}",
        secs(listening - restart)
    );
    let up_at = wait_state(&proxy, before_restart, A, "up", Duration::from_secs(10));
    let back = wait_served_by(&lab, &psql_program, A.port(), Duration::from_secs(10));
    eprintln!(
        "A reported up {} and new psql reaches A {} after it listens again",
        secs(up_at.saturating_duration_since(listening)),
        secs(back - listening)
    );
    // rise 2 × interval 300 ms, plus check time and scheduling margin.
    assert!(
        back - listening < Duration::from_secs(3),
        "{:?}",
        back - listening
    );
    let changes: Vec<_> = state_changes(&json_lines(&proxy.stderr()))
        .into_iter()
        .filter(|(b, _, _)| *b == A.to_string())
        .collect();
    eprintln!("A's state changes: {changes:?}");
    drop(a);
}
