//! The Kafka transport against a real Kafka-compatible broker (tansu, started
//! by the harness): a connector and two publishers in one consumer group on the
//! invoice exports, one publisher killed halfway and the connector restarted;
//! and the raw topic read back without one planted identifier.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Child, Stdio};

use support::Workspace;
use support::kafka::Broker;

const PARTITIONS: i32 = 4;

/// The invoice pipeline with a Kafka transport.
fn workspace(broker: &Broker) -> Workspace {
    let ws = Workspace::invoices_without_settling();
    let mut text = std::fs::read_to_string(&ws.pipeline).unwrap();
    text.push_str(&format!(
        "transport:\n  kafka:\n    brokers: {}\n    partitions: {PARTITIONS}\n",
        broker.brokers()
    ));
    std::fs::write(&ws.pipeline, text).unwrap();
    ws
}

/// `oppen run --role ROLE` in the background, its log in the workspace.
fn spawn(ws: &Workspace, role: &str, log: &str) -> Child {
    let file = std::fs::File::create(ws.dir.path().join(log)).unwrap();
    ws.command(
        &["run", "--role", role, ws.pipeline.to_str().unwrap()],
        "info,rdkafka=warn,librdkafka=warn",
    )
    .stdout(Stdio::null())
    .stderr(file)
    .spawn()
    .unwrap()
}

/// `oppen run --once --role ROLE`, which must succeed.
fn run_once(ws: &Workspace, role: &str) {
    let pipeline = ws.pipeline.to_str().unwrap();
    let out = ws.oppen(&["run", "--once", "--role", role, pipeline], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn log(ws: &Workspace, name: &str) -> String {
    std::fs::read_to_string(ws.dir.path().join(name)).unwrap_or_default()
}

fn logs(ws: &Workspace, broker: &Broker) -> String {
    let broker_log = broker.log();
    let tail = &broker_log[broker_log.len().saturating_sub(20_000)..];
    format!("{}--- broker\n{tail}", logs_of(ws))
}

fn logs_of(ws: &Workspace) -> String {
    [
        "connector.log",
        "connector-2.log",
        "publisher-a.log",
        "publisher-b.log",
    ]
    .iter()
    .map(|n| format!("--- {n}\n{}", log(ws, n)))
    .collect()
}

/// What the embedded engine publishes from the same exports with the same
/// pseudonym key: the rows a transport run must end with.
async fn embedded_rows(ws: &Workspace, exports: &[&str]) -> (Vec<String>, Vec<String>) {
    let reference = Workspace::invoices_without_settling();
    std::fs::create_dir_all(reference.state()).unwrap();
    std::fs::copy(
        ws.state().join("pseudonym.key"),
        reference.state().join("pseudonym.key"),
    )
    .unwrap();
    for export in exports {
        reference.drop_export("leverantorsfakturor", export);
    }
    reference.run_once().await.unwrap();
    support::newest_rows(&reference.published())
}

fn published_rows(published: &Path) -> Option<(Vec<String>, Vec<String>)> {
    published
        .join("manifest.json")
        .exists()
        .then(|| support::newest_rows(published))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_share_a_dataset_and_one_dies_halfway() {
    let broker = Broker::start();
    let ws = workspace(&broker);
    let mut connector = spawn(&ws, "connector", "connector.log");
    let mut a = spawn(&ws, "publisher", "publisher-a.log");
    let mut b = spawn(&ws, "publisher", "publisher-b.log");

    // The first export, published by both publishers together.
    ws.drop_export("leverantorsfakturor", "export-2025-01.csv");
    support::wait_until_or(
        "the transport pipeline's first version",
        90,
        || ws.published().join("manifest.json").exists(),
        || logs(&ws, &broker),
    );
    let first = embedded_rows(&ws, &["export-2025-01.csv"]).await;
    support::wait_until_or(
        "the first export published whole",
        60,
        || published_rows(&ws.published()).as_ref() == Some(&first),
        || logs(&ws, &broker),
    );
    // Both publishers own partitions.
    let owns = |name: &str| {
        log(&ws, name).lines().any(|l| {
            l.contains("transport partitions assigned")
                && l.split("partitions={")
                    .nth(1)
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
    };
    support::wait_until_or(
        "both publishers to own partitions",
        60,
        || owns("publisher-a.log") && owns("publisher-b.log"),
        || logs(&ws, &broker),
    );

    // One publisher dies without a word; the connector is restarted too. The
    // other publisher takes over every partition.
    a.kill().unwrap();
    a.wait().unwrap();
    support::terminate(&mut connector);
    assert!(
        support::wait_exit(&mut connector, 30).success(),
        "{}",
        logs(&ws, &broker)
    );
    let mut connector = spawn(&ws, "connector", "connector-2.log");
    ws.drop_export("leverantorsfakturor", "export-2025-02.csv");
    ws.drop_export("leverantorsfakturor", "export-2025-03.csv");
    let last = embedded_rows(
        &ws,
        &[
            "export-2025-01.csv",
            "export-2025-02.csv",
            "export-2025-03.csv",
        ],
    )
    .await;
    support::wait_until_or(
        "the last export published by the remaining publisher",
        120,
        || published_rows(&ws.published()).as_ref() == Some(&last),
        || logs(&ws, &broker),
    );

    // Every version is whole, and no change was applied twice: the change
    // counts of the versions add up to the rows there are.
    if let Err(problem) = support::check_whole(&ws.published()) {
        panic!("{problem}\n{}", logs(&ws, &broker));
    }
    let mut rows: i64 = 0;
    for v in ws.versions() {
        let c = ws.version(v).changes;
        rows += c.inserts as i64 - c.deletes as i64;
    }
    assert_eq!(
        rows,
        last.1.len() as i64,
        "inserts minus deletes over all versions"
    );
    let newest = ws.version(*ws.versions().last().unwrap());
    let progress = newest.transport.expect("the version records the transport");
    assert_eq!(
        progress.partitions.len(),
        PARTITIONS as usize,
        "{progress:?}"
    );

    // The connector acknowledged the source up to what was published.
    support::wait_until_or(
        "the connector's checkpoint",
        30,
        || {
            std::fs::read_to_string(ws.state().join("leverantorsfakturor/connector.json"))
                .is_ok_and(|c| c.contains("export-2025-03.csv"))
        },
        || logs(&ws, &broker),
    );
    for child in [&mut connector, &mut b] {
        support::terminate(child);
        assert!(
            support::wait_exit(child, 30).success(),
            "{}",
            logs(&ws, &broker)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topic_carries_no_sensitive_value() {
    let broker = Broker::start();
    let ws = workspace(&broker);
    for export in [
        "export-2025-01.csv",
        "export-2025-02.csv",
        "export-2025-03.csv",
    ] {
        ws.drop_export("leverantorsfakturor", export);
    }
    run_once(&ws, "connector");
    let records = broker.consume_all("oppen.leverantorsfakturor");
    assert!(!records.is_empty(), "the connector produced nothing");
    let mut raw = Vec::new();
    for (key, value, headers) in &records {
        raw.extend(key.iter().flatten());
        raw.extend(value.iter().flatten());
        for (name, value) in headers {
            raw.extend(name.as_bytes());
            raw.extend(value.as_bytes());
        }
    }
    let text = String::from_utf8_lossy(&raw);
    for secret in support::planted_identifiers() {
        assert!(
            !text.contains(&secret),
            "{secret} reached the transport topic"
        );
    }
    // The rows are there, classified: a publisher run publishes them.
    run_once(&ws, "publisher");
    let expected = embedded_rows(
        &ws,
        &[
            "export-2025-01.csv",
            "export-2025-02.csv",
            "export-2025-03.csv",
        ],
    )
    .await;
    assert_eq!(support::newest_rows(&ws.published()), expected);
}

#[test]
fn a_role_without_a_transport_is_refused() {
    let ws = Workspace::invoices_without_settling();
    let out = ws.oppen(
        &[
            "run",
            "--once",
            "--role",
            "publisher",
            ws.pipeline.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs a transport"), "{stderr}");
}
