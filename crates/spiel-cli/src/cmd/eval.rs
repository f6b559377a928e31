//! `spiel eval`: held-out loss, MMLU or GSM8K, with any adapters applied.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use spiel::formats::assets;

use crate::shared::{load_adapters, load_model, ModelArgs};

/// `spiel eval` flags.
#[derive(Args)]
pub struct EvalArgs {
    /// heldout, mmlu or gsm8k.
    #[arg(long)]
    task: String,
    #[command(flatten)]
    model: ModelArgs,
    /// Adapter directories to apply (repeatable; their deltas add up).
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Evaluate at most N examples / questions / problems.
    #[arg(long)]
    limit: Option<usize>,
    /// Data file (default: the fetched Alpaca data, MMLU or GSM8K file).
    #[arg(long)]
    data: Option<PathBuf>,
    /// heldout: examples held out (same split as `spiel train` with the same seed); 0 = whole file.
    #[arg(long, default_value_t = 50)]
    heldout: usize,
    /// Seed for the held-out split and the MMLU sample.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// heldout: maximum tokens per example.
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Exemplars per prompt (default 5 for mmlu, 8 for gsm8k).
    #[arg(long)]
    shots: Option<usize>,
    /// mmlu: only these subjects (comma-separated).
    #[arg(long, value_delimiter = ',')]
    subjects: Vec<String>,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// gsm8k: longest generated solution.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl EvalArgs {
    /// Run the command.
    pub fn run(self, home: &Path) -> Result<()> {
        run_eval(&self, home)
    }
}

fn run_eval(a: &EvalArgs, home: &Path) -> Result<()> {
    if a.limit == Some(0) {
        bail!("--limit 0 evaluates nothing; give at least 1 (or leave it out for everything)");
    }
    let asset = match a.task.as_str() {
        "heldout" => &assets::ALPACA,
        "mmlu" => &assets::MMLU,
        "gsm8k" => &assets::GSM8K,
        t => bail!("--task: unknown task `{t}` (heldout, mmlu, gsm8k)"),
    };
    let data = match &a.data {
        Some(p) => {
            if !p.exists() {
                bail!("{}: no such data file", p.display());
            }
            p.clone()
        }
        None => assets::ensure(asset, home)?,
    };
    let m = load_model(&a.model, home)?;
    let adapters = load_adapters(&a.adapter, &m)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let value = match a.task.as_str() {
        "heldout" => {
            let r = spiel::tasks::eval::heldout(
                &m.model,
                &adapters,
                &m.tokenizer,
                &data,
                a.heldout,
                a.seed,
                a.max_len,
                a.batch_size,
                a.limit,
            )?;
            if !a.json {
                println!(
                    "held-out: {} examples, {} response tokens: NLL {:.4}, perplexity {:.3}",
                    r.examples, r.tokens, r.nll, r.perplexity
                );
            }
            serde_json::to_value(r)?
        }
        "mmlu" => {
            let r = spiel::tasks::eval::mmlu(
                &m.model,
                &adapters,
                &m.tokenizer,
                &data,
                a.shots.unwrap_or(5),
                a.limit,
                &a.subjects,
                a.seed,
                a.batch_size,
                progress,
            )?;
            bar.finish_and_clear();
            if !a.json {
                println!(
                    "MMLU: {} questions, accuracy {:.4} ({} malformed rows skipped)",
                    r.questions, r.accuracy, r.skipped_rows
                );
                println!("| subject | correct | total | accuracy |\n|---|---:|---:|---:|");
                for (s, (c, t)) in &r.per_subject {
                    println!("| {s} | {c} | {t} | {:.3} |", *c as f64 / *t as f64);
                }
            }
            serde_json::to_value(r)?
        }
        _ => {
            let r = spiel::tasks::eval::gsm8k(
                &m.model,
                &adapters,
                &m.tokenizer,
                &data,
                a.shots.unwrap_or(8),
                a.limit,
                a.max_new_tokens,
                progress,
            )?;
            bar.finish_and_clear();
            if !a.json {
                println!(
                    "GSM8K: {} problems, accuracy {:.4} ({} malformed rows skipped)",
                    r.problems, r.accuracy, r.skipped_rows
                );
            }
            serde_json::to_value(r)?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}
