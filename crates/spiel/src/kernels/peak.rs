//! One core's arithmetic peak, measured: independent chains of f32 FMAs and of AVX-512 BF16 dot
//! products (`vdpbf16ps`) that never touch memory, the ceiling every product kernel is set
//! against (`spiel bench gemm`). Uses nothing else in the crate.

use std::time::Instant;

/// Independent accumulators per loop: enough to hide either instruction's latency.
const CHAINS: usize = 12;

/// One core's measured rates, in GFLOP/s (a multiply-add counts 2 FLOP).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PeakRates {
    /// f32 fused multiply-adds, 16 lanes (AVX-512) or 8 (AVX2), whichever the CPU has widest.
    pub f32_fma: f64,
    /// AVX-512 BF16 dot products (32 bf16 products summed into 16 f32 lanes per instruction);
    /// `None` where the CPU lacks AVX512-BF16.
    pub bf16_dot: Option<f64>,
}

/// Measure both rates on the calling thread, each the best of `rounds` runs of `iterations`
/// loop trips (`CHAINS` instructions each).
pub fn measure(iterations: usize, rounds: usize) -> PeakRates {
    let best = |f: &dyn Fn() -> (f64, f32)| {
        (0..rounds.max(1))
            .map(|_| {
                let t = Instant::now();
                let (flop, sum) = f();
                std::hint::black_box(sum);
                flop / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    };
    PeakRates {
        f32_fma: best(&|| fma_f32(iterations)),
        bf16_dot: bf16_dot_available().then(|| best(&|| dot_bf16(iterations).expect("checked above"))),
    }
}

/// Whether this CPU has AVX512-BF16.
pub fn bf16_dot_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `iterations` trips of `CHAINS` FMAs `acc = 1 * 0.5 + acc` on the widest f32 vectors here:
/// (FLOP done, sum of every lane, which is exact: 0.5 * lanes * CHAINS * iterations while that
/// stays below 2^24).
fn fma_f32(iterations: usize) -> (f64, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F checked just above; register-only arithmetic.
            return (2.0 * 16.0 * (CHAINS * iterations) as f64, unsafe {
                fma_avx512(iterations)
            });
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA checked just above; register-only arithmetic.
            return (2.0 * 8.0 * (CHAINS * iterations) as f64, unsafe {
                fma_avx2(iterations)
            });
        }
    }
    let mut acc = [0f32; CHAINS];
    for _ in 0..iterations {
        for a in &mut acc {
            *a = std::hint::black_box(1f32).mul_add(0.5, *a);
        }
    }
    (2.0 * (CHAINS * iterations) as f64, acc.iter().sum())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(iterations: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(1.0), _mm512_set1_ps(0.5));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..iterations {
        for c in &mut acc {
            *c = _mm512_fmadd_ps(a, b, *c);
        }
    }
    let s = acc.iter().fold(_mm512_setzero_ps(), |s, &c| _mm512_add_ps(s, c));
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iterations: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(1.0), _mm256_set1_ps(0.5));
    let mut acc = [_mm256_setzero_ps(); CHAINS];
    for _ in 0..iterations {
        for c in &mut acc {
            *c = _mm256_fmadd_ps(a, b, *c);
        }
    }
    let s = acc.iter().fold(_mm256_setzero_ps(), |s, &c| _mm256_add_ps(s, c));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    lanes.iter().sum()
}

/// `iterations` trips of `CHAINS` dot products `acc += 1 * 0.5 + 1 * 0.5` per f32 lane (bf16
/// operands): (FLOP done, sum of every lane, exactly 16 * CHAINS * iterations while that stays
/// below 2^24), or `None` without AVX512-BF16.
fn dot_bf16(iterations: usize) -> Option<(f64, f32)> {
    if !bf16_dot_available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX512-BF16 checked above; register-only arithmetic.
        Some((2.0 * 32.0 * (CHAINS * iterations) as f64, unsafe {
            dot_avx512bf16(iterations)
        }))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_avx512bf16(iterations: usize) -> f32 {
    use std::arch::x86_64::*;
    // bf16 1.0 is 0x3f80 and 0.5 is 0x3f00; each 32-bit lane holds a pair.
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80));
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f00_3f00));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..iterations {
        for c in &mut acc {
            *c = _mm512_dpbf16_ps(*c, a, b);
        }
    }
    let s = acc.iter().fold(_mm512_setzero_ps(), |s, &c| _mm512_add_ps(s, c));
    _mm512_reduce_add_ps(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loops_compute_what_they_count() {
        // Small enough that every partial sum is exact in f32.
        for n in [1, 7, 1000] {
            let (flop, sum) = fma_f32(n);
            let lanes = flop / (2.0 * (CHAINS * n) as f64);
            assert_eq!(sum as f64, 0.5 * lanes * (CHAINS * n) as f64, "{n}");
            if let Some((flop, sum)) = dot_bf16(n) {
                assert_eq!(flop, 64.0 * (CHAINS * n) as f64);
                assert_eq!(sum as f64, 16.0 * (CHAINS * n) as f64, "{n}");
            }
        }
        let r = measure(1000, 2);
        assert!(r.f32_fma.is_finite() && r.f32_fma > 0.0);
        assert_eq!(r.bf16_dot.is_some(), bf16_dot_available());
    }
}
