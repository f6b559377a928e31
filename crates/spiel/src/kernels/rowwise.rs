//! Batch-invariant inference kernels for decoding many sequences together (the server's batched
//! step, [`crate::model::decode`]). Every output row is computed by the same sequence of
//! floating-point operations whichever other rows share the call, so a request's tokens do not
//! depend on what it was batched with, nor on how its prompt was split into chunks:
//!
//! - [`xwt`]: `y = x W^T`. Each element is one 8-lane FMA chain over `k` in steps of 8, summed
//!   across lanes in a fixed tree, then the scalar tail: the same for a 1-row call and for a
//!   block of 4 rows x 3 weight rows, so blocking (which reads each weight row once for all rows)
//!   changes nothing but speed.
//! - [`Csr`] and [`add_sparse_rows`]: `y[rows] += s * x[rows] S^T` for sparse deltas held by
//!   output row, each reading its nonzeros once for all the rows that use it.
//! - [`rms_norm_rows`], [`rope_row`], [`attend`]: per-row loops.

use rayon::prelude::*;

use crate::kernels::gemm::prefetch;

/// Lanes per FMA chain in [`xwt`].
const LANES: usize = 8;

/// `y[i, j] = x_i . w_j` for `x: [n, k]`, `w: [m, k]`, `y: [n, m]` (overwritten); batch-invariant
/// (module docs). Parallel over blocks of weight rows.
pub fn xwt(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, y: &mut [f32]) {
    assert!(
        x.len() >= n * k && w.len() >= m * k && y.len() >= n * m,
        "xwt: operand sizes"
    );
    if n == 0 || m == 0 {
        return;
    }
    // Blocks of weight rows, several per thread so uneven progress evens out; each block's
    // outputs are a column range of y, written through a raw pointer (disjoint per block).
    let block = m.div_ceil(8 * rayon::current_num_threads().max(1)).clamp(12, 384);
    let y_addr = y.as_mut_ptr() as usize;
    (0..m.div_ceil(block)).into_par_iter().for_each(|b| {
        let (j0, j1) = (b * block, ((b + 1) * block).min(m));
        // SAFETY: y holds n * m values (asserted); block b writes only columns j0..j1 of each
        // row, which no other block writes.
        let y = unsafe { std::slice::from_raw_parts_mut(y_addr as *mut f32, n * m) };
        xwt_block(x, n, k, &w[j0 * k..j1 * k], j1 - j0, y, m, j0);
    });
}

/// [`xwt`] for weight rows `w: [mb, k]` into columns `c0..c0 + mb` of `y` (row stride `ldy`).
#[allow(clippy::too_many_arguments)]
fn xwt_block(x: &[f32], n: usize, k: usize, w: &[f32], mb: usize, y: &mut [f32], ldy: usize, c0: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the AVX2 kernel is compiled for (just checked).
        unsafe { avx2::xwt_block(x, n, k, w, mb, y, ldy, c0) };
        return;
    }
    for j in 0..mb {
        for i in 0..n {
            y[i * ldy + c0 + j] = dot_portable(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
        }
    }
}

/// The portable form of one element's chain: 8 lane sums over `k` in steps of 8, the lanes summed
/// as ((0+4)+(2+6)) + ((1+5)+(3+7)), then the tail; the same tree as the AVX2 reduction.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let k = a.len();
    let mut lanes = [0f32; LANES];
    let full = k / LANES * LANES;
    for c in (0..full).step_by(LANES) {
        for l in 0..LANES {
            lanes[l] = a[c + l].mul_add(b[c + l], lanes[l]);
        }
    }
    let mut sum = reduce_lanes(&lanes);
    for c in full..k {
        sum += a[c] * b[c];
    }
    sum
}

/// The fixed lane-summing tree shared by both forms.
fn reduce_lanes(l: &[f32; LANES]) -> f32 {
    let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let p = [q[0] + q[2], q[1] + q[3]];
    p[0] + p[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{reduce_lanes, LANES};

    /// Weight rows per block when several input rows share it, and input rows per block: 12
    /// accumulators, 3 weight loads and one input load fill the 16 registers.
    const WJ: usize = 3;
    const XI: usize = 4;
    /// Weight rows per block for a single input row: more chains to hide the FMA latency.
    const WJ_ONE: usize = 8;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn xwt_block(
        x: &[f32],
        n: usize,
        k: usize,
        w: &[f32],
        mb: usize,
        y: &mut [f32],
        ldy: usize,
        c0: usize,
    ) {
        let mut j = 0;
        if n == 1 {
            while j + WJ_ONE <= mb {
                tile::<1, WJ_ONE>(x, 0, k, w, j, y, ldy, c0);
                j += WJ_ONE;
            }
        }
        while j < mb {
            let wj = (mb - j).min(WJ);
            let mut i = 0;
            while i < n {
                let xi = (n - i).min(XI);
                match (xi, wj) {
                    (4, 3) => tile::<4, 3>(x, i, k, w, j, y, ldy, c0),
                    (4, 2) => tile::<4, 2>(x, i, k, w, j, y, ldy, c0),
                    (4, 1) => tile::<4, 1>(x, i, k, w, j, y, ldy, c0),
                    (3, 3) => tile::<3, 3>(x, i, k, w, j, y, ldy, c0),
                    (3, 2) => tile::<3, 2>(x, i, k, w, j, y, ldy, c0),
                    (3, 1) => tile::<3, 1>(x, i, k, w, j, y, ldy, c0),
                    (2, 3) => tile::<2, 3>(x, i, k, w, j, y, ldy, c0),
                    (2, 2) => tile::<2, 2>(x, i, k, w, j, y, ldy, c0),
                    (2, 1) => tile::<2, 1>(x, i, k, w, j, y, ldy, c0),
                    (1, 3) => tile::<1, 3>(x, i, k, w, j, y, ldy, c0),
                    (1, 2) => tile::<1, 2>(x, i, k, w, j, y, ldy, c0),
                    _ => tile::<1, 1>(x, i, k, w, j, y, ldy, c0),
                }
                i += xi;
            }
            j += wj;
        }
    }

    /// Rows `i0..i0 + R` of x against weight rows `j0..j0 + C`: one FMA chain per element.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const C: usize>(
        x: &[f32],
        i0: usize,
        k: usize,
        w: &[f32],
        j0: usize,
        y: &mut [f32],
        ldy: usize,
        c0: usize,
    ) {
        let xp = x.as_ptr().add(i0 * k);
        let wp = w.as_ptr().add(j0 * k);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = k / LANES * LANES;
        let mut c = 0;
        while c < full {
            let mut wv = [_mm256_setzero_ps(); C];
            for (jj, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add(jj * k + c));
            }
            for (ii, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(ii * k + c));
                for (jj, a) in row.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(xv, wv[jj], *a);
                }
            }
            c += LANES;
        }
        for (ii, row) in acc.iter().enumerate() {
            for (jj, a) in row.iter().enumerate() {
                let mut lanes = [0f32; LANES];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                let mut sum = reduce_lanes(&lanes);
                for t in full..k {
                    sum += *xp.add(ii * k + t) * *wp.add(jj * k + t);
                }
                *y.get_unchecked_mut((i0 + ii) * ldy + c0 + j0 + jj) = sum;
            }
        }
    }
}

/// A sparse delta `S: [out, in]` by output row (compressed sparse rows), the form the server keeps
/// a loaded delta in: row `r`'s nonzeros are `cols[starts[r]..starts[r + 1]]` with their values.
/// Columns are 2 bytes where `in` allows (the projections of the usual LLaMA-family shapes: a step
/// reads 6 bytes per nonzero instead of 8), else 4.
#[derive(Debug, Clone)]
pub struct Csr {
    /// `(out, in)`.
    pub shape: (usize, usize),
    /// `out + 1` offsets into `cols` and `values`.
    pub starts: Vec<u32>,
    /// Column of each nonzero, ascending within a row.
    pub cols: Cols,
    /// Value of each nonzero.
    pub values: Vec<f32>,
}

/// The column indices of a [`Csr`].
#[derive(Debug, Clone)]
pub enum Cols {
    /// For `in <= 65536`.
    U16(Vec<u16>),
    /// Otherwise.
    U32(Vec<u32>),
}

/// A column index type.
trait Col: Copy + Sync {
    fn at(self) -> usize;
}

impl Col for u16 {
    fn at(self) -> usize {
        self as usize
    }
}

impl Col for u32 {
    fn at(self) -> usize {
        self as usize
    }
}

impl Csr {
    /// From sorted unique flat indices `r * in + c` and their values.
    pub fn from_flat(shape: (usize, usize), indices: &[u32], values: &[f32]) -> Csr {
        let (out, inp) = shape;
        let mut starts = vec![0u32; out + 1];
        for &f in indices {
            starts[f as usize / inp + 1] += 1;
        }
        for r in 0..out {
            starts[r + 1] += starts[r];
        }
        let col = |f: &u32| *f as usize % inp;
        let cols = if inp <= 1 << 16 {
            Cols::U16(indices.iter().map(|f| col(f) as u16).collect())
        } else {
            Cols::U32(indices.iter().map(|f| col(f) as u32).collect())
        };
        Csr {
            shape,
            starts,
            cols,
            values: values.to_vec(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let cols = match &self.cols {
            Cols::U16(c) => 2 * c.len(),
            Cols::U32(c) => 4 * c.len(),
        };
        4 * (self.starts.len() + self.values.len()) + cols
    }

    /// `y[i] += scale * x[i] S^T` for each row index `i` in `rows`, with `x: [.., in]` and
    /// `y: [.., out]` row-major; [`add_sparse_rows`] with one delta.
    pub fn add_rows(&self, x: &[f32], y: &mut [f32], rows: &[usize], scale: f32) {
        add_sparse_rows(&[(self, rows, scale)], x, y);
    }

    /// Output rows `r0..r1` of this delta for the rows `rows` (`xt`: their inputs transposed,
    /// `[in, rows]`, when there are several).
    #[allow(clippy::too_many_arguments)]
    fn add_block<C: Col>(
        &self,
        all_cols: &[C],
        x: &[f32],
        xt: &[f32],
        y: &mut [f32],
        rows: &[usize],
        scale: f32,
        (r0, r1): (usize, usize),
    ) {
        let (out, inp) = self.shape;
        let nr = rows.len();
        let mut acc = vec![0f32; SPLIT * nr];
        for r in r0..r1 {
            let (s, e) = (self.starts[r] as usize, self.starts[r + 1] as usize);
            if s == e {
                continue;
            }
            let (cols, vals) = (&all_cols[s..e], &self.values[s..e]);
            let mut add = |i: usize, sum: f32| {
                y[i * out + r] += if scale == 1.0 { sum } else { scale * sum };
            };
            if nr == 1 {
                let xr = &x[rows[0] * inp..(rows[0] + 1) * inp];
                let mut sums = [0f32; SPLIT];
                let (cc, vc) = (cols.chunks_exact(SPLIT), vals.chunks_exact(SPLIT));
                let (ct, vt) = (cc.remainder(), vc.remainder());
                for (n, (c4, v4)) in cc.zip(vc).enumerate() {
                    // The nonzeros stream from memory once: ask for them 2 KiB ahead.
                    if n % 16 == 0 {
                        prefetch(v4.as_ptr().wrapping_add(PREFETCH_AHEAD));
                        prefetch(c4.as_ptr().wrapping_add(PREFETCH_AHEAD).cast());
                    }
                    for l in 0..SPLIT {
                        // SAFETY: every column is below `in` (`Csr::from_flat` takes it mod `in`)
                        // and `xr` holds `in` values.
                        let xv = unsafe { *xr.get_unchecked(c4[l].at()) };
                        sums[l] = v4[l].mul_add(xv, sums[l]);
                    }
                }
                for (l, (c, v)) in ct.iter().zip(vt).enumerate() {
                    sums[l] = v.mul_add(xr[c.at()], sums[l]);
                }
                add(rows[0], (sums[0] + sums[1]) + (sums[2] + sums[3]));
                continue;
            }
            acc.fill(0.0);
            for (p, (&c, &v)) in cols.iter().zip(vals).enumerate() {
                let lane = &mut acc[(p % SPLIT) * nr..(p % SPLIT + 1) * nr];
                let xc = &xt[c.at() * nr..(c.at() + 1) * nr];
                for (a, xv) in lane.iter_mut().zip(xc) {
                    *a = v.mul_add(*xv, *a);
                }
            }
            for (j, &i) in rows.iter().enumerate() {
                add(i, (acc[j] + acc[nr + j]) + (acc[2 * nr + j] + acc[3 * nr + j]));
            }
        }
    }
}

/// `y[i] += scale * x[i] S^T` for every `(S, rows, scale)` in `deltas` and every row index `i` in
/// its `rows`, in one parallel pass over (delta, block of output rows) pairs, so a step's many
/// small corrections cost one hand-off to the threads, not one each. The deltas share one shape
/// and their row sets must be disjoint. Each element sums its row's products in [`SPLIT`] running
/// sums (the nonzero at position p of the row goes to sum p mod 4), adds them as (0+1)+(2+3),
/// then adds that (times `scale` unless it is 1) to `y`: the same for one row as for many, so a
/// row's result does not depend on the others. Several rows' inputs are gathered transposed
/// (`[in, rows]`) so each nonzero is read once and multiplies every row in one vector op.
pub fn add_sparse_rows(deltas: &[(&Csr, &[usize], f32)], x: &[f32], y: &mut [f32]) {
    let Some(&(first, _, _)) = deltas.first() else { return };
    let (out, inp) = first.shape;
    let n = x.len() / inp.max(1);
    let mut seen = vec![false; n];
    for (d, rows, _) in deltas {
        assert_eq!(d.shape, (out, inp), "sparse rows: deltas of different shapes");
        for &i in rows.iter() {
            assert!(i < n && !seen[i], "sparse rows: row {i} out of range or in two deltas");
            seen[i] = true;
        }
    }
    assert!(y.len() >= n * out, "sparse rows: output size");
    let xts: Vec<Vec<f32>> = deltas
        .iter()
        .map(|(_, rows, _)| {
            let nr = rows.len();
            if nr < 2 {
                return Vec::new();
            }
            let mut xt = vec![0f32; inp * nr];
            for (j, &i) in rows.iter().enumerate() {
                for (c, v) in x[i * inp..(i + 1) * inp].iter().enumerate() {
                    xt[c * nr + j] = *v;
                }
            }
            xt
        })
        .collect();
    let block = out.div_ceil(2 * rayon::current_num_threads().max(1)).max(64);
    let tasks: Vec<(usize, usize)> = (0..deltas.len())
        .flat_map(|d| (0..out.div_ceil(block)).map(move |b| (d, b)))
        .collect();
    let y_addr = y.as_mut_ptr() as usize;
    let ylen = y.len();
    tasks.into_par_iter().for_each(|(d, b)| {
        // SAFETY: task (d, b) writes only output columns b*block.. of delta d's rows; the row
        // sets are disjoint (asserted), so no two tasks write the same element.
        let y = unsafe { std::slice::from_raw_parts_mut(y_addr as *mut f32, ylen) };
        let (csr, rows, scale) = deltas[d];
        let range = (b * block, ((b + 1) * block).min(out));
        match &csr.cols {
            Cols::U16(c) => csr.add_block(c, x, &xts[d], y, rows, scale, range),
            Cols::U32(c) => csr.add_block(c, x, &xts[d], y, rows, scale, range),
        }
    });
}

/// How far ahead of the current nonzero [`add_sparse_rows`] prefetches (elements).
const PREFETCH_AHEAD: usize = 512;

/// Running sums per element in [`add_sparse_rows`] (independent chains hide the FMA latency).
const SPLIT: usize = 4;

/// RMSNorm of each row of `x: [n, h]` with weight `w: [h]`: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm_rows(x: &[f32], h: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (xr, yr) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((y, v), g) in yr.iter_mut().zip(xr).zip(w) {
            *y = v * inv * g;
        }
    }
    out
}

/// Rotate-half RoPE in place on one position's heads `x: [heads, d]` with that position's
/// `cos`, `sin: [d/2]`.
pub fn rope_row(x: &mut [f32], d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    for head in x.chunks_exact_mut(d) {
        for i in 0..half {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos[i] - b * sin[i];
            head[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

/// One query head `q: [d]` attending keys and values `0..len` laid out position-major with row
/// stride `ld` (`k[j * ld .. j * ld + d]`): softmax(q k^T * scale) v, into `out: [d]`.
pub fn attend(q: &[f32], k: &[f32], v: &[f32], ld: usize, len: usize, scale: f32, out: &mut [f32]) {
    let d = q.len();
    let mut scores: Vec<f32> = (0..len)
        .map(|j| dot_portable(q, &k[j * ld..j * ld + d]) * scale)
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    out.fill(0.0);
    for (j, s) in scores.iter().enumerate() {
        let p = s / total;
        for (o, x) in out.iter_mut().zip(&v[j * ld..j * ld + d]) {
            *o = p.mul_add(*x, *o);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::kernels::testing::uniform;

    fn xwt_f64(x: &[f32], n: usize, k: usize, w: &[f32], m: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * m];
        for i in 0..n {
            for j in 0..m {
                y[i * m + j] = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn xwt_matches_f64_on_awkward_shapes_and_is_batch_invariant() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for &(n, k, m) in &[
            (1, 1, 1),
            (1, 7, 5),
            (1, 576, 193),
            (3, 33, 13),
            (5, 64, 7),
            (9, 100, 29),
            (17, 9, 40),
        ] {
            let (x, w) = (uniform(n * k, 1.0, &mut rng), uniform(m * k, 1.0, &mut rng));
            let mut y = vec![f32::NAN; n * m];
            xwt(&x, n, k, &w, m, &mut y);
            let r = xwt_f64(&x, n, k, &w, m);
            for (a, b) in y.iter().zip(&r) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * (k as f64).sqrt(),
                    "n {n} k {k} m {m}: {a} vs {b}"
                );
            }
            // Each row alone gives bit-identical values to the row inside the batch.
            for i in 0..n {
                let mut one = vec![0f32; m];
                xwt(&x[i * k..(i + 1) * k], 1, k, &w, m, &mut one);
                assert_eq!(one, y[i * m..(i + 1) * m], "row {i} of n {n} k {k} m {m}");
            }
        }
    }

    #[test]
    fn portable_chain_equals_the_avx2_chain() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for k in [1, 8, 13, 64, 577] {
            let (x, w) = (uniform(k, 1.0, &mut rng), uniform(3 * k, 1.0, &mut rng));
            let mut y = vec![0f32; 3];
            xwt(&x, 1, k, &w, 3, &mut y);
            for j in 0..3 {
                assert_eq!(y[j], dot_portable(&x, &w[j * k..(j + 1) * k]), "k {k}");
            }
        }
    }

    #[test]
    fn csr_add_rows_matches_a_dense_f64_reference_on_chosen_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (out, inp, n) = (37, 23, 6);
        let mut flat: Vec<u32> = (0..(out * inp) as u32)
            .filter(|_| rand::Rng::gen_bool(&mut rng, 0.2))
            .collect();
        flat.dedup();
        let values = uniform(flat.len(), 1.0, &mut rng);
        let csr = Csr::from_flat((out, inp), &flat, &values);
        let x = uniform(n * inp, 1.0, &mut rng);
        let y0 = uniform(n * out, 1.0, &mut rng);
        let rows = [0usize, 2, 5];
        let mut y = y0.clone();
        csr.add_rows(&x, &mut y, &rows, 0.5);
        let mut dense = vec![0f64; out * inp];
        for (&f, &v) in flat.iter().zip(&values) {
            dense[f as usize] = v as f64;
        }
        for i in 0..n {
            for r in 0..out {
                let corr: f64 = (0..inp).map(|c| dense[r * inp + c] * x[i * inp + c] as f64).sum();
                let want = y0[i * out + r] as f64 + if rows.contains(&i) { 0.5 * corr } else { 0.0 };
                assert!((y[i * out + r] as f64 - want).abs() < 1e-5, "row {i} out {r}");
            }
        }
        // One row at a time gives bit-identical values (the one-row path reads x in place).
        for &i in &rows {
            let mut alone = y0.clone();
            csr.add_rows(&x, &mut alone, &[i], 0.5);
            assert_eq!(alone[i * out..(i + 1) * out], y[i * out..(i + 1) * out], "row {i}");
        }
        assert_eq!(csr.starts.len(), out + 1);
        assert_eq!(*csr.starts.last().unwrap() as usize, flat.len());
    }

    #[test]
    fn csr_past_two_byte_columns_keeps_four_byte_ones() {
        let inp = 70_000u32;
        let flat = [5u32, 69_999, inp + 1, 2 * inp + 65_540];
        let csr = Csr::from_flat((3, inp as usize), &flat, &[1.0, 2.0, 3.0, 4.0]);
        assert!(matches!(csr.cols, Cols::U32(_)));
        let x: Vec<f32> = (0..2 * inp as usize).map(|i| (i % 7) as f32).collect();
        let mut y = vec![0f32; 6];
        csr.add_rows(&x, &mut y, &[0, 1], 1.0);
        let want = |xr: &[f32]| [xr[5] + 2.0 * xr[69_999], 3.0 * xr[1], 4.0 * xr[65_540]];
        assert_eq!(y[..3], want(&x[..inp as usize]));
        assert_eq!(y[3..], want(&x[inp as usize..]));
    }

    #[test]
    fn attend_and_norm_match_f64_references() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (d, len, ld) = (12, 7, 20);
        let (q, k, v) = (
            uniform(d, 1.0, &mut rng),
            uniform(len * ld, 1.0, &mut rng),
            uniform(len * ld, 1.0, &mut rng),
        );
        let mut out = vec![0f32; d];
        attend(&q, &k, &v, ld, len, 0.3, &mut out);
        let s: Vec<f64> = (0..len)
            .map(|j| (0..d).map(|c| q[c] as f64 * k[j * ld + c] as f64).sum::<f64>() * 0.3)
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let t: f64 = e.iter().sum();
        for c in 0..d {
            let want: f64 = (0..len).map(|j| e[j] / t * v[j * ld + c] as f64).sum();
            assert!((out[c] as f64 - want).abs() < 1e-5);
        }
        let (h, x, w) = (9, uniform(18, 2.0, &mut rng), uniform(9, 1.0, &mut rng));
        let y = rms_norm_rows(&x, h, &w, 1e-5);
        for r in 0..2 {
            let ms: f64 = x[r * h..(r + 1) * h].iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
            for c in 0..h {
                let want = x[r * h + c] as f64 / (ms + 1e-5).sqrt() * w[c] as f64;
                assert!((y[r * h + c] as f64 - want).abs() < 1e-5);
            }
        }
    }
}
