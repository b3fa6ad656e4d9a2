//! `graven __synthetic-history`: appends a long, realistic history to an app's event log for
//! the start-up benchmark (bench/event_log.sh). Dev-only (`dev-tools`). Each cycle is what a
//! service of four instances lives through between two deploys: a release and its rolling
//! deploy, then health checks flapping and instances crashing and being replaced, with the
//! traffic decisions each change brings, about a hundred events.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::events::{
    DeployReason, DrainReason, Event, EventLog, GoneReason, InstanceName, ReleaseNumber, RuntimeId,
    ServiceConfig, ServiceName,
};
use crate::store::Digest;

#[derive(Debug, clap::Args)]
pub struct SyntheticArgs {
    #[arg(long, default_value = "bench")]
    app: String,
    #[arg(long = "env", default_value = "local")]
    environment: String,
    /// How many events to append.
    #[arg(long)]
    events: u64,
}

/// The project the synthetic releases are made of: the example's config.
const CONFIG: &str = r#"
app = "bench"
[services.web]
instances = 4
port = 8080
route = "127.0.0.1:8000"
env = { GREETING = "hello" }
"#;

pub fn run(home: &Path, args: SyntheticArgs) -> anyhow::Result<ExitCode> {
    let path = crate::api::log_path(home, &args.app, &args.environment);
    let log = EventLog::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let project = crate::spec::parse(
        CONFIG,
        Path::new("graven.toml"),
        Path::new("/bench"),
        "local",
    )
    .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    let config = ServiceConfig::from(&project.services["web"]);
    let state = crate::events::snapshot::load(&log)?;
    let mut history = History {
        web: ServiceName::new("web"),
        config,
        release: state.next_release().get() - 1,
        launched: state.launched,
        live: Vec::new(),
        traffic: BTreeMap::new(),
        events: Vec::new(),
    };
    let mut written = 0;
    while written < args.events {
        while history.events.len() < 10_000 {
            history.cycle();
        }
        let take = (args.events - written).min(history.events.len() as u64) as usize;
        let batch: Vec<Event> = history.events.drain(..take).collect();
        log.append_many("synthetic", 1_700_000_000_000, &batch)?;
        written += take as u64;
    }
    println!(
        "{}/{}: {written} events appended",
        args.app, args.environment
    );
    Ok(ExitCode::SUCCESS)
}

struct History {
    web: ServiceName,
    config: ServiceConfig,
    release: u64,
    launched: u64,
    live: Vec<InstanceName>,
    traffic: BTreeMap<InstanceName, u32>,
    events: Vec<Event>,
}

impl History {
    fn route(&mut self) {
        self.events.push(Event::TrafficChanged {
            service: self.web.clone(),
            routed: self.traffic.clone(),
        });
    }

    fn launch(&mut self) -> InstanceName {
        self.launched += 1;
        let instance = InstanceName(format!("web-{}-{}", self.release, self.launched));
        self.events.push(Event::InstanceLaunched {
            service: self.web.clone(),
            release: ReleaseNumber(self.release),
            instance: instance.clone(),
        });
        self.events.push(Event::InstanceStarted {
            instance: instance.clone(),
            runtime_id: RuntimeId(format!("{:012x}", self.launched)),
            address: ([127, 0, 0, 1], 40000 + (self.launched % 20000) as u16).into(),
        });
        self.events.push(Event::InstanceHealthy {
            instance: instance.clone(),
        });
        self.traffic.insert(instance.clone(), 1);
        self.route();
        instance
    }

    fn stop(&mut self, instance: InstanceName, reason: DrainReason) {
        self.traffic.remove(&instance);
        self.route();
        self.events.push(Event::InstanceDraining {
            instance: instance.clone(),
            reason,
        });
        self.events.push(Event::InstanceGone {
            instance,
            reason: GoneReason::Stopped,
        });
    }

    fn cycle(&mut self) {
        let from = (self.release > 0).then_some(ReleaseNumber(self.release));
        self.release += 1;
        let mut config = self.config.clone();
        config
            .env
            .insert("VERSION".into(), format!("v{}", self.release));
        self.events.push(Event::ReleaseCreated {
            service: self.web.clone(),
            release: ReleaseNumber(self.release),
            image: Digest::of(&self.release.to_be_bytes()),
            config_digest: config.digest().to_string(),
            config,
            source: None,
        });
        self.events.push(Event::DeployStarted {
            service: self.web.clone(),
            from,
            to: ReleaseNumber(self.release),
            reason: DeployReason::Deploy,
        });
        let old = std::mem::take(&mut self.live);
        for instance in old {
            let new = self.launch();
            self.live.push(new);
            let by = ReleaseNumber(self.release);
            self.stop(instance, DrainReason::Replaced { by });
        }
        while self.live.len() < 4 {
            let new = self.launch();
            self.live.push(new);
        }
        self.events.push(Event::DeploySucceeded {
            service: self.web.clone(),
            release: ReleaseNumber(self.release),
        });
        // A day of service: health checks flapping, and crashes replaced.
        for round in 0..12 {
            let instance = self.live[round % 4].clone();
            self.events.push(Event::InstanceUnhealthy {
                instance: instance.clone(),
                detail: "status 503".into(),
            });
            self.traffic.remove(&instance);
            self.route();
            self.events.push(Event::InstanceHealthy {
                instance: instance.clone(),
            });
            self.traffic.insert(instance, 1);
            self.route();
        }
        for slot in 0..2 {
            let crashed = self.live[slot].clone();
            self.traffic.remove(&crashed);
            self.route();
            self.events.push(Event::InstanceExited {
                instance: crashed,
                code: Some(1),
                signal: None,
            });
            self.live[slot] = self.launch();
        }
    }
}
