//! `ingest-producer` binary: parse config, start telemetry, run until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ingest_producer::Config::parse();
    let _guard =
        plumbing::observability::init_telemetry(ingest_producer::SERVICE, &config.observability)
            .context("initialising telemetry")?;
    ingest_producer::run(config, plumbing::shutdown_signal())
        .await
        .context("ingest-producer failed")
}
