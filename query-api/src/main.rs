//! `query-api` binary: parse config, start telemetry, then serve or run a one-shot command.

use std::io::Write;

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = query_api::Cli::parse();
    let _guard = plumbing::observability::init_telemetry(query_api::SERVICE, &cli.observability)
        .context("initialising telemetry")?;
    let outcome = query_api::main(cli, plumbing::shutdown_signal())
        .await
        .context("query-api failed")?;
    if let query_api::Outcome::Key(key) = outcome {
        // The key's only appearance: stdout, so scripts can capture it (logs go to stderr).
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{key}").context("printing the key")?;
    }
    Ok(())
}
