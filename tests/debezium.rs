//! The Debezium source against a real Kafka-compatible broker (tansu, started
//! by the harness): the sample SQL Server topic published with the expected
//! ids, resumed across runs, a malformed record set aside in the middle, and a
//! broker restart during a run.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use arrow::array::{Array, Decimal128Array, Int64Array};
use support::kafka::{Broker, sample_records};

const RULES: &str = "
columns:
  invoice_id: keep
  supplier_name: keep
  supplier_org_nr: keep
  amount_sek: keep
  invoice_date: keep
  registered_at: keep
  note: redact
rows:
  - suppress: { column: supplier_org_nr, is: personal_identity_number, reason: sole traders }
unclassified: drop
";

fn pipeline(dir: &Path, brokers: &str, topic: &str) -> PathBuf {
    let yaml = support::pipeline_yaml(
        "fakturor",
        &format!("  debezium:\n    brokers: {brokers}\n    topic: {topic}\n    format: json\n"),
        "",
    );
    std::fs::write(dir.join("fakturor.rules.yaml"), RULES).unwrap();
    let path = dir.join("fakturor.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn oppen(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_oppen"));
    c.args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env("OPPEN_METRICS_ADDR", "off");
    c
}

fn run_once(dir: &Path, pipeline: &Path) -> String {
    let out = oppen(dir, &["run", "--once", pipeline.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The ids `EXPECTED.json` lists as live after all events, less the sole
/// traders the rules suppress: what a correct run publishes.
fn expected_ids() -> BTreeSet<i64> {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(support::examples().join("data/debezium/EXPECTED.json")).unwrap(),
    )
    .unwrap();
    let sole_traders = sole_traders();
    expected["live_invoice_ids_after_all_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .filter(|id| !sole_traders.contains(id))
        .collect()
}

/// The invoice ids in the newest version, and its Parquet batches.
fn published(dir: &Path) -> (BTreeSet<i64>, Vec<arrow::array::RecordBatch>) {
    let batches = support::newest_parquet(&dir.join("published/fakturor"));
    let mut ids = BTreeSet::new();
    for batch in &batches {
        let column = batch
            .column_by_name("invoice_id")
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .clone();
        ids.extend(column.iter().flatten());
    }
    (ids, batches)
}

/// Ids of sole traders (personnummer as org number) among the sample's live rows.
fn sole_traders() -> BTreeSet<i64> {
    let mut last = std::collections::BTreeMap::new();
    for (key, value) in sample_records() {
        let key: serde_json::Value = serde_json::from_slice(&key).unwrap();
        let id = key["payload"]["invoice_id"].as_i64().unwrap();
        let Some(value) = value else { continue };
        let value: serde_json::Value = serde_json::from_slice(&value).unwrap();
        let after = &value["payload"]["after"];
        last.insert(id, after["supplier_org_nr"].as_str().map(str::to_string));
    }
    last.into_iter()
        .filter(|(_, org)| {
            // A personnummer's month digits are 01-12; an org number's third digit is >= 2.
            org.as_deref()
                .is_some_and(|o| o.as_bytes().get(2).is_some_and(|d| *d < b'2'))
        })
        .map(|(id, _)| id)
        .collect()
}

#[test]
fn the_sample_topic_is_published_with_the_expected_ids() {
    let broker = Broker::start();
    broker.create_topic("econ.dbo.invoices", 3);
    let records = sample_records();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = pipeline(dir.path(), &broker.brokers(), "econ.dbo.invoices");

    // Half the topic, then the rest: the second run resumes where the first ended.
    broker.produce("econ.dbo.invoices", &records[..200]);
    run_once(dir.path(), &pipeline);
    broker.produce("econ.dbo.invoices", &records[200..]);
    let stdout = run_once(dir.path(), &pipeline);
    assert!(stdout.contains("0 inputs rejected"), "{stdout}");

    let (ids, batches) = published(dir.path());
    let expected = expected_ids();
    assert_eq!(
        ids, expected,
        "published ids differ from EXPECTED.json (less sole traders)"
    );
    // Decimals stay exact decimals; dates are dates.
    let batch = &batches[0];
    let amounts = batch
        .column_by_name("amount_sek")
        .unwrap()
        .as_any()
        .downcast_ref::<Decimal128Array>()
        .expect("amount_sek is a decimal");
    assert_eq!(amounts.scale(), 2);
    assert_eq!(
        batch
            .schema()
            .field_with_name("invoice_date")
            .unwrap()
            .data_type(),
        &arrow::datatypes::DataType::Date32
    );
    assert_eq!(
        support::check_whole(&dir.path().join("published/fakturor")),
        Ok(2)
    );
    // The record key is the dataset's primary key.
    let package: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("published/fakturor/datapackage.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        package["resources"][0]["schema"]["primaryKey"],
        serde_json::json!(["invoice_id"])
    );
    // A third run finds nothing new and publishes nothing.
    run_once(dir.path(), &pipeline);
    assert_eq!(
        support::check_whole(&dir.path().join("published/fakturor")),
        Ok(2)
    );
}

#[test]
fn a_malformed_record_is_dead_lettered_and_the_rest_published() {
    let broker = Broker::start();
    broker.create_topic("econ.dbo.invoices", 1);
    let records = sample_records();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = pipeline(dir.path(), &broker.brokers(), "econ.dbo.invoices");
    let key = br#"{"payload":{"invoice_id":999999}}"#.to_vec();
    broker.produce("econ.dbo.invoices", &records[..230]);
    broker.produce(
        "econ.dbo.invoices",
        &[
            (
                key.clone(),
                Some(b"{\"payload\": {\"op\": \"c\", \"after\": ".to_vec()),
            ),
            (
                key,
                Some(br#"{"before":null,"after":{"invoice_id":999999},"op":"z"}"#.to_vec()),
            ),
        ],
    );
    broker.produce("econ.dbo.invoices", &records[230..]);
    let stdout = run_once(dir.path(), &pipeline);
    assert!(stdout.contains("2 inputs rejected"), "{stdout}");
    let (ids, _) = published(dir.path());
    let expected = expected_ids();
    assert_eq!(ids, expected);
    let dead = broker.consume_all("econ.dbo.invoices.dlq");
    assert_eq!(
        dead.len(),
        2,
        "both bad records are in the dead-letter topic"
    );
    let reason = |i: usize| {
        dead[i]
            .2
            .iter()
            .find(|(k, _)| k == "oppen.error")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert!(reason(0).contains("not JSON"), "{:?}", dead[0].2);
    assert!(reason(1).contains("unknown op `z`"), "{:?}", dead[1].2);
    assert!(
        dead[0]
            .2
            .iter()
            .any(|(k, v)| k == "oppen.source" && v == "econ.dbo.invoices/0@230"),
        "{:?}",
        dead[0].2
    );
    assert_eq!(
        dead[1].1.as_deref(),
        Some(&br#"{"before":null,"after":{"invoice_id":999999},"op":"z"}"#[..]),
        "the record is kept as it was"
    );
}

#[test]
fn a_broker_restart_during_a_run_loses_nothing() {
    let mut broker = Broker::start();
    broker.create_topic("econ.dbo.invoices", 2);
    let records = sample_records();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = pipeline(dir.path(), &broker.brokers(), "econ.dbo.invoices");
    let mut child = oppen(dir.path(), &["run", pipeline.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let manifest = dir.path().join("published/fakturor/manifest.json");
    let wait_for_ids =
        |child: &mut std::process::Child, what: &str, done: &dyn Fn(&BTreeSet<i64>) -> bool| {
            support::wait_until(what, 120, || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("oppen exited with {status}");
                }
                support::read_manifest(&manifest).is_some() && done(&published(dir.path()).0)
            });
        };
    broker.produce("econ.dbo.invoices", &records[..150]);
    wait_for_ids(&mut child, "a first version", &|ids| !ids.is_empty());
    broker.restart();
    broker.produce("econ.dbo.invoices", &records[150..]);
    let expected = expected_ids();
    wait_for_ids(&mut child, "the expected ids after the restart", &|ids| {
        *ids == expected
    });
    support::terminate(&mut child);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(support::check_whole(&dir.path().join("published/fakturor")).is_ok());
}
