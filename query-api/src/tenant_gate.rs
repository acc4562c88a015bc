//! At most `TENANT_MAX_CONCURRENT_REQUESTS` requests of one tenant at a time, so one tenant's
//! heavy requests cannot hold every pooled database connection while the others queue behind
//! them (issue 14).
//!
//! A request's tenant is known only once its key is verified, which needs a connection. So
//! the gate remembers which scope (tenant, or "all tenants" for operator keys) each verified
//! key hash belongs to, and a request of a known key waits for its scope's permit *before*
//! taking a connection: the excess of one tenant waits on its own semaphore, not in the pool.
//! A request of a key not seen yet takes a connection, is verified, and then needs a free
//! permit at once (429 otherwise). Permits are held until the request's transaction ends.
//! A scope at its limit for [`QUEUE_WAIT`] gets a 429 with `Retry-After`.
//!
//! The key → scope map only routes requests to a semaphore; every request is still verified
//! by the database (a revoked key is refused whatever the map says).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// How long a request waits for its tenant's permit before a 429.
pub const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// Most key hashes remembered; past it the map starts afresh (it only routes requests).
const MAX_KEYS: usize = 100_000;

/// The scope of operator keys, which read every tenant: one shared budget.
pub const OPERATORS: &str = "";

/// Per-tenant request budgets.
#[derive(Debug)]
pub struct TenantGate {
    limit: usize,
    scopes: Mutex<HashMap<String, Arc<Semaphore>>>,
    keys: Mutex<HashMap<Vec<u8>, String>>,
}

impl TenantGate {
    /// A gate of `limit` concurrent requests per tenant (at least 1).
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            scopes: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn semaphore(&self, scope: &str) -> Arc<Semaphore> {
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        scopes
            .entry(scope.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.limit)))
            .clone()
    }

    fn too_many(&self) -> ApiError {
        metrics::counter!(crate::metrics::TENANT_LIMITED).increment(1);
        ApiError::TooManyRequests {
            reason: format!(
                "this tenant has reached its limit of {} requests in progress (TENANT_MAX_CONCURRENT_REQUESTS); retry shortly",
                self.limit
            ),
            retry_after_s: QUEUE_WAIT.as_secs().max(1),
        }
    }

    /// The scope a verified key hash belonged to, if seen.
    pub fn scope_of(&self, key_hash: &[u8]) -> Option<String> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.get(key_hash).cloned()
    }

    /// Remembers the scope of a verified key hash.
    pub fn remember(&self, key_hash: &[u8], scope: &str) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.len() >= MAX_KEYS {
            keys.clear();
        }
        keys.insert(key_hash.to_vec(), scope.to_owned());
    }

    /// Waits up to [`QUEUE_WAIT`] for a permit of `scope`.
    pub async fn wait(&self, scope: &str) -> Result<OwnedSemaphorePermit, ApiError> {
        let semaphore = self.semaphore(scope);
        match tokio::time::timeout(QUEUE_WAIT, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(ApiError::Unavailable),
            Err(_elapsed) => Err(self.too_many()),
        }
    }

    /// A permit of `scope` if one is free now.
    pub fn try_take(&self, scope: &str) -> Result<OwnedSemaphorePermit, ApiError> {
        self.semaphore(scope)
            .try_acquire_owned()
            .map_err(|_| self.too_many())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tenant_at_its_limit_waits_then_is_refused_and_others_are_not_affected() {
        let gate = TenantGate::new(2);
        let a1 = gate.wait("a").await.unwrap();
        let _a2 = gate.wait("a").await.unwrap();
        assert!(matches!(
            gate.wait("a").await,
            Err(ApiError::TooManyRequests { .. })
        ));
        assert!(gate.try_take("a").is_err());
        // Another tenant and the operators have their own budgets.
        let _b = gate.wait("b").await.unwrap();
        let _ops = gate.try_take(OPERATORS).unwrap();
        // A finished request frees its permit for a waiting one.
        let waiting = tokio::spawn({
            let semaphore = gate.semaphore("a");
            async move { semaphore.acquire_owned().await.map(drop) }
        });
        drop(a1);
        waiting.await.unwrap().unwrap();
    }

    #[test]
    fn keys_are_remembered_by_hash() {
        let gate = TenantGate::new(1);
        assert_eq!(gate.scope_of(b"h1"), None);
        gate.remember(b"h1", "acme");
        assert_eq!(gate.scope_of(b"h1").as_deref(), Some("acme"));
    }
}
