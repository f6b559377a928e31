//! What the kernels share, below all of them: reading a CPU tensor's values in place (f32 or
//! bf16), bf16 rounding and widening, and building gradients in a tensor's dtype. No kernel
//! imports another for these, so the kernels form no import circle.

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Layout, Tensor};
use half::bf16;
use rayon::prelude::*;

/// The f32 data of a contiguous CPU storage, or an error naming the op (`what`).
pub(crate) fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("{what}: f32 only"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// The values of a contiguous f32 or bf16 CPU storage as f32: borrowed when f32, widened when
/// bf16. Errors name the op (`what`).
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: input must be contiguous")
    };
    match s {
        CpuStorage::F32(d) => Ok(Cow::Borrowed(&d[a..b])),
        CpuStorage::BF16(d) => Ok(Cow::Owned(widen(&d[a..b]))),
        _ => candle_core::bail!("{what}: f32 or bf16 only"),
    }
}

/// bf16 values widened to f32 (exact), in parallel.
pub(crate) fn widen(v: &[bf16]) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    out.par_chunks_mut(1 << 14)
        .zip(v.par_chunks(1 << 14))
        .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, &i)| *o = bf16_to_f32(i)));
    out
}

/// f32 values narrowed to bf16 (round to nearest even), in parallel.
pub(crate) fn narrow(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    out.par_chunks_mut(1 << 14)
        .zip(v.par_chunks(1 << 14))
        .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, i)| *o = bf16::from_f32(*i)));
    out
}

/// An op's f32 result as storage of its input `like`'s dtype (bf16 narrowed, otherwise f32).
pub(crate) fn storage_like(y: Vec<f32>, like: &CpuStorage) -> CpuStorage {
    match like {
        CpuStorage::BF16(_) => CpuStorage::BF16(narrow(&y)),
        _ => CpuStorage::F32(y),
    }
}

/// A tensor's elements as a flat row-major f32 vector (widened if bf16).
pub(crate) fn vec_of(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

/// Run `f` on the values of `ts` as f32: each read in place where it is a contiguous f32 CPU
/// tensor (a backward's inputs usually are), else a converted copy ([`vec_of`]). Saves a copy of
/// every input per backward.
pub(crate) fn with_f32s<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> candle_core::Result<R> {
    let in_place = |t: &Tensor| {
        let (storage, layout) = t.storage_and_layout();
        matches!(&*storage, candle_core::Storage::Cpu(CpuStorage::F32(_))) && layout.is_contiguous()
    };
    let copies: Vec<Option<Vec<f32>>> = ts
        .iter()
        .map(|t| if in_place(t) { Ok(None) } else { widened(t).map(Some) })
        .collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(ts.len());
    for ((storage, layout), copy) in guards.iter().zip(&copies) {
        slices.push(match (copy, &**storage) {
            (Some(c), _) => c.as_slice(),
            (None, candle_core::Storage::Cpu(cpu)) => cpu_slice(cpu, layout, "backward input")?,
            (None, _) => candle_core::bail!("backward input: CPU tensors only"),
        });
    }
    Ok(f(&slices))
}

/// A tensor's values as f32: a contiguous bf16 CPU tensor widened in one parallel pass
/// ([`cpu_f32`]), anything else through candle ([`vec_of`]: a single-threaded conversion, then a
/// copy).
fn widened(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            if let Ok(v) = cpu_f32(cpu, layout, "backward input") {
                return Ok(v.into_owned());
            }
        }
    }
    vec_of(t)
}

/// A gradient `v` for `like`: a tensor of its shape, device and dtype (bf16 narrowed in one
/// parallel pass, [`narrow`]).
pub(crate) fn grad_like(v: Vec<f32>, like: &Tensor) -> candle_core::Result<Tensor> {
    match like.dtype() {
        DType::BF16 => Tensor::from_vec(narrow(&v), like.shape(), like.device()),
        other => Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(other),
    }
}

/// The values of a contiguous f32 or bf16 CPU tensor, read in place: activations, which may be
/// held in either (`Llama::compute_in`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Values<'a> {
    /// The values of a contiguous f32 or bf16 CPU storage; errors name the op (`what`).
    pub(crate) fn of(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Values<'a>> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{what}: input must be contiguous")
        };
        match s {
            CpuStorage::F32(d) => Ok(Values::F32(&d[a..b])),
            CpuStorage::BF16(d) => Ok(Values::Bf16(&d[a..b])),
            _ => candle_core::bail!("{what}: f32 or bf16 only"),
        }
    }

    /// How many values.
    pub(crate) fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }

    /// Values `at`.
    pub(crate) fn slice(self, at: std::ops::Range<usize>) -> Values<'a> {
        match self {
            Values::F32(v) => Values::F32(&v[at]),
            Values::Bf16(v) => Values::Bf16(&v[at]),
        }
    }

    /// Value `i` as f32.
    #[inline(always)]
    pub(crate) fn get(&self, i: usize) -> f32 {
        match self {
            Values::F32(v) => v[i],
            Values::Bf16(v) => bf16_to_f32(v[i]),
        }
    }

    /// All the values as f32: borrowed when f32, widened in parallel when bf16.
    pub(crate) fn to_f32(self) -> Cow<'a, [f32]> {
        match self {
            Values::F32(v) => Cow::Borrowed(v),
            Values::Bf16(v) => Cow::Owned(widen(v)),
        }
    }

    /// Values `at` as f32: borrowed when f32, widened into `scratch` when bf16.
    pub(crate) fn chunk<'s>(&'s self, at: std::ops::Range<usize>, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        match self {
            Values::F32(v) => &v[at],
            Values::Bf16(v) => {
                scratch.clear();
                scratch.extend(v[at].iter().map(|&x| bf16_to_f32(x)));
                scratch
            }
        }
    }
}

impl<'a> From<&'a [f32]> for Values<'a> {
    fn from(v: &'a [f32]) -> Self {
        Values::F32(v)
    }
}

impl<'a> From<&'a Vec<f32>> for Values<'a> {
    fn from(v: &'a Vec<f32>) -> Self {
        Values::F32(v)
    }
}

impl<'a> From<&'a [bf16]> for Values<'a> {
    fn from(v: &'a [bf16]) -> Self {
        Values::Bf16(v)
    }
}

/// A bf16 value widened to f32 (exact; a shift, which vectorises).
#[inline(always)]
pub(crate) fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// `x` rounded to bf16 (nearest, ties to even), as its 16 bits. NaN stays NaN.
#[inline]
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
#[inline]
pub(crate) fn rounded(x: f32) -> f32 {
    f32::from_bits((round_bf16(x) as u32) << 16)
}
