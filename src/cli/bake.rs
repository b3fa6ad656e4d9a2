use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::bake::{BakeOptions, Progress};

#[derive(Debug, clap::Args)]
pub struct BakeArgs {
    /// The build context directory.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// The Containerfile (default: DIR/Containerfile, else DIR/Dockerfile).
    #[arg(short = 'f', long = "file", value_name = "CONTAINERFILE")]
    pub file: Option<PathBuf>,
    /// The tag to give the image (default: the directory's name, `:latest`).
    #[arg(short = 't', long)]
    pub tag: Option<String>,
    /// A build argument for ARG, repeatable.
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Bake the stage of this name (`FROM … AS NAME`) and the stages it needs, not the last.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Build every step, reading no cached layer (the new layers are cached).
    #[arg(long)]
    pub no_cache: bool,
    /// Bake twice from clean (no cache, nothing kept, nothing tagged) and say whether both
    /// gave one digest, else the first step and path that differ; exits 1 when they differ.
    #[arg(long)]
    pub check: bool,
    /// A secret for `RUN --mount=type=secret,id=ID`, from a file or an environment variable;
    /// repeatable. Never in a layer, the cache key or any output.
    #[arg(long = "secret", value_name = "id=ID,src=PATH|env=VAR")]
    pub secrets: Vec<String>,
    /// Print the result as JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

/// The directory's name, lowercased to what a tag may hold, with `:latest`.
fn default_tag(dir: &Path) -> String {
    let name = std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "image".to_owned());
    let name: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{name}:latest")
}

pub fn run(home: &Path, args: BakeArgs) -> anyhow::Result<ExitCode> {
    let mut build_args = BTreeMap::new();
    for arg in &args.build_args {
        let (key, value) = arg
            .split_once('=')
            .with_context(|| format!("--build-arg {arg:?}: expected KEY=VALUE"))?;
        build_args.insert(key.to_owned(), value.to_owned());
    }
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) if !value.is_empty() => value
            .parse::<u64>()
            .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds"))?,
        _ => 0,
    };
    let mut secrets = BTreeMap::new();
    for value in &args.secrets {
        let (id, source) =
            crate::bake::mounts::parse_secret(value).map_err(|e| anyhow::anyhow!(e))?;
        if let crate::bake::mounts::SecretSource::File(path) = &source
            && !path.is_file()
        {
            anyhow::bail!("--secret {value}: {} is not a file", path.display());
        }
        if secrets.insert(id.clone(), source).is_some() {
            anyhow::bail!("--secret id={id} is given twice");
        }
    }
    let options = BakeOptions {
        tag: args.tag.clone().unwrap_or_else(|| default_tag(&args.dir)),
        context: args.dir.clone(),
        containerfile: args.file.clone(),
        build_args,
        epoch,
        target: args.target.clone(),
        no_cache: args.no_cache,
        secrets,
    };
    let terminal = std::io::stderr().is_terminal();
    let mut spinner: Option<indicatif::ProgressBar> = None;
    let mut started = Instant::now();
    let mut progress = |round: Option<usize>, event: Progress<'_>| match event {
        Progress::Started { step, total, text } => {
            started = Instant::now();
            if terminal {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.enable_steady_tick(Duration::from_millis(100));
                bar.set_message(format!("[{step}/{total}] {text}"));
                spinner = Some(bar);
            }
        }
        Progress::Finished {
            step,
            total,
            text,
            cached,
        } => {
            let status = if cached {
                "cached".to_owned()
            } else {
                format!("done {}ms", started.elapsed().as_millis())
            };
            let round = round.map(|r| format!("bake {r} of 2 ")).unwrap_or_default();
            let line = format!("{round}[{step}/{total}] {text}  {status}");
            match spinner.take() {
                Some(bar) => bar.finish_with_message(line),
                None => eprintln!("{line}"),
            }
        }
    };
    if args.check {
        let result = crate::bake::check(home, &options, &mut |round, event| {
            progress(Some(round), event)
        });
        if let Some(bar) = spinner.take() {
            bar.abandon();
        }
        let checked = result?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&checked)?);
        } else {
            print_checked(&checked);
        }
        return Ok(if checked.reproducible {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let result = crate::bake::bake(home, &options, &mut |event| progress(None, event));
    if let Some(bar) = spinner.take() {
        bar.abandon();
    }
    let baked = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&baked)?);
    } else {
        if baked.cached_steps == baked.total_steps {
            eprintln!("every step was cached");
        }
        println!("{} {}", baked.tag, baked.digest);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_checked(checked: &crate::bake::Checked) {
    let Some(difference) = &checked.difference else {
        println!("reproducible: two bakes from clean gave {}", checked.digest);
        return;
    };
    println!(
        "not reproducible: two bakes from clean gave {} and {}",
        checked.digest,
        checked.second.as_ref().map_or("?", |d| d.as_str())
    );
    match (&difference.step, &difference.path) {
        (Some(step), Some(path)) => {
            println!("first difference: {path}, in the layer of {step}");
            println!("  first bake:  {}", difference.first);
            println!("  second bake: {}", difference.second);
        }
        (Some(step), None) => println!("the layer of {step}: {}", difference.first),
        _ => {
            println!("the layers agree; the configs differ:");
            println!("  first bake:  {}", difference.first);
            println!("  second bake: {}", difference.second);
        }
    }
}
