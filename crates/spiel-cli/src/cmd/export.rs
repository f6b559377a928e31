//! `spiel export`: write the model in another format (a Hugging Face directory).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use spiel::model::loader;

use crate::shared::{load_model, ModelArgs};

/// `spiel export` arguments.
#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Target format (only `hf`: a Hugging Face directory).
    #[arg(long, default_value = "hf")]
    to: String,
    /// Output directory.
    out: PathBuf,
}

impl ExportArgs {
    /// Run the command.
    pub fn run(self, home: &Path) -> Result<()> {
        let ExportArgs { model, to, out } = self;
        if to != "hf" {
            bail!("--to: unknown format `{to}` (supported: hf)");
        }
        let m = load_model(&model, home)?;
        loader::export_hf(&m.model, &m.tokenizer, &out)?;
        println!("wrote Hugging Face model directory {}", out.display());
        Ok(())
    }
}
