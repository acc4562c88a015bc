//! The PostgreSQL pool.

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
