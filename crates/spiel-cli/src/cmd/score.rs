//! `spiel score`: token ids, teacher-forced NLL and the top-k next tokens of a text.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use crate::shared::{load_adapters, load_model, ModelArgs};

/// `spiel score` arguments.
#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Adapter directories to apply (repeatable; their deltas add up).
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// The text to score.
    #[arg(long)]
    text: String,
    /// How many next-token candidates to show.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Print JSON ({ids, nll, top: [{id, token, logit}]}).
    #[arg(long)]
    json: bool,
}

impl ScoreArgs {
    /// Run the command.
    pub fn run(self, home: &Path) -> Result<()> {
        let ScoreArgs {
            model,
            adapter,
            text,
            top_k,
            json,
        } = self;
        let m = load_model(&model, home)?;
        let adapters = load_adapters(&adapter, &m)?;
        let s = spiel::tasks::score::score(&m.model, &adapters, &m.tokenizer, &text, top_k)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            println!("ids: {:?}", s.ids);
            match s.nll {
                Some(n) => {
                    println!("mean NLL: {n:.4} over {} predicted tokens", s.ids.len() - 1)
                }
                None => println!("mean NLL: n/a (one token)"),
            }
            println!("{:>4}  {:>7}  {:>9}  token", "rank", "id", "logit");
            for (i, t) in s.top.iter().enumerate() {
                println!("{:>4}  {:>7}  {:>9.3}  {:?}", i + 1, t.id, t.logit, t.token);
            }
        }
        Ok(())
    }
}
