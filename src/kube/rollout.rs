//! Whether a workload's rollout is done, under way or failed, read from the object the API
//! server returns, as `kubectl rollout status` reads it. Pure.

use serde_json::Value;

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollout {
    /// Every replica runs the new template and is available.
    Done,
    /// Still going; what it waits for.
    Progressing(String),
    /// The cluster gave up (a Deployment's progress deadline passed).
    Failed(String),
}

fn count(status: &Value, field: &str) -> u64 {
    status[field].as_u64().unwrap_or(0)
}

/// Reads a Deployment's or a StatefulSet's rollout from its status.
pub fn rollout(object: &Value) -> Rollout {
    let generation = object["metadata"]["generation"].as_u64().unwrap_or(0);
    let status = &object["status"];
    let observed = count(status, "observedGeneration");
    if observed < generation {
        return Rollout::Progressing(format!(
            "waiting for the controller to see generation {generation} (it saw {observed})"
        ));
    }
    let wanted = object["spec"]["replicas"].as_u64().unwrap_or(1);
    let updated = count(status, "updatedReplicas");
    let total = count(status, "replicas");
    match object["kind"].as_str() {
        Some("StatefulSet") => {
            let ready = count(status, "readyReplicas");
            let current = status["currentRevision"].as_str();
            let update = status["updateRevision"].as_str();
            if updated < wanted {
                Rollout::Progressing(format!("{updated} of {wanted} pods updated"))
            } else if ready < wanted {
                Rollout::Progressing(format!("{ready} of {wanted} pods ready"))
            } else if current != update {
                Rollout::Progressing("waiting for the update revision to become current".into())
            } else {
                Rollout::Done
            }
        }
        _ => {
            let available = count(status, "availableReplicas");
            let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
            if let Some(stuck) = conditions
                .iter()
                .find(|c| c["type"] == "Progressing" && c["reason"] == "ProgressDeadlineExceeded")
            {
                return Rollout::Failed(format!(
                    "progress deadline exceeded: {}",
                    stuck["message"].as_str().unwrap_or("no message")
                ));
            }
            if updated < wanted {
                Rollout::Progressing(format!("{updated} of {wanted} replicas updated"))
            } else if total > updated {
                Rollout::Progressing(format!("{} old replicas still running", total - updated))
            } else if available < updated {
                Rollout::Progressing(format!("{available} of {updated} replicas available"))
            } else {
                Rollout::Done
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(object: Value, expected: Rollout) {
        assert_eq!(rollout(&object), expected, "{object:#}");
    }

    #[test]
    fn deployment_rollouts() {
        let deployment = |generation: u64, status: Value| {
            json!({ "kind": "Deployment", "metadata": { "generation": generation },
                    "spec": { "replicas": 2 }, "status": status })
        };
        check(
            deployment(
                2,
                json!({ "observedGeneration": 1, "updatedReplicas": 2,
                                  "replicas": 2, "availableReplicas": 2 }),
            ),
            Rollout::Progressing(
                "waiting for the controller to see generation 2 (it saw 1)".into(),
            ),
        );
        check(
            deployment(
                2,
                json!({ "observedGeneration": 2, "updatedReplicas": 1,
                                  "replicas": 3, "availableReplicas": 2 }),
            ),
            Rollout::Progressing("1 of 2 replicas updated".into()),
        );
        check(
            deployment(
                2,
                json!({ "observedGeneration": 2, "updatedReplicas": 2,
                                  "replicas": 3, "availableReplicas": 2 }),
            ),
            Rollout::Progressing("1 old replicas still running".into()),
        );
        check(
            deployment(
                2,
                json!({ "observedGeneration": 2, "updatedReplicas": 2,
                                  "replicas": 2, "availableReplicas": 1 }),
            ),
            Rollout::Progressing("1 of 2 replicas available".into()),
        );
        check(
            deployment(
                2,
                json!({ "observedGeneration": 2, "updatedReplicas": 2,
                                  "replicas": 2, "availableReplicas": 2 }),
            ),
            Rollout::Done,
        );
        check(
            deployment(
                2,
                json!({ "observedGeneration": 2, "updatedReplicas": 1,
                "conditions": [{ "type": "Progressing", "status": "False",
                    "reason": "ProgressDeadlineExceeded", "message": "too slow" }] }),
            ),
            Rollout::Failed("progress deadline exceeded: too slow".into()),
        );
    }

    #[test]
    fn statefulset_rollouts() {
        let set = |status: Value| {
            json!({ "kind": "StatefulSet", "metadata": { "generation": 1 },
                    "spec": { "replicas": 1 }, "status": status })
        };
        check(
            set(json!({ "observedGeneration": 1, "updatedReplicas": 1, "readyReplicas": 0 })),
            Rollout::Progressing("0 of 1 pods ready".into()),
        );
        check(
            set(
                json!({ "observedGeneration": 1, "updatedReplicas": 1, "readyReplicas": 1,
                        "currentRevision": "a", "updateRevision": "b" }),
            ),
            Rollout::Progressing("waiting for the update revision to become current".into()),
        );
        check(
            set(
                json!({ "observedGeneration": 1, "updatedReplicas": 1, "readyReplicas": 1,
                        "currentRevision": "b", "updateRevision": "b" }),
            ),
            Rollout::Done,
        );
    }
}
