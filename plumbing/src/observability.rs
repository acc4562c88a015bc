//! Logs, traces and metrics set up once per process.
//!
//! * `tracing` to stderr (text or JSON), filtered by `RUST_LOG`;
//! * spans exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, with the W3C
//!   trace-context propagator installed so `traceparent` headers link spans across services;
//! * a global Prometheus recorder for the `metrics` facade, rendered by `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, ObservabilityArgs};
use crate::Error;

/// Histogram buckets for latencies in seconds: 0.5 ms to 30 s, finer between 50 ms and 1 s
/// where the pipeline's latency targets lie (alert p99 < 50 ms, ingest→commit p99 < 250 ms,
/// aim 100 ms).
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Histogram buckets for counts of rows or messages per batch.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 25000.0, 50000.0, 100000.0,
];

/// Flushes and shuts down the trace exporter when dropped; keep it alive in `main`.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(err) = provider.shutdown() {
                eprintln!("opentelemetry shutdown: {err}");
            }
        }
    }
}

/// Installs the tracing subscriber (and OTLP export when configured) for `service`.
pub fn init_telemetry(
    service: &'static str,
    args: &ObservabilityArgs,
) -> Result<TelemetryGuard, Error> {
    let filter = EnvFilter::try_new(&args.log_filter).map_err(|err| Error::Config {
        name: "RUST_LOG",
        reason: err.to_string(),
    })?;
    let fmt_layer = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let (otel_layer, provider) = match &args.otel_exporter_otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|err| Error::Telemetry(err.to_string()))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service)
                        .build(),
                )
                .build();
            let tracer = provider.tracer(service);
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(provider),
            )
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|err| Error::Telemetry(err.to_string()))?;
    Ok(TelemetryGuard { provider })
}

static PROMETHEUS: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use (services running in one test
/// process share it).
pub fn prometheus() -> Result<PrometheusHandle, Error> {
    PROMETHEUS
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_rows".to_owned()), SIZE_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_messages".to_owned()), SIZE_BUCKETS)
                })
                .and_then(|b| b.install_recorder())
                .map_err(|err| err.to_string())
        })
        .clone()
        .map_err(Error::Telemetry)
}

/// Links `span` to the trace named by a W3C `traceparent` value (from a Kafka header), so a
/// batch span shows which ingest request it carried. Invalid values are ignored.
pub fn link_traceparent(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let mut carrier = std::collections::HashMap::with_capacity(1);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    let remote = context.span().span_context().clone();
    if remote.is_valid() {
        span.add_link(remote);
    }
}
