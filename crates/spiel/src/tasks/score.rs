//! Scoring a text: the next-token top-k after it and its teacher-forced mean negative
//! log-likelihood. The numerical-parity tool.

use candle_core::Tensor;
use serde::Serialize;

use crate::formats::tokenizer::Tokenizer;
use crate::model::adapter::AdapterSet;
use crate::model::transformer::Llama;
use crate::model::weight::Grad;
use crate::{Error, Result};

/// One candidate next token.
#[derive(Debug, Clone, Serialize)]
pub struct TopToken {
    /// Token id.
    pub id: u32,
    /// Decoded text of the token.
    pub token: String,
    /// Raw logit.
    pub logit: f32,
}

/// The result of scoring a text.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    /// Token ids of the text.
    pub ids: Vec<u32>,
    /// Mean NLL (nats) of tokens 2..n given their prefixes; `None` for a one-token text.
    pub nll: Option<f64>,
    /// The best next tokens after the text, best first.
    pub top: Vec<TopToken>,
}

/// Log-softmax of one row in f64, at `target`.
pub fn log_prob(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    row[target] as f64 - lse
}

/// Score `text` with `model`.
pub fn score(model: &Llama, adapters: &AdapterSet, tokenizer: &Tokenizer, text: &str, top_k: usize) -> Result<Score> {
    if text.is_empty() {
        return Err(Error::Invalid("the text to score is empty".into()));
    }
    let ids = tokenizer.encode(text)?;
    if ids.is_empty() {
        return Err(Error::Invalid("the text encodes to no tokens".into()));
    }
    let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let logits: Vec<Vec<f32>> = model.forward(&input, None, Grad::No, adapters)?.squeeze(0)?.to_vec2()?;
    let nll = if ids.len() > 1 {
        let total: f64 = (0..ids.len() - 1)
            .map(|t| -log_prob(&logits[t], ids[t + 1] as usize))
            .sum();
        Some(total / (ids.len() - 1) as f64)
    } else {
        None
    };
    let last = &logits[ids.len() - 1];
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
    let top = order
        .into_iter()
        .take(top_k)
        .map(|i| TopToken {
            id: i as u32,
            token: tokenizer.token_text(i as u32),
            logit: last[i],
        })
        .collect();
    Ok(Score { ids, nll, top })
}
