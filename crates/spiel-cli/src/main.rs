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
use spiel::train::{self, TrainConfig};

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
    /// Fine-tune a model (SpIEL-AG by default) and write the adapter, metrics and checkpoints.
    #[command(
        after_help = "Examples:\n  spiel train\n  spiel train --method spiel-ma --steps 100 --out runs/ma\n  spiel train --config configs/spiel-ag-smollm2.toml --lr 1e-3\n  spiel train --out runs/ma --resume"
    )]
    Train(Box<TrainArgs>),
    /// Print the expected peak memory of a training run, by component, and whether it fits.
    #[command(
        after_help = "Examples:\n  spiel plan\n  spiel plan --method lora --batch-size 8 --seq-len 512 --quantize nf4"
    )]
    Plan(Box<TrainArgs>),
    /// Evaluate: held-out response loss, MMLU (k-shot log-likelihood) or GSM8K (k-shot CoT).
    #[command(
        after_help = "Examples:\n  spiel eval --task heldout --adapter runs/spiel-ag/adapter\n  spiel eval --task mmlu --limit 500\n  spiel eval --task gsm8k --limit 100 --json"
    )]
    Eval(Box<EvalArgs>),
    /// Describe an adapter: method, budget, per-module counts and density, value norms, layers.
    #[command(after_help = "Example: spiel inspect runs/spiel-ag/adapter")]
    Inspect {
        /// The adapter directory.
        adapter: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Merge adapters into the base weights and write a Hugging Face model directory.
    #[command(after_help = "Example: spiel merge --adapter runs/spiel-ag/adapter --out merged/")]
    Merge {
        #[command(flatten)]
        model: ModelArgs,
        /// Adapter directories (repeatable; their deltas add up).
        #[arg(long, required = true)]
        adapter: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train several methods on the same split and budget, evaluate each and the base model, and
    /// write results.md, results.json and curves.png. Rerunning continues where it stopped.
    #[command(after_help = "Example: spiel compare --config configs/compare-smollm2.toml")]
    Compare {
        /// The comparison config (see configs/compare-smollm2.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Throughput tables.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// The machine's f32 GEMM GFLOP/s at the model's shapes (the ceiling for `bench train`).
    #[command(after_help = "Example: spiel bench gemm --threads 2")]
    Gemm {
        #[command(flatten)]
        model: ModelArgs,
        /// Rows (tokens) per product.
        #[arg(long, default_value_t = 1024)]
        tokens: usize,
        /// Measured rounds per shape (after one warm-up).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Seconds per optimizer step, tokens/s, GFLOP/s and peak RSS per training method.
    #[command(after_help = "Example: spiel bench train --methods spiel-ag,lora --steps 20 --threads 2")]
    Train {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated methods.
        #[arg(long, value_delimiter = ',', default_value = "spiel-ag,spiel-ma,lora,full")]
        methods: Vec<String>,
        /// Examples per update.
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Tokens per example.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Measured updates per method (after one warm-up); at least one reselection cycle.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// S for the sparse methods (A is 5 or S, whichever is smaller).
        #[arg(long, default_value_t = 10)]
        reselection_steps: usize,
        /// Use a random initialisation of the model's config instead of its weights.
        #[arg(long)]
        random_init: bool,
        /// Instead of a model file, a random LLaMA of this shape: `1b` (TinyLlama-1.1B's shape:
        /// hidden 2048, 22 layers, 32/4 heads, vocab 32000), built with its projections
        /// generated straight into `--quantize` (nf4 or none).
        #[arg(long)]
        random_shape: Option<String>,
        /// Recompute each block's forward in the backward instead of keeping its activations.
        #[arg(long)]
        checkpoint_activations: bool,
        /// Also time each phase of the step and set it against its modelled FLOPs and bytes.
        #[arg(long)]
        profile: bool,
        /// Print JSON (a list, one object per method).
        #[arg(long)]
        json: bool,
    },
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

/// `spiel eval` flags.
#[derive(Args)]
struct EvalArgs {
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
            let r = spiel::eval::heldout(
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
            let r = spiel::eval::mmlu(
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
            let r = spiel::eval::gsm8k(
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

/// `spiel train` flags: every field of the TOML config, each overriding the file.
#[derive(Args)]
struct TrainArgs {
    /// TOML file with any training fields (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from the newest complete checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Train even when the memory plan exceeds the memory available.
    #[arg(long)]
    force: bool,
    /// spiel-ag, spiel-ma, lora or full.
    #[arg(long)]
    method: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    /// Alpaca JSON or chat JSONL (default: the fetched Alpaca demo data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Comma-separated short module names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    /// Sparse budget as a fraction of all parameters.
    #[arg(long)]
    density: Option<f64>,
    /// Sparse budget equal to LoRA of this rank on the same modules.
    #[arg(long)]
    lora_equivalent_rank: Option<usize>,
    /// LoRA rank.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// S: updates between reselections.
    #[arg(long)]
    reselection_steps: Option<usize>,
    /// A: updates per SpIEL-AG gradient window.
    #[arg(long)]
    accumulation_steps: Option<usize>,
    /// zeta0: initial fraction replaced per reselection.
    #[arg(long)]
    reselection_rate: Option<f64>,
    /// linear or cosine.
    #[arg(long)]
    reselection_policy: Option<String>,
    /// Total updates.
    #[arg(long)]
    steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per update.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Maximum tokens per example.
    #[arg(long, alias = "seq-len")]
    max_len: Option<usize>,
    /// Recompute each block's forward in the backward instead of keeping its activations.
    #[arg(long)]
    checkpoint_activations: bool,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// linear, cosine or constant.
    #[arg(long)]
    lr_schedule: Option<String>,
    /// Warm-up fraction.
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// Decoupled weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Clip the global gradient norm.
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Held-out loss every N updates (0: never).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Examples held out.
    #[arg(long)]
    heldout: Option<usize>,
    /// Checkpoint every N updates (0: never).
    #[arg(long)]
    save_every: Option<usize>,
}

impl TrainArgs {
    /// The config file (if any) with every given flag applied on top.
    fn resolve(&self) -> Result<TrainConfig> {
        // A resumed run starts from the config it saved, so `--out DIR --resume` is enough.
        let saved = self
            .out
            .as_ref()
            .map(|o| o.join("config.toml"))
            .filter(|p| self.resume && p.exists());
        let mut c = match (&self.config, saved) {
            (Some(p), _) => TrainConfig::from_toml_file(p)?,
            (None, Some(p)) => TrainConfig::from_toml_file(&p)?,
            (None, None) => TrainConfig::default(),
        };
        if let Some(m) = &self.method {
            c.method = m.parse()?;
            if self.out.is_none() && self.config.is_none() {
                c.out = PathBuf::from(format!("runs/{m}"));
            }
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            out,
            target_modules,
            lora_equivalent_rank,
            lora_rank,
            lora_alpha,
            lora_dropout,
            reselection_steps
        );
        set!(
            accumulation_steps,
            reselection_rate,
            steps,
            batch_size,
            grad_accum,
            max_len,
            warmup_ratio
        );
        set!(weight_decay, seed, eval_every, heldout, save_every);
        if self.model.model.is_some() {
            c.model = self.model.model.clone();
        }
        if let Some(q) = self.model.quantize {
            c.quantize = q;
        }
        if let Some(d) = self.model.dtype {
            c.dtype = d;
        }
        if self.checkpoint_activations {
            c.checkpoint_activations = true;
        }
        if self.data.is_some() {
            c.data = self.data.clone();
        }
        if self.density.is_some() {
            c.density = self.density;
        }
        if self.lr.is_some() {
            c.lr = self.lr;
        }
        if self.max_grad_norm.is_some() {
            c.max_grad_norm = self.max_grad_norm;
        }
        if let Some(p) = &self.reselection_policy {
            c.reselection_policy = match p.as_str() {
                "linear" => spiel::select::Policy::Linear,
                "cosine" => spiel::select::Policy::Cosine,
                _ => bail!("--reselection-policy: expected linear or cosine, got `{p}`"),
            };
        }
        if let Some(p) = &self.lr_schedule {
            c.lr_schedule = match p.as_str() {
                "linear" => train::LrSchedule::Linear,
                "cosine" => train::LrSchedule::Cosine,
                "constant" => train::LrSchedule::Constant,
                _ => bail!("--lr-schedule: expected linear, cosine or constant, got `{p}`"),
            };
        }
        c.validate()?;
        Ok(c)
    }
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A GGUF file or a Hugging Face directory (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Hold the projection weights as: none (f32), keep (the GGUF file's Q4_0/Q4_1/Q8_0 blocks),
    /// nf4 (4-bit NormalFloat, double-quantised scales) [default: none].
    #[arg(long)]
    quantize: Option<loader::Quantize>,
    /// f32, or bf16: the frozen dense matrices held in bf16 and the activations computed in bf16 (adapter values and optimizer state stay f32)
    /// [default: f32].
    #[arg(long)]
    dtype: Option<loader::Dtype>,
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
    let mut m = loader::load_with(&path, &Device::Cpu, args.quantize.unwrap_or_default())?;
    in_dtype(&mut m.model, args.dtype)?;
    release_freed_memory();
    Ok(m)
}

/// `--dtype bf16`: hold the frozen matrices in bf16 and compute the activations in bf16.
fn in_dtype(m: &mut spiel::model::Llama, dtype: Option<loader::Dtype>) -> Result<()> {
    if dtype == Some(loader::Dtype::Bf16) {
        m.hold_in_bf16()?;
        m.compute_in(candle_core::DType::BF16)?;
    }
    Ok(())
}

/// Load adapter directories for `m` into one additive set.
fn load_adapters(dirs: &[PathBuf], m: &LoadedModel) -> Result<AdapterSet> {
    let mut set = AdapterSet::none();
    for d in dirs {
        set.extend(&Adapter::load(d, &m.model)?.to_set());
    }
    Ok(set)
}

/// Run the command on a worker of the global compute pool, so that the parallel loops it starts
/// run on this thread and the other workers, with no thread of its own waiting on them: with the
/// command on the main thread, every loop is a hand-off to the pool and back, and between loops
/// the idle workers spin against the main thread for the same cores (3 threads on 2 cores).
fn run_in_pool(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle reads its thread count from the same variable.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads.unwrap_or(0))
        // The command's own stack: candle's backward walks the graph recursively.
        .stack_size(64 << 20)
        .build_global()
        .context("starting the compute threads")?;
    rayon::scope(|_| run(cli))
}

fn run(cli: Cli) -> Result<()> {
    let home = home(&cli.home);
    let cli_threads = cli.threads;
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
        }
        Cmd::Export { model, to, out } => {
            if to != "hf" {
                bail!("--to: unknown format `{to}` (supported: hf)");
            }
            let m = load_model(&model, &home)?;
            loader::export_hf(&m.model, &m.tokenizer, &out)?;
            println!("wrote Hugging Face model directory {}", out.display());
        }
        Cmd::Train(args) => run_train(&args, &home)?,
        Cmd::Plan(args) => {
            let cfg = args.resolve()?;
            let (plan, fits) = memory_plan(&cfg, &home)?;
            print!("{}", plan.render());
            match fits {
                Fit::Fits(avail) => println!("fits: {:.0} MiB available", mib(avail)),
                Fit::Unknown => println!("available memory unknown (no /proc/meminfo)"),
                Fit::TooBig { avail, hint } => println!("does not fit: {:.0} MiB available; {hint}", mib(avail)),
            }
        }
        Cmd::Eval(args) => run_eval(&args, &home)?,
        Cmd::Inspect { adapter, json } => {
            let report = spiel::inspect::inspect(&adapter)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
        }
        Cmd::Compare { config } => run_compare(&config, &home, cli_threads)?,
        Cmd::Merge { model, adapter, out } => {
            let m = load_model(&model, &home)?;
            let adapters = load_adapters(&adapter, &m)?;
            if m.model.is_quantized() {
                eprintln!(
                    "warning: merging into quantised weights would lose the deltas' precision; writing a dense f32 model instead"
                );
            }
            let merged = m.model.merged(&adapters)?;
            loader::export_hf(&merged, &m.tokenizer, &out)?;
            println!("wrote merged model {}", out.display());
        }
        Cmd::Bench {
            what:
                BenchCmd::Gemm {
                    model,
                    tokens,
                    rounds,
                    json,
                },
        } => {
            if tokens == 0 || rounds == 0 {
                bail!("--tokens and --rounds must be at least 1");
            }
            let m = load_model(&model, &home)?;
            let rows = spiel::bench::bench_gemm(&m.model.cfg, tokens, rounds)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "GEMM x W^T, {} threads, median of {rounds}; bf16 products on {}",
                    candle_core::utils::get_num_threads(),
                    spiel::bench::bf16_kernel()
                );
                println!("| shape | M | K | N | f32 GFLOP/s | bf16 GFLOP/s |\n|---|---:|---:|---:|---:|---:|");
                for r in &rows {
                    println!(
                        "| {} | {} | {} | {} | {:.1} | {:.1} |",
                        r.name, r.m, r.k, r.n, r.gflops, r.bf16_gflops
                    );
                }
            }
        }
        Cmd::Bench {
            what:
                BenchCmd::Train {
                    model,
                    methods,
                    batch_size,
                    seq_len,
                    steps,
                    reselection_steps,
                    random_init,
                    random_shape,
                    checkpoint_activations,
                    profile,
                    json,
                },
        } => {
            if steps == 0 || batch_size == 0 || seq_len < 2 {
                bail!("--steps and --batch-size must be at least 1, --seq-len at least 2");
            }
            let mut rows: Vec<spiel::bench::TrainBench> = Vec::new();
            if methods.len() == 1 {
                let base = if let Some(shape) = &random_shape {
                    let cfg = match shape.as_str() {
                        "1b" => spiel::config::ModelConfig {
                            hidden_size: 2048,
                            intermediate_size: 5632,
                            num_layers: 22,
                            num_heads: 32,
                            num_kv_heads: 4,
                            head_dim: 64,
                            vocab_size: 32000,
                            max_position_embeddings: 2048,
                            tie_word_embeddings: false,
                            ..spiel::model::tiny_config()
                        },
                        other => bail!("--random-shape: unknown shape `{other}` (1b)"),
                    };
                    let q = match model.quantize.unwrap_or_default() {
                        loader::Quantize::Nf4 => Some(spiel::qmatrix::QFormat::Nf4),
                        loader::Quantize::None => None,
                        loader::Quantize::Keep => {
                            bail!("--random-shape has no file blocks to keep; use --quantize nf4")
                        }
                    };
                    eprintln!(
                        "building a random {shape} model ({} parameters) ...",
                        cfg.num_parameters()
                    );
                    let (w, qw) = spiel::model::random_parts(&cfg, 0, &Device::Cpu, q)?;
                    let mut m = spiel::model::Llama::from_parts(cfg, w, qw, &Device::Cpu)?;
                    in_dtype(&mut m, model.dtype)?;
                    m
                } else {
                    let m = load_model(&model, &home)?;
                    if random_init {
                        // The same shape and storage, random values.
                        let mut r = spiel::model::Llama::random(m.model.cfg.clone(), 0, &Device::Cpu)?;
                        if let Some(f) = m.model.projection_format() {
                            r.quantize_linears(f)?;
                        }
                        in_dtype(&mut r, model.dtype)?;
                        r
                    } else {
                        m.model
                    }
                };
                release_freed_memory();
                let cfg = TrainConfig {
                    method: methods[0].parse()?,
                    batch_size,
                    reselection_steps,
                    accumulation_steps: 5.min(reselection_steps),
                    checkpoint_activations,
                    dtype: model.dtype.unwrap_or_default(),
                    ..TrainConfig::default()
                };
                rows.push(spiel::bench::bench_train(base, cfg, seq_len, steps, profile)?);
            } else {
                // One process per method, so each peak RSS is that method's alone.
                for method in &methods {
                    eprintln!("benchmarking {method} ...");
                    let mut cmd = std::process::Command::new(std::env::current_exe()?);
                    cmd.args(["--home", &home.to_string_lossy()]);
                    if let Some(t) = cli_threads {
                        cmd.args(["--threads", &t.to_string()]);
                    }
                    cmd.args(["bench", "train", "--json", "--methods", method]);
                    cmd.args([
                        "--batch-size",
                        &batch_size.to_string(),
                        "--seq-len",
                        &seq_len.to_string(),
                    ]);
                    cmd.args([
                        "--steps",
                        &steps.to_string(),
                        "--reselection-steps",
                        &reselection_steps.to_string(),
                    ]);
                    if let Some(p) = &model.model {
                        cmd.arg("--model").arg(p);
                    }
                    if let Some(q) = model.quantize {
                        cmd.arg("--quantize").arg(match q {
                            loader::Quantize::None => "none",
                            loader::Quantize::Keep => "keep",
                            loader::Quantize::Nf4 => "nf4",
                        });
                    }
                    if random_init {
                        cmd.arg("--random-init");
                    }
                    if checkpoint_activations {
                        cmd.arg("--checkpoint-activations");
                    }
                    if profile {
                        cmd.arg("--profile");
                    }
                    if model.dtype == Some(loader::Dtype::Bf16) {
                        cmd.args(["--dtype", "bf16"]);
                    }
                    if let Some(shape) = &random_shape {
                        cmd.arg("--random-shape").arg(shape);
                    }
                    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
                    if !out.status.success() {
                        bail!("benchmark of {method} failed");
                    }
                    let mut r: Vec<spiel::bench::TrainBench> = serde_json::from_slice(&out.stdout)?;
                    rows.append(&mut r);
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "batch {batch_size} x {seq_len} tokens, {} activations, {} threads, {steps} updates after warm-up, S = {reselection_steps}",
                    model.dtype.unwrap_or_default().as_str(),
                    candle_core::utils::get_num_threads()
                );
                println!("| method | trainable | median s/step | plain | AG window | reselection | cycle mean s | tokens/s | GFLOP/s | RSS at start MiB | peak RSS MiB | plan MiB |");
                println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
                let opt = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
                for r in &rows {
                    println!(
                        "| {} | {} | {:.3} | {:.3} | {} | {} | {:.3} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} |",
                        r.method,
                        r.trainable,
                        r.median_s,
                        r.plain_median_s,
                        opt(r.window_median_s),
                        opt(r.reselection_median_s),
                        r.mean_cycle_s,
                        r.tokens_per_s,
                        r.gflops,
                        r.start_rss_mib,
                        r.peak_rss_mib,
                        r.plan_mib
                    );
                }
                for r in &rows {
                    let Some(phases) = &r.phases else { continue };
                    println!("\n{} by phase (mean per update):", r.method);
                    println!("| phase | s | share | GFLOP | GB | GFLOP/s | GB/s |");
                    println!("|---|---:|---:|---:|---:|---:|---:|");
                    for p in phases {
                        let rate = |x: f64| {
                            if x > 0.0 && p.secs_per_step > 0.0 {
                                format!("{:.1}", x / p.secs_per_step)
                            } else {
                                "-".into()
                            }
                        };
                        println!(
                            "| {} | {:.3} | {:.1}% | {:.2} | {:.2} | {} | {} |",
                            p.phase,
                            p.secs_per_step,
                            100.0 * p.share,
                            p.gflop_per_step,
                            p.gb_per_step,
                            rate(p.gflop_per_step),
                            rate(p.gb_per_step)
                        );
                    }
                }
            }
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

/// Set by the SIGINT handler: finish the current update, checkpoint, and exit.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    // A second Ctrl-C ends the process at once.
    // SAFETY: signal() is async-signal-safe; restoring the default disposition.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
}

/// Route Ctrl-C to a graceful stop of training.
fn catch_interrupt() {
    // SAFETY: installs a handler that only stores to an atomic and resets the disposition.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

/// Print a line above the progress bar (also when the bar is hidden because stderr is not a terminal).
fn say(bar: &indicatif::ProgressBar, line: String) {
    bar.suspend(|| eprintln!("{line}"));
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Whether a plan fits the memory available now.
enum Fit {
    Fits(u64),
    Unknown,
    TooBig { avail: u64, hint: String },
}

/// The memory plan of `cfg` (reading only the model's header) and whether it fits; when it does
/// not, the flags that would.
fn memory_plan(cfg: &TrainConfig, home: &Path) -> Result<(spiel::plan::Plan, Fit)> {
    use spiel::plan::{plan, BaseFormat};
    let path = match &cfg.model {
        Some(p) => p.clone(),
        None => assets::ensure(&assets::MODEL, home)?,
    };
    let (model_cfg, file_format) = if path.is_dir() {
        (
            spiel::config::ModelConfig::from_hf_file(&path.join("config.json"))?,
            None,
        )
    } else {
        let g = spiel::gguf::Gguf::open(&path)?;
        let fmt = g.tensor("blk.0.attn_q.weight").map(|t| t.format);
        (spiel::config::ModelConfig::from_gguf(&g)?, fmt)
    };
    let base_of = |q: loader::Quantize| match (q, file_format) {
        (loader::Quantize::Nf4, _) => BaseFormat::Nf4,
        (
            loader::Quantize::Keep,
            Some(f @ (spiel::quant::Format::Q4_0 | spiel::quant::Format::Q4_1 | spiel::quant::Format::Q8_0)),
        ) => BaseFormat::Ggml(f),
        _ => BaseFormat::F32,
    };
    let p = plan(&model_cfg, cfg, base_of(cfg.quantize));
    let Some(avail) = spiel::plan::available_bytes() else {
        return Ok((p, Fit::Unknown));
    };
    if p.total <= avail {
        return Ok((p, Fit::Fits(avail)));
    }
    // Suggest the first of: a 4-bit base, then halving the batch, that fits.
    let mut hints = Vec::new();
    if cfg.quantize == loader::Quantize::None && cfg.method != spiel::adapter::Method::Full {
        let q = TrainConfig {
            quantize: loader::Quantize::Nf4,
            ..cfg.clone()
        };
        if plan(&model_cfg, &q, BaseFormat::Nf4).total <= avail {
            hints.push("--quantize nf4".to_string());
        }
    }
    if hints.is_empty() && !cfg.checkpoint_activations {
        let c = TrainConfig {
            checkpoint_activations: true,
            ..cfg.clone()
        };
        if plan(&model_cfg, &c, base_of(cfg.quantize)).total <= avail {
            hints.push("--checkpoint-activations".to_string());
        }
    }
    let mut b = cfg.batch_size;
    while hints.is_empty() && b > 1 {
        b /= 2;
        let c = TrainConfig {
            batch_size: b,
            grad_accum: cfg.grad_accum * cfg.batch_size / b,
            ..cfg.clone()
        };
        if plan(&model_cfg, &c, base_of(cfg.quantize)).total <= avail {
            hints.push(format!("--batch-size {b} --grad-accum {}", c.grad_accum));
        }
    }
    let hint = if hints.is_empty() {
        "no smaller setting found; try a shorter --max-len".to_string()
    } else {
        format!("it would fit with {}", hints.join(" or "))
    };
    Ok((p, Fit::TooBig { avail, hint }))
}

fn run_train(args: &TrainArgs, home: &Path) -> Result<()> {
    let cfg = args.resolve()?;
    // Never train over a user's earlier run by accident.
    if !args.resume && spiel::checkpoint::list(&cfg.out)?.last().is_some() {
        bail!(
            "{} already holds checkpoints of a run; continue it with `spiel train --out {} --resume` (same flags), or choose another --out",
            cfg.out.display(),
            cfg.out.display()
        );
    }
    if !args.resume && cfg.out.join("summary.json").exists() {
        bail!(
            "{} already holds a finished run; choose another --out (or delete it to train again)",
            cfg.out.display()
        );
    }
    let (plan, fit) = memory_plan(&cfg, home)?;
    if let Fit::TooBig { avail, hint } = &fit {
        if !args.force {
            bail!(
                "the memory plan ({:.0} MiB; `spiel plan` with the same flags shows it) exceeds the {:.0} MiB available; {hint}, or pass --force to try anyway",
                mib(plan.total),
                mib(*avail)
            );
        }
    }
    let m = load_model(
        &ModelArgs {
            model: cfg.model.clone(),
            quantize: Some(cfg.quantize),
            dtype: Some(cfg.dtype),
        },
        home,
    )?;
    let data_path = match &cfg.data {
        Some(p) => p.clone(),
        None => assets::ensure(&assets::ALPACA, home)?,
    };
    let convs = spiel::data::read_conversations(&data_path)?;
    let base_name = m
        .source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (mut trainer, stats) = train::Trainer::new(cfg.clone(), m.model, &base_name, &m.tokenizer, &convs)?;
    // Printed once the inputs are known good, so a bad file is still a one-line error.
    eprintln!("memory plan:\n{}", plan.render().trim_end());
    if let Fit::TooBig { avail, .. } = fit {
        eprintln!(
            "warning: the plan exceeds the {:.0} MiB available; continuing (--force)",
            mib(avail)
        );
    }
    catch_interrupt();
    let bar = indicatif::ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let summary = train::run(&mut trainer, &m.tokenizer, &stats, args.resume, |ev| match ev {
        train::Event::Start {
            first,
            trainable,
            train_examples,
            heldout_examples,
            stats,
            ..
        } => {
            bar.set_position(first as u64 - 1);
            say(&bar, format!(
                "{}: {trainable} trainable parameters; {train_examples} train / {heldout_examples} held-out examples ({} truncated to {} tokens, {} skipped)",
                cfg.method.as_str(),
                stats.truncated,
                cfg.max_len,
                stats.skipped
            ));
            train::Flow::Continue
        }
        train::Event::Step(r) => {
            if r.step > 0 {
                bar.set_position(r.step as u64);
                bar.set_message(format!(
                    "loss {:.4} | {:.0} tok/s",
                    r.loss.unwrap_or(f64::NAN),
                    r.tokens_per_s.unwrap_or(0.0)
                ));
            }
            if let Some(e) = r.eval_loss {
                say(&bar, format!("step {:>5}: held-out loss {e:.4}", r.step));
            }
            if let Some(rs) = r.reselection {
                say(
                    &bar,
                    format!(
                        "step {:>5}: reselection: {} dropped, {} grown, {} kept by drop-and-regrow",
                        r.step, rs.dropped, rs.grown, rs.cancelled
                    ),
                );
            }
            if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                train::Flow::Stop
            } else {
                train::Flow::Continue
            }
        }
        train::Event::Checkpoint(p) => {
            tracing::info!("checkpoint {}", p.display());
            train::Flow::Continue
        }
    });
    bar.finish_and_clear();
    let summary = summary?;
    if summary.stopped {
        println!(
            "interrupted after step {}; checkpoint written. Continue with: spiel train{} --out {} --resume",
            trainer.steps_done(),
            args.config
                .as_ref()
                .map(|c| format!(" --config {}", c.display()))
                .unwrap_or_default(),
            cfg.out.display()
        );
        return Ok(());
    }
    if let (Some(a), Some(b)) = (summary.initial_eval, summary.final_eval) {
        println!("held-out loss {a:.4} -> {b:.4}");
    }
    println!(
        "trained {} parameters in {:.0} s; wrote {} (metrics: {})",
        summary.trainable,
        summary.train_secs,
        summary.output.display(),
        cfg.out.join("metrics.jsonl").display()
    );
    Ok(())
}

/// Keep freed large buffers in the heap instead of returning them to the kernel: a training step
/// allocates and frees hundreds of multi-megabyte tensors, and with glibc's defaults each one is a
/// fresh mmap whose pages the kernel must fault in and zero (a fifth of a step's time, measured).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before any other thread exists.
    unsafe {
        // Serve every size from the heap (no per-buffer mmap) and never trim it back.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        // One heap for all threads: the command runs on a compute worker (`run_in_pool`), and a
        // heap per thread kept a second set of freed buffers (+250 MiB peak, measured).
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Return the heap's free pages to the kernel once, after loading: converting or quantising a
/// model frees its f32 copy, which [`tune_allocator`] would otherwise keep resident for the whole
/// run (160 MiB for the default model in bf16).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SPIEL_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run_in_pool(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Train one run of a comparison in a child `spiel train` (so its peak memory is its own) and
/// return that peak in MiB.
fn train_in_child(run_toml: &Path, home: &Path, threads: Option<usize>) -> Result<f64> {
    let exe = std::env::current_exe().context("locating the spiel binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--home").arg(home);
    if let Some(n) = threads {
        cmd.arg("--threads").arg(n.to_string());
    }
    cmd.arg("train").arg("--config").arg(run_toml).arg("--resume");
    let child = cmd.spawn().context("starting spiel train")?;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 reaps exactly our child and fills both out-parameters.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    if r < 0 {
        bail!("waiting for spiel train: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!(
            "training with {} did not finish; rerun the same `spiel compare` to continue from its checkpoint",
            run_toml.display()
        );
    }
    // ru_maxrss is in KiB on Linux.
    Ok(usage.ru_maxrss as f64 / 1024.0)
}

fn run_compare(config: &Path, home: &Path, threads: Option<usize>) -> Result<()> {
    use spiel::compare::{self, CompareConfig, RunResult};
    let cfg = CompareConfig::from_toml_file(config)?;
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let first = cfg.run_config(cfg.methods[0], cfg.seeds[0])?;
    if first.heldout == 0 || first.eval_every == 0 {
        bail!(
            "{}: [train] needs heldout > 0 and eval_every > 0: the comparison is scored on held-out loss",
            config.display()
        );
    }
    // 1. Train every run that has not finished (each in its own process).
    let mut trained = Vec::new();
    for &seed in &cfg.seeds {
        for &method in &cfg.methods {
            let rc = cfg.run_config(method, seed)?;
            let record = rc.out.join("compare-run.json");
            if !rc.out.join("summary.json").exists() || !record.exists() {
                eprintln!("== training {} (seed {seed}) in {}", method.as_str(), rc.out.display());
                let toml_path = cfg
                    .out
                    .join(format!("seed-{seed}"))
                    .join(format!("{}.toml", method.as_str()));
                spiel::fsutil::write_atomic(&toml_path, rc.to_toml()?.as_bytes())?;
                let peak = train_in_child(&toml_path, home, threads)?;
                spiel::fsutil::write_atomic(
                    &record,
                    serde_json::json!({ "peak_rss_mib": peak }).to_string().as_bytes(),
                )?;
            }
            trained.push((method, seed, rc));
        }
    }
    // 2. Evaluate the base model and every run (results cached per run in eval.json).
    let m = load_model(
        &ModelArgs {
            model: first.model.clone(),
            quantize: Some(first.quantize),
            dtype: Some(first.dtype),
        },
        home,
    )?;
    let data = match &first.data {
        Some(p) => p.clone(),
        None => assets::ensure(&assets::ALPACA, home)?,
    };
    let plan = &cfg.eval;
    let benchmarks =
        |model: &spiel::model::Llama, adapters: &AdapterSet, what: &str| -> Result<(Option<f64>, Option<f64>)> {
            let mmlu = if plan.mmlu_limit > 0 {
                eprintln!("== MMLU ({} questions) on {what}", plan.mmlu_limit);
                let path = assets::ensure(&assets::MMLU, home)?;
                let r = spiel::eval::mmlu(
                    model,
                    adapters,
                    &m.tokenizer,
                    &path,
                    plan.mmlu_shots,
                    Some(plan.mmlu_limit),
                    &[],
                    0,
                    8,
                    |_, _| {},
                )?;
                Some(r.accuracy)
            } else {
                None
            };
            let gsm = if plan.gsm8k_limit > 0 {
                eprintln!("== GSM8K ({} problems) on {what}", plan.gsm8k_limit);
                let path = assets::ensure(&assets::GSM8K, home)?;
                let r = spiel::eval::gsm8k(
                    model,
                    adapters,
                    &m.tokenizer,
                    &path,
                    plan.gsm8k_shots,
                    Some(plan.gsm8k_limit),
                    plan.gsm8k_max_new_tokens,
                    |_, _| {},
                )?;
                Some(r.accuracy)
            } else {
                None
            };
            Ok((mmlu, gsm))
        };
    let cached = |path: &Path, compute: &mut dyn FnMut() -> Result<serde_json::Value>| -> Result<serde_json::Value> {
        if let Some(v) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            return Ok(v);
        }
        let v = compute()?;
        spiel::fsutil::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
        Ok(v)
    };
    let base_eval = cached(&cfg.out.join("base-eval.json"), &mut || {
        eprintln!("== held-out loss of the base model");
        let h = spiel::eval::heldout(
            &m.model,
            &AdapterSet::none(),
            &m.tokenizer,
            &data,
            first.heldout,
            cfg.split_seed,
            first.max_len,
            first.eval_batch_size,
            None,
        )?;
        let (mmlu, gsm8k) = benchmarks(&m.model, &AdapterSet::none(), "the base model")?;
        Ok(serde_json::json!({ "heldout_loss": h.nll, "mmlu": mmlu, "gsm8k": gsm8k }))
    })?;
    let base = RunResult {
        method: None,
        seed: 0,
        trainable: 0,
        train_secs: 0.0,
        peak_rss_mib: 0.0,
        heldout_loss: base_eval["heldout_loss"].as_f64().unwrap_or(f64::NAN),
        mmlu: base_eval["mmlu"].as_f64(),
        gsm8k: base_eval["gsm8k"].as_f64(),
        curve: Vec::new(),
    };
    let mut runs = Vec::new();
    for (method, seed, rc) in trained {
        let read = |p: PathBuf| -> Result<serde_json::Value> {
            let t = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&t).with_context(|| format!("parsing {}", p.display()))
        };
        let summary = read(rc.out.join("summary.json"))?;
        let peak = read(rc.out.join("compare-run.json"))?["peak_rss_mib"]
            .as_f64()
            .unwrap_or(0.0);
        let ev = cached(&rc.out.join("eval.json"), &mut || {
            let what = format!("{} (seed {seed})", method.as_str());
            let (mmlu, gsm8k) = if method == spiel::adapter::Method::Full {
                let full = loader::load(&rc.out.join("model"), &Device::Cpu)?;
                benchmarks(&full.model, &AdapterSet::none(), &what)?
            } else {
                let a = Adapter::load(&rc.out.join("adapter"), &m.model)?;
                benchmarks(&m.model, &a.to_set(), &what)?
            };
            Ok(serde_json::json!({ "mmlu": mmlu, "gsm8k": gsm8k }))
        })?;
        runs.push(RunResult {
            method: Some(method),
            seed,
            trainable: summary["trainable_parameters"].as_u64().unwrap_or(0) as usize,
            train_secs: summary["train_secs"].as_f64().unwrap_or(0.0),
            peak_rss_mib: peak,
            heldout_loss: summary["final_eval_loss"].as_f64().unwrap_or(f64::NAN),
            mmlu: ev["mmlu"].as_f64(),
            gsm8k: ev["gsm8k"].as_f64(),
            curve: compare::read_curve(&rc.out.join("metrics.jsonl"))?,
        });
    }
    compare::write_report(&cfg, &base, &runs)?;
    print!("{}", compare::render_markdown(&cfg, &base, &runs));
    eprintln!("wrote {}/results.md, results.json and curves.png", cfg.out.display());
    Ok(())
}
