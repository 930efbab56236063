//! The systemd unit: hardened, and accepted by `systemd-analyze verify`.

use super::*;

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
pub(super) struct Unit(Vec<(String, String)>);

impl Unit {
    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value in force: systemd lets a later assignment override.
    pub(super) fn last(&self, key: &str) -> Option<&str> {
        self.all(key).last().copied()
    }
}

pub(super) fn systemd_unit() -> Unit {
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
