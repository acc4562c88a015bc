//! The sink with a schema registry (`SCHEMA_REGISTRY_URL`): readings written by an independent
//! client in the Confluent wire format (Python `confluent-kafka`'s `AvroSerializer`, which
//! registers its schema itself) are stored exactly as sent — with `telemetry.v1` and with a
//! newer, backward-compatible writer schema (an added optional field) — and an id the
//! registry does not hold is dead-lettered with that reason.
//!
//! Needs `FLEETSTREAM_PYTHON` and `FLEETSTREAM_SCHEMA_REGISTRY_URL` (a real registry: Apicurio,
//! started by `deploy/local/deps.sh up`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use common::{
    assert_stored_as_sent, dead_letters, micros, producer, run_python, sent, sink_config,
    wait_for_stored, Sent,
};
use plumbing::testing::registry::{registry_url, Forwarder};
use plumbing::testing::{TestDb, TestTopics};
use plumbing::Shutdown;
use schemas::LayoutChoice;

const SCHEMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../schemas/avro/telemetry.v1.avsc"
);

async fn tenants(db: &TestDb) -> Result<()> {
    for tenant in ["tenant-0", "tenant-1"] {
        sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ($1, $1)")
            .bind(tenant)
            .execute(&db.pool)
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_from_confluent_avro_serializer_old_and_newer_schema_are_stored_exactly(
) -> Result<()> {
    let url = registry_url()?;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(3).await?;
    tenants(&db).await?;
    let base = DateTime::from_timestamp_micros(micros(Utc::now()) - 600_000_000).unwrap();
    let readings: Vec<Sent> = (0..2)
        .flat_map(|seq| (0..40).map(move |device| sent(device, seq, base)))
        .collect();
    let (v1, v2) = readings.split_at(readings.len() / 2);
    let topic = topics.args.telemetry_topic.as_str();
    let bootstrap = topics.args.bootstrap_servers.as_str();
    let lines = |rs: &[Sent]| rs.iter().map(Sent::line).collect::<Vec<_>>();

    let out_v1 = run_python(
        "registry_produce.py",
        &[bootstrap, topic, &url, SCHEMA],
        &lines(v1),
    )?;
    let out_v2 = run_python(
        "registry_produce.py",
        &[
            bootstrap,
            topic,
            &url,
            SCHEMA,
            "--add-field",
            "firmware_version",
        ],
        &lines(v2),
    )?;
    let (id_v1, acked_v1) = out_v1.split_once(' ').unwrap();
    let (id_v2, acked_v2) = out_v2.split_once(' ').unwrap();
    assert_eq!(
        (acked_v1, acked_v2),
        ("40", "40"),
        "acknowledged by the broker"
    );
    assert_ne!(id_v1, id_v2, "the newer schema is a new registry id");

    // An id the registry does not hold, framed like the rest.
    let unknown_id: u32 = 2_000_000_000;
    let mut unknown = vec![0u8];
    unknown.extend_from_slice(&unknown_id.to_be_bytes());
    unknown.extend_from_slice(b"\x02t");
    common::produce(
        &producer(&topics)?,
        topic,
        [("x/y".to_owned(), unknown.clone(), Some(0))],
    )
    .await?;

    let config = sink_config(&db, &topics, &["--schema-registry-url", &url])?;
    let group = config.group_id.clone();
    let shutdown = Shutdown::new();
    let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
    wait_for_stored(
        &db.pool,
        &group,
        readings.len() as i64 + 1,
        Duration::from_secs(60),
    )
    .await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), sink).await???;

    assert_stored_as_sent(&db.pool, &readings).await?;
    let letters = dead_letters(&topics, &format!("dlq-{}", db.name), 1).await?;
    assert_eq!(
        letters
            .into_iter()
            .map(|(_, stage, error, payload)| (stage, error, payload))
            .collect::<Vec<_>>(),
        vec![(
            "decode".to_owned(),
            format!("schema id {unknown_id} is not in the schema registry"),
            unknown
        )]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_registry_is_away_the_sink_waits_and_dead_letters_nothing() -> Result<()> {
    let url = registry_url()?;
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let forwarder = Forwarder::start(host.to_owned()).await?;
    let sink_url = format!("http://127.0.0.1:{}/{path}", forwarder.port);

    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(2).await?;
    tenants(&db).await?;
    let base = DateTime::from_timestamp_micros(micros(Utc::now()) - 600_000_000).unwrap();
    let readings: Vec<Sent> = (0..2)
        .flat_map(|seq| (0..20).map(move |device| sent(device, seq, base)))
        .collect();
    let (first, second) = readings.split_at(readings.len() / 2);
    let topic = topics.args.telemetry_topic.as_str();
    let bootstrap = topics.args.bootstrap_servers.as_str();
    let lines = |rs: &[Sent]| rs.iter().map(Sent::line).collect::<Vec<_>>();

    // While the registry answers: the first writer schema is looked up and cached.
    run_python(
        "registry_produce.py",
        &[bootstrap, topic, &url, SCHEMA],
        &lines(first),
    )?;
    let config = sink_config(&db, &topics, &["--schema-registry-url", &sink_url])?;
    let group = config.group_id.clone();
    let shutdown = Shutdown::new();
    let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
    wait_for_stored(
        &db.pool,
        &group,
        first.len() as i64,
        Duration::from_secs(60),
    )
    .await?;

    // The registry goes away for the sink; a producer registers a newer schema (a new id
    // the sink has not seen) directly with the registry and writes with it.
    forwarder.set_up(false);
    run_python(
        "registry_produce.py",
        &[
            bootstrap,
            topic,
            &url,
            SCHEMA,
            "--add-field",
            "firmware_version",
        ],
        &lines(second),
    )?;
    plumbing::testing::eventually(
        "the sink to ask the registry again",
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
    assert_eq!(
        common::dlq_total(&topics)?,
        0,
        "nothing dead-lettered while the registry is away"
    );
    assert_eq!(
        common::stored_total(&db.pool, &group).await?,
        first.len() as i64,
        "the new id's messages wait"
    );

    forwarder.set_up(true);
    wait_for_stored(
        &db.pool,
        &group,
        readings.len() as i64,
        Duration::from_secs(60),
    )
    .await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), sink).await???;
    assert_stored_as_sent(&db.pool, &readings).await?;
    assert_eq!(common::dlq_total(&topics)?, 0, "nothing dead-lettered");
    Ok(())
}
