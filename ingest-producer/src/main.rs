//! `ingest-producer` binary: parse config, start telemetry, run until SIGTERM/SIGINT.
//! `ingest-producer simulate …` drives virtual devices instead (see `simulate --help`).

use anyhow::Context;
use clap::Parser;

/// mimalloc: every request allocates its body, parsed JSON, Avro payload and reply on one
/// runtime thread and frees parts of them on another (the producer's delivery callbacks);
/// glibc malloc spent ~28 % of ingest's CPU on that in the fleet-scale run (perf, device
/// tokens, one reading per request).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "simulate") {
        let sim = ingest_producer::simulate::SimulateArgs::parse_from(args.iter().skip(1));
        let _guard =
            plumbing::observability::init_telemetry("ingest-producer-simulate", &sim.observability)
                .context("initialising telemetry")?;
        let summary = ingest_producer::simulate::run(sim.clone(), plumbing::shutdown_signal())
            .await
            .context("simulation failed")?;
        ingest_producer::simulate::print_summary(&sim, &summary).context("writing summary")?;
        return Ok(());
    }
    let config = ingest_producer::Config::parse();
    let _guard =
        plumbing::observability::init_telemetry(ingest_producer::SERVICE, &config.observability)
            .context("initialising telemetry")?;
    ingest_producer::run(config, plumbing::shutdown_signal())
        .await
        .context("ingest-producer failed")
}
