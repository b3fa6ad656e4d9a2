//! Bake owns turning a Containerfile and its context into an image in the store: parsing the
//! Containerfile, planning the steps, building reproducible layers, and the layer cache.
//! It writes only through `store` and runs RUN steps only through `sandbox`; it knows nothing
//! of instances, services or deploys.
//!
//! Data flows `containerfile` (parse) → `plan` (expand, pure) → this file's executor, which
//! asks `cache` for each step and, on a miss, builds the layer (`context` for COPY/ADD, `run`
//! for RUN, `tree` for the tar). Everything a bake writes goes through one store transaction,
//! so a failed bake leaves the store as it was; cache entries are written only on success.

pub mod cache;
mod compress;
pub mod containerfile;
mod context;
pub mod mounts;
pub mod plan;
pub mod reproducible;
mod run;
mod tree;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::store::{
    Descriptor, Digest, ImageConfig, ImportKind, MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_GZIP, Store,
    StoreError, Transaction,
};
use cache::{Cache, LayerRecord, Record};
use context::{Context, Ownership};
use plan::{Action, Base};
use tree::{Entry, EntryKind, LowerTree};

#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// Transparent: the parse error already says file and line, and a display that also
    /// named it as the source would print them twice in a report of the error's chain.
    #[error(transparent)]
    Parse(#[from] containerfile::ParseError),
    #[error("{file}: {reason}")]
    Target { file: String, reason: String },
    #[error("{file}:{line}: {reason}")]
    Step {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("build context {path}: {reason}")]
    Context { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to bake.
#[derive(Debug, Clone)]
pub struct BakeOptions {
    /// The build context directory.
    pub context: PathBuf,
    /// The Containerfile; `None` means `Containerfile` (else `Dockerfile`) in the context.
    pub containerfile: Option<PathBuf>,
    pub tag: String,
    pub build_args: BTreeMap<String, String>,
    /// The mtime of every layer entry: 0, or `SOURCE_DATE_EPOCH` when the caller sets it.
    pub epoch: u64,
    /// The stage to bake (`--target`); `None` is the last one.
    pub target: Option<String>,
    /// Build every step, reading no cache entry (`--no-cache`); the new layers are cached.
    pub no_cache: bool,
    /// `--secret`s by id, for `RUN --mount=type=secret`.
    pub secrets: BTreeMap<String, mounts::SecretSource>,
}

/// Progress of a bake, one call per step start and end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress<'a> {
    Started {
        step: usize,
        total: usize,
        text: &'a str,
    },
    Finished {
        step: usize,
        total: usize,
        text: &'a str,
        cached: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BakedLayer {
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
}

/// The result of a bake, as `--json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Baked {
    pub digest: Digest,
    pub tag: String,
    pub size: u64,
    pub layers: Vec<BakedLayer>,
    pub cached_steps: usize,
    pub total_steps: usize,
    /// The manifest digest of each stage's base image, in the order the stages were built:
    /// what a tag or a registry's name resolved to, so the bake is pinned.
    pub bases: Vec<BakedBase>,
}

/// A stage's base image: the `FROM` as written (after ARG expansion) and the manifest it named.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BakedBase {
    pub from: String,
    pub digest: Digest,
}

/// The image as the steps have built it so far.
#[derive(Debug, Clone)]
struct State {
    layers: Vec<Descriptor>,
    config: ImageConfig,
    key: Digest,
}

impl State {
    fn push(&mut self, text: &str, layer: Option<&LayerRecord>) {
        let mut history = serde_json::Map::new();
        history.insert("created_by".to_owned(), text.into());
        match layer {
            Some(layer) => {
                self.layers.push(layer.descriptor.clone());
                self.config.rootfs.diff_ids.push(layer.diff_id.clone());
            }
            None => {
                history.insert("empty_layer".to_owned(), true.into());
            }
        }
        self.config.history.push(history.into());
    }
}

/// How a bake writes its layers: every entry's mtime, and whether the reproducibility rules
/// apply to RUN layers.
#[derive(Debug, Clone, Copy)]
struct Layering {
    epoch: u64,
    reproducible: bool,
}

/// Finds the Containerfile: the given path, else `Containerfile`, else `Dockerfile`.
pub fn containerfile_path(options: &BakeOptions) -> PathBuf {
    match &options.containerfile {
        Some(path) => path.clone(),
        None => {
            let containerfile = options.context.join("Containerfile");
            let dockerfile = options.context.join("Dockerfile");
            if !containerfile.exists() && dockerfile.exists() {
                dockerfile
            } else {
                containerfile
            }
        }
    }
}

/// Bakes the Containerfile into the store under `home` and tags the image.
pub fn bake(
    home: &Path,
    options: &BakeOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Baked, BakeError> {
    let store = Store::open(home)?;
    let cache = Cache::open(home);
    let mut txn = store.transaction()?;
    let unsaved = bake_in(home, &mut txn, &cache, options, progress)?;
    let Unsaved {
        path,
        config,
        layers,
        manifest,
        pending,
        file_hashes,
        cached_steps,
        total,
        bases,
    } = unsaved;
    let created_from = fs::canonicalize(&path)
        .unwrap_or(path.clone())
        .display()
        .to_string();
    let already = store.tags()?.into_iter().any(|t| {
        t.tag == options.tag
            && t.digest == manifest.digest
            && t.created_from.as_deref() == Some(created_from.as_str())
    });
    if !already {
        store.tag(&options.tag, &manifest.digest, Some(&created_from))?;
    }
    txn.commit();
    for (key, record) in pending {
        // A cache entry that cannot be written only costs a rebuild of that step later.
        let _ = cache.put(&key, &record);
    }
    let _ = file_hashes.save(home);
    let size = manifest.size
        + config_size(&store, &manifest.digest)
        + layers.iter().map(|l| l.size).sum::<u64>();
    Ok(Baked {
        digest: manifest.digest,
        tag: options.tag.clone(),
        size,
        layers: layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .map(|(l, d)| BakedLayer {
                digest: l.digest.clone(),
                size: l.size,
                diff_id: d.clone(),
            })
            .collect(),
        cached_steps,
        total_steps: total,
        bases,
    })
}

/// A bake's image written into a transaction, not yet tagged or committed.
struct Unsaved {
    path: PathBuf,
    config: ImageConfig,
    layers: Vec<Descriptor>,
    manifest: Descriptor,
    /// Cache entries to write once the transaction is committed.
    pending: Vec<(Digest, Record)>,
    file_hashes: cache::FileHashes,
    cached_steps: usize,
    total: usize,
    /// The images FROM and COPY --from named, by digest.
    bases: Vec<BakedBase>,
}

/// Runs every step of the bake, writing blobs through `txn`.
fn bake_in(
    home: &Path,
    txn: &mut Transaction<'_>,
    cache: &Cache,
    options: &BakeOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Unsaved, BakeError> {
    let path = containerfile_path(options);
    let file_name = path.display().to_string();
    let source = fs::read_to_string(&path).map_err(|source| BakeError::Read {
        path: path.clone(),
        source,
    })?;
    let parsed = containerfile::parse(&file_name, &source)?;
    let reproducible =
        reproducible::enabled(&source).map_err(|(line, reason)| BakeError::Step {
            file: file_name.clone(),
            line,
            reason,
        })?;
    let layering = Layering {
        epoch: options.epoch,
        reproducible,
    };
    let at = |line: usize| {
        let file = file_name.clone();
        move |reason: String| BakeError::Step { file, line, reason }
    };
    let mut stages =
        plan::stages(&parsed, &options.build_args).map_err(|e| at(e.line)(e.reason))?;
    if let Some(target) = &options.target {
        stages.select(target).map_err(|reason| BakeError::Target {
            file: file_name.clone(),
            reason,
        })?;
    }
    let context = Context::open(&options.context).map_err(|reason| BakeError::Context {
        path: options.context.clone(),
        reason,
    })?;
    let total: usize = stages
        .needed
        .iter()
        .map(|&i| 1 + stages.stages[i].instructions.len())
        .sum();
    let mut file_hashes = cache::FileHashes::load(home);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut pending: Vec<(Digest, Record)> = Vec::new();
    let mut gzips = compress::Compressions::default();
    let mut built: BTreeMap<usize, State> = BTreeMap::new();
    let mut step_no = 0;
    let mut cached_steps = 0;
    let mut bases = Vec::new();
    for &index in &stages.needed {
        let stage = &stages.stages[index];
        step_no += 1;
        progress(Progress::Started {
            step: step_no,
            total,
            text: &stage.from_text,
        });
        let added_before = txn.added();
        let mut state = match &stage.base {
            // As BuildKit starts a stage FROM scratch: the default PATH and `/` as the
            // working directory, so an image of a static binary runs the same way Docker's
            // does.
            Base::Scratch => State {
                layers: Vec::new(),
                config: ImageConfig {
                    architecture: crate::store::host_architecture().to_owned(),
                    config: crate::store::RuntimeConfig {
                        env: vec![format!("PATH={}", plan::DEFAULT_PATH)],
                        working_dir: Some("/".to_owned()),
                        ..Default::default()
                    },
                    ..ImageConfig::default()
                },
                key: cache::key(None, &["FROM scratch", crate::store::host_architecture()]),
            },
            Base::Stage(parent) => built[parent].clone(),
            Base::Image(name) => {
                let (state, digest) =
                    base_image(txn, &options.context, name).map_err(at(stage.from_line))?;
                bases.push(BakedBase {
                    from: name.clone(),
                    digest,
                });
                state
            }
        };
        let from_cached = txn.added() == added_before;
        cached_steps += usize::from(from_cached);
        progress(Progress::Finished {
            step: step_no,
            total,
            text: &stage.from_text,
            cached: from_cached,
        });
        let planned = plan::plan_stage(
            &parsed,
            stage,
            &state.config.config,
            &options.build_args,
            &stages.global_args,
        )
        .map_err(|e| at(e.line)(e.reason))?;
        let mut lower = LowerTree::default();
        for step in &planned.steps {
            step_no += 1;
            progress(Progress::Started {
                step: step_no,
                total,
                text: &step.text,
            });
            // `COPY --from`'s source, and the roots of `RUN --mount=type=bind,from=`: an
            // earlier stage (built: `needed` holds it and comes in file order) or an image,
            // imported like a FROM's.
            let mut from_state = |from: &Base, what: &str| -> Result<State, BakeError> {
                match from {
                    // Its files are read from its blobs: a gzip still running is waited for.
                    Base::Stage(source) => {
                        let mut state = built[source].clone();
                        gzips
                            .settle(txn, &mut state.layers, |_| true)
                            .map_err(|e| at(step.line)(e.to_string()))?;
                        Ok(state)
                    }
                    Base::Image(name) => {
                        let (state, digest) = base_image(txn, &options.context, name)
                            .map_err(|reason| at(step.line)(reason.replacen("FROM ", what, 1)))?;
                        bases.push(BakedBase {
                            from: name.clone(),
                            digest,
                        });
                        Ok(state)
                    }
                    Base::Scratch => Err(at(step.line)(format!(
                        "{what}scratch: scratch holds no file to copy"
                    ))),
                }
            };
            let (source, mount_sources) = match &step.action {
                Action::Copy {
                    from: Some(from), ..
                } => (Some(from_state(from, "COPY --from=")?), Vec::new()),
                Action::Run { bind_from, .. } => {
                    let mut sources = Vec::new();
                    for (number, from) in bind_from {
                        sources.push((*number, from_state(from, "--mount from=")?));
                    }
                    (None, sources)
                }
                _ => (None, Vec::new()),
            };
            let bind_keys: Vec<&str> = mount_sources.iter().map(|(_, s)| s.key.as_str()).collect();
            settle_for(txn, &mut gzips, &mut state, step).map_err(at(step.line))?;
            let (key, found, collected) = prepare(
                txn,
                cache,
                &context,
                &mut file_hashes,
                now,
                &state,
                source.as_ref(),
                &bind_keys,
                step,
                layering,
            )
            .map_err(at(step.line))?;
            let found = found.filter(|_| !options.no_cache);
            let cached = found.is_some();
            let record = match found {
                Some(record) => record,
                None => {
                    // The roots bind mounts name with `from=`, unpacked for this step only.
                    let mut bind_roots = BTreeMap::new();
                    let mut unpacked = Vec::new();
                    for (number, source) in &mount_sources {
                        let root = run::RunRoot::new().map_err(at(step.line))?;
                        txn.store()
                            .unpack_layers(
                                &source.layers,
                                &source.config.rootfs.diff_ids,
                                &root.path(),
                            )
                            .map_err(|e| at(step.line)(e.to_string()))?;
                        bind_roots.insert(*number, root.path());
                        unpacked.push(root);
                    }
                    let inputs = run::Inputs {
                        home,
                        context: &options.context,
                        secrets: &options.secrets,
                        epoch: options.epoch,
                        bind_roots: &bind_roots,
                    };
                    let record = build(
                        txn,
                        &mut gzips,
                        collected,
                        &mut lower,
                        &state,
                        source.as_ref(),
                        step,
                        &inputs,
                        layering,
                    )
                    .map_err(at(step.line))?;
                    pending.push((key.clone(), record.clone()));
                    record
                }
            };
            cached_steps += usize::from(cached);
            state.push(&step.text, record.layer.as_ref());
            state.key = key;
            progress(Progress::Finished {
                step: step_no,
                total,
                text: &step.text,
                cached,
            });
        }
        state.config.config = planned.config;
        built.insert(index, state);
    }
    let state = built
        .remove(stages.needed.last().expect("a file has a stage"))
        .expect("the last stage was built");
    // The manifest and the cache entries name only whole blobs.
    gzips.finish(txn)?;
    let mut layers = state.layers;
    gzips.settle(txn, &mut layers, |_| true)?;
    for (_, record) in &mut pending {
        if let Some(layer) = &mut record.layer {
            gzips.settle(txn, std::slice::from_mut(&mut layer.descriptor), |_| true)?;
        }
    }
    let mut config = state.config;
    // A base image's build time would make the bake depend on it; graven writes none.
    config.created = None;
    let manifest = txn.put_image(&config, layers.clone())?;
    Ok(Unsaved {
        path,
        config,
        layers,
        manifest,
        pending,
        file_hashes,
        cached_steps,
        total,
        bases,
    })
}

/// What `bake --check` found: one digest from two bakes from clean, or where they part.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checked {
    pub reproducible: bool,
    pub digest: Digest,
    /// The second bake's digest when it differs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second: Option<Digest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub difference: Option<Difference>,
}

/// The first difference between two bakes: the step whose layer differs (or the config), the
/// first path in it that differs, and how.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// The instruction whose layer differs; `None` when only the config does.
    pub step: Option<String>,
    pub path: Option<String>,
    pub first: String,
    pub second: String,
}

/// Bakes twice from clean (no cache entry read, none written, nothing tagged, every blob of
/// both bakes removed again) and compares the images. `progress` gets the round (1 or 2) with
/// each step.
pub fn check(
    home: &Path,
    options: &BakeOptions,
    progress: &mut dyn FnMut(usize, Progress<'_>),
) -> Result<Checked, BakeError> {
    let store = Store::open(home)?;
    // A cache in a temp dir: read empty, and dropped with what the two bakes put in it.
    let scratch = tempfile::Builder::new()
        .prefix("graven-check-")
        .tempdir()
        .map_err(|source| BakeError::Read {
            path: std::env::temp_dir(),
            source,
        })?;
    let cache = Cache::open(scratch.path());
    let clean = BakeOptions {
        no_cache: true,
        ..options.clone()
    };
    let mut first_txn = store.transaction()?;
    let first = bake_in(home, &mut first_txn, &cache, &clean, &mut |p| {
        progress(1, p)
    })?;
    let mut second_txn = store.transaction()?;
    let second = bake_in(home, &mut second_txn, &cache, &clean, &mut |p| {
        progress(2, p)
    })?;
    if first.manifest.digest == second.manifest.digest {
        return Ok(Checked {
            reproducible: true,
            digest: first.manifest.digest,
            second: None,
            difference: None,
        });
    }
    let difference = first_difference(&store, &first, &second)?;
    Ok(Checked {
        reproducible: false,
        digest: first.manifest.digest,
        second: Some(second.manifest.digest),
        difference: Some(difference),
    })
}

fn first_difference(
    store: &Store,
    first: &Unsaved,
    second: &Unsaved,
) -> Result<Difference, BakeError> {
    // The instruction of each layer: the history entries that are not empty layers, in order.
    let steps: Vec<String> = first
        .config
        .history
        .iter()
        .filter(|h| h.get("empty_layer").and_then(|v| v.as_bool()) != Some(true))
        .map(|h| {
            h.get("created_by")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    let pairs = first.layers.iter().zip(&second.layers).enumerate();
    for (index, (a, b)) in pairs {
        if a.digest == b.digest {
            continue;
        }
        let (a_entries, b_entries) = (
            tree::describe_layer(store, &a.digest)?,
            tree::describe_layer(store, &b.digest)?,
        );
        let paths: BTreeSet<&String> = a_entries.keys().chain(b_entries.keys()).collect();
        let described =
            |entry: Option<&String>| entry.cloned().unwrap_or_else(|| "absent".to_owned());
        let path = paths
            .into_iter()
            .find(|p| a_entries.get(*p) != b_entries.get(*p));
        return Ok(Difference {
            step: steps.get(index).cloned(),
            path: path.map(|p| format!("/{p}")),
            first: path.map_or_else(
                || "the same entries, in another order".to_owned(),
                |p| described(a_entries.get(p)),
            ),
            second: path.map_or_else(String::new, |p| described(b_entries.get(p))),
        });
    }
    let json = |config: &ImageConfig| serde_json::to_string(config).unwrap_or_default();
    Ok(Difference {
        step: None,
        path: None,
        first: json(&first.config),
        second: json(&second.config),
    })
}

fn config_size(store: &Store, manifest: &Digest) -> u64 {
    store
        .image(manifest)
        .map(|image| image.manifest.config.size)
        .unwrap_or(0)
}

/// FROM an image: `oci:PATH[:TAG]`, `oci-archive:PATH[:TAG]`, `docker-archive:PATH[:TAG]`,
/// a tag or digest in the store, an image in a registry (`HOST[:PORT]/NAME[:TAG][@DIGEST]`,
/// pulled into the bake's transaction unless the store holds its digest), or a path to any
/// of those (relative to the context). Returns the base's manifest digest with its state.
fn base_image(
    txn: &mut Transaction<'_>,
    context: &Path,
    name: &str,
) -> Result<(State, Digest), String> {
    let store = txn.store();
    let prefixed = [
        ("oci:", ImportKind::OciLayout),
        ("oci-archive:", ImportKind::OciArchive),
        ("docker-archive:", ImportKind::DockerArchive),
    ]
    .into_iter()
    .find_map(|(prefix, kind)| name.strip_prefix(prefix).map(|rest| (rest, kind)));
    let digest = match prefixed {
        Some((rest, kind)) => {
            let (path, tag) = split_path_tag(context, rest);
            txn.import(&path, kind, tag.as_deref())
                .map_err(|e| format!("FROM {name}: {e}"))?
        }
        None => match store.resolve(name) {
            Ok(digest) => digest,
            // A path in the context wins over a name that merely looks like a registry's.
            Err(StoreError::UnknownImage { .. })
                if !split_path_tag(context, name).0.exists() && remote(name)?.is_some() =>
            {
                let remote = remote(name)?.expect("checked just above");
                crate::registry::pull(txn, &remote, None)
                    .map_err(|e| {
                        // The registry's errors begin with the name, which FROM already says.
                        let text = e.to_string();
                        let text = text.strip_prefix(&format!("{name}: ")).unwrap_or(&text);
                        format!("FROM {name}: {text}")
                    })?
                    .digest
            }
            Err(StoreError::UnknownImage { .. }) => {
                let (path, tag) = split_path_tag(context, name);
                if !path.exists() {
                    return Err(format!(
                        "FROM {name}: no image of that name in the store and no such path in {}; an image in a registry is named with its host (127.0.0.1:5000/app:1, docker.io/library/debian:12)",
                        context.display()
                    ));
                }
                txn.import(&path, ImportKind::Detect, tag.as_deref())
                    .map_err(|e| format!("FROM {name}: {e}"))?
            }
            Err(e) => return Err(format!("FROM {name}: {e}")),
        },
    };
    let image = store
        .image(&digest)
        .map_err(|e| format!("FROM {name}: {e}"))?;
    let layers = image
        .manifest
        .layers
        .into_iter()
        .map(|mut layer| {
            // Docker's layer media types name the same bytes as OCI's.
            layer.media_type = match layer.media_type.as_str() {
                "application/vnd.docker.image.rootfs.diff.tar.gzip" => MEDIA_TYPE_LAYER_GZIP,
                "application/vnd.docker.image.rootfs.diff.tar" => MEDIA_TYPE_LAYER,
                other => other,
            }
            .to_owned();
            layer
        })
        .collect();
    // What the base's config says of how it was made is not true of the image baked from it.
    let mut config = image.config;
    config.other.clear();
    let key = cache::key(None, &["FROM", digest.as_str()]);
    Ok((
        State {
            layers,
            config,
            key,
        },
        digest,
    ))
}

/// `name` as an image in a registry, when its first component is a registry host.
fn remote(name: &str) -> Result<Option<crate::registry::RemoteRef>, String> {
    crate::registry::RemoteRef::parse(name).map_err(|e| format!("FROM {name}: {e}"))
}

/// `path:tag` when `path` exists (relative to the context) and `path:tag` does not.
fn split_path_tag(context: &Path, text: &str) -> (PathBuf, Option<String>) {
    let resolve = |p: &str| {
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_owned()
        } else {
            context.join(path)
        }
    };
    let whole = resolve(text);
    if !whole.exists() {
        // Tags hold colons too (`name:1`), so the path ends at the first colon that works.
        for (at, _) in text.match_indices(':') {
            if resolve(&text[..at]).exists() {
                return (resolve(&text[..at]), Some(text[at + 1..].to_owned()));
            }
        }
    }
    (whole, None)
}

/// The `--chown` value as uid and gid: numbers, or names from the image's passwd and group.
fn ownership(
    store: &Store,
    state: &State,
    chown: Option<&str>,
    chmod: Option<u32>,
) -> Result<Ownership, String> {
    let (uid, gid) = match chown {
        None => (0, 0),
        Some(user) => {
            let numeric = user
                .split(':')
                .all(|part| part.parse::<u32>().is_ok() || part == "root");
            // Names need the image's passwd and group files; numbers do not.
            let resolved = if numeric {
                crate::sandbox::user::resolve(user, "", "").map_err(|e| e.to_string())
            } else {
                let root = tempfile::Builder::new()
                    .prefix("graven-users-")
                    .tempdir()
                    .map_err(|e| e.to_string())?;
                tree::extract_files(
                    store,
                    &state.layers,
                    root.path(),
                    &["etc/passwd", "etc/group"],
                )
                .map_err(|e| e.to_string())?;
                run::resolve_user(root.path(), user)
            };
            resolved.map_err(|e| format!("--chown={user}: {e}"))?
        }
    };
    Ok(Ownership { uid, gid, chmod })
}

/// Works out a step's cache key (for COPY/ADD this reads and hashes the sources) and looks it
/// up; building the layer is left to `build` on a miss.
#[allow(clippy::too_many_arguments)]
fn prepare(
    txn: &Transaction<'_>,
    cache: &Cache,
    context: &Context,
    file_hashes: &mut cache::FileHashes,
    now: i64,
    state: &State,
    source: Option<&State>,
    bind_keys: &[&str],
    step: &plan::Step,
    layering: Layering,
) -> Result<(Digest, Option<Record>, Option<context::Collected>), String> {
    let store = txn.store();
    let args = step.args.join("\n");
    // The rules change what a RUN's layer holds, so switching them off is part of its key
    // (the default adds nothing: keys made before the rules existed stay valid).
    let epoch = match layering.reproducible {
        true => layering.epoch.to_string(),
        false => format!("{} reproducible=off", layering.epoch),
    };
    let action = format!("{:?}", step.action);
    let (key, collected) = match &step.action {
        // What a stage or image holds is named by its key, so the key is had without reading
        // a file of it; the heredocs' contents are in the action.
        Action::Copy { from: Some(_), .. } => {
            let source = source.ok_or("COPY --from without its source")?;
            let key = cache::key(
                Some(&state.key),
                &[&action, "from", source.key.as_str(), &args, &epoch],
            );
            (key, None)
        }
        Action::Copy {
            add,
            sources,
            dest,
            chown,
            chmod,
            from: None,
            files,
        } => {
            let own = ownership(store, state, chown.as_deref(), *chmod)?;
            let mut collected = if sources.is_empty() {
                context::Collected {
                    entries: Vec::new(),
                    unpacked: Vec::new(),
                }
            } else {
                context.collect(*add, sources, dest, own)?
            };
            if !files.is_empty() {
                let into_dir = dest.ends_with('/') || sources.len() + files.len() > 1;
                let inline = context::inline_files(files, dest, into_dir, own)?;
                collected.entries.extend(inline.entries);
                collected.unpacked.extend(inline.unpacked);
            }
            tree::normalize(&mut collected.entries);
            let hash = tree::content_hash(&collected.entries, &mut |path| {
                file_hashes.digest(path, now)
            })
            .map_err(|e| format!("reading sources: {e}"))?;
            let key = cache::key(Some(&state.key), &[&action, hash.as_str(), &args, &epoch]);
            (key, Some(collected))
        }
        Action::Run { flags, .. } => {
            // What a bind mount shows the step is an input like COPY's sources: its content
            // is in the key (a cache, secret or tmpfs mount's never is).
            let mut parts = vec![action.clone(), args.clone(), epoch.clone()];
            for source in mounts::context_binds(flags) {
                let own = Ownership {
                    uid: 0,
                    gid: 0,
                    chmod: None,
                };
                let mut collected = context
                    .collect(false, &[source.to_owned()], "/mount/", own)
                    .map_err(|e| format!("--mount source {source}: {e}"))?;
                tree::normalize(&mut collected.entries);
                let hash = tree::content_hash(&collected.entries, &mut |path| {
                    file_hashes.digest(path, now)
                })
                .map_err(|e| format!("reading --mount source {source}: {e}"))?;
                parts.push(hash.as_str().to_owned());
            }
            // A bind from a stage or an image: that stage's key says all it holds.
            parts.extend(bind_keys.iter().map(|key| format!("bind from {key}")));
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            (cache::key(Some(&state.key), &parts), None)
        }
        _ => (
            cache::key(Some(&state.key), &[&action, &args, &epoch]),
            None,
        ),
    };
    let found = cache.get(store, &key);
    Ok((key, found, collected))
}

/// Waits for the gzips of the layers below `step` that it reads the blobs of, and names those
/// layers by their blobs in `state`: all of them for a COPY --chown (it reads passwd and group
/// from the layers); for a RUN, those whose chain has no snapshot yet (the overlay's lower
/// dirs are made from them; a RUN that cannot use overlayfs settles the rest itself); for a
/// COPY or WORKDIR, which read path indexes, those without one.
fn settle_for(
    txn: &mut Transaction<'_>,
    gzips: &mut compress::Compressions,
    state: &mut State,
    step: &plan::Step,
) -> Result<(), String> {
    if !state.layers.iter().any(compress::is_placeholder) {
        return Ok(());
    }
    let result = match &step.action {
        Action::Copy { chown: Some(_), .. } => gzips.settle(txn, &mut state.layers, |_| true),
        // Their path indexes are written under the diff_id; one that could not be is read
        // from the layer.
        Action::Copy { .. } | Action::Workdir(_) => {
            let store = txn.store();
            let unindexed: Vec<bool> = state
                .layers
                .iter()
                .map(|l| compress::is_placeholder(l) && store.path_index(&l.digest).is_none())
                .collect();
            gzips.settle(txn, &mut state.layers, |index| unindexed[index])
        }
        Action::Run { .. } => {
            let store = txn.store();
            let chains = crate::store::snapshot::chain_ids(&state.config.rootfs.diff_ids);
            gzips.settle(txn, &mut state.layers, |index| {
                chains.get(index).is_none_or(|c| !store.has_snapshot(c))
            })
        }
        _ => Ok(()),
    };
    result.map_err(|e| e.to_string())
}

/// Builds the layer of a step whose key missed the cache.
#[allow(clippy::too_many_arguments)]
fn build(
    txn: &mut Transaction<'_>,
    gzips: &mut compress::Compressions,
    collected: Option<context::Collected>,
    lower: &mut LowerTree,
    state: &State,
    source: Option<&State>,
    step: &plan::Step,
    inputs: &run::Inputs<'_>,
    layering: Layering,
) -> Result<Record, String> {
    let Layering {
        epoch,
        reproducible,
    } = layering;
    let store = txn.store();
    let mut keep_alive = Vec::new();
    let mut normalised = None;
    let mut run_root = None;
    let mut upper = None;
    let mut entries = match &step.action {
        Action::Config(_) => return Ok(Record { layer: None }),
        Action::Copy {
            from: Some(_),
            sources,
            dest,
            chown,
            chmod,
            ..
        } => {
            let source = source.ok_or("COPY --from without its source")?;
            let own = ownership(store, state, chown.as_deref(), *chmod)?;
            let own = context::FromOwnership {
                chown: chown.is_some().then_some((own.uid, own.gid)),
                chmod: *chmod,
            };
            // The source's files are read from its layers unpacked in a private temp root,
            // as a RUN reads its lower layers.
            let root = run::RunRoot::new()?;
            store
                .unpack_layers(&source.layers, &source.config.rootfs.diff_ids, &root.path())
                .map_err(|e| e.to_string())?;
            let entries = context::collect_from_root(&root.path(), sources, dest, own)?;
            run_root = Some(root);
            entries
        }
        Action::Copy { .. } => {
            let collected = collected.ok_or("COPY without collected sources")?;
            keep_alive = collected.unpacked;
            collected.entries
        }
        Action::Workdir(path) => {
            lower
                .update(store, &state.layers)
                .map_err(|e| e.to_string())?;
            let rel = path.trim_start_matches('/');
            if rel.is_empty() || lower.paths.contains_key(rel) {
                return Ok(Record { layer: None });
            }
            vec![Entry {
                path: rel.to_owned(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
            }]
        }
        Action::Run { .. } => {
            // Without overlayfs the RUN unpacks every layer below it, so it waits for them all.
            let mut settled = || {
                let mut layers = state.layers.clone();
                gzips
                    .settle(txn, &mut layers, |_| true)
                    .map_err(|e| e.to_string())?;
                Ok(layers)
            };
            let output = run::run(
                store,
                &state.layers,
                &state.config.rootfs.diff_ids,
                &step.action,
                inputs,
                &mut settled,
            )?;
            let mut entries = output.entries;
            run_root = Some(output.root);
            upper = output.upper;
            if reproducible {
                let applied = reproducible::apply(&mut entries, epoch)
                    .map_err(|e| format!("applying the reproducibility rules: {e}"))?;
                normalised = Some(applied);
            }
            entries
        }
    };
    if !matches!(step.action, Action::Run { .. }) {
        lower
            .update(store, &state.layers)
            .map_err(|e| e.to_string())?;
        // Parent directories the lower layers lack are created, owned by root; existing
        // ones (or symlinks standing in for them) are left as they are.
        let present: BTreeSet<String> = entries.iter().map(|e| e.path.clone()).collect();
        let mut parents = BTreeSet::new();
        for entry in &entries {
            let mut path = entry.path.as_str();
            while let Some((parent, _)) = path.rsplit_once('/') {
                if !present.contains(parent) && !lower.paths.contains_key(parent) {
                    parents.insert(parent.to_owned());
                }
                path = parent;
            }
        }
        entries.extend(parents.into_iter().map(|path| Entry {
            path,
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
        }));
    }
    tree::normalize(&mut entries);
    tree::check_names(&entries)?;
    let dropped = normalised
        .as_ref()
        .map_or(&[][..], |n: &reproducible::Applied| n.dropped.as_slice());
    let below = &state.config.rootfs.diff_ids;
    // A big layer's gzip runs on the other cores while the next steps do; a small one is
    // written whole at once.
    let (descriptor, diff_id) = if tree::content_len(&entries) < tree::STAGE_FROM {
        let finished = tree::write_layer(store, &entries, epoch).map_err(|e| e.to_string())?;
        let diff_id = finished.diff_id.clone();
        let descriptor = finished.keep(txn).map_err(|e| e.to_string())?;
        if let Some(upper) = upper {
            // A snapshot not kept here costs only its unpacking when a later RUN needs it.
            let _ = run::keep_upper(store, upper, &entries, dropped, below, &diff_id, epoch);
        }
        (descriptor, diff_id)
    } else {
        // A RUN's upper dir is named by its tar's hash, made the layer's snapshot, and the
        // gzip reads the files from there: the tar is never written out uncompressed. Any
        // other big layer (or an upper dir that cannot be the snapshot) is staged first.
        let kept = match upper {
            Some(upper) => {
                let (diff_id, len) =
                    tree::tar_diff_id(&entries, epoch).map_err(|e| e.to_string())?;
                let _ = run::keep_upper(store, upper, &entries, dropped, below, &diff_id, epoch);
                let mut chain = below.clone();
                chain.push(diff_id.clone());
                store
                    .snapshot_tree(&chain)
                    .map(|snapshot| (diff_id, len, snapshot))
            }
            None => None,
        };
        match kept {
            Some((diff_id, len, snapshot)) => {
                let placeholder = gzips
                    .start_with(diff_id.clone(), len, || {
                        tree::compress_from_tree(
                            store,
                            entries.clone(),
                            epoch,
                            snapshot,
                            diff_id.clone(),
                        )
                    })
                    .map_err(|e| e.to_string())?;
                (placeholder, diff_id)
            }
            None => {
                let (staged, changes) =
                    tree::stage_layer(store, &entries, epoch).map_err(|e| e.to_string())?;
                let diff_id = staged.diff_id.clone();
                let placeholder = gzips
                    .start(txn, staged, changes)
                    .map_err(|e| e.to_string())?;
                (placeholder, diff_id)
            }
        }
    };
    lower.add_if_current(&state.layers, &entries);
    drop(keep_alive);
    drop(normalised);
    drop(run_root);
    Ok(Record {
        layer: Some(LayerRecord {
            descriptor,
            diff_id,
        }),
    })
}

/// Dropping cache entries and collecting garbage: the store's gc with the cache's layers and
/// the caller's (release) digests as extra roots.
pub fn gc(
    home: &Path,
    extra_roots: &[Digest],
    drop_cache: bool,
    dry_run: bool,
) -> Result<crate::store::GcReport, BakeError> {
    let store = Store::open(home)?;
    let cache = Cache::open(home);
    if drop_cache && !dry_run {
        cache.clear().map_err(|source| BakeError::Read {
            path: home.join("cache"),
            source,
        })?;
    }
    // A dry run with `drop_cache` counts what the cache alone keeps as gone.
    let mut roots = if drop_cache {
        Vec::new()
    } else {
        cache.roots()
    };
    roots.extend(extra_roots.iter().cloned());
    Ok(store.gc(&roots, dry_run)?)
}
