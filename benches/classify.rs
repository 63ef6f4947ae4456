//! `cargo bench --bench classify`: throughput of the per-row work on one core —
//! reading an export, classifying the invoice schema with `redact` on free text,
//! and the personal-data detectors — on synthetic supplier invoices.
//!
//! Rows: `OPPEN_BENCH_ROWS` (default 1,000,000). Results are printed as a table;
//! BENCHMARKS.md records them.

use std::time::{Duration, Instant};

use arrow::array::{Array, RecordBatch, StringArray};
use oppen::classify::{Classifier, PseudonymKey, detect};
use oppen_connector_api::{BatchKind, ChangeBatch, Op, Position, Source};

/// A small deterministic generator (no dependency, same data every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn luhn(nine: &[u8]) -> u8 {
    let sum: u32 = nine
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let v = u32::from(*d) * if i % 2 == 0 { 2 } else { 1 };
            if v > 9 { v - 9 } else { v }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

fn id(rng: &mut Lcg, organisation: bool) -> String {
    let month = if organisation {
        20 + rng.below(80)
    } else {
        1 + rng.below(12)
    };
    let digits = format!(
        "{:02}{:02}{:02}{:03}",
        40 + rng.below(60),
        month,
        1 + rng.below(28),
        rng.below(1000)
    );
    let nine: Vec<u8> = digits.bytes().map(|b| b - b'0').collect();
    format!("{}-{}{}", &digits[..6], &digits[6..], luhn(&nine))
}

const TEXTS: [&str; 6] = [
    "Avser ramavtal",
    "Årsavgift 2025",
    "Licens, 12 mån",
    "Direktupphandling",
    "Kreditering",
    "",
];
const UNITS: [&str; 4] = [
    "Utbildningsförvaltningen",
    "Socialförvaltningen",
    "Miljöförvaltningen",
    "Tekniska förvaltningen",
];

/// A supplier-invoice export like the economy system's, `;`-separated, decimal comma.
fn export(rows: usize) -> String {
    let mut rng = Lcg(7);
    let mut out = String::with_capacity(rows * 170);
    out.push_str("verifikationsnummer;fakturanummer;bokforingsdatum;forvaltning;leverantor;leverantor_id;konto_nr;konto_text;belopp;beskrivning;handlaggare_epost\r\n");
    for i in 0..rows {
        let sole = rng.below(100) < 12;
        let text = match rng.below(100) {
            0..=2 => format!("Ersättning avser {}, jan", id(&mut rng, false)),
            3..=4 => "Kontakt: anna.andersson@exempel.se".to_string(),
            n => TEXTS[(n % 6) as usize].to_string(),
        };
        out.push_str(&format!(
            "{};F{};2025-{:02}-{:02};{};{} {};{};{};{};{},{:02};{};handlaggare{}@kommun.exempel.se\r\n",
            10_000_000 + i,
            100_000 + rng.below(900_000),
            1 + i * 12 / rows,
            1 + rng.below(28),
            UNITS[rng.below(4) as usize],
            ["Andersson", "Nilsson", "Karlsson"][rng.below(3) as usize],
            if sole { "Enskild firma" } else { "Bygg AB" },
            id(&mut rng, !sole),
            ["4010", "6540", "4690"][rng.below(3) as usize],
            "Inköp av material",
            100 + rng.below(99_900),
            rng.below(100),
            text,
            rng.below(50),
        ));
    }
    out
}

fn report(what: &str, rows: usize, bytes: usize, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    println!(
        "{what:<44} {:>12.0} rows/s {:>10.1} MB/s {:>9.3} s",
        rows as f64 / secs,
        bytes as f64 / secs / 1e6,
        secs
    );
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (T, Duration) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..runs {
        let started = Instant::now();
        let value = f();
        best = best.min(started.elapsed());
        out = Some(value);
    }
    (
        out.unwrap_or_else(|| unreachable!("at least one run")),
        best,
    )
}

fn main() {
    let rows: usize = std::env::var("OPPEN_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let inbox = dir.path().join("in");
    std::fs::create_dir_all(&inbox).expect("inbox");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let pipeline_text = std::fs::read_to_string(repo.join("leverantorsfakturor.yaml"))
        .expect("example pipeline")
        .replace(
            "path: data/leverantorsfakturor",
            &format!("path: {}", inbox.display()),
        );
    std::fs::write(dir.path().join("leverantorsfakturor.yaml"), pipeline_text).expect("write");
    std::fs::copy(
        repo.join("leverantorsfakturor.rules.yaml"),
        dir.path().join("leverantorsfakturor.rules.yaml"),
    )
    .expect("rules");
    let text = export(rows);
    let bytes = text.len();
    std::fs::write(inbox.join("export-2025-12.csv"), &text).expect("export");
    let pipeline =
        oppen::config::load(&dir.path().join("leverantorsfakturor.yaml")).expect("pipeline loads");

    println!(
        "{rows} invoice rows, {:.1} MB of CSV; one core unless noted\n",
        bytes as f64 / 1e6
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut source =
        oppen::runtime::files_source(&pipeline, Default::default(), true).expect("source");
    runtime.block_on(source.start(None)).expect("start");
    let ((batch, _), elapsed) = best_of(3, || {
        source
            .read_file("export-2025-12.csv")
            .expect("read")
            .expect("parse")
    });
    report(
        "read export (decode, parse, type, check keys)",
        rows,
        bytes,
        elapsed,
    );

    let key = PseudonymKey::from_bytes(vec![42; 32]).expect("key");
    let classifier = Classifier::compile(&pipeline, batch.schema(), &key).expect("rules compile");
    let batches: Vec<RecordBatch> = (0..rows)
        .step_by(oppen_connector_files::BATCH_ROWS)
        .map(|offset| batch.slice(offset, oppen_connector_files::BATCH_ROWS.min(rows - offset)))
        .collect();
    let changes: Vec<ChangeBatch> = batches
        .iter()
        .map(|b| ChangeBatch {
            data: b.clone(),
            ops: vec![Op::Read; b.num_rows()],
            kind: BatchKind::Snapshot,
            position: Position::File {
                name: "bench".into(),
                sha256: String::new(),
            },
            commit_time: None,
            end_of_transaction: false,
        })
        .collect();
    let (_, elapsed) = best_of(3, || {
        for c in &changes {
            classifier.classify(c).expect("classifies");
        }
    });
    report(
        "classify (keys, suppress, redact, guard)",
        rows,
        bytes,
        elapsed,
    );

    let free_text = batch.column_by_name("beskrivning").expect("column");
    let free_text = free_text
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("text");
    let text_bytes = free_text.value_data().len();
    let (_, elapsed) = best_of(3, || {
        free_text
            .iter()
            .flatten()
            .filter(|v| detect::redact(v).is_some())
            .count()
    });
    report("redact detector on free text", rows, text_bytes, elapsed);

    let all_text: Vec<&StringArray> = batch
        .columns()
        .iter()
        .filter_map(|c| c.as_any().downcast_ref::<StringArray>())
        .collect();
    let scanned: usize = all_text.iter().map(|a| a.value_data().len()).sum();
    let (_, elapsed) = best_of(3, || {
        all_text
            .iter()
            .map(|a| {
                a.iter()
                    .flatten()
                    .filter(|v| detect::contains_personal_identity_number(v))
                    .count()
            })
            .sum::<usize>()
    });
    report(
        "identity-number scan over all text columns",
        rows,
        scanned,
        elapsed,
    );
}
