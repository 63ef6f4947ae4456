//! Classification: every source column gets exactly one action, rows are
//! suppressed by the steward's row rules, each row is keyed by `_key` (an
//! HMAC-SHA-256 of its source key), and the egress guard blocks any identity
//! number left in a published column. Works on whole Arrow arrays.
//!
//! Nothing here knows about storage or sources: input is a [`ChangeBatch`],
//! output a [`Classified`] batch that is safe to leave the connector.

pub mod detect;
mod keys;
mod transform;

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
pub use keys::{KEY_BYTES, KEY_COLUMN, Keyer, PseudonymKey};
use oppen_connector_api::{ChangeBatch, Op};

use crate::config::rules::{Detected, RowRule};
use crate::config::{
    Action, Diagnostic, Diagnostics, Pipeline, Place, Problem, Severity, Unclassified,
};

/// Errors while classifying a batch.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// A published value looks like a personal identity number. The version is
    /// blocked: nothing is published until a steward acts.
    #[error(
        "egress guard: published column `{column}` holds a {kind} (row {row} of the batch read at {position}); \
         nothing was published. Classify the column with redact or drop, suppress such rows, or, if \
         identity numbers may be published here, add `allow: personal_identity_number` with a reason"
    )]
    Guard {
        column: String,
        kind: &'static str,
        row: usize,
        position: String,
    },
    /// An Arrow kernel failed (a bug or an unsupported type).
    #[error("classifying column `{column}`: {source}")]
    Arrow {
        column: String,
        #[source]
        source: arrow::error::ArrowError,
    },
}

/// What the classifier reports when the source's schema changed: the
/// source's column types, the columns no rule names, and the key to describe
/// when the source found it itself.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SourceInfo {
    /// The source's column types.
    pub types: std::collections::BTreeMap<String, oppen_connector_api::ColumnType>,
    /// Source columns no rule classifies (dropped).
    pub unclassified: Vec<String>,
    /// The published primary key, when the source found its key itself (a
    /// table's primary key, a Debezium record key).
    pub primary_key: Option<Vec<String>>,
}

/// Batches smaller than this are classified on one thread.
const PARALLEL_MIN_ROWS: usize = 16 * 1024;

/// How one published column is made.
#[derive(Debug, Clone)]
struct ColumnPlan {
    source_index: usize,
    source_name: String,
    action: Action,
    guarded: bool,
}

#[derive(Debug, Clone)]
enum RowTest {
    Detected(Detected),
    In(HashSet<String>),
}

#[derive(Debug, Clone)]
struct RowPlan {
    source_index: usize,
    test: RowTest,
}

/// A classified batch: safe to leave the connector.
#[derive(Debug, Clone)]
pub struct Classified {
    /// `_key` first, then the published columns. Rows that are deletes (at the
    /// source, or suppressed) hold only `_key`; every other value is NULL.
    pub data: RecordBatch,
    /// One operation per row; suppressed rows are deletes.
    pub ops: Vec<Op>,
    /// For each row, the index of the row rule that suppressed it.
    pub suppressed_by: Vec<Option<u16>>,
    /// Values `redact` changed.
    pub values_redacted: u64,
}

impl Classified {
    /// The pieces of one batch as one (see [`Classifier::classify_pieces`],
    /// which gives at least one).
    pub fn join(mut pieces: Vec<Classified>) -> Result<Self, ClassifyError> {
        if pieces.len() == 1
            && let Some(whole) = pieces.pop()
        {
            return Ok(whole);
        }
        let schema =
            pieces
                .first()
                .map(|p| p.data.schema())
                .ok_or_else(|| ClassifyError::Arrow {
                    column: "(batch)".into(),
                    source: arrow::error::ArrowError::InvalidArgumentError(
                        "no pieces to join".into(),
                    ),
                })?;
        let data = arrow::compute::concat_batches(&schema, pieces.iter().map(|p| &p.data))
            .map_err(|source| ClassifyError::Arrow {
                column: "(batch)".into(),
                source,
            })?;
        Ok(Classified {
            data,
            ops: pieces.iter().flat_map(|p| p.ops.iter().copied()).collect(),
            suppressed_by: pieces
                .iter()
                .flat_map(|p| p.suppressed_by.iter().copied())
                .collect(),
            values_redacted: pieces.iter().map(|p| p.values_redacted).sum(),
        })
    }

    /// Rows suppressed by each row rule, in rule order.
    pub fn suppressed_counts(&self, rules: usize) -> Vec<u64> {
        let mut counts = vec![0u64; rules];
        for i in self.suppressed_by.iter().flatten() {
            counts[usize::from(*i)] += 1;
        }
        counts
    }
}

/// Rules compiled against one source schema.
#[derive(Debug)]
pub struct Classifier {
    source_schema: SchemaRef,
    output_schema: SchemaRef,
    columns: Vec<ColumnPlan>,
    key_indices: Vec<usize>,
    rows: Vec<RowPlan>,
    keyer: Keyer,
    /// Source columns no rule names (dropped, with a warning).
    pub unclassified: Vec<String>,
}

impl Classifier {
    /// Compiles the pipeline's rules for `source_schema`. Reports every problem:
    /// rules for absent columns, actions that do not fit a column's type,
    /// unclassified columns under `halt`.
    pub fn compile(
        pipeline: &Pipeline,
        source_schema: SchemaRef,
        key: &PseudonymKey,
    ) -> Result<Self, Diagnostics> {
        Self::compile_keyed(
            pipeline,
            source_schema,
            key,
            crate::config::source_key(pipeline),
            true,
        )
    }

    /// [`Classifier::compile`] with the key columns the source reports (a
    /// PostgreSQL table's primary key when the pipeline names none).
    ///
    /// With `strict` off (a streaming source whose table may lose a column while
    /// it runs), a column rule for a column the source no longer has is a
    /// warning, not an error: the column vanishes from the dataset. Row rules on
    /// absent columns stay errors, since rows they should hide could not be found.
    pub fn compile_keyed(
        pipeline: &Pipeline,
        source_schema: SchemaRef,
        key: &PseudonymKey,
        key_columns: &[String],
        strict: bool,
    ) -> Result<Self, Diagnostics> {
        let names: Vec<String> = source_schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut problems = crate::config::check_against_columns(pipeline, &names);
        if !strict {
            for d in &mut problems.0 {
                if d.problem == Problem::RuledColumnMissing {
                    d.severity = Severity::Warning;
                }
            }
            for d in problems.take_warnings() {
                tracing::warn!(dataset = pipeline.id(), problem = %d.message, "a ruled column is gone from the source; it is no longer published");
            }
        }
        let rules_file = &pipeline.rules_file;
        let mut columns = Vec::new();
        let mut fields = vec![Field::new(
            KEY_COLUMN,
            DataType::FixedSizeBinary(KEY_BYTES as i32),
            false,
        )];
        let mut unclassified = Vec::new();
        for (index, field) in source_schema.fields().iter().enumerate() {
            let Some((rule_name, rule)) = pipeline
                .rules
                .columns
                .0
                .iter()
                .find(|(n, _)| &n.value == field.name())
            else {
                if pipeline.rules.unclassified == Unclassified::Drop {
                    unclassified.push(field.name().clone());
                }
                continue;
            };
            let r = &rule.value;
            if r.action == Action::Drop {
                continue;
            }
            let output_type = match transform::output_type(&r.action, field.data_type()) {
                Ok(t) => t,
                Err(message) => {
                    problems.push(Diagnostic::new(
                        Place::of(rules_file, rule),
                        format!("column `{}`: {message}", rule_name.value),
                    ));
                    continue;
                }
            };
            let output_name = r.rename.clone().unwrap_or_else(|| field.name().clone());
            // Hash tokens are hex and cannot hold an identity number; allowed columns
            // are the steward's explicit decision.
            let guarded = !r.allow_identity_numbers && r.action != Action::Hash;
            fields.push(Field::new(output_name, output_type, true));
            columns.push(ColumnPlan {
                source_index: index,
                source_name: field.name().clone(),
                action: r.action.clone(),
                guarded,
            });
        }
        let key_indices: Vec<usize> = key_columns
            .iter()
            .filter_map(|k| names.iter().position(|n| n == k))
            .collect();
        let mut rows = Vec::new();
        for rule in &pipeline.rules.rows {
            let RowRule::Suppress(s) = &rule.value;
            let Some(source_index) = names.iter().position(|n| n == &s.column) else {
                continue;
            };
            let test = match (&s.is, &s.in_, &s.equals) {
                (Some(d), _, _) => RowTest::Detected(*d),
                (None, Some(list), _) => RowTest::In(list.0.iter().cloned().collect()),
                (None, None, Some(v)) => RowTest::In(HashSet::from([v.0.clone()])),
                (None, None, None) => continue, // reported by validation
            };
            rows.push(RowPlan { source_index, test });
        }
        problems.into_result(())?;
        Ok(Self {
            source_schema,
            output_schema: Arc::new(Schema::new(fields)),
            columns,
            key_indices,
            rows,
            keyer: Keyer::new(key),
            unclassified,
        })
    }

    /// The schema this classifier was compiled for.
    pub fn source_schema(&self) -> &SchemaRef {
        &self.source_schema
    }

    /// `_key` and the published columns.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// The source column each published column comes from, with its action.
    pub fn column_actions(&self) -> impl Iterator<Item = (&str, &str, &Action)> {
        self.columns
            .iter()
            .zip(self.output_schema.fields().iter().skip(1))
            .map(|(c, f)| (c.source_name.as_str(), f.name().as_str(), &c.action))
    }

    /// Classifies one batch (which must have this classifier's source schema).
    /// Large batches are split over the machine's cores: rows are independent.
    pub fn classify(&self, batch: &ChangeBatch) -> Result<Classified, ClassifyError> {
        Classified::join(self.classify_pieces(batch)?)
    }

    /// [`Classifier::classify`] without joining the pieces a large batch was
    /// split into: a caller that stages them one after the other saves copying
    /// every classified row once more. At least one piece, in row order.
    pub fn classify_pieces(&self, batch: &ChangeBatch) -> Result<Vec<Classified>, ClassifyError> {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let rows = batch.num_rows();
        if threads < 2 || rows < PARALLEL_MIN_ROWS {
            return Ok(vec![self.classify_part(batch)?]);
        }
        let step = rows.div_ceil(threads);
        let parts: Vec<ChangeBatch> = (0..rows)
            .step_by(step)
            .map(|offset| {
                let len = step.min(rows - offset);
                ChangeBatch {
                    data: batch.data.slice(offset, len),
                    ops: batch.ops[offset..offset + len].to_vec(),
                    kind: batch.kind,
                    position: batch.position.clone(),
                    commit_time: batch.commit_time,
                    end_of_transaction: batch.end_of_transaction,
                }
            })
            .collect();
        let results: Vec<Result<Classified, ClassifyError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .iter()
                .map(|part| scope.spawn(|| self.classify_part(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.map_err(|e| match e {
                    // Rows are numbered within the whole batch.
                    ClassifyError::Guard {
                        column,
                        kind,
                        row,
                        position,
                    } => ClassifyError::Guard {
                        column,
                        kind,
                        row: row + i * step,
                        position,
                    },
                    other => other,
                })
            })
            .collect()
    }

    fn classify_part(&self, batch: &ChangeBatch) -> Result<Classified, ClassifyError> {
        let data = &batch.data;
        let n = data.num_rows();
        let (suppressed_by, removed) = self.suppression(data, &batch.ops)?;
        let key =
            self.keyer
                .keys(data, &self.key_indices)
                .map_err(|source| ClassifyError::Arrow {
                    column: KEY_COLUMN.into(),
                    source,
                })?;
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.columns.len() + 1);
        arrays.push(Arc::new(key));
        let mut values_redacted = 0;
        for plan in &self.columns {
            let input = data.column(plan.source_index);
            let arrow_err = |source| ClassifyError::Arrow {
                column: plan.source_name.clone(),
                source,
            };
            let (mut out, redacted) =
                transform::apply(&plan.action, input, &self.keyer).map_err(arrow_err)?;
            values_redacted += redacted;
            if let Some(removed) = &removed {
                out = arrow::compute::nullif(&out, removed).map_err(arrow_err)?;
            }
            arrays.push(out);
        }
        let ops: Vec<Op> = batch
            .ops
            .iter()
            .zip(&suppressed_by)
            .map(|(op, s)| if s.is_some() { Op::Delete } else { *op })
            .collect();
        let out = RecordBatch::try_new(self.output_schema.clone(), arrays).map_err(|source| {
            ClassifyError::Arrow {
                column: "(batch)".into(),
                source,
            }
        })?;
        self.guard(&out, &batch.position.to_string())?;
        debug_assert_eq!(out.num_rows(), n);
        Ok(Classified {
            data: out,
            ops,
            suppressed_by,
            values_redacted,
        })
    }

    /// Which rows each row rule suppresses, and the mask of rows whose values must
    /// not leave (suppressed rows and source deletes).
    fn suppression(
        &self,
        data: &RecordBatch,
        ops: &[Op],
    ) -> Result<(Vec<Option<u16>>, Option<BooleanArray>), ClassifyError> {
        let n = data.num_rows();
        let mut by: Vec<Option<u16>> = vec![None; n];
        for (rule_index, plan) in self.rows.iter().enumerate() {
            let column = data.column(plan.source_index);
            let text = cast(column, &DataType::Utf8).map_err(|source| ClassifyError::Arrow {
                column: self.source_schema.field(plan.source_index).name().clone(),
                source,
            })?;
            let text = text.as_any().downcast_ref::<StringArray>().ok_or_else(|| {
                ClassifyError::Arrow {
                    column: self.source_schema.field(plan.source_index).name().clone(),
                    source: arrow::error::ArrowError::CastError("not text".into()),
                }
            })?;
            for (row, value) in text.iter().enumerate() {
                let Some(value) = value else { continue };
                if by[row].is_some() {
                    continue;
                }
                let hit = match &plan.test {
                    RowTest::In(set) => set.contains(value.trim()),
                    RowTest::Detected(Detected::PersonalIdentityNumber) => {
                        detect::is_personal_identity_number(value)
                    }
                    RowTest::Detected(Detected::Personnummer) => {
                        detect::identity_number(value) == Some(detect::IdKind::Personnummer)
                    }
                    RowTest::Detected(Detected::Samordningsnummer) => {
                        detect::identity_number(value) == Some(detect::IdKind::Samordningsnummer)
                    }
                    RowTest::Detected(Detected::EmailAddress) => {
                        let mut email = false;
                        detect::scan(value, |f, r| {
                            email |= f == detect::Found::Email && r.len() == value.trim().len()
                        });
                        email
                    }
                };
                if hit {
                    by[row] = Some(rule_index as u16);
                }
            }
        }
        let any = by.iter().any(Option::is_some) || ops.contains(&Op::Delete);
        let removed = any.then(|| {
            by.iter()
                .zip(ops)
                .map(|(s, op)| Some(s.is_some() || *op == Op::Delete))
                .collect::<BooleanArray>()
        });
        Ok((by, removed))
    }

    /// The egress guard: no published value may look like a personal identity
    /// number unless its column allows it.
    fn guard(&self, out: &RecordBatch, position: &str) -> Result<(), ClassifyError> {
        for (plan, (column, field)) in self
            .columns
            .iter()
            .zip(out.columns().iter().zip(out.schema().fields()).skip(1))
        {
            if !plan.guarded {
                continue;
            }
            let hit = match column.data_type() {
                DataType::Utf8 => column.as_any().downcast_ref::<StringArray>().and_then(|a| {
                    a.iter()
                        .position(|v| v.is_some_and(detect::contains_personal_identity_number))
                }),
                DataType::Int64 => column
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .and_then(|a| {
                        a.iter().position(|v| {
                            v.is_some_and(|v| {
                                (1_000_000_000..1_000_000_000_000).contains(&v)
                                    && detect::is_personal_identity_number(&v.to_string())
                            })
                        })
                    }),
                _ => None,
            };
            if let Some(row) = hit {
                return Err(ClassifyError::Guard {
                    column: field.name().clone(),
                    kind: "personal identity number",
                    row: row + 1,
                    position: position.to_string(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use oppen_connector_api::{BatchKind, ChangeBatch, Op, Position};

    use super::{Classified, Classifier, PseudonymKey};

    /// A batch split over the cores comes back in pieces, in row order, that
    /// together are exactly what the joined classification gives: rows, ops,
    /// suppressions and counts.
    #[test]
    fn pieces_of_a_large_batch_join_to_the_whole() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let rules = "columns:\n  id: keep\n  namn: redact\n  belopp: keep\nrows:\n  \
                     - suppress: { column: belopp, in: [\"13\"], reason: test }\n\
                     unclassified: drop\n";
        let pipeline = format!(
            "dataset:\n  id: t\n  title: T\n  description: T\n  publisher: {{ name: T, org_nr: \"212000-0000\" }}\n  \
             contact: t@exempel.se\n  license: CC0-1.0\n  access: open\nsource:\n  files: {{ path: {}, pattern: \"*.csv\", \
             format: csv, mode: full_dump, key: [id] }}\nrules: t.rules.yaml\npublish:\n  store: file://out\n  state: file://state\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("t.rules.yaml"), rules).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("t.yaml"), pipeline).unwrap_or_else(|e| panic!("{e}"));
        let pipeline =
            crate::config::load(&dir.path().join("t.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let rows = 3 * super::PARALLEL_MIN_ROWS as i64 + 7;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("namn", DataType::Utf8, true),
            Field::new("belopp", DataType::Utf8, true),
        ]));
        let data = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..rows)),
                Arc::new(StringArray::from_iter_values((0..rows).map(|i| {
                    match i % 7 {
                        0 => format!("Namn {i}, ring 19121212-1212"),
                        _ => format!("Namn {i}"),
                    }
                }))),
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| (i % 50).to_string()),
                )),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let batch = ChangeBatch {
            ops: (0..rows)
                .map(|i| if i % 9 == 0 { Op::Delete } else { Op::Read })
                .collect(),
            data,
            kind: BatchKind::Snapshot,
            position: Position::File {
                name: "t".into(),
                sha256: String::new(),
            },
            commit_time: None,
            end_of_transaction: true,
        };
        let key = PseudonymKey::from_bytes(vec![3; 32]).unwrap_or_else(|e| panic!("{e}"));
        let classifier =
            Classifier::compile(&pipeline, schema, &key).unwrap_or_else(|e| panic!("{e}"));
        let pieces = classifier
            .classify_pieces(&batch)
            .unwrap_or_else(|e| panic!("{e}"));
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(pieces.len(), cores.min(rows as usize));
        assert_eq!(
            pieces.iter().map(|p| p.data.num_rows()).sum::<usize>(),
            rows as usize
        );
        let whole = classifier
            .classify(&batch)
            .unwrap_or_else(|e| panic!("{e}"));
        let joined = Classified::join(pieces).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(joined.data, whole.data);
        assert_eq!(joined.ops, whole.ops);
        assert_eq!(joined.suppressed_by, whole.suppressed_by);
        assert_eq!(joined.values_redacted, whole.values_redacted);
        // The rules did their work: every 50th row suppressed (deletes too:
        // the rule sees the row's values), names redacted.
        assert_eq!(
            whole.suppressed_counts(1),
            vec![(0..rows).filter(|i| i % 50 == 13).count() as u64]
        );
        assert!(whole.values_redacted > 0);
    }
}
