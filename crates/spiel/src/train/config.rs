//! The training config: every field of a run, its TOML form (the file and the run's saved
//! config.toml) and its checks.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kernels::optim::AdamW;
use crate::model::adapter::Method;
use crate::train::select::{Policy, Schedule};
use crate::{Error, Result};

/// How the sparse budget is split across the targeted modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetSplit {
    /// In proportion to each matrix's size (`out * in`), as the reference SpIEL does.
    #[default]
    Size,
    /// As LoRA's parameters fall: `r * (in + out)` per module for `lora_equivalent_rank = r`
    /// (in proportion to `in + out` under `density`); the counts PEFT's SHiRA adapters hold, so
    /// `spiel export --to peft` can write the adapter.
    Lora,
}

impl std::str::FromStr for BudgetSplit {
    type Err = Error;
    fn from_str(s: &str) -> Result<BudgetSplit> {
        match s {
            "size" => Ok(BudgetSplit::Size),
            "lora" => Ok(BudgetSplit::Lora),
            _ => Err(Error::Invalid(format!(
                "budget_split: expected size or lora, got `{s}`"
            ))),
        }
    }
}

/// How a sparse run's first indices are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialMask {
    /// The top-k of the accumulated dense gradient at zero deltas, before the first update.
    #[default]
    Gradient,
    /// Uniformly random indices.
    Random,
    /// Random indices that the first reselection replaces completely (the reference SpIEL).
    Reference,
}

impl std::str::FromStr for InitialMask {
    type Err = Error;
    fn from_str(s: &str) -> Result<InitialMask> {
        match s {
            "gradient" => Ok(InitialMask::Gradient),
            "random" => Ok(InitialMask::Random),
            "reference" => Ok(InitialMask::Reference),
            _ => Err(Error::Invalid(format!(
                "initial_mask: expected gradient, random or reference, got `{s}`"
            ))),
        }
    }
}

/// Learning-rate decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Linear to zero.
    Linear,
    /// Cosine to zero.
    Cosine,
    /// Constant after warm-up.
    Constant,
}

/// Every training setting; read from TOML (any subset) and overridden from the command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// spiel-ag, spiel-ma, lora or full.
    pub method: Method,
    /// GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M-Instruct).
    pub model: Option<PathBuf>,
    /// How to hold the frozen projection weights: none (f32), keep (a GGUF file's 4/8-bit
    /// blocks), nf4. Adapter methods only.
    pub quantize: crate::model::loader::Quantize,
    /// Element type of the frozen base's dense matrices and the activations: auto (bf16 on a
    /// CPU with the AMX tile unit for adapter methods, else f32), f32, or bf16 (adapter methods
    /// only). A run resolves `auto` when it starts and records the choice in its config.toml.
    pub dtype: crate::model::loader::Dtype,
    /// Alpaca JSON or chat JSONL (default: the fetched Alpaca demo data).
    pub data: Option<PathBuf>,
    /// Run directory.
    pub out: PathBuf,
    /// Short names of the targeted linears.
    pub target_modules: Vec<String>,
    /// Sparse budget as a fraction of all model parameters (overrides the LoRA-equivalent rank).
    pub density: Option<f64>,
    /// Sparse budget as many deltas as LoRA of this rank on the same modules.
    pub lora_equivalent_rank: usize,
    /// How the sparse budget is split across modules: `size` or `lora`.
    pub budget_split: BudgetSplit,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    pub lora_alpha: f64,
    /// LoRA dropout.
    pub lora_dropout: f64,
    /// S: updates between reselections; unset: max(8, T / 10) ([`TrainConfig::schedule`]).
    pub reselection_steps: Option<usize>,
    /// A: updates in each SpIEL-AG window; unset: max(1, S / 4), the reference's 5 of 20.
    pub accumulation_steps: Option<usize>,
    /// Fraction of the run after which no reselection happens (0.75: the last quarter keeps its
    /// mask).
    pub reselection_end: f64,
    /// How the first indices are chosen: `gradient` (top-k of the accumulated dense gradient
    /// over `initial_mask_examples` examples, before the first update), `random`, or `reference`
    /// (random, and the first reselection replaces them all, as the reference SpIEL does).
    pub initial_mask: InitialMask,
    /// Training examples whose gradient picks a `gradient` initial mask; unset: the first AG
    /// window's worth (A updates of `batch_size * grad_accum`).
    pub initial_mask_examples: Option<usize>,
    /// zeta0: initial fraction of entries replaced.
    pub reselection_rate: f64,
    /// How the fraction decays.
    pub reselection_policy: Policy,
    /// Total updates (optimizer steps).
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per update.
    pub grad_accum: usize,
    /// Longest example in tokens (longer ones are truncated).
    pub max_len: usize,
    /// Recompute each transformer block's forward in the backward instead of keeping its
    /// activations (same gradients, less memory, about one more forward of compute).
    pub checkpoint_activations: bool,
    /// Peak learning rate (default depends on the method).
    pub lr: Option<f64>,
    /// Decay after warm-up.
    pub lr_schedule: LrSchedule,
    /// Fraction of updates spent warming up linearly.
    pub warmup_ratio: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// SM3 epsilon.
    pub sm3_eps: f64,
    /// Clip the global gradient norm to this (none by default, as in the reference).
    pub max_grad_norm: Option<f64>,
    /// Seed for indices, data order, split and dropout.
    pub seed: u64,
    /// Seed of the train / held-out split alone (default: `seed`), so runs with different seeds
    /// can be scored on the same held-out examples.
    pub split_seed: Option<u64>,
    /// Held-out loss every N updates (and at step 0); 0 disables.
    pub eval_every: usize,
    /// Examples held out for evaluation (the validation split a study chooses on).
    pub heldout: usize,
    /// Examples set aside as a test split, drawn before the held-out split and never trained on
    /// or chosen by; its loss is measured once, after the last update (0: no test split).
    pub test: usize,
    /// Batch size for evaluation.
    pub eval_batch_size: usize,
    /// Checkpoint every N updates; 0 disables.
    pub save_every: usize,
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            method: Method::SpielAg,
            model: None,
            quantize: crate::model::loader::Quantize::None,
            dtype: crate::model::loader::Dtype::Auto,
            data: None,
            out: PathBuf::from("runs/spiel-ag"),
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            density: None,
            lora_equivalent_rank: 8,
            budget_split: BudgetSplit::Size,
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            reselection_steps: None,
            accumulation_steps: None,
            reselection_end: 0.75,
            initial_mask: InitialMask::Gradient,
            initial_mask_examples: None,
            reselection_rate: 0.2,
            reselection_policy: Policy::Linear,
            steps: 40,
            batch_size: 4,
            grad_accum: 1,
            max_len: 256,
            checkpoint_activations: false,
            lr: None,
            lr_schedule: LrSchedule::Linear,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-6,
            sm3_eps: 1e-8,
            max_grad_norm: None,
            seed: 42,
            split_seed: None,
            eval_every: 20,
            heldout: 50,
            test: 0,
            eval_batch_size: 8,
            save_every: 20,
        }
    }
}

/// A TOML error as one line: `line N: message`, without the source excerpt.
pub fn toml_message(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => format!(
            "line {}: {}",
            text[..span.start.min(text.len())].matches('\n').count() + 1,
            e.message().trim()
        ),
        None => e.message().trim().to_string(),
    }
}

impl TrainConfig {
    /// Read a TOML config (any subset of the fields).
    pub fn from_toml_file(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::format(path, toml_message(&text, &e)))
    }

    /// The config as TOML (what `config.toml` of a run holds).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// The run's config.toml: [`TrainConfig::resolved`], headed by the rule that filled in S and A.
    pub fn to_run_toml(&self) -> Result<String> {
        Ok(format!(
            "# Resolved config of this run. Unless set, reselection_steps (S) = max(8, steps / 10) and\n\
             # accumulation_steps (A) = max(1, S / 4); no reselection after reselection_end * steps.\n{}",
            self.resolved().to_toml()?
        ))
    }

    /// Parse and validate a TOML config held in memory.
    pub fn from_toml_str(text: &str) -> Result<TrainConfig> {
        let c: TrainConfig = toml::from_str(text).map_err(|e| Error::Invalid(e.to_string().replace('\n', " ")))?;
        c.validate()?;
        Ok(c)
    }

    /// The learning rate, defaulting by method.
    pub fn peak_lr(&self) -> f64 {
        self.lr.unwrap_or(match self.method {
            // The rates the quality study (configs/study-smollm2.toml, docs/results.md) chose on
            // its validation split, each the interior best of a three-point grid: SpIEL-AG of
            // 1e-4, 3e-4, 1e-3 (with the gradient initial mask the deltas start where the
            // gradient is largest, and AdamW at 2e-3 made the README's run end above the base
            // model); SpIEL-MA of 7e-4, 2e-3, 6e-3; LoRA of 3e-4, 1e-3, 3e-3; full fine-tuning
            // of 3e-5, 1e-4, 3e-4.
            Method::SpielAg => 3e-4,
            Method::SpielMa | Method::Shira => 2e-3,
            Method::Lora => 1e-3,
            Method::Full => 1e-4,
        })
    }

    /// Check value ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: &str| Err(Error::Invalid(format!("train config: `{f}` {why}")));
        if self.method == Method::Shira {
            return bad("method", "shira names PEFT's adapter files, which spiel reads and writes; train sparse deltas with spiel-ag or spiel-ma (budget_split = \"lora\" for SHiRA's counts)");
        }
        if self.steps == 0 {
            return bad("steps", "must be at least 1");
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.eval_batch_size == 0 {
            return bad("batch_size/grad_accum/eval_batch_size", "must be at least 1");
        }
        if self.max_len < 2 {
            return bad("max_len", "must be at least 2");
        }
        if self.method == Method::Full && self.quantize != crate::model::loader::Quantize::None {
            return bad(
                "quantize",
                "applies to adapter methods; full fine-tuning trains every weight in f32",
            );
        }
        if self.method == Method::Full && self.dtype == crate::model::loader::Dtype::Bf16 {
            return bad(
                "dtype",
                "applies to adapter methods; full fine-tuning trains every weight in f32",
            );
        }
        let sched = self.schedule();
        if self.method.is_sparse() && sched.reselection_steps > 0 && sched.accumulation_steps > sched.reselection_steps
        {
            return bad("accumulation_steps", "must not exceed reselection_steps");
        }
        if self.method == Method::SpielAg && sched.reselection_steps > 0 && sched.accumulation_steps == 0 {
            return bad("accumulation_steps", "must be at least 1 for spiel-ag");
        }
        if !(0.0..=1.0).contains(&self.reselection_end) {
            return bad("reselection_end", "must be in [0, 1]");
        }
        if self.initial_mask_examples == Some(0) {
            return bad(
                "initial_mask_examples",
                "must be at least 1 (or unset: the first window's worth)",
            );
        }
        if !(0.0..=1.0).contains(&self.reselection_rate) {
            return bad("reselection_rate", "must be in [0, 1]");
        }
        if let Some(d) = self.density {
            if !(d > 0.0 && d <= 1.0) {
                return bad("density", "must be in (0, 1]");
            }
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad("lora_dropout", "must be in [0, 1)");
        }
        if self.lr.is_some_and(|l| !(l > 0.0 && l.is_finite())) {
            return bad("lr", "must be a positive number");
        }
        if self.target_modules.is_empty() {
            return bad("target_modules", "must name at least one module");
        }
        for m in &self.target_modules {
            if ![
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .contains(&m.as_str())
            {
                return bad(
                    "target_modules",
                    &format!(
                        "has unknown module `{m}` (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                    ),
                );
            }
        }
        Ok(())
    }

    /// Learning rate at update `c` (1-based): linear warm-up, then the decay.
    pub fn lr_at(&self, c: usize) -> f64 {
        let peak = self.peak_lr();
        let warm = (self.warmup_ratio * self.steps as f64).ceil() as usize;
        if c <= warm && warm > 0 {
            return peak * c as f64 / warm as f64;
        }
        let rest = (self.steps - warm).max(1) as f64;
        let p = ((c - warm) as f64 / rest).min(1.0);
        match self.lr_schedule {
            LrSchedule::Linear => peak * (1.0 - p),
            LrSchedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            LrSchedule::Constant => peak,
        }
    }

    /// The SpIEL reselection schedule these settings describe.
    pub fn schedule(&self) -> Schedule {
        let s = self.reselection_steps.unwrap_or((self.steps / 10).max(8));
        Schedule {
            reselection_steps: s,
            accumulation_steps: self.accumulation_steps.unwrap_or((s / 4).max(1)),
            rate: self.reselection_rate,
            policy: self.reselection_policy,
            total: self.steps,
            end: (self.reselection_end * self.steps as f64).floor() as usize,
            full_first: self.initial_mask == InitialMask::Reference,
        }
    }

    /// Examples the `gradient` initial mask accumulates over (whole micro-batches).
    pub fn initial_mask_micro_batches(&self) -> usize {
        let examples = self
            .initial_mask_examples
            .unwrap_or(self.schedule().accumulation_steps * self.batch_size * self.grad_accum);
        examples.div_ceil(self.batch_size).max(1)
    }

    /// The config with S and A filled in from T when unset, as a run uses them.
    pub fn resolved(&self) -> TrainConfig {
        let sched = self.schedule();
        TrainConfig {
            reselection_steps: Some(sched.reselection_steps),
            accumulation_steps: Some(sched.accumulation_steps),
            dtype: self.dtype.resolved(self.method == Method::Full),
            ..self.clone()
        }
    }

    pub(crate) fn adamw(&self, lr: f64) -> AdamW {
        AdamW {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }
}
