//! Golden tests of graven.toml files: the example project resolves to the checked-in
//! description for each of its environments, and every `tests/data/spec/*.toml` resolves
//! (or fails) exactly as its `.out` file says. `UPDATE_EXPECT=1` rewrites the goldens.

use std::path::Path;

use expect_test::expect_file;
use graven::spec::{self, Project, SpecErrors};

/// A stable, readable description of a resolved project (or of its problems), including
/// each service's config digest so a change in what makes a release shows up here.
fn describe(result: Result<Project, SpecErrors>, dir: &Path) -> String {
    let project = match result {
        Ok(project) => project,
        Err(errors) => return format!("{errors}\n"),
    };
    let relative = |path: &Path| path.strip_prefix(dir).unwrap_or(path).display().to_string();
    let mut out = format!(
        "app: {}\nenvironment: {}\nbuild: {:?}\ncontainerfile: {}\ncontext: {:?}\n",
        project.app,
        project.environment,
        project.build.map(|b| b.command),
        relative(&project.image.containerfile),
        relative(&project.image.context),
    );
    for service in project.services.values() {
        out.push_str(&format!(
            "\n[{}]\nconfig_digest: {}\n{service:#?}\n",
            service.name,
            graven::events::ServiceConfig::from(service).digest()
        ));
    }
    out
}

#[test]
fn the_example_project_resolves_for_each_environment() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    for environment in ["local", "production"] {
        let golden = format!("data/spec/hello.{environment}.out");
        expect_file![golden].assert_eq(&describe(spec::load(&dir, environment), &dir));
    }
}

#[test]
fn each_data_file_matches_its_golden() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/spec");
    let mut seen = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        seen += 1;
        let source = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        let result = spec::parse(&source, Path::new(name), Path::new("/project"), "local");
        let golden = path.with_extension("out");
        expect_file![golden].assert_eq(&describe(result, Path::new("/project")));
    }
    assert!(seen >= 2, "the data files went missing: {seen} found");
}
