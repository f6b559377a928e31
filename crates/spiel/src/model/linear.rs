//! A targeted projection: its frozen base weight plus whatever adapter deltas a forward pass
//! is handed, applied unmerged.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::model::adapter::{AdapterSet, Delta};
use crate::model::weight::{take, Grad, QWeights, Weight, Weights};
use crate::{Error, Result};

/// A linear layer `y = x W^T (+ b)` over a frozen base weight `W: [out, in]`. Every targeted
/// projection in the model is one of these, named by its canonical module path; adapters are
/// attached to layers by that name.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Canonical module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub name: String,
    /// Frozen base weight, `[out, in]`.
    pub weight: Weight,
    /// Optional frozen bias, `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(
        w: &mut Weights,
        qw: &mut QWeights,
        name: &str,
        bias: bool,
        shape: (usize, usize),
    ) -> Result<Linear> {
        let key = format!("{name}.weight");
        let weight = match qw.remove(&key) {
            Some(q) if q.shape() == shape => Weight::Quantized(Arc::new(q)),
            Some(q) => {
                return Err(Error::Invalid(format!(
                    "model weights: tensor `{key}` has shape {:?}, expected {shape:?}",
                    q.shape()
                )))
            }
            None => Weight::Dense(take(w, &key, &[shape.0, shape.1])?),
        };
        let bias = if bias {
            Some(take(w, &format!("{name}.bias"), &[shape.0])?)
        } else {
            None
        };
        Ok(Linear {
            name: name.to_string(),
            weight,
            bias,
        })
    }

    /// `(out, in)` of the weight.
    pub fn shape(&self) -> (usize, usize) {
        self.weight.shape()
    }

    /// Apply to `x: [..., in]`, giving `[..., out]`, with the base weight plus every delta in
    /// `deltas` (each added as its own product; the base weight is never copied).
    pub fn forward(&self, x: &Tensor, deltas: &[Delta], grad: Grad) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (out, inp) = self.shape();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, inp))?;
        // A sparse delta already added into the base (while training) rides on the base product.
        let in_base = deltas.iter().find_map(|d| match d {
            Delta::Sparse(s) if s.in_base => Some(s),
            _ => None,
        });
        // Otherwise the first delta rides with a frozen base's product (one output, one op).
        let frozen = self.weight.frozen();
        let fused = match (in_base, &frozen) {
            (None, Some(_)) if !deltas.is_empty() => Some(0),
            _ => None,
        };
        let mut y = match (in_base, self.weight.dense_f32_frozen()) {
            (None, _) => match (fused, &frozen) {
                (Some(i), Some(base)) => deltas[i].apply_with_base(&x2, base, grad)?,
                _ => self.weight.matmul_t(&x2)?,
            },
            (Some(s), Some(w)) => {
                let hook = if grad == Grad::Yes { s.hook.clone() } else { None };
                crate::kernels::sparse::base_with_delta_matmul(&x2, w, &s.values, s.indices.clone(), hook)?
            }
            (Some(_), None) => {
                return Err(Error::Invalid(format!(
                    "{}: a delta marked as added into the base, but the base weight is not a frozen dense f32 one",
                    self.name
                )))
            }
        };
        for (i, d) in deltas.iter().enumerate() {
            if fused != Some(i) && !matches!(d, Delta::Sparse(s) if s.in_base) {
                y = crate::kernels::ops::add(&y, &d.apply(&x2, grad)?)?;
            }
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = out;
        Ok(y.reshape(out_dims)?)
    }

    /// [`Linear::forward`] of one row `x` (`[.., in]` holding `in` values) through several
    /// projections at once, at inference: one parallel matrix-vector pass over all their frozen
    /// dense f32 bases ([`crate::kernels::gemm::matvec_many`]; decoding is bound by reading the
    /// weights, and one pass hands work to the other threads once instead of once per
    /// projection), then each projection's own adapters. Every other case (several rows,
    /// gradients, quantised or bf16 bases, biases) takes one [`Linear::forward`] each.
    pub fn forward_one_row(ls: &[&Linear], x: &Tensor, adapters: &AdapterSet) -> Result<Vec<Tensor>> {
        let bases: Option<Vec<&Tensor>> = ls
            .iter()
            .map(|l| l.weight.dense_f32_frozen().filter(|_| l.bias.is_none()))
            .collect();
        let in_base = |l: &&Linear| {
            adapters
                .get(&l.name)
                .iter()
                .any(|d| matches!(d, Delta::Sparse(s) if s.in_base))
        };
        let width = x.elem_count();
        let fused = x.dtype() == DType::F32 && ls.iter().all(|l| l.shape().1 == width) && !ls.iter().any(in_base);
        let Some(bases) = bases.filter(|_| fused) else {
            return ls
                .iter()
                .map(|l| l.forward(x, adapters.get(&l.name), Grad::No))
                .collect();
        };
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut outs: Vec<Vec<f32>> = ls.iter().map(|l| vec![0f32; l.shape().0]).collect();
        let guards: Vec<_> = bases.iter().map(|w| w.storage_and_layout()).collect();
        let mut parts = Vec::with_capacity(ls.len());
        for ((storage, layout), out) in guards.iter().zip(outs.iter_mut()) {
            let candle_core::Storage::Cpu(cpu) = &**storage else {
                return Err(Error::Invalid("decoding: CPU tensors only".into()));
            };
            parts.push((
                crate::kernels::common::cpu_slice(cpu, layout, "projection weight")?,
                out.as_mut_slice(),
            ));
        }
        {
            let _t = crate::kernels::profile::span(crate::kernels::profile::Phase::ProjectionsForward);
            crate::kernels::gemm::matvec_many(&xs, parts);
        }
        drop(guards);
        let x2 = x.reshape((1, width))?;
        let mut out_dims = x.dims().to_vec();
        ls.iter()
            .zip(outs)
            .map(|(l, out)| {
                let mut y = Tensor::from_vec(out, (1, l.shape().0), x.device())?;
                for d in adapters.get(&l.name) {
                    y = crate::kernels::ops::add(&y, &d.apply(&x2, Grad::No)?)?;
                }
                *out_dims.last_mut().expect("rank >= 1") = l.shape().0;
                Ok(y.reshape(out_dims.clone())?)
            })
            .collect()
    }
}
