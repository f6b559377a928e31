//! `spiel bench`: throughput tables for GEMM, training and generation.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::Device;
use clap::{Args, Subcommand};
use spiel::dist::Group;
use spiel::model::loader;
use spiel::train::config::TrainConfig;

use crate::shared::{in_dtype, load_model, release_freed_memory, ModelArgs};

/// `spiel bench` arguments.
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCmd,
}

#[derive(Subcommand)]
pub enum BenchCmd {
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
    /// The all-reduce's time and bandwidth across `mpirun`'s ranks, by message size.
    #[command(after_help = "Example: mpirun -n 2 --bind-to none spiel --threads 1 bench all-reduce")]
    AllReduce {
        /// Comma-separated message sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "0.01,0.1,1,10,100")]
        sizes_mib: Vec<f64>,
        /// Measured rounds per size (after one warm-up).
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serving throughput and latency over loopback: the base alone, one adapter, and many
    /// adapters mixed in the batch.
    #[command(after_help = "Example: spiel --threads 2 bench serve --clients 8 --adapters 8,64")]
    Serve(Box<super::bench_serve::ServeBenchArgs>),
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

impl BenchArgs {
    /// Run the command; `bench train` and `bench all-reduce` under `mpirun` run on every rank
    /// and rank 0 prints, and a rank that fails ends the job.
    pub fn run(self, home: &Path, cli_threads: Option<usize>) -> Result<()> {
        let group = match &self.what {
            BenchCmd::Train { .. } | BenchCmd::AllReduce { .. } => Arc::new(Group::from_launcher()?),
            _ => Arc::new(Group::solo()),
        };
        let result = self.run_in(home, cli_threads, &group);
        if let (Err(e), true) = (&result, group.size() > 1) {
            eprintln!("error (rank {} of {}): {e:#}", group.rank(), group.size());
            group.abort(1)
        }
        result
    }

    fn run_in(self, home: &Path, cli_threads: Option<usize>, group: &Arc<Group>) -> Result<()> {
        match self.what {
            BenchCmd::Serve(a) => return a.run(home, cli_threads),
            BenchCmd::AllReduce {
                sizes_mib,
                rounds,
                json,
            } => {
                if rounds == 0 || sizes_mib.iter().any(|&m| m.is_nan() || m <= 0.0) {
                    bail!("--rounds must be at least 1 and every --sizes-mib positive");
                }
                let bytes: Vec<usize> = sizes_mib.iter().map(|m| (m * 1024.0 * 1024.0) as usize).collect();
                let rows = spiel::tasks::bench::bench_all_reduce(group, &bytes, rounds);
                if !group.is_root() {
                } else if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    println!("f32 sum all-reduce over {} ranks, median of {rounds}", group.size());
                    println!("| bytes | ms | payload GB/s | bus GB/s |\n|---:|---:|---:|---:|");
                    for r in &rows {
                        println!(
                            "| {} | {:.3} | {:.2} | {:.2} |",
                            r.bytes,
                            r.secs * 1e3,
                            r.algbw_gbs,
                            r.busbw_gbs
                        );
                    }
                }
            }
            BenchCmd::Gemm {
                model,
                tokens,
                rounds,
                json,
            } => {
                if tokens == 0 || rounds == 0 {
                    bail!("--tokens and --rounds must be at least 1");
                }
                let m = load_model(&model, home)?;
                let rows = spiel::tasks::bench::bench_gemm(&m.model.cfg, tokens, rounds)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    println!(
                        "GEMM x W^T, {} threads, median of {rounds}; bf16 products on {}",
                        candle_core::utils::get_num_threads(),
                        spiel::tasks::bench::bf16_kernel()
                    );
                    println!("| shape | M | K | N | f32 GFLOP/s | bf16 GFLOP/s |\n|---|---:|---:|---:|---:|---:|");
                    for r in &rows {
                        println!(
                            "| {} | {} | {} | {} | {:.1} | {:.1} |",
                            r.name, r.m, r.k, r.n, r.gflops, r.bf16_gflops
                        );
                    }
                    let peak = spiel::kernels::peak::measure(2_000_000, 5);
                    println!(
                        "\none core's register-only peak: f32 FMA {:.1} GFLOP/s, AVX-512 BF16 dot products {}",
                        peak.f32_fma,
                        peak.bf16_dot
                            .map(|r| format!("{r:.1} GFLOP/s"))
                            .unwrap_or_else(|| "not on this CPU".into())
                    );
                }
            }
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
            } => {
                if steps == 0 || batch_size == 0 || seq_len < 2 {
                    bail!("--steps and --batch-size must be at least 1, --seq-len at least 2");
                }
                let mut rows: Vec<spiel::tasks::bench::TrainBench> = Vec::new();
                if group.size() > 1 && methods.len() != 1 {
                    bail!("under mpirun, benchmark one method per job (for example --methods spiel-ag)");
                }
                if methods.len() == 1 {
                    // `auto` becomes f32 or bf16 here, as `spiel train` resolves it.
                    let mut model = model.clone();
                    let full = methods[0] == "full";
                    model.dtype = model.dtype.map(|d| d.resolved(full));
                    let base = if let Some(shape) = &random_shape {
                        let cfg = match shape.as_str() {
                            "1b" => spiel::formats::config::ModelConfig {
                                hidden_size: 2048,
                                intermediate_size: 5632,
                                num_layers: 22,
                                num_heads: 32,
                                num_kv_heads: 4,
                                head_dim: 64,
                                vocab_size: 32000,
                                max_position_embeddings: 2048,
                                tie_word_embeddings: false,
                                ..spiel::model::random::tiny_config()
                            },
                            other => bail!("--random-shape: unknown shape `{other}` (1b)"),
                        };
                        let q = match model.quantize.unwrap_or_default() {
                            loader::Quantize::Nf4 => Some(spiel::kernels::qmatrix::QFormat::Nf4),
                            loader::Quantize::None => None,
                            loader::Quantize::Keep => {
                                bail!("--random-shape has no file blocks to keep; use --quantize nf4")
                            }
                        };
                        eprintln!(
                            "building a random {shape} model ({} parameters) ...",
                            cfg.num_parameters()
                        );
                        let (w, qw) = spiel::model::random::random_parts(&cfg, 0, &Device::Cpu, q)?;
                        let mut m = spiel::model::transformer::Llama::from_parts(cfg, w, qw, &Device::Cpu)?;
                        in_dtype(&mut m, model.dtype)?;
                        m
                    } else {
                        let m = load_model(&model, home)?;
                        if random_init {
                            // The same shape and storage, random values.
                            let mut r = spiel::model::transformer::Llama::random(m.model.cfg.clone(), 0, &Device::Cpu)?;
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
                        reselection_steps: Some(reselection_steps),
                        accumulation_steps: Some(5.min(reselection_steps)),
                        // Reselect through the whole measured run: every cycle alike.
                        reselection_end: 1.0,
                        checkpoint_activations,
                        dtype: model.dtype.unwrap_or(loader::Dtype::F32),
                        ..TrainConfig::default()
                    };
                    rows.push(spiel::tasks::bench::bench_train(
                        base,
                        cfg,
                        seq_len,
                        steps,
                        profile,
                        group.clone(),
                    )?);
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
                        if let Some(d) = model.dtype {
                            cmd.args(["--dtype", d.as_str()]);
                        }
                        if let Some(shape) = &random_shape {
                            cmd.arg("--random-shape").arg(shape);
                        }
                        let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
                        if !out.status.success() {
                            bail!("benchmark of {method} failed");
                        }
                        let mut r: Vec<spiel::tasks::bench::TrainBench> = serde_json::from_slice(&out.stdout)?;
                        rows.append(&mut r);
                    }
                }
                if !group.is_root() {
                    return Ok(());
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    println!(
                            "batch {batch_size} x {seq_len} tokens, {} activations, {} threads, {steps} updates after warm-up, S = {reselection_steps}",
                            model.dtype.unwrap_or(loader::Dtype::F32).resolved(false).as_str(),
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
                    if rows.iter().any(|r| r.ranks > 1) {
                        println!("\nper update, over the ranks (communication includes waiting for the slowest rank):");
                        println!("| method | ranks | threads/rank | median s | compute s | communication s | share | MB all-reduced | GB/s in all-reduce |");
                        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
                        for r in &rows {
                            println!(
                                "| {} | {} | {} | {:.3} | {:.3} | {:.4} | {:.1}% | {:.2} | {:.2} |",
                                r.method,
                                r.ranks,
                                candle_core::utils::get_num_threads(),
                                r.median_s,
                                r.median_s - r.comm_s,
                                r.comm_s,
                                100.0 * r.comm_s / r.median_s,
                                r.comm_bytes / 1e6,
                                r.comm_bytes / r.comm_s.max(1e-12) / 1e9
                            );
                        }
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
            BenchCmd::Generate {
                model,
                prompt_tokens,
                decode_tokens,
                rounds,
                json,
            } => {
                if prompt_tokens == 0 || rounds == 0 {
                    bail!("--prompt-tokens and --rounds must be at least 1");
                }
                let m = load_model(&model, home)?;
                let b = spiel::tasks::bench::bench_generate(&m.model, prompt_tokens, decode_tokens, rounds)?;
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
}
