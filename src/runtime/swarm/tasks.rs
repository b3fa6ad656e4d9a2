//! What a service's tasks say about the instance it is: its status, and where it is reached
//! (the address of the node its task runs on and the port that node's engine published in
//! host mode). Pure: the manager's task and node lists in, the instance's state out.
//!
//! Swarm never restarts an instance's task (`service`), so an instance is its one task. A
//! task whose node is down is an instance that exited: the manager cannot reach it, Swarm
//! does not replace it, and graven's controller does, on a node Swarm chooses.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use bollard::models::{NodeState, PortMap, Task, TaskState};

use crate::runtime::InstanceStatus;

/// A node as the placement of tasks needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub ready: bool,
    pub down: bool,
    pub address: Option<IpAddr>,
}

impl NodeView {
    pub fn of(node: &bollard::models::Node) -> NodeView {
        let status = node.status.clone().unwrap_or_default();
        NodeView {
            ready: status.state == Some(NodeState::READY),
            down: status.state == Some(NodeState::DOWN),
            address: status.addr.and_then(|a| a.parse().ok()),
        }
    }
}

/// An instance's state from its service's tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub status: InstanceStatus,
    pub address: Option<SocketAddr>,
    /// The node its task is on, and the task's container there.
    pub node: Option<String>,
    pub container: Option<String>,
    /// What Swarm said went wrong with the task, if anything.
    pub error: Option<String>,
}

/// The state of the instance whose service has `tasks` and wants `replicas` (1, or 0 once
/// stopped), its port `port` inside.
pub fn placed(
    tasks: &[&Task],
    nodes: &HashMap<String, NodeView>,
    port: u16,
    replicas: i64,
) -> Placed {
    let mut placed = newest(tasks, nodes, port);
    // Scaled to 0 (stopped): once no task is left to end, it has exited, even when Swarm
    // never got to run one.
    if replicas == 0 && placed.status == InstanceStatus::Created {
        placed.status = InstanceStatus::Exited {
            code: None,
            signal: None,
        };
        placed.address = None;
    }
    placed
}

/// The instance's state as its newest task says.
fn newest(tasks: &[&Task], nodes: &HashMap<String, NodeView>, port: u16) -> Placed {
    // The newest task: with one replica and no restarts there is one, but a task being
    // shut down and its successor may both be listed after someone else scaled the service.
    let Some(task) = tasks.iter().max_by(|a, b| a.created_at.cmp(&b.created_at)) else {
        return Placed {
            status: InstanceStatus::Created,
            address: None,
            node: None,
            container: None,
            error: None,
        };
    };
    let status = task.status.clone().unwrap_or_default();
    let error = status.err.clone().filter(|e| !e.is_empty());
    let state = status.state.unwrap_or(TaskState::NEW);
    let desired = task.desired_state.unwrap_or(TaskState::RUNNING);
    let node = task.node_id.clone().filter(|n| !n.is_empty());
    let view = node.as_ref().and_then(|n| nodes.get(n));
    let container = status
        .container_status
        .as_ref()
        .and_then(|c| c.container_id.clone())
        .filter(|c| !c.is_empty());
    let status = if is_terminal(state) {
        exit_status(status.container_status.as_ref().and_then(|c| c.exit_code))
    } else if view.is_some_and(|v| v.down) {
        // Its node is lost: nothing of it can be reached or stopped until the node comes
        // back, and Swarm will not place it again.
        InstanceStatus::Exited {
            code: None,
            signal: None,
        }
    } else if is_terminal(desired) || desired == TaskState::SHUTDOWN {
        InstanceStatus::Stopping
    } else if state == TaskState::RUNNING {
        InstanceStatus::Running
    } else {
        InstanceStatus::Created
    };
    let address = match status {
        InstanceStatus::Running | InstanceStatus::Stopping => {
            let ip = view.and_then(|v| v.address);
            let published = status_port(task, port);
            ip.zip(published).map(|(ip, p)| SocketAddr::new(ip, p))
        }
        _ => None,
    };
    Placed {
        status,
        address,
        node,
        container,
        error,
    }
}

/// An ended container's exit code as the instance's end, as Docker's: above 128 it is the
/// signal that ended it.
pub fn exit_status(code: Option<i64>) -> InstanceStatus {
    match code {
        Some(code) if (129..=128 + 64).contains(&code) => InstanceStatus::Exited {
            code: None,
            signal: Some((code - 128) as i32),
        },
        Some(code) => InstanceStatus::Exited {
            code: Some(code as i32),
            signal: None,
        },
        None => InstanceStatus::Exited {
            code: None,
            signal: None,
        },
    }
}

/// What a node's engine said of an instance's container before the manager knew it (the
/// node reports to the manager later: a tenth of a second after a start, more after an end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeFact {
    /// Its container runs on `node`, reached at `address`.
    Running {
        address: SocketAddr,
        node: String,
        container: String,
    },
    /// Its container ended, so: its task never runs again (Swarm restarts none).
    Ended(InstanceStatus),
}

/// The instance's state from the manager's tasks (`placed`) and what a node said of it
/// (`fact`), whichever is further along: a node's word only ever moves an instance forward
/// (created to running, or to exited), never back.
pub fn overlay(mut placed: Placed, fact: Option<&NodeFact>) -> Placed {
    match fact {
        Some(NodeFact::Running {
            address,
            node,
            container,
        }) if placed.status == InstanceStatus::Created => {
            placed.status = InstanceStatus::Running;
            placed.address = Some(*address);
            placed.node = Some(node.clone());
            placed.container = Some(container.clone());
        }
        Some(NodeFact::Ended(status)) if !placed.status.is_exited() => {
            placed.status = *status;
            placed.address = None;
        }
        _ => {}
    }
    placed
}

/// The port the task's node published for `port` (host mode).
fn status_port(task: &Task, port: u16) -> Option<u16> {
    let ports = task.status.as_ref()?.port_status.as_ref()?.ports.as_ref()?;
    ports
        .iter()
        .find(|p| p.target_port == Some(i64::from(port)))
        .and_then(|p| p.published_port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p > 0)
}

/// The port a node's engine published for a task container's `port` (host mode), as the
/// container's inspection lists it: the same port the node later reports to the manager.
pub fn published_port(ports: &PortMap, port: u16) -> Option<u16> {
    ports
        .get(&format!("{port}/tcp"))?
        .as_ref()?
        .iter()
        .find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())
        .filter(|&p| p > 0)
}

fn is_terminal(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::COMPLETE
            | TaskState::SHUTDOWN
            | TaskState::FAILED
            | TaskState::REJECTED
            | TaskState::REMOVE
            | TaskState::ORPHANED
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerStatus, EndpointPortConfig, PortStatus, TaskStatus};

    fn task(state: TaskState, desired: TaskState, exit: Option<i64>) -> Task {
        Task {
            node_id: Some("n1".to_owned()),
            desired_state: Some(desired),
            status: Some(TaskStatus {
                state: Some(state),
                container_status: Some(ContainerStatus {
                    container_id: Some("c1".to_owned()),
                    exit_code: exit,
                    ..Default::default()
                }),
                port_status: Some(PortStatus {
                    ports: Some(vec![EndpointPortConfig {
                        target_port: Some(8080),
                        published_port: Some(30001),
                        ..Default::default()
                    }]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn nodes(down: bool) -> HashMap<String, NodeView> {
        let view = NodeView {
            ready: !down,
            down,
            address: Some("10.0.0.2".parse().unwrap()),
        };
        [("n1".to_owned(), view)].into()
    }

    #[test]
    fn a_running_task_is_reached_on_its_node_s_published_port() {
        let running = task(TaskState::RUNNING, TaskState::RUNNING, None);
        let placed = placed(&[&running], &nodes(false), 8080, 1);
        assert_eq!(placed.status, InstanceStatus::Running);
        assert_eq!(placed.address, Some("10.0.0.2:30001".parse().unwrap()));
        assert_eq!(placed.container.as_deref(), Some("c1"));
    }

    #[test]
    fn a_container_s_published_port_is_read_from_its_node_s_inspection() {
        use bollard::models::PortBinding;
        let binding = |port: &str| PortBinding {
            host_ip: Some("0.0.0.0".to_owned()),
            host_port: Some(port.to_owned()),
        };
        let ports: PortMap = [
            (
                "8080/tcp".to_owned(),
                Some(vec![binding("30001"), binding("30001")]),
            ),
            ("9090/tcp".to_owned(), None),
            ("7070/tcp".to_owned(), Some(vec![binding("0")])),
        ]
        .into();
        assert_eq!(published_port(&ports, 8080), Some(30001));
        // Not published (yet), or not this port: no address from it.
        assert_eq!(published_port(&ports, 9090), None);
        assert_eq!(published_port(&ports, 7070), None);
        assert_eq!(published_port(&ports, 1234), None);
    }

    #[test]
    fn a_task_on_a_lost_node_is_an_exited_instance() {
        // The manager still has it running (the node cannot say otherwise), and wants it
        // shut down.
        let orphan = task(TaskState::RUNNING, TaskState::SHUTDOWN, None);
        assert_eq!(
            placed(&[&orphan], &nodes(true), 8080, 1).status,
            InstanceStatus::Exited {
                code: None,
                signal: None
            }
        );
        // The negative control: on a live node the same task is stopping, still reached.
        let stopping = placed(&[&orphan], &nodes(false), 8080, 1);
        assert_eq!(stopping.status, InstanceStatus::Stopping);
        assert!(stopping.address.is_some());
    }

    #[test]
    fn exit_codes_and_signals_are_read_as_docker_s() {
        let cases = [
            (Some(0), Some(0), None),
            (Some(3), Some(3), None),
            (Some(137), None, Some(9)),
        ];
        for (exit, code, signal) in cases {
            let ended = task(TaskState::FAILED, TaskState::SHUTDOWN, exit);
            assert_eq!(
                placed(&[&ended], &nodes(false), 8080, 1).status,
                InstanceStatus::Exited { code, signal },
                "{exit:?}"
            );
        }
        assert_eq!(
            placed(&[], &nodes(false), 8080, 1).status,
            InstanceStatus::Created
        );
    }

    #[test]
    fn what_a_node_said_moves_an_instance_forward_only() {
        let created = placed(&[], &nodes(false), 8080, 1);
        let running = placed(
            &[&task(TaskState::RUNNING, TaskState::RUNNING, None)],
            &nodes(false),
            8080,
            1,
        );
        let ended = placed(
            &[&task(TaskState::FAILED, TaskState::SHUTDOWN, Some(143))],
            &nodes(false),
            8080,
            1,
        );
        let started = NodeFact::Running {
            address: "10.0.0.3:30002".parse().unwrap(),
            node: "n2".to_owned(),
            container: "c2".to_owned(),
        };
        let killed = NodeFact::Ended(exit_status(Some(137)));
        // Created for the manager, running on its node: running there.
        let seen = overlay(created.clone(), Some(&started));
        assert_eq!(seen.status, InstanceStatus::Running);
        assert_eq!(seen.address, Some("10.0.0.3:30002".parse().unwrap()));
        assert_eq!(seen.container.as_deref(), Some("c2"));
        // Running for the manager, ended on its node: exited, unreachable.
        let seen = overlay(running.clone(), Some(&killed));
        assert_eq!(seen.status, exit_status(Some(137)));
        assert_eq!(seen.address, None);
        // Never backwards: the manager's later word stands over an older fact.
        assert_eq!(overlay(running.clone(), Some(&started)), running);
        assert_eq!(overlay(ended.clone(), Some(&started)), ended);
        assert_eq!(overlay(ended.clone(), Some(&killed)), ended);
        assert_eq!(overlay(created.clone(), None), created);
    }

    #[test]
    fn a_stopped_instance_whose_task_never_ran_has_exited() {
        let pending = task(TaskState::PENDING, TaskState::RUNNING, None);
        let exited = InstanceStatus::Exited {
            code: None,
            signal: None,
        };
        assert_eq!(placed(&[], &nodes(false), 8080, 0).status, exited);
        assert_eq!(placed(&[&pending], &nodes(false), 8080, 0).status, exited);
        // The negative control: still wanted, it is starting.
        assert_eq!(
            placed(&[&pending], &nodes(false), 8080, 1).status,
            InstanceStatus::Created
        );
    }
}
