//! `spiel`: the command line. Parses arguments, calls the library, prints results; every error
//! is reported as one line and a non-zero exit code.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use spiel::adapter::{Adapter, AdapterSet};
use spiel::assets;
use spiel::generate::{generate, GenerateOptions};
use spiel::loader::{self, LoadedModel};
use spiel::tokenizer::Message;

#[derive(Parser)]
#[command(name = "spiel", version, about = "Sparse fine-tuning (SpIEL) of LLaMA-family models")]
struct Cli {
    /// Asset folder for fetched models and data (default: $SPIEL_HOME, else ./assets).
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch the default model, instruction data, MMLU and GSM8K into the asset folder.
    #[command(after_help = "Example: spiel fetch\n         spiel fetch --only model")]
    Fetch {
        /// Fetch only these assets (model, alpaca, mmlu, gsm8k).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Next-token top-k logits and the teacher-forced mean NLL of a text.
    #[command(after_help = "Example: spiel score --text \"The capital of France is\" --json")]
    Score {
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
    },
    /// Generate text, streaming tokens as they come (greedy at temperature 0).
    #[command(after_help = "Example: spiel generate --chat --prompt \"What is the capital of France?\"")]
    Generate {
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
    },
    /// Write the model in another format.
    #[command(after_help = "Example: spiel export --to hf out/smollm2-hf")]
    Export {
        #[command(flatten)]
        model: ModelArgs,
        /// Target format (only `hf`: a Hugging Face directory).
        #[arg(long, default_value = "hf")]
        to: String,
        /// Output directory.
        out: PathBuf,
    },
    /// Throughput tables.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prefill and decode tokens/s.
    #[command(after_help = "Example: spiel bench generate --threads 2")]
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt length for prefill.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens to decode per round.
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
        /// Measured rounds (after one warm-up).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A GGUF file or a Hugging Face directory (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
}

fn home(cli_home: &Option<PathBuf>) -> PathBuf {
    cli_home.clone().unwrap_or_else(assets::home)
}

fn load_model(args: &ModelArgs, home: &Path) -> Result<LoadedModel> {
    let path = match &args.model {
        Some(p) => p.clone(),
        None => {
            let p = assets::path_in(home, &assets::MODEL);
            if !p.exists() {
                eprintln!("default model not found at {}; fetching it", p.display());
            }
            assets::ensure(&assets::MODEL, home)?
        }
    };
    Ok(loader::load(&path, &Device::Cpu)?)
}

/// Load adapter directories for `m` into one additive set.
fn load_adapters(dirs: &[PathBuf], m: &LoadedModel) -> Result<AdapterSet> {
    let mut set = AdapterSet::none();
    for d in dirs {
        set.extend(&Adapter::load(d, &m.model)?.to_set());
    }
    Ok(set)
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon_init(n);
    }
    let home = home(&cli.home);
    match cli.command {
        Cmd::Fetch { only } => {
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
                let outcome = assets::fetch(a, &home)?;
                let what = match outcome {
                    assets::FetchOutcome::Present => "present",
                    assets::FetchOutcome::Fetched => "fetched",
                };
                println!("{:<7} {:<8} {}", a.key, what, assets::path_in(&home, a).display());
            }
        }
        Cmd::Score {
            model,
            adapter,
            text,
            top_k,
            json,
        } => {
            let m = load_model(&model, &home)?;
            let adapters = load_adapters(&adapter, &m)?;
            let s = spiel::score::score(&m.model, &adapters, &m.tokenizer, &text, top_k)?;
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
        }
        Cmd::Generate {
            model,
            adapter,
            prompt,
            chat,
            system,
            max_new_tokens,
            temperature,
            seed,
        } => {
            if prompt.is_empty() {
                bail!("--prompt is empty: give some text to continue");
            }
            if !(temperature >= 0.0 && temperature.is_finite()) {
                bail!("--temperature must be a finite number >= 0, got {temperature}");
            }
            let m = load_model(&model, &home)?;
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
        }
        Cmd::Export { model, to, out } => {
            if to != "hf" {
                bail!("--to: unknown format `{to}` (supported: hf)");
            }
            let m = load_model(&model, &home)?;
            loader::export_hf(&m.model, &m.tokenizer, &out)?;
            println!("wrote Hugging Face model directory {}", out.display());
        }
        Cmd::Bench {
            what:
                BenchCmd::Generate {
                    model,
                    prompt_tokens,
                    decode_tokens,
                    rounds,
                    json,
                },
        } => {
            if prompt_tokens == 0 || rounds == 0 {
                bail!("--prompt-tokens and --rounds must be at least 1");
            }
            let m = load_model(&model, &home)?;
            let b = spiel::bench::bench_generate(&m.model, prompt_tokens, decode_tokens, rounds)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!(
                    "model: {} ({} threads, f32, median of {} rounds)",
                    m.source.display(),
                    b.threads,
                    b.rounds
                );
                println!("| phase   | tokens | tokens/s |");
                println!("|---------|-------:|---------:|");
                println!("| prefill | {:>6} | {:>8.1} |", b.prompt_tokens, b.prefill_tokens_per_s);
                println!("| decode  | {:>6} | {:>8.1} |", b.decode_tokens, b.decode_tokens_per_s);
            }
        }
    }
    Ok(())
}

fn rayon_init(n: usize) {
    // Ignore the error when the global pool was already built (it can only be set once).
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SPIEL_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
