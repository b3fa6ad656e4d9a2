//! An image's file tree as the layers of a docker-archive (`docker save`, `graven image export
//! --format docker`) make it, applied in order with whiteouts, and its config: what the
//! compatibility tests compare between graven's image and Docker's.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use sha2::Digest as _;

/// One path of the flattened tree: its type, mode, owner and content (a SHA-256 for files, the
/// target for links).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: char,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub content: String,
}

pub struct Image {
    pub files: BTreeMap<String, Node>,
    /// The text of small files (under 4 KiB, UTF-8), to show what differs.
    pub texts: BTreeMap<String, String>,
    /// The image config's `config` object (Env, Cmd, User…).
    pub config: serde_json::Value,
}

/// Reads a docker-archive; `content` maps a file's path and bytes to what is compared of it.
pub fn read(archive: &Path, content: &dyn Fn(&str, &[u8]) -> Vec<u8>) -> Image {
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_file() {
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            blobs.insert(name, bytes);
        }
    }
    let manifest: serde_json::Value = serde_json::from_slice(&blobs["manifest.json"]).unwrap();
    let manifest = &manifest[0];
    let config: serde_json::Value =
        serde_json::from_slice(&blobs[manifest["Config"].as_str().unwrap()]).unwrap();
    let mut files = BTreeMap::new();
    let mut texts = BTreeMap::new();
    for layer in manifest["Layers"].as_array().unwrap() {
        let bytes = &blobs[layer.as_str().unwrap()];
        let reader: Box<dyn Read> = if bytes.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(&bytes[..]))
        } else {
            Box::new(&bytes[..])
        };
        apply(&mut files, &mut texts, reader, content);
    }
    texts.retain(|path, _| files.contains_key(path));
    Image {
        files,
        texts,
        config: config["config"].clone(),
    }
}

fn apply(
    files: &mut BTreeMap<String, Node>,
    texts: &mut BTreeMap<String, String>,
    layer: impl Read,
    content: &dyn Fn(&str, &[u8]) -> Vec<u8>,
) {
    let mut tar = tar::Archive::new(layer);
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let path = path
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_owned();
        if path.is_empty() || path == "." {
            continue;
        }
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", &path));
        if name == ".wh..wh..opq" {
            let prefix = format!("{dir}/");
            files.retain(|p, _| !p.starts_with(&prefix));
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let gone = if dir.is_empty() {
                hidden.to_owned()
            } else {
                format!("{dir}/{hidden}")
            };
            let prefix = format!("{gone}/");
            files.retain(|p, _| *p != gone && !p.starts_with(&prefix));
            continue;
        }
        let header = entry.header();
        let kind = match header.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            _ => 'f',
        };
        let (mode, uid, gid) = (
            header.mode().unwrap() & 0o7777,
            header.uid().unwrap(),
            header.gid().unwrap(),
        );
        let link = entry
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let content = match kind {
            'f' => {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                match String::from_utf8(bytes.clone()) {
                    Ok(text) if bytes.len() < 4096 => texts.insert(path.clone(), text),
                    _ => texts.remove(&path),
                };
                hex(&sha2::Sha256::digest(content(&path, &bytes)))
            }
            'l' => link.unwrap_or_default(),
            'h' => {
                // A hard link is the file it names, as a reader of the image sees it.
                let target = link.unwrap_or_default();
                let target = target.trim_start_matches("./").to_owned();
                match files.get(&target) {
                    Some(node) => {
                        files.insert(
                            path,
                            Node {
                                kind: 'f',
                                ..node.clone()
                            },
                        );
                        continue;
                    }
                    None => format!("hard link to missing {target}"),
                }
            }
            _ => String::new(),
        };
        // A directory entry over an existing directory changes its metadata, not its contents.
        files.insert(
            path,
            Node {
                kind,
                mode,
                uid,
                gid,
                content,
            },
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
