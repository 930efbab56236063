//! The Kubernetes manifests: strict schema validation (and proof that the
//! validator rejects broken ones), their embedded configs, and grace periods
//! that outlast the drain.

use super::systemd::systemd_unit;
use super::*;

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
    support::require(
        found.is_some(),
        format!("kubernetes-validate is not on PATH or in ~/.local/bin (install it: {VALIDATOR_INSTALL})"),
    )?;
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
pub(super) fn pre_stop_command(yaml: &str) -> Vec<String> {
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
