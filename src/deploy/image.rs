//! What a service's release takes from its image, read once the image is baked and before
//! anything is recorded or started: the port its EXPOSE says when the service names none
//! (none needed by a worker),
//! a volume for each VOLUME the service does not mount (named after the service and the
//! path, `runtime::settings::volume_name`; a service of several instances cannot have one),
//! and whether the `user` it asks for exists in the image's own passwd and group files.

use std::path::Path;

use super::DeployError;
use crate::events::{HealthKind, ServiceConfig, VolumeConfig};
use crate::runtime::{LocalRuntime, VolumeMount, settings};
use crate::spec::Service;
use crate::store::{Digest, Store};

/// Completes `config` (made from `service`) from the image `digest`'s settings, or says why
/// the service cannot run from it.
pub(super) fn complete(
    home: &Path,
    digest: &Digest,
    service: &Service,
    config: &mut ServiceConfig,
) -> Result<(), DeployError> {
    let fail = |message: String| DeployError::Image {
        service: service.name.clone(),
        message,
    };
    let store = Store::open(home).map_err(|e| fail(e.to_string()))?;
    let image = store.image(digest).map_err(|e| fail(e.to_string()))?;
    let settings_of_image = &image.config.config;
    if service.port.is_none() {
        // A service is reached on its port through its route or its health check; one that
        // is neither (a worker) needs none, and runs with 0 when its image says nothing.
        let needed = service.route.is_some()
            || matches!(config.health.kind, HealthKind::Http | HealthKind::Tcp);
        config.port = match settings::exposed_port(&settings_of_image.exposed_ports) {
            Ok(Some(port)) => port,
            Ok(None) | Err(_) if !needed => 0,
            Ok(None) => {
                return Err(fail(
                    "no port: the image exposes none (EXPOSE); set `port`, the port the service \
                     listens on"
                        .to_owned(),
                ));
            }
            Err(ports) => {
                return Err(fail(format!(
                    "the image exposes several ports ({ports}); set `port` to the one the service \
                     is reached on"
                )));
            }
        };
    }
    for path in
        settings::uncovered_volumes(&settings_of_image.volumes, &service.volumes, &service.tmpfs)
    {
        let volume = VolumeMount {
            name: settings::volume_name(&service.name, path),
            path: path.to_owned(),
        };
        volume.validate().map_err(|e| {
            fail(format!(
                "the image's VOLUME {path}: {e}; declare a volume at {path} in graven.toml"
            ))
        })?;
        // A named volume is owned by one live instance at a time (the volume lock): the
        // second instance would be refused at its start, after the release is recorded. Said
        // here instead, before anything changes, as graven.toml's own volumes are.
        if service.instances > 1 {
            return Err(fail(format!(
                "instances = {}: the image's VOLUME {path} is volume {:?}, owned by one live \
                 instance at a time, so they cannot share it; set instances = 1, or give \
                 {path} a tmpfs in graven.toml if its data need not outlive an instance",
                service.instances, volume.name
            )));
        }
        config.volumes.push(VolumeConfig {
            name: volume.name,
            path: volume.path,
        });
    }
    if let Some(user) = &service.user {
        // Read inside the image's root, as the runtime will; unpacking it now only moves the
        // first start's work earlier.
        let runtime = LocalRuntime::open(home).map_err(|e| fail(e.to_string()))?;
        let (_, root) = runtime
            .prepare_blocking(digest)
            .map_err(|e| fail(e.to_string()))?;
        let read = |p: &str| crate::sandbox::root::read_text(&root, p);
        crate::sandbox::user::resolve(user, &read("etc/passwd"), &read("etc/group"))
            .map_err(|e| fail(format!("user {user:?}: {e}")))?;
    }
    Ok(())
}
