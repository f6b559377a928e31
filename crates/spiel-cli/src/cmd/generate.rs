//! `spiel generate`: stream a continuation of a prompt, optionally through the chat template.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use spiel::formats::tokenizer::Message;
use spiel::tasks::generate::{generate, GenerateOptions};

use crate::shared::{load_adapters, load_model, ModelArgs};

/// `spiel generate` arguments.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Adapter directories to apply (repeatable; their deltas add up).
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// The prompt (or the user message with --chat).
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message (otherwise the template's default, if any).
    #[arg(long)]
    system: Option<String>,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl GenerateArgs {
    /// Run the command.
    pub fn run(self, home: &Path) -> Result<()> {
        let GenerateArgs {
            model,
            adapter,
            prompt,
            chat,
            system,
            max_new_tokens,
            temperature,
            seed,
        } = self;
        if prompt.is_empty() {
            bail!("--prompt is empty: give some text to continue");
        }
        if !(temperature >= 0.0 && temperature.is_finite()) {
            bail!("--temperature must be a finite number >= 0, got {temperature}");
        }
        let m = load_model(&model, home)?;
        let text = if chat {
            let mut msgs = Vec::new();
            if let Some(s) = &system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::new("user", &prompt));
            m.tokenizer.apply_chat_template(&msgs, true)?
        } else {
            prompt
        };
        let ids = m.tokenizer.encode(&text)?;
        let opts = GenerateOptions {
            max_new_tokens,
            temperature,
            seed,
            stop_strings: Vec::new(),
        };
        let mut out = std::io::stdout().lock();
        let adapters = load_adapters(&adapter, &m)?;
        let g = generate(&m.model, &adapters, &m.tokenizer, &ids, &opts, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        tracing::info!(
            "{} prompt tokens, {} new; decode {:.1} tokens/s",
            g.prompt_tokens,
            g.ids.len(),
            g.ids.len() as f64 / g.decode_secs.max(1e-9)
        );
        Ok(())
    }
}
