//! The initial copy: `COPY ... TO STDOUT (FORMAT binary)` inside the slot's
//! exported snapshot, decoded straight into Arrow columns, in parallel block
//! ranges on large tables.

use std::sync::Arc;

use arrow::array::{Array, RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;
use oppen_connector_api::Error;
use tokio::sync::{mpsc, watch};

use crate::catalog::ColumnInfo;
use crate::config::Table;
use crate::types::{ColumnBuilder, Kind};
use crate::wire::{WireConnection, quote_ident, quote_literal, transient};

/// The binary COPY signature and header length (signature, flags, extension length).
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
const HEADER_LEN: usize = 19;
/// Tables smaller than this many pages are copied by one connection.
const PAGES_PER_WORKER: i64 = 4096;

/// What a snapshot worker sends: a batch of rows, or why it failed.
pub type SnapshotItem = Result<RecordBatch, Error>;

/// How many connections copy a table of `pages` pages: as many as the
/// pipeline set (a page each at least); by default one per core, at most 4
/// and one per [`PAGES_PER_WORKER`] pages, for large tables only.
///
/// Each connection keeps a server backend busy: a server on this machine
/// (`server_here`) takes those cores from oppen's own decoding and
/// encoding, so it gets half of them.
pub fn connections(pages: i64, set: Option<usize>, cores: usize, server_here: bool) -> usize {
    match set {
        Some(workers) => workers.clamp(1, pages.max(1) as usize),
        None if pages >= 2 * PAGES_PER_WORKER => {
            let cores = if server_here { cores / 2 } else { cores };
            cores.clamp(1, 4).min((pages / PAGES_PER_WORKER) as usize)
        }
        None => 1,
    }
}

/// Everything a snapshot copy needs.
#[derive(Debug, Clone)]
pub struct SnapshotPlan {
    pub config: crate::tls::DbConfig,
    pub table: Table,
    pub columns: Vec<ColumnInfo>,
    pub schema: SchemaRef,
    pub snapshot: String,
    pub pages: i64,
    /// Connections copying at once (see [`connections`]).
    pub workers: usize,
    pub batch_rows: usize,
}

/// Decoded batches waiting for the publisher. The publisher is the slower
/// side (it classifies and encodes), so the queue is nearly always full: each
/// batch queued is peak memory for nothing. Two keep the publisher fed.
const QUEUED_BATCHES: usize = 2;

/// Starts the copy; batches arrive on the returned channel, which closes when
/// every worker is done. The watch counts the workers yet to import the
/// exported snapshot: the exporting session must stay open until it is 0,
/// or the later ones find the snapshot gone.
pub fn start(plan: SnapshotPlan) -> (mpsc::Receiver<SnapshotItem>, watch::Receiver<usize>) {
    let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
    let workers = plan.workers.max(1);
    let (importing, importing_rx) = watch::channel(workers);
    let per = plan.pages / workers as i64 + 1;
    let plan = Arc::new(plan);
    for w in 0..workers {
        // Block ranges by ctid (TID range scans, PostgreSQL 14+); the last range
        // is open so pages added since relpages was read are still copied.
        let range = (workers > 1).then(|| {
            let lo = per * w as i64;
            let hi = (w + 1 < workers).then_some(per * (w as i64 + 1));
            (lo, hi)
        });
        let tx = tx.clone();
        let plan = plan.clone();
        let importing = importing.clone();
        tokio::spawn(async move {
            if let Err(e) = copy_range(&plan, range, &tx, &importing).await {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    (rx, importing_rx)
}

/// The COPY statement for a range (or the whole table).
pub fn copy_sql(
    table: &Table,
    columns: &[ColumnInfo],
    range: Option<(i64, Option<i64>)>,
) -> String {
    let list: Vec<String> = columns
        .iter()
        .map(|c| {
            if c.kind.binary_in_snapshot() {
                quote_ident(&c.name)
            } else {
                format!("{}::text", quote_ident(&c.name))
            }
        })
        .collect();
    let filter = match range {
        None => String::new(),
        Some((lo, None)) => format!(" WHERE ctid >= '({lo},0)'::tid"),
        Some((lo, Some(hi))) => {
            format!(" WHERE ctid >= '({lo},0)'::tid AND ctid < '({hi},0)'::tid")
        }
    };
    format!(
        "COPY (SELECT {} FROM {}{filter}) TO STDOUT (FORMAT binary)",
        list.join(", "),
        table.quoted()
    )
}

async fn copy_range(
    plan: &SnapshotPlan,
    range: Option<(i64, Option<i64>)>,
    tx: &mpsc::Sender<SnapshotItem>,
    importing: &watch::Sender<usize>,
) -> Result<(), Error> {
    let mut session = WireConnection::session(&plan.config, crate::wire::SESSION_OPTIONS).await?;
    session
        .simple_query(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&plan.snapshot)
        ))
        .await?;
    importing.send_modify(|n| *n -= 1);
    session
        .copy_out_start(&copy_sql(&plan.table, &plan.columns, range))
        .await?;
    let mut decoder = CopyDecoder::new(&plan.columns, plan.schema.clone(), plan.batch_rows);
    let mut batches = Vec::new();
    let mut more = true;
    while more {
        more = session
            .copy_out_read(|data| decoder.push(data, &mut batches))
            .await?;
        if !more {
            batches.extend(decoder.finish()?);
        }
        for batch in batches.drain(..) {
            if tx.send(Ok(batch)).await.is_err() {
                // The snapshot was given up: dropping the session ends it.
                return Ok(());
            }
        }
    }
    // A clean end: no transaction left open on the source.
    session.simple_query("COMMIT").await?;
    session.close().await;
    Ok(())
}

/// Decodes a binary COPY stream into record batches.
#[derive(Debug)]
pub struct CopyDecoder {
    kinds: Vec<Kind>,
    schema: SchemaRef,
    builders: Vec<ColumnBuilder>,
    rows: usize,
    batch_rows: usize,
    carry: Vec<u8>,
    header_seen: bool,
    ended: bool,
    row_number: u64,
}

impl CopyDecoder {
    /// A decoder for `columns`, emitting batches of `batch_rows`.
    pub fn new(columns: &[ColumnInfo], schema: SchemaRef, batch_rows: usize) -> Self {
        let kinds: Vec<Kind> = columns.iter().map(|c| c.kind).collect();
        let builders = kinds
            .iter()
            .map(|k| ColumnBuilder::new(*k, batch_rows))
            .collect();
        CopyDecoder {
            kinds,
            schema,
            builders,
            rows: 0,
            batch_rows,
            carry: Vec::new(),
            header_seen: false,
            ended: false,
            row_number: 0,
        }
    }

    fn bad(&self, what: impl std::fmt::Display) -> Error {
        transient(format!("snapshot COPY row {}: {what}", self.row_number + 1))
    }

    /// Feeds a chunk of the stream (any split: a row may span chunks);
    /// the batches it completes are added to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<RecordBatch>) -> Result<(), Error> {
        if self.carry.is_empty() {
            let used = self.rows_from(chunk, out)?;
            self.carry.extend_from_slice(&chunk[used..]);
        } else {
            self.carry.extend_from_slice(chunk);
            let carry = std::mem::take(&mut self.carry);
            let used = self.rows_from(&carry, out);
            self.carry = carry;
            self.carry.drain(..used?);
        }
        Ok(())
    }

    /// Decodes the header, if not yet seen, and the whole rows at the front
    /// of `data`; returns the bytes taken.
    fn rows_from(&mut self, data: &[u8], out: &mut Vec<RecordBatch>) -> Result<usize, Error> {
        let mut pos = 0;
        if !self.header_seen {
            if data.len() < HEADER_LEN {
                return Ok(0);
            }
            if !data.starts_with(SIGNATURE) {
                return Err(self.bad("not a binary COPY stream"));
            }
            let ext = u32::from_be_bytes([data[15], data[16], data[17], data[18]]) as usize;
            if data.len() < HEADER_LEN + ext {
                return Ok(0);
            }
            pos = HEADER_LEN + ext;
            self.header_seen = true;
        }
        while let Some(used) = self.row(&data[pos..])? {
            pos += used;
            if self.rows >= self.batch_rows {
                out.push(self.flush()?);
            }
        }
        Ok(pos)
    }

    /// Decodes one row from the front of `data` if it is whole; returns the
    /// bytes it took. A row is first measured, then decoded, so a row split
    /// across chunks is never half-appended.
    fn row(&mut self, data: &[u8]) -> Result<Option<usize>, Error> {
        if self.ended || data.len() < 2 {
            return Ok(None);
        }
        let fields = i16::from_be_bytes([data[0], data[1]]);
        if fields == -1 {
            self.ended = true;
            return Ok(Some(2));
        }
        if fields as usize != self.kinds.len() {
            return Err(self.bad(format!("{fields} fields, expected {}", self.kinds.len())));
        }
        let mut pos = 2;
        for _ in 0..fields {
            let Some(len) = data.get(pos..pos + 4) else {
                return Ok(None);
            };
            let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            pos += 4 + len.max(0) as usize;
            if pos > data.len() {
                return Ok(None);
            }
        }
        let mut pos = 2;
        for (i, builder) in self.builders.iter_mut().enumerate() {
            let len = i32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
            pos += 4;
            if len < 0 {
                builder.append_null();
            } else {
                let value = &data[pos..pos + len as usize];
                pos += len as usize;
                if let Err(e) = builder.append_binary(self.kinds[i], value) {
                    return Err(transient(format!(
                        "snapshot COPY row {}, column {}: {e}",
                        self.row_number + 1,
                        self.schema.field(i).name()
                    )));
                }
            }
        }
        self.rows += 1;
        self.row_number += 1;
        Ok(Some(pos))
    }

    fn flush(&mut self) -> Result<RecordBatch, Error> {
        let rows = self.batch_rows;
        let columns = self
            .builders
            .iter_mut()
            .zip(&self.kinds)
            .map(|(builder, kind)| {
                let array = builder.finish();
                // arrow's `finish` leaves empty buffers, which the next batch
                // would grow by doubling, copying its values once more on the
                // way: start it at this batch's size (text: its bytes, scaled
                // to a whole batch, plus an eighth).
                let text_bytes = array.as_any().downcast_ref::<StringArray>().map_or(0, |a| {
                    let per_row = a.values().len() / a.len().max(1);
                    (per_row + per_row / 8 + 1) * rows
                });
                *builder = ColumnBuilder::sized(*kind, rows, text_bytes);
                array
            })
            .collect();
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| transient(format!("snapshot batch: {e}")))
    }

    /// The last rows, once the stream ended.
    pub fn finish(&mut self) -> Result<Option<RecordBatch>, Error> {
        if !self.ended {
            return Err(self.bad("the COPY stream ended without its trailer"));
        }
        (self.rows > 0).then(|| self.flush()).transpose()
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;

    use super::*;

    /// A binary COPY stream's header: signature, flags, no extension.
    fn header() -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&[0; 8]);
        out
    }

    /// A decoder of columns of `kinds`, emitting batches of `batch_rows`.
    fn decoder(kinds: &[Kind], batch_rows: usize) -> CopyDecoder {
        let columns: Vec<ColumnInfo> = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| ColumnInfo {
                name: format!("c{i}"),
                sql_type: String::new(),
                kind: *k,
            })
            .collect();
        CopyDecoder::new(
            &columns,
            crate::source::PostgresSource::schema_of(&columns),
            batch_rows,
        )
    }

    /// A binary COPY stream of `(id bigint, name text)` rows.
    fn stream(rows: &[(i64, Option<&str>)]) -> Vec<u8> {
        let mut out = header();
        for (id, name) in rows {
            out.extend_from_slice(&2i16.to_be_bytes());
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
            match name {
                Some(n) => {
                    out.extend_from_slice(&(n.len() as i32).to_be_bytes());
                    out.extend_from_slice(n.as_bytes());
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    /// Batches after the first start from builders sized by the batch before
    /// (see `flush`); whatever the chunking, every row comes out once, whole.
    #[test]
    fn rows_split_across_chunks_and_batches_come_out_whole() {
        let long = "å".repeat(300);
        let rows: Vec<(i64, Option<&str>)> = (0..23)
            .map(|i| match i % 4 {
                0 => (i, None),
                1 => (i, Some("")),
                2 => (i, Some(long.as_str())),
                _ => (i, Some("kort")),
            })
            .collect();
        let bytes = stream(&rows);
        for chunk in [1, 7, 64, bytes.len()] {
            let mut decoder = decoder(&[Kind::Int8, Kind::Text], 4);
            let mut batches = Vec::new();
            for piece in bytes.chunks(chunk) {
                decoder.push(piece, &mut batches).unwrap();
            }
            batches.extend(decoder.finish().unwrap());
            assert_eq!(batches.len(), 6, "chunks of {chunk}");
            let mut got = Vec::new();
            for b in &batches {
                let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                let names = b.column(1).as_any().downcast_ref::<StringArray>().unwrap();
                for r in 0..b.num_rows() {
                    got.push((ids.value(r), names.is_valid(r).then(|| names.value(r))));
                }
            }
            assert_eq!(got, rows, "chunks of {chunk}");
        }
    }

    /// Feeds `bytes` in chunks of `chunk` until the end or an error.
    fn decode_all(kinds: &[Kind], bytes: &[u8], chunk: usize) {
        let mut decoder = decoder(kinds, 3);
        let mut batches = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            if decoder.push(piece, &mut batches).is_err() {
                return;
            }
        }
        let _ = decoder.finish();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5_000))]
        /// Fuzz: whatever the server sends, the decoder returns batches or an
        /// error, never a panic; rows of the right shape with arbitrary
        /// values go deep into every type's decoding.
        #[test]
        fn copy_decoding_never_panics(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            values in proptest::collection::vec(
                (-1i32..20, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20)),
                0..30,
            ),
            chunk in 1usize..64,
        ) {
            let kinds = [
                Kind::Int8,
                Kind::Text,
                Kind::Numeric { precision: 18, scale: 2 },
                Kind::Date,
                Kind::TimestampTz,
                Kind::Bool,
            ];
            let mut shaped = header();
            for row in values.chunks(kinds.len()) {
                shaped.extend_from_slice(&(kinds.len() as i16).to_be_bytes());
                for i in 0..kinds.len() {
                    let (len, bytes) = row.get(i).cloned().unwrap_or((-1, Vec::new()));
                    let len = len.min(bytes.len() as i32);
                    shaped.extend_from_slice(&len.to_be_bytes());
                    shaped.extend_from_slice(&bytes[..len.max(0) as usize]);
                }
            }
            shaped.extend_from_slice(&(-1i16).to_be_bytes());
            decode_all(&kinds, &shaped, chunk);
            let mut random = header();
            random.extend_from_slice(&raw);
            decode_all(&kinds, &random, chunk);
            decode_all(&kinds, &raw, chunk);
        }
    }
}
