//! A first version written while its image is still being read.
//!
//! The first version of a dataset is a whole image (a table's snapshot, a
//! first full export): every row is an insert, nothing is compared with a
//! committed state. So its parts need not wait for the commit: a part's files
//! are opened when its first row is staged, and every batch of rows staged
//! for it goes straight to its encoders (one per file, each on its own
//! thread), while the source is still read. Only the keys (with the part and
//! fingerprint of their row) stay in memory: encoding overlaps the read, and
//! no part is ever whole in memory.
//!
//! A few parts stream at once ([`MAX_STREAMS`]); the rows of further parts
//! (a dataset partitioned by month fills many at once) are gathered and
//! written whole when the part is full. A streamed part whose write fails has
//! no rows to write again: the version is read from the source again
//! ([`super::PublishError::PartLost`]).
//!
//! A row staged later for a key already placed (a duplicate key, an update or
//! a delete in the same version) leaves its part "dirty": the part keeps only
//! the rows the key map still points at, filtered when it is written or, if it
//! was streamed or written already, read back and written again at the
//! commit. A schema that changes within the version ends the streams and
//! holds the parts from then on, and the commit aligns every part to the
//! final schema. The files are named for the version being written, so a
//! crash leaves only unreferenced files that the next start removes
//! (DESIGN.md "Guarantees").

use std::collections::btree_map::Entry as Slot;
use std::collections::{BTreeMap, HashSet, VecDeque};

use arrow::array::{BooleanArray, FixedSizeBinaryArray, RecordBatch, UInt32Array};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use oppen_connector_api::Op;
use tokio::task::JoinHandle;

use super::index::{KeyIndex, KeyLog};
use super::part::{PartFiles, part_name};
use super::state::{self, Entry, KeyScope, KeySet, Partitions};
use super::{PublishError, Result};
use crate::config::PartitionGrain;

/// What a part's write task gives back: its files, or the error and its rows
/// (kept, so a retried commit writes the part again; none for a streamed part).
pub(super) type PartTask =
    JoinHandle<std::result::Result<PartFiles, (PublishError, Option<RecordBatch>)>>;

/// Parts whose rows stream to their encoders at once. One fills at a time
/// per partition; each holds a thread per file and its Parquet row group.
pub(super) const MAX_STREAMS: usize = 4;

/// A part whose files are being written while its rows are staged.
pub(super) struct PartStream {
    /// One per encoder of the part, each taking every batch.
    senders: Vec<tokio::sync::mpsc::Sender<RecordBatch>>,
    /// Rows staged and not sent yet: staging does not wait, [`PartStream::send`] does.
    backlog: VecDeque<RecordBatch>,
    /// More rows may come.
    open: bool,
    task: PartTask,
}

impl PartStream {
    pub fn new(senders: Vec<tokio::sync::mpsc::Sender<RecordBatch>>, task: PartTask) -> Self {
        Self {
            senders,
            backlog: VecDeque::new(),
            open: true,
            task,
        }
    }

    /// Hands the staged rows to the encoders, waiting while they are behind
    /// (so a fast source cannot pile rows up in memory). A failed encoder
    /// takes nothing more; its task reports why.
    async fn send(&mut self) {
        while let Some(batch) = self.backlog.pop_front() {
            for sender in &self.senders {
                let _ = sender.send(batch.clone()).await;
            }
        }
    }
}

/// A part of a streamed version and how far its write is.
pub(super) struct StreamedPart {
    pub id: u32,
    pub name: String,
    pub write: PartWrite,
}

pub(super) enum PartWrite {
    /// Rows not handed to the writer yet: gathered, held (the schema changed
    /// within the version), or a failed write to be retried.
    Rows(Vec<RecordBatch>),
    /// Rows go to the encoders as they are staged.
    Streaming(Box<PartStream>),
    /// Being encoded and written.
    Running(PartTask),
    /// Written.
    Written(PartFiles),
    /// Every row was replaced or deleted: not part of the version.
    Empty,
    /// The write task failed without giving its rows back.
    Lost,
}

impl PartWrite {
    /// Ends a streaming part: it takes no more rows, and [`flush`] ends its
    /// files. Whether the part was streaming.
    fn end(&mut self) -> bool {
        match self {
            PartWrite::Streaming(stream) => {
                stream.open = false;
                true
            }
            _ => false,
        }
    }
}

/// A deleted row in [`Streamed::apply_to_keys`] (part ids are dense from 0).
const DELETED: u32 = u32::MAX;

/// A partition's part still filling, one per partition.
struct Filling {
    /// The part's place in [`Streamed::parts`].
    part: usize,
    id: u32,
    number: u32,
    rows: usize,
}

/// How the streamed version's rows are placed.
pub(super) struct Placement<'a> {
    pub partition_by: Option<&'a (String, PartitionGrain)>,
    pub single: &'a str,
    pub max_rows: usize,
    /// Opens the files of a part (by name, for rows of a schema) to stream its rows to.
    pub open: &'a dyn Fn(&str, &SchemaRef) -> PartStream,
}

/// A first version being written while it is staged.
pub(super) struct Streamed {
    /// The schema of the newest staged batch (the version's).
    pub schema: SchemaRef,
    /// Every key of the version put in order so far: the part of its
    /// current row and its fingerprint. Read through [`Streamed::keys`].
    keys: KeyIndex,
    /// Keys staged since, in the order they came ([`KeyLog`]).
    log: KeyLog,
    /// Keys seen by an image under way that is not the first and replaces
    /// keys staged before it (see [`Streamed::start_image`]), and the keys it
    /// covers: when it ends, the keys of its scope it lacks are deleted (a
    /// newer image replaces the older).
    seen: Option<(KeyScope, KeySet)>,
    filling: BTreeMap<u32, Filling>,
    /// Every part, in the order they were started.
    pub parts: Vec<StreamedPart>,
    /// Parts holding a row that a later row of its key replaced or deleted.
    pub dirty: HashSet<u32>,
    /// The schema changed within the version: parts are held for the commit.
    hold: bool,
    /// Gathered parts that filled and wait to be written (see [`Streamed::take_full`]).
    full: Vec<usize>,
}

impl std::fmt::Debug for Streamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamed")
            .field("keys", &(self.keys.len() + self.log.len()))
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
            log: KeyLog::default(),
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
    ///
    /// Where nothing of `scope` was staged (a publisher on a transport stages
    /// the images of its partitions one after another) the image replaces
    /// nothing: its keys are not tracked, and its end puts no keys in order
    /// and looks none up. One look at the keys staged so far costs less than
    /// a set of the image's keys and a pass over the version's at its end.
    pub fn start_image(&mut self, scope: KeyScope) {
        let staged = self.keys.iter().any(|(key, _)| scope.contains(key))
            || self.log.keys().any(|key| scope.contains(key));
        self.seen = staged.then(|| (scope, KeySet::default()));
    }

    /// Every key of the version with the part of its current row and its
    /// fingerprint: the keys staged since the last call are put in order,
    /// and the parts of the rows they replaced marked dirty.
    pub fn keys(&mut self) -> &mut KeyIndex {
        sort_into(
            &mut self.keys,
            std::mem::take(&mut self.log),
            &mut self.dirty,
        );
        &mut self.keys
    }

    /// Room for about `rows` keys in all (an estimate from the source).
    pub fn reserve_keys(&mut self, rows: usize) {
        let held = self.keys.len() + self.log.len();
        self.log.reserve(rows.saturating_sub(held));
    }

    /// The image under way is whole: keys staged before it that it lacks are deleted.
    pub fn end_image(&mut self) {
        let Some((scope, seen)) = self.seen.take() else {
            return;
        };
        self.keys();
        let dirty = &mut self.dirty;
        self.keys.retain(|key, e| {
            let keep = seen.contains(key) || !scope.contains(key);
            if !keep {
                dirty.insert(e.partition);
            }
            keep
        });
    }

    /// Places a staged batch's rows into parts: queued for a streaming part's
    /// encoders (sent by [`flush`]), or gathered. Gathered parts that filled
    /// are listed for [`Streamed::take_full`].
    pub fn stage(
        &mut self,
        data: &RecordBatch,
        ops: &[Op],
        names: &mut Partitions,
        placement: &Placement<'_>,
    ) -> Result<()> {
        let max = placement.max_rows.max(1);
        if data.schema() != self.schema {
            self.schema = data.schema();
            self.hold = true;
            // Streams take one schema: theirs end here, and each partition
            // goes on in a new part, held for the commit.
            for filling in self.filling.values_mut() {
                if self.parts[filling.part].write.end() {
                    filling.rows = max;
                }
            }
        }
        let part_of = state::partition_ids(data, placement.partition_by, placement.single, names)?;
        let hashes = state::row_hashes(data)?;
        let keys = state::keys(data)?;
        // Rows of this batch per part (by place in `parts`), in order.
        let mut rows: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        // The part of each row, DELETED for a delete; applied to the key map below.
        let mut placed = vec![DELETED; ops.len()];
        for (r, op) in ops.iter().enumerate() {
            if *op == Op::Delete {
                continue;
            }
            if let Some((_, seen)) = &mut self.seen {
                seen.insert(state::key_at(keys, r));
            }
            let base = part_of[r];
            // New parts stream while few do and the schema has not changed.
            let stream = (!self.hold).then_some(&self.schema);
            let filling = match self.filling.entry(base) {
                Slot::Vacant(slot) => {
                    slot.insert(start(&mut self.parts, base, 0, names, placement, stream))
                }
                Slot::Occupied(slot) => {
                    let filling = slot.into_mut();
                    if filling.rows >= max {
                        // Full: its rows are complete, the next part starts.
                        if !self.parts[filling.part].write.end() && !self.hold {
                            self.full.push(filling.part);
                        }
                        let number = filling.number + 1;
                        let id = names.id(&part_name(names.name(base), number));
                        *filling = start(&mut self.parts, id, number, names, placement, stream);
                    }
                    filling
                }
            };
            filling.rows += 1;
            rows.entry(filling.part).or_default().push(r as u32);
            placed[r] = filling.id;
        }
        self.apply_to_keys(keys, &placed, &hashes);
        for (part, indices) in rows {
            let batch = take(data, &indices)?;
            match &mut self.parts[part].write {
                PartWrite::Streaming(stream) => stream.backlog.push_back(batch),
                PartWrite::Rows(batches) => batches.push(batch),
                _ => {
                    return Err(PublishError::State(format!(
                        "part {} took rows after its end",
                        self.parts[part].name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Records a batch's rows in the key log: each row's part and
    /// fingerprint, or its removal (a row the rules suppress is one), in row
    /// order (a later row of a key wins).
    fn apply_to_keys(&mut self, keys: &FixedSizeBinaryArray, placed: &[u32], hashes: &[u64]) {
        for r in 0..placed.len() {
            let key = state::key_at(keys, r);
            if placed[r] == DELETED {
                self.log.remove(key);
            } else {
                let entry = Entry {
                    partition: placed[r],
                    hash: hashes[r],
                };
                self.log.push(key, entry);
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

    /// Ends every part still filling (at the commit): no more rows come.
    pub fn close(&mut self) {
        for filling in std::mem::take(&mut self.filling).into_values() {
            self.parts[filling.part].write.end();
        }
        self.full.clear();
    }

    /// Puts the keys staged since [`Streamed::keys`] last did in order on a
    /// blocking thread, beside the parts' last encoding at the commit:
    /// sorting a large first version's keys takes a fifth of a second. The
    /// keys and dirty parts are away until [`Streamed::keys_sorted`].
    pub fn sort_keys(&mut self) -> JoinHandle<(KeyIndex, HashSet<u32>)> {
        let mut keys = std::mem::take(&mut self.keys);
        let log = std::mem::take(&mut self.log);
        let mut dirty = std::mem::take(&mut self.dirty);
        tokio::task::spawn_blocking(move || {
            sort_into(&mut keys, log, &mut dirty);
            (keys, dirty)
        })
    }

    /// Takes back what [`Streamed::sort_keys`] put in order: every dirty
    /// part is known now.
    pub async fn keys_sorted(
        &mut self,
        sorting: JoinHandle<(KeyIndex, HashSet<u32>)>,
    ) -> Result<()> {
        let (keys, dirty) = sorting
            .await
            .map_err(|e| PublishError::State(format!("sorting the version's keys: {e}")))?;
        self.keys = keys;
        self.dirty = dirty;
        Ok(())
    }

    /// The rows part `i` holds now (its current rows only, aligned to
    /// `target`) when they are to be written; `None` when it has none left,
    /// or when they are not in memory.
    pub fn prepare(&mut self, i: usize, target: &SchemaRef) -> Result<Option<RecordBatch>> {
        let PartWrite::Rows(batches) = &self.parts[i].write else {
            return Ok(None);
        };
        // Filtering a dirty part and fingerprinting realigned rows read the
        // keys: those staged since they were last put in order too.
        if self.dirty.contains(&self.parts[i].id) || batches.iter().any(|b| b.schema() != *target) {
            self.keys();
        }
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
        let rows = state::concat_owned(target, aligned)?;
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

/// Puts `log`'s keys in order into `keys`, marking dirty the parts of the
/// rows they replaced or removed.
fn sort_into(keys: &mut KeyIndex, log: KeyLog, dirty: &mut HashSet<u32>) {
    keys.absorb(log, |old| {
        dirty.insert(old.partition);
    });
}

/// Sends a streaming part's staged rows to its encoders; once it takes no
/// more rows, its files are ended and it is being written.
pub(super) async fn flush(part: &mut StreamedPart) {
    let PartWrite::Streaming(stream) = &mut part.write else {
        return;
    };
    stream.send().await;
    if !stream.open
        && let PartWrite::Streaming(stream) = std::mem::replace(&mut part.write, PartWrite::Lost)
    {
        // Dropping the senders ends every file.
        part.write = PartWrite::Running(stream.task);
    }
}

/// Ends a streaming part and sends what it was staged: its files end and it
/// is being written.
pub(super) async fn end(part: &mut StreamedPart) {
    part.write.end();
    flush(part).await;
}

/// Starts part `id` (number `number` of its partition): streamed, with rows
/// of `stream`'s schema, while fewer than [`MAX_STREAMS`] parts are; gathered
/// otherwise.
fn start(
    parts: &mut Vec<StreamedPart>,
    id: u32,
    number: u32,
    names: &Partitions,
    placement: &Placement<'_>,
    stream: Option<&SchemaRef>,
) -> Filling {
    let name = names.name(id).to_string();
    let streams = parts
        .iter()
        .filter(|p| matches!(&p.write, PartWrite::Streaming(s) if s.open))
        .count();
    let write = match stream {
        Some(schema) if streams < MAX_STREAMS => {
            PartWrite::Streaming(Box::new((placement.open)(&name, schema)))
        }
        _ => PartWrite::Rows(Vec::new()),
    };
    parts.push(StreamedPart { id, name, write });
    Filling {
        part: parts.len() - 1,
        id,
        number,
        rows: 0,
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
