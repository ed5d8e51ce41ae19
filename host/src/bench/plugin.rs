//! `wharf bench plugin` (placeholder until its issue's benchmark lands).

/// Options of `wharf bench plugin`.
#[derive(Debug, clap::Args)]
pub struct PluginArgs {}

/// Runs the benchmark.
pub async fn run(_args: PluginArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wharf bench plugin` is not built yet")
}
