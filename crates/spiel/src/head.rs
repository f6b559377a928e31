//! The vocabulary head fused with the cross-entropy loss, a chunk of rows at a time.
//!
//! The plain path forms the `[N, V]` logits, keeps them (and their log-softmax) for the backward
//! and forms an `[N, V]` gradient: about 11 vocabulary-sized floats per target, 2.1 GB for
//! 1,020 targets of SmolLM2's 49,152-token vocabulary. Here the forward computes each chunk's
//! logits, turns them in place into `(softmax - onehot) / N`, adds up the loss terms and, when a
//! backward will follow, multiplies the chunk by the head weight into the input gradient, kept
//! for the backward (which only scales it). Memory: one `[chunk, V]` buffer and the `[N, H]`
//! gradient. Cost: the same two head GEMMs as the plain path. The head weight is frozen (adapter
//! methods); full fine-tuning, which trains it, keeps the plain path.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::profile::{span, Phase};
use crate::qmatrix::Frozen;
#[cfg(test)]
use crate::qmatrix::QMatrix;
use crate::{Error, Result};

/// Floats of logits held at once (32 MiB).
pub const CHUNK_FLOATS: usize = 8 << 20;

/// Mean cross-entropy of `targets` (one per row) under the logits `rows W^T`, for `rows: [N, H]`,
/// differentiable in `rows`; the `[N, V]` logits are never all held at once.
pub fn head_cross_entropy(rows: &Tensor, w: &Frozen, targets: &[u32]) -> Result<Tensor> {
    let (n, _) = rows.dims2()?;
    if n != targets.len() || n == 0 {
        return Err(Error::Invalid(format!(
            "fused head: {n} rows but {} targets",
            targets.len()
        )));
    }
    let v = w.shape().0;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(Error::Invalid(format!(
            "target id {bad} is outside the vocabulary of {v}"
        )));
    }
    Ok(rows.contiguous()?.apply_op1(HeadLoss {
        w: w.clone(),
        targets: Arc::new(targets.to_vec()),
        eager: rows.track_op().then(|| Mutex::new(None)),
    })?)
}

struct HeadLoss {
    w: Frozen,
    targets: Arc<Vec<u32>>,
    /// When a backward will follow: the input gradient for an incoming gradient of 1, formed
    /// in the forward while each chunk's probabilities are at hand (so the backward needs no
    /// second pass over the vocabulary).
    eager: Option<Mutex<Option<Vec<f32>>>>,
}

impl HeadLoss {
    /// Rows per chunk.
    fn chunk(&self) -> usize {
        (CHUNK_FLOATS / self.w.shape().0.max(1)).max(1)
    }
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::HeadForward);
        let x = crate::ops::cpu_slice(s, l, "head-cross-entropy")?;
        let (n, h) = l.shape().dims2()?;
        let v = self.w.shape().0;
        let mut total = 0f64;
        let mut dx = Vec::with_capacity(if self.eager.is_some() { n * h } else { 0 });
        for (c, xs) in x.chunks(self.chunk() * h).enumerate() {
            let m = xs.len() / h;
            let first = c * self.chunk();
            let mut p = self.w.matmul_t(xs, m)?;
            // Each row becomes its softmax, scaled by 1/N, minus 1/N at the target (the gradient
            // of the mean loss); its loss term is kept.
            let inv_n = 1.0 / n as f32;
            let losses: Vec<f64> = p
                .par_chunks_mut(v)
                .enumerate()
                .map(|(i, row)| {
                    let t = self.targets[first + i] as usize;
                    let target_logit = row[t];
                    let (mx, sum) = softmax_in_place(row, inv_n);
                    row[t] -= inv_n;
                    (mx as f64 + sum.ln()) - target_logit as f64
                })
                .collect();
            total += losses.iter().sum::<f64>();
            if self.eager.is_some() {
                dx.extend(self.w.matmul(&p, m)?);
            }
        }
        if let Some(slot) = &self.eager {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(dx);
        }
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, rows: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _t = span(Phase::HeadBackward);
        let (n, h) = rows.dims2()?;
        let g = grad.to_scalar::<f32>()?;
        let stored = self
            .eager
            .as_ref()
            .and_then(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).take());
        let dx = match stored {
            Some(mut dx) => {
                dx.iter_mut().for_each(|d| *d *= g);
                dx
            }
            // A second backward through the same graph: recompute chunk by chunk.
            None => {
                let v = self.w.shape().0;
                let x: Vec<f32> = rows.flatten_all()?.to_vec1()?;
                let mut dx = Vec::with_capacity(n * h);
                for (c, xs) in x.chunks(self.chunk() * h).enumerate() {
                    let m = xs.len() / h;
                    let mut p = self.w.matmul_t(xs, m)?;
                    let first = c * self.chunk();
                    let scale = g / n as f32;
                    p.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
                        softmax_in_place(row, scale);
                        row[self.targets[first + i] as usize] -= scale;
                    });
                    dx.extend(self.w.matmul(&p, m)?);
                }
                dx
            }
        };
        Ok(Some(Tensor::from_vec(dx, (n, h), rows.device())?))
    }
}

/// Replace `row` by `scale * softmax(row)`; returns the row's max and `sum(exp(row - max))`
/// (exponentials in f32, each at most 1, summed in f64).
fn softmax_in_place(row: &mut [f32], scale: f32) -> (f32, f64) {
    let mx = crate::ops::max_lanes(row);
    row.iter_mut().for_each(|x| *x = crate::ops::exp(*x - mx));
    // In eight running f64 sums, so that the loop vectorises.
    let mut lanes = [0f64; 8];
    let chunks = row.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    for c in chunks {
        for k in 0..8 {
            lanes[k] += c[k] as f64;
        }
    }
    let sum = lanes.iter().sum::<f64>() + tail;
    let k = scale / sum as f32;
    row.iter_mut().for_each(|x| *x *= k);
    (mx, sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    /// Loss and input gradient against an f64 reference, for a dense and a bf16 head, with a
    /// row count that leaves a ragged last chunk.
    #[test]
    fn loss_and_gradient_match_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (v, h) = (2_000, 24);
        for n in [1, 5, 4_500] {
            let w: Vec<f32> = (0..v * h).map(|_| rng.gen_range(-0.5..0.5)).collect();
            let x: Vec<f32> = (0..n * h).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let targets: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
            let dense = Frozen::Dense(Tensor::from_vec(w.clone(), (v, h), &Device::Cpu).unwrap());
            let bf16 = Frozen::Quantized(Arc::new(
                QMatrix::quantize(crate::qmatrix::QFormat::Ggml(crate::quant::Format::BF16), &w, v, h).unwrap(),
            ));
            for (head, wq) in [
                (&dense, w.clone()),
                (
                    &bf16,
                    match &bf16 {
                        Frozen::Quantized(q) => q.to_dense(),
                        Frozen::Dense(_) => unreachable!(),
                    },
                ),
            ] {
                let xv = Var::from_vec(x.clone(), (n, h), &Device::Cpu).unwrap();
                let loss = head_cross_entropy(xv.as_tensor(), head, &targets).unwrap();
                let grads = (&loss * 3.0).unwrap().backward().unwrap();
                let got_loss = loss.to_scalar::<f32>().unwrap() as f64;
                let got: Vec<f32> = grads.get(&xv).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                // A second backward through the same graph recomputes instead of reusing.
                let again = (&loss * 3.0).unwrap().backward().unwrap();
                let again: Vec<f32> = again.get(&xv).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                for (a, b) in got.iter().zip(&again) {
                    assert!((a - b).abs() <= 1e-6 + 1e-4 * a.abs(), "n={n}: {a} vs {b}");
                }
                // Reference: per row, logits in f64, softmax, loss and 3/N (p - onehot) W.
                let mut want_loss = 0f64;
                let mut want = vec![0f64; n * h];
                for i in 0..n {
                    let logits: Vec<f64> = (0..v)
                        .map(|r| (0..h).map(|k| x[i * h + k] as f64 * wq[r * h + k] as f64).sum())
                        .collect();
                    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
                    want_loss += m + z.ln() - logits[targets[i] as usize];
                    for r in 0..v {
                        let p = (logits[r] - m).exp() / z - if r == targets[i] as usize { 1.0 } else { 0.0 };
                        for k in 0..h {
                            want[i * h + k] += 3.0 / n as f64 * p * wq[r * h + k] as f64;
                        }
                    }
                }
                want_loss /= n as f64;
                assert!(
                    (got_loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
                    "n={n}: {got_loss} vs {want_loss}"
                );
                for (j, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - r).abs() < 1e-6 + 1e-4 * r.abs(),
                        "n={n} dx[{j}]: {g} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn mismatched_or_out_of_range_targets_are_errors() {
        let w = Frozen::Dense(Tensor::zeros((10, 4), candle_core::DType::F32, &Device::Cpu).unwrap());
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(head_cross_entropy(&x, &w, &[1]).is_err());
        assert!(head_cross_entropy(&x, &w, &[1, 10])
            .unwrap_err()
            .to_string()
            .contains("10"));
        // A uniform distribution over 10 tokens: loss ln 10.
        let l = head_cross_entropy(&x, &w, &[1, 2]).unwrap().to_scalar::<f32>().unwrap();
        assert!((l - 10f32.ln()).abs() < 1e-6);
    }
}
