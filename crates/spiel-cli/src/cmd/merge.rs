//! `spiel merge`: add adapters into the base weights and write a Hugging Face directory.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use spiel::model::loader;

use crate::shared::{load_adapters, load_model, ModelArgs};

/// `spiel merge` arguments.
#[derive(Args)]
pub struct MergeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Adapter directories (repeatable; their deltas add up).
    #[arg(long, required = true)]
    adapter: Vec<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

impl MergeArgs {
    /// Run the command.
    pub fn run(self, home: &Path) -> Result<()> {
        let MergeArgs { model, adapter, out } = self;
        let m = load_model(&model, home)?;
        let adapters = load_adapters(&adapter, &m)?;
        if m.model.is_quantized() {
            eprintln!(
                    "warning: merging into quantised weights would lose the deltas' precision; writing a dense f32 model instead"
                );
        }
        let merged = m.model.merged(&adapters)?;
        loader::export_hf(&merged, &m.tokenizer, &out)?;
        println!("wrote merged model {}", out.display());
        Ok(())
    }
}
