//! `wharf bench send` (placeholder until its issue's benchmark lands).

/// Options of `wharf bench send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {}

/// Runs the benchmark.
pub async fn run(_args: SendArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wharf bench send` is not built yet")
}
