//! Test support: each test gets a freshly created, migrated database and uniquely named
//! topics, and removes them when dropped.
//!
//! Where the servers come from, in order:
//! 1. `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS` (what `deploy/local/deps.sh up` prints; CI
//!    sets them). `DATABASE_URL` must name a role that may create databases and roles.
//! 2. Otherwise, when a Docker engine answers, testcontainers starts a TimescaleDB and an
//!    Apache Kafka container once per test process.
//! 3. Otherwise the test fails with a message saying how to start them.
//!
//! Tests that stop or restart the broker use a [`PrivateKafka`] of their own instead.

use std::time::Duration;

use anyhow::{bail, Context};
use rand::Rng;
use schemas::{Layout, LayoutChoice, StorageOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;

use crate::config::KafkaArgs;

mod kafka_broker;
pub mod registry;

pub use kafka_broker::PrivateKafka;

const HOW_TO_START: &str = "no PostgreSQL/Kafka for tests: set DATABASE_URL and \
KAFKA_BOOTSTRAP_SERVERS (run `eval \"$(deploy/local/deps.sh env)\"` after \
`deploy/local/deps.sh up`), or run the tests where a Docker engine is available";

#[derive(Debug, Clone)]
struct Servers {
    database_url: String,
    kafka_bootstrap: String,
}

static SERVERS: OnceCell<Servers> = OnceCell::const_new();

async fn servers() -> anyhow::Result<&'static Servers> {
    SERVERS
        .get_or_try_init(|| async {
            match (
                std::env::var("DATABASE_URL").ok().filter(|v| !v.is_empty()),
                std::env::var("KAFKA_BOOTSTRAP_SERVERS")
                    .ok()
                    .filter(|v| !v.is_empty()),
            ) {
                (Some(database_url), Some(kafka_bootstrap)) => Ok(Servers {
                    database_url,
                    kafka_bootstrap,
                }),
                _ if docker_available() => containers::start().await,
                _ => bail!(HOW_TO_START),
            }
        })
        .await
}

fn docker_available() -> bool {
    std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

mod containers {
    //! Fallback servers in containers, started once and kept for the test process.
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{ContainerAsync, GenericImage, ImageExt};
    use tokio::sync::OnceCell;

    use super::Servers;

    static KEEP: OnceCell<(ContainerAsync<GenericImage>, ContainerAsync<GenericImage>)> =
        OnceCell::const_new();

    pub(super) async fn start() -> anyhow::Result<Servers> {
        let postgres = GenericImage::new("timescale/timescaledb", "2.21.3-pg17")
            .with_exposed_port(5432.tcp())
            .with_wait_for(WaitFor::message_on_stderr(
                "database system is ready to accept connections",
            ))
            .with_env_var("POSTGRES_USER", "fleet")
            .with_env_var("POSTGRES_PASSWORD", "fleet")
            .with_env_var("POSTGRES_DB", "fleetstream")
            .start()
            .await?;
        let pg_port = postgres.get_host_port_ipv4(5432.tcp()).await?;
        // The broker must advertise the address clients reach it on, so the host port is
        // chosen up front instead of read back after start.
        let kafka_port = portpicker()?;
        let kafka = GenericImage::new("apache/kafka", "4.1.1")
            .with_wait_for(WaitFor::message_on_stdout("Kafka Server started"))
            .with_mapped_port(kafka_port, 9092.tcp())
            .with_env_var("KAFKA_NODE_ID", "1")
            .with_env_var("KAFKA_PROCESS_ROLES", "broker,controller")
            .with_env_var(
                "KAFKA_LISTENERS",
                "PLAINTEXT://0.0.0.0:9092,CONTROLLER://localhost:9093",
            )
            .with_env_var(
                "KAFKA_ADVERTISED_LISTENERS",
                format!("PLAINTEXT://127.0.0.1:{kafka_port}"),
            )
            .with_env_var("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
            .with_env_var(
                "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            )
            .with_env_var("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
            .with_env_var("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
            .with_env_var("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
            .with_env_var("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
            .with_env_var("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
            .start()
            .await?;
        let servers = Servers {
            database_url: format!("postgres://fleet:fleet@127.0.0.1:{pg_port}/fleetstream"),
            kafka_bootstrap: format!("127.0.0.1:{kafka_port}"),
        };
        let _ = KEEP.set((postgres, kafka));
        Ok(servers)
    }

    fn portpicker() -> anyhow::Result<u16> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(listener.local_addr()?.port())
    }
}

/// A unique lowercase name with `prefix`, safe as a database or topic name.
pub fn unique_name(prefix: &str) -> String {
    let suffix: u64 = rand::rng().random();
    format!("{prefix}_{:x}_{suffix:016x}", std::process::id())
}

/// The server's admin URL (the one databases are created from).
pub async fn admin_database_url() -> anyhow::Result<String> {
    Ok(servers().await?.database_url.clone())
}

/// Kafka settings pointing at the test broker.
pub async fn kafka_args() -> anyhow::Result<KafkaArgs> {
    Ok(KafkaArgs {
        bootstrap_servers: servers().await?.kafka_bootstrap.clone(),
        telemetry_topic: schemas::topics::TELEMETRY_TOPIC.to_owned(),
        alerts_topic: schemas::topics::ALERTS_TOPIC.to_owned(),
        dlq_topic: schemas::topics::TELEMETRY_DLQ_TOPIC.to_owned(),
        options: Vec::new(),
    })
}

/// Every layout this server can run: plain PostgreSQL always, TimescaleDB when offered.
pub async fn available_layouts() -> anyhow::Result<Vec<LayoutChoice>> {
    let mut conn = PgConnection::connect(&admin_database_url().await?)
        .await
        .context("connecting to DATABASE_URL")?;
    let mut layouts = vec![LayoutChoice::Postgres];
    if schemas::storage::timescaledb_available(&mut conn).await? {
        layouts.push(LayoutChoice::TimescaleDb);
    }
    Ok(layouts)
}

/// A freshly created and migrated database, dropped (with its connections) when this value
/// is dropped.
#[derive(Debug)]
pub struct TestDb {
    /// Pool connected as the migration owner.
    pub pool: PgPool,
    /// URL of this database, as the migration owner.
    pub url: String,
    /// Database name.
    pub name: String,
    /// The layout it was migrated to.
    pub layout: Layout,
    admin_url: String,
}

impl TestDb {
    /// A new database migrated to `layout` with default storage options.
    pub async fn new(layout: LayoutChoice) -> anyhow::Result<Self> {
        Self::with_options(StorageOptions {
            layout,
            ..StorageOptions::default()
        })
        .await
    }

    /// A new database migrated with `options`.
    pub async fn with_options(options: StorageOptions) -> anyhow::Result<Self> {
        let admin_url = admin_database_url().await?;
        let name = unique_name("fleet_test");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .context("connecting to DATABASE_URL")?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await?;
        let connect: PgConnectOptions = admin_url.parse::<PgConnectOptions>()?.database(&name);
        let url = connect.to_url_lossy().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(connect)
            .await?;
        let layout = schemas::migrate(&pool, &options)
            .await
            .with_context(|| format!("migrating {name}"))?;
        Ok(TestDb {
            pool,
            url,
            name,
            layout,
            admin_url,
        })
    }

    /// A new login role in `fleet_writer` (roles are cluster-wide; it is dropped with the
    /// returned value), with the URL of this database as that role.
    pub async fn writer_login(&self, prefix: &str) -> anyhow::Result<WriterLogin> {
        let name = unique_name(prefix);
        sqlx::query(&format!(
            "CREATE ROLE \"{name}\" LOGIN PASSWORD 'writer-login' IN ROLE fleet_writer"
        ))
        .execute(&self.pool)
        .await
        .context("creating a login role")?;
        let url = self
            .url
            .parse::<PgConnectOptions>()?
            .username(&name)
            .password("writer-login")
            .to_url_lossy()
            .to_string();
        Ok(WriterLogin {
            url,
            name,
            admin_url: self.admin_url.clone(),
        })
    }

    /// A pool whose connections act as `role` (via `SET ROLE`), at most `max` of them.
    /// With `max = 1` every transaction reuses the same server connection.
    pub async fn role_pool(&self, role: &'static str, max: u32) -> anyhow::Result<PgPool> {
        let connect: PgConnectOptions = self.url.parse()?;
        Ok(PgPoolOptions::new()
            .max_connections(max)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    sqlx::query(&format!("SET ROLE {role}"))
                        .execute(conn)
                        .await?;
                    Ok(())
                })
            })
            .connect_with(connect)
            .await?)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop_database(&self.admin_url, &self.name);
    }
}

/// Drops database `name` WITH (FORCE), which ends its connections server-side.
fn drop_database(admin_url: &str, name: &str) {
    run_as_admin(
        admin_url,
        format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
    );
}

/// Runs `statement` on a fresh admin connection, ignoring errors (clean-up). Drop may run on
/// the test's own (blocked) runtime, whose reactor a pool's sockets belong to, so no pool is
/// used: a short-lived runtime on its own thread runs the statement.
fn run_as_admin(admin_url: &str, statement: String) {
    let admin_url = admin_url.to_owned();
    let cleanup = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(runtime) = runtime {
            runtime.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&statement).execute(&mut admin).await;
                }
            });
        }
    });
    let _ = cleanup.join();
}

/// A login role that is a member of `fleet_writer`, dropped when this value is dropped.
#[derive(Debug)]
pub struct WriterLogin {
    /// `db`'s URL, connecting as this role.
    pub url: String,
    /// The role's name.
    pub name: String,
    admin_url: String,
}

impl Drop for WriterLogin {
    fn drop(&mut self) {
        run_as_admin(
            &self.admin_url,
            format!("DROP ROLE IF EXISTS \"{}\"", self.name),
        );
    }
}

/// A freshly created database with nothing in it (not migrated), dropped when this value is
/// dropped: what a service meets when nobody ran the migrations.
#[derive(Debug)]
pub struct EmptyDb {
    /// URL of this database, as the owner of the test server.
    pub url: String,
    name: String,
    admin_url: String,
}

impl EmptyDb {
    pub async fn new() -> anyhow::Result<Self> {
        let admin_url = admin_database_url().await?;
        let name = unique_name("fleet_empty");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .context("connecting to DATABASE_URL")?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await?;
        let url = admin_url
            .parse::<PgConnectOptions>()?
            .database(&name)
            .to_url_lossy()
            .to_string();
        Ok(EmptyDb {
            url,
            name,
            admin_url,
        })
    }
}

impl Drop for EmptyDb {
    fn drop(&mut self) {
        drop_database(&self.admin_url, &self.name);
    }
}

/// A service binary run by a test: killed when dropped (a failing test leaves no process
/// behind), its stderr in a file the test reads.
#[derive(Debug)]
pub struct ServiceProcess {
    child: std::process::Child,
    stderr: std::path::PathBuf,
    name: String,
}

impl ServiceProcess {
    /// Spawns `command` (stdin and stdout null, stderr to a temporary file).
    pub fn spawn(mut command: std::process::Command, name: &str) -> anyhow::Result<Self> {
        let stderr = std::env::temp_dir().join(format!("{}.stderr", unique_name(name)));
        let file = std::fs::File::create(&stderr)?;
        let child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(file))
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(ServiceProcess {
            child,
            stderr,
            name: name.to_owned(),
        })
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Polls until the process exits, at most `within`.
    pub async fn exit_status(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let child = &mut self.child;
        eventually(&format!("{} to exit", self.name), within, || {
            let polled = child.try_wait();
            async move {
                match polled {
                    Ok(Some(status)) => Ok(status),
                    Ok(None) => Err("still running".to_owned()),
                    Err(err) => Err(err.to_string()),
                }
            }
        })
        .await
    }

    /// Waits (at most `within`) for the process to exit unsuccessfully; its stderr.
    pub async fn failure(&mut self, within: Duration) -> anyhow::Result<String> {
        let status = self.exit_status(within).await?;
        let stderr = self.stderr();
        anyhow::ensure!(
            !status.success(),
            "{} exited with {status}; stderr:\n{stderr}",
            self.name
        );
        Ok(stderr)
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// Uniquely named topics on the test broker, deleted when this value is dropped.
#[derive(Debug)]
pub struct TestTopics {
    /// Kafka settings with `telemetry_topic`, `alerts_topic` and `dlq_topic` set to this
    /// test's topics.
    pub args: KafkaArgs,
    created: Vec<String>,
}

impl TestTopics {
    /// Creates a telemetry, an alerts and a DLQ topic for this test.
    pub async fn new(telemetry_partitions: i32) -> anyhow::Result<Self> {
        Self::on(kafka_args().await?, telemetry_partitions).await
    }

    /// The same topics on the broker `args` points at (e.g. a [`PrivateKafka`]); the topic
    /// names in `args` are replaced.
    pub async fn on(mut args: KafkaArgs, telemetry_partitions: i32) -> anyhow::Result<Self> {
        let base = unique_name("t");
        args.telemetry_topic = format!("{base}.telemetry");
        args.alerts_topic = format!("{base}.alerts");
        args.dlq_topic = format!("{base}.telemetry.dlq");
        let topics = [
            (args.telemetry_topic.as_str(), telemetry_partitions),
            (args.alerts_topic.as_str(), telemetry_partitions),
            (args.dlq_topic.as_str(), 1),
        ];
        crate::kafka::ensure_topics(&args, &topics).await?;
        let created = topics.iter().map(|(t, _)| (*t).to_owned()).collect();
        Ok(TestTopics { args, created })
    }
}

impl Drop for TestTopics {
    fn drop(&mut self) {
        let args = self.args.clone();
        let topics = std::mem::take(&mut self.created);
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                let _ = runtime.block_on(crate::kafka::delete_topics(&args, &names));
            }
        });
        let _ = cleanup.join();
    }
}

/// Polls `probe` until it returns `Ok`, or fails after `within` naming `what` and the last
/// thing the probe saw (its `Err` text). The interval starts at 10 ms and doubles up to 200 ms,
/// so fast conditions are seen quickly and slow ones are not polled hard.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut interval = Duration::from_millis(10);
    loop {
        let last = match probe().await {
            Ok(value) => return Ok(value),
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(200));
    }
}

/// `group`'s offsets committed to Kafka for partitions `0..partitions` of the telemetry topic,
/// as a lag tool reads them (without joining the group): `(partition, offset)`, -1 where none.
/// Blocking (a metadata round trip).
pub fn kafka_committed(
    args: &KafkaArgs,
    group: &str,
    partitions: i32,
) -> anyhow::Result<Vec<(i32, i64)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let lag_tool: BaseConsumer = crate::kafka::consumer_config(args, "lag-tool", group).create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        tpl.add_partition(&args.telemetry_topic, partition);
    }
    let committed = lag_tool.committed_offsets(tpl, Duration::from_secs(5))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => (e.partition(), o),
            _ => (e.partition(), -1),
        })
        .collect())
}

/// The partition Kafka's Java client (default partitioner) picks for `key`:
/// `toPositive(murmur2(key)) % partitions` ([`crate::kafka::partition_for_key`], checked
/// against Kafka's own test vectors below), the reference librdkafka's placement is tested
/// against.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    crate::kafka::partition_for_key(key, partitions)
}

/// Kafka's `Utils.murmur2`.
pub fn java_murmur2(data: &[u8]) -> i32 {
    crate::kafka::murmur2(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_value_or_names_what_it_waited_for() {
        let mut calls = 0;
        let value = eventually("third call", Duration::from_secs(5), || {
            calls += 1;
            let n = calls;
            async move {
                if n >= 3 {
                    Ok(n)
                } else {
                    Err(format!("call {n}"))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(value, 3);
        let err = eventually::<(), _, _>("never", Duration::from_millis(30), || async {
            Err("nope".to_owned())
        })
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("waiting for never; last: nope"),
            "{err}"
        );
    }
}
