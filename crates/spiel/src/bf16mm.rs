//! Matrix products over bf16 operands with f32 accumulation, for `--dtype bf16`: what PyTorch's
//! bf16 autocast does on a CPU. Both operands are rounded to bf16 (nearest even) and every
//! product and sum is formed in f32.
//!
//! On CPUs with AMX (Intel Sapphire Rapids and later) the products run on its tile unit: a
//! `tdpbf16ps` does 16 x 16 x 32 multiply-adds, about 10x an AVX-512 f32 FMA loop per core (a
//! register-resident loop measured 957 GFLOP/s on one core of the development VM). Elsewhere the
//! rounded operands go through the f32 GEMM, which gives the same result up to the order of the
//! f32 sums.
//!
//! The AMX path packs both operands per call: the left one into contiguous 16 x 32 bf16 tiles,
//! the right one into 16-column panels of bf16 pairs (the "VNNI" layout the tile instruction
//! reads); a weight that never changes can keep its packed form ([`PackCache`]). Each task of
//! the thread pool then computes 32 x 32 blocks of the output with four accumulator tiles, two
//! tiles of each operand.

use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;

pub(crate) use crate::ops::Values;

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
pub(crate) enum Kernel {
    /// The AMX tile unit.
    Amx,
    /// The f32 GEMM over operands rounded to bf16.
    Rounded,
}

/// The kernel this CPU runs: AMX when the CPU has it and the kernel grants its tile state to the
/// process, else the rounded f32 fallback. Decided once per process.
pub(crate) fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| if amx::enable() { Kernel::Amx } else { Kernel::Rounded })
}

/// `x` rounded to bf16 (nearest, ties to even), as its 16 bits. NaN stays NaN.
pub(crate) fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    // Written without an early return so that loops over it vectorise (a select, not a branch).
    let nearest = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        (b >> 16) as u16 | 0x40
    } else {
        nearest
    }
}

/// `x` rounded to bf16 and widened back to f32.
pub(crate) fn rounded(x: f32) -> f32 {
    f32::from_bits((round_bf16(x) as u32) << 16)
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
        Kernel::Amx if m > 0 && n > 0 && k > 0 => amx::gemm(amx::Out::Bf16(dst), false, 1.0, a, b),
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
    /// AMX panels (see [`amx`]), each of this many pairs.
    Panels(Vec<u32>, usize),
    /// Without AMX: the rounded values, row-major.
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
            Kernel::Amx => {
                let (panels, depth) = amx::pack_matrix(b);
                PackedData::Panels(panels, depth / 2 * 16)
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
/// [`Right::Weight`] with the delta; without AMX they are exactly those (nothing is kept).
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
        if kernel != Kernel::Amx || m == 0 || n == 0 || k == 0 {
            return gemm_to_bf16_with(kernel, dst, x, right);
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let panels = state.synced(w, delta, transposed);
        amx::gemm_on_panels(amx::Out::Bf16(dst), x, panels, n);
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
                    amx::patch(panels, shape, t == 1, &self.indices, |i| round_bf16(base[i]));
                }
            }
            self.indices = delta.indices.to_vec();
            self.base_at = values_at(w, &self.indices);
        }
        let form = &mut self.forms[transposed as usize];
        match form {
            Some(panels) => {
                let base = &self.base_at;
                amx::patch(panels, shape, transposed, &self.indices, |i| {
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
                *form = Some(amx::pack_whole(right));
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
        PackedData::Panels(panels, panel) => amx::gemm_prepacked(dst, accumulate, beta, a, panels, *panel, n),
        PackedData::Rounded(values) => {
            let ra = round_rows(a, false);
            crate::qmatrix::gemm_into(
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
        Kernel::Amx => amx::gemm(amx::Out::F32(dst), accumulate, beta, a, b),
        Kernel::Rounded => {
            let ra = round_rows(a, true);
            let mut rb = b.to_rows();
            rb.par_iter_mut().for_each(|x| *x = rounded(*x));
            crate::qmatrix::gemm_into(true, dst, accumulate, beta, (m, n, k), &ra, (k, 1), &rb, (n, 1));
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

/// The AMX path: operand packing, the tile kernel and the process's permission to use the tiles.
mod amx {
    use super::{each_chunk, round_bf16, Right, SparseAdd, Values, View, WeightRows};
    use rayon::prelude::*;

    /// Output rows and columns per block (2 x 2 tiles of 16 x 16 f32).
    const BLOCK: usize = 32;
    /// Depth per tile step: 32 bf16 (64 bytes) per tile row.
    const DEPTH: usize = 32;
    /// Output rows per task of the thread pool.
    const TASK_ROWS: usize = 256;

    /// Ask Linux for the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`)
    /// when the CPU reports AMX-TILE and AMX-BF16; true when granted.
    pub(super) fn enable() -> bool {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            if std::env::var_os("SPIEL_NO_AMX").is_some() {
                return false;
            }
            if std::arch::x86_64::__cpuid(0).eax < 7 {
                return false;
            }
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
            if !(amx_bf16 && amx_tile && std::arch::is_x86_feature_detected!("avx512bf16")) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
            r == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    }

    /// `src` rounded to bf16 into `dst` (as long as `src`), 32 values per instruction
    /// (`vcvtne2ps2bf16`; like the tile unit, it reads subnormal inputs as zero).
    fn round_into(src: &[f32], dst: &mut [u16]) {
        assert_eq!(src.len(), dst.len());
        let mut i = 0;
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `enable` checked AVX-512 BF16; each step reads and writes 32 values
            // inside both slices.
            unsafe {
                while i + 32 <= src.len() {
                    round32(src.as_ptr().add(i), dst.as_mut_ptr().add(i));
                    i += 32;
                }
            }
        }
        for (o, &x) in dst[i..].iter_mut().zip(&src[i..]) {
            *o = round_bf16(x);
        }
    }

    /// bf16 values' bits into `dst` (as long as `src`).
    fn copy_bits(src: &[half::bf16], dst: &mut [u16]) {
        dst.iter_mut().zip(src).for_each(|(o, x)| *o = x.to_bits());
    }

    /// 32 values at `src` rounded to bf16 at `dst`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 BF16; `src` and `dst` must hold 32 values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn round32(src: *const f32, dst: *mut u16) {
        use std::arch::x86_64::*;
        let (lo, hi) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
        let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst as *mut __m512i, packed);
    }

    std::thread_local! {
        /// The calling thread's buffer for packed left operands, reused from product to product
        /// (a fresh one was zero-filled by the allocator on every product).
        static LEFT: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// `f` of the rows of `a` packed by [`pack_left`] into this thread's reused buffer.
    fn with_left<R>(a: View, rows: usize, depth: usize, parallel: bool, f: impl FnOnce(&[u16]) -> R) -> R {
        let mut buf = LEFT.take();
        if buf.len() < rows * depth {
            buf.resize(rows * depth, 0);
        }
        pack_left(a, depth, parallel, &mut buf[..rows * depth]);
        let r = f(&buf[..rows * depth]);
        LEFT.set(buf);
        r
    }

    /// Fill this thread's left-operand buffer with NaN bits, as stale values of a product
    /// before (the tests check that no padding reads them).
    #[cfg(test)]
    pub(super) fn poison_left_buffer(len: usize) {
        LEFT.set(vec![0x7fc0; len]);
    }

    /// Rows of `a` as bf16 tiles into `out`: for each 16 rows, `depth / 32` tiles of 16 x 32
    /// values, each tile contiguous (1 KiB), so that a tile load reads 16 adjacent cache lines.
    /// Columns past `a.cols` are zeroed; rows past `a.rows` (padding up to `out`'s length) are
    /// left as they are: they only reach output rows that are never written.
    fn pack_left(a: View, depth: usize, parallel: bool, out: &mut [u16]) {
        let tile = 16 * DEPTH;
        // 16 rows per task: a row alone is too little work for a hand-off to the pool.
        each_chunk(parallel, out, 16 * depth, |c, dst| {
            let (i0, h) = (c * 16, a.rows.saturating_sub(c * 16).min(16));
            if h == 0 {
                return; // padding rows
            }
            // Value (i0 + r, j) goes to tile j / 32, row r, column j % 32.
            let at = |r: usize, j: usize| (j / DEPTH) * tile + r * DEPTH + j % DEPTH;
            if a.cs == 1 {
                for r in 0..h {
                    let start = (i0 + r) * a.rs;
                    for s in 0..a.cols.div_ceil(DEPTH) {
                        let (j, len) = (s * DEPTH, (a.cols - s * DEPTH).min(DEPTH));
                        let out = &mut dst[at(r, j)..][..len];
                        match a.data {
                            Values::F32(d) => round_into(&d[start + j..][..len], out),
                            Values::Bf16(d) => copy_bits(&d[start + j..][..len], out),
                        }
                    }
                }
            } else if a.rs == 1 {
                // A transpose: each of its columns holds the 16 rows' values side by side.
                for j in 0..a.cols {
                    let start = j * a.cs + i0;
                    match a.data {
                        Values::F32(d) => {
                            for (r, &v) in d[start..][..h].iter().enumerate() {
                                dst[at(r, j)] = round_bf16(v);
                            }
                        }
                        Values::Bf16(d) => {
                            for (r, v) in d[start..][..h].iter().enumerate() {
                                dst[at(r, j)] = v.to_bits();
                            }
                        }
                    }
                }
            } else {
                for j in 0..a.cols {
                    for r in 0..h {
                        dst[at(r, j)] = a.bits_at(i0 + r, j);
                    }
                }
            }
            for r in 0..h {
                for j in a.cols..depth {
                    dst[at(r, j)] = 0;
                }
            }
        });
    }

    /// `b: [k, n]` as panels of 16 columns, each `depth / 2` rows of 16 bf16 pairs: the pair
    /// for (row `kk`, column `j`) holds `b[2 kk][j]` (low half) and `b[2 kk + 1][j]`.
    fn pack_right(b: View, depth: usize, cols: usize, parallel: bool) -> Vec<u32> {
        let panel = depth / 2 * 16;
        let k = b.rows;
        let mut out = vec![0u32; cols / 16 * panel];
        let pair = |lo: f32, hi: f32| round_bf16(lo) as u32 | (round_bf16(hi) as u32) << 16;
        each_chunk(parallel, &mut out, panel, |p, dst| {
            let j0 = p * 16;
            let width = b.cols.saturating_sub(j0).min(16);
            if width == 0 {
                return; // a padding panel: zeros
            }
            if b.rs == 1 {
                // Each column is contiguous (the transpose of a row-major matrix): round it 32
                // values at a time; its pairs are then adjacent bf16 values.
                let mut col = vec![0u16; k.next_multiple_of(2)];
                for jj in 0..width {
                    let start = (j0 + jj) * b.cs;
                    match b.data {
                        Values::F32(d) => round_into(&d[start..][..k], &mut col[..k]),
                        Values::Bf16(d) => copy_bits(&d[start..][..k], &mut col[..k]),
                    }
                    for (kk, two) in col.chunks_exact(2).enumerate() {
                        dst[kk * 16 + jj] = two[0] as u32 | (two[1] as u32) << 16;
                    }
                }
            } else if let (1, Values::F32(d)) = (b.cs, b.data) {
                for (kk, row) in dst.chunks_exact_mut(16).take(k.div_ceil(2)).enumerate() {
                    let r0 = &d[2 * kk * b.rs + j0..][..width];
                    if 2 * kk + 1 < k {
                        let r1 = &d[(2 * kk + 1) * b.rs + j0..][..width];
                        row.iter_mut()
                            .zip(r0.iter().zip(r1))
                            .for_each(|(o, (&lo, &hi))| *o = pair(lo, hi));
                    } else {
                        row.iter_mut().zip(r0).for_each(|(o, &lo)| *o = pair(lo, 0.0));
                    }
                }
            } else if let (1, Values::Bf16(d)) = (b.cs, b.data) {
                let bits = |v: &half::bf16| v.to_bits() as u32;
                for (kk, row) in dst.chunks_exact_mut(16).take(k.div_ceil(2)).enumerate() {
                    let r0 = &d[2 * kk * b.rs + j0..][..width];
                    if 2 * kk + 1 < k {
                        let r1 = &d[(2 * kk + 1) * b.rs + j0..][..width];
                        row.iter_mut()
                            .zip(r0.iter().zip(r1))
                            .for_each(|(o, (lo, hi))| *o = bits(lo) | bits(hi) << 16);
                    } else {
                        row.iter_mut().zip(r0).for_each(|(o, lo)| *o = bits(lo));
                    }
                }
            } else {
                let bits = |i: usize, j: usize| if i < k { b.bits_at(i, j) as u32 } else { 0 };
                for kk in 0..k.div_ceil(2) {
                    for jj in 0..width {
                        dst[kk * 16 + jj] = bits(2 * kk, j0 + jj) | bits(2 * kk + 1, j0 + jj) << 16;
                    }
                }
            }
        });
        out
    }

    /// [`pack_right`] for either kind of right operand, on the pool.
    fn pack(b: Right, depth: usize, cols: usize) -> Vec<u32> {
        match b {
            Right::Matrix(v) => pack_right(v, depth, cols, true),
            Right::Weight {
                w,
                delta,
                transposed: true,
                ..
            } => pack_weight_transposed(w, delta, depth, cols),
            Right::Weight {
                w,
                delta,
                transposed: false,
                ..
            } => pack_weight(w, delta, depth, cols),
        }
    }

    /// `(W + delta)^T` packed as [`pack_right`] does: each panel is 16 rows of `W`, read
    /// (and the delta added) in one block.
    fn pack_weight_transposed(w: &dyn WeightRows, delta: Option<SparseAdd>, depth: usize, cols: usize) -> Vec<u32> {
        let (rows, k) = w.shape();
        let panel = depth / 2 * 16;
        let mut out = vec![0u32; cols / 16 * panel];
        out.par_chunks_mut(panel).enumerate().for_each(|(p, dst)| {
            let (r0, r1) = ((p * 16).min(rows), (p * 16 + 16).min(rows));
            let mut block = vec![0f32; (r1 - r0) * k];
            w.read_rows(r0, r1, &mut block);
            if let Some(d) = delta {
                d.add_to_rows(r0, r1, k, &mut block);
            }
            let mut bits = vec![0u16; k + 1];
            for (jj, row) in block.chunks_exact(k.max(1)).enumerate().take(r1 - r0) {
                round_into(row, &mut bits[..k]);
                for kk in 0..k.div_ceil(2) {
                    dst[kk * 16 + jj] = bits[2 * kk] as u32 | (bits[2 * kk + 1] as u32) << 16;
                }
            }
        });
        out
    }

    /// `W + delta` packed as [`pack_right`] does: 32 rows of `W` at a time (16 rows of pairs in
    /// every panel), read (and the delta added) in one block.
    fn pack_weight(w: &dyn WeightRows, delta: Option<SparseAdd>, depth: usize, cols: usize) -> Vec<u32> {
        let (rows, n) = w.shape();
        let panel = depth / 2 * 16;
        let mut out = vec![0u32; cols / 16 * panel];
        let dst = SendPtr(out.as_mut_ptr());
        (0..rows.div_ceil(DEPTH)).into_par_iter().for_each(|s| {
            let (r0, r1) = (s * DEPTH, (s * DEPTH + DEPTH).min(rows));
            let mut block = vec![0f32; DEPTH * n];
            w.read_rows(r0, r1, &mut block[..(r1 - r0) * n]);
            if let Some(d) = delta {
                d.add_to_rows(r0, r1, n, &mut block[..(r1 - r0) * n]);
            }
            let mut bits = vec![0u16; DEPTH * n];
            round_into(&block, &mut bits);
            for p in 0..cols / 16 {
                let (j0, width) = (p * 16, n.saturating_sub(p * 16).min(16));
                for kk in 0..DEPTH / 2 {
                    let at = p * panel + (s * DEPTH / 2 + kk) * 16;
                    // SAFETY: task `s` writes pair rows s * 16 .. s * 16 + 16 of every panel,
                    // inside `out`; no other task writes them.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.get().add(at), 16) };
                    let (lo, hi) = (&bits[2 * kk * n..][..n], &bits[(2 * kk + 1) * n..][..n]);
                    for (jj, o) in row[..width].iter_mut().enumerate() {
                        *o = lo[j0 + jj] as u32 | (hi[j0 + jj] as u32) << 16;
                    }
                }
            }
        });
        out
    }

    /// The tile configuration: palette 1, tiles 0-7 all 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// One 32 x 32 output block `c` (row stride `ldc` values), added to (`accumulate`) or
    /// overwritten: `depth / 32` steps over two 16-row groups of packed left tiles at `a0`,
    /// `a1` and the two right panels at `b0`, `b1`.
    ///
    /// # Safety
    /// The tile configuration must be loaded on this thread; `a0`, `a1` must each hold
    /// `depth / 32` tiles of 512 values, `b0` and `b1` `depth / 2 * 16` pairs each, and `c`
    /// 32 rows of 32 values at stride `ldc`.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        a0: *const u16,
        a1: *const u16,
        b0: *const u32,
        b1: *const u32,
        depth: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        use std::arch::asm;
        let (c0, c1, c2, c3) = (c, c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
        let stride = ldc * 4;
        if accumulate {
            asm!(
                "tileloadd tmm0, [{c0} + {s} * 1]",
                "tileloadd tmm1, [{c1} + {s} * 1]",
                "tileloadd tmm2, [{c2} + {s} * 1]",
                "tileloadd tmm3, [{c3} + {s} * 1]",
                c0 = in(reg) c0,
                c1 = in(reg) c1,
                c2 = in(reg) c2,
                c3 = in(reg) c3,
                s = in(reg) stride,
                options(nostack, readonly)
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for s in 0..depth / DEPTH {
            asm!(
                "tileloadd tmm4, [{a0} + {w} * 1]",
                "tileloadd tmm5, [{a1} + {w} * 1]",
                "tileloadd tmm6, [{b0} + {w} * 1]",
                "tileloadd tmm7, [{b1} + {w} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(s * 512),
                a1 = in(reg) a1.add(s * 512),
                b0 = in(reg) b0.add(s * 256),
                b1 = in(reg) b1.add(s * 256),
                w = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{c0} + {s} * 1], tmm0",
            "tilestored [{c1} + {s} * 1], tmm1",
            "tilestored [{c2} + {s} * 1], tmm2",
            "tilestored [{c3} + {s} * 1], tmm3",
            c0 = in(reg) c0,
            c1 = in(reg) c1,
            c2 = in(reg) c2,
            c3 = in(reg) c3,
            s = in(reg) stride,
            options(nostack)
        );
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        _: *const u16,
        _: *const u16,
        _: *const u32,
        _: *const u32,
        _: usize,
        _: *mut f32,
        _: usize,
        _: bool,
    ) {
        unreachable!("AMX is only enabled on x86-64")
    }

    /// Load the tile configuration on this thread, run `f`, release the tiles.
    fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `enable` granted the tile state to the process; the configuration is valid.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
        }
        let r = f();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: releases this thread's tile state.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
        r
    }

    /// A product's output: f32 values, or bf16 ones rounded (nearest even) as they are written.
    pub(super) enum Out<'a> {
        F32(&'a mut [f32]),
        Bf16(&'a mut [half::bf16]),
    }

    /// [`super::gemm`] on the tiles.
    pub(super) fn gemm(dst: Out, accumulate: bool, beta: f32, a: View, b: Right) {
        let (m, k, n) = (a.rows, a.cols, b.dims().1);
        let (rows, depth, cols) = (
            m.next_multiple_of(BLOCK),
            k.next_multiple_of(DEPTH),
            n.next_multiple_of(BLOCK),
        );
        let packed;
        let right: &[u32] = match b {
            Right::Weight {
                cache: Some(c),
                delta: None,
                transposed,
                ..
            } => c[transposed as usize].get_or_init(|| pack(b, depth, cols)),
            _ => {
                packed = pack(b, depth, cols);
                &packed
            }
        };
        with_left(a, rows, depth, true, |left| {
            run(true, dst, accumulate, beta, (m, n), left, depth, right, depth / 2 * 16)
        });
    }

    /// A matrix `b` packed as right operand for [`gemm_prepacked`]: `(panels, rows padded)`.
    pub(super) fn pack_matrix(b: View) -> (Vec<u32>, usize) {
        let depth = b.rows.next_multiple_of(DEPTH);
        (pack_right(b, depth, b.cols.next_multiple_of(BLOCK), false), depth)
    }

    /// A weight operand packed whole, as [`gemm`] packs it for a product with it.
    pub(super) fn pack_whole(b: Right) -> Vec<u32> {
        let (k, n) = b.dims();
        pack(b, k.next_multiple_of(DEPTH), n.next_multiple_of(BLOCK))
    }

    /// `dst = a b` on the pool for a right operand `b` with `n` columns packed by
    /// [`pack_whole`].
    pub(super) fn gemm_on_panels(dst: Out, a: View, right: &[u32], n: usize) {
        let (rows, depth) = (a.rows.next_multiple_of(BLOCK), a.cols.next_multiple_of(DEPTH));
        assert!(n.next_multiple_of(BLOCK) / 16 * (depth / 2 * 16) <= right.len());
        with_left(a, rows, depth, true, |left| {
            run(true, dst, false, 1.0, (a.rows, n), left, depth, right, depth / 2 * 16)
        });
    }

    /// Set the values at sorted flat `indices` of a `[rows, cols]` weight `W` packed by
    /// [`pack_whole`] (as `W^T` when `transposed`) to `value(i)` for the `i`-th index, as bf16
    /// bits. In parallel over blocks of 16 rows of `W`, whose positions no other block shares.
    pub(super) fn patch(
        panels: &mut [u32],
        (rows, cols): (usize, usize),
        transposed: bool,
        indices: &[u32],
        value: impl Fn(usize) -> u16 + Sync,
    ) {
        let depth = if transposed { cols } else { rows }.next_multiple_of(DEPTH);
        let panel = depth / 2 * 16;
        // Where (r, c) of W lives: the u32 and whether in its high half.
        let slot = |r: usize, c: usize| match transposed {
            true => ((r / 16) * panel + (c / 2) * 16 + r % 16, c & 1 == 1),
            false => ((c / 16) * panel + (r / 2) * 16 + c % 16, r & 1 == 1),
        };
        let width = if transposed { rows } else { cols };
        assert!(
            panels.len() >= width.next_multiple_of(BLOCK) / 16 * panel,
            "patch: not a packed weight of [{rows}, {cols}]"
        );
        if let Some(&last) = indices.last() {
            assert!(
                (last as usize) < rows * cols,
                "patch: index {last} outside [{rows}, {cols}]"
            );
        }
        let dst = SendPtr(panels.as_mut_ptr());
        (0..rows.div_ceil(16)).into_par_iter().for_each(|b| {
            let lo = indices.partition_point(|&i| (i as usize) < b * 16 * cols);
            let hi = indices.partition_point(|&i| (i as usize) < (b + 1) * 16 * cols);
            for (n, &i) in indices[lo..hi].iter().enumerate() {
                let (pos, high) = slot(i as usize / cols, i as usize % cols);
                let bits = value(lo + n) as u32;
                // SAFETY: `pos` is inside `panels` (every index is below the last, checked to
                // lie inside the weight, whose packing `panels` holds); the rows of block `b`
                // own their positions (a panel of 16 rows of `W^T`, or pair rows
                // `8 b .. 8 b + 8` of every panel of `W`), so no other task writes this word.
                unsafe {
                    let p = dst.get().add(pos);
                    *p = if high {
                        (*p & 0xffff) | bits << 16
                    } else {
                        (*p & 0xffff_0000) | bits
                    };
                }
            }
        });
    }

    /// [`super::gemm_packed`] on the tiles, on this thread: `right` holds panels of `panel`
    /// pairs each, from [`pack_matrix`] of a matrix with at least `a.cols` rows and `n` columns.
    pub(super) fn gemm_prepacked(
        dst: &mut [f32],
        accumulate: bool,
        beta: f32,
        a: View,
        right: &[u32],
        panel: usize,
        n: usize,
    ) {
        let (rows, depth) = (a.rows.next_multiple_of(BLOCK), a.cols.next_multiple_of(DEPTH));
        assert!(depth / 2 * 16 <= panel && n.next_multiple_of(BLOCK) / 16 * panel <= right.len());
        with_left(a, rows, depth, false, |left| {
            run(
                false,
                Out::F32(dst),
                accumulate,
                beta,
                (a.rows, n),
                left,
                depth,
                right,
                panel,
            )
        });
    }

    /// `dst (+)= beta left right` for `dst: [m, n]` from packed operands: `left` as
    /// [`pack_left`] lays out `m` rows (padded to [`BLOCK`]) of `depth` values, `right` as
    /// panels of `panel` pairs (at least `depth / 2` rows of 16 pairs used; padded to `n`
    /// rounded up to [`BLOCK`] columns).
    #[allow(clippy::too_many_arguments)]
    fn run(
        parallel: bool,
        dst: Out,
        accumulate: bool,
        beta: f32,
        (m, n): (usize, usize),
        left: &[u16],
        depth: usize,
        right: &[u32],
        panel: usize,
    ) {
        let (rows, cols) = (m.next_multiple_of(BLOCK), n.next_multiple_of(BLOCK));
        // Tasks: TASK_ROWS output rows by BLOCK columns, column-block major, so that each thread
        // walks one run of right panels.
        let row_tasks = rows.div_ceil(TASK_ROWS);
        // The f32 output, or the bf16 one (as bits).
        let (dst_ptr, bits_ptr) = match dst {
            Out::F32(d) => (SendPtr(d.as_mut_ptr()), None),
            Out::Bf16(d) => {
                assert!(!accumulate, "bf16 product: a bf16 output is overwritten, not added to");
                (SendPtr(std::ptr::null_mut()), Some(SendPtr(d.as_mut_ptr() as *mut u16)))
            }
        };
        let task = |t: usize| {
            let (cb, rt) = (t / row_tasks, t % row_tasks);
            let j0 = cb * BLOCK;
            let mut scratch = [0f32; BLOCK * BLOCK];
            with_tiles(|| {
                for i0 in (rt * TASK_ROWS..((rt + 1) * TASK_ROWS).min(rows)).step_by(BLOCK) {
                    let (h, w) = ((m - i0.min(m)).min(BLOCK), (n - j0).min(BLOCK));
                    if h == 0 {
                        break;
                    }
                    // A whole block with beta 1 goes straight to (and from) the output; an edge
                    // block, or a scaled one, through the scratch block.
                    let direct = h == BLOCK && w == BLOCK && beta == 1.0 && bits_ptr.is_none();
                    let (c, ldc) = match direct {
                        // SAFETY: rows i0 .. i0 + 32 and columns j0 .. j0 + 32 are inside `dst`.
                        true => (unsafe { dst_ptr.get().add(i0 * n + j0) }, n),
                        false => (scratch.as_mut_ptr(), BLOCK),
                    };
                    // SAFETY: the packed operands are `rows x depth` and `cols / 16` panels, so
                    // rows i0 .. i0 + 32 and panels j0 / 16, j0 / 16 + 1 are in bounds; `c` is a
                    // 32 x 32 block at stride `ldc`, written by this task alone.
                    unsafe {
                        block(
                            left.as_ptr().add(i0 * depth),
                            left.as_ptr().add((i0 + 16) * depth),
                            right.as_ptr().add(j0 / 16 * panel),
                            right.as_ptr().add((j0 / 16 + 1) * panel),
                            depth,
                            c,
                            ldc,
                            direct && accumulate,
                        );
                    }
                    if direct {
                        continue;
                    }
                    if let Some(bits) = bits_ptr {
                        for r in 0..h {
                            let src = &mut scratch[r * BLOCK..r * BLOCK + w];
                            if beta != 1.0 {
                                src.iter_mut().for_each(|s| *s *= beta);
                            }
                            // SAFETY: as below, for the bf16 output.
                            let out = unsafe { std::slice::from_raw_parts_mut(bits.get().add((i0 + r) * n + j0), w) };
                            round_into(src, out);
                        }
                        continue;
                    }
                    for r in 0..h {
                        // SAFETY: each task writes its own (rows, columns) block of `dst`,
                        // `m x n`, inside the bounds checked by the caller.
                        let out = unsafe { std::slice::from_raw_parts_mut(dst_ptr.get().add((i0 + r) * n + j0), w) };
                        let src = &scratch[r * BLOCK..r * BLOCK + w];
                        if accumulate {
                            out.iter_mut().zip(src).for_each(|(o, s)| *o += beta * s);
                        } else {
                            out.iter_mut().zip(src).for_each(|(o, s)| *o = beta * s);
                        }
                    }
                }
            })
        };
        let tasks = row_tasks * (cols / BLOCK);
        if parallel {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }

    /// A raw output pointer shared by tasks that write disjoint parts.
    struct SendPtr<T>(*mut T);
    impl<T> Clone for SendPtr<T> {
        fn clone(&self) -> Self {
            *self
        }
    }
    impl<T> Copy for SendPtr<T> {}
    // SAFETY: the tasks write disjoint parts of the output.
    unsafe impl<T> Send for SendPtr<T> {}
    unsafe impl<T> Sync for SendPtr<T> {}
    impl<T> SendPtr<T> {
        fn get(self) -> *mut T {
            self.0
        }
    }
}

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

    /// The kernels this CPU can run: both where it has AMX, else the rounded f32 one.
    fn kernels() -> Vec<Kernel> {
        match kernel() {
            Kernel::Amx => vec![Kernel::Amx, Kernel::Rounded],
            Kernel::Rounded => vec![Kernel::Rounded],
        }
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
        if kernel() != Kernel::Amx {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        for &(m, k, n) in &[(5, 7, 9), (33, 45, 20), (70, 100, 40)] {
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
            amx::poison_left_buffer(1 << 16);
            let mut got = vec![0f32; m * n];
            gemm_with(
                Kernel::Amx,
                &mut got,
                false,
                1.0,
                View::rows(&a, m, k),
                Right::Matrix(View::rows(&b, k, n)),
            );
            assert!(crate::testing::rel_err(&got, &want) < 1e-6, "[{m}, {k}] x [{k}, {n}]");
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
