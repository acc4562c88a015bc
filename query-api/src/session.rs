//! The request's unit of work: one transaction, scoped to the caller before anything else.
//!
//! [`Session`] is an axum extractor. It reads the bearer key, opens a transaction and, in one
//! statement, verifies the key (`api_key_authenticate`, a definer function that also refuses
//! keys of suspended tenants) and sets `app.tenant_id`, `app.role` and `statement_timeout`
//! with `set_config(..., true)`: transaction-local, so a pooled connection never carries one
//! request's tenant into the next. Operators get an empty `app.tenant_id`, so the database
//! lets them read every tenant (policy `operator_read`) and write none unless they are
//! `operator_admin` (policy `operator_admin_write`). Handlers never widen this; the `WHERE
//! tenant_id = ...` they add only narrows what a caller asked for. A pool whose role bypasses
//! row-level security (superuser, `BYPASSRLS`) is refused with a 503 before any of this.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sqlx::{Postgres, Transaction};
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::{bearer, hash_secret, Principal, Role};
use crate::error::ApiError;
use crate::http::AppState;
use crate::validate;

/// Verifies the key and scopes the transaction in one round trip.
const AUTHENTICATE_SQL: &str = "\
SELECT k.key_id, k.tenant_id, k.role,
       set_config('app.tenant_id', coalesce(k.tenant_id, ''), true),
       set_config('app.role', k.role, true),
       set_config('statement_timeout', $2, true)
FROM api_key_authenticate($1) AS k";

/// (key_id, tenant_id, role, and the three values `set_config` returned).
type AuthenticatedRow = (i64, Option<String>, String, String, String, String);

/// An authenticated caller and its scoped transaction. Dropping it uncommitted rolls back.
#[derive(Debug)]
pub struct Session {
    pub tx: Transaction<'static, Postgres>,
    pub principal: Principal,
    /// The tenant's request permit (see [`crate::tenant_gate`]), released with the session
    /// after its transaction ended. Declared after `tx`, so it is dropped after it.
    _permit: OwnedSemaphorePermit,
}

impl FromRequestParts<AppState> for Session {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer)
            .ok_or(ApiError::Unauthorized)?;
        state.require_isolation().await?;
        let key_hash = hash_secret(token);
        // A key seen before waits for its tenant's permit before it takes a connection.
        let known = state.gate.scope_of(key_hash.as_bytes());
        let early = match &known {
            Some(scope) => Some(state.gate.wait(scope).await?),
            None => None,
        };
        let mut tx = state.pool.begin().await?;
        let row: Option<AuthenticatedRow> = sqlx::query_as(AUTHENTICATE_SQL)
            .bind(&key_hash)
            .bind(state.limits.statement_timeout.as_millis().to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let Some((key_id, tenant_id, role, ..)) = row else {
            return Err(ApiError::Unauthorized);
        };
        let role: Role = role.parse().map_err(ApiError::Internal)?;
        let scope = tenant_id
            .as_deref()
            .unwrap_or(crate::tenant_gate::OPERATORS);
        let permit = match early {
            Some(permit) if known.as_deref() == Some(scope) => permit,
            _ => {
                state.gate.remember(key_hash.as_bytes(), scope);
                state.gate.try_take(scope)?
            }
        };
        Ok(Session {
            _permit: permit,
            tx,
            principal: Principal {
                key_id,
                tenant_id,
                role,
            },
        })
    }
}

impl Session {
    /// Commits the request's changes.
    pub async fn commit(self) -> Result<(), ApiError> {
        self.tx.commit().await?;
        Ok(())
    }

    pub fn role(&self) -> Role {
        self.principal.role
    }

    /// Admin or operator_admin.
    pub fn require_write(&self) -> Result<(), ApiError> {
        if self.role().can_write() {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "role {} may not change data",
                self.role()
            )))
        }
    }

    /// Operator or operator_admin.
    pub fn require_operator(&self) -> Result<(), ApiError> {
        if self.role().is_operator() {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "role {} may not read pipeline data; an operator key is needed",
                self.role()
            )))
        }
    }

    /// operator_admin only.
    pub fn require_operator_admin(&self) -> Result<(), ApiError> {
        if self.role() == Role::OperatorAdmin {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "role {} may not do this; an operator_admin key is needed",
                self.role()
            )))
        }
    }

    /// The tenant a request addresses: the `tenant` parameter when given (validated), else
    /// the key's own tenant; `None` for an operator who named none (all tenants). A tenant key
    /// naming another tenant addresses that tenant, and row-level security then shows it
    /// nothing, exactly as if it did not exist.
    pub fn scope(&self, tenant: Option<&str>) -> Result<Option<String>, ApiError> {
        match tenant {
            Some(tenant) => {
                validate::id("tenant", tenant)?;
                Ok(Some(tenant.to_owned()))
            }
            None => Ok(self.principal.tenant_id.clone()),
        }
    }

    /// Like [`scope`](Self::scope), for requests about one tenant's object: an operator must
    /// name the tenant.
    pub fn tenant(&self, tenant: Option<&str>) -> Result<String, ApiError> {
        self.scope(tenant)?.ok_or_else(|| {
            ApiError::bad(
                "tenant",
                "operator keys belong to no tenant: name one with ?tenant=",
            )
        })
    }

    /// The label recorded as who acknowledged an alert.
    pub fn actor(&self) -> String {
        format!("api_key:{}", self.principal.key_id)
    }
}
