//! The streamed first version against the staged one: the same changes must
//! publish the same rows, and the state left behind must carry on the same.

use std::sync::Arc;

use arrow::array::{ArrayRef, FixedSizeBinaryBuilder, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use oppen_connector_api::{BatchKind, Op, Position};
use proptest::prelude::*;

use super::state::KeyScope;
use super::{Committed, Publisher, Settings};
use crate::classify::{Classified, KEY_BYTES, KEY_COLUMN};
use crate::config::OutputFormat;
use crate::store::{Store, StoreLocation};

/// One staged step: an image (rows, in batches; of the keys of one of two
/// transport partitions, or of all) or changes (`None` deletes).
#[derive(Debug, Clone)]
enum Step {
    Image(Vec<Vec<(u8, u8)>>, Option<u32>),
    Changes(Vec<(u8, Option<u8>)>),
}

/// A step and whether its batches carry the extra column `w` (a schema change).
type Staged = (Step, bool);

fn key(id: u8) -> [u8; 32] {
    let mut k = [0u8; 32];
    // Spread over the bytes the index and the transport partitioning read.
    for (i, b) in k.iter_mut().enumerate() {
        *b = id.wrapping_mul(31).wrapping_add(i as u8).rotate_left(3) ^ id;
    }
    k
}

fn batch(rows: &[(u8, Option<u8>)], wide: bool) -> Classified {
    batch_keyed(rows, wide, KEY_BYTES)
}

/// [`batch`] with `_key`s of `width` bytes (32 before keys were cut to 16).
fn batch_keyed(rows: &[(u8, Option<u8>)], wide: bool, width: usize) -> Classified {
    let mut fields = vec![
        Field::new(KEY_COLUMN, DataType::FixedSizeBinary(width as i32), false),
        Field::new("id", DataType::Int64, true),
        Field::new("v", DataType::Utf8, true),
    ];
    if wide {
        fields.push(Field::new("w", DataType::Utf8, true));
    }
    let mut keys = FixedSizeBinaryBuilder::with_capacity(rows.len(), width as i32);
    for (id, _) in rows {
        keys.append_value(&key(*id)[..width]).unwrap();
    }
    let ids: Int64Array = rows
        .iter()
        .map(|(id, v)| v.map(|_| i64::from(*id)))
        .collect();
    let values: StringArray = rows
        .iter()
        .map(|(_, v)| v.map(|v| format!("v{v}")))
        .collect();
    let mut columns: Vec<ArrayRef> = vec![Arc::new(keys.finish()), Arc::new(ids), Arc::new(values)];
    if wide {
        let w: StringArray = rows
            .iter()
            .map(|(id, v)| v.map(|v| format!("w{id}{v}")))
            .collect();
        columns.push(Arc::new(w));
    }
    let data = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    Classified {
        data,
        ops: rows
            .iter()
            .map(|(_, v)| if v.is_some() { Op::Update } else { Op::Delete })
            .collect(),
        suppressed_by: vec![None; rows.len()],
        values_redacted: 0,
    }
}

fn settings(max_file_rows: usize, cache: usize) -> Settings {
    Settings {
        dataset: "d".into(),
        formats: vec![OutputFormat::Parquet],
        partition_by: None,
        keep_versions: 10,
        max_file_rows,
        row_cache_bytes: cache,
        rules_digest: String::new(),
        key_fingerprint: "k".into(),
        catalog: None,
    }
}

async fn open(dir: &std::path::Path, s: Settings, streamed: bool) -> Publisher {
    let store: Store = StoreLocation::local(dir.join("pub")).open().unwrap();
    let state: Store = StoreLocation::local(dir.join("state")).open().unwrap();
    let (mut publisher, _) = Publisher::open(s, store, state).await.unwrap();
    publisher.stream_images(streamed);
    publisher
}

async fn stage(publisher: &mut Publisher, steps: &[Staged], lsn: &mut u64) {
    for (step, wide) in steps {
        match step {
            Step::Image(batches, scope) => {
                publisher.set_image_scope(match scope {
                    Some(partition) => KeyScope::Partition {
                        partition: *partition,
                        of: 2,
                    },
                    None => KeyScope::All,
                });
                let last = batches.len() - 1;
                for (i, rows) in batches.iter().enumerate() {
                    *lsn += 1;
                    let rows: Vec<_> = rows.iter().map(|&(id, v)| (id, Some(v))).collect();
                    publisher
                        .stage(
                            batch(&rows, *wide),
                            BatchKind::Snapshot,
                            i == last,
                            Position::Lsn { lsn: *lsn },
                            None,
                        )
                        .unwrap();
                    publisher.settle().await;
                }
            }
            Step::Changes(rows) => {
                *lsn += 1;
                publisher
                    .stage(
                        batch(rows, *wide),
                        BatchKind::Changes,
                        true,
                        Position::Lsn { lsn: *lsn },
                        None,
                    )
                    .unwrap();
            }
        }
    }
}

/// The published rows of the newest version, as sorted `id|v|w` lines.
fn published(dir: &std::path::Path) -> Vec<String> {
    let root = dir.join("pub/d");
    let Ok(bytes) = std::fs::read(root.join("manifest.json")) else {
        return Vec::new();
    };
    let super::manifest::VersionManifest::V1(version) = serde_json::from_slice(&bytes).unwrap();
    let mut rows = Vec::new();
    for part in version.partitions.values() {
        let file = &part.files[&OutputFormat::Parquet];
        rows.extend(
            parquet_rows(&root.join(&file.path))
                .into_iter()
                .map(|(_, row)| row),
        );
    }
    rows.sort();
    rows
}

/// A Parquet file's record batches.
fn parquet_batches(path: &std::path::Path) -> Vec<RecordBatch> {
    let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap()
        .build()
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Rows as the CSV writer's lines, without a header.
fn csv_body_lines(rows: &RecordBatch) -> Vec<String> {
    let mut out = Vec::new();
    super::csv::encode_rows(rows, false, &mut out).unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// A Parquet file's rows as `id|v|w`, each with its `op` where it has one.
fn parquet_rows(path: &std::path::Path) -> Vec<(Option<String>, String)> {
    use arrow::util::display::array_value_to_string;
    let mut rows = Vec::new();
    for b in parquet_batches(path) {
        let cell = |c: &str, r: usize| {
            b.column_by_name(c)
                .map(|a| array_value_to_string(a, r).unwrap())
        };
        for r in 0..b.num_rows() {
            let cells: Vec<String> = ["id", "v", "w"]
                .iter()
                .map(|c| cell(c, r).unwrap_or_default())
                .collect();
            rows.push((cell("op", r), cells.join("|")));
        }
    }
    rows
}

/// The table a consumer that follows the changes builds: every version's
/// changes applied in order (an initial version's data files; a later one's
/// change files, then its inserted parts' data files, every row an insert).
fn followed(dir: &std::path::Path) -> Vec<String> {
    let root = dir.join("pub/d");
    let mut versions: Vec<u64> = std::fs::read_dir(root.join("versions"))
        .map(|d| {
            d.filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                super::manifest::parse_version_path(&format!("versions/{name}"))
            })
            .collect()
        })
        .unwrap_or_default();
    versions.sort_unstable();
    let mut table: std::collections::BTreeMap<String, String> = Default::default();
    for v in versions {
        let path = root.join(format!(
            "versions/{}.json",
            super::manifest::version_name(v)
        ));
        let super::manifest::VersionManifest::V1(version) =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        // A column the version's schema no longer has is gone from every row
        // (the change files list the rows whose kept values changed).
        if !version.schema.iter().any(|c| c.name == "w") {
            for row in table.values_mut() {
                let kept: Vec<&str> = row.split('|').take(2).collect();
                *row = format!("{}|", kept.join("|"));
            }
        }
        // Whether a file's rows are all inserts, its `op` column says too.
        let files = version.change_files(OutputFormat::Parquet);
        for (file, _) in files {
            for (op, row) in parquet_rows(&root.join(&file.path)) {
                let id = row.split('|').next().unwrap().to_string();
                match op.as_deref().unwrap_or("insert") {
                    "delete" => {
                        assert!(
                            table.remove(&id).is_some(),
                            "version {v} deletes {id}, which it does not hold"
                        );
                    }
                    "insert" => {
                        assert!(
                            table.insert(id.clone(), row).is_none(),
                            "version {v} inserts {id} again"
                        );
                    }
                    _ => {
                        assert!(
                            table.insert(id.clone(), row).is_some(),
                            "version {v} updates {id}, which it does not hold"
                        );
                    }
                }
            }
        }
    }
    let mut rows: Vec<String> = table.into_values().collect();
    rows.sort();
    rows
}

fn summary(c: &Option<Committed>) -> Option<(u64, u64, u64, u64)> {
    c.as_ref()
        .map(|c| (c.rows, c.inserts, c.updates, c.deletes))
}

/// The newest version's manifest, as the tests' publisher wrote it.
fn newest(dir: &std::path::Path) -> super::manifest::Version {
    let bytes = std::fs::read(dir.join("pub/d/manifest.json")).unwrap();
    let super::manifest::VersionManifest::V1(version) = serde_json::from_slice(&bytes).unwrap();
    version
}

/// The newest version's private state manifest.
fn newest_state(dir: &std::path::Path) -> super::manifest::StateManifest {
    let path = dir
        .join("state/d")
        .join(super::manifest::state_manifest_path(&newest(dir)));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Stages ids `0..rows` (all with value 0) as a first version and commits it.
async fn commit_image(publisher: &mut Publisher, rows: u8, lsn: &mut u64) {
    let image: Vec<(u8, u8)> = (0..rows).map(|id| (id, 0)).collect();
    stage(publisher, &[(Step::Image(vec![image], None), false)], lsn).await;
    publisher.commit().await.unwrap();
}

/// A runtime with two workers, as the publisher's blocking work expects.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Stages `first`, commits, stages `then`, commits, with and without a
/// streamed first version; both must publish the same and report the same.
/// Partitioned by id, a version has more parts filling at once than stream.
fn differential(
    first: &[Staged],
    then: &[Staged],
    max_file_rows: usize,
    cache: usize,
    by_id: bool,
) {
    let settings = |max_file_rows, cache| Settings {
        partition_by: by_id.then(|| ("id".to_string(), crate::config::PartitionGrain::Value)),
        ..settings(max_file_rows, cache)
    };
    runtime().block_on(async {
        let mut outcomes = Vec::new();
        for streamed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut lsn = 0;
            let mut publisher = open(dir.path(), settings(max_file_rows, cache), streamed).await;
            stage(&mut publisher, first, &mut lsn).await;
            assert_eq!(publisher.is_streaming(), streamed);
            let one = summary(&publisher.commit().await.unwrap());
            let after_one = published(dir.path());
            // The next version from a publisher that recovered from the state.
            drop(publisher);
            let mut publisher = open(dir.path(), settings(max_file_rows, cache), streamed).await;
            stage(&mut publisher, then, &mut lsn).await;
            let two = summary(&publisher.commit().await.unwrap());
            outcomes.push((one, after_one, two, published(dir.path())));
        }
        assert_eq!(
            outcomes[0], outcomes[1],
            "streamed (left) and staged (right) differ"
        );
    });
}

/// The publisher's row cache: none (every version reads the parts it touches
/// from the state), room for a couple of the tests' parts (some cached, some
/// read, some evicted within a version), or room for all.
fn cache_budget() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0), Just(1000), Just(1 << 20)]
}

fn rows() -> impl Strategy<Value = Vec<(u8, u8)>> {
    proptest::collection::vec((0u8..12, 0u8..3), 0..8)
}

fn step() -> impl Strategy<Value = Staged> {
    let image = (
        proptest::collection::vec(rows(), 1..4),
        proptest::option::of(0u32..2),
    )
        .prop_map(|(rows, scope)| Step::Image(rows, scope));
    let changes =
        proptest::collection::vec((0u8..12, proptest::option::weighted(0.7, 0u8..3)), 1..6)
            .prop_map(Step::Changes);
    (prop_oneof![image, changes], proptest::bool::weighted(0.15))
}

fn first_image() -> impl Strategy<Value = Staged> {
    (
        (
            proptest::collection::vec(rows(), 1..5),
            proptest::option::of(0u32..2),
        )
            .prop_map(|(rows, scope)| Step::Image(rows, scope)),
        proptest::bool::weighted(0.15),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn a_streamed_first_version_publishes_what_a_staged_one_does(
        head in first_image(),
        rest in proptest::collection::vec(step(), 0..4),
        then in proptest::collection::vec(step(), 1..3),
        max_file_rows in 1usize..4,
        cache in cache_budget(),
        by_id in proptest::bool::ANY,
    ) {
        let mut first = vec![head];
        first.extend(rest);
        differential(&first, &then, max_file_rows, cache, by_id);
    }
}

#[test]
fn duplicate_keys_and_deletes_in_written_parts_are_rewritten() {
    // Parts of two rows: ids 1 and 2 fill the first part, which is written
    // before id 1 comes again and id 2 is deleted.
    let image = Step::Image(vec![vec![(1, 0), (2, 0)], vec![(3, 0), (1, 1)]], None);
    let changes = Step::Changes(vec![(2, None), (4, Some(2))]);
    let then = Step::Changes(vec![(1, Some(2)), (3, None)]);
    differential(
        &[(image, false), (changes, false)],
        &[(then, false)],
        2,
        0,
        false,
    );
}

/// Rows updated in place keep their place in their part, and the part's files
/// (written from the previous ones where values did not change) hold exactly
/// the current rows in both formats, cached or read back from the state; the
/// state takes update files until they are folded into a new state file.
#[test]
fn parts_updated_in_place_keep_their_order_in_every_format() {
    for cache in [0, 1 << 20] {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut s = settings(20, cache);
            s.formats = vec![OutputFormat::Parquet, OutputFormat::Csv];
            let mut publisher = open(dir.path(), s.clone(), false).await;
            let mut lsn = 0;
            // Parts: ids 0-19, 20-39, 40-59.
            commit_image(&mut publisher, 60, &mut lsn).await;
            let mut expected: Vec<Option<u8>> = vec![Some(0); 60];
            // Two rows updated in place in the first part, one in the second,
            // a delete in the third; then, after a restart
            // (from the state alone), more versions of single updates than a
            // part keeps update files for.
            let mut rounds: Vec<Vec<(u8, Option<u8>)>> =
                vec![vec![(0, Some(1)), (2, Some(2)), (24, Some(1)), (47, None)]];
            for round in 0..12u8 {
                rounds.push(vec![
                    (round, Some(round % 3 + 3)),
                    (30 + round, Some(2)),
                    (48, Some(round)),
                ]);
            }
            for (i, changes) in rounds.into_iter().enumerate() {
                for &(id, v) in &changes {
                    expected[id as usize] = v;
                }
                stage(&mut publisher, &[(Step::Changes(changes), false)], &mut lsn).await;
                assert!(publisher.commit().await.unwrap().is_some());
                if i == 0 {
                    drop(publisher);
                    publisher = open(dir.path(), s.clone(), false).await;
                }
            }
            let parts = part_lines(dir.path());
            let want: Vec<String> = expected
                .iter()
                .enumerate()
                .filter_map(|(id, v)| v.map(|v| format!("{id},v{v}")))
                .collect();
            assert_eq!(parts, want, "rows in their places (cache {cache})");
            // The state of the newest version: the first part got an update
            // file per version until they were folded into a new state file.
            let state = newest_state(dir.path());
            assert!(matches!(state, super::manifest::StateManifest::V2(_)));
            let state = state.into_state();
            // Thirteen versions changed it: eight update files, a new state
            // file, four more.
            let first = state.updates.get("d").map_or(0, Vec::len);
            assert_eq!(
                first,
                4,
                "the first part carries {first} update files: {:?}",
                state.updates.keys().collect::<Vec<_>>()
            );
            // A publisher that recovers from that state carries on the same.
            drop(publisher);
            let mut publisher = open(dir.path(), s.clone(), false).await;
            stage(
                &mut publisher,
                &[(Step::Changes(vec![(5, Some(2))]), false)],
                &mut lsn,
            )
            .await;
            let c = publisher.commit().await.unwrap();
            assert_eq!(summary(&c), Some((59, 0, 1, 0)));
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]
    /// Versions of updates in place (with a delete now and then) over parts
    /// large enough to take update files, with restarts from the state: the
    /// newest version always publishes the rows as they were last staged.
    #[test]
    fn update_files_of_the_state_keep_every_version_exact(
        rows in 16u8..40,
        max_file_rows in 8usize..20,
        versions in proptest::collection::vec(
            (
                proptest::collection::vec((0u8..40, proptest::option::weighted(0.95, 0u8..4)), 1..3),
                proptest::bool::weighted(0.25),
            ),
            1..14,
        ),
        cache in cache_budget(),
    ) {
        let got: Vec<(Vec<String>, Vec<String>)> = runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(max_file_rows, cache);
            let mut publisher = open(dir.path(), s.clone(), false).await;
            let mut lsn = 0;
            commit_image(&mut publisher, rows, &mut lsn).await;
            let mut model: std::collections::BTreeMap<u8, u8> = (0..rows).map(|id| (id, 0)).collect();
            let mut seen = Vec::new();
            for (changes, reopen) in versions {
                // Only keys the table has: updates in place, or deletes.
                let changes: Vec<(u8, Option<u8>)> =
                    changes.into_iter().filter(|(id, _)| model.contains_key(id)).collect();
                if changes.is_empty() {
                    continue;
                }
                for &(id, v) in &changes {
                    match v {
                        Some(v) => model.insert(id, v),
                        None => model.remove(&id),
                    };
                }
                stage(&mut publisher, &[(Step::Changes(changes), false)], &mut lsn).await;
                publisher.commit().await.unwrap();
                if reopen {
                    drop(publisher);
                    publisher = open(dir.path(), s.clone(), false).await;
                }
                let mut want: Vec<String> =
                    model.iter().map(|(id, v)| format!("{id}|v{v}|")).collect();
                want.sort();
                seen.push((published(dir.path()), want));
            }
            seen
        });
        for (published, want) in got {
            prop_assert_eq!(published, want);
        }
    }
}

/// A large append goes to a new part when the partition's last part is
/// already a quarter full, leaving that part's files as they were; a small
/// one fills the last part (rewriting it), as a tail that small is cheap to
/// write again.
#[test]
fn a_large_append_starts_a_new_part_instead_of_rewriting_the_last() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut lsn = 0;
        // Parts of at most 8 rows; a quarter is 2.
        let mut publisher = open(dir.path(), settings(8, 1 << 20), false).await;
        commit_image(&mut publisher, 4, &mut lsn).await;
        let files = |dir: &std::path::Path| -> Vec<(String, String)> {
            newest(dir)
                .partitions
                .iter()
                .map(|(name, p)| (name.clone(), p.files[&OutputFormat::Parquet].path.clone()))
                .collect()
        };
        let first = files(dir.path());
        assert_eq!(first.len(), 1);
        // Six new rows (at least a quarter) after a last part of four (at least a quarter).
        let append = Step::Changes((4..10).map(|id| (id, Some(0))).collect());
        stage(&mut publisher, &[(append, false)], &mut lsn).await;
        let committed = publisher.commit().await.unwrap().unwrap();
        assert_eq!((committed.inserts, committed.partitions_written), (6, 1));
        let second = files(dir.path());
        assert_eq!(second.len(), 2, "{second:?}");
        assert_eq!(
            second[0], first[0],
            "the full-enough last part is not written again"
        );
        // The new part holds inserts only: the manifest names it, and its
        // rows are not written again as change files.
        let changes = newest(dir.path()).changes;
        assert_eq!(changes.inserted, vec![second[1].0.clone()]);
        assert!(changes.files.is_empty(), "{:?}", changes.files);
        // One new row (less than a quarter) goes to the last part, rewriting it.
        let append = Step::Changes(vec![(10, Some(0))]);
        stage(&mut publisher, &[(append, false)], &mut lsn).await;
        let committed = publisher.commit().await.unwrap().unwrap();
        assert_eq!((committed.inserts, committed.partitions_written), (1, 1));
        let third = files(dir.path());
        assert_eq!(third.len(), 2);
        assert_eq!(third[0], first[0]);
        assert_ne!(
            third[1], second[1],
            "the last part is rewritten with the new row"
        );
        // A part that held rows before is not an inserted part.
        let changes = newest(dir.path()).changes;
        assert!(changes.inserted.is_empty());
        let file = &changes.files[&OutputFormat::Parquet];
        let rows = parquet_rows(&dir.path().join("pub/d").join(&file.path));
        assert_eq!(
            rows,
            vec![(Some("insert".to_string()), "10|v0|".to_string())]
        );
        let mut got = published(dir.path());
        got.sort();
        let mut want: Vec<String> = (0..11).map(|id| format!("{id}|v0|")).collect();
        want.sort();
        assert_eq!(got, want);
    });
}

/// A version that touches every part keeps only the rows that fit the cache,
/// and the next versions read the others back from the state while they
/// take the cached ones.
#[test]
fn a_version_touching_every_part_keeps_only_what_fits_the_cache() {
    // Five parts of two rows; every row updated in each version.
    let update = |v: u8| Step::Changes((0..10).map(|id| (id, Some(v))).collect());
    let cached = |p: &Publisher| -> Vec<usize> {
        p.partitions
            .values()
            .filter_map(|p| p.rows.as_ref().map(RecordBatch::get_array_memory_size))
            .collect()
    };
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut lsn = 0;
        let mut all = open(dir.path(), settings(2, 1 << 20), false).await;
        commit_image(&mut all, 10, &mut lsn).await;
        stage(&mut all, &[(update(1), false)], &mut lsn).await;
        all.commit().await.unwrap();
        let sizes = cached(&all);
        assert_eq!(
            sizes.len(),
            5,
            "with room for all, every part written stays"
        );
        // Room for two and a half parts.
        let budget = sizes.iter().max().unwrap() * 5 / 2;
        let dir = tempfile::tempdir().unwrap();
        let mut lsn = 0;
        let mut some = open(dir.path(), settings(2, budget), false).await;
        commit_image(&mut some, 10, &mut lsn).await;
        for v in 1..=3 {
            stage(&mut some, &[(update(v), false)], &mut lsn).await;
            let committed = some.commit().await.unwrap().unwrap();
            assert_eq!((committed.updates, committed.partitions_written), (10, 5));
            let kept = cached(&some);
            // Sizes vary a little with how a part's arrays were built (read
            // from the state, or updated in place); some fit, never all.
            assert!(
                (1..5).contains(&kept.len()) && kept.iter().sum::<usize>() <= budget,
                "version {v}: cached {kept:?} within {budget}"
            );
            let want: Vec<String> = (0..10).map(|id| format!("{id}|v{v}|")).collect();
            let mut got = published(dir.path());
            got.sort();
            assert_eq!(got, want, "version {v}");
        }
    });
}

#[test]
fn a_schema_change_within_a_streamed_version_realigns_written_parts() {
    let image = Step::Image(vec![vec![(1, 0), (2, 0), (3, 0)], vec![(4, 0)]], None);
    let wide = Step::Changes(vec![(5, Some(1)), (1, Some(1))]);
    differential(
        &[(image, false), (wide, true)],
        &[(Step::Changes(vec![(2, Some(2))]), true)],
        1,
        1 << 20,
        false,
    );
}

#[test]
fn parts_beyond_the_streams_are_gathered_and_written_whole() {
    // Ten partitions fill at once, more than stream; parts of two rows.
    let ten = |v| (0..10).map(|id| (id, v)).collect::<Vec<_>>();
    let image = Step::Image(vec![ten(0), ten(1), ten(2)], None);
    let changes = Step::Changes(vec![(3, None), (4, Some(2)), (11, Some(0))]);
    let then = Step::Changes(vec![(5, Some(1)), (6, None)]);
    // The first batch starts ten parts: four stream, six are gathered.
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let by_id = Settings {
            partition_by: Some(("id".to_string(), crate::config::PartitionGrain::Value)),
            ..settings(2, 0)
        };
        let mut publisher = open(dir.path(), by_id, true).await;
        let rows: Vec<_> = ten(0).into_iter().map(|(id, v)| (id, Some(v))).collect();
        publisher
            .stage(
                batch(&rows, false),
                BatchKind::Snapshot,
                false,
                Position::Lsn { lsn: 1 },
                None,
            )
            .unwrap();
        use super::stream::{MAX_STREAMS, PartWrite};
        let parts = &publisher.streamed.as_ref().unwrap().parts;
        let streaming = parts
            .iter()
            .filter(|p| matches!(p.write, PartWrite::Streaming(_)))
            .count();
        let gathered = parts
            .iter()
            .filter(|p| matches!(p.write, PartWrite::Rows(_)))
            .count();
        assert_eq!((parts.len(), streaming, gathered), (10, MAX_STREAMS, 6));
    });
    differential(
        &[(image, false), (changes, false)],
        &[(then, false)],
        2,
        0,
        true,
    );
}

/// One source transaction, as the PostgreSQL connector sees it: changes
/// (`None` deletes), or a TRUNCATE followed by inserts; `wide` is whether the
/// table had the column `w` when it ran (a change of it is a schema change).
#[derive(Debug, Clone)]
struct Transaction {
    truncate: bool,
    rows: Vec<(u8, Option<u8>)>,
    wide: bool,
}

/// How the stream is cut: after each transaction the connector flushes what
/// it gathered or gathers on (`flush`), may split a transaction's rows
/// (`split`), and the runtime may cut a version at a boundary (`cut`); the
/// publisher may be restarted from its state after a version (`reopen`).
#[derive(Debug, Clone)]
struct Cuts {
    flush: bool,
    split: Option<usize>,
    cut: bool,
    reopen: bool,
}

fn transaction() -> impl Strategy<Value = (Transaction, Cuts)> {
    let rows = proptest::collection::vec((0u8..12, proptest::option::weighted(0.75, 0u8..4)), 0..6);
    let transaction = (
        proptest::bool::weighted(0.2),
        rows,
        proptest::bool::weighted(0.2),
    )
        .prop_map(|(truncate, rows, wide)| Transaction {
            truncate,
            // Only inserts follow a TRUNCATE.
            rows: rows
                .into_iter()
                .filter(|(_, v)| !truncate || v.is_some())
                .collect(),
            wide,
        });
    let cuts = (
        proptest::bool::ANY,
        proptest::option::weighted(0.2, 0usize..6),
        proptest::bool::weighted(0.3),
        proptest::bool::weighted(0.2),
    )
        .prop_map(|(flush, split, cut, reopen)| Cuts {
            flush,
            split,
            cut,
            reopen,
        });
    (transaction, cuts)
}

/// Whether the stream shows a transaction's schema: pgoutput describes a
/// table only before a change of it, so a column dropped and added back with
/// no change in between goes unseen (a known limit of the protocol).
fn described(t: &Transaction) -> bool {
    t.truncate || !t.rows.is_empty()
}

/// A batch on its way from the connector: kind, rows, end of transaction, wide.
type Emitted = (BatchKind, Vec<(u8, Option<u8>)>, bool, bool);

/// The connector's batching (see `connectors/postgres`): rows gather across
/// transactions until a flush; a TRUNCATE flushes what is gathered (not at a
/// transaction end) and sends an empty image; a schema change flushes first.
fn emit(transactions: &[(Transaction, Cuts)]) -> Vec<(Emitted, Option<bool>)> {
    // A batch comes with `Some(reopen)` where the runtime may cut a version after it.
    let mut out: Vec<(Emitted, Option<bool>)> = Vec::new();
    let mut gathered: Vec<(u8, Option<u8>)> = Vec::new();
    let mut wide = false;
    let changes = |rows: &mut Vec<_>, eot: bool, wide: bool| {
        (BatchKind::Changes, std::mem::take(rows), eot, wide)
    };
    for (t, cuts) in transactions {
        if t.wide != wide && described(t) {
            out.push((changes(&mut gathered, true, wide), None));
            wide = t.wide;
        }
        if t.truncate {
            if !gathered.is_empty() {
                out.push((changes(&mut gathered, false, wide), None));
            }
            out.push(((BatchKind::Snapshot, Vec::new(), false, wide), None));
        }
        for (i, row) in t.rows.iter().enumerate() {
            if cuts.split == Some(i) && !gathered.is_empty() {
                out.push((changes(&mut gathered, false, wide), None));
            }
            gathered.push(*row);
        }
        if cuts.flush {
            out.push((
                changes(&mut gathered, true, wide),
                cuts.cut.then_some(cuts.reopen),
            ));
        }
    }
    out.push((changes(&mut gathered, true, wide), Some(false)));
    // Empty batches that do not end a transaction carry nothing.
    out.retain(|((kind, rows, eot, _), _)| {
        *eot || !rows.is_empty() || *kind == BatchKind::Snapshot
    });
    out
}

/// The table after the transactions, as `id|v|w` lines.
fn model(transactions: &[(Transaction, Cuts)]) -> Vec<String> {
    let mut table: std::collections::BTreeMap<u8, (u8, Option<String>)> = Default::default();
    let mut wide = false;
    for (t, _) in transactions {
        if t.wide != wide && described(t) {
            // The column is added (empty) or dropped with its values.
            for row in table.values_mut() {
                row.1 = None;
            }
            wide = t.wide;
        }
        if t.truncate {
            table.clear();
        }
        for &(id, v) in &t.rows {
            match v {
                Some(v) => {
                    table.insert(id, (v, t.wide.then(|| format!("w{id}{v}"))));
                }
                None => {
                    table.remove(&id);
                }
            }
        }
    }
    let mut rows: Vec<String> = table
        .into_iter()
        .map(|(id, (v, w))| format!("{id}|v{v}|{}", w.unwrap_or_default()))
        .collect();
    rows.sort();
    rows
}

/// Stages the emitted batches as the runtime does (a version before a schema
/// change, after a complete image, and where the cuts say) and returns what
/// the newest version publishes, and what following its changes builds.
fn replay(
    transactions: &[(Transaction, Cuts)],
    max_file_rows: usize,
    cache: usize,
) -> (Vec<String>, Vec<String>) {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let open_now = || open(dir.path(), settings(max_file_rows, cache), true);
        let mut publisher = open_now().await;
        let mut schema_wide = None;
        for (lsn, ((kind, rows, eot, wide), cut)) in (1..).zip(emit(transactions)) {
            if schema_wide.is_some_and(|w| w != wide) && publisher.holds_whole_changes() {
                publisher.commit().await.unwrap();
            }
            schema_wide = Some(wide);
            publisher
                .stage(batch(&rows, wide), kind, eot, Position::Lsn { lsn }, None)
                .unwrap();
            publisher.settle().await;
            if (cut.is_some() || publisher.snapshot_complete()) && publisher.at_boundary() {
                publisher.commit().await.unwrap();
                if cut == Some(true) {
                    drop(publisher);
                    publisher = open_now().await;
                }
            }
        }
        assert!(publisher.at_boundary());
        publisher.commit().await.unwrap();
        (published(dir.path()), followed(dir.path()))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]
    /// Whatever the batching and wherever versions are cut, the newest
    /// version publishes the table as the transactions left it.
    #[test]
    fn the_newest_version_equals_the_table_however_the_stream_is_cut(
        transactions in proptest::collection::vec(transaction(), 1..12),
        max_file_rows in 1usize..4,
        cache in cache_budget(),
    ) {
        let (got, followed) = replay(&transactions, max_file_rows, cache);
        let want = model(&transactions);
        prop_assert_eq!(&got, &want);
        // Following the change files, version by version, gives the same table.
        prop_assert_eq!(followed, want);
    }
}

#[test]
fn a_streamed_part_whose_write_fails_is_read_from_the_source_again() {
    runtime().block_on(async {
        let image = [(
            Step::Image(vec![vec![(1, 0), (2, 0), (3, 0)], vec![(4, 1)]], None),
            false,
        )];
        let dir = tempfile::tempdir().unwrap();
        let mut publisher = open(dir.path(), settings(2, 0), true).await;
        // A file where the data folder goes: every data file fails to write.
        let blocker = dir.path().join("pub/d/data");
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        std::fs::write(&blocker, b"in the way").unwrap();
        let mut lsn = 0;
        stage(&mut publisher, &image, &mut lsn).await;
        let failed = publisher.commit().await.unwrap_err();
        assert!(
            matches!(failed, super::PublishError::PartLost { .. }),
            "{failed}"
        );
        assert!(failed.to_string().contains("read from the source again"));
        assert!(publisher.is_streaming(), "nothing was committed");
        assert!(published(dir.path()).is_empty());
        // What the runtime does: drop the version and read the source again.
        std::fs::remove_file(&blocker).unwrap();
        publisher.discard_pending();
        stage(&mut publisher, &image, &mut lsn).await;
        let committed = publisher.commit().await.unwrap();
        assert_eq!(summary(&committed), Some((4, 4, 0, 0)));
        assert_eq!(published(dir.path()), ["1|v0|", "2|v0|", "3|v0|", "4|v1|"]);
    });
}

/// A private state file that is not what was written stops recovery with an
/// error naming the file and what to do; it never becomes the rows the next
/// version builds on.
#[test]
fn a_damaged_state_file_stops_recovery_and_says_which() {
    for damage in ["flip", "truncate"] {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut publisher = open(dir.path(), settings(20, 0), false).await;
            let mut lsn = 0;
            commit_image(&mut publisher, 60, &mut lsn).await;
            drop(publisher);
            let file = newest_state(dir.path())
                .into_state()
                .partitions
                .into_values()
                .next()
                .unwrap();
            let path = dir.path().join("state/d").join(&file.path);
            let mut bytes = std::fs::read(&path).unwrap();
            match damage {
                "flip" => {
                    let middle = bytes.len() / 2;
                    bytes[middle] ^= 0x20;
                }
                _ => bytes.truncate(bytes.len() - 1),
            }
            std::fs::write(&path, &bytes).unwrap();
            let store = StoreLocation::local(dir.path().join("pub")).open().unwrap();
            let state = StoreLocation::local(dir.path().join("state"))
                .open()
                .unwrap();
            let failed = Publisher::open(settings(20, 0), store, state)
                .await
                .err()
                .unwrap_or_else(|| panic!("a {damage}ped state file was read as good"));
            let message = failed.to_string();
            assert!(
                matches!(failed, super::PublishError::Corrupt { .. }),
                "{message}"
            );
            assert!(message.contains(&file.path), "names the file: {message}");
            assert!(message.contains("damaged"), "{message}");
            assert!(message.contains("restore the state location"), "{message}");
            let differs = if damage == "flip" {
                "XXH3"
            } else {
                "bytes where"
            };
            assert!(message.contains(differs), "says what differs: {message}");
        });
    }
}

/// A part updated in place copies what did not change from its previous file
/// only when that file is what its manifest says: a damaged one is not carried
/// into the new version, which is encoded whole from the state instead.
#[test]
fn a_damaged_previous_file_is_not_copied_into_the_next_version() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut publisher = open(dir.path(), settings(20, 0), false).await;
        let mut lsn = 0;
        commit_image(&mut publisher, 20, &mut lsn).await;
        // Damage the last byte of the `id` column's chunk, a column the
        // update below leaves unchanged (so it would be copied).
        let version = newest(dir.path());
        let file = &version.partitions.values().next().unwrap().files[&OutputFormat::Parquet];
        let path = dir.path().join("pub/d").join(&file.path);
        let mut bytes = std::fs::read(&path).unwrap();
        let metadata = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            bytes::Bytes::from(bytes.clone()),
        )
        .unwrap()
        .metadata()
        .clone();
        let id = metadata.row_group(0).column(0);
        assert_eq!(id.column_path().string(), "id");
        let (start, len) = id.byte_range();
        bytes[(start + len - 1) as usize] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        stage(
            &mut publisher,
            &[(Step::Changes(vec![(3, Some(7))]), false)],
            &mut lsn,
        )
        .await;
        let committed = publisher.commit().await.unwrap();
        assert_eq!(summary(&committed), Some((20, 0, 1, 0)));
        let mut want: Vec<String> = (0..20u8)
            .map(|id| format!("{id}|v{}|", if id == 3 { 7 } else { 0 }))
            .collect();
        want.sort();
        assert_eq!(published(dir.path()), want);
    });
}

/// Stages `(id, a, b)` rows (see [`ab_batch`]) as one transaction, or as an
/// image, and commits them.
async fn commit_ab(
    publisher: &mut Publisher,
    rows: &[(u8, String, i64)],
    kind: BatchKind,
    lsn: &mut u64,
) {
    *lsn += 1;
    let op = match kind {
        BatchKind::Snapshot => Op::Insert,
        _ => Op::Update,
    };
    publisher
        .stage(
            ab_batch(rows, op),
            kind,
            true,
            Position::Lsn { lsn: *lsn },
            None,
        )
        .unwrap();
    publisher.commit().await.unwrap();
}

/// A part of `(id, a, b)` rows for [`parts_read_in_part_publish_what_a_whole_read_does`].
fn ab_batch(rows: &[(u8, String, i64)], kind: Op) -> Classified {
    let fields = vec![
        Field::new(
            KEY_COLUMN,
            DataType::FixedSizeBinary(KEY_BYTES as i32),
            false,
        ),
        Field::new("id", DataType::Int64, true),
        Field::new("a", DataType::Utf8, true),
        Field::new("b", DataType::Int64, true),
    ];
    let mut keys = FixedSizeBinaryBuilder::with_capacity(rows.len(), KEY_BYTES as i32);
    for (id, _, _) in rows {
        keys.append_value(&key(*id)[..KEY_BYTES]).unwrap();
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(keys.finish()),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|(id, _, _)| i64::from(*id)),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(_, a, _)| a),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|(_, _, b)| *b),
        )),
    ];
    Classified {
        data: RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap(),
        ops: vec![kind; rows.len()],
        suppressed_by: vec![None; rows.len()],
        values_redacted: 0,
    }
}

/// Parts updated in place are read back with only their keys and the
/// columns the last update changed when that guess holds for every updated
/// row, and whole when it does not (another column changed, too many rows
/// for an update file): every version publishes the table as it is, in
/// Parquet and CSV alike, and a publisher that recovers from the state
/// carries on the same.
#[test]
fn parts_read_in_part_publish_what_a_whole_read_does() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(20, 0);
        s.formats = vec![OutputFormat::Parquet, OutputFormat::Csv];
        let mut publisher = open(dir.path(), s.clone(), false).await;
        let mut model: Vec<(u8, String, i64)> = (0..60).map(|id| (id, "a0".into(), 0)).collect();
        let mut lsn = 0;
        commit_ab(&mut publisher, &model, BatchKind::Snapshot, &mut lsn).await;
        // The private state files carry XXH3 alone; published files SHA-256 too.
        let state = newest_state(dir.path()).into_state();
        for file in state.partitions.values() {
            assert!(file.sha256.is_empty() && file.xxh3.is_some(), "{file:?}");
            let bytes = std::fs::read(dir.path().join("state/d").join(&file.path)).unwrap();
            file.check(&bytes).unwrap();
        }
        assert!(newest(dir.path()).files().all(|f| f.sha256.len() == 64));
        let projected = |p: &Publisher| {
            p.in_place
                .projected
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        // (ids, new a, new b, parts read in part by the version): the parts
        // hold ids 0-19, 20-39 and 40-59.
        type Round = (&'static [u8], Option<&'static str>, Option<i64>, u64);
        let rounds: [Round; 8] = [
            // No guess yet: read whole; the guess is now `a`.
            (&[1, 21], Some("a1"), None, 0),
            // `a` again: both parts read in part.
            (&[2, 41], Some("a2"), None, 2),
            // `b`: the guess fails, read whole; the guess is now `b`.
            (&[3], None, Some(3), 0),
            // `a` and `b`: fails again; the guess is now `a` and `b`.
            (&[4, 44], Some("a4"), Some(4), 0),
            // `a` alone within the guessed `a` and `b`: read in part.
            (&[5, 25], Some("a5"), None, 2),
            // More rows than an update file takes (1/8 of a part): whole.
            (&[6, 7, 8], Some("a6"), None, 0),
            // The other parts still go by the guess.
            (&[26, 46], Some("a7"), None, 2),
            // An update to the values a row already has changes nothing.
            (&[9], Some("a0"), Some(0), 0),
        ];
        for (ids, a, b, expected) in rounds {
            let mut rows = Vec::new();
            for &id in ids {
                let row = &mut model[id as usize];
                if let Some(a) = a {
                    row.1 = a.to_string();
                }
                if let Some(b) = b {
                    row.2 = b;
                }
                rows.push(row.clone());
            }
            let before = projected(&publisher);
            commit_ab(&mut publisher, &rows, BatchKind::Changes, &mut lsn).await;
            assert_eq!(
                projected(&publisher) - before,
                expected,
                "parts read in part for ids {ids:?}"
            );
            assert_eq!(ab_published(dir.path()), ab_lines(&model), "after {ids:?}");
        }
        // Recovered from the state alone, with one more version on top.
        drop(publisher);
        let mut publisher = open(dir.path(), s.clone(), false).await;
        for (id, a) in [(10u8, "a8"), (11, "a9")] {
            model[id as usize].1 = a.to_string();
            let row = [model[id as usize].clone()];
            commit_ab(&mut publisher, &row, BatchKind::Changes, &mut lsn).await;
        }
        assert_eq!(projected(&publisher), 1, "the second read in part");
        assert_eq!(ab_published(dir.path()), ab_lines(&model));
        // The state read whole gives the same rows.
        drop(publisher);
        let publisher = open(dir.path(), s, false).await;
        let mut recovered = Vec::new();
        for partition in publisher.partitions.values() {
            let rows = super::recover::read_part(&publisher.state_store, "d", &partition.state)
                .await
                .unwrap();
            recovered.extend(csv_body_lines(&super::state::without_key(&rows)));
        }
        recovered.sort();
        assert_eq!(recovered, ab_lines(&model));
    });
}

/// `id,a,b` lines of the model, sorted.
fn ab_lines(model: &[(u8, String, i64)]) -> Vec<String> {
    let mut lines: Vec<String> = model
        .iter()
        .map(|(id, a, b)| format!("{id},{a},{b}"))
        .collect();
    lines.sort();
    lines
}

/// The newest version's rows as CSV lines, part after part in their order,
/// after checking that each part's Parquet and CSV files hold the same lines
/// in the same order.
fn part_lines(dir: &std::path::Path) -> Vec<String> {
    let root = dir.join("pub/d");
    let mut lines = Vec::new();
    for (name, part) in &newest(dir).partitions {
        let csv = std::fs::read_to_string(root.join(&part.files[&OutputFormat::Csv].path)).unwrap();
        let from_csv: Vec<String> = csv.lines().skip(1).map(String::from).collect();
        let from_parquet: Vec<String> =
            parquet_batches(&root.join(&part.files[&OutputFormat::Parquet].path))
                .iter()
                .flat_map(csv_body_lines)
                .collect();
        assert_eq!(from_csv, from_parquet, "part {name}: CSV and Parquet agree");
        lines.extend(from_csv);
    }
    lines
}

/// [`part_lines`], sorted.
fn ab_published(dir: &std::path::Path) -> Vec<String> {
    let mut lines = part_lines(dir);
    lines.sort();
    lines
}

/// Calls `f` on every file reference (an object with a path and a size) of
/// a manifest's JSON.
fn each_file(v: &mut serde_json::Value, f: &mut dyn FnMut(&mut serde_json::Value)) {
    match v {
        serde_json::Value::Object(map) => {
            if map.get("path").is_some_and(|p| p.is_string()) && map.contains_key("bytes") {
                f(v);
                return;
            }
            map.values_mut().for_each(|v| each_file(v, f));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| each_file(v, f)),
        _ => {}
    }
}

/// Rewrites every state file of the newest version with 32-byte `_key`s
/// (each id's whole [`key`]), as publishers wrote them before keys were cut
/// to 16 bytes, and records their new sizes and XXH3 in the state manifest.
/// Returns the paths it rewrote, as the manifest names them.
fn widen_state_keys(dir: &std::path::Path) -> Vec<String> {
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    let root = dir.join("state/d");
    let manifest_path = root.join(super::manifest::state_manifest_path(&newest(dir)));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let mut widened = Vec::new();
    each_file(&mut manifest, &mut |file| {
        let name = file["path"].as_str().unwrap().to_owned();
        let path = root.join(&name);
        let rows = super::state::decode_state(std::fs::read(&path).unwrap().into()).unwrap();
        let ids = rows
            .column_by_name("id")
            .unwrap()
            .as_primitive::<Int64Type>();
        let mut keys = FixedSizeBinaryBuilder::with_capacity(rows.num_rows(), 32);
        for id in ids.values() {
            keys.append_value(key(u8::try_from(*id).unwrap())).unwrap();
        }
        let schema = rows.schema();
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        let at = schema.index_of(KEY_COLUMN).unwrap();
        fields[at] = Field::new(KEY_COLUMN, DataType::FixedSizeBinary(32), false);
        let mut columns = rows.columns().to_vec();
        columns[at] = Arc::new(keys.finish());
        let wide = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        let bytes = super::state::encode_state(&wide).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        file["bytes"] = bytes.len().into();
        file["xxh3"] = super::manifest::xxh3_hex(xxhash_rust::xxh3::xxh3_64(&bytes)).into();
        widened.push(name);
    });
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    widened
}

/// The width of `_key` in a state file, as written.
fn state_key_width(path: &std::path::Path) -> i32 {
    let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
    let reader =
        arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
    match reader
        .schema()
        .field_with_name(KEY_COLUMN)
        .unwrap()
        .data_type()
    {
        DataType::FixedSizeBinary(width) => *width,
        other => panic!("{KEY_COLUMN} is {other}"),
    }
}

/// A dataset whose state holds the 32-byte `_key`s written before keys were
/// cut to 16 bytes carries on after the upgrade: its rows are the same rows
/// (an unchanged row is no update), changes from a connector still staging
/// wide keys count once, parts written since hold narrow keys, and a
/// publisher recovering from the mixed state publishes the same.
#[test]
fn a_state_of_wide_keys_carries_on_with_narrow_ones() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut lsn = 0;
        {
            let mut publisher = open(dir.path(), settings(4, 0), true).await;
            commit_image(&mut publisher, 10, &mut lsn).await;
        }
        let widened = widen_state_keys(dir.path());
        assert!(widened.len() >= 3, "ten rows in parts of four");
        let mut model: std::collections::BTreeMap<u8, u8> = (0..10).map(|id| (id, 0)).collect();
        let changes = |rows: &[(u8, Option<u8>)],
                       model: &mut std::collections::BTreeMap<u8, u8>| {
            for &(id, v) in rows {
                match v {
                    Some(v) => model.insert(id, v),
                    None => model.remove(&id),
                };
            }
        };
        let lines = |model: &std::collections::BTreeMap<u8, u8>| {
            let mut lines: Vec<String> =
                model.iter().map(|(id, v)| format!("{id}|v{v}|")).collect();
            lines.sort();
            lines
        };
        // Each step opens a publisher on the state the step before left, as a
        // restart does: narrow keys on the wide state, wide keys again (a
        // connector not yet upgraded, over the transport), then narrow keys
        // on the mixed state. Each change counts once, an unchanged row none.
        let steps = [
            (
                vec![(1, Some(5)), (2, None), (20, Some(1)), (3, Some(0))],
                KEY_BYTES,
                (10, 1, 1, 1),
            ),
            (
                vec![(1, Some(6)), (20, None), (4, Some(0)), (21, Some(2))],
                32,
                (10, 1, 1, 1),
            ),
            (vec![(0, Some(9)), (21, None)], KEY_BYTES, (9, 0, 1, 1)),
        ];
        for (rows, width, counts) in steps {
            let mut publisher = open(dir.path(), settings(4, 0), true).await;
            lsn += 1;
            publisher
                .stage(
                    batch_keyed(&rows, false, width),
                    BatchKind::Changes,
                    true,
                    Position::Lsn { lsn },
                    None,
                )
                .unwrap();
            let committed = publisher.commit().await.unwrap();
            assert_eq!(summary(&committed), Some(counts), "keys of {width} bytes");
            changes(&rows, &mut model);
            assert_eq!(published(dir.path()), lines(&model));
        }
        // Every state file written since holds narrow keys (wide keys staged
        // included); a part no step touched keeps its wide file, read narrow.
        let mut state = serde_json::to_value(newest_state(dir.path())).unwrap();
        let mut written_since = 0;
        each_file(&mut state, &mut |file| {
            let name = file["path"].as_str().unwrap();
            let width = state_key_width(&dir.path().join("state/d").join(name));
            if widened.iter().any(|w| w == name) {
                assert_eq!(width, 32, "{name}: a widened file no step rewrote");
            } else {
                assert_eq!(
                    width, KEY_BYTES as i32,
                    "{name}: written since the widening"
                );
                written_since += 1;
            }
        });
        assert!(written_since > 0, "the steps wrote state files");
    });
}
