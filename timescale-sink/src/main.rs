//! `timescale-sink` binary: parse config, start telemetry, run until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;

/// mimalloc: batches are built from many small allocations on the consumer thread and freed
/// by the writers on other threads, which glibc malloc handles poorly.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
