//! `spiel train`: fine-tune with a progress bar, Ctrl-C to checkpoint and stop; the flags are the
//! TOML config's fields. Under `mpirun -n N` (a build with the `mpi` feature) the N processes
//! train data-parallel; rank 0 prints and writes, and a rank that fails ends the whole job.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use spiel::formats::assets;
use spiel::model::loader;
use spiel::train;
use spiel::train::config::TrainConfig;

use crate::cmd::plan::{memory_plan, Fit};
use crate::shared::{auto_dtype_reason, load_model, mib, say, ModelArgs};

/// `spiel train` flags: every field of the TOML config, each overriding the file.
#[derive(Args)]
pub struct TrainArgs {
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
    /// How the sparse budget is split across modules: size (in proportion to out * in) or lora
    /// (r * (in + out) each, as LoRA's parameters and PEFT's SHiRA adapters fall).
    #[arg(long)]
    budget_split: Option<String>,
    /// LoRA rank.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// S: updates between reselections [default: max(8, steps / 10)].
    #[arg(long)]
    reselection_steps: Option<usize>,
    /// A: updates per SpIEL-AG gradient window [default: max(1, S / 4)].
    #[arg(long)]
    accumulation_steps: Option<usize>,
    /// No reselection after this fraction of the run [default: 0.75].
    #[arg(long)]
    reselection_end: Option<f64>,
    /// First indices: gradient (top-k of the dense gradient over --initial-mask-examples, before
    /// the first update), random, or reference (random, all replaced at the first reselection)
    /// [default: gradient].
    #[arg(long)]
    initial_mask: Option<String>,
    /// Examples for the gradient initial mask [default: A updates' worth].
    #[arg(long)]
    initial_mask_examples: Option<usize>,
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
    /// Peak learning rate [default by method, as the quality study chose: 3e-4 spiel-ag, 2e-3
    /// spiel-ma, 1e-3 lora, 1e-4 full].
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
    /// Examples held out (the validation split).
    #[arg(long)]
    heldout: Option<usize>,
    /// Examples set aside as a test split, scored once after training (0: none).
    #[arg(long)]
    test: Option<usize>,
    /// Checkpoint every N updates (0: never).
    #[arg(long)]
    save_every: Option<usize>,
}

impl TrainArgs {
    /// The config file (if any) with every given flag applied on top.
    pub(crate) fn resolve(&self) -> Result<TrainConfig> {
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
            reselection_rate
        );
        set!(steps, batch_size, grad_accum, max_len, warmup_ratio);
        set!(weight_decay, seed, eval_every, heldout, test, save_every);
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
                "linear" => spiel::train::select::Policy::Linear,
                "cosine" => spiel::train::select::Policy::Cosine,
                _ => bail!("--reselection-policy: expected linear or cosine, got `{p}`"),
            };
        }
        if self.reselection_steps.is_some() {
            c.reselection_steps = self.reselection_steps;
        }
        if self.accumulation_steps.is_some() {
            c.accumulation_steps = self.accumulation_steps;
        }
        if self.initial_mask_examples.is_some() {
            c.initial_mask_examples = self.initial_mask_examples;
        }
        if let Some(e) = self.reselection_end {
            c.reselection_end = e;
        }
        if let Some(m) = &self.initial_mask {
            c.initial_mask = m.parse()?;
        }
        if let Some(b) = &self.budget_split {
            c.budget_split = b.parse()?;
        }
        if let Some(p) = &self.lr_schedule {
            c.lr_schedule = match p.as_str() {
                "linear" => train::config::LrSchedule::Linear,
                "cosine" => train::config::LrSchedule::Cosine,
                "constant" => train::config::LrSchedule::Constant,
                _ => bail!("--lr-schedule: expected linear, cosine or constant, got `{p}`"),
            };
        }
        c.validate()?;
        Ok(c)
    }
}

impl TrainArgs {
    /// Run the command.
    pub fn run(self, home: &Path) -> Result<()> {
        run_train(&self, home)
    }
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

/// Route Ctrl-C to a graceful stop of training; with `term`, SIGTERM too (what `mpirun` sends
/// its processes when it is interrupted).
fn catch_interrupt(term: bool) {
    // SAFETY: installs a handler that only stores to an atomic and resets the disposition.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        if term {
            libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
        }
    }
}

fn run_train(args: &TrainArgs, home: &Path) -> Result<()> {
    let group = Arc::new(spiel::dist::Group::from_launcher()?);
    if group.size() == 1 {
        return train_in(args, home, group);
    }
    let rank = group.rank();
    match train_in(args, home, group.clone()) {
        Ok(()) => Ok(()),
        Err(e) => {
            // The other ranks would wait for this one in their next collective: end them all.
            eprintln!("error (rank {rank} of {}): {e:#}", group.size());
            group.abort(1)
        }
    }
}

fn train_in(args: &TrainArgs, home: &Path, group: Arc<spiel::dist::Group>) -> Result<()> {
    let root = group.is_root();
    let mut cfg = args.resolve()?;
    let auto_dtype = cfg.dtype == loader::Dtype::Auto;
    let full = cfg.method == spiel::model::adapter::Method::Full;
    cfg.dtype = cfg.dtype.resolved(full);
    // Never train over a user's earlier run by accident.
    if !args.resume && spiel::formats::checkpoint::list(&cfg.out)?.last().is_some() {
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
    let convs = spiel::train::data::read_conversations(&data_path)?;
    let base_name = m
        .source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (mut trainer, stats) = train::trainer::Trainer::new(cfg.clone(), m.model, &base_name, &m.tokenizer, &convs)?;
    let ranks = group.size();
    trainer.set_group(group);
    // Printed once the inputs are known good, so a bad file is still a one-line error.
    if root {
        if auto_dtype {
            eprintln!("dtype: auto -> {} ({})", cfg.dtype.as_str(), auto_dtype_reason(full));
        }
        eprintln!("memory plan:\n{}", plan.render().trim_end());
        if let Fit::TooBig { avail, .. } = fit {
            eprintln!(
                "warning: the plan exceeds the {:.0} MiB available; continuing (--force)",
                mib(avail)
            );
        }
        if ranks > 1 {
            eprintln!(
                "data-parallel over {ranks} ranks: each takes its share of every micro-batch of {} examples",
                cfg.batch_size
            );
            if cfg.batch_size < ranks {
                eprintln!(
                    "warning: --batch-size {} is below the {ranks} ranks; ranks without an example in a micro-batch wait on the others",
                    cfg.batch_size
                );
            }
        }
    }
    catch_interrupt(ranks > 1);
    let bar = match root {
        true => indicatif::ProgressBar::new(cfg.steps as u64),
        false => indicatif::ProgressBar::hidden(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Only rank 0 speaks for the job.
    let tell = |line: String| {
        if root {
            say(&bar, line)
        }
    };
    let summary = train::run::run(&mut trainer, &m.tokenizer, &stats, args.resume, |ev| match ev {
        train::run::Event::Start {
            first,
            trainable,
            train_examples,
            heldout_examples,
            stats,
            ..
        } => {
            bar.set_position(first as u64 - 1);
            tell(format!(
                "{}: {trainable} trainable parameters; {train_examples} train / {heldout_examples} held-out examples ({} truncated to {} tokens, {} skipped)",
                cfg.method.as_str(),
                stats.truncated,
                cfg.max_len,
                stats.skipped
            ));
            train::run::Flow::Continue
        }
        train::run::Event::Step(r) => {
            if r.step > 0 {
                bar.set_position(r.step as u64);
                bar.set_message(format!(
                    "loss {:.4} | {:.0} tok/s",
                    r.loss.unwrap_or(f64::NAN),
                    r.tokens_per_s.unwrap_or(0.0)
                ));
            }
            if let Some(e) = r.eval_loss {
                tell(format!("step {:>5}: held-out loss {e:.4}", r.step));
            }
            if let Some(rs) = r.reselection {
                tell(format!(
                    "step {:>5}: reselection: {} dropped, {} grown, {} kept by drop-and-regrow",
                    r.step, rs.dropped, rs.grown, rs.cancelled
                ));
            }
            if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                train::run::Flow::Stop
            } else {
                train::run::Flow::Continue
            }
        }
        train::run::Event::Checkpoint(p) => {
            tracing::info!("checkpoint {}", p.display());
            train::run::Flow::Continue
        }
    });
    bar.finish_and_clear();
    let summary = summary?;
    if !root {
        return Ok(());
    }
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
    if let Some(t) = summary.test_eval {
        println!("test loss {t:.4} (on the {} test examples)", cfg.test);
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
