//! A first version written while its image is still being read.
//!
//! The first version of a dataset is a whole image (a table's snapshot, a
//! first full export): every row is an insert, nothing is compared with a
//! committed state. So its parts need not wait for the commit: each part is
//! handed to the encoders as soon as it holds `max_file_rows` rows, while the
//! source is still read, and only the keys (with the part and fingerprint of
//! their row) stay in memory. Encoding overlaps the read, and memory holds a
//! few parts instead of the whole image.
//!
//! A row staged later for a key already placed (a duplicate key, an update or
//! a delete in the same version) leaves its part "dirty": the part keeps only
//! the rows the key map still points at, filtered when it is written or, if it
//! was written already, read back and written again at the commit. A schema
//! that changes within the version holds the parts from then on, and the
//! commit aligns every part to the final schema. The files are named for the
//! version being written, so a crash leaves only unreferenced files that the
//! next start removes (DESIGN.md "Guarantees").

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow::array::{BooleanArray, FixedSizeBinaryArray, RecordBatch, UInt32Array};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use oppen_connector_api::Op;
use tokio::task::JoinHandle;

use super::index::KeyIndex;
use super::state::{self, Entry, KeyScope, KeySet, Partitions};
use super::{PartFiles, PublishError, Result, part_name};
use crate::config::PartitionGrain;

/// What a part's write task gives back: its files, or the error and its rows
/// (kept, so a retried commit writes the part again).
pub(super) type PartTask = JoinHandle<std::result::Result<PartFiles, (PublishError, RecordBatch)>>;

/// A part of a streamed version and how far its write is.
pub(super) struct StreamedPart {
    pub id: u32,
    pub name: String,
    pub write: PartWrite,
}

pub(super) enum PartWrite {
    /// Rows not handed to the writer yet: held (the schema changed within
    /// the version), or a failed write to be retried.
    Rows(Vec<RecordBatch>),
    /// Being encoded and written.
    Running(PartTask),
    /// Written.
    Written(PartFiles),
    /// Every row was replaced or deleted: not part of the version.
    Empty,
    /// The write task failed without giving its rows back.
    Lost,
}

/// A deleted row in [`Streamed::apply_to_keys`] (part ids are dense from 0).
const DELETED: u32 = u32::MAX;

/// A part still filling, one per partition.
struct Filling {
    id: u32,
    number: u32,
    batches: Vec<RecordBatch>,
    rows: usize,
}

/// How the streamed version's rows are placed.
pub(super) struct Placement<'a> {
    pub partition_by: Option<&'a (String, PartitionGrain)>,
    pub single: &'a str,
    pub max_rows: usize,
}

/// A first version being written while it is staged.
pub(super) struct Streamed {
    /// The schema of the newest staged batch (the version's).
    pub schema: SchemaRef,
    /// Every key of the version: the part of its current row and its fingerprint.
    pub keys: KeyIndex,
    /// Keys seen by an image under way that is not the first, and the keys
    /// it covers: when it ends, the keys of its scope it lacks are deleted (a
    /// newer image replaces the older).
    seen: Option<(KeyScope, KeySet)>,
    filling: BTreeMap<u32, Filling>,
    /// Parts handed over, in the order they filled.
    pub parts: Vec<StreamedPart>,
    /// Parts holding a row that a later row of its key replaced or deleted.
    pub dirty: HashSet<u32>,
    /// The schema changed within the version: parts are held for the commit.
    hold: bool,
    /// Parts that filled and wait to be written (see [`Streamed::take_full`]).
    full: Vec<usize>,
}

impl std::fmt::Debug for Streamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamed")
            .field("keys", &self.keys.len())
            .field("parts", &self.parts.len())
            .field("filling", &self.filling.len())
            .finish_non_exhaustive()
    }
}

impl Streamed {
    pub fn new(schema: SchemaRef) -> Self {
        Streamed {
            schema,
            keys: KeyIndex::default(),
            seen: None,
            filling: BTreeMap::new(),
            parts: Vec::new(),
            dirty: HashSet::new(),
            hold: false,
            full: Vec::new(),
        }
    }

    /// A new image of the keys in `scope` starts (after the first): it
    /// replaces what was staged of them.
    pub fn start_image(&mut self, scope: KeyScope) {
        self.seen = Some((scope, KeySet::default()));
    }

    /// The image under way is whole: keys staged before it that it lacks are deleted.
    pub fn end_image(&mut self) {
        let Some((scope, seen)) = self.seen.take() else {
            return;
        };
        let dirty = &mut self.dirty;
        self.keys.retain(|key, e| {
            let keep = seen.contains(key) || !scope.contains(key);
            if !keep {
                dirty.insert(e.partition);
            }
            keep
        });
    }

    /// Places a staged batch's rows into parts. Parts that filled are listed
    /// for [`Streamed::take_full`].
    pub fn stage(
        &mut self,
        data: &RecordBatch,
        ops: &[Op],
        names: &mut Partitions,
        placement: &Placement<'_>,
    ) -> Result<()> {
        if data.schema() != self.schema {
            self.schema = data.schema();
            self.hold = true;
        }
        let part_of = state::partition_ids(data, placement.partition_by, placement.single, names)?;
        let hashes = state::row_hashes(data)?;
        let keys = state::keys(data)?;
        // Rows of this batch per part, in order; a part that fills takes its
        // rows at once, so the next part starts empty.
        let mut rows: HashMap<u32, Vec<u32>, state::KeyHash> = HashMap::default();
        // The part of each row, DELETED for a delete; applied to the key map below.
        let mut placed = vec![DELETED; ops.len()];
        let max = placement.max_rows.max(1);
        for (r, op) in ops.iter().enumerate() {
            if *op == Op::Delete {
                continue;
            }
            if let Some((_, seen)) = &mut self.seen {
                seen.insert(state::key_at(keys, r));
            }
            let base = part_of[r];
            let filling = self.filling.entry(base).or_insert_with(|| Filling {
                id: base,
                number: 0,
                batches: Vec::new(),
                rows: 0,
            });
            if filling.rows >= max {
                // Full: it takes its rows of this batch, then the next part starts.
                let mut done = std::mem::replace(
                    filling,
                    Filling {
                        id: 0,
                        number: filling.number + 1,
                        batches: Vec::new(),
                        rows: 0,
                    },
                );
                filling.id = names.id(&part_name(names.name(base), filling.number));
                if let Some(indices) = rows.remove(&done.id) {
                    done.batches.push(take(data, &indices)?);
                }
                let name = names.name(done.id).to_string();
                self.full.push(self.parts.len());
                self.parts.push(StreamedPart {
                    id: done.id,
                    name,
                    write: PartWrite::Rows(done.batches),
                });
            }
            filling.rows += 1;
            let part = filling.id;
            rows.entry(part).or_default().push(r as u32);
            placed[r] = part;
        }
        self.apply_to_keys(keys, &placed, &hashes);
        for filling in self.filling.values_mut() {
            if let Some(indices) = rows.remove(&filling.id) {
                filling.batches.push(take(data, &indices)?);
            }
        }
        Ok(())
    }

    /// Records a batch's rows in the key map: each row's part and fingerprint,
    /// or its removal, in row order (a later row of a key wins).
    fn apply_to_keys(&mut self, keys: &FixedSizeBinaryArray, placed: &[u32], hashes: &[u64]) {
        for r in 0..placed.len() {
            let key = state::key_at(keys, r);
            let old = if placed[r] == DELETED {
                self.keys.remove(&key)
            } else {
                let entry = Entry {
                    partition: placed[r],
                    hash: hashes[r],
                };
                self.keys.insert(key, entry)
            };
            if let Some(old) = old {
                self.dirty.insert(old.partition);
            }
        }
    }

    /// Parts that filled since the last call, their rows ready to write
    /// (filtered if dirty). Empty while the parts are held.
    pub fn take_full(&mut self) -> Result<Vec<(usize, RecordBatch)>> {
        if self.hold {
            self.full.clear();
            return Ok(Vec::new());
        }
        let mut ready = Vec::new();
        for i in std::mem::take(&mut self.full) {
            if let Some(rows) = self.prepare(i, &self.schema.clone())? {
                ready.push((i, rows));
            }
        }
        Ok(ready)
    }

    /// Hands every part still filling over (at the commit).
    pub fn close(&mut self, names: &Partitions) {
        for (_, filling) in std::mem::take(&mut self.filling) {
            if filling.rows == 0 {
                continue;
            }
            self.parts.push(StreamedPart {
                id: filling.id,
                name: names.name(filling.id).to_string(),
                write: PartWrite::Rows(filling.batches),
            });
        }
        self.full.clear();
    }

    /// The rows part `i` holds now (its current rows only, aligned to
    /// `target`) when they are to be written; `None` when it has none left,
    /// or when they are not in memory.
    pub fn prepare(&mut self, i: usize, target: &SchemaRef) -> Result<Option<RecordBatch>> {
        let part = &mut self.parts[i];
        let PartWrite::Rows(batches) = &part.write else {
            return Ok(None);
        };
        let mut kept = KeySet::default();
        let dirty = self.dirty.remove(&part.id);
        let mut aligned = Vec::with_capacity(batches.len());
        let mut realigned = false;
        for b in batches {
            let b = if dirty {
                current_rows(b, part.id, &self.keys, &mut kept)?
            } else {
                b.clone()
            };
            realigned |= b.schema() != *target;
            aligned.push(state::align(&b, target)?);
        }
        let rows = arrow::compute::concat_batches(target, &aligned)?;
        if rows.num_rows() == 0 {
            part.write = PartWrite::Empty;
            return Ok(None);
        }
        if realigned {
            // Fingerprints follow the published values, which now have the new columns.
            state::index_rows(&mut self.keys, &rows, part.id)?;
        }
        Ok(Some(rows))
    }
}

/// The rows of `batch` that are still the current row of their key in part
/// `part` (a key staged twice with the same values keeps its first row).
pub(super) fn current_rows(
    batch: &RecordBatch,
    part: u32,
    keys: &KeyIndex,
    kept: &mut KeySet,
) -> Result<RecordBatch, ArrowError> {
    let hashes = state::row_hashes(batch)?;
    let column = state::keys(batch)?;
    let mask: BooleanArray = (0..batch.num_rows())
        .map(|r| {
            let key = state::key_at(column, r);
            let current = keys
                .get(&key)
                .is_some_and(|e| e.partition == part && e.hash == hashes[r]);
            Some(current && kept.insert(key))
        })
        .collect();
    arrow::compute::filter_record_batch(batch, &mask)
}

/// Rows `indices` of `batch`: a zero-copy slice when they are consecutive.
fn take(batch: &RecordBatch, indices: &[u32]) -> Result<RecordBatch, ArrowError> {
    let (first, last) = (indices[0] as usize, indices[indices.len() - 1] as usize);
    if last - first + 1 == indices.len() {
        return Ok(batch.slice(first, indices.len()));
    }
    let indices = UInt32Array::from(indices.to_vec());
    let columns = batch
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &indices, None))
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(batch.schema(), columns)
}
