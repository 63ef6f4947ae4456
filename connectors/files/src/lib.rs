//! The export-drop connector: a folder where a system drops periodic CSV, JSON or
//! JSON Lines exports.
//!
//! Files are processed in name order, each once. In `full_dump` mode each file is
//! the complete table and is emitted as a [`BatchKind::Snapshot`], which the engine
//! diffs against the published state by key; in `append` mode every row is an
//! upsert. A file that cannot be read is moved to the dead-letter folder with a
//! reason file beside it, and the connector goes on with the next file.

pub mod decode;
pub mod formats;
pub mod typing;

use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use encoding_rs::Encoding;
use oppen_connector_api::{
    BatchKind, ChangeBatch, ColumnType, Error, Op, Position, Rejection, Result, Source,
    SourceEvent, SourceHints,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::formats::{RawTable, RecordSelector, RowProblem};

/// Rows per emitted batch: big enough for vectorised work, small enough to pipeline.
pub const BATCH_ROWS: usize = 64 * 1024;
/// How long a file must stay unchanged before it is read, so a file still being
/// copied into the folder is not read half-written.
pub const DEFAULT_SETTLE_SECONDS: u64 = 2;
/// Local time zone for timestamps without an offset.
pub const DEFAULT_TIMEZONE: &str = "Europe/Stockholm";
/// At most this many row problems are spelled out in a reason file.
const MAX_PROBLEMS_LISTED: usize = 50;

/// The export file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Comma-, semicolon-, tab- or pipe-separated values with a header row.
    Csv,
    /// One JSON document per file.
    Json,
    /// One JSON value per line.
    Jsonl,
}

/// What a new file means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Each file is the complete table; changes are found by diffing on the key.
    #[default]
    FullDump,
    /// Each file adds (or replaces, by key) rows.
    Append,
}

/// `source: files:` in a pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// The folder the exports are dropped in (the engine resolves relative paths).
    pub path: PathBuf,
    /// Which files in the folder to read (a glob on the file name).
    #[serde(default = "default_pattern")]
    pub pattern: String,
    /// csv | json | jsonl
    pub format: Format,
    /// full_dump | append
    #[serde(default)]
    pub mode: Mode,
    /// The columns that identify a row.
    pub key: Vec<String>,
    /// The text encoding (any WHATWG label); detected when absent.
    #[serde(default)]
    pub encoding: Option<String>,
    /// The CSV separator: `,` `;` `|` or `tab`; detected when absent.
    #[serde(default)]
    pub separator: Option<String>,
    /// For JSON: which records to read, e.g. `meals[].courses[]`.
    #[serde(default)]
    pub records: Option<String>,
    /// Where unreadable files go; default `<path>/dead-letter`.
    #[serde(default)]
    pub dead_letter: Option<PathBuf>,
    /// Time zone for timestamps without an offset (IANA name).
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Seconds a file must stay unchanged before it is read.
    #[serde(default = "default_settle")]
    pub settle_seconds: u64,
}

fn default_pattern() -> String {
    "*".into()
}
fn default_timezone() -> String {
    DEFAULT_TIMEZONE.into()
}
fn default_settle() -> u64 {
    DEFAULT_SETTLE_SECONDS
}

impl FilesConfig {
    /// Checks the settings without touching the disk; returns every problem.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = glob::Pattern::new(&self.pattern) {
            problems.push(format!(
                "pattern `{}` is not a valid glob: {e}",
                self.pattern
            ));
        }
        if self.key.is_empty() {
            problems.push(
                "key must name at least one column: without a key there is no change data".into(),
            );
        }
        if let Some(label) = &self.encoding
            && decode::encoding_for_label(label).is_none()
        {
            problems.push(format!(
                    "encoding `{label}` is unknown; use utf-8, utf-16le, utf-16be, latin1 or windows-1252"
                ));
        }
        if let Some(separator) = &self.separator {
            if parse_separator(separator).is_none() {
                problems.push(format!(
                    "separator `{separator}` must be one character, or `tab`"
                ));
            }
            if self.format != Format::Csv {
                problems.push("separator applies to csv only".into());
            }
        }
        match (&self.records, self.format) {
            (Some(_), Format::Csv) => {
                problems.push("records applies to json and jsonl only".into())
            }
            (Some(records), _) => {
                if let Err(e) = RecordSelector::parse(records) {
                    problems.push(format!("records {e}"));
                }
            }
            _ => {}
        }
        if self.timezone.parse::<chrono_tz::Tz>().is_err() {
            problems.push(format!(
                "timezone `{}` is not an IANA zone such as Europe/Stockholm",
                self.timezone
            ));
        }
        problems
    }

    fn dead_letter_dir(&self) -> PathBuf {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| self.path.join("dead-letter"))
    }
}

fn parse_separator(text: &str) -> Option<u8> {
    match text {
        "tab" | "\\t" | "\t" => Some(b'\t'),
        s if s.len() == 1 && s.is_ascii() => s.bytes().next(),
        _ => None,
    }
}

/// One export file found in the folder.
#[derive(Debug, Clone)]
struct Candidate {
    name: String,
    size: u64,
    modified: SystemTime,
}

/// The export-drop source.
#[derive(Debug)]
pub struct FilesSource {
    config: FilesConfig,
    pattern: glob::Pattern,
    encoding: Option<&'static Encoding>,
    separator: Option<u8>,
    selector: RecordSelector,
    timezone: chrono_tz::Tz,
    hints: SourceHints,
    settle: Duration,
    last: Option<String>,
    pending: VecDeque<SourceEvent>,
    schema: Option<SchemaRef>,
}

impl FilesSource {
    /// A source for `config`. Fails on settings that [`FilesConfig::validate`] rejects.
    pub fn new(config: FilesConfig, hints: SourceHints) -> Result<Self> {
        let problems = config.validate();
        if !problems.is_empty() {
            return Err(Error::Config(problems.join("; ")));
        }
        let pattern =
            glob::Pattern::new(&config.pattern).map_err(|e| Error::Config(e.to_string()))?;
        let encoding = config
            .encoding
            .as_deref()
            .and_then(decode::encoding_for_label);
        let separator = config.separator.as_deref().and_then(parse_separator);
        let selector = RecordSelector::parse(config.records.as_deref().unwrap_or(""))
            .map_err(Error::Config)?;
        let timezone = config
            .timezone
            .parse()
            .map_err(|_| Error::Config("bad timezone".into()))?;
        let settle = Duration::from_secs(config.settle_seconds);
        Ok(Self {
            config,
            pattern,
            encoding,
            separator,
            selector,
            timezone,
            hints,
            settle,
            last: None,
            pending: VecDeque::new(),
            schema: None,
        })
    }

    /// Reads files as soon as they are seen (for `--once` runs over a folder that
    /// is not being written to).
    pub fn without_settling(mut self) -> Self {
        self.settle = Duration::ZERO;
        self
    }

    /// Export files in the folder matching the pattern, in name order, whether
    /// processed or not.
    pub fn files(&self) -> Result<Vec<String>> {
        Ok(self.scan(None)?.into_iter().map(|c| c.name).collect())
    }

    /// Reads and types one export file without side effects (nothing is moved or
    /// remembered): for `oppen check` and `oppen preview`. `Err` is a file-level
    /// problem; row problems come with the rows that could be read.
    pub fn read_file(
        &mut self,
        name: &str,
    ) -> Result<std::result::Result<(RecordBatch, Vec<RowProblem>), String>> {
        let path = self.config.path.join(name);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(path.display(), e))?;
        Ok(self.parse(&bytes))
    }

    /// The files waiting in the folder, in processing order.
    fn candidates(&self) -> Result<Vec<Candidate>> {
        self.scan(self.last.as_deref())
    }

    /// Matching files whose names sort after `after`, in name order.
    fn scan(&self, after: Option<&str>) -> Result<Vec<Candidate>> {
        let dir = &self.config.path;
        let entries = std::fs::read_dir(dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Config(format!(
                    "export folder {} does not exist; create it or fix source.files.path",
                    dir.display()
                ))
            } else {
                Error::io(dir.display(), e)
            }
        })?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir.display(), e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() || !self.pattern.matches(&name) || name.starts_with('.') {
                continue;
            }
            if after.is_some_and(|last| name.as_str() <= last) {
                continue;
            }
            found.push(Candidate {
                name,
                size: meta.len(),
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    fn settled(&self, candidate: &Candidate) -> bool {
        self.settle.is_zero()
            || candidate
                .modified
                .elapsed()
                .is_ok_and(|age| age >= self.settle)
    }

    /// Reads one file into events; the file is then behind `self.last`.
    fn process(&mut self, candidate: &Candidate) -> Result<()> {
        let path = self.config.path.join(&candidate.name);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(path.display(), e))?;
        let started = std::time::Instant::now();
        // The file's digest (its identity in the position) is computed beside
        // the parse, which has serial stretches a second core can fill.
        let (sha256, parsed) = std::thread::scope(|scope| {
            let digest = scope.spawn(|| hex::encode(Sha256::digest(&bytes)));
            let parsed = self.parse(&bytes);
            (joined(digest), parsed)
        });
        let position = Position::File {
            name: candidate.name.clone(),
            sha256,
        };
        self.last = Some(candidate.name.clone());
        drop(bytes);
        tracing::debug!(file = %candidate.name, ms = started.elapsed().as_millis() as u64, "parsed export");
        match parsed {
            Ok((batch, problems)) if problems.is_empty() => self.emit(batch, position),
            Ok((batch, problems)) if self.config.mode == Mode::Append && batch.num_rows() > 0 => {
                let reason = describe_problems(
                    &candidate.name,
                    &problems,
                    "The other rows were loaded. Fix these rows and drop them in a new file",
                );
                let moved_to = self.dead_letter(&path, &candidate.name, &reason, true)?;
                self.emit(batch, position);
                self.pending.push_back(SourceEvent::Rejected(Rejection {
                    what: format!("{} ({} rows)", candidate.name, problems.len()),
                    reason,
                    moved_to: Some(moved_to),
                }));
            }
            Ok((_, problems)) => {
                let reason = describe_problems(
                    &candidate.name,
                    &problems,
                    "Nothing from this file was loaded (a full dump with rows missing would \
                     delete them). Fix the export and drop it again under a name that sorts \
                     after this one",
                );
                self.reject(&path, &candidate.name, reason)?;
            }
            Err(message) => {
                let reason = format!(
                    "{}: {message}\nNothing from this file was loaded. Fix the export and drop it \
                     again under a name that sorts after this one.",
                    candidate.name
                );
                self.reject(&path, &candidate.name, reason)?;
            }
        }
        Ok(())
    }

    fn reject(&mut self, path: &Path, name: &str, reason: String) -> Result<()> {
        let moved_to = self.dead_letter(path, name, &reason, false)?;
        self.pending.push_back(SourceEvent::Rejected(Rejection {
            what: name.to_string(),
            reason,
            moved_to: Some(moved_to),
        }));
        Ok(())
    }

    /// Moves (or, with `copy`, copies) a file to the dead-letter folder and writes
    /// `<name>.reason.txt` beside it.
    fn dead_letter(&self, path: &Path, name: &str, reason: &str, copy: bool) -> Result<String> {
        let dir = self.config.dead_letter_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        let target = dir.join(name);
        let moved = if copy {
            std::fs::copy(path, &target).map(|_| ())
        } else {
            // A rename fails across file systems; fall back to copy and remove.
            std::fs::rename(path, &target)
                .or_else(|_| std::fs::copy(path, &target).and_then(|_| std::fs::remove_file(path)))
        };
        moved.map_err(|e| Error::io(target.display(), e))?;
        let reason_path = dir.join(format!("{name}.reason.txt"));
        std::fs::write(&reason_path, format!("{reason}\n"))
            .map_err(|e| Error::io(reason_path.display(), e))?;
        Ok(target.display().to_string())
    }

    /// Decodes, parses and types a file. `Err` is a file-level problem.
    fn parse(
        &mut self,
        bytes: &[u8],
    ) -> std::result::Result<(RecordBatch, Vec<RowProblem>), String> {
        let started = std::time::Instant::now();
        let (text, _decoded) = decode::decode(bytes, self.encoding);
        let decoded_ms = started.elapsed().as_millis() as u64;
        let (raw, mut problems) = match self.config.format {
            Format::Csv => {
                let separator = self
                    .separator
                    .unwrap_or_else(|| formats::detect_separator(&text));
                formats::read_csv(&text, separator)?
            }
            Format::Json => (formats::read_json(&text, &self.selector)?, Vec::new()),
            Format::Jsonl => formats::read_jsonl(&text, &self.selector),
        };
        drop(text);
        tracing::trace!(
            decoded_ms,
            read_ms = started.elapsed().as_millis() as u64,
            "read records"
        );
        for key in &self.config.key {
            if !raw.columns.contains(key) {
                return Err(format!(
                    "key column `{key}` is not in the file (columns: {}); fix source.files.key",
                    raw.columns.join(", ")
                ));
            }
        }
        let (batch, typing_problems) = self.type_columns(raw)?;
        problems.extend(typing_problems);
        problems.sort_by_key(|p| (p.location, p.column));
        Ok((batch, problems))
    }

    /// Converts text columns to their types, checks keys, and leaves out bad rows.
    fn type_columns(
        &mut self,
        raw: RawTable,
    ) -> std::result::Result<(RecordBatch, Vec<RowProblem>), String> {
        let RawTable {
            columns,
            values,
            locations,
            location_unit,
        } = raw;
        let mut problems = Vec::new();
        let mut bad_rows = HashSet::new();
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(columns.len());
        let mut fields = Vec::with_capacity(columns.len());
        // Columns are independent: infer and convert them on every core.
        let plans: Vec<(Option<ColumnType>, ColumnType)> = columns
            .iter()
            .map(|name| {
                let steward = self.hints.column_types.get(name).copied();
                (
                    steward,
                    steward
                        .or_else(|| self.hints.known_types.get(name).copied())
                        .unwrap_or(ColumnType::Text),
                )
            })
            .collect();
        let unknown: Vec<bool> = columns
            .iter()
            .map(|n| {
                !self.hints.column_types.contains_key(n) && !self.hints.known_types.contains_key(n)
            })
            .collect();
        let timezone = self.timezone;
        let type_one = |i: usize| {
            let text = &values[i];
            let (steward, known) = plans[i];
            let ty = if unknown[i] {
                typing::infer(text)
            } else {
                known
            };
            let (array, errors) = typing::convert(text, ty, timezone);
            if errors.is_empty() || steward.is_some() {
                return (ty, array, errors, None);
            }
            // The type inferred from earlier files no longer fits: infer afresh, and
            // let the engine reconcile the published type.
            let inferred = typing::infer(text);
            (
                ty,
                typing::convert(text, inferred, timezone).0,
                Vec::new(),
                Some(inferred),
            )
        };
        let key_indices: Vec<usize> = self
            .config
            .key
            .iter()
            .filter_map(|k| columns.iter().position(|c| c == k))
            .collect();
        let check_keys =
            || duplicate_keys(&columns, &values, &locations, &key_indices, location_unit);
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let (typed, (key_bad_rows, key_problems)) = if threads > 1 && locations.len() > 100_000 {
            // Columns differ in cost (free text against small codes): each
            // thread takes the next column not yet taken, and the key check
            // runs beside them.
            let next = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|scope| {
                let keys = scope.spawn(check_keys);
                let workers: Vec<_> = (0..threads)
                    .map(|_| {
                        let (next, type_one, width) = (&next, &type_one, columns.len());
                        scope.spawn(move || {
                            let mut done = Vec::new();
                            loop {
                                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                if i >= width {
                                    return done;
                                }
                                done.push((i, type_one(i)));
                            }
                        })
                    })
                    .collect();
                let mut typed: Vec<_> = workers.into_iter().flat_map(joined).collect();
                typed.sort_by_key(|(i, _)| *i);
                (
                    typed.into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
                    joined(keys),
                )
            })
        } else {
            ((0..columns.len()).map(type_one).collect(), check_keys())
        };
        bad_rows.extend(key_bad_rows);
        for (i, (ty, array, errors, changed)) in typed.into_iter().enumerate() {
            let name = &columns[i];
            for e in errors {
                bad_rows.insert(e.row);
                problems.push(RowProblem {
                    location: locations[e.row],
                    column: Some(i + 1),
                    message: format!(
                        "column `{name}`: {}, as the rules say it is {ty}",
                        e.message
                    ),
                });
            }
            if let Some(now) = changed {
                tracing::warn!(column = %name, was = %ty, %now, "column type changed between exports");
            }
            if let Some(actual) = ColumnType::from_arrow(array.data_type()) {
                self.hints.known_types.insert(name.clone(), actual);
            }
            fields.push(Field::new(name, array.data_type().clone(), true));
            arrays.push(array);
        }
        problems.extend(key_problems);
        let schema = Arc::new(Schema::new(fields));
        let mut batch = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| e.to_string())?;
        if !bad_rows.is_empty() {
            let keep: arrow::array::BooleanArray = (0..batch.num_rows())
                .map(|r| Some(!bad_rows.contains(&r)))
                .collect();
            batch =
                arrow::compute::filter_record_batch(&batch, &keep).map_err(|e| e.to_string())?;
        }
        if location_unit == "record" {
            for p in &mut problems {
                p.message = format!("record {}: {}", p.location, p.message);
            }
        }
        self.schema = Some(schema);
        Ok((batch, problems))
    }

    fn emit(&mut self, batch: RecordBatch, position: Position) {
        let (kind, op) = match self.config.mode {
            Mode::FullDump => (BatchKind::Snapshot, Op::Read),
            Mode::Append => (BatchKind::Changes, Op::Insert),
        };
        let rows = batch.num_rows();
        let commit_time = Some(chrono::Utc::now());
        if rows == 0 {
            // An empty full dump is still a complete image: it empties the table.
            self.pending.push_back(SourceEvent::Batch(ChangeBatch {
                data: batch,
                ops: Vec::new(),
                kind,
                position,
                commit_time,
                end_of_transaction: true,
            }));
            return;
        }
        let mut offset = 0;
        while offset < rows {
            let len = BATCH_ROWS.min(rows - offset);
            self.pending.push_back(SourceEvent::Batch(ChangeBatch {
                data: batch.slice(offset, len),
                ops: vec![op; len],
                kind,
                position: position.clone(),
                commit_time,
                end_of_transaction: offset + len == rows,
            }));
            offset += len;
        }
    }
}

/// A scoped thread's result; its panic goes on in the caller.
pub(crate) fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Rows whose key is empty or repeats an earlier row's key, with a problem
/// for each (a repeat names the first row with that key). Keys are compared
/// as text, joined by the unit separator when composite.
fn duplicate_keys(
    columns: &[String],
    values: &[arrow::array::StringArray],
    locations: &[u64],
    key_indices: &[usize],
    location_unit: &str,
) -> (Vec<usize>, Vec<RowProblem>) {
    let mut bad_rows = Vec::new();
    let mut problems = Vec::new();
    fn text(array: &arrow::array::StringArray, row: usize) -> &str {
        if array.is_valid(row) {
            array.value(row).trim()
        } else {
            ""
        }
    }
    // Repeats are found by sorting (hash, row) pairs, not by inserting every
    // key into a hash map: a million keys in a map far larger than the caches
    // cost a cache miss each, the sort runs through memory in order. xxh3:
    // keys come from the file, not from an attacker aiming for collisions,
    // and a collision only costs a text comparison.
    let mut keys: Vec<std::borrow::Cow<'_, str>> = Vec::with_capacity(locations.len());
    let mut order: Vec<(u64, usize)> = Vec::with_capacity(locations.len());
    for (row, &location) in locations.iter().enumerate() {
        let mut key = std::borrow::Cow::Borrowed("");
        for (n, &k) in key_indices.iter().enumerate() {
            let value = text(&values[k], row);
            if value.is_empty() {
                bad_rows.push(row);
                problems.push(RowProblem {
                    location,
                    column: Some(k + 1),
                    message: format!("key column `{}` is empty", columns[k]),
                });
            }
            if n == 0 {
                key = value.into();
            } else {
                let whole = key.to_mut();
                whole.push('\u{1f}');
                whole.push_str(value);
            }
        }
        order.push((xxhash_rust::xxh3::xxh3_64(key.as_bytes()), row));
        keys.push(key);
    }
    order.sort_unstable();
    for group in order.chunk_by(|a, b| a.0 == b.0) {
        for (j, &(_, row)) in group.iter().enumerate().skip(1) {
            let first = group[..j]
                .iter()
                .map(|&(_, r)| r)
                .find(|&r| keys[r] == keys[row]);
            if let Some(first) = first {
                bad_rows.push(row);
                problems.push(RowProblem {
                    location: locations[row],
                    column: key_indices.first().map(|k| k + 1),
                    message: format!(
                        "the key is the same as on {location_unit} {}; the key must identify one row",
                        locations[first]
                    ),
                });
            }
        }
    }
    (bad_rows, problems)
}

fn describe_problems(name: &str, problems: &[RowProblem], consequence: &str) -> String {
    let mut text = format!("{name}: {} row(s) could not be read.\n", problems.len());
    for p in problems.iter().take(MAX_PROBLEMS_LISTED) {
        let _ = match p.column {
            Some(c) => writeln!(text, "  {name}:{}:{c}: {}", p.location, p.message),
            None => writeln!(text, "  {name}:{}: {}", p.location, p.message),
        };
    }
    if problems.len() > MAX_PROBLEMS_LISTED {
        let _ = writeln!(
            text,
            "  ... and {} more",
            problems.len() - MAX_PROBLEMS_LISTED
        );
    }
    let _ = write!(text, "{consequence}.");
    text
}

impl Source for FilesSource {
    fn key(&self) -> &[String] {
        &self.config.key
    }

    async fn start(&mut self, resume: Option<Position>) -> Result<()> {
        self.pending.clear();
        self.last = match resume {
            None => None,
            Some(Position::File { name, .. }) => Some(name),
            Some(other) => {
                return Err(Error::Config(format!(
                    "the committed version was made by another kind of source (position {other}); \
                     publish this pipeline to a new store or state location"
                )));
            }
        };
        // Fail early on a missing folder.
        self.candidates().map(|_| ())
    }

    async fn next(&mut self) -> Result<SourceEvent> {
        if let Some(event) = self.pending.pop_front() {
            return Ok(event);
        }
        let candidates = self.candidates()?;
        let Some(candidate) = candidates.into_iter().next() else {
            return Ok(SourceEvent::Idle);
        };
        if !self.settled(&candidate) {
            return Ok(SourceEvent::Idle);
        }
        tracing::debug!(file = %candidate.name, bytes = candidate.size, "reading export");
        // Parsing is CPU work: keep it off the async workers where the runtime allows.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(|| self.process(&candidate))?;
        } else {
            self.process(&candidate)?;
        }
        Ok(self.pending.pop_front().unwrap_or(SourceEvent::Idle))
    }

    async fn ack(&mut self, _position: &Position) -> Result<()> {
        // The committed version records the file; nothing to do at the folder.
        Ok(())
    }

    fn schema(&self) -> Option<SchemaRef> {
        self.schema.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;

    fn check(columns: &[&str], rows: &[&[Option<&str>]], key: &[usize]) -> Vec<(usize, String)> {
        let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        let values: Vec<StringArray> = (0..columns.len())
            .map(|c| rows.iter().map(|r| r[c]).collect())
            .collect();
        // Line numbers as a file would have them: the header is line 1.
        let locations: Vec<u64> = (0..rows.len() as u64).map(|r| r + 2).collect();
        let (mut bad, problems) = duplicate_keys(&columns, &values, &locations, key, "line");
        bad.sort_unstable();
        let mut found: Vec<(usize, String)> = problems
            .into_iter()
            .map(|p| ((p.location - 2) as usize, p.message))
            .collect();
        found.sort();
        let mut rows_found: Vec<usize> = found.iter().map(|(r, _)| *r).collect();
        rows_found.dedup();
        bad.dedup();
        assert_eq!(bad, rows_found, "bad rows and problems disagree");
        found
    }

    /// The problem a repeated key gets, naming the line of the first row with it.
    fn repeat_of(line: usize) -> String {
        format!("the key is the same as on line {line}; the key must identify one row")
    }

    #[test]
    fn repeated_keys_name_the_first_row_with_the_key() {
        let found = check(
            &["id", "name"],
            &[
                &[Some("1"), Some("a")],
                &[Some("2"), Some("b")],
                &[Some(" 1 "), Some("c")],
                &[Some("3"), Some("d")],
                &[Some("1"), Some("e")],
            ],
            &[0],
        );
        assert_eq!(found, vec![(2, repeat_of(2)), (4, repeat_of(2))]);
    }

    #[test]
    fn empty_and_composite_keys() {
        let found = check(
            &["year", "nr"],
            &[
                &[Some("2025"), Some("1")],
                &[Some("2025"), Some("2")],
                &[Some("2024"), Some("1")],
                &[Some("2025"), None],
                &[Some("2025"), Some("2")],
                // Joined with a separator, "20251" + "" is not "2025" + "1".
                &[Some("20251"), Some("")],
            ],
            &[0, 1],
        );
        assert_eq!(
            found,
            vec![
                (3, "key column `nr` is empty".into()),
                (4, repeat_of(3)),
                (5, "key column `nr` is empty".into()),
            ]
        );
    }

    /// A file big enough for the threaded path (typing on every core, the key
    /// check beside it): columns come back in file order with their types, and
    /// bad rows are reported by line and left out.
    #[test]
    fn big_files_type_on_every_core_and_check_keys() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let rows = 150_000;
        let mut text = String::from("id;amount;day;note;code\n");
        for r in 0..rows {
            let id = match r {
                60_000 => "17".to_string(), // repeats row 17
                90_000 => String::new(),    // empty
                _ => r.to_string(),
            };
            let amount = if r == 120_000 {
                "many".to_string()
            } else {
                format!("{r},50")
            };
            text.push_str(&format!(
                "{id};{amount};2025-01-{:02};note {r};C{}\n",
                r % 28 + 1,
                r % 7
            ));
        }
        std::fs::write(dir.path().join("export-1.csv"), text).unwrap_or_else(|e| panic!("{e}"));
        let config: FilesConfig = serde_json::from_value(serde_json::json!({
            "path": dir.path(), "format": "csv", "key": ["id"]
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let mut hints = SourceHints::default();
        hints.column_types.insert(
            "amount".into(),
            ColumnType::Decimal {
                precision: 18,
                scale: 2,
            },
        );
        let mut source = FilesSource::new(config, hints).unwrap_or_else(|e| panic!("{e}"));
        let (batch, problems) = source
            .read_file("export-1.csv")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let columns: Vec<(String, String)> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().to_string()))
            .collect();
        let expected = [
            ("id", "Int64"),
            ("amount", "Decimal128(18, 2)"),
            ("day", "Date32"),
            ("note", "Utf8"),
            ("code", "Utf8"),
        ]
        .map(|(n, t)| (n.to_string(), t.to_string()));
        assert_eq!(columns, expected);
        assert_eq!(batch.num_rows(), rows - 3);
        // The header is line 1, so row r is on line r + 2.
        let found: Vec<(u64, Option<usize>)> =
            problems.iter().map(|p| (p.location, p.column)).collect();
        assert_eq!(
            found,
            [(60_002, Some(1)), (90_002, Some(1)), (120_002, Some(2))]
        );
        assert_eq!(problems[0].message, repeat_of(19));
        assert!(problems[1].message.contains("is empty"), "{problems:?}");
    }

    proptest::proptest! {
        /// The sorted search finds exactly the rows a map of keys seen finds.
        #[test]
        fn finds_what_a_map_finds(ids in proptest::collection::vec(0u8..40, 0..300)) {
            let texts: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            let rows: Vec<Vec<Option<&str>>> = texts.iter().map(|t| vec![Some(t.as_str())]).collect();
            let rows: Vec<&[Option<&str>]> = rows.iter().map(|r| r.as_slice()).collect();
            let found = check(&["id"], &rows, &[0]);
            let mut first_seen: std::collections::HashMap<&str, usize> =
                std::collections::HashMap::new();
            let mut expected = Vec::new();
            for (row, t) in texts.iter().enumerate() {
                match first_seen.get(t.as_str()) {
                    Some(first) => expected.push((row, repeat_of(first + 2))),
                    None => {
                        first_seen.insert(t, row);
                    }
                }
            }
            proptest::prop_assert_eq!(found, expected);
        }
    }
}
