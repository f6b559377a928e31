//! The training objective: mean NLL over a batch's assistant tokens, and the held-out loss.

use candle_core::Tensor;

use crate::model::adapter::AdapterSet;
use crate::model::transformer::Llama;
use crate::model::weight::Grad;
use crate::train::data::{self, Example};
use crate::Result;

/// Held-out mean NLL over all assistant tokens of `examples`.
pub fn eval_loss(
    model: &Llama,
    adapters: &AdapterSet,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<f64> {
    let (total, n) = eval_loss_sum(model, adapters, examples, batch_size, pad_id, |_| true)?;
    Ok(total / n.max(1) as f64)
}

/// The summed NLL and the number of assistant tokens over the batches of `examples` (chunks of
/// `batch_size`) whose number `keep` accepts: how data-parallel ranks split an evaluation.
pub fn eval_loss_sum(
    model: &Llama,
    adapters: &AdapterSet,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    keep: impl Fn(usize) -> bool,
) -> Result<(f64, usize)> {
    let mut total = 0.0f64;
    let mut n = 0usize;
    for (i, chunk) in examples.chunks(batch_size.max(1)).enumerate() {
        if !keep(i) {
            continue;
        }
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = data::make_batch(&refs, pad_id, model.device())?;
        if b.n_targets == 0 {
            continue;
        }
        let loss = batch_loss(model, adapters, &b, Grad::No)?.to_scalar::<f32>()? as f64;
        total += loss * b.n_targets as f64;
        n += b.n_targets;
    }
    Ok((total, n))
}

/// Mean NLL of the batch's targets: the head and the loss run only at target positions.
pub(crate) fn batch_loss(model: &Llama, adapters: &AdapterSet, b: &data::Batch, grad: Grad) -> Result<Tensor> {
    let h = model.forward_hidden(&b.ids, Some(&b.mask), grad, adapters)?;
    target_loss(model, &h, b)
}

/// Mean NLL of the batch's targets given the final hidden states `[B, T, H]`.
pub(crate) fn target_loss(model: &Llama, h: &Tensor, b: &data::Batch) -> Result<Tensor> {
    let (bs, t, hid) = h.dims3()?;
    let rows = h.reshape((bs * t, hid))?.index_select(&b.positions, 0)?;
    model.head_loss(&rows, &b.targets)
}
