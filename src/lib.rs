//! graven: immutable deployments from one binary.
//!
//! Modules are declared in the order data flows through them; see ARCHITECTURE.md.

pub mod actor;
pub mod api;
pub mod app_events;
pub mod bake;
pub mod chaos;
pub mod cli;
pub mod controller;
pub mod deploy;
pub mod dns;
pub mod events;
pub mod histogram;
pub mod kube;
// A test and benchmark tool, built only with the `dev-tools` feature (Cargo.toml says when).
#[cfg(feature = "dev-tools")]
pub mod loadgen;
pub mod logs;
pub mod proxy;
pub mod registry;
pub mod runtime;
pub mod sandbox;
pub mod secrets;
pub mod size;
pub mod spec;
pub mod store;
