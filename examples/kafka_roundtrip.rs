//! The floor for the transport benchmark (`bench/transport`): the same
//! messages as a topic holds, produced to a new topic with a bare rdkafka
//! producer and consumed back, timed.
//!
//! usage: kafka_roundtrip BROKERS SOURCE_TOPIC [COMPRESSION]
//! (COMPRESSION as librdkafka's compression.type; default lz4, as the connector)
//! prints: messages bytes produce_seconds roundtrip_seconds own_cpu_ticks broker_cpu_ticks
//! (CPU over the timed round trip in clock ticks, user + system: this process's,
//! and the broker's when `BROKER_PID` names it, else 0)

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

fn config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// Every message of `topic` from the start, until it is quiet for 3 s:
/// (partition, payload).
fn read_all(brokers: &str, topic: &str, expect: Option<usize>) -> Vec<(i32, Vec<u8>)> {
    let consumer: BaseConsumer = config(brokers)
        .set("group.id", format!("roundtrip-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("max.partition.fetch.bytes", "8388608")
        // The publisher's consumer settings (src/transport/publisher.rs).
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut list = rdkafka::TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        list.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&list).expect("assign");
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(3) && expect.is_none_or(|n| out.len() < n) {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.expect("message");
        last = Instant::now();
        out.push((m.partition(), m.payload().unwrap_or_default().to_vec()));
    }
    out
}

/// A process's CPU time so far in clock ticks (user + system), from
/// `/proc/PID/stat`; 0 where that cannot be read.
fn cpu_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (brokers, source, compression) = match &args[..] {
        [_, b, s] => (b, s, "lz4"),
        [_, b, s, c] => (b, s, c.as_str()),
        _ => {
            eprintln!("usage: kafka_roundtrip BROKERS SOURCE_TOPIC [COMPRESSION]");
            std::process::exit(2);
        }
    };
    let messages = read_all(brokers, source, None);
    let bytes: usize = messages.iter().map(|(_, m)| m.len()).sum();
    let partitions = messages.iter().map(|(p, _)| *p).max().unwrap_or(0) + 1;
    let topic = format!("{source}.roundtrip.{}", std::process::id());
    let admin: AdminClient<DefaultClientContext> = config(brokers).create().expect("admin");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime
        .block_on(admin.create_topics(
            &[NewTopic::new(
                &topic,
                partitions,
                TopicReplication::Fixed(-1),
            )],
            &AdminOptions::new(),
        ))
        .expect("create topic");

    let broker = std::env::var("BROKER_PID").ok();
    let broker_ticks = || broker.as_deref().map_or(0, cpu_ticks);
    let (own_before, broker_before) = (cpu_ticks("self"), broker_ticks());
    let started = Instant::now();
    let producer: BaseProducer = config(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", compression)
        .set("message.max.bytes", "4000000")
        .create()
        .expect("producer");
    for (p, payload) in &messages {
        let mut record = BaseRecord::<[u8], [u8]>::to(&topic)
            .partition(*p)
            .payload(payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    producer.poll(Duration::from_millis(5));
                    record = back;
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
    let produced = started.elapsed();
    let back = read_all(brokers, &topic, Some(messages.len()));
    let roundtrip = started.elapsed();
    let (own, broker) = (
        cpu_ticks("self").saturating_sub(own_before),
        broker_ticks().saturating_sub(broker_before),
    );
    assert_eq!(back.len(), messages.len(), "consumed back every message");
    println!(
        "{} {} {:.3} {:.3} {own} {broker}",
        messages.len(),
        bytes,
        produced.as_secs_f64(),
        roundtrip.as_secs_f64()
    );
}
