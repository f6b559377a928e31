//! A LLaMA-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): GQA attention with RoPE
//! (rotate-half layout, theta from the config), RMSNorm, SwiGLU MLP, tied or untied head,
//! optional q/k/v bias. Reference: Touvron et al. 2023 and Hugging Face `modeling_llama.py`.
//!
//! Two paths share the weights:
//! - [`Llama::forward`]: batched, right-padded sequences with an attention mask, built from
//!   differentiable candle ops so autograd reaches the adapters (training, scoring, eval);
//! - [`Llama::forward_cached`]: incremental decoding with a [`KvCache`] of candle tensors, using
//!   candle's fused inference kernels on any device (equal-length sequences, one adapter set).
//!
//! Generation and the server decode through [`crate::model::decode`] instead: CPU loops, any mix
//! of sequence lengths and adapters in one step, and batch-invariant results.
//!
//! Shapes: B batch, T new tokens, S attended positions, H hidden, NH query heads, KV key/value
//! heads, D head dim, V vocab.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};

use crate::formats::config::ModelConfig;
use crate::kernels::attention::Mask;
use crate::kernels::bf16mm::Products;
use crate::kernels::qmatrix::{QFormat, QMatrix};
use crate::model::adapter::{Adapter, AdapterSet};
use crate::model::linear::Linear;
use crate::model::random::random_weights;
use crate::model::weight::{take, Grad, QWeights, Weight, Weights};
use crate::{Error, Result};

/// Additive mask value for positions a query may not attend to. Finite, so a row with no
/// visible key (never produced by right padding) gives a uniform distribution rather than NaN.
const MASKED: f32 = -1e30;

/// Whether an op on `x` must use spiel's own kernel: when differentiating, and for bf16
/// activations, which candle's inference kernels take only with bf16 weights and tables.
fn own_kernel(x: &Tensor, grad: Grad) -> bool {
    grad == Grad::Yes || x.dtype() != DType::F32
}

/// RMSNorm with the f32 weight `w` over `x` of the activation dtype.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, grad: Grad) -> Result<Tensor> {
    Ok(match own_kernel(x, grad) {
        true => crate::kernels::ops::rms_norm(x, w, eps)?,
        false => candle_nn::ops::rms_norm(x, w, eps as f32)?,
    })
}

/// Rotate-half RoPE on `x: [B, NH, T, D]` with `cos`, `sin: [T, D/2]` (f32).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, grad: Grad) -> Result<Tensor> {
    Ok(match own_kernel(x, grad) {
        true => crate::kernels::ops::rope(x, cos, sin)?,
        false => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?,
    })
}

/// cos and sin tables `[T, D/2]` for positions `offset .. offset + t`.
fn rope_tables(cfg: &ModelConfig, offset: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in offset..offset + t {
        for i in 0..half {
            let inv_freq = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64);
            let angle = p as f64 * inv_freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), device)?,
        Tensor::from_vec(sin, (t, half), device)?,
    ))
}

#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
}

#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
}

#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) input_layernorm: Tensor,
    pub(crate) self_attn: Attention,
    pub(crate) post_attention_layernorm: Tensor,
    pub(crate) mlp: Mlp,
}

/// Per-layer cached keys and values for incremental decoding. Each layer's keys and values live
/// in `[B, KV, capacity, D]` buffers that new positions are written into in place (the capacity
/// doubles when full), and attention reads the filled prefix where it lies; nothing is copied
/// per token.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
}

/// One layer's key and value buffers and how many positions are filled.
#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Append `k`, `v: [B, KV, T, D]` and return views of every cached position.
    fn append(slot: &mut Option<LayerCache>, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, kv, t, d) = k.dims4()?;
        let len = slot.as_ref().map_or(0, |c| c.len);
        let cap = slot.as_ref().map_or(0, |c| c.k.dims()[2]);
        if len + t > cap {
            let cap = (len + t).max(2 * cap).max(64);
            let grown = |old: Option<&Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, kv, cap, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let (nk, nv) = (grown(slot.as_ref().map(|c| &c.k))?, grown(slot.as_ref().map(|c| &c.v))?);
            *slot = Some(LayerCache { k: nk, v: nv, len });
        }
        let c = slot.as_mut().expect("allocated above");
        c.k.slice_set(&k.contiguous()?, 2, len)?;
        c.v.slice_set(&v.contiguous()?, 2, len)?;
        c.len = len + t;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?))
    }
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |c| c.len)
    }

    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything a block's attention needs besides its weights.
struct AttnInputs<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    /// Additive mask `[B, T, S]`, or `None` when every position may see every cached one.
    mask: Option<&'a Mask>,
    grad: Grad,
    adapters: &'a AdapterSet,
}

impl AttnInputs<'_> {
    fn linear(&self, l: &Linear, x: &Tensor) -> Result<Tensor> {
        l.forward(x, self.adapters.get(&l.name), self.grad)
    }

    /// Several projections of the same input: fused into one pass when decoding one row.
    fn linears(&self, ls: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        match self.grad {
            Grad::No => Linear::forward_one_row(ls, x, self.adapters),
            Grad::Yes => ls.iter().map(|l| self.linear(l, x)).collect(),
        }
    }
}

impl Block {
    fn attention(
        &self,
        cfg: &ModelConfig,
        x: &Tensor,
        inp: &AttnInputs,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let a = &self.self_attn;
        let [q, k, v]: [Tensor; 3] = inp
            .linears(&[&a.q_proj, &a.k_proj, &a.v_proj], x)?
            .try_into()
            .expect("three projections");
        let scale = 1.0 / (d as f64).sqrt();
        let Some(slot) = cache else {
            // Training and whole-sequence forwards: one op from the projections' layout to
            // o_proj's, which keeps only q, k, v and its output for the backward.
            let heads = (nh, kvh);
            let ctx = crate::kernels::attention::attention_from_projections(
                &q,
                &k,
                &v,
                (inp.cos, inp.sin),
                heads,
                inp.mask,
                scale,
            )?;
            return inp.linear(&a.o_proj, &ctx);
        };
        let q = q.reshape((b, t, nh, d))?.transpose(1, 2)?;
        let k = k.reshape((b, t, kvh, d))?.transpose(1, 2)?;
        let v = v.reshape((b, t, kvh, d))?.transpose(1, 2)?.contiguous()?;
        let q = rope(&q, inp.cos, inp.sin, inp.grad)?;
        let k = rope(&k, inp.cos, inp.sin, inp.grad)?;
        let (k, v) = LayerCache::append(slot, &k, &v)?;
        // GQA without copying K/V: fold each KV head's group of query heads into its rows; the
        // keys and values are read in place from the cache (crate::kernels::attention).
        let rep = nh / kvh;
        let ctx = crate::kernels::attention::attention(&q.reshape((b, kvh, rep * t, d))?, &k, &v, inp.mask, scale)?;
        let ctx = ctx.reshape((b, nh, t, d))?.transpose(1, 2)?.reshape((b, t, nh * d))?;
        inp.linear(&a.o_proj, &ctx)
    }

    fn forward(
        &self,
        cfg: &ModelConfig,
        x: &Tensor,
        inp: &AttnInputs,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Result<Tensor> {
        let [x, mlp] = self.forward_parts(cfg, x, inp, cache)?;
        crate::kernels::ops::add(&x, &mlp)
    }

    /// The block's output as its two addends: the residual stream after attention and the
    /// MLP's output. (Kept apart, a training graph need not hold their sum.)
    fn forward_parts(
        &self,
        cfg: &ModelConfig,
        x: &Tensor,
        inp: &AttnInputs,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Result<[Tensor; 2]> {
        let h = rms_norm(x, &self.input_layernorm, cfg.rms_norm_eps, inp.grad)?;
        let x = crate::kernels::ops::add(x, &self.attention(cfg, &h, inp, cache)?)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, cfg.rms_norm_eps, inp.grad)?;
        let m = &self.mlp;
        let [gate, up]: [Tensor; 2] = inp
            .linears(&[&m.gate_proj, &m.up_proj], &h)?
            .try_into()
            .expect("two projections");
        let act = match own_kernel(&gate, inp.grad) {
            true => crate::kernels::ops::swiglu(&gate, &up)?,
            false => (candle_nn::Activation::Silu.forward(&gate)? * up)?,
        };
        Ok([x, inp.linear(&m.down_proj, &act)?])
    }
}

/// Where [`Llama::backward_by_blocks`] gets each block's graph for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockGraphs {
    /// Kept from the forward: no recomputation, all activations alive when the backward starts.
    Kept,
    /// Recomputed from the block's input (activation checkpointing): one block's activations
    /// alive at a time, for a second forward's cost.
    Recomputed,
}

/// The transformer: embeddings, blocks, final norm and head.
#[derive(Debug, Clone)]
pub struct Llama {
    /// Shape of the model.
    pub cfg: ModelConfig,
    /// Token embeddings `[V, H]` (also the head when tied).
    pub(crate) embed_tokens: Weight,
    pub(crate) layers: Vec<Block>,
    pub(crate) norm: Tensor,
    /// Separate head weight `[V, H]`; `None` when tied to the embeddings.
    pub(crate) lm_head: Option<Weight>,
    /// The dtype of the hidden states between the embeddings and the final norm (f32 or bf16).
    activations: DType,
    device: Device,
}

impl Llama {
    /// Build from canonical-named f32 weights. Every tensor the config implies must be present
    /// with the right shape; leftover tensors (e.g. rotary caches) are ignored.
    pub fn from_weights(cfg: ModelConfig, w: Weights, device: &Device) -> Result<Llama> {
        Llama::from_parts(cfg, w, QWeights::new(), device)
    }

    /// Build from f32 weights plus projection weights already quantised (`qw`, which take
    /// precedence over a dense tensor of the same name).
    pub fn from_parts(cfg: ModelConfig, mut w: Weights, mut qw: QWeights, device: &Device) -> Result<Llama> {
        cfg.validate().map_err(Error::Invalid)?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let embed_tokens = Weight::Dense(take(&mut w, "model.embed_tokens.weight", &[cfg.vocab_size, h])?);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let bias = cfg.attention_bias;
            layers.push(Block {
                input_layernorm: take(&mut w, &format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn: Attention {
                    q_proj: Linear::load(&mut w, &mut qw, &format!("{p}.self_attn.q_proj"), bias, (q, h))?,
                    k_proj: Linear::load(&mut w, &mut qw, &format!("{p}.self_attn.k_proj"), bias, (kv, h))?,
                    v_proj: Linear::load(&mut w, &mut qw, &format!("{p}.self_attn.v_proj"), bias, (kv, h))?,
                    o_proj: Linear::load(&mut w, &mut qw, &format!("{p}.self_attn.o_proj"), false, (h, q))?,
                },
                post_attention_layernorm: take(&mut w, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate_proj: Linear::load(&mut w, &mut qw, &format!("{p}.mlp.gate_proj"), false, (i, h))?,
                    up_proj: Linear::load(&mut w, &mut qw, &format!("{p}.mlp.up_proj"), false, (i, h))?,
                    down_proj: Linear::load(&mut w, &mut qw, &format!("{p}.mlp.down_proj"), false, (h, i))?,
                },
            });
        }
        let norm = take(&mut w, "model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Weight::Dense(take(&mut w, "lm_head.weight", &[cfg.vocab_size, h])?))
        };
        Ok(Llama {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            activations: DType::F32,
            device: device.clone(),
        })
    }

    /// A model with random weights (normal, std 0.02; norms at 1), for tests and benchmarks.
    pub fn random(cfg: ModelConfig, seed: u64, device: &Device) -> Result<Llama> {
        let w = random_weights(&cfg, seed, device)?;
        Llama::from_weights(cfg, w, device)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// All weights under canonical names (for export and merging), quantised ones dequantised.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.to_dense(&self.device)?,
        )];
        for (l, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), b.input_layernorm.clone()));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.post_attention_layernorm.clone(),
            ));
        }
        for lin in self.linears() {
            out.push((format!("{}.weight", lin.name), lin.weight.to_dense(&self.device)?));
            if let Some(bias) = &lin.bias {
                out.push((format!("{}.bias", lin.name), bias.clone()));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.to_dense(&self.device)?));
        }
        Ok(out)
    }

    /// Hold every projection weight in `format` (dropping each dense copy as it goes).
    pub fn quantize_linears(&mut self, format: QFormat) -> Result<()> {
        for lin in self.linears_mut() {
            if let Weight::Dense(t) = &lin.weight {
                let (out, inp) = lin.shape();
                let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
                let q = QMatrix::quantize(format, &data, out, inp)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", lin.name)))?;
                lin.weight = Weight::Quantized(Arc::new(q));
            }
        }
        Ok(())
    }

    /// Hold every frozen matrix (embeddings, head and the projections still dense) in bf16, rows
    /// converted to f32 a tile at a time inside each product, as quantised ones are. Norms and
    /// biases stay f32. Halves the base's memory; the CPU computes in f32 either way.
    pub fn hold_in_bf16(&mut self) -> Result<()> {
        let to_bf16 = |w: &mut Weight, name: &str| -> Result<()> {
            if let Weight::Dense(t) = w {
                let (rows, cols) = t.dims2()?;
                let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
                let q = QMatrix::quantize(QFormat::Ggml(crate::kernels::quant::Format::BF16), &data, rows, cols)
                    .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
                *w = Weight::Quantized(Arc::new(q));
            }
            Ok(())
        };
        to_bf16(&mut self.embed_tokens, "model.embed_tokens.weight")?;
        if let Some(head) = &mut self.lm_head {
            to_bf16(head, "lm_head.weight")?;
        }
        // The head's bf16 products keep their packed operands (four products per update).
        if let Weight::Quantized(q) = self.lm_head.as_mut().unwrap_or(&mut self.embed_tokens) {
            if let Some(q) = Arc::get_mut(q) {
                q.keep_bf16_packs();
            }
        }
        for lin in self.linears_mut() {
            let name = format!("{}.weight", lin.name);
            to_bf16(&mut lin.weight, &name)?;
        }
        Ok(())
    }

    /// Compute the blocks with activations (hidden states, attention scores and probabilities,
    /// projection outputs, and their gradients) held in `dtype`, f32 or bf16. With bf16 every
    /// op widens its inputs to f32, computes in f32 and rounds its result to bf16, so the tensors
    /// kept for the backward take half the memory; the final hidden states return to f32 for the
    /// head, and adapter values, their gradients and optimizer state stay f32. The dense
    /// weights' products (projections and head) then take bf16 operands with f32 sums
    /// ([`crate::kernels::bf16mm`]), as PyTorch's bf16 autocast does.
    pub fn compute_in(&mut self, dtype: DType) -> Result<()> {
        match dtype {
            DType::F32 | DType::BF16 => {
                self.activations = dtype;
                Ok(())
            }
            other => Err(Error::Invalid(format!(
                "activations in {other:?}: only f32 and bf16 are supported"
            ))),
        }
    }

    /// The dtype activations are computed in ([`Llama::compute_in`]).
    pub fn activation_dtype(&self) -> DType {
        self.activations
    }

    /// The operands of the weights' products, from the activations' dtype.
    fn products(&self) -> Products {
        Products::for_activations(self.activations)
    }

    /// The storage format of the projection weights (`None`: dense f32).
    pub fn projection_format(&self) -> Option<QFormat> {
        self.linears().iter().find_map(|l| match &l.weight {
            Weight::Quantized(q) => Some(q.format()),
            Weight::Dense(_) => None,
        })
    }

    /// Whether any projection weight is held quantised.
    pub fn is_quantized(&self) -> bool {
        self.linears().iter().any(|l| matches!(l.weight, Weight::Quantized(_)))
    }

    /// Bytes held by all weights (quantised projections at their packed size).
    pub fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = self.embed_tokens.bytes() + dense(&self.norm) + self.lm_head.as_ref().map_or(0, Weight::bytes);
        for b in &self.layers {
            n += dense(&b.input_layernorm) + dense(&b.post_attention_layernorm);
        }
        for l in self.linears() {
            n += l.weight.bytes() + l.bias.as_ref().map_or(0, dense);
        }
        n
    }

    /// Every projection inside the blocks, in layer order (q, k, v, o, gate, up, down).
    pub fn linears(&self) -> Vec<&Linear> {
        self.layers
            .iter()
            .flat_map(|b| {
                let (a, m) = (&b.self_attn, &b.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
            })
            .collect()
    }

    /// A copy of this model with every delta in `adapters` added into its weights (dense).
    pub fn merged(&self, adapters: &AdapterSet) -> Result<Llama> {
        let mut m = self.clone();
        for block in &mut m.layers {
            let (a, p) = (&mut block.self_attn, &mut block.mlp);
            for lin in [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut p.gate_proj,
                &mut p.up_proj,
                &mut p.down_proj,
            ] {
                for d in adapters.get(&lin.name) {
                    let dense = lin.weight.to_dense(&self.device)?;
                    lin.weight = Weight::Dense((&dense + d.dense(lin.shape())?)?.detach());
                }
            }
        }
        Ok(m)
    }
    /// The `(out, in)` shape of every projection, by module name.
    pub fn module_shapes(&self) -> HashMap<String, (usize, usize)> {
        self.linears().iter().map(|l| (l.name.clone(), l.shape())).collect()
    }

    /// Read an adapter directory for this model ([`Adapter::load`]: refused when trained on
    /// another base or when its modules do not fit this model's).
    pub fn load_adapter(&self, dir: &Path) -> Result<Adapter> {
        Adapter::load(dir, &self.cfg, &self.module_shapes())
    }

    /// Mutable access to every projection (for full fine-tuning, which swaps in trainable weights).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|b| {
                let (a, m) = (&mut b.self_attn, &mut b.mlp);
                [
                    &mut a.q_proj,
                    &mut a.k_proj,
                    &mut a.v_proj,
                    &mut a.o_proj,
                    &mut m.gate_proj,
                    &mut m.up_proj,
                    &mut m.down_proj,
                ]
            })
            .collect()
    }

    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, hid) = h.dims3()?;
        Ok(self
            .logits(&h.reshape((b * t, hid))?)?
            .reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Logits `[N, V]` for final hidden rows `[N, H]` (the output of [`Llama::forward_hidden`],
    /// gathered at the positions that need a prediction).
    pub fn logits(&self, rows: &Tensor) -> Result<Tensor> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens).matmul_t(rows)
    }

    /// Mean cross-entropy of `targets` (u32, one per row) for final hidden rows `[N, H]`, with
    /// the head fused with the loss a chunk of rows at a time ([`crate::kernels::head`]); a trainable head
    /// (full fine-tuning) also receives its weight gradient from the same pass.
    pub fn head_loss(&self, rows: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let targets = targets.to_vec1::<u32>()?;
        match self.lm_head.as_ref().unwrap_or(&self.embed_tokens) {
            Weight::Dense(w) if w.is_variable() => {
                crate::kernels::head::trainable_head_cross_entropy(rows, w, &targets, self.products())
            }
            head => match head.frozen() {
                Some(frozen) => crate::kernels::head::head_cross_entropy(rows, &frozen, &targets, self.products()),
                None => Err(Error::Invalid(
                    "the head weight is neither frozen nor a trainable f32 tensor".into(),
                )),
            },
        }
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let _t = crate::kernels::profile::span(crate::kernels::profile::Phase::Embedding);
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = match &self.embed_tokens {
            Weight::Dense(w) => w.index_select(&flat, 0)?,
            Weight::Quantized(q) => {
                let rows = q.gather_rows(&flat.to_vec1::<u32>()?)?;
                Tensor::from_vec(rows, (b * t, self.cfg.hidden_size), &self.device)?
            }
        };
        Ok(rows.reshape((b, t, self.cfg.hidden_size))?.to_dtype(self.activations)?)
    }

    /// The final norm over the last hidden states, returned in f32 for the head.
    fn final_norm(&self, x: &Tensor, grad: Grad) -> Result<Tensor> {
        Ok(rms_norm(x, &self.norm, self.cfg.rms_norm_eps, grad)?.to_dtype(DType::F32)?)
    }

    /// Final hidden states `[B, T, H]` (after the last norm) for right-padded `ids: [B, T]` (u32),
    /// with `mask: [B, T]` (u32, 1 = real token, 0 = padding) or `None` for no padding.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        grad: Grad,
        adapters: &AdapterSet,
    ) -> Result<Tensor> {
        let (cos, sin, additive) = self.batch_tables(ids, mask)?;
        let inp = AttnInputs {
            cos: &cos,
            sin: &sin,
            mask: Some(&additive),
            grad,
            adapters,
        };
        let mut x = self.embed(ids)?;
        for block in &self.layers {
            x = block.forward(&self.cfg, &x, &inp, None)?;
        }
        self.final_norm(&x, grad)
    }

    /// Forward and backward one block at a time. The forward detaches each block's output into
    /// the next block's input (a leaf variable), so the backward runs block by block, from the
    /// head down: it back-propagates each block's output gradient through that block's graph
    /// alone and then drops the graph, freeing the block's activations as soon as they have
    /// served. With [`BlockGraphs::Recomputed`] (activation checkpointing) the forward keeps
    /// only each block's input and the backward recomputes one block at a time, so one block's
    /// activations are alive at a time instead of all of them. `loss` maps the final hidden
    /// states (after the last norm) to the scalar to differentiate, which is scaled by `scale`
    /// before the backward. `on_grads` receives each segment's gradients (blocks from last to
    /// first, the embeddings when they are trainable, then the head); they add up to those of
    /// one plain backward. Returns the loss.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_by_blocks(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        adapters: &AdapterSet,
        graphs: BlockGraphs,
        loss: impl FnOnce(&Tensor) -> Result<Tensor>,
        scale: f64,
        mut on_grads: impl FnMut(&GradStore) -> Result<()>,
    ) -> Result<f32> {
        let (cos, sin, additive) = self.batch_tables(ids, mask)?;
        let inp = AttnInputs {
            cos: &cos,
            sin: &sin,
            mask: Some(&additive),
            grad: Grad::Yes,
            adapters,
        };
        let embedded = self.embed(ids)?;
        // Block inputs as leaf variables: their gradient is what flows into the block below.
        let mut inputs = Vec::with_capacity(self.layers.len());
        // Each block's output as its two addends (with their graphs), not their sum: the sum
        // is copied into the next block's input, and the backward starts from the addends.
        let mut outputs = Vec::new();
        let mut x = Var::from_tensor(&embedded.detach())?;
        for block in &self.layers {
            let parts = block.forward_parts(&self.cfg, x.as_tensor(), &inp, None)?;
            inputs.push(x);
            x = Var::from_tensor(&crate::kernels::ops::add(&parts[0], &parts[1])?.detach())?;
            if graphs == BlockGraphs::Kept {
                outputs.push(parts);
            }
        }
        let missing = || Error::Invalid("block-wise backward: no gradient reached a block boundary".into());
        let h = self.final_norm(x.as_tensor(), Grad::Yes)?;
        let l = loss(&h)?;
        let value = l.to_scalar::<f32>()?;
        // The head's gradients are handed on last: a trainable head's weight gradient exists
        // already, but copying it out now would hold it twice beside every block's activations.
        let head_grads = (l * scale)?.backward()?;
        let mut g = head_grads.get(x.as_tensor()).ok_or_else(missing)?.clone();
        for (block, x) in self.layers.iter().zip(inputs).rev() {
            let [r, m] = match outputs.pop() {
                Some(parts) => parts,
                None => block.forward_parts(&self.cfg, x.as_tensor(), &inp, None)?,
            };
            let grads = crate::kernels::ops::backward_from(&[&r, &m], &g)?;
            g = grads.get(x.as_tensor()).ok_or_else(missing)?.clone();
            on_grads(&grads)?;
        }
        if embedded.track_op() {
            // Trainable embeddings (full fine-tuning): their rows receive the last gradient.
            on_grads(&crate::kernels::ops::backward_from(&[&embedded], &g)?)?;
        }
        on_grads(&head_grads)?;
        Ok(value)
    }

    /// Logits `[B, T, V]` for every position; see [`Llama::forward_hidden`].
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>, grad: Grad, adapters: &AdapterSet) -> Result<Tensor> {
        self.head(&self.forward_hidden(ids, mask, grad, adapters)?)
    }

    /// RoPE cos and sin tables and the additive attention mask of a batch starting at position 0.
    fn batch_tables(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Tensor, Mask)> {
        let (b, t) = ids.dims2()?;
        let (cos, sin) = rope_tables(&self.cfg, 0, t, &self.device)?;
        Ok((cos, sin, self.additive_mask(b, t, mask)?))
    }

    /// Causal + key-padding additive mask `[B, T, T]`.
    fn additive_mask(&self, b: usize, t: usize, mask: Option<&Tensor>) -> Result<Mask> {
        let keys: Vec<u32> = match mask {
            Some(m) => {
                if m.dims() != [b, t] {
                    return Err(Error::Invalid(format!(
                        "attention mask shape {:?}, expected [{b}, {t}]",
                        m.dims()
                    )));
                }
                m.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?
            }
            None => vec![1; b * t],
        };
        let mut out = vec![0f32; b * t * t];
        for bi in 0..b {
            for qi in 0..t {
                for ki in 0..t {
                    if ki > qi || keys[bi * t + ki] == 0 {
                        out[(bi * t + qi) * t + ki] = MASKED;
                    }
                }
            }
        }
        Mask::new(out, b, t, t)
    }

    /// Incremental forward for generation: `ids: [B, T]` continue the sequences in `cache`
    /// (all of the same length); returns the logits `[B, V]` of the last new position.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache, adapters: &AdapterSet) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.len();
        if offset + t > self.cfg.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "sequence of {} tokens exceeds the model's context of {}",
                offset + t,
                self.cfg.max_position_embeddings
            )));
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let (cos, sin) = rope_tables(&self.cfg, offset, t, &self.device)?;
        let mask = if t > 1 {
            let s = offset + t;
            let m: Vec<f32> = (0..b * t)
                .flat_map(|r| (0..s).map(move |ki| if ki > offset + r % t { MASKED } else { 0.0 }))
                .collect();
            Some(Mask::new(m, b, t, s)?)
        } else {
            None
        };
        let inp = AttnInputs {
            cos: &cos,
            sin: &sin,
            mask: mask.as_ref(),
            grad: Grad::No,
            adapters,
        };
        let mut x = self.embed(ids)?;
        for (block, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = block.forward(&self.cfg, &x, &inp, Some(slot))?;
        }
        let last = x.narrow(1, t - 1, 1)?.contiguous()?;
        let h = self.final_norm(&last, Grad::No)?;
        Ok(self.head(&h)?.reshape((b, self.cfg.vocab_size))?)
    }
}
