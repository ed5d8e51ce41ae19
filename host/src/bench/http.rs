//! `wharf bench http` (placeholder until its issue's benchmark lands).

/// Options of `wharf bench http`.
#[derive(Debug, clap::Args)]
pub struct HttpArgs {}

/// Runs the benchmark.
pub async fn run(_args: HttpArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wharf bench http` is not built yet")
}
