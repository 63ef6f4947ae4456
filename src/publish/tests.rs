//! The streamed first version against the staged one: the same changes must
//! publish the same rows, and the state left behind must carry on the same.

use std::sync::Arc;

use arrow::array::{ArrayRef, FixedSizeBinaryBuilder, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use oppen_connector_api::{BatchKind, Op, Position};
use proptest::prelude::*;

use super::state::KeyScope;
use super::store::{Store, StoreLocation};
use super::{Committed, Publisher, Settings};
use crate::classify::{Classified, KEY_COLUMN};
use crate::config::OutputFormat;

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
    let mut fields = vec![
        Field::new(KEY_COLUMN, DataType::FixedSizeBinary(32), false),
        Field::new("id", DataType::Int64, true),
        Field::new("v", DataType::Utf8, true),
    ];
    if wide {
        fields.push(Field::new("w", DataType::Utf8, true));
    }
    let mut keys = FixedSizeBinaryBuilder::with_capacity(rows.len(), 32);
    for (id, _) in rows {
        keys.append_value(key(*id)).unwrap();
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
    use arrow::util::display::array_value_to_string;
    let root = dir.join("pub/d");
    let Ok(bytes) = std::fs::read(root.join("manifest.json")) else {
        return Vec::new();
    };
    let super::manifest::VersionManifest::V1(version) = serde_json::from_slice(&bytes).unwrap();
    let mut rows = Vec::new();
    for part in version.partitions.values() {
        let file = &part.files[&OutputFormat::Parquet];
        let bytes = bytes::Bytes::from(std::fs::read(root.join(&file.path)).unwrap());
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            for r in 0..b.num_rows() {
                let cells: Vec<String> = ["id", "v", "w"]
                    .iter()
                    .map(|c| {
                        b.column_by_name(c)
                            .map(|a| array_value_to_string(a, r).unwrap())
                            .unwrap_or_default()
                    })
                    .collect();
                rows.push(cells.join("|"));
            }
        }
    }
    rows.sort();
    rows
}

fn summary(c: &Option<Committed>) -> Option<(u64, u64, u64, u64)> {
    c.as_ref()
        .map(|c| (c.rows, c.inserts, c.updates, c.deletes))
}

/// Stages `first`, commits, stages `then`, commits, with and without a
/// streamed first version; both must publish the same and report the same.
fn differential(first: &[Staged], then: &[Staged], max_file_rows: usize, cache: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
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
        cached in proptest::bool::ANY,
    ) {
        let mut first = vec![head];
        first.extend(rest);
        // With no cache every version reads the parts it touches from the state.
        differential(&first, &then, max_file_rows, if cached { 1 << 20 } else { 0 });
    }
}

#[test]
fn duplicate_keys_and_deletes_in_written_parts_are_rewritten() {
    // Parts of two rows: ids 1 and 2 fill the first part, which is written
    // before id 1 comes again and id 2 is deleted.
    let image = Step::Image(vec![vec![(1, 0), (2, 0)], vec![(3, 0), (1, 1)]], None);
    let changes = Step::Changes(vec![(2, None), (4, Some(2))]);
    let then = Step::Changes(vec![(1, Some(2)), (3, None)]);
    differential(&[(image, false), (changes, false)], &[(then, false)], 2, 0);
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
    );
}
