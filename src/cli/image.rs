use std::path::Path;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {}

#[derive(Debug, clap::Args)]
pub struct GcArgs {}

pub fn images(home: &Path, args: ImagesArgs) -> anyhow::Result<ExitCode> {
    let store = crate::store::Store::open(home)?;
    let tags = store.tags()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tags)?);
    } else {
        for tagged in tags {
            println!("{}\t{}", tagged.tag, tagged.digest.short());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(_home: &Path, command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {}
}

pub fn gc(_home: &Path, _args: GcArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("gc is not built yet")
}
