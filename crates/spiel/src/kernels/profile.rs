//! Wall time by phase of a training step, for `spiel bench train --profile`. Off unless enabled;
//! a span then costs one relaxed atomic load. Phases are timed where spiel's own kernels run, so
//! they never nest; what candle runs itself (attention matmuls, element-wise ops, copies, LoRA's
//! small matmuls, the graph bookkeeping) is what remains of the step time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

/// A phase of the training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Token-embedding lookup.
    Embedding,
    /// RMSNorm forward and backward.
    Norms,
    /// RoPE forward and backward.
    Rope,
    /// Attention: scores, masked softmax and the weighted sum, forward and backward.
    Attention,
    /// SwiGLU's `silu(gate) * up`, forward and backward.
    SwiGlu,
    /// The frozen projections' forward products `x W^T`.
    ProjectionsForward,
    /// Their input-gradient products `g W`.
    ProjectionsInputGrad,
    /// Sparse deltas: forward `x dW^T` and input gradient `g dW`.
    SparseProducts,
    /// Sparse deltas: value gradients (SDDMM) outside AG windows.
    Sddmm,
    /// Inside SpIEL-AG windows: the dense `[out, in]` gradients and their accumulation.
    AgDenseGradients,
    /// Full fine-tuning: every projection's weight gradient `g^T x`.
    WeightGradients,
    /// The vocabulary head and cross-entropy, forward (with the input gradient, `p W`).
    HeadForward,
    /// The vocabulary head and cross-entropy, backward (scaling the stored gradient).
    HeadBackward,
    /// Gathering gradients into the optimizer's buffers.
    GradientCollection,
    /// The optimizer update (AdamW or SM3).
    Optimizer,
    /// Pruning and regrowth at reselection steps.
    Selection,
}

/// Every phase, in the order printed.
pub const PHASES: [Phase; 16] = [
    Phase::Embedding,
    Phase::Norms,
    Phase::Rope,
    Phase::Attention,
    Phase::SwiGlu,
    Phase::ProjectionsForward,
    Phase::ProjectionsInputGrad,
    Phase::SparseProducts,
    Phase::Sddmm,
    Phase::AgDenseGradients,
    Phase::WeightGradients,
    Phase::HeadForward,
    Phase::HeadBackward,
    Phase::GradientCollection,
    Phase::Optimizer,
    Phase::Selection,
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; PHASES.len()] = [const { AtomicU64::new(0) }; PHASES.len()];

/// Turn timing on or off.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Zero every phase's total.
pub fn reset() {
    NANOS.iter().for_each(|n| n.store(0, Ordering::Relaxed));
}

/// Seconds spent in each phase since the last [`reset`].
pub fn totals() -> Vec<(Phase, f64)> {
    PHASES
        .iter()
        .zip(&NANOS)
        .map(|(&p, n)| (p, n.load(Ordering::Relaxed) as f64 * 1e-9))
        .collect()
}

/// Times its phase until dropped (when timing is on).
pub struct Span(Option<(Phase, Instant)>);

/// Start timing `phase`; the time is added when the returned guard drops.
pub fn span(phase: Phase) -> Span {
    Span(ENABLED.load(Ordering::Relaxed).then(|| (phase, Instant::now())))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((p, t0)) = self.0 {
            let i = PHASES.iter().position(|&q| q == p).unwrap_or(0);
            NANOS[i].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}
