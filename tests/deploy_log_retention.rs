//! Logs of removed instances are bounded: churning more instances than the bound through the
//! real binary (`graven run -d`, `graven rm -f`) leaves the directories of only the last
//! `retention::KEEP`, the newest ones; another log group (as the controller gives each
//! service) keeps its own.

mod support;

use std::collections::BTreeMap;

use graven::runtime::local::retention::{KEEP, LOG_GROUP};
use graven::runtime::{InstanceSpec, LocalRuntime, Runtime};
use support::daemon::{block_on, run_ok};

fn dirs(home: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.join("instances"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn logs_of_removed_instances_are_kept_for_the_last_few_per_group() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let image = support::runtime::hello_image(&home);

    // One removed instance of another group, as the controller labels a service's; its shim
    // is the graven binary, not this test's.
    graven::sandbox::set_helper_binary(support::graven_bin());
    let runtime = LocalRuntime::open(&home).unwrap();
    let mut spec = InstanceSpec::new(image);
    spec.labels = BTreeMap::from([(LOG_GROUP.to_owned(), "demo/local/web".to_owned())]);
    let other = block_on(async {
        let instance = runtime.start(spec).await.unwrap();
        runtime
            .stop(&instance.id, std::time::Duration::ZERO)
            .await
            .unwrap();
        runtime.remove(&instance.id).await.unwrap();
        instance.id.0
    });

    let mut churned = Vec::new();
    for _ in 0..KEEP + 3 {
        let (stdout, _) = run_ok(&home, &["run", "-d", "hello:test"]);
        let id = stdout.trim().to_owned();
        run_ok(&home, &["rm", "-f", &id]);
        churned.push(id);
    }
    let mut expected: Vec<String> = churned[churned.len() - KEEP..].to_vec();
    expected.push(other);
    expected.sort();
    assert_eq!(dirs(&home), expected, "churned oldest first: {churned:?}");
}
