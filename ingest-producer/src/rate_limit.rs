//! Token buckets per device and per tenant (GCRA, `governor`).
//!
//! A request first takes one cell per message from its tenant's bucket (all or nothing), then
//! each device's messages from that device's bucket. Buckets idle longer than their refill
//! time are forgotten by [`RateLimits::forget_idle`], so memory follows active devices.
//!
//! Buckets are keyed by a 64-bit hash of the tenant and device, seeded per process: no
//! allocation per check (a `(String, String)` key cost two), and a collision, which would
//! merely share one bucket between two devices, needs about 4 billion devices to become
//! likely and cannot be aimed at without the seed.

use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

type Buckets = RateLimiter<
    u64,
    HashMapStateStore<u64, foldhash::fast::FixedState>,
    DefaultClock,
    NoOpMiddleware<<DefaultClock as Clock>::Instant>,
>;

/// Rate and burst of one kind of bucket.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// One message is allowed per this period, sustained.
    pub period: Duration,
    /// Messages that may arrive at once.
    pub burst: NonZeroU32,
}

impl Limit {
    /// `per_second` messages per second sustained, `burst` at once.
    pub fn per_second(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Limit {
            period: Duration::from_secs_f64(1.0 / f64::from(per_second.get())),
            burst,
        }
    }
}

/// The per-device and per-tenant buckets.
#[derive(Debug)]
pub struct RateLimits {
    devices: Buckets,
    tenants: Buckets,
    clock: DefaultClock,
    /// Seeds the bucket keys (see the module documentation).
    keys: foldhash::quality::RandomState,
}

impl RateLimits {
    pub fn new(device: Limit, tenant: Limit) -> Self {
        let quota = |limit: Limit| {
            Quota::with_period(limit.period)
                .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
                .allow_burst(limit.burst)
        };
        let clock = DefaultClock::default();
        let buckets = |limit: Limit| {
            RateLimiter::hashmap_with_clock_and_hasher(
                quota(limit),
                clock.clone(),
                foldhash::fast::FixedState::default(),
            )
        };
        RateLimits {
            devices: buckets(device),
            tenants: buckets(tenant),
            clock,
            keys: foldhash::quality::RandomState::default(),
        }
    }

    fn key(&self, parts: &[&str]) -> u64 {
        let mut hasher = self.keys.build_hasher();
        for part in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            hasher.write_usize(part.len());
            hasher.write(part.as_bytes());
        }
        hasher.finish()
    }

    /// Takes `n` messages from the tenant's bucket, or says how long to wait.
    pub fn check_tenant(&self, tenant: &str, n: usize) -> Result<(), Duration> {
        let Some(n) = cells(n) else { return Ok(()) };
        match self.tenants.check_key_n(&self.key(&[tenant]), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
            // More messages than the burst: they can never pass at once.
            Err(_) => Err(Duration::from_secs(1)),
        }
    }

    /// Takes `n` messages from the device's bucket, or says how long to wait.
    pub fn check_device(&self, tenant: &str, device: &str, n: usize) -> Result<(), Duration> {
        let Some(n) = cells(n) else { return Ok(()) };
        match self.devices.check_key_n(&self.key(&[tenant, device]), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
            Err(_) => Err(Duration::from_secs(1)),
        }
    }

    /// Drops buckets that are full again (indistinguishable from new ones).
    pub fn forget_idle(&self) {
        self.devices.retain_recent();
        self.tenants.retain_recent();
        self.devices.shrink_to_fit();
        self.tenants.shrink_to_fit();
    }
}

fn cells(n: usize) -> Option<NonZeroU32> {
    NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: u32, burst: u32) -> Limit {
        Limit::per_second(
            NonZeroU32::new(per_second).unwrap(),
            NonZeroU32::new(burst).unwrap(),
        )
    }

    #[test]
    fn a_device_gets_its_burst_then_waits() {
        let limits = RateLimits::new(limit(1, 3), limit(1000, 1000));
        assert!(limits.check_device("t", "d", 3).is_ok());
        let wait = limits.check_device("t", "d", 1).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(limits.check_device("t", "other", 1).is_ok());
        // The key separates tenant and device: ("t", "d") is not ("", "td") or ("td", "").
        assert!(limits.check_device("", "td", 3).is_ok());
        assert!(limits.check_device("td", "", 3).is_ok());
    }

    #[test]
    fn a_tenant_bucket_is_all_or_nothing() {
        let limits = RateLimits::new(limit(1000, 1000), limit(1, 5));
        assert!(limits.check_tenant("t", 6).is_err());
        assert!(limits.check_tenant("t", 5).is_ok());
        assert!(limits.check_tenant("t", 1).is_err());
    }
}
