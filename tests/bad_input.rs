//! Bad input: malformed rules and pipeline files give located errors; malformed
//! exports are set aside with a reason and nothing already published is lost.
#![allow(clippy::unwrap_used)]

mod support;

use support::Workspace;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn invoices() -> Workspace {
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    ws.drop_export("leverantorsfakturor", "export-2025-01.csv");
    ws
}

#[test]
fn an_unknown_action_is_located() {
    let ws = invoices();
    ws.edit_rules("  beskrivning: redact", "  beskrivning: scramble");
    let out = ws.oppen(&["check", "leverantorsfakturor.yaml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("leverantorsfakturor.rules.yaml:13:3: error: unknown variant `scramble`"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
}

#[test]
fn a_rule_for_a_column_the_source_lacks_is_located() {
    let ws = invoices();
    ws.edit_rules(
        "  beskrivning: redact",
        "  beskrivning: redact\n  kundnummer: keep",
    );
    let out = ws.oppen(&["check", "leverantorsfakturor.yaml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("leverantorsfakturor.rules.yaml:14:3: error: rule for column `kundnummer`, which the source does not have"), "{err}");
    assert!(
        err.contains("the source has: verifikationsnummer, fakturanummer"),
        "{err}"
    );
    // Running refuses too, and publishes nothing.
    let out = ws.oppen(&["run", "--once", "leverantorsfakturor.yaml"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("kundnummer"));
    assert!(ws.versions().is_empty());
}

#[test]
fn a_yaml_syntax_error_is_located() {
    let ws = invoices();
    ws.edit_rules("  beskrivning: redact", "  beskrivning: [redact");
    let out = ws.oppen(&["check", "leverantorsfakturor.yaml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("leverantorsfakturor.rules.yaml:1"), "{err}");
    assert!(err.contains("error:"), "{err}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let ws = invoices();
    ws.edit_rules(
        "  belopp: { keep: { type: decimal(18,2) } }",
        "  belopp: { keep: { type: money } }",
    );
    ws.edit_rules("  leverantor: keep", "  leverantor: hash");
    let out = ws.oppen(&["check", "leverantorsfakturor.yaml"], &[]);
    let err = stderr(&out);
    assert!(
        err.contains(":12:11: error: column `belopp`: unknown type `money`"),
        "{err}"
    );
    assert!(
        err.contains(":8:15: error: column `leverantor`: hash is refused for open data"),
        "{err}"
    );
}

#[test]
fn a_missing_environment_variable_is_named() {
    let ws = invoices();
    let path = &ws.pipeline;
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("file://published", "${OPPEN_TEST_UNSET_STORE}");
    std::fs::write(path, text).unwrap();
    let out = ws.oppen(&["check", "leverantorsfakturor.yaml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("OPPEN_TEST_UNSET_STORE"),
        "{}",
        stderr(&out)
    );
    // Set, it is substituted (and the value is used, not printed).
    let out = ws.oppen(
        &["check", "leverantorsfakturor.yaml"],
        &[("OPPEN_TEST_UNSET_STORE", "file://elsewhere")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_export_is_set_aside_and_nothing_published_is_lost() {
    let ws = invoices();
    ws.run_once().await.unwrap();
    let first = ws.version(1);
    // A later dump with a row that has a field too few (line 3).
    let good =
        std::fs::read(support::examples().join("data/leverantorsfakturor/export-2025-03.csv"))
            .unwrap();
    let text: String = good.iter().map(|&b| b as char).collect();
    let mut lines: Vec<String> = text.split("\r\n").map(str::to_string).collect();
    let broken = lines[2].rsplit_once(';').unwrap().0.to_string();
    lines[2] = broken;
    let bad: Vec<u8> = lines.join("\r\n").chars().map(|c| c as u32 as u8).collect();
    ws.write_export("export-2025-02.csv", &bad);
    ws.write_export("export-2025-03.csv", &good);
    let summary = ws.run_once().await.unwrap();
    assert_eq!(summary.rejected, 1);
    // The bad file is moved aside with its reason; the good one after it is published.
    let dead = ws.inbox.join("dead-letter");
    assert!(dead.join("export-2025-02.csv").exists());
    assert!(!ws.inbox.join("export-2025-02.csv").exists());
    let reason = std::fs::read_to_string(dead.join("export-2025-02.csv.reason.txt")).unwrap();
    assert!(
        reason.contains("export-2025-02.csv:3:11: expected 11 fields, found 10"),
        "{reason}"
    );
    assert!(
        reason.contains("Nothing from this file was loaded"),
        "{reason}"
    );
    assert_eq!(ws.versions(), vec![1, 2]);
    assert_eq!(ws.version(1), first);
    assert_eq!(support::check_whole(&ws.published()), Ok(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_files_are_rejected_whole() {
    let ws = Workspace::new("skolmat", "skolmat");
    ws.write_export("meals-2025-W09.json", b"{\"meals\": [ {\"courses\": [}");
    ws.drop_export("skolmat", "meals-2025-W10.json");
    let summary = ws.run_once().await.unwrap();
    assert_eq!(summary.rejected, 1);
    let reason =
        std::fs::read_to_string(ws.inbox.join("dead-letter/meals-2025-W09.json.reason.txt"))
            .unwrap();
    assert!(reason.contains("line 1, column"), "{reason}");
    assert_eq!(ws.versions(), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_guard_blocks_identity_numbers_in_published_columns() {
    let ws = invoices();
    ws.edit_rules("  beskrivning: redact", "  beskrivning: keep");
    ws.edit_rules("  - suppress: { column: leverantor_id, is: personal_identity_number, reason: sole traders }\n", "");
    let err = ws.run_once().await.unwrap_err().to_string();
    assert!(err.contains("egress guard"), "{err}");
    assert!(err.contains("export-2025-01.csv"), "{err}");
    assert!(ws.versions().is_empty());
    // The message never holds the value itself.
    for id in support::planted_identifiers() {
        assert!(!err.contains(&id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_unclassified_column_is_dropped_or_halts() {
    let ws = Workspace::new("badplatser", "register");
    let original =
        std::fs::read_to_string(support::examples().join("data/register/badplatser.csv")).unwrap();
    let with_new: String = original
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                format!("{l},agare_epost\n")
            } else {
                format!("{l},someone@example.se\n")
            }
        })
        .collect();
    ws.write_export("badplatser.csv", with_new.as_bytes());
    // The registry's rules say halt: nothing is published until a steward decides.
    let err = ws.run_once().await.unwrap_err().to_string();
    assert!(
        err.contains("column `agare_epost` has no rule, and unclassified is halt"),
        "{err}"
    );
    assert!(ws.versions().is_empty());
    // With drop, it is left out with a warning.
    ws.edit_rules("unclassified: halt", "unclassified: drop");
    let summary = ws.run_once().await.unwrap();
    assert_eq!(summary.unclassified, vec!["agare_epost".to_string()]);
    assert!(!String::from_utf8_lossy(&ws.all_published_bytes()).contains("someone@example.se"));
}

#[test]
fn a_zero_file_size_is_located() {
    let ws = invoices();
    let text = std::fs::read_to_string(&ws.pipeline)
        .unwrap()
        .replace("keep_versions: 30", "keep_versions: 30\n  max_file_rows: 0");
    std::fs::write(&ws.pipeline, text).unwrap();
    let out = ws.oppen(&["check", "leverantorsfakturor.yaml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("leverantorsfakturor.yaml:28:18: error: max_file_rows must be at least 1"),
        "{err}"
    );
}
