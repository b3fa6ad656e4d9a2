//! Test support for the runtime: images made directly through the store API (a reproducible
//! gzip tar layer of given files), a tiny HTTP client, and the static probe binary.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use graven::store::{Descriptor, Digest, ImageConfig, MEDIA_TYPE_LAYER_GZIP, RuntimeConfig, Store};

/// One file in a test image's single layer.
pub struct File {
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

impl File {
    pub fn executable(path: &str, host: &Path) -> File {
        File {
            path: path.to_owned(),
            bytes: std::fs::read(host).expect("reading a file for a test image"),
            mode: 0o755,
        }
    }

    pub fn text(path: &str, text: &str) -> File {
        File {
            path: path.to_owned(),
            bytes: text.as_bytes().to_vec(),
            mode: 0o644,
        }
    }

    /// A symlink at `path` to `target` (the mode's file type says so; `layer` makes it one).
    pub fn symlink(path: &str, target: &str) -> File {
        File {
            path: path.to_owned(),
            bytes: target.as_bytes().to_vec(),
            mode: SYMLINK | 0o777,
        }
    }

    /// An empty directory at `path`.
    pub fn dir(path: &str) -> File {
        File {
            path: path.to_owned(),
            bytes: Vec::new(),
            mode: DIRECTORY | 0o755,
        }
    }
}

const FILE_TYPE: u32 = 0o170_000;
const SYMLINK: u32 = 0o120_000;
const DIRECTORY: u32 = 0o040_000;

/// A gzip tar of `files` with fixed times and owners, plus the directories they need.
pub fn layer(files: &[File]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut dirs = std::collections::BTreeSet::new();
    for file in files {
        let mut parent = Path::new(&file.path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_owned());
            parent = dir.parent();
        }
    }
    for dir in dirs {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(0);
        builder
            .append_data(&mut header, &dir, std::io::empty())
            .unwrap();
    }
    for file in files {
        let mut header = tar::Header::new_gnu();
        header.set_mode(file.mode & !FILE_TYPE);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        match file.mode & FILE_TYPE {
            SYMLINK => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                let target = std::str::from_utf8(&file.bytes).unwrap();
                builder
                    .append_link(&mut header, &file.path, target)
                    .unwrap();
            }
            DIRECTORY => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, &file.path, std::io::empty())
                    .unwrap();
            }
            _ => {
                header.set_size(file.bytes.len() as u64);
                builder
                    .append_data(&mut header, &file.path, file.bytes.as_slice())
                    .unwrap();
            }
        }
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// Puts a one-layer image into the store under `home`, tags it, and returns its digest.
pub fn put_image(home: &Path, tag: &str, files: &[File], config: RuntimeConfig) -> Digest {
    let store = Store::open(home).unwrap();
    let gz = layer(files);
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut raw)
        .unwrap();
    let layer_digest = store.put_blob(&gz).unwrap();
    let mut image = ImageConfig {
        config,
        ..ImageConfig::default()
    };
    image.rootfs.diff_ids.push(Digest::of(&raw));
    let digest = store
        .put_image(
            &image,
            vec![Descriptor::new(
                MEDIA_TYPE_LAYER_GZIP,
                layer_digest,
                gz.len() as u64,
            )],
        )
        .unwrap();
    store.tag(tag, &digest, Some("test")).unwrap();
    digest
}

/// The example service as an image (`/hello`, USER 65534, STOPSIGNAL SIGTERM).
pub fn hello_image(home: &Path) -> Digest {
    let config = RuntimeConfig {
        user: Some("65534:65534".to_owned()),
        env: vec!["PORT=8080".to_owned()],
        entrypoint: Some(vec!["/hello".to_owned()]),
        stop_signal: Some("SIGTERM".to_owned()),
        ..RuntimeConfig::default()
    };
    put_image(
        home,
        "hello:test",
        &[File::executable("hello", &super::hello_binary())],
        config,
    )
}

/// Builds the probe example as a static binary once per test process.
pub fn probe_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let target = super::workspace().join("target/static");
            super::succeed(
                Command::new(env!("CARGO"))
                    .current_dir(super::workspace())
                    .args([
                        "rustc",
                        "--quiet",
                        "--release",
                        "-p",
                        "probe",
                        "--target-dir",
                    ])
                    .arg(&target)
                    .args(["--", "-C", "target-feature=+crt-static"]),
            );
            target.join("release/probe")
        })
        .clone()
}

/// What every sandbox must show the probe, whoever starts it (the sandbox alone, the local
/// runtime as root or rootless): PID 1 of its namespace, no capabilities, no_new_privs, the
/// seccomp filter, a read-only root, a writable /tmp, and mount, io_uring and unshare refused.
pub fn assert_locked_down(seen: &BTreeMap<String, String>) {
    assert_eq!(seen["pid"], "1");
    assert_eq!(seen["cap_eff"], "0000000000000000");
    assert_eq!(seen["no_new_privs"], "1");
    assert_eq!(seen["seccomp"], "2");
    assert_eq!(seen["root_write"], "Read-only file system");
    assert_eq!(seen["tmp_write"], "ok");
    assert_eq!(seen["mount"], "Operation not permitted");
    assert_eq!(seen["io_uring"], "Operation not permitted");
    assert_eq!(seen["unshare"], "Operation not permitted");
}

/// What the probe reports (`key=value` lines) as a map.
pub fn parse_report(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A plain HTTP/1.1 response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// `GET path` with `connection: close`; `None` when nothing answers.
pub fn get(address: SocketAddr, path: &str) -> Option<Reply> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Reply {
        status,
        headers,
        body: body.to_owned(),
    })
}
