//! The sparse-delta linear: `y = x (W + S)^T` where `S` holds `values` at flat row-major `indices`
//! of an `[out, in]` matrix. The frozen dense part `x W^T` is an ordinary matmul; this module adds
//! the sparse part as a custom op with an explicit backward:
//!
//! - forward: `y[t, r] += v * x[t, c]` for every active entry `(r, c)` (no dense copy of W or S;
//!   deviation 2 of the spec);
//! - grad_x: `gx[t, c] += v * gy[t, r]`;
//! - grad_values: `g[n] = sum_t gy[t, r] * x[t, c]`, a sampled dense-dense matmul (SDDMM), instead of
//!   the reference's full dense weight gradient (deviation 1). Only at the first micro-batch of a
//!   SpIEL-AG accumulation window (a [`WeightGradHook`] attached that has no positions yet) is the
//!   dense gradient `gy^T x` formed, one layer at a time, handed to the hook, and the value
//!   gradients gathered from it; for the rest of the window the SDDMM also samples the hook's
//!   candidate positions.
//!
//! Over any frozen base the op can take the base's product with it (`SparseBase::Plus`): one
//! output `x W^T + x S^T` and one input gradient, instead of two products and their sum. With
//! bf16 products the delta joins the base's values as they are packed; a training run keeps
//! those packed forms from update to update and patches them at the delta's positions
//! ([`DeltaPacks`]).
//!
//! Over a dense f32 base the trainer can instead add the values into the base weight in place for
//! the length of an update ([`DeltaInBase`], undone exactly from the saved base values). The op
//! then takes the base with it: forward `x W'^T` and input gradient `gy W'` are the frozen GEMMs
//! over the merged `W'`, and only the value gradient remains sparse. The two scattered products
//! disappear; the GEMMs cost what they cost without a delta.
//!
//! Shapes: N rows (tokens), IN input features, OUT output features, K active entries.

use crate::kernels::profile::{span, Phase};
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, InplaceOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::bf16mm::{DeltaPacks, Products, Right, SparseAdd, View};
use crate::kernels::common::{cpu_slice, grad_like, storage_like, Values};
use crate::kernels::gemm::dot;
use crate::kernels::ops::{with_sources, Dst};
use crate::kernels::qmatrix::{with_slice, Frozen};
use half::bf16;

/// Receives one module's weight gradient during a SpIEL-AG window: the transient dense `[out,
/// in]` gradient until the hook has chosen the positions it follows, then (by SDDMM, without
/// forming the dense gradient) the gradient at those positions alone.
pub trait WeightGradHook: Send + Sync {
    /// The sorted flat positions whose gradient the hook wants, once chosen; `None` while it
    /// needs the whole dense gradient.
    fn positions(&self) -> Option<Vec<u32>>;
    /// Called once per backward pass with the row-major dense gradient, while
    /// [`WeightGradHook::positions`] is `None`.
    fn observe_dense(&self, grad: &[f32], out_dim: usize, in_dim: usize);
    /// Called once per backward pass with the gradient at the positions
    /// [`WeightGradHook::positions`] named, in their order.
    fn observe_at(&self, grad: &[f32]);
}

/// Tokens per parallel task in the sparse products: the task's slices of the input and output,
/// transposed to feature-major, stay in L2 and each entry becomes a contiguous axpy over them.
const TOKEN_BLOCK: usize = 32;

/// `dst[t, d_n] += v_n * src[t, s_n]` for every entry `n`; `dst: [N, dst_w]`, `src: [N, src_w]`.
/// Parallel over blocks of tokens; within a block each entry is a vectorised axpy.
fn sparse_columns_add(dst: &mut [f32], dst_w: usize, src: &[f32], src_w: usize, pairs: &[(u32, u32)], values: &[f32]) {
    dst.par_chunks_mut(TOKEN_BLOCK * dst_w)
        .zip(src.par_chunks(TOKEN_BLOCK * src_w))
        .for_each(|(d, s)| {
            let bt = s.len() / src_w;
            let mut st = vec![0f32; src_w * bt];
            for t in 0..bt {
                for j in 0..src_w {
                    st[j * bt + t] = s[t * src_w + j];
                }
            }
            let mut dt = vec![0f32; dst_w * bt];
            for (&(sj, dj), &v) in pairs.iter().zip(values) {
                let (sj, dj) = (sj as usize, dj as usize);
                let src_row = &st[sj * bt..(sj + 1) * bt];
                for (o, x) in dt[dj * bt..(dj + 1) * bt].iter_mut().zip(src_row) {
                    *o += v * x;
                }
            }
            for t in 0..bt {
                for j in 0..dst_w {
                    d[t * dst_w + j] += dt[j * bt + t];
                }
            }
        });
}

/// `y[t, r] += v * x[t, c]` over all active entries; `y: [N, OUT]`, `x: [N, IN]`.
pub fn spmm_add(y: &mut [f32], x: &[f32], indices: &[u32], values: &[f32], in_dim: usize, out_dim: usize) {
    let pairs: Vec<(u32, u32)> = indices
        .iter()
        .map(|&i| (i % in_dim as u32, i / in_dim as u32))
        .collect();
    sparse_columns_add(y, out_dim, x, in_dim, &pairs, values);
}

/// `gx[t, c] += v * gy[t, r]` over all active entries; `gx: [N, IN]`, `gy: [N, OUT]`.
pub fn spmm_t_add(gx: &mut [f32], gy: &[f32], indices: &[u32], values: &[f32], in_dim: usize, out_dim: usize) {
    let pairs: Vec<(u32, u32)> = indices
        .iter()
        .map(|&i| (i / in_dim as u32, i % in_dim as u32))
        .collect();
    sparse_columns_add(gx, in_dim, gy, out_dim, &pairs, values);
}

/// `m: [rows, cols]` -> `[cols, rows]`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    transpose_into(m, rows, cols, &mut t);
    t
}

/// `m: [rows, cols]` -> `t: [cols, rows]` (the leading `rows * cols` values of `t`), in parallel
/// over bands of 32 columns (32 destination rows); 8 x 8 tiles through AVX registers where the
/// CPU has AVX2, the ragged edges one value at a time. Moves bits only: any 32-bit values can
/// pass as f32.
fn transpose_into(m: &[f32], rows: usize, cols: usize, t: &mut [f32]) {
    const BAND: usize = 32;
    assert!(m.len() >= rows * cols && t.len() >= rows * cols);
    t[..rows * cols]
        .par_chunks_mut(rows * BAND)
        .enumerate()
        .for_each(|(band, dst)| {
            let c0 = band * BAND;
            let cn = BAND.min(cols - c0);
            let (full_r, full_c) = (rows / 8 * 8, cn / 8 * 8);
            #[cfg(target_arch = "x86_64")]
            let tiled = std::is_x86_feature_detected!("avx2");
            #[cfg(not(target_arch = "x86_64"))]
            let tiled = false;
            #[cfg(target_arch = "x86_64")]
            if tiled {
                for r in (0..full_r).step_by(8) {
                    for c in (0..full_c).step_by(8) {
                        // SAFETY: AVX2 is present (checked); the tile reads rows r..r+8 of m at
                        // columns c0+c..c0+c+8 (r + 8 <= rows, c + 8 <= cn) and writes rows c..c+8
                        // of this band at columns r..r+8, all inside the slices.
                        unsafe {
                            transpose_8x8(
                                m.as_ptr().add(r * cols + c0 + c),
                                cols,
                                dst.as_mut_ptr().add(c * rows + r),
                                rows,
                            )
                        };
                    }
                }
            }
            for c in 0..cn {
                let done_r = if tiled && c < full_c { full_r } else { 0 };
                for r in done_r..rows {
                    dst[c * rows + r] = m[r * cols + c0 + c];
                }
            }
        });
}

/// One 8 x 8 tile: `dst[j * ldd + i] = src[i * lds + j]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_8x8(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * lds)));
    // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    for j in 0..4 {
        _mm256_storeu_ps(dst.add(j * ldd), _mm256_permute2f128_ps::<0x20>(u[j], u[j + 4]));
        _mm256_storeu_ps(dst.add((j + 4) * ldd), _mm256_permute2f128_ps::<0x31>(u[j], u[j + 4]));
    }
}

/// Tokens per pass of the SDDMM: one pass's transposed slices of `gy` and `x` (at most
/// `1536 x 128` floats each on the default model, 768 KiB) stay in L2 while every entry reads its
/// row and column from them, instead of streaming a whole-batch column from L3 per entry.
const SDDMM_TOKENS: usize = 128;

/// Tokens per pass of the bf16 SDDMM: the same bytes as [`SDDMM_TOKENS`] f32 tokens.
const SDDMM_BF16_TOKENS: usize = 256;

/// One SDDMM output: the gradient at sorted flat `indices`, written to `out` (one per index).
pub(crate) type Sampled<'s> = (&'s mut [f32], &'s [u32]);

/// SDDMM: `out[n] = sum_t gy[t, r_n] * x[t, c_n]` for each `(out, indices)` of `targets`; `gy: [N,
/// OUT]`, `x: [N, IN]` (f32 or bf16). The targets share each pass's transposes of `gy` and `x`,
/// which cost more than the dots at the default model's densities. With bf16 inputs on a CPU
/// with AVX-512 BF16 the products are `vdpbf16ps` pairs (exact products, f32 sums in another
/// order), half the bytes per entry of the widened path.
pub(crate) fn sddmm<'a>(
    targets: &mut [Sampled],
    gy: impl Into<Values<'a>>,
    x: impl Into<Values<'a>>,
    n: usize,
    in_dim: usize,
    out_dim: usize,
) {
    let (gy, x) = (gy.into(), x.into());
    targets.iter_mut().for_each(|(out, _)| out.fill(0.0));
    #[cfg(target_arch = "x86_64")]
    if let (Values::Bf16(gy), Values::Bf16(x)) = (gy, x) {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16") {
            return sddmm_bf16(targets, gy, x, n, in_dim, out_dim);
        }
    }
    for t0 in (0..n).step_by(SDDMM_TOKENS) {
        let tc = SDDMM_TOKENS.min(n - t0);
        // One pass of tokens, widened first where bf16.
        let gyt = transpose(&gy.slice(t0 * out_dim..(t0 + tc) * out_dim).to_f32(), tc, out_dim);
        let xt = transpose(&x.slice(t0 * in_dim..(t0 + tc) * in_dim).to_f32(), tc, in_dim);
        for (out, indices) in targets.iter_mut() {
            add_entry_dots(out, indices, in_dim, |r, c| {
                dot(&gyt[r * tc..(r + 1) * tc], &xt[c * tc..(c + 1) * tc])
            });
        }
    }
}

/// `out[n] += dot(r_n, c_n)` for every entry `(r_n, c_n)` of sorted flat `indices` into rows of
/// `in_dim`, in parallel; the row found by a division only when it changes.
fn add_entry_dots(out: &mut [f32], indices: &[u32], in_dim: usize, dot: impl Fn(usize, usize) -> f32 + Sync) {
    out.par_chunks_mut(1024)
        .zip(indices.par_chunks(1024))
        .for_each(|(o, idx)| {
            let (mut row_start, mut r) = (0, 0);
            for (dst, &i) in o.iter_mut().zip(idx) {
                let i = i as usize;
                if i < row_start || i - row_start >= in_dim {
                    r = i / in_dim;
                    row_start = r * in_dim;
                }
                *dst += dot(r, i - row_start);
            }
        });
}

/// [`sddmm`] over bf16 inputs with `vdpbf16ps`. Per pass both inputs go feature-major as they
/// are (bf16), padded with zero tokens to a multiple of 32: each two rows of tokens interleave
/// into one row of 32-bit pairs, which [`transpose_into`] moves as f32 bit patterns; each
/// transposed row of pairs is then the feature's tokens in order.
#[cfg(target_arch = "x86_64")]
fn sddmm_bf16(targets: &mut [Sampled], gy: &[half::bf16], x: &[half::bf16], n: usize, in_dim: usize, out_dim: usize) {
    let stride = SDDMM_BF16_TOKENS.min(n.next_multiple_of(32));
    let widest = in_dim.max(out_dim);
    // Pairs of rows, and the two inputs transposed (each as 32-bit words).
    let mut pairs = vec![0f32; stride / 2 * widest];
    let (mut gyt, mut xt) = (vec![0f32; out_dim * stride / 2], vec![0f32; in_dim * stride / 2]);
    for t0 in (0..n).step_by(SDDMM_BF16_TOKENS) {
        let tc = SDDMM_BF16_TOKENS.min(n - t0);
        let tp = tc.next_multiple_of(32);
        for (m, cols, t) in [(gy, out_dim, &mut gyt), (x, in_dim, &mut xt)] {
            pair_rows(&m[t0 * cols..(t0 + tc) * cols], tc, cols, &mut pairs[..tp / 2 * cols]);
            transpose_into(&pairs, tp / 2, cols, t);
        }
        let (gyb, xb) = (as_bits(&gyt), as_bits(&xt));
        for (out, indices) in targets.iter_mut() {
            add_entry_dots(out, indices, in_dim, |r, c| {
                let (a, b) = (&gyb[r * tp..(r + 1) * tp], &xb[c * tp..(c + 1) * tp]);
                // SAFETY: the CPU has AVX-512 F and BF16 (checked by the caller); both rows hold
                // `tp` values, a multiple of 32.
                unsafe { dot_bf16_pairs(a, b) }
            });
        }
    }
}

/// Rows `2 i` and `2 i + 1` of `m: [rows, cols]` (bf16) interleaved into row `i` of `dst`
/// (`cols` 32-bit words, as f32 bit patterns: row `2 i` in the low half); rows past `rows` read
/// as zeros, up to the length of `dst`.
#[cfg(target_arch = "x86_64")]
fn pair_rows(m: &[half::bf16], rows: usize, cols: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(cols).enumerate().for_each(|(i, d)| {
        let row = |r: usize| (r < rows).then(|| &m[r * cols..(r + 1) * cols]);
        match (row(2 * i), row(2 * i + 1)) {
            (Some(lo), Some(hi)) => d
                .iter_mut()
                .zip(lo.iter().zip(hi))
                .for_each(|(o, (l, h))| *o = f32::from_bits(l.to_bits() as u32 | (h.to_bits() as u32) << 16)),
            (Some(lo), None) => d
                .iter_mut()
                .zip(lo)
                .for_each(|(o, l)| *o = f32::from_bits(l.to_bits() as u32)),
            _ => d.fill(0.0),
        }
    });
}

/// 32-bit words seen as the pairs of 16-bit values they hold (low half first).
#[cfg(target_arch = "x86_64")]
fn as_bits(words: &[f32]) -> &[u16] {
    // SAFETY: u16 has a smaller alignment than f32 and any bits are a valid u16; the slice
    // covers the same bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 2) }
}

/// `a . b` for bf16 bits `a`, `b` of equal length, a multiple of 32: `vdpbf16ps` (each pair's
/// products exact, summed in f32), two running sums.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_bf16_pairs(a: &[u16], b: &[u16]) -> f32 {
    use std::arch::x86_64::*;
    assert!(a.len() == b.len() && a.len().is_multiple_of(32));
    let load = |p: &[u16], i: usize| -> __m512bh { std::mem::transmute(_mm512_loadu_si512(p.as_ptr().add(i).cast())) };
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 64 <= a.len() {
        acc[0] = _mm512_dpbf16_ps(acc[0], load(a, i), load(b, i));
        acc[1] = _mm512_dpbf16_ps(acc[1], load(a, i + 32), load(b, i + 32));
        i += 64;
    }
    if i < a.len() {
        acc[0] = _mm512_dpbf16_ps(acc[0], load(a, i), load(b, i));
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

/// What a [`SparseDeltaOp`] multiplies besides (or instead of) the sparse part.
#[derive(Clone)]
pub enum SparseBase {
    /// The sparse part alone: `x S^T`.
    None,
    /// A dense base weight with the values added in place ([`DeltaInBase`]): `x W'^T`.
    Holding(Frozen),
    /// A frozen base (any storage) and the sparse part in one output: `x W^T + x S^T`, so the
    /// projection keeps one tensor for the backward instead of the product, the delta's output
    /// and their sum.
    Plus(Frozen),
}

/// Candle custom op: `(x [N, IN], values [K]) -> [N, OUT]`, `x S^T` with or without the frozen
/// base's product ([`SparseBase`]).
pub struct SparseDeltaOp {
    /// The frozen base's part in the product.
    pub base: SparseBase,
    /// Sorted, unique flat indices into `[out, in]`.
    pub indices: Arc<Vec<u32>>,
    /// Rows of the weight.
    pub out_dim: usize,
    /// Columns of the weight.
    pub in_dim: usize,
    /// Dense-gradient observer while in a SpIEL-AG window.
    pub hook: Option<Arc<dyn WeightGradHook>>,
    /// Where the bf16 products over a `Plus` base keep their packed operands between updates.
    pub packs: Option<Arc<DeltaPacks>>,
}

impl CustomOp2 for SparseDeltaOp {
    fn name(&self) -> &'static str {
        "sparse-delta"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Values::of(s1, l1, "sparse-delta x")?;
        let v = cpu_slice(s2, l2, "sparse-delta values")?;
        let (n, inp) = l1.shape().dims2()?;
        if inp != self.in_dim || v.len() != self.indices.len() {
            candle_core::bail!(
                "sparse-delta: x is [{n}, {inp}] and {} values for {} indices of a [{}, {}] matrix",
                v.len(),
                self.indices.len(),
                self.out_dim,
                self.in_dim
            );
        }
        let products = Products::for_storage(s1);
        if let (SparseBase::Plus(base), true) = (&self.base, products.bf16_for(n)) {
            // bf16 products: the delta joins the base's values as they are packed (no sparse
            // product of its own).
            let _t = span(Phase::ProjectionsForward);
            let delta = SparseAdd {
                indices: &self.indices,
                values: v,
            };
            let y = self.base_plus_delta(base, x, n, delta, true);
            return Ok((CpuStorage::BF16(y), Shape::from((n, self.out_dim))));
        }
        let mut y = match &self.base {
            SparseBase::Holding(base) | SparseBase::Plus(base) => {
                let _t = span(Phase::ProjectionsForward);
                base.matmul_t(x, n, products)?
            }
            SparseBase::None => vec![0f32; n * self.out_dim],
        };
        if !matches!(self.base, SparseBase::Holding(_)) {
            let _t = span(Phase::SparseProducts);
            spmm_add(&mut y, &x.to_f32(), &self.indices, v, self.in_dim, self.out_dim);
        }
        Ok((storage_like(y, s1), Shape::from((n, self.out_dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        values: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, _) = x.dims2()?;
        let products = Products::for_activations(grad.dtype());
        let (gx, gv) = with_sources([grad, x], |[gy, xs]| self.backward(n, products, values, gy, xs))?;
        let (gx, gv) = (gx.into_grad(x)?, grad_like(gv, values)?);
        Ok((Some(gx), Some(gv)))
    }
}

impl SparseDeltaOp {
    /// `x (W + delta)^T` (`transposed`) or `x (W + delta)` for `n` rows of `x`, over bf16
    /// operands and rounded to bf16: from the kept packs where there are some.
    fn base_plus_delta(&self, base: &Frozen, x: Values, n: usize, delta: SparseAdd, transposed: bool) -> Vec<bf16> {
        let Some(packs) = &self.packs else {
            return base.bf16_product_to_bf16(x, n, transposed, Some(delta));
        };
        let (rows, cols) = base.shape();
        let (k, width) = if transposed { (cols, rows) } else { (rows, cols) };
        let mut y = vec![bf16::ZERO; n * width];
        packs.product_to_bf16(&mut y, View::rows(x, n, k), base, delta, transposed);
        y
    }

    /// The input gradient and the values' gradient for `n` rows, from the output gradient `gy`
    /// and the input `xs`, both read in place (f32 or bf16); the base's product with
    /// `products`' operands.
    fn backward(
        &self,
        n: usize,
        products: Products,
        values: &Tensor,
        gy: Values,
        xs: Values,
    ) -> candle_core::Result<(Dst, Vec<f32>)> {
        let gx = match &self.base {
            SparseBase::Plus(base) if products.bf16_for(n) => {
                // As in the forward: the delta joins the packed base.
                let _t = span(Phase::ProjectionsInputGrad);
                let v: Vec<f32> = values.to_vec1()?;
                let delta = SparseAdd {
                    indices: &self.indices,
                    values: &v,
                };
                Dst::Bf16(self.base_plus_delta(base, gy, n, delta, false))
            }
            SparseBase::Holding(base) | SparseBase::Plus(base) => {
                let _t = span(Phase::ProjectionsInputGrad);
                let mut gx = base.matmul(gy, n, products)?;
                if let SparseBase::Plus(_) = self.base {
                    let _t = span(Phase::SparseProducts);
                    let v: Vec<f32> = values.to_vec1()?;
                    spmm_t_add(&mut gx, &gy.to_f32(), &self.indices, &v, self.in_dim, self.out_dim);
                }
                Dst::F32(gx)
            }
            SparseBase::None => {
                let _t = span(Phase::SparseProducts);
                let mut gx = vec![0f32; n * self.in_dim];
                let v: Vec<f32> = values.to_vec1()?;
                spmm_t_add(&mut gx, &gy.to_f32(), &self.indices, &v, self.in_dim, self.out_dim);
                Dst::F32(gx)
            }
        };
        let mut gv = vec![0f32; self.indices.len()];
        match &self.hook {
            None => {
                let _t = span(Phase::Sddmm);
                sddmm(&mut [(&mut gv, &self.indices)], gy, xs, n, self.in_dim, self.out_dim)
            }
            Some(hook) => match hook.positions() {
                Some(positions) => {
                    // Later in an AG window: the gradient at the active entries and at the
                    // window's candidates, both sampled.
                    let _t = span(Phase::Sddmm);
                    let mut at = vec![0f32; positions.len()];
                    let mut targets = [(&mut gv[..], &self.indices[..]), (&mut at[..], &positions[..])];
                    sddmm(&mut targets, gy, xs, n, self.in_dim, self.out_dim);
                    hook.observe_at(&at);
                }
                None => {
                    let _t = span(Phase::AgDenseGradients);
                    // The window's first micro-batch: the dense gradient once, then gather the
                    // active entries.
                    let mut dense = vec![0f32; self.out_dim * self.in_dim];
                    if products.bf16_for(n) {
                        // bf16 activations and gradients are exact in bf16: the products lose nothing.
                        let (gt, x) = (View::transposed(gy, self.out_dim, n), View::rows(xs, n, self.in_dim));
                        crate::kernels::bf16mm::gemm(&mut dense, false, 1.0, gt, Right::Matrix(x));
                    } else {
                        crate::kernels::gemm::gemm_gtx(
                            &mut dense,
                            &gy.to_f32(),
                            &xs.to_f32(),
                            n,
                            self.out_dim,
                            self.in_dim,
                        );
                    }
                    hook.observe_dense(&dense, self.out_dim, self.in_dim);
                    for (g, &i) in gv.iter_mut().zip(self.indices.iter()) {
                        *g = dense[i as usize];
                    }
                }
            },
        }
        Ok((gx, gv))
    }
}

/// Apply the sparse part: `x S^T` for `x: [N, IN]`, recording the backward when `values` is a
/// variable or depends on one.
pub fn sparse_delta_matmul(
    x: &Tensor,
    values: &Tensor,
    indices: Arc<Vec<u32>>,
    shape: (usize, usize),
    hook: Option<Arc<dyn WeightGradHook>>,
) -> candle_core::Result<Tensor> {
    let op = SparseDeltaOp {
        base: SparseBase::None,
        indices,
        out_dim: shape.0,
        in_dim: shape.1,
        hook,
        packs: None,
    };
    x.contiguous()?.apply_op2(values, op)
}

/// `x W'^T` for `x: [N, IN]` where the dense base `W'` already holds `values` at `indices` (see
/// [`DeltaInBase`]): one frozen GEMM forward and backward, the value gradient as in
/// [`sparse_delta_matmul`].
pub fn base_with_delta_matmul(
    x: &Tensor,
    base: &Tensor,
    values: &Tensor,
    indices: Arc<Vec<u32>>,
    hook: Option<Arc<dyn WeightGradHook>>,
) -> candle_core::Result<Tensor> {
    let (out_dim, in_dim) = base.dims2()?;
    let op = SparseDeltaOp {
        base: SparseBase::Holding(Frozen::Dense(base.clone())),
        indices,
        out_dim,
        in_dim,
        hook,
        packs: None,
    };
    x.contiguous()?.apply_op2(values, op)
}

/// `x W^T + x S^T` for `x: [N, IN]` and a frozen base `W` in any storage, as one op with one
/// output ([`SparseBase::Plus`]); gradients as in [`sparse_delta_matmul`] plus the base's input
/// gradient.
pub fn frozen_plus_delta_matmul(
    x: &Tensor,
    base: &Frozen,
    values: &Tensor,
    indices: Arc<Vec<u32>>,
    hook: Option<Arc<dyn WeightGradHook>>,
    packs: Option<Arc<DeltaPacks>>,
) -> candle_core::Result<Tensor> {
    let (out_dim, in_dim) = base.shape();
    let op = SparseDeltaOp {
        base: SparseBase::Plus(base.clone()),
        indices,
        out_dim,
        in_dim,
        hook,
        packs,
    };
    x.contiguous()?.apply_op2(values, op)
}

/// Sparse values added into a dense f32 base weight in place, undone exactly by writing back the
/// base values saved at the indices (never by subtracting). Used by the trainer for the length of
/// one update; [`DeltaInBase::restore`] (or dropping it) puts the base back bit for bit.
pub struct DeltaInBase {
    weight: Tensor,
    indices: Arc<Vec<u32>>,
    saved: Vec<f32>,
}

impl DeltaInBase {
    /// Add `values` into `weight` (a contiguous f32 CPU tensor, `[out, in]`) at `indices`.
    pub fn add(weight: &Tensor, indices: Arc<Vec<u32>>, values: &[f32]) -> candle_core::Result<DeltaInBase> {
        if values.len() != indices.len() {
            candle_core::bail!("delta-in-base: {} values for {} indices", values.len(), indices.len());
        }
        if let Some(&last) = indices.last() {
            if last as usize >= weight.elem_count() {
                candle_core::bail!(
                    "delta-in-base: index {last} outside a weight of {} entries",
                    weight.elem_count()
                );
            }
        }
        let saved: Vec<f32> = with_slice(weight, |w| indices.iter().map(|&i| w[i as usize]).collect())?;
        let merged: Vec<f32> = saved.iter().zip(values).map(|(b, v)| b + v).collect();
        weight.inplace_op1(&ScatterSet {
            indices: &indices,
            values: &merged,
        })?;
        Ok(DeltaInBase {
            weight: weight.clone(),
            indices,
            saved,
        })
    }

    /// Write the saved base values back.
    pub fn restore(mut self) -> candle_core::Result<()> {
        self.write_back()
    }

    fn write_back(&mut self) -> candle_core::Result<()> {
        if self.saved.is_empty() {
            return Ok(());
        }
        let saved = std::mem::take(&mut self.saved);
        self.weight.inplace_op1(&ScatterSet {
            indices: &self.indices,
            values: &saved,
        })
    }
}

impl Drop for DeltaInBase {
    /// An update that stopped half-way (an error) still leaves the base as it was.
    fn drop(&mut self) {
        if let Err(e) = self.write_back() {
            tracing::error!("could not restore a base weight after an update: {e}");
        }
    }
}

/// In place: `w[indices[n]] = values[n]`.
struct ScatterSet<'a> {
    indices: &'a [u32],
    values: &'a [f32],
}

impl InplaceOp1 for ScatterSet<'_> {
    fn name(&self) -> &'static str {
        "scatter-set"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("scatter-set: f32 weights only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("scatter-set: a contiguous weight only");
        };
        let w = &mut data[start..end];
        for (&i, &v) in self.indices.iter().zip(self.values) {
            w[i as usize] = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{seq::index::sample, Rng, SeedableRng};

    use crate::kernels::common::vec_of;
    use crate::kernels::testing::{rel_err, uniform_tensor};

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        crate::kernels::testing::uniform(n, 1.0, rng)
    }

    /// Random sorted indices; row 0 and the last row are left empty on purpose.
    fn indices(out: usize, inp: usize, k: usize, rng: &mut impl Rng) -> Vec<u32> {
        let lo = inp;
        let hi = (out - 1) * inp;
        let mut v: Vec<u32> = sample(rng, hi - lo, k.min(hi - lo))
            .into_iter()
            .map(|i| (i + lo) as u32)
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn sparse_products_match_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        // Token counts below, at and above the block size, with a ragged last block.
        for (n, inp, out, k) in [(1, 3, 4, 2), (32, 33, 17, 40), (77, 65, 96, 500), (5, 1, 5, 3)] {
            let x = random(n * inp, &mut rng);
            let gy = random(n * out, &mut rng);
            let idx = indices(out, inp, k, &mut rng);
            let v = random(idx.len(), &mut rng);
            let mut y = vec![0.5f32; n * out];
            spmm_add(&mut y, &x, &idx, &v, inp, out);
            let mut gx = vec![-0.25f32; n * inp];
            spmm_t_add(&mut gx, &gy, &idx, &v, inp, out);
            let mut y_ref = vec![0.5f64; n * out];
            let mut gx_ref = vec![-0.25f64; n * inp];
            for (&i, &val) in idx.iter().zip(&v) {
                let (r, c) = (i as usize / inp, i as usize % inp);
                for t in 0..n {
                    y_ref[t * out + r] += val as f64 * x[t * inp + c] as f64;
                    gx_ref[t * inp + c] += val as f64 * gy[t * out + r] as f64;
                }
            }
            let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
            assert!(rel_err(&y, &to32(y_ref)) < 1e-6, "forward {n}x{inp}x{out}");
            assert!(rel_err(&gx, &to32(gx_ref)) < 1e-6, "grad_x {n}x{inp}x{out}");
        }
    }

    #[test]
    fn transpose_matches_the_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Whole 8 x 8 tiles, ragged edges on either side, bands of 32 columns and a short last
        // band, single rows and columns.
        for (rows, cols) in [(128, 576), (13, 29), (8, 8), (1, 7), (9, 1), (40, 70), (7, 33)] {
            let m = random(rows * cols, &mut rng);
            let t = transpose(&m, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], m[r * cols + c], "{rows}x{cols} at [{r},{c}]");
                }
            }
        }
    }

    #[test]
    fn sddmm_matches_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        // Token counts below, at and across the pass sizes (128 f32, 256 bf16 tokens), with a
        // ragged last pass.
        for (n, inp, out, k) in [
            (520, 37, 70, 300),
            (1, 3, 4, 2),
            (7, 33, 17, 40),
            (130, 65, 96, 500),
            (9, 1, 5, 3),
            (300, 40, 24, 200),
            (128, 7, 9, 30),
        ] {
            let gy = random(n * out, &mut rng);
            let x = random(n * inp, &mut rng);
            // Two lists of positions sampled in one call (the AG window's candidates ride along
            // with the active entries).
            let idx = indices(out, inp, k, &mut rng);
            let idx2 = indices(out, inp, k / 2 + 1, &mut rng);
            // The f64 sum over tokens at each entry.
            let reference = |gy: &[f32], x: &[f32], idx: &[u32]| -> Vec<f32> {
                idx.iter()
                    .map(|&i| {
                        let (r, c) = (i as usize / inp, i as usize % inp);
                        (0..n)
                            .map(|t| gy[t * out + r] as f64 * x[t * inp + c] as f64)
                            .sum::<f64>() as f32
                    })
                    .collect()
            };
            let (mut got, mut got2) = (vec![0f32; idx.len()], vec![1f32; idx2.len()]);
            sddmm(&mut [(&mut got, &idx), (&mut got2, &idx2)], &gy, &x, n, inp, out);
            assert!(rel_err(&got, &reference(&gy, &x, &idx)) < 1e-6, "shape {n}x{inp}x{out}");
            assert!(
                rel_err(&got2, &reference(&gy, &x, &idx2)) < 1e-6,
                "second list {n}x{inp}x{out}"
            );
            // bf16 inputs (bf16 activations): exact products (`vdpbf16ps` where the CPU has it),
            // f32 sums.
            let (gy16, x16): (Vec<half::bf16>, Vec<half::bf16>) = (
                gy.iter().map(|&v| half::bf16::from_f32(v)).collect(),
                x.iter().map(|&v| half::bf16::from_f32(v)).collect(),
            );
            let widen = |v: &[half::bf16]| v.iter().map(|h| h.to_f32()).collect::<Vec<f32>>();
            let (mut got16, mut got16b) = (vec![0f32; idx.len()], vec![1f32; idx2.len()]);
            let mut targets = [(&mut got16[..], &idx[..]), (&mut got16b[..], &idx2[..])];
            sddmm(&mut targets, gy16.as_slice(), x16.as_slice(), n, inp, out);
            let want16 = reference(&widen(&gy16), &widen(&x16), &idx);
            assert!(rel_err(&got16b, &reference(&widen(&gy16), &widen(&x16), &idx2)) < 1e-6);
            assert!(rel_err(&got16, &want16) < 1e-6, "bf16 shape {n}x{inp}x{out}");
        }
    }

    /// Output, grad_x and grad_values of `x (W + S)^T` against candle autograd on the dense
    /// equivalent, including rows with no active entry.
    #[test]
    fn op_matches_dense_autograd() {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for (n, inp, out, k) in [(5, 8, 6, 7), (33, 64, 48, 300), (17, 31, 29, 1), (64, 96, 160, 2000)] {
            let idx = indices(out, inp, k, &mut rng);
            let vals = random(idx.len(), &mut rng);
            let w = Tensor::from_vec(random(out * inp, &mut rng), (out, inp), &dev).unwrap();
            let xv = random(n * inp, &mut rng);
            let probe = Tensor::from_vec(random(n * out, &mut rng), (n, out), &dev).unwrap();

            // Ours.
            let x = Var::from_vec(xv.clone(), (n, inp), &dev).unwrap();
            let v = Var::from_vec(vals.clone(), idx.len(), &dev).unwrap();
            let y = (x.matmul(&w.t().unwrap()).unwrap()
                + sparse_delta_matmul(&x, &v, Arc::new(idx.clone()), (out, inp), None).unwrap())
            .unwrap();
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();

            // Dense equivalent: S scattered into a dense variable.
            let mut s = vec![0f32; out * inp];
            for (&i, &val) in idx.iter().zip(&vals) {
                s[i as usize] = val;
            }
            let xd = Var::from_vec(xv, (n, inp), &dev).unwrap();
            let sd = Var::from_vec(s, (out, inp), &dev).unwrap();
            let yd = xd.matmul(&(&w + sd.as_tensor()).unwrap().t().unwrap()).unwrap();
            let gd = (&yd * &probe).unwrap().sum_all().unwrap().backward().unwrap();

            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(rel_err(&flat(&y), &flat(&yd)) < 1e-5);
            assert!(rel_err(&flat(g.get(&x).unwrap()), &flat(gd.get(&xd).unwrap())) < 1e-5);
            let dense_gs = flat(gd.get(&sd).unwrap());
            let want: Vec<f32> = idx.iter().map(|&i| dense_gs[i as usize]).collect();
            assert!(
                rel_err(&flat(g.get(&v).unwrap()), &want) < 1e-5,
                "{n}x{inp}x{out} k={k}"
            );
        }
    }

    /// The same with the values added into the base in place: output and both gradients match
    /// the dense equivalent (with and without a dense-gradient hook), and restoring gives back the
    /// base bit for bit, also when the guard is only dropped.
    #[test]
    fn delta_in_base_matches_dense_autograd_and_restores_exactly() {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for (n, inp, out, k) in [(5, 8, 6, 7), (33, 64, 48, 300), (17, 31, 29, 1), (3, 96, 160, 2000)] {
            let idx = indices(out, inp, k, &mut rng);
            let vals = random(idx.len(), &mut rng);
            let wv = random(out * inp, &mut rng);
            let w = Tensor::from_vec(wv.clone(), (out, inp), &dev).unwrap();
            let xv = random(n * inp, &mut rng);
            let probe = Tensor::from_vec(random(n * out, &mut rng), (n, out), &dev).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();

            let mut s = vec![0f32; out * inp];
            for (&i, &val) in idx.iter().zip(&vals) {
                s[i as usize] = val;
            }
            let xd = Var::from_vec(xv.clone(), (n, inp), &dev).unwrap();
            let sd = Var::from_vec(s, (out, inp), &dev).unwrap();
            let yd = xd.matmul(&(&w + sd.as_tensor()).unwrap().t().unwrap()).unwrap();
            let gd = (&yd * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let dense_gs = flat(gd.get(&sd).unwrap());
            let want_gv: Vec<f32> = idx.iter().map(|&i| dense_gs[i as usize]).collect();

            for hooked in [false, true] {
                let guard = DeltaInBase::add(&w, Arc::new(idx.clone()), &vals).unwrap();
                let x = Var::from_vec(xv.clone(), (n, inp), &dev).unwrap();
                let v = Var::from_vec(vals.clone(), idx.len(), &dev).unwrap();
                let cap = Arc::new(Capture(Default::default()));
                let hook = hooked.then(|| cap.clone() as Arc<dyn WeightGradHook>);
                let y = base_with_delta_matmul(&x, &w, &v, Arc::new(idx.clone()), hook).unwrap();
                let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(rel_err(&flat(&y), &flat(&yd)) < 1e-5);
                assert!(rel_err(&flat(g.get(&x).unwrap()), &flat(gd.get(&xd).unwrap())) < 1e-5);
                assert!(
                    rel_err(&flat(g.get(&v).unwrap()), &want_gv) < 1e-5,
                    "{n}x{inp}x{out} k={k}"
                );
                if hooked {
                    assert!(rel_err(&cap.0.lock().unwrap(), &dense_gs) < 1e-5);
                    drop(guard);
                } else {
                    guard.restore().unwrap();
                }
                assert_eq!(flat(&w), wv, "base not restored bit for bit");
            }
        }
    }

    #[test]
    fn frozen_plus_delta_matches_dense_autograd_over_f32_and_nf4_bases() {
        use crate::kernels::qmatrix::QMatrix;
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for (n, inp, out, k) in [(5, 64, 6, 7), (33, 128, 48, 300), (17, 64, 29, 1)] {
            let idx = indices(out, inp, k, &mut rng);
            let vals = random(idx.len(), &mut rng);
            let wv = random(out * inp, &mut rng);
            let q = QMatrix::nf4(&wv, out, inp).unwrap();
            let bases = [
                (
                    Frozen::Dense(Tensor::from_vec(wv.clone(), (out, inp), &dev).unwrap()),
                    wv.clone(),
                ),
                (Frozen::Quantized(Arc::new(q.clone())), q.to_dense()),
            ];
            let xv = random(n * inp, &mut rng);
            let probe = Tensor::from_vec(random(n * out, &mut rng), (n, out), &dev).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (base, dense) in bases {
                // Reference: plain autograd over the dense W + S.
                let mut s = dense.clone();
                let mut mask = vec![0f32; out * inp];
                for (&i, &val) in idx.iter().zip(&vals) {
                    s[i as usize] += val;
                    mask[i as usize] = 1.0;
                }
                let xd = Var::from_vec(xv.clone(), (n, inp), &dev).unwrap();
                let wd = Var::from_vec(s, (out, inp), &dev).unwrap();
                let yd = xd.matmul(&wd.as_tensor().t().unwrap()).unwrap();
                let gd = (&yd * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let dense_gw = flat(gd.get(&wd).unwrap());
                let want_gv: Vec<f32> = idx.iter().map(|&i| dense_gw[i as usize]).collect();

                let x = Var::from_vec(xv.clone(), (n, inp), &dev).unwrap();
                let v = Var::from_vec(vals.clone(), idx.len(), &dev).unwrap();
                let y = frozen_plus_delta_matmul(&x, &base, &v, Arc::new(idx.clone()), None, None).unwrap();
                let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(rel_err(&flat(&y), &flat(&yd)) < 1e-5, "forward {n}x{inp}x{out}");
                assert!(rel_err(&flat(g.get(&x).unwrap()), &flat(gd.get(&xd).unwrap())) < 1e-5);
                assert!(
                    rel_err(&flat(g.get(&v).unwrap()), &want_gv) < 1e-5,
                    "{n}x{inp}x{out} k={k}"
                );
            }
        }
    }

    /// A training run's kept packs ([`DeltaPacks`]) change nothing: through new values and new
    /// indices, the bf16 forward and both gradients equal those of products that pack the base
    /// plus the delta anew.
    #[test]
    fn kept_packs_give_the_per_product_result() {
        use candle_core::DType;
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let (n, inp, out) = (37, 96, 72);
        let base = Frozen::Dense(Tensor::from_vec(random(out * inp, &mut rng), (out, inp), &dev).unwrap());
        let mut bf16 = |shape: &[usize]| uniform_tensor(shape, 1.0, &mut rng).to_dtype(DType::BF16).unwrap();
        let (x16, p16) = (bf16(&[n, inp]), bf16(&[n, out]));
        let packs = Arc::new(DeltaPacks::default());
        let (a, b) = (indices(out, inp, 700, &mut rng), indices(out, inp, 500, &mut rng));
        for idx in [&a, &a, &b, &a] {
            let idx = Arc::new(idx.clone());
            let vals: Vec<f32> = random(idx.len(), &mut rng).iter().map(|v| v * 0.01).collect();
            let run = |packs: Option<Arc<DeltaPacks>>| {
                let x = Var::from_tensor(&x16).unwrap();
                let v = Var::from_vec(vals.clone(), idx.len(), &dev).unwrap();
                let y = frozen_plus_delta_matmul(&x, &base, &v, idx.clone(), None, packs).unwrap();
                let g = (&y * &p16).unwrap().sum_all().unwrap().backward().unwrap();
                [&y, g.get(&x).unwrap(), g.get(&v).unwrap()].map(|t| vec_of(t).unwrap())
            };
            assert_eq!(run(Some(packs.clone())), run(None));
        }
    }

    /// bf16 activations: the base and the delta are summed in f32 and rounded once, the
    /// input is rounded, the product runs over those bf16 operands with f32 sums, and its
    /// result is rounded to bf16: within one bf16 step of the f64 product of the rounded
    /// operands, forward and backward. The values' gradient stays f32 (no rounding of the
    /// operands beyond the bf16 inputs themselves).
    #[test]
    fn bf16_activations_multiply_rounded_operands() {
        use crate::kernels::common::rounded;
        use candle_core::DType;
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (n, inp, out, k) = (19, 64, 40, 200);
        let idx = Arc::new(indices(out, inp, k, &mut rng));
        let vals: Vec<f32> = random(idx.len(), &mut rng).iter().map(|v| v * 0.01).collect();
        let wv = random(out * inp, &mut rng);
        let base = Frozen::Dense(Tensor::from_vec(wv.clone(), (out, inp), &dev).unwrap());
        let x16 = Tensor::from_vec(random(n * inp, &mut rng), (n, inp), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let p16 = Tensor::from_vec(random(n * out, &mut rng), (n, out), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let x = Var::from_tensor(&x16).unwrap();
        let v = Var::from_vec(vals.clone(), idx.len(), &dev).unwrap();
        let y = frozen_plus_delta_matmul(&x, &base, &v, idx.clone(), None, None).unwrap();
        let g = (&y * &p16).unwrap().sum_all().unwrap().backward().unwrap();
        let (gx, gv) = (g.get(&x).unwrap(), g.get(&v).unwrap());
        assert_eq!(
            (y.dtype(), gx.dtype(), gv.dtype()),
            (DType::BF16, DType::BF16, DType::F32)
        );

        let f32s = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (xs, ps) = (f32s(&x16), f32s(&p16));
        let mut w = wv.clone();
        idx.iter().zip(&vals).for_each(|(&i, &d)| w[i as usize] += d);
        let w16: Vec<f64> = w.iter().map(|&v| rounded(v) as f64).collect();
        // Within one bf16 step (2^-8 relative) of the reference, plus the f32 sums' error.
        let close = |got: f32, want: f64, mag: f64, what: &str| {
            assert!(
                (got as f64 - want).abs() <= want.abs() / 256.0 + 1e-5 * mag,
                "{what}: {got} vs {want}"
            );
        };
        let yv = f32s(&y);
        for i in 0..n {
            for o in 0..out {
                let terms = (0..inp).map(|c| xs[i * inp + c] as f64 * w16[o * inp + c]);
                let mag = terms.clone().map(f64::abs).sum();
                close(yv[i * out + o], terms.sum(), mag, "forward");
            }
        }
        let gxv = f32s(gx);
        for i in 0..n {
            for c in 0..inp {
                let terms = (0..out).map(|o| ps[i * out + o] as f64 * w16[o * inp + c]);
                let mag = terms.clone().map(f64::abs).sum();
                close(gxv[i * inp + c], terms.sum(), mag, "input gradient");
            }
        }
        // The values' gradient: p^T x at the active entries, from the bf16 inputs, in f32.
        for (j, &flat) in idx.iter().enumerate() {
            let (o, c) = (flat as usize / inp, flat as usize % inp);
            let want: f64 = (0..n).map(|i| ps[i * out + o] as f64 * xs[i * inp + c] as f64).sum();
            assert!((gv.to_vec1::<f32>().unwrap()[j] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()));
        }
    }

    #[test]
    fn delta_in_base_refuses_a_mismatch() {
        let w = Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(DeltaInBase::add(&w, Arc::new(vec![1, 12]), &[1.0, 2.0]).is_err());
        assert!(DeltaInBase::add(&w, Arc::new(vec![1, 2]), &[1.0]).is_err());
        let t = w.t().unwrap();
        assert!(DeltaInBase::add(&t, Arc::new(vec![1]), &[1.0]).is_err());
        assert_eq!(w.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    /// Records the dense gradient it is handed; follows no positions.
    struct Capture(std::sync::Mutex<Vec<f32>>);
    impl WeightGradHook for Capture {
        fn positions(&self) -> Option<Vec<u32>> {
            None
        }
        fn observe_dense(&self, grad: &[f32], _: usize, _: usize) {
            *self.0.lock().unwrap() = grad.to_vec();
        }
        fn observe_at(&self, _: &[f32]) {
            panic!("no positions were named");
        }
    }

    /// Follows fixed positions and records the gradient it is handed at them.
    struct Follow(Vec<u32>, std::sync::Mutex<Vec<f32>>);
    impl WeightGradHook for Follow {
        fn positions(&self) -> Option<Vec<u32>> {
            Some(self.0.clone())
        }
        fn observe_dense(&self, _: &[f32], _: usize, _: usize) {
            panic!("a hook with positions wants no dense gradient");
        }
        fn observe_at(&self, grad: &[f32]) {
            *self.1.lock().unwrap() = grad.to_vec();
        }
    }

    #[test]
    fn hook_sees_the_dense_gradient_and_values_get_the_same_grads() {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (n, inp, out) = (11, 20, 12);
        let idx = indices(out, inp, 30, &mut rng);
        let x = Var::from_vec(random(n * inp, &mut rng), (n, inp), &dev).unwrap();
        let v = Var::from_vec(random(idx.len(), &mut rng), idx.len(), &dev).unwrap();
        let probe = Tensor::from_vec(random(n * out, &mut rng), (n, out), &dev).unwrap();
        let run = |hook: Option<Arc<dyn WeightGradHook>>| {
            let y = sparse_delta_matmul(&x, &v, Arc::new(idx.clone()), (out, inp), hook).unwrap();
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(&v).unwrap().to_vec1::<f32>().unwrap()
        };
        let cap = Arc::new(Capture(Default::default()));
        let with = run(Some(cap.clone()));
        let without = run(None);
        assert!(rel_err(&with, &without) < 1e-5);
        let dense = cap.0.lock().unwrap().clone();
        assert_eq!(dense.len(), out * inp);
        // The dense gradient is probe^T x.
        let want: Vec<f32> = probe
            .t()
            .unwrap()
            .matmul(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(rel_err(&dense, &want) < 1e-6);
        // A hook that follows positions gets the dense gradient at them, sampled, and the
        // values their usual gradients.
        let positions = indices(out, inp, 45, &mut rng);
        let follow = Arc::new(Follow(positions.clone(), Default::default()));
        let sampled = run(Some(follow.clone()));
        assert!(rel_err(&sampled, &without) < 1e-5);
        let at: Vec<f32> = positions.iter().map(|&i| want[i as usize]).collect();
        assert!(rel_err(&follow.1.lock().unwrap(), &at) < 1e-5);
    }
}
