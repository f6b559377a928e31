//! The frozen base weights of a model: named tensors as loaded, a projection's weight (dense or
//! quantised) and its products, and whether a forward pass is differentiable.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::kernels::qmatrix::{frozen_matmul_t, Frozen, QMatrix};
use crate::{Error, Result};

/// Named weight tensors, keyed by canonical Hugging Face names (`model.layers.0.mlp.up_proj.weight`).
pub type Weights = HashMap<String, Tensor>;

/// Whether a forward pass must be differentiable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grad {
    /// Build the graph from ops that record a backward (spiel's fused ops in `ops`).
    Yes,
    /// Use fused inference kernels; gradients are not needed.
    No,
}

/// The base weight of a projection: dense f32 (trainable in full fine-tuning), or quantised and
/// frozen, multiplied tile by tile without a dense copy ([`crate::kernels::qmatrix`]).
#[derive(Debug, Clone)]
pub enum Weight {
    /// A dense `[out, in]` tensor.
    Dense(Tensor),
    /// Quantised blocks.
    Quantized(Arc<QMatrix>),
}

impl Weight {
    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Weight::Dense(t) => {
                let d = t.dims();
                (d[0], d[1])
            }
            Weight::Quantized(q) => q.shape(),
        }
    }

    /// The weight as a dense f32 tensor (a dequantised copy for a quantised one).
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.clone(),
            Weight::Quantized(q) => Tensor::from_vec(q.to_dense(), q.shape(), device)?,
        })
    }

    /// The weight as a frozen dense f32 tensor, the one kind a sparse delta can be added into in
    /// place for a training update ([`crate::kernels::sparse::DeltaInBase`]); `None` for any other.
    pub fn dense_f32_frozen(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) if !t.is_variable() && t.dtype() == DType::F32 => Some(t),
            _ => None,
        }
    }

    /// The weight for the frozen products, or `None` when it is a trainable variable.
    pub fn frozen(&self) -> Option<Frozen> {
        match self {
            Weight::Dense(t) if t.is_variable() => None,
            Weight::Dense(t) => Some(Frozen::Dense(t.clone())),
            Weight::Quantized(q) => Some(Frozen::Quantized(q.clone())),
        }
    }

    /// `x W^T` for `x: [N, in]`: the frozen product (backward `grad W` only), or an ordinary
    /// matmul for a trainable weight.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            // A trainable weight is f32 master values; the product reads the activations as they
            // are and returns their dtype.
            Weight::Dense(w) if w.is_variable() => crate::kernels::qmatrix::trainable_matmul_t(x, w),
            Weight::Dense(w) => frozen_matmul_t(x, &Frozen::Dense(w.clone())),
            Weight::Quantized(q) => frozen_matmul_t(x, &Frozen::Quantized(q.clone())),
        }
    }

    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quantized(q) => q.bytes(),
        }
    }
}

/// Quantised projection weights by canonical name (`model.layers.0.mlp.up_proj.weight`).
pub type QWeights = HashMap<String, QMatrix>;

pub(crate) fn take(w: &mut Weights, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = w
        .remove(name)
        .ok_or_else(|| Error::Invalid(format!("model weights: tensor `{name}` is missing")))?;
    if t.dims() != shape {
        return Err(Error::Invalid(format!(
            "model weights: tensor `{name}` has shape {:?}, expected {shape:?}",
            t.dims()
        )));
    }
    Ok(t)
}
