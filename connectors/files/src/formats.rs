//! CSV, JSON and JSON Lines into columns of text, with the source line of every row.

use std::collections::HashMap;

use arrow::array::{BinaryBuilder, StringArray, StringBuilder};
use serde_json::{Map, Value};

/// An export file read as text columns, before typing.
#[derive(Debug)]
pub struct RawTable {
    /// Column names in file order.
    pub columns: Vec<String>,
    /// One text array per column; NULL where a record lacks the field.
    pub values: Vec<StringArray>,
    /// Where each row starts: a line number (CSV, JSON Lines) or a record number (JSON).
    pub locations: Vec<u64>,
    /// What `locations` counts: "line" or "record".
    pub location_unit: &'static str,
}

/// A row that could not be read; the rest of the file can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowProblem {
    /// Line (or record) number, 1-based.
    pub location: u64,
    /// 1-based column, where one is to blame.
    pub column: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

/// The separators tried when none is configured, in order of preference on a tie.
const SEPARATORS: [u8; 4] = [b',', b';', b'\t', b'|'];

/// Picks the separator that occurs most often, outside quotes, in the header line.
pub fn detect_separator(text: &str) -> u8 {
    let mut counts = [0usize; SEPARATORS.len()];
    let mut quoted = false;
    for b in text.bytes() {
        match b {
            b'"' => quoted = !quoted,
            b'\n' | b'\r' if !quoted => break,
            _ if !quoted => {
                if let Some(i) = SEPARATORS.iter().position(|&s| s == b) {
                    counts[i] += 1;
                }
            }
            _ => {}
        }
    }
    let best = (0..SEPARATORS.len())
        .max_by_key(|&i| (counts[i], usize::MAX - i))
        .unwrap_or(0);
    if counts[best] == 0 {
        b','
    } else {
        SEPARATORS[best]
    }
}

/// Reads CSV text (RFC 4180 quoting, embedded separators and newlines, CRLF, LF or
/// CR line ends) with a header row.
///
/// A file-level problem (no header, empty or duplicate column names) is an `Err`;
/// rows with the wrong number of fields are returned as problems and left out.
pub fn read_csv(text: &str, separator: u8) -> Result<(RawTable, Vec<RowProblem>), String> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(separator)
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| format!("cannot read the header row: {e}"))?
        .clone();
    if headers.is_empty() || headers.iter().all(|h| h.trim().is_empty()) {
        return Err("the file has no header row; the first line must name the columns".into());
    }
    let columns = column_names(headers.iter())?;
    let data_start = reader.position().byte() as usize;
    let lines = LineIndex::new(text);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let chunks = if text.len() - data_start >= PARALLEL_MIN_BYTES && threads > 1 {
        split_records(text, data_start, threads)
    } else {
        std::iter::once(data_start..text.len()).collect()
    };
    let parse = |range: &std::ops::Range<usize>| {
        read_records(text, range.clone(), separator, columns.len(), &lines)
    };
    let parts: Vec<Result<Records, String>> = if chunks.len() > 1 {
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunks
                .iter()
                .map(|c| scope.spawn(move || parse(c)))
                .collect();
            handles.into_iter().map(crate::joined).collect()
        })
    } else {
        chunks.iter().map(parse).collect()
    };
    let parts = parts.into_iter().collect::<Result<Vec<_>, _>>();
    // Chunks are cut where the quote count says a record starts. A file with a
    // stray quote can fool that; any problem at all is settled by reading the
    // file again in one piece, whose findings are the ones reported.
    let parts = match parts {
        Ok(parts) if parts.len() == 1 || parts.iter().all(|p| p.problems.is_empty()) => parts,
        _ if chunks.len() > 1 => vec![read_records(
            text,
            data_start..text.len(),
            separator,
            columns.len(),
            &lines,
        )?],
        Err(e) => return Err(e),
        Ok(parts) => parts,
    };
    let mut values = Vec::with_capacity(columns.len());
    for c in 0..columns.len() {
        let pieces: Vec<&dyn arrow::array::Array> = parts
            .iter()
            .map(|p| &p.values[c] as &dyn arrow::array::Array)
            .collect();
        let joined = if pieces.len() == 1 {
            parts[0].values[c].clone()
        } else {
            let array = arrow::compute::concat(&pieces).map_err(|e| e.to_string())?;
            array
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or("text column expected")?
        };
        values.push(joined);
    }
    let mut locations = Vec::new();
    let mut problems = Vec::new();
    for p in parts {
        locations.extend(p.locations);
        problems.extend(p.problems);
    }
    Ok((
        RawTable {
            columns,
            values,
            locations,
            location_unit: "line",
        },
        problems,
    ))
}

/// Files at least this big are read on several threads.
const PARALLEL_MIN_BYTES: usize = 16 << 20;

/// Cuts `text[start..]` into about `parts` ranges that each begin at a record:
/// at a line end outside quotes (an even number of `"` before it; RFC 4180
/// doubles quotes inside quoted fields, which keeps the count even).
fn split_records(text: &str, start: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let b = text.as_bytes();
    let mut cuts = vec![start];
    let mut quotes_before = 0usize;
    let mut counted_to = start;
    for k in 1..parts {
        let target = start + (b.len() - start) * k / parts;
        // Quotes are counted up to `counted_to`, which is never before the last cut.
        if target <= counted_to {
            continue;
        }
        quotes_before += memchr::memchr_iter(b'"', &b[counted_to..target]).count();
        counted_to = target;
        let mut quoted = quotes_before % 2 == 1;
        let mut i = target;
        while i < b.len() {
            match b[i] {
                b'"' => quoted = !quoted,
                b'\n' | b'\r' if !quoted => {
                    let mut next = i + 1;
                    if b[i] == b'\r' && b.get(next) == Some(&b'\n') {
                        next += 1;
                    }
                    quotes_before += memchr::memchr_iter(b'"', &b[counted_to..next]).count();
                    counted_to = next;
                    if next < b.len() {
                        cuts.push(next);
                    }
                    break;
                }
                _ => {}
            }
            i += 1;
        }
    }
    cuts.push(b.len());
    cuts.dedup();
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

/// Records of one range of a CSV text.
struct Records {
    values: Vec<StringArray>,
    locations: Vec<u64>,
    problems: Vec<RowProblem>,
}

/// Reads the records in `text[range]` (no header) into text columns.
fn read_records(
    text: &str,
    range: std::ops::Range<usize>,
    separator: u8,
    width: usize,
    lines: &LineIndex,
) -> Result<Records, String> {
    let offset = range.start;
    let slice = &text.as_bytes()[range];
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(separator)
        .has_headers(false)
        .flexible(true)
        .from_reader(slice);
    // Rough sizing from the length avoids most reallocation on big dumps.
    let estimated_rows = slice.len() / (width * 12).max(1);
    // Fields are gathered as bytes and checked as UTF-8 once per column: the text
    // is valid UTF-8 and split only at ASCII bytes, so per-field checks are waste.
    let mut builders: Vec<BinaryBuilder> = (0..width)
        .map(|_| BinaryBuilder::with_capacity(estimated_rows, slice.len() / width.max(1)))
        .collect();
    let mut locations = Vec::with_capacity(estimated_rows);
    let mut problems = Vec::new();
    let mut record = csv::ByteRecord::new();
    // The reader leaves a record's position on the line end before it.
    let line_of = |p: &csv::Position| {
        let mut byte = p.byte() as usize;
        while byte < slice.len() && (slice[byte] == b'\n' || slice[byte] == b'\r') {
            byte += 1;
        }
        lines.line((offset + byte) as u64)
    };
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map_or(0, line_of);
                if record.len() == 1 && record.get(0).is_some_and(|f| f.trim_ascii().is_empty()) {
                    continue; // a blank line
                }
                if record.len() != width {
                    problems.push(RowProblem {
                        location: line,
                        column: Some(record.len().min(width) + 1),
                        message: format!(
                            "expected {width} fields, found {}; check for an unquoted separator \
                             or a missing field",
                            record.len()
                        ),
                    });
                    continue;
                }
                for (builder, field) in builders.iter_mut().zip(record.iter()) {
                    builder.append_value(field);
                }
                locations.push(line);
            }
            Err(e) => {
                let line = e.position().map_or(0, line_of);
                return Err(format!("line {line}: {e}"));
            }
        }
    }
    let values = builders
        .iter_mut()
        .map(|b| {
            StringArray::try_from_binary(b.finish()).map_err(|e| format!("text is not UTF-8: {e}"))
        })
        .collect::<Result<_, _>>()?;
    Ok(Records {
        values,
        locations,
        problems,
    })
}

/// Line numbers from byte offsets, with `\n`, `\r\n` and a lone `\r` all
/// ending a line (the CSV reader itself counts only `\n`).
struct LineIndex {
    starts: Vec<u64>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let bytes = text.as_bytes();
        let mut starts = vec![0u64];
        for i in memchr::memchr2_iter(b'\n', b'\r', bytes) {
            let crlf = bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n');
            if !crlf {
                starts.push(i as u64 + 1);
            }
        }
        Self { starts }
    }

    /// The 1-based line of a byte offset; a record that starts right after a
    /// line end counts on the next line.
    fn line(&self, byte: u64) -> u64 {
        self.starts.partition_point(|&s| s <= byte) as u64
    }
}

fn column_names<'a>(names: impl Iterator<Item = &'a str>) -> Result<Vec<String>, String> {
    let mut seen = HashMap::new();
    let mut columns = Vec::new();
    for (i, name) in names.enumerate() {
        let name = name.trim().to_string();
        if name.is_empty() {
            return Err(format!("column {} has no name in the header row", i + 1));
        }
        if let Some(first) = seen.insert(name.clone(), i) {
            return Err(format!(
                "column `{name}` appears twice in the header row (columns {} and {})",
                first + 1,
                i + 1
            ));
        }
        columns.push(name);
    }
    Ok(columns)
}

/// A `records:` selector such as `meals[].courses[]`: each segment names a field,
/// `[]` explodes an array. Every row carries the scalar fields of the objects above
/// it, prefixed with their segment name (`meals.date`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSelector {
    segments: Vec<(String, bool)>,
}

impl RecordSelector {
    /// Parses a selector; `None` or an empty text means the document itself (an
    /// array of records, or one record).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        for part in text.split('.').filter(|p| !p.is_empty()) {
            let (name, explode) = match part.strip_suffix("[]") {
                Some(name) => (name, true),
                None => (part, false),
            };
            if name.is_empty() || name.contains(['[', ']']) {
                return Err(format!(
                    "`{text}`: each segment is a field name, optionally followed by [] to \
                     take every element of an array, e.g. meals[].courses[]"
                ));
            }
            segments.push((name.to_string(), explode));
        }
        Ok(Self { segments })
    }
}

/// Collects rows into columns, in order of first appearance.
#[derive(Default)]
struct Rows {
    columns: Vec<String>,
    index: HashMap<String, usize>,
    cells: Vec<Vec<(usize, Option<String>)>>,
    locations: Vec<u64>,
}

impl Rows {
    fn push(&mut self, fields: Vec<(String, Option<String>)>, location: u64) {
        let row = fields
            .into_iter()
            .map(|(name, value)| {
                let next = self.columns.len();
                let i = *self.index.entry(name.clone()).or_insert(next);
                if i == next {
                    self.columns.push(name);
                }
                (i, value)
            })
            .collect();
        self.cells.push(row);
        self.locations.push(location);
    }

    fn finish(self, unit: &'static str) -> RawTable {
        let width = self.columns.len();
        let mut builders: Vec<StringBuilder> = (0..width).map(|_| StringBuilder::new()).collect();
        let mut row_values: Vec<Option<String>> = vec![None; width];
        for row in self.cells {
            row_values.iter_mut().for_each(|v| *v = None);
            for (i, value) in row {
                row_values[i] = value;
            }
            for (builder, value) in builders.iter_mut().zip(&row_values) {
                builder.append_option(value.as_deref());
            }
        }
        RawTable {
            columns: self.columns,
            values: builders.iter_mut().map(StringBuilder::finish).collect(),
            locations: self.locations,
            location_unit: unit,
        }
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(_) | Value::Object(_) => Some(value.to_string()),
    }
}

/// Flattens an object's fields: nested objects with `.`, arrays as JSON text.
fn flatten(
    prefix: &str,
    object: &Map<String, Value>,
    skip: Option<&str>,
    out: &mut Vec<(String, Option<String>)>,
) {
    for (name, value) in object {
        if Some(name.as_str()) == skip {
            continue;
        }
        let full = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            Value::Object(inner) => flatten(&full, inner, None, out),
            other => out.push((full, scalar_text(other))),
        }
    }
}

/// Walks `segments` down from `value`. `here` is the segment that led to `value`
/// (None at the document root): fields of the objects passed on the way are
/// carried to every row below, named `<segment>.<field>`. The root's own fields are
/// not carried, as a document header rarely belongs on every row.
fn select(
    value: &Value,
    here: Option<&str>,
    segments: &[(String, bool)],
    carried: &[(String, Option<String>)],
    rows: &mut Rows,
    location: u64,
) -> Result<(), String> {
    let Some(((name, explode), rest)) = segments.split_first() else {
        let Value::Object(object) = value else {
            return Err(format!(
                "a record must be a JSON object, found {}",
                kind(value)
            ));
        };
        let mut fields = Vec::with_capacity(object.len() + carried.len());
        flatten("", object, None, &mut fields);
        fields.extend(carried.iter().cloned());
        rows.push(fields, location);
        return Ok(());
    };
    let Value::Object(object) = value else {
        return Err(format!(
            "expected an object with field `{name}`, found {}",
            kind(value)
        ));
    };
    let mut carried = carried.to_vec();
    if let Some(here) = here {
        flatten(here, object, Some(name), &mut carried);
    }
    match (explode, object.get(name).unwrap_or(&Value::Null)) {
        (true, Value::Array(items)) => {
            for item in items {
                select(item, Some(name), rest, &carried, rows, location)?;
            }
            Ok(())
        }
        (_, Value::Null) => Ok(()),
        (true, other) => Err(format!(
            "`{name}` should be an array, found {}",
            kind(other)
        )),
        (false, child) => select(child, Some(name), rest, &carried, rows, location),
    }
}

/// Reads a JSON document: with a selector, the records it selects; without one, the
/// document's array of objects (or the single object).
pub fn read_json(text: &str, selector: &RecordSelector) -> Result<RawTable, String> {
    let document: Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "line {}, column {}: invalid JSON: {e}",
            e.line(),
            e.column()
        )
    })?;
    let mut rows = Rows::default();
    if selector.segments.is_empty() {
        match &document {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    select(item, None, &[], &[], &mut rows, i as u64 + 1)
                        .map_err(|e| format!("record {}: {e}", i + 1))?;
                }
            }
            other => select(other, None, &[], &[], &mut rows, 1)?,
        }
    } else {
        select(&document, None, &selector.segments, &[], &mut rows, 1)?;
        // Number the selected records, so problems can point at one.
        rows.locations
            .iter_mut()
            .enumerate()
            .for_each(|(i, l)| *l = i as u64 + 1);
    }
    Ok(rows.finish("record"))
}

/// Reads JSON Lines: one JSON value per line, each giving records through the selector.
/// A line that is not valid JSON is a problem for that line; the others are read.
pub fn read_jsonl(text: &str, selector: &RecordSelector) -> (RawTable, Vec<RowProblem>) {
    let mut rows = Rows::default();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let result = serde_json::from_str::<Value>(line)
            .map_err(|e| (Some(e.column()), format!("invalid JSON: {e}")))
            .and_then(|v| {
                select(&v, None, &selector.segments, &[], &mut rows, number).map_err(|e| (None, e))
            });
        if let Err((column, message)) = result {
            problems.push(RowProblem {
                location: number,
                column,
                message,
            });
        }
    }
    (rows.finish("line"), problems)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Array;

    fn read(text: &str) -> (RawTable, Vec<RowProblem>) {
        read_csv(text, detect_separator(text)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn line_numbers_with_every_line_end() {
        for end in ["\n", "\r\n", "\r"] {
            let text = ["a;b", "1;2", "3", "\"x\ny\";4", "5"].join(end);
            let (table, problems) = read(&text);
            assert_eq!(table.columns, vec!["a", "b"]);
            assert_eq!(table.locations, vec![2, 4], "{end:?}");
            let lines: Vec<u64> = problems.iter().map(|p| p.location).collect();
            // The quoted field holds a newline, so the last record starts on line 6
            // (with CR or LF ends alike).
            assert_eq!(lines, vec![3, 6], "{end:?}");
        }
    }

    #[test]
    fn split_points_respect_quotes() {
        let mut text = String::from("a,b\n");
        for i in 0..2000 {
            text.push_str(&format!("{i},\"line one\nline \"\"two\"\"\r\nthree\"\r\n"));
        }
        let start = 4;
        for parts in 2..6 {
            let ranges = split_records(&text, start, parts);
            assert_eq!(ranges.first().map(|r| r.start), Some(start));
            assert_eq!(ranges.last().map(|r| r.end), Some(text.len()));
            for r in &ranges {
                // Every range starts at a record: a number, not the inside of a quoted field.
                assert!(
                    text.as_bytes()[r.start].is_ascii_digit(),
                    "{parts}: {:?}",
                    &text[r.start..r.start + 10]
                );
            }
        }
        let lines = LineIndex::new(&text);
        let whole = read_records(&text, start..text.len(), b',', 2, &lines)
            .unwrap_or_else(|e| panic!("{e}"));
        let pieces: Vec<Records> = split_records(&text, start, 3)
            .into_iter()
            .map(|r| read_records(&text, r, b',', 2, &lines).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let locations: Vec<u64> = pieces.iter().flat_map(|p| p.locations.clone()).collect();
        assert_eq!(locations, whole.locations);
        assert_eq!(whole.locations[1], 5);
    }

    #[test]
    fn big_files_read_in_parallel_read_the_same() {
        let mut text = String::from("id;text;n\r\n");
        let mut i = 0;
        while text.len() < PARALLEL_MIN_BYTES + 1024 {
            text.push_str(&format!(
                "{i};\"a; \"\"quoted\"\"\r\nvalue {i}\";{}\r\n",
                i * 7
            ));
            i += 1;
        }
        let (table, problems) = read_csv(&text, b';').unwrap_or_else(|e| panic!("{e}"));
        assert!(problems.is_empty());
        assert_eq!(table.values[0].len(), i);
        let lines = LineIndex::new(&text);
        let whole =
            read_records(&text, 11..text.len(), b';', 3, &lines).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(table.locations, whole.locations);
        for c in 0..3 {
            assert_eq!(table.values[c], whole.values[c]);
        }
        // A row gone wrong is reported as by a reading in one piece.
        let broken = text.replacen("\r\n5000;", "\r\n5000\r\n", 1);
        let (_, problems) = read_csv(&broken, b';').unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn separators_and_quotes() {
        assert_eq!(detect_separator("a,b;c;d\n"), b';');
        assert_eq!(detect_separator("\"a;b\",c\n"), b',');
        assert_eq!(detect_separator("a\tb\n"), b'\t');
        assert_eq!(detect_separator("single\n"), b',');
        let (table, problems) = read("id,text\n1,\"semi; colon, comma\"\n");
        assert!(problems.is_empty());
        assert_eq!(table.values[1].value(0), "semi; colon, comma");
    }

    #[test]
    fn header_problems_are_file_level() {
        assert!(
            read_csv("a,a\n1,2\n", b',')
                .unwrap_err()
                .contains("appears twice")
        );
        assert!(
            read_csv("a,,b\n1,2,3\n", b',')
                .unwrap_err()
                .contains("column 2 has no name")
        );
    }

    #[test]
    fn json_records_explode_and_carry_parents() {
        let text = r#"{"meals":[{"date":"2025-03-03","distributorId":"sk-01","courses":[{"id":"c1","name":"Soppa","allergens":[{"name":"gluten"}]},{"id":"c2","name":"Sallad"}]},{"date":"2025-03-04","courses":[]}]}"#;
        let table = read_json(
            text,
            &RecordSelector::parse("meals[].courses[]").unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            table.columns,
            vec![
                "id",
                "name",
                "allergens",
                "meals.date",
                "meals.distributorId"
            ]
        );
        assert_eq!(table.values[0].len(), 2);
        assert_eq!(table.values[3].value(1), "2025-03-03");
        assert_eq!(table.values[2].value(0), r#"[{"name":"gluten"}]"#);
        assert!(table.values[2].is_null(1));
        assert!(
            read_json(
                "{\"meals\": 3}",
                &RecordSelector::parse("meals[]").unwrap_or_else(|e| panic!("{e}"))
            )
            .unwrap_err()
            .contains("should be an array")
        );
        assert!(RecordSelector::parse("meals[x]").is_err());
    }

    #[test]
    fn jsonl_bad_lines_are_problems() {
        let (table, problems) = read_jsonl(
            "{\"id\":1}\nnot json\n{\"id\":2,\"x\":{\"y\":true}}\n",
            &RecordSelector::parse("").unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(table.columns, vec!["id", "x.y"]);
        assert_eq!(table.locations, vec![1, 3]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].location, 2);
    }

    proptest::proptest! {
        /// Any bytes at all: every reader returns rows or an error, never panics.
        #[test]
        fn readers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let (text, _) = crate::decode::decode(&bytes, None);
            let _ = read_csv(&text, detect_separator(&text));
            let _ = read_csv(&text, b';');
            let selector = RecordSelector::parse("a[].b[]").unwrap_or_else(|e| panic!("{e}"));
            let _ = read_json(&text, &selector);
            let _ = read_jsonl(&text, &selector);
            let _ = split_records(&text, 0, 3);
        }

        /// CSV-shaped text with quotes and line ends in random places.
        #[test]
        fn csv_like_text_never_panics(text in "[a-c0-9;,\"\r\n ]{0,300}") {
            if let Ok((table, _)) = read_csv(&text, b';') {
                for values in &table.values {
                    proptest::prop_assert_eq!(values.len(), table.locations.len());
                }
            }
        }
    }
}
