//! The trainer: one loop for SpIEL-AG, SpIEL-MA, LoRA and full fine-tuning over the same data
//! pipeline, loss, schedule, evaluation, metrics and checkpoints.
//!
//! One update = `grad_accum` micro-batches. The loss of a micro-batch is the mean NLL over its
//! assistant tokens, divided by `grad_accum`, so gradients (and SpIEL-AG window statistics) are at
//! update scale. Everything random derives from `seed` and the update number, so a resumed run
//! repeats the uninterrupted one exactly.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Tensor, Var};

use crate::dist::{hash_indices, Group};
use crate::formats::checkpoint::{self, Array, Arrays};
use crate::kernels::bf16mm::{DeltaPacks, PackCache};
use crate::kernels::optim::{adamw_dense_step, adamw_step, sm3_step, AdamState, DenseAdamState, Sm3, Sm3State};
use crate::kernels::sparse::DeltaInBase;
use crate::model::adapter::{Adapter, AdapterConfig, AdapterSet, BaseModel, Delta, LoraDelta, Method, SparseDelta};
use crate::model::transformer::{BlockGraphs, Llama};
use crate::model::weight::Weights;
use crate::train::config::{BudgetSplit, InitialMask, TrainConfig};
use crate::train::data::{self, Example};
use crate::train::loss::{eval_loss, eval_loss_sum, target_loss};
use crate::train::metrics::StepRecord;
use crate::train::select::{self, AgWindow, InitialMaskHook, Reduce, ReselectStats, SparseModule, WindowHook};
use crate::{Error, Result};

/// Trainable variables with the gradient buffers they accumulate into.
type GradSink<'a> = Vec<(&'a Var, &'a mut Vec<f32>)>;

/// Add the gradients in `grads` of every variable in `sink` to its buffer. An empty buffer
/// (a dense slot between updates) takes the first gradient as it comes.
fn add_grads(sink: &mut GradSink, grads: &candle_core::backprop::GradStore) -> Result<()> {
    let _t = crate::kernels::profile::span(crate::kernels::profile::Phase::GradientCollection);
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
    /// The run's config.
    pub(crate) cfg: TrainConfig,
    base: Llama,
    base_name: String,
    pad_id: u32,
    /// The training split.
    pub(crate) train: Vec<Example>,
    /// The held-out split.
    pub(crate) heldout: Vec<Example>,
    /// The test split (empty unless `test` is set), scored once after training.
    pub(crate) test: Vec<Example>,
    trainable: Trainable,
    /// Updates done.
    pub(crate) step: usize,
    /// Seconds spent training (excluding evaluation).
    pub(crate) train_secs: f64,
    /// The ranks training together (one, unless launched by `mpirun`).
    group: Arc<Group>,
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
        tokenizer: &crate::formats::tokenizer::Tokenizer,
        conversations: &[data::Conversation],
    ) -> Result<(Trainer, data::TokenizeStats)> {
        cfg.validate()?;
        let (train_c, held_c, test_c) =
            data::three_way_split(conversations, cfg.heldout, cfg.test, cfg.split_seed.unwrap_or(cfg.seed))?;
        let (train, mut stats) = data::tokenize_all(&train_c, tokenizer, cfg.max_len)?;
        let (heldout, hs) = data::tokenize_all(&held_c, tokenizer, cfg.max_len)?;
        let (test, ts) = data::tokenize_all(&test_c, tokenizer, cfg.max_len)?;
        stats.truncated += hs.truncated + ts.truncated;
        stats.skipped += hs.skipped + ts.skipped;
        let mut t = Trainer::from_examples(cfg, base, base_name, tokenizer.pad_id, train, heldout)?;
        t.test = test;
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
            test: Vec::new(),
            trainable,
            step: 0,
            train_secs: 0.0,
            group: Arc::new(Group::solo()),
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

    /// Train data-parallel over `group`: each rank takes its share of every micro-batch, and
    /// gradients, statistics and losses are summed over the ranks before anything is decided,
    /// so the run equals a one-rank run of the same batch size. Set before the first update.
    pub fn set_group(&mut self, group: Arc<Group>) {
        self.group = group;
    }

    /// The ranks training together.
    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }

    /// How a module's hook sums over the ranks (`None` for one rank).
    fn reduce(&self, module: usize) -> Option<Reduce> {
        (self.group.size() > 1).then(|| Reduce {
            group: self.group.clone(),
            module: module as u64,
        })
    }

    /// This rank's part of micro-batch `idx` (a contiguous slice, by rank) and the weight of its
    /// mean loss: its targets over the micro-batch's, so the ranks' weighted gradients sum to the
    /// whole micro-batch's. A rank left without examples runs the first one at weight 0, so that
    /// it still meets every collective of the backward.
    fn share(&self, idx: &[usize]) -> (Vec<usize>, f64) {
        let (n, r) = (self.group.size(), self.group.rank());
        if n == 1 {
            return (idx.to_vec(), 1.0);
        }
        let mine = idx[r * idx.len() / n..(r + 1) * idx.len() / n].to_vec();
        let total: usize = idx.iter().map(|&i| self.train[i].n_targets()).sum();
        if mine.is_empty() {
            return (vec![idx[0]], 0.0);
        }
        let local: usize = mine.iter().map(|&i| self.train[i].n_targets()).sum();
        (mine, local as f64 / total.max(1) as f64)
    }

    /// Fail, naming the modules, unless every rank holds the same indices in every module.
    fn check_masks_agree(&self, when: &str) -> Result<()> {
        let Trainable::Sparse(slots) = &self.trainable else {
            return Ok(());
        };
        if self.group.size() == 1 {
            return Ok(());
        }
        let hashes: Vec<u64> = slots.iter().map(|s| hash_indices(&s.state.indices)).collect();
        let differ: Vec<&str> = self
            .group
            .agree(&hashes)
            .iter()
            .zip(slots)
            .filter(|(same, _)| !**same)
            .map(|(_, s)| s.name.as_str())
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "{when}: rank {} holds other indices than rank 0 in module `{}`{}; the ranks' statistics diverged, stopping",
            self.group.rank(),
            differ[0],
            match differ.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            }
        )))
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
                        s.window
                            .clone()
                            .map(|w| w as Arc<dyn crate::kernels::sparse::WeightGradHook>)
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
    /// Over several ranks each evaluates every size-th batch and the sums are added.
    pub fn eval(&self) -> Result<f64> {
        self.eval_on(&self.heldout)
    }

    /// Test loss of the current weights, if the run has a test split.
    pub fn test_loss(&self) -> Result<Option<f64>> {
        match self.test.is_empty() {
            true => Ok(None),
            false => self.eval_on(&self.test).map(Some),
        }
    }

    fn eval_on(&self, examples: &[Example]) -> Result<f64> {
        let (m, a) = self.current();
        let (n, r) = (self.group.size(), self.group.rank());
        if n == 1 {
            return eval_loss(m, &a, examples, self.cfg.eval_batch_size, self.pad_id);
        }
        let (total, count) = eval_loss_sum(m, &a, examples, self.cfg.eval_batch_size, self.pad_id, |i| i % n == r)?;
        let mut sums = [total, count as f64];
        self.group.sum_f64(&mut sums);
        Ok(sums[0] / sums[1].max(1.0))
    }

    /// The micro-batch (example indices) consumed at global micro-step `i`.
    fn micro_batch(&self, i: usize) -> Vec<usize> {
        let lengths: Vec<usize> = self.train.iter().map(|e| e.ids.len()).collect();
        let per_epoch = lengths.len().div_ceil(self.cfg.batch_size);
        let epoch = (i / per_epoch) as u64;
        data::epoch_batches(&lengths, self.cfg.batch_size, self.cfg.seed, epoch)[i % per_epoch].clone()
    }

    /// The `gradient` initial mask: one backward pass per micro-batch of the run's first
    /// examples with every delta at zero, each module's hook summing its dense weight gradient;
    /// the top-k of |sum| become the module's indices. No update is spent: there is no optimizer
    /// step and the value gradients are discarded.
    fn choose_initial_mask(&mut self) -> Result<()> {
        let n = self.cfg.initial_mask_micro_batches();
        let batches: Vec<(Vec<usize>, f64)> = (0..n).map(|i| self.share(&self.micro_batch(i))).collect();
        let reduces: Vec<Option<Reduce>> = (0..self.module_count()).map(|j| self.reduce(j)).collect();
        let Trainable::Sparse(slots) = &mut self.trainable else {
            return Ok(());
        };
        let _t = crate::kernels::profile::span(crate::kernels::profile::Phase::Selection);
        let hooks: Vec<Arc<InitialMaskHook>> = slots
            .iter()
            .zip(reduces)
            .map(|(s, r)| Arc::new(InitialMaskHook::new(s.state.indices.len(), n, r)))
            .collect();
        let mut set = AdapterSet::none();
        for (s, h) in slots.iter().zip(&hooks) {
            set.add(
                &s.name,
                Delta::Sparse(SparseDelta {
                    shape: s.shape,
                    indices: Arc::new(s.state.indices.clone()),
                    values: s.var.as_tensor().clone(),
                    hook: Some(h.clone() as Arc<dyn crate::kernels::sparse::WeightGradHook>),
                    in_base: false,
                    packs: None,
                }),
            );
        }
        let graphs = match self.cfg.checkpoint_activations {
            true => BlockGraphs::Recomputed,
            false => BlockGraphs::Kept,
        };
        for (idx, weight) in &batches {
            let refs: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
            let b = data::make_batch(&refs, self.pad_id, self.base.device())?;
            let loss = |h: &Tensor| weighted(target_loss(&self.base, h, &b)?, *weight);
            self.base.backward_by_blocks(
                &b.ids,
                Some(&b.mask),
                &set,
                graphs,
                loss,
                weight.max(f64::MIN_POSITIVE),
                |_| Ok(()),
            )?;
        }
        let ag = self.cfg.method == Method::SpielAg;
        for (s, h) in slots.iter_mut().zip(&hooks) {
            let indices = h
                .indices()
                .map_err(|e| Error::Invalid(format!("initial mask of `{}`: {e}", s.name)))?;
            let Some(indices) = indices else { continue };
            let k = indices.len();
            s.state = SparseModule {
                indices,
                values: vec![0.0; k],
                adam: ag.then(|| AdamState::new(k)),
            };
            s.var
                .set(&Tensor::zeros(k, candle_core::DType::F32, s.var.as_tensor().device())?)?;
            // The kept bf16 operands hold the old positions.
            s.packs = Arc::default();
        }
        tracing::info!(
            "initial mask: top-k of the dense gradient over {} examples ({n} micro-batches)",
            n * self.cfg.batch_size
        );
        self.check_masks_agree("initial mask")
    }

    /// Run one update (all its micro-batches, the optimizer step, and a reselection if due).
    pub fn step(&mut self) -> Result<StepRecord> {
        if self.step == 0 && self.cfg.method.is_sparse() && self.cfg.initial_mask == InitialMask::Gradient {
            self.choose_initial_mask()?;
        }
        let c = self.step + 1;
        let started = Instant::now();
        let sched = self.cfg.schedule();
        let in_window = self.cfg.method == Method::SpielAg && sched.in_window(c);
        if in_window {
            let reduces: Vec<Option<Reduce>> = (0..self.module_count()).map(|j| self.reduce(j)).collect();
            if let Trainable::Sparse(slots) = &mut self.trainable {
                for (s, r) in slots.iter_mut().zip(reduces) {
                    if s.window.is_none() {
                        s.window = Some(Arc::new(WindowHook::new(AgWindow::new(s.state.indices.len()), r)));
                    }
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
            let (idx, weight) = self.share(&self.micro_batch(self.step * ga + micro));
            let refs: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
            let b = data::make_batch(&refs, self.pad_id, self.base.device())?;
            if weight > 0.0 {
                tokens += b.n_tokens;
            }
            let scale = weight.max(f64::MIN_POSITIVE) / ga as f64;
            let graphs = match self.cfg.checkpoint_activations {
                true => BlockGraphs::Recomputed,
                false => BlockGraphs::Kept,
            };
            let (model, mut sink) = self.model_and_grad_sink();
            let loss = |h: &Tensor| weighted(target_loss(model, h, &b)?, weight);
            let lv = model.backward_by_blocks(&b.ids, Some(&b.mask), &adapters, graphs, loss, scale, |g| {
                add_grads(&mut sink, g)
            })? as f64;
            if !lv.is_finite() {
                return Err(Error::Invalid(format!(
                    "the training loss became {lv} at step {c}; stopping"
                )));
            }
            loss_sum += lv * weight;
        }
        for guard in in_base {
            guard.restore()?;
        }
        self.end_windows(c)?;
        self.sum_gradients();
        let mut totals = [loss_sum, tokens as f64];
        self.group.sum_f64(&mut totals);
        let (loss_sum, tokens) = (totals[0], totals[1]);
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
            tokens_per_s: Some(tokens / secs.max(1e-9)),
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

    /// Trainable modules (sparse slots, LoRA pairs or full weights), in the fixed order.
    fn module_count(&self) -> usize {
        match &self.trainable {
            Trainable::Sparse(s) => s.len(),
            Trainable::Lora(l) => l.len(),
            Trainable::Full { slots, .. } => slots.len(),
        }
    }

    /// Close the update in every AG window: sum its gradient at the candidates over the ranks
    /// (the squares in `g2_sum` are of the summed gradient), then fold it in.
    fn end_windows(&mut self, c: usize) -> Result<()> {
        let Trainable::Sparse(slots) = &self.trainable else {
            return Ok(());
        };
        for s in slots {
            let Some(w) = &s.window else { continue };
            if let Some(e) = w.take_fault() {
                return Err(Error::Invalid(format!("update {c}, module `{}`: {e}", s.name)));
            }
            let mut w = w.lock();
            if !w.candidates.is_empty() {
                self.group.sum_f32(&mut w.current);
            }
            w.end_update();
        }
        Ok(())
    }

    /// Sum every trainable gradient over the ranks, one buffer at a time in the fixed module
    /// order (a dense buffer no gradient reached counts as zeros).
    fn sum_gradients(&mut self) {
        if self.group.size() == 1 {
            return;
        }
        let _t = crate::kernels::profile::span(crate::kernels::profile::Phase::GradientCollection);
        let group = self.group.clone();
        let sizes: Vec<usize> = match &self.trainable {
            Trainable::Sparse(s) => s.iter().map(|s| s.grad.len()).collect(),
            Trainable::Lora(l) => l.iter().flat_map(|s| [s.a.elem_count(), s.b.elem_count()]).collect(),
            Trainable::Full { slots, .. } => slots.iter().map(DenseSlot::elem_count).collect(),
        };
        for (buf, n) in self.grad_buffers().into_iter().zip(sizes) {
            if buf.is_empty() {
                *buf = vec![0.0; n];
            }
            group.sum_f32(buf);
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
        let _t = crate::kernels::profile::span(crate::kernels::profile::Phase::Optimizer);
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
        let _t = crate::kernels::profile::span(crate::kernels::profile::Phase::Selection);
        let h = self.cfg.adamw(self.cfg.peak_lr());
        let mut total = ReselectStats::default();
        let perturb = self.group.size() > 1 && perturbed_rank() == Some(self.group.rank());
        let Trainable::Sparse(slots) = &mut self.trainable else {
            return Ok(total);
        };
        if let (true, Some(s)) = (perturb, slots.first_mut()) {
            tracing::warn!(
                "SPIEL_TEST_PERTURB_RANK: perturbing this rank's statistics of `{}`",
                s.name
            );
            if let Some(w) = &s.window {
                w.lock().g_sum.reverse();
            }
            if let Some(sm3) = &mut s.sm3 {
                sm3.row.reverse();
            }
        }
        // Modules reselect independently: in parallel.
        use rayon::prelude::*;
        let stats: Vec<ReselectStats> = slots
            .par_iter_mut()
            .map(|s| {
                let n = (s.state.indices.len() as f64 * fraction).floor() as usize;
                match (&s.sm3, s.window.take()) {
                    (Some(sm3), _) => select::reselect_ma(&mut s.state, &sm3.row, &sm3.col, n),
                    (None, Some(w)) => {
                        let w = w.lock();
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
        self.check_masks_agree(&format!("reselection at update {}", self.step + 1))?;
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
                        let w = w.lock();
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
        let reduces: Vec<Option<Reduce>> = (0..self.module_count()).map(|j| self.reduce(j)).collect();
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
                for (j, s) in slots.iter_mut().enumerate() {
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
                            Some(Arc::new(WindowHook::new(w, reduces[j].clone())))
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

/// `loss`, or for a rank's stand-in example of weight 0 the loss times a zero tensor: a product
/// the backward follows (a scale of 0 would cut the graph), whose gradients are all exactly zero.
fn weighted(loss: Tensor, weight: f64) -> Result<Tensor> {
    match weight > 0.0 {
        true => Ok(loss),
        false => Ok(loss.mul(&loss.zeros_like()?)?),
    }
}

/// The rank named by `SPIEL_TEST_PERTURB_RANK`, a fault injection for tests only: that rank
/// perturbs its statistics of the first module before each reselection, so the check that every
/// rank holds the same indices must stop the run naming the module.
fn perturbed_rank() -> Option<usize> {
    std::env::var("SPIEL_TEST_PERTURB_RANK").ok()?.parse().ok()
}

/// Per-module budgets for the sparse methods.
pub fn sparse_budget(cfg: &TrainConfig, model: &Llama, targets: &[(String, (usize, usize))]) -> Vec<usize> {
    let total = match cfg.density {
        Some(d) => (d * model.cfg.num_parameters() as f64).floor() as usize,
        None => cfg.lora_equivalent_rank * targets.iter().map(|(_, (o, i))| o + i).sum::<usize>(),
    };
    match (cfg.budget_split, cfg.density) {
        (BudgetSplit::Lora, None) => targets
            .iter()
            .map(|(_, (o, i))| cfg.lora_equivalent_rank * (o + i))
            .collect(),
        (BudgetSplit::Lora, Some(_)) => {
            let sides: Vec<usize> = targets.iter().map(|(_, (o, i))| o + i).collect();
            select::split_budget(total, &sides)
        }
        (BudgetSplit::Size, _) => {
            let numels: Vec<usize> = targets.iter().map(|(_, (o, i))| o * i).collect();
            select::split_budget(total, &numels)
        }
    }
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
        Method::Shira => {
            return Err(Error::Invalid(
                "train config: method `shira` is not trained (spiel-ag or spiel-ma)".into(),
            ))
        }
        Method::SpielAg | Method::SpielMa => {
            let ks = sparse_budget(cfg, base, &targets);
            let mut slots = Vec::with_capacity(targets.len());
            for (j, ((name, shape), k)) in targets.into_iter().zip(ks).enumerate() {
                let numel = shape.0 * shape.1;
                if k > numel {
                    return Err(Error::Invalid(format!(
                        "module `{name}`: a budget of {k} deltas exceeds its {numel} entries; lower lora_equivalent_rank or density"
                    )));
                }
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
