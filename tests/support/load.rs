//! The load generator the zero-downtime tests use: a thin re-export of `graven::loadgen`
//! (shared with `graven __load`, which the benchmark scripts run).
pub use graven::loadgen::*;
