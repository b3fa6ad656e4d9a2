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
pub mod containerfile;
mod context;
pub mod mounts;
pub mod plan;
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
    #[error(transparent)]
    Parse(#[from] containerfile::ParseError),
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
    let path = containerfile_path(options);
    let file_name = path.display().to_string();
    let source = fs::read_to_string(&path).map_err(|source| BakeError::Read {
        path: path.clone(),
        source,
    })?;
    let parsed = containerfile::parse(&file_name, &source)?;
    let at = |line: usize| {
        let file = file_name.clone();
        move |reason: String| BakeError::Step { file, line, reason }
    };
    let stages = plan::stages(&parsed, &options.build_args).map_err(|e| at(e.line)(e.reason))?;
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
    let mut txn = store.transaction()?;
    let mut pending: Vec<(Digest, Record)> = Vec::new();
    let mut built: BTreeMap<usize, State> = BTreeMap::new();
    let mut step_no = 0;
    let mut cached_steps = 0;
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
            Base::Scratch => State {
                layers: Vec::new(),
                config: ImageConfig {
                    architecture: crate::store::host_architecture().to_owned(),
                    ..ImageConfig::default()
                },
                key: cache::key(None, &["FROM scratch", crate::store::host_architecture()]),
            },
            Base::Stage(parent) => built[parent].clone(),
            Base::Image(name) => {
                base_image(&mut txn, &options.context, name).map_err(at(stage.from_line))?
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
            let (key, found, collected) = prepare(
                &txn,
                &cache,
                &context,
                &mut file_hashes,
                now,
                &state,
                step,
                options.epoch,
            )
            .map_err(at(step.line))?;
            let cached = found.is_some();
            let record = match found {
                Some(record) => record,
                None => {
                    let inputs = run::Inputs {
                        home,
                        context: &options.context,
                        secrets: &options.secrets,
                        epoch: options.epoch,
                    };
                    let record = build(&mut txn, collected, &mut lower, &state, step, &inputs)
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
    let mut config = state.config;
    // A base image's build time would make the bake depend on it; graven writes none.
    config.created = None;
    let manifest = txn.put_image(&config, state.layers.clone())?;
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
        + state.layers.iter().map(|l| l.size).sum::<u64>();
    Ok(Baked {
        digest: manifest.digest,
        tag: options.tag.clone(),
        size,
        layers: state
            .layers
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
    })
}

fn config_size(store: &Store, manifest: &Digest) -> u64 {
    store
        .image(manifest)
        .map(|image| image.manifest.config.size)
        .unwrap_or(0)
}

/// FROM an image: `oci:PATH[:TAG]`, `oci-archive:PATH[:TAG]`, `docker-archive:PATH[:TAG]`,
/// a tag or digest in the store, or a path to any of those (relative to the context).
fn base_image(txn: &mut Transaction<'_>, context: &Path, name: &str) -> Result<State, String> {
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
            Err(StoreError::UnknownImage { .. }) => {
                let (path, tag) = split_path_tag(context, name);
                if !path.exists() {
                    return Err(format!(
                        "FROM {name}: no image of that name in the store and no such path in {}",
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
    Ok(State {
        layers,
        config,
        key: cache::key(None, &["FROM", digest.as_str()]),
    })
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
    step: &plan::Step,
    epoch: u64,
) -> Result<(Digest, Option<Record>, Option<context::Collected>), String> {
    let store = txn.store();
    let args = step.args.join("\n");
    let epoch = epoch.to_string();
    let action = format!("{:?}", step.action);
    let (key, collected) = match &step.action {
        Action::Copy {
            add,
            sources,
            dest,
            chown,
            chmod,
        } => {
            let own = ownership(store, state, chown.as_deref(), *chmod)?;
            let mut collected = context.collect(*add, sources, dest, own)?;
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

/// Builds the layer of a step whose key missed the cache.
fn build(
    txn: &mut Transaction<'_>,
    collected: Option<context::Collected>,
    lower: &mut LowerTree,
    state: &State,
    step: &plan::Step,
    inputs: &run::Inputs<'_>,
) -> Result<Record, String> {
    let epoch = inputs.epoch;
    let store = txn.store();
    let mut keep_alive = Vec::new();
    let mut run_root = None;
    let mut entries = match &step.action {
        Action::Config(_) => return Ok(Record { layer: None }),
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
            let output = run::run(
                store,
                &state.layers,
                &state.config.rootfs.diff_ids,
                &step.action,
                inputs,
            )?;
            let entries = output.entries;
            run_root = Some(output.root);
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
    let finished = tree::write_layer(store, &entries, epoch).map_err(|e| e.to_string())?;
    let diff_id = finished.diff_id.clone();
    let descriptor = finished.keep(txn).map_err(|e| e.to_string())?;
    lower.add_if_current(&state.layers, &entries);
    drop(keep_alive);
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
