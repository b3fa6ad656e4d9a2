//! `graven deploy --runtime kubernetes` against the SIMULATED API server of
//! `tests/support/kube.rs` (no real cluster runs here): a healthy rollout is applied and
//! reported, a rollout that never becomes available is rolled back by itself (or removed,
//! with nothing before it), and a stateful service becomes a StatefulSet.

mod support;

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use support::graven;
use support::kube::{KubeSim, test_image};

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/shop-local/deployments/web";
const STATEFULSET: &str = "/apis/apps/v1/namespaces/shop-local/statefulsets/db";

/// The web service's health deadline for a rollout that must succeed: watched a status
/// read every 250 ms, the simulated one takes two, a loaded machine many times that.
const DEADLINE: &str = "60s";

/// A project with a rolling web service (health deadline `DEADLINE`), and, when `stateful`,
/// a database with a volume.
fn project(dir: &Path, stateful: bool) {
    let mut text = format!(
        "app = \"shop\"\n\n[services.web]\ninstances = 2\nport = 8080\nroute = \"127.0.0.1:8000\"\n\
         env = {{ GREETING = \"hello\" }}\n\
         deploy = {{ max_surge = 1, max_unavailable = 0, health_deadline = \"{DEADLINE}\" }}\n",
    );
    if stateful {
        text.push_str(
            "\n[services.db]\nstateful = true\nport = 5432\nvolumes = { pgdata = \"/data\" }\n\
             health = { kind = \"tcp\" }\n",
        );
    }
    std::fs::write(dir.join("graven.toml"), text).unwrap();
}

/// Shortens the web service's health deadline to 2 s: the wait of a rollout that must fail.
fn short_deadline(dir: &Path) {
    support::daemon::set_health_deadline(dir, "2s");
}

fn deploy(home: &Path, dir: &Path, sim: &KubeSim, image: &str) -> Output {
    graven(home)
        .args(["deploy", "--runtime", "kubernetes", "--json"])
        .args(["--server", &sim.url()])
        .args(["--registry", "registry.example.com/team", "--image", image])
        .arg(dir)
        .output()
        .unwrap()
}

fn report(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn image_of(object: &Value) -> String {
    object["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn release_of(object: &Value) -> String {
    object["metadata"]["labels"]["graven.dev/release"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn healthy_rollout_is_applied_watched_and_reported() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), false);
    let digest = test_image(home.path(), "good", "good\n");
    let sim = KubeSim::start();
    let output = deploy(home.path(), dir.path(), &sim, "good");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = report(&output);
    assert_eq!(report["failure"], Value::Null);
    assert_eq!(report["workloads"][0]["outcome"]["outcome"], "rolled_out");
    let deployment = sim.object(DEPLOYMENT).expect("the Deployment was applied");
    assert_eq!(
        image_of(&deployment),
        format!("registry.example.com/team/shop@{digest}")
    );
    assert_eq!(report["workloads"][0]["release"], release_of(&deployment));
    // The rollout was watched to the end: every replica updated and available.
    assert_eq!(deployment["status"]["availableReplicas"], 2);
    assert_eq!(deployment["status"]["updatedReplicas"], 2);
    for path in [
        "/api/v1/namespaces/shop-local",
        "/api/v1/namespaces/shop-local/services/web",
    ] {
        assert!(sim.object(path).is_some(), "{path}: {:?}", sim.paths());
    }
    // Everything went by server-side apply; the workload was read before it was changed.
    let requests = sim.requests();
    let first_patch = requests
        .iter()
        .position(|r| r.starts_with("PATCH"))
        .unwrap();
    assert_eq!(requests[0], format!("GET {DEPLOYMENT}"), "{requests:?}");
    assert!(first_patch > 0);
    assert!(
        !requests.iter().any(|r| r.starts_with("DELETE")),
        "{requests:?}"
    );
}

#[test]
fn rollout_that_never_becomes_available_rolls_back_by_itself() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), false);
    let good = test_image(home.path(), "good", "good\n");
    let bad = test_image(home.path(), "bad", "bad\n");
    let sim = KubeSim::start();
    sim.never_available(&bad);
    let first = deploy(home.path(), dir.path(), &sim, "good");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let good_release = release_of(&sim.object(DEPLOYMENT).unwrap());

    short_deadline(dir.path());
    let second = deploy(home.path(), dir.path(), &sim, "bad");
    assert!(
        !second.status.success(),
        "a rollout that never became available succeeded"
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("not healthy within its health deadline"),
        "{stderr}"
    );
    let report = report(&second);
    assert_eq!(report["workloads"][0]["outcome"]["outcome"], "rolled_back");
    assert_eq!(
        report["workloads"][0]["outcome"]["release"],
        good_release.as_str()
    );
    // The bad release was applied (the negative control: the rollback undid a real change)...
    let requests = sim.requests();
    let patches = requests
        .iter()
        .filter(|r| *r == &format!("PATCH {DEPLOYMENT}"))
        .count();
    assert_eq!(patches, 3, "good, bad, then good again: {requests:?}");
    // ...and the Deployment is back on the good release, rolled out again.
    let deployment = sim.object(DEPLOYMENT).unwrap();
    assert_eq!(
        image_of(&deployment),
        format!("registry.example.com/team/shop@{good}")
    );
    assert_eq!(release_of(&deployment), good_release);
    assert_eq!(deployment["metadata"]["generation"], 3);
    assert_eq!(deployment["status"]["availableReplicas"], 2);
    assert_eq!(deployment["status"]["updatedReplicas"], 2);
}

/// A rollback the cluster refuses is said to have failed, in the report and in the closing
/// message, which must not claim the deploy was rolled back.
#[test]
fn a_rollback_that_fails_is_not_called_rolled_back() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), false);
    test_image(home.path(), "good", "good\n");
    let bad = test_image(home.path(), "bad", "bad\n");
    let sim = KubeSim::start();
    sim.never_available(&bad);
    let first = deploy(home.path(), dir.path(), &sim, "good");
    assert!(first.status.success());
    // The good release's apply, the bad one's, then the rollback's: refused.
    sim.refuse_from(DEPLOYMENT, 3);
    short_deadline(dir.path());
    let second = deploy(home.path(), dir.path(), &sim, "bad");
    assert!(!second.status.success());
    let report = report(&second);
    assert_eq!(
        report["workloads"][0]["outcome"]["outcome"], "rollback_failed",
        "{report:#}"
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!stderr.contains("was rolled back"), "{stderr}");
    assert!(stderr.contains("its rollback failed"), "{stderr}");
}

#[test]
fn first_rollout_that_never_becomes_available_is_removed() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), false);
    short_deadline(dir.path());
    let bad = test_image(home.path(), "bad", "bad\n");
    let sim = KubeSim::start();
    sim.never_available(&bad);
    let output = deploy(home.path(), dir.path(), &sim, "bad");
    assert!(!output.status.success());
    assert_eq!(
        report(&output)["workloads"][0]["outcome"]["outcome"],
        "removed"
    );
    assert!(sim.object(DEPLOYMENT).is_none(), "{:?}", sim.paths());
}

#[test]
fn stateful_service_becomes_a_statefulset() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), true);
    test_image(home.path(), "good", "good\n");
    let sim = KubeSim::start();
    let output = deploy(home.path(), dir.path(), &sim, "good");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = report(&output);
    let outcomes: Vec<(String, String)> = report["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                format!(
                    "{} {}",
                    w["kind"].as_str().unwrap(),
                    w["name"].as_str().unwrap()
                ),
                w["outcome"]["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("StatefulSet db".to_owned(), "rolled_out".to_owned()),
            ("Deployment web".to_owned(), "rolled_out".to_owned()),
        ]
    );
    let set = sim.object(STATEFULSET).expect("db is a StatefulSet");
    assert!(
        sim.object("/apis/apps/v1/namespaces/shop-local/deployments/db")
            .is_none(),
        "db is not also a Deployment"
    );
    assert_eq!(set["spec"]["serviceName"], "db-pods");
    assert_eq!(
        set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "pgdata"
    );
    assert_eq!(
        set["status"]["currentRevision"],
        set["status"]["updateRevision"]
    );
    assert!(
        sim.object("/api/v1/namespaces/shop-local/services/db-pods")
            .is_some()
    );
}

#[test]
fn refused_apply_rolls_back_the_workloads_already_changed() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), true);
    let first = test_image(home.path(), "first", "first\n");
    test_image(home.path(), "second", "second\n");
    let sim = KubeSim::start();
    let output = deploy(home.path(), dir.path(), &sim, "first");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let db_release = release_of(&sim.object(STATEFULSET).unwrap());

    // db (applied first) rolls out the second release, then web's apply is refused.
    sim.refuse(DEPLOYMENT);
    let output = deploy(home.path(), dir.path(), &sim, "second");
    assert!(!output.status.success());
    let report = report(&output);
    assert!(
        report["failure"]
            .as_str()
            .unwrap()
            .contains("refused by the test"),
        "{report:#}"
    );
    assert_eq!(report["workloads"][0]["outcome"]["outcome"], "rolled_back");
    assert_eq!(
        report["workloads"][0]["outcome"]["release"],
        db_release.as_str()
    );
    let set = sim.object(STATEFULSET).unwrap();
    assert_eq!(
        image_of(&set),
        format!("registry.example.com/team/shop@{first}")
    );
    // Three applies of db: the first release, the second, and the first again.
    let patches = sim
        .requests()
        .iter()
        .filter(|r| *r == &format!("PATCH {STATEFULSET}"))
        .count();
    assert_eq!(patches, 3);
}

/// An environment whose `runtime` is kubernetes deploys to its cluster with no `--runtime`
/// flag, taking the server, registry and namespace from its `kube_*` keys; another
/// environment of the same file stays on the control plane and refuses the cluster's flags.
#[test]
fn an_environment_on_kubernetes_deploys_there_from_graven_toml_alone() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), false);
    let sim = KubeSim::start();
    let mut text = std::fs::read_to_string(dir.path().join("graven.toml")).unwrap();
    text += &format!(
        "\n[environments.cluster]\nruntime = \"kubernetes\"\nkube_server = \"{}\"\n\
         kube_registry = \"registry.example.com/team\"\nkube_namespace = \"shop-cluster\"\n",
        sim.url()
    );
    std::fs::write(dir.path().join("graven.toml"), text).unwrap();
    let digest = test_image(home.path(), "good", "good\n");
    let output = graven(home.path())
        .args(["deploy", "--env", "cluster", "--json", "--image", "good"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(report(&output)["failure"], Value::Null);
    let deployment = sim
        .object("/apis/apps/v1/namespaces/shop-cluster/deployments/web")
        .unwrap_or_else(|| panic!("not applied: {:?}", sim.paths()));
    assert_eq!(
        image_of(&deployment),
        format!("registry.example.com/team/shop@{digest}")
    );
    // `graven render` reads the same keys.
    let rendered = graven(home.path())
        .args(["render", "--env", "cluster", "--image", "good"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    assert!(String::from_utf8_lossy(&rendered.stdout).contains("\"namespace\": \"shop-cluster\""));
    // The default environment runs on the control plane: the cluster's flags are refused
    // before anything is built or sent.
    let local = graven(home.path())
        .args(["deploy", "--image", "good"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!local.status.success());
    assert!(
        String::from_utf8_lossy(&local.stderr).contains("are a kubernetes deploy's"),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
}
