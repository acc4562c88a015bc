//! `evaluator-stream` binary: parse config, start telemetry, run until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;

/// mimalloc: each reading is allocated on the consumer thread and freed on a runtime thread,
/// a pattern on which glibc malloc spent ~15 % of the evaluator's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
