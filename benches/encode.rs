//! `cargo bench --bench encode`: the cost of writing one part on one core —
//! the private state (Arrow IPC, zstd), Parquet and CSV, and the sha256 of each
//! file — for a classified supplier-invoice part of `OPPEN_BENCH_ROWS` rows
//! (default 200,000, the default `max_file_rows`), shaped like the table
//! `bench/postgres` loads. Each figure is the fastest of `OPPEN_BENCH_RUNS`
//! runs (default 7): on a shared machine the minimum is the stable one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, Date32Array, Decimal128Array, FixedSizeBinaryArray, Int32Array, Int64Array,
    RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use oppen::config::OutputFormat;
use oppen::publish::{state, writer};
use sha2::{Digest, Sha256};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A part as the publisher writes it: `_key` first, then the published columns.
fn part(rows: usize) -> RecordBatch {
    let g = || (1..=rows as i64).map(|g| g * 7 + 1_000_000);
    let keys: Vec<u8> = g()
        .flat_map(|g| {
            let h = (g as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
            h.to_le_bytes()
        })
        .collect();
    let schema = Schema::new(vec![
        Field::new("_key", DataType::FixedSizeBinary(16), false),
        Field::new("invoice_id", DataType::Int64, false),
        Field::new("supplier", DataType::Utf8, true),
        Field::new("supplier_orgnr", DataType::Utf8, true),
        Field::new("amount", DataType::Decimal128(18, 2), true),
        Field::new("vat", DataType::Decimal128(18, 2), true),
        Field::new("posted", DataType::Date32, true),
        Field::new("due", DataType::Date32, true),
        Field::new("account", DataType::Int32, true),
        Field::new("description", DataType::Utf8, true),
        Field::new(
            "updated_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
    ]);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(FixedSizeBinaryArray::try_new(16, keys.into(), None).expect("keys")),
        Arc::new(Int64Array::from_iter_values(g())),
        Arc::new(StringArray::from_iter_values(
            g().map(|g| format!("Leverantör AB {}", g % 997)),
        )),
        Arc::new(StringArray::from_iter_values(
            g().map(|g| format!("556{:07}", g % 1_000_000)),
        )),
        Arc::new(
            Decimal128Array::from_iter_values(g().map(|g| i128::from(g * 37 % 10_000_000)))
                .with_precision_and_scale(18, 2)
                .expect("decimal"),
        ),
        Arc::new(
            Decimal128Array::from_iter_values(g().map(|g| i128::from(g * 37 % 10_000_000 / 4)))
                .with_precision_and_scale(18, 2)
                .expect("decimal"),
        ),
        Arc::new(Date32Array::from_iter_values(
            g().map(|g| 19_723 + (g % 365) as i32),
        )),
        Arc::new(Date32Array::from_iter_values(
            g().map(|g| 19_754 + (g % 365) as i32),
        )),
        Arc::new(Int32Array::from_iter_values(
            g().map(|g| 4000 + (g % 900) as i32),
        )),
        Arc::new(StringArray::from_iter_values(
            g().map(|g| format!("Inköp av förbrukningsmaterial, order {g}")),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                g().map(|g| 1_704_067_200_000_000 + g * 1_000_000),
            )
            .with_timezone("UTC"),
        ),
    ];
    RecordBatch::try_new(Arc::new(schema), columns).expect("part")
}

/// One encoder under test: returns the bytes it wrote.
type Encoder<'a> = Box<dyn FnMut() -> usize + 'a>;

/// The fastest of `runs` runs of `f`, and its output's size.
fn fastest(runs: usize, mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut bytes = 0;
    for _ in 0..runs {
        let started = Instant::now();
        bytes = f();
        best = best.min(started.elapsed());
    }
    (best, bytes)
}

fn main() {
    let rows = env("OPPEN_BENCH_ROWS", 200_000);
    let runs = env("OPPEN_BENCH_RUNS", 7);
    let part = part(rows);
    let published = part
        .project(&(1..part.num_columns()).collect::<Vec<_>>())
        .expect("project");
    let state = state::encode_state(&part).expect("state");
    let parquet = writer::encode(OutputFormat::Parquet, &published).expect("parquet");
    let csv = writer::encode(OutputFormat::Csv, &published).expect("csv");
    let all = [state.len(), parquet.len(), csv.len()]
        .iter()
        .sum::<usize>();
    let cases: Vec<(&str, Encoder)> = vec![
        (
            "state (Arrow IPC, zstd)",
            Box::new(|| state::encode_state(&part).expect("state").len()),
        ),
        (
            "Parquet (zstd)",
            Box::new(|| {
                writer::encode(OutputFormat::Parquet, &published)
                    .expect("parquet")
                    .len()
            }),
        ),
        (
            "CSV",
            Box::new(|| {
                writer::encode(OutputFormat::Csv, &published)
                    .expect("csv")
                    .len()
            }),
        ),
        (
            "sha256 of the three files",
            Box::new(|| {
                for file in [&state, &parquet, &csv] {
                    std::hint::black_box(Sha256::digest(file));
                }
                all
            }),
        ),
    ];
    println!("one part of {rows} rows, fastest of {runs} runs, one core");
    println!("| encoder | ms | rows/s | MB out |");
    println!("|---|---|---|---|");
    let mut total = Duration::ZERO;
    for (name, mut f) in cases {
        let (time, bytes) = fastest(runs, &mut f);
        total += time;
        println!(
            "| {name} | {:.1} | {:.0} | {:.1} |",
            time.as_secs_f64() * 1e3,
            rows as f64 / time.as_secs_f64(),
            bytes as f64 / 1e6
        );
    }
    println!(
        "| all | {:.1} | {:.0} | {:.1} |",
        total.as_secs_f64() * 1e3,
        rows as f64 / total.as_secs_f64(),
        all as f64 / 1e6
    );
}
