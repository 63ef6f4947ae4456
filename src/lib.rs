//! oppen: a change-data pipeline that keeps municipal open data current.
//!
//! Connectors capture changes at the source, [`classify`] strips or transforms
//! sensitive fields by the steward's rules, and [`publish`] writes versioned
//! Parquet and CSV snapshots. See DESIGN.md for the architecture and guarantees.

pub mod classify;
pub mod commands;
pub mod config;
pub mod demo;
pub mod failpoint;
pub mod ops;
pub mod publish;
pub mod runtime;
pub mod store;
pub mod transport;
