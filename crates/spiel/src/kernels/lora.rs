//! The LoRA linear as one op over a frozen base: `y = x W^T + s (m * x) A^T B^T`, with `A: [r, in]`,
//! `B: [out, r]`, `s = alpha / r` and `m` the inverted-dropout mask (training only).
//!
//! Written as candle ops it keeps, per projection, the base product, `x A^T`, its product with
//! `B^T`, the scaled copy, the sum and the dropped-out input: four `[T, out]`-sized tensors and
//! one `[T, in]` for the backward. This op keeps only its output; the backward recomputes the
//! rank-r `u = (m * x) A^T` (`T x in x r`, small next to the base GEMM) and regenerates the mask
//! from its seed:
//!
//! - `gu = s g B`, `grad B = s g^T u`, `grad A = gu^T (m * x)`;
//! - `grad x = g W + m * (gu A)`.
//!
//! Shapes: N rows (tokens), IN input features, OUT output features, R the rank.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::bf16mm::{gemm, PackCache, Products, Right, View};
use crate::kernels::common::{cpu_slice, grad_like, Values};
use crate::kernels::gemm::gemm_into;
use crate::kernels::ops::with_sources;
use crate::kernels::qmatrix::Frozen;

/// `x W^T + scale (m * x) A^T B^T` for `x: [N, IN]` (f32 or bf16), a frozen base `W`, and f32
/// `a: [R, IN]`, `b: [OUT, R]`; `dropout` is `(p, seed)` for a training forward, `None` otherwise.
/// bf16 products keep the base's packed forms in `packs` where given (a training run's).
pub fn frozen_plus_lora_matmul(
    x: &Tensor,
    base: &Frozen,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<(f64, u64)>,
    packs: Option<Arc<PackCache>>,
) -> candle_core::Result<Tensor> {
    let op = FrozenPlusLora {
        base: base.clone(),
        scale: scale as f32,
        dropout: dropout.filter(|(p, _)| *p > 0.0),
        packs,
    };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// The inverted-dropout mask for `n` inputs: `1 / (1 - p)` where kept, 0 where dropped, drawn
/// from `seed` exactly as the trainer's dropout always has been, so the backward can regenerate it.
pub(crate) fn dropout_mask(n: usize, p: f64, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let keep = 1.0 - p;
    (0..n)
        .map(|_| {
            if rng.gen::<f64>() < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect()
}

struct FrozenPlusLora {
    base: Frozen,
    scale: f32,
    dropout: Option<(f64, u64)>,
    packs: Option<Arc<PackCache>>,
}

impl FrozenPlusLora {
    /// `x W^T` (`transposed`) or `x W` for `n` rows of `x`, with `products`' operands; bf16
    /// products read bf16 `x` in place and keep the packed weight in `packs` where there are.
    fn base_product(&self, x: Values, n: usize, transposed: bool, products: Products) -> candle_core::Result<Vec<f32>> {
        if products.bf16_for(n) {
            return Ok(self.base.bf16_product(x, n, transposed, None, self.packs.as_deref()));
        }
        match transposed {
            true => self.base.matmul_t(x, n, products),
            false => self.base.matmul(x, n, products),
        }
    }

    /// The input as the adapter sees it: `m * x`, or `x` itself (not copied) without dropout.
    fn dropped<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        match self.dropout {
            None => Cow::Borrowed(x),
            Some((p, seed)) => {
                let m = dropout_mask(x.len(), p, seed);
                Cow::Owned(x.iter().zip(m).map(|(v, m)| v * m).collect())
            }
        }
    }

    /// `(n, in, out, r)` after checking that the shapes agree.
    fn dims(&self, x: &Shape, a: &Shape, b: &Shape) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (n, inp) = x.dims2()?;
        let (r, a_in) = a.dims2()?;
        let (out, b_r) = b.dims2()?;
        if a_in != inp || b_r != r || self.base.shape() != (out, inp) {
            candle_core::bail!(
                "lora: x {:?}, A {:?}, B {:?} against a base of {:?}",
                x.dims(),
                a.dims(),
                b.dims(),
                self.base.shape()
            );
        }
        Ok((n, inp, out, r))
    }
}

impl CustomOp3 for FrozenPlusLora {
    fn name(&self) -> &'static str {
        "frozen-plus-lora"
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
        let (n, inp, out, r) = self.dims(l1.shape(), l2.shape(), l3.shape())?;
        let xv = Values::of(s1, l1, "lora x")?;
        let (a, b) = (cpu_slice(s2, l2, "lora A")?, cpu_slice(s3, l3, "lora B")?);
        let products = Products::for_storage(s1);
        let mut y = {
            let _t = crate::kernels::profile::span(crate::kernels::profile::Phase::ProjectionsForward);
            self.base_product(xv, n, true, products)?
        };
        if self.low_rank_in_bf16(products, n) {
            let u = low_rank_input(xv, a, (n, inp, r));
            let bt = Right::Matrix(View::transposed(b, r, out));
            gemm(&mut y, true, self.scale, View::rows(&u, n, r), bt);
            return Ok((crate::kernels::common::storage_like(y, s1), Shape::from((n, out))));
        }
        let x = xv.to_f32();
        let xm = self.dropped(&x);
        let mut u = vec![0f32; n * r];
        gemm_into(true, &mut u, false, 1.0, (n, r, inp), &xm, (inp, 1), a, (1, inp));
        gemm_into(true, &mut y, true, self.scale, (n, out, r), &u, (r, 1), b, (1, r));
        Ok((crate::kernels::common::storage_like(y, s1), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.dims(x.shape(), a.shape(), b.shape())?;
        let products = Products::for_activations(grad.dtype());
        let (gx, ga, gb) = with_sources([grad, a, b, x], |[g, a, b, x]| {
            if self.low_rank_in_bf16(products, dims.0) {
                self.backward_bf16(dims, products, g, &a.to_f32(), &b.to_f32(), x)
            } else {
                self.backward(dims, products, g, &a.to_f32(), &b.to_f32(), &x.to_f32())
            }
        })?;
        Ok((
            Some(grad_like(gx, x)?),
            Some(grad_like(ga, a)?),
            Some(grad_like(gb, b)?),
        ))
    }
}

impl FrozenPlusLora {
    /// Whether the rank-r products take bf16 operands with f32 sums, as PyTorch's autocast
    /// computes them: with bf16 activations, where the base's product does too, and without
    /// dropout (whose mask is drawn over the whole input). `x` and `g` are then read as they
    /// are, never widened to f32 copies (passes over `[N, IN]` and `[N, OUT]` into fresh
    /// pages, per projection and pass, which took a third of a bf16 LoRA step before).
    fn low_rank_in_bf16(&self, products: Products, n: usize) -> bool {
        products.bf16_for(n) && self.dropout.is_none()
    }

    /// [`FrozenPlusLora::backward`] with the rank-r products in bf16 (f32 sums):
    /// `u = x A^T`, `gu = s g B`, `grad B = s g^T u`, `grad A = gu^T x`, `grad x += gu A`.
    fn backward_bf16(
        &self,
        (n, inp, out, r): (usize, usize, usize, usize),
        products: Products,
        g: Values,
        a: &[f32],
        b: &[f32],
        x: Values,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let u = low_rank_input(x, a, (n, inp, r));
        let gu = bf16_product(self.scale, View::rows(g, n, out), View::rows(b, out, r));
        let gb = bf16_product(self.scale, View::transposed(g, out, n), View::rows(&u, n, r));
        let ga = bf16_product(1.0, View::transposed(&gu, r, n), View::rows(x, n, inp));
        let mut gx = {
            let _t = crate::kernels::profile::span(crate::kernels::profile::Phase::ProjectionsInputGrad);
            self.base_product(g, n, false, products)?
        };
        gemm(
            &mut gx,
            true,
            1.0,
            View::rows(&gu, n, r),
            Right::Matrix(View::rows(a, r, inp)),
        );
        Ok((gx, ga, gb))
    }
}

/// `beta a b` as a new `[a.rows, b.cols]` matrix, on the bf16 kernel (f32 sums).
fn bf16_product(beta: f32, a: View, b: View) -> Vec<f32> {
    let mut dst = vec![0f32; a.rows * b.cols];
    gemm(&mut dst, false, beta, a, Right::Matrix(b));
    dst
}

/// The rank-r input `u = x A^T` (`[n, r]`) of `x: [n, in]` and `A: [r, in]`, on the bf16 kernel.
fn low_rank_input(x: Values, a: &[f32], (n, inp, r): (usize, usize, usize)) -> Vec<f32> {
    bf16_product(1.0, View::rows(x, n, inp), View::transposed(a, inp, r))
}

impl FrozenPlusLora {
    /// The input, A and B gradients from the output gradient `g` (f32 or bf16, read in place
    /// by the base's product), `A`, `B` and the input `x`, for `(n, in, out, r)` from
    /// [`Self::dims`]; the base's product with `products`' operands.
    fn backward(
        &self,
        (n, inp, out, r): (usize, usize, usize, usize),
        products: Products,
        gv: Values,
        av: &[f32],
        bv: &[f32],
        x: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let g = &*gv.to_f32();
        let xm = self.dropped(x);
        let mut u = vec![0f32; n * r];
        gemm_into(true, &mut u, false, 1.0, (n, r, inp), &xm, (inp, 1), av, (1, inp));
        let mut gu = vec![0f32; n * r];
        gemm_into(true, &mut gu, false, self.scale, (n, r, out), g, (out, 1), bv, (r, 1));
        let mut gb = vec![0f32; out * r];
        gemm_into(true, &mut gb, false, self.scale, (out, r, n), g, (1, out), &u, (r, 1));
        let mut ga = vec![0f32; r * inp];
        gemm_into(true, &mut ga, false, 1.0, (r, inp, n), &gu, (1, r), &xm, (inp, 1));
        let mut gx = {
            let _t = crate::kernels::profile::span(crate::kernels::profile::Phase::ProjectionsInputGrad);
            self.base_product(gv, n, false, products)?
        };
        match self.dropout {
            None => gemm_into(true, &mut gx, true, 1.0, (n, inp, r), &gu, (r, 1), av, (inp, 1)),
            Some((p, seed)) => {
                let mut gxm = vec![0f32; n * inp];
                gemm_into(true, &mut gxm, false, 1.0, (n, inp, r), &gu, (r, 1), av, (inp, 1));
                let m = dropout_mask(n * inp, p, seed);
                gx.par_iter_mut()
                    .zip(gxm.par_iter().zip(m.par_iter()))
                    .for_each(|(o, (v, m))| *o += v * m);
            }
        }
        Ok((gx, ga, gb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::qmatrix::QMatrix;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    use crate::kernels::common::vec_of;
    use crate::kernels::testing::{rel_err, uniform_tensor};

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        crate::kernels::testing::uniform(n, 1.0, rng)
    }

    #[test]
    fn fused_lora_matches_candle_autograd_over_f32_and_nf4_bases() {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Awkward shapes: rank 1, a single token, sizes that are not multiples of the tiles.
        for (n, inp, out, r) in [(7, 64, 24, 2), (1, 128, 40, 8), (33, 192, 65, 1)] {
            let wv = random(out * inp, &mut rng);
            let q = QMatrix::nf4(&wv, out, inp).unwrap();
            let bases = [
                (
                    Frozen::Dense(Tensor::from_vec(wv.clone(), (out, inp), &dev).unwrap()),
                    wv.clone(),
                ),
                (Frozen::Quantized(Arc::new(q.clone())), q.to_dense()),
            ];
            let (xv, av, bv) = (
                random(n * inp, &mut rng),
                random(r * inp, &mut rng),
                random(out * r, &mut rng),
            );
            let probe = Tensor::from_vec(random(n * out, &mut rng), (n, out), &dev).unwrap();
            for (base, dense) in bases {
                for dropout in [None, Some((0.3, 99u64))] {
                    let scale = 2.0;
                    // Reference: candle's composition, with the same mask.
                    let x = Var::from_vec(xv.clone(), (n, inp), &dev).unwrap();
                    let a = Var::from_vec(av.clone(), (r, inp), &dev).unwrap();
                    let b = Var::from_vec(bv.clone(), (out, r), &dev).unwrap();
                    let w = Tensor::from_vec(dense.clone(), (out, inp), &dev).unwrap();
                    let xm = match dropout {
                        Some((p, seed)) => {
                            let m = Tensor::from_vec(dropout_mask(n * inp, p, seed), (n, inp), &dev).unwrap();
                            (x.as_tensor() * m).unwrap()
                        }
                        None => x.as_tensor().clone(),
                    };
                    let lora = (xm.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * scale).unwrap();
                    let want = (x.matmul(&w.t().unwrap()).unwrap() + lora).unwrap();
                    let gw = (&want * &probe).unwrap().sum_all().unwrap().backward().unwrap();

                    let x2 = Var::from_vec(xv.clone(), (n, inp), &dev).unwrap();
                    let a2 = Var::from_vec(av.clone(), (r, inp), &dev).unwrap();
                    let b2 = Var::from_vec(bv.clone(), (out, r), &dev).unwrap();
                    let got = frozen_plus_lora_matmul(&x2, &base, &a2, &b2, scale, dropout, None).unwrap();
                    let gg = (&got * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let what = format!("{n}x{inp}x{out} r={r} dropout {dropout:?}");
                    assert!(rel_err(&flat(&got), &flat(&want)) < 1e-5, "forward {what}");
                    for (name, p, q) in [("x", &x2, &x), ("A", &a2, &a), ("B", &b2, &b)] {
                        let (u, v) = (flat(gg.get(p).unwrap()), flat(gw.get(q).unwrap()));
                        assert!(rel_err(&u, &v) < 1e-5, "grad {name} {what}: {}", rel_err(&u, &v));
                    }
                }
            }
        }
    }

    /// bf16 activations: the base's product takes the input and gradient as they are, and a
    /// training run's kept packs give the same forward and gradients as packing per product.
    #[test]
    fn bf16_with_kept_packs_matches_packing_per_product() {
        use candle_core::DType;
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (n, inp, out, r) = (40, 96, 72, 4);
        let base = Frozen::Dense(Tensor::from_vec(random(out * inp, &mut rng), (out, inp), &dev).unwrap());
        let mut bf16 = |shape: &[usize]| uniform_tensor(shape, 1.0, &mut rng).to_dtype(DType::BF16).unwrap();
        let (x16, p16) = (bf16(&[n, inp]), bf16(&[n, out]));
        let (av, bv) = (random(r * inp, &mut rng), random(out * r, &mut rng));
        let packs = Arc::new(PackCache::default());
        let run = |packs: Option<Arc<PackCache>>| {
            let x = Var::from_tensor(&x16).unwrap();
            let a = Var::from_vec(av.clone(), (r, inp), &dev).unwrap();
            let b = Var::from_vec(bv.clone(), (out, r), &dev).unwrap();
            let y = frozen_plus_lora_matmul(&x, &base, &a, &b, 2.0, Some((0.2, 7)), packs).unwrap();
            let g = (&y * &p16).unwrap().sum_all().unwrap().backward().unwrap();
            [&y, g.get(&x).unwrap(), g.get(&a).unwrap(), g.get(&b).unwrap()].map(|t| vec_of(t).unwrap())
        };
        let want = run(None);
        assert_eq!(run(Some(packs.clone())), want);
        assert_eq!(run(Some(packs.clone())), want, "from the kept packs");
        if crate::kernels::bf16mm::kernel().packs() {
            assert!(packs.iter().all(|p| p.get().is_some()), "both forms kept");
        }
    }

    #[test]
    fn bf16_low_rank_products_match_an_f64_reference() {
        use candle_core::DType;
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // Awkward shapes: ragged tiles, rank 1, just at and just below the 16 rows from which
        // the rank-r products take bf16 operands, and a single token.
        for (n, inp, out, r) in [(40, 96, 72, 8), (16, 33, 65, 1), (15, 64, 40, 3), (1, 48, 20, 2)] {
            let wv = random(out * inp, &mut rng);
            let base = Frozen::Dense(Tensor::from_vec(wv.clone(), (out, inp), &dev).unwrap());
            let mut bf16 = |shape: &[usize]| uniform_tensor(shape, 1.0, &mut rng).to_dtype(DType::BF16).unwrap();
            let (x16, p16) = (bf16(&[n, inp]), bf16(&[n, out]));
            let (av, bv) = (random(r * inp, &mut rng), random(out * r, &mut rng));
            let scale = 2.0;
            let x = Var::from_tensor(&x16).unwrap();
            let a = Var::from_vec(av.clone(), (r, inp), &dev).unwrap();
            let b = Var::from_vec(bv.clone(), (out, r), &dev).unwrap();
            let y = frozen_plus_lora_matmul(&x, &base, &a, &b, scale, None, None).unwrap();
            assert_eq!(y.dtype(), DType::BF16);
            let g = (&y * &p16).unwrap().sum_all().unwrap().backward().unwrap();
            let got = [&y, g.get(&x).unwrap(), g.get(&a).unwrap(), g.get(&b).unwrap()].map(|t| vec_of(t).unwrap());

            // f64 reference on the same (bf16) inputs: y = x W^T + s x A^T B^T and, for the
            // output gradient p, gx = p W + s p B A, gA = s B^T p^T x, gB = s p^T x A^T.
            let f = |t: &Tensor| vec_of(t).unwrap().into_iter().map(f64::from).collect::<Vec<_>>();
            let (xs, ps) = (f(&x16), f(&p16));
            let (w, a64, b64) = [&wv, &av, &bv]
                .map(|v| v.iter().map(|&x| x as f64).collect::<Vec<_>>())
                .into();
            let s = scale;
            let u: Vec<f64> = (0..n * r)
                .map(|i| (0..inp).map(|k| xs[i / r * inp + k] * a64[i % r * inp + k]).sum())
                .collect();
            let gu: Vec<f64> = (0..n * r)
                .map(|i| s * (0..out).map(|o| ps[i / r * out + o] * b64[o * r + i % r]).sum::<f64>())
                .collect();
            let want_y: Vec<f64> = (0..n * out)
                .map(|i| {
                    let (t, o) = (i / out, i % out);
                    (0..inp).map(|k| xs[t * inp + k] * w[o * inp + k]).sum::<f64>()
                        + s * (0..r).map(|j| u[t * r + j] * b64[o * r + j]).sum::<f64>()
                })
                .collect();
            let want_gx: Vec<f64> = (0..n * inp)
                .map(|i| {
                    let (t, k) = (i / inp, i % inp);
                    (0..out).map(|o| ps[t * out + o] * w[o * inp + k]).sum::<f64>()
                        + (0..r).map(|j| gu[t * r + j] * a64[j * inp + k]).sum::<f64>()
                })
                .collect();
            let want_ga: Vec<f64> = (0..r * inp)
                .map(|i| (0..n).map(|t| gu[t * r + i / inp] * xs[t * inp + i % inp]).sum())
                .collect();
            let want_gb: Vec<f64> = (0..out * r)
                .map(|i| s * (0..n).map(|t| ps[t * out + i / r] * u[t * r + i % r]).sum::<f64>())
                .collect();
            let what = format!("{n}x{inp}x{out} r={r}");
            // bf16 operands (A, B, u and gu rounded) and a bf16 output: bf16's precision.
            for (name, got, want) in [
                ("y", &got[0], &want_y),
                ("grad x", &got[1], &want_gx),
                ("grad A", &got[2], &want_ga),
                ("grad B", &got[3], &want_gb),
            ] {
                let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
                let e = rel_err(got, &want);
                assert!(e < 2e-2, "{name} {what}: {e}");
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let dev = Device::Cpu;
        let base = Frozen::Dense(Tensor::zeros((6, 4), candle_core::DType::F32, &dev).unwrap());
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
        let a = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
        let bad_b = Tensor::zeros((5, 2), candle_core::DType::F32, &dev).unwrap();
        assert!(frozen_plus_lora_matmul(&x, &base, &a, &bad_b, 1.0, None, None).is_err());
    }
}
