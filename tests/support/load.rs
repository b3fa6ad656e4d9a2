//! The load generator the zero-downtime tests use: a thin re-export of `graven::loadgen`
//! (shared with `graven __load`, which the benchmark scripts run).
#[allow(unused_imports)] // Not every test crate that includes `support` generates load.
pub use graven::loadgen::*;
