//! The key index: every published `_key` with the part of its row and the
//! row's fingerprint.
//!
//! It holds one entry per published row, so its size is most of a large
//! dataset's memory after the rows themselves. A hash table sized by powers of
//! two is between 44% and 88% full, and growing it holds the old table beside
//! the new one. Here the keys live in a vector sorted by key, 28 bytes an entry and
//! nothing empty, with a small hash table of the changes since the vector was
//! last merged. Keys are HMAC outputs, uniform, so a directory of where each
//! run of leading bits starts finds a key in the vector among about eight.
//! The price is CPU: a new key is looked up in the overlay and in the vector.
//! A Bloom filter of the vector's keys, about a
//! byte a key and small enough to stay in the caches, answers most lookups of
//! a key the vector does not hold without touching the vector.
//!
//! A first version's keys are nearly all new, and they do not go through
//! the overlay: a [`KeyLog`] appends them as they arrive and they are put in
//! order once, when the version is committed ([`KeyIndex::absorb`]).

use super::state::{Entry, Key, KeyMap};

/// A deleted key in the overlay (part ids are dense from 0, so no part has it).
const TOMBSTONE: u32 = u32::MAX;

/// Changes the overlay holds at least before they are merged into the sorted
/// keys: small merges would copy the vector too often.
const MIN_OVERLAY: usize = 1 << 16;

/// Keys per directory slot, on average: a lookup searches about this many
/// consecutive entries (one or two cache lines).
const KEYS_PER_SLOT: usize = 8;

/// Bits a key sets in its word of the [`Filter`].
const FILTER_PROBES: u32 = 4;

/// Keys per word of the [`Filter`], at most: 64 bits for 4 to 8 keys of 4
/// bits each; about 3% of absent keys then pass it.
const KEYS_PER_WORD: usize = 8;

/// A Bloom filter over the keys of [`KeyIndex::base`]: a key's bits all lie
/// in one 64-bit word, so a probe touches one cache line. It may hold keys
/// removed since it was built (they only pass it); it never lacks a key of
/// `base`.
#[derive(Default, Clone)]
struct Filter {
    words: Vec<u64>,
    /// log2 of `words.len()`.
    bits: u32,
}

impl Filter {
    /// The word and the bits in it of `key`. The word comes from the key's
    /// leading bits and the bits from its trailing ones: keys are HMAC
    /// outputs, uniform in both. Skewed keys only make the filter pass more.
    fn place(&self, key: &Key) -> (usize, u64) {
        let word = if self.bits == 0 {
            0
        } else {
            (rank(key) >> (128 - self.bits)) as usize
        };
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&key[8..]);
        let tail = u64::from_le_bytes(tail);
        let mask = (0..FILTER_PROBES).fold(0u64, |m, i| m | 1 << ((tail >> (6 * i)) & 63));
        (word, mask)
    }

    /// Whether `key` may be in the set; `false` only for a key never added.
    fn may_contain(&self, key: &Key) -> bool {
        if self.words.is_empty() {
            return false;
        }
        let (word, mask) = self.place(key);
        self.words[word] & mask == mask
    }

    fn add(&mut self, key: &Key) {
        let (word, mask) = self.place(key);
        self.words[word] |= mask;
    }

    /// Words for `keys` keys.
    fn size_for(keys: usize) -> u32 {
        keys.div_ceil(KEYS_PER_WORD)
            .max(1)
            .next_power_of_two()
            .ilog2()
    }

    /// A filter of exactly `keys`.
    fn build<'a>(bits: u32, keys: impl Iterator<Item = &'a Key>) -> Self {
        let mut filter = Filter {
            words: vec![0; 1 << bits],
            bits,
        };
        for key in keys {
            filter.add(key);
        }
        filter
    }
}

/// Every key of a dataset with its [`Entry`].
#[derive(Default, Clone)]
pub struct KeyIndex {
    /// Sorted by key, each key once.
    base: Vec<(Key, Entry)>,
    /// `directory[s]` is the first entry of `base` whose key's leading
    /// `bits` bits are `s` or more; one more slot at the end holds `base.len()`.
    directory: Vec<u32>,
    bits: u32,
    /// Every key of `base`, and perhaps some removed from it.
    filter: Filter,
    /// Changes not yet merged into `base`: a key's current entry, or a
    /// [`TOMBSTONE`] for a key of `base` that was removed.
    overlay: KeyMap<Entry>,
    /// Keys in the index.
    len: usize,
}

/// Only the size: a dataset's index holds millions of entries.
impl std::fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIndex")
            .field("len", &self.len)
            .field("unmerged", &self.overlay.len())
            .finish_non_exhaustive()
    }
}

/// A key as a number with the same order as its bytes.
fn rank(key: &Key) -> u128 {
    u128::from_be_bytes(*key)
}

impl KeyIndex {
    /// Keys in the index.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index has no key.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every key and gives the memory back.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Room for `more` keys beyond those held, so that a large image is not
    /// copied at each growth. Only address space until entries are written:
    /// an estimate that is too high costs no memory.
    pub fn reserve(&mut self, more: usize) {
        let wanted = (self.len + more).saturating_sub(self.base.len());
        self.base.reserve_exact(wanted);
    }

    /// The entry of `key`.
    pub fn get(&self, key: &Key) -> Option<Entry> {
        match self.overlay.get(key) {
            Some(e) if e.partition == TOMBSTONE => None,
            Some(e) => Some(*e),
            None => self.find(key).map(|i| self.base[i].1),
        }
    }

    /// Whether `key` is in the index.
    pub fn contains_key(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    /// Sets the entry of `key`, giving back the one it replaces.
    pub fn insert(&mut self, key: Key, entry: Entry) -> Option<Entry> {
        debug_assert_ne!(entry.partition, TOMBSTONE, "part id out of range");
        let old = match self.overlay.insert(key, entry) {
            Some(e) if e.partition == TOMBSTONE => None,
            Some(e) => Some(e),
            None => self.find(&key).map(|i| self.base[i].1),
        };
        if old.is_none() {
            self.len += 1;
        }
        self.merge_if_due();
        old
    }

    /// Removes `key`, giving back its entry.
    pub fn remove(&mut self, key: &Key) -> Option<Entry> {
        let in_base = self.find(key);
        let old = match self.overlay.get(key) {
            Some(e) if e.partition == TOMBSTONE => None,
            Some(e) => Some(*e),
            None => in_base.map(|i| self.base[i].1),
        };
        if old.is_some() {
            self.len -= 1;
            if in_base.is_some() {
                let tombstone = Entry {
                    partition: TOMBSTONE,
                    hash: 0,
                };
                self.overlay.insert(*key, tombstone);
                self.merge_if_due();
            } else {
                self.overlay.remove(key);
            }
        }
        old
    }

    /// Removes the keys of `removed`, then sets the entries of `added`, each
    /// key at most once in `added` (a version's index changes). Many changes
    /// are sorted and merged into the sorted keys in one pass: through the
    /// overlay, each of a large version's keys would be hashed into it and the
    /// vector copied at every merge as the overlay filled.
    pub fn apply(&mut self, removed: &[Key], added: Vec<(Key, Entry)>) {
        if removed.len() + added.len() < MIN_OVERLAY {
            for key in removed {
                self.remove(key);
            }
            for (key, entry) in added {
                self.insert(key, entry);
            }
        } else {
            self.apply_sorted(removed, added);
        }
    }

    /// [`KeyIndex::apply`] as one sorted merge, whatever the number of changes.
    fn apply_sorted(&mut self, removed: &[Key], added: Vec<(Key, Entry)>) {
        self.merge();
        let mut changes = added;
        changes.extend(removed.iter().map(|key| {
            (
                *key,
                Entry {
                    partition: TOMBSTONE,
                    hash: 0,
                },
            )
        }));
        sort_entries(&mut changes);
        // A key removed and added ends added: removals come first.
        changes.dedup_by(|later, earlier| {
            if later.0 != earlier.0 {
                return false;
            }
            debug_assert!(
                earlier.1.partition == TOMBSTONE || later.1.partition == TOMBSTONE,
                "a key added twice in one change"
            );
            if earlier.1.partition == TOMBSTONE {
                *earlier = *later;
            }
            true
        });
        self.merge_sorted(&changes, |_| {});
        self.len = self.base.len();
    }

    /// Keeps only the keys for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&Key, &Entry) -> bool) {
        self.merge();
        self.base.retain(|(key, entry)| keep(key, entry));
        self.len = self.base.len();
        self.build_directory();
        // Drop the removed keys from the filter too.
        self.filter = Filter::build(
            Filter::size_for(self.base.len()),
            self.base.iter().map(|(k, _)| k),
        );
    }

    /// Every key and its entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, Entry)> + '_ {
        let merged = self
            .base
            .iter()
            .filter_map(|(key, entry)| match self.overlay.get(key) {
                Some(e) if e.partition == TOMBSTONE => None,
                Some(e) => Some((key, *e)),
                None => Some((key, *entry)),
            });
        let added = self
            .overlay
            .iter()
            .filter(|(key, e)| e.partition != TOMBSTONE && self.find(key).is_none())
            .map(|(key, e)| (key, *e));
        merged.chain(added)
    }

    /// Where `key` is in `base`.
    fn find(&self, key: &Key) -> Option<usize> {
        if !self.filter.may_contain(key) {
            return None;
        }
        let slot = self.slot(key);
        let (start, end) = (
            self.directory[slot] as usize,
            self.directory[slot + 1] as usize,
        );
        let target = rank(key);
        self.base[start..end]
            .binary_search_by_key(&target, |(k, _)| rank(k))
            .ok()
            .map(|i| start + i)
    }

    /// The directory slot of a key: its leading `bits` bits.
    fn slot(&self, key: &Key) -> usize {
        if self.bits == 0 {
            0
        } else {
            (rank(key) >> (128 - self.bits)) as usize
        }
    }

    fn build_directory(&mut self) {
        let n = self.base.len();
        self.bits = (n / KEYS_PER_SLOT).max(1).ilog2();
        let slots = 1usize << self.bits;
        self.directory.clear();
        self.directory.reserve_exact(slots + 1);
        let mut entry = 0;
        for slot in 0..slots {
            while entry < n && self.slot(&self.base[entry].0) < slot {
                entry += 1;
            }
            self.directory.push(entry as u32);
        }
        self.directory.push(n as u32);
        self.directory.shrink_to_fit();
    }

    fn merge_if_due(&mut self) {
        if self.overlay.len() >= MIN_OVERLAY.max(self.base.len() / 8) {
            self.merge();
        }
    }

    /// Adds the keys of `log`: a key's entry appended last replaces every
    /// other entry of that key, appended earlier or held by the index, and
    /// a key removed last is removed. `replaced` is given each entry so
    /// replaced or removed.
    pub fn absorb(&mut self, log: KeyLog, mut replaced: impl FnMut(Entry)) {
        let KeyLog {
            mut entries,
            filter,
            repeats,
        } = log;
        if entries.is_empty() {
            return;
        }
        sort_entries(&mut entries);
        // One entry per key, in place: the one appended last. A key appended
        // more than once passed the filter each time after the first, so
        // `repeats` holds its last entry.
        let mut write = 0;
        let mut read = 0;
        while read < entries.len() {
            let key = entries[read].0;
            let mut end = read + 1;
            while end < entries.len() && entries[end].0 == key {
                end += 1;
            }
            let entry = if end - read == 1 {
                entries[read].1
            } else {
                let last = repeats.get(&key).copied().unwrap_or(entries[end - 1].1);
                let mut kept = false;
                for &(_, e) in &entries[read..end] {
                    if e == last && !kept {
                        kept = true;
                    } else if e.partition != TOMBSTONE {
                        replaced(e);
                    }
                }
                last
            };
            entries[write] = (key, entry);
            write += 1;
            read = end;
        }
        entries.truncate(write);
        self.merge();
        if self.base.is_empty() {
            // A first version: the log's vector becomes the index, no copy.
            // Keys removed last are not in it.
            entries.retain(|(_, e)| e.partition != TOMBSTONE);
            let bits = Filter::size_for(entries.len());
            self.filter = if filter.bits == bits && !filter.words.is_empty() {
                filter
            } else {
                Filter::build(bits, entries.iter().map(|(k, _)| k))
            };
            self.base = entries;
            self.build_directory();
        } else {
            self.merge_sorted(&entries, replaced);
        }
        self.len = self.base.len();
    }

    /// Merges the overlay into the sorted keys.
    fn merge(&mut self) {
        if self.overlay.is_empty() {
            return;
        }
        let changes = sorted(&self.overlay);
        self.overlay.clear();
        self.merge_sorted(&changes, |_| {});
        debug_assert_eq!(self.base.len(), self.len);
    }

    /// Merges changes sorted by key (one each, [`TOMBSTONE`] for a removal)
    /// into the sorted keys, in place, giving `replaced` each entry of the
    /// vector a change replaces: the vector grows by the changes that are
    /// not removals (a reallocation the allocator can do without a copy for
    /// a large block), and the merge runs from the back so that no entry is
    /// overwritten before it is moved.
    fn merge_sorted(&mut self, changes: &[(Key, Entry)], mut replaced: impl FnMut(Entry)) {
        // Room for every change that is not a removal, as if each were a new
        // key: counting the new keys exactly would take one more pass over
        // the keys. Replaced and removed keys leave a gap, closed below.
        let upper = changes
            .iter()
            .filter(|(_, e)| e.partition != TOMBSTONE)
            .count();
        let old = self.base.len();
        let filler = (
            [0u8; 16],
            Entry {
                partition: TOMBSTONE,
                hash: 0,
            },
        );
        self.base.reserve_exact(upper);
        self.base.resize(old + upper, filler);
        // Entries of base[..read] are still unread; base[write..] is done.
        let (mut read, mut write) = (old, old + upper);
        for &(key, entry) in changes.iter().rev() {
            while read > 0 && rank(&self.base[read - 1].0) > rank(&key) {
                read -= 1;
                write -= 1;
                self.base[write] = self.base[read];
            }
            if read > 0 && self.base[read - 1].0 == key {
                read -= 1;
                replaced(self.base[read].1);
            }
            if entry.partition != TOMBSTONE {
                write -= 1;
                self.base[write] = (key, entry);
            }
        }
        // Replaced and removed keys leave a gap between the unread head and
        // the merged tail.
        if write > read {
            self.base.copy_within(write.., read);
            let len = self.base.len() - (write - read);
            self.base.truncate(len);
        }
        self.build_directory();
        // The filter grows by doubling (rebuilt from the keys then, about
        // twice the final count over a first version's merges); in between,
        // the merged keys are added to it.
        let bits = Filter::size_for(self.base.len());
        if bits == self.filter.bits && !self.filter.words.is_empty() {
            for (key, entry) in changes {
                if entry.partition != TOMBSTONE {
                    self.filter.add(key);
                }
            }
        } else {
            self.filter = Filter::build(bits, self.base.iter().map(|(k, _)| k));
        }
    }
}

/// The keys of a first version in the order they arrive; see
/// [`KeyIndex::absorb`], which puts them in order once.
///
/// Looking every new key up as it arrives and merging them into the sorted
/// vector as it grows costs more than sorting them all once: the vector is
/// copied at every eighth of growth. A lookup is
/// still needed for a key that comes twice (a duplicate key in a source, an
/// update within the first version), to know which entry is the last: a
/// Bloom filter of the keys appended passes every such key, and the keys it
/// passes (a few percent) are kept with their last entry.
#[derive(Default)]
pub struct KeyLog {
    /// In arrival order; a key may be here more than once.
    entries: Vec<(Key, Entry)>,
    /// Every key of `entries`.
    filter: Filter,
    /// The keys that passed `filter` when appended (every key appended
    /// again, and a few that were not), each with its last entry.
    repeats: KeyMap<Entry>,
}

/// Only the sizes, as for [`KeyIndex`].
impl std::fmt::Debug for KeyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLog")
            .field("len", &self.entries.len())
            .field("repeats", &self.repeats.len())
            .finish_non_exhaustive()
    }
}

impl KeyLog {
    /// Entries appended, a key appended twice counted twice.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Room for `more` entries (see [`KeyIndex::reserve`]).
    pub fn reserve(&mut self, more: usize) {
        self.entries.reserve_exact(more);
    }

    /// Every key appended, removals included, a key appended twice twice.
    pub fn keys(&self) -> impl Iterator<Item = &Key> + '_ {
        self.entries.iter().map(|(key, _)| key)
    }

    /// Appends the removal of `key`: it ends any entry appended before, and
    /// removes the key from the index that absorbs the log.
    pub fn remove(&mut self, key: Key) {
        self.push(
            key,
            Entry {
                partition: TOMBSTONE,
                hash: 0,
            },
        );
    }

    /// Appends `key`'s entry: it replaces any appended before.
    pub fn push(&mut self, key: Key, entry: Entry) {
        if self.entries.len() >= self.filter.words.len() * KEYS_PER_WORD {
            // Full: twice the room, rebuilt from the keys. Not the room
            // reserved: the log's is address space until written, but every
            // word of a filter is soon touched, and an estimate may be far off.
            let room = (self.entries.len() * 2).max(MIN_OVERLAY);
            self.filter =
                Filter::build(Filter::size_for(room), self.entries.iter().map(|(k, _)| k));
        }
        if self.filter.may_contain(&key) {
            self.repeats.insert(key, entry);
        } else {
            self.filter.add(&key);
        }
        self.entries.push((key, entry));
    }
}

/// Entries sorted by key, in place (the vector is most of a large index's
/// memory, so no copy of it is made): a most-significant-byte radix sort,
/// one key byte a level, each level moving the entries into 256 buckets in
/// place (American flag sort) and sorting each bucket on the next byte.
/// 256 buckets a level keep every bucket's next free place in the caches,
/// so the moves run through memory nearly in order; one level of 32,768
/// buckets (the first version of this) missed the caches on almost every
/// move. Uniform keys need two levels for millions of entries; skewed ones
/// only go deeper where they bunch.
///
/// A large vector's buckets after the first level are sorted on several
/// threads: a first version's keys are put in order at its commit, after
/// the source has ended and its files are nearly written, so on one thread
/// the sort alone would end the snapshot with the other cores idle.
fn sort_entries(entries: &mut [(Key, Entry)]) {
    if entries.len() < PARALLEL_SORT_ENTRIES {
        radix_sort(entries, 0);
        return;
    }
    let starts = partition(entries, 0);
    let mut buckets = Vec::with_capacity(256);
    let mut rest = entries;
    for b in starts.windows(2) {
        let (bucket, tail) = rest.split_at_mut(b[1] - b[0]);
        buckets.push(bucket);
        rest = tail;
    }
    super::parallel::parallel_for_each(&mut buckets, |bucket| radix_sort(bucket, 1));
}

/// Entries from which [`sort_entries`] sorts on several threads: below, the
/// threads' start costs more than they save.
const PARALLEL_SORT_ENTRIES: usize = 1 << 16;

/// Below this many entries a bucket is sorted by comparison.
const RADIX_SMALL: usize = 64;

fn radix_sort(entries: &mut [(Key, Entry)], byte: usize) {
    if entries.len() <= RADIX_SMALL || byte == size_of::<Key>() {
        entries.sort_unstable_by_key(|(key, _)| rank(key));
        return;
    }
    let starts = partition(entries, byte);
    for b in starts.windows(2) {
        radix_sort(&mut entries[b[0]..b[1]], byte + 1);
    }
}

/// Moves the entries into 256 buckets by key byte `byte`, in place;
/// returns where each bucket begins (and, last, the end).
fn partition(entries: &mut [(Key, Entry)], byte: usize) -> [usize; 257] {
    let mut starts = [0usize; 257];
    for (key, _) in entries.iter() {
        starts[usize::from(key[byte]) + 1] += 1;
    }
    for b in 1..starts.len() {
        starts[b] += starts[b - 1];
    }
    // Each entry out of its bucket is swapped into the next free place of
    // its own, until the place holds one that belongs.
    let mut next = starts;
    for b in 0..256 {
        while next[b] < starts[b + 1] {
            let at = next[b];
            let mut target = usize::from(entries[at].0[byte]);
            while target != b {
                let to = next[target];
                next[target] += 1;
                entries.swap(at, to);
                target = usize::from(entries[at].0[byte]);
            }
            next[b] += 1;
        }
    }
    starts
}

/// The overlay's changes sorted by key. Keys are uniform, so scattering
/// them into buckets of their leading bits (about four a bucket) and sorting
/// each bucket is about twice as fast as a comparison sort of 28-byte
/// entries; skewed keys only make some buckets larger.
fn sorted(overlay: &KeyMap<Entry>) -> Vec<(Key, Entry)> {
    const SMALL: usize = 1 << 12;
    if overlay.len() < SMALL {
        let mut entries: Vec<(Key, Entry)> = overlay.iter().map(|(k, e)| (*k, *e)).collect();
        entries.sort_unstable_by_key(|(key, _)| rank(key));
        return entries;
    }
    let bits = (overlay.len() / 4).ilog2();
    let bucket = |key: &Key| (rank(key) >> (128 - bits)) as usize;
    // starts[b] is where bucket b begins in the output.
    let mut starts = vec![0u32; (1 << bits) + 1];
    for key in overlay.keys() {
        starts[bucket(key) + 1] += 1;
    }
    for b in 1..starts.len() {
        starts[b] += starts[b - 1];
    }
    let mut next = starts.clone();
    let filler = (
        [0u8; 16],
        Entry {
            partition: 0,
            hash: 0,
        },
    );
    let mut entries = vec![filler; overlay.len()];
    for (key, entry) in overlay {
        let at = &mut next[bucket(key)];
        entries[*at as usize] = (*key, *entry);
        *at += 1;
    }
    for b in starts.windows(2) {
        entries[b[0] as usize..b[1] as usize].sort_unstable_by_key(|(key, _)| rank(key));
    }
    entries
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn entry(partition: u32, hash: u64) -> Entry {
        Entry { partition, hash }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Insert(u16, u32),
        Remove(u16),
        Retain(u32),
        Merge,
    }

    /// Keys from a small space (so steps hit the same keys again), spread
    /// over the key range or bunched at its start, as arbitrary keys may be.
    fn key(n: u16, spread: bool) -> Key {
        let mut k = [0u8; 16];
        if spread {
            let h = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            k[..8].copy_from_slice(&h.to_be_bytes());
        }
        k[14..].copy_from_slice(&n.to_be_bytes());
        k
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0u16..3000, 0u32..50).prop_map(|(k, p)| Step::Insert(k, p)),
            3 => (0u16..3000).prop_map(Step::Remove),
            1 => (0u32..50).prop_map(Step::Retain),
            1 => Just(Step::Merge),
        ]
    }

    proptest! {
        /// The index answers as a hash map would, whatever the steps and
        /// wherever a merge falls.
        #[test]
        fn behaves_as_a_map(steps in proptest::collection::vec(step(), 0..400), spread: bool) {
            let mut index = KeyIndex::default();
            let mut model: HashMap<Key, Entry> = HashMap::new();
            for (n, s) in steps.iter().enumerate() {
                match *s {
                    Step::Insert(k, p) => {
                        let e = entry(p, n as u64);
                        prop_assert_eq!(index.insert(key(k, spread), e), model.insert(key(k, spread), e));
                    }
                    Step::Remove(k) => {
                        prop_assert_eq!(index.remove(&key(k, spread)), model.remove(&key(k, spread)));
                    }
                    Step::Retain(p) => {
                        index.retain(|_, e| e.partition != p);
                        model.retain(|_, e| e.partition != p);
                    }
                    Step::Merge => index.merge(),
                }
                prop_assert_eq!(index.len(), model.len());
            }
            for k in 0..3000 {
                prop_assert_eq!(index.get(&key(k, spread)), model.get(&key(k, spread)).copied());
            }
            let mut all: Vec<(Key, Entry)> = index.iter().map(|(k, e)| (*k, e)).collect();
            all.sort_unstable_by_key(|(k, _)| rank(k));
            let mut expected: Vec<(Key, Entry)> = model.into_iter().collect();
            expected.sort_unstable_by_key(|(k, _)| rank(k));
            prop_assert_eq!(all, expected);
        }
    }

    proptest! {
        /// A version's changes merged in one sorted pass leave the index as
        /// removing and inserting them one by one does.
        #[test]
        fn changes_applied_sorted_as_one_by_one(
            before in proptest::collection::vec((0u16..3000, 0u32..50), 0..400),
            removed in proptest::collection::vec(0u16..3000, 0..200),
            added in proptest::collection::btree_map(0u16..3000, 0u32..50, 0..400),
            spread: bool,
            merged: bool,
        ) {
            let mut one_by_one = KeyIndex::default();
            for (n, &(k, p)) in before.iter().enumerate() {
                one_by_one.insert(key(k, spread), entry(p, n as u64));
            }
            if merged {
                one_by_one.merge();
            }
            let mut sorted = one_by_one.clone();
            let removed: Vec<Key> = removed.iter().map(|&k| key(k, spread)).collect();
            let added: Vec<(Key, Entry)> =
                added.iter().map(|(&k, &p)| (key(k, spread), entry(p, u64::from(k)))).collect();
            one_by_one.apply(&removed, added.clone());
            sorted.apply_sorted(&removed, added);
            prop_assert_eq!(sorted.len(), one_by_one.len());
            for k in 0..3000 {
                prop_assert_eq!(sorted.get(&key(k, spread)), one_by_one.get(&key(k, spread)));
            }
        }
    }

    /// Enough keys for several merges on their own (no explicit merge), with
    /// removals and replacements between them.
    #[test]
    fn merges_as_it_grows_and_finds_every_key() {
        let mut index = KeyIndex::default();
        let n = 300_000u32;
        let key_of = |i: u32| {
            let mut k = [0u8; 16];
            let h = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            k[..8].copy_from_slice(&h.to_le_bytes());
            k[8..12].copy_from_slice(&i.to_le_bytes());
            k
        };
        for i in 0..n {
            assert_eq!(index.insert(key_of(i), entry(i % 7, u64::from(i))), None);
        }
        for i in (0..n).step_by(3) {
            assert_eq!(index.remove(&key_of(i)).map(|e| e.hash), Some(u64::from(i)));
        }
        for i in (1..n).step_by(3) {
            let old = index.insert(key_of(i), entry(9, 0));
            assert_eq!(old.map(|e| e.hash), Some(u64::from(i)));
        }
        assert_eq!(index.len(), (n - n.div_ceil(3)) as usize);
        assert!(index.base.len() > n as usize / 2, "merged as it grew");
        for i in 0..n {
            let expected = match i % 3 {
                0 => None,
                1 => Some(9),
                _ => Some(i % 7),
            };
            assert_eq!(
                index.get(&key_of(i)).map(|e| e.partition),
                expected,
                "key {i}"
            );
        }
        assert_eq!(index.iter().count(), index.len());
    }

    /// A vector large enough to be sorted on several threads comes out as a
    /// comparison sort puts it: keys uniform, all in one first-byte bucket,
    /// and half of them in one bucket (runs of whole buckets split unevenly).
    #[test]
    fn a_large_vector_sorts_as_a_comparison_sort_would() {
        let n = PARALLEL_SORT_ENTRIES as u32 * 3 + 17;
        for bunched in [0, 1, 2] {
            let mut entries: Vec<(Key, Entry)> = (0..n)
                .map(|i| {
                    let mut k = [0u8; 16];
                    let h = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    k[..8].copy_from_slice(&h.to_be_bytes());
                    k[8..12].copy_from_slice(&i.to_be_bytes());
                    if bunched == 1 || (bunched == 2 && i % 2 == 0) {
                        k[0] = 0x80;
                    }
                    (k, entry(i, u64::from(i)))
                })
                .collect();
            let mut expected = entries.clone();
            expected.sort_unstable_by_key(|(k, _)| rank(k));
            sort_entries(&mut entries);
            assert!(entries == expected, "bunched: {bunched}");
        }
    }

    /// The bucket sort of a merge gives the order of a comparison sort, for
    /// uniform keys and for keys bunched in a few buckets.
    #[test]
    fn overlay_sorts_as_a_comparison_sort_would() {
        for spread in [true, false] {
            let overlay: KeyMap<Entry> = (0..20_000u16)
                .map(|n| (key(n, spread), entry(u32::from(n), 0)))
                .collect();
            let mut expected: Vec<(Key, Entry)> = overlay.iter().map(|(k, e)| (*k, *e)).collect();
            expected.sort_unstable_by_key(|(k, _)| rank(k));
            assert_eq!(sorted(&overlay), expected, "spread: {spread}");
        }
    }

    proptest! {
        /// Keys appended to a log (and removed) and absorbed end as if
        /// inserted (and removed) one by one in the same order, into an index
        /// empty or not, and every entry a later step replaced or removed is
        /// reported, also one equal to its replacement.
        #[test]
        fn a_log_absorbed_is_the_inserts_in_order(
            before in proptest::collection::vec((0u16..3000, 0u32..50), 0..300),
            appended in proptest::collection::vec((0u16..3000, 0u32..50, 0u64..3), 0..6000),
            spread: bool,
        ) {
            // A third of the appended steps (hash 2) are removals.
            let mut index = KeyIndex::default();
            let mut model: HashMap<Key, Entry> = HashMap::new();
            for &(k, p) in &before {
                index.insert(key(k, spread), entry(p, 0));
                model.insert(key(k, spread), entry(p, 0));
            }
            let mut log = KeyLog::default();
            let mut expected = Vec::new();
            for &(k, p, h) in &appended {
                let old = if h == 2 {
                    log.remove(key(k, spread));
                    model.remove(&key(k, spread))
                } else {
                    log.push(key(k, spread), entry(p, h));
                    model.insert(key(k, spread), entry(p, h))
                };
                if let Some(old) = old {
                    expected.push(old.partition);
                }
            }
            prop_assert_eq!(log.len(), appended.len());
            let mut reported = Vec::new();
            index.absorb(log, |old| reported.push(old.partition));
            reported.sort_unstable();
            expected.sort_unstable();
            prop_assert_eq!(reported, expected);
            prop_assert_eq!(index.len(), model.len());
            for k in 0..3000 {
                prop_assert_eq!(index.get(&key(k, spread)), model.get(&key(k, spread)).copied());
            }
        }
    }

    /// The in-place bucket sort of a log gives the order of a comparison
    /// sort, for uniform keys and for keys bunched in a few buckets.
    #[test]
    fn a_log_sorts_in_place_as_a_comparison_sort_would() {
        for spread in [true, false] {
            let mut entries: Vec<(Key, Entry)> = (0..50_000u16)
                .rev()
                .map(|n| (key(n, spread), entry(u32::from(n), 0)))
                .collect();
            let mut expected = entries.clone();
            expected.sort_unstable_by_key(|(k, _)| rank(k));
            sort_entries(&mut entries);
            assert_eq!(entries, expected, "spread: {spread}");
        }
        // A key many times over (a log holds a key once per change): the
        // keys come in order and no entry is lost or made up.
        let mut entries: Vec<(Key, Entry)> = (0..50_000u32)
            .map(|n| (key((n % 700) as u16, true), entry(n, 0)))
            .collect();
        let mut expected = entries.clone();
        expected.sort_unstable_by_key(|(k, e)| (rank(k), e.partition));
        sort_entries(&mut entries);
        assert!(entries.windows(2).all(|w| rank(&w[0].0) <= rank(&w[1].0)));
        entries.sort_by_key(|(k, e)| (rank(k), e.partition));
        assert_eq!(entries, expected, "the same entries");
    }

    /// A log's filter grows with the keys appended, not with the room
    /// reserved for an estimate (which only takes address space).
    #[test]
    fn a_log_filter_follows_the_keys_not_the_estimate() {
        let mut log = KeyLog::default();
        log.reserve(10_000_000);
        for n in 0..1000 {
            log.push(key(n, true), entry(0, 0));
        }
        assert_eq!(log.filter.words.len(), MIN_OVERLAY / KEYS_PER_WORD);
        let mut index = KeyIndex::default();
        index.absorb(log, |_| panic!("no key came twice"));
        assert_eq!(index.len(), 1000);
    }

    /// The filter passes every key of the vector and turns most others away,
    /// so that a new key is seldom searched for in the vector.
    #[test]
    fn filter_turns_most_absent_keys_away() {
        let key_of = |i: u64| {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
            k[8..].copy_from_slice(&i.wrapping_mul(0xC2B2_AE3D_27D4_EB4F).to_le_bytes());
            k
        };
        let mut index = KeyIndex::default();
        for i in 0..200_000 {
            index.insert(key_of(i), entry(1, i));
        }
        index.merge();
        assert!((0..200_000).all(|i| index.filter.may_contain(&key_of(i))));
        let passed = (200_000..400_000)
            .filter(|&i| index.filter.may_contain(&key_of(i)))
            .count();
        assert!(
            passed < 200_000 / 10,
            "{passed} of 200,000 absent keys passed"
        );
    }
}
