//! `transport` in a pipeline file: how a connector and its publishers are
//! joined when they run in separate processes. Plain data; the Kafka clients
//! are made from it by the transport layer.

use std::collections::BTreeMap;
use std::fmt;

use oppen_connector_debezium::Property;
use serde::Deserialize;

/// Partitions of a transport topic the connector creates, unless set.
pub const DEFAULT_PARTITIONS: i32 = 6;

/// `transport` in a pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TransportConfig {
    /// A Kafka topic between connector and publishers.
    Kafka(KafkaTransport),
}

/// `transport.kafka`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTransport {
    /// Bootstrap brokers, `host:port[,host:port]`.
    pub brokers: String,
    /// The topic (default `oppen.<dataset id>`).
    #[serde(default)]
    pub topic: Option<String>,
    /// Partitions when the connector creates the topic: the most publishers
    /// that can share the dataset.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// The publishers' consumer group (default `oppen.<dataset id>`).
    #[serde(default)]
    pub group: Option<String>,
    /// librdkafka properties passed through (security.protocol, sasl.*, ssl.*,
    /// compression.type, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, Property>,
}

fn default_partitions() -> i32 {
    DEFAULT_PARTITIONS
}

impl fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Properties may hold SASL passwords: only their names are shown.
        f.debug_struct("KafkaTransport")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl KafkaTransport {
    /// Problems with the settings, said plainly.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.brokers.trim().is_empty() {
            problems.push("brokers is empty; give host:port of at least one broker".to_string());
        }
        if self.topic.as_ref().is_some_and(|t| t.trim().is_empty()) {
            problems.push("topic is empty; name the topic or leave topic out".to_string());
        }
        if !(1..=10_000).contains(&self.partitions) {
            problems.push(format!(
                "partitions is {}; give a number from 1 to 10000",
                self.partitions
            ));
        }
        for reserved in [
            "bootstrap.servers",
            "group.id",
            "enable.auto.commit",
            "enable.auto.offset.store",
            "enable.idempotence",
            "acks",
        ] {
            if self.properties.contains_key(reserved) {
                problems.push(format!(
                    "properties.{reserved} is set by oppen (the handshake depends on it)"
                ));
            }
        }
        problems
    }

    /// The topic of a dataset.
    pub fn topic(&self, dataset: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("oppen.{dataset}"))
    }

    /// The publishers' consumer group of a dataset.
    pub fn group(&self, dataset: &str) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("oppen.{dataset}"))
    }
}
