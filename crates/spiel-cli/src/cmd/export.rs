//! `spiel export`: write the model as a Hugging Face directory (`--to hf`), or an adapter in the
//! files stock PEFT loads (`--to peft`: SHiRA for sparse deltas, LoRA as it is).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use spiel::model::{loader, peft};

use crate::shared::{load_model, ModelArgs};

/// `spiel export` arguments.
#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Target format: `hf` (the model as a Hugging Face directory) or `peft` (the `--adapter` as
    /// a stock PEFT adapter; a sparse one needs r * (in + out) deltas per module, as
    /// `budget_split = "lora"` trains).
    #[arg(long, default_value = "hf")]
    to: String,
    /// With `--to peft`: the adapter directory to export.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Output directory.
    out: PathBuf,
}

impl ExportArgs {
    /// Run the command.
    pub fn run(self, home: &Path) -> Result<()> {
        let ExportArgs {
            model,
            to,
            adapter,
            out,
        } = self;
        match (to.as_str(), adapter) {
            ("hf", None) => {
                let m = load_model(&model, home)?;
                loader::export_hf(&m.model, &m.tokenizer, &out)?;
                println!("wrote Hugging Face model directory {}", out.display());
            }
            ("hf", Some(_)) => bail!(
                "--to hf exports the model; to export an adapter use --to peft (or `spiel merge` for a merged model)"
            ),
            ("peft", Some(dir)) => {
                let m = load_model(&model, home)?;
                let a = m.model.load_adapter(&dir)?;
                peft::export_peft(&a, &out).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
                let kind = if a.config.method.is_sparse() { "SHiRA" } else { "LoRA" };
                println!("wrote PEFT {kind} adapter {}", out.display());
            }
            ("peft", None) => bail!("--to peft needs --adapter DIR, the adapter to export"),
            (other, _) => bail!("--to: unknown format `{other}` (supported: hf, peft)"),
        }
        Ok(())
    }
}
