//! CI's small fleet-scale proof: 2,000 devices at 400 msg/s for 60 s through the four
//! service binaries (as processes), one SIGKILL of the sink and one of the evaluator, then
//! the exact account: every acknowledged reading stored once as sent, `device_latest` right,
//! both groups' offsets at the end, alerts equal to the reference evaluation. No timing
//! assertions: the figures go to the report only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use clap::Parser;
use fleetstream_tests::fleet::{self, Options};

/// The service binaries `cargo test --workspace` builds beside this test's directory
/// (`target/debug`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/fleet_smoke-<hash> → target/debug
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fleet_with_kills_is_accounted_for_exactly() {
    let bin_dir = bin_dir();
    let out = std::env::temp_dir().join(plumbing::testing::unique_name("fleet_smoke"));
    let opts = Options::parse_from([
        "fleet_e2e",
        "--devices",
        "2000",
        "--interval",
        "5s",
        "--duration",
        "60s",
        "--tenants",
        "4",
        "--auth",
        "device",
        "--concurrency",
        "16",
        "--sink-kills",
        "1",
        "--evaluator-kills",
        "1",
        "--bin-dir",
        bin_dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--drain-timeout",
        "3m",
    ]);
    let report = fleet::run(opts).await.unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    eprintln!("{md}");
    let a = &report.accounting;
    // Every reading the fleet sent is in the manifest; at 400 msg/s for 60 s about 24,000.
    assert!(a.sent > 10_000, "{md}");
    assert_eq!(a.lost, 0, "{md}");
    assert_eq!(a.altered, 0, "{md}");
    assert_eq!(a.phantom, 0, "{md}");
    assert_eq!(a.duplicate_rows, 0, "{md}");
    assert_eq!(a.stored_as_sent, a.accepted, "{md}");
    assert_eq!(a.latest_mismatches, 0, "{md}");
    assert_eq!(a.latest_extra, 0, "{md}");
    assert!(report.offsets_at_end, "{md}");
    assert!(report.alerts_missing.is_empty(), "{md}");
    assert!(report.alerts_unexpected.is_empty(), "{md}");
    assert_eq!(report.faults.len(), 2, "{md}");
    assert!(report.is_exact());
    assert!(out.join("chart.png").is_file());
    std::fs::remove_dir_all(&out).unwrap();
}
