//! The embedded local runtime: instances as sandboxed processes on this machine, with state
//! on disk under `$GRAVEN_HOME/instances` so they outlive the graven process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Instance, InstanceId, InstanceSpec, Runtime, RuntimeError};
use crate::store::Digest;

#[derive(Debug, Clone)]
pub struct LocalRuntime {
    home: PathBuf,
}

impl LocalRuntime {
    pub fn open(home: &Path) -> Result<LocalRuntime, RuntimeError> {
        Ok(LocalRuntime {
            home: home.to_owned(),
        })
    }

    fn unsupported(&self) -> RuntimeError {
        RuntimeError::Unsupported {
            reason: format!(
                "the local runtime at {} is not built yet",
                self.home.display()
            ),
        }
    }
}

impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }
    async fn prepare(&self, _image: &Digest) -> Result<(), RuntimeError> {
        Err(self.unsupported())
    }
    async fn start(&self, _spec: InstanceSpec) -> Result<Instance, RuntimeError> {
        Err(self.unsupported())
    }
    async fn inspect(&self, _id: &InstanceId) -> Result<Instance, RuntimeError> {
        Err(self.unsupported())
    }
    async fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        Err(self.unsupported())
    }
    async fn stop(&self, _id: &InstanceId, _grace: Duration) -> Result<Instance, RuntimeError> {
        Err(self.unsupported())
    }
    async fn kill(&self, _id: &InstanceId) -> Result<(), RuntimeError> {
        Err(self.unsupported())
    }
    async fn remove(&self, _id: &InstanceId) -> Result<(), RuntimeError> {
        Err(self.unsupported())
    }
}
