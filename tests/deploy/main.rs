//! `deploy/` as an operator uses it: the Kubernetes manifests validate
//! against the API schemas, the configs they embed pass `pulsegate check`,
//! grace periods outlast the drain, the systemd unit is hardened and
//! verifies, the commands the image and the pods exec work, and every metric
//! the Grafana dashboard queries is one that a running proxy exports.

mod dashboard;
mod hooks;
mod kubernetes;
#[path = "../support/mod.rs"]
mod support;
mod systemd;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::admin;
use support::servers::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_pulsegate");
/// Where the image and the systemd unit install the binary.
const INSTALLED_BIN: &str = "/usr/local/bin/pulsegate";
/// The oldest Kubernetes the manifests promise to work with. They are also
/// validated against the newest schemas the validator bundles.
const OLDEST_KUBERNETES: &str = "1.30.0";
const VALIDATOR_INSTALL: &str = "python3 -m pip install kubernetes-validate==1.37.0";

/// The metrics the admin server exports (the dashboard's contract).
const EXPORTED_METRICS: &[&str] = &[
    "pulsegate_build_info",
    "pulsegate_config_generation",
    "pulsegate_config_reloads_total",
    "pulsegate_connections_accepted_total",
    "pulsegate_connections_active",
    "pulsegate_connections_refused_total",
    "pulsegate_session_duration_seconds",
    "pulsegate_bytes_total",
    "pulsegate_upstream_connect_duration_seconds",
    "pulsegate_upstream_connect_failures_total",
    "pulsegate_evictions_total",
    "pulsegate_detection_duration_seconds",
    "pulsegate_checks_total",
    "pulsegate_check_duration_seconds",
    "pulsegate_backend_state",
    "pulsegate_backend_role",
    "pulsegate_backend_active_connections",
    "pulsegate_pool_idle_connections",
    "pulsegate_probes_sent_total",
    "pulsegate_probes_unanswered_total",
    "pulsegate_suspicions_total",
    "pulsegate_verdict_corroboration_seconds",
    "pulsegate_corroboration_connects_total",
    "pulsegate_backend_link_loss_ratio",
    "pulsegate_backend_verdict_exchanges",
];

// ---------------------------------------------------------------- Kubernetes

// ---------------------------------------------------- a live proxy to test

/// `pulsegate run` with an admin server and two listeners: `echo` (a tcp
/// check, a warm pool) and `unreachable` (its backend refuses).
struct Proxy {
    child: Child,
    admin: SocketAddr,
    listen: SocketAddr,
    unreachable: SocketAddr,
    token: String,
    dir: tempfile::TempDir,
}

impl Proxy {
    fn start() -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let echo = support::echo_backend();
        let (admin, listen, unreachable, closed) =
            (free_port(), free_port(), free_port(), free_port());
        let config = format!(
            r#"[admin]
bind = "127.0.0.1:{admin}"
token_env = "PULSEGATE_DEPLOY_TEST_TOKEN"
token_protects_metrics = false

[[listener]]
name = "echo"
bind = "127.0.0.1:{listen}"
backends = ["{echo}"]
drain_timeout = "2s"

[listener.liveness]
probe_interval = "1s"
dead_after = "1s"

[listener.check]
kind = "tcp"
interval = "200ms"
timeout = "150ms"
jitter = "20ms"
rise = 1
fall = 1

[listener.pool]
min_idle = 1

[[listener]]
name = "unreachable"
bind = "127.0.0.1:{unreachable}"
backends = ["127.0.0.1:{closed}"]
connect_timeout = "200ms"
drain_timeout = "1s"
readiness = "always"
"#
        );
        let config_path = dir.path().join("pulsegate.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let token = format!("deploy-test-{}", std::process::id());
        let child = Command::new(BIN)
            .args(["--log-format", "json", "run", "-c"])
            .arg(&config_path)
            .env("PULSEGATE_DEPLOY_TEST_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut proxy = Proxy {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            listen: SocketAddr::from(([127, 0, 0, 1], listen)),
            unreachable: SocketAddr::from(([127, 0, 0, 1], unreachable)),
            token,
            dir,
        };
        proxy.wait_healthy();
        proxy
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("pulsegate exited {status} at start:\n{}", self.log());
            }
            if admin::request(self.admin, "GET", "/healthz", Some(&self.token), b"")
                .is_ok_and(|r| r.status == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the admin server did not answer GET /healthz with 200 within 10 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path)
    }

    fn request(&self, method: &str, path: &str) -> (u16, String) {
        admin::request(self.admin, method, path, Some(&self.token), b"")
            .map(|r| (r.status, r.body))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()))
    }

    fn log(&self) -> String {
        read(&self.dir.path().join("log"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn echo_once(stream: &mut TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"ping").unwrap();
    let mut answer = [0u8; 4];
    stream
        .read_exact(&mut answer)
        .expect("the echo through pulsegate");
    assert_eq!(&answer, b"ping");
}

// ------------------------------------------------------------------ helpers

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn kubernetes_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in deploy/kubernetes");
    files
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
