//! The packed paths of [`super`]: operand packing, the block loop, the AMX tile kernel and the
//! process's permission to use the tiles. The AVX-512 BF16 kernel ([`super::dot`]) computes the
//! same blocks from the same packed operands.

use super::{dot, each_chunk, Kernel, Right, SparseAdd, Values, View, WeightRows};
use crate::kernels::common::round_bf16;
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
        // SAFETY: both packed kernels run only where the CPU has AVX-512 BF16 (`enable`,
        // `dot::available`); each step reads and writes 32 values inside both slices.
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
unsafe fn block(_: *const u16, _: *const u16, _: *const u32, _: *const u32, _: usize, _: *mut f32, _: usize, _: bool) {
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

/// [`super::gemm`] on a packed kernel.
pub(super) fn gemm(kernel: Kernel, dst: Out, accumulate: bool, beta: f32, a: View, b: Right) {
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
        run(
            kernel,
            true,
            dst,
            accumulate,
            beta,
            (m, n),
            left,
            depth,
            right,
            depth / 2 * 16,
        )
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

/// `dst = a b` on the pool, on a packed kernel, for a right operand `b` with `n` columns
/// packed by [`pack_whole`].
pub(super) fn gemm_on_panels(kernel: Kernel, dst: Out, a: View, right: &[u32], n: usize) {
    let (rows, depth) = (a.rows.next_multiple_of(BLOCK), a.cols.next_multiple_of(DEPTH));
    assert!(n.next_multiple_of(BLOCK) / 16 * (depth / 2 * 16) <= right.len());
    with_left(a, rows, depth, true, |left| {
        run(
            kernel,
            true,
            dst,
            false,
            1.0,
            (a.rows, n),
            left,
            depth,
            right,
            depth / 2 * 16,
        )
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

/// [`super::gemm_packed`] on a packed kernel, on this thread: `right` holds panels of `panel`
/// pairs each, from [`pack_matrix`] of a matrix with at least `a.cols` rows and `n` columns.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_prepacked(
    kernel: Kernel,
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
            kernel,
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
/// rounded up to [`BLOCK`] columns), on `kernel`'s block (AMX tiles or AVX-512 BF16 dot products).
#[allow(clippy::too_many_arguments)]
fn run(
    kernel: Kernel,
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
        let mut blocks = || {
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
                // 32 x 32 block at stride `ldc`, written by this task alone. The tile block
                // runs inside `with_tiles` (below); the dot block only where the CPU has
                // AVX512-BF16 (`kernel()` picks it only then).
                unsafe {
                    let operands = (
                        left.as_ptr().add(i0 * depth),
                        left.as_ptr().add((i0 + 16) * depth),
                        right.as_ptr().add(j0 / 16 * panel),
                        right.as_ptr().add((j0 / 16 + 1) * panel),
                    );
                    let (a0, a1, b0, b1) = operands;
                    match kernel {
                        Kernel::Amx => block(a0, a1, b0, b1, depth, c, ldc, direct && accumulate),
                        _ => dot::block(a0, a1, b0, b1, depth, c, ldc, direct && accumulate),
                    }
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
        };
        match kernel {
            Kernel::Amx => with_tiles(blocks),
            _ => blocks(),
        }
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
