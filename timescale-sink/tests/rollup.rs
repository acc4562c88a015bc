//! The rollup's new minutes aggregated by the sink (migration 0016) against the SQL
//! aggregation of migration 0014, on the same readings: the rows must be the same, value for
//! value (the exact sum's text included), and so must the device minutes rejected.

use anyhow::Result;
use plumbing::testing::TestDb;
use sqlx::PgPool;

/// One rollup row with every column as text, so a difference in any digit shows.
type Row = (
    String,
    String,
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
);

async fn rollup_rows(pool: &PgPool) -> Result<Vec<Row>> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, device_id, metric, bucket::text, n, sum::text, min::text, max::text, \
                last_time::text, last::text \
         FROM telemetry_1m ORDER BY tenant_id, device_id, metric, bucket",
    )
    .fetch_all(pool)
    .await?)
}

async fn rejected(pool: &PgPool) -> Result<Vec<(String, String, String, String)>> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, device_id, bucket::text, sqlstate FROM telemetry_1m_rejected \
         ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await?)
}

/// Readings of 10 and 9 minutes ago (two minutes), of two tenants: 300 devices with numbers of
/// every scale, integers, booleans, strings, nulls, nested values; and devices whose values
/// the sink cannot sum exactly (1.5e308, 39 digits), one beyond double precision (a data
/// error for both), metrics that are not an object, and names that need escaping.
async fn seed(pool: &PgPool) -> Result<()> {
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme'), ('beta', 'Beta')")
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO telemetry (time, tenant_id, device_id, site_id, msg_type, seq, metrics) \
         SELECT date_trunc('minute', now()) - interval '10 minutes' \
                    + make_interval(secs => s * 5 + (d % 5) + d / 1000000.0), \
                CASE WHEN d % 3 = 0 THEN 'beta' ELSE 'acme' END, \
                'dev-' || d, NULL, 'telemetry', s, \
                jsonb_build_object( \
                    'temp', round((random() * 200 - 100)::numeric, (d % 7)), \
                    'count', (random() * 1e6)::int8 - 500000, \
                    'door', random() < 0.5, \
                    'state', 'ok', \
                    'none', NULL::int, \
                    'nested', jsonb_build_object('a', 1), \
                    'tiny', (d * s + 1) * 1e-30, \
                    'big', (random() * 1e15)::int8 * 1000000000000000000000::numeric) \
         FROM generate_series(1, 300) d, generate_series(0, 23) s",
    )
    .execute(pool)
    .await?;
    for (device, metrics) in [
        ("huge", "{\"v\": 1.5e308, \"w\": 2}".to_owned()),
        ("digits", format!("{{\"v\": {}, \"w\": 2}}", "9".repeat(39))),
        ("beyond", "{\"v\": 1e400}".to_owned()),
        ("below", format!("{{\"v\": 0.{}1}}", "0".repeat(400))),
        ("array", "[1, 2, 3]".to_owned()),
        ("scalar", "42".to_owned()),
        (
            "esc\\aped",
            "{\"a\\\"b\\tc\": 1.25, \"\\u00e9\": true}".to_owned(),
        ),
    ] {
        for second in [1, 2, 61] {
            sqlx::query(
                "INSERT INTO telemetry (time, tenant_id, device_id, msg_type, seq, metrics) \
                 VALUES (date_trunc('minute', now()) - interval '10 minutes' \
                             + make_interval(secs => $1), 'acme', $2, 'telemetry', $1, \
                         $3::jsonb)",
            )
            .bind(second)
            .bind(device)
            .bind(&metrics)
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

async fn reset(pool: &PgPool) -> Result<()> {
    sqlx::query("DELETE FROM telemetry_1m")
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM telemetry_1m_rejected")
        .execute(pool)
        .await?;
    sqlx::query("UPDATE telemetry_1m_state SET watermark = NULL")
        .execute(pool)
        .await?;
    Ok(())
}

#[tokio::test]
async fn the_sinks_aggregation_writes_the_rows_the_sql_aggregation_writes() -> Result<()> {
    for layout in plumbing::testing::available_layouts().await? {
        let db = TestDb::new(layout).await?;
        seed(&db.pool).await?;
        // The sink as it runs: a login of fleet_writer, not the owner.
        let writer = db.writer_login("rollup_writer").await?;
        let writer_pool = PgPool::connect(&writer.url).await?;

        let mut steps = 0;
        loop {
            let step = timescale_sink::maintenance::refresh_rollup(&writer_pool).await?;
            steps += 1;
            if !step.more {
                break;
            }
            assert!(steps < 50, "{layout:?}: the steps end");
        }
        let by_sink = rollup_rows(&db.pool).await?;
        let rejected_by_sink = rejected(&db.pool).await?;

        reset(&db.pool).await?;
        loop {
            let more: bool =
                sqlx::query_scalar("SELECT more FROM fleet_refresh_rollup_1m(2, 20000)")
                    .fetch_one(&db.pool)
                    .await?;
            if !more {
                break;
            }
        }
        let by_sql = rollup_rows(&db.pool).await?;
        let rejected_by_sql = rejected(&db.pool).await?;

        // 300 devices × 2 minutes × 5 counted metrics (temp, count, door, tiny, big), and
        // 2 minutes × (2 of "huge", 2 of "digits", 2 of "esc\aped").
        assert_eq!(by_sink.len(), 300 * 2 * 5 + 2 * 6, "{layout:?}");
        assert_eq!(by_sink, by_sql, "{layout:?}: the sink's rows are the SQL's");
        let huge: Vec<&Row> = by_sink
            .iter()
            .filter(|r| r.1 == "huge" && r.2 == "v")
            .collect();
        assert_eq!(huge[0].4, 2, "{layout:?}");
        assert_eq!(huge[0].5, format!("3{}", "0".repeat(308)), "{layout:?}");
        assert_eq!(
            rejected_by_sink
                .iter()
                .map(|r| (r.1.as_str(), r.3.as_str()))
                .collect::<Vec<_>>(),
            [
                ("below", "22003"),
                ("below", "22003"),
                ("beyond", "22003"),
                ("beyond", "22003")
            ],
            "{layout:?}: values beyond double precision are rejected, their minutes only"
        );
        assert_eq!(rejected_by_sink, rejected_by_sql, "{layout:?}");
        writer_pool.close().await;
    }
    Ok(())
}
