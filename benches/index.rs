//! `cargo bench --bench index`: the key index's cost for a first version of
//! `OPPEN_BENCH_ROWS` new keys (default 2,000,000), arriving in batches of
//! 65,536 as the PostgreSQL snapshot sends them and applied in row order,
//! inserted one by one and, as a streamed first version does, appended to a
//! [`KeyLog`] and put in order once; then a batch of updates to 1% of the keys.
//! Each figure is the fastest of `OPPEN_BENCH_RUNS` runs (default 5).

use std::time::{Duration, Instant};

use arrow::array::{Array, FixedSizeBinaryArray};
use oppen::publish::index::{KeyIndex, KeyLog};
use oppen::publish::state::{self, Entry, Key};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A uniform 16-byte key, as the HMAC of a row's key columns is.
fn key(i: u64) -> Key {
    let h = u128::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
    (h ^ (h >> 61))
        .wrapping_mul(0xD6E8_FEB8_6659_FD93_2B9E_1B5A_3C4D_6E7F)
        .to_le_bytes()
}

fn batch(range: std::ops::Range<u64>) -> FixedSizeBinaryArray {
    FixedSizeBinaryArray::try_from_iter(range.map(key)).expect("16-byte keys")
}

/// Applies a batch as `Streamed::apply_to_keys` does: in row order.
fn apply(index: &mut KeyIndex, keys: &FixedSizeBinaryArray, partition: u32) -> usize {
    let mut replaced = 0;
    for r in 0..keys.len() {
        let entry = Entry {
            partition,
            hash: r as u64,
        };
        replaced += usize::from(index.insert(state::key_at(keys, r), entry).is_some());
    }
    replaced
}

fn fastest(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().expect("at least one run")
}

fn main() {
    let rows = env("OPPEN_BENCH_ROWS", 2_000_000) as u64;
    let runs = env("OPPEN_BENCH_RUNS", 5);
    const BATCH: u64 = 65_536;
    let batches: Vec<_> = (0..rows)
        .step_by(BATCH as usize)
        .map(|start| batch(start..(start + BATCH).min(rows)))
        .collect();
    let updated =
        FixedSizeBinaryArray::try_from_iter((0..rows).step_by(100).map(key)).expect("16-byte keys");

    let mut built = KeyIndex::default();
    let first = fastest(runs, || {
        let mut index = KeyIndex::default();
        index.reserve(rows as usize);
        let started = Instant::now();
        for (i, keys) in batches.iter().enumerate() {
            assert_eq!(apply(&mut index, keys, (i / 3) as u32), 0);
        }
        let took = started.elapsed();
        assert_eq!(index.len(), rows as usize);
        built = index;
        took
    });
    let mut ordering = Duration::MAX;
    let logged = fastest(runs, || {
        let mut log = KeyLog::default();
        log.reserve(rows as usize);
        let started = Instant::now();
        for (i, keys) in batches.iter().enumerate() {
            for r in 0..keys.len() {
                let entry = Entry {
                    partition: (i / 3) as u32,
                    hash: r as u64,
                };
                log.push(state::key_at(keys, r), entry);
            }
        }
        let mut index = KeyIndex::default();
        let mut replaced = 0;
        let absorbing = Instant::now();
        index.absorb(log, |_| replaced += 1);
        ordering = ordering.min(absorbing.elapsed());
        let took = started.elapsed();
        assert_eq!((index.len(), replaced), (rows as usize, 0));
        took
    });
    let update = fastest(runs, || {
        let mut index = built.clone();
        let started = Instant::now();
        let replaced = apply(&mut index, &updated, 1);
        let took = started.elapsed();
        assert_eq!(replaced, updated.len());
        took
    });
    println!(
        "first version, {rows} new keys in batches of {BATCH}: {:.1} ms ({:.0} ns a key)",
        first.as_secs_f64() * 1e3,
        first.as_nanos() as f64 / rows as f64
    );
    println!(
        "the same keys appended to a log and put in order once: {:.1} ms ({:.0} ns a key)",
        logged.as_secs_f64() * 1e3,
        logged.as_nanos() as f64 / rows as f64
    );
    println!(
        "  of which put in order (the log absorbed into an empty index): {:.1} ms ({:.0} ns a key)",
        ordering.as_secs_f64() * 1e3,
        ordering.as_nanos() as f64 / rows as f64
    );
    println!(
        "then {} updated keys in one batch: {:.1} ms ({:.0} ns a key)",
        updated.len(),
        update.as_secs_f64() * 1e3,
        update.as_nanos() as f64 / updated.len() as f64
    );
}
