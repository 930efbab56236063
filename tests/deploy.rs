//! `deploy/` as an operator uses it: the Kubernetes manifests validate
//! against the API schemas, the configs they embed pass `pulsegate check`,
//! grace periods outlast the drain, the systemd unit is hardened and
//! verifies, the commands the image and the pods exec work, and every metric
//! the Grafana dashboard queries is one that a running proxy exports.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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
];

// ---------------------------------------------------------------- Kubernetes

#[test]
fn kubernetes_manifests_validate_strictly() {
    let Some(validator) = validator_or_skip() else {
        return;
    };
    let files = kubernetes_files();
    let names: Vec<_> = files.iter().map(|f| file_name(f)).collect();
    assert!(
        names.contains(&"sidecar.yaml".to_string()) && names.contains(&"drop-in.yaml".to_string()),
        "deploy/kubernetes should hold sidecar.yaml and drop-in.yaml, has {names:?}"
    );
    for file in &files {
        for version in [Some(OLDEST_KUBERNETES), None] {
            if let Err(e) = validator.check(file, version) {
                panic!("{}: {e}", file.display());
            }
        }
    }
    let drop_in = read(&deploy_dir().join("kubernetes/drop-in.yaml"));
    for kind in ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"] {
        assert!(
            document_kinds(&drop_in).contains(&kind.to_string()),
            "drop-in.yaml has no {kind}"
        );
    }
}

/// The validator and our reading of its output must refuse bad manifests,
/// or the test above could pass without checking anything.
#[test]
fn kubernetes_validation_rejects_broken_manifests() {
    let Some(validator) = validator_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  \
                      replicas: 2\n  selector:\n    matchLabels: {app: x}\n  template:\n    \
                      metadata:\n      labels: {app: x}\n    spec:\n      containers:\n        \
                      - name: x\n          image: x\n";
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, deployment).unwrap();
    validator
        .check(&good, Some(OLDEST_KUBERNETES))
        .expect("the well-formed control manifest should pass");
    let broken = [
        (
            "wrong type",
            deployment.replace("replicas: 2", "replicas: \"two\""),
        ),
        (
            "unknown field",
            deployment.replace("replicas: 2", "replicas: 2\n  replica: 3"),
        ),
        (
            "removed API version",
            "apiVersion: policy/v1beta1\nkind: PodDisruptionBudget\nmetadata:\n  name: x\n\
             spec:\n  minAvailable: 1\n"
                .to_string(),
        ),
    ];
    for (what, text) in broken {
        let file = dir.path().join("broken.yaml");
        std::fs::write(&file, text).unwrap();
        assert!(
            validator.check(&file, Some(OLDEST_KUBERNETES)).is_err(),
            "a manifest with a {what} passed validation"
        );
    }
}

/// How to run kubernetes-validate: its script, or its module.
struct Validator {
    program: PathBuf,
    prefix: Vec<&'static str>,
}

impl Validator {
    fn find() -> Option<Validator> {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        if let Some(home) = std::env::var_os("HOME") {
            dirs.push(Path::new(&home).join(".local/bin"));
        }
        let script = dirs
            .iter()
            .map(|d| d.join("kubernetes-validate"))
            .map(|program| Validator {
                program,
                prefix: vec![],
            });
        let module = Validator {
            program: "python3".into(),
            prefix: vec!["-m", "kubernetes_validate"],
        };
        script.chain(std::iter::once(module)).find(|v| {
            v.command()
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.prefix);
        c
    }

    /// Validates every document of `file` in strict mode (unknown fields are
    /// errors). A warning fails too: the validator only warns, and exits 0,
    /// for a kind or API version it has no schema for, e.g. a removed one.
    /// Every document must be reported as passed.
    fn check(&self, file: &Path, version: Option<&str>) -> Result<(), String> {
        let mut c = self.command();
        c.arg("--strict");
        if let Some(v) = version {
            c.args(["-k", v]);
        }
        let out = c.arg(file).output().expect("run kubernetes-validate");
        let text = output_text(&out);
        let passed = text
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        let documents = document_kinds(&read(file)).len();
        let complaint = text
            .lines()
            .any(|l| l.starts_with("WARN") || l.starts_with("ERROR"));
        if !out.status.success() || complaint || passed != documents || documents == 0 {
            return Err(format!(
                "kubernetes-validate (k8s {}) {}: {passed} of {documents} documents passed:\n{text}",
                version.unwrap_or("newest"),
                out.status
            ));
        }
        Ok(())
    }
}

/// The validator, or `None` after a skip message; in CI its absence fails.
fn validator_or_skip() -> Option<Validator> {
    let found = Validator::find();
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("kubernetes-validate not found on PATH or in ~/.local/bin; install it: {VALIDATOR_INSTALL}");
        }
        eprintln!("skipped: kubernetes-validate not found; install it: {VALIDATOR_INSTALL}");
    }
    found
}

/// The `kind:` of every document in a multi-document YAML file.
fn document_kinds(yaml: &str) -> Vec<String> {
    yaml.split("\n---")
        .filter_map(|doc| {
            doc.lines()
                .find_map(|l| l.strip_prefix("kind:").map(|k| k.trim().to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------- configs

#[test]
fn shipped_configs_pass_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut configs = vec![];
    for file in kubernetes_files() {
        let embedded = embedded_tomls(&read(&file));
        assert!(
            !embedded.is_empty(),
            "{} has no `pulsegate.toml: |` in a ConfigMap",
            file.display()
        );
        configs.extend(embedded.into_iter().map(|t| (file_name(&file), t)));
    }
    let systemd = deploy_dir().join("systemd/pulsegate.toml");
    configs.push(("systemd/pulsegate.toml".into(), read(&systemd)));
    for (i, (origin, toml)) in configs.iter().enumerate() {
        assert!(
            toml.contains("[[listener]]") && toml.contains("[admin]"),
            "the config from {origin} lacks [[listener]] or [admin]:\n{toml}"
        );
        let path = dir.path().join(format!("config-{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(BIN)
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`pulsegate check` refused the config from {origin} ({}):\n{}\n--- config ---\n{toml}",
            out.status,
            output_text(&out)
        );
    }
}

/// The pods' grace periods, drain hooks, probes and scrape annotations agree
/// with the configs they run, and so do the systemd unit's stop timeout.
#[test]
fn deploy_settings_agree_with_their_configs() {
    for file in kubernetes_files() {
        let yaml = read(&file);
        let name = file_name(&file);
        for toml in embedded_tomls(&yaml) {
            let config: toml::Table = toml.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
            let drain = longest_drain(&config);
            let grace = yaml_values(&yaml, "terminationGracePeriodSeconds");
            assert!(
                !grace.is_empty(),
                "{name}: no terminationGracePeriodSeconds"
            );
            for g in grace {
                let g = Duration::from_secs(g.parse().unwrap());
                assert!(
                    g > drain,
                    "{name}: grace period {g:?} is not above drain_timeout {drain:?}"
                );
            }
            let wait = drain_wait(&pre_stop_command(&yaml));
            assert!(
                wait >= drain && wait < drain + Duration::from_secs(10),
                "{name}: preStop waits {wait:?}, drain_timeout is {drain:?}"
            );
            let admin = config["admin"]["bind"].as_str().expect("admin.bind");
            let admin: SocketAddr = admin.parse().unwrap();
            assert!(
                admin.ip().is_unspecified(),
                "{name}: admin.bind {admin} is unreachable for the kubelet's probes"
            );
            // preStop runs `admin drain` without --url: the binary's default.
            assert_eq!(admin.port(), 9900, "{name}: preStop drains 127.0.0.1:9900");
            assert_eq!(
                yaml_values(&yaml, "prometheus.io/port"),
                vec![admin.port().to_string()],
                "{name}: scrape port"
            );
            assert_eq!(
                config["admin"]
                    .get("token_protects_metrics")
                    .and_then(|v| v.as_bool()),
                Some(false),
                "{name}: Prometheus scrapes by annotation without a token"
            );
            assert!(
                yaml.contains(&format!("containerPort: {}", admin.port())),
                "{name}: the admin port is not a container port"
            );
        }
    }
    let unit = systemd_unit();
    let config: toml::Table = read(&deploy_dir().join("systemd/pulsegate.toml"))
        .parse()
        .unwrap();
    let stop =
        humantime::parse_duration(unit.last("TimeoutStopSec").expect("TimeoutStopSec")).unwrap();
    let drain = longest_drain(&config);
    assert!(
        stop > drain,
        "TimeoutStopSec {stop:?} is not above drain_timeout {drain:?}"
    );
}

/// Every block scalar `<name>.toml: |` in a YAML file (ConfigMap data),
/// with its indentation removed.
fn embedded_tomls(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut found = vec![];
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        let is_header = trimmed
            .split_once(':')
            .is_some_and(|(key, rest)| key.ends_with(".toml") && matches!(rest.trim(), "|" | "|-"));
        if !is_header {
            continue;
        }
        let key_indent = indent(line);
        let body: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || indent(l) > key_indent)
            .copied()
            .collect();
        let Some(block_indent) = body
            .iter()
            .find(|l| !l.trim().is_empty())
            .map(|l| indent(l))
        else {
            continue;
        };
        let text: Vec<&str> = body
            .iter()
            .map(|l| l.get(block_indent..).unwrap_or(""))
            .collect();
        found.push(text.join("\n").trim_end().to_string() + "\n");
    }
    found
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The values of every `key: value` line, unquoted.
fn yaml_values(yaml: &str, key: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().trim_matches('"').to_string())
        .collect()
}

/// The longest `drain_timeout` of a config's listeners (30 s by default).
fn longest_drain(config: &toml::Table) -> Duration {
    config["listener"]
        .as_array()
        .expect("[[listener]]")
        .iter()
        .map(|l| {
            l.get("drain_timeout")
                .and_then(|d| d.as_str())
                .unwrap_or("30s")
        })
        .map(|d| humantime::parse_duration(d).unwrap())
        .max()
        .unwrap()
}

/// The `preStop` exec command of a manifest (there must be exactly one).
fn pre_stop_command(yaml: &str) -> Vec<String> {
    let commands: Vec<Vec<String>> = yaml
        .split("preStop:")
        .skip(1)
        .map(|after| {
            let line = after
                .lines()
                .find_map(|l| l.trim().strip_prefix("command:"))
                .expect("preStop exec command");
            serde_json::from_str(line.trim()).expect("command as a [\"...\"] list")
        })
        .collect();
    assert_eq!(commands.len(), 1, "one preStop hook per manifest");
    commands.into_iter().next().unwrap()
}

fn drain_wait(command: &[String]) -> Duration {
    assert_eq!(
        command[..3],
        [INSTALLED_BIN, "admin", "drain"],
        "preStop: {command:?}"
    );
    let at = command.iter().position(|a| a == "--wait").expect("--wait");
    humantime::parse_duration(&command[at + 1]).unwrap()
}

// ---------------------------------------------------------------- systemd

#[test]
fn systemd_unit_is_hardened() {
    let unit = systemd_unit();
    let expect = |key: &str, value: &str| {
        assert_eq!(unit.last(key), Some(value), "pulsegate.service: {key}");
    };
    assert!(matches!(unit.last("Type"), Some("exec" | "simple")));
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("LimitNOFILE", "65536"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ] {
        expect(key, value);
    }
    assert_eq!(
        unit.all("SystemCallFilter").first().copied(),
        Some("@system-service"),
        "SystemCallFilter allows @system-service first, then only subtracts"
    );
    let run = unit.last("ExecStart").expect("ExecStart");
    let check = unit.last("ExecStartPre").expect("ExecStartPre");
    let config = run
        .split(" run -c ")
        .nth(1)
        .expect("ExecStart runs `run -c FILE`");
    assert!(run.starts_with(INSTALLED_BIN), "ExecStart: {run}");
    assert_eq!(check, format!("{INSTALLED_BIN} check -c {config}"));
}

/// `systemd-analyze verify` where systemd is installed (it needs no running
/// systemd). It exits 0 even on unknown keys and bad values, so any output
/// fails; a deliberately broken copy proves that output is noticed.
#[test]
fn systemd_unit_verifies() {
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: systemd-analyze not installed (the structural unit check still runs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = read(&deploy_dir().join("systemd/pulsegate.service")).replace(INSTALLED_BIN, BIN);
    let verify = |text: &str| {
        let path = dir.path().join("pulsegate.service");
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        (out.status.success(), output_text(&out))
    };
    let (ok, text) = verify(&unit);
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    let broken = unit.replace("ProtectSystem=strict", "ProtectSystem=strickt");
    let (ok, text) = verify(&broken);
    assert!(!ok || !text.trim().is_empty(), "a bad value went unnoticed");
}

/// The `[Service]` settings of deploy/systemd/pulsegate.service.
struct Unit(Vec<(String, String)>);

impl Unit {
    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value in force: systemd lets a later assignment override.
    fn last(&self, key: &str) -> Option<&str> {
        self.all(key).last().copied()
    }
}

fn systemd_unit() -> Unit {
    let text = read(&deploy_dir().join("systemd/pulsegate.service"));
    let mut section = "";
    let mut settings = vec![];
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]" && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                settings.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    Unit(settings)
}

// ---------------------------------------------------------------- Grafana

#[test]
fn dashboard_queries_only_exported_metrics_through_its_variables() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name}"))
    };
    assert_eq!(var("DS_PROMETHEUS")["type"], "datasource");
    assert_eq!(var("DS_PROMETHEUS")["query"], "prometheus");
    assert_eq!(
        var("listener")["definition"],
        "label_values(pulsegate_connections_active, listener)"
    );
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        let title = &p["title"];
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {title}");
        }
    }
    let queried: BTreeSet<String> = dashboard_metrics(&dashboard)
        .into_iter()
        .map(|m| base_name(&m).0)
        .collect();
    let contract: BTreeSet<String> = EXPORTED_METRICS.iter().map(|m| m.to_string()).collect();
    let unknown: Vec<_> = queried.difference(&contract).collect();
    let unshown: Vec<_> = contract.difference(&queried).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics pulsegate does not export: {unknown:?}"
    );
    assert!(
        unshown.is_empty(),
        "exported metrics no panel shows: {unshown:?}"
    );
}

/// Runs the real binary, gives each metric something to count, and checks
/// that every name the dashboard queries is in `/metrics`.
#[test]
fn dashboard_metrics_are_exported_by_a_running_proxy() {
    let proxy = Proxy::start();
    let wanted = dashboard_metrics(&dashboard());

    let mut idle = TcpStream::connect(proxy.listen).unwrap();
    echo_once(&mut idle);
    let mut brief = TcpStream::connect(proxy.listen).unwrap();
    echo_once(&mut brief);
    brief.shutdown(Shutdown::Both).unwrap();
    // Its only backend refuses: an upstream connect failure and a refusal.
    let mut refused = TcpStream::connect(proxy.unreachable).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = refused.read(&mut [0u8; 1]);
    // Through the API rather than SIGHUP: a signal could beat the handler.
    let (status, body) = proxy.request("POST", "/reload");
    assert_eq!(status, 200, "POST /reload: {body}");

    // Probes need the idle session to stay quiet past probe_interval.
    let deadline = Instant::now() + Duration::from_secs(15);
    let missing = loop {
        let exposition = proxy.get("/metrics").1;
        let missing: Vec<String> = wanted
            .iter()
            .filter(|m| !exported(&exposition, m))
            .cloned()
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    drop(idle);
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics that /metrics lacks (no `# TYPE` line): {missing:?}\n\
         pulsegate metrics exported: {:?}\n--- log ---\n{}",
        exported_names(&proxy.get("/metrics").1),
        proxy.log()
    );
}

/// Every `pulsegate_*` name in the dashboard's queries.
fn dashboard_metrics(dashboard: &serde_json::Value) -> BTreeSet<String> {
    let mut exprs = vec![];
    collect_exprs(dashboard, &mut exprs);
    assert!(
        exprs.len() > 10,
        "only {} queries in the dashboard",
        exprs.len()
    );
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Tokens matching `pulsegate_[a-z0-9_]+`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = vec![];
    let mut rest = expr;
    while let Some(at) = rest.find("pulsegate_") {
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded {
            names.push(tail[..len].to_string());
        }
        rest = &tail[len..];
    }
    names
}

/// A histogram's series name mapped to its family: (`family`, is_series).
fn base_name(metric: &str) -> (String, bool) {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = metric.strip_suffix(suffix) {
            return (base.to_string(), true);
        }
    }
    (metric.to_string(), false)
}

/// Whether the exposition declares `metric` (a histogram's `_bucket`,
/// `_sum` and `_count` need their family declared as a histogram).
fn exported(exposition: &str, metric: &str) -> bool {
    let (family, is_series) = base_name(metric);
    exposition.lines().any(|l| {
        let mut words = l.split_whitespace();
        let declared = words.next() == Some("#")
            && words.next() == Some("TYPE")
            && words.next() == Some(&family);
        declared && (!is_series || words.next() == Some("histogram"))
    })
}

fn exported_names(exposition: &str) -> Vec<&str> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("pulsegate_"))
        .collect()
}

fn dashboard() -> serde_json::Value {
    let text = read(&deploy_dir().join("grafana/pulsegate-dashboard.json"));
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

#[test]
fn metric_names_are_read_from_queries() {
    let expr = "histogram_quantile(0.99, sum by (le) (rate(pulsegate_check_duration_seconds_bucket{x=\"pulsegate_no\"}[5m]))) / xpulsegate_y";
    assert_eq!(
        metric_names(expr),
        ["pulsegate_check_duration_seconds_bucket", "pulsegate_no"]
    );
    let exposition =
        "# TYPE pulsegate_check_duration_seconds histogram\n# TYPE pulsegate_bytes_total counter\n";
    assert!(exported(
        exposition,
        "pulsegate_check_duration_seconds_bucket"
    ));
    assert!(exported(exposition, "pulsegate_bytes_total"));
    assert!(!exported(exposition, "pulsegate_bytes"));
    assert!(!exported(exposition, "pulsegate_bytes_total_count"));
}

// ---------------------------------------------------------------- exec hooks

/// The Dockerfile's HEALTHCHECK and the pods' preStop hook exec the binary
/// (the image has no shell): both commands work against a running proxy.
#[test]
fn image_and_pod_hooks_work_against_a_running_proxy() {
    let mut proxy = Proxy::start();
    let url = format!("http://127.0.0.1:{}", proxy.admin.port());

    let health = healthcheck_command();
    assert_eq!(health[0], INSTALLED_BIN);
    let at = health
        .iter()
        .position(|a| a == "--url")
        .expect("HEALTHCHECK --url");
    assert_eq!(
        health[at + 1],
        "http://127.0.0.1:9900",
        "the default admin bind"
    );
    let mut probe = health.clone();
    probe[at + 1] = url.clone();
    let out = run_bounded(Command::new(BIN).args(&probe[1..]), Duration::from_secs(10));
    assert!(
        out.status.success(),
        "HEALTHCHECK failed: {}",
        output_text(&out)
    );
    probe[at + 1] = format!("http://127.0.0.1:{}", free_port());
    let out = run_bounded(Command::new(BIN).args(&probe[1..]), Duration::from_secs(10));
    assert!(
        !out.status.success(),
        "HEALTHCHECK passed with no admin server"
    );

    let drain = pre_stop_command(&read(&deploy_dir().join("kubernetes/sidecar.yaml")));
    let out = run_bounded(
        Command::new(BIN)
            .args(&drain[1..])
            .args(["--url", &url])
            .env("PULSEGATE_ADMIN_TOKEN", &proxy.token),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "preStop drain failed: {}",
        output_text(&out)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "pulsegate still runs after the preStop drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "pulsegate exited {status} after draining:\n{}",
        proxy.log()
    );
}

/// The JSON-form `CMD [...]` of the Dockerfile's HEALTHCHECK.
fn healthcheck_command() -> Vec<String> {
    let dockerfile = read(&deploy_dir().join("Dockerfile"));
    let joined = dockerfile.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK instruction");
    let cmd = line.split_once(" CMD ").expect("HEALTHCHECK ... CMD").1;
    serde_json::from_str(cmd.trim()).expect("HEALTHCHECK CMD in JSON (exec) form")
}

// ---------------------------------------------------------------- a proxy

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
        let echo = echo_backend();
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
            if http(self.admin, "GET", "/healthz", &self.token).is_ok_and(|(s, _)| s == 200) {
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
        http(self.admin, method, path, &self.token)
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

/// One request over HTTP/1.0 with the bearer token: (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, token: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

/// An echo server, a thread per connection, for the rest of the test run.
fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
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

// ---------------------------------------------------------------- helpers

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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `command` to completion, killing it after `timeout`.
fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}
