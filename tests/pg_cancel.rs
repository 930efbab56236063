//! PostgreSQL cancel requests through pulsegate reach the server that runs
//! the query: two real PostgreSQL clusters behind `round_robin`, 20
//! sessions each running `SELECT pg_sleep(30)`, each cancelled from a new
//! connection through pulsegate (the driver's own cancel). Every query
//! must end with "canceling statement due to user request" within 1 s.
//! Without cancel routing a cancel lands wherever the round-robin turn
//! points, here always the other server, which ignores it: the query runs
//! on.
//!
//! Needs PostgreSQL (apt-get install postgresql); without it the test
//! prints "skipping: <reason>", and fails under `CI=true`.

mod support;

use std::time::{Duration, Instant};

use pulsegate::lab::servers::postgres::Login;
use support::servers::PgCluster;
use support::{in_process_proxy, listener_toml, or_skip};
use tokio_postgres::error::SqlState;

const USER: &str = "canceller";
const PASSWORD: &str = "c4ncel";
const SESSIONS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_through_round_robin_reach_the_server_running_the_query() {
    let check = format!(
        "[listener.check]\nkind = \"postgres\"\ninterval = \"1s\"\ntimeout = \"3s\"\n\
         user = \"{USER}\"\npassword = \"{PASSWORD}\"\ndatabase = \"postgres\"\n"
    );
    cancels_reach_their_server("pg_check", &check).await;
}

/// The same without a postgres check: `protocol = "postgres"` says what
/// the backends speak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_are_routed_on_a_listener_that_says_it_speaks_postgres() {
    cancels_reach_their_server("pg_protocol", "protocol = \"postgres\"\n").await;
}

/// The scenario, with `listener_settings` added to the listener `name`
/// (before its `[listener.routing]` table).
async fn cancels_reach_their_server(name: &str, listener_settings: &str) {
    let metrics = pulsegate::telemetry::metrics::install().expect("metrics recorder");
    let cancels = |series: &str, route: Option<&str>| {
        let mut labels = vec![("listener", name)];
        labels.extend(route.map(|r| ("route", r)));
        support::admin::sample(&metrics.render(), series, &labels)
    };
    const ROUTED: &str = "pulsegate_postgres_cancel_requests_total";
    const UNREADABLE: &str = "pulsegate_postgres_cancel_keys_unreadable_total";
    let login = Login::Password {
        user: USER,
        password: PASSWORD,
    };
    let Some(a) = or_skip(PgCluster::init_with(login)) else {
        return;
    };
    let b = PgCluster::init_with(login).expect("a second cluster");
    let settings = ["max_connections=40", "shared_buffers=16MB"];
    let server_a = a.start_on_host(&settings).expect("start postgres a");
    let server_b = b.start_on_host(&settings).expect("start postgres b");
    let check = format!("{listener_settings}[listener.routing]\nbalance = \"round_robin\"\n");
    let proxy = in_process_proxy(&listener_toml(
        name,
        &[server_a.addr(), server_b.addr()],
        &check,
    ))
    .await;
    // A PostgreSQL listener shows its cancel series at zero from the start
    // (it starts in the background: wait for it).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = [
            (ROUTED, Some("session_server")),
            (ROUTED, Some("unknown_key")),
            (UNREADABLE, None),
        ]
        .map(|(series, route)| cancels(series, route));
        if seen.iter().all(Option::is_some) {
            assert_eq!(seen, [Some(0.0); 3], "registered, but not at zero");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not registered at zero: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.addr.port())
        .user(USER)
        .password(PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));

    // Every session logs in through pulsegate and starts its long query.
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("log in through pulsegate");
        tokio::spawn(connection);
        let cancel = client.cancel_token();
        let query = tokio::spawn(async move {
            let result = client.simple_query("SELECT pg_sleep(30)").await;
            (result, Instant::now())
        });
        sessions.push((cancel, query));
    }
    // Both servers run some of them (round robin), all of them sleeping.
    // One more client logs in meanwhile: without cancel routing, the
    // round-robin turn would now send every cancel to the other server.
    let (_other, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("another client");
    tokio::spawn(connection);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut slowest = Duration::ZERO;
    let mut not_cancelled = 0;
    for (cancel, query) in sessions {
        let asked = Instant::now();
        cancel
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("send the cancel request through pulsegate");
        match tokio::time::timeout(Duration::from_secs(1), query).await {
            Ok(Ok((Err(e), ended))) => {
                assert_eq!(
                    e.as_db_error().map(|d| d.code().clone()),
                    Some(SqlState::QUERY_CANCELED),
                    "{e}"
                );
                slowest = slowest.max(ended - asked);
            }
            Ok(Ok((Ok(_), _))) => panic!("a 30 s query finished"),
            Ok(Err(e)) => panic!("query task: {e}"),
            Err(_) => not_cancelled += 1,
        }
    }
    eprintln!(
        "{} of {SESSIONS} queries cancelled within 1 s through round_robin (slowest {:.3} s)",
        SESSIONS - not_cancelled,
        slowest.as_secs_f64()
    );
    assert_eq!(not_cancelled, 0, "queries ran on after their cancel");
    assert_eq!(
        cancels(ROUTED, Some("session_server")),
        Some(SESSIONS as f64),
        "every cancel counted as sent to its session's server"
    );
    assert_eq!(cancels(ROUTED, Some("unknown_key")), Some(0.0));
    proxy.shutdown.cancel();
    drop((server_a, server_b, a, b));
}
