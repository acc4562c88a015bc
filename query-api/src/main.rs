//! `query-api` binary: parse config, start telemetry, then serve or run a one-shot command.

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = query_api::Cli::parse();
    let _guard = plumbing::observability::init_telemetry(query_api::SERVICE, &cli.observability)
        .context("initialising telemetry")?;
    query_api::main(cli, plumbing::shutdown_signal())
        .await
        .context("query-api failed")
}
