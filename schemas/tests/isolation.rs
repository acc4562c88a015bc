//! Tenant isolation, enforced by PostgreSQL, in every layout the server offers (plain
//! PostgreSQL always, TimescaleDB when the extension is available).

use anyhow::Result;
use plumbing::testing::{available_layouts, TestDb};
use schemas::{Layout, LayoutChoice};
use sqlx::{PgPool, Postgres, Row, Transaction};

/// Tenant-owned relational tables (RLS) and the views over time-series tables.
const TENANT_RELATIONS: &[&str] = &[
    "tenants",
    "sites",
    "devices",
    "gateway_tokens",
    "device_latest",
    "alert_rules",
    "alerts",
    "api_keys",
    "telemetry_view",
];

/// Rows seeded per tenant in each relation (the same for a and b).
fn seeded_rows(relation: &str) -> i64 {
    match relation {
        "telemetry_view" => 3,
        "devices" | "device_latest" => 2,
        _ => 1,
    }
}

async fn seed(db: &TestDb) -> Result<()> {
    for t in ["a", "b"] {
        let statements = [
            format!("INSERT INTO tenants (tenant_id, name) VALUES ('{t}', 'Tenant {t}')"),
            format!("INSERT INTO sites (tenant_id, site_id, name) VALUES ('{t}', 's1', 'Site')"),
            format!(
                "INSERT INTO devices (tenant_id, device_id, site_id, token_hash) VALUES \
                 ('{t}', 'd1', 's1', 'hash-{t}-1'), ('{t}', 'd2', NULL, 'hash-{t}-2')"
            ),
            format!("INSERT INTO gateway_tokens (tenant_id, name, token_hash) VALUES ('{t}', 'gw', 'gw-{t}')"),
            format!(
                "INSERT INTO device_latest (tenant_id, device_id, time, msg_type, seq, metrics) VALUES \
                 ('{t}', 'd1', now(), 'telemetry', 3, '{{\"temp\": 20}}'), \
                 ('{t}', 'd2', now(), 'telemetry', 1, '{{\"temp\": 21}}')"
            ),
            format!(
                "INSERT INTO alert_rules (tenant_id, name, metric, kind, op, threshold) \
                 VALUES ('{t}', 'hot', 'temp', 'threshold', '>', 30)"
            ),
            format!(
                "INSERT INTO alerts (tenant_id, rule_id, device_id, status, severity, started_at) \
                 SELECT '{t}', rule_id, 'd1', 'firing', 'warning', now() FROM alert_rules WHERE tenant_id = '{t}'"
            ),
            format!(
                "INSERT INTO api_keys (tenant_id, role, name, key_prefix, key_hash) \
                 VALUES ('{t}', 'admin', 'key', 'fk_{t}', 'key-hash-{t}')"
            ),
            format!(
                "INSERT INTO telemetry (time, tenant_id, device_id, msg_type, seq, metrics) \
                 SELECT now() - make_interval(mins => g), '{t}', 'd1', 'telemetry', g, '{{\"temp\": 20}}' \
                 FROM generate_series(1, 3) g"
            ),
        ];
        for sql in statements {
            sqlx::query(&sql).execute(&db.pool).await?;
        }
    }
    sqlx::query(
        "INSERT INTO api_keys (tenant_id, role, name, key_prefix, key_hash) \
         VALUES (NULL, 'operator', 'ops', 'fk_ops', 'key-hash-ops')",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query(
        "INSERT INTO system_metrics (time, metric_name, instance, value) \
         VALUES (now(), 'sink_rows_per_second', 'sink-1', 1234.5)",
    )
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// A transaction acting for `tenant` in `role`, as query-api opens them.
async fn scoped<'a>(
    pool: &'a PgPool,
    tenant: Option<&str>,
    role: Option<&str>,
) -> Result<Transaction<'a, Postgres>> {
    let mut tx = pool.begin().await?;
    if let Some(tenant) = tenant {
        sqlx::query("SELECT set_config('app.tenant_id', $1, true)")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(role) = role {
        sqlx::query("SELECT set_config('app.role', $1, true)")
            .bind(role)
            .execute(&mut *tx)
            .await?;
    }
    Ok(tx)
}

/// (distinct tenant ids, row count) of a relation as seen in `tx`.
async fn visible(tx: &mut Transaction<'_, Postgres>, relation: &str) -> Result<(Vec<String>, i64)> {
    let row = sqlx::query(&format!(
        "SELECT coalesce(array_agg(DISTINCT tenant_id::text) FILTER (WHERE tenant_id IS NOT NULL), '{{}}'), count(*) FROM {relation}"
    ))
    .fetch_one(&mut **tx)
    .await?;
    let mut tenants: Vec<String> = row.try_get(0)?;
    tenants.sort();
    Ok((tenants, row.try_get(1)?))
}

async fn for_each_layout<F, Fut>(test: F) -> Result<()>
where
    F: Fn(TestDb) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    for layout in available_layouts().await? {
        let db = TestDb::new(layout).await?;
        seed(&db).await?;
        let name = db.layout;
        test(db)
            .await
            .map_err(|err| err.context(format!("layout {name}")))?;
    }
    Ok(())
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

#[tokio::test]
async fn tenant_sees_only_its_own_rows_in_every_table_and_view() -> Result<()> {
    for_each_layout(|db| async move {
        let api = db.role_pool("fleet_api", 2).await?;
        let mut tx = scoped(&api, Some("a"), Some("admin")).await?;
        for relation in TENANT_RELATIONS {
            let (tenants, count) = visible(&mut tx, relation).await?;
            assert_eq!(tenants, vec!["a".to_owned()], "{relation}");
            assert_eq!(count, seeded_rows(relation), "{relation}");
        }
        let metrics: i64 = sqlx::query_scalar("SELECT count(*) FROM system_metrics_view")
            .fetch_one(&mut *tx)
            .await?;
        assert_eq!(metrics, 0, "system metrics are for operators only");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn tenant_cannot_write_or_change_another_tenants_rows() -> Result<()> {
    for_each_layout(|db| async move {
        let api = db.role_pool("fleet_api", 2).await?;
        let inserts = [
            "INSERT INTO sites (tenant_id, site_id, name) VALUES ('b', 'evil', 'x')",
            "INSERT INTO devices (tenant_id, device_id) VALUES ('b', 'evil')",
            "INSERT INTO alert_rules (tenant_id, name, metric, kind, op, threshold) VALUES ('b', 'x', 'm', 'threshold', '>', 1)",
            "INSERT INTO api_keys (tenant_id, role, name, key_prefix, key_hash) VALUES ('b', 'admin', 'x', 'p', 'evil')",
            "INSERT INTO gateway_tokens (tenant_id, name, token_hash) VALUES ('b', 'x', 'evil')",
        ];
        for sql in inserts {
            let mut tx = scoped(&api, Some("a"), Some("admin")).await?;
            let err = sqlx::query(sql).execute(&mut *tx).await.expect_err(sql);
            assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{sql}: {err}");
        }
        // Moving an own row to another tenant is refused by WITH CHECK.
        let mut tx = scoped(&api, Some("a"), Some("admin")).await?;
        let err = sqlx::query("UPDATE sites SET tenant_id = 'b', site_id = 's9' WHERE site_id = 's1'")
            .execute(&mut *tx)
            .await
            .expect_err("re-homing a row");
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
        drop(tx);
        // Another tenant's rows are invisible to UPDATE and DELETE: nothing changes.
        let mut tx = scoped(&api, Some("a"), Some("admin")).await?;
        let updated = sqlx::query("UPDATE devices SET name = 'pwned' WHERE tenant_id = 'b'")
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let deleted = sqlx::query("DELETE FROM sites WHERE tenant_id = 'b'")
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        assert_eq!((updated, deleted), (0, 0));
        let b_sites: i64 = sqlx::query_scalar("SELECT count(*) FROM sites WHERE tenant_id = 'b'")
            .fetch_one(&db.pool)
            .await?;
        assert_eq!(b_sites, 1);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn operators_read_every_tenant_but_only_operator_admin_writes() -> Result<()> {
    for_each_layout(|db| async move {
        let api = db.role_pool("fleet_api", 2).await?;
        for role in ["operator", "operator_admin"] {
            let mut tx = scoped(&api, None, Some(role)).await?;
            for relation in TENANT_RELATIONS {
                let (tenants, count) = visible(&mut tx, relation).await?;
                assert_eq!(
                    tenants,
                    vec!["a".to_owned(), "b".to_owned()],
                    "{role} {relation}"
                );
                let operator_key = i64::from(*relation == "api_keys");
                assert_eq!(
                    count,
                    2 * seeded_rows(relation) + operator_key,
                    "{role} {relation}"
                );
            }
            let metrics: i64 = sqlx::query_scalar("SELECT count(*) FROM system_metrics_view")
                .fetch_one(&mut *tx)
                .await?;
            assert_eq!(metrics, 1, "{role}");
        }
        let mut tx = scoped(&api, None, Some("operator")).await?;
        let err =
            sqlx::query("INSERT INTO sites (tenant_id, site_id, name) VALUES ('a', 'new', 'x')")
                .execute(&mut *tx)
                .await
                .expect_err("operator is read-only");
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
        drop(tx);
        let mut tx = scoped(&api, None, Some("operator_admin")).await?;
        sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('c', 'Tenant c')")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn nothing_is_visible_without_a_tenant() -> Result<()> {
    for_each_layout(|db| async move {
        let api = db.role_pool("fleet_api", 2).await?;
        let mut tx = scoped(&api, None, None).await?;
        for relation in TENANT_RELATIONS.iter().chain(&["system_metrics_view"]) {
            let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {relation}"))
                .fetch_one(&mut *tx)
                .await?;
            assert_eq!(count, 0, "{relation}");
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_reused_pooled_connection_carries_no_tenant_into_the_next_transaction() -> Result<()> {
    for_each_layout(|db| async move {
        // One connection: the second transaction necessarily reuses it.
        let api = db.role_pool("fleet_api", 1).await?;
        let pid_before: i32;
        {
            let mut tx = scoped(&api, Some("a"), Some("admin")).await?;
            pid_before = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *tx)
                .await?;
            assert_eq!(visible(&mut tx, "devices").await?.1, 2);
            tx.commit().await?;
        }
        let mut tx = api.begin().await?;
        let pid_after: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await?;
        assert_eq!(pid_before, pid_after, "the pool must reuse the connection");
        let tenant: Option<String> =
            sqlx::query_scalar("SELECT current_setting('app.tenant_id', true)")
                .fetch_one(&mut *tx)
                .await?;
        assert!(
            tenant.as_deref().unwrap_or("").is_empty(),
            "leaked tenant {tenant:?}"
        );
        assert_eq!(visible(&mut tx, "devices").await?.1, 0);
        assert_eq!(visible(&mut tx, "telemetry_view").await?.1, 0);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn fleet_api_has_no_privilege_on_time_series_tables_or_offsets() -> Result<()> {
    for_each_layout(|db| async move {
        let api = db.role_pool("fleet_api", 2).await?;
        for table in ["telemetry", "system_metrics", "consumer_offsets"] {
            let mut tx = scoped(&api, None, Some("operator_admin")).await?;
            let err = sqlx::query(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&mut *tx)
                .await
                .expect_err(table);
            assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{table}: {err}");
        }
        let mut tx = scoped(&api, Some("a"), Some("admin")).await?;
        let err = sqlx::query("INSERT INTO telemetry_view (time, tenant_id, device_id, seq, metrics) VALUES (now(), 'a', 'd', 1, '{}')")
            .execute(&mut *tx)
            .await
            .expect_err("views are read-only for fleet_api");
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn api_keys_are_looked_up_by_hash_before_a_tenant_is_known() -> Result<()> {
    for_each_layout(|db| async move {
        let api = db.role_pool("fleet_api", 2).await?;
        let mut tx = api.begin().await?;
        let row = sqlx::query("SELECT key_id, tenant_id, role FROM api_key_lookup($1)")
            .bind("key-hash-b")
            .fetch_one(&mut *tx)
            .await?;
        assert_eq!(
            row.try_get::<Option<String>, _>("tenant_id")?.as_deref(),
            Some("b")
        );
        assert_eq!(row.try_get::<String, _>("role")?, "admin");
        let missing = sqlx::query("SELECT * FROM api_key_lookup($1)")
            .bind("nope")
            .fetch_optional(&mut *tx)
            .await?;
        assert!(missing.is_none());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn fleet_writer_writes_time_series_for_every_tenant_but_cannot_touch_keys() -> Result<()> {
    for_each_layout(|db| async move {
        let writer = db.role_pool("fleet_writer", 2).await?;
        let mut tx = writer.begin().await?;
        sqlx::query(
            "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
             VALUES (now(), 'a', 'd9', 1, '{}'), (now(), 'b', 'd9', 1, '{}')",
        )
        .execute(&mut *tx)
        .await?;
        let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
            .fetch_one(&mut *tx)
            .await?;
        assert_eq!(
            devices, 4,
            "writers read every tenant's devices (ingest token cache)"
        );
        tx.commit().await?;
        let mut tx = writer.begin().await?;
        let err = sqlx::query("SELECT count(*) FROM api_keys")
            .fetch_one(&mut *tx)
            .await
            .expect_err("writers have no business with api keys");
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn migrating_twice_changes_nothing() -> Result<()> {
    for layout in available_layouts().await? {
        let db = TestDb::new(layout).await?;
        let snapshot = || async {
            let row = sqlx::query(
                "SELECT (SELECT count(*) FROM _sqlx_migrations), \
                        (SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace), \
                        (SELECT count(*) FROM pg_policy), \
                        (SELECT string_agg(key || '=' || value || '@' || updated_at, ',' ORDER BY key) FROM fleetstream_settings)",
            )
            .fetch_one(&db.pool)
            .await?;
            anyhow::Ok((
                row.try_get::<i64, _>(0)?,
                row.try_get::<i64, _>(1)?,
                row.try_get::<i64, _>(2)?,
                row.try_get::<String, _>(3)?,
            ))
        };
        let jobs = || async {
            if db.layout != Layout::TimescaleDb {
                return anyhow::Ok(Vec::new());
            }
            Ok(sqlx::query_scalar::<_, i32>(
                "SELECT job_id FROM timescaledb_information.jobs ORDER BY job_id",
            )
            .fetch_all(&db.pool)
            .await?)
        };
        let before = (snapshot().await?, jobs().await?);
        let again = schemas::migrate(
            &db.pool,
            &schemas::StorageOptions {
                layout,
                ..Default::default()
            },
        )
        .await?;
        assert_eq!(again, db.layout);
        assert_eq!(
            (snapshot().await?, jobs().await?),
            before,
            "layout {}",
            db.layout
        );
    }
    Ok(())
}

#[tokio::test]
async fn plain_layout_keeps_partitions_ahead_and_never_loses_out_of_range_rows() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    assert_eq!(db.layout, Layout::Postgres);
    let ahead: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'telemetry'::regclass AND c.relname <> 'telemetry_default' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        ahead.len(),
        5,
        "yesterday, today and 3 days ahead: {ahead:?}"
    );

    // A reading 10 days ahead has no partition yet: it lands in the default partition.
    sqlx::query(
        "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
         VALUES (now() + interval '10 days', 'a', 'd1', 1, '{}')",
    )
    .execute(&db.pool)
    .await?;
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry_default")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(in_default, 1);
    // When upkeep reaches that day, the row moves into the new partition, not lost.
    let mut conn = db.pool.acquire().await?;
    let actions = schemas::storage::maintain_partitions(&mut conn, 10).await?;
    assert!(
        actions.iter().any(|a| a.starts_with("created telemetry_p")),
        "{actions:?}"
    );
    let (total, default_left): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM telemetry), (SELECT count(*) FROM telemetry_default)",
    )
    .fetch_one(&mut *conn)
    .await?;
    assert_eq!((total, default_left), (1, 0));

    // A partition past retention is dropped whole.
    sqlx::query(
        "SELECT fleet_create_daily_partition('telemetry', (now() - interval '100 days')::date)",
    )
    .execute(&mut *conn)
    .await?;
    let actions = schemas::storage::maintain_partitions(&mut conn, 3).await?;
    assert_eq!(
        actions
            .iter()
            .filter(|a| a.starts_with("dropped telemetry_p"))
            .count(),
        1,
        "{actions:?}"
    );
    Ok(())
}

#[tokio::test]
async fn timescaledb_compresses_chunks_and_views_still_isolate_them() -> Result<()> {
    if !available_layouts()
        .await?
        .contains(&LayoutChoice::TimescaleDb)
    {
        eprintln!(
            "timescaledb is not offered by this server: plain layout covered by the other tests"
        );
        return Ok(());
    }
    let db = TestDb::new(LayoutChoice::TimescaleDb).await?;
    seed(&db).await?;
    let policy: Option<String> = sqlx::query_scalar(
        "SELECT config ->> 'compress_after' FROM timescaledb_information.jobs \
         WHERE hypertable_name = 'telemetry' AND proc_name = 'policy_compression'",
    )
    .fetch_optional(&db.pool)
    .await?;
    assert_eq!(policy.as_deref(), Some("1 day"));
    sqlx::query(
        "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
         SELECT now() - interval '3 days' + make_interval(secs => g), t, 'd1', g, '{\"temp\": 1}' \
         FROM generate_series(1, 100) g, (VALUES ('a'), ('b')) v(t)",
    )
    .execute(&db.pool)
    .await?;
    let compressed: i64 = sqlx::query_scalar(
        "SELECT count(compress_chunk(c, if_not_compressed => true)) \
         FROM show_chunks('telemetry', older_than => now() - interval '1 day') c",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(compressed >= 1);
    let is_compressed: bool = sqlx::query_scalar(
        "SELECT bool_or(is_compressed) FROM timescaledb_information.chunks WHERE hypertable_name = 'telemetry'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(is_compressed);

    // TELEMETRY_CHUNK_INTERVAL: new chunks get it, the compression policy is created again
    // (its schedule follows the chunk interval), a second run changes nothing.
    let interval_and_policy = || async {
        sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT d.time_interval::text, \
                    (SELECT j.config ->> 'compress_after' FROM timescaledb_information.jobs j \
                     WHERE j.hypertable_name = 'telemetry' AND j.proc_name = 'policy_compression') \
             FROM timescaledb_information.dimensions d \
             WHERE d.hypertable_name = 'telemetry' AND d.column_name = 'time'",
        )
        .fetch_one(&db.pool)
        .await
    };
    assert_eq!(
        interval_and_policy().await?,
        ("1 day".to_owned(), Some("1 day".to_owned()))
    );
    let fifteen_minutes = schemas::StorageOptions {
        layout: LayoutChoice::TimescaleDb,
        chunk_interval: std::time::Duration::from_secs(15 * 60),
        ..Default::default()
    };
    schemas::migrate(&db.pool, &fifteen_minutes).await?;
    assert_eq!(
        interval_and_policy().await?,
        ("00:15:00".to_owned(), Some("1 day".to_owned()))
    );
    let job: i32 = sqlx::query_scalar(
        "SELECT job_id FROM timescaledb_information.jobs \
         WHERE hypertable_name = 'telemetry' AND proc_name = 'policy_compression'",
    )
    .fetch_one(&db.pool)
    .await?;
    schemas::migrate(&db.pool, &fifteen_minutes).await?;
    let same_job: i32 = sqlx::query_scalar(
        "SELECT job_id FROM timescaledb_information.jobs \
         WHERE hypertable_name = 'telemetry' AND proc_name = 'policy_compression'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        same_job, job,
        "an unchanged interval leaves the policy alone"
    );
    let err = schemas::migrate(
        &db.pool,
        &schemas::StorageOptions {
            layout: LayoutChoice::TimescaleDb,
            chunk_interval: std::time::Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await
    .expect_err("a chunk interval under a minute is refused");
    assert_eq!(
        err.to_string(),
        "TELEMETRY_CHUNK_INTERVAL: 30 s is shorter than 1 minute"
    );

    let api = db.role_pool("fleet_api", 1).await?;
    let mut tx = scoped(&api, Some("a"), Some("viewer")).await?;
    let (tenants, count) = visible(&mut tx, "telemetry_view").await?;
    assert_eq!(tenants, vec!["a".to_owned()]);
    assert_eq!(
        count, 103,
        "3 recent rows + 100 compressed rows of tenant a"
    );
    Ok(())
}
