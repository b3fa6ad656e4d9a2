//! What graven writes on a container so that any graven, restarted or not, finds its
//! instances on an engine and reads them back: the instance's id, image, port and network,
//! when it started, which graven home owns it, and the controller's own labels (the
//! instance's name among them), each under a prefix of its own.

use std::collections::{BTreeMap, HashMap};

use crate::runtime::{InstanceId, NetworkMode};
use crate::store::Digest;

/// Every graven container has it; its value is the instance id.
pub const INSTANCE: &str = "graven.instance";
/// The graven home that started it, so two homes on one engine never see each other's.
pub const HOME: &str = "graven.home";
pub const IMAGE: &str = "graven.image";
pub const PORT: &str = "graven.port";
pub const NETWORK: &str = "graven.network";
pub const STARTED_MS: &str = "graven.started-ms";
/// The prefix of the controller's labels (`InstanceSpec::labels`).
const LABEL: &str = "graven.label.";
/// The prefix of graven's named volumes in an engine.
pub const VOLUME_PREFIX: &str = "graven-";

/// What a container's labels say about the instance it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub id: InstanceId,
    pub image: Digest,
    pub port: u16,
    pub network: NetworkMode,
    pub started_at_ms: u64,
    pub labels: BTreeMap<String, String>,
}

pub fn write(recorded: &Recorded, home: &str) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = recorded
        .labels
        .iter()
        .map(|(k, v)| (format!("{LABEL}{k}"), v.clone()))
        .collect();
    labels.insert(INSTANCE.to_owned(), recorded.id.0.clone());
    labels.insert(HOME.to_owned(), home.to_owned());
    labels.insert(IMAGE.to_owned(), recorded.image.to_string());
    labels.insert(PORT.to_owned(), recorded.port.to_string());
    let network = match recorded.network {
        NetworkMode::Private => "private",
        NetworkMode::Host => "host",
    };
    labels.insert(NETWORK.to_owned(), network.to_owned());
    labels.insert(STARTED_MS.to_owned(), recorded.started_at_ms.to_string());
    labels
}

/// Reads the labels back; `None` for a container graven did not start (or whose labels
/// someone else wrote wrong).
pub fn read(labels: &HashMap<String, String>) -> Option<Recorded> {
    let id = InstanceId(labels.get(INSTANCE)?.clone());
    if !valid_id(&id) {
        return None;
    }
    Some(Recorded {
        id,
        image: labels.get(IMAGE)?.parse().ok()?,
        port: labels.get(PORT)?.parse().ok()?,
        network: match labels.get(NETWORK)?.as_str() {
            "host" => NetworkMode::Host,
            _ => NetworkMode::Private,
        },
        started_at_ms: labels.get(STARTED_MS)?.parse().ok()?,
        labels: labels
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(LABEL)?.to_owned(), v.clone())))
            .collect(),
    })
}

/// An instance id is lowercase hex, so it names a container and a URL path as it is.
pub fn valid_id(id: &InstanceId) -> bool {
    !id.0.is_empty() && id.0.len() <= 64 && id.0.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_back_what_was_written() {
        let recorded = Recorded {
            id: InstanceId("0123456789ab".into()),
            image: Digest::of(b"image"),
            port: 8080,
            network: NetworkMode::Host,
            started_at_ms: 42,
            labels: [("instance".to_owned(), "web-1".to_owned())].into(),
        };
        let labels = write(&recorded, "/home");
        assert_eq!(labels["graven.label.instance"], "web-1");
        assert_eq!(read(&labels), Some(recorded));
        let mut foreign = labels.clone();
        foreign.insert(INSTANCE.into(), "../x".into());
        assert_eq!(read(&foreign), None);
    }
}
