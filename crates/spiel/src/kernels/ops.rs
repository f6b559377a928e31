//! Fused differentiable ops for the transformer: RMSNorm, rotate-half RoPE, SwiGLU's gate and
//! the residual add, each one pass forward and one pass backward over raw slices (candle's own
//! fused versions record no backward; its differentiable compositions take several full passes
//! and buffers each). Each is tested against candle's composition on random inputs.
//!
//! Rows: every op works on the last dimension of a contiguous tensor, rows processed in
//! parallel. Activations may be f32 or bf16 (`Llama::compute_in`): a bf16 input is widened to
//! f32 for the arithmetic and the result narrowed back (round to nearest even), so each op keeps
//! and returns tensors of its input's dtype while computing in f32.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::kernels::common::{cpu_f32, grad_like, vec_of, Values};
use crate::kernels::profile::{span, Phase};
use crate::Result;

/// Values per chunk of the element-wise ops (rounded to whole rows for the row-wise ones): a
/// few such chunks per input and output stay in a core's L2 cache.
const CHUNK: usize = 4096;

/// An op's output (or gradient) in the activations' dtype.
pub(crate) enum Dst {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A chunk of a [`Dst`] being written.
enum DstChunk<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
}

impl Dst {
    fn new(len: usize, bf16_out: bool) -> Dst {
        if bf16_out {
            Dst::Bf16(vec![bf16::ZERO; len])
        } else {
            Dst::F32(vec![0f32; len])
        }
    }

    fn chunks(&mut self, chunk: usize) -> Vec<DstChunk<'_>> {
        match self {
            Dst::F32(v) => v.chunks_mut(chunk).map(DstChunk::F32).collect(),
            Dst::Bf16(v) => v.chunks_mut(chunk).map(DstChunk::Bf16).collect(),
        }
    }

    fn into_storage(self) -> CpuStorage {
        match self {
            Dst::F32(v) => CpuStorage::F32(v),
            Dst::Bf16(v) => CpuStorage::BF16(v),
        }
    }

    /// This output as a gradient for `like` (its shape, device and dtype).
    pub(crate) fn into_grad(self, like: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Dst::F32(v) => grad_like(v, like),
            Dst::Bf16(v) => Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype()),
        }
    }
}

/// Runs `f(start, inputs, outputs)` over consecutive chunks of `chunk` values (the last one may
/// be shorter) of the equally long `ins`, in parallel, and returns the `O` outputs (bf16 where
/// `bf16_out`, else f32) and `f`'s result per chunk. `f` sees every input and output as f32:
/// bf16 inputs are widened and bf16 outputs narrowed (nearest even) a chunk at a time, in
/// per-thread scratch that stays in cache, so a bf16 op moves 2 bytes per value and never holds
/// a whole f32 copy; f32 inputs and outputs are read and written in place.
fn map_chunks<const I: usize, const O: usize, R: Send>(
    ins: [Values; I],
    bf16_out: bool,
    chunk: usize,
    f: impl Fn(usize, [&[f32]; I], [&mut [f32]; O]) -> R + Sync,
) -> ([Dst; O], Vec<R>) {
    let n = ins.first().map_or(0, Values::len);
    assert!(
        ins.iter().all(|s| s.len() == n),
        "element-wise op: inputs of different lengths"
    );
    let mut outs: [Dst; O] = std::array::from_fn(|_| Dst::new(n, bf16_out));
    let chunk = chunk.max(1);
    let results = {
        let mut columns: Vec<std::vec::IntoIter<DstChunk>> =
            outs.iter_mut().map(|o| o.chunks(chunk).into_iter()).collect();
        let work: Vec<(usize, [DstChunk; O])> = (0..n.div_ceil(chunk))
            .map(|c| {
                (
                    c * chunk,
                    std::array::from_fn(|o| columns[o].next().expect("one chunk per output")),
                )
            })
            .collect();
        work.into_par_iter()
            .map_init(
                || (vec![Vec::with_capacity(chunk); I], vec![vec![0f32; chunk]; O]),
                |(in_scratch, out_scratch), (start, mut dsts)| {
                    let at = start..(start + chunk).min(n);
                    let mut sources = ins.iter().zip(in_scratch.iter_mut());
                    let inputs: [&[f32]; I] = std::array::from_fn(|_| {
                        let (s, scratch) = sources.next().expect("one scratch per input");
                        s.chunk(at.clone(), scratch)
                    });
                    let mut targets = dsts.iter_mut().zip(out_scratch.iter_mut());
                    let outputs: [&mut [f32]; O] =
                        std::array::from_fn(|_| match targets.next().expect("one scratch per output") {
                            (DstChunk::F32(d), _) => &mut **d,
                            (DstChunk::Bf16(d), scratch) => &mut scratch[..d.len()],
                        });
                    let r = f(start, inputs, outputs);
                    for (d, scratch) in dsts.iter_mut().zip(out_scratch.iter()) {
                        if let DstChunk::Bf16(d) = d {
                            for (o, &v) in d.iter_mut().zip(scratch.iter()) {
                                *o = bf16::from_bits(crate::kernels::common::round_bf16(v));
                            }
                        }
                    }
                    r
                },
            )
            .collect()
    };
    (outs, results)
}

/// Runs `f` on the element-wise sources of `ts`: each a contiguous f32 or bf16 CPU tensor read
/// in place (others are first made contiguous f32).
pub(crate) fn with_sources<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([Values; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let owned: Vec<Tensor> = ts
        .iter()
        .map(|t| match t.dtype() {
            DType::F32 | DType::BF16 => t.contiguous(),
            _ => t.to_dtype(DType::F32)?.contiguous(),
        })
        .collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut sources = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        match &**storage {
            candle_core::Storage::Cpu(cpu) => sources.push(Values::of(cpu, layout, "backward input")?),
            _ => candle_core::bail!("backward input: CPU tensors only"),
        }
    }
    let mut it = sources.into_iter();
    f(std::array::from_fn(|_| it.next().expect("one source per tensor")))
}

/// `y = x / sqrt(mean(x^2) + eps) * w` over the last dimension.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::Norms);
        let x = Values::of(s1, l1, "rms-norm")?;
        let w = cpu_f32(s2, l2, "rms-norm")?;
        let d = w.len();
        if l1.shape().dims().last() != Some(&d) || d == 0 {
            candle_core::bail!("rms-norm: x {:?} vs weight [{d}]", l1.shape());
        }
        let bf16_out = matches!(s1, CpuStorage::BF16(_));
        let ([y], _) = map_chunks([x], bf16_out, (CHUNK / d).max(1) * d, |_, [x], [y]| {
            for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
                let ms = dot_lanes(xr, xr) / d as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                for ((o, xv), wv) in yr.iter_mut().zip(xr).zip(w.iter()) {
                    *o = xv * r * wv;
                }
            }
        });
        Ok((y.into_storage(), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = span(Phase::Norms);
        let ws = vec_of(w)?;
        let bf16_out = x.dtype() == DType::BF16;
        let (gx, gw) = with_sources([x, g], |[xs, gs]| Ok(self.backward(xs, &ws, gs, bf16_out)))?;
        Ok((Some(gx.into_grad(x)?), Some(grad_like(gw, w)?)))
    }
}

impl RmsNorm {
    /// `(gx, gw)` for inputs `xs`, weight `ws` and output gradient `gs`; `gx` in bf16 where
    /// `bf16_out`.
    fn backward(&self, xs: Values, ws: &[f32], gs: Values, bf16_out: bool) -> (Dst, Vec<f32>) {
        let d = ws.len();
        // Per row: r = 1/sqrt(mean x^2 + eps); gx = r (g w) - x r^3 mean(g w x); gw += g x r.
        // Each chunk sums its rows' share of gw; the chunks' sums are added in order.
        let ([gx], gw_chunks) = map_chunks([xs, gs], bf16_out, (CHUNK / d).max(1) * d, |_, [xc, gc], [gxc]| {
            let (mut acc, mut scaled) = (vec![0f32; d], vec![0f32; d]);
            for ((gxr, xr), gr) in gxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                let ms = dot_lanes(xr, xr) / d as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                scaled.iter_mut().zip(gr).zip(ws).for_each(|((o, g), w)| *o = g * w);
                let dot = dot_lanes(&scaled, xr) / d as f32;
                let r3 = r * r * r;
                for j in 0..d {
                    gxr[j] = r * gr[j] * ws[j] - xr[j] * r3 * dot;
                    acc[j] += gr[j] * xr[j] * r;
                }
            }
            acc
        });
        let mut gw = vec![0f32; d];
        for part in gw_chunks {
            gw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        (gx, gw)
    }
}

/// RMSNorm over the last dimension, differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })?)
}

/// `a + b` element-wise for two contiguous tensors of one shape and dtype (f32 or bf16).
struct Add;

/// `out[i] = f(a[i], b[i])` in parallel chunks.
fn zip_map<T: Copy + Send + Sync>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = a.to_vec();
    out.par_chunks_mut(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .for_each(|(o, b)| o.iter_mut().zip(b).for_each(|(o, &b)| *o = f(*o, b)));
    out
}

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("add: {:?} vs {:?}", l1.shape(), l2.shape());
        }
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("add: inputs must be contiguous")
        };
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(zip_map(&a[a0..a1], &b[b0..b1], |x, y| x + y)),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => CpuStorage::BF16(zip_map(&a[a0..a1], &b[b0..b1], |x, y| {
                bf16::from_f32(x.to_f32() + y.to_f32())
            })),
            _ => candle_core::bail!("add: both inputs f32 or both bf16"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), Some(g.clone())))
    }
}

/// Back-propagate `g`, the gradient of some loss with respect to `y`, through `y`'s graph, where
/// `y` is the sum of `parts` (one or two tensors, never added up here): the gradients of that
/// loss for everything `y` depends on. The same as differentiating `sum(y * g)`, without that
/// product's passes over `y` and `g` or the sum's (the root op returns a dummy scalar and hands
/// `g` back as each part's gradient).
pub fn backward_from(parts: &[&Tensor], g: &Tensor) -> Result<candle_core::backprop::GradStore> {
    if let Some(y) = parts.iter().find(|y| y.shape() != g.shape() || y.dtype() != g.dtype()) {
        return Err(crate::Error::Invalid(format!(
            "backward_from: gradient {:?} {:?} for a tensor {:?} {:?}",
            g.shape(),
            g.dtype(),
            y.shape(),
            y.dtype()
        )));
    }
    let seed = Seed(g.clone());
    let root = match parts {
        [y] => y.apply_op1(seed)?,
        [a, b] => a.apply_op2(b, seed)?,
        _ => {
            return Err(crate::Error::Invalid(format!(
                "backward_from: {} parts, expected one or two",
                parts.len()
            )))
        }
    };
    Ok(root.backward()?)
}

/// The root op of [`backward_from`]: its value is 0, each input's gradient the held `g`.
struct Seed(Tensor);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "backward-seed"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

impl CustomOp2 for Seed {
    fn name(&self) -> &'static str {
        "backward-seed"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        _g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.0.clone()), Some(self.0.clone())))
    }
}

/// Differentiable `a + b` for tensors of one shape and dtype. For bf16 activations it replaces
/// candle's addition, which widens and narrows through calls that are not inlined on x86
/// (measured 13 ns per element against 0.4 for f32); this one costs what an f32 addition does.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, Add)?)
}

/// `a * b + c`: one fused instruction where the build targets FMA (as `target-cpu=native` does
/// on any recent x86), else a multiply and an add (`mul_add` would be a library call there).
#[inline(always)]
fn madd(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` in f32 without a library call, so that loops over it vectorise: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2` (ln 2 split in two for an exact `n ln 2`), a degree-7 polynomial for `e^r`
/// (Cephes' `expf` coefficients) in multiply-adds ([`madd`]), and `2^n` built from exponent
/// bits. Within 2 ulp of the exact value (test `exp_is_within_two_ulp_of_f64`); 0 below
/// `-87.3` (where `e^x` leaves the normal range), infinity above `88.7`, `e^0 = 1` exactly.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let c = x.clamp(-87.4, 88.8);
    let n = madd(c, LOG2E, 0.5).floor();
    let r = madd(-n, LN2_LO, madd(-n, LN2_HI, c));
    let p = 1.987_569_1e-4;
    let p = madd(p, r, 1.398_199_9e-3);
    let p = madd(p, r, 8.333_452e-3);
    let p = madd(p, r, 4.166_579_6e-2);
    let p = madd(p, r, 1.666_666_5e-1);
    let p = madd(p, r, 0.5);
    let y = madd(p * r, r, r) + 1.0;
    // 2^n as two factors, each a normal f32 over the whole range (n is in [-126, 128]). The
    // integer k is read from the low bits of k + 1.5 * 2^23 rather than by `k as i32`, whose
    // saturating conversion does not vectorise.
    let n1 = (n * 0.5).floor();
    let pow2 = |k: f32| f32::from_bits((k + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    let scaled = y * pow2(n1) * pow2(n - n1);
    if x < -87.336_55 {
        0.0
    } else if x > 88.722_83 {
        f32::INFINITY
    } else {
        scaled
    }
}

/// `sum(v)` in sixteen running sums (vectorises; the order differs from a serial sum).
#[inline(always)]
pub(crate) fn sum_lanes(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..16 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum(a * b)` in sixteen running sums (vectorises; the order differs from a serial sum).
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest of `v` (`-inf` when empty; NaN is not expected), in sixteen running maxima so
/// that the loop vectorises.
#[inline(always)]
pub(crate) fn max_lanes(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for c in chunks {
        for k in 0..16 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    acc.iter().fold(tail, |a, &b| if b > a { b } else { a })
}

/// `y = softmax(x + bias)` for one row, `bias(j)` the additive term at column `j`.
#[inline(always)]
pub(crate) fn softmax_row(y: &mut [f32], x: &[f32], bias: impl Fn(usize) -> f32) {
    for (j, (o, v)) in y.iter_mut().zip(x).enumerate() {
        *o = v + bias(j);
    }
    let max = max_lanes(y);
    y.iter_mut().for_each(|o| *o = exp(*o - max));
    let inv = 1.0 / sum_lanes(y);
    y.iter_mut().for_each(|o| *o *= inv);
}

/// Rotate-half RoPE on `[B, H, T, D]` with per-position cos/sin tables `[T, D/2]`.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Rotate backwards (the transpose of the rotation, used by the backward pass).
    inverse: bool,
}

impl Rope {
    /// The rotation of `x` (rows of `d` laid out `(b, h, t)`), in bf16 where `bf16_out`.
    fn apply(&self, x: Values, t: usize, d: usize, bf16_out: bool) -> Dst {
        let half = d / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let rows_per = (CHUNK / d.max(1)).max(1);
        let ([y], _) = map_chunks([x], bf16_out, rows_per * d, |start, [xc], [yc]| {
            for (i, (yr, xr)) in yc.chunks_mut(d).zip(xc.chunks(d)).enumerate() {
                // The position of row r is r % t.
                let p = (start / d + i) % t;
                let (c, s) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
                for j in 0..half {
                    let (a, b) = (xr[j], xr[j + half]);
                    let sn = sign * s[j];
                    yr[j] = a * c[j] - b * sn;
                    yr[j + half] = b * c[j] + a * sn;
                }
            }
        });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::Rope);
        let x = Values::of(s, l, "rope")?;
        let (_, _, t, d) = l.shape().dims4()?;
        if self.cos.len() != t * d / 2 {
            candle_core::bail!(
                "rope: tables for {} positions, input has {t}",
                self.cos.len() / (d / 2).max(1)
            );
        }
        if d % 2 == 1 {
            candle_core::bail!("rope: odd head size {d}");
        }
        let bf16_out = matches!(s, CpuStorage::BF16(_));
        Ok((self.apply(x, t, d, bf16_out).into_storage(), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _t = span(Phase::Rope);
        let (_, _, t, d) = x.dims4()?;
        let inv = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        let bf16_out = x.dtype() == DType::BF16;
        Ok(Some(
            with_sources([g], |[gs]| Ok(inv.apply(gs, t, d, bf16_out)))?.into_grad(x)?,
        ))
    }
}

/// Differentiable rotate-half RoPE: `x: [B, H, T, D]`, `cos`, `sin: [T, D/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let op = Rope {
        cos: vec_of(cos)?,
        sin: vec_of(sin)?,
        inverse: false,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// SwiGLU's gate: `silu(g) * u` element-wise, in one pass forward and one backward
/// (`dg = d u silu'(g)`, `du = d silu(g)`), without keeping `silu(g)`.
struct SwiGlu;

fn silu_parts(g: f32) -> (f32, f32) {
    let sig = 1.0 / (1.0 + exp(-g));
    (g * sig, sig * (1.0 + g * (1.0 - sig)))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::SwiGlu);
        let (g, u) = (Values::of(s1, l1, "swiglu")?, Values::of(s2, l2, "swiglu")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} vs up {:?}", l1.shape(), l2.shape());
        }
        let bf16_out = matches!(s1, CpuStorage::BF16(_));
        let ([y], _) = map_chunks([g, u], bf16_out, CHUNK, |_, [g, u], [y]| {
            for ((o, &gv), &uv) in y.iter_mut().zip(g).zip(u) {
                *o = silu_parts(gv).0 * uv;
            }
        });
        Ok((y.into_storage(), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        d: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = span(Phase::SwiGlu);
        let bf16_out = g.dtype() == DType::BF16;
        let ([dg, du], _) = with_sources([g, u, d], |sources| {
            Ok(map_chunks(sources, bf16_out, CHUNK, |_, [g, u, d], [dg, du]| {
                for i in 0..g.len() {
                    let (silu, dsilu) = silu_parts(g[i]);
                    dg[i] = d[i] * u[i] * dsilu;
                    du[i] = d[i] * silu;
                }
            }))
        })?;
        Ok((Some(dg.into_grad(g)?), Some(du.into_grad(u)?)))
    }
}

/// Differentiable `silu(gate) * up` (SwiGLU), both of the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::kernels::testing::rel_err_tensors as rel;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::SeedableRng;
        crate::kernels::testing::uniform_tensor(shape, 2.0, &mut rand::rngs::StdRng::seed_from_u64(seed))
    }

    /// The patched backward (vendor/README.md) stores a node's first gradient without adding it
    /// to zeroes: sums over several uses, first gradients arriving transposed or broadcast (stored
    /// contiguous, as a gather's backward needs), against the analytic gradient in f64.
    #[test]
    fn backward_sums_every_use_and_stores_contiguous_gradients() {
        let (r, c) = (5, 7);
        let xs: Vec<f32> = (0..r * c).map(|i| ((i * 37 % 11) as f32 - 5.0) / 4.0).collect();
        let x = Var::from_vec(xs.clone(), (r, c), &Device::Cpu).unwrap();
        let ids: Vec<u32> = (0..r as u32).map(|i| (i * 3) % c as u32).collect();
        let ids_t = Tensor::from_vec(ids.clone(), (r, 1), &Device::Cpu).unwrap();
        let x_t = x.as_tensor();
        // sum x^2 + sum 3 x^T + sum_i (sum_j x_ij)^2 over the broadcast row sums / c + sum of a gather.
        let f = (x_t.sqr().unwrap().sum_all().unwrap()
            + (x_t.t().unwrap() * 3.0).unwrap().sum_all().unwrap()
            + (x_t
                .sum_keepdim(1)
                .unwrap()
                .broadcast_as((r, c))
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                / c as f64)
                .unwrap()
            + x_t.gather(&ids_t, 1).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = f.backward().unwrap();
        let g = grads.get(x_t).unwrap();
        assert!(g.is_contiguous());
        let got: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..r {
            let row_sum: f64 = (0..c).map(|j| xs[i * c + j] as f64).sum();
            for j in 0..c {
                let gathered = if ids[i] as usize == j { 1.0 } else { 0.0 };
                let want = 2.0 * xs[i * c + j] as f64 + 3.0 + 2.0 * row_sum + gathered;
                assert!(
                    (got[i * c + j] as f64 - want).abs() < 1e-5,
                    "[{i},{j}]: {} vs {want}",
                    got[i * c + j]
                );
            }
        }
    }

    /// Forward and every input gradient of `fused` against `slow` under a random probe.
    fn check(inputs: &[Tensor], fused: impl Fn(&[Tensor]) -> Tensor, slow: impl Fn(&[Tensor]) -> Tensor, seed: u64) {
        let va: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let vb: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ta: Vec<Tensor> = va.iter().map(|v| v.as_tensor().clone()).collect();
        let tb: Vec<Tensor> = vb.iter().map(|v| v.as_tensor().clone()).collect();
        let (ya, yb) = (fused(&ta), slow(&tb));
        assert!(rel(&ya, &yb) < 1e-5, "forward {}", rel(&ya, &yb));
        let probe = randn(ya.dims(), seed);
        let ga = (&ya * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&yb * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, (a, b)) in va.iter().zip(&vb).enumerate() {
            let (x, y) = (ga.get(a.as_tensor()).unwrap(), gb.get(b.as_tensor()).unwrap());
            assert!(rel(x, y) < 1e-5, "gradient of input {i}: {}", rel(x, y));
        }
    }

    /// On bf16 activations (`acts`, rounded to bf16 first) an op must give exactly the f32 op's
    /// result on the same values, rounded to bf16, forward and backward; f32 parameters
    /// (`params`) get identical f32 gradients.
    fn check_bf16(acts: &[Tensor], params: &[Tensor], op: impl Fn(&[Tensor], &[Tensor]) -> Tensor, seed: u64) {
        let bits = |t: &Tensor| -> Vec<u16> {
            let t = t.to_dtype(DType::BF16).unwrap().flatten_all().unwrap();
            t.to_vec1::<bf16>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        let run = |dtype: DType| {
            let a: Vec<Var> = acts
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(DType::BF16).unwrap().to_dtype(dtype).unwrap()).unwrap())
                .collect();
            let p: Vec<Var> = params.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let at: Vec<Tensor> = a.iter().map(|v| v.as_tensor().clone()).collect();
            let pt: Vec<Tensor> = p.iter().map(|v| v.as_tensor().clone()).collect();
            let y = op(&at, &pt);
            let probe = randn(y.dims(), seed)
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let ga: Vec<Tensor> = a.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect();
            let gp: Vec<Vec<f32>> = p
                .iter()
                .map(|v| vec_of(g.get(v.as_tensor()).unwrap()).unwrap())
                .collect();
            (y, ga, gp)
        };
        let (y16, ga16, gp16) = run(DType::BF16);
        let (y32, ga32, gp32) = run(DType::F32);
        assert_eq!(y16.dtype(), DType::BF16);
        assert_eq!(bits(&y16), bits(&y32), "forward");
        for (i, (a, b)) in ga16.iter().zip(&ga32).enumerate() {
            assert_eq!(a.dtype(), DType::BF16);
            assert_eq!(bits(a), bits(b), "gradient of activation {i}");
        }
        assert_eq!(gp16, gp32, "parameter gradients");
    }

    #[test]
    fn bf16_activations_give_the_f32_result_rounded() {
        let none: &[Tensor] = &[];
        // Shapes of one chunk and of several, the last one ragged (`CHUNK` values per chunk).
        for rows in [5, 300] {
            check_bf16(
                &[randn(&[rows, 33], 1)],
                &[randn(&[33], 2)],
                |a, p| rms_norm(&a[0], &p[0], 1e-5).unwrap(),
                3,
            );
        }
        for (t, d) in [(9, 8), (130, 64)] {
            let ang = randn(&[t, d / 2], 7);
            let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
            check_bf16(
                &[randn(&[1, 3, t, d], 8)],
                none,
                |a, _| rope(&a[0], &cos, &sin).unwrap(),
                9,
            );
        }
        let (g, u) = ((randn(&[3, 4097], 10) * 4.0).unwrap(), randn(&[3, 4097], 11));
        check_bf16(&[g.clone(), u.clone()], none, |a, _| swiglu(&a[0], &a[1]).unwrap(), 12);
        check_bf16(&[g, u], none, |a, _| add(&a[0], &a[1]).unwrap(), 13);
    }

    #[test]
    fn add_matches_candle_and_refuses_mismatches() {
        for shape in [vec![1], vec![3, 7], vec![2, 5, 16385]] {
            check(
                &[randn(&shape, 1), randn(&shape, 2)],
                |t| add(&t[0], &t[1]).unwrap(),
                |t| (&t[0] + &t[1]).unwrap(),
                3,
            );
        }
        let a = randn(&[2, 3], 1);
        assert!(add(&a, &randn(&[3, 2], 2)).is_err());
        assert!(add(&a, &a.to_dtype(DType::BF16).unwrap()).is_err());
    }

    #[test]
    fn rms_norm_matches_candle_composition() {
        // D = 1 is left out: its input gradient, w eps / (x^2 + eps)^1.5, is ~1e-5 and f32 rounding
        // on either side dominates the comparison.
        for (rows, d) in [(1, 2), (3, 7), (64, 576), (5, 33)] {
            let x = randn(&[rows, d], 1);
            let w = randn(&[d], 2);
            check(
                &[x, w],
                |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
                |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5).unwrap(),
                3,
            );
        }
    }

    #[test]
    fn swiglu_matches_candle_composition() {
        for shape in [vec![1], vec![3, 7], vec![2, 5, 1536], vec![4097]] {
            check(
                &[(randn(&shape, 9) * 4.0).unwrap(), randn(&shape, 10)],
                |t| swiglu(&t[0], &t[1]).unwrap(),
                |t| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
                11,
            );
        }
    }

    #[test]
    fn rope_matches_candle_composition() {
        for (b, h, t, d) in [(1, 1, 1, 2), (2, 3, 5, 8), (1, 9, 33, 64)] {
            let x = randn(&[b, h, t, d], 6);
            let ang = randn(&[t, d / 2], 7);
            let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
            check(
                &[x],
                |v| rope(&v[0], &cos, &sin).unwrap(),
                |v| candle_nn::rotary_emb::rope_slow(&v[0], &cos, &sin).unwrap(),
                8,
            );
        }
    }

    #[test]
    fn dot_lanes_matches_f64() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for len in [0, 1, 15, 16, 17, 37, 576, 1537] {
            let a: Vec<f32> = (0..len).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let mag: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum();
            let got = dot_lanes(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * (mag + 1.0),
                "length {len}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let ulp = |v: f32| f32::from_bits(v.to_bits() + 1) - v;
        let mut xs: Vec<f32> = (0..200_000).map(|_| rng.gen_range(-87.3f32..88.7)).collect();
        xs.extend((0..100_000).map(|_| rng.gen_range(-1.0f32..1.0)));
        xs.extend([
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5 * std::f32::consts::LN_2,
            -87.3,
            88.7,
            1e-8,
            -1e-8,
        ]);
        for x in xs {
            let (got, want) = (exp(x), (x as f64).exp());
            let err = (got as f64 - want).abs() / ulp(want as f32) as f64;
            assert!(err <= 2.0, "exp({x}) = {got}, want {want}: {err} ulp");
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(sum_lanes(&[1.0; 37]), 37.0);
        let v: Vec<f32> = (0..37).map(|i| ((i * 17) % 37) as f32 - 50.0).collect();
        assert_eq!(max_lanes(&v), -14.0);
        assert_eq!(max_lanes(&[]), f32::NEG_INFINITY);
    }
}
