//! The dashboard in headless Chromium (Debian's `chromium`, installed by
//! `deploy/local/deps.sh up`): sign in with a key through the form, open a device page, and
//! find the rendered chart with its data points in the DOM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use clap::Parser;
use plumbing::testing::{eventually, TestDb};
use query_api::auth::Role;

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_owned())
}

/// The DOM after the page settled (Chromium's virtual time runs the page's fetches and timers
/// to completion within the budget).
async fn dump_dom(url: &str) -> Result<String, String> {
    let profile = std::env::temp_dir().join(plumbing::testing::unique_name("chromium"));
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1200,900",
                "--virtual-time-budget=15000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("--dump-dom")
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let _ = std::fs::remove_dir_all(&profile);
    let output = output
        .map_err(|_| "chromium did not finish in 60 s".to_owned())?
        .map_err(|e| format!("cannot run {} (install Debian's chromium): {e}", chromium()))?;
    if !output.status.success() {
        return Err(format!(
            "chromium failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The number in `data-points="N"` of the chart, if rendered.
fn chart_points(dom: &str) -> Option<u64> {
    let start = dom.find("id=\"chart\"")?;
    let rest = &dom[start..];
    let attr = rest.find("data-points=\"")? + "data-points=\"".len();
    let end = rest[attr..].find('"')?;
    rest[attr..attr + end].parse().ok()
}

#[tokio::test]
async fn a_viewer_signs_in_opens_a_device_and_sees_a_chart_with_points() {
    let db = TestDb::new(schemas::LayoutChoice::Postgres).await.unwrap();
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme')")
        .execute(&db.pool)
        .await
        .unwrap();
    common::seed_tenant(&db.pool, common::OWN, "ac")
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
         SELECT now() - s * interval '30 seconds', 'acme', 'ac-dev-1', 100 + s, \
                jsonb_build_object('temp', 20 + s % 7, 'hum', 40 + s % 3) \
         FROM generate_series(2, 100) s",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let key = common::key(&db.pool, Role::Viewer, Some(common::OWN))
        .await
        .unwrap();

    let url = format!(
        "{}{}options=-c%20role%3Dfleet_api",
        db.url,
        if db.url.contains('?') { '&' } else { '?' }
    );
    let cli = query_api::Cli::try_parse_from([
        "query-api",
        "--database-url",
        &url,
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = plumbing::Shutdown::new();
    let server = tokio::spawn(query_api::serve(cli, listener, shutdown.clone()));

    let page = format!("{base}/?login={key}#/device/ac-dev-1");
    let (points, dom) = eventually(
        "the device chart with points",
        Duration::from_secs(120),
        || async {
            let dom = dump_dom(&page).await?;
            match chart_points(&dom) {
                Some(points) if points > 0 => Ok((points, dom)),
                _ => Err(dom.chars().take(2000).collect()),
            }
        },
    )
    .await
    .unwrap();
    // About 100 `temp` readings in the last hour, one per 10-second bucket.
    assert!(points >= 90, "{points} points");
    assert!(dom.contains("<canvas"), "uPlot draws on a canvas");
    assert!(dom.contains("Device ac-dev-1"));
    assert!(dom.contains("tenant acme"), "signed in as the viewer");
    assert!(!dom.contains(&key), "the key is not left in the page");

    // A wrong key stays on the sign-in form with the API's reason.
    let dom = dump_dom(&format!("{base}/?login=fsk_wrong#/device/ac-dev-1"))
        .await
        .unwrap();
    assert!(dom.contains("missing or invalid API key"), "{dom}");
    assert_eq!(chart_points(&dom), None);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}
