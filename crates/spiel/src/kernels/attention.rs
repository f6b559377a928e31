//! Masked attention as one differentiable op, for training and inference alike:
//! `O = softmax(scale Q K^T + mask) V`, per batch row and KV head, with grouped-query heads
//! folded into the rows of `Q` (`[B, KV, R*T, D]`, row `j*T + p` = query head `j` of the group at
//! position `p`).
//!
//! Written as candle ops, attention kept the scaled `Q`, the scores and the probabilities
//! (`[heads, T, S]` each: 2 x 9 x 256 floats per token per layer on the default model, more than
//! all its other activations together) and ran through a dozen graph nodes. This op keeps only
//! its inputs and output; the backward recomputes the probabilities from `Q` and `K` (one more
//! `Q K^T`, 4% of a step's FLOPs) and forms, per group:
//!
//! - `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`;
//! - `dQ = scale dS K`, `dK = scale dS^T Q`, `dV = P^T dO`.
//!
//! Groups are independent and run in parallel, each product on one thread. At inference the keys
//! and values are read in place from the decoding cache's buffers (no copy per token). Training
//! and whole-sequence forwards enter through [`attention_from_projections`], which takes q, k and
//! v as the projections leave them and applies RoPE itself.
//!
//! With bf16 activations, blocks of 16 query rows or more take bf16 operands with f32 sums
//! (`bf16mm`) for `Q K^T`, `P V`, `dO V^T` and `dS K`, as PyTorch's autocast does; each group
//! packs its keys and values once for all its blocks. `dV` and `dK` stay f32: their left
//! operand is a transpose, whose packing cost more than the tiles saved at these sizes.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::bf16mm::{Packed, Products, View};
use crate::kernels::common::{cpu_f32, grad_like, storage_like, widen, with_f32s};
use crate::kernels::gemm::gemm_into;
use crate::kernels::profile::{span, Phase};

/// The right operand of attention's products: an f32 matrix `[rows, cols]` seen through
/// (row, column) strides, and for bf16 products the same matrix packed once on first use, so
/// that every block of a head shares one packing of its keys and values.
struct Operand<'a> {
    data: &'a [f32],
    view: View<'a>,
    packed: OnceCell<Packed>,
}

impl<'a> Operand<'a> {
    /// `data` as a row-major `[rows, cols]` matrix.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Operand<'a> {
        Operand {
            data,
            view: View::rows(data, rows, cols),
            packed: OnceCell::new(),
        }
    }

    /// The transpose of a row-major `[cols, rows]` matrix in `data`, as `[rows, cols]`.
    fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Operand<'a> {
        Operand {
            data,
            view: View::transposed(data, rows, cols),
            packed: OnceCell::new(),
        }
    }
}

/// `dst (+)= beta lhs rhs[..k, ..n]` for `lhs: [m, k]` given by (row, column) strides and the
/// leading `k` rows and `n` columns of `rhs`, on this thread (the heads already run in
/// parallel): with bf16 operands and f32 sums where `bf16` (bf16 activations, as PyTorch's
/// autocast computes attention), else in f32.
#[allow(clippy::too_many_arguments)]
fn product(
    bf16: bool,
    dst: &mut [f32],
    accumulate: bool,
    beta: f32,
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (rs, cs): (usize, usize),
    rhs: &Operand,
) {
    if bf16 {
        let a = View {
            data: lhs.into(),
            rows: m,
            cols: k,
            rs,
            cs,
        };
        let packed = rhs.packed.get_or_init(|| Packed::new(rhs.view));
        crate::kernels::bf16mm::gemm_packed(dst, accumulate, beta, a, packed, n);
    } else {
        let b = rhs.view;
        gemm_into(
            false,
            dst,
            accumulate,
            beta,
            (m, n, k),
            lhs,
            (rs, cs),
            rhs.data,
            (b.rs, b.cs),
        );
    }
}

/// An additive attention mask `[B, T, S]` (0 where query `t` may see key `s`, a large negative
/// value where not), built once per batch and shared by every layer.
#[derive(Debug, Clone)]
pub struct Mask {
    values: Arc<Vec<f32>>,
    /// Per `(b, t)` row: one past the last key it may see (`s` for a row that sees none, whose
    /// probabilities are then uniform over every key).
    extents: Arc<Vec<usize>>,
    b: usize,
    t: usize,
    s: usize,
}

/// Mask values at or below this hide a key: `exp` of anything this far below a row's maximum is
/// exactly 0 in f32, so such keys may be skipped altogether.
const HIDDEN: f32 = -1e20;

/// Query positions per block: each block's products stop at the last key any of its queries may
/// see (5/8 of the square's products under a causal mask of 256 positions).
const BLOCK: usize = 64;

impl Mask {
    /// A mask from its `b * t * s` values, row-major.
    pub fn new(values: Vec<f32>, b: usize, t: usize, s: usize) -> crate::Result<Mask> {
        if values.len() != b * t * s {
            return Err(crate::Error::Invalid(format!(
                "attention mask of {} values for [{b}, {t}, {s}]",
                values.len()
            )));
        }
        let extents = values
            .chunks(s.max(1))
            .take(b * t)
            .map(|row| row.iter().rposition(|&m| m > HIDDEN).map_or(s, |j| j + 1))
            .collect();
        Ok(Mask {
            values: Arc::new(values),
            extents: Arc::new(extents),
            b,
            t,
            s,
        })
    }
}

/// `softmax(scale q k^T + mask) v` for `q: [B, KV, R*T, D]`, `k`, `v: [B, KV, S, D]` and an
/// additive `mask: [B, T, S]` (not differentiated; `None`: every query sees every key); returns
/// `[B, KV, R*T, D]`, f32 or bf16. Differentiable in `q`, `k` and `v`. `k` and `v` may also be
/// the first `S` positions of a longer `[B, KV, capacity, D]` buffer (the decoding cache), read
/// in place.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Mask>, scale: f64) -> crate::Result<Tensor> {
    let op = Attention {
        mask: mask.cloned(),
        b: q.dims4()?.0,
        scale: scale as f32,
    };
    Ok(q.contiguous()?.apply_op3(&rows_view(k)?, &rows_view(v)?, op)?)
}

/// `t` itself when its rows can be read in place (contiguous, or a prefix of a longer buffer
/// along the positions), else a contiguous copy.
fn rows_view(t: &Tensor) -> crate::Result<Tensor> {
    Ok(match key_group_stride(t.layout())? {
        Some(_) => t.clone(),
        None => t.contiguous()?,
    })
}

/// The distance between consecutive `[S, D]` groups of a `[B, KV, S, D]` layout whose groups
/// are each contiguous and evenly spaced, or `None` for any other layout.
fn key_group_stride(l: &Layout) -> candle_core::Result<Option<usize>> {
    let (_, kv, n, d) = l.shape().dims4()?;
    let st = l.stride();
    if l.is_contiguous() {
        return Ok(Some(n * d));
    }
    let rows_ok = (st[3] == 1 || d == 1) && (st[2] == d || n == 1);
    Ok((rows_ok && st[1] >= n * d && (st[0] == kv * st[1])).then_some(st[1]))
}

/// Every group's keys (or values) read in place, and the distance between groups.
fn key_groups<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<(Cow<'a, [f32]>, usize)> {
    let (b, kv, n, d) = l.shape().dims4()?;
    let Some(stride) = key_group_stride(l)? else {
        candle_core::bail!("{what}: [B, KV, S, D] rows expected in place")
    };
    if l.is_contiguous() {
        return Ok((cpu_f32(s, l, what)?, stride));
    }
    let (a, end) = (l.start_offset(), l.start_offset() + (b * kv - 1) * stride + n * d);
    Ok(match s {
        CpuStorage::F32(v) => (Cow::Borrowed(&v[a..end]), stride),
        CpuStorage::BF16(v) => (Cow::Owned(widen(&v[a..end])), stride),
        _ => candle_core::bail!("{what}: f32 or bf16 only"),
    })
}

struct Attention {
    /// `None`: every query sees every key.
    mask: Option<Mask>,
    /// Batch rows.
    b: usize,
    scale: f32,
}

/// One group's sizes: `rows` = R*T query rows, `s` keys, `d` head size.
#[derive(Clone, Copy)]
struct Group {
    rows: usize,
    s: usize,
    d: usize,
}

impl Attention {
    /// `(groups, group sizes)` after checking the shapes.
    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<(usize, Group)> {
        let (b, kv, rows, d) = q.dims4()?;
        let (kb, kkv, s, kd) = k.dims4()?;
        let mask_fits = self
            .mask
            .as_ref()
            .is_none_or(|m| (m.b, m.s) == (b, s) && rows % m.t == 0);
        if (kb, kkv, kd) != (b, kv, d) || k != v || b != self.b || !mask_fits {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} against a mask of {:?}",
                q.dims(),
                k.dims(),
                v.dims(),
                self.mask.as_ref().map(|m| [m.b, m.t, m.s])
            );
        }
        Ok((b * kv, Group { rows, s, d }))
    }

    /// The blocks of one group: `(first row, rows, keys)` for every head of the group and every
    /// block of up to [`BLOCK`] query positions, `keys` the most any of its queries may see.
    fn blocks(&self, gi: usize, kv: usize, g: Group) -> Vec<(usize, usize, usize)> {
        let t = self.mask.as_ref().map_or(g.rows, |m| m.t);
        let bi = gi / kv;
        let mut out = Vec::new();
        for head in 0..g.rows / t {
            for p0 in (0..t).step_by(BLOCK) {
                let p1 = (p0 + BLOCK).min(t);
                let keys = match &self.mask {
                    Some(m) => m.extents[bi * m.t + p0..bi * m.t + p1]
                        .iter()
                        .copied()
                        .max()
                        .unwrap_or(g.s),
                    None => g.s,
                };
                out.push((head * t + p0, p1 - p0, keys));
            }
        }
        out
    }

    /// `P = softmax(scale q k^T + mask)` for `n` query rows from `r0` of group `gi` over its
    /// first `e` keys, into `p: [n, e]`, with `q` the block's rows, `kt` the group's keys
    /// transposed (`[D, S]`) and `scores` scratch of at least `n * e` values; `bf16`: the
    /// scores' product takes bf16 operands. Past a row's extent (its last visible key) every
    /// key is hidden, so the softmax runs over the extent only and the rest of the row is 0,
    /// which is what `exp` of a hidden score gives.
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        bf16: bool,
        gi: usize,
        kv: usize,
        g: Group,
        (r0, n, e): (usize, usize, usize),
        q: &[f32],
        kt: &Operand,
        (scores, p): (&mut [f32], &mut [f32]),
    ) {
        let (scores, p) = (&mut scores[..n * e], &mut p[..n * e]);
        product(bf16, scores, false, self.scale, (n, e, g.d), q, (g.d, 1), kt);
        let bi = gi / kv;
        for (i, (pr, sr)) in p.chunks_mut(e).zip(scores.chunks(e)).enumerate() {
            match &self.mask {
                Some(m) => {
                    let row = bi * m.t + (r0 + i) % m.t;
                    let seen = m.extents[row].min(e);
                    let mr = &m.values[row * m.s..row * m.s + seen];
                    crate::kernels::ops::softmax_row(&mut pr[..seen], &sr[..seen], |j| mr[j]);
                    pr[seen..].fill(0.0);
                }
                None => crate::kernels::ops::softmax_row(pr, sr, |_| 0.0),
            }
        }
    }

    /// The output `[groups, rows, d]` of every group, for `q: [groups, rows, d]` and keys and
    /// values of `s` rows each, group `i`'s starting at `i` times the given stride.
    fn forward_groups(
        &self,
        g: Group,
        groups: usize,
        products: Products,
        q: &[f32],
        (k, ks): (&[f32], usize),
        (v, vs): (&[f32], usize),
    ) -> Vec<f32> {
        let kv = groups / self.b;
        let (qn, kn, d) = (g.rows * g.d, g.s * g.d, g.d);
        let mut out = vec![0f32; groups * qn];
        out.par_chunks_mut(qn).enumerate().for_each(|(gi, o)| {
            let (qg, kg, vg) = (
                &q[gi * qn..(gi + 1) * qn],
                &k[gi * ks..gi * ks + kn],
                &v[gi * vs..gi * vs + kn],
            );
            let (kt, vm) = (Operand::transposed(kg, d, g.s), Operand::rows(vg, g.s, d));
            // One block's scores and probabilities, reused by every block of the group.
            let (mut scores, mut p) = (vec![0f32; BLOCK * g.s], vec![0f32; BLOCK * g.s]);
            for (r0, n, e) in self.blocks(gi, kv, g) {
                let bf16 = products.bf16_for(n);
                let bufs = (&mut scores[..], &mut p[..]);
                self.probs(bf16, gi, kv, g, (r0, n, e), &qg[r0 * d..], &kt, bufs);
                let p = &p[..n * e];
                product(
                    bf16,
                    &mut o[r0 * d..(r0 + n) * d],
                    false,
                    1.0,
                    (n, d, e),
                    p,
                    (e, 1),
                    &vm,
                );
            }
        });
        out
    }

    /// The gradients `(dq, dk, dv)` of every group for its `[q, k, v, o, do]`, all laid out as
    /// in [`Attention::forward_groups`] with contiguous groups.
    fn backward_groups(
        &self,
        g: Group,
        groups: usize,
        products: Products,
        [qs, ks, vs, os, gs]: [&[f32]; 5],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let kv = groups / self.b;
        let (qn, kn, d) = (g.rows * g.d, g.s * g.d, g.d);
        let (mut dq, mut dk, mut dv) = (vec![0f32; qs.len()], vec![0f32; ks.len()], vec![0f32; vs.len()]);
        dq.par_chunks_mut(qn)
            .zip(dk.par_chunks_mut(kn).zip(dv.par_chunks_mut(kn)))
            .enumerate()
            .for_each(|(gi, (dqg, (dkg, dvg)))| {
                let (qg, kg, vg) = (
                    &qs[gi * qn..(gi + 1) * qn],
                    &ks[gi * kn..(gi + 1) * kn],
                    &vs[gi * kn..(gi + 1) * kn],
                );
                let (og, dog) = (&os[gi * qn..(gi + 1) * qn], &gs[gi * qn..(gi + 1) * qn]);
                let (kt, km) = (Operand::transposed(kg, d, g.s), Operand::rows(kg, g.s, d));
                let vt = Operand::transposed(vg, d, g.s);
                // One block's scores, probabilities and score gradients, reused by every block.
                let mut bufs = [(); 3].map(|_| vec![0f32; BLOCK * g.s]);
                let [scores, p, ds] = &mut bufs;
                for (r0, n, e) in self.blocks(gi, kv, g) {
                    let rows = r0 * d..(r0 + n) * d;
                    let (qb, ob, dob) = (&qg[rows.clone()], &og[rows.clone()], &dog[rows.clone()]);
                    let bf16 = products.bf16_for(n);
                    self.probs(bf16, gi, kv, g, (r0, n, e), qb, &kt, (&mut scores[..], &mut p[..]));
                    let (p, ds) = (&p[..n * e], &mut ds[..n * e]);
                    // dV += P^T dO (f32, as dK below: see the module notes).
                    gemm_into(false, &mut dvg[..e * d], true, 1.0, (e, d, n), p, (1, e), dob, (d, 1));
                    // dP = dO V^T, then dS = P (dP - rowsum(dO O)) in place.
                    product(bf16, ds, false, 1.0, (n, e, d), dob, (d, 1), &vt);
                    for i in 0..n {
                        let dot: f32 = (0..d).map(|c| dob[i * d + c] * ob[i * d + c]).sum();
                        for (x, pv) in ds[i * e..(i + 1) * e].iter_mut().zip(&p[i * e..(i + 1) * e]) {
                            *x = pv * (*x - dot);
                        }
                    }
                    // dQ = scale dS K; dK += scale dS^T Q.
                    product(bf16, &mut dqg[rows], false, self.scale, (n, d, e), ds, (e, 1), &km);
                    gemm_into(
                        false,
                        &mut dkg[..e * d],
                        true,
                        self.scale,
                        (e, d, n),
                        ds,
                        (1, e),
                        qb,
                        (d, 1),
                    );
                }
            });
        (dq, dk, dv)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "masked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::Attention);
        let (groups, g) = self.dims(l1.shape(), l2.shape(), l3.shape())?;
        let q = cpu_f32(s1, l1, "attention q")?;
        let ((k, ks), (v, vs)) = (key_groups(s2, l2, "attention k")?, key_groups(s3, l3, "attention v")?);
        let out = self.forward_groups(g, groups, Products::for_storage(s1), &q, (&k, ks), (&v, vs));
        Ok((storage_like(out, s1), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = span(Phase::Attention);
        let (groups, g) = self.dims(q.shape(), k.shape(), v.shape())?;
        let products = Products::for_activations(q.dtype());
        let (dq, dk, dv) = with_f32s(&[q, k, v, res, grad], |t| {
            self.backward_groups(g, groups, products, [t[0], t[1], t[2], t[3], t[4]])
        })?;
        Ok((
            Some(grad_like(dq, q)?),
            Some(grad_like(dk, k)?),
            Some(grad_like(dv, v)?),
        ))
    }
}

/// Attention straight from the projections, for a forward without a decoding cache: `q: [B, T,
/// NH*D]` and `k`, `v: [B, T, KV*D]` as the projections leave them, RoPE (`cos`, `sin: [T, D/2]`,
/// positions from 0) applied to `q` and `k` inside the op, and the output `[B, T, NH*D]` as
/// `o_proj` takes it.
///
/// Around [`attention`] as candle ops, the head-major copies of q, k and v, the rotated q and k
/// and the re-laid-out output would all stay alive for the backward: 2,304 floats per token and
/// layer on the default model (283 MB in f32 for a batch of 4 x 256), beside the 1,536 that
/// this op keeps (its inputs and output). Here they are transient: the backward recomputes them
/// from the projections' outputs, at the cost of one pass over each.
pub fn attention_from_projections(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    mask: Option<&Mask>,
    scale: f64,
) -> crate::Result<Tensor> {
    let op = ProjectedAttention {
        inner: Attention {
            mask: mask.cloned(),
            b: q.dims3()?.0,
            scale: scale as f32,
        },
        cos: crate::kernels::common::vec_of(cos)?,
        sin: crate::kernels::common::vec_of(sin)?,
        heads,
        kv_heads,
    };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// The op of [`attention_from_projections`]: [`Attention`]'s groups, gathered from and
/// scattered back to the projections' layout.
struct ProjectedAttention {
    inner: Attention,
    cos: Vec<f32>,
    sin: Vec<f32>,
    heads: usize,
    kv_heads: usize,
}

/// Batch, positions and head size of a [`ProjectedAttention`] call.
#[derive(Clone, Copy)]
struct Extent {
    b: usize,
    t: usize,
    d: usize,
}

impl ProjectedAttention {
    fn extent(&self, q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<Extent> {
        let (b, t, qw) = q.dims3()?;
        let (nh, kvh) = (self.heads, self.kv_heads);
        let d = qw / nh.max(1);
        let fits = nh > 0
            && kvh > 0
            && nh % kvh == 0
            && qw == nh * d
            && d % 2 == 0
            && k == v
            && k.dims3()? == (b, t, kvh * d)
            && b == self.inner.b
            && self.cos.len() == t * d / 2
            && self.sin.len() == self.cos.len()
            && self.inner.mask.as_ref().is_none_or(|m| (m.b, m.t, m.s) == (b, t, t));
        if !fits {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} for {nh} heads over {kvh} KV heads, RoPE tables of {}, a mask of {:?}",
                q.dims(),
                k.dims(),
                v.dims(),
                self.cos.len(),
                self.inner.mask.as_ref().map(|m| [m.b, m.t, m.s])
            );
        }
        Ok(Extent { b, t, d })
    }

    /// The groups of [`Attention`] for this call: one per batch row and KV head.
    fn group(&self, e: Extent) -> (usize, Group) {
        let rows = self.heads / self.kv_heads * e.t;
        (e.b * self.kv_heads, Group { rows, s: e.t, d: e.d })
    }

    /// `x: [B, T, H*D]` as `[B, H, T, D]`, each row rotated by its position's RoPE where `rotate`.
    fn rows_to_heads(&self, x: &[f32], e: Extent, h: usize, rotate: bool) -> Vec<f32> {
        let (t, d) = (e.t, e.d);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
            let (bi, hi) = (bh / h, bh % h);
            for (p, dst) in o.chunks_mut(d).enumerate() {
                let src = &x[(bi * t + p) * h * d + hi * d..][..d];
                match rotate {
                    true => self.rotate(src, dst, p, 1.0),
                    false => dst.copy_from_slice(src),
                }
            }
        });
        out
    }

    /// The inverse of [`ProjectedAttention::rows_to_heads`]: `[B, H, T, D]` back to `[B, T, H*D]`,
    /// rotated backwards where `rotate` (the transpose of the rotation, for gradients).
    fn heads_to_rows(&self, x: &[f32], e: Extent, h: usize, rotate: bool) -> Vec<f32> {
        let (t, d) = (e.t, e.d);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h * d).enumerate().for_each(|(bt, o)| {
            let (bi, p) = (bt / t, bt % t);
            for (hi, dst) in o.chunks_mut(d).enumerate() {
                let src = &x[((bi * h + hi) * t + p) * d..][..d];
                match rotate {
                    true => self.rotate(src, dst, p, -1.0),
                    false => dst.copy_from_slice(src),
                }
            }
        });
        out
    }

    /// Rotate-half RoPE of one head's row at position `p` (`sign` -1: the inverse rotation).
    fn rotate(&self, x: &[f32], y: &mut [f32], p: usize, sign: f32) {
        let half = x.len() / 2;
        let (c, s) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
        let (xa, xb) = x.split_at(half);
        let (ya, yb) = y.split_at_mut(half);
        for j in 0..half {
            let sn = sign * s[j];
            ya[j] = xa[j] * c[j] - xb[j] * sn;
            yb[j] = xb[j] * c[j] + xa[j] * sn;
        }
    }
}

impl CustomOp3 for ProjectedAttention {
    fn name(&self) -> &'static str {
        "masked-attention-from-projections"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::Attention);
        let e = self.extent(l1.shape(), l2.shape(), l3.shape())?;
        let (nh, kvh) = (self.heads, self.kv_heads);
        let (q, k, v) = (
            cpu_f32(s1, l1, "attention q")?,
            cpu_f32(s2, l2, "attention k")?,
            cpu_f32(s3, l3, "attention v")?,
        );
        let (qh, kh, vh) = (
            self.rows_to_heads(&q, e, nh, true),
            self.rows_to_heads(&k, e, kvh, true),
            self.rows_to_heads(&v, e, kvh, false),
        );
        let (groups, g) = self.group(e);
        let kn = e.t * e.d;
        let out = self
            .inner
            .forward_groups(g, groups, Products::for_storage(s1), &qh, (&kh, kn), (&vh, kn));
        Ok((
            storage_like(self.heads_to_rows(&out, e, nh, false), s1),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = span(Phase::Attention);
        let e = self.extent(q.shape(), k.shape(), v.shape())?;
        let (nh, kvh) = (self.heads, self.kv_heads);
        let (groups, g) = self.group(e);
        let products = Products::for_activations(q.dtype());
        let (dq, dk, dv) = with_f32s(&[q, k, v, res, grad], |t| {
            let heads = [
                self.rows_to_heads(t[0], e, nh, true),
                self.rows_to_heads(t[1], e, kvh, true),
                self.rows_to_heads(t[2], e, kvh, false),
                self.rows_to_heads(t[3], e, nh, false),
                self.rows_to_heads(t[4], e, nh, false),
            ];
            let [qh, kh, vh, oh, gh] = heads.each_ref().map(|x| x.as_slice());
            let (dq, dk, dv) = self.inner.backward_groups(g, groups, products, [qh, kh, vh, oh, gh]);
            (
                self.heads_to_rows(&dq, e, nh, true),
                self.heads_to_rows(&dk, e, kvh, true),
                self.heads_to_rows(&dv, e, kvh, false),
            )
        })?;
        Ok((
            Some(grad_like(dq, q)?),
            Some(grad_like(dk, k)?),
            Some(grad_like(dv, v)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};
    use rand::{Rng, SeedableRng};

    use crate::kernels::testing::rel_err_tensors as rel;

    fn randn(shape: &[usize], rng: &mut impl Rng) -> Tensor {
        crate::kernels::testing::uniform_tensor(shape, 1.5, rng)
    }

    /// The op over the projections' layout computes what the model's former composition did:
    /// head-major copies, candle-free RoPE on q and k, [`attention`], and the output laid back
    /// out; forward and all three gradients, f32 and bf16, with GQA and padding.
    #[test]
    fn attention_from_projections_matches_the_composition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        for (b, kvh, rep, t, d) in [
            (1, 1, 1, 1, 2),
            (2, 3, 3, 5, 8),
            (2, 1, 2, BLOCK + 7, 16),
            (1, 3, 3, 70, 64),
        ] {
            let nh = kvh * rep;
            let mask_values: Vec<f32> = (0..b * t * t)
                .map(|i| {
                    let (bi, p, j) = (i / (t * t), (i / t) % t, i % t);
                    // Causal, and the last key of the second row is padding.
                    if j > p || (bi == 1 && j == t - 1 && t > 1) {
                        -1e30
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Mask::new(mask_values, b, t, t).unwrap();
            let angles: Vec<f32> = (0..t * d / 2).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
            let cos = Tensor::from_vec(angles.iter().map(|a| a.cos()).collect(), (t, d / 2), &Device::Cpu).unwrap();
            let sin = Tensor::from_vec(angles.iter().map(|a| a.sin()).collect(), (t, d / 2), &Device::Cpu).unwrap();
            let (q, k, v) = (
                randn(&[b, t, nh * d], &mut rng),
                randn(&[b, t, kvh * d], &mut rng),
                randn(&[b, t, kvh * d], &mut rng),
            );
            let probe = randn(&[b, t, nh * d], &mut rng);
            let scale = 1.0 / (d as f64).sqrt();
            for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
                let vars: Vec<Var> = [&q, &k, &v]
                    .iter()
                    .map(|x| Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap())
                    .collect();
                let (qv, kv_, vv) = (vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor());
                let composed = {
                    let q = qv.reshape((b, t, nh, d)).unwrap().transpose(1, 2).unwrap();
                    let k = kv_.reshape((b, t, kvh, d)).unwrap().transpose(1, 2).unwrap();
                    let v = vv
                        .reshape((b, t, kvh, d))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .contiguous()
                        .unwrap();
                    let q = crate::kernels::ops::rope(&q, &cos, &sin).unwrap();
                    let k = crate::kernels::ops::rope(&k, &cos, &sin).unwrap();
                    let q = q.reshape((b, kvh, rep * t, d)).unwrap();
                    let o = attention(&q, &k, &v, Some(&mask), scale).unwrap();
                    o.reshape((b, nh, t, d))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .reshape((b, t, nh * d))
                        .unwrap()
                };
                let fused =
                    attention_from_projections(qv, kv_, vv, (&cos, &sin), (nh, kvh), Some(&mask), scale).unwrap();
                assert_eq!(fused.dtype(), dt);
                let what = format!("{dt:?} b{b} kv{kvh} rep{rep} t{t} d{d}");
                let f32_of = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
                let err = rel(&f32_of(&fused), &f32_of(&composed));
                assert!(err < tol, "forward {what}: {err}");
                let probe = probe.to_dtype(dt).unwrap();
                let gw = (&composed * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                for (var, name) in vars.iter().zip(["q", "k", "v"]) {
                    let (x, y) = (gf.get(var.as_tensor()).unwrap(), gw.get(var.as_tensor()).unwrap());
                    let err = rel(&f32_of(x), &f32_of(y));
                    assert!(err < tol, "grad {name} {what}: {err}");
                }
            }
        }
    }

    #[test]
    fn fused_attention_matches_candle_composition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        // (batch, kv heads, heads per group, queries, keys, head size): one row, GQA groups,
        // more keys than queries, odd sizes.
        for (b, kv, rep, t, s, d) in [
            (1, 1, 1, 1, 1, 2),
            (2, 3, 3, 5, 5, 8),
            (1, 2, 4, 7, 9, 16),
            (3, 1, 2, 17, 17, 64),
            // Several blocks of query positions, each stopping at its last visible key.
            (2, 1, 2, 2 * BLOCK + 3, 2 * BLOCK + 6, 8),
        ] {
            let mask_values: Vec<f32> = (0..b * t * s)
                .map(|i| {
                    let (p, j) = ((i / s) % t, i % s);
                    if j > p + (s - t) || (j > 0 && rng.gen_bool(0.2)) {
                        -1e30
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Mask::new(mask_values.clone(), b, t, s).unwrap();
            let mask_tensor = Tensor::from_vec(mask_values, (b, 1, t, s), &Device::Cpu).unwrap();
            let (q, k, v) = (
                randn(&[b, kv, rep * t, d], &mut rng),
                randn(&[b, kv, s, d], &mut rng),
                randn(&[b, kv, s, d], &mut rng),
            );
            let probe = randn(&[b, kv, rep * t, d], &mut rng);
            let scale = 1.0 / (d as f64).sqrt();
            let vars = |dt: DType| -> Vec<Var> {
                [&q, &k, &v]
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap())
                    .collect()
            };
            // Reference: candle's matmuls and softmax, the mask repeated for every head of a group.
            let r = vars(DType::F32);
            let full_mask = mask_tensor.repeat((1, 1, rep, 1)).unwrap();
            let scores = (r[0].as_tensor() * scale)
                .unwrap()
                .matmul(&r[1].as_tensor().t().unwrap())
                .unwrap();
            let p = candle_nn::ops::softmax(&scores.broadcast_add(&full_mask).unwrap(), D::Minus1).unwrap();
            let want = p.matmul(r[2].as_tensor()).unwrap();
            let gw = (&want * &probe).unwrap().sum_all().unwrap().backward().unwrap();

            let f = vars(DType::F32);
            let got = attention(f[0].as_tensor(), f[1].as_tensor(), f[2].as_tensor(), Some(&mask), scale).unwrap();
            let gf = (&got * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let what = format!("b{b} kv{kv} rep{rep} t{t} s{s} d{d}");
            assert!(rel(&got, &want) < 1e-5, "forward {what}: {}", rel(&got, &want));
            for (i, name) in ["q", "k", "v"].iter().enumerate() {
                let (x, y) = (gf.get(f[i].as_tensor()).unwrap(), gw.get(r[i].as_tensor()).unwrap());
                assert!(rel(x, y) < 1e-5, "grad {name} {what}: {}", rel(x, y));
            }
            // bf16 inputs: the f32 op's result on the same (widened) values, forward and
            // backward, within bf16's precision; from 16 query rows per block the products
            // take bf16 operands (the probabilities and dS rounded), below it they are f32.
            let h = vars(DType::BF16);
            let got16 = attention(h[0].as_tensor(), h[1].as_tensor(), h[2].as_tensor(), Some(&mask), scale).unwrap();
            assert_eq!(got16.dtype(), DType::BF16);
            let w: Vec<Var> = h
                .iter()
                .map(|v| Var::from_tensor(&v.as_tensor().to_dtype(DType::F32).unwrap()).unwrap())
                .collect();
            let want16 = attention(w[0].as_tensor(), w[1].as_tensor(), w[2].as_tensor(), Some(&mask), scale).unwrap();
            let widened = got16.to_dtype(DType::F32).unwrap();
            assert!(
                rel(&widened, &want16) < 1e-2,
                "bf16 forward {what}: {}",
                rel(&widened, &want16)
            );
            let probe16 = probe.to_dtype(DType::BF16).unwrap();
            let g16 = (&got16 * &probe16).unwrap().sum_all().unwrap().backward().unwrap();
            let g32 = (&want16 * &probe16.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (i, name) in ["q", "k", "v"].iter().enumerate() {
                let x = g16.get(h[i].as_tensor()).unwrap();
                assert_eq!(x.dtype(), DType::BF16);
                let y = g32.get(w[i].as_tensor()).unwrap();
                let x = x.to_dtype(DType::F32).unwrap();
                assert!(rel(&x, y) < 2e-2, "bf16 grad {name} {what}: {}", rel(&x, y));
            }
        }
        let bad = Mask::new(vec![0.0; 12], 1, 3, 4).unwrap();
        let q = Tensor::zeros((1, 1, 3, 8), DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::zeros((1, 1, 5, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(attention(&q, &k, &k, Some(&bad), 1.0).is_err());
        assert!(Mask::new(vec![0.0; 11], 1, 3, 4).is_err());
    }

    #[test]
    fn keys_read_in_place_from_a_longer_buffer_and_unmasked_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // (batch, kv heads, heads per group, queries, keys, capacity, head size).
        for (b, kv, rep, t, s, cap, d) in [(1, 3, 3, 1, 7, 16, 64), (2, 2, 2, 3, 5, 9, 8), (1, 1, 1, 1, 1, 4, 2)] {
            let q = randn(&[b, kv, rep * t, d], &mut rng);
            let (kbuf, vbuf) = (randn(&[b, kv, cap, d], &mut rng), randn(&[b, kv, cap, d], &mut rng));
            let (k, v) = (kbuf.narrow(2, 0, s).unwrap(), vbuf.narrow(2, 0, s).unwrap());
            assert!(b * kv == 1 || !k.is_contiguous());
            let scale = 0.3;
            let got = attention(&q, &k, &v, None, scale).unwrap();
            let (kc, vc) = (k.contiguous().unwrap(), v.contiguous().unwrap());
            let p = candle_nn::ops::softmax_last_dim(&(&q * scale).unwrap().matmul(&kc.t().unwrap()).unwrap()).unwrap();
            let want = p.matmul(&vc).unwrap();
            assert!(rel(&got, &want) < 1e-5, "b{b} kv{kv} t{t} s{s}: {}", rel(&got, &want));
            let zeros = Mask::new(vec![0.0; b * t * s], b, t, s).unwrap();
            let masked = attention(&q, &kc, &vc, Some(&zeros), scale).unwrap();
            assert!(rel(&masked, &want) < 1e-6);
        }
    }
}
