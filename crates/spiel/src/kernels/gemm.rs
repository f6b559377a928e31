//! f32 products on plain row-major slices: the GEMM calls every kernel shares (through the
//! `gemm` crate, candle's own), the one-row products of decoding, and the dot products under
//! them. Below every other kernel but [`super::common`].

use rayon::prelude::*;

/// `y[:, c0 .. c0 + r] = x w^T` for `x: [n, k]` and `w: [r, k]` (row-major, `k = w.len() / r`),
/// into `y` with row stride `ldy`.
pub(crate) fn gemm_xwt(y: &mut [f32], c0: usize, ldy: usize, x: &[f32], n: usize, w: &[f32], r: usize) {
    let k = w.len() / r.max(1);
    if n == 0 || r == 0 {
        return;
    }
    assert!(x.len() >= n * k && c0 + r <= ldy && y.len() >= (n - 1) * ldy + c0 + r);
    if n == 1 {
        matvec_many(&x[..k], vec![(w, &mut y[c0..c0 + r])]);
        return;
    }
    // SAFETY: the asserts bound every access: y[i * ldy + c0 + j] for i < n, j < r; x as [n, k];
    // w read transposed as [k, r].
    unsafe {
        gemm::gemm(
            n,
            r,
            k,
            y.as_mut_ptr().add(c0),
            1,
            ldy as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

/// One-row products `y_i = W_i x` for several matrices `W_i: [rows_i, k]` (row-major) that share
/// the input `x: [k]` (decoding: q, k and v of one layer, or gate and up). Bound by reading each
/// weight once, so a dot product per weight row with no packing; all the matrices' rows are cut
/// into blocks of about equal size that run in one parallel pass, instead of one pass (and one
/// hand-off to the other threads) per matrix.
pub(crate) fn matvec_many(x: &[f32], parts: Vec<(&[f32], &mut [f32])>) {
    let k = x.len();
    let total: usize = parts.iter().map(|(_, y)| y.len()).sum();
    if total == 0 || k == 0 {
        return;
    }
    // Blocks of at least 16 rows, about 8 per thread so that uneven progress evens out.
    let block = total.div_ceil(8 * rayon::current_num_threads().max(1)).max(16);
    let mut blocks: Vec<(&[f32], &mut [f32])> = Vec::new();
    for (w, y) in parts {
        assert!(
            w.len() >= y.len() * k,
            "matvec: weight of {} values for {} rows of {k}",
            w.len(),
            y.len()
        );
        blocks.extend(w.chunks(block * k).zip(y.chunks_mut(block)));
    }
    blocks.into_par_iter().for_each(|(wb, yb)| {
        for (o, row) in yb.iter_mut().zip(wb.chunks_exact(k)) {
            *o = dot_streaming(x, row);
        }
    });
}

/// `dx (+)= g[:, c0 .. c0 + r] w` for `g` with row stride `ldg`, `w: [r, k]` and `dx: [n, k]`;
/// adds to `dx` when `accumulate`, else overwrites it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_gw(
    dx: &mut [f32],
    accumulate: bool,
    g: &[f32],
    c0: usize,
    ldg: usize,
    n: usize,
    w: &[f32],
    r: usize,
) {
    let k = w.len() / r.max(1);
    if n == 0 || r == 0 {
        return;
    }
    assert!(dx.len() >= n * k && c0 + r <= ldg && g.len() >= (n - 1) * ldg + c0 + r);
    // SAFETY: the asserts bound every access: dx as [n, k], g[i * ldg + c0 + j] for i < n,
    // j < r, and w as [r, k].
    unsafe {
        gemm::gemm(
            n,
            k,
            r,
            dx.as_mut_ptr(),
            1,
            k as isize,
            accumulate,
            g.as_ptr().add(c0),
            1,
            ldg as isize,
            w.as_ptr(),
            1,
            k as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

/// `dst (+)= beta * lhs rhs` for `dst: [m, n]` (row-major, contiguous), `lhs: [m, k]` and
/// `rhs: [k, n]` read through (row, column) strides, so either may be a transposed view; adds to
/// `dst` when `accumulate`, else overwrites it; on the thread pool when `parallel`, else on the
/// calling thread (for callers already parallel over independent products).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    parallel: bool,
    dst: &mut [f32],
    accumulate: bool,
    beta: f32,
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let span = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    assert!(dst.len() >= m * n && lhs.len() >= span(m, k, lhs_rs, lhs_cs) && rhs.len() >= span(k, n, rhs_rs, rhs_cs));
    // SAFETY: the asserts bound every access: dst as [m, n]; lhs (i, l) at i * lhs_rs + l * lhs_cs
    // for i < m, l < k; rhs (l, j) at l * rhs_rs + j * rhs_cs for l < k, j < n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            if parallel {
                parallelism()
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// `out = g^T x` for `g: [n, rows]` and `x: [n, cols]` (row-major), `out: [rows, cols]`: a
/// weight's gradient, read without transposing `g`.
pub(crate) fn gemm_gtx(out: &mut [f32], g: &[f32], x: &[f32], n: usize, rows: usize, cols: usize) {
    assert!(out.len() >= rows * cols && g.len() >= n * rows && x.len() >= n * cols);
    if rows == 0 || cols == 0 {
        return;
    }
    if n == 0 {
        out[..rows * cols].fill(0.0);
        return;
    }
    // SAFETY: the asserts bound every access: out as [rows, cols]; g read transposed, element
    // (i, t) at t * rows + i; x as [n, cols].
    unsafe {
        gemm::gemm(
            rows,
            cols,
            n,
            out.as_mut_ptr(),
            1,
            cols as isize,
            false,
            g.as_ptr(),
            rows as isize,
            1,
            x.as_ptr(),
            1,
            cols as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `a . b` over the shorter length: four 8-lane running sums with FMA where the CPU has AVX2
/// and FMA (chosen at run time), else sixteen running sums that the compiler vectorises.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_dispatch::<false>(a, b)
}

/// How far ahead of the current position [`dot_streaming`] asks for `b`: 2 KiB, so the line is
/// in cache when its turn comes; one core's own misses cap it at ~10 GB/s otherwise.
const PREFETCH_FLOATS: usize = 512;

/// `a . b` for a `b` streamed from memory once (a weight row in a one-row product): [`dot`]
/// plus a prefetch of `b` 2 KiB ahead, which carries on into the next row. A stand-alone loop
/// over the decode matrices read 20 -> 24-26 GB/s with it, and decoding went 27 -> 30.6
/// tokens/s (docs/performance.md); not for operands already in cache (the SDDMM).
#[inline]
pub(crate) fn dot_streaming(a: &[f32], b: &[f32]) -> f32 {
    dot_dispatch::<true>(a, b)
}

#[inline(always)]
fn dot_dispatch<const PREFETCH: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features `dot_avx2_fma` is compiled for (just checked).
        return unsafe { dot_avx2_fma::<PREFETCH>(a, b) };
    }
    dot_portable::<PREFETCH>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma<const PREFETCH: bool>(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        if PREFETCH {
            prefetch(pb.wrapping_add(i + PREFETCH_FLOATS));
            prefetch(pb.wrapping_add(i + 16 + PREFETCH_FLOATS));
        }
        for (j, s) in acc.iter_mut().enumerate() {
            *s = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8 * j)),
                _mm256_loadu_ps(pb.add(i + 8 * j)),
                *s,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
    let mut sum = _mm_cvtss_f32(h);
    for k in i..n {
        sum += a[k] * b[k];
    }
    sum
}

#[inline(always)]
fn dot_portable<const PREFETCH: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (i, (x, y)) in ac.zip(bc).enumerate() {
        if PREFETCH {
            prefetch(b.as_ptr().wrapping_add(i * 16 + PREFETCH_FLOATS));
        }
        for k in 0..16 {
            // Not `mul_add`: without FMA in the baseline build it would be a library call.
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A hint to bring the cache line at `p` into L1; `p` may point anywhere (a prefetch never
/// faults), so reading past the end of a row is fine.
#[inline(always)]
pub(crate) fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that does not access memory architecturally; SSE is in the
    // x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::kernels::testing::uniform;

    fn random(n: usize, rng: &mut impl rand::Rng) -> Vec<f32> {
        uniform(n, 1.0, rng)
    }

    #[test]
    fn dot_matches_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for n in [0, 1, 7, 8, 31, 32, 33, 128, 131, 600] {
            let (a, b) = (random(n, &mut rng), random(n + 5, &mut rng));
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            for got in [dot(&a, &b), dot_streaming(&a, &b), dot(&b, &a)] {
                assert!(
                    (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "n {n}: {got} vs {want}"
                );
            }
        }
    }

    /// The decoding path's one-row products (`matvec_many`, prefetching dot products) against an
    /// f64 reference, several matrices sharing one input.
    #[test]
    fn one_row_products_sharing_an_input_match_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // Widths off the 16-lane loop and longer than the prefetch distance; one matrix with
        // fewer rows than a block, one with many blocks.
        for k in [7, 37, 576, 1000] {
            let x = random(k, &mut rng);
            let sizes = [3, 130, 1];
            let ws: Vec<Vec<f32>> = sizes.iter().map(|&r| random(r * k, &mut rng)).collect();
            let mut ys: Vec<Vec<f32>> = sizes.iter().map(|&r| vec![f32::NAN; r]).collect();
            matvec_many(
                &x,
                ws.iter()
                    .map(|w| w.as_slice())
                    .zip(ys.iter_mut().map(|y| y.as_mut_slice()))
                    .collect(),
            );
            for (w, y) in ws.iter().zip(&ys) {
                for (r, &got) in y.iter().enumerate() {
                    let want: f64 = (0..k).map(|c| x[c] as f64 * w[r * k + c] as f64).sum();
                    assert!(
                        (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "k {k} row {r}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
