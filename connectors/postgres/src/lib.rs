//! The PostgreSQL connector: a consistent snapshot of one table, then its
//! committed changes by logical replication (pgoutput), exactly once.
//!
//! Start-up without a committed position creates the slot with an exported
//! snapshot, copies the table inside that snapshot (binary COPY, parallel block
//! ranges), and streams from the slot's consistent point: every transaction
//! committed before it is in the copy, every one after it in the stream. With a
//! committed position the stream resumes there. The slot's confirmed flush
//! position moves only when the engine acknowledges a committed version.
//!
//! Pipelines of one process that name the same slot share it (see
//! [`shared`]): one stream feeds them all, and each copies its snapshot
//! inside a temporary slot's exported snapshot instead of re-creating the
//! shared one.

mod catalog;
mod config;
pub mod pgoutput;
pub mod shared;
pub mod snapshot;
mod source;
pub mod tls;
pub mod types;
pub mod wire;

pub use catalog::{ColumnInfo, Inspection, inspect};
pub use config::{PostgresConfig, Table, redact_url};
pub use source::{BATCH_ROWS, PostgresSource, SNAPSHOT_BATCH_ROWS};
