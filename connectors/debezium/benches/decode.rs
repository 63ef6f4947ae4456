//! `cargo bench -p oppen-connector-debezium --bench decode`: Debezium records
//! decoded into Arrow on one core, for the sample SQL Server invoice schema
//! (JSON converter with schemas: every record repeats its ~2 KB schema).
//!
//! Records: `OPPEN_BENCH_RECORDS` (default 1,000,000), made by cycling the
//! sample topic's change records. Prints records/s and MB/s.

use std::time::Instant;

use oppen_connector_debezium::decode::{Decoder, Record, RowBuilder};

fn main() {
    let n: usize = std::env::var("OPPEN_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let sample = include_str!("../../../pipelines/data/debezium/sqlserver-invoices.jsonl");
    let values: Vec<Vec<u8>> = sample
        .lines()
        .filter_map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).ok()?;
            match &record["value"] {
                serde_json::Value::Null => None,
                v => Some(v.to_string().into_bytes()),
            }
        })
        .collect();
    let bytes: usize = (0..n).map(|i| values[i % values.len()].len()).sum();
    for round in 0..3 {
        let mut decoder = Decoder::new();
        let mut rows: Option<RowBuilder> = None;
        let mut batches = 0usize;
        let started = Instant::now();
        for i in 0..n {
            match decoder.decode(Some(&values[i % values.len()])) {
                Ok(Record::Change { columns, cells, .. }) => {
                    let builder = rows.get_or_insert_with(|| RowBuilder::new(columns));
                    builder.append(cells);
                    if builder.len() >= 65_536 {
                        batches += builder.finish().map(|b| b.num_rows()).unwrap_or(0);
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
        if let Some(b) = rows.as_mut() {
            batches += b.finish().map(|b| b.num_rows()).unwrap_or(0);
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "round {round}: {n} records ({batches} rows) in {secs:.2} s: {:.0} records/s, {:.0} MB/s",
            n as f64 / secs,
            bytes as f64 / secs / 1e6
        );
    }
}
