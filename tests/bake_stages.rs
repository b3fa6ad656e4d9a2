//! Multi-stage builds, heredocs and ONBUILD as Docker (BuildKit) reads them, baked end to end
//! by the real binary: `COPY --from` a stage, an index or an image (owners kept, symlinks
//! resolved inside the stage), `--target` and only the stages it needs, heredocs for RUN and
//! COPY, ONBUILD triggers stored as `OnBuild` and run in the child; and every misuse named by
//! file and line once, with the store as it was.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{graven, succeed};

/// A context holding busybox (the stages' shell) and `files`.
fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(support::busybox(), dir.path().join("busybox")).unwrap();
    for (name, content) in files {
        fs::write(dir.path().join(name), content).unwrap();
    }
    dir
}

/// A stage with busybox as /bin/sh and its applets.
const SHELL: &str =
    "COPY busybox /bin/busybox\nCOPY busybox /bin/sh\nRUN /bin/busybox --install -s /bin\n";

/// Writes `containerfile` and returns `graven bake --json --tag TAG <dir> <args>`.
fn bake(home: &Path, dir: &Path, tag: &str, containerfile: &str, args: &[&str]) -> Command {
    fs::write(dir.join("Containerfile"), containerfile).unwrap();
    let mut command = graven(home);
    command
        .args(["bake", "--json", "--tag", tag])
        .args(args)
        .arg(dir);
    command
}

fn baked(
    home: &Path,
    dir: &Path,
    tag: &str,
    containerfile: &str,
    args: &[&str],
) -> serde_json::Value {
    let out = succeed(&mut bake(home, dir, tag, containerfile, args));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every entry of every layer of `tag`: path, mode, owner, link target, short content.
fn listing(home: &Path, tag: &str) -> Vec<String> {
    let store = graven::store::Store::open(home).unwrap();
    let image = store.image(&store.resolve(tag).unwrap()).unwrap();
    let mut out = Vec::new();
    for layer in &image.manifest.layers {
        let blob = store.open_blob(&layer.digest).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            let mut content = String::new();
            if header.entry_type().is_file() && header.size().unwrap() < 100 {
                entry.read_to_string(&mut content).unwrap();
            }
            let link = entry
                .link_name()
                .unwrap()
                .map(|l| format!(" -> {}", l.display()))
                .unwrap_or_default();
            out.push(format!(
                "{} {:o} {}:{}{link}{}",
                entry.path().unwrap().display(),
                header.mode().unwrap(),
                header.uid().unwrap(),
                header.gid().unwrap(),
                if content.is_empty() {
                    String::new()
                } else {
                    format!(" {content:?}")
                }
            ));
        }
    }
    out
}

/// The image config of `tag`.
fn config(home: &Path, tag: &str) -> serde_json::Value {
    let store = graven::store::Store::open(home).unwrap();
    let image = store.image(&store.resolve(tag).unwrap()).unwrap();
    serde_json::to_value(&image.config.config).unwrap()
}

#[test]
fn copy_from_stages_keeps_owners_resolves_links_in_the_stage_and_builds_only_what_is_needed() {
    let home = tempfile::tempdir().unwrap();
    let dir = context(&[("f", "hi\n")]);
    let containerfile = format!(
        "FROM scratch AS build\n{SHELL}COPY --chown=5:6 --chmod=0640 f /out/sub/f\nRUN mkdir -p /etc \
         && ln -s sub/f /out/link && echo stage > /etc/only-in-stage && ln -s /etc /escape && ln -s /out /lnk \
         && echo a > /out/a.txt && echo b > /out/b.txt && echo c > /out/c.md\n\
         FROM scratch AS broken\nCOPY not-in-the-context /x\n\
         FROM scratch\n\
         COPY --from=build /out /app/\n\
         COPY --from=0 --chown=7:8 /lnk/sub/f /via-link\n\
         COPY --from=build /escape/only-in-stage /etc/copied\n\
         COPY --from=build --chmod=0600 /out/*.txt /txt/\n\
         COPY --link --from=build /out/sub/ /sub\n"
    );
    let result = baked(home.path(), dir.path(), "multi:1", &containerfile, &[]);
    let listing = listing(home.path(), "multi:1");
    // The last stage's layers only: what it copied, each path as Docker's COPY --from makes
    // it (owners and modes kept unless --chown/--chmod; the directory's contents, not itself).
    assert_eq!(
        listing,
        [
            "app/ 755 0:0",
            "app/a.txt 644 0:0 \"a\\n\"",
            "app/b.txt 644 0:0 \"b\\n\"",
            "app/c.md 644 0:0 \"c\\n\"",
            "app/link 777 0:0 -> sub/f",
            "app/sub/ 755 0:0",
            "app/sub/f 640 5:6 \"hi\\n\"",
            "via-link 640 7:8 \"hi\\n\"",
            "etc/ 755 0:0",
            "etc/copied 644 0:0 \"stage\\n\"",
            "txt/ 755 0:0",
            "txt/a.txt 600 0:0 \"a\\n\"",
            "txt/b.txt 600 0:0 \"b\\n\"",
            "sub/ 755 0:0",
            "sub/f 640 5:6 \"hi\\n\"",
        ],
        "{listing:#?}"
    );
    // The broken stage was not needed, so it was not built; as a target it fails.
    assert_eq!(result["total_steps"], 6 + 6);
    let out = bake(
        home.path(),
        dir.path(),
        "t:1",
        &containerfile,
        &["--target", "broken"],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Containerfile:8:") && stderr.contains("not-in-the-context"),
        "{stderr}"
    );
    // --target build bakes the first stage alone, and from the cache.
    let build = baked(
        home.path(),
        dir.path(),
        "t:2",
        &containerfile,
        &["--target", "BUILD"],
    );
    assert_eq!(build["cached_steps"], build["total_steps"]);
    assert_eq!(build["layers"].as_array().unwrap().len(), 5);
    // A rebuild takes every COPY --from from the cache.
    let again = baked(home.path(), dir.path(), "multi:1", &containerfile, &[]);
    assert_eq!(again["digest"], result["digest"]);
    assert_eq!(again["cached_steps"], again["total_steps"]);
}

#[test]
fn copy_from_an_image_in_the_store() {
    let home = tempfile::tempdir().unwrap();
    let dir = context(&[]);
    baked(
        home.path(),
        dir.path(),
        "tools:1",
        &format!("FROM scratch\n{SHELL}RUN echo tool > /tool\n"),
        &[],
    );
    baked(
        home.path(),
        dir.path(),
        "user:1",
        "ARG TOOLS=tools:1\nFROM scratch\nCOPY --from=${TOOLS} /tool /bin/busybox /x/\n",
        &[],
    );
    let listing = listing(home.path(), "user:1");
    assert_eq!(listing[0], "x/ 755 0:0");
    assert_eq!(listing[2], "x/tool 644 0:0 \"tool\\n\"");
    assert!(listing[1].starts_with("x/busybox 755 0:0"), "{listing:?}");
}

#[test]
fn heredocs_for_run_and_copy_bake_as_buildkit_reads_them() {
    let home = tempfile::tempdir().unwrap();
    let dir = context(&[]);
    let containerfile = format!(
        "# syntax=docker/dockerfile:1\nFROM scratch\n{SHELL}ARG WHO=world\nENV WHERE=here\n\
RUN <<EOF\nmkdir -p /out\necho \"hello $WHO\" > /out/script\nEOF\n\
RUN <<-EOF\n\techo tabs > /out/tabs\n\tEOF\n\
RUN cat <<'EOF' > /out/quoted && cat <<EOF2 > /out/bare\n$WHO $WHERE\nEOF\n$WHO $WHERE\nEOF2\n\
RUN sh <<EOF\necho stdin > /out/stdin\nEOF\n\
COPY <<a.txt <<b.txt /dir/\nfirst $WHO\na.txt\nsecond\nb.txt\n\
COPY --chown=7:8 --chmod=0600 <<EOF /etc/conf\nwho=${{WHO}} \"$WHERE\" \\$HOME\nEOF\n\
COPY <<'EOF' /etc/raw\nwho=$WHO\nEOF\n"
    );
    baked(home.path(), dir.path(), "docs:1", &containerfile, &[]);
    let listing = listing(home.path(), "docs:1");
    let of = |path: &str| -> String {
        listing
            .iter()
            .find(|l| l.starts_with(&format!("{path} ")))
            .unwrap_or_else(|| panic!("{path} not in {listing:#?}"))
            .clone()
    };
    assert_eq!(of("out/script"), "out/script 644 0:0 \"hello world\\n\"");
    assert_eq!(of("out/tabs"), "out/tabs 644 0:0 \"tabs\\n\"");
    // A quoted delimiter leaves the body to the command as written; a bare one lets the
    // shell expand it (ARG and ENV are in the step's environment).
    assert_eq!(of("out/quoted"), "out/quoted 644 0:0 \"$WHO $WHERE\\n\"");
    assert_eq!(of("out/bare"), "out/bare 644 0:0 \"world here\\n\"");
    assert_eq!(of("out/stdin"), "out/stdin 644 0:0 \"stdin\\n\"");
    assert_eq!(of("dir/a.txt"), "dir/a.txt 644 0:0 \"first world\\n\"");
    assert_eq!(of("dir/b.txt"), "dir/b.txt 644 0:0 \"second\\n\"");
    assert_eq!(
        of("etc/conf"),
        "etc/conf 600 7:8 \"who=world \\\"here\\\" $HOME\\n\""
    );
    assert_eq!(of("etc/raw"), "etc/raw 644 0:0 \"who=$WHO\\n\"");
}

#[test]
fn onbuild_triggers_are_stored_run_in_the_child_and_not_inherited() {
    let home = tempfile::tempdir().unwrap();
    let dir = context(&[("marker", "from the child's context\n")]);
    baked(
        home.path(),
        dir.path(),
        "parent:1",
        &format!(
            "FROM scratch\n{SHELL}ONBUILD RUN echo triggered > /triggered\nonbuild COPY marker /marker\n"
        ),
        &[],
    );
    assert_eq!(
        config(home.path(), "parent:1")["OnBuild"],
        serde_json::json!(["RUN echo triggered > /triggered", "COPY marker /marker"])
    );
    // The triggers run right after FROM, before the child's own instructions.
    baked(
        home.path(),
        dir.path(),
        "child:1",
        "FROM parent:1\nRUN test -f /triggered && cp /marker /seen\n",
        &[],
    );
    let listing = listing(home.path(), "child:1");
    assert!(
        listing.contains(&"triggered 644 0:0 \"triggered\\n\"".to_owned()),
        "{listing:#?}"
    );
    assert!(
        listing.contains(&"seen 644 0:0 \"from the child's context\\n\"".to_owned()),
        "{listing:#?}"
    );
    assert_eq!(config(home.path(), "child:1").get("OnBuild"), None);
    // A grandchild runs none of them.
    let grandchild = baked(
        home.path(),
        dir.path(),
        "grandchild:1",
        "FROM child:1\n",
        &[],
    );
    assert_eq!(
        grandchild["layers"].as_array().unwrap().len(),
        listing_layers(home.path(), "child:1")
    );
}

fn listing_layers(home: &Path, tag: &str) -> usize {
    let store = graven::store::Store::open(home).unwrap();
    store
        .image(&store.resolve(tag).unwrap())
        .unwrap()
        .manifest
        .layers
        .len()
}

/// Every file under the store and the cache with its content.
fn store_files(home: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![home.join("store"), home.join("cache")];
    while let Some(dir) = stack.pop() {
        let Ok(read) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in read.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn misuse_names_file_and_line_once_and_leaves_the_store_as_it_was() {
    let home = tempfile::tempdir().unwrap();
    let dir = context(&[("fresh", "a new blob")]);
    let stage = format!("FROM scratch AS build\n{SHELL}RUN mkdir /etc && ln -s /etc /escape\n");
    baked(home.path(), dir.path(), "before:1", &stage, &[]);
    // Each case writes a fresh layer first, which the failure must take back.
    let fresh = "COPY fresh /fresh\n";
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            format!("{stage}FROM scratch\n{fresh}COPY --from=nosuch /x /x\n"),
            vec![],
            "Containerfile:8: COPY --from=nosuch: no image of that name in the store",
        ),
        (
            format!(
                "{stage}FROM scratch AS last\n{fresh}COPY --from=later /x /x\nFROM scratch AS later\n"
            ),
            vec![],
            "Containerfile:8: COPY --from=later: stage \"later\" is defined later in the file",
        ),
        (
            format!("{stage}FROM scratch AS self\nCOPY --from=self /x /x\n"),
            vec![],
            "Containerfile:7: COPY --from=self: a stage cannot copy from itself",
        ),
        (
            "FROM b AS a\nFROM a AS b\n".to_owned(),
            vec![],
            "Containerfile:1: FROM b: stage \"b\" is not defined before this FROM",
        ),
        (
            format!("{stage}FROM scratch\n"),
            vec!["--target", "nope"],
            "--target nope: no stage of that name; the stages are build",
        ),
        (
            format!("{stage}FROM scratch\n{fresh}COPY --from=build /escape/hostname /h\n"),
            vec![],
            "Containerfile:8: source \"/escape/hostname\" in the stage: No such file",
        ),
        (
            format!("{stage}FROM scratch\n{fresh}COPY --from=build /none* /n/\n"),
            vec![],
            "Containerfile:8: source \"/none*\" matches no file in the stage",
        ),
        (
            format!("{stage}FROM scratch\n{fresh}COPY --from=scratch /x /x\n"),
            vec![],
            "Containerfile:8: COPY --from=scratch: scratch holds no file to copy",
        ),
        (
            "FROM scratch\nONBUILD ONBUILD RUN x\n".to_owned(),
            vec![],
            "Containerfile:2: ONBUILD is not allowed as an ONBUILD trigger",
        ),
        (
            "FROM scratch\nONBUILD FROM x\n".to_owned(),
            vec![],
            "Containerfile:2: FROM is not allowed as an ONBUILD trigger",
        ),
        (
            format!("FROM scratch\n{fresh}RUN <<EOF\necho no end\n"),
            vec![],
            "Containerfile:3: unterminated heredoc <<EOF",
        ),
        (
            format!("FROM scratch\n{fresh}COPY <<EOF <<A\nx\nEOF\ny\nA\n"),
            vec![],
            "Containerfile:3: COPY cannot take a heredoc as its destination",
        ),
        (
            format!("FROM scratch\n{fresh}COPY --from=build --frm=x /x /x\n"),
            vec![],
            "Containerfile:3: unknown flag --frm for COPY",
        ),
    ];
    for (containerfile, args, wanted) in cases {
        let before = store_files(home.path());
        let out = bake(home.path(), dir.path(), "after:1", &containerfile, &args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{containerfile:?} baked");
        assert!(
            stderr.contains(wanted),
            "{containerfile:?}: {wanted:?} not in {stderr}"
        );
        // The location is said once (it once came twice: "Containerfile:2: …: Containerfile:2: …").
        assert_eq!(
            stderr.matches("Containerfile").count(),
            1,
            "{containerfile:?}: {stderr}"
        );
        assert!(
            store_files(home.path()) == before,
            "{containerfile:?} changed the store"
        );
    }
}

/// A realistic multi-stage build on the Debian base: one stage assembles an "app" (a shell
/// script with its config, made by the tools of the base), the last stage is FROM scratch
/// with the app, busybox to run it and nothing else of Debian.
#[test]
fn debian_build_stage_into_a_scratch_image() {
    let home = tempfile::tempdir().unwrap();
    let dir = context(&[]);
    let base = support::debian_base().display().to_string();
    let containerfile = format!(
        "ARG BASE=docker-archive:{base}\n\
FROM ${{BASE}} AS build\n\
ARG VERSION=1.2\n\
WORKDIR /src\n\
COPY <<EOF app.sh.in\n#!/bin/sh\necho \"app @VERSION@ on $(cat /etc/app.conf)\"\nEOF\n\
RUN <<EOF\nset -e\nmkdir -p /out/bin /out/etc\nsed \"s/@VERSION@/$VERSION/\" app.sh.in > /out/bin/app\nchmod 0755 /out/bin/app\ngrep -o 'bookworm' /etc/os-release | head -n1 > /out/etc/app.conf\nEOF\n\
FROM scratch\n\
COPY --from=build /out/ /\n\
COPY busybox /bin/sh\n\
ENTRYPOINT [\"/bin/app\"]\n"
    );
    baked(home.path(), dir.path(), "app:1", &containerfile, &[]);
    let listing = listing(home.path(), "app:1");
    assert!(
        listing.contains(
            &"bin/app 755 0:0 \"#!/bin/sh\\necho \\\"app 1.2 on $(cat /etc/app.conf)\\\"\\n\""
                .to_owned()
        ),
        "{listing:#?}"
    );
    assert!(
        listing.contains(&"etc/app.conf 644 0:0 \"bookworm\\n\"".to_owned()),
        "{listing:#?}"
    );
    // Nothing of Debian's but what was copied: three layers, a handful of paths.
    assert!(listing.len() <= 8, "{listing:#?}");
    assert_eq!(
        config(home.path(), "app:1")["Entrypoint"],
        serde_json::json!(["/bin/app"])
    );
}
