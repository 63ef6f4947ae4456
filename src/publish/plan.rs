//! Planning a version from the key index alone: which keys leave which part,
//! which staged rows join which part, which parts only change in place.

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::{StreamExt, TryStreamExt};

use super::in_place::{InPlace, take_rows, update_in_place};
use super::index::KeyIndex;
use super::parallel::parallel_map;
use super::part::{Partition, StateFiles, part_name, split_part_name};
use super::recover::read_part;
use super::stage::Pending;
use super::state::{Entry, Key, KeyMap, KeySet, Partitions};
use super::{PublishError, Publisher, Result, UPLOAD_CONCURRENCY, state};

/// What a version changes, worked out from the key index.
pub(super) struct Plan {
    /// The parts it rewrites, by id, and what changes in each.
    pub(super) touched: BTreeMap<u32, PartChanges>,
    /// Keys deleted (their old rows go to the change files).
    pub(super) deleted: KeySet,
    /// Staged rows inserted or updated, with their ops, in source order.
    pub(super) change_rows: Vec<(usize, usize, &'static str)>,
    pub(super) summary: (u64, u64, u64),
    /// The first version of an empty dataset: its data files are its changes.
    pub(super) initial: bool,
    /// Parts this version starts with inserted rows only: their data files
    /// are changes too, and their rows are not in the change files.
    pub(super) inserted: Vec<String>,
    /// Index changes to apply after the commit: keys deleted, and keys
    /// inserted or moved (an insert replaces an older entry).
    pub(super) removed: Vec<Key>,
    pub(super) added: Vec<(Key, Entry)>,
}

/// What a version changes in one part.
pub(super) struct PartChanges {
    /// Keys that leave it (deleted, updated, or moved to another part).
    pub(super) removed: KeySet,
    /// Staged rows `(batch, row)` that join it, in source order.
    pub(super) added: Vec<(usize, usize)>,
    /// When its only changes are rows updated where they stand: key to the
    /// staged row. The part then keeps its order.
    /// (Each with the fingerprint of the row it replaces.)
    pub(super) in_place: Option<KeyMap<(usize, usize, u64)>>,
}

/// The staged rows a version's part jobs build from.
pub(super) struct StagedRows {
    pub(super) batches: Vec<RecordBatch>,
    pub(super) deleted: KeySet,
    pub(super) target: SchemaRef,
}

/// Where a touched part's committed rows come from.
pub(super) enum OldRows {
    /// In memory: cached, or realigned to a new schema.
    Rows(RecordBatch),
    /// Read from the state when its job runs.
    Read(StateFiles),
    /// A part this version starts.
    New,
}

/// Committed rows realigned to a new schema (see [`Publisher::realign`]).
pub(super) struct Realigned {
    pub(super) rows: BTreeMap<u32, RecordBatch>,
    pub(super) index: KeyIndex,
}

impl PartChanges {
    /// The part's new rows from its committed ones `old`; with them, for an
    /// update in place, what changed (its files are rewritten from the
    /// previous ones), and the rows deleted from it (for the change files).
    pub(super) fn apply(
        &self,
        old: &RecordBatch,
        staged: &StagedRows,
    ) -> Result<(RecordBatch, Option<InPlace>, Option<RecordBatch>)> {
        let batches: Vec<&RecordBatch> = staged.batches.iter().collect();
        let target = &staged.target;
        if let Some(updates) = &self.in_place
            && let Some((rows, change)) = update_in_place(old, updates, &batches, target)?
        {
            return Ok((rows, Some(change), None));
        }
        let mut dropped = None;
        let kept = if self.removed.is_empty() {
            old.clone()
        } else {
            let keys = state::keys(old)?;
            let mut keep = arrow::array::BooleanBuilder::with_capacity(old.num_rows());
            let mut deleted = arrow::array::BooleanBuilder::with_capacity(old.num_rows());
            for row in 0..old.num_rows() {
                let key = state::key_at(keys, row);
                keep.append_value(!self.removed.contains(&key));
                deleted.append_value(staged.deleted.contains(&key));
            }
            let (keep, deleted) = (keep.finish(), deleted.finish());
            if deleted.true_count() > 0 {
                dropped = Some(arrow::compute::filter_record_batch(old, &deleted)?);
            }
            arrow::compute::filter_record_batch(old, &keep)?
        };
        let rows = if self.added.is_empty() {
            kept
        } else {
            let new = take_rows(&batches, &self.added, target)?;
            state::concat_owned(target, vec![kept, new])?
        };
        Ok((rows, None, dropped))
    }
}

/// Staged batches aligned to the version's schema, with every row's
/// partition and fingerprint.
pub(super) struct Prepared {
    pub(super) batches: Vec<RecordBatch>,
    pub(super) part_of: Vec<Vec<u32>>,
    pub(super) hash_of: Vec<Vec<u64>>,
    pub(super) schema_changed: bool,
}

/// The parts partitions are split into, for placing rows during a plan.
pub(super) struct Parts<'a> {
    pub(super) names: &'a mut Partitions,
    /// The partition (the id of its first part) of every part.
    pub(super) base: HashMap<u32, u32>,
    /// The last part of every partition.
    pub(super) last: HashMap<u32, LastPart>,
}

/// A partition's last part, where new rows go.
#[derive(Clone, Copy)]
pub(super) struct LastPart {
    pub(super) id: u32,
    pub(super) number: u32,
    /// Rows committed, plus those this plan placed.
    pub(super) rows: usize,
}

impl<'a> Parts<'a> {
    pub(super) fn new(committed: &BTreeMap<String, Partition>, names: &'a mut Partitions) -> Self {
        let mut base = HashMap::new();
        let mut last: HashMap<u32, LastPart> = HashMap::new();
        for (name, p) in committed {
            let (partition, number) = split_part_name(name);
            let (id, base_id) = (names.id(name), names.id(partition));
            base.insert(id, base_id);
            let part = LastPart {
                id,
                number,
                rows: p.files.rows as usize,
            };
            let tail = last.entry(base_id).or_insert(part);
            if number > tail.number {
                *tail = part;
            }
        }
        Self { names, base, last }
    }

    /// The partition a part belongs to.
    pub(super) fn base(&self, part: u32) -> u32 {
        self.base.get(&part).copied().unwrap_or(part)
    }

    /// The part of partition `base` a new row goes to.
    pub(super) fn place(&mut self, base: u32, max_rows: usize) -> u32 {
        let tail = self.last.entry(base).or_insert(LastPart {
            id: base,
            number: 0,
            rows: 0,
        });
        if tail.rows >= max_rows.max(1) {
            self.start_next(base);
        }
        let tail = self
            .last
            .get_mut(&base)
            .expect("the last part was just made");
        tail.rows += 1;
        tail.id
    }

    /// Makes a new part the last of partition `base`, where its next rows go.
    pub(super) fn start_next(&mut self, base: u32) {
        let Some(tail) = self.last.get(&base).copied() else {
            return;
        };
        let number = tail.number + 1;
        let id = self.names.id(&part_name(self.names.name(base), number));
        self.base.insert(id, base);
        self.last.insert(
            base,
            LastPart {
                id,
                number,
                rows: 0,
            },
        );
    }

    /// Before a plan places `adding` new rows in partition `base`: a large
    /// append (a catch-up's, a bulk load's) goes to a new part rather than
    /// filling the committed last part, when that part is large too, so the
    /// version does not encode again up to `max_rows` rows it did not change
    /// (a 1,000,000-change catch-up re-encoded a fifth as many old rows).
    /// Every part but the last then stays at least a quarter full.
    pub(super) fn before_appending(&mut self, base: u32, adding: usize, max_rows: usize) {
        let quarter = max_rows / 4;
        if let Some(tail) = self.last.get(&base)
            && quarter > 0
            && tail.rows >= quarter
            && tail.rows < max_rows
            && adding >= quarter
        {
            self.start_next(base);
        }
    }
}

impl Publisher {
    /// Every committed part's rows aligned to a new schema, and the key index
    /// with the fingerprints of the aligned rows. (A schema change rewrites
    /// every part, so all of them are in memory at once here.)
    pub(super) async fn realign(&mut self, target: &SchemaRef) -> Result<Realigned> {
        let dataset = &self.settings.dataset;
        let loads: Vec<_> = self
            .partitions
            .iter_mut()
            .map(|(name, p)| {
                let (cached, files) = (p.rows.take(), p.state.clone());
                let (store, dataset, name) =
                    (self.state_store.clone(), dataset.clone(), name.clone());
                async move {
                    let rows = match cached {
                        Some(rows) => rows,
                        None => read_part(&store, &dataset, &files).await?,
                    };
                    Ok::<_, PublishError>((name, rows))
                }
            })
            .collect();
        let loaded: Vec<(String, RecordBatch)> = futures::stream::iter(loads)
            .buffer_unordered(UPLOAD_CONCURRENCY)
            .try_collect()
            .await?;
        let mut realigned = Realigned {
            rows: BTreeMap::new(),
            index: KeyIndex::default(),
        };
        for (name, rows) in loaded {
            let id = self.names.id(&name);
            let rows = state::align(&rows, target)?;
            state::index_rows(&mut realigned.index, &rows, id)?;
            realigned.rows.insert(id, rows);
        }
        Ok(realigned)
    }

    /// Drops the cached rows of the least recently used parts until the
    /// cache holds at most `budget` bytes.
    pub(super) fn trim_cache(&mut self, budget: usize) {
        let mut cached: Vec<(u64, &String, usize)> = self
            .partitions
            .iter()
            .filter_map(|(name, p)| {
                p.rows
                    .as_ref()
                    .map(|r| (p.used, name, r.get_array_memory_size()))
            })
            .collect();
        let mut total: usize = cached.iter().map(|c| c.2).sum();
        if total <= budget {
            return;
        }
        cached.sort_unstable();
        let mut evict = Vec::new();
        for (_, name, bytes) in cached {
            if total <= budget {
                break;
            }
            total -= bytes;
            evict.push(name.clone());
        }
        for name in evict {
            if let Some(p) = self.partitions.get_mut(&name) {
                p.rows = None;
            }
        }
    }

    /// Aligns the staged batches to the version's schema and works out every
    /// row's partition and fingerprint.
    pub(super) fn prepare(&mut self, pending: &Pending, target: &SchemaRef) -> Result<Prepared> {
        let schema_changed = self.schema.as_ref().is_some_and(|s| s != target);
        let batches = pending
            .batches
            .iter()
            .map(|b| state::align(b, target))
            .collect::<Result<Vec<_>, _>>()?;
        let single = self.settings.dataset.clone();
        let mut part_of: Vec<Vec<u32>> = Vec::with_capacity(batches.len());
        let mut hash_of: Vec<Vec<u64>> = Vec::with_capacity(batches.len());
        for b in &batches {
            part_of.push(state::partition_ids(
                b,
                self.settings.partition_by.as_ref(),
                &single,
                &mut self.names,
            )?);
        }
        hash_of.extend(
            parallel_map(&batches, state::row_hashes)
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?,
        );
        Ok(Prepared {
            batches,
            part_of,
            hash_of,
            schema_changed,
        })
    }

    /// Works out from the key index alone what the version changes: the keys
    /// leaving each part, the staged rows joining each, the rows updated in
    /// place, and the index changes. `realigned` is the index of a new
    /// schema's fingerprints.
    pub(super) fn plan(
        &mut self,
        pending: &Pending,
        prepared: &Prepared,
        realigned: Option<&KeyIndex>,
    ) -> Result<Option<Plan>> {
        let Prepared {
            part_of,
            hash_of,
            schema_changed,
            ..
        } = prepared;
        let schema_changed = *schema_changed;
        let index = realigned.unwrap_or(&self.index);

        // A partition is stored as parts of at most `max_file_rows` rows (the
        // first part carries the partition's name): an updated row stays in its
        // part, a new row (or one that moved partition) goes to the partition's
        // last part, and a full last part starts the next. Appends then rewrite
        // one part, not the partition.
        let mut parts = Parts::new(&self.partitions, &mut self.names);

        let mut removed_from: HashMap<u32, KeySet> = HashMap::new();
        let mut added_to: BTreeMap<u32, Vec<(usize, usize)>> = BTreeMap::new();
        let mut deleted = KeySet::default();
        // Sized for every staged key at once: grown by doubling, a large
        // version's lists would be copied into freshly faulted pages each step.
        let staged = pending.latest.len();
        let mut change_rows: Vec<(usize, usize, &'static str)> = Vec::with_capacity(staged);
        let (mut inserts, mut updates, mut deletes) = (0u64, 0u64, 0u64);
        let mut removed = Vec::new();
        let mut added = Vec::with_capacity(staged);
        // Rows that need a place in their partition's last part, and whether
        // each is an insert.
        let mut placed_last: Vec<(usize, usize, Key, Entry, bool)> = Vec::with_capacity(staged);
        // Rows updated in place, by part: a part whose only changes these are
        // keeps its rows in order, and its files can be rewritten from the
        // previous ones (see `in_place`).
        let mut in_place: HashMap<u32, KeyMap<(usize, usize, u64)>> = HashMap::new();
        // Deletes first; the other staged rows are then visited in source
        // order, so every list below fills in that order and needs no sort
        // (sorting them, or visiting the table in hash order, would be most of
        // a large version's plan).
        let mut order: Vec<u64> = Vec::with_capacity(staged);
        for (key, &(b, r, delete)) in &pending.latest {
            if !delete {
                order.push(u64::from(b) << 32 | u64::from(r));
            } else if let Some(e) = index.get(key) {
                removed_from.entry(e.partition).or_default().insert(*key);
                deleted.insert(*key);
                removed.push(*key);
                deletes += 1;
            }
        }
        order.sort_unstable();
        let keys_of = prepared
            .batches
            .iter()
            .map(state::keys)
            .collect::<Result<Vec<_>, _>>()?;
        for packed in order {
            let (b, r) = (
                (packed >> 32) as usize,
                (packed & u64::from(u32::MAX)) as usize,
            );
            let key = &state::key_at(keys_of[b], r);
            let previous = index.get(key);
            let entry = Entry {
                partition: part_of[b][r],
                hash: hash_of[b][r],
            };
            match previous {
                Some(e) if parts.base(e.partition) == entry.partition => {
                    if e.hash == entry.hash {
                        continue;
                    }
                    // Updated in place: its part is rewritten.
                    removed_from.entry(e.partition).or_default().insert(*key);
                    updates += 1;
                    change_rows.push((b, r, "update"));
                    let entry = Entry {
                        partition: e.partition,
                        hash: entry.hash,
                    };
                    added_to.entry(entry.partition).or_default().push((b, r));
                    in_place
                        .entry(entry.partition)
                        .or_default()
                        .insert(*key, (b, r, e.hash));
                    added.push((*key, entry));
                }
                Some(e) => {
                    removed_from.entry(e.partition).or_default().insert(*key);
                    updates += 1;
                    change_rows.push((b, r, "update"));
                    placed_last.push((b, r, *key, entry, false));
                }
                None => {
                    inserts += 1;
                    change_rows.push((b, r, "insert"));
                    placed_last.push((b, r, *key, entry, true));
                }
            }
        }
        // In source order (as visited), so parts fill in the order rows arrived.
        debug_assert!(placed_last.is_sorted_by_key(|&(b, r, _, _, _)| (b, r)));
        let mut adding: BTreeMap<u32, usize> = BTreeMap::new();
        for &(_, _, _, entry, _) in &placed_last {
            *adding.entry(entry.partition).or_default() += 1;
        }
        for (base, rows) in adding {
            parts.before_appending(base, rows, self.settings.max_file_rows);
        }
        // Parts that get a row other than an insert.
        let mut not_only_inserts: HashSet<u32> = HashSet::new();
        for (b, r, key, entry, insert) in placed_last {
            let part = parts.place(entry.partition, self.settings.max_file_rows);
            if !insert {
                not_only_inserts.insert(part);
            }
            added_to.entry(part).or_default().push((b, r));
            added.push((
                key,
                Entry {
                    partition: part,
                    hash: entry.hash,
                },
            ));
        }
        for (scope, seen) in &pending.complete_images {
            for (key, e) in index.iter() {
                if scope.contains(key) && !seen.contains(key) && !pending.latest.contains_key(key) {
                    removed_from.entry(e.partition).or_default().insert(*key);
                    deleted.insert(*key);
                    removed.push(*key);
                    deletes += 1;
                }
            }
        }
        if inserts + updates + deletes == 0 && !schema_changed {
            // Nothing published changes, but the source moved on.
            return Ok(None);
        }
        // Deterministic order in files (the same input gives the same bytes): new
        // rows in source order, as visited, unless a part has both rows updated
        // in place and rows placed after them.
        for rows in added_to.values_mut() {
            if !rows.is_sorted() {
                rows.sort_unstable();
            }
        }
        debug_assert!(change_rows.is_sorted_by_key(|&(b, r, _)| (b, r)));
        // The first version of an empty dataset inserts every row: its data files
        // are its changes, so they are not written twice (the manifest says
        // `initial`). Later, a part the version starts with inserts only (a
        // large append, a catch-up) is named in the manifest as inserted rows,
        // and its rows stay out of the change files: a catch-up wrote each of
        // them twice, its change files as large as its data files.
        let initial = self.partitions.is_empty() && updates == 0 && deletes == 0 && !schema_changed;
        let inserted: Vec<u32> = if initial {
            Vec::new()
        } else {
            added_to
                .keys()
                .copied()
                .filter(|id| {
                    !not_only_inserts.contains(id)
                        && !removed_from.contains_key(id)
                        && !self.partitions.contains_key(self.names.name(*id))
                })
                .collect()
        };
        if !inserted.is_empty() {
            let mut skip: Vec<(usize, usize)> = inserted
                .iter()
                .flat_map(|id| added_to[id].iter().copied())
                .collect();
            // Parts fill in source order, so this is mostly sorted already.
            if !skip.is_sorted() {
                skip.sort_unstable();
            }
            // Both in source order: one walk.
            let mut next = 0;
            change_rows.retain(|&(b, r, _)| {
                while next < skip.len() && skip[next] < (b, r) {
                    next += 1;
                }
                skip.get(next) != Some(&(b, r))
            });
        }
        let mut inserted: Vec<String> = inserted
            .into_iter()
            .map(|id| self.names.name(id).to_string())
            .collect();
        inserted.sort_unstable();
        // With a new schema every part is rewritten; otherwise those that lose
        // or gain a row.
        let mut touched: BTreeMap<u32, PartChanges> = BTreeMap::new();
        let ids: Vec<u32> = if schema_changed {
            let all = self.partitions.keys().map(|name| self.names.id(name));
            all.chain(added_to.keys().copied()).collect()
        } else {
            removed_from
                .keys()
                .chain(added_to.keys())
                .copied()
                .collect()
        };
        for id in ids {
            touched.entry(id).or_insert_with(|| {
                let removed = removed_from.remove(&id).unwrap_or_default();
                let added = added_to.remove(&id).unwrap_or_default();
                // Only rows updated in place: the part keeps its order.
                let in_place = in_place.remove(&id).filter(|u| {
                    !schema_changed && removed.len() == u.len() && added.len() == u.len()
                });
                PartChanges {
                    removed,
                    added,
                    in_place,
                }
            });
        }
        Ok(Some(Plan {
            touched,
            deleted,
            change_rows,
            summary: (inserts, updates, deletes),
            initial,
            inserted,
            removed,
            added,
        }))
    }
}
