//! `ingest-producer` binary: parse config, start telemetry, run until SIGTERM/SIGINT.
//! `ingest-producer simulate …` drives virtual devices instead (see `simulate --help`);
//! `import FILE` and `compare FILE` move history from InfluxDB and check it (exit code 1 when
//! a line was rejected or a difference found).

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
    if args.get(1).is_some_and(|a| a == "import") {
        let import = ingest_producer::import::ImportArgs::parse_from(args.iter().skip(1));
        let _guard = plumbing::observability::init_telemetry(
            "ingest-producer-import",
            &import.observability,
        )
        .context("initialising telemetry")?;
        let summary = ingest_producer::import::run(import, plumbing::shutdown_signal())
            .await
            .context("import failed")?;
        summary
            .print(&mut std::io::stdout().lock())
            .context("writing summary")?;
        if !summary.rejected.is_empty() || summary.unacknowledged > 0 {
            std::process::exit(1);
        }
        return Ok(());
    }
    if args.get(1).is_some_and(|a| a == "compare") {
        let compare = ingest_producer::compare::CompareArgs::parse_from(args.iter().skip(1));
        let _guard = plumbing::observability::init_telemetry(
            "ingest-producer-compare",
            &compare.observability,
        )
        .context("initialising telemetry")?;
        let report = ingest_producer::compare::run(compare)
            .await
            .context("compare failed")?;
        report
            .print(&mut std::io::stdout().lock())
            .context("writing report")?;
        if !report.differences.is_empty() {
            std::process::exit(1);
        }
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
