//! Masked attention as one differentiable op for training:
//! `O = softmax(scale Q K^T + mask) V`, per batch row and KV head, with grouped-query heads
//! folded into the rows of `Q` (`[B, KV, R*T, D]`, row `j*T + p` = query head `j` of the group at
//! position `p`).
//!
//! Written as candle ops, attention kept the scaled `Q`, the scores and the probabilities
//! (`[heads, T, S]` each: 2 x 9 x 256 floats per token per layer on the default model, more than
//! all its other activations together) and ran through a dozen graph nodes. This op keeps only
//! its inputs and output; the backward recomputes the probabilities from `Q` and `K` (one more
//! `Q K^T`, 4% of a step's FLOPs) and forms, per group:
//!
//! - `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`;
//! - `dQ = scale dS K`, `dK = scale dS^T Q`, `dV = P^T dO`.
//!
//! Groups are independent and run in parallel, each product on one thread.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::{cpu_f32, grad_like, storage_like, vec_of};
use crate::profile::{span, Phase};
use crate::qmatrix::gemm_into;

/// `softmax(scale q k^T + mask) v` for `q: [B, KV, R*T, D]`, `k`, `v: [B, KV, S, D]` and an
/// additive `mask: [B, 1, T, S]` (not differentiated); returns `[B, KV, R*T, D]`. f32 or bf16.
pub fn masked_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> crate::Result<Tensor> {
    let (b, _, t, s) = mask.dims4()?;
    let op = Attention {
        mask: vec_of(mask)?,
        b,
        t,
        s,
        scale: scale as f32,
    };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct Attention {
    /// `[B, T, S]`, row-major.
    mask: Vec<f32>,
    b: usize,
    t: usize,
    s: usize,
    scale: f32,
}

/// One group's sizes: `rows` = R*T query rows, `s` keys, `d` head size.
#[derive(Clone, Copy)]
struct Group {
    rows: usize,
    s: usize,
    d: usize,
}

impl Attention {
    /// `(groups, group sizes)` after checking the shapes.
    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<(usize, Group)> {
        let (b, kv, rows, d) = q.dims4()?;
        let (kb, kkv, s, kd) = k.dims4()?;
        if (kb, kkv, kd) != (b, kv, d) || k != v || b != self.b || s != self.s || rows % self.t != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} against a mask of [{}, 1, {}, {}]",
                q.dims(),
                k.dims(),
                v.dims(),
                self.b,
                self.t,
                self.s
            );
        }
        Ok((b * kv, Group { rows, s, d }))
    }

    /// The probabilities `P = softmax(scale q k^T + mask)` of group `gi` (of `kv` per batch row).
    fn probs(&self, gi: usize, kv: usize, g: Group, q: &[f32], k: &[f32]) -> Vec<f32> {
        let mut scores = vec![0f32; g.rows * g.s];
        gemm_into(
            false,
            &mut scores,
            false,
            self.scale,
            (g.rows, g.s, g.d),
            q,
            (g.d, 1),
            k,
            (1, g.d),
        );
        let bi = gi / kv;
        let mut p = vec![0f32; g.rows * g.s];
        for (r, (pr, sr)) in p.chunks_mut(g.s).zip(scores.chunks(g.s)).enumerate() {
            let m = (bi * self.t + r % self.t) * self.s;
            let mr = &self.mask[m..m + self.s];
            crate::ops::softmax_row(pr, sr, |j| mr[j]);
        }
        p
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "masked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = span(Phase::Attention);
        let (groups, g) = self.dims(l1.shape(), l2.shape(), l3.shape())?;
        let kv = groups / self.b;
        let (q, k, v) = (
            cpu_f32(s1, l1, "attention q")?,
            cpu_f32(s2, l2, "attention k")?,
            cpu_f32(s3, l3, "attention v")?,
        );
        let (qn, kn) = (g.rows * g.d, g.s * g.d);
        let mut out = vec![0f32; groups * qn];
        out.par_chunks_mut(qn).enumerate().for_each(|(gi, o)| {
            let (qg, kg, vg) = (
                &q[gi * qn..(gi + 1) * qn],
                &k[gi * kn..(gi + 1) * kn],
                &v[gi * kn..(gi + 1) * kn],
            );
            let p = self.probs(gi, kv, g, qg, kg);
            gemm_into(false, o, false, 1.0, (g.rows, g.d, g.s), &p, (g.s, 1), vg, (g.d, 1));
        });
        Ok((storage_like(out, s1), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = span(Phase::Attention);
        let (groups, g) = self.dims(q.shape(), k.shape(), v.shape())?;
        let kv = groups / self.b;
        let (qs, ks, vs, os, gs) = (vec_of(q)?, vec_of(k)?, vec_of(v)?, vec_of(res)?, vec_of(grad)?);
        let (qn, kn) = (g.rows * g.d, g.s * g.d);
        let (mut dq, mut dk, mut dv) = (vec![0f32; qs.len()], vec![0f32; ks.len()], vec![0f32; vs.len()]);
        dq.par_chunks_mut(qn)
            .zip(dk.par_chunks_mut(kn).zip(dv.par_chunks_mut(kn)))
            .enumerate()
            .for_each(|(gi, (dqg, (dkg, dvg)))| {
                let (qg, kg, vg) = (
                    &qs[gi * qn..(gi + 1) * qn],
                    &ks[gi * kn..(gi + 1) * kn],
                    &vs[gi * kn..(gi + 1) * kn],
                );
                let (og, dog) = (&os[gi * qn..(gi + 1) * qn], &gs[gi * qn..(gi + 1) * qn]);
                let p = self.probs(gi, kv, g, qg, kg);
                // dV = P^T dO.
                gemm_into(false, dvg, false, 1.0, (g.s, g.d, g.rows), &p, (1, g.s), dog, (g.d, 1));
                // dP = dO V^T, then dS = P (dP - rowsum(dO O)) in place.
                let mut ds = vec![0f32; g.rows * g.s];
                gemm_into(
                    false,
                    &mut ds,
                    false,
                    1.0,
                    (g.rows, g.s, g.d),
                    dog,
                    (g.d, 1),
                    vg,
                    (1, g.d),
                );
                for r in 0..g.rows {
                    let dot: f32 = (0..g.d).map(|c| dog[r * g.d + c] * og[r * g.d + c]).sum();
                    for (x, pv) in ds[r * g.s..(r + 1) * g.s].iter_mut().zip(&p[r * g.s..(r + 1) * g.s]) {
                        *x = pv * (*x - dot);
                    }
                }
                // dQ = scale dS K; dK = scale dS^T Q.
                gemm_into(
                    false,
                    dqg,
                    false,
                    self.scale,
                    (g.rows, g.d, g.s),
                    &ds,
                    (g.s, 1),
                    kg,
                    (g.d, 1),
                );
                gemm_into(
                    false,
                    dkg,
                    false,
                    self.scale,
                    (g.s, g.d, g.rows),
                    &ds,
                    (1, g.s),
                    qg,
                    (g.d, 1),
                );
            });
        Ok((
            Some(grad_like(dq, q)?),
            Some(grad_like(dk, k)?),
            Some(grad_like(dv, v)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};
    use rand::{Rng, SeedableRng};

    fn randn(shape: &[usize], rng: &mut impl Rng) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (vec_of(a).unwrap(), vec_of(b).unwrap());
        let d: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (d / n.max(1e-30)).sqrt()
    }

    #[test]
    fn fused_attention_matches_candle_composition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        // (batch, kv heads, heads per group, queries, keys, head size): one row, GQA groups,
        // more keys than queries, odd sizes.
        for (b, kv, rep, t, s, d) in [
            (1, 1, 1, 1, 1, 2),
            (2, 3, 3, 5, 5, 8),
            (1, 2, 4, 7, 9, 16),
            (3, 1, 2, 17, 17, 64),
        ] {
            let mask: Vec<f32> = (0..b * t * s)
                .map(|i| {
                    let (p, j) = ((i / s) % t, i % s);
                    if j > p + (s - t) || (j > 0 && rng.gen_bool(0.2)) {
                        -1e30
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (b, 1, t, s), &Device::Cpu).unwrap();
            let (q, k, v) = (
                randn(&[b, kv, rep * t, d], &mut rng),
                randn(&[b, kv, s, d], &mut rng),
                randn(&[b, kv, s, d], &mut rng),
            );
            let probe = randn(&[b, kv, rep * t, d], &mut rng);
            let scale = 1.0 / (d as f64).sqrt();
            let vars = |dt: DType| -> Vec<Var> {
                [&q, &k, &v]
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap())
                    .collect()
            };
            // Reference: candle's matmuls and softmax, the mask repeated for every head of a group.
            let r = vars(DType::F32);
            let full_mask = mask.repeat((1, 1, rep, 1)).unwrap();
            let scores = (r[0].as_tensor() * scale)
                .unwrap()
                .matmul(&r[1].as_tensor().t().unwrap())
                .unwrap();
            let p = candle_nn::ops::softmax(&scores.broadcast_add(&full_mask).unwrap(), D::Minus1).unwrap();
            let want = p.matmul(r[2].as_tensor()).unwrap();
            let gw = (&want * &probe).unwrap().sum_all().unwrap().backward().unwrap();

            let f = vars(DType::F32);
            let got = masked_attention(f[0].as_tensor(), f[1].as_tensor(), f[2].as_tensor(), &mask, scale).unwrap();
            let gf = (&got * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let what = format!("b{b} kv{kv} rep{rep} t{t} s{s} d{d}");
            assert!(rel(&got, &want) < 1e-5, "forward {what}: {}", rel(&got, &want));
            for (i, name) in ["q", "k", "v"].iter().enumerate() {
                let (x, y) = (gf.get(f[i].as_tensor()).unwrap(), gw.get(r[i].as_tensor()).unwrap());
                assert!(rel(x, y) < 1e-5, "grad {name} {what}: {}", rel(x, y));
            }
            // bf16 inputs: the same computation on the widened values, rounded once.
            let h = vars(DType::BF16);
            let got16 = masked_attention(h[0].as_tensor(), h[1].as_tensor(), h[2].as_tensor(), &mask, scale).unwrap();
            assert_eq!(got16.dtype(), DType::BF16);
            let w = vars(DType::F32)
                .iter()
                .map(|v| {
                    v.as_tensor()
                        .to_dtype(DType::BF16)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                })
                .collect::<Vec<_>>();
            let want16 = masked_attention(&w[0], &w[1], &w[2], &mask, scale)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            assert_eq!(
                got16.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
                want16.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
                "bf16 {what}"
            );
        }
        let bad = Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let q = Tensor::zeros((1, 1, 3, 8), DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::zeros((1, 1, 5, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(masked_attention(&q, &k, &k, &bad, 1.0).is_err());
    }
}
