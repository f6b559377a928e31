//! Text generation over the KV cache: greedy at temperature 0, otherwise seeded sampling,
//! streaming decoded text as tokens arrive.

use std::time::Instant;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

use crate::formats::tokenizer::Tokenizer;
use crate::model::adapter::AdapterSet;
use crate::model::transformer::{KvCache, Llama};
use crate::{Error, Result};

/// How to pick tokens.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// 0 for greedy; otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Seed for sampling.
    pub seed: u64,
    /// Stop as soon as the generated text contains one of these (it stays in the text).
    pub stop_strings: Vec<String>,
}

/// What a generation produced, with its timing.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new token ids (without the stop token).
    pub ids: Vec<u32>,
    /// Their decoded text.
    pub text: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt (prefill).
    pub prefill_secs: f64,
    /// Seconds spent producing the new tokens after the first.
    pub decode_secs: f64,
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Generate a continuation of `prompt` (token ids), calling `on_text` with each new piece of
/// decoded text as soon as it forms complete characters.
pub fn generate(
    model: &Llama,
    adapters: &AdapterSet,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty: give some text to continue".into()));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut cache = KvCache::new();
    let device = model.device();
    let start = Instant::now();
    let mut logits = model.forward_cached(&Tensor::new(prompt, device)?.unsqueeze(0)?, &mut cache, adapters)?;
    let prefill_secs = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut ids = Vec::new();
    let mut printed = 0usize;
    for step in 0..opts.max_new_tokens {
        let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let next = pick(&row, opts.temperature, &mut rng) as u32;
        if tokenizer.stop_ids.contains(&next) {
            break;
        }
        ids.push(next);
        let text = tokenizer.decode(&ids)?;
        if !text.ends_with('\u{FFFD}') && text.len() > printed && text.is_char_boundary(printed) {
            on_text(&text[printed..]);
            printed = text.len();
        }
        if opts.stop_strings.iter().any(|s| text.contains(s.as_str())) {
            break;
        }
        if step + 1 < opts.max_new_tokens {
            logits = model.forward_cached(&Tensor::new(&[next], device)?.unsqueeze(0)?, &mut cache, adapters)?;
        }
    }
    let text = tokenizer.decode(&ids)?;
    if text.len() > printed && text.is_char_boundary(printed) {
        on_text(&text[printed..]);
    }
    Ok(Generation {
        ids,
        text,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: decode_start.elapsed().as_secs_f64(),
    })
}

/// Greedy at temperature 0, otherwise a sample from softmax(logits / temperature).
fn pick(logits: &[f32], temperature: f64, rng: &mut impl Rng) -> usize {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        u -= w;
        if u <= 0.0 {
            return i;
        }
    }
    weights.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_is_greedy_at_zero_and_follows_weights_otherwise() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(pick(&[0.1, 3.0, 2.9], 0.0, &mut rng), 1);
        // With one overwhelming logit sampling must pick it.
        assert_eq!(pick(&[0.0, 100.0, 0.0], 1.0, &mut rng), 1);
        // Frequencies follow the softmax: p = e^1 / (e^0 + e^1) ~ 0.731.
        let n = 20_000;
        let ones = (0..n).filter(|_| pick(&[0.0, 1.0], 1.0, &mut rng) == 1).count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.7311).abs() < 0.015, "p = {p}");
    }
}
