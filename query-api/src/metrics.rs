//! The `fleetstream_query_api_*` metrics, described once; recorded by the request middleware
//! in [`crate::http`] (the same place that logs, so counts and logs never drift).

use metrics::{describe_counter, describe_histogram, Unit};

/// Requests answered, labels `route` (the matched pattern, never an id), `method`, `status`.
pub const REQUESTS: &str = "fleetstream_query_api_requests_total";
/// Time to answer, same labels but `status` reduced to its class (`2xx`...).
pub const REQUEST_DURATION: &str = "fleetstream_query_api_request_duration_seconds";

/// Requests refused with a 429 because their tenant had `TENANT_MAX_CONCURRENT_REQUESTS` in
/// progress for a second.
pub const TENANT_LIMITED: &str = "fleetstream_query_api_tenant_limited_total";

/// Registers help text with the recorder.
pub fn describe() {
    describe_counter!(
        REQUESTS,
        Unit::Count,
        "HTTP requests answered, by route pattern, method and status"
    );
    describe_counter!(
        TENANT_LIMITED,
        Unit::Count,
        "Requests refused (429) because their tenant had its concurrent-request budget in use"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request to response, by route pattern, method and status class"
    );
}
