//! The admin server over real loopback sockets, against a fake proxy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    request, serve, AdminSettings, AfterDrain, Control, Readiness, ReloadError, ReloadSummary,
    Token,
};

const TOKEN: &str = "s3cret-token";
/// Generous bound for "answered promptly" on a loaded test machine.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A proxy that records what the admin server asked of it.
#[derive(Default)]
struct FakeControl {
    drains: Mutex<Vec<bool>>,
    reloads: AtomicUsize,
    reload_delay: Duration,
    not_ready: bool,
}

impl FakeControl {
    fn drains(&self) -> Vec<bool> {
        self.drains.lock().expect("drains lock").clone()
    }
}

impl Control for FakeControl {
    type Status = serde_json::Value;

    fn metrics(&self) -> String {
        "# TYPE pulsegate_sessions gauge\npulsegate_sessions 3\n".to_owned()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "listeners": [], "generation": 7 })
    }

    fn readiness(&self) -> Readiness {
        if self.not_ready {
            Readiness::NotReady(vec!["no usable backend".to_owned()])
        } else {
            Readiness::Ready
        }
    }

    fn drain(&self, then: AfterDrain) {
        let then_exit = then == AfterDrain::Exit;
        self.drains.lock().expect("drains lock").push(then_exit);
    }

    async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        tokio::time::sleep(self.reload_delay).await;
        self.reloads.fetch_add(1, Ordering::SeqCst);
        Ok(ReloadSummary::default())
    }
}

/// A running server; cancelled when dropped.
struct Harness {
    addr: SocketAddr,
    url: String,
    control: Arc<FakeControl>,
    shutdown: CancellationToken,
    server: Option<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn settings(token: Option<&str>) -> AdminSettings {
    AdminSettings {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        token: token.and_then(Token::new),
        token_protects_metrics: true,
        request_timeout: Duration::from_millis(500),
        max_body_bytes: 1024,
        max_connections: 4,
    }
}

async fn start(settings: AdminSettings, control: FakeControl) -> Harness {
    let listener = TcpListener::bind(settings.bind).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let control = Arc::new(control);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        settings,
        Arc::clone(&control),
        shutdown.clone(),
    ));
    Harness {
        addr,
        url: format!("http://{addr}"),
        control,
        shutdown,
        server: Some(server),
    }
}

impl Harness {
    async fn call(&self, method: Method, path: &str, token: Option<&str>) -> (u16, String) {
        request(&self.url, method, path, token, CLIENT_TIMEOUT)
            .await
            .unwrap_or_else(|error| panic!("{path}: {error}"))
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        self.call(Method::GET, path, token).await
    }

    async fn post(&self, path: &str, token: Option<&str>) -> (u16, String) {
        self.call(Method::POST, path, token).await
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|error| panic!("not JSON ({error}): {body:?}"))
}

/// Sends `bytes` on a fresh connection and returns all the server sent
/// until it closed (a reset ends the read too).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_until_closed(&mut stream).await
}

async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(CLIENT_TIMEOUT, stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "server did not close the connection");
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn metrics_is_prometheus_text() {
    let server = start(settings(None), FakeControl::default()).await;
    let (status, body) = server.get("/metrics", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("pulsegate_sessions 3"), "{body}");

    let response = raw_exchange(
        server.addr,
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert!(
        response.contains("content-type: text/plain; version=0.0.4"),
        "{response}"
    );
}

#[tokio::test]
async fn healthz_says_ok_as_json() {
    let server = start(settings(None), FakeControl::default()).await;
    let (status, body) = server.get("/healthz", None).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body), serde_json::json!({ "status": "ok" }));

    let response = raw_exchange(
        server.addr,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(
        response.contains("content-type: application/json"),
        "{response}"
    );
}

#[tokio::test]
async fn readyz_and_status_pass_the_control_reply_through() {
    let server = start(settings(None), FakeControl::default()).await;
    let (status, body) = server.get("/readyz", None).await;
    assert_eq!((status, json(&body)["ready"].clone()), (200, true.into()));
    let (status, body) = server.get("/status", None).await;
    assert_eq!((status, json(&body)["generation"].clone()), (200, 7.into()));

    let not_ready = FakeControl {
        not_ready: true,
        ..FakeControl::default()
    };
    let server = start(settings(None), not_ready).await;
    let (status, body) = server.get("/readyz", None).await;
    assert_eq!(status, 503);
    assert_eq!(
        json(&body),
        serde_json::json!({ "ready": false, "reasons": ["no usable backend"] })
    );
}

#[tokio::test]
async fn reload_reaches_control() {
    let server = start(settings(None), FakeControl::default()).await;
    let (status, body) = server.post("/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["changed"], serde_json::json!([]));
    assert_eq!(server.control.reloads.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn drain_exits_by_default_and_stays_when_asked() {
    let server = start(settings(None), FakeControl::default()).await;
    let (status, _) = server.post("/drain", None).await;
    assert_eq!(status, 202);
    let (status, body) = server.post("/drain?then=stay", None).await;
    assert_eq!(status, 202);
    assert_eq!(json(&body)["then"], "stay");
    let (status, _) = server.post("/drain?then=exit", None).await;
    assert_eq!(status, 202);
    assert_eq!(server.control.drains(), vec![true, false, true]);

    // A small body is read and ignored.
    let response = raw_exchange(
        server.addr,
        b"POST /drain?then=stay HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    assert_eq!(server.control.drains(), vec![true, false, true, false]);
}

#[tokio::test]
async fn drain_refuses_an_unknown_then_value() {
    let server = start(settings(None), FakeControl::default()).await;
    for path in ["/drain?then=later", "/drain?than=stay"] {
        let (status, body) = server.post(path, None).await;
        assert_eq!(status, 400, "{path}");
        let error = json(&body)["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            error.contains("then=exit") && error.contains("then=stay"),
            "{error}"
        );
    }
    assert!(server.control.drains().is_empty());
}

#[tokio::test]
async fn token_guards_status_drain_reload_and_metrics() {
    let server = start(settings(Some(TOKEN)), FakeControl::default()).await;
    for (method, path) in [
        (Method::GET, "/status"),
        (Method::POST, "/drain"),
        (Method::POST, "/reload"),
        (Method::GET, "/metrics"),
    ] {
        let (status, body) = server.call(method.clone(), path, None).await;
        assert_eq!(status, 401, "{path} without token");
        assert!(json(&body)["error"].is_string());
        let (status, _) = server.call(method.clone(), path, Some("wrong")).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, _) = server.call(method, path, Some(TOKEN)).await;
        assert!(
            (200..300).contains(&status),
            "{path} with the token: {status}"
        );
    }
    assert_eq!(server.control.drains(), vec![true]);
    assert_eq!(server.control.reloads.load(Ordering::SeqCst), 1);

    let response = raw_exchange(
        server.addr,
        b"GET /status HTTP/1.1\r\nHost: a\r\nAuthorization: Basic czNjcmV0\r\nConnection: close\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 401"), "{response}");
    assert!(response.contains("www-authenticate: bearer"), "{response}");
}

#[tokio::test]
async fn probes_stay_open_with_a_token_and_metrics_can_be_open() {
    let mut open_metrics = settings(Some(TOKEN));
    open_metrics.token_protects_metrics = false;
    let server = start(open_metrics, FakeControl::default()).await;
    assert_eq!(server.get("/healthz", None).await.0, 200);
    assert_eq!(server.get("/readyz", None).await.0, 200);
    assert_eq!(server.get("/metrics", None).await.0, 200);
    assert_eq!(server.get("/status", None).await.0, 401);
}

#[tokio::test]
async fn unknown_path_is_404() {
    let server = start(settings(Some(TOKEN)), FakeControl::default()).await;
    let (status, body) = server.get("/nope", Some(TOKEN)).await;
    assert_eq!(status, 404);
    assert!(json(&body)["error"].is_string());
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let server = start(settings(None), FakeControl::default()).await;
    let response = raw_exchange(
        server.addr,
        b"GET /drain HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 405"), "{response}");
    assert!(response.contains("allow: post"), "{response}");

    let (status, _) = server.post("/status", None).await;
    assert_eq!(status, 405);
    assert!(server.control.drains().is_empty());
}

#[tokio::test]
async fn oversized_body_is_413() {
    let server = start(settings(None), FakeControl::default()).await;
    let body = vec![b'a'; 4096];

    let mut declared =
        b"POST /reload HTTP/1.1\r\nHost: a\r\nContent-Length: 4096\r\nConnection: close\r\n\r\n"
            .to_vec();
    declared.extend_from_slice(&body);
    let response = raw_exchange(server.addr, &declared).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");

    let mut chunked =
        b"POST /reload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1000\r\n"
            .to_vec();
    chunked.extend_from_slice(&body);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let response = raw_exchange(server.addr, &chunked).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");

    assert_eq!(server.control.reloads.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn slow_handler_gets_a_json_503() {
    let slow = FakeControl {
        reload_delay: Duration::from_secs(3),
        ..FakeControl::default()
    };
    let server = start(settings(None), slow).await;
    let started = Instant::now();
    let (status, body) = server.post("/reload", None).await;
    assert_eq!(status, 503);
    assert!(json(&body)["error"].is_string());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.control.reloads.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn slowloris_is_cut_off_while_others_are_served() {
    let mut slow_headers = settings(None);
    slow_headers.request_timeout = Duration::from_secs(1);
    slow_headers.max_connections = 2;
    let server = start(slow_headers, FakeControl::default()).await;

    let started = Instant::now();
    let mut slowloris = TcpStream::connect(server.addr).await.expect("connect");
    slowloris
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .expect("write");

    let (status, _) = server.get("/healthz", None).await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "a stalled client delayed another: {:?}",
        started.elapsed()
    );

    let received = read_until_closed(&mut slowloris).await;
    let cut_after = started.elapsed();
    assert!(!received.contains("200 OK"), "{received}");
    assert!(
        cut_after >= Duration::from_millis(800) && cut_after < Duration::from_secs(3),
        "closed after {cut_after:?}"
    );
}

#[tokio::test]
async fn garbage_gets_400_or_a_close_and_the_next_client_is_served() {
    let server = start(settings(None), FakeControl::default()).await;
    let response = raw_exchange(server.addr, b"\x00\x01 nonsense\r\n\r\n").await;
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 400"),
        "{response:?}"
    );
    let response = raw_exchange(server.addr, b"GET /healthz HTTP/9.9\r\n\r\n").await;
    assert!(!response.contains("200 OK"), "{response:?}");
    assert_eq!(server.get("/healthz", None).await.0, 200);
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let server = start(settings(None), FakeControl::default()).await;
    let response = raw_exchange(
        server.addr,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.matches("HTTP/1.1 200").count(), 2, "{response}");
}

#[tokio::test]
async fn connections_beyond_the_limit_and_the_probe_reserve_wait_but_not_forever() {
    let mut small = settings(None);
    small.max_connections = 2;
    small.request_timeout = Duration::from_millis(300);
    let server = start(small, FakeControl::default()).await;

    // Two slots and the probe reserve taken by connections that send nothing.
    let mut idle = Vec::new();
    for _ in 0..2 + super::server::PROBE_RESERVE + 4 {
        idle.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    let started = Instant::now();
    let (status, _) = request(
        &server.url,
        Method::GET,
        "/healthz",
        None,
        Duration::from_secs(10),
    )
    .await
    .expect("served once idle connections time out");
    assert_eq!(status, 200);
    let waited = started.elapsed();
    // The reserve's idle connections are dropped after 250 ms: the request
    // waited for that, and no longer than a few header deadlines.
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(8),
        "waited {waited:?}"
    );
    drop(idle);
}

#[tokio::test]
async fn beyond_the_limit_probes_are_answered_at_once_and_other_routes_get_a_503() {
    let mut small = settings(None);
    small.max_connections = 2;
    let server = start(small, FakeControl::default()).await;
    let _idle = [
        TcpStream::connect(server.addr).await.expect("connect"),
        TcpStream::connect(server.addr).await.expect("connect"),
    ];
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    assert_eq!(server.get("/healthz", None).await.0, 200);
    assert_eq!(server.get("/readyz", None).await.0, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    let (status, body) = server.get("/metrics", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("only /healthz and /readyz"), "{body}");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let mut server = start(settings(None), FakeControl::default()).await;
    assert_eq!(server.get("/healthz", None).await.0, 200);
    let _idle = TcpStream::connect(server.addr).await.expect("connect");

    server.shutdown.cancel();
    let handle = server.server.take().expect("server task");
    tokio::time::timeout(Duration::from_secs(3), handle)
        .await
        .expect("serve returned after shutdown")
        .expect("serve did not panic");
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn client_reports_an_unreachable_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    let error = request(
        &format!("http://{addr}"),
        Method::GET,
        "/healthz",
        None,
        CLIENT_TIMEOUT,
    )
    .await
    .expect_err("nothing listens");
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
}
