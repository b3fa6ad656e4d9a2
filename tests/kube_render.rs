//! `graven render --runtime kubernetes`: golden manifests for the example project and for a
//! project that uses every mapped field (`UPDATE_EXPECT=1 cargo test --test kube_render`
//! refreshes them), each passing `kubernetes-validate --strict` for the Kubernetes versions
//! docs/kubernetes.md names and `kubectl apply --dry-run=client` (kubectl reads its kinds
//! from the simulated API server's discovery: client dry-run still asks a server).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use expect_test::expect_file;
use support::kube::{KUBERNETES_VERSIONS, KubeSim, kubernetes_validate, test_image};
use support::{graven, succeed, workspace};

/// One home for every test of this file: the test image and the full project's secret. A
/// static is never dropped, so it is made in cargo's scratch directory for tests (under
/// `target/`), not in /tmp, where each run left one behind.
fn home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| {
        let home = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        test_image(home.path(), "kube-test", "hello\n");
        let mut set = graven(home.path());
        set.args(["secrets", "set", "db-url", "--app", "shop"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = set.spawn().unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"postgres://shop@db/shop")
            .unwrap();
        assert!(child.wait_with_output().unwrap().status.success());
        home
    })
    .path()
}

fn render_command(project: &Path, environment: &str) -> Command {
    let mut command = graven(home());
    command
        .args(["render", "--runtime", "kubernetes", "--env", environment])
        .args([
            "--registry",
            "registry.example.com/team",
            "--image",
            "kube-test",
        ])
        .arg(project);
    command
}

fn render(project: &Path, environment: &str) -> String {
    String::from_utf8(succeed(&mut render_command(project, environment)).stdout).unwrap()
}

fn example() -> PathBuf {
    workspace().join("examples/hello")
}

fn full() -> PathBuf {
    workspace().join("tests/data/kube/full")
}

/// Every rendered stream, written to files for the validators.
fn rendered(dir: &Path) -> Vec<PathBuf> {
    [
        ("hello-local", example(), "local"),
        ("hello-production", example(), "production"),
        ("full", full(), "local"),
    ]
    .into_iter()
    .map(|(name, project, environment)| {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, render(&project, environment)).unwrap();
        file
    })
    .collect()
}

#[test]
fn example_renders_as_its_golden_manifests() {
    expect_file!["data/kube/hello-local.yaml"].assert_eq(&render(&example(), "local"));
    expect_file!["data/kube/hello-production.yaml"].assert_eq(&render(&example(), "production"));
}

#[test]
fn every_mapped_field_renders_as_its_golden_manifests() {
    expect_file!["data/kube/full.yaml"].assert_eq(&render(&full(), "local"));
}

#[test]
fn rendered_manifests_pass_kubernetes_validate_strict() {
    let dir = tempfile::tempdir().unwrap();
    let files = rendered(dir.path());
    for version in KUBERNETES_VERSIONS {
        let output = Command::new(kubernetes_validate())
            .args(["--strict", "--quiet", "-k", version])
            .args(&files)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "kubernetes-validate --strict -k {version}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The negative control: the validator refuses a field the schema lacks, so passing
    // says something.
    let text = std::fs::read_to_string(&files[2]).unwrap();
    let bad = dir.path().join("bad.yaml");
    let changed = text.replacen("\"replicas\"", "\"replicaz\"", 1);
    assert_ne!(changed, text, "the control changed nothing");
    std::fs::write(&bad, changed).unwrap();
    let output = Command::new(kubernetes_validate())
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSIONS[0]])
        .arg(&bad)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "an unknown field passed: {said}");
    // Refused for that field, not for some other reason (a missing file, a crash).
    assert!(
        said.contains("replicaz"),
        "refused, but not for the field: {said}"
    );
}

fn kubectl() -> &'static str {
    assert!(
        Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success()),
        "kubectl is missing: install it (scripts/kube-tools installs Debian's kubernetes-client)"
    );
    "kubectl"
}

#[test]
fn rendered_manifests_pass_kubectl_client_dry_run() {
    let sim = KubeSim::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = sim.kubeconfig(dir.path());
    let mut files = rendered(dir.path());
    // `-o DIR` too: one file per object, which kubectl applies in their numbered order.
    let objects = dir.path().join("objects");
    succeed(render_command(&full(), "local").args(["-o"]).arg(&objects));
    files.push(objects.clone());
    for file in &files {
        let output = Command::new(kubectl())
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", dir.path())
            // Schemas are kubernetes-validate's job; the simulated server serves no OpenAPI.
            .args(["apply", "--dry-run=client", "--validate=false", "-f"])
            .arg(file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "kubectl apply --dry-run=client -f {}: {stdout}{}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("(dry run)"), "{stdout}");
    }
    // A dry run changes nothing on the server.
    assert!(sim.paths().is_empty(), "{:?}", sim.paths());
    // The directory's files are owner-only: a Secret's holds its values.
    use std::os::unix::fs::PermissionsExt as _;
    for entry in std::fs::read_dir(&objects).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn render_refuses_a_missing_registry_by_name() {
    let mut command = graven(home());
    command
        .args(["render", "--runtime", "kubernetes", "--image", "kube-test"])
        .env_remove("GRAVEN_REGISTRY")
        .arg(example());
    let output = command.output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--registry (or kube_registry in the environment) is needed"),
        "{stderr}"
    );
}

/// A numeric USER without a group runs as its passwd entry's group, as the runtime and bake
/// read it: the uid is not the gid (`1000` is `app`, whose group is 1001).
#[test]
fn a_numeric_user_runs_as_its_passwd_entry_s_group() {
    let home = tempfile::tempdir().unwrap();
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Containerfile"),
        "FROM scratch\nCOPY passwd /etc/passwd\nCOPY hello /hello\nUSER 1000\n\
         ENTRYPOINT [\"/hello\"]\n",
    )
    .unwrap();
    std::fs::write(
        context.path().join("passwd"),
        "root:x:0:0::/:/hello\napp:x:1000:1001::/:/hello\n",
    )
    .unwrap();
    std::fs::write(context.path().join("hello"), "hello\n").unwrap();
    succeed(
        graven(home.path())
            .arg("bake")
            .arg(context.path())
            .args(["-t", "numeric-user"]),
    );
    let output = succeed(
        graven(home.path())
            .args(["render", "--runtime", "kubernetes", "--env", "local"])
            .args(["--registry", "registry.example.com/team"])
            .args(["--image", "numeric-user"])
            .arg(example()),
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("\"runAsUser\": 1000"), "{text}");
    assert!(text.contains("\"runAsGroup\": 1001"), "{text}");
}
