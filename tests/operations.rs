//! What operators see: `/metrics`, `/healthz` and `/readyz` scraped while a
//! pipeline runs, checked against what the run published; secrets never in
//! any output; and the deployment artifacts checked against the metrics.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use support::http::{get, metrics, try_get};
use support::{Workspace, free_port, wait_until};

const HMAC_KEY: &str = "hmac-Secret-7f3a9c1e5b2d4f6a8c0e1a3b5d7f9e2c";

fn sample(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in /metrics: {m:#?}"))
}

/// An export with one row a field short (line 3): set aside whole.
fn broken_export() -> Vec<u8> {
    let good =
        std::fs::read(support::examples().join("data/leverantorsfakturor/export-2025-03.csv"))
            .unwrap();
    let text: String = good.iter().map(|&b| b as char).collect();
    let mut lines: Vec<String> = text.split("\r\n").map(str::to_string).collect();
    lines[2] = lines[2].rsplit_once(';').unwrap().0.to_string();
    lines.join("\r\n").chars().map(|c| c as u32 as u8).collect()
}

#[test]
fn metrics_and_health_follow_a_running_pipeline() {
    let ws = Workspace::invoices_without_settling();
    ws.edit_pipeline("rules:", "pseudonym_key: { env: TEST_HMAC_KEY }\nrules:");
    let port = free_port();
    let log = ws.dir.path().join("oppen.log");
    let mut child = ws
        .command(&["run", "leverantorsfakturor.yaml"], "debug")
        .env("OPPEN_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("TEST_HMAC_KEY", HMAC_KEY)
        .stdout(std::fs::File::create(ws.dir.path().join("oppen.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until("/healthz", 30, || {
        try_get(port, "/healthz").is_some_and(|r| r.status == 200)
    });
    ws.drop_export("leverantorsfakturor", "export-2025-01.csv");
    wait_until("version 1", 60, || ws.versions() == vec![1]);
    ws.write_export("export-2025-02.csv", &broken_export());
    ws.drop_export("leverantorsfakturor", "export-2025-03.csv");
    wait_until("version 2", 60, || ws.versions() == vec![1, 2]);
    wait_until("the dead letter counted", 30, || {
        metrics(port)
            .get("oppen_dead_letters_total{dataset=\"leverantorsfakturor\"}")
            .is_some_and(|v| *v == 1.0)
    });

    // The files are visible a moment before the run loop hears of the commit.
    wait_until("/readyz to show version 2", 30, || {
        let ready = get(port, "/readyz", &[]);
        let body: serde_json::Value = serde_json::from_slice(&ready.body).unwrap();
        ready.status == 200 && body["pipelines"]["leverantorsfakturor"]["last_version"] == 2
    });

    let m = metrics(port);
    let d = "dataset=\"leverantorsfakturor\"";
    assert_eq!(
        sample(&m, &format!("oppen_versions_committed_total{{{d}}}")),
        2.0
    );
    assert_eq!(
        sample(&m, &format!("oppen_commit_duration_seconds_count{{{d}}}")),
        2.0
    );
    assert_eq!(sample(&m, &format!("oppen_pipeline_ready{{{d}}}")), 1.0);
    // Changes published, by operation, are what the versions say they hold.
    let (v1, v2) = (ws.version(1), ws.version(2));
    for (op, n) in [
        ("insert", v1.changes.inserts + v2.changes.inserts),
        ("update", v1.changes.updates + v2.changes.updates),
        ("delete", v1.changes.deletes + v2.changes.deletes),
    ] {
        assert_eq!(
            sample(
                &m,
                &format!("oppen_changes_published_total{{{d},op=\"{op}\"}}")
            ),
            n as f64,
            "{op}"
        );
    }
    assert!(v2.changes.inserts + v2.changes.updates + v2.changes.deletes > 0);
    // Each export is a full dump: every row is read as a snapshot row.
    let read = sample(
        &m,
        &format!("oppen_changes_captured_total{{{d},source=\"files\",op=\"read\"}}"),
    );
    assert!(
        sample(
            &m,
            &format!("oppen_written_bytes_total{{{d},format=\"parquet\"}}")
        ) > 0.0
    );
    assert!(
        m.keys()
            .any(|k| k.starts_with("oppen_rows_suppressed_total{") && k.contains(d)),
        "the rules suppress rows, so the counter must be there"
    );
    assert!(m.keys().any(|k| k.starts_with("oppen_build_info{")));

    support::terminate(&mut child);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}");
    let out = std::fs::read_to_string(ws.dir.path().join("oppen.out")).unwrap();
    assert!(
        out.contains(&format!("{read} rows read")),
        "captured {read} rows, but the run says: {out}"
    );
    assert_no_secret(&[
        &std::fs::read(&log).unwrap(),
        &std::fs::read(ws.dir.path().join("oppen.out")).unwrap(),
    ]);
}

/// Fails if any output holds the HMAC key.
fn assert_no_secret(outputs: &[&[u8]]) {
    for output in outputs {
        let text = String::from_utf8_lossy(output);
        assert!(!text.contains(HMAC_KEY), "the pseudonym key was printed");
        assert!(
            !text.contains(&HMAC_KEY[5..20]),
            "part of the pseudonym key was printed"
        );
    }
}

/// Every metric a dashboard panel or alert rule in `deploy/` queries is one
/// oppen exports; every YAML file there parses.
#[test]
fn deployment_artifacts_name_metrics_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let telemetry = oppen::ops::telemetry::Telemetry::new();
    let exported = oppen::ops::telemetry::metric_names(&telemetry);
    let mut queried = Vec::new();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/oppen-dashboard.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 6, "the dashboard has too few panels");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queried.extend(metric_refs(target["expr"].as_str().unwrap()));
        }
    }
    let alerts = std::fs::read_to_string(root.join("prometheus/alerts.yaml")).unwrap();
    let rules: serde_json::Value = serde_saphyr::from_str(&alerts).unwrap();
    let mut alert_names = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            alert_names.push(rule["alert"].as_str().unwrap().to_string());
            queried.extend(metric_refs(rule["expr"].as_str().unwrap()));
        }
    }
    for wanted in [
        "OppenPipelineStalled",
        "OppenReplicationSlotWalRetained",
        "OppenDeadLetters",
        "OppenErrors",
        "OppenNoRecentVersion",
        "OppenTargetDown",
        "OppenMetricsAbsent",
    ] {
        assert!(alert_names.iter().any(|a| a == wanted), "no alert {wanted}");
    }
    assert!(queried.len() >= 10);
    for name in &queried {
        assert!(
            exported.iter().any(|e| e == name),
            "deploy/ queries {name}, which oppen does not export (exported: {exported:?})"
        );
    }
    // Every YAML document in deploy/ parses.
    for file in support::walk(&root) {
        let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext == "yaml" || ext == "yml" {
            let text = std::fs::read_to_string(&file).unwrap();
            for doc in text.split("\n---\n") {
                serde_saphyr::from_str::<serde_json::Value>(doc)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            }
        }
    }
}

/// The oppen metric names in a PromQL expression (a name followed by `{`, `[`
/// or a space, from the `oppen_` family).
fn metric_refs(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("oppen_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !preceded {
            out.push(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The alert rules are valid and fire as their unit tests say
/// (`deploy/prometheus/alerts.test.yaml`, run by promtool): the first dead
/// letter and fatal error after a start, a target that cannot be scraped, no
/// target at all.
#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yaml"][..],
        &["test", "rules", "alerts.test.yaml"][..],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "promtool could not be run ({e}); scripts/test installs it \
                     (Debian: apt-get install prometheus)"
                )
            });
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/oppen.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for option in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "ExecStart=",
    ] {
        assert!(text.contains(option), "the unit lacks {option}");
    }
    // Verified with ExecStart on a binary that exists here (the one under test).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("oppen.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/oppen", env!("CARGO_BIN_EXE_oppen")),
    )
    .unwrap();
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
    else {
        eprintln!("systemd-analyze is not installed here; checked the unit's options only");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// The example pipelines in `deploy/` are valid, folder and all.
#[test]
fn the_deployment_pipelines_check() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/compose/pipelines");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_oppen"))
        .arg("check")
        .arg(&folder)
        .env("ECON_DB_URL", "postgres://oppen:pw@localhost:5432/econ")
        .env("OPPEN_HMAC_KEY", HMAC_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pipelines in the Kubernetes ConfigMaps are valid (the transport
/// example included).
#[test]
fn the_kubernetes_pipelines_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut checked = 0;
    for file in support::walk(&root) {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in text.split("\n---\n") {
            let doc: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
            if doc["kind"] != "ConfigMap" {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            for (name, content) in doc["data"].as_object().unwrap() {
                std::fs::write(dir.path().join(name), content.as_str().unwrap()).unwrap();
            }
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_oppen"))
                .arg("check")
                .arg(dir.path())
                .env("ECON_DB_URL", "postgres://oppen:pw@localhost:5432/econ")
                .env("KAFKA_BROKERS", "kafka:9092")
                .env("OPPEN_HMAC_KEY", HMAC_KEY)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}{}",
                file.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2, "ConfigMaps in deploy/kubernetes");
}

/// Two pipelines in one process: one stops on a fatal error (its export
/// folder does not exist), `/readyz` names it, and the other goes on publishing.
#[test]
fn one_failing_pipeline_leaves_the_others_running() {
    let ws = Workspace::invoices_without_settling();
    for file in ["skolmat.yaml", "skolmat.rules.yaml"] {
        std::fs::copy(support::examples().join(file), ws.dir.path().join(file)).unwrap();
    }
    let port = free_port();
    let mut child = ws
        .command(&["run", "--log-format", "json", "."], "info")
        .env("OPPEN_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("/readyz to name the failed pipeline", 30, || {
        try_get(port, "/readyz").is_some_and(|r| {
            r.status == 503
                && r.text()
                    .contains("stopped: source: export folder ./data/skolmat does not exist")
        })
    });
    ws.drop_export("leverantorsfakturor", "export-2025-01.csv");
    wait_until("version 1 of the other pipeline", 60, || {
        ws.versions() == vec![1]
    });
    let body: serde_json::Value = serde_json::from_slice(&get(port, "/readyz", &[]).body).unwrap();
    assert_eq!(
        body["pipelines"]["leverantorsfakturor"]["ready"], true,
        "{body:#}"
    );
    assert_eq!(body["pipelines"]["skolmat"]["state"], "failed", "{body:#}");
    let m = metrics(port);
    assert_eq!(
        m.get("oppen_errors_total{dataset=\"skolmat\",kind=\"source\"}"),
        Some(&1.0)
    );
    support::terminate(&mut child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed pipeline fails the run"
    );
    // JSON logs: every line is an object; the pipeline's lines carry its span.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut published = false;
    for line in stderr.lines().filter(|l| l.starts_with('{')) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        if record["message"] == "published version" {
            assert_eq!(record["span"]["name"], "version", "{record}");
            assert!(
                record["spans"].to_string().contains("leverantorsfakturor"),
                "{record}"
            );
            published = true;
        }
    }
    assert!(published, "no JSON log line for the version: {stderr}");
}
