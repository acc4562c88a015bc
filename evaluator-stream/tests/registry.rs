//! The evaluator with a schema registry (`SCHEMA_REGISTRY_URL`): it registers `alert_event.v1`
//! under `<alerts topic>-value` at start-up (waiting while the registry is away, consuming
//! nothing meanwhile) and writes alerts in the Confluent wire format, which Python
//! `confluent-kafka`'s `AvroDeserializer` reads field for field; an incompatible alerts schema
//! and a registry refusing our credentials stop it at start-up with the reason; the basic-auth
//! settings are sent.
//!
//! Needs `FLEETSTREAM_PYTHON` and `FLEETSTREAM_SCHEMA_REGISTRY_URL` (a real registry: Apicurio,
//! started by `deploy/local/deps.sh up`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use common::*;
use plumbing::registry::{Registry, RegistryArgs};
use plumbing::testing::registry::{
    registry_host_and_path, registry_url, BasicAuthProxy, Forwarder,
};
use plumbing::testing::{eventually, TestDb, TestTopics};
use plumbing::Shutdown;
use schemas::{AlertEvent, LayoutChoice};

/// Confluent's deserializer, shared with ingest's registry test.
const REGISTRY_CONSUME: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ingest-producer/tests/interop/registry_consume.py"
);

const TENANT: &str = "tenant-r";

/// A registry client for the test's own requests (directly to the registry, no credentials).
fn client(url: &str) -> Result<Registry> {
    let args = RegistryArgs {
        schema_registry_url: Some(url.to_owned()),
        schema_registry_username: None,
        schema_registry_password: None,
        schema_registry_cache_capacity: 10,
        schema_registry_timeout: Duration::from_secs(5),
    };
    Ok(Registry::from_args(&args)?.expect("a URL is set"))
}

/// One device crossing a `temp > 30` rule once: two transitions (firing, resolved). Returns
/// the rule id and the number of readings produced.
async fn hot_episode(db: &TestDb, topics: &TestTopics) -> Result<(i64, i64, DateTime<Utc>)> {
    provision(&db.pool, &[TENANT], &[(TENANT, "d1")]).await?;
    let rule_id = rule(
        &db.pool,
        TENANT,
        "too hot",
        "kind='threshold'; metric='temp'; op='>'; threshold=30; severity='critical'",
    )
    .await?;
    let t0 = Utc::now() - chrono::Duration::minutes(10);
    let t0 = DateTime::<Utc>::from_timestamp(t0.timestamp(), 0).unwrap();
    let readings: Vec<_> = [20.0, 35.0, 36.0, 20.0, 21.0]
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            reading(
                TENANT,
                "d1",
                t0 + chrono::Duration::seconds(i as i64),
                &[("temp", t)],
            )
        })
        .collect();
    store_telemetry(&db.pool, &readings).await?;
    produce(&producer(topics)?, &topics.args.telemetry_topic, &readings).await?;
    Ok((rule_id, readings.len() as i64, t0))
}

async fn until_done(db: &TestDb, group: &str, total: i64) -> Result<()> {
    eventually(
        "every reading evaluated and its alerts sent",
        Duration::from_secs(60),
        || async {
            let stored = stored_total(&db.pool, group)
                .await
                .map_err(|e| e.to_string())?;
            let unsent = unsent(&db.pool).await.map_err(|e| e.to_string())?;
            if stored == total && unsent == 0 {
                Ok(())
            } else {
                Err(format!(
                    "stored {stored} of {total}, {unsent} events unsent"
                ))
            }
        },
    )
    .await
}

/// The alerts on the topic, decoded by us (either framing, ids through the registry).
async fn our_events(topics: &TestTopics, registry: Registry) -> Result<Vec<AlertEvent>> {
    let args = topics.args.clone();
    tokio::task::spawn_blocking(move || {
        alert_events_on(&args, Some(&registry), Duration::from_secs(3))
    })
    .await?
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// An event as `registry_consume.py` prints its record (timestamps in microseconds).
fn as_python_prints(e: &AlertEvent) -> serde_json::Value {
    serde_json::json!({
        "event_id": e.event_id, "alert_id": e.alert_id, "rule_id": e.rule_id,
        "rule_name": e.rule_name, "tenant_id": e.tenant_id, "device_id": e.device_id,
        "site_id": e.site_id, "status": e.status, "previous_status": e.previous_status,
        "severity": e.severity, "metric": e.metric, "value": e.value,
        "threshold": e.threshold, "time": micros(e.time), "emitted_at": micros(e.emitted_at),
    })
}

/// `registry_consume.py` on the alerts topic: (schema id, record) per message.
fn read_with_avro_deserializer(
    topics: &TestTopics,
    count: usize,
) -> Result<Vec<(i64, serde_json::Value)>> {
    let python = std::env::var("FLEETSTREAM_PYTHON").map_err(|_| {
        anyhow::anyhow!("FLEETSTREAM_PYTHON is not set: eval \"$(deploy/local/deps.sh env)\"")
    })?;
    let out = std::process::Command::new(python)
        .args([
            REGISTRY_CONSUME,
            &topics.args.bootstrap_servers,
            &topics.args.alerts_topic,
            &registry_url()?,
            &count.to_string(),
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut records = Vec::new();
    for line in String::from_utf8(out.stdout)?.lines() {
        let line: serde_json::Value = serde_json::from_str(line)?;
        records.push((line["schema_id"].as_i64().unwrap(), line["record"].clone()));
    }
    Ok(records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_registry_the_evaluator_waits_for_it_then_writes_alerts_avro_deserializer_reads(
) -> Result<()> {
    let (host, path) = registry_host_and_path()?;
    // The registry is away at start-up.
    let forwarder = Forwarder::start_down(host).await?;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let (rule_id, total, t0) = hot_episode(&db, &topics).await?;

    let url = format!("http://127.0.0.1:{}{path}", forwarder.port);
    let group = format!("eval-{}", db.name);
    let shutdown = Shutdown::new();
    let task = tokio::spawn(evaluator_stream::run(
        config(&db, &topics, &group, &["--schema-registry-url", &url])?,
        shutdown.clone(),
    ));
    eventually(
        "the evaluator to ask the registry again",
        Duration::from_secs(60),
        || async {
            if forwarder.refused() >= 3 {
                Ok(())
            } else {
                Err(format!("{} refused connections", forwarder.refused()))
            }
        },
    )
    .await?;
    assert!(!task.is_finished(), "the evaluator waits for the registry");
    assert_eq!(
        stored_total(&db.pool, &group).await?,
        0,
        "nothing is consumed before the alert schema is registered"
    );

    forwarder.set_up(true);
    until_done(&db, &group, total).await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task).await???;

    // The id under `<alerts topic>-value` (registering the same text again returns it).
    let direct = client(&registry_url()?)?;
    let codec = schemas::alert_codec()?;
    let id = direct
        .register(
            &topics.args.alerts_topic,
            codec.current_name(),
            codec.current_json(),
            &Shutdown::new(),
            |_| {},
        )
        .await?;

    let ours = our_events(&topics, direct).await?;
    let statuses: Vec<(&str, Option<&str>)> = ours
        .iter()
        .map(|e| (e.status.as_str(), e.previous_status.as_deref()))
        .collect();
    assert_eq!(
        statuses,
        vec![("firing", None), ("resolved", Some("firing"))]
    );
    for (e, at) in ours.iter().zip([1, 3]) {
        assert_eq!(
            (
                e.rule_id,
                e.rule_name.as_str(),
                e.device_id.as_str(),
                e.severity.as_str(),
                e.metric.as_deref(),
                e.threshold,
                e.time
            ),
            (
                rule_id,
                "too hot",
                "d1",
                "critical",
                Some("temp"),
                Some(30.0),
                t0 + chrono::Duration::seconds(at)
            )
        );
    }
    assert_eq!(ours[0].value, Some(35.0));

    // Confluent's deserializer reads exactly what we wrote, with the registered id.
    let theirs = read_with_avro_deserializer(&topics, ours.len())?;
    let expected: Vec<(i64, serde_json::Value)> = ours
        .iter()
        .map(|e| (i64::from(id), as_python_prints(e)))
        .collect();
    assert_eq!(theirs, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_alerts_schema_is_refused_at_start_up() -> Result<()> {
    let url = registry_url()?;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    // The subject's latest version lacks `severity`, which alert_event.v1 needs (no default):
    // v1 cannot read what that version wrote.
    let mut older: serde_json::Value =
        serde_json::from_str(schemas::alert_codec()?.current_json())?;
    older["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "severity");
    let older_id = client(&url)?
        .register(
            &topics.args.alerts_topic,
            "older",
            &older.to_string(),
            &Shutdown::new(),
            |_| {},
        )
        .await?;

    let group = format!("eval-{}", db.name);
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        evaluator_stream::run(
            config(&db, &topics, &group, &["--schema-registry-url", &url])?,
            Shutdown::new(),
        ),
    )
    .await?
    .unwrap_err()
    .to_string();
    let prefix = format!(
        "schema alert_event.v1 is not backward compatible with subject {}-value in the schema \
         registry: it cannot read data written with version 1 (id {older_id}): ",
        topics.args.alerts_topic
    );
    assert!(err.starts_with(&prefix), "{err}");
    assert!(
        err.contains("severity"),
        "the reason names the field: {err}"
    );
    assert_eq!(stored_total(&db.pool, &group).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_basic_auth_settings_are_sent_and_wrong_credentials_stop_the_evaluator() -> Result<()> {
    let (host, path) = registry_host_and_path()?;
    // Test double for the auth check only: the real registry behind a proxy requiring these.
    let proxy = BasicAuthProxy::start(host, "fleet", "s3cret:pass").await?;
    let url = format!("http://127.0.0.1:{}{path}", proxy.port);
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;

    // Wrong password: refused with the registry's URL and the HTTP status, before consuming.
    let group = format!("eval-{}", db.name);
    let wrong = config(
        &db,
        &topics,
        &group,
        &[
            "--schema-registry-url",
            &url,
            "--schema-registry-username",
            "fleet",
            "--schema-registry-password",
            "wrong",
        ],
    )?;
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        evaluator_stream::run(wrong, Shutdown::new()),
    )
    .await?
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(&format!(
            "schema registry {url} refused reading the latest version of alert_event.v1 under \
             {}-value: HTTP request to schema registry failed with status 401 Unauthorized",
            topics.args.alerts_topic
        )),
        "{err}"
    );
    assert_eq!(proxy.authorized(), 0);
    assert_eq!(proxy.refused(), 1, "refused for good, not retried");

    // The right credentials: registered through the proxy, alerts written with the id.
    let (_, total, _) = hot_episode(&db, &topics).await?;
    let shutdown = Shutdown::new();
    let right = config(
        &db,
        &topics,
        &group,
        &[
            "--schema-registry-url",
            &url,
            "--schema-registry-username",
            "fleet",
            "--schema-registry-password",
            "s3cret:pass",
        ],
    )?;
    let task = tokio::spawn(evaluator_stream::run(right, shutdown.clone()));
    until_done(&db, &group, total).await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task).await???;
    assert!(
        proxy.authorized() >= 3,
        "latest version, compatibility check and registration went through the proxy: {}",
        proxy.authorized()
    );
    assert_eq!(proxy.refused(), 1);
    let theirs = read_with_avro_deserializer(&topics, 2)?;
    let statuses: Vec<&str> = theirs
        .iter()
        .map(|(_, r)| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["firing", "resolved"]);
    Ok(())
}
