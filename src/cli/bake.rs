use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct BakeArgs {
    /// The build context directory.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
}

pub fn run(_home: &Path, _args: BakeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bake is not built yet")
}
