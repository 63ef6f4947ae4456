//! Property: for random rows and random rules, no value of a dropped column and
//! no planted identity number ever appears in what is published (CSV bytes, or
//! Parquet values read back), whatever the actions: either it is removed, or the
//! egress guard stops the version.
#![allow(clippy::unwrap_used)]

mod support;

use arrow::array::Array;
use proptest::prelude::*;

const ACTIONS: [&str; 6] = [
    "keep",
    "drop",
    "redact",
    "hash",
    "mask",
    "{ hash: { reason: test } }",
];
const WORDS: [&str; 8] = [
    "Årsavgift",
    "faktura",
    "avser",
    "jan",
    "ramavtal",
    "kontor",
    "el, vvs",
    "\"citat\"",
];

fn luhn(nine: &str) -> u32 {
    let sum: u32 = nine
        .bytes()
        .enumerate()
        .map(|(i, b)| {
            let v = u32::from(b - b'0') * if i % 2 == 0 { 2 } else { 1 };
            if v > 9 { v - 9 } else { v }
        })
        .sum();
    (10 - sum % 10) % 10
}

/// A valid personnummer, written with or without a separator.
fn id_strategy() -> impl Strategy<Value = String> {
    (40u32..99, 1u32..=12, 1u32..=28, 0u32..1000, any::<bool>()).prop_map(|(y, m, d, n, dash)| {
        let nine = format!("{y:02}{m:02}{d:02}{n:03}");
        let check = luhn(&nine);
        if dash {
            format!("{}-{}{check}", &nine[..6], &nine[6..])
        } else {
            format!("{nine}{check}")
        }
    })
}

#[derive(Debug, Clone)]
struct Case {
    actions: Vec<usize>,
    cells: Vec<Vec<(usize, Option<String>)>>,
    suppress: bool,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let cell = (
        0usize..WORDS.len(),
        proptest::option::weighted(0.3, id_strategy()),
    );
    (
        proptest::collection::vec(0usize..ACTIONS.len(), 4),
        proptest::collection::vec(proptest::collection::vec(cell, 4), 1..12),
        any::<bool>(),
    )
        .prop_map(|(actions, cells, suppress)| Case {
            actions,
            cells,
            suppress,
        })
}

/// The runtime the properties run pipelines on, with one worker.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let mut rules = String::from("columns:\n  id: keep\n");
    for (c, a) in case.actions.iter().enumerate() {
        rules.push_str(&format!("  c{c}: {}\n", ACTIONS[*a]));
    }
    if case.suppress {
        rules.push_str("rows:\n  - suppress: { column: c0, is: personal_identity_number }\n");
    }
    std::fs::write(dir.path().join("p.rules.yaml"), rules).unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "dataset: { id: p, title: P, description: D, publisher: { name: K, org_nr: \"212000-0000\" }, contact: a@b.se, license: CC0-1.0, access: shared }\n\
         source: { files: { path: in, format: csv, key: [id] } }\nrules: p.rules.yaml\n\
         publish: { store: file://pub, state: file://state }\n",
    )
    .unwrap();
    let mut csv = csv::Writer::from_writer(Vec::new());
    csv.write_record(["id", "c0", "c1", "c2", "c3"]).unwrap();
    let mut secrets = Vec::new();
    let mut planted = Vec::new();
    for (r, row) in case.cells.iter().enumerate() {
        let mut record = vec![format!("r{r}")];
        for (c, (word, id)) in row.iter().enumerate() {
            let mut value = format!("{} {}", WORDS[*word], if c % 2 == 0 { "a" } else { "b" });
            if let Some(id) = id {
                value = format!("{value} {id}");
                planted.push(id.clone());
            }
            if ACTIONS[case.actions[c]] == "drop" {
                let secret = format!("SECRET{r}x{c}");
                value = format!("{value} {secret}");
                secrets.push(secret);
            }
            record.push(value);
        }
        csv.write_record(&record).unwrap();
    }
    std::fs::write(inbox.join("export.csv"), csv.into_inner().unwrap()).unwrap();

    let result = runtime().block_on(support::run_once(&dir.path().join("p.yaml")));

    // Everything published: CSV bytes as they are, Parquet values read back.
    let mut text = String::new();
    for file in support::walk(&dir.path().join("pub")) {
        match file.extension().and_then(|e| e.to_str()) {
            Some("parquet") => {
                let batch = support::read_file(&file);
                for column in batch.columns() {
                    let strings =
                        arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8).unwrap();
                    let strings = strings
                        .as_any()
                        .downcast_ref::<arrow::array::StringArray>()
                        .unwrap();
                    for v in strings.iter().flatten() {
                        text.push_str(v);
                        text.push('\n');
                    }
                }
            }
            _ => text.push_str(&String::from_utf8_lossy(&std::fs::read(&file).unwrap())),
        }
    }
    for secret in &secrets {
        prop_assert!(
            !text.contains(secret.as_str()),
            "dropped value {} published",
            secret
        );
    }
    for id in &planted {
        let digits: String = id.chars().filter(char::is_ascii_digit).collect();
        prop_assert!(
            !text.contains(id.as_str()) && !text.contains(&digits),
            "identity number {} published",
            id
        );
    }
    // Planted numbers in a kept column must have stopped the version.
    let kept_with_id = case.cells.iter().any(|row| {
        row.iter().enumerate().any(|(c, (_, id))| {
            id.is_some() && ACTIONS[case.actions[c]] == "keep" && !(c == 0 && case.suppress)
        })
    });
    if kept_with_id {
        prop_assert!(
            result.is_err(),
            "a kept identity number did not stop the version"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn nothing_dropped_or_personal_is_ever_published(case in case_strategy()) {
        run_case(&case)?;
    }
}

/// One full dump: for each id, its partition and value, or absent.
type Dump = Vec<Option<(usize, usize)>>;

/// Publishes `dumps` one after another as full exports with files of at most
/// three rows, and checks after each that the newest version holds exactly
/// that dump, in parts that respect the limit, and that a version rewrote no
/// part whose rows it did not change.
fn run_dumps(dumps: &[Dump]) -> Result<(), TestCaseError> {
    const PARTS: [&str; 3] = ["a", "b", "c"];
    const VALUES: [&str; 4] = ["ett", "två", "tre", "fyra"];
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::write(
        dir.path().join("p.rules.yaml"),
        "columns:\n  id: keep\n  d: keep\n  v: keep\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "dataset: { id: p, title: P, description: D, publisher: { name: K, org_nr: \"212000-0000\" }, contact: a@b.se, license: CC0-1.0, access: shared }\n\
         source: { files: { path: in, format: csv, mode: full_dump, key: [id] } }\nrules: p.rules.yaml\n\
         publish: { store: file://pub, state: file://state, max_file_rows: 3, partition_by: { column: d, by: value } }\n",
    )
    .unwrap();
    let runtime = runtime();
    let published = dir.path().join("pub/p");
    let mut before: Option<oppen::publish::manifest::Version> = None;
    let mut previous: Dump = Vec::new();
    for (step, dump) in dumps.iter().enumerate() {
        let mut text = String::from("id,d,v\n");
        let mut expected = Vec::new();
        for (id, row) in dump.iter().enumerate() {
            if let Some((d, v)) = row {
                text.push_str(&format!("{id},{},{}\n", PARTS[*d], VALUES[*v]));
                expected.push(format!("{id}|{}|{}", PARTS[*d], VALUES[*v]));
            }
        }
        expected.sort();
        std::fs::write(inbox.join(format!("export-{step:03}.csv")), text).unwrap();
        runtime
            .block_on(support::run_once(&dir.path().join("p.yaml")))
            .unwrap();
        if expected.is_empty() && before.is_none() {
            continue; // nothing published yet
        }
        let version = support::read_manifest(&published.join("manifest.json")).unwrap();
        let (_, rows) = support::newest_rows(&published);
        prop_assert_eq!(&rows, &expected, "step {}", step);
        for (name, part) in &version.partitions {
            prop_assert!(part.rows <= 3, "{} holds {} rows", name, part.rows);
        }
        // A part no row of which changed, left or arrived is referenced again.
        if let Some(before) = &before {
            let changed: std::collections::HashSet<usize> = (0..dump.len().max(previous.len()))
                .filter(|&id| {
                    dump.get(id).copied().flatten() != previous.get(id).copied().flatten()
                })
                .collect();
            let ids_in = |part: &oppen::publish::manifest::PartitionFiles| -> Vec<usize> {
                let file = &part.files[&oppen::config::OutputFormat::Parquet];
                let batch = support::read_file(&published.join(&file.path));
                let ids = arrow::compute::cast(
                    batch.column_by_name("id").unwrap(),
                    &arrow::datatypes::DataType::Int64,
                )
                .unwrap();
                let ids = ids
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .unwrap();
                ids.iter().flatten().map(|id| id as usize).collect()
            };
            for (name, part) in &before.partitions {
                let after = version.partitions.get(name);
                let touched = ids_in(part)
                    .into_iter()
                    .chain(after.map(ids_in).unwrap_or_default())
                    .any(|id| changed.contains(&id));
                if !touched {
                    prop_assert_eq!(after, Some(part), "{} rewritten", name);
                }
            }
        }
        before = Some(version);
        previous = dump.clone();
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn parts_hold_exactly_the_dump_and_untouched_parts_are_kept(
        dumps in proptest::collection::vec(
            proptest::collection::vec(proptest::option::weighted(0.8, (0usize..3, 0usize..4)), 0..16),
            1..5,
        )
    ) {
        run_dumps(&dumps)?;
    }
}
