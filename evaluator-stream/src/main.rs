//! `evaluator-stream` binary: parse config, start telemetry, run until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = evaluator_stream::Config::parse();
    let _guard =
        plumbing::observability::init_telemetry(evaluator_stream::SERVICE, &config.observability)
            .context("initialising telemetry")?;
    evaluator_stream::run(config, plumbing::shutdown_signal())
        .await
        .context("evaluator-stream failed")
}
