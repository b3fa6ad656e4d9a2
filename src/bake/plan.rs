//! The planner: from a parsed Containerfile, the build args and the base image's config to a
//! list of steps with every variable expanded, every path absolute and the final image config.
//! Pure: no I/O, so a plan is a plain value that tests compare.

use std::collections::BTreeMap;

use super::containerfile::{self, Command, Containerfile, Kind};
use crate::store::{HealthConfig, RuntimeConfig};

/// A planning problem at a line of the Containerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    pub line: usize,
    pub reason: String,
}

type Result<T> = std::result::Result<T, PlanError>;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    Scratch,
    /// An earlier stage of the same Containerfile.
    Stage(usize),
    /// A store tag or digest, or an importable path (`oci:`, `oci-archive:`, `docker-archive:`).
    Image(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub name: Option<String>,
    pub base: Base,
    pub from_line: usize,
    pub from_text: String,
    /// Indexes into the Containerfile's instructions, after the FROM.
    pub instructions: Vec<usize>,
    /// What each `COPY --from` of the stage (by instruction index) copies from: an earlier
    /// stage or an image (scratch holds nothing to copy).
    pub copy_from: BTreeMap<usize, Base>,
    /// What each `RUN --mount=type=bind,from=…` of the stage (by instruction index and
    /// mount number) binds from: an earlier stage or an image.
    pub mount_from: BTreeMap<(usize, usize), Base>,
}

/// The stages and which of them to build (in order): the target (the last stage unless
/// `select` names another) and every stage it is built on or copies from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stages {
    pub stages: Vec<Stage>,
    pub needed: Vec<usize>,
    /// ARGs declared before the first FROM, with their values after `--build-arg`.
    pub global_args: BTreeMap<String, Option<String>>,
}

/// Splits the file into stages and expands each FROM with the global ARGs.
pub fn stages(file: &Containerfile, build_args: &BTreeMap<String, String>) -> Result<Stages> {
    let mut global_args = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for (index, instruction) in file.instructions.iter().enumerate() {
        match &instruction.kind {
            Kind::Arg(args) if stages.is_empty() => {
                for (name, default) in args {
                    let value = match build_args.get(name) {
                        Some(v) => Some(v.clone()),
                        None => match default {
                            Some(d) => Some(expand(d, file.escape, instruction.line, &|n| {
                                global_args.get(n).cloned().flatten()
                            })?),
                            None => None,
                        },
                    };
                    global_args.insert(name.clone(), value);
                }
            }
            Kind::From { image, alias, .. } => {
                let image = expand(image, file.escape, instruction.line, &|n| {
                    global_args.get(n).cloned().flatten()
                })?;
                if image.is_empty() {
                    return Err(PlanError {
                        line: instruction.line,
                        reason: "malformed FROM: the image expands to nothing".to_owned(),
                    });
                }
                let lower = image.to_lowercase();
                let base = if lower == "scratch" {
                    Base::Scratch
                } else if let Some(at) = stages
                    .iter()
                    .position(|s| s.name.as_deref() == Some(lower.as_str()))
                {
                    Base::Stage(at)
                } else if stage_named(file, index, &lower) {
                    return Err(PlanError {
                        line: instruction.line,
                        reason: format!(
                            "FROM {image}: stage {lower:?} is not defined before this FROM: a \
                             stage can only start from an earlier one"
                        ),
                    });
                } else {
                    Base::Image(image)
                };
                if let Some(alias) = alias
                    && stages.iter().any(|s| s.name.as_ref() == Some(alias))
                {
                    return Err(PlanError {
                        line: instruction.line,
                        reason: format!("duplicate stage name {alias:?}"),
                    });
                }
                stages.push(Stage {
                    name: alias.clone(),
                    base,
                    from_line: instruction.line,
                    from_text: instruction.text.clone(),
                    instructions: Vec::new(),
                    copy_from: BTreeMap::new(),
                    mount_from: BTreeMap::new(),
                });
            }
            Kind::Copy {
                from: Some(from), ..
            } => {
                let from = expand(from, file.escape, instruction.line, &|n| {
                    global_args.get(n).cloned().flatten()
                })?;
                let current = stages.len() - 1;
                let source =
                    copy_source(file, &stages, index, &from).map_err(|reason| PlanError {
                        line: instruction.line,
                        reason,
                    })?;
                let stage = &mut stages[current];
                stage.copy_from.insert(index, source);
                stage.instructions.push(index);
            }
            Kind::Run(_, flags) if flags.mounts.iter().any(|m| m.bind_from().is_some()) => {
                let current = stages.len() - 1;
                for (number, mount) in flags.mounts.iter().enumerate() {
                    let Some(from) = mount.bind_from() else {
                        continue;
                    };
                    let from = expand(from, file.escape, instruction.line, &|n| {
                        global_args.get(n).cloned().flatten()
                    })?;
                    let source =
                        copy_source(file, &stages, index, &from).map_err(|reason| PlanError {
                            line: instruction.line,
                            reason: reason.replace("COPY --from=", "--mount from="),
                        })?;
                    stages[current].mount_from.insert((index, number), source);
                }
                stages[current].instructions.push(index);
            }
            _ => stages
                .last_mut()
                .expect("the parser ensures FROM comes first")
                .instructions
                .push(index),
        }
    }
    let mut stages = Stages {
        needed: Vec::new(),
        stages,
        global_args,
    };
    stages.needed = stages.needed_for(stages.stages.len() - 1);
    Ok(stages)
}

/// Whether a FROM at or after instruction `from` names the stage `name`.
fn stage_named(file: &Containerfile, from: usize, name: &str) -> bool {
    file.instructions[from..]
        .iter()
        .any(|i| matches!(&i.kind, Kind::From { alias: Some(alias), .. } if alias == name))
}

/// `COPY --from=WHAT` at instruction `index`: an earlier stage by name or index, else an
/// image (a store tag or digest, or any form FROM takes). Naming this stage or a later one
/// is refused: it would be a cycle or a forward reference.
fn copy_source(
    file: &Containerfile,
    stages: &[Stage],
    index: usize,
    from: &str,
) -> std::result::Result<Base, String> {
    let current = stages.len() - 1;
    if from.is_empty() {
        return Err("COPY --from expands to nothing".to_owned());
    }
    if let Ok(number) = from.parse::<usize>() {
        return if number < current {
            Ok(Base::Stage(number))
        } else {
            Err(format!(
                "COPY --from={from}: stage {number} is not an earlier stage (this is stage \
                 {current}): a stage copies only from the stages before it"
            ))
        };
    }
    let lower = from.to_lowercase();
    if let Some(at) = stages[..current]
        .iter()
        .position(|s| s.name.as_deref() == Some(lower.as_str()))
    {
        return Ok(Base::Stage(at));
    }
    if stages[current].name.as_deref() == Some(lower.as_str()) {
        return Err(format!(
            "COPY --from={from}: a stage cannot copy from itself"
        ));
    }
    if stage_named(file, index, &lower) {
        return Err(format!(
            "COPY --from={from}: stage {lower:?} is defined later in the file: a stage copies \
             only from the stages before it"
        ));
    }
    Ok(if lower == "scratch" {
        Base::Scratch
    } else {
        Base::Image(from.to_owned())
    })
}

impl Stages {
    /// The stages `target` needs, in file order: its base chain and what it copies from.
    fn needed_for(&self, target: usize) -> Vec<usize> {
        let mut needed = std::collections::BTreeSet::new();
        let mut todo = vec![target];
        while let Some(index) = todo.pop() {
            if !needed.insert(index) {
                continue;
            }
            let stage = &self.stages[index];
            if let Base::Stage(parent) = stage.base {
                todo.push(parent);
            }
            for source in stage.copy_from.values().chain(stage.mount_from.values()) {
                if let Base::Stage(source) = source {
                    todo.push(*source);
                }
            }
        }
        needed.into_iter().collect()
    }

    /// Builds up to the stage named `target` (`--target`) instead of the last one.
    pub fn select(&mut self, target: &str) -> std::result::Result<(), String> {
        let lower = target.to_lowercase();
        let Some(at) = self
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
        else {
            let names: Vec<&str> = self
                .stages
                .iter()
                .filter_map(|s| s.name.as_deref())
                .collect();
            return Err(if names.is_empty() {
                format!("--target {target}: no stage has a name (name one with FROM … AS NAME)")
            } else {
                format!(
                    "--target {target}: no stage of that name; the stages are {}",
                    names.join(", ")
                )
            });
        };
        self.needed = self.needed_for(at);
        Ok(())
    }
}

/// One step of a stage, fully expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    pub text: String,
    pub action: Action,
    /// The build args in scope (`NAME=value`), part of the step's cache key.
    pub args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// COPY or ADD: `dest` is absolute; a trailing `/` means "into this directory".
    /// `from` is `COPY --from`'s stage or image (sources are paths in its root); `files` the
    /// heredocs, as (name, content) with the content expanded when the delimiter was bare.
    Copy {
        add: bool,
        sources: Vec<String>,
        dest: String,
        chown: Option<String>,
        chmod: Option<u32>,
        from: Option<Base>,
        files: Vec<(String, String)>,
    },
    /// Creates the directory (when the lower layers lack it) and sets the working directory.
    Workdir(String),
    Run {
        args: Vec<String>,
        env: Vec<String>,
        user: String,
        workdir: String,
        /// `--mount` and `--network`, targets as written (`mounts::absolute_target` places a
        /// relative one under `workdir`).
        flags: super::mounts::RunFlags,
        /// What each bind mount with `from=` (by mount number) binds from.
        bind_from: BTreeMap<usize, Base>,
    },
    /// Changes the config only; the text says what.
    Config(String),
}

impl Action {
    pub fn makes_layer(&self) -> bool {
        !matches!(self, Action::Config(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub steps: Vec<Step>,
    pub config: RuntimeConfig,
}

fn expand(
    word: &str,
    escape: char,
    line: usize,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String> {
    containerfile::expand(word, escape, lookup).map_err(|reason| PlanError { line, reason })
}

fn env_get(env: &[String], name: &str) -> Option<String> {
    env.iter().find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

fn env_set(env: &mut Vec<String>, name: &str, value: &str) {
    let entry = format!("{name}={value}");
    match env
        .iter_mut()
        .find(|kv| kv.split_once('=').map(|(k, _)| k) == Some(name))
    {
        Some(existing) => *existing = entry,
        None => env.push(entry),
    }
}

/// Joins a path onto the working directory and normalizes it lexically (no `.`/`..`).
pub fn absolute(workdir: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{workdir}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Plans the instructions of one stage on top of `base` (the base image's config).
pub fn plan_stage(
    file: &Containerfile,
    stage: &Stage,
    base: &RuntimeConfig,
    build_args: &BTreeMap<String, String>,
    global_args: &BTreeMap<String, Option<String>>,
) -> Result<Planned> {
    let escape = file.escape;
    let mut config = base.clone();
    let mut args: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut shell = vec!["/bin/sh".to_owned(), "-c".to_owned()];
    let mut cmd_set = false;
    let mut steps = Vec::new();
    // The base's ONBUILD triggers run first, as if written right after the FROM, and are
    // not passed on to the images baked from this one (Docker clears them too).
    let triggers = match config.other.remove("OnBuild") {
        Some(serde_json::Value::Array(list)) => list,
        _ => Vec::new(),
    };
    let mut items: Vec<(usize, String, Kind, Option<usize>)> = Vec::new();
    for trigger in triggers {
        let text = trigger.as_str().unwrap_or_default().trim().to_owned();
        let kind = containerfile::parse_trigger(&text, escape).map_err(|reason| PlanError {
            line: stage.from_line,
            reason: format!("the base image's ONBUILD trigger {text:?}: {reason}"),
        })?;
        items.push((stage.from_line, text, kind, None));
    }
    for &index in &stage.instructions {
        let instruction = &file.instructions[index];
        items.push((
            instruction.line,
            instruction.text.clone(),
            instruction.kind.clone(),
            Some(index),
        ));
    }
    let mut on_build: Vec<serde_json::Value> = Vec::new();
    for (line, text, kind, index) in &items {
        let (line, text, kind) = (*line, text, kind);
        // ENV wins over ARG of the same name, as in Docker.
        let mut vars: BTreeMap<String, String> = args
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
            .collect();
        for kv in &config.env {
            if let Some((k, v)) = kv.split_once('=') {
                vars.insert(k.to_owned(), v.to_owned());
            }
        }
        // `$PATH` in a Containerfile on a base that sets none is the default PATH, as in
        // Docker (`ENV PATH=/opt/x/bin:$PATH` on scratch keeps /usr/bin and the rest).
        vars.entry("PATH".to_owned())
            .or_insert_with(|| DEFAULT_PATH.to_owned());
        let lookup = |name: &str| vars.get(name).cloned();
        let x = |word: &str| expand(word, escape, line, &lookup);
        let workdir = config.working_dir.clone().unwrap_or_else(|| "/".to_owned());
        let action = match kind {
            Kind::From { .. } => unreachable!("stages() splits at FROM"),
            Kind::Onbuild(trigger) => {
                on_build.push(trigger.clone().into());
                Action::Config(text.clone())
            }
            Kind::Arg(declared) => {
                for (name, default) in declared {
                    let value = match build_args.get(name) {
                        Some(v) => Some(v.clone()),
                        None => match default {
                            Some(d) => Some(x(d)?),
                            None => global_args.get(name).cloned().flatten(),
                        },
                    };
                    args.insert(name.clone(), value);
                }
                Action::Config(text.clone())
            }
            Kind::Env(pairs) => {
                let expanded: Vec<(String, String)> = pairs
                    .iter()
                    .map(|(k, v)| Ok((x(k)?, x(v)?)))
                    .collect::<Result<_>>()?;
                for (k, v) in expanded {
                    if !containerfile::valid_var_name(&k) {
                        return Err(PlanError {
                            line,
                            reason: format!("ENV name {k:?} is not a valid variable name"),
                        });
                    }
                    env_set(&mut config.env, &k, &v);
                }
                Action::Config(text.clone())
            }
            Kind::Label(pairs) => {
                for (k, v) in pairs {
                    config.labels.insert(x(k)?, x(v)?);
                }
                Action::Config(text.clone())
            }
            Kind::Workdir(path) => {
                let path = absolute(&workdir, &x(path)?);
                config.working_dir = Some(path.clone());
                Action::Workdir(path)
            }
            Kind::User(user) => {
                let user = x(user)?;
                if user.is_empty() {
                    return Err(PlanError {
                        line,
                        reason: "USER expands to nothing".to_owned(),
                    });
                }
                config.user = Some(user);
                Action::Config(text.clone())
            }
            Kind::Expose(ports) => {
                for port in ports {
                    for port in expose(&x(port)?).map_err(|reason| PlanError { line, reason })? {
                        config
                            .exposed_ports
                            .insert(port, serde_json::Value::Object(Default::default()));
                    }
                }
                Action::Config(text.clone())
            }
            Kind::Volume(paths) => {
                for path in paths {
                    config.volumes.insert(
                        absolute(&workdir, &x(path)?),
                        serde_json::Value::Object(Default::default()),
                    );
                }
                Action::Config(text.clone())
            }
            Kind::Stopsignal(signal) => {
                let signal = x(signal)?;
                validate_signal(&signal).map_err(|reason| PlanError { line, reason })?;
                config.stop_signal = Some(signal);
                Action::Config(text.clone())
            }
            Kind::Shell(words) => {
                shell = words.clone();
                Action::Config(text.clone())
            }
            Kind::Entrypoint(command) => {
                config.entrypoint = Some(argv(command, &shell));
                // Setting ENTRYPOINT drops a CMD inherited from the base, as in Docker.
                if !cmd_set {
                    config.cmd = None;
                }
                Action::Config(text.clone())
            }
            Kind::Cmd(command) => {
                config.cmd = Some(argv(command, &shell));
                cmd_set = true;
                Action::Config(text.clone())
            }
            Kind::Healthcheck(check) => {
                config.healthcheck = Some(match check {
                    None => HealthConfig {
                        test: vec!["NONE".to_owned()],
                        ..Default::default()
                    },
                    Some(check) => HealthConfig {
                        test: match &check.command {
                            Command::Exec(words) => {
                                let mut test = vec!["CMD".to_owned()];
                                test.extend(words.iter().cloned());
                                test
                            }
                            Command::Shell(text) => vec!["CMD-SHELL".to_owned(), text.clone()],
                        },
                        interval: check.interval,
                        timeout: check.timeout,
                        start_period: check.start_period,
                        retries: check.retries,
                    },
                });
                Action::Config(text.clone())
            }
            Kind::Copy {
                add,
                sources,
                dest,
                chown,
                chmod,
                from,
                files,
            } => {
                let from = match (from, index.and_then(|i| stage.copy_from.get(&i))) {
                    (None, _) => None,
                    (Some(_), Some(source)) => Some(source.clone()),
                    (Some(from), None) => {
                        return Err(PlanError {
                            line,
                            reason: format!(
                                "COPY --from={from} in an ONBUILD trigger is not supported"
                            ),
                        });
                    }
                };
                let files = files
                    .iter()
                    .map(|doc| {
                        let content = doc.content();
                        let content = if doc.expand {
                            containerfile::expand_heredoc(&content, escape, &lookup)
                                .map_err(|reason| PlanError { line, reason })?
                        } else {
                            content
                        };
                        Ok((doc.name.clone(), content))
                    })
                    .collect::<Result<_>>()?;
                let sources: Vec<String> = sources.iter().map(|s| x(s)).collect::<Result<_>>()?;
                let raw_dest = x(dest)?;
                let mut dest = absolute(&workdir, &raw_dest);
                if (raw_dest.ends_with('/') || raw_dest == "." || raw_dest.ends_with("/."))
                    && dest != "/"
                {
                    dest.push('/');
                }
                let chmod = chmod
                    .as_deref()
                    .map(|m| {
                        containerfile::parse_mode(&x(m)?)
                            .map_err(|reason| PlanError { line, reason })
                    })
                    .transpose()?;
                Action::Copy {
                    add: *add,
                    sources,
                    dest,
                    chown: chown.as_deref().map(x).transpose()?,
                    chmod,
                    from,
                    files,
                }
            }
            Kind::Run(command, flags) => {
                let mut env = config.env.clone();
                for (name, value) in &args {
                    if let Some(value) = value
                        && env_get(&env, name).is_none()
                    {
                        env.push(format!("{name}={value}"));
                    }
                }
                if env_get(&env, "PATH").is_none() {
                    env.insert(0, format!("PATH={DEFAULT_PATH}"));
                }
                let bind_from: BTreeMap<usize, Base> = match index {
                    Some(i) => stage
                        .mount_from
                        .range((*i, 0)..=(*i, usize::MAX))
                        .map(|(&(_, number), base)| (number, base.clone()))
                        .collect(),
                    None => BTreeMap::new(),
                };
                if flags.mounts.iter().any(|m| m.bind_from().is_some()) && index.is_none() {
                    return Err(PlanError {
                        line,
                        reason: "RUN --mount from= in an ONBUILD trigger is not supported"
                            .to_owned(),
                    });
                }
                Action::Run {
                    args: argv(command, &shell),
                    env,
                    user: config.user.clone().unwrap_or_else(|| "0".to_owned()),
                    workdir,
                    flags: flags.clone(),
                    bind_from,
                }
            }
        };
        steps.push(Step {
            line,
            text: text.clone(),
            action,
            args: args
                .iter()
                .filter_map(|(k, v)| Some(format!("{k}={}", v.as_ref()?)))
                .collect(),
        });
    }
    if !on_build.is_empty() {
        config
            .other
            .insert("OnBuild".to_owned(), serde_json::Value::Array(on_build));
    }
    Ok(Planned { steps, config })
}

fn argv(command: &Command, shell: &[String]) -> Vec<String> {
    match command {
        Command::Exec(words) => words.clone(),
        Command::Shell(text) => {
            let mut words = shell.to_vec();
            words.push(text.clone());
            words
        }
    }
}

/// `8080`, `53/udp`, `8000-8002/tcp` → `8080/tcp`, …
fn expose(spec: &str) -> std::result::Result<Vec<String>, String> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_lowercase()),
        None => (spec, "tcp".to_owned()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("EXPOSE {spec}: unknown protocol {proto:?}"));
    }
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("EXPOSE {spec}: {p:?} is not a port number"))
    };
    let (low, high) = match ports.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(ports)?, port(ports)?),
    };
    if high < low {
        return Err(format!("EXPOSE {spec}: the range is reversed"));
    }
    Ok((low..=high).map(|p| format!("{p}/{proto}")).collect())
}

fn validate_signal(signal: &str) -> std::result::Result<(), String> {
    const NAMES: &[&str] = &[
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
        "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
        "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
    ];
    let upper = signal.to_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let ok = match signal.parse::<u32>() {
        Ok(n) => (1..=64).contains(&n),
        Err(_) => {
            NAMES.contains(&name)
                || name
                    .strip_prefix("RTMIN+")
                    .or_else(|| name.strip_prefix("RTMAX-"))
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n <= 30)
                || name == "RTMIN"
                || name == "RTMAX"
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("STOPSIGNAL {signal:?} is not a signal"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn check(source: &str, build_args: &[(&str, &str)], expected: Expect) {
        expected.assert_eq(&render(source, build_args));
    }

    fn render(source: &str, build_args: &[(&str, &str)]) -> String {
        render_target(source, build_args, None, &[])
    }

    /// Plans `source` for `target`, every base's config having the ONBUILD `triggers`.
    fn render_target(
        source: &str,
        build_args: &[(&str, &str)],
        target: Option<&str>,
        triggers: &[&str],
    ) -> String {
        let file = containerfile::parse("Containerfile", source).unwrap();
        let build_args: BTreeMap<String, String> = build_args
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let actual = (|| -> Result<String> {
            let mut stages = stages(&file, &build_args)?;
            if let Some(target) = target {
                stages
                    .select(target)
                    .map_err(|reason| PlanError { line: 0, reason })?;
            }
            let mut out = String::new();
            for &index in &stages.needed {
                let stage = &stages.stages[index];
                out += &format!("stage {index} {:?} from {:?}\n", stage.name, stage.base);
                let mut base = RuntimeConfig {
                    env: vec!["BASE=b".to_owned()],
                    cmd: Some(vec!["base-cmd".to_owned()]),
                    ..Default::default()
                };
                if !triggers.is_empty() {
                    base.other
                        .insert("OnBuild".to_owned(), serde_json::json!(triggers));
                }
                let planned = plan_stage(&file, stage, &base, &build_args, &stages.global_args)?;
                for step in planned.steps {
                    out += &format!("  {}: {:?} {:?}\n", step.line, step.action, step.args);
                }
                out += &format!(
                    "  config: {}\n",
                    serde_json::to_string(&planned.config).unwrap()
                );
            }
            Ok(out)
        })();
        match actual {
            Ok(text) => text,
            Err(e) => format!("error at line {}: {}", e.line, e.reason),
        }
    }

    #[test]
    fn the_example() {
        check(
            include_str!("../../examples/hello/Containerfile"),
            &[],
            expect![[r#"
                stage 0 None from Scratch
                  3: Copy { add: false, sources: ["dist/hello"], dest: "/hello", chown: None, chmod: None, from: None, files: [] } []
                  4: Config("ENV PORT=8080") []
                  5: Config("EXPOSE 8080") []
                  6: Config("USER 65534:65534") []
                  7: Config("STOPSIGNAL SIGTERM") []
                  8: Config("ENTRYPOINT [\"/hello\"]") []
                  config: {"User":"65534:65534","ExposedPorts":{"8080/tcp":{}},"Env":["BASE=b","PORT=8080"],"Entrypoint":["/hello"],"StopSignal":"SIGTERM"}
            "#]],
        );
    }

    #[test]
    fn args_env_and_workdir() {
        check(
            r#"ARG TAG=1
ARG BASE=store-image:${TAG}
FROM ${BASE} AS build
ARG TAG
ARG WHO=world
ENV GREETING="hello ${WHO}" PREV=$BASE
WORKDIR app
WORKDIR ../srv/./x
COPY --chmod=0700 --chown=${WHO} src* ./
RUN echo $GREETING
CMD serve --port 1
EXPOSE 80 53/udp 9000-9001
HEALTHCHECK --interval=5s CMD curl -f localhost
FROM build
ENTRYPOINT ["/x"]"#,
            &[("WHO", "you")],
            expect![[r#"
                stage 0 Some("build") from Image("store-image:1")
                  4: Config("ARG TAG") ["TAG=1"]
                  5: Config("ARG WHO=world") ["TAG=1", "WHO=you"]
                  6: Config("ENV GREETING=\"hello ${WHO}\" PREV=$BASE") ["TAG=1", "WHO=you"]
                  7: Workdir("/app") ["TAG=1", "WHO=you"]
                  8: Workdir("/srv/x") ["TAG=1", "WHO=you"]
                  9: Copy { add: false, sources: ["src*"], dest: "/srv/x/", chown: Some("you"), chmod: Some(448), from: None, files: [] } ["TAG=1", "WHO=you"]
                  10: Run { args: ["/bin/sh", "-c", "echo $GREETING"], env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "BASE=b", "GREETING=hello you", "PREV=b", "TAG=1", "WHO=you"], user: "0", workdir: "/srv/x", flags: RunFlags { mounts: [], no_network: false }, bind_from: {} } ["TAG=1", "WHO=you"]
                  11: Config("CMD serve --port 1") ["TAG=1", "WHO=you"]
                  12: Config("EXPOSE 80 53/udp 9000-9001") ["TAG=1", "WHO=you"]
                  13: Config("HEALTHCHECK --interval=5s CMD curl -f localhost") ["TAG=1", "WHO=you"]
                  config: {"ExposedPorts":{"53/udp":{},"80/tcp":{},"9000/tcp":{},"9001/tcp":{}},"Env":["BASE=b","GREETING=hello you","PREV=b"],"Cmd":["/bin/sh","-c","serve --port 1"],"WorkingDir":"/srv/x","Healthcheck":{"Test":["CMD-SHELL","curl -f localhost"],"Interval":5000000000}}
                stage 1 None from Stage(0)
                  15: Config("ENTRYPOINT [\"/x\"]") []
                  config: {"Env":["BASE=b"],"Entrypoint":["/x"]}
            "#]],
        );
    }

    #[test]
    fn bad_plans() {
        let cases = [
            (
                "FROM scratch\nEXPOSE http",
                "error at line 2: EXPOSE http: \"http\" is not a port number",
            ),
            (
                "FROM scratch\nEXPOSE 80/xtp",
                "error at line 2: EXPOSE 80/xtp: unknown protocol \"xtp\"",
            ),
            (
                "FROM scratch\nSTOPSIGNAL SIGNOPE",
                "error at line 2: STOPSIGNAL \"SIGNOPE\" is not a signal",
            ),
            (
                "ARG B\nFROM ${B}",
                "error at line 2: malformed FROM: the image expands to nothing",
            ),
            (
                "FROM scratch AS a\nFROM scratch AS a",
                "error at line 2: duplicate stage name \"a\"",
            ),
            (
                "FROM scratch\nENV A=${B",
                "error at line 2: missing } in ${B",
            ),
            (
                "FROM scratch\nUSER ${NOBODY}",
                "error at line 2: USER expands to nothing",
            ),
        ];
        for (source, expected) in cases {
            assert_eq!(render(source, &[]), expected, "{source:?}");
        }
    }

    /// Only what the target needs is planned: its base chain and the stages it copies from,
    /// in file order; `--from` by name, index or image; a stage's ARGs stay in it.
    #[test]
    fn stages_the_target_needs() {
        let source = r#"ARG V=1
ARG BASE=img
FROM ${BASE}:${V} AS deps
ARG V
RUN echo $V
FROM scratch AS unused
RUN never
FROM deps AS build
RUN echo ${V:-unset}
FROM scratch AS tools
FROM scratch
ARG FROM_STAGE=build
COPY --from=build /app /app
COPY --from=3 /t /t
COPY --from=other:${V} /x /x
COPY --from=${BASE} /y /y
"#;
        expect![[r#"
            stage 0 Some("deps") from Image("img:1")
              4: Config("ARG V") ["V=1"]
              5: Run { args: ["/bin/sh", "-c", "echo $V"], env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "BASE=b", "V=1"], user: "0", workdir: "/", flags: RunFlags { mounts: [], no_network: false }, bind_from: {} } ["V=1"]
              config: {"Env":["BASE=b"],"Cmd":["base-cmd"]}
            stage 2 Some("build") from Stage(0)
              9: Run { args: ["/bin/sh", "-c", "echo ${V:-unset}"], env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "BASE=b"], user: "0", workdir: "/", flags: RunFlags { mounts: [], no_network: false }, bind_from: {} } []
              config: {"Env":["BASE=b"],"Cmd":["base-cmd"]}
            stage 3 Some("tools") from Scratch
              config: {"Env":["BASE=b"],"Cmd":["base-cmd"]}
            stage 4 None from Scratch
              12: Config("ARG FROM_STAGE=build") ["FROM_STAGE=build"]
              13: Copy { add: false, sources: ["/app"], dest: "/app", chown: None, chmod: None, from: Some(Stage(2)), files: [] } ["FROM_STAGE=build"]
              14: Copy { add: false, sources: ["/t"], dest: "/t", chown: None, chmod: None, from: Some(Stage(3)), files: [] } ["FROM_STAGE=build"]
              15: Copy { add: false, sources: ["/x"], dest: "/x", chown: None, chmod: None, from: Some(Image("other:1")), files: [] } ["FROM_STAGE=build"]
              16: Copy { add: false, sources: ["/y"], dest: "/y", chown: None, chmod: None, from: Some(Image("img")), files: [] } ["FROM_STAGE=build"]
              config: {"Env":["BASE=b"],"Cmd":["base-cmd"]}
        "#]]
        .assert_eq(&render_target(source, &[], None, &[]));
        let build = render_target(source, &[], Some("BUILD"), &[]);
        assert!(
            build.starts_with("stage 0 ") && build.contains("stage 2 "),
            "{build}"
        );
        assert!(
            !build.contains("stage 1 ") && !build.contains("stage 3 "),
            "{build}"
        );
        assert_eq!(
            render_target(source, &[], Some("nope"), &[]),
            "error at line 0: --target nope: no stage of that name; the stages are deps, unused, build, tools"
        );
    }

    #[test]
    fn bad_stage_references() {
        for (source, expected) in [
            (
                "FROM scratch AS a\nCOPY --from=b /x /x\nFROM scratch AS b",
                "error at line 2: COPY --from=b: stage \"b\" is defined later in the file: a stage copies only from the stages before it",
            ),
            (
                "FROM scratch AS a\nCOPY --from=a /x /x",
                "error at line 2: COPY --from=a: a stage cannot copy from itself",
            ),
            (
                "FROM scratch\nCOPY --from=0 /x /x",
                "error at line 2: COPY --from=0: stage 0 is not an earlier stage (this is stage 0): a stage copies only from the stages before it",
            ),
            (
                "FROM b AS a\nFROM a AS b",
                "error at line 1: FROM b: stage \"b\" is not defined before this FROM: a stage can only start from an earlier one",
            ),
            (
                "ARG E\nFROM scratch\nCOPY --from=${E} /x /x",
                "error at line 3: COPY --from expands to nothing",
            ),
        ] {
            assert_eq!(render(source, &[]), expected, "{source:?}");
        }
    }

    /// The base's triggers run first (at the FROM's line) and are not passed on; the stage's
    /// own ONBUILDs are the child's `OnBuild`.
    #[test]
    fn onbuild_triggers_run_first_and_are_not_inherited() {
        expect![[r#"
            stage 0 None from Image("base")
              1: Config("ENV T=1") []
              1: Run { args: ["/bin/sh", "-c", "echo $T"], env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "BASE=b", "T=1"], user: "0", workdir: "/", flags: RunFlags { mounts: [], no_network: false }, bind_from: {} } []
              2: Config("ONBUILD RUN echo next") []
              3: Run { args: ["/bin/sh", "-c", "echo own"], env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "BASE=b", "T=1"], user: "0", workdir: "/", flags: RunFlags { mounts: [], no_network: false }, bind_from: {} } []
              config: {"Env":["BASE=b","T=1"],"Cmd":["base-cmd"],"OnBuild":["RUN echo next"]}
        "#]]
        .assert_eq(&render_target(
            "FROM base\nONBUILD RUN echo next\nRUN echo own",
            &[],
            None,
            &["ENV T=1", "RUN echo $T"],
        ));
        assert_eq!(
            render_target("FROM base", &[], None, &["ONBUILD RUN x"]),
            "error at line 1: the base image's ONBUILD trigger \"ONBUILD RUN x\": ONBUILD is not allowed as an ONBUILD trigger"
        );
    }

    #[test]
    fn copy_heredocs_expand_unless_the_delimiter_is_quoted() {
        let text = render(
            "FROM scratch\nARG WHO=you\nCOPY <<a <<'b' /d/\nhi $WHO\na\nhi $WHO\nb\n",
            &[],
        );
        assert!(
            text.contains(r#"files: [("a", "hi you\n"), ("b", "hi $WHO\n")]"#),
            "{text}"
        );
    }

    #[test]
    fn absolute_paths() {
        for (workdir, path, expected) in [
            ("/", "a", "/a"),
            ("/x/y", "../z", "/x/z"),
            ("/x", "/../../etc", "/etc"),
            ("/x", ".", "/x"),
        ] {
            assert_eq!(absolute(workdir, path), expected);
        }
    }

    #[test]
    fn path_in_env_on_a_base_without_one_expands_to_the_default() {
        let text = render("FROM scratch\nENV PATH=/opt/x/bin:$PATH\n", &[]);
        assert!(
            text.contains(
                "PATH=/opt/x/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            ),
            "{text}"
        );
    }
}
