//! `pulsegate demo` (being written).

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("demo not built yet")
}

/// The exit code for a demo failure (3 when privileges are missing).
pub fn exit_code(_e: &anyhow::Error) -> u8 {
    1
}
