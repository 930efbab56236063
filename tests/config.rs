//! Config validation: every bad fixture is refused with its key named, the
//! shipped examples pass `pulsegate check`, and problems are reported
//! together, serde's (unknown keys, wrong types) with validate's.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pulsegate");

fn check(path: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(path)
        .output()
        .expect("run pulsegate check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_bad_fixture_is_refused_naming_its_key_line_and_fix() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // Each leading `# expect: ` line is a text the report must contain.
        let expect: Vec<&str> = text
            .lines()
            .map_while(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expect.is_empty(),
            "{} lacks an `# expect:` first line",
            path.display()
        );
        let (code, stdout, stderr) = check(&path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(code, 2, "{name} should exit 2; stderr: {stderr}");
        assert!(
            stdout.is_empty(),
            "{name}: nothing on stdout for a refused config"
        );
        for expect in expect {
            assert!(
                stderr.contains(expect),
                "{name}: expected `{expect}` in:\n{stderr}"
            );
        }
        assert!(
            stderr.contains(&name),
            "{name}: the file is named in:\n{stderr}"
        );
        assert!(
            stderr.contains("fix:"),
            "{name}: a fix is proposed in:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        seen += 1;
    }
    assert!(seen >= 8, "at least 8 bad fixtures, found {seen}");
}

#[test]
fn several_problems_are_reported_together_with_their_lines() {
    let text = "[[listener]]\nname = \"a\"\nbind = \"nowhere\"\nbackends = []\n\
                [listener.liveness]\nprobe_interval = \"1500ms\"\n";
    let err = pulsegate::config::parse(text, "inline.toml").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("3 problem(s)"), "{msg}");
    assert!(msg.contains("inline.toml:3: listener[0].bind"), "{msg}");
    assert!(msg.contains("inline.toml:4: listener[0].backends"), "{msg}");
    assert!(
        msg.contains("inline.toml:6: listener[0].liveness.probe_interval"),
        "{msg}"
    );
}

#[test]
fn serde_and_validate_problems_are_reported_together() {
    // Each of serde's refusals used to hide everything after it.
    let text = "[[listener]]\nname = \"a\"\nbind = \"nowhere\"\nbackends = [\"127.0.0.1:1\"]\n\
                max_connections = 0\nretries = 3\n[listener.liveness]\nprobe_interval = 500\n\
                dead_after = \"500ms\"\n";
    let err = pulsegate::config::parse(text, "inline.toml").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("5 problem(s)"), "{msg}");
    for at in [
        "inline.toml:3: listener[0].bind",
        "inline.toml:5: listener[0].max_connections",
        "inline.toml:6: listener[0].retries",
        "inline.toml:8: listener[0].liveness.probe_interval",
        "inline.toml:9: listener[0].liveness.dead_after",
    ] {
        assert!(msg.contains(at), "{at} in:\n{msg}");
    }
}

#[test]
fn run_refuses_a_file_with_several_problems_naming_each() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad");
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(dir.join("several_unknown_key_and_wrong_type.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pulsegate run");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`pulsegate run` kept running with an invalid config");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("listener[0].conect_timeout"), "{stderr}");
    assert!(stderr.contains("listener[0].max_connections"), "{stderr}");
}

#[test]
fn config_imports_nothing_from_the_rest_of_the_crate() {
    // `config` is the leaf of the module graph: every other module may use
    // it, it uses none of them.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config");
    let mut files = vec![dir];
    let mut seen = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        seen += 1;
        for (i, line) in text.lines().enumerate() {
            let outside = line
                .match_indices("crate::")
                .any(|(at, _)| !line[at..].starts_with("crate::config"));
            assert!(
                !outside,
                "{}:{}: config uses another module: {line}",
                path.display(),
                i + 1
            );
        }
    }
    assert!(seen >= 4, "read the config module ({seen} files)");
}

#[test]
fn shipped_examples_pass_check_with_defaults_and_bounds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, listener, idle, busy) in [
        ("config/pulsegate.toml", "app", "4s 750ms", "3s 750ms"),
        ("config/postgres.toml", "postgres", "4s 750ms", "3s 750ms"),
        ("config/redis.toml", "redis", "3s 750ms", "2s 750ms"),
        ("config/mysql.toml", "mysql", "4s 750ms", "3s 750ms"),
    ] {
        let (code, stdout, stderr) = check(&root.join(file));
        assert_eq!(code, 0, "{file}: {stderr}");
        // Every default is filled in, even where the file leaves it out.
        for key in [
            "connect_timeout",
            "max_connections",
            "on_evict",
            "drain_timeout",
            "probe_interval",
            "dead_after",
            "keepalive_idle",
            "keepalive_interval",
            "keepalive_count",
            "user_timeout",
            "nodelay",
        ] {
            assert!(
                stdout.contains(&format!("{key} = ")),
                "{file}: {key} missing:\n{stdout}"
            );
        }
        assert!(
            stdout.contains(&format!("listener \"{listener}\"")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("idle session:     {idle}")),
            "{file}:\n{stdout}"
        );
        assert!(
            stdout.contains(&format!("data in flight:   {busy}")),
            "{file}:\n{stdout}"
        );
        assert!(
            !stdout.contains("warning:"),
            "{file} should not warn:\n{stdout}"
        );
        // The printed effective config is itself valid and equivalent.
        let effective: String = stdout
            .split("# worst-case detection")
            .next()
            .unwrap()
            .to_string();
        let reparsed = pulsegate::config::parse(&effective, "effective").unwrap();
        let original = pulsegate::config::load(&root.join(file)).unwrap();
        assert_eq!(
            reparsed.raw, original.raw,
            "{file}: effective config round-trips"
        );
    }
}

#[test]
fn short_user_timeout_is_accepted_with_a_slow_reader_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:7000\"\nbackends = [\"127.0.0.1:7001\"]\n\
         [listener.upstream]\nuser_timeout = \"5s\"\n",
    )
    .unwrap();
    let (code, stdout, _) = check(&path);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("warning: listener[0].upstream.user_timeout"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stops reading"),
        "explains the trade-off:\n{stdout}"
    );
}

#[test]
fn an_open_admin_bind_without_a_token_needs_an_explicit_yes_and_still_warns() {
    let dir = tempfile::tempdir().unwrap();
    let listener =
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:7000\"\nbackends = [\"127.0.0.1:7001\"]\n";
    let write = |name: &str, admin: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("[admin]\n{admin}\n{listener}")).unwrap();
        path
    };
    // Refused: see tests/fixtures/bad/admin_open_without_token.toml.
    let (code, _, stderr) = check(&write("open.toml", "bind = \"0.0.0.0:9900\""));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("allow_unauthenticated = true"), "{stderr}");
    // Accepted when said so, with a warning.
    let (code, stdout, stderr) = check(&write(
        "accepted.toml",
        "bind = \"0.0.0.0:9900\"\nallow_unauthenticated = true",
    ));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("warning: admin.allow_unauthenticated"),
        "{stdout}"
    );
    // Loopback, or a token: no warning.
    for (name, admin) in [
        ("loopback.toml", "bind = \"127.0.0.1:9900\""),
        (
            "token.toml",
            "bind = \"0.0.0.0:9900\"\ntoken_env = \"PULSEGATE_ADMIN_TOKEN\"",
        ),
    ] {
        let (code, stdout, stderr) = check(&write(name, admin));
        assert_eq!(code, 0, "{name}: {stderr}");
        assert!(!stdout.contains("warning: admin"), "{name}: {stdout}");
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let (code, _, stderr) = check(Path::new("/nonexistent/pulsegate.toml"));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot read config file /nonexistent/pulsegate.toml"),
        "{stderr}"
    );
}
