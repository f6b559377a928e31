//! Frozen projection weights held quantised, and multiplied without ever forming the dense
//! matrix: a tile of rows is dequantised into a small scratch buffer and handed to the GEMM, for
//! the forward `y = x W^T` and for the input gradient `dx = dy W` alike.
//!
//! Formats:
//! - NF4 (QLoRA, Dettmers et al. 2023): blocks of 64 weights along a row (the last block of a row
//!   may be shorter), each weight one of 16
//!   normal-quantile levels times the block's absmax; the absmax values are themselves quantised
//!   ("double quantisation"): minus their mean, in groups of 256 blocks, to int8 with one f32
//!   scale per group. Bitsandbytes stores the second level as 8-bit dynamic floats; spiel uses
//!   linear int8, with the same storage (4.127 bits per weight). Nibbles: element `2j` in the
//!   low half of byte `j`, `2j + 1` in the high half.
//! - GGUF Q4_0, Q4_1 and Q8_0 blocks, kept exactly as the file stores them (see [`crate::kernels::quant`]);
//! - F16 and BF16 rows (`--dtype bf16`), widened to f32 the same way, a tile at a time.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::bf16mm::{self, PackCache, Products, Right, SparseAdd, View, WeightRows};
use crate::kernels::common::Values;
use crate::kernels::gemm::{gemm_gtx, gemm_gw, gemm_xwt};
use crate::kernels::profile::{span, Phase};
use crate::kernels::quant::{self, Format};
use crate::{Error, Result};

/// The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, App. E).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Weights per NF4 block.
pub const NF4_BLOCK: usize = 64;
/// NF4 blocks per group of the second-level (absmax) quantisation.
pub const NF4_GROUP: usize = 256;

/// How a [`QMatrix`] stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// 4-bit NormalFloat with double-quantised block scales.
    Nf4,
    /// A GGUF block format (Q4_0, Q4_1 or Q8_0), as loaded, or 16-bit floats (F16, BF16).
    Ggml(Format),
}

impl QFormat {
    /// Short name for messages and tables.
    pub fn name(self) -> String {
        match self {
            QFormat::Nf4 => "NF4".into(),
            QFormat::Ggml(f) => format!("{f:?}"),
        }
    }
}

/// A `[rows, cols]` weight matrix in a quantised format, row-major.
#[derive(Debug, Clone)]
pub struct QMatrix {
    format: QFormat,
    rows: usize,
    cols: usize,
    /// Packed weights: NF4 nibbles, or GGUF blocks.
    data: Vec<u8>,
    /// NF4 only: int8 code of each block's absmax.
    absmax_codes: Vec<i8>,
    /// NF4 only: f32 scale of each group of absmax codes.
    group_scales: Vec<f32>,
    /// NF4 only: the mean absmax, subtracted before the second-level quantisation.
    absmax_offset: f32,
    /// The packed bf16 operands kept after their first use ([`QMatrix::keep_bf16_packs`]).
    packs: Option<Arc<PackCache>>,
}

impl QMatrix {
    /// Quantise `w` (`rows * cols` values, row-major) to NF4. Blocks run along rows (the last
    /// block of a row may be shorter); `cols` must be even.
    pub fn nf4(w: &[f32], rows: usize, cols: usize) -> Result<QMatrix> {
        if w.len() != rows * cols || !cols.is_multiple_of(2) {
            return Err(Error::Invalid(format!(
                "NF4 needs an even row length and rows * cols values; got [{rows}, {cols}] and {}",
                w.len()
            )));
        }
        let absmax: Vec<f32> = w
            .par_chunks(cols.max(1))
            .flat_map_iter(|row| {
                row.chunks(NF4_BLOCK)
                    .map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs())))
            })
            .collect();
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
        let mut absmax_codes = Vec::with_capacity(absmax.len());
        let mut group_scales = Vec::with_capacity(absmax.len().div_ceil(NF4_GROUP));
        for g in absmax.chunks(NF4_GROUP) {
            let s = g.iter().fold(0f32, |m, a| m.max((a - offset).abs())) / 127.0;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            group_scales.push(s);
            absmax_codes.extend(
                g.iter()
                    .map(|a| ((a - offset) * inv).round().clamp(-127.0, 127.0) as i8),
            );
        }
        let mut q = QMatrix {
            format: QFormat::Nf4,
            rows,
            cols,
            data: vec![0u8; w.len() / 2],
            absmax_codes,
            group_scales,
            absmax_offset: offset,
            packs: None,
        };
        let bpr = cols.div_ceil(NF4_BLOCK);
        let scales: Vec<f32> = (0..absmax.len()).map(|b| q.nf4_absmax(b)).collect();
        q.data
            .par_chunks_mut((cols / 2).max(1))
            .zip(w.par_chunks(cols.max(1)))
            .enumerate()
            .for_each(|(r, (out, row))| {
                for (k, (o, b)) in out.chunks_mut(NF4_BLOCK / 2).zip(row.chunks(NF4_BLOCK)).enumerate() {
                    let a = scales[r * bpr + k];
                    let inv = if a > 0.0 { 1.0 / a } else { 0.0 };
                    for (j, byte) in o.iter_mut().enumerate() {
                        *byte = nearest_nf4(b[2 * j] * inv) | (nearest_nf4(b[2 * j + 1] * inv) << 4);
                    }
                }
            });
        Ok(q)
    }

    /// Keep GGUF blocks (`Q4_0`, `Q4_1`, `Q8_0`, or 16-bit `F16` / `BF16` values) of a
    /// `[rows, cols]` matrix as they are.
    pub fn from_ggml(format: Format, data: Vec<u8>, rows: usize, cols: usize) -> Result<QMatrix> {
        if !matches!(
            format,
            Format::Q4_0 | Format::Q4_1 | Format::Q8_0 | Format::F16 | Format::BF16
        ) {
            return Err(Error::Invalid(format!("{format:?} is not a block or 16-bit format")));
        }
        let (per, _) = format.block();
        if !cols.is_multiple_of(per) || format.bytes_for(rows * cols) != Some(data.len()) {
            return Err(Error::Invalid(format!(
                "{format:?} [{rows}, {cols}]: {} bytes do not hold whole-block rows",
                data.len()
            )));
        }
        Ok(QMatrix {
            format: QFormat::Ggml(format),
            rows,
            cols,
            data,
            absmax_codes: Vec::new(),
            group_scales: Vec::new(),
            absmax_offset: 0.0,
            packs: None,
        })
    }

    /// Quantise `w` to `format` (NF4, Q4_0, Q4_1, Q8_0, F16 or BF16).
    pub fn quantize(format: QFormat, w: &[f32], rows: usize, cols: usize) -> Result<QMatrix> {
        match format {
            QFormat::Nf4 => QMatrix::nf4(w, rows, cols),
            QFormat::Ggml(f) => {
                let data = quant::quantize(f, w)
                    .ok_or_else(|| Error::Invalid(format!("{f:?}: [{rows}, {cols}] is not whole blocks")))?;
                QMatrix::from_ggml(f, data, rows, cols)
            }
        }
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The storage format.
    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> usize {
        self.data.len() + self.absmax_codes.len() + 4 * self.group_scales.len()
    }

    /// The dequantised absmax of NF4 block `b`.
    fn nf4_absmax(&self, b: usize) -> f32 {
        self.absmax_codes[b] as f32 * self.group_scales[b / NF4_GROUP] + self.absmax_offset
    }

    /// Keep the packed bf16 operands of bf16 products ([`bf16mm`]) once built, instead of
    /// packing this never-changing matrix on every product: for the vocabulary head, which
    /// takes four products per update; costs up to 4 bytes per value once used both ways.
    pub fn keep_bf16_packs(&mut self) {
        self.packs = Some(Arc::new(PackCache::default()));
    }

    /// Bytes of one stored row (GGUF formats) or nibble bytes (NF4).
    fn row_bytes(&self) -> usize {
        match self.format {
            QFormat::Nf4 => self.cols / 2,
            QFormat::Ggml(f) => f.bytes_for(self.cols).unwrap_or(0),
        }
    }

    /// Dequantise rows `r0..r1` into `out` (`(r1 - r0) * cols` values), in parallel by row.
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let (rb, cols) = (self.row_bytes(), self.cols);
        out.par_chunks_mut(cols).enumerate().for_each(|(i, dst)| {
            let r = r0 + i;
            let src = &self.data[r * rb..(r + 1) * rb];
            match self.format {
                QFormat::Ggml(f) => quant::dequantize_serial(f, src, dst),
                QFormat::Nf4 => {
                    let blocks_per_row = cols.div_ceil(NF4_BLOCK);
                    for (k, (d, s)) in dst.chunks_mut(NF4_BLOCK).zip(src.chunks(NF4_BLOCK / 2)).enumerate() {
                        let a = self.nf4_absmax(r * blocks_per_row + k);
                        for (j, &byte) in s.iter().enumerate() {
                            d[2 * j] = NF4_LEVELS[(byte & 0xF) as usize] * a;
                            d[2 * j + 1] = NF4_LEVELS[(byte >> 4) as usize] * a;
                        }
                    }
                }
            }
        });
        debug_assert_eq!(out.len(), (r1 - r0) * cols);
    }

    /// Rows `ids` in f32, one after another (an embedding lookup), `ids.len() * cols` values.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the {} rows of the embedding table",
                self.rows
            )));
        }
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&i, dst) in ids.iter().zip(out.chunks_mut(self.cols.max(1))) {
            self.dequantize_rows(i as usize, i as usize + 1, dst);
        }
        Ok(out)
    }

    /// The whole matrix in f32 (for merging and export only; training never calls this).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }

    /// Rows per dequantised tile: a few hundred kilobytes of scratch, reused across tiles.
    fn tile_rows(&self) -> usize {
        (65_536 / self.cols.max(1)).clamp(16, 256)
    }

    /// Call `f(r0, r1, tile)` for consecutive row ranges, `tile` holding rows `r0..r1`
    /// dequantised (one scratch buffer reused for every tile).
    fn for_each_tile(&self, mut f: impl FnMut(usize, usize, &[f32])) {
        let tile = self.tile_rows();
        let mut scratch = vec![0f32; tile * self.cols];
        for r0 in (0..self.rows).step_by(tile) {
            let r1 = (r0 + tile).min(self.rows);
            let w = &mut scratch[..(r1 - r0) * self.cols];
            self.dequantize_rows(r0, r1, w);
            f(r0, r1, w);
        }
    }

    /// `y = x W^T` for `x: [n, cols]`, giving `y: [n, rows]`.
    pub fn matmul_t(&self, x: &[f32], n: usize) -> Vec<f32> {
        if n == 1 && self.format == QFormat::Ggml(Format::BF16) {
            return self.matvec_bf16(x);
        }
        let rows = self.rows;
        let mut y = vec![0f32; n * rows];
        self.for_each_tile(|r0, r1, w| gemm_xwt(&mut y, r0, rows, x, n, w, r1 - r0));
        y
    }

    /// `W x` for one row `x` over bf16 storage (decoding with `--dtype bf16`): each weight row
    /// widened in registers inside its dot product, so the pass reads 2 bytes per weight, half
    /// of an f32 weight's, and no tile is dequantised first. Rows in blocks of at least 16, about
    /// 8 per thread.
    fn matvec_bf16(&self, x: &[f32]) -> Vec<f32> {
        let (rows, cols, rb) = (self.rows, self.cols, self.row_bytes());
        let mut y = vec![0f32; rows];
        let block = rows.div_ceil(8 * rayon::current_num_threads().max(1)).max(16);
        y.par_chunks_mut(block).enumerate().for_each(|(b, out)| {
            for (i, o) in out.iter_mut().enumerate() {
                let r = b * block + i;
                *o = dot_bf16(&x[..cols], &self.data[r * rb..(r + 1) * rb]);
            }
        });
        y
    }

    /// `dx = g W` for `g: [n, rows]`, giving `dx: [n, cols]` (the input gradient of [`Self::matmul_t`]).
    pub fn matmul(&self, g: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let mut dx = vec![0f32; n * cols];
        self.for_each_tile(|r0, r1, w| gemm_gw(&mut dx, r0 > 0, g, r0, rows, n, w, r1 - r0));
        dx
    }
}

/// `x . w` for f32 `x` and bf16 `w` (little-endian bytes, 2 per value): AVX-512 where the CPU
/// has it (each 16 weights widened by a shift inside the register), else a portable loop with
/// 64 running sums.
fn dot_bf16(x: &[f32], w: &[u8]) -> f32 {
    assert_eq!(w.len(), 2 * x.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; the lengths were checked above.
        return unsafe { dot_bf16_avx512(x, w) };
    }
    dot_bf16_portable(x, w)
}

fn dot_bf16_portable(x: &[f32], w: &[u8]) -> f32 {
    let widen = |b: &[u8]| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    let mut acc = [0f32; 64];
    let (xs, ws) = (x.chunks_exact(64), w.chunks_exact(128));
    let (xr, wr) = (xs.remainder(), ws.remainder());
    for (xc, wc) in xs.zip(ws) {
        for ((a, &xv), wb) in acc.iter_mut().zip(xc).zip(wc.chunks_exact(2)) {
            *a += xv * widen(wb);
        }
    }
    let tail: f32 = xr.iter().zip(wr.chunks_exact(2)).map(|(&xv, wb)| xv * widen(wb)).sum();
    acc.iter().sum::<f32>() + tail
}

/// # Safety
/// The CPU must have AVX-512F; `w` must hold `2 * x.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_bf16_avx512(x: &[f32], w: &[u8]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let widen = |at: usize| {
        let bits = _mm256_loadu_si256(wp.add(2 * at) as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    };
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            let at = i + 16 * j;
            *a = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(at)), widen(at), *a);
        }
        i += 64;
    }
    while i + 16 <= n {
        acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(i)), widen(i), acc[0]);
        i += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum) + dot_bf16_portable(&x[i..], &w[2 * i..])
}

/// Index of the NF4 level nearest to `v` (ties to the lower level).
fn nearest_nf4(v: f32) -> u8 {
    let mut best = 0;
    let mut dist = f32::INFINITY;
    for (i, &l) in NF4_LEVELS.iter().enumerate() {
        let d = (v - l).abs();
        if d < dist {
            best = i;
            dist = d;
        }
    }
    best as u8
}

/// A frozen `[rows, cols]` weight for the products below: a dense f32 tensor, used in place, or
/// quantised / 16-bit rows widened a tile at a time.
#[derive(Debug, Clone)]
pub enum Frozen {
    /// A dense f32 CPU tensor (not a variable).
    Dense(Tensor),
    /// A [`QMatrix`].
    Quantized(Arc<QMatrix>),
}

impl Frozen {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Frozen::Dense(t) => {
                let d = t.dims();
                (d[0], d.get(1).copied().unwrap_or(1))
            }
            Frozen::Quantized(q) => q.shape(),
        }
    }

    /// `x W^T` for `x: [n, cols]` (f32 or bf16), with `products`' operands.
    pub(crate) fn matmul_t<'a>(
        &self,
        x: impl Into<Values<'a>>,
        n: usize,
        products: Products,
    ) -> candle_core::Result<Vec<f32>> {
        let x = x.into();
        if products.bf16_for(n) {
            return Ok(self.bf16_product(x, n, true, None, None));
        }
        let x = x.to_f32();
        match self {
            Frozen::Quantized(q) => Ok(q.matmul_t(&x, n)),
            Frozen::Dense(t) => with_slice(t, |w| {
                let rows = t.dims()[0];
                let mut y = vec![0f32; n * rows];
                gemm_xwt(&mut y, 0, rows, &x, n, w, rows);
                y
            }),
        }
    }

    /// `g W` for `g: [n, rows]` (f32 or bf16), with `products`' operands.
    pub(crate) fn matmul<'a>(
        &self,
        g: impl Into<Values<'a>>,
        n: usize,
        products: Products,
    ) -> candle_core::Result<Vec<f32>> {
        let g = g.into();
        if products.bf16_for(n) {
            return Ok(self.bf16_product(g, n, false, None, None));
        }
        let g = g.to_f32();
        match self {
            Frozen::Quantized(q) => Ok(q.matmul(&g, n)),
            Frozen::Dense(t) => with_slice(t, |w| {
                let (rows, cols) = self.shape();
                let mut dx = vec![0f32; n * cols];
                gemm_gw(&mut dx, false, &g, 0, rows, n, w, rows);
                dx
            }),
        }
    }

    /// `x (W + delta)^T` for `x: [n, cols]` when `transposed`, else `x (W + delta)` for
    /// `x: [n, rows]`, over bf16 operands ([`bf16mm`]); any storage, read a block of rows at a
    /// time. Without a delta the packed weight is kept in `kept` (else in the matrix's own
    /// cache, if it has one).
    pub(crate) fn bf16_product(
        &self,
        x: Values,
        n: usize,
        transposed: bool,
        delta: Option<SparseAdd>,
        kept: Option<&PackCache>,
    ) -> Vec<f32> {
        let (x, right, width) = self.bf16_operands(x, n, transposed, delta, kept);
        let mut y = vec![0f32; n * width];
        bf16mm::gemm(&mut y, false, 1.0, x, right);
        y
    }

    /// [`Frozen::bf16_product`] rounded to bf16 as it is written, for bf16 activations.
    pub(crate) fn bf16_product_to_bf16(
        &self,
        x: Values,
        n: usize,
        transposed: bool,
        delta: Option<SparseAdd>,
    ) -> Vec<half::bf16> {
        let (x, right, width) = self.bf16_operands(x, n, transposed, delta, None);
        let mut y = vec![half::bf16::ZERO; n * width];
        bf16mm::gemm_to_bf16(&mut y, x, right);
        y
    }

    /// The operands of [`Frozen::bf16_product`] and the output's width.
    fn bf16_operands<'a>(
        &'a self,
        x: Values<'a>,
        n: usize,
        transposed: bool,
        delta: Option<SparseAdd<'a>>,
        kept: Option<&'a PackCache>,
    ) -> (View<'a>, Right<'a>, usize) {
        let (rows, cols) = self.shape();
        let (k, width) = if transposed { (cols, rows) } else { (rows, cols) };
        let cache = match (self, delta) {
            (_, Some(_)) => None,
            _ if kept.is_some() => kept,
            (Frozen::Quantized(q), None) => q.packs.as_deref(),
            _ => None,
        };
        let right = Right::Weight {
            w: self,
            delta,
            transposed,
            cache,
        };
        (View::rows(x, n, k), right, width)
    }
}

impl WeightRows for Frozen {
    fn shape(&self) -> (usize, usize) {
        Frozen::shape(self)
    }

    fn read_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        match self {
            Frozen::Quantized(q) => q.dequantize_rows(r0, r1, out),
            Frozen::Dense(t) => {
                let cols = self.shape().1;
                with_slice(t, |w| out.copy_from_slice(&w[r0 * cols..r1 * cols]))
                    .expect("a frozen dense weight is a contiguous f32 CPU tensor");
            }
        }
    }
}

/// Run `f` on the f32 data of a contiguous CPU tensor, without copying it.
pub(crate) fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("frozen weight: CPU tensors only");
    };
    Ok(f(crate::kernels::common::cpu_slice(cpu, layout, "frozen weight")?))
}

/// `x W^T` for `x: [N, in]` and a frozen `W`, differentiable in `x` only: the backward forms
/// `grad W` and never the `[out, in]` weight gradient (which would cost as much as the forward
/// for every frozen projection and the vocabulary head).
pub fn frozen_matmul_t(x: &Tensor, w: &Frozen) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(FrozenMatmulT { w: w.clone() })?)
}

/// `x W^T` for `x: [N, in]` (f32 or bf16) and a trainable f32 `W: [out, in]` (full
/// fine-tuning), differentiable in both: the backward forms `g W` and the weight gradient
/// `g^T x` straight in `W`'s layout. (Through candle's matmul with `W^T`, the weight gradient
/// came out as `[in, out]` and was added, transposed, into a zeroed `[out, in]` one: two extra
/// strided passes over every weight per update.)
pub fn trainable_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, TrainableMatmulT)?)
}

/// Forward `x W^T`; backward `g W` and `g^T x`.
struct TrainableMatmulT;

impl CustomOp2 for TrainableMatmulT {
    fn name(&self) -> &'static str {
        "trainable-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::ProjectionsForward);
        let x = crate::kernels::common::cpu_f32(s1, l1, "trainable-matmul-t input")?;
        let w = crate::kernels::common::cpu_slice(s2, l2, "trainable-matmul-t weight")?;
        let ((n, k), (rows, cols)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if k != cols {
            candle_core::bail!("trainable-matmul-t: input has {k} columns, weight has {cols}");
        }
        let mut y = vec![0f32; n * rows];
        if Products::for_storage(s1).bf16_for(n) {
            bf16mm::gemm(
                &mut y,
                false,
                1.0,
                View::rows(&*x, n, k),
                Right::Matrix(View::transposed(w, k, rows)),
            );
        } else {
            gemm_xwt(&mut y, 0, rows, &x, n, w, rows);
        }
        Ok((crate::kernels::common::storage_like(y, s1), Shape::from((n, rows))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ((n, cols), (rows, _)) = (x.dims2()?, w.dims2()?);
        let bf16 = Products::for_activations(x.dtype()).bf16_for(n);
        // x, g and W read in place (each a copy before).
        let (dx, dw) = crate::kernels::common::with_f32s(&[x, grad, w], |t| {
            let (xs, gs, ws) = (t[0], t[1], t[2]);
            let mut dx = vec![0f32; n * cols];
            {
                let _t = span(Phase::ProjectionsInputGrad);
                if bf16 {
                    bf16mm::gemm(
                        &mut dx,
                        false,
                        1.0,
                        View::rows(gs, n, rows),
                        Right::Matrix(View::rows(ws, rows, cols)),
                    );
                } else {
                    gemm_gw(&mut dx, false, gs, 0, rows, n, ws, rows);
                }
            }
            let mut dw = vec![0f32; rows * cols];
            {
                let _t = span(Phase::WeightGradients);
                if bf16 {
                    bf16mm::gemm(
                        &mut dw,
                        false,
                        1.0,
                        View::transposed(gs, rows, n),
                        Right::Matrix(View::rows(xs, n, cols)),
                    );
                } else {
                    gemm_gtx(&mut dw, gs, xs, n, rows, cols);
                }
            }
            (dx, dw)
        })?;
        Ok((
            Some(crate::kernels::common::grad_like(dx, x)?),
            Some(Tensor::from_vec(dw, (rows, cols), w.device())?),
        ))
    }
}

/// Forward `x W^T`; backward `g W`.
struct FrozenMatmulT {
    w: Frozen,
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::ProjectionsForward);
        let x = Values::of(s, l, "frozen-matmul-t")?;
        let (n, k) = l.shape().dims2()?;
        let (rows, cols) = self.w.shape();
        if k != cols {
            candle_core::bail!("frozen-matmul-t: input has {k} columns, weight has {cols}");
        }
        let products = Products::for_storage(s);
        if products.bf16_for(n) {
            let y = self.w.bf16_product_to_bf16(x, n, true, None);
            return Ok((CpuStorage::BF16(y), Shape::from((n, rows))));
        }
        let y = self.w.matmul_t(x, n, products)?;
        Ok((crate::kernels::common::storage_like(y, s), Shape::from((n, rows))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&FrozenMatmul { w: self.w.clone() })?,
        ))
    }
}

/// `g W` (the input gradient of [`FrozenMatmulT`]).
struct FrozenMatmul {
    w: Frozen,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::ProjectionsInputGrad);
        let g = Values::of(s, l, "frozen-matmul")?;
        let (n, r) = l.shape().dims2()?;
        let (rows, cols) = self.w.shape();
        if r != rows {
            candle_core::bail!("frozen-matmul: gradient has {r} columns, weight has {rows} rows");
        }
        let products = Products::for_storage(s);
        if products.bf16_for(n) {
            let dx = self.w.bf16_product_to_bf16(g, n, false, None);
            return Ok((CpuStorage::BF16(dx), Shape::from((n, cols))));
        }
        let dx = self.w.matmul(g, n, products)?;
        Ok((crate::kernels::common::storage_like(dx, s), Shape::from((n, cols))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    /// Reference NF4 decoder: one element at a time, straight from the format's definition.
    fn nf4_reference(q: &QMatrix) -> Vec<f64> {
        let bpr = q.cols.div_ceil(NF4_BLOCK);
        (0..q.rows * q.cols)
            .map(|i| {
                let block = (i / q.cols) * bpr + (i % q.cols) / NF4_BLOCK;
                let absmax = q.absmax_codes[block] as f32 * q.group_scales[block / NF4_GROUP] + q.absmax_offset;
                let byte = q.data[i / 2];
                let nib = if i % 2 == 0 { byte & 0xF } else { byte >> 4 };
                NF4_LEVELS[nib as usize] as f64 * absmax as f64
            })
            .collect()
    }

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        // Mostly small with occasional outliers, as trained weights are.
        (0..n)
            .map(|_| {
                let v: f32 = rng.gen_range(-0.05..0.05);
                if rng.gen_bool(0.01) {
                    v * 20.0
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn nf4_dequantize_is_bit_exact_and_error_within_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Awkward shapes: one block, a row tail of groups, more than one group of 256 blocks.
        // Awkward shapes: one block, ragged last blocks (96, 2), more than one group of 256.
        for (rows, cols) in [(1, 64), (3, 192), (97, 576), (300, 128), (5, 96), (7, 2)] {
            let w = random(rows * cols, &mut rng);
            let q = QMatrix::nf4(&w, rows, cols).unwrap();
            let blocks = rows * cols.div_ceil(64);
            assert_eq!(q.bytes(), rows * cols / 2 + blocks + 4 * blocks.div_ceil(256));
            let got = q.to_dense();
            let want = nf4_reference(&q);
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                assert_eq!(*g, *r as f32, "[{rows}, {cols}] element {i}");
            }
            let row_blocks = |v: &[f32]| -> Vec<Vec<f32>> {
                v.chunks(cols).flat_map(|r| r.chunks(64).map(|b| b.to_vec())).collect()
            };
            for (b, (x, y)) in row_blocks(&w).iter().zip(row_blocks(&got)).enumerate() {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let stored = q.nf4_absmax(b);
                // Half the widest level gap, plus the absmax's own quantisation error.
                let bound = 0.5 * (1.0 - 0.696_192_8) * stored.abs() + (amax - stored).abs() + 1e-7;
                for (a, c) in x.iter().zip(y) {
                    assert!((a - c).abs() <= bound, "block {b}: {a} vs {c} (bound {bound})");
                }
            }
        }
        assert!(QMatrix::nf4(&[0.0; 95], 1, 95).is_err());
        let z = QMatrix::nf4(&[0.0; 64], 1, 64).unwrap();
        assert!(z.to_dense().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn ggml_blocks_kept_as_loaded_dequantize_like_the_file_reader() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for f in [Format::Q4_0, Format::Q4_1, Format::Q8_0, Format::F16, Format::BF16] {
            let (rows, cols) = (5, 96);
            let w = random(rows * cols, &mut rng);
            let bytes = quant::quantize(f, &w).unwrap();
            let mut want = vec![0f32; rows * cols];
            quant::dequantize(f, &bytes, &mut want);
            let q = QMatrix::from_ggml(f, bytes, rows, cols).unwrap();
            assert_eq!(q.to_dense(), want, "{f:?}");
        }
        assert!(QMatrix::from_ggml(Format::Q4_0, vec![0; 17], 1, 32).is_err());
        assert!(QMatrix::from_ggml(Format::F32, vec![0; 128], 1, 32).is_err());
        assert!(QMatrix::from_ggml(Format::BF16, vec![0; 62], 1, 32).is_err());
    }

    /// Gathering rows (the embedding lookup of a bf16 table) gives the dequantised rows, and an
    /// id past the table is an error, not a panic.
    #[test]
    fn gathered_rows_are_the_dequantised_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (rows, cols) = (37, 18);
        let w = random(rows * cols, &mut rng);
        for format in [QFormat::Ggml(Format::BF16), QFormat::Nf4] {
            let q = QMatrix::quantize(format, &w, rows, cols).unwrap();
            let dense = q.to_dense();
            let ids = [36u32, 0, 5, 5, 17];
            let got = q.gather_rows(&ids).unwrap();
            for (k, &i) in ids.iter().enumerate() {
                let i = i as usize;
                assert_eq!(&got[k * cols..(k + 1) * cols], &dense[i * cols..(i + 1) * cols]);
            }
            assert!(q.gather_rows(&[37]).unwrap_err().to_string().contains("37"));
        }
        // bf16 keeps 8 mantissa bits: relative error at most 2^-8 of each value.
        let q = QMatrix::quantize(QFormat::Ggml(Format::BF16), &w, rows, cols).unwrap();
        for (a, b) in w.iter().zip(q.to_dense()) {
            assert!((a - b).abs() <= a.abs() / 256.0, "{a} vs {b}");
        }
    }

    /// `x W^T` and its input gradient through the op match f64 products with the dequantised W,
    /// on shapes that leave ragged tiles.
    #[test]
    fn tiled_products_and_gradient_match_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for (format, n, rows, cols) in [
            (QFormat::Nf4, 7, 300, 128),
            (QFormat::Nf4, 2, 33, 96),
            (QFormat::Ggml(Format::Q4_0), 3, 67, 1024),
            (QFormat::Ggml(Format::Q8_0), 1, 5, 32),
            (QFormat::Ggml(Format::BF16), 4, 259, 50),
            // One row: the matrix-vector paths (bf16: a dot product over the stored bytes, in
            // blocks of 64 plus a tail), with rows and columns off every block size.
            (QFormat::Ggml(Format::BF16), 1, 133, 37),
            (QFormat::Ggml(Format::BF16), 1, 70, 300),
            (QFormat::Nf4, 1, 40, 96),
        ] {
            let w = random(rows * cols, &mut rng);
            let q = Arc::new(QMatrix::quantize(format, &w, rows, cols).unwrap());
            let wd = q.to_dense();
            // The same values as a dense tensor, used in place, go through the same products.
            let dense = Tensor::from_vec(wd.clone(), (rows, cols), &Device::Cpu).unwrap();
            let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let g: Vec<f32> = (0..n * rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
            for weight in [Frozen::Quantized(q.clone()), Frozen::Dense(dense)] {
                let xv = Var::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
                let y = frozen_matmul_t(xv.as_tensor(), &weight).unwrap();
                let gt = Tensor::from_vec(g.clone(), (n, rows), &Device::Cpu).unwrap();
                let grads = (&y * &gt).unwrap().sum_all().unwrap().backward().unwrap();
                let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                let dx: Vec<f32> = grads.get(&xv).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                for i in 0..n {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| x[i * cols + c] as f64 * wd[r * cols + c] as f64)
                            .sum();
                        assert!((y[i * rows + r] as f64 - want).abs() < 1e-4, "{format:?} y[{i},{r}]");
                    }
                    for c in 0..cols {
                        let want: f64 = (0..rows)
                            .map(|r| g[i * rows + r] as f64 * wd[r * cols + c] as f64)
                            .sum();
                        assert!((dx[i * cols + c] as f64 - want).abs() < 1e-4, "{format:?} dx[{i},{c}]");
                    }
                }
            }
        }
    }

    /// The bf16 dot product of the one-row products, both versions (AVX-512 where present, and
    /// the portable loop alone) against f64, at lengths around its 64- and 16-value steps.
    #[test]
    fn bf16_dot_matches_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for len in [0, 1, 15, 16, 17, 63, 64, 65, 100, 576, 1536 + 7] {
            let x: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let w: Vec<half::bf16> = (0..len)
                .map(|_| half::bf16::from_f32(rng.gen_range(-1.0..1.0)))
                .collect();
            let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            let want: f64 = x.iter().zip(&w).map(|(&a, b)| a as f64 * b.to_f64()).sum();
            let tol = 1e-5 * (len as f64).sqrt().max(1.0);
            for (what, got) in [
                ("dispatched", dot_bf16(&x, &bytes)),
                ("portable", dot_bf16_portable(&x, &bytes)),
            ] {
                assert!((got as f64 - want).abs() <= tol, "{what} length {len}: {got} vs {want}");
            }
        }
    }

    /// `g^T x` against an f64 reference, on shapes with no multiple of a SIMD width, one token,
    /// and more tokens than rows or columns.
    #[test]
    fn weight_gradient_matches_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        for (n, rows, cols) in [(1, 3, 5), (37, 17, 29), (300, 9, 65), (5, 130, 1)] {
            let g: Vec<f32> = (0..n * rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut out = vec![f32::NAN; rows * cols];
            gemm_gtx(&mut out, &g, &x, n, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    let want: f64 = (0..n).map(|t| g[t * rows + r] as f64 * x[t * cols + c] as f64).sum();
                    assert!(
                        (out[r * cols + c] as f64 - want).abs() < 1e-4,
                        "{n}x{rows}x{cols} [{r},{c}]"
                    );
                }
            }
        }
    }

    /// The trainable product's forward and both gradients against candle's autograd of
    /// `x.matmul(w.t())`, over f32 and bf16 inputs and awkward shapes.
    #[test]
    fn trainable_product_matches_candle_autograd() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for (n, rows, cols) in [(1, 3, 5), (37, 17, 29), (64, 96, 33)] {
            let x = crate::kernels::testing::uniform_tensor(&[n, cols], 1.0, &mut rng);
            let w = crate::kernels::testing::uniform_tensor(&[rows, cols], 1.0, &mut rng);
            let probe = crate::kernels::testing::uniform_tensor(&[n, rows], 1.0, &mut rng);
            let (xa, wa) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let want = xa.as_tensor().matmul(&wa.as_tensor().t().unwrap()).unwrap();
            let gw = (&want * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (xb, wb) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let got = trainable_matmul_t(xb.as_tensor(), wb.as_tensor()).unwrap();
            let gg = (&got * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let rel = crate::kernels::testing::rel_err_tensors;
            assert!(rel(&got, &want) < 1e-6, "forward {n}x{rows}x{cols}");
            assert!(
                rel(gg.get(&xb).unwrap(), gw.get(&xa).unwrap()) < 1e-6,
                "dx {n}x{rows}x{cols}"
            );
            assert!(
                rel(gg.get(&wb).unwrap(), gw.get(&wa).unwrap()) < 1e-6,
                "dw {n}x{rows}x{cols}"
            );
            // bf16 activations: the result in bf16, the weight's gradient in f32.
            let x16 = Var::from_tensor(&x.to_dtype(candle_core::DType::BF16).unwrap()).unwrap();
            let w16 = Var::from_tensor(&w).unwrap();
            let y16 = trainable_matmul_t(x16.as_tensor(), w16.as_tensor()).unwrap();
            assert_eq!(y16.dtype(), candle_core::DType::BF16);
            let g16 = (y16.to_dtype(candle_core::DType::F32).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_eq!(g16.get(&w16).unwrap().dtype(), candle_core::DType::F32);
            assert!(rel(g16.get(&w16).unwrap(), gw.get(&wa).unwrap()) < 1e-2);
        }
        let bad = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(trainable_matmul_t(
            &bad,
            &Tensor::zeros((3, 5), candle_core::DType::F32, &Device::Cpu).unwrap()
        )
        .is_err());
    }
}
