//! The proxy without the load-test tool: `cargo build --no-default-features`
//! must compile, and its dependency tree must not hold the bench's
//! plotting, progress-bar and histogram crates.

use std::path::PathBuf;
use std::process::Command;

/// The bench's own dependencies (the `bench` feature).
const BENCH_ONLY: [&str; 3] = ["plotters", "indicatif", "hdrhistogram"];

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

/// A target directory of its own, kept between runs (under target/), so
/// the first run builds and later runs only check.
fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/no-default-features")
}

#[test]
fn without_default_features_the_bench_crates_are_not_dependencies() {
    let out = cargo()
        .args(["tree", "--offline", "--locked", "--no-default-features"])
        .args(["--edges", "normal", "--prefix", "none"])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    for name in BENCH_ONLY {
        assert!(
            !tree.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} is a dependency of the proxy built with --no-default-features"
        );
    }
    // And they are with the default features: the check above can fail.
    let out = cargo()
        .args([
            "tree",
            "--offline",
            "--locked",
            "--edges",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .expect("cargo tree runs");
    let tree = String::from_utf8_lossy(&out.stdout);
    for name in BENCH_ONLY {
        assert!(
            tree.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} should come with the default `bench` feature"
        );
    }
}

#[test]
fn the_proxy_builds_without_default_features() {
    let out = cargo()
        .args(["check", "--offline", "--locked", "--no-default-features"])
        .args(["--lib", "--bins"])
        .env("CARGO_TARGET_DIR", target_dir())
        // Code that only the bench used would be dead here: say so.
        .env("RUSTFLAGS", "-D warnings")
        .output()
        .expect("cargo check runs");
    assert!(
        out.status.success(),
        "cargo check --no-default-features failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
