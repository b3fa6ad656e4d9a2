//! The spec owns `graven.toml`: parsing it into a raw type that rejects unknown fields,
//! validating that into the typed `Project`, and reporting every problem at once with line,
//! column and field. Pure: it reads one file and touches nothing else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::proxy::HealthCheck;
use crate::runtime::{Limits, VolumeMount};

/// A validated `graven.toml`, resolved for one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub app: String,
    /// The directory holding `graven.toml`; relative paths are resolved against it.
    pub dir: PathBuf,
    pub environment: String,
    pub build: Option<BuildStep>,
    pub image: ImageSource,
    pub services: BTreeMap<String, Service>,
}

/// A command run before baking (compiling the app), from the project directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildStep {
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    pub containerfile: PathBuf,
    pub context: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub instances: u32,
    pub port: u16,
    pub route: Option<SocketAddr>,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub health: HealthCheck,
    pub deploy: DeployPolicy,
    pub stop_grace: Duration,
    pub volumes: Vec<VolumeMount>,
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Rolling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployPolicy {
    pub strategy: Strategy,
    pub max_surge: u32,
    pub max_unavailable: u32,
    /// New instances must be healthy within this long, or the deploy rolls back.
    pub health_deadline: Duration,
}
