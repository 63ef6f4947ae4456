//! Operations: the HTTP server for consumers.

pub mod serve;
