//! The PROXY protocol through pulsegate, with real servers: MariaDB with
//! `--proxy-protocol-networks` sees the real client (127.0.0.2) in its
//! process list and host-based grants, pool spares included (the header is
//! written at hand-out); HAProxy with `accept-proxy` logs the client's
//! address and port and echoes exact bytes, over v1 and v2; `accept_proxy`
//! takes a load balancer's header, forwards its address, and refuses a bad,
//! missing or late one without an upstream connect; checks send LOCAL.
//! Each case has its contrast (no `send_proxy`: the server sees pulsegate).
//!
//! Needs MariaDB (mariadb-server, mariadb-client) and HAProxy (haproxy) for
//! the real-server tests; without them they print "skipping: <reason>",
//! and fail under `CI=true`.

mod support;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pulsegate::config::ProxyVersion;
use pulsegate::health::check::{check_sending_header, CheckStatus};
use pulsegate::lab::servers::mariadb::MariaDb;
use pulsegate::lab::servers::{find_program, HostServer};
use pulsegate::proxy_header::{self, Header, Parsed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use support::admin::sample;
use support::{in_process_proxy, listener_toml, or_skip};

const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const WAIT: Duration = Duration::from_secs(10);

/// A client socket bound to `source` (any port), connected to `to`.
async fn connect_from(source: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(to).await.expect("connect to pulsegate")
}

/// What a recording backend saw on one connection: the bytes that were
/// there first (a header, if any) and the header parsed.
#[derive(Debug, Clone)]
struct Seen {
    first: Vec<u8>,
    header: Option<Header>,
}

/// A backend that records each connection's first bytes and PROXY header,
/// then echoes what follows the header.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(record_one(stream, record.clone()));
            }
        });
        Recorder { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait_for(&self, count: usize) -> Vec<Seen> {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.seen();
            if seen.len() >= count {
                return seen;
            }
            assert!(Instant::now() < deadline, "backend saw only {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn record_one(mut stream: TcpStream, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut first = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.peek(&mut first))
        .await
        .map_or(Ok(0), |r| r)
        .unwrap_or(0);
    first.truncate(n);
    let header = match proxy_header::parse(&first) {
        Ok(Parsed::Header(header)) => {
            let mut taken = vec![0u8; header.consumed];
            stream.read_exact(&mut taken).await.unwrap();
            Some(header)
        }
        _ => None,
    };
    seen.lock().unwrap().push(Seen { first, header });
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

/// Sends `bytes` and reads the same number back.
async fn echo(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(bytes).await?;
    let mut back = vec![0u8; bytes.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut back))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no echo"))??;
    Ok(back)
}

/// True once the peer has closed (EOF or reset) within `WAIT`.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(WAIT, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn v2_proxy_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    proxy_header::encode(ProxyVersion::V2, Some((source, destination)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_proxy_takes_the_balancers_client_and_send_proxy_forwards_it() {
    let backend = Recorder::start().await;
    let proxy = in_process_proxy(&listener_toml(
        "pp_chain",
        &[backend.addr],
        "accept_proxy = true\nsend_proxy = \"v1\"\n",
    ))
    .await;
    let claimed: SocketAddr = "192.0.2.7:4242".parse().unwrap();
    let balancer_front: SocketAddr = "198.51.100.1:5432".parse().unwrap();
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    // The header and the first bytes in one write: pulsegate must take the
    // header alone off the socket.
    let mut first = v2_proxy_header(claimed, balancer_front);
    first.extend_from_slice(b"hello");
    client.write_all(&first).await.unwrap();
    let mut back = [0u8; 5];
    client.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello");
    assert_eq!(echo(&mut client, b" world").await.unwrap(), b" world");
    let seen = backend.wait_for(1).await;
    assert!(
        seen[0]
            .first
            .starts_with(b"PROXY TCP4 192.0.2.7 198.51.100.1 4242 5432\r\n"),
        "{:?}",
        seen[0].first.escape_ascii().to_string()
    );
    let header = seen[0].header.expect("a header");
    assert_eq!(
        (header.source, header.destination),
        (Some(claimed), Some(balancer_front))
    );

    // A LOCAL header (the balancer's own health check) keeps the socket's
    // addresses: the backend is told the real peer.
    let mut local = TcpStream::connect(proxy.addr).await.unwrap();
    let port = local.local_addr().unwrap().port();
    local
        .write_all(&proxy_header::encode(ProxyVersion::V2, None))
        .await
        .unwrap();
    assert_eq!(echo(&mut local, b"x").await.unwrap(), b"x");
    let seen = backend.wait_for(2).await;
    let expected = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {port} {}\r\n",
        proxy.addr.port()
    );
    assert!(
        seen[1].first.starts_with(expected.as_bytes()),
        "{:?}",
        seen[1].first.escape_ascii().to_string()
    );
    proxy.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_missing_late_and_cut_headers_are_refused_without_an_upstream_connect() {
    let metrics = pulsegate::telemetry::metrics::install().expect("metrics recorder");
    let backend = Recorder::start().await;
    let name = "pp_refused";
    let proxy = in_process_proxy(&listener_toml(
        name,
        &[backend.addr],
        "accept_proxy = true\nproxy_header_timeout = \"500ms\"\n",
    ))
    .await;
    let rejected = |reason: &str| {
        sample(
            &metrics.render(),
            "pulsegate_proxy_header_rejected_total",
            &[("listener", name), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    // Every reason's series is there, at zero, before the first refusal
    // (the listener starts in the background: wait for it).
    let deadline = Instant::now() + WAIT;
    loop {
        let exposition = metrics.render();
        let seen = ["missing", "invalid", "timeout", "closed"].map(|reason| {
            let labels = [("listener", name), ("reason", reason)];
            sample(
                &exposition,
                "pulsegate_proxy_header_rejected_total",
                &labels,
            )
        });
        if seen.iter().all(Option::is_some) {
            assert_eq!(seen, [Some(0.0); 4], "registered, but not at zero");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not registered at zero: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut bad_version = v2_proxy_header(
        "192.0.2.7:4242".parse().unwrap(),
        "198.51.100.1:5432".parse().unwrap(),
    );
    bad_version[12] = 0x11;
    let cases: [(&str, &[u8], bool); 4] = [
        ("invalid", &bad_version, false),
        ("missing", b"GET / HTTP/1.0\r\n\r\n", false),
        ("timeout", b"", false),
        ("closed", b"PROXY TCP4 192.0.2.7", true),
    ];
    for (reason, bytes, hang_up) in cases {
        let before = rejected(reason);
        let started = Instant::now();
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        client.write_all(bytes).await.unwrap();
        if hang_up {
            client.shutdown().await.unwrap();
        }
        assert!(closed(&mut client).await, "{reason}: not closed");
        if reason == "timeout" {
            assert!(started.elapsed() >= Duration::from_millis(450), "{reason}");
        }
        let deadline = Instant::now() + WAIT;
        while rejected(reason) < before + 1.0 {
            assert!(Instant::now() < deadline, "{reason}: not counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());

    // The contrast: a good header does reach the backend.
    let mut good = TcpStream::connect(proxy.addr).await.unwrap();
    good.write_all(b"PROXY UNKNOWN\r\nok").await.unwrap();
    let mut back = [0u8; 2];
    good.read_exact(&mut back).await.unwrap();
    assert_eq!(backend.wait_for(1).await.len(), 1);
    proxy.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_send_a_local_header_when_the_listener_sends_proxy() {
    let check = "[listener.check]\nkind = \"tcp\"\ninterval = \"200ms\"\njitter = \"0s\"\n";
    let cases: [(Option<&str>, &[u8]); 3] = [
        (Some("v2"), b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"),
        (Some("v1"), b"PROXY UNKNOWN\r\n"),
        (None, b""),
    ];
    for (version, expected) in cases {
        let backend = Recorder::start().await;
        let send = version.map_or(String::new(), |v| format!("send_proxy = \"{v}\"\n"));
        let proxy = in_process_proxy(&listener_toml(
            "pp_checks",
            &[backend.addr],
            &format!("{send}{check}"),
        ))
        .await;
        let seen = backend.wait_for(2).await;
        for s in &seen {
            assert_eq!(s.first, expected, "send_proxy = {version:?}: {seen:?}");
        }
        proxy.shutdown.cancel();
    }
}

// ------------------------------------------------------------- MariaDB

async fn read_packet(s: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await?;
    Ok((head[3], payload))
}

async fn write_packet(s: &mut TcpStream, seq: u8, payload: &[u8]) -> io::Result<()> {
    let len = (payload.len() as u32).to_le_bytes();
    s.write_all(&[len[0], len[1], len[2], seq]).await?;
    s.write_all(payload).await
}

/// Logs in as `user` with no password (protocol 41, native password
/// plugin); `Err` holds the server's error message.
async fn mysql_login(s: &mut TcpStream, user: &str) -> Result<(), String> {
    let io = |e: io::Error| e.to_string();
    let (_, greeting) = tokio::time::timeout(WAIT, read_packet(s))
        .await
        .map_err(|_| "no greeting".to_string())?
        .map_err(io)?;
    if greeting.first() != Some(&10) {
        return Err(format!("not a greeting: {}", greeting.escape_ascii()));
    }
    // LONG_PASSWORD | PROTOCOL_41 | SECURE_CONNECTION | PLUGIN_AUTH
    let capabilities: u32 = 0x1 | 0x200 | 0x8000 | 0x8_0000;
    let mut reply = capabilities.to_le_bytes().to_vec();
    reply.extend_from_slice(&(1u32 << 24).to_le_bytes());
    reply.push(0x21);
    reply.extend_from_slice(&[0; 23]);
    reply.extend_from_slice(user.as_bytes());
    reply.extend_from_slice(&[0, 0]);
    reply.extend_from_slice(b"mysql_native_password\0");
    write_packet(s, 1, &reply).await.map_err(io)?;
    loop {
        let (seq, answer) = read_packet(s).await.map_err(io)?;
        match answer.first() {
            Some(0x00) => return Ok(()),
            Some(0xff) => return Err(String::from_utf8_lossy(&answer[3..]).into_owned()),
            // Auth switch: the empty password again, for the asked plugin.
            Some(0xfe) => write_packet(s, seq + 1, &[]).await.map_err(io)?,
            _ => return Err(format!("unexpected: {}", answer.escape_ascii())),
        }
    }
}

/// `SELECT …` through the server's socket as root, one line per row.
fn query(mariadb: &MariaDb, sql: &str) -> Vec<String> {
    let client = find_program("mariadb", "mariadb-client").expect("mariadb client");
    let socket = mariadb.dir.join("data").join("mysqld.sock");
    let out = Command::new(client)
        .args(["--no-defaults", "-u", "root", "-N", "-B"])
        .arg(format!("--socket={}", socket.display()))
        .args(["-e", sql])
        .output()
        .expect("run mariadb");
    assert!(out.status.success(), "{sql}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The hosts MariaDB shows for `user`'s connections.
fn hosts_of(mariadb: &MariaDb, user: &str) -> Vec<String> {
    query(
        mariadb,
        &format!("SELECT host FROM information_schema.processlist WHERE user = '{user}'"),
    )
}

/// The process-list ids of connections that have not logged in yet.
fn unauthenticated(mariadb: &MariaDb) -> Vec<String> {
    query(
        mariadb,
        "SELECT id FROM information_schema.processlist WHERE user = 'unauthenticated user'",
    )
}

fn mysql_listener(name: &str, backend: SocketAddr, more: &str) -> String {
    listener_toml(
        name,
        &[backend],
        &format!(
            "{more}\n[listener.check]\nkind = \"mysql\"\nuser = \"pulsegate_check\"\n\
             interval = \"500ms\"\ntimeout = \"2s\"\n"
        ),
    )
}

/// A client from 127.0.0.2 through `proxy`, and its login as `app`.
async fn app_session(proxy: SocketAddr) -> (TcpStream, Result<(), String>) {
    let mut client = connect_from(CLIENT_IP, proxy).await;
    let login = mysql_login(&mut client, "app").await;
    (client, login)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_sees_the_real_client_through_send_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let init = "CREATE USER IF NOT EXISTS 'pulsegate_check'@'127.0.0.1';\n\
                CREATE USER IF NOT EXISTS 'app'@'127.0.0.2';\n";
    let Some(mut mariadb) = or_skip(MariaDb::install(dir.path(), init)) else {
        return;
    };
    if or_skip(find_program("mariadb", "mariadb-client")).is_none() {
        return;
    }
    mariadb
        .args
        .push("--proxy-protocol-networks=127.0.0.1".into());
    let server = mariadb.start_on_host().expect("start mariadbd");
    let addr = server.addr();

    // The check's own path: a LOCAL / UNKNOWN header, then its login.
    let check_config = pulsegate::config::parse(&mysql_listener("c", addr, ""), "t.toml")
        .unwrap()
        .listeners[0]
        .settings
        .check
        .clone()
        .unwrap();
    for version in [ProxyVersion::V2, ProxyVersion::V1] {
        let outcome = check_sending_header(&check_config, addr, Some(version)).await;
        assert_eq!(outcome.status, CheckStatus::Up, "{version:?}: {outcome:?}");
        assert!(outcome.detail.contains("logged in"), "{outcome:?}");
    }

    for version in ["v2", "v1"] {
        let proxy = in_process_proxy(&mysql_listener(
            &format!("pp_mariadb_{version}"),
            addr,
            &format!("send_proxy = \"{version}\""),
        ))
        .await;
        let (client, login) = app_session(proxy.addr).await;
        login.unwrap_or_else(|e| panic!("send_proxy {version}: app@127.0.0.2 refused: {e}"));
        let port = client.local_addr().unwrap().port();
        assert_eq!(
            hosts_of(&mariadb, "app"),
            [format!("127.0.0.2:{port}")],
            "send_proxy {version}"
        );
        drop(client);
        proxy.shutdown.cancel();
        let _ = proxy.task.await;
        wait_until_gone(&mariadb, "app").await;
    }

    // Pool spares: connected before any client, the header written at
    // hand-out. The session is one of the spares MariaDB saw waiting.
    let proxy = in_process_proxy(&mysql_listener(
        "pp_mariadb_pool",
        addr,
        "send_proxy = \"v2\"\n[listener.pool]\nmin_idle = 2\nmax_idle_age = \"5s\"",
    ))
    .await;
    let spares = wait_spares(&mariadb, 2).await;
    let (client, login) = app_session(proxy.addr).await;
    login.unwrap_or_else(|e| panic!("pooled: app@127.0.0.2 refused: {e}"));
    let port = client.local_addr().unwrap().port();
    let rows = query(
        &mariadb,
        "SELECT id, host FROM information_schema.processlist WHERE user = 'app'",
    );
    let [row] = &rows[..] else { panic!("{rows:?}") };
    let (id, host) = row.split_once('\t').unwrap();
    assert_eq!(host, format!("127.0.0.2:{port}"));
    assert!(
        spares.iter().any(|s| s == id),
        "session {id} is not one of the spares {spares:?}"
    );
    drop(client);
    proxy.shutdown.cancel();
    let _ = proxy.task.await;

    // The contrast: without send_proxy MariaDB sees pulsegate's address,
    // and its grant for 127.0.0.2 does not apply.
    let proxy = in_process_proxy(&mysql_listener("pp_mariadb_off", addr, "")).await;
    let (_client, login) = app_session(proxy.addr).await;
    let refused = login.expect_err("without send_proxy the login must be refused");
    assert!(
        refused.contains("'app'@'127.0.0.1'"),
        "MariaDB should see pulsegate's 127.0.0.1: {refused}"
    );
    proxy.shutdown.cancel();
    drop(server);
}

async fn wait_until_gone(mariadb: &MariaDb, user: &str) {
    let deadline = Instant::now() + WAIT;
    while !hosts_of(mariadb, user).is_empty() {
        assert!(Instant::now() < deadline, "{user} still connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_spares(mariadb: &MariaDb, count: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let ids = unauthenticated(mariadb);
        if ids.len() >= count {
            return ids;
        }
        assert!(Instant::now() < deadline, "spares: {ids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------- HAProxy

/// HAProxy in tcp mode, `accept-proxy` on its bind, in front of `echo`,
/// logging each connection's client address to stdout.
fn start_haproxy(dir: &Path, echo: SocketAddr) -> Option<HostServer> {
    let haproxy = or_skip(find_program("haproxy", "haproxy"))?;
    let config = dir.join("haproxy.cfg");
    let server = HostServer::start("haproxy", dir, |addr| {
        let text = format!(
            "global\n  log stdout format raw local0\n\
             defaults\n  mode tcp\n  log global\n  timeout connect 2s\n\
             timeout client 10s\n  timeout server 10s\n\
             log-format \"client=%ci:%cp frontend=%ft\"\n\
             frontend in\n  bind {addr} accept-proxy\n  default_backend echo\n\
             backend echo\n  server echo {echo}\n"
        );
        std::fs::write(&config, text).expect("write haproxy.cfg");
        let mut command = Command::new(&haproxy);
        command.arg("-db").arg("-f").arg(&config);
        command
    })
    .expect("start haproxy");
    Some(server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_logs_the_real_client_through_send_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let echo_server = Recorder::start().await;
    let Some(haproxy) = start_haproxy(dir.path(), echo_server.addr) else {
        return;
    };
    for version in ["v2", "v1"] {
        let proxy = in_process_proxy(&listener_toml(
            &format!("pp_haproxy_{version}"),
            &[haproxy.addr()],
            &format!("send_proxy = \"{version}\""),
        ))
        .await;
        let mut client = connect_from(CLIENT_IP, proxy.addr).await;
        let port = client.local_addr().unwrap().port();
        let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        assert_eq!(
            echo(&mut client, &payload)
                .await
                .expect("echo through haproxy"),
            payload,
            "send_proxy {version}"
        );
        drop(client);
        let line = format!("client=127.0.0.2:{port} ");
        let deadline = Instant::now() + WAIT;
        while !haproxy.log().contains(&line) {
            assert!(
                Instant::now() < deadline,
                "send_proxy {version}: no `{line}` in haproxy's log:\n{}",
                haproxy.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proxy.shutdown.cancel();
    }

    // The contrast: without a header HAProxy drops the connection.
    let proxy = in_process_proxy(&listener_toml("pp_haproxy_off", &[haproxy.addr()], "")).await;
    let mut client = connect_from(CLIENT_IP, proxy.addr).await;
    assert!(
        echo(&mut client, b"ping").await.is_err(),
        "haproxy answered a connection without a PROXY header"
    );
    proxy.shutdown.cancel();
}
