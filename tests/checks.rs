//! Protocol health checks against real servers: redis-server, PostgreSQL and
//! MariaDB, each started by the test on a free loopback port with its data in
//! a temporary directory (never the system services), and in-test HTTP and
//! TCP servers, including ones that speak the wrong protocol or garbage.
//!
//! A missing server binary prints "skipping: <reason>"; under `CI=true` it
//! fails the test instead.

mod support;

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pulsegate::config::{parse_status_ranges, CheckConfig};
use pulsegate::health::check::{check, CheckOutcome, CheckStatus, Role};
use pulsegate::lab::servers::mariadb::MariaDb;
use pulsegate::lab::servers::postgres::Login;
use pulsegate::lab::servers::redis::Redis;
use pulsegate::lab::servers::HostServer;
use support::or_skip;
use support::servers::{PgCluster, RedisServer};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a server may take to start before the test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// A check's timeout in these tests: roomy for a loaded CI machine.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------- helpers

/// A check config of `kind` with every other setting at its default, as a
/// user would write it.
fn config(kind: &str) -> CheckConfig {
    let mut config: CheckConfig =
        toml::from_str(&format!("kind = \"{kind}\"")).expect("minimal check config");
    config.timeout = CHECK_TIMEOUT;
    config
}

fn assert_status(outcome: &CheckOutcome, status: CheckStatus) {
    assert_eq!(outcome.status, status, "{outcome:?}");
}

/// Runs `config`'s check until it gives `status` or `within` passes.
async fn wait_for(
    config: &CheckConfig,
    addr: SocketAddr,
    status: CheckStatus,
    within: Duration,
) -> CheckOutcome {
    let deadline = Instant::now() + within;
    loop {
        let outcome = check(config, addr).await;
        if outcome.status == status || Instant::now() > deadline {
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn temp_dir() -> TempDir {
    tempfile::tempdir().expect("temp dir")
}

// ------------------------------------------------------------------ redis

/// redis-server on a free port, nothing persisted, `extra` arguments added.
fn start_redis(extra: &[&str]) -> Option<RedisServer> {
    or_skip(RedisServer::start(None, extra))
}

#[tokio::test]
async fn redis_primary_and_replica_report_their_roles() {
    let Some(primary) = start_redis(&[]) else {
        return;
    };
    let Some(replica) = or_skip(RedisServer::start(Some(primary.addr()), &[])) else {
        return;
    };
    let config = config("redis");
    let outcome = check(&config, primary.addr()).await;
    assert_status(&outcome, CheckStatus::Up);
    assert_eq!(outcome.role, Some(Role::Primary), "{outcome:?}");

    let outcome = wait_for(&config, replica.addr(), CheckStatus::Up, START_TIMEOUT).await;
    assert_status(&outcome, CheckStatus::Up);
    assert_eq!(outcome.role, Some(Role::Replica), "{outcome:?}");
}

#[tokio::test]
async fn redis_requirepass_needs_the_right_password() {
    let Some(redis) = start_redis(&["--requirepass", "s3cret"]) else {
        return;
    };
    let mut config = config("redis");
    let missing = check(&config, redis.addr()).await;
    assert_status(&missing, CheckStatus::Down);
    assert!(missing.detail.contains("NOAUTH"), "{missing:?}");

    config.password = Some("wrong".into());
    let wrong = check(&config, redis.addr()).await;
    assert_status(&wrong, CheckStatus::Down);
    assert!(wrong.detail.contains("AUTH refused"), "{wrong:?}");

    config.password = Some("s3cret".into());
    let right = check(&config, redis.addr()).await;
    assert_status(&right, CheckStatus::Up);
    assert_eq!(right.role, Some(Role::Primary));

    // The same password from a file, with the newline editors add.
    let file = tempfile::NamedTempFile::new().expect("password file");
    fs::write(file.path(), "s3cret\n").expect("write password file");
    config.password = None;
    config.password_file = Some(file.path().to_path_buf());
    assert_status(&check(&config, redis.addr()).await, CheckStatus::Up);
}

#[tokio::test]
async fn redis_acl_user_without_role_permission_is_up_without_a_role() {
    let user = ["--user", "pinger", "on", ">pingpw", "+ping", "+auth"];
    let Some(redis) = start_redis(&user) else {
        return;
    };
    let mut config = config("redis");
    config.user = Some("pinger".into());
    config.password_env = Some("PULSEGATE_TEST_REDIS_ACL_PASSWORD".into());
    // Our side cannot run the check: that says nothing about redis.
    let unset = check(&config, redis.addr()).await;
    assert_status(&unset, CheckStatus::Unknown);
    assert!(unset.detail.contains("password_env"), "{unset:?}");

    std::env::set_var("PULSEGATE_TEST_REDIS_ACL_PASSWORD", "pingpw");
    let outcome = check(&config, redis.addr()).await;
    assert_status(&outcome, CheckStatus::Up);
    assert_eq!(outcome.role, None, "{outcome:?}");
    assert!(outcome.detail.contains("NOPERM"), "{outcome:?}");
}

#[tokio::test]
async fn redis_stopped_is_down_within_the_timeout() {
    let Some(redis) = start_redis(&[]) else {
        return;
    };
    let mut config = config("redis");
    config.timeout = Duration::from_millis(500);
    assert_status(&check(&config, redis.addr()).await, CheckStatus::Up);

    redis.signal(Signal::SIGSTOP).expect("SIGSTOP");
    let started = Instant::now();
    let outcome = check(&config, redis.addr()).await;
    let took = started.elapsed();
    assert_status(&outcome, CheckStatus::Down);
    assert!(outcome.detail.contains("timeout"), "{outcome:?}");
    assert!(took < Duration::from_millis(1500), "took {took:?}");

    redis.signal(Signal::SIGCONT).expect("SIGCONT");
    assert_status(&check(&config, redis.addr()).await, CheckStatus::Up);
}

#[tokio::test]
async fn redis_sentinel_is_down_with_a_clear_detail() {
    let Some(redis_server) = or_skip(Redis::find()) else {
        return;
    };
    let dir = temp_dir();
    // Sentinel rewrites its config file, so it must be its own and writable.
    let conf = dir.path().join("sentinel.conf");
    fs::write(&conf, "").expect("write sentinel.conf");
    let sentinel = HostServer::start("sentinel", dir.path(), |addr| {
        let mut command = Command::new(&redis_server);
        command.arg(&conf).arg("--sentinel");
        command.arg("--port").arg(addr.port().to_string());
        command.args(["--bind", "127.0.0.1", "--daemonize", "no", "--logfile", ""]);
        command
    })
    .expect("start redis-sentinel");
    let outcome = check(&config("redis"), sentinel.addr()).await;
    assert_status(&outcome, CheckStatus::Down);
    assert!(outcome.detail.contains("Sentinel"), "{outcome:?}");
}

#[tokio::test]
async fn redis_loading_is_not_ready() {
    let loading = b"-LOADING Redis is loading the dataset in memory\r\n".repeat(2);
    let addr = peer_sending(loading, false).await;
    let outcome = check(&config("redis"), addr).await;
    assert_status(&outcome, CheckStatus::NotReady);
    assert!(outcome.detail.contains("LOADING"), "{outcome:?}");
}

// --------------------------------------------------------------- postgres

const PG_USER: &str = "checker";
const PG_PASSWORD: &str = "pg-s3cret";

/// A PostgreSQL server of the test on a free port, and its cluster in a
/// temporary directory (declared after the server, so it goes after it).
struct Postgres {
    server: HostServer,
    cluster: PgCluster,
}

impl Postgres {
    fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The file that holds the superuser's password.
    fn pwfile(&self) -> PathBuf {
        self.cluster.dir().join("pwfile")
    }
}

/// initdb (md5 host auth, superuser `checker`) and postgres.
fn start_postgres() -> Option<Postgres> {
    start_postgres_as(false)
}

/// With `standby`, the cluster starts in standby mode (`standby.signal`,
/// no primary to follow): a hot standby where `pg_is_in_recovery()` is true.
fn start_postgres_as(standby: bool) -> Option<Postgres> {
    let login = Login::Password {
        user: PG_USER,
        password: PG_PASSWORD,
    };
    let cluster = or_skip(PgCluster::init_with(login))?;
    if standby {
        cluster.make_standby().expect("write standby.signal");
    }
    let mut settings = vec!["shared_buffers=16MB"];
    // A hot standby refuses fewer connections than its primary had
    // (initdb's 100, recorded in pg_control).
    if !standby {
        settings.push("max_connections=20");
    }
    let server = cluster.start_on_host(&settings).expect("start postgres");
    Some(Postgres { server, cluster })
}

fn postgres_login(password: &str) -> CheckConfig {
    let mut config = config("postgres");
    config.user = Some(PG_USER.into());
    config.password = Some(password.into());
    config.database = Some("postgres".into());
    config
}

#[tokio::test]
async fn postgres_sslrequest_and_login() {
    let Some(pg) = start_postgres() else {
        return;
    };
    let login = postgres_login(PG_PASSWORD);
    let ready = wait_for(&login, pg.addr(), CheckStatus::Up, START_TIMEOUT).await;
    assert_status(&ready, CheckStatus::Up);
    assert_eq!(ready.role, Some(Role::Primary), "{ready:?}");

    let ssl = check(&config("postgres"), pg.addr()).await;
    assert_status(&ssl, CheckStatus::Up);
    assert!(ssl.detail.contains('N'), "{ssl:?}");

    let wrong = check(&postgres_login("not-the-password"), pg.addr()).await;
    assert_status(&wrong, CheckStatus::Down);
    assert!(
        wrong.detail.contains("password authentication failed"),
        "{wrong:?}"
    );

    // database defaults to the user's name, which does not exist here.
    let mut no_db = postgres_login(PG_PASSWORD);
    no_db.database = None;
    let no_db = check(&no_db, pg.addr()).await;
    assert_status(&no_db, CheckStatus::Down);
    assert!(
        no_db.detail.contains("\"checker\" does not exist"),
        "{no_db:?}"
    );

    let mut from_file = postgres_login("");
    from_file.password = None;
    from_file.password_file = Some(pg.pwfile());
    assert_status(&check(&from_file, pg.addr()).await, CheckStatus::Up);

    // initdb with md5 host auth stores the superuser's password as md5; a
    // role whose password is stored as SCRAM logs in with SCRAM.
    let admin = format!(
        "host=127.0.0.1 port={} user={PG_USER} password={PG_PASSWORD} dbname=postgres",
        pg.addr().port()
    );
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("admin login");
    tokio::spawn(connection);
    client
        .batch_execute(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE scramuser LOGIN PASSWORD 'scram-pass'",
        )
        .await
        .expect("create a SCRAM role");
    let stored: Vec<(String, String)> = client
        .query(
            "SELECT rolname::text, left(rolpassword, 6) FROM pg_authid \
             WHERE rolname IN ($1, 'scramuser') ORDER BY 1",
            &[&PG_USER],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    // Both methods are in play: the checks above logged in with md5.
    assert!(stored[0].1.starts_with("md5"), "{stored:?}");
    assert!(stored[1].1.starts_with("SCRAM-"), "{stored:?}");
    let mut scram = postgres_login("scram-pass");
    scram.user = Some("scramuser".into());
    let outcome = check(&scram, pg.addr()).await;
    assert_status(&outcome, CheckStatus::Up);
    assert_eq!(outcome.role, Some(Role::Primary), "{outcome:?}");
    scram.password = Some("wrong".into());
    assert_status(&check(&scram, pg.addr()).await, CheckStatus::Down);
}

#[tokio::test]
async fn postgres_standby_reports_the_replica_role() {
    let Some(pg) = start_postgres_as(true) else {
        return;
    };
    let login = postgres_login(PG_PASSWORD);
    let ready = wait_for(&login, pg.addr(), CheckStatus::Up, START_TIMEOUT).await;
    assert_status(&ready, CheckStatus::Up);
    assert_eq!(ready.role, Some(Role::Replica), "{ready:?}");
}

// ------------------------------------------------------------------ mysql

/// A MariaDB server of the test, and its temporary directory.
struct MariaDbServer {
    server: HostServer,
    mariadb: MariaDb,
    _dir: TempDir,
}

/// A MariaDB server running `init_sql` at start (one statement per line),
/// or `None` (skipped) when MariaDB is not installed.
fn start_mariadb(init_sql: &str) -> Option<MariaDbServer> {
    let dir = temp_dir();
    let mariadb = or_skip(MariaDb::install(dir.path(), init_sql))?;
    let server = mariadb.start_on_host().expect("start mariadbd");
    Some(MariaDbServer {
        server,
        mariadb,
        _dir: dir,
    })
}

fn mysql_user(user: &str) -> CheckConfig {
    let mut config = config("mysql");
    config.user = Some(user.into());
    config
}

fn aborted_connections(server: &HostServer) -> usize {
    server.log().matches("Aborted connection").count()
}

#[tokio::test]
async fn mysql_greeting_and_login_against_mariadb() {
    let Some(mariadb) = start_mariadb(
        "CREATE USER 'pulsegate_check'@'127.0.0.1';\n\
         CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'app-pw';\n",
    ) else {
        return;
    };
    let server = &mariadb.server;
    let greeting = wait_for(
        &config("mysql"),
        server.addr(),
        CheckStatus::Up,
        START_TIMEOUT,
    )
    .await;
    assert_status(&greeting, CheckStatus::Up);
    assert!(greeting.detail.contains("MariaDB"), "{greeting:?}");

    // A login that ends in COM_QUIT leaves nothing in the server's log (a
    // greeting-only check logs an aborted connection every time).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let aborted = aborted_connections(server);
    for _ in 0..3 {
        let login = check(&mysql_user("pulsegate_check"), server.addr()).await;
        assert_status(&login, CheckStatus::Up);
        assert!(
            login.detail.contains("logged in as pulsegate_check"),
            "{login:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(aborted_connections(server), aborted, "{}", server.log());

    for user in ["app", "nosuchuser"] {
        let refused = check(&mysql_user(user), server.addr()).await;
        assert_status(&refused, CheckStatus::Down);
        assert!(refused.detail.contains("error 1045"), "{refused:?}");
    }
}

#[tokio::test]
async fn mysql_login_with_a_password_reports_the_role_from_read_only() {
    let Some(db) = start_mariadb(
        "CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'app-pw';\n\
         CREATE USER 'ops'@'127.0.0.1' IDENTIFIED VIA mysql_native_password USING PASSWORD('s3cret');\n",
    ) else {
        return;
    };
    let server = &db.server;
    let mut app = mysql_user("app");
    app.password = Some("app-pw".into());
    let primary = wait_for(&app, server.addr(), CheckStatus::Up, START_TIMEOUT).await;
    assert_status(&primary, CheckStatus::Up);
    assert_eq!(primary.role, Some(Role::Primary), "{primary:?}");
    assert!(primary.detail.contains("read_only=0"), "{primary:?}");

    let mut wrong = mysql_user("ops");
    wrong.password = Some("not-it".into());
    let refused = check(&wrong, server.addr()).await;
    assert_status(&refused, CheckStatus::Down);
    assert!(refused.detail.contains("error 1045"), "{refused:?}");
    assert!(
        refused.detail.contains("using password: YES"),
        "{refused:?}"
    );

    // Fenced: a primary made read-only takes no writes, so it is no primary.
    db.mariadb
        .sql("SET GLOBAL read_only = 1")
        .expect("set read_only");
    let fenced = check(&app, server.addr()).await;
    assert_status(&fenced, CheckStatus::Up);
    assert_eq!(fenced.role, Some(Role::Replica), "{fenced:?}");
    assert!(fenced.detail.contains("read_only=1"), "{fenced:?}");
    db.mariadb
        .sql("SET GLOBAL read_only = 0")
        .expect("clear read_only");
    let again = check(&app, server.addr()).await;
    assert_eq!(again.role, Some(Role::Primary), "{again:?}");

    // A password from a file, as a deployment keeps it.
    let dir = temp_dir();
    let file = dir.path().join("pw");
    fs::write(&file, "s3cret\n").expect("write password file");
    let mut from_file = mysql_user("ops");
    from_file.password_file = Some(file);
    let outcome = check(&from_file, server.addr()).await;
    assert_status(&outcome, CheckStatus::Up);
    assert_eq!(outcome.role, Some(Role::Primary), "{outcome:?}");
}

#[tokio::test]
async fn mysql_refusal_of_mariadb_is_down_with_its_error() {
    // Only a user at another host: 127.0.0.1 gets ERR 1130 instead of a greeting.
    let Some(mariadb) = start_mariadb(
        "DELETE FROM mysql.global_priv;\nDELETE FROM mysql.proxies_priv;\n\
         FLUSH PRIVILEGES;\nCREATE USER 'app'@'192.0.2.1';\n",
    ) else {
        return;
    };
    let server = &mariadb.server;
    let deadline = Instant::now() + START_TIMEOUT;
    let outcome = loop {
        let outcome = check(&config("mysql"), server.addr()).await;
        if outcome.detail.contains("refused") || Instant::now() > deadline {
            break outcome;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_status(&outcome, CheckStatus::Down);
    assert!(outcome.detail.contains("error 1130"), "{outcome:?}");
    assert!(
        outcome.detail.contains("not allowed to connect"),
        "{outcome:?}"
    );
}

// ------------------------------------------------------------------- http

/// An HTTP/1.1 server answering every request with `status`; it returns
/// its address and the request heads it received.
async fn http_server(status: u16) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (heads, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                match stream.read(&mut byte).await {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
            let answer = format!(
                "HTTP/1.1 {status} Whatever\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    (addr, received)
}

#[tokio::test]
async fn http_status_decides() {
    let (ok, mut heads) = http_server(200).await;
    let mut config = config("http");
    config.path = "/healthz?full=1".into();
    assert_status(&check(&config, ok).await, CheckStatus::Up);
    let head = heads.recv().await.expect("a request");
    assert!(
        head.starts_with("GET /healthz?full=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("host: {ok}\r\n")),
        "{head}"
    );

    config.host = Some("api.internal".into());
    assert_status(&check(&config, ok).await, CheckStatus::Up);
    let head = heads.recv().await.expect("a request");
    assert!(
        head.to_ascii_lowercase().contains("host: api.internal\r\n"),
        "{head}"
    );

    let (unavailable, _) = http_server(503).await;
    let down = check(&config, unavailable).await;
    assert_status(&down, CheckStatus::Down);
    assert!(down.detail.contains("503"), "{down:?}");

    let (found, _) = http_server(302).await;
    config.expect_status = "200,204,300-302".into();
    assert_status(&check(&config, found).await, CheckStatus::Up);
    config.expect_status = "200".into();
    assert_status(&check(&config, found).await, CheckStatus::Down);
}

#[tokio::test]
async fn http_bad_expect_status_is_refused() {
    for bad in ["", "2xx", "200-", "399-200", "200,,204", "42", "200;204"] {
        assert!(parse_status_ranges(bad).is_err(), "{bad:?} was accepted");
    }
    let (ok, _) = http_server(200).await;
    let mut config = config("http");
    config.expect_status = "2xx".into();
    let outcome = check(&config, ok).await;
    assert_status(&outcome, CheckStatus::Down);
    assert!(outcome.detail.contains("`2xx`"), "{outcome:?}");
}

// -------------------------------------------- tcp, wrong peers, garbage

#[tokio::test]
async fn tcp_up_when_listening_down_when_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    assert_status(&check(&config("tcp"), addr).await, CheckStatus::Up);
    drop(listener);
    for kind in ["tcp", "postgres", "mysql", "redis", "http"] {
        let outcome = check(&config(kind), addr).await;
        assert_status(&outcome, CheckStatus::Down);
        assert!(outcome.detail.contains("connect"), "{kind}: {outcome:?}");
    }
}

/// A server that sends `bytes` to every connection, then reads and
/// discards until the peer closes (or closes at once if `close`).
async fn peer_sending(bytes: Vec<u8>, close: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(&bytes).await;
                if close {
                    return;
                }
                let mut sink = [0u8; 1024];
                while let Ok(1..) = stream.read(&mut sink).await {}
            });
        }
    });
    addr
}

#[tokio::test]
async fn wrong_protocols_and_garbage_are_down_never_a_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut payloads: Vec<Vec<u8>> = vec![
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n".to_vec(),
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec(),
        b"-ERR unknown command\r\n".to_vec(),
        b"*3\r\n$6\r\nmaster\r\n".to_vec(), // cut short, then closed
        b"$99999999\r\n".to_vec(),
        b"\xff\xff\xff\x00garbage".to_vec(),
        b"E\x00\x00\x00\x08".to_vec(),
        vec![],
    ];
    for _ in 0..6 {
        let len = rng.random_range(1..300);
        payloads.push((0..len).map(|_| rng.random()).collect());
    }
    let mut postgres_login = config("postgres");
    postgres_login.user = Some("app".into());
    postgres_login.password = Some("pw".into());
    let mut redis_auth = config("redis");
    redis_auth.password = Some("pw".into());
    let configs = [
        config("postgres"),
        postgres_login,
        config("mysql"),
        config("redis"),
        redis_auth,
        config("http"),
    ];
    for mut config in configs {
        config.timeout = Duration::from_millis(700);
        for payload in &payloads {
            let addr = peer_sending(payload.clone(), true).await;
            let outcome = check(&config, addr).await;
            assert_status(&outcome, CheckStatus::Down);
            assert!(
                outcome.latency < Duration::from_millis(1500),
                "{:?} {payload:?}: {outcome:?}",
                config.kind
            );
        }
    }
}

#[tokio::test]
async fn a_silent_peer_is_down_at_the_timeout() {
    let addr = peer_sending(Vec::new(), false).await;
    for kind in ["postgres", "mysql", "redis", "http"] {
        let mut config = config(kind);
        config.timeout = Duration::from_millis(300);
        let started = Instant::now();
        let outcome = check(&config, addr).await;
        assert_status(&outcome, CheckStatus::Down);
        assert!(outcome.detail.contains("timeout"), "{kind}: {outcome:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "{kind}: {outcome:?}"
        );
    }
}

#[tokio::test]
async fn a_foreign_banner_is_named_in_the_detail() {
    // A plain-text banner is named in the detail, so a misconfigured kind is
    // obvious from /status.
    let addr = peer_sending(b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(), false).await;
    for kind in ["postgres", "mysql", "redis"] {
        let outcome = check(&config(kind), addr).await;
        assert_status(&outcome, CheckStatus::Down);
        assert!(outcome.detail.contains("SSH-2.0"), "{kind}: {outcome:?}");
    }
}

/// A primary fenced read-only (`default_transaction_read_only = on`, as a
/// failover tool fences the old writer before it promotes a replica) takes
/// no writes: the check reports it as a replica, so `role = "primary"`
/// stops sending writes to it; unfenced, it is the primary again.
#[tokio::test]
async fn postgres_fenced_primary_reports_the_replica_role() {
    let Some(pg) = start_postgres() else {
        return;
    };
    let login = postgres_login(PG_PASSWORD);
    let ready = wait_for(&login, pg.addr(), CheckStatus::Up, START_TIMEOUT).await;
    assert_eq!(ready.role, Some(Role::Primary), "{ready:?}");
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(pg.addr().port())
        .user(PG_USER)
        .password(PG_PASSWORD)
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("log in as the superuser");
    let driver = tokio::spawn(connection);
    let fence = |on: bool| {
        format!(
            "ALTER SYSTEM SET default_transaction_read_only = {}",
            if on { "on" } else { "off" }
        )
    };
    for (on, role) in [(true, Role::Replica), (false, Role::Primary)] {
        client.simple_query(&fence(on)).await.expect("ALTER SYSTEM");
        client
            .simple_query("SELECT pg_reload_conf()")
            .await
            .expect("reload");
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = loop {
            let outcome = check(&login, pg.addr()).await;
            if outcome.role == Some(role) || Instant::now() > deadline {
                break outcome;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_status(&outcome, CheckStatus::Up);
        assert_eq!(outcome.role, Some(role), "fenced {on}: {outcome:?}");
    }
    driver.abort();
}

/// With `role = "primary"`, a write answered "read-only" on its way
/// through pulsegate has the backend checked at once, not at the next
/// interval: here the interval is 4 s, and the fenced primary's sessions
/// are evicted (it lost the wanted role) well within 1.5 s of the first
/// read-only reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_reply_through_pulsegate_has_the_primary_checked_at_once() {
    let Some(pg) = start_postgres() else {
        return;
    };
    let login = postgres_login(PG_PASSWORD);
    wait_for(&login, pg.addr(), CheckStatus::Up, START_TIMEOUT).await;
    let text = format!(
        "[[listener]]\nname = \"pg\"\nbind = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n\
         [listener.check]\nkind = \"postgres\"\ninterval = \"4s\"\ntimeout = \"3s\"\njitter = \"0s\"\n\
         user = \"{PG_USER}\"\npassword = \"{PG_PASSWORD}\"\ndatabase = \"postgres\"\n\
         [listener.routing]\nrole = \"primary\"\ndown_grace = \"200ms\"\n",
        pg.addr()
    );
    let support::InProcessProxy {
        addr: proxy,
        shutdown: stop,
        ..
    } = support::in_process_proxy(&text).await;
    let started = Instant::now();
    let config = |port: u16| {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user(PG_USER)
            .password(PG_PASSWORD)
            .dbname("postgres");
        config
    };
    let (admin, connection) = config(pg.addr().port())
        .connect(tokio_postgres::NoTls)
        .await
        .expect("log in directly");
    tokio::spawn(connection);
    // Clients are refused until the first check has told the role.
    let (client, connection) = loop {
        match config(proxy.port()).connect(tokio_postgres::NoTls).await {
            Ok(pair) => break pair,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(3),
                "log in through pulsegate: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let session = tokio::spawn(connection);
    client
        .simple_query("CREATE TABLE t (x int)")
        .await
        .expect("a write through pulsegate before the fence");

    // Past the first check's quarter interval: a hint is acted on at once.
    tokio::time::sleep_until((started + Duration::from_millis(1100)).into()).await;
    admin
        .simple_query("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .expect("fence");
    admin
        .simple_query("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    // The reload reaches the session's backend process within moments.
    let refused = loop {
        match client.simple_query("INSERT INTO t VALUES (1)").await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => break e,
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the fence never applied"
        );
    };
    let answered = Instant::now();
    let code = refused.as_db_error().map(|e| e.code().clone());
    assert_eq!(
        code,
        Some(tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{refused}"
    );
    // The check runs now, sees the fence, and the session is evicted: at
    // once, or after the 200 ms grace if the client had not yet ACKed the
    // reply (a delayed ACK makes a session look busy).
    let ended = tokio::time::timeout(Duration::from_secs(3), session).await;
    let after = answered.elapsed();
    assert!(
        ended.is_ok(),
        "the session to the fenced primary was not evicted within 3 s"
    );
    eprintln!(
        "session to the fenced primary evicted {:.2} s after the read-only reply (check interval 4 s)",
        after.as_secs_f64()
    );
    assert!(after < Duration::from_millis(1500), "{after:?}");
    stop.cancel();
}
