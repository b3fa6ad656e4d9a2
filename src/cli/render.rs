//! `graven render --runtime kubernetes` and `graven deploy --runtime kubernetes`: a project's
//! releases as manifests (`crate::kube::render`), written out or applied through the API
//! (`crate::kube::api`). The image comes from the store (`--image`) or is built and baked as
//! `graven deploy` does; the values of secrets from the secret store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::kube::{self, Options, Workload};
use crate::secrets::Secrets;
use crate::spec::{DEFAULT_ENVIRONMENT, Project};
use crate::store::{Digest, Store};

/// Where a project's services run when not on this machine's own control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    Kubernetes,
}

/// What names the cluster's objects and images.
#[derive(Debug, Default, clap::Args)]
pub struct ClusterArgs {
    /// The registry the cluster pulls images from (`HOST[/PATH]`); images are named
    /// `REGISTRY/APP@sha256:…` (`graven image push DIGEST REGISTRY/APP` puts one there).
    #[arg(long, env = "GRAVEN_REGISTRY")]
    pub registry: Option<String>,
    /// The namespace of every object (default: APP-ENV).
    #[arg(long)]
    pub namespace: Option<String>,
    /// An image of the store (tag, digest or unique prefix) instead of building and baking.
    #[arg(long)]
    pub image: Option<String>,
    /// The storage each named volume's claim asks for.
    #[arg(long, default_value = "1Gi")]
    pub volume_size: String,
}

#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// The project directory (holding graven.toml).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// The environment of graven.toml to render.
    #[arg(long = "env", default_value = DEFAULT_ENVIRONMENT)]
    pub environment: String,
    /// What to render for (default: the environment's `runtime`, which must then be
    /// kubernetes).
    #[arg(long, value_enum)]
    pub runtime: Option<Runtime>,
    /// A directory to write one file per object into, or `-` for a YAML stream on stdout.
    #[arg(long, short = 'o', default_value = "-")]
    pub output: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `graven deploy`'s options for a runtime other than the control plane's.
#[derive(Debug, Default, clap::Args)]
pub struct RemoteDeployArgs {
    /// Deploy to this runtime instead of graven's control plane.
    #[arg(long, value_enum)]
    pub runtime: Option<Runtime>,
    /// The Kubernetes API server, over plain HTTP: `http://HOST:PORT` (a `kubectl proxy`).
    #[arg(long)]
    pub server: Option<String>,
    /// A bearer token for the API server.
    #[arg(long, env = "GRAVEN_KUBE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// The cluster's settings and API server: each flag, else the environment's `kube_*` key in
/// graven.toml.
fn from_project(
    project: &Project,
    cluster: &ClusterArgs,
    server_flag: Option<String>,
) -> (ClusterArgs, Option<String>) {
    let (server, registry, namespace) = match &project.runtime {
        crate::spec::RuntimeChoice::Kubernetes {
            server,
            registry,
            namespace,
        } => (server.clone(), registry.clone(), namespace.clone()),
        _ => (None, None, None),
    };
    let merged = ClusterArgs {
        registry: cluster.registry.clone().or(registry),
        namespace: cluster.namespace.clone().or(namespace),
        image: cluster.image.clone(),
        volume_size: cluster.volume_size.clone(),
    };
    (merged, server_flag.or(server))
}

/// Each service's release as the cluster will run it, and where the objects go; `cluster`
/// already merged with graven.toml's keys (`from_project`).
fn workloads(
    home: &Path,
    project: &Project,
    cluster: &ClusterArgs,
) -> anyhow::Result<(Options, Vec<Workload>)> {
    let registry = cluster.registry.clone().context(
        "--registry (or kube_registry in the environment) is needed: the registry the cluster \
         pulls images from (HOST[/PATH])",
    )?;
    let order = match &cluster.image {
        Some(reference) => {
            let digest = Store::open(home)?.resolve(reference)?;
            crate::deploy::prepare_image(home, project, digest)?
        }
        None => super::project::prepare(home, project, false)?,
    };
    let secrets = Secrets::open(home, &project.app, &project.environment)?;
    let mut workloads = Vec::new();
    for release in order.services {
        let service = release.service.as_str().to_owned();
        let mut secret_values = std::collections::BTreeMap::new();
        for (var, pinned) in &release.config.secrets {
            let value = secrets
                .read(&pinned.name, pinned.version)
                .with_context(|| format!("service {service}: secret {}", pinned.name))?;
            secret_values.insert(var.clone(), value);
        }
        let run_as = run_as(home, &release.image, release.config.user.as_deref())
            .with_context(|| format!("service {service}: its user"))?;
        workloads.push(Workload {
            service,
            image: release.image,
            config: release.config,
            run_as,
            secret_values,
        });
    }
    let options = Options {
        namespace: cluster
            .namespace
            .clone()
            .unwrap_or_else(|| Options::default_namespace(&project.app, &project.environment)),
        app: project.app.clone(),
        environment: project.environment.clone(),
        registry,
        volume_size: cluster.volume_size.clone(),
    };
    Ok((options, workloads))
}

/// The uid and gid `user` (else the image's USER, else root) is in the image's own files.
fn run_as(home: &Path, image: &Digest, user: Option<&str>) -> anyhow::Result<(u32, u32)> {
    let image_user = Store::open(home)?.image(image)?.config.config.user;
    let Some(user) = user
        .map(str::to_owned)
        .or(image_user)
        .filter(|u| !u.is_empty())
    else {
        return Ok((0, 0));
    };
    // `uid:gid` needs no file of the image; a name, or a uid alone (whose group is its
    // passwd entry's), is read inside its root, as the runtime, bake and the deploy read it.
    if let Some((uid, gid)) = user.split_once(':')
        && let (Ok(uid), Ok(gid)) = (uid.parse::<u32>(), gid.parse::<u32>())
    {
        return Ok((uid, gid));
    }
    let runtime = crate::runtime::LocalRuntime::open(home)?;
    let (_, root) = runtime.prepare_blocking(image)?;
    let read = |p: &str| crate::sandbox::root::read_text(&root, p);
    Ok(crate::sandbox::user::resolve(
        &user,
        &read("etc/passwd"),
        &read("etc/group"),
    )?)
}

pub fn render(home: &Path, args: RenderArgs) -> anyhow::Result<ExitCode> {
    let project = super::project::load_project(&args.dir, &args.environment)?;
    let kubernetes = matches!(args.runtime, Some(Runtime::Kubernetes))
        || matches!(
            project.runtime,
            crate::spec::RuntimeChoice::Kubernetes { .. }
        );
    anyhow::ensure!(
        kubernetes,
        "environment {:?} runs on the {} runtime: graven render writes manifests for \
         kubernetes (--runtime kubernetes, or runtime = \"kubernetes\" in the environment)",
        project.environment,
        project.runtime.name()
    );
    let (cluster, _) = from_project(&project, &args.cluster, None);
    let (options, workloads) = workloads(home, &project, &cluster)?;
    let objects = kube::render(&options, &workloads)?;
    if args.output == "-" {
        use std::io::Write as _;
        std::io::stdout().write_all(kube::to_documents(&objects).as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    }
    let dir = Path::new(&args.output);
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    for (index, object) in objects.iter().enumerate() {
        let file = dir.join(kube::render::file_name(index, object));
        let mut text = serde_json::to_string_pretty(object)?;
        text.push('\n');
        // Owner-only (a temp file's mode), renamed into place: a Secret's file holds its
        // values, as the secret store's files do.
        crate::store::write_atomic(&file, text.as_bytes())
            .with_context(|| format!("writing {}", file.display()))?;
    }
    eprintln!("wrote {} objects to {}", objects.len(), dir.display());
    Ok(ExitCode::SUCCESS)
}

/// `graven deploy --runtime kubernetes`: render, apply, watch, roll back on failure.
pub fn deploy(
    home: &Path,
    project: &Project,
    json: bool,
    args: RemoteDeployArgs,
) -> anyhow::Result<ExitCode> {
    let (cluster, server) = from_project(project, &args.cluster, args.server);
    let server = server.context(
        "--server (or kube_server in the environment) is needed: the API server, \
         http://HOST:PORT (a `kubectl proxy`)",
    )?;
    let client = kube::api::Client::new(&server, args.token)?;
    let (options, workloads) = workloads(home, project, &cluster)?;
    let objects = kube::render(&options, &workloads)?;
    let runtime = super::async_runtime(super::Threads::One)?;
    let mut progress = |what: &str| eprintln!("graven: {what}");
    let report = runtime.block_on(kube::api::deploy(
        &client,
        &objects,
        kube::api::POLL,
        &mut progress,
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for workload in &report.workloads {
            let outcome = match &workload.outcome {
                kube::api::WorkloadOutcome::RolledOut => "rolled out".to_owned(),
                kube::api::WorkloadOutcome::RolledBack { release } => format!(
                    "rolled back to release {}",
                    release.as_deref().unwrap_or("(unlabelled)")
                ),
                kube::api::WorkloadOutcome::Removed => "removed (no release before)".to_owned(),
                kube::api::WorkloadOutcome::Skipped => "not applied".to_owned(),
                kube::api::WorkloadOutcome::RollbackFailed { reason } => {
                    format!("its rollback failed: {reason}")
                }
            };
            println!(
                "{} {} release {}: {outcome}",
                workload.kind, workload.name, workload.release
            );
        }
    }
    match &report.failure {
        None => Ok(ExitCode::SUCCESS),
        Some(why) => {
            let unrolled: Vec<&str> = report
                .workloads
                .iter()
                .filter(|w| matches!(w.outcome, kube::api::WorkloadOutcome::RollbackFailed { .. }))
                .map(|w| w.name.as_str())
                .collect();
            if unrolled.is_empty() {
                eprintln!("graven: deploy failed and was rolled back: {why}");
            } else {
                eprintln!(
                    "graven: deploy failed: {why}; its rollback failed too for {}: the cluster \
                     may hold the failed release",
                    unrolled.join(", ")
                );
            }
            Ok(ExitCode::FAILURE)
        }
    }
}
