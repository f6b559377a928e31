//! `spiel fetch`: download the default model and data, checking each file's sha256.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;
use spiel::formats::assets;

/// `spiel fetch` arguments.
#[derive(Args)]
pub struct FetchArgs {
    /// Fetch only these assets (model, alpaca, mmlu, gsm8k).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

impl FetchArgs {
    /// Run the command.
    pub fn run(self, home: &Path) -> Result<()> {
        let FetchArgs { only } = self;
        let wanted: Vec<&assets::Asset> = if only.is_empty() {
            assets::ALL.iter().collect()
        } else {
            only.iter()
                .map(|k| {
                    assets::ALL
                        .iter()
                        .find(|a| a.key == k)
                        .with_context(|| format!("--only: unknown asset `{k}` (known: model, alpaca, mmlu, gsm8k)"))
                })
                .collect::<Result<_>>()?
        };
        for a in wanted {
            let outcome = assets::fetch(a, home)?;
            let what = match outcome {
                assets::FetchOutcome::Present => "present",
                assets::FetchOutcome::Fetched => "fetched",
            };
            println!("{:<7} {:<8} {}", a.key, what, assets::path_in(home, a).display());
        }
        Ok(())
    }
}
