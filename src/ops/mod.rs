//! Operations: the HTTP server for consumers, and metrics and health for operators.

pub mod serve;
pub mod telemetry;
