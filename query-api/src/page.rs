//! Keyset pagination: a list is ordered by a unique key, and the cursor is the last key of
//! the previous page, so rows added or removed meanwhile never shift a page (no OFFSET).
//!
//! The cursor is opaque to clients: hex of the JSON-encoded key. A malformed one is a 400
//! naming `cursor`; a well-formed one can only narrow a query the caller may already run.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiError;

/// Rows per page when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;
/// Largest `limit` (one fleet page of 1,000 devices).
pub const MAX_LIMIT: u32 = 1000;

/// `limit` and `cursor` of a list request.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Rows per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageParams {
    /// The validated page size.
    pub fn limit(&self) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::bad(
                "limit",
                format!("must be between 1 and {MAX_LIMIT}"),
            )),
        }
    }

    /// The decoded cursor, if any.
    pub fn after<K: DeserializeOwned>(&self) -> Result<Option<K>, ApiError> {
        let Some(cursor) = &self.cursor else {
            return Ok(None);
        };
        let bytes = hex::decode(cursor).map_err(|_| bad_cursor())?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|_| bad_cursor())
    }
}

fn bad_cursor() -> ApiError {
    ApiError::bad("cursor", "not a cursor returned by this endpoint")
}

/// Encodes the key of the last row of a page.
pub fn cursor<K: Serialize>(key: &K) -> String {
    // Serialising tuples of strings and integers cannot fail.
    hex::encode(serde_json::to_vec(key).unwrap_or_default())
}

/// One page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` fetched rows: the extra row only says there is more.
    pub fn from_rows<K: Serialize>(mut rows: Vec<T>, limit: u32, key: impl Fn(&T) -> K) -> Self {
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next_cursor = if more {
            rows.last().map(|last| cursor(&key(last)))
        } else {
            None
        };
        Page {
            items: rows,
            next_cursor,
        }
    }
}

/// `limit + 1` as a SQL bind.
pub fn fetch_limit(limit: u32) -> i64 {
    i64::from(limit) + 1
}

/// One keyset page of a tenant-owned table ordered by its integer key: the rows of `scope`
/// (every tenant the row-level policies let the caller see, when `None`) after the cursor.
/// `columns`, `table` and `key_column` are constants of the caller, never request input.
pub async fn by_integer_key<T>(
    conn: &mut sqlx::PgConnection,
    columns: &str,
    table: &str,
    key_column: &str,
    scope: Option<&str>,
    page: &PageParams,
    key: impl Fn(&T) -> i64,
) -> Result<Page<T>, ApiError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let limit = page.limit()?;
    let after: Option<i64> = page.after()?;
    let rows: Vec<T> = sqlx::query_as(&format!(
        "SELECT {columns} FROM {table} \
         WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::bigint IS NULL OR {key_column} > $2) \
         ORDER BY {key_column} LIMIT $3"
    ))
    .bind(scope)
    .bind(after)
    .bind(fetch_limit(limit))
    .fetch_all(conn)
    .await?;
    Ok(Page::from_rows(rows, limit, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_a_400() {
        let params = PageParams {
            limit: None,
            cursor: Some(cursor(&("t1", "d'; --"))),
        };
        let key: Option<(String, String)> = params.after().unwrap();
        assert_eq!(key, Some(("t1".into(), "d'; --".into())));
        let params = PageParams {
            limit: Some(0),
            cursor: Some("zz".into()),
        };
        assert!(params.after::<(String, String)>().is_err());
        assert!(params.limit().is_err());
    }

    #[test]
    fn a_page_has_a_cursor_only_when_more_rows_exist() {
        let page = Page::from_rows(vec![1, 2, 3], 2, |n| *n);
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(page.next_cursor, Some(cursor(&2)));
        let page = Page::from_rows(vec![1, 2], 2, |n| *n);
        assert!(page.next_cursor.is_none());
    }
}
