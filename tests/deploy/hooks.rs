//! The commands the image (HEALTHCHECK) and the pods (preStop) exec, run
//! against a live proxy.

use super::kubernetes::pre_stop_command;
use super::*;
use crate::support::servers::run_bounded;

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
    let mut command = Command::new(BIN);
    command.args(&probe[1..]);
    let out = run_bounded(command, Duration::from_secs(10));
    assert!(
        out.status.success(),
        "HEALTHCHECK failed: {}",
        output_text(&out)
    );
    probe[at + 1] = format!("http://127.0.0.1:{}", free_port());
    let mut command = Command::new(BIN);
    command.args(&probe[1..]);
    let out = run_bounded(command, Duration::from_secs(10));
    assert!(
        !out.status.success(),
        "HEALTHCHECK passed with no admin server"
    );

    let drain = pre_stop_command(&read(&deploy_dir().join("kubernetes/sidecar.yaml")));
    let mut command = Command::new(BIN);
    command
        .args(&drain[1..])
        .args(["--url", &url])
        .env("PULSEGATE_ADMIN_TOKEN", &proxy.token);
    let out = run_bounded(command, Duration::from_secs(30));
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
