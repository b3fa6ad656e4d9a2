//! The controller owns reconciliation: one loop over a closed `Input` enum that compares the
//! wanted releases with what runs, and decides launches, drains, stops and rollbacks. Every
//! decision is appended to the event log before it takes effect.

pub mod plan;
