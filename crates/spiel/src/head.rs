//! The vocabulary head fused with the cross-entropy loss, a chunk of rows at a time.
//!
//! The plain path forms the `[N, V]` logits, keeps them (and their log-softmax) for the backward
//! and forms an `[N, V]` gradient: about 11 vocabulary-sized floats per target, 2.1 GB for
//! 1,020 targets of SmolLM2's 49,152-token vocabulary. Here the forward computes each chunk's
//! logits, reduces them to `logsumexp - logit[target]` and drops them; the backward recomputes
//! the chunk's logits, turns them into `softmax - onehot` in place and multiplies by the head
//! weight. Memory: one `[chunk, V]` buffer. Cost: one more head GEMM per step. The head weight is
//! frozen (adapter methods); full fine-tuning, which trains it, keeps the plain path.

use std::sync::Arc;

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
    })?)
}

struct HeadLoss {
    w: Frozen,
    targets: Arc<Vec<u32>>,
}

impl HeadLoss {
    /// Rows per chunk.
    fn chunk(&self) -> usize {
        (CHUNK_FLOATS / self.w.shape().0.max(1)).max(1)
    }
}

/// Per row of `logits` (`[n, v]`), `(max, ln(sum(exp(l - max))))`; exponentials in f32 (each
/// at most 1), summed in f64.
fn row_stats(logits: &[f32], v: usize) -> Vec<(f32, f32)> {
    logits
        .par_chunks(v)
        .map(|row| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let s: f64 = row.iter().map(|&x| (x - m).exp() as f64).sum();
            (m, s.ln() as f32)
        })
        .collect()
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
        for (c, xs) in x.chunks(self.chunk() * h).enumerate() {
            let m = xs.len() / h;
            let logits = self.w.matmul_t(xs, m)?;
            for (i, ((mx, lse), row)) in row_stats(&logits, v).into_iter().zip(logits.chunks(v)).enumerate() {
                let t = self.targets[c * self.chunk() + i] as usize;
                total += (mx + lse - row[t]) as f64;
            }
        }
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, rows: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _t = span(Phase::HeadBackward);
        let (n, h) = rows.dims2()?;
        let v = self.w.shape().0;
        let scale = grad.to_scalar::<f32>()? / n as f32;
        let x: Vec<f32> = rows.flatten_all()?.to_vec1()?;
        let mut dx = Vec::with_capacity(n * h);
        for (c, xs) in x.chunks(self.chunk() * h).enumerate() {
            let m = xs.len() / h;
            let mut p = self.w.matmul_t(xs, m)?;
            let first = c * self.chunk();
            // softmax - onehot(target), times the incoming gradient over N: one exp per logit.
            p.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0f64;
                for x in row.iter_mut() {
                    *x = (*x - mx).exp();
                    sum += *x as f64;
                }
                let k = scale / sum as f32;
                row.iter_mut().for_each(|x| *x *= k);
                row[self.targets[first + i] as usize] -= scale;
            });
            dx.extend(self.w.matmul(&p, m)?);
        }
        Ok(Some(Tensor::from_vec(dx, (n, h), rows.device())?))
    }
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
