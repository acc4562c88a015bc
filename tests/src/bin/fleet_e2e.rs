//! `fleet_e2e`: the fleet-scale proof (see `fleetstream_tests::fleet`).
//!
//! ```sh
//! eval "$(deploy/local/deps.sh env)"
//! cargo build --release --bins
//! cargo run --release -p fleetstream-tests --bin fleet_e2e -- --devices 100000 --interval 5s --duration 10m [--faults]
//! ```
//!
//! Prints the report's path and its table; exits 1 when the account is not exact.

use anyhow::Result;
use clap::Parser;
use fleetstream_tests::fleet::{self, Options};

#[tokio::main]
async fn main() -> Result<()> {
    let opts = Options::parse();
    let report = fleet::run(opts).await?;
    let table = std::fs::read_to_string(report.out_dir.join("report.md"))?;
    eprintln!("{table}");
    eprintln!(
        "[fleet_e2e] report: {}",
        report.out_dir.join("report.md").display()
    );
    if !report.is_exact() {
        eprintln!("[fleet_e2e] the account is NOT exact");
        std::process::exit(1);
    }
    Ok(())
}
