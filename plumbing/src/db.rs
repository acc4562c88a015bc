//! The PostgreSQL pool, and the start-up check of schema and rights ([`require_schema`]).

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::DatabaseArgs;
use crate::Error;

/// A pool sized and timed by `args`. Connects lazily, so a service starts (and reports
/// not-ready) while the database is still down.
pub fn pool(args: &DatabaseArgs, application_name: &str) -> Result<PgPool, Error> {
    let options: PgConnectOptions = args
        .database_url
        .parse::<PgConnectOptions>()
        .map_err(|err| Error::Config {
            name: "DATABASE_URL",
            reason: err.to_string(),
        })?
        .application_name(application_name);
    Ok(PgPoolOptions::new()
        .max_connections(args.database_max_connections)
        .acquire_timeout(args.database_acquire_timeout)
        .connect_lazy_with(options))
}

/// A right a service needs on a schema object, checked at start-up by [`require_schema`].
#[derive(Debug, Clone, Copy)]
pub enum Privilege {
    /// `privilege` (`INSERT`, `SELECT`, ...) on table `table`.
    Table {
        table: &'static str,
        privilege: &'static str,
    },
    /// `EXECUTE` on the function with this signature, e.g. `fleet_refresh_rollup_1m()`.
    Execute { function: &'static str },
}

impl std::fmt::Display for Privilege {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Privilege::Table { table, privilege } => write!(f, "{privilege} on table {table}"),
            Privilege::Execute { function } => write!(f, "EXECUTE on function {function}"),
        }
    }
}

/// How long to wait between start-up checks while the database cannot be reached.
const UNREACHABLE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until the database answers, then checks that it is migrated to this build's newest
/// migration and that the connecting role holds every one of `privileges`.
///
/// A database that cannot be reached is not an error: it is retried (the readiness probe
/// reports it meanwhile) until it answers or `shutdown` is cancelled, since services may start
/// before their database. A database that answers but is not migrated, or a role without a
/// right, is: no retry would fix it.
pub async fn require_schema(
    pool: &PgPool,
    privileges: &[Privilege],
    shutdown: &crate::Shutdown,
) -> Result<(), Error> {
    loop {
        match check_schema(pool, privileges).await {
            Err(Error::Database(err)) if !matches!(err, sqlx::Error::Database(_)) => {
                tracing::warn!(error = %err, "database unreachable at start-up; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(UNREACHABLE_RETRY) => {}
                }
            }
            other => return other,
        }
    }
}

async fn check_schema(pool: &PgPool, privileges: &[Privilege]) -> Result<(), Error> {
    let mut conn = pool.acquire().await?;
    let expected = schemas::storage::MIGRATOR
        .iter()
        .map(|migration| migration.version)
        .max()
        .unwrap_or(0);
    let (exists, readable): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('public._sqlx_migrations') IS NOT NULL, \
                to_regclass('public._sqlx_migrations') IS NOT NULL \
                AND has_table_privilege('public._sqlx_migrations', 'SELECT')",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !exists {
        return Err(Error::NotMigrated {
            found: None,
            expected,
        });
    }
    // A least-privilege role may not read the migrations table; then the objects checked
    // below stand in for it.
    if readable {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&mut *conn)
                .await?;
        if found.is_none_or(|found| found < expected) {
            return Err(Error::NotMigrated { found, expected });
        }
    }
    for privilege in privileges {
        let (exists, granted): (bool, bool) = match privilege {
            Privilege::Table { table, privilege } => {
                sqlx::query_as(
                    "SELECT to_regclass($1) IS NOT NULL, \
                            to_regclass($1) IS NOT NULL AND has_table_privilege($1, $2)",
                )
                .bind(table)
                .bind(privilege)
                .fetch_one(&mut *conn)
                .await?
            }
            Privilege::Execute { function } => {
                sqlx::query_as(
                    "SELECT to_regprocedure($1) IS NOT NULL, \
                            to_regprocedure($1) IS NOT NULL \
                            AND has_function_privilege($1, 'EXECUTE')",
                )
                .bind(function)
                .fetch_one(&mut *conn)
                .await?
            }
        };
        if !exists {
            return Err(Error::NotMigrated {
                found: None,
                expected,
            });
        }
        if !granted {
            let role: String = sqlx::query_scalar("SELECT current_user")
                .fetch_one(&mut *conn)
                .await?;
            return Err(Error::MissingPrivilege {
                role,
                privilege: privilege.to_string(),
            });
        }
    }
    Ok(())
}
