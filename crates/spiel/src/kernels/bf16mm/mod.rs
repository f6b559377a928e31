//! Matrix products over bf16 operands with f32 accumulation, for `--dtype bf16`: what PyTorch's
//! bf16 autocast does on a CPU. Both operands are rounded to bf16 (nearest even) and every
//! product and sum is formed in f32.
//!
//! On CPUs with AMX (Intel Sapphire Rapids and later) the products run on its tile unit: a
//! `tdpbf16ps` does 16 x 16 x 32 multiply-adds, about 10x an AVX-512 f32 FMA loop per core (a
//! register-resident loop measured 957 GFLOP/s on one core of the development VM). On CPUs with
//! AVX512-BF16 but no tile unit (AMD Zen 4 and later) they run as `vdpbf16ps` dot products
//! ([`dot`]), which on Zen 5 do twice the multiply-adds of an f32 FMA per cycle. Elsewhere the
//! rounded operands go through the f32 GEMM. All three give the same result up to the order of
//! the f32 sums.
//!
//! The two packed kernels pack both operands per call: the left one into contiguous 16 x 32
//! bf16 tiles, the right one into 16-column panels of bf16 pairs (the "VNNI" layout both
//! instructions read); a weight that never changes can keep its packed form ([`PackCache`]).
//! Each task of the thread pool then computes 32 x 32 blocks of the output: with four
//! accumulator tiles, two tiles of each operand, on AMX; as four strips of 8 rows with
//! `vdpbf16ps` otherwise.

use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;

use crate::kernels::common::{round_bf16, rounded, Values};

/// A read-only f32 or bf16 matrix seen through (row, column) strides: a row-major matrix or
/// its transpose without a copy. bf16 values are packed as they are (already rounded).
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    /// The values; element `(i, j)` is at `i * rs + j * cs`.
    pub data: Values<'a>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn rows(data: impl Into<Values<'a>>, rows: usize, cols: usize) -> View<'a> {
        View {
            data: data.into(),
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[cols, rows]` matrix, as `[rows, cols]`.
    pub fn transposed(data: impl Into<Values<'a>>, rows: usize, cols: usize) -> View<'a> {
        View {
            data: data.into(),
            rows,
            cols,
            rs: 1,
            cs: rows,
        }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data.get(i * self.rs + j * self.cs)
    }

    /// Element `(i, j)` rounded to bf16, as its bits.
    #[inline(always)]
    fn bits_at(&self, i: usize, j: usize) -> u16 {
        match self.data {
            Values::F32(d) => round_bf16(d[i * self.rs + j * self.cs]),
            Values::Bf16(d) => d[i * self.rs + j * self.cs].to_bits(),
        }
    }

    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "bf16 product: {what} of [{}, {}] needs {} values, has {}",
                self.rows,
                self.cols,
                last + 1,
                self.data.len()
            );
        }
    }
}

/// A weight `[rows, cols]` read as f32 rows, a block at a time (a dense f32 tensor, or a
/// bf16 / quantised one dequantised on the fly).
pub(crate) trait WeightRows: Sync {
    /// `(rows, cols)`.
    fn shape(&self) -> (usize, usize);
    /// Rows `r0 .. r1` into `out` (`(r1 - r0) * cols` values).
    fn read_rows(&self, r0: usize, r1: usize, out: &mut [f32]);
}

/// A sparse matrix added to a weight before it is rounded: `values[i]` at the flat (row-major)
/// position `indices[i]`, sorted and unique.
#[derive(Clone, Copy)]
pub(crate) struct SparseAdd<'a> {
    /// Flat positions in the weight, ascending.
    pub indices: &'a [u32],
    /// The values added there.
    pub values: &'a [f32],
}

impl SparseAdd<'_> {
    /// Add the entries that fall in rows `r0 .. r1` of a weight with `cols` columns to `rows`,
    /// which holds those rows.
    fn add_to_rows(&self, r0: usize, r1: usize, cols: usize, rows: &mut [f32]) {
        let (lo, hi) = ((r0 * cols) as u32, (r1 * cols) as u32);
        let start = self.indices.partition_point(|&i| i < lo);
        let end = self.indices.partition_point(|&i| i < hi);
        for (&i, &v) in self.indices[start..end].iter().zip(&self.values[start..end]) {
            rows[(i - lo) as usize] += v;
        }
    }
}

/// The right operand of a product: a strided f32 matrix, or a weight `W` (plus an optional
/// sparse delta) as `W^T` (for `x W^T`) or as `W` (for `g W`).
#[derive(Clone, Copy)]
pub(crate) enum Right<'a> {
    /// Any f32 matrix.
    Matrix(View<'a>),
    /// `(W + delta)^T` when `transposed`, else `W + delta`.
    Weight {
        /// The weight.
        w: &'a dyn WeightRows,
        /// Added to the weight's values before rounding.
        delta: Option<SparseAdd<'a>>,
        /// Whether the operand is the weight's transpose.
        transposed: bool,
        /// Where the packed operand is kept for later products (a weight that never changes,
        /// without a delta); `None` packs it on every call.
        cache: Option<&'a PackCache>,
    },
}

/// The packed forms of a weight that never changes, kept after their first use: as `W^T`
/// (index 1) and as `W` (index 0), each only once asked for.
pub type PackCache = [OnceLock<Vec<u32>>; 2];

impl Right<'_> {
    /// `(k, n)`: rows and columns of the operand.
    fn dims(&self) -> (usize, usize) {
        match self {
            Right::Matrix(v) => (v.rows, v.cols),
            Right::Weight {
                w, transposed: true, ..
            } => (w.shape().1, w.shape().0),
            Right::Weight { w, .. } => w.shape(),
        }
    }

    /// The operand as a contiguous row-major f32 matrix (weight and delta summed), unrounded.
    fn to_rows(self) -> Vec<f32> {
        match self {
            Right::Matrix(v) => (0..v.rows).flat_map(|i| (0..v.cols).map(move |j| v.at(i, j))).collect(),
            Right::Weight {
                w, delta, transposed, ..
            } => {
                let (rows, cols) = w.shape();
                let mut m = vec![0f32; rows * cols];
                w.read_rows(0, rows, &mut m);
                if let Some(d) = delta {
                    d.add_to_rows(0, rows, cols, &mut m);
                }
                if transposed {
                    let mut t = vec![0f32; rows * cols];
                    for (r, row) in m.chunks_exact(cols).enumerate() {
                        for (c, &x) in row.iter().enumerate() {
                            t[c * rows + r] = x;
                        }
                    }
                    t
                } else {
                    m
                }
            }
        }
    }
}

/// The precision of a product's operands: f32, or bf16 with f32 sums (`--dtype bf16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// f32 operands.
    F32,
    /// Operands rounded to bf16, f32 sums.
    Bf16,
}

impl Products {
    /// The products that go with activations of `dtype`: bf16 for bf16, else f32.
    pub fn for_activations(dtype: candle_core::DType) -> Products {
        if dtype == candle_core::DType::BF16 {
            Products::Bf16
        } else {
            Products::F32
        }
    }

    /// The products that go with an op's input storage.
    pub(crate) fn for_storage(s: &candle_core::CpuStorage) -> Products {
        match s {
            candle_core::CpuStorage::BF16(_) => Products::Bf16,
            _ => Products::F32,
        }
    }

    /// Whether a product with `rows` rows of activations takes bf16 operands. Below 16 rows
    /// (decoding) the product is a pass over the weight, which packing it would double, so it
    /// stays f32.
    pub(crate) fn bf16_for(self, rows: usize) -> bool {
        self == Products::Bf16 && rows >= 16
    }
}

/// Which code computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The AMX tile unit.
    Amx,
    /// AVX-512 BF16 dot products (`vdpbf16ps`) over the same packed operands.
    Dot,
    /// The f32 GEMM over operands rounded to bf16.
    Rounded,
}

impl Kernel {
    /// Whether the kernel multiplies packed bf16 operands (AMX or dot products), as opposed
    /// to the f32 GEMM over rounded ones.
    pub fn packs(self) -> bool {
        self != Kernel::Rounded
    }

    /// A short name for tables and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Dot => "avx512-bf16 dot products",
            Kernel::Rounded => "f32 over rounded operands",
        }
    }
}

/// The kernel this CPU runs: AMX when the CPU has it and the kernel grants its tile state to the
/// process (`SPIEL_NO_AMX` turns it off), else AVX-512 BF16 dot products where the CPU has them,
/// else the rounded f32 fallback. Decided once per process.
pub fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        if packed::enable() {
            Kernel::Amx
        } else if dot::available() {
            Kernel::Dot
        } else {
            Kernel::Rounded
        }
    })
}

/// `dst (+)= beta * a b` for `a: [m, k]`, `b: [k, n]` and `dst: [m, n]` (row-major, contiguous),
/// with both operands rounded to bf16 and f32 sums; adds to `dst` when `accumulate`, else
/// overwrites it.
pub(crate) fn gemm(dst: &mut [f32], accumulate: bool, beta: f32, a: View, b: Right) {
    gemm_with(kernel(), dst, accumulate, beta, a, b)
}

/// `dst = a b` as [`gemm`] computes it, each value rounded to bf16 (nearest even) as it is
/// written: a product whose result feeds bf16 activations, without an f32 copy of it.
pub(crate) fn gemm_to_bf16(dst: &mut [half::bf16], a: View, b: Right) {
    gemm_to_bf16_with(kernel(), dst, a, b)
}

/// [`gemm_to_bf16`] on a chosen kernel (the tests run both).
pub(crate) fn gemm_to_bf16_with(kernel: Kernel, dst: &mut [half::bf16], a: View, b: Right) {
    let (m, n, k) = check_operands(&a, &b, dst.len());
    match kernel {
        Kernel::Amx | Kernel::Dot if m > 0 && n > 0 && k > 0 => {
            packed::gemm(kernel, packed::Out::Bf16(dst), false, 1.0, a, b)
        }
        _ => {
            let mut y = vec![0f32; m * n];
            gemm_with(kernel, &mut y, false, 1.0, a, b);
            dst[..m * n]
                .iter_mut()
                .zip(&y)
                .for_each(|(o, &v)| *o = half::bf16::from_bits(round_bf16(v)));
        }
    }
}

/// `(m, n, k)` of the product `a b` into an output of `out_len` values, after checking that
/// the shapes agree and every view lies inside its values (a caller's bug otherwise: panics).
fn check_operands(a: &View, b: &Right, out_len: usize) -> (usize, usize, usize) {
    let (m, k) = (a.rows, a.cols);
    let (bk, n) = b.dims();
    assert_eq!(bk, k, "bf16 product: [{m}, {k}] times [{bk}, {n}]");
    assert!(out_len >= m * n, "bf16 product: output of {out_len} for [{m}, {n}]");
    a.check("left operand");
    if let Right::Matrix(b) = b {
        b.check("right operand");
    }
    (m, n, k)
}

/// Completes a product with no terms (`m`, `n` or `k` zero: `dst` zeroed unless `accumulate`)
/// and says so; `false` for any other.
fn empty_product(dst: &mut [f32], accumulate: bool, (m, n, k): (usize, usize, usize)) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return true;
    }
    false
}

/// A matrix packed once, on one thread, as the right operand of many products that each use a
/// leading block of its rows and columns ([`gemm_packed`]): attention's keys and values, per
/// head.
pub(crate) struct Packed {
    rows: usize,
    cols: usize,
    data: PackedData,
}

enum PackedData {
    /// Panels (see [`packed`]) for a packed kernel, each of this many pairs.
    Panels(Vec<u32>, usize, Kernel),
    /// For the rounded kernel: the rounded values, row-major.
    Rounded(Vec<f32>),
}

impl Packed {
    /// `b` rounded to bf16 and laid out for [`gemm_packed`], on this thread.
    pub(crate) fn new(b: View) -> Packed {
        Packed::for_kernel(kernel(), b)
    }

    /// [`Packed::new`] for a chosen kernel (the tests run both).
    pub(crate) fn for_kernel(kernel: Kernel, b: View) -> Packed {
        b.check("packed operand");
        let data = match kernel {
            Kernel::Amx | Kernel::Dot => {
                let (panels, depth) = packed::pack_matrix(b);
                PackedData::Panels(panels, depth / 2 * 16, kernel)
            }
            Kernel::Rounded => PackedData::Rounded(round_rows(b, false)),
        };
        Packed {
            rows: b.rows,
            cols: b.cols,
            data,
        }
    }
}

/// The packed forms of a frozen weight plus a trained sparse delta, kept from one product to
/// the next: each product patches only the delta's positions (its values change every update,
/// its indices at each reselection), where packing the weight again would read, round and write
/// every value of it. Costs 2 bytes per weight value for each form used (`W^T` for the forward,
/// `W` for the input gradient). The products are bit for bit those of [`gemm_to_bf16`] over
/// [`Right::Weight`] with the delta; on the rounded kernel they are exactly those (nothing is
/// kept).
#[derive(Default)]
pub struct DeltaPacks {
    state: Mutex<DeltaPackState>,
}

#[derive(Default)]
struct DeltaPackState {
    /// The flat indices whose positions hold weight plus delta in the built forms.
    indices: Vec<u32>,
    /// The weight's own values at `indices`.
    base_at: Vec<f32>,
    /// The panels of `W` (index 0) and of `W^T` (index 1), once asked for.
    forms: [Option<Vec<u32>>; 2],
}

impl DeltaPacks {
    /// `dst = x (W + delta)^T` when `transposed`, else `x (W + delta)`, rounded to bf16 as
    /// written ([`gemm_to_bf16`]); `w` must be the same weight on every call.
    pub(crate) fn product_to_bf16(
        &self,
        dst: &mut [half::bf16],
        x: View,
        w: &dyn WeightRows,
        delta: SparseAdd,
        transposed: bool,
    ) {
        self.product_to_bf16_with(kernel(), dst, x, w, delta, transposed)
    }

    /// [`DeltaPacks::product_to_bf16`] on a chosen kernel (the tests run both).
    pub(crate) fn product_to_bf16_with(
        &self,
        kernel: Kernel,
        dst: &mut [half::bf16],
        x: View,
        w: &dyn WeightRows,
        delta: SparseAdd,
        transposed: bool,
    ) {
        let right = Right::Weight {
            w,
            delta: Some(delta),
            transposed,
            cache: None,
        };
        let (m, n, k) = check_operands(&x, &right, dst.len());
        if !kernel.packs() || m == 0 || n == 0 || k == 0 {
            return gemm_to_bf16_with(kernel, dst, x, right);
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let panels = state.synced(w, delta, transposed);
        packed::gemm_on_panels(kernel, packed::Out::Bf16(dst), x, panels, n);
    }
}

impl DeltaPackState {
    /// The form `transposed` of `w` plus `delta`: built on first use, else patched at the
    /// delta's positions (after putting the weight's own values back where an earlier set of
    /// indices was).
    fn synced(&mut self, w: &dyn WeightRows, delta: SparseAdd, transposed: bool) -> &[u32] {
        let shape = w.shape();
        if self.indices != delta.indices {
            for (t, form) in self.forms.iter_mut().enumerate() {
                if let Some(panels) = form {
                    let base = &self.base_at;
                    packed::patch(panels, shape, t == 1, &self.indices, |i| round_bf16(base[i]));
                }
            }
            self.indices = delta.indices.to_vec();
            self.base_at = values_at(w, &self.indices);
        }
        let form = &mut self.forms[transposed as usize];
        match form {
            Some(panels) => {
                let base = &self.base_at;
                packed::patch(panels, shape, transposed, &self.indices, |i| {
                    round_bf16(base[i] + delta.values[i])
                });
            }
            None => {
                let right = Right::Weight {
                    w,
                    delta: Some(delta),
                    transposed,
                    cache: None,
                };
                *form = Some(packed::pack_whole(right));
            }
        }
        form.as_deref().expect("built above")
    }
}

/// The values of `w` at sorted flat `indices`, reading only the blocks of rows they fall in.
fn values_at(w: &dyn WeightRows, indices: &[u32]) -> Vec<f32> {
    let (rows, cols) = w.shape();
    (0..rows.div_ceil(16))
        .into_par_iter()
        .flat_map_iter(|b| {
            let (r0, r1) = (b * 16, (b * 16 + 16).min(rows));
            let lo = indices.partition_point(|&i| (i as usize) < r0 * cols);
            let hi = indices.partition_point(|&i| (i as usize) < r1 * cols);
            let mut block = Vec::new();
            if hi > lo {
                block = vec![0f32; (r1 - r0) * cols];
                w.read_rows(r0, r1, &mut block);
            }
            indices[lo..hi]
                .iter()
                .map(move |&i| block[i as usize - r0 * cols])
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `dst (+)= beta * a b[..k, ..n]` on this thread, for `a: [m, k]` and `dst: [m, n]`: [`gemm`]
/// with the leading `k` rows and `n` columns of a packed right operand.
pub(crate) fn gemm_packed(dst: &mut [f32], accumulate: bool, beta: f32, a: View, b: &Packed, n: usize) {
    let (m, k) = (a.rows, a.cols);
    assert!(
        k <= b.rows && n <= b.cols && dst.len() >= m * n,
        "bf16 product: [{m}, {k}] times [{k}, {n}] of a packed [{}, {}] into {} values",
        b.rows,
        b.cols,
        dst.len()
    );
    a.check("left operand");
    if empty_product(dst, accumulate, (m, n, k)) {
        return;
    }
    match &b.data {
        PackedData::Panels(panels, panel, kernel) => {
            packed::gemm_prepacked(*kernel, dst, accumulate, beta, a, panels, *panel, n)
        }
        PackedData::Rounded(values) => {
            let ra = round_rows(a, false);
            crate::kernels::gemm::gemm_into(
                false,
                dst,
                accumulate,
                beta,
                (m, n, k),
                &ra,
                (k, 1),
                values,
                (b.cols, 1),
            );
        }
    }
}

/// `f(i, chunk)` for every `size`-value chunk of `out`: on the pool where `parallel`, else on
/// this thread.
fn each_chunk<T: Send>(parallel: bool, out: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if parallel {
        out.par_chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        out.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// [`gemm`] on a chosen kernel (the tests run both).
pub(crate) fn gemm_with(kernel: Kernel, dst: &mut [f32], accumulate: bool, beta: f32, a: View, b: Right) {
    let (m, n, k) = check_operands(&a, &b, dst.len());
    if empty_product(dst, accumulate, (m, n, k)) {
        return;
    }
    match kernel {
        Kernel::Amx | Kernel::Dot => packed::gemm(kernel, packed::Out::F32(dst), accumulate, beta, a, b),
        Kernel::Rounded => {
            let ra = round_rows(a, true);
            let mut rb = b.to_rows();
            rb.par_iter_mut().for_each(|x| *x = rounded(*x));
            crate::kernels::gemm::gemm_into(true, dst, accumulate, beta, (m, n, k), &ra, (k, 1), &rb, (n, 1));
        }
    }
}

/// `v` as a contiguous row-major matrix of bf16-rounded f32 values.
fn round_rows(v: View, parallel: bool) -> Vec<f32> {
    let mut out = vec![0f32; v.rows * v.cols];
    each_chunk(parallel, &mut out, v.cols, |i, row| {
        for (j, o) in row.iter_mut().enumerate() {
            *o = rounded(v.at(i, j));
        }
    });
    out
}

/// The AVX-512 BF16 block kernel.
mod dot;
/// The packed paths: operand packing, the block loop, the tile kernel and the process's
/// permission to use the tiles.
mod packed;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use rand::{Rng, SeedableRng};

    /// Both kernels against an f64 product of the rounded operands, over shapes that leave
    /// every kind of ragged edge (rows, depth, columns), row-major, transposed and strided
    /// views, f32 and bf16 operands, accumulation and scaling; also with the right operand
    /// packed once
    /// ([`Packed`], on one thread) and used whole and by a leading block of rows and columns.
    #[test]
    fn products_match_f64_reference_of_rounded_operands() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let kernels = kernels();
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 7),
            (32, 32, 32),
            (33, 65, 47),
            (130, 96, 64),
            (17, 200, 129),
            (64, 576, 192),
        ] {
            for &(ta, tb) in &[(0, 0), (1, 0), (0, 1), (1, 1), (2, 2)] {
                for &(accumulate, beta, held) in &[
                    (false, 1.0f32, DType::F32),
                    (true, 1.0, DType::F32),
                    (true, 0.5, DType::F32),
                    (false, 1.0, DType::BF16),
                    (true, 0.5, DType::BF16),
                ] {
                    // Twice the values, so that the strided layout (2) can skip every other one.
                    let av: Vec<f32> = (0..2 * m * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
                    let bv: Vec<f32> = (0..2 * k * n).map(|_| rng.gen_range(-2.0..2.0)).collect();
                    let init: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    // The operands as they are held: f32, or bf16 (read without rounding).
                    let (a16, b16): (Vec<half::bf16>, Vec<half::bf16>) = (
                        av.iter().map(|&x| half::bf16::from_f32(x)).collect(),
                        bv.iter().map(|&x| half::bf16::from_f32(x)).collect(),
                    );
                    // Exactly the values a layout reads (a view past them would go unnoticed).
                    let (al, bl) = ((1 + (ta == 2) as usize) * m * k, (1 + (tb == 2) as usize) * k * n);
                    let (ad, bd): (Values, Values) = match held {
                        DType::BF16 => (a16[..al].into(), b16[..bl].into()),
                        _ => (av[..al].into(), bv[..bl].into()),
                    };
                    fn view(data: Values, rows: usize, cols: usize, layout: usize) -> View {
                        match layout {
                            0 => View::rows(data, rows, cols),
                            1 => View::transposed(data, rows, cols),
                            _ => View {
                                data,
                                rows,
                                cols,
                                rs: 2 * cols,
                                cs: 2,
                            },
                        }
                    }
                    let (a, b) = (view(ad, m, k, ta), view(bd, k, n, tb));
                    // `got` against the product of the leading `kk` columns of `a` and `kk` rows
                    // and `nn` columns of `b`.
                    let check = |got: &[f32], kk: usize, nn: usize, what: String| {
                        for i in 0..m {
                            for j in 0..nn {
                                let (mut want, mut mag) = (0f64, 0f64);
                                for l in 0..kk {
                                    let p = rounded(a.at(i, l)) as f64 * rounded(b.at(l, j)) as f64;
                                    want += p;
                                    mag += p.abs();
                                }
                                want *= beta as f64;
                                if accumulate {
                                    want += init[i * nn + j] as f64;
                                }
                                let err = (got[i * nn + j] as f64 - want).abs();
                                assert!(
                                    err <= 1e-6 * (mag + 1.0) * (kk as f64).sqrt(),
                                    "{what} [{m}, {kk}] x [{nn}] layouts {ta} {tb} at ({i}, {j}): {} vs {want}",
                                    got[i * nn + j]
                                );
                            }
                        }
                    };
                    for &kern in &kernels {
                        let mut got = init.clone();
                        gemm_with(kern, &mut got, accumulate, beta, a, Right::Matrix(b));
                        check(&got, k, n, format!("{kern:?}"));
                        if !accumulate && beta == 1.0 {
                            // Rounded as written: the f32 product's values, rounded.
                            let mut got16 = vec![half::bf16::ZERO; m * n];
                            gemm_to_bf16_with(kern, &mut got16, a, Right::Matrix(b));
                            let want: Vec<u16> = got.iter().map(|&v| round_bf16(v)).collect();
                            let bits: Vec<u16> = got16.iter().map(|v| v.to_bits()).collect();
                            assert_eq!(bits, want, "{kern:?} [{m}, {k}] x [{n}] to bf16");
                        }
                        // Packed once, then used whole and by a leading block.
                        let packed = Packed::for_kernel(kern, b);
                        for (kk, nn) in [(k, n), (k.div_ceil(2), n - n / 3)] {
                            let a_lead = View { cols: kk, ..a };
                            let mut got = init[..m * nn].to_vec();
                            gemm_packed(&mut got, accumulate, beta, a_lead, &packed, nn);
                            check(&got, kk, nn, format!("{kern:?} packed"));
                        }
                    }
                }
            }
        }
    }

    /// A dense row-major weight for the tests.
    struct Dense(Vec<f32>, usize, usize);

    /// The kernels this CPU can run: AMX where it has the tile unit, the dot-product one where
    /// it has AVX512-BF16, and the rounded f32 one everywhere.
    fn kernels() -> Vec<Kernel> {
        let mut all = vec![Kernel::Rounded];
        if dot::available() {
            all.insert(0, Kernel::Dot);
        }
        if kernel() == Kernel::Amx {
            all.insert(0, Kernel::Amx);
        }
        all
    }

    impl WeightRows for Dense {
        fn shape(&self) -> (usize, usize) {
            (self.1, self.2)
        }
        fn read_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
            out.copy_from_slice(&self.0[r0 * self.2..r1 * self.2]);
        }
    }

    /// A weight operand, plain or with a sparse delta, as `W^T` and as `W`: both kernels
    /// against an f64 product of the rounded sum `W + delta`.
    #[test]
    fn weight_products_add_the_delta_before_rounding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let kernels = kernels();
        for &(m, rows, cols) in &[(3, 5, 7), (40, 33, 70), (64, 96, 64), (20, 130, 31)] {
            let w = Dense((0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect(), rows, cols);
            let mut indices: Vec<u32> = (0..(rows * cols) as u32).filter(|_| rng.gen_bool(0.2)).collect();
            indices.dedup();
            // Deltas below half a bf16 step of most weights: lost if rounded before adding.
            let values: Vec<f32> = indices.iter().map(|_| rng.gen_range(-3e-3..3e-3)).collect();
            let mut sum = w.0.clone();
            indices.iter().zip(&values).for_each(|(&i, &v)| sum[i as usize] += v);
            for delta in [
                None,
                Some(SparseAdd {
                    indices: &indices,
                    values: &values,
                }),
            ] {
                let full = if delta.is_some() { &sum } else { &w.0 };
                for transposed in [true, false] {
                    let (k, n) = if transposed { (cols, rows) } else { (rows, cols) };
                    let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
                    let b = |l: usize, j: usize| {
                        if transposed {
                            full[j * cols + l]
                        } else {
                            full[l * cols + j]
                        }
                    };
                    for &kern in &kernels {
                        // Without a cache, and (when there is no delta) twice through one: the
                        // second product reads the kept packing.
                        let cache = PackCache::default();
                        let mut runs = vec![None];
                        if delta.is_none() {
                            runs.extend([Some(&cache), Some(&cache)]);
                        }
                        let mut outs = Vec::new();
                        for c in runs {
                            let mut got = vec![0f32; m * n];
                            let right = Right::Weight {
                                w: &w,
                                delta,
                                transposed,
                                cache: c,
                            };
                            gemm_with(kern, &mut got, false, 1.0, View::rows(&x, m, k), right);
                            outs.push(got);
                        }
                        assert!(
                            outs.iter().all(|o| o == &outs[0]),
                            "{kern:?}: a kept packing changed the product"
                        );
                        let got = outs.swap_remove(0);
                        for i in 0..m {
                            for j in 0..n {
                                let (mut want, mut mag) = (0f64, 0f64);
                                for l in 0..k {
                                    let p = rounded(x[i * k + l]) as f64 * rounded(b(l, j)) as f64;
                                    want += p;
                                    mag += p.abs();
                                }
                                let err = (got[i * n + j] as f64 - want).abs();
                                assert!(
                                    err <= 1e-6 * (mag + 1.0) * (k as f64).sqrt(),
                                    "{kern:?} [{m}, {k}] x W{} of [{rows}, {cols}], delta {}: ({i}, {j}) {} vs {want}",
                                    if transposed { "^T" } else { "" },
                                    delta.is_some(),
                                    got[i * n + j]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The reused left-operand buffer's stale contents never reach a product: padding columns
    /// are zeroed (a NaN there would turn every output NaN), padding rows are never written out.
    #[test]
    fn stale_left_buffer_does_not_leak() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let packing = kernels().into_iter().filter(|k| k.packs());
        for (kern, &(m, k, n)) in
            packing.flat_map(|kern| [(5, 7, 9), (33, 45, 20), (70, 100, 40)].iter().map(move |s| (kern, s)))
        {
            let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut want = vec![0f32; m * n];
            gemm_with(
                Kernel::Rounded,
                &mut want,
                false,
                1.0,
                View::rows(&a, m, k),
                Right::Matrix(View::rows(&b, k, n)),
            );
            packed::poison_left_buffer(1 << 16);
            let mut got = vec![0f32; m * n];
            gemm_with(
                kern,
                &mut got,
                false,
                1.0,
                View::rows(&a, m, k),
                Right::Matrix(View::rows(&b, k, n)),
            );
            assert!(
                crate::kernels::testing::rel_err(&got, &want) < 1e-6,
                "{kern:?} [{m}, {k}] x [{k}, {n}]"
            );
        }
    }

    /// Kept packs patched at the delta's positions give, bit for bit, the products that pack the
    /// weight plus the delta anew, through new values, new indices (overlapping the old, or
    /// none) and forms left stale while the other was used.
    #[test]
    fn delta_packs_match_packing_per_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let kernels = kernels();
        for &(m, rows, cols) in &[(20, 33, 70), (40, 96, 64), (17, 130, 31), (1, 16, 32)] {
            let w = Dense((0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect(), rows, cols);
            let mut pick = |p: f64| -> Vec<u32> { (0..(rows * cols) as u32).filter(|_| rng.gen_bool(p)).collect() };
            let (a, b) = (pick(0.2), pick(0.3));
            // (indices, which forms are used: W^T, W).
            let steps: [(&[u32], [bool; 2]); 6] = [
                (&a, [true, true]),
                (&a, [true, false]),
                (&b, [false, true]),
                (&b, [true, true]),
                (&[], [true, false]),
                (&a, [true, true]),
            ];
            for &kern in &kernels {
                let packs = DeltaPacks::default();
                for (s, &(indices, uses)) in steps.iter().enumerate() {
                    let values: Vec<f32> = indices.iter().map(|_| rng.gen_range(-3e-3..3e-3)).collect();
                    let delta = SparseAdd {
                        indices,
                        values: &values,
                    };
                    for (transposed, used) in [(true, uses[0]), (false, uses[1])] {
                        if !used {
                            continue;
                        }
                        let (k, n) = if transposed { (cols, rows) } else { (rows, cols) };
                        let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
                        let mut want = vec![half::bf16::ZERO; m * n];
                        let right = Right::Weight {
                            w: &w,
                            delta: Some(delta),
                            transposed,
                            cache: None,
                        };
                        gemm_to_bf16_with(kern, &mut want, View::rows(&x, m, k), right);
                        let mut got = vec![half::bf16::ZERO; m * n];
                        packs.product_to_bf16_with(kern, &mut got, View::rows(&x, m, k), &w, delta, transposed);
                        assert!(
                            got == want,
                            "{kern:?} step {s}: [{m}, {k}] x (W + delta){} of [{rows}, {cols}] differs",
                            if transposed { "^T" } else { "" }
                        );
                    }
                }
            }
        }
    }

    /// Rounding is to nearest with ties to even, and exact on values bf16 holds.
    #[test]
    fn rounding_is_nearest_even() {
        let bits = |x: f32| x.to_bits();
        assert_eq!(rounded(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even (1.0).
        assert_eq!(rounded(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to 1 + 2^-6.
        assert_eq!(rounded(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(rounded(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 1.0 + 2f32.powi(-7));
        assert!(rounded(f32::NAN).is_nan());
        assert_eq!(rounded(f32::INFINITY), f32::INFINITY);
        for x in [0.1f32, -3.7, 1e-30, 6.5e4] {
            assert_eq!(bits(rounded(x)), bits(half::bf16::from_f32(x).to_f32()), "{x}");
        }
    }
}
