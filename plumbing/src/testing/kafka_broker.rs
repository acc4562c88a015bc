//! A Kafka broker of the test's own, for tests that stop and restart the broker: the shared
//! one (`KAFKA_BOOTSTRAP_SERVERS`) serves every test running in parallel and must never go
//! down under them.
//!
//! [`PrivateKafka`] runs a one-node KRaft cluster (broker and controller in one JVM) from the
//! jars `deploy/local/deps.sh up` fetched, with the same `server.properties` template deps.sh
//! renders (ports and data directory replaced, thread pools trimmed), in a temporary
//! directory, on two free ports. `stop` and `kill` end the JVM; `start` brings it back on the
//! same ports with the same data, so clients configured with its address reconnect by
//! themselves. Dropping it kills the JVM and removes the directory; a watchdog process does
//! the same if the test process dies without dropping it (killed by a timeout, SIGKILL).
//!
//! Where things are found:
//! * jars: `FLEETSTREAM_KAFKA_LIBS` (exported by `deps.sh env`), otherwise
//!   `$FLEETSTREAM_CACHE/kafka-<version>/libs` (default cache `/var/cache/fleetstream`, the
//!   version from `deploy/kafka/pom.xml`), exactly where deps.sh puts them;
//! * Java ≥ 17: `$JAVA_HOME/bin/java`, `java` on `PATH`, or `/usr/lib/jvm/java-*/bin/java`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::KafkaArgs;

/// The repository's `deploy/` directory (this crate lives one level below the root).
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// How long a start may take (a JVM on a busy 2-core machine) before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `stop` waits after SIGTERM for the controlled shutdown before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Heap of the private broker: small, other tests and services share the machine.
const HEAP: &str = "-Xmx512m";

/// A one-node Kafka cluster owned by one test; see the module documentation.
#[derive(Debug)]
pub struct PrivateKafka {
    /// Temporary directory: `server.properties`, `data/`, `logs/`, `kafka.out`.
    dir: PathBuf,
    /// Client listener (PLAINTEXT), fixed for the broker's lifetime.
    port: u16,
    /// KRaft controller listener.
    controller_port: u16,
    java: PathBuf,
    libs: PathBuf,
    /// The running JVM; `None` while stopped.
    child: Option<Child>,
    /// Kills the JVM and removes `dir` should this process die without dropping `self` (a
    /// test killed by a timeout): `tail --pid` on this process, then `kill -KILL` of the JVM,
    /// in a process group of its own so it can be ended as a whole.
    watchdog: Option<Child>,
}

impl PrivateKafka {
    /// Formats storage in a new temporary directory, starts the broker and waits until it
    /// serves metadata.
    pub async fn new() -> anyhow::Result<Self> {
        let java = find_java()?;
        let libs = kafka_libs()?;
        let dir = std::env::temp_dir().join(super::unique_name("fleetstream_kafka"));
        std::fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::create_dir_all(dir.join("logs"))?;
        let mut kafka = PrivateKafka {
            dir,
            port: free_port()?,
            controller_port: free_port()?,
            java,
            libs,
            child: None,
            watchdog: None,
        };
        kafka.write_config()?;
        kafka.format().await?;
        kafka.start().await?;
        Ok(kafka)
    }

    /// `host:port` of the broker, the same across restarts.
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kafka settings pointing at this broker, with the default topic names.
    pub fn kafka_args(&self) -> KafkaArgs {
        KafkaArgs {
            bootstrap_servers: self.bootstrap_servers(),
            telemetry_topic: schemas::topics::TELEMETRY_TOPIC.to_owned(),
            alerts_topic: schemas::topics::ALERTS_TOPIC.to_owned(),
            dlq_topic: schemas::topics::TELEMETRY_DLQ_TOPIC.to_owned(),
            options: Vec::new(),
        }
    }

    /// Whether the JVM is running (started and not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts the broker (again) on the same ports and data directory and waits until it
    /// serves metadata. Does nothing if it is running.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        // Ended by itself (or never started): its watchdog must not outlive it.
        self.forget_jvm();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kafka.out"))?;
        let child = Command::new(&self.java)
            .arg("-Xms128m")
            .arg(HEAP)
            // As deps.sh's broker, plus C1 only: a JVM that lives for one test never profits
            // from C2, and its compile threads compete for the 2 cores with everything else.
            .args([
                "-server",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:+ExplicitGCInvokesConcurrent",
                "-XX:TieredStopAtLevel=1",
                "-Xshare:auto",
                "-Djava.awt.headless=true",
            ])
            .arg(format!(
                "-Dkafka.logs.dir={}",
                self.dir.join("logs").display()
            ))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                deploy_dir().join("kafka/log4j2.yaml").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", self.java.display()))?;
        let jvm = child.id();
        self.child = Some(child);
        self.watchdog = Command::new("sh")
            .args([
                "-c",
                "tail --pid=\"$1\" -f /dev/null 2>/dev/null; kill -KILL \"$2\" 2>/dev/null; \
                 sleep 1; rm -rf \"$3\"",
                "private-kafka-watchdog",
                &std::process::id().to_string(),
                &jvm.to_string(),
            ])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
        self.wait_ready().await
    }

    /// SIGTERM (a controlled shutdown), then waits for the JVM to exit; SIGKILL if it has not
    /// after 30 s.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(pid) = self.running_pid() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() && self.is_running() {
            bail!("kill -TERM {pid} failed");
        }
        let exited = super::eventually(
            "the private broker to exit after SIGTERM",
            STOP_TIMEOUT,
            || {
                let running = self.is_running();
                async move {
                    if running {
                        Err("still running".to_owned())
                    } else {
                        Ok(())
                    }
                }
            },
        )
        .await;
        if exited.is_err() {
            self.kill();
        }
        self.forget_jvm();
        Ok(())
    }

    /// Kills the JVM at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.forget_jvm();
    }

    /// After the JVM ended: drops its handle and ends its watchdog.
    fn forget_jvm(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.try_wait();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", watchdog.id())])
                .stderr(Stdio::null())
                .status();
            let _ = watchdog.wait();
        }
    }

    /// The last lines of the broker's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for name in ["logs/kafka.log", "kafka.out"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(name)) {
                let all: Vec<&str> = text.lines().collect();
                let from = all.len().saturating_sub(lines);
                out.push_str(&format!("--- {name}\n{}\n", all[from..].join("\n")));
            }
        }
        out
    }

    /// Process id of the JVM while it runs.
    pub fn running_pid(&mut self) -> Option<u32> {
        if self.is_running() {
            self.child.as_ref().map(Child::id)
        } else {
            None
        }
    }

    /// deps.sh's template with this broker's ports and directory, and smaller thread pools
    /// (later keys win in a Java properties file).
    fn write_config(&self) -> anyhow::Result<()> {
        let template_path = deploy_dir().join("kafka/server.properties");
        let template = std::fs::read_to_string(&template_path)
            .with_context(|| format!("reading {}", template_path.display()))?;
        for needle in ["127.0.0.1:9092", "127.0.0.1:9093", "@LOG_DIRS@"] {
            if !template.contains(needle) {
                bail!("{} no longer contains {needle}", template_path.display());
            }
        }
        let mut config = template
            .replace("127.0.0.1:9092", &format!("127.0.0.1:{}", self.port))
            .replace(
                "127.0.0.1:9093",
                &format!("127.0.0.1:{}", self.controller_port),
            )
            .replace("@LOG_DIRS@", &self.dir.join("data").display().to_string());
        config.push_str(
            "\n# Private test broker (plumbing::testing::PrivateKafka): fewer threads.\n\
             num.network.threads=1\nnum.io.threads=2\nbackground.threads=2\n",
        );
        std::fs::write(self.dir.join("server.properties"), config)?;
        Ok(())
    }

    /// `kafka-storage format`, as deps.sh runs it (a short-lived JVM).
    async fn format(&self) -> anyhow::Result<()> {
        let mut command = tokio::process::Command::new(&self.java);
        command
            .args([
                "-Xms32m",
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Xshare:auto",
                "-Djava.awt.headless=true",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                deploy_dir().join("kafka/tools-log4j2.yaml").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .args([
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                "-t",
            ])
            .arg(cluster_id())
            .arg("-c")
            .arg(self.dir.join("server.properties"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = command.output().await.context("running kafka-storage")?;
        if !output.status.success() {
            bail!(
                "kafka-storage format failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Polls a metadata request until the broker lists itself; fails early if the JVM exits.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let bootstrap = self.bootstrap_servers();
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("client.id", "fleetstream-private-kafka-probe")
            .set("socket.connection.setup.timeout.ms", "2000")
            .set("reconnect.backoff.max.ms", "500")
            .create()?;
        let client = std::sync::Arc::new(client);
        let ready = super::eventually(
            &format!("the private broker on {bootstrap}"),
            START_TIMEOUT,
            || {
                let running = self.is_running();
                let client = client.clone();
                async move {
                    if !running {
                        // Not worth polling on: report at once (caught below).
                        return Ok(false);
                    }
                    let metadata = tokio::task::spawn_blocking(move || {
                        client
                            .fetch_metadata(None, Duration::from_secs(2))
                            .map(|m| m.brokers().len())
                    })
                    .await
                    .map_err(|err| err.to_string())?;
                    match metadata {
                        Ok(brokers) if brokers > 0 => Ok(true),
                        Ok(_) => Err("no broker registered yet".to_owned()),
                        Err(err) => Err(err.to_string()),
                    }
                }
            },
        )
        .await;
        match ready {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.forget_jvm();
                bail!(
                    "the private broker exited during startup\n{}",
                    self.log_tail(30)
                )
            }
            Err(err) => bail!("{err}\n{}", self.log_tail(30)),
        }
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on right now (the broker binds it shortly after).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A KRaft cluster id: 16 random bytes, URL-safe base64 without padding, as
/// `kafka-storage random-uuid` prints (never starting with `-`, which would read as a flag).
fn cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    let mut bits: u32 = 0;
    let mut held = 0;
    let mut out = String::with_capacity(22);
    for byte in bytes {
        bits = (bits << 8) | u32::from(byte);
        held += 8;
        while held >= 6 {
            held -= 6;
            out.push(ALPHABET[((bits >> held) & 63) as usize] as char);
        }
    }
    if held > 0 {
        out.push(ALPHABET[((bits << (6 - held)) & 63) as usize] as char);
    }
    if out.starts_with('-') {
        out.replace_range(0..1, "A");
    }
    out
}

fn find_java() -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(home) = std::env::var_os("JAVA_HOME").filter(|h| !h.is_empty()) {
        candidates.push(PathBuf::from(home).join("bin/java"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("java")));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/jvm") {
        let mut jvms: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path().join("bin/java"))
            .collect();
        jvms.sort();
        candidates.extend(jvms.into_iter().rev());
    }
    candidates
        .into_iter()
        .find(|c| c.is_file())
        .context("no java found (JAVA_HOME, PATH, /usr/lib/jvm): run deploy/local/deps.sh up")
}

/// The Kafka jars deps.sh fetched; see the module documentation.
fn kafka_libs() -> anyhow::Result<PathBuf> {
    let libs = match std::env::var_os("FLEETSTREAM_KAFKA_LIBS").filter(|v| !v.is_empty()) {
        Some(libs) => PathBuf::from(libs),
        None => {
            let pom_path = deploy_dir().join("kafka/pom.xml");
            let pom = std::fs::read_to_string(&pom_path)
                .with_context(|| format!("reading {}", pom_path.display()))?;
            // The property's own line (the file's comments mention the tag too).
            let version = pom
                .lines()
                .filter_map(|line| {
                    line.trim()
                        .strip_prefix("<kafka.version>")?
                        .strip_suffix("</kafka.version>")
                })
                .map(|version| version.trim().to_owned())
                .next()
                .with_context(|| format!("no <kafka.version> in {}", pom_path.display()))?;
            let cache = std::env::var_os("FLEETSTREAM_CACHE")
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from("/var/cache/fleetstream"), PathBuf::from);
            cache.join(format!("kafka-{version}/libs"))
        }
    };
    if !libs.join(".fleetstream-complete").is_file() {
        bail!(
            "no complete Kafka download in {} (run deploy/local/deps.sh up, or set \
             FLEETSTREAM_KAFKA_LIBS)",
            libs.display()
        );
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    use super::*;

    #[tokio::test]
    async fn a_stopped_broker_starts_again_on_the_same_port_with_its_data() {
        let mut kafka = PrivateKafka::new().await.unwrap();
        let topics = super::super::TestTopics::on(kafka.kafka_args(), 1)
            .await
            .unwrap();
        let producer: FutureProducer =
            crate::kafka::producer_config(&topics.args, "private-kafka-test")
                .create()
                .unwrap();
        producer
            .send(
                FutureRecord::to(&topics.args.telemetry_topic)
                    .key("k")
                    .payload("before the restart"),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| err)
            .unwrap();

        kafka.stop().await.unwrap();
        assert!(!kafka.is_running());
        assert!(std::net::TcpStream::connect(kafka.bootstrap_servers()).is_err());

        kafka.start().await.unwrap();
        assert!(kafka.is_running());
        producer
            .send(
                FutureRecord::to(&topics.args.telemetry_topic)
                    .key("k")
                    .payload("after the restart"),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(err, _)| err)
            .unwrap();
        let consumer: BaseConsumer = crate::kafka::base_config(&topics.args, "private-kafka-test")
            .create()
            .unwrap();
        let watermarks = tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topics.args.telemetry_topic, 0, Duration::from_secs(10))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(watermarks, (0, 2));
    }

    #[test]
    fn cluster_ids_look_like_kafka_storage_random_uuid() {
        for _ in 0..200 {
            let id = cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(!id.starts_with('-'), "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{id}"
            );
        }
    }
}
