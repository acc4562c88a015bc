//! Argument groups shared by every service, each flag also read from the environment under the
//! same name everywhere. Services `#[command(flatten)]` the groups they need.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// `DATABASE_URL` and pool limits.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL.
    #[arg(long = "database-url", env = "DATABASE_URL")]
    pub database_url: String,
    /// Upper bound of pooled connections (each is one PostgreSQL backend process).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,
    /// How long to wait for a pooled connection before failing a request or batch.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub database_acquire_timeout: Duration,
}

/// Kafka brokers, topic names and extra librdkafka settings.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Comma-separated `host:port` list.
    #[arg(
        long = "kafka-bootstrap-servers",
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub bootstrap_servers: String,
    /// Topic of telemetry readings.
    #[arg(long = "telemetry-topic", env = "TELEMETRY_TOPIC", default_value = schemas::topics::TELEMETRY_TOPIC)]
    pub telemetry_topic: String,
    /// Topic of alert events.
    #[arg(long = "alerts-topic", env = "ALERTS_TOPIC", default_value = schemas::topics::ALERTS_TOPIC)]
    pub alerts_topic: String,
    /// Dead-letter topic of telemetry.
    #[arg(long = "dlq-topic", env = "DLQ_TOPIC", default_value = schemas::topics::TELEMETRY_DLQ_TOPIC)]
    pub dlq_topic: String,
    /// Extra librdkafka properties, `key=value`, comma-separated (e.g. `security.protocol=ssl`).
    #[arg(long = "kafka-option", env = "KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_key_value)]
    pub options: Vec<(String, String)>,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs, traces and the admin (metrics/health) listener.
#[derive(Debug, Clone, Args)]
pub struct ObservabilityArgs {
    /// Log filter, `tracing_subscriber::EnvFilter` syntax.
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// OTLP/HTTP endpoint for traces (e.g. `http://127.0.0.1:4318`); no export when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "ADMIN_LISTEN", default_value = "127.0.0.1:9100")]
    pub admin_listen: SocketAddr,
    /// Instance name in `system_metrics` and logs (defaults to the host name and pid).
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
}

impl ObservabilityArgs {
    /// The instance name: `--instance-id`, or `<hostname>-<pid>`.
    pub fn instance(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Storage layout and policy ages, used where migrations run.
#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// `auto` (TimescaleDB when the server offers it), `timescaledb` or `postgres`.
    #[arg(long, env = "STORAGE_LAYOUT", default_value = "auto")]
    pub storage_layout: String,
    /// Drop telemetry older than this.
    #[arg(long, env = "TELEMETRY_RETENTION", default_value = "90d", value_parser = parse_duration)]
    pub telemetry_retention: Duration,
    /// Drop system metrics older than this.
    #[arg(long, env = "SYSTEM_METRICS_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub system_metrics_retention: Duration,
    /// TimescaleDB: compress telemetry chunks older than this (~0.6 TB/day uncompressed at
    /// 20k msg/s, so the default is one day).
    #[arg(long, env = "TELEMETRY_COMPRESS_AFTER", default_value = "1d", value_parser = parse_duration)]
    pub telemetry_compress_after: Duration,
    /// TimescaleDB: time range of each new telemetry chunk. One compression job compresses
    /// one chunk: at 20k msg/s a 1-day chunk holds 1.7 billion readings, and a shorter
    /// interval spreads that work out (README: sizing chunks).
    #[arg(long, env = "TELEMETRY_CHUNK_INTERVAL", default_value = "1d", value_parser = parse_duration)]
    pub telemetry_chunk_interval: Duration,
    /// Plain PostgreSQL: daily partitions created ahead of today.
    #[arg(long, env = "PARTITIONS_AHEAD_DAYS", default_value_t = 3)]
    pub partitions_ahead_days: u32,
}

impl StorageArgs {
    /// As the options the migrator takes.
    pub fn options(&self) -> Result<schemas::StorageOptions, schemas::StorageError> {
        Ok(schemas::StorageOptions {
            layout: self.storage_layout.parse()?,
            telemetry_retention: self.telemetry_retention,
            system_metrics_retention: self.system_metrics_retention,
            compress_after: self.telemetry_compress_after,
            chunk_interval: self.telemetry_chunk_interval,
            partitions_ahead_days: self.partitions_ahead_days,
        })
    }
}

/// Parses `250ms`, `10s`, `5m`, `2h`, `90d` (a bare number is seconds).
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let input = input.trim();
    let split = input
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(input.len());
    let (number, unit) = input.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{input}` is not a duration (examples: 250ms, 10s, 5m, 2h, 90d)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{input}` (use ms, s, m, h or d)"
            ))
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("`{input}` is not a non-negative duration"));
    }
    // `from_secs_f64` panics past `Duration::MAX`; a value that large is a typo, not a setting.
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{input}` is too long a duration"))
}

fn parse_key_value(input: &str) -> Result<(String, String), String> {
    let (key, value) = input
        .split_once('=')
        .ok_or_else(|| format!("`{input}` is not key=value"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("`{input}` has an empty key"));
    }
    Ok((key.to_owned(), value.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Sample {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        storage: StorageArgs,
    }

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(
            parse_duration("99999999999999999999999d"),
            Err("`99999999999999999999999d` is too long a duration".to_owned())
        );
    }

    #[test]
    fn a_sample_command_line_parses_into_groups() {
        let parsed = Sample::try_parse_from([
            "svc",
            "--kafka-bootstrap-servers",
            "k1:9092,k2:9092",
            "--telemetry-topic",
            "t",
            "--kafka-option",
            "linger.ms=5,compression.type=lz4",
            "--storage-layout",
            "postgres",
            "--telemetry-retention",
            "7d",
        ])
        .unwrap();
        assert_eq!(parsed.kafka.bootstrap_servers, "k1:9092,k2:9092");
        assert_eq!(parsed.kafka.telemetry_topic, "t");
        assert_eq!(parsed.kafka.alerts_topic, "alerts.v1");
        assert_eq!(
            parsed.kafka.options,
            vec![
                ("linger.ms".to_owned(), "5".to_owned()),
                ("compression.type".to_owned(), "lz4".to_owned())
            ]
        );
        let options = parsed.storage.options().unwrap();
        assert_eq!(options.layout, schemas::LayoutChoice::Postgres);
        assert_eq!(options.telemetry_retention, Duration::from_secs(7 * 86_400));
    }
}
