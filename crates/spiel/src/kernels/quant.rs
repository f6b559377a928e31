//! Tensor element formats found in GGUF and safetensors files: dequantisation to f32, and the
//! matching quantisers (ggml's reference rounding) for writing them.
//!
//! Block layouts (32 weights per block), as in ggml:
//! - Q4_0: f16 scale d, 16 bytes of nibbles; w[j] = d * ((q[j] & 0xF) - 8), w[16+j] = d * ((q[j] >> 4) - 8).
//! - Q4_1: f16 d, f16 m, 16 bytes of nibbles; w[j] = d * (q[j] & 0xF) + m, w[16+j] = d * (q[j] >> 4) + m.
//! - Q8_0: f16 d, 32 x i8; w[j] = d * q[j].

use half::{bf16, f16};
use rayon::prelude::*;

/// An element format of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// ggml Q4_0 blocks.
    Q4_0,
    /// ggml Q4_1 blocks.
    Q4_1,
    /// ggml Q8_0 blocks.
    Q8_0,
}

/// Weights per quantisation block.
pub const QK: usize = 32;

impl Format {
    /// The ggml type id of this format, as stored in GGUF tensor tables.
    pub fn ggml_id(self) -> u32 {
        match self {
            Format::F32 => 0,
            Format::F16 => 1,
            Format::Q4_0 => 2,
            Format::Q4_1 => 3,
            Format::Q8_0 => 8,
            Format::BF16 => 30,
        }
    }

    /// The format for a ggml type id, or `None` when spiel does not read it.
    pub fn from_ggml_id(id: u32) -> Option<Format> {
        Some(match id {
            0 => Format::F32,
            1 => Format::F16,
            2 => Format::Q4_0,
            3 => Format::Q4_1,
            8 => Format::Q8_0,
            30 => Format::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Format::F32 => (1, 4),
            Format::F16 | Format::BF16 => (1, 2),
            Format::Q4_0 => (QK, 18),
            Format::Q4_1 => (QK, 20),
            Format::Q8_0 => (QK, 34),
        }
    }

    /// Bytes needed for `n` elements, or `None` if `n` is not a whole number of blocks or overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (per, bytes) = self.block();
        if !n.is_multiple_of(per) {
            return None;
        }
        (n / per).checked_mul(bytes)
    }
}

/// A human name for a ggml type id, used in error messages.
pub fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        30 => "BF16",
        _ => "unknown",
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantise `src` (exactly `format.bytes_for(dst.len())` bytes) into `dst`.
/// Work is split across threads in chunks of whole blocks.
pub fn dequantize(format: Format, src: &[u8], dst: &mut [f32]) {
    let (per, bytes) = format.block();
    debug_assert_eq!(Some(src.len()), format.bytes_for(dst.len()));
    // 4096 elements per task keeps rayon overhead small against the work.
    let chunk_elems = (4096 / per).max(1) * per;
    let chunk_bytes = chunk_elems / per * bytes;
    dst.par_chunks_mut(chunk_elems)
        .zip(src.par_chunks(chunk_bytes))
        .for_each(|(d, s)| dequantize_serial(format, s, d));
}

/// Single-threaded dequantisation; the kernel behind [`dequantize`].
pub fn dequantize_serial(format: Format, src: &[u8], dst: &mut [f32]) {
    match format {
        Format::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        Format::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        Format::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        Format::Q4_0 => {
            for (d, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(18)) {
                let scale = f16_at(b, 0);
                let q = &b[2..18];
                for j in 0..16 {
                    d[j] = scale * ((q[j] & 0xF) as i32 - 8) as f32;
                    d[j + 16] = scale * ((q[j] >> 4) as i32 - 8) as f32;
                }
            }
        }
        Format::Q4_1 => {
            for (d, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(20)) {
                let scale = f16_at(b, 0);
                let min = f16_at(b, 2);
                let q = &b[4..20];
                for j in 0..16 {
                    d[j] = scale * (q[j] & 0xF) as f32 + min;
                    d[j + 16] = scale * (q[j] >> 4) as f32 + min;
                }
            }
        }
        Format::Q8_0 => {
            for (d, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(34)) {
                let scale = f16_at(b, 0);
                for j in 0..QK {
                    d[j] = scale * (b[2 + j] as i8) as f32;
                }
            }
        }
    }
}

/// Encode `data` in `format`, the way ggml's reference quantisers do: Q4_0 scales by the
/// signed value of largest magnitude over -8, Q4_1 spans [min, max] in 15 steps, Q8_0 scales by
/// absmax / 127. `None` when `data.len()` is not a whole number of blocks.
pub fn quantize(format: Format, data: &[f32]) -> Option<Vec<u8>> {
    let out_len = format.bytes_for(data.len())?;
    let mut out = Vec::with_capacity(out_len);
    match format {
        Format::F32 => data.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Format::F16 => data
            .iter()
            .for_each(|x| out.extend_from_slice(&f16::from_f32(*x).to_le_bytes())),
        Format::BF16 => data
            .iter()
            .for_each(|x| out.extend_from_slice(&bf16::from_f32(*x).to_le_bytes())),
        Format::Q4_0 => {
            for b in data.chunks_exact(QK) {
                let max = b.iter().fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |x: f32| ((x * id + 8.5) as u8).min(15);
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        Format::Q4_1 => {
            for b in data.chunks_exact(QK) {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |x: f32| (((x - min) * id + 0.5) as u8).min(15);
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        Format::Q8_0 => {
            for b in data.chunks_exact(QK) {
                let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|x| (x * id).round() as i8 as u8));
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Reference: decode one element at a time from first principles, in f64.
    fn reference(format: Format, src: &[u8], n: usize) -> Vec<f64> {
        let (per, bytes) = format.block();
        (0..n)
            .map(|i| {
                let b = &src[(i / per) * bytes..(i / per + 1) * bytes];
                let j = i % per;
                let h = |o: usize| f16::from_bits(u16::from_le_bytes([b[o], b[o + 1]])).to_f64();
                match format {
                    Format::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                    Format::F16 => h(0),
                    Format::BF16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
                    Format::Q4_0 | Format::Q4_1 => {
                        let base = if format == Format::Q4_0 { 2 } else { 4 };
                        let byte = b[base + (j % 16)];
                        let nib = if j < 16 { byte & 0xF } else { byte >> 4 } as f64;
                        if format == Format::Q4_0 {
                            h(0) * (nib - 8.0)
                        } else {
                            h(0) * nib + h(2)
                        }
                    }
                    Format::Q8_0 => h(0) * (b[2 + j] as i8) as f64,
                }
            })
            .collect()
    }

    fn random_bytes(format: Format, n: usize, rng: &mut impl Rng) -> Vec<u8> {
        let (per, bytes) = format.block();
        let mut out = vec![0u8; n / per * bytes];
        rng.fill(&mut out[..]);
        // Keep scales finite: overwrite f16 fields with random finite halves.
        let scale_fields: &[usize] = match format {
            Format::Q4_0 | Format::Q8_0 => &[0],
            Format::Q4_1 => &[0, 2],
            Format::F16 => &[0],
            _ => &[],
        };
        for blk in out.chunks_exact_mut(bytes) {
            for &o in scale_fields {
                let v = f16::from_f32(rng.gen_range(-2.0f32..2.0));
                blk[o..o + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        if format == Format::F32 {
            for c in out.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.gen_range(-3.0f32..3.0).to_le_bytes());
            }
        }
        if format == Format::BF16 {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(rng.gen_range(-3.0f32..3.0)).to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn dequantize_matches_reference_bit_exact() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for format in [
            Format::F32,
            Format::F16,
            Format::BF16,
            Format::Q4_0,
            Format::Q4_1,
            Format::Q8_0,
        ] {
            // Awkward sizes: one block, a few, and more than one parallel chunk with a ragged tail.
            for blocks in [1usize, 3, 129, 4096 / 32 * 3 + 5] {
                let n = blocks * format.block().0.max(1) * if format.block().0 == 1 { 37 } else { 1 };
                let src = random_bytes(format, n, &mut rng);
                let mut dst = vec![0f32; n];
                dequantize(format, &src, &mut dst);
                let want = reference(format, &src, n);
                for (i, (g, w)) in dst.iter().zip(&want).enumerate() {
                    assert_eq!(*g, *w as f32, "{format:?} n={n} element {i}");
                }
            }
        }
    }

    #[test]
    fn bytes_for_rejects_partial_blocks() {
        assert_eq!(Format::Q4_1.bytes_for(64), Some(40));
        assert_eq!(Format::Q4_1.bytes_for(33), None);
        assert_eq!(Format::F32.bytes_for(3), Some(12));
        assert_eq!(Format::Q8_0.bytes_for(usize::MAX / 32 * 32), None);
    }

    #[test]
    fn quantize_round_trip_error_is_within_the_format_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for format in [Format::F16, Format::BF16, Format::Q4_0, Format::Q4_1, Format::Q8_0] {
            for blocks in [1usize, 7, 130] {
                let n = blocks * 32;
                let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
                let q = quantize(format, &x).unwrap();
                assert_eq!(q.len(), format.bytes_for(n).unwrap());
                let mut y = vec![0f32; n];
                dequantize(format, &q, &mut y);
                for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let (lo, hi) = xb.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                    // Largest error per element: half a step, except Q4_0, whose asymmetric
                    // range [-8d, 7d] can clip the far end by a whole step. Plus f16 scale rounding.
                    let bound = match format {
                        Format::F16 => amax * 2f32.powi(-11),
                        Format::BF16 => amax * 2f32.powi(-8),
                        Format::Q4_0 => amax / 8.0 * 1.01,
                        Format::Q4_1 => (hi - lo) / 15.0 * 0.51 + amax * 1e-3,
                        Format::Q8_0 => amax / 127.0 * 0.51 + amax * 1e-3,
                        Format::F32 => 0.0,
                    };
                    for (i, (a, c)) in xb.iter().zip(yb).enumerate() {
                        assert!(
                            (a - c).abs() <= bound,
                            "{format:?} block {b} elem {i}: {a} vs {c} (bound {bound})"
                        );
                    }
                }
            }
        }
        assert!(quantize(Format::Q4_0, &[0.0; 33]).is_none());
        // An all-zero block stays zero.
        let z = quantize(Format::Q4_1, &[0.0; 32]).unwrap();
        let mut y = vec![1f32; 32];
        dequantize(Format::Q4_1, &z, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
