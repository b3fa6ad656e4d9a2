//! The properties the fuzz targets check, one function per target taking the fuzzer's raw
//! bytes and panicking when a property fails. "Does not panic" is the least of them: each also
//! checks something cheap that must hold for every input (round trips, determinism, nothing
//! written outside a temp dir, a failed transaction leaves the store as it was).
//!
//! The same file serves two crates: `fuzz/fuzz_targets/*.rs` include it with `#[path]`, and
//! `tests/fuzz_corpus.rs` runs the committed seeds and found artifacts through it on stable
//! Rust. So it may use only graven and the crates both depend on (flate2, serde, serde_json,
//! tar, tempfile, tokio), and nothing else from `tests/support`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use graven::bake::containerfile;
use graven::bake::plan::{self, Action};
use graven::events::{self, Envelope, Event, EventLogError, RawRow, State, fold};
use graven::runtime::{LocalRuntime, Runtime};
use graven::store::{
    Descriptor, Digest, ImageConfig, ImageIndex, ImportKind, MEDIA_TYPE_CONFIG, MEDIA_TYPE_LAYER,
    MEDIA_TYPE_MANIFEST, Manifest, REF_NAME, RuntimeConfig, Store, to_canonical_json,
};

/// A property: panics when `data` breaks it.
pub type Property = fn(data: &[u8]);

/// Every target, by the name its fuzz target and corpus directory have.
pub const TARGETS: &[(&str, Property)] = &[
    ("spec", spec),
    ("containerfile", containerfile),
    ("digest", digest),
    ("oci_documents", oci_documents),
    ("event_envelope", event_envelope),
    ("event_fold", event_fold),
    ("api_request", api_request),
    ("image_import", image_import),
    ("layer_unpack", layer_unpack),
    ("add_archive", add_archive),
    ("instance_rootfs", instance_rootfs),
    ("image_paths", image_paths),
    ("syslog_stream", syslog_stream),
];

/// `graven.toml`: parsing is deterministic; a project's config digests are stable and cover
/// the port but not the instance count; problems are placed inside the file and in order.
pub fn spec(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/project/graven.toml");
    let dir = Path::new("/project");
    for environment in [graven::spec::DEFAULT_ENVIRONMENT, "production"] {
        let first = graven::spec::parse(source, file, dir, environment);
        let second = graven::spec::parse(source, file, dir, environment);
        assert_eq!(first, second, "parsing the same text twice differs");
        match first {
            Ok(project) => {
                assert_eq!(project.environment, environment);
                for (name, service) in &project.services {
                    assert_eq!(&service.name, name);
                    let digest = graven::events::ServiceConfig::from(service).digest();
                    assert_eq!(
                        digest,
                        graven::events::ServiceConfig::from(service).digest(),
                        "config_digest is unstable"
                    );
                    let mut scaled = service.clone();
                    scaled.instances = scaled.instances.wrapping_add(1);
                    assert_eq!(
                        graven::events::ServiceConfig::from(&scaled).digest(),
                        digest,
                        "instances changed the digest"
                    );
                    let mut moved = service.clone();
                    moved.port = Some(moved.port.map_or(1, |port| port.wrapping_add(1)));
                    assert_ne!(
                        graven::events::ServiceConfig::from(&moved).digest(),
                        digest,
                        "the port is not in the digest"
                    );
                }
            }
            Err(errors) => {
                assert!(!errors.problems.is_empty(), "an error without problems");
                let lines = source.matches('\n').count() + 1;
                let mut last = (0, 0);
                for problem in &errors.problems {
                    assert_eq!(problem.file, file);
                    assert!(
                        (1..=lines).contains(&problem.line) && problem.column >= 1,
                        "{problem} is placed outside the file ({lines} lines)"
                    );
                    assert!(!problem.message.is_empty(), "{problem} has no message");
                    assert!(
                        (problem.line, problem.column) >= last,
                        "problems out of order"
                    );
                    last = (problem.line, problem.column);
                }
            }
        }
    }
}

/// Containerfiles: parsing is deterministic; errors and instructions name lines of the file
/// (instructions in increasing order); planning a parsed file never panics, and every path a
/// plan holds is absolute with no `.` or `..` left in it.
pub fn containerfile(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let first = containerfile::parse("Containerfile", source);
    assert_eq!(first, containerfile::parse("Containerfile", source));
    let lines = source.lines().count().max(1);
    let file = match first {
        Ok(file) => file,
        Err(error) => {
            assert_eq!(error.file, "Containerfile");
            assert!(
                (1..=lines).contains(&error.line),
                "{error} is placed outside the file ({lines} lines)"
            );
            assert!(!error.reason.is_empty());
            return;
        }
    };
    let mut last = 0;
    for instruction in &file.instructions {
        assert!(
            instruction.line > last && instruction.line <= lines,
            "instruction at line {} after line {last} of {lines}",
            instruction.line
        );
        last = instruction.line;
    }
    let build_args = BTreeMap::new();
    let stages = match plan::stages(&file, &build_args) {
        Ok(stages) => stages,
        Err(error) => {
            assert!((1..=lines).contains(&error.line), "{error:?}");
            return;
        }
    };
    assert!(
        !stages.needed.is_empty(),
        "a parsed file with no stage to build"
    );
    for &index in &stages.needed {
        let stage = &stages.stages[index];
        let planned = match plan::plan_stage(
            &file,
            stage,
            &RuntimeConfig::default(),
            &build_args,
            &stages.global_args,
        ) {
            Ok(planned) => planned,
            Err(error) => {
                assert!((1..=lines).contains(&error.line), "{error:?}");
                continue;
            }
        };
        for step in &planned.steps {
            let path = match &step.action {
                Action::Copy { dest, .. } => dest,
                Action::Workdir(path) => path,
                Action::Run { workdir, .. } => workdir,
                Action::Config(_) => continue,
            };
            assert!(
                path.starts_with('/') && !path.split('/').any(|part| part == "." || part == ".."),
                "line {}: the plan holds the path {path:?}",
                step.line
            );
        }
    }
}

/// Digests: a parsed digest prints, serializes and parses back as the same text; what does
/// not parse is refused by every way in (FromStr, serde); `Digest::of` always parses.
pub fn digest(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    let as_json = serde_json::Value::String(text.clone());
    match Digest::parse(&text) {
        Ok(digest) => {
            assert_eq!(digest.as_str(), text);
            assert_eq!(digest.to_string(), text);
            assert_eq!(text.parse::<Digest>().as_ref(), Ok(&digest));
            assert_eq!(serde_json::to_value(&digest).unwrap(), as_json);
            assert_eq!(serde_json::from_value::<Digest>(as_json).unwrap(), digest);
            assert_eq!(format!("{}:{}", digest.algorithm(), digest.hex()), text);
            assert!(digest.hex().starts_with(digest.short()));
        }
        Err(error) => {
            assert_eq!(error.value, text);
            assert!(text.parse::<Digest>().is_err());
            assert!(serde_json::from_value::<Digest>(as_json).is_err());
        }
    }
    let of = Digest::of(data);
    assert_eq!(Digest::parse(of.as_str()).as_ref(), Ok(&of));
}

/// OCI documents: whatever parses as an index, manifest or config serializes to canonical
/// JSON that parses back to the same value and serializes to the same bytes again.
pub fn oci_documents(data: &[u8]) {
    round_trip::<ImageIndex>(data);
    round_trip::<Manifest>(data);
    round_trip::<ImageConfig>(data);
}

fn round_trip<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(value) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let canonical = to_canonical_json(&value);
    let again: T = serde_json::from_slice(&canonical).unwrap_or_else(|e| {
        panic!(
            "canonical json does not parse back: {e}: {}",
            String::from_utf8_lossy(&canonical)
        )
    });
    assert_eq!(again, value, "canonical json parses to another value");
    assert_eq!(to_canonical_json(&again), canonical, "canonical json moved");
}

/// The event decoder, fed a stored row: fields `seq`, `at_ms`, `actor`, `version`, `kind`,
/// `checksum`, one a line, the payload after them. An empty checksum line stands for the right
/// checksum, so the fuzzer gets past it to the payload. A wrong checksum is always refused as
/// corrupt; a decoded envelope carries the row's values, and re-encoding its payload the way
/// the log does decodes to the same envelope. A row that decodes as graven's own `Event`
/// re-encodes to the same event and folds without a panic.
pub fn event_envelope(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.splitn(7, '\n');
    let mut next = || fields.next().unwrap_or_default().to_owned();
    let number = |field: String| field.trim().parse::<i64>().unwrap_or_default();
    let (seq, at_ms, actor, version, kind, checksum, payload) = (
        number(next()),
        number(next()),
        next(),
        number(next()),
        next(),
        next(),
        next(),
    );
    let right = events::checksum(seq, at_ms, &actor, version, &payload);
    let forged = !checksum.is_empty() && checksum != right;
    let row = RawRow {
        seq,
        at_ms,
        actor,
        version,
        kind,
        checksum: if checksum.is_empty() { right } else { checksum },
        payload,
    };
    if let Ok(envelope) = events::decode_envelope::<Event>(&row) {
        let payload = serde_json::to_string(&envelope.payload).unwrap();
        let again: Event = serde_json::from_str(&payload).expect("an encoded event decodes");
        assert_eq!(again, envelope.payload);
        fold(State::default(), &envelope);
    }
    match events::decode_envelope::<serde_json::Value>(&row) {
        Ok(envelope) => {
            assert!(!forged, "a row with a wrong checksum decoded");
            assert_eq!(i64::try_from(envelope.seq), Ok(row.seq));
            assert_eq!(i64::try_from(envelope.at_ms), Ok(row.at_ms));
            assert_eq!(envelope.actor, row.actor);
            assert_eq!(i64::from(envelope.version), row.version);
            assert!((1..=events::ENVELOPE_VERSION).contains(&envelope.version));
            let expected: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
            assert_eq!(envelope.payload, expected);
            let payload = serde_json::to_string(&envelope.payload).unwrap();
            let encoded = RawRow {
                checksum: events::checksum(row.seq, row.at_ms, &row.actor, row.version, &payload),
                payload,
                ..row.clone()
            };
            let again = events::decode_envelope::<serde_json::Value>(&encoded)
                .expect("a re-encoded envelope decodes");
            assert_eq!(again, envelope);
        }
        Err(EventLogError::Corrupt { seq, .. }) => assert_eq!(seq, row.seq),
        Err(error) => {
            assert!(
                !forged,
                "a wrong checksum was not reported as corruption: {error}"
            );
            assert!(matches!(
                error,
                EventLogError::NewerEnvelope { .. } | EventLogError::BadPayload { .. }
            ));
        }
    }
}

/// The fold over a log: every line that parses as an `Event` is appended (seq 1, 2, …, a
/// second apart) and folded. Each event re-encodes to itself; folding is deterministic and
/// ends at the last seq; a state saved as JSON half-way and read back folds on to the same
/// end state.
pub fn event_fold(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let envelopes: Vec<Envelope<Event>> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Event>(line).ok())
        .enumerate()
        .map(|(index, payload)| Envelope {
            seq: index as u64 + 1,
            at_ms: 1_000 * (index as u64 + 1),
            actor: events::CONTROLLER.to_owned(),
            version: events::ENVELOPE_VERSION,
            payload,
        })
        .collect();
    for envelope in &envelopes {
        let json = serde_json::to_string(&envelope.payload).unwrap();
        assert_eq!(
            serde_json::from_str::<Event>(&json).unwrap(),
            envelope.payload
        );
    }
    let fold_all = |state: State, envelopes: &[Envelope<Event>]| envelopes.iter().fold(state, fold);
    let end = fold_all(State::default(), &envelopes);
    assert_eq!(
        end,
        fold_all(State::default(), &envelopes),
        "the fold differs"
    );
    assert_eq!(end.seq, envelopes.len() as u64);
    let (first, rest) = envelopes.split_at(envelopes.len() / 2);
    let half = fold_all(State::default(), first);
    let saved = serde_json::to_string(&half).unwrap();
    let restored: State = serde_json::from_str(&saved).expect("a saved state reads back");
    assert_eq!(restored, half, "a state does not survive JSON");
    assert_eq!(
        fold_all(restored, rest),
        end,
        "folding from a saved state differs"
    );
}

/// API request bodies, read the way the daemon reads them (an empty body is `{}`): whatever
/// parses serializes to JSON that parses back to the same request.
pub fn api_request(data: &[u8]) {
    let body = if data.is_empty() { b"{}" } else { data };
    round_trip::<graven::api::DeployRequest>(body);
    round_trip::<graven::api::RollbackRequest>(body);
    round_trip::<graven::api::HistoryRequest>(body);
    round_trip::<graven::api::Target>(body);
}

/// Importing an archive (OCI archive or docker-archive, gzipped or not): an imported image
/// reads back with every blob matching its digest; a transaction dropped uncommitted leaves
/// the store's files as they were, and nothing appears beside the archive.
pub fn image_import(data: &[u8]) {
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("image.tar");
    fs::write(&archive, data).unwrap();
    let store = Store::open(&work.path().join("home")).unwrap();
    let store_before = listing(store.root());
    let work_before = listing(work.path());
    {
        let mut txn = store.transaction().unwrap();
        if let Ok(digest) = txn.import(&archive, ImportKind::Detect, None) {
            let image = store.image(&digest).expect("an imported image reads back");
            for layer in &image.manifest.layers {
                store
                    .read_blob_verified(&layer.digest)
                    .expect("an imported layer is in the store");
            }
        }
    }
    assert_eq!(
        listing(store.root()),
        store_before,
        "an uncommitted import left files in the store"
    );
    // An import also unpacks the image's snapshots and path indexes under the home: a cache
    // beside the store, which `gc` removes once no kept image needs it.
    let beside: Vec<_> = listing(work.path())
        .into_iter()
        .filter(|path| !path.starts_with("home/snapshots"))
        .collect();
    assert_eq!(beside, work_before, "the import wrote beside it");
    assert_eq!(
        fs::read(&archive).unwrap(),
        data,
        "the import changed its input"
    );
}

/// Reading layers: the bytes are the one layer of an OCI layout a Containerfile bakes on
/// (`WORKDIR` lists the layer's paths, `RUN` unpacks it); whatever the layer holds, a canary
/// file beside the bake's temp dirs survives. RUN's user is looked up in the unpacked root
/// and is not there, so the step fails right after unpacking, before a sandbox is started.
pub fn layer_unpack(data: &[u8]) {
    let canary = Canary::plant();
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_oci_layout(&context.join("base"), data);
    fs::write(
        context.join("Containerfile"),
        "FROM oci:base\nWORKDIR /w\nUSER graven-fuzz-no-such-user\nRUN [\"/bin/true\"]\n",
    )
    .unwrap();
    let _ = bake(work.path(), &context);
    canary.check();
}

/// ADD of a local archive: a baked image holds the archive's entries only under the
/// destination, and the canary survives.
pub fn add_archive(data: &[u8]) {
    let canary = Canary::plant();
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    fs::create_dir_all(&context).unwrap();
    fs::write(context.join("a.tar"), data).unwrap();
    fs::write(
        context.join("Containerfile"),
        "FROM scratch\nADD a.tar /d/\n",
    )
    .unwrap();
    if let Ok(baked) = bake(work.path(), &context) {
        let store = Store::open(&work.path().join("home")).unwrap();
        let image = store.image(&baked.digest).unwrap();
        for layer in &image.manifest.layers {
            let blob = store.open_blob(&layer.digest).unwrap();
            let mut layer_tar = tar::Archive::new(flate2::read::GzDecoder::new(blob));
            for entry in layer_tar.entries().unwrap() {
                let entry = entry.unwrap();
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let clean = path.trim_end_matches('/');
                assert!(
                    (clean == "d" || clean.starts_with("d/"))
                        && !clean.split('/').any(|part| part == ".." || part == "."),
                    "the layer holds {path:?}, outside /d"
                );
            }
        }
    }
    canary.check();
}

/// The local runtime unpacking an image for its instances: the bytes are the image's one
/// (uncompressed) layer. Whatever it holds, the canary survives, a prepared image's root is
/// in place, and a failed one leaves no temp dir behind.
pub fn instance_rootfs(data: &[u8]) {
    let canary = Canary::plant();
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    let store = Store::open(&home).unwrap();
    let manifest = {
        let mut txn = store.transaction().unwrap();
        let layer = txn.put_blob(data).unwrap();
        let mut config = ImageConfig::default();
        config.rootfs.diff_ids.push(layer.clone());
        let layers = vec![Descriptor::new(MEDIA_TYPE_LAYER, layer, data.len() as u64)];
        let manifest = txn.put_image(&config, layers).unwrap();
        txn.commit();
        manifest.digest
    };
    let runtime = LocalRuntime::open(&home).unwrap();
    let tokio = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let prepared = tokio.block_on(runtime.prepare(&manifest));
    canary.check();
    let rootfs = home.join("rootfs");
    if prepared.is_ok() {
        assert!(
            rootfs.join(manifest.hex()).is_dir(),
            "prepared, yet no root"
        );
    }
    let left: Vec<String> = listing(&rootfs)
        .into_iter()
        .filter(|p| p.starts_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "unpacking left {left:?} behind");
}

/// Bakes `context` into a store under `work/home` with a fixed tag, epoch and no build args.
fn bake(work: &Path, context: &Path) -> Result<graven::bake::Baked, graven::bake::BakeError> {
    let options = graven::bake::BakeOptions {
        context: context.to_owned(),
        containerfile: None,
        tag: "fuzz".to_owned(),
        build_args: BTreeMap::new(),
        epoch: 0,
        target: None,
        no_cache: false,
        secrets: Default::default(),
    };
    graven::bake::bake(&work.join("home"), &options, &mut |_| {})
}

/// Writes an OCI layout at `dir` whose one image has `layer` as its only layer.
pub fn write_oci_layout(dir: &Path, layer: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let digest = Digest::of(bytes);
        fs::write(blobs.join(digest.hex()), bytes).unwrap();
        Descriptor::new("", digest, bytes.len() as u64)
    };
    let layer = Descriptor {
        media_type: MEDIA_TYPE_LAYER.to_owned(),
        ..put(layer)
    };
    let mut config = ImageConfig {
        architecture: graven::store::host_architecture().to_owned(),
        ..ImageConfig::default()
    };
    config.rootfs.diff_ids.push(layer.digest.clone());
    let config = Descriptor {
        media_type: MEDIA_TYPE_CONFIG.to_owned(),
        ..put(&to_canonical_json(&config))
    };
    let mut manifest = Descriptor {
        media_type: MEDIA_TYPE_MANIFEST.to_owned(),
        ..put(&to_canonical_json(&Manifest::new(config, vec![layer])))
    };
    manifest.set_annotation(REF_NAME, "latest");
    let index = ImageIndex {
        manifests: vec![manifest],
        ..ImageIndex::default()
    };
    fs::write(dir.join("index.json"), to_canonical_json(&index)).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Files that must outlive every input: `graven-fuzz-canary/` in the temp dir, which is where
/// bakes make their temp roots, so a layer path like `../graven-fuzz-canary/file` aims at it.
pub struct Canary {
    dir: PathBuf,
}

/// The canary's files and their contents.
const CANARY_FILES: &[(&str, &str)] = &[("file", "canary\n"), ("dir/file", "canary in a dir\n")];

impl Canary {
    pub fn plant() -> Canary {
        let dir = std::env::temp_dir().join("graven-fuzz-canary");
        for (name, content) in CANARY_FILES {
            let path = dir.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, content).unwrap();
        }
        Canary { dir }
    }

    pub fn check(&self) {
        for (name, content) in CANARY_FILES {
            let path = self.dir.join(name);
            let found = fs::read_to_string(&path).ok();
            assert_eq!(
                found.as_deref(),
                Some(*content),
                "{} outside the bake was changed or removed",
                path.display()
            );
        }
    }
}

/// The relative paths under `root`, except lock files (taking a lock creates its file).
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if rel.ends_with(".lock") {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
            out.push(rel);
        }
    }
    out.sort();
    out
}

/// Paths an image holds (issue 10, items 1 and 6), from a small script: `f`, `d`, `s`, `h`
/// lines make a layer (file, directory, symlink, hard link: `s NAME TARGET`, `h NAME SOURCE`;
/// a whiteout is a file named `.wh.*`), unpacked by `store::unpack_tar`; then `w PATH` makes
/// a WORKDIR and `r PATH` reads a file (as USER's passwd lookup does) inside the root. `$S` in
/// a line is the sentinel dir beside the root, `$W` the dir holding both. Whatever the script:
/// the sentinel's files are as they were, nothing appears beside the root, the root is still
/// there, and no read returns the sentinel's secret.
pub fn image_paths(data: &[u8]) {
    use graven::store::inroot;
    const SECRET: &str = "sentinel-secret";
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    let sentinel = work.path().join("sentinel");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(sentinel.join("d")).unwrap();
    fs::write(sentinel.join("file"), SECRET).unwrap();
    fs::write(sentinel.join("d/file"), SECRET).unwrap();
    let before = tree_of(&sentinel);
    let expand = |text: &str| {
        text.replace("$S", &sentinel.to_string_lossy())
            .replace("$W", &work.path().to_string_lossy())
    };
    enum Ask {
        Workdir(String),
        Read(String),
    }
    let mut builder = tar::Builder::new(Vec::new());
    let mut asks = Vec::new();
    for line in text.lines().take(64) {
        let mut parts = line.splitn(3, ' ');
        let (op, name, link) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            expand(parts.next().unwrap_or("")),
        );
        let kind = match op {
            "f" => tar::EntryType::Regular,
            "d" => tar::EntryType::Directory,
            "s" => tar::EntryType::Symlink,
            "h" => tar::EntryType::Link,
            "w" => {
                asks.push(Ask::Workdir(expand(name)));
                continue;
            }
            "r" => {
                asks.push(Ask::Read(expand(name)));
                continue;
            }
            _ => continue,
        };
        let name = expand(name);
        if name.len() > 99 || link.len() > 99 {
            continue;
        }
        append_empty(&mut builder, kind, &name, &link);
    }
    let layer = builder.into_inner().unwrap();
    let _ = graven::store::unpack_tar(layer.as_slice(), &root);
    for ask in asks {
        match ask {
            Ask::Workdir(path) => {
                let _ = inroot::create_dir_all(&root, Path::new(&path));
            }
            Ask::Read(path) => {
                if let Ok(Some(bytes)) = graven::sandbox::root::read_file(&root, &path) {
                    assert_ne!(bytes, SECRET.as_bytes(), "{path} read the sentinel's file");
                }
            }
        }
    }
    assert!(root.is_dir(), "the root was removed");
    assert_eq!(
        tree_of(&sentinel),
        before,
        "the sentinel beside the root changed"
    );
    let mut beside: Vec<String> = fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(
        beside,
        ["root", "sentinel"],
        "something was made beside the root"
    );
}

/// Every path under `dir` (not following symlinks) with its content, for files.
/// Appends an empty entry of `kind` named `name` (with `link` as its link target), header by
/// header: `tar::Builder` refuses some of the names the escape tests need (`..`, `.wh...`).
pub fn append_empty(
    builder: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &str,
    link: &str,
) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(0);
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_cksum();
    builder.append(&header, &[][..]).unwrap();
}

fn tree_of(dir: &Path) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(here) = stack.pop() {
        let Ok(entries) = fs::read_dir(&here) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(dir).unwrap().display().to_string();
            if meta.is_dir() {
                stack.push(path);
                out.insert(rel, None);
            } else {
                out.insert(rel, fs::read_to_string(&path).ok());
            }
        }
    }
    out
}

/// A TCP syslog stream as the listener takes it: the first byte sets the frame limit (small
/// ones reach the oversize paths), the second where the stream is cut in two. Whatever the
/// bytes, cutting the stream anywhere, or feeding it a byte at a time, gives the same frames
/// and the same refusals in the same order; no frame is longer than the limit; the bytes held
/// stay within the limit and a header; every frame parses or is refused by kind, and a
/// parsed message is never longer than its frame.
pub fn syslog_stream(data: &[u8]) {
    use graven::logs::syslog::{BadInput, Deframer, Framing};
    let Some((&[limit, cut], stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let limit = 8 + limit as usize * 4;
    type Out = Vec<Result<(Vec<u8>, Framing), BadInput>>;
    let feed = |pieces: &mut dyn Iterator<Item = &[u8]>| -> Out {
        let mut deframer = Deframer::new(limit);
        let mut out = Vec::new();
        let mut emit = |r: Result<(&[u8], Framing), BadInput>| {
            out.push(r.map(|(frame, framing)| (frame.to_vec(), framing)))
        };
        for piece in pieces {
            deframer.push(piece, &mut emit);
            assert!(
                deframer.buffered() <= limit + 32,
                "the deframer holds {} bytes, over its limit of {limit}",
                deframer.buffered()
            );
        }
        deframer.finish(&mut emit);
        out
    };
    let whole = feed(&mut std::iter::once(stream));
    let cut = (cut as usize).min(stream.len());
    let (a, b) = stream.split_at(cut);
    assert_eq!(
        feed(&mut [a, b].into_iter()),
        whole,
        "cutting the stream at {cut} changed what it holds"
    );
    assert_eq!(
        feed(&mut stream.chunks(1)),
        whole,
        "a byte at a time changed what the stream holds"
    );
    let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    for (frame, _) in whole.iter().flatten() {
        assert!(
            frame.len() <= limit,
            "a frame of {} bytes passed a limit of {limit}",
            frame.len()
        );
        if let Ok(parsed) = graven::logs::syslog::parse::parse(frame, now) {
            assert!(parsed.message.len() <= frame.len());
        }
    }
}
