//! `wharf bench e2e` (placeholder until its issue's benchmark lands).

/// Options of `wharf bench e2e`.
#[derive(Debug, clap::Args)]
pub struct E2eArgs {}

/// Runs the benchmark.
pub async fn run(_args: E2eArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wharf bench e2e` is not built yet")
}
