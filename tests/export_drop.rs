//! The supplier-invoice exports (three encodings) through the example pipeline.
#![allow(clippy::unwrap_used)]

mod support;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use support::Workspace;

const EXPORTS: [&str; 3] = [
    "export-2025-01.csv",
    "export-2025-02.csv",
    "export-2025-03.csv",
];

/// The rows a correct pipeline publishes from the final dump, computed from the
/// planted truth (not from oppen's detectors): every row whose supplier id is not
/// a planted personal number and whose account is not 4690.
fn expected_keys() -> Vec<i64> {
    let truth = support::planted_identifiers();
    let bytes =
        std::fs::read(support::examples().join("data/leverantorsfakturor/export-2025-03.csv"))
            .unwrap();
    let text: String = bytes.iter().map(|&b| b as char).collect(); // Latin-1
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b';')
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (id, supplier, account) = (
        col("verifikationsnummer"),
        col("leverantor_id"),
        col("konto_nr"),
    );
    let mut keys: Vec<i64> = reader
        .records()
        .map(Result::unwrap)
        .filter(|r| !truth.contains(&r[supplier].to_string()) && &r[account] != "4690")
        .map(|r| r[id].parse().unwrap())
        .collect();
    keys.sort_unstable();
    keys
}

fn published_keys(ws: &Workspace, version: u64, format: &str) -> Vec<i64> {
    let rows = ws.rows(version, format);
    let ids = rows.column_by_name("verifikationsnummer").unwrap();
    let ids = arrow::compute::cast(ids, &arrow::datatypes::DataType::Int64).unwrap();
    let mut keys: Vec<i64> = ids
        .as_primitive::<Int64Type>()
        .iter()
        .map(Option::unwrap)
        .collect();
    keys.sort_unstable();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_encodings_publish_exactly_the_expected_rows() {
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    for file in EXPORTS {
        ws.drop_export("leverantorsfakturor", file);
    }
    let summary = ws.run_once().await.unwrap();

    // One version per export file, each recording its file.
    assert_eq!(ws.versions(), vec![1, 2, 3]);
    assert_eq!(summary.versions.len(), 3);
    for (v, file) in EXPORTS.iter().enumerate() {
        let version = ws.version(v as u64 + 1);
        match version.source_position {
            Some(oppen_connector_api::Position::File { name, sha256 }) => {
                assert_eq!(&name, file);
                assert_eq!(sha256.len(), 64);
            }
            other => panic!("version {} has position {other:?}", v + 1),
        }
    }

    let expected = expected_keys();
    let counts: serde_json::Value = serde_json::from_slice(
        &std::fs::read(support::examples().join("data/leverantorsfakturor/EXPECTED.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(counts["rows_in_final_dump"], 3528);
    // The planted truth and EXPECTED.json agree; suppressed rows overlap (sole traders on 4690).
    let final_version = ws.version(3);
    assert_eq!(final_version.rows as usize, expected.len());
    assert_eq!(published_keys(&ws, 3, "csv"), expected);
    assert_eq!(published_keys(&ws, 3, "parquet"), expected);

    // The Parquet file is typed as the rules say; the CSV is plain UTF-8 with a comma.
    let parquet = ws.rows(3, "parquet");
    let schema = parquet.schema();
    assert_eq!(
        schema.field_with_name("belopp").unwrap().data_type(),
        &arrow::datatypes::DataType::Decimal128(18, 2)
    );
    assert_eq!(
        schema
            .field_with_name("bokforingsdatum")
            .unwrap()
            .data_type(),
        &arrow::datatypes::DataType::Date32
    );
    assert!(
        schema.field_with_name("handlaggare_epost").is_err(),
        "dropped column published"
    );
    assert!(
        schema.field_with_name("_key").is_err(),
        "private key published"
    );
    let csv = std::fs::read_to_string(ws.published().join("latest/2025-01.csv")).unwrap();
    assert!(
        csv.starts_with("verifikationsnummer,fakturanummer,bokforingsdatum,organisationsenhet,")
    );
    assert!(!csv.contains('\r'));

    // No planted identifier anywhere in what is published.
    let published = ws.all_published_bytes();
    let text = String::from_utf8_lossy(&published);
    for id in support::planted_identifiers() {
        assert!(!text.contains(&id), "{id} is published");
        let digits: String = id.chars().filter(char::is_ascii_digit).collect();
        if digits.len() >= 10 {
            assert!(
                !text.contains(&digits),
                "{id} is published without separator"
            );
        }
    }

    // Partitions by month; latest/ holds each one.
    assert_eq!(
        final_version.partitions.keys().cloned().collect::<Vec<_>>(),
        vec!["2025-01", "2025-02", "2025-03"]
    );
    for p in ["2025-01", "2025-02", "2025-03"] {
        assert!(ws.published().join(format!("latest/{p}.parquet")).exists());
    }
    assert_eq!(support::check_whole(&ws.published()), Ok(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processed_file_is_not_read_again_and_unchanged_data_makes_no_version() {
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    ws.drop_export("leverantorsfakturor", EXPORTS[0]);
    ws.run_once().await.unwrap();
    assert_eq!(ws.versions(), vec![1]);
    // Restart: nothing new.
    let summary = ws.run_once().await.unwrap();
    assert_eq!(summary.rows_read, 0);
    assert_eq!(ws.versions(), vec![1]);
    // The same content under a later name: read, but nothing changes, so no version.
    let bytes = std::fs::read(ws.inbox.join(EXPORTS[0])).unwrap();
    ws.write_export("export-2025-01b.csv", &bytes);
    let summary = ws.run_once().await.unwrap();
    assert!(summary.rows_read > 0);
    assert_eq!(ws.versions(), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_dump_rewrites_only_the_changed_partitions() {
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    ws.drop_export("leverantorsfakturor", EXPORTS[2]);
    ws.run_once().await.unwrap();
    let before = ws.version(1);
    // Correct one amount in a March posting: only the March partition changes.
    let bytes = std::fs::read(ws.inbox.join(EXPORTS[2])).unwrap();
    let text: String = bytes.iter().map(|&b| b as char).collect();
    let line = text
        .lines()
        .find(|l| l.contains(";2025-03-") && !l.contains(";4690;"))
        .unwrap()
        .to_string();
    let mut fields: Vec<&str> = line.split(';').collect();
    fields[8] = "12345,67";
    let changed = text.replacen(&line, &fields.join(";"), 1);
    ws.write_export("export-2025-04.csv", changed.as_bytes());
    let summary = ws.run_once().await.unwrap();
    let c = &summary.versions[0];
    let after = ws.version(2);
    assert_eq!((c.inserts, c.updates, c.deletes), (0, 1, 0));
    assert_eq!(c.partitions_written, 1);
    assert_eq!(after.partitions["2025-01"], before.partitions["2025-01"]);
    assert_eq!(after.partitions["2025-02"], before.partitions["2025-02"]);
    assert_ne!(after.partitions["2025-03"], before.partitions["2025-03"]);
    // The change file holds the one update.
    let changes = support::read_file(
        &ws.published()
            .join(&after.changes.files.values().next().unwrap().path),
    );
    assert_eq!(changes.num_rows(), 1);
    let op = changes.column_by_name("op").unwrap().as_string::<i32>();
    assert_eq!(op.value(0), "update");
    assert!(op.is_valid(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_versions_and_their_files_only() {
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    let path = &ws.pipeline;
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("keep_versions: 30", "keep_versions: 2");
    std::fs::write(path, text).unwrap();
    for file in EXPORTS {
        ws.drop_export("leverantorsfakturor", file);
    }
    ws.run_once().await.unwrap();
    assert_eq!(ws.versions(), vec![2, 3]);
    // Every file left is named by a kept version (public and private), and the
    // kept versions are whole.
    ws.assert_only_referenced_files();
    assert!(
        !ws.state()
            .join("leverantorsfakturor/versions/00000000000000000001.json")
            .exists()
    );
    assert_eq!(support::check_whole(&ws.published()), Ok(2));
    assert_eq!(published_keys(&ws, 3, "csv"), expected_keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn school_menus_and_bathing_sites_publish_without_personal_data() {
    let menus = Workspace::new("skolmat", "skolmat");
    menus.drop_export("skolmat", "meals-2025-W10.json");
    menus.drop_export("skolmat", "meals-2025-W11.json");
    menus.run_once().await.unwrap();
    let newest = *menus.versions().last().unwrap();
    let rows = menus.rows(newest, "parquet");
    assert_eq!(rows.num_rows(), 58, "one row per course of both weeks");
    for column in ["ratt_id", "ratt", "datum", "skola_id", "allergener"] {
        assert!(rows.column_by_name(column).is_some(), "{column} missing");
    }
    let datum = rows
        .schema()
        .field_with_name("datum")
        .unwrap()
        .data_type()
        .clone();
    assert!(
        matches!(datum, arrow::datatypes::DataType::Timestamp(_, _)),
        "{datum}"
    );

    let sites = Workspace::new("badplatser", "register");
    sites.drop_export("register", "badplatser.csv");
    sites.run_once().await.unwrap();
    let rows = sites.rows(1, "csv");
    assert_eq!(rows.num_rows(), 60);
    let names: Vec<String> = rows
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "id",
            "namn",
            "kommun",
            "latitud",
            "longitud",
            "vattentemp_senast",
            "uppdaterad"
        ]
    );
    let text = String::from_utf8_lossy(&sites.all_published_bytes()).to_string()
        + &String::from_utf8_lossy(&menus.all_published_bytes());
    for id in support::planted_identifiers() {
        assert!(!text.contains(&id), "{id} is published");
    }
    // Coordinates are generalized to four decimals.
    let csv = std::fs::read_to_string(sites.published().join("latest/badplatser.csv")).unwrap();
    let first = csv.lines().nth(1).unwrap();
    let latitude = first.split(',').nth(3).unwrap();
    assert!(
        latitude.split('.').nth(1).is_some_and(|d| d.len() <= 4),
        "{latitude}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_partitions_are_split_into_parts_and_a_version_rewrites_only_touched_parts() {
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    let text = std::fs::read_to_string(&ws.pipeline).unwrap().replace(
        "keep_versions: 30",
        "keep_versions: 30\n  max_file_rows: 100",
    );
    std::fs::write(&ws.pipeline, text).unwrap();
    // The full dump without its last ten March postings (single-line records,
    // so the cut leaves whole records), then the full dump: the ten are appends.
    let bytes = std::fs::read(
        support::examples()
            .join("data")
            .join("leverantorsfakturor")
            .join(EXPORTS[2]),
    )
    .unwrap();
    let full: String = bytes.iter().map(|&b| b as char).collect();
    let lines: Vec<&str> = full.split_inclusive('\n').collect();
    let mut cut = lines.len();
    while lines.len() - cut < 10 {
        let line = lines[cut - 1];
        assert!(line.contains(";2025-03-") && !line.contains('"'), "{line}");
        cut -= 1;
    }
    let latin1 = |s: &str| s.chars().map(|c| c as u8).collect::<Vec<u8>>();
    ws.write_export("export-2025-03.csv", &latin1(&lines[..cut].concat()));
    ws.run_once().await.unwrap();
    let first = ws.version(1);
    // Every partition is parts of at most 100 rows named <month>[@NNNN], and
    // only a month's last part may be short.
    let mut months: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    for (name, part) in &first.partitions {
        assert!(part.rows <= 100, "{name}: {} rows", part.rows);
        let month = name.split('@').next().unwrap();
        assert!(month.starts_with("2025-0"), "{name}");
        months.entry(month).or_default().push(part.rows);
    }
    assert_eq!(months.len(), 3);
    for (month, rows) in &months {
        assert!(rows.len() > 1, "{month} is one part");
        assert!(
            rows[..rows.len() - 1].iter().all(|&r| r == 100),
            "{month}: {rows:?}"
        );
    }
    assert_eq!(
        first.partitions.values().map(|p| p.rows).sum::<u64>(),
        first.rows
    );

    // The ten appended postings rewrite March's last part (and start a new
    // one when it fills); every other part is referenced again.
    ws.write_export("export-2025-04.csv", &latin1(&full));
    let summary = ws.run_once().await.unwrap();
    // Some of the ten may be rows the rules drop (sole traders, social care).
    let inserts = summary.versions[0].inserts;
    assert!((1..=10).contains(&inserts), "{inserts} inserts");
    let second = ws.version(2);
    let last_march = first
        .partitions
        .keys()
        .rfind(|n| n.starts_with("2025-03"))
        .unwrap();
    for (name, part) in &first.partitions {
        if name != last_march {
            assert_eq!(second.partitions[name], *part, "{name} was rewritten");
        }
    }
    assert!(second.partitions.len() - first.partitions.len() <= 1);

    // One corrected amount in an early March posting rewrites its part only.
    let line = lines
        .iter()
        .find(|l| l.contains(";2025-03-") && !l.contains(";4690;") && !l.contains('"'))
        .unwrap();
    let mut fields: Vec<&str> = line.split(';').collect();
    fields[8] = "12345,67";
    let changed = full.replacen(*line, &fields.join(";"), 1);
    ws.write_export("export-2025-05.csv", &latin1(&changed));
    let summary = ws.run_once().await.unwrap();
    let c = &summary.versions[0];
    assert_eq!((c.inserts, c.updates, c.deletes), (0, 1, 0));
    assert_eq!(c.partitions_written, 1);
    let third = ws.version(3);
    let rewritten: Vec<&String> = third
        .partitions
        .iter()
        .filter(|(name, part)| second.partitions.get(*name) != Some(*part))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(rewritten.len(), 1, "{rewritten:?}");
    assert!(rewritten[0].starts_with("2025-03"));
    // The parts together are the whole table.
    assert_eq!(published_keys(&ws, 3, "csv"), expected_keys());
    assert_eq!(published_keys(&ws, 3, "parquet"), expected_keys());
    assert_eq!(support::check_whole(&ws.published()), Ok(3));
}

/// A data file of the first version that cannot be written takes a streamed
/// part with it (its rows are not kept in memory): the pipeline reads the
/// export again, after a pause, and publishes it whole once the store takes
/// writes again. Nothing partial is ever published.
#[test]
fn a_lost_part_of_the_first_version_is_read_from_the_export_again() {
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    ws.drop_export("leverantorsfakturor", EXPORTS[2]);
    // A file where the dataset's data folder goes: every data file fails.
    let blocker = ws.published().join("data");
    std::fs::create_dir_all(ws.published()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    let log = ws.dir.path().join("run.log");
    let mut child = ws
        .command(&["run", "--once", ws.pipeline.to_str().unwrap()], "warn")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    support::wait_until_or(
        "the lost part to be reported",
        120,
        || read_log().contains("the version is read from the source again"),
        read_log,
    );
    assert!(ws.versions().is_empty(), "nothing is published meanwhile");
    std::fs::remove_file(&blocker).unwrap();
    let status = support::wait_exit(&mut child, 120);
    assert!(status.success(), "{}", read_log());
    assert_eq!(ws.versions(), [1], "{}", read_log());
    assert_eq!(published_keys(&ws, 1, "parquet"), expected_keys());
    assert_eq!(published_keys(&ws, 1, "csv"), expected_keys());
    ws.assert_only_referenced_files();
}
