//! Decoded rows gathered into Arrow columns of a batch.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int64Builder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::DataType;

use super::{Cell, Columns};

/// Rows of one column set, built into Arrow arrays.
#[derive(Debug)]
pub struct RowBuilder {
    columns: Arc<Columns>,
    builders: Vec<Builder>,
    rows: usize,
}

#[derive(Debug)]
pub(super) enum Builder {
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Text(StringBuilder),
    Decimal(Decimal128Builder, u8, i8),
    Date(Date32Builder),
    Micros(TimestampMicrosecondBuilder),
}

impl RowBuilder {
    /// An empty builder for rows with `columns`.
    pub fn new(columns: Arc<Columns>) -> Self {
        let builders = columns
            .columns
            .iter()
            .map(|c| match c.kind.arrow_type() {
                DataType::Int64 => Builder::Int(Int64Builder::new()),
                DataType::Float64 => Builder::Float(Float64Builder::new()),
                DataType::Boolean => Builder::Bool(BooleanBuilder::new()),
                DataType::Decimal128(p, s) => Builder::Decimal(Decimal128Builder::new(), p, s),
                DataType::Date32 => Builder::Date(Date32Builder::new()),
                DataType::Timestamp(..) => Builder::Micros(TimestampMicrosecondBuilder::new()),
                _ => Builder::Text(StringBuilder::new()),
            })
            .collect();
        RowBuilder {
            columns,
            builders,
            rows: 0,
        }
    }

    /// The columns the rows have.
    pub fn columns(&self) -> &Arc<Columns> {
        &self.columns
    }

    /// Rows appended so far.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no row was appended.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends a decoded row (cells in column order, as [`Decoder::decode`] gives them).
    pub fn append(&mut self, cells: Vec<Cell>) {
        for (builder, cell) in self.builders.iter_mut().zip(cells) {
            match (builder, cell) {
                (Builder::Int(b), Cell::Int(v)) => b.append_value(v),
                (Builder::Float(b), Cell::Float(v)) => b.append_value(v),
                (Builder::Bool(b), Cell::Bool(v)) => b.append_value(v),
                (Builder::Text(b), Cell::Text(v)) => b.append_value(v),
                (Builder::Decimal(b, ..), Cell::Decimal(v)) => b.append_value(v),
                (Builder::Date(b), Cell::Date(v)) => b.append_value(v),
                (Builder::Micros(b), Cell::Micros(v)) => b.append_value(v),
                (Builder::Int(b), _) => b.append_null(),
                (Builder::Float(b), _) => b.append_null(),
                (Builder::Bool(b), _) => b.append_null(),
                (Builder::Text(b), _) => b.append_null(),
                (Builder::Decimal(b, ..), _) => b.append_null(),
                (Builder::Date(b), _) => b.append_null(),
                (Builder::Micros(b), _) => b.append_null(),
            }
        }
        self.rows += 1;
    }

    /// The rows as a record batch; the builder is empty afterwards.
    pub fn finish(&mut self) -> Result<arrow::array::RecordBatch, arrow::error::ArrowError> {
        let arrays: Vec<ArrayRef> = self
            .builders
            .iter_mut()
            .map(|b| -> Result<ArrayRef, arrow::error::ArrowError> {
                Ok(match b {
                    Builder::Int(b) => Arc::new(b.finish()),
                    Builder::Float(b) => Arc::new(b.finish()),
                    Builder::Bool(b) => Arc::new(b.finish()),
                    Builder::Text(b) => Arc::new(b.finish()),
                    Builder::Decimal(b, p, s) => {
                        Arc::new(b.finish().with_precision_and_scale(*p, *s)?)
                    }
                    Builder::Date(b) => Arc::new(b.finish()),
                    Builder::Micros(b) => Arc::new(b.finish().with_timezone("UTC")),
                })
            })
            .collect::<Result<_, _>>()?;
        self.rows = 0;
        arrow::array::RecordBatch::try_new(self.columns.schema.clone(), arrays)
    }
}
