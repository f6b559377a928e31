//! The trainer: one loop for SpIEL-AG, SpIEL-MA, LoRA and full fine-tuning over the same data
//! pipeline, loss, schedule, evaluation, metrics and checkpoints.
//!
//! One update = `grad_accum` micro-batches. The loss of a micro-batch is the mean NLL over its
//! assistant tokens, divided by `grad_accum`, so gradients (and SpIEL-AG window statistics) are at
//! update scale. Everything random derives from `seed` and the update number, so a resumed run
//! repeats the uninterrupted one exactly.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, AdapterConfig, AdapterSet, BaseModel, Delta, LoraDelta, Method, SparseDelta};
use crate::bf16mm::{DeltaPacks, PackCache};
use crate::checkpoint::{self, Array, Arrays};
use crate::data::{self, Example};
use crate::model::{BlockGraphs, Grad, Llama, Weights};
use crate::optim::{adamw_dense_step, adamw_step, sm3_step, AdamState, AdamW, DenseAdamState, Sm3, Sm3State};
use crate::select::{self, AgWindow, Policy, ReselectStats, Schedule, SparseModule, WindowHook};
use crate::sparse::DeltaInBase;
use crate::{fsutil, Error, Result};

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
    pub quantize: crate::loader::Quantize,
    /// Element type of the frozen base's dense matrices: f32 or bf16. Adapter methods only.
    pub dtype: crate::loader::Dtype,
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
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    pub lora_alpha: f64,
    /// LoRA dropout.
    pub lora_dropout: f64,
    /// S: updates between reselections.
    pub reselection_steps: usize,
    /// A: updates in each SpIEL-AG window.
    pub accumulation_steps: usize,
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
    /// Examples held out for evaluation.
    pub heldout: usize,
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
            quantize: crate::loader::Quantize::None,
            dtype: crate::loader::Dtype::F32,
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
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            reselection_steps: 20,
            accumulation_steps: 5,
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

    /// Parse and validate a TOML config held in memory.
    pub fn from_toml_str(text: &str) -> Result<TrainConfig> {
        let c: TrainConfig = toml::from_str(text).map_err(|e| Error::Invalid(e.to_string().replace('\n', " ")))?;
        c.validate()?;
        Ok(c)
    }

    /// The learning rate, defaulting by method.
    pub fn peak_lr(&self) -> f64 {
        self.lr.unwrap_or(match self.method {
            Method::SpielAg => 2e-3,
            Method::SpielMa => 2e-3,
            Method::Lora => 1e-3,
            Method::Full => 5e-5,
        })
    }

    /// Check value ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: &str| Err(Error::Invalid(format!("train config: `{f}` {why}")));
        if self.steps == 0 {
            return bad("steps", "must be at least 1");
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.eval_batch_size == 0 {
            return bad("batch_size/grad_accum/eval_batch_size", "must be at least 1");
        }
        if self.max_len < 2 {
            return bad("max_len", "must be at least 2");
        }
        if self.method == Method::Full && self.quantize != crate::loader::Quantize::None {
            return bad(
                "quantize",
                "applies to adapter methods; full fine-tuning trains every weight in f32",
            );
        }
        if self.method == Method::Full && self.dtype != crate::loader::Dtype::F32 {
            return bad(
                "dtype",
                "applies to adapter methods; full fine-tuning trains every weight in f32",
            );
        }
        if self.method.is_sparse() && self.reselection_steps > 0 && self.accumulation_steps > self.reselection_steps {
            return bad("accumulation_steps", "must not exceed reselection_steps");
        }
        if self.method == Method::SpielAg && self.reselection_steps > 0 && self.accumulation_steps == 0 {
            return bad("accumulation_steps", "must be at least 1 for spiel-ag");
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
        Schedule {
            reselection_steps: self.reselection_steps,
            accumulation_steps: self.accumulation_steps,
            rate: self.reselection_rate,
            policy: self.reselection_policy,
            total: self.steps,
        }
    }

    fn adamw(&self, lr: f64) -> AdamW {
        AdamW {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepRecord {
    /// Update number (0 = before training).
    pub step: usize,
    /// Mean training loss of the update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Learning rate used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Real tokens processed per second in this update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Seconds since the start of the run (excluding evaluation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_secs: Option<f64>,
    /// Held-out loss after this update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Reselection after this update: totals over modules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reselection: Option<ReselectStats>,
}

/// Progress events for a front end (progress bar, logs).
pub enum Event<'a> {
    /// Training is about to start.
    Start {
        /// Total updates.
        total: usize,
        /// First update to run (after a resume, > 1).
        first: usize,
        /// Trainable parameters.
        trainable: usize,
        /// Examples in the train and held-out splits.
        train_examples: usize,
        /// Held-out examples.
        heldout_examples: usize,
        /// Tokenization outcome.
        stats: &'a data::TokenizeStats,
    },
    /// An update finished.
    Step(&'a StepRecord),
    /// A checkpoint was written.
    Checkpoint(&'a Path),
}

/// What the front end wants after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep training.
    Continue,
    /// Stop after this update: write a checkpoint and return (e.g. on Ctrl-C).
    Stop,
}

/// Held-out mean NLL over all assistant tokens of `examples`.
pub fn eval_loss(
    model: &Llama,
    adapters: &AdapterSet,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<f64> {
    let mut total = 0.0f64;
    let mut n = 0usize;
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = data::make_batch(&refs, pad_id, model.device())?;
        if b.n_targets == 0 {
            continue;
        }
        let loss = batch_loss(model, adapters, &b, Grad::No)?.to_scalar::<f32>()? as f64;
        total += loss * b.n_targets as f64;
        n += b.n_targets;
    }
    Ok(total / n.max(1) as f64)
}

/// Mean NLL of the batch's targets: the head and the loss run only at target positions.
fn batch_loss(model: &Llama, adapters: &AdapterSet, b: &data::Batch, grad: Grad) -> Result<Tensor> {
    let h = model.forward_hidden(&b.ids, Some(&b.mask), grad, adapters)?;
    target_loss(model, &h, b)
}

/// Mean NLL of the batch's targets given the final hidden states `[B, T, H]`.
fn target_loss(model: &Llama, h: &Tensor, b: &data::Batch) -> Result<Tensor> {
    let (bs, t, hid) = h.dims3()?;
    let rows = h.reshape((bs * t, hid))?.index_select(&b.positions, 0)?;
    model.head_loss(&rows, &b.targets)
}

/// Trainable variables with the gradient buffers they accumulate into.
type GradSink<'a> = Vec<(&'a Var, &'a mut Vec<f32>)>;

/// Add the gradients in `grads` of every variable in `sink` to its buffer. An empty buffer
/// (a dense slot between updates) takes the first gradient as it comes.
fn add_grads(sink: &mut GradSink, grads: &candle_core::backprop::GradStore) -> Result<()> {
    let _t = crate::profile::span(crate::profile::Phase::GradientCollection);
    for (var, dst) in sink.iter_mut() {
        if let Some(g) = grads.get(var.as_tensor()) {
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            if dst.is_empty() {
                **dst = g;
            } else {
                dst.iter_mut().zip(g).for_each(|(d, x)| *d += x);
            }
        }
    }
    Ok(())
}

struct SparseSlot {
    name: String,
    shape: (usize, usize),
    state: SparseModule,
    var: Var,
    sm3: Option<Sm3State>,
    window: Option<Arc<WindowHook>>,
    grad: Vec<f32>,
    /// The base's bf16 operands with the delta added, kept from update to update.
    packs: Arc<DeltaPacks>,
}

struct DenseSlot {
    name: String,
    var: Var,
    adam: DenseAdamState,
    /// The update's summed gradient; empty between updates, so that full fine-tuning's
    /// gradients never sit beside a forward's activations (the backward frees a block's
    /// activations as its gradients arrive).
    grad: Vec<f32>,
}

struct LoraSlot {
    name: String,
    a: DenseSlot,
    b: DenseSlot,
    /// The base's packed bf16 operands, kept from update to update.
    packs: Arc<PackCache>,
}

enum Trainable {
    Sparse(Vec<SparseSlot>),
    Lora(Vec<LoraSlot>),
    Full { slots: Vec<DenseSlot>, model: Llama },
}

fn module_short(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// Add every sparse delta of `adapters` marked `in_base` into its module's dense f32 base weight
/// for one update, so that module's forward and input gradient are the base GEMMs alone. The base
/// is restored when the guards are restored or dropped.
fn add_deltas_into_base(base: &Llama, adapters: &AdapterSet) -> Result<Vec<DeltaInBase>> {
    let mut guards = Vec::new();
    for l in base.linears() {
        for d in adapters.get(&l.name) {
            if let (Delta::Sparse(s), Some(w)) = (d, l.weight.dense_f32_frozen()) {
                if s.in_base {
                    let values: Vec<f32> = s.values.to_vec1()?;
                    guards.push(DeltaInBase::add(w, s.indices.clone(), &values)?);
                }
            }
        }
    }
    Ok(guards)
}

/// A training run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    base: Llama,
    base_name: String,
    pad_id: u32,
    train: Vec<Example>,
    heldout: Vec<Example>,
    trainable: Trainable,
    step: usize,
    train_secs: f64,
}

impl DenseSlot {
    /// Number of values it trains.
    fn elem_count(&self) -> usize {
        self.var.as_tensor().elem_count()
    }
}

fn dense_slot(name: String, t: &Tensor) -> Result<DenseSlot> {
    let n = t.elem_count();
    Ok(DenseSlot {
        name,
        var: Var::from_tensor(t)?,
        adam: DenseAdamState::new(n),
        grad: Vec::new(),
    })
}

impl Trainer {
    /// Set up a run: split and tokenize the data, pick the initial indices (seeded) or initialise
    /// LoRA / full weights.
    pub fn new(
        cfg: TrainConfig,
        base: Llama,
        base_name: &str,
        tokenizer: &crate::tokenizer::Tokenizer,
        conversations: &[data::Conversation],
    ) -> Result<(Trainer, data::TokenizeStats)> {
        cfg.validate()?;
        let (train_c, held_c) = data::split(conversations, cfg.heldout, cfg.split_seed.unwrap_or(cfg.seed))?;
        let (train, mut stats) = data::tokenize_all(&train_c, tokenizer, cfg.max_len)?;
        let (heldout, hs) = data::tokenize_all(&held_c, tokenizer, cfg.max_len)?;
        stats.truncated += hs.truncated;
        stats.skipped += hs.skipped;
        let t = Trainer::from_examples(cfg, base, base_name, tokenizer.pad_id, train, heldout)?;
        Ok((t, stats))
    }

    /// Set up a run over already tokenized examples (benchmarks use synthetic ones).
    pub fn from_examples(
        cfg: TrainConfig,
        base: Llama,
        base_name: &str,
        pad_id: u32,
        train: Vec<Example>,
        heldout: Vec<Example>,
    ) -> Result<Trainer> {
        cfg.validate()?;
        if train.is_empty() {
            return Err(Error::Invalid(
                "no training example has an assistant token within max_len".into(),
            ));
        }
        let trainable = init_trainable(&cfg, &base)?;
        // Full fine-tuning trains a copy of every weight and never reads the frozen original
        // again: the run keeps the trainable model in its place, and the original is freed.
        let base = match &trainable {
            Trainable::Full { model, .. } => model.clone(),
            _ => base,
        };
        Ok(Trainer {
            cfg,
            base,
            base_name: base_name.to_string(),
            pad_id,
            train,
            heldout,
            trainable,
            step: 0,
            train_secs: 0.0,
        })
    }

    /// The model the run trains over: the frozen base, or for full fine-tuning the trainable
    /// copy that took its place.
    pub fn base(&self) -> &Llama {
        &self.base
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Number of trainable parameters.
    pub fn trainable_parameters(&self) -> usize {
        match &self.trainable {
            Trainable::Sparse(s) => s.iter().map(|m| m.state.indices.len()).sum(),
            Trainable::Lora(l) => l.iter().map(|m| m.a.elem_count() + m.b.elem_count()).sum(),
            Trainable::Full { slots, .. } => slots.iter().map(DenseSlot::elem_count).sum(),
        }
    }

    /// The model and adapters as they are now (for evaluation and saving).
    pub fn current(&self) -> (&Llama, AdapterSet) {
        self.model_and_adapters(false)
    }

    /// The adapters as trainable variables (`training`: with AG hooks, LoRA dropout, the sparse
    /// deltas' kept bf16 packs, and sparse deltas over a dense f32 base marked for
    /// [`add_deltas_into_base`]) or detached.
    fn model_and_adapters(&self, training: bool) -> (&Llama, AdapterSet) {
        let mut set = AdapterSet::none();
        match &self.trainable {
            Trainable::Sparse(slots) => {
                let in_base: HashSet<&str> = if training {
                    self.base
                        .linears()
                        .into_iter()
                        .filter(|l| l.weight.dense_f32_frozen().is_some())
                        .map(|l| l.name.as_str())
                        .collect()
                } else {
                    HashSet::new()
                };
                for s in slots {
                    let hook = if training {
                        s.window.clone().map(|w| w as Arc<dyn crate::sparse::WeightGradHook>)
                    } else {
                        None
                    };
                    set.add(
                        &s.name,
                        Delta::Sparse(SparseDelta {
                            shape: s.shape,
                            indices: Arc::new(s.state.indices.clone()),
                            values: if training {
                                s.var.as_tensor().clone()
                            } else {
                                s.var.as_tensor().detach()
                            },
                            hook,
                            in_base: in_base.contains(s.name.as_str()),
                            packs: training.then(|| s.packs.clone()),
                        }),
                    );
                }
                (&self.base, set)
            }
            Trainable::Lora(slots) => {
                for (i, s) in slots.iter().enumerate() {
                    set.add(
                        &s.name,
                        Delta::Lora(LoraDelta {
                            a: if training {
                                s.a.var.as_tensor().clone()
                            } else {
                                s.a.var.as_tensor().detach()
                            },
                            b: if training {
                                s.b.var.as_tensor().clone()
                            } else {
                                s.b.var.as_tensor().detach()
                            },
                            scale: self.cfg.lora_alpha / self.cfg.lora_rank as f64,
                            dropout: if training { self.cfg.lora_dropout } else { 0.0 },
                            dropout_seed: self.cfg.seed
                                ^ ((self.step as u64) << 20)
                                ^ (i as u64).wrapping_mul(0x9e37_79b9),
                            packs: training.then(|| s.packs.clone()),
                        }),
                    );
                }
                (&self.base, set)
            }
            Trainable::Full { model, .. } => (model, set),
        }
    }

    /// Held-out loss of the current weights.
    pub fn eval(&self) -> Result<f64> {
        let (m, a) = self.current();
        eval_loss(m, &a, &self.heldout, self.cfg.eval_batch_size, self.pad_id)
    }

    /// The micro-batch (example indices) consumed at global micro-step `i`.
    fn micro_batch(&self, i: usize) -> Vec<usize> {
        let lengths: Vec<usize> = self.train.iter().map(|e| e.ids.len()).collect();
        let per_epoch = lengths.len().div_ceil(self.cfg.batch_size);
        let epoch = (i / per_epoch) as u64;
        data::epoch_batches(&lengths, self.cfg.batch_size, self.cfg.seed, epoch)[i % per_epoch].clone()
    }

    /// Run one update (all its micro-batches, the optimizer step, and a reselection if due).
    pub fn step(&mut self) -> Result<StepRecord> {
        let c = self.step + 1;
        let started = Instant::now();
        let sched = self.cfg.schedule();
        let in_window = self.cfg.method == Method::SpielAg && sched.in_window(c);
        if let Trainable::Sparse(slots) = &mut self.trainable {
            for s in slots.iter_mut() {
                if in_window && s.window.is_none() {
                    s.window = Some(Arc::new(WindowHook(Mutex::new(AgWindow::new(s.state.indices.len())))));
                }
            }
        }
        let ga = self.cfg.grad_accum;
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        // One adapter set for the whole update: nothing it holds changes between micro-batches.
        let adapters = self.model_and_adapters(true).1;
        let in_base = add_deltas_into_base(&self.base, &adapters)?;
        for micro in 0..ga {
            let idx = self.micro_batch(self.step * ga + micro);
            let refs: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
            let b = data::make_batch(&refs, self.pad_id, self.base.device())?;
            tokens += b.n_tokens;
            let scale = 1.0 / ga as f64;
            let graphs = match self.cfg.checkpoint_activations {
                true => BlockGraphs::Recomputed,
                false => BlockGraphs::Kept,
            };
            let (model, mut sink) = self.model_and_grad_sink();
            let loss = |h: &Tensor| target_loss(model, h, &b);
            let lv = model.backward_by_blocks(&b.ids, Some(&b.mask), &adapters, graphs, loss, scale, |g| {
                add_grads(&mut sink, g)
            })? as f64;
            if !lv.is_finite() {
                return Err(Error::Invalid(format!(
                    "the training loss became {lv} at step {c}; stopping"
                )));
            }
            loss_sum += lv;
        }
        for guard in in_base {
            guard.restore()?;
        }
        if let Trainable::Sparse(slots) = &self.trainable {
            for s in slots {
                if let Some(w) = &s.window {
                    w.0.lock().unwrap_or_else(|e| e.into_inner()).end_update();
                }
            }
        }
        if let Some(max) = self.cfg.max_grad_norm {
            self.clip(max);
        }
        let lr = self.cfg.lr_at(c);
        self.optimizer_step(lr)?;
        let reselection = if self.cfg.method.is_sparse() && sched.is_reselection(c) {
            Some(self.reselect(sched.fraction(c))?)
        } else {
            None
        };
        self.step = c;
        let secs = started.elapsed().as_secs_f64();
        self.train_secs += secs;
        Ok(StepRecord {
            step: c,
            loss: Some(loss_sum / ga as f64),
            lr: Some(lr),
            tokens_per_s: Some(tokens as f64 / secs.max(1e-9)),
            train_secs: Some(self.train_secs),
            eval_loss: None,
            reselection,
        })
    }

    /// The model to run and, for every trainable tensor, its variable with the buffer its
    /// gradients add into (borrowed apart, so gradients can be collected while the model runs).
    fn model_and_grad_sink(&mut self) -> (&Llama, GradSink<'_>) {
        match &mut self.trainable {
            Trainable::Sparse(slots) => (&self.base, slots.iter_mut().map(|s| (&s.var, &mut s.grad)).collect()),
            Trainable::Lora(slots) => (
                &self.base,
                slots
                    .iter_mut()
                    .flat_map(|s| [(&s.a.var, &mut s.a.grad), (&s.b.var, &mut s.b.grad)])
                    .collect(),
            ),
            Trainable::Full { slots, model } => (model, slots.iter_mut().map(|s| (&s.var, &mut s.grad)).collect()),
        }
    }

    fn grad_buffers(&mut self) -> Vec<&mut Vec<f32>> {
        match &mut self.trainable {
            Trainable::Sparse(slots) => slots.iter_mut().map(|s| &mut s.grad).collect(),
            Trainable::Lora(slots) => slots.iter_mut().flat_map(|s| [&mut s.a.grad, &mut s.b.grad]).collect(),
            Trainable::Full { slots, .. } => slots.iter_mut().map(|s| &mut s.grad).collect(),
        }
    }

    fn clip(&mut self, max: f64) {
        let mut bufs = self.grad_buffers();
        let norm = bufs
            .iter()
            .flat_map(|b| b.iter())
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt();
        if norm > max {
            let s = (max / norm) as f32;
            bufs.iter_mut().for_each(|b| b.iter_mut().for_each(|g| *g *= s));
        }
    }

    fn optimizer_step(&mut self, lr: f64) -> Result<()> {
        let _t = crate::profile::span(crate::profile::Phase::Optimizer);
        let h = self.cfg.adamw(lr);
        let dense_step = |s: &mut DenseSlot| -> Result<()> {
            let mut v: Vec<f32> = s.var.as_tensor().flatten_all()?.to_vec1()?;
            if s.grad.is_empty() {
                // No gradient reached this tensor in the update.
                s.grad = vec![0.0; v.len()];
            }
            adamw_dense_step(&mut v, &s.grad, &mut s.adam, &h);
            s.var.set(&Tensor::from_vec(
                v,
                s.var.as_tensor().shape(),
                s.var.as_tensor().device(),
            )?)?;
            s.grad = Vec::new();
            Ok(())
        };
        match &mut self.trainable {
            Trainable::Sparse(slots) => {
                for s in slots.iter_mut() {
                    match (&mut s.state.adam, &mut s.sm3) {
                        (Some(adam), _) => adamw_step(&mut s.state.values, &s.grad, adam, &h),
                        (None, Some(sm3)) => {
                            let h = Sm3 {
                                lr,
                                eps: self.cfg.sm3_eps,
                                weight_decay: self.cfg.weight_decay,
                            };
                            sm3_step(&mut s.state.values, &s.grad, &s.state.indices, s.shape.1, sm3, &h)
                        }
                        (None, None) => unreachable!("sparse slots carry AdamW or SM3 state"),
                    }
                    s.grad.iter_mut().for_each(|g| *g = 0.0);
                    s.var
                        .set(&Tensor::new(s.state.values.as_slice(), s.var.as_tensor().device())?)?;
                }
            }
            Trainable::Lora(slots) => {
                for s in slots.iter_mut() {
                    dense_step(&mut s.a)?;
                    dense_step(&mut s.b)?;
                }
            }
            Trainable::Full { slots, .. } => slots.iter_mut().try_for_each(dense_step)?,
        }
        Ok(())
    }

    fn reselect(&mut self, fraction: f64) -> Result<ReselectStats> {
        let _t = crate::profile::span(crate::profile::Phase::Selection);
        let h = self.cfg.adamw(self.cfg.peak_lr());
        let mut total = ReselectStats::default();
        let Trainable::Sparse(slots) = &mut self.trainable else {
            return Ok(total);
        };
        // Modules reselect independently: in parallel.
        use rayon::prelude::*;
        let stats: Vec<ReselectStats> = slots
            .par_iter_mut()
            .map(|s| {
                let n = (s.state.indices.len() as f64 * fraction).floor() as usize;
                match (&s.sm3, s.window.take()) {
                    (Some(sm3), _) => select::reselect_ma(&mut s.state, &sm3.row, &sm3.col, n),
                    (None, Some(w)) => {
                        let w = w.0.lock().unwrap_or_else(|e| e.into_inner());
                        select::reselect_ag(&mut s.state, &w, n, &h)
                    }
                    (None, None) => ReselectStats::default(),
                }
            })
            .collect();
        for (s, st) in slots.iter_mut().zip(stats) {
            total.dropped += st.dropped;
            total.grown += st.grown;
            total.cancelled += st.cancelled;
            s.var
                .set(&Tensor::new(s.state.values.as_slice(), s.var.as_tensor().device())?)?;
        }
        Ok(total)
    }

    /// Updates completed.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The trained adapter (sparse or LoRA); `None` for full fine-tuning.
    pub fn adapter(&self, summary: serde_json::Value) -> Result<Option<Adapter>> {
        let base_model = BaseModel {
            name: self.base_name.clone(),
            config_hash: self.base.cfg.fingerprint(),
        };
        let hyper = serde_json::to_value(&self.cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut config = AdapterConfig {
            method: self.cfg.method,
            base_model_name_or_path: Some(base_model.name.clone()),
            base_model: Some(base_model),
            target_modules: self.cfg.target_modules.clone(),
            module_counts: BTreeMap::new(),
            module_shapes: BTreeMap::new(),
            r: None,
            lora_alpha: None,
            lora_dropout: None,
            peft_type: None,
            task_type: None,
            bias: None,
            hyperparameters: hyper,
            training: summary,
        };
        let (_, set) = self.current();
        let mut deltas = BTreeMap::new();
        match &self.trainable {
            Trainable::Sparse(slots) => {
                for s in slots {
                    config.module_counts.insert(s.name.clone(), s.state.indices.len());
                    config.module_shapes.insert(s.name.clone(), [s.shape.0, s.shape.1]);
                    deltas.insert(s.name.clone(), set.get(&s.name)[0].clone());
                }
            }
            Trainable::Lora(slots) => {
                config.r = Some(self.cfg.lora_rank);
                config.lora_alpha = Some(self.cfg.lora_alpha);
                config.lora_dropout = Some(self.cfg.lora_dropout);
                config.peft_type = Some("LORA".into());
                config.task_type = Some("CAUSAL_LM".into());
                config.bias = Some("none".into());
                for s in slots {
                    deltas.insert(s.name.clone(), set.get(&s.name)[0].clone());
                }
            }
            Trainable::Full { .. } => return Ok(None),
        }
        // Detach from the training graph.
        for d in deltas.values_mut() {
            match d {
                Delta::Sparse(s) => {
                    s.values = s.values.detach();
                    s.hook = None;
                }
                Delta::Lora(l) => {
                    l.a = l.a.detach();
                    l.b = l.b.detach();
                }
            }
        }
        Ok(Some(Adapter { config, deltas }))
    }

    /// The fully fine-tuned model, for full fine-tuning.
    pub fn full_model(&self) -> Option<&Llama> {
        match &self.trainable {
            Trainable::Full { model, .. } => Some(model),
            _ => None,
        }
    }

    /// Everything needed to continue exactly: step, and all trainable and optimizer arrays.
    fn checkpoint_arrays(&self) -> Result<(serde_json::Value, Arrays)> {
        let mut a = Arrays::new();
        let mut window_count = 0u32;
        let dense = |a: &mut Arrays, s: &DenseSlot| -> Result<()> {
            a.insert(
                format!("{}.value", s.name),
                Array::F32(s.var.as_tensor().flatten_all()?.to_vec1()?),
            );
            a.insert(format!("{}.m", s.name), Array::F32(s.adam.m.clone()));
            a.insert(format!("{}.v", s.name), Array::F32(s.adam.v.clone()));
            a.insert(format!("{}.age", s.name), Array::U32(vec![s.adam.age]));
            Ok(())
        };
        match &self.trainable {
            Trainable::Sparse(slots) => {
                for s in slots {
                    let n = &s.name;
                    a.insert(format!("{n}.indices"), Array::U32(s.state.indices.clone()));
                    a.insert(format!("{n}.values"), Array::F32(s.state.values.clone()));
                    if let Some(ad) = &s.state.adam {
                        a.insert(format!("{n}.m"), Array::F32(ad.m.clone()));
                        a.insert(format!("{n}.v"), Array::F32(ad.v.clone()));
                        a.insert(format!("{n}.age"), Array::U32(ad.age.clone()));
                    }
                    if let Some(sm3) = &s.sm3 {
                        a.insert(format!("{n}.sm3_row"), Array::F32(sm3.row.clone()));
                        a.insert(format!("{n}.sm3_col"), Array::F32(sm3.col.clone()));
                    }
                    if let Some(w) = &s.window {
                        let w = w.0.lock().unwrap_or_else(|e| e.into_inner());
                        a.insert(format!("{n}.win_candidates"), Array::U32(w.candidates.clone()));
                        a.insert(format!("{n}.win_g_sum"), Array::F32(w.g_sum.clone()));
                        a.insert(format!("{n}.win_g2_sum"), Array::F32(w.g2_sum.clone()));
                        window_count = w.count;
                    }
                }
            }
            Trainable::Lora(slots) => {
                for s in slots {
                    dense(&mut a, &s.a)?;
                    dense(&mut a, &s.b)?;
                }
            }
            Trainable::Full { slots, .. } => slots.iter().try_for_each(|s| dense(&mut a, s))?,
        }
        let state = serde_json::json!({
            "step": self.step,
            "train_secs": self.train_secs,
            "window_count": window_count,
            "config": self.cfg,
        });
        Ok((state, a))
    }

    /// Write a checkpoint for the current step under the run directory.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let (state, arrays) = self.checkpoint_arrays()?;
        checkpoint::save(&self.cfg.out, self.step, &state, &arrays)
    }

    /// Restore the state saved in checkpoint `dir` (made by a run with the same config).
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let (state, mut a) = checkpoint::load(dir)?;
        let get = |k: &str| {
            state
                .get(k)
                .ok_or_else(|| Error::format(dir, format!("state.json: field `{k}` missing")))
        };
        self.step = get("step")?.as_u64().unwrap_or(0) as usize;
        self.train_secs = get("train_secs")?.as_f64().unwrap_or(0.0);
        let window_count = get("window_count")?.as_u64().unwrap_or(0) as u32;
        let dense = |a: &mut Arrays, s: &mut DenseSlot| -> Result<()> {
            let v = checkpoint::take_f32(a, &format!("{}.value", s.name), dir)?;
            if v.len() != s.elem_count() {
                return Err(Error::format(
                    dir,
                    format!(
                        "checkpoint `{}` has {} values, expected {}",
                        s.name,
                        v.len(),
                        s.elem_count()
                    ),
                ));
            }
            s.var.set(&Tensor::from_vec(
                v,
                s.var.as_tensor().shape(),
                s.var.as_tensor().device(),
            )?)?;
            s.adam.m = checkpoint::take_f32(a, &format!("{}.m", s.name), dir)?;
            s.adam.v = checkpoint::take_f32(a, &format!("{}.v", s.name), dir)?;
            // One count; checkpoints written before dense tensors kept one held a count per element.
            let ages = checkpoint::take_u32(a, &format!("{}.age", s.name), dir)?;
            s.adam.age = match ages.split_first() {
                Some((&age, rest)) if rest.iter().all(|&x| x == age) => age,
                _ => {
                    return Err(Error::format(
                        dir,
                        format!("checkpoint `{}.age`: one update count expected", s.name),
                    ))
                }
            };
            Ok(())
        };
        match &mut self.trainable {
            Trainable::Sparse(slots) => {
                for s in slots.iter_mut() {
                    let n = s.name.clone();
                    s.state.indices = checkpoint::take_u32(&mut a, &format!("{n}.indices"), dir)?;
                    s.state.values = checkpoint::take_f32(&mut a, &format!("{n}.values"), dir)?;
                    if s.state.values.len() != s.state.indices.len() || s.state.values.len() != s.grad.len() {
                        return Err(Error::format(
                            dir,
                            format!("checkpoint module `{n}` has the wrong number of entries"),
                        ));
                    }
                    if let Some(ad) = &mut s.state.adam {
                        ad.m = checkpoint::take_f32(&mut a, &format!("{n}.m"), dir)?;
                        ad.v = checkpoint::take_f32(&mut a, &format!("{n}.v"), dir)?;
                        ad.age = checkpoint::take_u32(&mut a, &format!("{n}.age"), dir)?;
                    }
                    if let Some(sm3) = &mut s.sm3 {
                        sm3.row = checkpoint::take_f32(&mut a, &format!("{n}.sm3_row"), dir)?;
                        sm3.col = checkpoint::take_f32(&mut a, &format!("{n}.sm3_col"), dir)?;
                    }
                    s.window = match a.contains_key(&format!("{n}.win_candidates")) {
                        true => {
                            let candidates = checkpoint::take_u32(&mut a, &format!("{n}.win_candidates"), dir)?;
                            let g_sum = checkpoint::take_f32(&mut a, &format!("{n}.win_g_sum"), dir)?;
                            let g2_sum = checkpoint::take_f32(&mut a, &format!("{n}.win_g2_sum"), dir)?;
                            let current = vec![0.0; candidates.len()];
                            let w = AgWindow {
                                candidates,
                                g_sum,
                                g2_sum,
                                current,
                                count: window_count,
                                k: s.state.indices.len(),
                            };
                            Some(Arc::new(WindowHook(Mutex::new(w))))
                        }
                        false => None,
                    };
                    s.var
                        .set(&Tensor::new(s.state.values.as_slice(), s.var.as_tensor().device())?)?;
                }
            }
            Trainable::Lora(slots) => {
                for s in slots.iter_mut() {
                    dense(&mut a, &mut s.a)?;
                    dense(&mut a, &mut s.b)?;
                }
            }
            Trainable::Full { slots, .. } => slots.iter_mut().try_for_each(|s| dense(&mut a, s))?,
        }
        Ok(())
    }
}

/// Per-module budgets for the sparse methods.
pub fn sparse_budget(cfg: &TrainConfig, model: &Llama, targets: &[(String, (usize, usize))]) -> Vec<usize> {
    let total = match cfg.density {
        Some(d) => (d * model.cfg.num_parameters() as f64).floor() as usize,
        None => cfg.lora_equivalent_rank * targets.iter().map(|(_, (o, i))| o + i).sum::<usize>(),
    };
    let numels: Vec<usize> = targets.iter().map(|(_, (o, i))| o * i).collect();
    select::split_budget(total, &numels)
}

fn init_trainable(cfg: &TrainConfig, base: &Llama) -> Result<Trainable> {
    use rand::{Rng, SeedableRng};
    let targets: Vec<(String, (usize, usize))> = base
        .linears()
        .into_iter()
        .filter(|l| cfg.target_modules.iter().any(|t| t == module_short(&l.name)))
        .map(|l| (l.name.clone(), l.shape()))
        .collect();
    let dev = base.device();
    Ok(match cfg.method {
        Method::SpielAg | Method::SpielMa => {
            let ks = sparse_budget(cfg, base, &targets);
            let mut slots = Vec::with_capacity(targets.len());
            for (j, ((name, shape), k)) in targets.into_iter().zip(ks).enumerate() {
                let numel = shape.0 * shape.1;
                if numel > u32::MAX as usize {
                    return Err(Error::Invalid(format!(
                        "module `{name}` has {numel} entries; more than 2^32 is not supported"
                    )));
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(j as u64 * 7919));
                let mut indices: Vec<u32> = rand::seq::index::sample(&mut rng, numel, k)
                    .into_iter()
                    .map(|i| i as u32)
                    .collect();
                indices.sort_unstable();
                let ag = cfg.method == Method::SpielAg;
                let state = SparseModule {
                    indices,
                    values: vec![0.0; k],
                    adam: ag.then(|| AdamState::new(k)),
                };
                let sm3 = (!ag).then(|| Sm3State {
                    row: vec![0.0; shape.0],
                    col: vec![0.0; shape.1],
                });
                let var = Var::from_vec(vec![0f32; k], k, dev)?;
                slots.push(SparseSlot {
                    name,
                    shape,
                    state,
                    var,
                    sm3,
                    window: None,
                    grad: vec![0.0; k],
                    packs: Arc::default(),
                });
            }
            Trainable::Sparse(slots)
        }
        Method::Lora => {
            let r = cfg.lora_rank;
            if r == 0 {
                return Err(Error::Invalid("train config: `lora_rank` must be at least 1".into()));
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
            let mut slots = Vec::new();
            for (name, (out, inp)) in targets {
                // PEFT's init: A ~ kaiming-uniform (bound 1/sqrt(in)), B = 0.
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..r * inp).map(|_| rng.gen_range(-bound..bound) as f32).collect();
                let a = Tensor::from_vec(a, (r, inp), dev)?;
                let b = Tensor::zeros((out, r), candle_core::DType::F32, dev)?;
                slots.push(LoraSlot {
                    a: dense_slot(format!("{name}.lora_A"), &a)?,
                    b: dense_slot(format!("{name}.lora_B"), &b)?,
                    name,
                    packs: Arc::default(),
                });
            }
            Trainable::Lora(slots)
        }
        Method::Full => {
            let mut weights = Weights::new();
            let mut slots = Vec::new();
            for (name, t) in base.named_weights()? {
                let s = dense_slot(name.clone(), &t)?;
                weights.insert(name, s.var.as_tensor().clone());
                slots.push(s);
            }
            let model = Llama::from_weights(base.cfg.clone(), weights, dev)?;
            Trainable::Full { slots, model }
        }
    })
}

/// Where a run's files go.
pub struct RunPaths {
    /// The run directory.
    pub out: PathBuf,
    /// metrics.jsonl.
    pub metrics: PathBuf,
    /// The adapter directory (sparse / LoRA).
    pub adapter: PathBuf,
    /// The model directory (full fine-tuning).
    pub model: PathBuf,
    /// The resolved config.
    pub config: PathBuf,
    /// summary.json, written last: the run finished.
    pub summary: PathBuf,
}

impl RunPaths {
    /// Paths inside `out`.
    pub fn new(out: &Path) -> RunPaths {
        RunPaths {
            out: out.to_path_buf(),
            metrics: out.join("metrics.jsonl"),
            adapter: out.join("adapter"),
            model: out.join("model"),
            config: out.join("config.toml"),
            summary: out.join("summary.json"),
        }
    }
}

/// Append records to metrics.jsonl (flushed per line).
fn append_metrics(path: &Path, rec: &StepRecord) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(rec).map_err(|e| Error::Invalid(e.to_string()))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// Keep only the metrics of steps `<= step` (after resuming from that step's checkpoint).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepRecord>(l).is_ok_and(|r| r.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    fsutil::write_atomic(path, kept.as_bytes())
}

/// Read metrics.jsonl.
pub fn read_metrics(path: &Path) -> Result<Vec<StepRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1))))
        .collect()
}

/// Draw `loss.png` (training loss and held-out loss against step) from metrics.jsonl.
pub fn plot_losses(metrics: &Path, png: &Path, title: &str) -> Result<()> {
    let recs = read_metrics(metrics)?;
    let train: Vec<(f64, f64)> = recs.iter().filter_map(|r| r.loss.map(|l| (r.step as f64, l))).collect();
    let eval: Vec<(f64, f64)> = recs
        .iter()
        .filter_map(|r| r.eval_loss.map(|l| (r.step as f64, l)))
        .collect();
    let mut series = vec![crate::plot::Series {
        name: "train loss".into(),
        points: train,
    }];
    if !eval.is_empty() {
        series.push(crate::plot::Series {
            name: "held-out loss".into(),
            points: eval,
        });
    }
    crate::plot::line_chart(png, title, "update", "mean NLL per response token", &series)
}

/// What a finished run produced.
pub struct RunSummary {
    /// Held-out loss before training (step 0), if evaluated.
    pub initial_eval: Option<f64>,
    /// Held-out loss after the last update, if evaluated.
    pub final_eval: Option<f64>,
    /// Where the adapter (or full model) was written.
    pub output: PathBuf,
    /// Trainable parameters.
    pub trainable: usize,
    /// Seconds of training (excluding evaluation).
    pub train_secs: f64,
    /// Whether the front end stopped the run early (a checkpoint was written; resume it).
    pub stopped: bool,
}

/// Run (or resume) training to completion, writing metrics, checkpoints and the final adapter.
pub fn run(
    trainer: &mut Trainer,
    tokenizer: &crate::tokenizer::Tokenizer,
    stats: &data::TokenizeStats,
    resume: bool,
    mut on_event: impl FnMut(Event) -> Flow,
) -> Result<RunSummary> {
    let cfg = trainer.cfg.clone();
    let paths = RunPaths::new(&cfg.out);
    std::fs::create_dir_all(&paths.out).map_err(|e| Error::io(&paths.out, e))?;
    // A run killed mid-write leaves staging files behind: finish or discard them first.
    for dir in [paths.out.clone(), paths.out.join("checkpoints")] {
        let n = fsutil::recover_dir(&dir)?;
        if n > 0 {
            tracing::info!(
                "{}: cleaned up {n} leftover staging file(s) of an interrupted write",
                dir.display()
            );
        }
    }
    let toml_text = cfg.to_toml()?;
    fsutil::write_atomic(&paths.config, toml_text.as_bytes())?;
    let mut initial_eval = None;
    if resume {
        if let Some((step, dir)) = checkpoint::list(&paths.out)?.pop() {
            trainer.restore(&dir)?;
            truncate_metrics(&paths.metrics, step)?;
        }
    }
    if trainer.step == 0 {
        let _ = std::fs::remove_file(&paths.metrics);
        if cfg.eval_every > 0 && !trainer.heldout.is_empty() {
            let e = trainer.eval()?;
            initial_eval = Some(e);
            let rec = StepRecord {
                step: 0,
                eval_loss: Some(e),
                ..Default::default()
            };
            append_metrics(&paths.metrics, &rec)?;
            on_event(Event::Step(&rec));
        }
        if cfg.save_every > 0 {
            trainer.save_checkpoint()?;
        }
    } else if let Ok(recs) = read_metrics(&paths.metrics) {
        initial_eval = recs.iter().find(|r| r.step == 0).and_then(|r| r.eval_loss);
    }
    on_event(Event::Start {
        total: cfg.steps,
        first: trainer.step + 1,
        trainable: trainer.trainable_parameters(),
        train_examples: trainer.train.len(),
        heldout_examples: trainer.heldout.len(),
        stats,
    });
    let mut final_eval = None;
    while trainer.step < cfg.steps {
        let mut rec = trainer.step()?;
        let c = rec.step;
        if cfg.eval_every > 0 && !trainer.heldout.is_empty() && (c % cfg.eval_every == 0 || c == cfg.steps) {
            let e = trainer.eval()?;
            rec.eval_loss = Some(e);
            final_eval = Some(e);
        }
        append_metrics(&paths.metrics, &rec)?;
        if rec.eval_loss.is_some() || c == cfg.steps {
            plot_losses(&paths.metrics, &paths.out.join("loss.png"), cfg.method.as_str())?;
        }
        let flow = on_event(Event::Step(&rec));
        if flow == Flow::Stop || (cfg.save_every > 0 && (c % cfg.save_every == 0 || c == cfg.steps)) {
            let dir = trainer.save_checkpoint()?;
            on_event(Event::Checkpoint(&dir));
        }
        if flow == Flow::Stop {
            return Ok(RunSummary {
                initial_eval,
                final_eval,
                output: paths.out.clone(),
                trainable: trainer.trainable_parameters(),
                train_secs: trainer.train_secs,
                stopped: true,
            });
        }
    }
    let summary = serde_json::json!({
        "steps": trainer.step,
        "train_secs": trainer.train_secs,
        "initial_eval_loss": initial_eval,
        "final_eval_loss": final_eval,
        "trainable_parameters": trainer.trainable_parameters(),
    });
    let output = match trainer.adapter(summary)? {
        Some(adapter) => {
            adapter.save(&paths.adapter)?;
            paths.adapter.clone()
        }
        None => {
            let model = trainer.full_model().expect("full fine-tuning has a model");
            crate::loader::export_hf(&model.merged(&AdapterSet::none())?, tokenizer, &paths.model)?;
            paths.model.clone()
        }
    };
    let record = serde_json::json!({
        "method": cfg.method.as_str(),
        "steps": trainer.step,
        "train_secs": trainer.train_secs,
        "initial_eval_loss": initial_eval,
        "final_eval_loss": final_eval,
        "trainable_parameters": trainer.trainable_parameters(),
        "output": output,
    });
    let text = serde_json::to_string_pretty(&record).map_err(|e| Error::Invalid(e.to_string()))?;
    fsutil::write_atomic(&paths.summary, text.as_bytes())?;
    Ok(RunSummary {
        initial_eval,
        final_eval,
        output,
        trainable: trainer.trainable_parameters(),
        train_secs: trainer.train_secs,
        stopped: false,
    })
}
