//! A private Kafka-compatible broker (`tansu`) on a free port, its records
//! kept in a private S3 (moto), so a restarted broker still has them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::moto::Moto;

/// The tansu binary: `$TANSU`, else on PATH, else in cargo's bin folder.
fn tansu_binary() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU") {
        return PathBuf::from(path);
    }
    let cargo_bin = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin/tansu"))
        .unwrap_or_default();
    if cargo_bin.exists() {
        return cargo_bin;
    }
    PathBuf::from("tansu")
}

/// A running broker; stopped when dropped.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    storage: Moto,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a broker on a free port, storing its records in a new moto bucket.
    pub fn start() -> Self {
        let port = super::free_port();
        let storage = Moto::start();
        storage.create_bucket("tansu");
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker {
            child: None,
            port,
            storage,
            log: dir.path().join("tansu.log"),
            _dir: dir,
        };
        broker.run();
        broker
    }

    fn run(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(tansu_binary())
            .args([
                "broker",
                "--storage-engine",
                &std::env::var("TEST_TANSU_STORAGE").unwrap_or("s3://tansu/".into()),
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .envs(self.storage.env())
            .env("AWS_ENDPOINT", &self.storage.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env(
                "RUST_LOG",
                std::env::var("TEST_TANSU_LOG").unwrap_or("warn".into()),
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start the Kafka-compatible broker tansu ({e}): install it with \
                     `cargo install tansu --locked --version 0.6.0 --features dynostore` \
                     (scripts/test does this), or point TANSU at the binary"
                )
            });
        self.child = Some(child);
        super::wait_for_port(self.port, "tansu", || {
            format!(
                ": {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        });
    }

    /// What the broker logged (`TEST_TANSU_LOG` sets its level).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `host:port` for clients.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker (its records stay in storage).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers());
        c
    }

    /// Creates a topic.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A broker on a loaded two-core machine can miss the client's request
        // timeout: retry, and take a topic that the timed-out attempt created.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = runtime.block_on(
                admin.create_topics(
                    &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                    &AdminOptions::new()
                        .operation_timeout(Some(Duration::from_secs(10)))
                        .request_timeout(Some(Duration::from_secs(30))),
                ),
            );
            let error = match outcome {
                Ok(results) => match results.into_iter().find_map(Result::err) {
                    None => return,
                    Some((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists))
                        if attempt > 1 =>
                    {
                        return;
                    }
                    Some((t, e)) => format!("creating topic {t}: {e}"),
                },
                Err(e) => format!("creating topic {topic}: {e}"),
            };
            assert!(attempt < 5, "{error} (broker at {})", self.brokers());
            std::thread::sleep(Duration::from_millis(500 * attempt));
        }
    }

    /// Produces records (key, value; `None` value = tombstone) and waits until
    /// the broker has them all.
    pub fn produce(&self, topic: &str, records: &[(Vec<u8>, Option<Vec<u8>>)]) {
        let producer: BaseProducer = self
            .config()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        for (key, value) in records {
            let mut record = BaseRecord::<Vec<u8>, Vec<u8>>::to(topic).key(key);
            if let Some(v) = value {
                record = record.payload(v);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, back)) => {
                        assert!(
                            matches!(
                                e.rdkafka_error_code(),
                                Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                            ),
                            "produce: {e}"
                        );
                        producer.poll(Duration::from_millis(50));
                        record = back;
                    }
                }
            }
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(60)).unwrap();
    }

    /// Every record of a topic: (key, value, headers).
    #[allow(clippy::type_complexity)]
    pub fn consume_all(
        &self,
        topic: &str,
    ) -> Vec<(Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, String)>)> {
        let consumer: BaseConsumer = self
            .config()
            .set("group.id", format!("test-reader-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            list.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&list).unwrap();
        // Read until nothing arrives for three seconds. (tansu 0.6 answers a
        // ListOffsets for the latest offset with the last batch's first
        // offset, so the watermark cannot say where the end is.)
        let mut out = Vec::new();
        let mut last = Instant::now();
        while last.elapsed() < Duration::from_secs(3) {
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            last = Instant::now();
            let m = m.unwrap();
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push((
                m.key().map(<[u8]>::to_vec),
                m.payload().map(<[u8]>::to_vec),
                headers,
            ));
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sample Debezium topic: (key, value) per line, tombstones as `None`.
pub fn sample_records() -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let text =
        std::fs::read_to_string(super::examples().join("data/debezium/sqlserver-invoices.jsonl"))
            .unwrap();
    text.lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let key = record["key"].to_string().into_bytes();
            let value = match &record["value"] {
                serde_json::Value::Null => None,
                v => Some(v.to_string().into_bytes()),
            };
            (key, value)
        })
        .collect()
}
