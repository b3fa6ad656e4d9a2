//! Keeps ARCHITECTURE.md's invariants true by reading the sources: which module may name
//! which, where `anyhow` may appear, that every module says what it owns, and that the
//! codemap mentions every module.

use std::fs;
use std::path::{Path, PathBuf};

/// For each module, the modules of this crate it must never name. Data flows
/// spec → bake → store → runtime → proxy → controller → events → api / cli; a module may use
/// the types of those before it, and the lower layers know nothing of the ones above.
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "store",
        &[
            "spec",
            "bake",
            "registry",
            "sandbox",
            "runtime",
            "proxy",
            "controller",
            "events",
            "api",
            "cli",
        ],
    ),
    (
        "sandbox",
        &[
            "spec",
            "bake",
            "store",
            "runtime",
            "proxy",
            "controller",
            "events",
            "api",
            "cli",
        ],
    ),
    (
        "bake",
        &["runtime", "proxy", "controller", "events", "api", "cli"],
    ),
    // Registries are a way into and out of the store, nothing more: what a pulled image is
    // for (a bake, an instance) is its callers' business.
    (
        "registry",
        &[
            "spec",
            "bake",
            "sandbox",
            "runtime",
            "proxy",
            "controller",
            "events",
            "deploy",
            "api",
            "cli",
        ],
    ),
    (
        "runtime",
        &[
            "spec",
            "bake",
            "proxy",
            "controller",
            "events",
            "api",
            "cli",
        ],
    ),
    // The proxy knows nothing of deploys, releases' meaning, instances' runtime or the log.
    (
        "proxy",
        &[
            "spec",
            "bake",
            "store",
            "sandbox",
            "runtime",
            "controller",
            "events",
            "api",
            "cli",
        ],
    ),
    (
        "spec",
        &["bake", "sandbox", "controller", "events", "api", "cli"],
    ),
    // The fold is pure: events never call into the controller that produces them, and the
    // log has its own types, so moving the proxy's or the runtime's never moves its format.
    (
        "events",
        &[
            "bake",
            "sandbox",
            "runtime",
            "proxy",
            "controller",
            "deploy",
            "api",
            "cli",
        ],
    ),
    ("controller", &["deploy", "api", "cli"]),
    // The DNS server reads the controllers' snapshots and answers: it decides nothing and
    // touches no instance, route, image or log.
    (
        "dns",
        &[
            "bake", "registry", "sandbox", "proxy", "deploy", "secrets", "api", "cli",
        ],
    ),
    // The deploy use case is the library's: the API and the CLI call it, never the reverse.
    ("deploy", &["api", "cli"]),
    (
        "actor",
        &[
            "spec",
            "bake",
            "store",
            "sandbox",
            "runtime",
            "proxy",
            "controller",
            "events",
            "deploy",
            "api",
            "cli",
        ],
    ),
    ("api", &["cli"]),
    // The log store names no module: the runtime's shim writes through it and the CLI
    // reads through it, so it can take lines from anything (syslog) without knowing it.
    (
        "logs",
        &[
            "spec",
            "bake",
            "store",
            "sandbox",
            "runtime",
            "proxy",
            "controller",
            "events",
            "deploy",
            "api",
            "cli",
        ],
    ),
    // The secret store is a layer of files with no meaning of its own: it names no module,
    // so it can serve the spec, the deploy and the controller alike.
    (
        "secrets",
        &[
            "spec",
            "bake",
            "store",
            "sandbox",
            "runtime",
            "proxy",
            "controller",
            "events",
            "api",
            "cli",
        ],
    ),
    // Planned failures' pure half: the spec, the log and the controller use its types, so
    // it names none of them (nor anything else).
    (
        "chaos",
        &[
            "spec",
            "bake",
            "store",
            "sandbox",
            "runtime",
            "proxy",
            "controller",
            "events",
            "deploy",
            "api",
            "cli",
        ],
    ),
    (
        "loadgen",
        &[
            "spec",
            "bake",
            "store",
            "sandbox",
            "runtime",
            "controller",
            "events",
            "api",
            "cli",
        ],
    ),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`.
fn source_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    sources(&src_dir(), &mut files);
    files
}

/// The top-level module a source file belongs to (`src/proxy/health.rs` → `proxy`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    first.trim_end_matches(".rs").to_owned()
}

fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| {
            let t = l.trim_start();
            !t.starts_with("//")
        })
}

/// The lines of `text` (a file of `module`) that name a module `module` must not name.
fn violations(module: &str, text: &str) -> Vec<(usize, &'static str)> {
    let Some((_, banned)) = FORBIDDEN.iter().find(|(m, _)| *m == module) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (line, code) in code_lines(text) {
        for other in *banned {
            let named = ["::", ";", "}", ","]
                .iter()
                .any(|end| code.contains(&format!("crate::{other}{end}")));
            if named {
                found.push((line, *other));
            }
        }
    }
    for (line, name) in grouped_uses(text) {
        if let Some(other) = banned.iter().find(|b| **b == name) {
            found.push((line, *other));
        }
    }
    found.sort();
    found
}

/// The modules a grouped `use crate::{a::X, b, c::{..}}` names, one or many lines long, each
/// with the line it is on.
fn grouped_uses(text: &str) -> Vec<(usize, String)> {
    let code: Vec<(usize, &str)> = code_lines(text).collect();
    let mut names = Vec::new();
    let mut depth = 0usize;
    // The name being read at depth 1, and whether this item's first segment is done.
    let mut current = String::new();
    let mut done = false;
    for (line, code) in code {
        let mut rest = code;
        while !rest.is_empty() {
            if depth == 0 {
                match rest.find("crate::{") {
                    Some(at) => {
                        rest = &rest[at + "crate::{".len()..];
                        depth = 1;
                        current.clear();
                        done = false;
                    }
                    None => break,
                }
                continue;
            }
            let c = rest.chars().next().unwrap();
            rest = &rest[c.len_utf8()..];
            match c {
                '{' => depth += 1,
                '}' | ',' if depth == 1 => {
                    if !current.is_empty() {
                        names.push((line, std::mem::take(&mut current)));
                    }
                    done = false;
                    if c == '}' {
                        depth = 0;
                    }
                }
                '}' => depth -= 1,
                c if depth == 1 && !done && (c.is_alphanumeric() || c == '_') => current.push(c),
                _ if depth == 1 && !done && !current.is_empty() => {
                    // The first segment ends at `::` or a space: record it now, with its line.
                    names.push((line, std::mem::take(&mut current)));
                    done = true;
                }
                _ => {}
            }
        }
    }
    names
}

#[test]
fn modules_only_name_what_they_may() {
    let src = src_dir();
    let files = source_files();
    let mut problems = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        let text = fs::read_to_string(file).unwrap();
        for (line, other) in violations(&module, &text) {
            problems.push(format!(
                "{}:{line}: `{module}` must not name `{other}`",
                file.display()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "forbidden dependencies:\n{}",
        problems.join("\n")
    );
}

/// The lines of `text` (a file of `module`) that use `anyhow` outside cli/ and main.rs.
fn anyhow_uses(module: &str, text: &str) -> Vec<usize> {
    if module == "cli" || module == "main" {
        return Vec::new();
    }
    code_lines(text)
        .filter(|(_, code)| code.contains("anyhow"))
        .map(|(line, _)| line)
        .collect()
}

#[test]
fn anyhow_only_in_the_cli_and_main() {
    let src = src_dir();
    let files = source_files();
    let mut problems = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        let text = fs::read_to_string(file).unwrap();
        for line in anyhow_uses(&module, &text) {
            problems.push(format!(
                "{}:{line}: anyhow outside cli/ and main.rs",
                file.display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_module_says_what_it_owns() {
    let src = src_dir();
    let architecture =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md")).unwrap();
    let mut problems = Vec::new();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let (name, head) = if path.is_dir() {
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                path.join("mod.rs"),
            )
        } else {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if name == "lib" || name == "main" {
                continue;
            }
            (name, path.clone())
        };
        let text = fs::read_to_string(&head).unwrap_or_default();
        if !text.trim_start().starts_with("//!") {
            problems.push(format!(
                "{}: a module starts with `//!` lines saying what it owns",
                head.display()
            ));
        }
        if !architecture.contains(&format!("`src/{name}")) {
            problems.push(format!(
                "ARCHITECTURE.md: the codemap does not mention `src/{name}`"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The files of the test and benchmark tools, relative to `src/`: the load generator, the
/// in-memory runtime and the hidden `__load` and `__proxy` commands. Each exists only with the
/// `dev-tools` feature, which no build of the product turns on.
const DEV_ONLY_FILES: &[&str] = &[
    "loadgen.rs",
    "runtime/fake.rs",
    "cli/load.rs",
    "cli/proxy.rs",
];

/// The identifiers that name a tool or what only a tool needs: the modules, the fake runtime
/// and its `Fake` variants, the hidden commands' variants, arguments and names.
const DEV_ONLY_NAMES: &[&str] = &[
    "loadgen",
    "fake",
    "Fake",
    "FakeRuntime",
    "Load",
    "LoadArgs",
    "Proxy",
    "ProxyArgs",
    "__load",
    "__proxy",
];

/// The CLI's modules of the hidden commands, whose names are also product words (`load`,
/// `crate::proxy`): named as a path from outside the CLI, declared with `mod` inside it.
const DEV_ONLY_CLI_MODULES: &[&str] = &["load", "proxy"];

/// The attribute that keeps an item, or a match arm, out of the product.
const DEV_TOOLS_CFG: &str = "#[cfg(feature = \"dev-tools\")]";

/// The identifiers of a line of code, in order.
fn identifiers(code: &str) -> Vec<&str> {
    code.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|word| !word.is_empty())
        .collect()
}

/// How much a line opens brackets minus how much it closes them.
fn bracket_balance(code: &str) -> i64 {
    code.chars()
        .map(|c| match c {
            '(' | '[' | '{' => 1,
            ')' | ']' | '}' => -1,
            _ => 0,
        })
        .sum()
}

/// The lines of the items and match arms that carry `DEV_TOOLS_CFG`: from the attribute to
/// the line where the item's brackets balance again and it ends with `,`, `;` or `}`.
fn gated_lines(text: &str) -> Vec<usize> {
    let mut gated = Vec::new();
    let mut open: Option<i64> = None;
    for (line, code) in code_lines(text) {
        let mut code = code.trim();
        if open.is_none() {
            let Some(rest) = code.strip_prefix(DEV_TOOLS_CFG) else {
                continue;
            };
            open = Some(0);
            code = rest.trim();
        }
        gated.push(line);
        let depth = open.unwrap_or(0) + bracket_balance(code);
        open = Some(depth);
        if depth <= 0 && code.ends_with([',', ';', '}']) {
            open = None;
        }
    }
    gated
}

/// The lines of `text` (a product file of `module`) that name a test tool outside an item
/// gated by the `dev-tools` feature, with what they name.
fn dev_tool_names(module: &str, text: &str) -> Vec<(usize, String)> {
    let gated = gated_lines(text);
    let mut found = Vec::new();
    for (line, code) in code_lines(text) {
        if gated.contains(&line) {
            continue;
        }
        let words = identifiers(code);
        for word in &words {
            if DEV_ONLY_NAMES.contains(word) {
                found.push((line, (*word).to_owned()));
            }
        }
        for tool in DEV_ONLY_CLI_MODULES {
            let path = format!("cli::{tool}");
            if code.contains(&path) {
                found.push((line, path));
            }
            let declared = words.windows(2).any(|pair| pair == ["mod", *tool]);
            if module == "cli" && declared {
                found.push((line, format!("mod {tool}")));
            }
        }
    }
    found
}

#[test]
fn product_modules_name_test_tools_only_behind_the_feature() {
    let src = src_dir();
    for file in DEV_ONLY_FILES {
        assert!(src.join(file).is_file(), "DEV_ONLY_FILES: no src/{file}");
    }
    let mut problems = Vec::new();
    for file in source_files() {
        let relative = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if DEV_ONLY_FILES.contains(&relative.as_str()) {
            continue;
        }
        let module = module_of(&src, &file);
        let text = fs::read_to_string(&file).unwrap();
        for (line, name) in dev_tool_names(&module, &text) {
            problems.push(format!(
                "src/{relative}:{line}: `{name}` is a test tool: name it only in an item under \
                 {DEV_TOOLS_CFG}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The feature is off unless the tests are built: not a default feature, and turned on by the
/// package's dev-dependency on itself, so plain `cargo test` runs the tests that need it.
#[test]
fn test_tools_are_off_by_default_and_on_for_the_tests() {
    let manifest: toml::Table =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
    let features = manifest["features"].as_table().unwrap();
    assert!(features.contains_key("dev-tools"), "{features:?}");
    let default = features.get("default").and_then(|d| d.as_array());
    assert!(
        default.is_none_or(|d| !d.iter().any(|f| f.as_str() == Some("dev-tools"))),
        "dev-tools must not be a default feature: {default:?}"
    );
    let itself = &manifest["dev-dependencies"]["graven"];
    assert_eq!(itself["path"].as_str(), Some("."), "{itself:?}");
    let enabled = itself["features"].as_array().unwrap();
    assert!(
        enabled.iter().any(|f| f.as_str() == Some("dev-tools")),
        "{itself:?}"
    );
    // And it did: the tests were built with it (checked when they compile).
    const {
        assert!(
            cfg!(feature = "dev-tools"),
            "the tests are built with the dev-tools feature"
        )
    };
}

/// A negative control for the test-tools check: it flags an ungated use, a declaration and a
/// variant, and lets gated items (one line or several), match arms, product words that share a
/// name (`load`, `crate::proxy`) and comments through.
#[test]
fn the_test_tools_check_sees_an_ungated_use() {
    let text = "use crate::runtime::FakeRuntime;\n// FakeRuntime in a comment\n\
                #[cfg(feature = \"dev-tools\")]\npub mod loadgen;\nmod load;\n\
                #[cfg(feature = \"dev-tools\")]\n#[command(name = \"__load\", hide = true)]\n\
                Load(load::LoadArgs),\nmatch kind {\n    RuntimeKind::Local => local(),\n\
                #[cfg(feature = \"dev-tools\")]\n    RuntimeKind::Fake => {\n\
                AnyRuntime::Fake(FakeRuntime::new())\n    }\n    Kind::Fake => fake(),\n}\n\
                let n = state::load(dir)?;\nuse crate::proxy::Route;\nuse crate::cli::proxy;\n";
    assert_eq!(
        dev_tool_names("cli", text),
        vec![
            (1, "FakeRuntime".to_owned()),
            (5, "mod load".to_owned()),
            (15, "Fake".to_owned()),
            (15, "fake".to_owned()),
            (19, "cli::proxy".to_owned()),
        ]
    );
    // `mod load` is the tool only in the CLI.
    assert_eq!(
        dev_tool_names("spec", "mod load;\n"),
        Vec::<(usize, String)>::new()
    );
}

/// A negative control for the dependency check: it does flag a forbidden path, and it lets
/// an allowed one and a comment through.
#[test]
fn the_dependency_check_sees_a_forbidden_use() {
    let text = "use crate::controller::Input;\n// crate::events:: in a comment\nuse crate::proxy::Backend;\n";
    assert_eq!(violations("proxy", text), vec![(1, "controller")]);
    assert_eq!(violations("controller", text), vec![]);
    // Grouped, on one line or several, nested, renamed.
    let grouped = "use crate::{store::Digest, controller};\nuse crate::{\n    spec::{self, Service},\n    events as log,\n};\n";
    assert_eq!(
        violations("proxy", grouped),
        vec![(1, "controller"), (1, "store"), (3, "spec"), (4, "events")]
    );
    assert_eq!(violations("controller", grouped), vec![]);
    assert_eq!(
        module_of(Path::new("/x/src"), Path::new("/x/src/proxy/health.rs")),
        "proxy"
    );
}

/// A negative control for the anyhow check: it flags a use outside the CLI, and lets the
/// CLI's own and a comment through.
#[test]
fn the_anyhow_check_sees_a_use_outside_the_cli() {
    let text = "// anyhow in a comment\nuse anyhow::Context;\n";
    assert_eq!(anyhow_uses("proxy", text), vec![2]);
    assert_eq!(anyhow_uses("cli", text), Vec::<usize>::new());
}
