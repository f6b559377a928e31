//! The vocabulary head fused with the cross-entropy loss, a chunk of rows at a time.
//!
//! The plain path forms the `[N, V]` logits, keeps them (and their log-softmax) for the backward
//! and forms an `[N, V]` gradient: about 11 vocabulary-sized floats per target, 2.1 GB for
//! 1,020 targets of SmolLM2's 49,152-token vocabulary. Here the forward computes each chunk's
//! logits, turns them in place into `(softmax - onehot) / N`, adds up the loss terms and, when a
//! backward will follow, multiplies the chunk by the head weight into the input gradient, kept
//! for the backward (which only scales it). Memory: one `[chunk, V]` buffer and the `[N, H]`
//! gradient. Cost: the same two head GEMMs as the plain path. For full fine-tuning, which trains
//! the head, the same pass also forms the weight gradient (a third GEMM, as in the plain path).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::bf16mm::{self, Products, Right, View};
use crate::kernels::profile::{span, Phase};
use crate::kernels::qmatrix::Frozen;
#[cfg(test)]
use crate::kernels::qmatrix::QMatrix;
use crate::{Error, Result};

/// Floats of logits held at once (128 MiB, 682 rows of SmolLM2's vocabulary). Each chunk's two
/// products stream the whole 113 MB head weight (and, when the head is trained, add into the
/// whole weight gradient), so larger chunks pass over them less often: the GEMMs ran at 120-139
/// GFLOP/s with 170-row chunks against 167-186 with 682 (measured).
pub const CHUNK_FLOATS: usize = 32 << 20;

/// Rows of logits per chunk for a vocabulary of `vocab`: [`CHUNK_FLOATS`] floats, or half as many
/// for a trainable head, whose chunks are formed while every block's activations and the
/// weight gradient are alive (full fine-tuning's peak memory; 64 MiB less there, at no
/// measurable cost in time).
pub fn chunk_rows(vocab: usize, trainable: bool) -> usize {
    let floats = if trainable { CHUNK_FLOATS / 2 } else { CHUNK_FLOATS };
    (floats / vocab.max(1)).max(1)
}

/// Mean cross-entropy of `targets` (one per row) under the logits `rows W^T`, for `rows: [N, H]`,
/// differentiable in `rows`; the `[N, V]` logits are never all held at once. The head's products
/// take `products`' operands.
pub fn head_cross_entropy(rows: &Tensor, w: &Frozen, targets: &[u32], products: Products) -> Result<Tensor> {
    let op = HeadLoss::new(rows, w.clone(), targets, false, products)?;
    Ok(rows.contiguous()?.apply_op1(op)?)
}

/// [`head_cross_entropy`] for a trainable f32 head `w: [V, H]` (full fine-tuning), also
/// differentiable in `w`: each chunk's `(softmax - onehot) / N` is multiplied by its rows into the
/// weight gradient as well, in the same pass.
pub fn trainable_head_cross_entropy(rows: &Tensor, w: &Tensor, targets: &[u32], products: Products) -> Result<Tensor> {
    let op = HeadLoss::new(rows, Frozen::Dense(w.clone()), targets, w.track_op(), products)?;
    Ok(rows.contiguous()?.apply_op2(w, op)?)
}

struct HeadLoss {
    w: Frozen,
    products: Products,
    targets: Arc<Vec<u32>>,
    /// When a backward will follow: the input gradient for an incoming gradient of 1, formed
    /// in the forward while each chunk's probabilities are at hand (so the backward needs no
    /// second pass over the vocabulary).
    eager: Option<Mutex<Option<Vec<f32>>>>,
    /// Likewise the weight gradient, for a trainable head.
    eager_weight: Option<Mutex<Option<Vec<f32>>>>,
}

/// What one pass over the vocabulary gives: the summed loss terms and, when asked for, the
/// input and weight gradients of `scale` times the mean loss.
struct Pass {
    loss: f64,
    dx: Option<Vec<f32>>,
    dw: Option<Vec<f32>>,
}

impl HeadLoss {
    fn new(rows: &Tensor, w: Frozen, targets: &[u32], trainable: bool, products: Products) -> Result<HeadLoss> {
        let (n, h) = rows.dims2()?;
        if n != targets.len() || n == 0 {
            return Err(Error::Invalid(format!(
                "fused head: {n} rows but {} targets",
                targets.len()
            )));
        }
        let (v, wh) = w.shape();
        if wh != h {
            return Err(Error::Invalid(format!(
                "fused head: rows of {h} against a head of [{v}, {wh}]"
            )));
        }
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
            return Err(Error::Invalid(format!(
                "target id {bad} is outside the vocabulary of {v}"
            )));
        }
        Ok(HeadLoss {
            w,
            products,
            targets: Arc::new(targets.to_vec()),
            eager: rows.track_op().then(|| Mutex::new(None)),
            eager_weight: trainable.then(|| Mutex::new(None)),
        })
    }

    /// Rows per chunk.
    fn chunk(&self) -> usize {
        chunk_rows(self.w.shape().0, self.eager_weight.is_some())
    }

    /// One pass over `x: [N, H]` a chunk of rows at a time.
    fn pass(&self, x: &[f32], h: usize, scale: f32, want_dx: bool, want_dw: bool) -> candle_core::Result<Pass> {
        let n = x.len() / h;
        let v = self.w.shape().0;
        let mut loss = 0f64;
        let mut dx = Vec::with_capacity(if want_dx { n * h } else { 0 });
        let mut dw = if want_dw { vec![0f32; v * h] } else { Vec::new() };
        let k = scale / n as f32;
        for (c, xs) in x.chunks(self.chunk() * h).enumerate() {
            let m = xs.len() / h;
            let first = c * self.chunk();
            let mut p = self.w.matmul_t(xs, m, self.products)?;
            // Each row becomes its softmax times k, minus k at the target (the gradient of
            // `scale` times the mean loss); its loss term is kept.
            let losses: Vec<f64> = p
                .par_chunks_mut(v)
                .enumerate()
                .map(|(i, row)| {
                    let t = self.targets[first + i] as usize;
                    let target_logit = row[t];
                    let (mx, sum) = softmax_in_place(row, k);
                    row[t] -= k;
                    (mx as f64 + sum.ln()) - target_logit as f64
                })
                .collect();
            loss += losses.iter().sum::<f64>();
            if want_dx {
                dx.extend(self.w.matmul(&p, m, self.products)?);
            }
            if want_dw {
                // dW (+)= p^T xs.
                if self.products.bf16_for(m) {
                    bf16mm::gemm(
                        &mut dw,
                        c > 0,
                        1.0,
                        View::transposed(&p, v, m),
                        Right::Matrix(View::rows(xs, m, h)),
                    );
                } else {
                    crate::kernels::gemm::gemm_into(true, &mut dw, c > 0, 1.0, (v, h, m), &p, (1, v), xs, (h, 1));
                }
            }
        }
        Ok(Pass {
            loss,
            dx: want_dx.then_some(dx),
            dw: want_dw.then_some(dw),
        })
    }

    fn forward(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::HeadForward);
        let x = crate::kernels::common::cpu_slice(s, l, "head-cross-entropy")?;
        let (n, h) = l.shape().dims2()?;
        let pass = self.pass(x, h, 1.0, self.eager.is_some(), self.eager_weight.is_some())?;
        for (slot, value) in [(&self.eager, pass.dx), (&self.eager_weight, pass.dw)] {
            if let Some(slot) = slot {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = value;
            }
        }
        Ok((CpuStorage::F32(vec![(pass.loss / n as f64) as f32]), Shape::from(())))
    }

    /// The input and weight gradients for an incoming gradient `grad`: the ones formed in the
    /// forward, scaled, or (for a second backward through the same graph) a new pass.
    fn gradients(&self, rows: &Tensor, grad: &Tensor) -> candle_core::Result<(Vec<f32>, Option<Vec<f32>>)> {
        let _t = span(Phase::HeadBackward);
        let g = grad.to_scalar::<f32>()?;
        let take = |slot: &Option<Mutex<Option<Vec<f32>>>>| {
            slot.as_ref()
                .and_then(|s| s.lock().unwrap_or_else(|e| e.into_inner()).take())
        };
        let want_dw = self.eager_weight.is_some();
        match (take(&self.eager), take(&self.eager_weight)) {
            (Some(mut dx), dw) if dw.is_some() == want_dw => {
                dx.iter_mut().for_each(|d| *d *= g);
                let dw = dw.map(|mut dw| {
                    dw.iter_mut().for_each(|d| *d *= g);
                    dw
                });
                Ok((dx, dw))
            }
            _ => {
                let (_, h) = rows.dims2()?;
                let x: Vec<f32> = rows.flatten_all()?.to_vec1()?;
                let pass = self.pass(&x, h, g, true, want_dw)?;
                Ok((pass.dx.unwrap_or_default(), pass.dw))
            }
        }
    }
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(s, l)
    }

    fn bwd(&self, rows: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (dx, _) = self.gradients(rows, grad)?;
        Ok(Some(Tensor::from_vec(dx, rows.shape(), rows.device())?))
    }
}

impl CustomOp2 for HeadLoss {
    fn name(&self) -> &'static str {
        "trainable-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // The weight is read through `self.w`, which shares its storage.
        self.forward(s1, l1)
    }

    fn bwd(
        &self,
        rows: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.gradients(rows, grad)?;
        let dw = dw.map(|dw| Tensor::from_vec(dw, w.shape(), w.device())).transpose()?;
        Ok((Some(Tensor::from_vec(dx, rows.shape(), rows.device())?), dw))
    }
}

/// Replace `row` by `scale * softmax(row)`; returns the row's max and `sum(exp(row - max))`
/// (exponentials in f32, each at most 1, summed in f64).
fn softmax_in_place(row: &mut [f32], scale: f32) -> (f32, f64) {
    let mx = crate::kernels::ops::max_lanes(row);
    row.iter_mut().for_each(|x| *x = crate::kernels::ops::exp(*x - mx));
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
        let (v, h) = (8_000, 24);
        assert!(
            CHUNK_FLOATS / v < 4_500,
            "a ragged second chunk at the larger row count"
        );
        for n in [1, 5, 4_500] {
            let w: Vec<f32> = (0..v * h).map(|_| rng.gen_range(-0.5..0.5)).collect();
            let x: Vec<f32> = (0..n * h).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let targets: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
            let dense = Frozen::Dense(Tensor::from_vec(w.clone(), (v, h), &Device::Cpu).unwrap());
            let bf16 = Frozen::Quantized(Arc::new(
                QMatrix::quantize(
                    crate::kernels::qmatrix::QFormat::Ggml(crate::kernels::quant::Format::BF16),
                    &w,
                    v,
                    h,
                )
                .unwrap(),
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
                let loss = head_cross_entropy(xv.as_tensor(), head, &targets, Products::F32).unwrap();
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

    /// A trainable head: loss and both gradients against candle's plain path (full logits,
    /// cross-entropy, autograd), over one chunk and over several (the weight gradient summed
    /// across chunks); a second backward recomputes the same gradients.
    #[test]
    fn trainable_head_matches_the_plain_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (v, h) = (8_000, 24);
        assert!(chunk_rows(v, true) < 4_500, "several chunks at the larger row count");
        for n in [1, 4_500] {
            let w: Vec<f32> = (0..v * h).map(|_| rng.gen_range(-0.5..0.5)).collect();
            let x: Vec<f32> = (0..n * h).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let targets: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
            let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
            let (xa, wa) = (
                Var::from_vec(x.clone(), (n, h), &Device::Cpu).unwrap(),
                Var::from_vec(w.clone(), (v, h), &Device::Cpu).unwrap(),
            );
            let logits = xa.as_tensor().matmul(&wa.as_tensor().t().unwrap()).unwrap();
            let want = candle_nn::loss::cross_entropy(&logits, &t).unwrap();
            let gw = (&want * 3.0).unwrap().backward().unwrap();
            let (xb, wb) = (
                Var::from_vec(x.clone(), (n, h), &Device::Cpu).unwrap(),
                Var::from_vec(w.clone(), (v, h), &Device::Cpu).unwrap(),
            );
            let got = trainable_head_cross_entropy(xb.as_tensor(), wb.as_tensor(), &targets, Products::F32).unwrap();
            let gg = (&got * 3.0).unwrap().backward().unwrap();
            let again = (&got * 3.0).unwrap().backward().unwrap();
            let (l1, l2) = (got.to_scalar::<f32>().unwrap(), want.to_scalar::<f32>().unwrap());
            assert!((l1 - l2).abs() < 1e-5 * l2.abs().max(1.0), "n={n}: loss {l1} vs {l2}");
            let rel = crate::kernels::testing::rel_err_tensors;
            for (name, a, b) in [("dx", &xa, &xb), ("dw", &wa, &wb)] {
                let (want, got, again) = (gw.get(a).unwrap(), gg.get(b).unwrap(), again.get(b).unwrap());
                assert!(rel(got, want) < 1e-5, "n={n} {name}: {}", rel(got, want));
                assert!(rel(again, want) < 1e-5, "n={n} {name} again: {}", rel(again, want));
            }
        }
    }

    #[test]
    fn mismatched_or_out_of_range_targets_are_errors() {
        let w = Frozen::Dense(Tensor::zeros((10, 4), candle_core::DType::F32, &Device::Cpu).unwrap());
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(head_cross_entropy(&x, &w, &[1], Products::F32).is_err());
        assert!(head_cross_entropy(&x, &w, &[1, 10], Products::F32)
            .unwrap_err()
            .to_string()
            .contains("10"));
        // A uniform distribution over 10 tokens: loss ln 10.
        let l = head_cross_entropy(&x, &w, &[1, 2], Products::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 10f32.ln()).abs() < 1e-6);
    }
}
