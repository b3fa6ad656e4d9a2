//! The build context: which files COPY and ADD may read (`.dockerignore`, nothing outside the
//! context directory, no symlink leading out of it) and the layer entries they make, with
//! normalized owners and modes. ADD of a local tar archive unpacks it, refusing entries that
//! would land outside the destination. `COPY --from` reads an unpacked stage's root instead
//! (`collect_from_root`), every source resolved inside that root by the kernel; heredocs
//! become files of their own (`inline_files`).

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use std::os::unix::fs::MetadataExt;

use globset::{Glob, GlobMatcher};

use super::tree::{Entry, EntryKind};

/// `.dockerignore` patterns in file order; the last one that matches decides.
#[derive(Debug, Default)]
pub struct Ignore {
    rules: Vec<(GlobMatcher, bool)>,
}

impl Ignore {
    /// Parses `.dockerignore` text (Docker's rules: `#` comments, `!` exceptions, `**`).
    pub fn parse(text: &str) -> Result<Ignore, String> {
        let mut rules = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exception, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let pattern = clean_pattern(pattern);
            if pattern.is_empty() {
                continue;
            }
            let glob = globset::GlobBuilder::new(&pattern)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!(".dockerignore pattern {line:?}: {e}"))?;
            rules.push((glob.compile_matcher(), exception));
        }
        Ok(Ignore { rules })
    }

    /// Whether `path` (relative to the context, `/`-separated) is excluded: a pattern
    /// matches a path or any directory above it.
    pub fn excluded(&self, path: &str) -> bool {
        let mut excluded = false;
        for (matcher, exception) in &self.rules {
            let mut candidate = Some(path);
            let mut hit = false;
            while let Some(p) = candidate {
                if matcher.is_match(p) {
                    hit = true;
                    break;
                }
                candidate = p.rsplit_once('/').map(|(parent, _)| parent);
            }
            if hit {
                excluded = !exception;
            }
        }
        excluded
    }

    pub fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|(_, exception)| *exception)
    }
}

/// Docker cleans patterns like paths: no leading `/` or `./`, no `..` above the root.
fn clean_pattern(pattern: &str) -> String {
    super::plan::absolute("/", pattern)[1..].to_owned()
}

/// How COPY/ADD writes owners and modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    pub chmod: Option<u32>,
}

impl Ownership {
    fn file_mode(&self, mode: u32) -> u32 {
        self.chmod
            .unwrap_or(if mode & 0o111 != 0 { 0o755 } else { 0o644 })
    }
    fn dir_mode(&self) -> u32 {
        self.chmod.unwrap_or(0o755)
    }
}

pub struct Context {
    root: PathBuf,
    canonical: PathBuf,
    ignore: Ignore,
}

/// Entries for one COPY/ADD, and the temp directory holding unpacked archive files.
pub struct Collected {
    pub entries: Vec<Entry>,
    pub unpacked: Vec<tempfile::TempDir>,
}

impl Context {
    pub fn open(root: &Path) -> Result<Context, String> {
        let canonical =
            fs::canonicalize(root).map_err(|e| format!("build context {}: {e}", root.display()))?;
        let ignore = match fs::read_to_string(root.join(".dockerignore")) {
            Ok(text) => Ignore::parse(&text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ignore::default(),
            Err(e) => return Err(format!(".dockerignore: {e}")),
        };
        Ok(Context {
            root: root.to_owned(),
            canonical,
            ignore,
        })
    }

    /// Checks a source and returns its context-relative path.
    fn relative(&self, source: &str) -> Result<String, String> {
        if source.starts_with('/') {
            return Err(format!(
                "source {source:?} is an absolute path: sources are relative to the build context"
            ));
        }
        let mut parts: Vec<&str> = Vec::new();
        for component in Path::new(source).components() {
            match component {
                Component::Normal(p) => parts.push(p.to_str().unwrap_or_default()),
                Component::CurDir => {}
                Component::ParentDir => {
                    if parts.pop().is_none() {
                        return Err(format!("source {source:?} is outside the build context"));
                    }
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(format!("source {source:?} is outside the build context"));
                }
            }
        }
        Ok(parts.join("/"))
    }

    /// Resolves a relative path inside the context, refusing symlinks that lead out of it.
    fn resolve(&self, source: &str, rel: &str) -> Result<PathBuf, String> {
        let path = self.root.join(rel);
        let canonical = match fs::canonicalize(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(if fs::symlink_metadata(&path).is_ok() {
                    format!("source {source:?} is a symlink to a missing file")
                } else {
                    format!("source {source:?} does not exist in the build context")
                });
            }
            Err(e) => return Err(format!("source {source:?}: {e}")),
        };
        if !canonical.starts_with(&self.canonical) {
            return Err(format!(
                "source {source:?} leads outside the build context through a symlink"
            ));
        }
        Ok(canonical)
    }

    /// Every non-excluded path in the context, for wildcard sources.
    fn all_paths(&self) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut stack = vec![(self.root.clone(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let read = fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for child in read {
                let child = child.map_err(|e| format!("{}: {e}", dir.display()))?;
                let name = child.file_name().to_string_lossy().into_owned();
                let rel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let is_dir = child.file_type().map(|t| t.is_dir()).unwrap_or(false);
                let excluded = self.ignore.excluded(&rel);
                // An excluded directory is only worth entering when an exception may
                // bring back something inside it.
                if is_dir && (!excluded || self.ignore.has_exceptions()) {
                    stack.push((child.path(), rel.clone()));
                }
                if !excluded {
                    out.push(rel);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The entries COPY (or ADD when `add`) of `sources` to `dest` makes.
    pub fn collect(
        &self,
        add: bool,
        sources: &[String],
        dest: &str,
        own: Ownership,
    ) -> Result<Collected, String> {
        let mut matched: Vec<(String, String)> = Vec::new();
        let mut wildcard = false;
        for source in sources {
            if add && (source.contains("://") || source.starts_with("git@")) {
                return Err(format!(
                    "ADD {source}: remote sources are not supported: fetch them in the build stage"
                ));
            }
            let rel = self.relative(source)?;
            if rel.contains(['*', '?', '[']) {
                wildcard = true;
                let glob = Glob::new(&rel)
                    .map_err(|e| format!("source pattern {source:?}: {e}"))?
                    .compile_matcher();
                let before = matched.len();
                for path in self.all_paths()? {
                    if glob.is_match(&path) {
                        matched.push((source.clone(), path));
                    }
                }
                if matched.len() == before {
                    return Err(format!(
                        "source {source:?} matches no file in the build context"
                    ));
                }
            } else {
                if !rel.is_empty() && self.ignore.excluded(&rel) {
                    return Err(format!("source {source:?} is excluded by .dockerignore"));
                }
                matched.push((source.clone(), rel));
            }
        }
        let into_dir = dest.ends_with('/') || matched.len() > 1 || wildcard;
        let dest = dest.trim_end_matches('/');
        let dest_rel = dest.trim_start_matches('/');
        let mut collected = Collected {
            entries: Vec::new(),
            unpacked: Vec::new(),
        };
        for (source, rel) in matched {
            let path = self.resolve(&source, &rel)?;
            let meta = fs::metadata(&path).map_err(|e| format!("source {source:?}: {e}"))?;
            if meta.is_dir() {
                if !dest_rel.is_empty() {
                    collected.entries.push(dir_entry(dest_rel, own));
                }
                self.walk(&path, &rel, dest_rel, own, &mut collected.entries)?;
            } else if add && is_archive(&path) {
                if !dest_rel.is_empty() {
                    collected.entries.push(dir_entry(dest_rel, own));
                }
                let unpacked =
                    unpack_archive(&source, &path, dest_rel, own, &mut collected.entries)?;
                collected.unpacked.push(unpacked);
            } else {
                let name = rel.rsplit('/').next().unwrap_or(&rel);
                let target = if into_dir {
                    join(dest_rel, name)
                } else {
                    dest_rel.to_owned()
                };
                if target.is_empty() {
                    return Err(format!("COPY {source} to / needs a file name: use /{name}"));
                }
                collected.entries.push(Entry {
                    path: target,
                    kind: EntryKind::File {
                        source: path,
                        size: meta.len(),
                    },
                    mode: own.file_mode(meta.permissions().mode()),
                    uid: own.uid,
                    gid: own.gid,
                });
            }
        }
        Ok(collected)
    }

    /// The contents of a source directory, placed under `dest` (the directory itself is not
    /// copied, as in Docker). Symlinks are copied as symlinks, never followed.
    fn walk(
        &self,
        dir: &Path,
        rel: &str,
        dest: &str,
        own: Ownership,
        out: &mut Vec<Entry>,
    ) -> Result<(), String> {
        let read = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for child in read {
            let child = child.map_err(|e| format!("{}: {e}", dir.display()))?;
            let name = child.file_name().to_string_lossy().into_owned();
            let child_rel = join(rel, &name);
            let target = join(dest, &name);
            let meta = fs::symlink_metadata(child.path())
                .map_err(|e| format!("{}: {e}", child.path().display()))?;
            let excluded = self.ignore.excluded(&child_rel);
            if meta.is_dir() {
                if excluded && !self.ignore.has_exceptions() {
                    continue;
                }
                let before = out.len();
                self.walk(&child.path(), &child_rel, &target, own, out)?;
                if !excluded || out.len() > before {
                    out.push(dir_entry(&target, own));
                }
                continue;
            }
            if excluded {
                continue;
            }
            let Some(kind) = leaf_kind(&child.path(), &meta)? else {
                continue;
            };
            let mode = match kind {
                EntryKind::Symlink(_) => 0o777,
                _ => own.file_mode(meta.permissions().mode()),
            };
            out.push(Entry {
                path: target,
                kind,
                mode,
                uid: own.uid,
                gid: own.gid,
            });
        }
        Ok(())
    }
}

/// What `COPY --from` does to owners and modes: without `--chown` a file keeps the owner it
/// has in the stage, as in BuildKit; without `--chmod` its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FromOwnership {
    pub chown: Option<(u32, u32)>,
    pub chmod: Option<u32>,
}

impl FromOwnership {
    fn entry(&self, path: String, kind: EntryKind, meta: &fs::Metadata) -> Entry {
        let (uid, gid) = self.chown.unwrap_or((meta.uid(), meta.gid()));
        let mode = match (&kind, self.chmod) {
            (EntryKind::Symlink(_), _) => 0o777,
            (_, Some(chmod)) => chmod,
            (_, None) => meta.mode() & 0o7777,
        };
        Entry {
            path,
            kind,
            mode,
            uid,
            gid,
        }
    }
}

/// The entries `COPY --from` of `sources` (paths in the stage, absolute or relative to its
/// `/`, wildcards allowed) to `dest` makes, read from `root`, the stage's unpacked root.
///
/// A source is resolved by the kernel inside `root` (openat2 `RESOLVE_IN_ROOT`), so a
/// symlink in the stage (`/app -> /etc`) leads to the stage's `/etc`, never the host's; the
/// path the kernel reached is then read back, free of symlinks. Below it, directories are
/// walked without following anything (symlinks are copied as symlinks), so every host path an
/// entry names is a real path inside `root`, which nobody else writes (a private temp dir).
pub fn collect_from_root(
    root: &Path,
    sources: &[String],
    dest: &str,
    own: FromOwnership,
) -> Result<Vec<Entry>, String> {
    let root_fd =
        crate::sandbox::root::open_root(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let real_root = fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut matched: Vec<(String, String)> = Vec::new();
    let mut wildcard = false;
    for source in sources {
        let rel = super::plan::absolute("/", source)[1..].to_owned();
        if rel.contains(['*', '?', '[']) {
            wildcard = true;
            let before = matched.len();
            for path in glob_in_root(&root_fd, &real_root, &rel)? {
                matched.push((source.clone(), path));
            }
            if matched.len() == before {
                return Err(format!("source {source:?} matches no file in the stage"));
            }
        } else {
            matched.push((source.clone(), rel));
        }
    }
    let into_dir = dest.ends_with('/') || matched.len() > 1 || wildcard;
    let dest_rel = dest.trim_end_matches('/').trim_start_matches('/');
    let mut out = Vec::new();
    for (source, rel) in matched {
        let real = resolve_in_root(&root_fd, &real_root, &rel)
            .map_err(|e| format!("source {source:?} in the stage: {e}"))?;
        let meta = fs::metadata(&real).map_err(|e| format!("source {source:?}: {e}"))?;
        if meta.is_dir() {
            // The contents are copied, not the directory itself; the destination directory
            // is made as root's (or --chown's), as Docker makes it.
            if !dest_rel.is_empty() {
                out.push(Entry {
                    path: dest_rel.to_owned(),
                    kind: EntryKind::Dir,
                    mode: own.chmod.unwrap_or(0o755),
                    uid: own.chown.map_or(0, |(u, _)| u),
                    gid: own.chown.map_or(0, |(_, g)| g),
                });
            }
            walk_root(&real, dest_rel, own, &mut out)?;
        } else if meta.is_file() {
            let name = rel.rsplit('/').next().unwrap_or(&rel);
            let target = if into_dir {
                join(dest_rel, name)
            } else {
                dest_rel.to_owned()
            };
            if target.is_empty() {
                return Err(format!("COPY {source} to / needs a file name: use /{name}"));
            }
            let kind = EntryKind::File {
                source: real,
                size: meta.len(),
            };
            out.push(own.entry(target, kind, &meta));
        } else {
            return Err(format!(
                "source {source:?} is not a file or a directory: COPY --from copies files, \
                 directories and the links inside directories"
            ));
        }
    }
    Ok(out)
}

/// The real host path (no symlink in it) of `rel` resolved inside the root.
fn resolve_in_root(
    root_fd: &std::os::fd::OwnedFd,
    real_root: &Path,
    rel: &str,
) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    let fd = crate::sandbox::root::open_in(root_fd, rel, rustix::fs::OFlags::PATH)?;
    let real = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if real != real_root && !real.starts_with(real_root) {
        return Err(io::Error::other("resolves outside the stage's root"));
    }
    Ok(real)
}

/// The paths below `root` a wildcard source matches; `*` and `?` stay within one path
/// component, as Go's `filepath.Match` (Docker's) has them.
fn glob_in_root(
    root_fd: &std::os::fd::OwnedFd,
    real_root: &Path,
    pattern: &str,
) -> Result<Vec<String>, String> {
    let matcher = globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("source pattern {pattern:?}: {e}"))?
        .compile_matcher();
    let parts: Vec<&str> = pattern.split('/').collect();
    let fixed = parts
        .iter()
        .take_while(|p| !p.contains(['*', '?', '[']))
        .count();
    let base = parts[..fixed].join("/");
    let Ok(start) = resolve_in_root(root_fd, real_root, &base) else {
        return Ok(Vec::new());
    };
    // Only as deep as the pattern has components; nothing is followed on the way.
    let mut out = Vec::new();
    let mut level = vec![(start, base)];
    for _ in fixed..parts.len() {
        let mut next = Vec::new();
        for (dir, rel) in level {
            let Ok(read) = fs::read_dir(&dir) else {
                continue;
            };
            for child in read.flatten() {
                let name = child.file_name().to_string_lossy().into_owned();
                let child_rel = join(&rel, &name);
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    next.push((child.path(), child_rel.clone()));
                }
                if child_rel.split('/').count() == parts.len() && matcher.is_match(&child_rel) {
                    out.push(child_rel);
                }
            }
        }
        level = next;
    }
    out.sort();
    Ok(out)
}

/// What a walked non-directory is in a layer: a symlink (its target as written) or a regular
/// file; sockets, fifos and devices are not content (`None`).
fn leaf_kind(path: &Path, meta: &fs::Metadata) -> Result<Option<EntryKind>, String> {
    Ok(if meta.file_type().is_symlink() {
        let link = fs::read_link(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Some(EntryKind::Symlink(link.to_string_lossy().into_owned()))
    } else if meta.is_file() {
        Some(EntryKind::File {
            source: path.to_owned(),
            size: meta.len(),
        })
    } else {
        None
    })
}

/// A stage's directory's contents under `dest`, following no symlink.
fn walk_root(
    dir: &Path,
    dest: &str,
    own: FromOwnership,
    out: &mut Vec<Entry>,
) -> Result<(), String> {
    let read = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for child in read {
        let child = child.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = child.file_name().to_string_lossy().into_owned();
        let target = join(dest, &name);
        let meta = fs::symlink_metadata(child.path())
            .map_err(|e| format!("{}: {e}", child.path().display()))?;
        let kind = if meta.is_dir() {
            walk_root(&child.path(), &target, own, out)?;
            EntryKind::Dir
        } else {
            let Some(kind) = leaf_kind(&child.path(), &meta)? else {
                continue;
            };
            kind
        };
        out.push(own.entry(target, kind, &meta));
    }
    Ok(())
}

/// COPY's heredocs as files (mode 0644 unless `--chmod`, owned as `--chown` says): under
/// `dest` when it is a directory (a trailing `/`, or several sources), else at `dest`. Their
/// contents are written to a temp dir the layer is written from.
pub fn inline_files(
    files: &[(String, String)],
    dest: &str,
    into_dir: bool,
    own: Ownership,
) -> Result<Collected, String> {
    let temp = tempfile::Builder::new()
        .prefix("graven-heredoc-")
        .tempdir()
        .map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let dest_rel = dest.trim_end_matches('/').trim_start_matches('/');
    let mut entries = Vec::new();
    for (n, (name, content)) in files.iter().enumerate() {
        let source = temp.path().join(n.to_string());
        fs::write(&source, content).map_err(|e| format!("heredoc {name}: {e}"))?;
        // The name is cleaned as a path in an empty root (BuildKit makes the file there
        // first), so `<<../x` is `x`, never a path above the destination.
        let clean = super::plan::absolute("/", name)[1..].to_owned();
        if clean.is_empty() {
            return Err(format!("heredoc <<{name}: its name is no file name"));
        }
        let path = if into_dir || dest_rel.is_empty() {
            join(dest_rel, &clean)
        } else {
            dest_rel.to_owned()
        };
        entries.push(Entry {
            path,
            kind: EntryKind::File {
                source,
                size: content.len() as u64,
            },
            mode: own.chmod.unwrap_or(0o644),
            uid: own.uid,
            gid: own.gid,
        });
    }
    Ok(Collected {
        entries,
        unpacked: vec![temp],
    })
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_owned()
    } else {
        format!("{a}/{b}")
    }
}

fn dir_entry(path: &str, own: Ownership) -> Entry {
    Entry {
        path: path.to_owned(),
        kind: EntryKind::Dir,
        mode: own.dir_mode(),
        uid: own.uid,
        gid: own.gid,
    }
}

/// A tar (plain or gzip): gzip's magic, or a first block whose header checksum is right
/// (old-style tars have no `ustar` magic).
fn is_archive(path: &Path) -> bool {
    let mut head = [0u8; 512];
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let n = file.read(&mut head).unwrap_or(0);
    if crate::store::is_gzip(path).unwrap_or(false) {
        return true;
    }
    if n < 512 || head.iter().all(|b| *b == 0) {
        return false;
    }
    let stored = std::str::from_utf8(&head[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let computed: u32 = head
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    stored == Some(computed)
}

/// ADD of a local archive: its entries under `dest`, their files unpacked to a temp dir.
/// Entries that would land outside `dest` (absolute, `..`, through a symlink of the archive,
/// hard links pointing out) are refused.
fn unpack_archive(
    source: &str,
    path: &Path,
    dest: &str,
    own: Ownership,
    out: &mut Vec<Entry>,
) -> Result<tempfile::TempDir, String> {
    let fail = |reason: String| format!("ADD {source}: {reason}");
    let reader = crate::store::decompressed(path).map_err(|e| fail(e.to_string()))?;
    let temp = tempfile::Builder::new()
        .prefix("graven-add-")
        .tempdir()
        .map_err(|e| fail(e.to_string()))?;
    // The archive is bounded as an image is: what it unpacks to, plus a block per entry.
    let limit = crate::store::max_image_size().map_err(|e| fail(e.to_string()))?;
    let too_large = |limit: u64| {
        fail(format!(
            "the archive unpacks to more than {limit} bytes (the bound is set by {})",
            crate::store::MAX_IMAGE_SIZE_VAR
        ))
    };
    let mut left = limit;
    let mut archive = tar::Archive::new(reader);
    let mut symlinks: Vec<String> = Vec::new();
    let mut files: std::collections::BTreeMap<String, (PathBuf, u64)> = Default::default();
    let entries = archive.entries().map_err(|e| fail(e.to_string()))?;
    for (n, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| fail(format!("not a readable tar archive: {e}")))?;
        left = left.checked_sub(512).ok_or_else(|| too_large(limit))?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let rel = archive_path(&name)
            .ok_or_else(|| fail(format!("archive entry {name:?} escapes the destination")))?;
        if rel.is_empty() {
            continue;
        }
        if let Some(link) = symlinks.iter().find(|l| rel.starts_with(&format!("{l}/"))) {
            return Err(fail(format!(
                "archive entry {name:?} passes through the archive's symlink {link:?}"
            )));
        }
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let target = join(dest, &rel);
        let kind = header.entry_type();
        let entry_kind = if kind.is_dir() {
            EntryKind::Dir
        } else if kind.is_symlink() {
            let link = link_name(&entry).map_err(|e| fail(e.to_string()))?;
            symlinks.push(rel.clone());
            EntryKind::Symlink(link)
        } else if kind.is_hard_link() {
            let link = link_name(&entry).map_err(|e| fail(e.to_string()))?;
            let link_rel = archive_path(&link).ok_or_else(|| {
                fail(format!(
                    "archive entry {name:?} links to {link:?} outside the destination"
                ))
            })?;
            let (file, size) = files.get(&link_rel).cloned().ok_or_else(|| {
                fail(format!(
                    "archive entry {name:?} links to {link:?}, which the archive does not hold"
                ))
            })?;
            EntryKind::File { source: file, size }
        } else if matches!(
            kind,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse
        ) {
            // A GNU sparse entry reads as the whole file, its holes as zeros (tar-rs expands
            // them), and is counted at that size.
            let file = temp.path().join(n.to_string());
            let mut out_file = File::create(&file).map_err(|e| fail(e.to_string()))?;
            let size = io::copy(&mut (&mut entry).take(left + 1), &mut out_file)
                .map_err(|e| fail(e.to_string()))?;
            left = left.checked_sub(size).ok_or_else(|| too_large(limit))?;
            files.insert(rel.clone(), (file.clone(), size));
            EntryKind::File { source: file, size }
        } else if kind.is_pax_global_extensions() {
            continue; // metadata for the whole archive (git archive's comment), not a file
        } else {
            // Devices and fifos are not content an image layer of graven's carries; an
            // unknown type may be a file in a form tar-rs does not read. Neither is dropped
            // silently.
            let what = match kind {
                tar::EntryType::Char => "a character device".to_owned(),
                tar::EntryType::Block => "a block device".to_owned(),
                tar::EntryType::Fifo => "a fifo".to_owned(),
                other => format!("of tar type {:?}", other.as_byte() as char),
            };
            return Err(fail(format!(
                "archive entry {name:?} is {what}: ADD takes files, directories and links"
            )));
        };
        let mode = match &entry_kind {
            EntryKind::Symlink(_) => 0o777,
            _ => own.chmod.unwrap_or(mode),
        };
        out.push(Entry {
            path: target,
            kind: entry_kind,
            mode,
            uid: own.uid,
            gid: own.gid,
        });
    }
    Ok(temp)
}

/// The target of a symlink or hard link entry (empty when the header has none).
fn link_name<R: Read>(entry: &tar::Entry<'_, R>) -> io::Result<String> {
    Ok(entry
        .link_name()?
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default())
}

/// A relative archive path cleaned of `./`, or `None` when it is absolute or climbs out.
fn archive_path(name: &str) -> Option<String> {
    if name.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(patterns: &str, cases: &[(&str, bool)]) {
        let ignore = Ignore::parse(patterns).unwrap();
        for (path, expected) in cases {
            assert_eq!(
                ignore.excluded(path),
                *expected,
                "{path:?} with patterns {patterns:?}"
            );
        }
    }

    #[test]
    fn dockerignore_semantics() {
        check(
            "# comment\ntarget\n*.md\n!README.md\n**/*.log\n/secret/\n./build/*.o\n",
            &[
                ("target", true),
                ("target/debug/x", true),
                ("notes.md", true),
                ("docs/notes.md", false),
                ("README.md", false),
                ("a.log", true),
                ("deep/er/b.log", true),
                ("secret/key", true),
                ("build/x.o", true),
                ("build/x.c", false),
                ("src/main.rs", false),
            ],
        );
        // The last matching pattern wins, so an exclusion after an exception excludes again.
        check(
            "*.txt\n!keep*.txt\nkeep-not.txt",
            &[
                ("a.txt", true),
                ("keep1.txt", false),
                ("keep-not.txt", true),
            ],
        );
        check(
            "dir\n!dir/keep",
            &[("dir/x", true), ("dir/keep", false), ("dir", true)],
        );
    }

    #[test]
    fn archive_paths() {
        assert_eq!(archive_path("./a/b/"), Some("a/b".to_owned()));
        assert_eq!(archive_path("../x"), None);
        assert_eq!(archive_path("a/../../x"), None);
        assert_eq!(archive_path("/etc/passwd"), None);
    }
}
