//! Who may write what: device and gateway tokens, and the devices they may write, held in
//! memory and reloaded from PostgreSQL.
//!
//! Tokens are stored only as hex SHA-256 hashes (`devices.token_hash`,
//! `gateway_tokens.token_hash`); a request's token is hashed and looked up. The whole set is
//! reloaded every refresh interval and whenever PostgreSQL notifies a change on channel
//! [`NOTIFY_CHANNEL`] (migration `0004`), so a revoked token stops working within one
//! notification round trip, or one interval when notifications are lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use plumbing::admin::Health;
use plumbing::Shutdown;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tracing::{debug, info, warn};

use crate::error::Rejection;

/// Shortest time between two reloads triggered by notifications.
const MIN_RELOAD_GAP: Duration = Duration::from_millis(250);

/// PostgreSQL channel on which changes to tenants, devices and gateway tokens are announced.
pub const NOTIFY_CHANNEL: &str = "fleet_credentials";

/// What a token may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// One device.
    Device {
        tenant_id: String,
        device_id: String,
    },
    /// Any device of one tenant.
    Gateway { tenant_id: String },
}

impl Principal {
    /// The tenant the token belongs to.
    pub fn tenant_id(&self) -> &str {
        match self {
            Principal::Device { tenant_id, .. } | Principal::Gateway { tenant_id } => tenant_id,
        }
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub site_id: Option<String>,
    pub active: bool,
}

/// A map on foldhash (seeded per process): SipHash cost ~15 % of ingest's CPU while a full
/// reload of 100,000 devices ran, and every reading of a request is looked up.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One consistent snapshot of the credentials.
#[derive(Debug, Default)]
pub struct Snapshot {
    tokens: FastMap<String, Principal>,
    /// Devices by tenant, then device id: looked up with the request's `&str`s, no key built.
    devices: FastMap<String, FastMap<String, Device>>,
    device_count: usize,
    suspended_tenants: std::collections::HashSet<String>,
}

impl Snapshot {
    /// Reads every token and device (the caller's role needs SELECT on `tenants`, `devices`,
    /// `gateway_tokens`; `fleet_writer` has it).
    ///
    /// One `REPEATABLE READ` transaction, so the three reads see the same committed state: read
    /// one by one, a gateway token and its devices registered together could be caught
    /// between the reads (the token without the devices), and that tenant's readings refused
    /// as unknown devices until the next reload.
    pub async fn load(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let mut snapshot = Snapshot::default();
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let devices = sqlx::query(
            "SELECT tenant_id::text, device_id::text, site_id::text, token_hash, status FROM devices",
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in devices {
            let tenant_id: String = row.try_get(0)?;
            let device_id: String = row.try_get(1)?;
            let site_id: Option<String> = row.try_get(2)?;
            let token_hash: Option<String> = row.try_get(3)?;
            let status: String = row.try_get(4)?;
            if let Some(hash) = token_hash {
                snapshot.tokens.insert(
                    hash.to_ascii_lowercase(),
                    Principal::Device {
                        tenant_id: tenant_id.clone(),
                        device_id: device_id.clone(),
                    },
                );
            }
            snapshot.insert_device(
                tenant_id,
                device_id,
                Device {
                    site_id,
                    active: status == "active",
                },
            );
        }
        let gateways = sqlx::query(
            "SELECT tenant_id::text, token_hash FROM gateway_tokens WHERE revoked_at IS NULL",
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in gateways {
            let tenant_id: String = row.try_get(0)?;
            let hash: String = row.try_get(1)?;
            snapshot
                .tokens
                .insert(hash.to_ascii_lowercase(), Principal::Gateway { tenant_id });
        }
        let suspended = sqlx::query("SELECT tenant_id::text FROM tenants WHERE status <> 'active'")
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        for row in suspended {
            snapshot.suspended_tenants.insert(row.try_get(0)?);
        }
        Ok(snapshot)
    }

    /// Adds (or replaces) a registered device.
    fn insert_device(&mut self, tenant_id: String, device_id: String, device: Device) {
        if self
            .devices
            .entry(tenant_id)
            .or_default()
            .insert(device_id, device)
            .is_none()
        {
            self.device_count += 1;
        }
    }

    /// Number of known devices.
    pub fn device_count(&self) -> usize {
        self.device_count
    }
}

/// Hex SHA-256 of a token, as stored in the database.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The shared, swappable credentials snapshot.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    current: Arc<RwLock<Arc<Snapshot>>>,
    /// Bumped by every [`Credentials::replace`]: open MQTT sessions re-check their token when
    /// it moves.
    generation: Arc<AtomicU64>,
}

impl Credentials {
    /// Credentials holding `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        Credentials {
            current: Arc::new(RwLock::new(Arc::new(snapshot))),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Replaces the snapshot.
    pub fn replace(&self, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        match self.current.write() {
            Ok(mut current) => *current = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// How many times the snapshot was replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reloads from the database.
    pub async fn reload(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let snapshot = Snapshot::load(pool).await?;
        let devices = snapshot.device_count();
        self.replace(snapshot);
        crate::metrics::credentials_loaded(devices);
        Ok(devices)
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The principal of an `Authorization` header value: 401 when absent, not a bearer token,
    /// unknown or revoked; 403 when the tenant is suspended.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, Rejection> {
        let header =
            authorization.ok_or_else(|| Rejection::unauthorized("missing bearer token"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Rejection::unauthorized("missing bearer token"))?;
        self.authenticate_token(token)
    }

    /// The principal of a token however it was sent (the InfluxDB-compatible endpoints take
    /// it as `Token …`, HTTP Basic or a query parameter): 401 when unknown or revoked, 403
    /// when the tenant is suspended.
    pub fn authenticate_token(&self, token: &str) -> Result<Principal, Rejection> {
        self.authenticate_hash(&token_hash(token))
    }

    /// [`Credentials::authenticate_token`] for a token already hashed ([`token_hash`]): how an
    /// open MQTT session re-checks its token after a reload.
    pub fn authenticate_hash(&self, hash: &str) -> Result<Principal, Rejection> {
        let snapshot = self.snapshot();
        let principal = snapshot
            .tokens
            .get(hash)
            .cloned()
            .ok_or_else(|| Rejection::unauthorized("unknown or revoked token"))?;
        if snapshot.suspended_tenants.contains(principal.tenant_id()) {
            return Err(Rejection::forbidden("tenant_id", "tenant suspended"));
        }
        Ok(principal)
    }

    /// Resolves the tenant and device a message is for, as the token allows: a device token
    /// writes only its device (the ids may be omitted), a gateway token any device of its
    /// tenant (the device id is required). Returns `(tenant, device, registered site)`.
    pub fn authorize(
        &self,
        principal: &Principal,
        tenant_id: Option<&str>,
        device_id: Option<&str>,
    ) -> Result<(String, String, Option<String>), Rejection> {
        if let Some(tenant) = tenant_id {
            if tenant != principal.tenant_id() {
                return Err(Rejection::forbidden(
                    "tenant_id",
                    "token may not write this tenant",
                ));
            }
        }
        let device = match (principal, device_id) {
            (Principal::Device { device_id: own, .. }, Some(device)) if device != own => {
                return Err(Rejection::forbidden(
                    "device_id",
                    "device token may only write its own device",
                ))
            }
            (Principal::Device { device_id: own, .. }, _) => own.clone(),
            (Principal::Gateway { .. }, Some(device)) => device.to_owned(),
            (Principal::Gateway { .. }, None) => {
                return Err(Rejection::invalid(
                    "device_id",
                    "missing (required with a gateway token)",
                ))
            }
        };
        let tenant = principal.tenant_id();
        let snapshot = self.snapshot();
        match snapshot
            .devices
            .get(tenant)
            .and_then(|devices| devices.get(&device))
        {
            None => Err(Rejection::unknown_device("unknown device")),
            Some(registered) if !registered.active => {
                Err(Rejection::unknown_device("device disabled"))
            }
            Some(registered) => Ok((tenant.to_owned(), device, registered.site_id.clone())),
        }
    }
}

/// Keeps `credentials` current until `shutdown`: reloads every `interval` and on every
/// notification; sets health check `credentials` once a load succeeded.
pub fn spawn_refresher(
    credentials: Credentials,
    pool: PgPool,
    interval: Duration,
    health: Health,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut listener: Option<PgListener> = None;
        loop {
            if listener.is_none() {
                listener = listen(&pool).await;
            }
            match credentials.reload(&pool).await {
                Ok(devices) => {
                    debug!(devices, "credentials reloaded");
                    health.set("credentials", true);
                }
                Err(err) => warn!(error = %err, "cannot reload credentials; keeping the last ones"),
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                result = notified => {
                    if let Err(err) = result {
                        warn!(error = %err, "credentials notification listener failed");
                        listener = None;
                    }
                    // Provisioning many rows one statement at a time sends a burst of
                    // notifications; one reload covers them all, at most a few per second.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(MIN_RELOAD_GAP) => {}
                    }
                    if let Some(l) = listener.as_mut() {
                        while l.next_buffered().is_some() {}
                    }
                }
            }
        }
    })
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(listener) => listener,
        Err(err) => {
            warn!(error = %err, "cannot listen for credential changes; polling only");
            return None;
        }
    };
    match listener.listen(NOTIFY_CHANNEL).await {
        Ok(()) => {
            info!(channel = NOTIFY_CHANNEL, "listening for credential changes");
            Some(listener)
        }
        Err(err) => {
            warn!(error = %err, "cannot listen for credential changes; polling only");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> Credentials {
        let mut snapshot = Snapshot::default();
        snapshot.tokens.insert(
            token_hash("dev-token"),
            Principal::Device {
                tenant_id: "acme".into(),
                device_id: "d1".into(),
            },
        );
        snapshot.tokens.insert(
            token_hash("gw-token"),
            Principal::Gateway {
                tenant_id: "acme".into(),
            },
        );
        for (device, active) in [("d1", true), ("d2", true), ("off", false)] {
            snapshot.insert_device(
                "acme".into(),
                device.into(),
                Device {
                    site_id: None,
                    active,
                },
            );
        }
        Credentials::new(snapshot)
    }

    #[test]
    fn token_hash_is_hex_sha256() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn tokens_authenticate_or_401() {
        let creds = credentials();
        assert!(creds.authenticate(Some("Bearer dev-token")).is_ok());
        for header in [None, Some("Basic x"), Some("Bearer "), Some("Bearer nope")] {
            let rejection = creds.authenticate(header).unwrap_err();
            assert_eq!(rejection.status.as_u16(), 401, "{header:?}");
        }
    }

    #[test]
    fn device_tokens_write_only_their_device() {
        let creds = credentials();
        let device = creds.authenticate(Some("Bearer dev-token")).unwrap();
        assert_eq!(
            creds.authorize(&device, None, None).unwrap(),
            ("acme".into(), "d1".into(), None)
        );
        assert_eq!(
            creds
                .authorize(&device, None, Some("d2"))
                .unwrap_err()
                .status
                .as_u16(),
            403
        );
        assert_eq!(
            creds
                .authorize(&device, Some("other"), None)
                .unwrap_err()
                .status
                .as_u16(),
            403
        );
    }

    #[test]
    fn gateway_tokens_write_registered_active_devices_of_their_tenant() {
        let creds = credentials();
        let gateway = creds.authenticate(Some("Bearer gw-token")).unwrap();
        assert!(creds.authorize(&gateway, Some("acme"), Some("d2")).is_ok());
        assert_eq!(
            creds
                .authorize(&gateway, Some("other"), Some("d2"))
                .unwrap_err()
                .status
                .as_u16(),
            403
        );
        assert_eq!(
            creds
                .authorize(&gateway, None, Some("ghost"))
                .unwrap_err()
                .error,
            "unknown device"
        );
        assert_eq!(
            creds
                .authorize(&gateway, None, Some("off"))
                .unwrap_err()
                .error,
            "device disabled"
        );
        assert_eq!(
            creds
                .authorize(&gateway, None, None)
                .unwrap_err()
                .status
                .as_u16(),
            400
        );
    }

    #[test]
    fn devices_are_counted_once_and_looked_up_per_tenant() {
        let mut snapshot = Snapshot::default();
        let device = |active| Device {
            site_id: None,
            active,
        };
        snapshot.insert_device("acme".into(), "d1".into(), device(true));
        snapshot.insert_device("acme".into(), "d1".into(), device(false));
        snapshot.insert_device("other".into(), "d1".into(), device(true));
        assert_eq!(snapshot.device_count(), 2);
        snapshot.tokens.insert(
            token_hash("gw"),
            Principal::Gateway {
                tenant_id: "acme".into(),
            },
        );
        let creds = Credentials::new(snapshot);
        let gateway = creds.authenticate(Some("Bearer gw")).unwrap();
        // The later registration of acme/d1 (disabled) replaced the first; other/d1 is
        // another tenant's device and does not answer for acme.
        assert_eq!(
            creds
                .authorize(&gateway, None, Some("d1"))
                .unwrap_err()
                .error,
            "device disabled"
        );
    }
}
