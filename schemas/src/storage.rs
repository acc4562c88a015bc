//! Migrations and the storage layout (DESIGN §5).
//!
//! One migration set serves both layouts: the migrator installs the `timescaledb` extension
//! when the server offers it (unless the plain layout is forced), and the migrations branch on
//! whether it is installed. The chosen layout is recorded in `fleetstream_settings`, so every
//! service reads it back with [`stored_layout`] instead of guessing.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tracing::{info, warn};

use crate::error::StorageError;

/// Key of the PostgreSQL advisory lock held while migrating (any 64-bit constant; this one
/// spells "fleetmig").
const MIGRATION_LOCK: i64 = 0x666c_6565_746d_6967;

/// The embedded migrations under `schemas/migrations`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How time-series tables are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Hypertables, compression and retention policies.
    TimescaleDb,
    /// Declarative daily range partitions maintained by `fleet_maintain_partitions()`.
    Postgres,
}

impl Layout {
    /// The name stored in `fleetstream_settings`.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::TimescaleDb => "timescaledb",
            Layout::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which layout to migrate to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayoutChoice {
    /// TimescaleDB when the server offers the extension, plain PostgreSQL otherwise.
    #[default]
    Auto,
    /// TimescaleDB; fail if the server does not offer it.
    TimescaleDb,
    /// Plain PostgreSQL even when TimescaleDB is available.
    Postgres,
}

impl FromStr for LayoutChoice {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(LayoutChoice::Auto),
            "timescaledb" => Ok(LayoutChoice::TimescaleDb),
            "postgres" => Ok(LayoutChoice::Postgres),
            other => Err(StorageError::UnknownLayout(other.to_owned())),
        }
    }
}

/// Layout choice and the ages of the storage policies.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    pub layout: LayoutChoice,
    /// Telemetry older than this is dropped (whole chunks / partitions). Default 90 days.
    pub telemetry_retention: Duration,
    /// System metrics older than this are dropped. Default 30 days.
    pub system_metrics_retention: Duration,
    /// TimescaleDB: chunks older than this are compressed. Default 1 day (at 20k msg/s one day
    /// is ~0.6 TB uncompressed, so waiting longer costs disk quickly).
    pub compress_after: Duration,
    /// TimescaleDB: the time range of each new telemetry chunk. Default 1 day. Existing
    /// chunks keep theirs. Each chunk is compressed in one job, so this also sets how much
    /// work one compression run does (see README: sizing chunks).
    pub chunk_interval: Duration,
    /// Plain layout: daily partitions kept ahead of today. Default 3.
    pub partitions_ahead_days: u32,
}

impl Default for StorageOptions {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            layout: LayoutChoice::Auto,
            telemetry_retention: Duration::from_secs(90 * DAY),
            system_metrics_retention: Duration::from_secs(30 * DAY),
            compress_after: Duration::from_secs(DAY),
            chunk_interval: Duration::from_secs(DAY),
            partitions_ahead_days: 3,
        }
    }
}

/// Whether the server can install TimescaleDB (`pg_available_extensions`).
pub async fn timescaledb_available(conn: &mut PgConnection) -> Result<bool, StorageError> {
    let available: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
    )
    .fetch_one(conn)
    .await?;
    Ok(available)
}

/// The layout recorded by the migrations, or `None` before the first migration.
pub async fn stored_layout(conn: &mut PgConnection) -> Result<Option<Layout>, StorageError> {
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('public.fleetstream_settings') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        return Ok(None);
    }
    let value: Option<String> =
        sqlx::query_scalar("SELECT value FROM fleetstream_settings WHERE key = 'storage_layout'")
            .fetch_optional(conn)
            .await?;
    Ok(match value.as_deref() {
        Some("timescaledb") => Some(Layout::TimescaleDb),
        Some("postgres") => Some(Layout::Postgres),
        _ => None,
    })
}

/// Brings the database to the newest schema and applies the storage policies.
///
/// Safe to run concurrently from several processes (an advisory lock serialises them) and
/// repeatedly (a second run changes nothing). The layout of an already migrated database is
/// kept: switching layouts needs a data migration, not a flag.
pub async fn migrate(pool: &PgPool, options: &StorageOptions) -> Result<Layout, StorageError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await?;
    let result = migrate_locked(&mut conn, options).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await;
    let layout = result?;
    unlock?;
    Ok(layout)
}

async fn migrate_locked(
    conn: &mut PgConnection,
    options: &StorageOptions,
) -> Result<Layout, StorageError> {
    let layout = match stored_layout(conn).await? {
        Some(stored) => {
            let requested = match options.layout {
                LayoutChoice::Auto => stored,
                LayoutChoice::TimescaleDb => Layout::TimescaleDb,
                LayoutChoice::Postgres => Layout::Postgres,
            };
            if requested != stored {
                warn!(%stored, %requested, "database already uses another storage layout; keeping it");
            }
            stored
        }
        None => {
            let available = timescaledb_available(conn).await?;
            match (options.layout, available) {
                (LayoutChoice::TimescaleDb, false) => {
                    return Err(StorageError::TimescaleUnavailable)
                }
                (LayoutChoice::Postgres, _) | (LayoutChoice::Auto, false) => Layout::Postgres,
                (LayoutChoice::TimescaleDb | LayoutChoice::Auto, true) => Layout::TimescaleDb,
            }
        }
    };
    if layout == Layout::TimescaleDb {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS timescaledb")
            .execute(&mut *conn)
            .await?;
    }
    // `run_direct`, not `run`: the latter's generic `Acquire` bound makes callers' futures
    // fail to be `Send` (a rustc limitation with higher-ranked lifetimes).
    MIGRATOR.run_direct(&mut *conn).await?;
    apply_policies(conn, layout, options).await?;
    info!(%layout, "database migrated");
    Ok(layout)
}

fn interval_secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Sets retention (both layouts) and compression (TimescaleDB) ages, replacing a policy only
/// when its age differs, and creates the plain layout's partitions ahead.
async fn apply_policies(
    conn: &mut PgConnection,
    layout: Layout,
    options: &StorageOptions,
) -> Result<(), StorageError> {
    let settings = [
        ("telemetry_retention", options.telemetry_retention),
        ("system_metrics_retention", options.system_metrics_retention),
        ("telemetry_compress_after", options.compress_after),
    ];
    for (key, age) in settings {
        sqlx::query(
            "INSERT INTO fleetstream_settings (key, value) \
             VALUES ($1, justify_hours(make_interval(secs => $2))::text) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now() \
             WHERE fleetstream_settings.value::interval <> EXCLUDED.value::interval",
        )
        .bind(key)
        .bind(interval_secs(age))
        .execute(&mut *conn)
        .await?;
    }
    match layout {
        Layout::TimescaleDb => {
            let rechunked = set_chunk_interval(conn, options.chunk_interval).await?;
            if rechunked {
                // The compression policy's schedule follows the chunk interval when the
                // policy is created (half of it, at most 12 hours): create it again.
                sqlx::query("SELECT remove_compression_policy('telemetry', if_exists => true)")
                    .execute(&mut *conn)
                    .await?;
            }
            let policies = [
                (
                    "telemetry",
                    "policy_compression",
                    "compress_after",
                    options.compress_after,
                ),
                (
                    "telemetry",
                    "policy_retention",
                    "drop_after",
                    options.telemetry_retention,
                ),
                (
                    "system_metrics",
                    "policy_retention",
                    "drop_after",
                    options.system_metrics_retention,
                ),
                // The rollup lives as long as the readings it summarises (migration 0009).
                (
                    "telemetry_1m",
                    "policy_retention",
                    "drop_after",
                    options.telemetry_retention,
                ),
            ];
            for (table, proc_name, key, age) in policies {
                set_timescale_policy(conn, table, proc_name, key, age).await?;
            }
        }
        Layout::Postgres => {
            let actions: Vec<String> = sqlx::query_scalar("SELECT fleet_maintain_partitions($1)")
                .bind(i32::try_from(options.partitions_ahead_days).unwrap_or(i32::MAX))
                .fetch_all(&mut *conn)
                .await?;
            for action in actions {
                info!(%action, "partition maintenance");
            }
        }
    }
    Ok(())
}

/// Sets telemetry's chunk interval for new chunks when it differs. Returns whether it did.
async fn set_chunk_interval(
    conn: &mut PgConnection,
    interval: Duration,
) -> Result<bool, StorageError> {
    if interval.as_secs() < 60 {
        return Err(StorageError::InvalidSetting {
            setting: "TELEMETRY_CHUNK_INTERVAL",
            reason: format!("{} s is shorter than 1 minute", interval.as_secs()),
        });
    }
    let same: Option<bool> = sqlx::query_scalar(
        "SELECT time_interval = make_interval(secs => $1) FROM timescaledb_information.dimensions \
         WHERE hypertable_schema = 'public' AND hypertable_name = 'telemetry' \
           AND column_name = 'time'",
    )
    .bind(interval_secs(interval))
    .fetch_optional(&mut *conn)
    .await?;
    if same != Some(false) {
        return Ok(false);
    }
    sqlx::query("SELECT set_chunk_time_interval('telemetry', make_interval(secs => $1))")
        .bind(interval_secs(interval))
        .execute(&mut *conn)
        .await?;
    info!(
        chunk_interval_secs = interval.as_secs(),
        "telemetry chunk interval set (new chunks)"
    );
    Ok(true)
}

async fn set_timescale_policy(
    conn: &mut PgConnection,
    table: &str,
    proc_name: &str,
    config_key: &str,
    age: Duration,
) -> Result<(), StorageError> {
    let current: Option<bool> = sqlx::query_scalar(
        "SELECT (config ->> $3)::interval = make_interval(secs => $4) \
         FROM timescaledb_information.jobs \
         WHERE hypertable_schema = 'public' AND hypertable_name = $1 AND proc_name = $2",
    )
    .bind(table)
    .bind(proc_name)
    .bind(config_key)
    .bind(interval_secs(age))
    .fetch_optional(&mut *conn)
    .await?;
    if current == Some(true) {
        return Ok(());
    }
    let (remove, add) = match proc_name {
        "policy_compression" => (
            "SELECT remove_compression_policy($1::regclass, if_exists => true)",
            "SELECT add_compression_policy($1::regclass, compress_after => justify_hours(make_interval(secs => $2)))",
        ),
        _ => (
            "SELECT remove_retention_policy($1::regclass, if_exists => true)",
            "SELECT add_retention_policy($1::regclass, drop_after => justify_hours(make_interval(secs => $2)))",
        ),
    };
    sqlx::query(remove).bind(table).execute(&mut *conn).await?;
    sqlx::query(add)
        .bind(table)
        .bind(interval_secs(age))
        .execute(&mut *conn)
        .await?;
    info!(
        table,
        proc_name,
        age_secs = age.as_secs(),
        "timescaledb policy set"
    );
    Ok(())
}

/// Runs the plain layout's partition upkeep once, under a session advisory lock so only one
/// instance does it at a time. Returns the actions taken (empty when another instance holds
/// the lock, or in the TimescaleDB layout).
pub async fn maintain_partitions(
    conn: &mut PgConnection,
    days_ahead: u32,
) -> Result<Vec<String>, StorageError> {
    const MAINTENANCE_LOCK: i64 = 0x666c_6565_7470_6172;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(MAINTENANCE_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(Vec::new());
    }
    let result: Result<Vec<String>, sqlx::Error> =
        sqlx::query_scalar("SELECT fleet_maintain_partitions($1)")
            .bind(i32::try_from(days_ahead).unwrap_or(i32::MAX))
            .fetch_all(&mut *conn)
            .await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MAINTENANCE_LOCK)
        .execute(&mut *conn)
        .await?;
    Ok(result?)
}
