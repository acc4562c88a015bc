//! A Confluent-compatible schema registry: the `SCHEMA_REGISTRY_*` settings, registering a
//! service's schema at start-up, and the writer schemas of Confluent-framed telemetry.
//!
//! Talks to the registry through `schema_registry_converter` (its async client), with three
//! things that crate leaves to us:
//!
//! * **Bounded caching.** Its own caches are unbounded maps and it keeps failed lookups until
//!   told otherwise; [`TelemetryReader`] uses only the plain calls and keeps the writer
//!   schemas it prepared in an LRU of `SCHEMA_REGISTRY_CACHE_CAPACITY` ids. An id the
//!   registry answers "not found" for is remembered for [`NOT_FOUND_TTL`], so a burst of such
//!   messages costs one request, not one each.
//! * **Retrying.** A registry that cannot be reached (connection refused, timeout, 5xx) is
//!   asked again with backoff until it answers or the service shuts down: a message whose id
//!   the registry knows is never dead-lettered because the registry was briefly away. Only a
//!   404 makes an id unknown.
//! * **Compatibility.** Before registering, the schema is checked BACKWARD against the
//!   subject's latest version here (`apache_avro`'s resolution rules), whatever compatibility
//!   the registry itself is configured with, and then with the registry's own check; a 409
//!   from the registry is refused the same way.
//!
//! Metrics: `fleetstream_schema_registry_requests_total{call, outcome}`.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use clap::Args;
use lru::LruCache;
use schema_registry_converter::async_impl::schema_registry::{
    get_schema_by_id, get_schema_by_subject, is_compatible_schema, post_schema, SrSettings,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use schemas::{DecodeError, Telemetry, TelemetryDecoder, WriterSchema};

use crate::config::parse_duration;
use crate::Shutdown;

/// Counter of registry requests, labels `call` (`register`, `lookup`) and `outcome`.
pub const REQUESTS: &str = "fleetstream_schema_registry_requests_total";

/// How long an id the registry does not hold is answered from the cache.
pub const NOT_FOUND_TTL: Duration = Duration::from_secs(10);

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `SCHEMA_REGISTRY_URL` and its credentials, limits and timeouts.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Base URL of a Confluent-compatible schema registry (Confluent: `http://host:8081`;
    /// Apicurio: `http://host:8080/apis/ccompat/v7`). Set: schemas are registered under
    /// `<topic>-value` and written in the Confluent wire format. Unset: Avro single-object
    /// encoding. Either way consumers read both.
    #[arg(long = "schema-registry-url", env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// HTTP basic-auth user of the registry (with `SCHEMA_REGISTRY_PASSWORD`).
    #[arg(long, env = "SCHEMA_REGISTRY_USERNAME")]
    pub schema_registry_username: Option<String>,
    /// HTTP basic-auth password of the registry.
    #[arg(long, env = "SCHEMA_REGISTRY_PASSWORD", hide_env_values = true)]
    pub schema_registry_password: Option<String>,
    /// Writer schemas kept by id. Each is a parsed schema of a few KB; producers rarely use
    /// more than a handful of versions, 1,000 leaves room for many topics' worth.
    #[arg(long, env = "SCHEMA_REGISTRY_CACHE_CAPACITY", default_value_t = 1000)]
    pub schema_registry_cache_capacity: usize,
    /// Time one registry request may take before it counts as the registry being away.
    #[arg(long, env = "SCHEMA_REGISTRY_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub schema_registry_timeout: Duration,
}

/// Why talking to the registry failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid schema registry settings: {0}")]
    Config(String),
    /// The registry could not be reached or answered 5xx (retried by the callers here).
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    #[error("schema id {0} is not in the schema registry")]
    NotFound(u32),
    /// The schema cannot read data written with the subject's latest version, or the registry
    /// refused it (409).
    #[error(
        "schema {schema} is not backward compatible with subject {subject} in the schema \
         registry: {reason}"
    )]
    Incompatible {
        schema: String,
        subject: String,
        reason: String,
    },
    /// Any other refusal (401, 403, 422...): retrying will not change it. The reason carries
    /// the HTTP status.
    #[error("schema registry {registry} refused {what}: {reason}")]
    Refused {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("shut down while waiting for the schema registry")]
    Cancelled,
}

/// What an error answer of the registry means to us.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Not reachable, timed out, or 5xx: ask again later.
    Away,
    NotFound,
    Conflict,
    Other,
}

/// The HTTP status in `schema_registry_converter`'s error text ("... failed with status 404
/// Not Found"): it keeps the status nowhere else.
fn classify(err: &SRCError) -> Answer {
    if err.retriable {
        return Answer::Away;
    }
    let status = err
        .error
        .split("status ")
        .nth(1)
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(404) => Answer::NotFound,
        Some(409) => Answer::Conflict,
        Some(code) if code >= 500 => Answer::Away,
        Some(_) => Answer::Other,
        // No status: the request never got an HTTP answer, or the body was not the JSON we
        // expected from a registry (a proxy's error page): treat as away.
        None => Answer::Away,
    }
}

fn describe(err: &SRCError) -> String {
    match &err.cause {
        Some(cause) => format!("{}: {cause}", err.error),
        None => err.error.clone(),
    }
}

/// A registry client.
#[derive(Debug, Clone)]
pub struct Registry {
    settings: SrSettings,
    url: String,
}

impl Registry {
    /// A client for `args`, or `None` when `SCHEMA_REGISTRY_URL` is unset.
    pub fn from_args(args: &RegistryArgs) -> Result<Option<Self>, RegistryError> {
        let Some(url) = args
            .schema_registry_url
            .as_deref()
            .filter(|u| !u.is_empty())
        else {
            return Ok(None);
        };
        let url = url.trim_end_matches('/').to_owned();
        let mut builder = SrSettings::new_builder(url.clone());
        builder.set_timeout(args.schema_registry_timeout);
        if let Some(user) = &args.schema_registry_username {
            builder.set_basic_authorization(user, args.schema_registry_password.as_deref());
        }
        let settings = builder
            .build()
            .map_err(|err| RegistryError::Config(describe(&err)))?;
        Ok(Some(Self { settings, url }))
    }

    /// The registry's base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Registers `json` (the schema `name`, exactly this text: registries give ids per text)
    /// under `<topic>-value` and returns its id, once it is known to read data written with
    /// the subject's latest version. While the registry is away, waits and asks again (`on_wait`
    /// is called with each failure) until `shutdown`.
    pub async fn register(
        &self,
        topic: &str,
        name: &str,
        json: &str,
        shutdown: &Shutdown,
        mut on_wait: impl FnMut(&RegistryError),
    ) -> Result<u32, RegistryError> {
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.register_once(topic, name, json).await {
                Err(err @ RegistryError::Unavailable(_)) => {
                    metrics::counter!(REQUESTS, "call" => "register", "outcome" => "unavailable")
                        .increment(1);
                    on_wait(&err);
                    tokio::select! {
                        () = shutdown.cancelled() => return Err(RegistryError::Cancelled),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(err) => {
                    metrics::counter!(REQUESTS, "call" => "register", "outcome" => "refused")
                        .increment(1);
                    return Err(err);
                }
                Ok(id) => {
                    metrics::counter!(REQUESTS, "call" => "register", "outcome" => "ok")
                        .increment(1);
                    return Ok(id);
                }
            }
        }
    }

    async fn register_once(
        &self,
        topic: &str,
        name: &str,
        json: &str,
    ) -> Result<u32, RegistryError> {
        let subject = format!("{topic}-value");
        let incompatible = |reason: String| RegistryError::Incompatible {
            schema: name.to_owned(),
            subject: subject.clone(),
            reason,
        };
        let refused = |what: &str, err: &SRCError| RegistryError::Refused {
            registry: self.url.clone(),
            what: format!("{what} of {name} under {subject}"),
            reason: describe(err),
        };
        let ours = Schema::parse_str(json).map_err(|err| RegistryError::Refused {
            registry: self.url.clone(),
            what: format!("schema {name}"),
            reason: err.to_string(),
        })?;
        // Our own BACKWARD check against the latest version, independent of the registry's
        // configured compatibility.
        let strategy = SubjectNameStrategy::TopicNameStrategy(topic.to_owned(), false);
        match get_schema_by_subject(&self.settings, &strategy).await {
            Ok(latest) => {
                let version = latest
                    .version
                    .map_or_else(|| "latest".to_owned(), |v| v.to_string());
                let theirs = Schema::parse_str(&latest.schema).map_err(|err| {
                    incompatible(format!(
                        "version {version} is not an Avro schema we can parse: {err}"
                    ))
                })?;
                SchemaCompatibility::can_read(&theirs, &ours).map_err(|err| {
                    incompatible(format!(
                        "it cannot read data written with version {version} (id {}): {err}",
                        latest.id
                    ))
                })?;
            }
            Err(err) => match classify(&err) {
                Answer::NotFound => {} // a new subject
                Answer::Away => return Err(RegistryError::Unavailable(describe(&err))),
                _ => return Err(refused("reading the latest version", &err)),
            },
        }
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, json.to_owned());
        match is_compatible_schema(&self.settings, subject.clone(), supplied.clone()).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(incompatible(
                    "the registry's compatibility check refused it".to_owned(),
                ))
            }
            Err(err) => match classify(&err) {
                Answer::NotFound => {}
                Answer::Away => return Err(RegistryError::Unavailable(describe(&err))),
                Answer::Conflict => return Err(incompatible(describe(&err))),
                Answer::Other => return Err(refused("the compatibility check", &err)),
            },
        }
        match post_schema(&self.settings, subject.clone(), supplied).await {
            Ok(registered) => Ok(registered.id),
            Err(err) => match classify(&err) {
                Answer::Away => Err(RegistryError::Unavailable(describe(&err))),
                Answer::Conflict => Err(incompatible(describe(&err))),
                Answer::NotFound | Answer::Other => Err(refused("registration", &err)),
            },
        }
    }

    /// The schema text the registry holds for `id`; one request.
    pub async fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        match get_schema_by_id(id, &self.settings).await {
            Ok(registered) if registered.schema_type == SchemaType::Avro => Ok(registered.schema),
            Ok(registered) => Err(RegistryError::Refused {
                registry: self.url.clone(),
                what: format!("schema id {id}"),
                reason: format!("it is a {:?} schema, not Avro", registered.schema_type),
            }),
            Err(err) => match classify(&err) {
                Answer::NotFound => Err(RegistryError::NotFound(id)),
                // 401/403 and the like may be a configuration being fixed: never a reason to
                // dead-letter a message whose id the registry may well know.
                _ => Err(RegistryError::Unavailable(describe(&err))),
            },
        }
    }
}

/// What the cache holds for an id.
#[derive(Debug, Clone)]
enum Cached {
    Writer(Arc<WriterSchema>),
    /// The registry does not hold the id (until the instant), or its schema cannot be read.
    Failed {
        error: Arc<DecodeError>,
        until: Option<Instant>,
    },
}

/// The outcome of [`TelemetryReader::try_decode`].
#[derive(Debug)]
pub enum Decoded {
    /// Decoded, or failed for good.
    Done(Result<Telemetry, DecodeError>),
    /// Confluent framing with this schema id, not cached yet: call
    /// [`TelemetryReader::lookup`] and try again.
    Lookup(u32),
}

/// Decodes telemetry of either framing: single-object and ids mapped in the codec through
/// [`TelemetryDecoder`], other Confluent ids through the registry's writer schema (bounded
/// cache, lookups retried while the registry is away).
#[derive(Debug)]
pub struct TelemetryReader {
    decoder: TelemetryDecoder,
    registry: Option<Registry>,
    cache: Mutex<LruCache<u32, Cached>>,
}

const CONFLUENT_HEADER: usize = 5;

impl TelemetryReader {
    /// A reader over `decoder`; without `registry`, Confluent-framed messages decode only if
    /// their id is mapped in the codec (and otherwise fail as they always did).
    pub fn new(decoder: TelemetryDecoder, registry: Option<Registry>, capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            decoder,
            registry,
            cache: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// Whether a registry is configured.
    pub fn has_registry(&self) -> bool {
        self.registry.is_some()
    }

    /// Decodes `bytes` if that needs no registry request.
    pub fn try_decode(&self, bytes: &[u8]) -> Decoded {
        let Some(id) = self.registry_id(bytes) else {
            return Decoded::Done(self.decoder.decode(bytes));
        };
        let cached = {
            // A poisoned lock only means another thread panicked mid-update of a cache.
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(&id).cloned()
        };
        match cached {
            Some(Cached::Writer(writer)) => Decoded::Done(
                self.decoder
                    .decode_body(&writer, &bytes[CONFLUENT_HEADER..]),
            ),
            Some(Cached::Failed { error, until }) if until.is_none_or(|t| Instant::now() < t) => {
                Decoded::Done(Err(clone_error(&error)))
            }
            _ => Decoded::Lookup(id),
        }
    }

    /// Decodes `bytes`, fetching its writer schema first if needed. `Err(Cancelled)` only on
    /// `shutdown` while the registry is away: the message was not decoded and must not be
    /// treated as handled.
    pub async fn decode(
        &self,
        bytes: &[u8],
        shutdown: &Shutdown,
    ) -> Result<Result<Telemetry, DecodeError>, RegistryError> {
        loop {
            match self.try_decode(bytes) {
                Decoded::Done(result) => return Ok(result),
                Decoded::Lookup(id) => self.lookup(id, shutdown).await?,
            }
        }
    }

    /// Confluent framing with an id the codec does not map, with a registry to ask.
    fn registry_id(&self, bytes: &[u8]) -> Option<u32> {
        self.registry.as_ref()?;
        match schemas::Codec::<Telemetry>::framing(bytes) {
            // Ids mapped by hand in the codec keep working as before.
            Ok(schemas::Framing::Confluent { schema_id })
                if !self.decoder.codec().maps_confluent_id(schema_id) =>
            {
                Some(schema_id)
            }
            _ => None,
        }
    }

    /// Fetches and caches the writer schema of `id`, asking again with backoff while the
    /// registry is away, until `shutdown`.
    pub async fn lookup(&self, id: u32, shutdown: &Shutdown) -> Result<(), RegistryError> {
        let Some(registry) = &self.registry else {
            return Ok(());
        };
        let mut backoff = MIN_BACKOFF;
        let entry = loop {
            match registry.schema_by_id(id).await {
                Ok(json) => {
                    metrics::counter!(REQUESTS, "call" => "lookup", "outcome" => "ok").increment(1);
                    let label = format!("schema registry id {id}");
                    break match self.decoder.codec().writer_schema(&label, &json) {
                        Ok(writer) => Cached::Writer(Arc::new(writer)),
                        Err(err) => {
                            tracing::warn!(schema_id = id, error = %err, "registry schema cannot be read");
                            Cached::Failed {
                                error: Arc::new(DecodeError::UnreadableWriter {
                                    id,
                                    reason: err.to_string(),
                                }),
                                until: None,
                            }
                        }
                    };
                }
                Err(RegistryError::NotFound(_)) => {
                    metrics::counter!(REQUESTS, "call" => "lookup", "outcome" => "not_found")
                        .increment(1);
                    break Cached::Failed {
                        error: Arc::new(DecodeError::NotInRegistry(id)),
                        until: Some(Instant::now() + NOT_FOUND_TTL),
                    };
                }
                Err(err) => {
                    metrics::counter!(REQUESTS, "call" => "lookup", "outcome" => "unavailable")
                        .increment(1);
                    tracing::warn!(schema_id = id, error = %err, retry_in = ?backoff, "schema registry lookup failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return Err(RegistryError::Cancelled),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(id, entry);
        Ok(())
    }
}

/// `DecodeError` is not `Clone` (it is the crate's public error); the two variants cached
/// here are rebuilt.
fn clone_error(err: &DecodeError) -> DecodeError {
    match err {
        DecodeError::NotInRegistry(id) => DecodeError::NotInRegistry(*id),
        DecodeError::UnreadableWriter { id, reason } => DecodeError::UnreadableWriter {
            id: *id,
            reason: reason.clone(),
        },
        other => DecodeError::Body(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(error: &str, retriable: bool) -> SRCError {
        SRCError::new(error, None, retriable)
    }

    #[test]
    fn registry_answers_are_classified_by_http_status() {
        let status = |s: &str| format!("HTTP request to schema registry failed with status {s}");
        assert_eq!(
            classify(&src(&status("404 Not Found"), false)),
            Answer::NotFound
        );
        assert_eq!(
            classify(&src(&status("409 Conflict"), false)),
            Answer::Conflict
        );
        assert_eq!(
            classify(&src(&status("401 Unauthorized"), false)),
            Answer::Other
        );
        assert_eq!(
            classify(&src(&status("500 Internal Server Error"), false)),
            Answer::Away
        );
        assert_eq!(
            classify(&src(&status("503 Service Unavailable"), true)),
            Answer::Away
        );
        assert_eq!(
            classify(&src("http call to schema registry failed", true)),
            Answer::Away
        );
    }
}
