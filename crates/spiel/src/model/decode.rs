//! Batched incremental decoding, the step generation and the server share: any number of
//! sequences, each with its own cache, position and adapters, advance together through one pass
//! over the base weights.
//!
//! A step's new tokens (one per decoding sequence, a chunk of prompt per prefilling one) are laid
//! out as rows. Each projection's base product is computed once for all rows; then every adapter
//! adds its correction to the rows whose requests use it, reading its deltas once per step
//! however many rows share it (`y[rows] += s * x[rows] S^T` for a sparse delta, the LoRA pair
//! likewise). The base weights are never modified. Attention runs per sequence over its own
//! cache. Every kernel is batch-invariant ([`crate::kernels::rowwise`]) for frozen dense f32
//! bases, so a sequence's logits are bit-identical whatever it is batched with and however its
//! prompt is chunked; quantised and bf16 bases take their own products (close, not bit-equal).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::kernels::rowwise::{add_sparse_rows, attend, rms_norm_rows, rope_row, xwt, Csr};
use crate::model::adapter::{AdapterSet, Delta};
use crate::model::linear::Linear;
use crate::model::transformer::Llama;
use crate::model::weight::Weight;
use crate::{Error, Result};

/// Projections per block, in [`Llama::linears`] order: q, k, v, o, gate, up, down.
const PER_BLOCK: usize = 7;

/// One module's delta in the form the batched step applies.
#[derive(Debug, Clone)]
enum ServedDelta {
    Sparse(Csr),
    /// `y += scale * x A^T B^T` with `a: [r, in]`, `b: [out, r]`.
    Lora {
        a: Vec<f32>,
        b: Vec<f32>,
        rank: usize,
        scale: f32,
    },
}

/// An adapter prepared for [`Llama::decode_step`]: its deltas by module slot (layer * 7 +
/// projection), sparse ones by output row.
#[derive(Debug, Clone)]
pub struct ServedAdapter {
    modules: Vec<Vec<ServedDelta>>,
    bytes: usize,
}

impl ServedAdapter {
    /// Bytes its deltas hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// One sequence's cached keys and values, position-major per layer (`[len, KV * D]`).
#[derive(Debug, Clone, Default)]
pub struct SeqCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
    /// Values per position in each layer's keys (KV * D).
    width: usize,
}

impl SeqCache {
    /// An empty cache.
    pub fn new() -> SeqCache {
        SeqCache::default()
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drop the keys and values a step that failed part-way left past [`SeqCache::len`], so the
    /// sequence can be stepped again.
    pub fn discard_partial(&mut self) {
        let keep = self.len * self.width;
        for (k, v) in &mut self.layers {
            k.truncate(keep);
            v.truncate(keep);
        }
    }
}

/// One sequence's part of a step: the tokens it adds and the adapters (with scales) its rows use,
/// applied in this order.
pub struct StepInput<'a> {
    /// Its cache, extended by `tokens`.
    pub cache: &'a mut SeqCache,
    /// New tokens (at least one).
    pub tokens: &'a [u32],
    /// Adapters and their scales.
    pub adapters: &'a [(&'a ServedAdapter, f32)],
}

/// Rows that add one adapter (at one scale) in one component position.
struct Group<'a> {
    /// The component position: a row's adapters apply in its request's order.
    position: usize,
    adapter: &'a ServedAdapter,
    scale: f32,
    rows: Vec<usize>,
}

impl Llama {
    /// Prepare `adapters` for [`Llama::decode_step`]; every module they name must be one of this
    /// model's projections.
    pub fn served_adapter(&self, adapters: &AdapterSet) -> Result<ServedAdapter> {
        let linears = self.linears();
        let slots: HashMap<&str, usize> = linears.iter().enumerate().map(|(i, l)| (l.name.as_str(), i)).collect();
        let mut modules = vec![Vec::new(); linears.len()];
        let mut bytes = 0;
        for (name, deltas) in adapters.iter() {
            let slot = *slots
                .get(name)
                .ok_or_else(|| Error::Invalid(format!("adapter module `{name}` is not a projection of this model")))?;
            let shape = linears[slot].shape();
            for d in deltas {
                let served = match d {
                    Delta::Sparse(s) => {
                        let values: Vec<f32> = s.values.to_dtype(DType::F32)?.to_vec1()?;
                        ServedDelta::Sparse(Csr::from_flat(shape, &s.indices, &values))
                    }
                    Delta::Lora(l) => {
                        let rank = l.a.dims()[0];
                        ServedDelta::Lora {
                            a: l.a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                            b: l.b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                            rank,
                            scale: l.scale as f32,
                        }
                    }
                };
                bytes += match &served {
                    ServedDelta::Sparse(c) => c.bytes(),
                    ServedDelta::Lora { a, b, .. } => 4 * (a.len() + b.len()),
                };
                modules[slot].push(served);
            }
        }
        Ok(ServedAdapter { modules, bytes })
    }

    /// Advance every sequence in `seqs` by its tokens together; returns each sequence's logits
    /// `[V]` at its last new token (module docs).
    pub fn decode_step(&self, seqs: &mut [StepInput]) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (h, nh, kvh, d) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let kvd = kvh * d;
        let mut ids = Vec::new();
        // (sequence, position) of every row.
        let mut rows = Vec::new();
        for (s, seq) in seqs.iter_mut().enumerate() {
            if seq.tokens.is_empty() {
                return Err(Error::Invalid("decode step: a sequence with no new tokens".into()));
            }
            let end = seq.cache.len + seq.tokens.len();
            if end > cfg.max_position_embeddings {
                return Err(Error::Invalid(format!(
                    "sequence of {end} tokens exceeds the model's context of {}",
                    cfg.max_position_embeddings
                )));
            }
            if let Some(&bad) = seq.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::Invalid(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            if seq.cache.layers.len() != self.layers.len() {
                seq.cache.layers = vec![(Vec::new(), Vec::new()); self.layers.len()];
                seq.cache.width = kvd;
            }
            ids.extend_from_slice(seq.tokens);
            rows.extend((0..seq.tokens.len()).map(|i| (s, seq.cache.len + i)));
        }
        let n = rows.len();
        let groups = adapter_groups(seqs, &rows);
        let mut x = self.embed_rows(&ids)?;
        let eps = cfg.rms_norm_eps as f32;
        let scale = 1.0 / (d as f32).sqrt();
        let tables: Vec<(Vec<f32>, Vec<f32>)> = rows.iter().map(|&(_, p)| rope_at(cfg.rope_theta, d, p)).collect();
        for (l, block) in self.layers.iter().enumerate() {
            let slot = |p: usize| l * PER_BLOCK + p;
            let hn = rms_norm_rows(&x, h, &vec_f32(&block.input_layernorm)?, eps);
            let a = &block.self_attn;
            let mut q = project(&a.q_proj, slot(0), &hn, n, &groups)?;
            let mut k = project(&a.k_proj, slot(1), &hn, n, &groups)?;
            let v = project(&a.v_proj, slot(2), &hn, n, &groups)?;
            for (r, (cos, sin)) in tables.iter().enumerate() {
                rope_row(&mut q[r * nh * d..(r + 1) * nh * d], d, cos, sin);
                rope_row(&mut k[r * kvd..(r + 1) * kvd], d, cos, sin);
                let cache = &mut seqs[rows[r].0].cache.layers[l];
                cache.0.extend_from_slice(&k[r * kvd..(r + 1) * kvd]);
                cache.1.extend_from_slice(&v[r * kvd..(r + 1) * kvd]);
            }
            let mut ctx = vec![0f32; n * nh * d];
            let caches: Vec<&(Vec<f32>, Vec<f32>)> = seqs.iter().map(|s| &s.cache.layers[l]).collect();
            ctx.par_chunks_mut(nh * d).enumerate().for_each(|(r, out)| {
                let (s, pos) = rows[r];
                let (kc, vc) = caches[s];
                for (head, o) in out.chunks_exact_mut(d).enumerate() {
                    let g = head / (nh / kvh);
                    let qh = &q[(r * nh + head) * d..(r * nh + head + 1) * d];
                    attend(qh, &kc[g * d..], &vc[g * d..], kvd, pos + 1, scale, o);
                }
            });
            add_into(&mut x, &project(&a.o_proj, slot(3), &ctx, n, &groups)?);
            let hn = rms_norm_rows(&x, h, &vec_f32(&block.post_attention_layernorm)?, eps);
            let m = &block.mlp;
            let gate = project(&m.gate_proj, slot(4), &hn, n, &groups)?;
            let up = project(&m.up_proj, slot(5), &hn, n, &groups)?;
            let act: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            add_into(&mut x, &project(&m.down_proj, slot(6), &act, n, &groups)?);
        }
        for seq in seqs.iter_mut() {
            seq.cache.len += seq.tokens.len();
        }
        // Each sequence's last row through the final norm and the head.
        let mut last = Vec::with_capacity(seqs.len() * h);
        let mut end = 0;
        for seq in seqs.iter() {
            end += seq.tokens.len();
            last.extend_from_slice(&x[(end - 1) * h..end * h]);
        }
        let last = rms_norm_rows(&last, h, &vec_f32(&self.norm)?, eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let logits = base_product(head, &last, seqs.len(), h)?;
        Ok(logits.chunks_exact(cfg.vocab_size).map(|c| c.to_vec()).collect())
    }

    /// The embedding rows of `ids`, `[N, H]` f32.
    fn embed_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        match &self.embed_tokens {
            Weight::Dense(w) => {
                let idx = Tensor::new(ids, w.device())?;
                Ok(w.index_select(&idx, 0)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?)
            }
            Weight::Quantized(q) => q.gather_rows(ids),
        }
    }
}

/// The rows of each (adapter, scale) per component position: position 0 first, so every row adds
/// its adapters in its request's order.
fn adapter_groups<'a>(seqs: &[StepInput<'a>], rows: &[(usize, usize)]) -> Vec<Group<'a>> {
    let mut groups: Vec<Group<'a>> = Vec::new();
    let most = seqs.iter().map(|s| s.adapters.len()).max().unwrap_or(0);
    for p in 0..most {
        let first = groups.len();
        for (r, &(s, _)) in rows.iter().enumerate() {
            let Some(&(adapter, scale)) = seqs[s].adapters.get(p) else {
                continue;
            };
            let same = |g: &Group| std::ptr::eq(g.adapter, adapter) && g.scale.to_bits() == scale.to_bits();
            match groups[first..].iter_mut().find(|g| same(g)) {
                Some(g) => g.rows.push(r),
                None => groups.push(Group {
                    position: p,
                    adapter,
                    scale,
                    rows: vec![r],
                }),
            }
        }
    }
    groups
}

/// `x W^T (+ b)` for the rows `x: [n, in]`, then each group's deltas for this module on its rows.
fn project(lin: &Linear, slot: usize, x: &[f32], n: usize, groups: &[Group]) -> Result<Vec<f32>> {
    let (out, inp) = lin.shape();
    let mut y = base_product(&lin.weight, x, n, inp)?;
    if let Some(b) = &lin.bias {
        let b = vec_f32(b)?;
        for row in y.chunks_exact_mut(out) {
            add_into(row, &b);
        }
    }
    // Component position by position; within one, the groups' rows are disjoint, so every
    // sparse delta of the position (the k-th of each adapter's deltas on this module together)
    // runs in one parallel pass.
    let mut start = 0;
    while start < groups.len() {
        let end = start
            + groups[start..]
                .iter()
                .take_while(|g| g.position == groups[start].position)
                .count();
        let here = &groups[start..end];
        let most = here.iter().map(|g| g.adapter.modules[slot].len()).max().unwrap_or(0);
        for k in 0..most {
            let mut sparse = Vec::new();
            for g in here {
                match g.adapter.modules[slot].get(k) {
                    Some(ServedDelta::Sparse(csr)) => sparse.push((csr, g.rows.as_slice(), g.scale)),
                    Some(ServedDelta::Lora { a, b, rank, scale }) => {
                        lora_rows(x, &mut y, &g.rows, (inp, out), (a, b, *rank), scale * g.scale)
                    }
                    None => {}
                }
            }
            add_sparse_rows(&sparse, x, &mut y);
        }
        start = end;
    }
    Ok(y)
}

/// `y[rows] += s * x[rows] A^T B^T` for `a: [r, in]`, `b: [out, r]`.
fn lora_rows(
    x: &[f32],
    y: &mut [f32],
    rows: &[usize],
    (inp, out): (usize, usize),
    (a, b, rank): (&[f32], &[f32], usize),
    s: f32,
) {
    let xs: Vec<f32> = rows
        .iter()
        .flat_map(|&r| x[r * inp..(r + 1) * inp].iter().copied())
        .collect();
    let ng = rows.len();
    let mut t = vec![0f32; ng * rank];
    xwt(&xs, ng, inp, a, rank, &mut t);
    let mut u = vec![0f32; ng * out];
    xwt(&t, ng, rank, b, out, &mut u);
    for (i, &r) in rows.iter().enumerate() {
        for (yv, uv) in y[r * out..(r + 1) * out].iter_mut().zip(&u[i * out..(i + 1) * out]) {
            *yv += s * uv;
        }
    }
}

/// `x W^T` for a base weight: the batch-invariant kernel over a dense f32 one, the weight's own
/// product otherwise.
fn base_product(w: &Weight, x: &[f32], n: usize, inp: usize) -> Result<Vec<f32>> {
    let (out, _) = w.shape();
    if let Some(t) = w.dense_f32_frozen() {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), true) = (&*storage, layout.is_contiguous()) {
            let ws = crate::kernels::common::cpu_slice(cpu, layout, "projection weight")?;
            let mut y = vec![0f32; n * out];
            xwt(x, n, inp, ws, out, &mut y);
            return Ok(y);
        }
    }
    let xt = Tensor::from_slice(x, (n, inp), &candle_core::Device::Cpu)?;
    Ok(w.matmul_t(&xt)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

fn vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

fn add_into(y: &mut [f32], x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

/// RoPE cos and sin `[D/2]` at position `p`, as [`Llama`]'s tables compute them.
fn rope_at(theta: f64, d: usize, p: usize) -> (Vec<f32>, Vec<f32>) {
    (0..d / 2)
        .map(|i| {
            let inv_freq = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
            let angle = p as f64 * inv_freq;
            (angle.cos() as f32, angle.sin() as f32)
        })
        .unzip()
}
