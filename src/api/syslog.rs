//! The syslog forwarders and listener a project's `[logs]` asks for, run by the control plane
//! (`graven up`, `graven daemon`) per app and environment for as long as it runs. A deploy
//! carries the table; the daemon keeps it beside the app's event log (`logs.json`) so a
//! restarted control plane runs it again before anything is deployed, and writes the
//! counters `graven status` shows (`syslog.json`) every `REPORT_EVERY` and when it stops.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::logs::bridge::{StoreFeed, StoreSink};
use crate::logs::syslog::{Forwarder, Listener, SyslogReport};
use crate::spec::logs::Logs;

use super::ApiError;

/// How often the counters `graven status` shows are written.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

const CONFIG: &str = "logs.json";
const REPORT: &str = "syslog.json";

/// The directory of an app and environment's event log, where its syslog files live.
fn dir(home: &Path, app: &str, environment: &str) -> PathBuf {
    super::log_path(home, app, environment)
        .parent()
        .expect("the log has a directory")
        .to_owned()
}

/// The counters of the syslog a control plane runs, or ran, for this app and environment.
pub fn report(home: &Path, app: &str, environment: &str) -> Option<SyslogReport> {
    let text = std::fs::read(dir(home, app, environment).join(REPORT)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The `[logs]` the last deploy of this app and environment carried, if it had one.
pub fn kept_config(home: &Path, app: &str, environment: &str) -> Option<Logs> {
    let text = std::fs::read(dir(home, app, environment).join(CONFIG)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Keeps (or, empty, forgets) the `[logs]` a deploy carried.
pub fn keep_config(home: &Path, app: &str, environment: &str, logs: &Logs) -> Result<(), ApiError> {
    let dir = dir(home, app, environment);
    let path = dir.join(CONFIG);
    if logs.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(super::io(&path)(e)),
            _ => Ok(()),
        };
    }
    let bytes = serde_json::to_vec_pretty(logs).expect("logs serialize");
    // `graven up` on a new home sets its logs before its first deploy made the directory.
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(super::io(&dir))?;
    // Durable, as the store writes its files (0600: a temp file's mode).
    crate::store::write_atomic(&path, &bytes).map_err(|e| ApiError::Syslog {
        message: e.to_string(),
    })
}

/// Writes `bytes` to a 0600 temp file beside `path` and renames it into place, without a
/// sync: the counters are rewritten every `REPORT_EVERY`, a lost one costs nothing.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| std::io::Write::write_all(&mut file, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// One app and environment's running syslog, and the config it runs.
pub struct Syslog {
    pub config: Logs,
    forwarders: Vec<Forwarder>,
    listener: Option<Listener>,
    reporter: tokio::task::JoinHandle<()>,
    report: Arc<dyn Fn() + Send + Sync>,
}

impl Syslog {
    /// Starts what `logs` asks for (inside a tokio runtime). A listen address that cannot be
    /// bound fails the start, and nothing is left running.
    pub async fn start(
        home: &Path,
        app: &str,
        environment: &str,
        logs: &Logs,
    ) -> Result<Syslog, ApiError> {
        let dir = dir(home, app, environment);
        let mut forwarders = Vec::new();
        for config in &logs.forward {
            let query = crate::logs::read::Query {
                app: Some(app.to_owned()),
                environment: Some(environment.to_owned()),
                services: config.services.clone(),
                ..Default::default()
            };
            // One cursor per destination, named after it, so a restart resumes each where
            // it was.
            let name: String = config
                .to
                .to_string()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let feed = StoreFeed::open(home, query, dir.join(format!("syslog-{name}.cursor")));
            forwarders.push(Forwarder::spawn(config.clone(), feed));
        }
        let listener = match &logs.listen {
            Some(config) => match Listener::bind(config, StoreSink::new(home)).await {
                Ok(listener) => Some(listener),
                Err(error) => {
                    for forwarder in forwarders {
                        forwarder.stop().await;
                    }
                    return Err(ApiError::Syslog {
                        message: error.to_string(),
                    });
                }
            },
            None => None,
        };
        let stats: Vec<_> = forwarders
            .iter()
            .zip(&logs.forward)
            .map(|(f, config)| (f.stats(), config.to.clone()))
            .collect();
        let listening = listener
            .as_ref()
            .map(|l| (l.stats(), l.local_addrs().to_vec()));
        let path = dir.join(REPORT);
        let report: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            let report = SyslogReport {
                at_ms: crate::runtime::now_ms(),
                forward: stats.iter().map(|(s, to)| s.report(to)).collect(),
                listen: listening.as_ref().map(|(s, at)| s.report(at)),
            };
            // Counters for people: a write that fails is tried again at the next tick.
            let bytes = serde_json::to_vec_pretty(&report).expect("a report serializes");
            let _ = write_private(&path, &bytes);
        });
        let reporter = {
            let report = report.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(REPORT_EVERY);
                loop {
                    every.tick().await;
                    report();
                }
            })
        };
        Ok(Syslog {
            config: logs.clone(),
            forwarders,
            listener,
            reporter,
            report,
        })
    }

    /// Where the listener listens (its ports as bound).
    pub fn listening(&self) -> Vec<String> {
        self.listener
            .iter()
            .flat_map(|l| l.local_addrs())
            .map(|a| a.to_string())
            .collect()
    }

    /// Stops the forwarders (each cursor kept where its server last confirmed) and the
    /// listener (after its store took what it received), then writes the last counters.
    pub async fn stop(self) {
        self.reporter.abort();
        for forwarder in self.forwarders {
            forwarder.stop().await;
        }
        if let Some(listener) = self.listener {
            listener.stop().await;
        }
        (self.report)();
    }
}
