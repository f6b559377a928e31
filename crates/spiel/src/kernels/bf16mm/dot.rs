//! The AVX-512 BF16 block kernel of [`super`]: the 32 x 32 output block that the tile unit
//! computes in [`super::packed`], from the same packed operands, with `vdpbf16ps` (each
//! instruction multiplies 16 pairs of bf16 values exactly and adds both products to 16 f32
//! sums). For CPUs with AVX512-BF16 but no tile unit (AMD Zen 4 and later, some Intel Xeons).
//!
//! The packed right panel holds, per pair row, the pairs of 16 columns: one vector. The packed
//! left tile holds, per row, 16 pairs along the depth: each is broadcast to a vector. A block is
//! done as four strips of 8 rows by 32 columns, 16 accumulators each, so that every pair row of
//! the two right panels (two loads) feeds 16 dot products.

/// Rows per strip: 8 rows by 2 panels of 16 columns keeps 16 accumulators in registers, with
/// room for the two panel rows and the broadcast.
const STRIP: usize = 8;

/// One 32 x 32 output block `c` (row stride `ldc` values), added to (`accumulate`) or
/// overwritten, from the packed operands [`super::packed`]'s tile block reads: `depth / 32`
/// tiles of 16 x 32 bf16 at `a0` and `a1` (rows 0-15 and 16-31), and two panels of
/// `depth / 2` rows of 16 bf16 pairs at `b0`, `b1`.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16; the operands must hold what is described above
/// and `c` 32 rows of 32 values at stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block(
    a0: *const u16,
    a1: *const u16,
    b0: *const u32,
    b1: *const u32,
    depth: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    for (half, a) in [a0, a1].into_iter().enumerate() {
        for strip in 0..16 / STRIP {
            let r0 = strip * STRIP;
            strip_kernel(
                (a as *const u32).add(r0 * 16),
                b0,
                b1,
                depth,
                c.add((half * 16 + r0) * ldc),
                ldc,
                accumulate,
            );
        }
    }
}

/// Rows `r0 .. r0 + 8` of a block: `a` points at row `r0`'s pairs in the first left tile.
///
/// # Safety
/// As [`block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn strip_kernel(
    a: *const u32,
    b0: *const u32,
    b1: *const u32,
    depth: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; STRIP];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = _mm512_loadu_ps(c.add(r * ldc));
            row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
        }
    }
    // A left tile is 16 rows of 16 pairs (512 bf16); a right panel's step is 16 pair rows of
    // 16 pairs.
    for s in 0..depth / 32 {
        let (at, p0, p1) = (a.add(s * 256), b0.add(s * 256), b1.add(s * 256));
        for p in 0..16 {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(p0.add(p * 16) as *const __m512i));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(p1.add(p * 16) as *const __m512i));
            for (r, row) in acc.iter_mut().enumerate() {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*at.add(r * 16 + p) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], x, w0);
                row[1] = _mm512_dpbf16_ps(row[1], x, w1);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * ldc), row[0]);
        _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block(
    _: *const u16,
    _: *const u16,
    _: *const u32,
    _: *const u32,
    _: usize,
    _: *mut f32,
    _: usize,
    _: bool,
) {
    unreachable!("AVX512-BF16 is only used on x86-64")
}

/// Whether this CPU has the instructions [`block`] and the packing use.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
