//! `timescale-sink` binary: parse config, start telemetry, run until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = timescale_sink::Config::parse();
    let _guard =
        plumbing::observability::init_telemetry(timescale_sink::SERVICE, &config.observability)
            .context("initialising telemetry")?;
    timescale_sink::run(config, plumbing::shutdown_signal())
        .await
        .context("timescale-sink failed")
}
