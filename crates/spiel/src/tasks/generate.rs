//! Text generation through the batched decoding step ([`crate::model::decode`], here a batch of
//! one, so a sequence generated here and one served in a mixed batch get the same tokens): greedy
//! at temperature 0, otherwise seeded sampling with an optional nucleus (top-p) cut, streaming
//! decoded text as tokens arrive.

use std::time::Instant;

use rand::{Rng, SeedableRng};

use crate::formats::tokenizer::Tokenizer;
use crate::model::adapter::AdapterSet;
use crate::model::decode::{SeqCache, StepInput};
use crate::model::transformer::Llama;
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
    let mut sampler = Sampler::new(opts.temperature, 1.0, opts.seed);
    let served = model.served_adapter(adapters)?;
    let with = [(&served, 1.0f32)];
    let with: &[_] = if adapters.is_empty() { &[] } else { &with };
    let mut cache = SeqCache::new();
    let step = |cache: &mut SeqCache, tokens: &[u32]| -> Result<Vec<f32>> {
        let mut out = model.decode_step(&mut [StepInput {
            cache,
            tokens,
            adapters: with,
        }])?;
        Ok(out.pop().expect("one sequence"))
    };
    let start = Instant::now();
    let mut logits = step(&mut cache, prompt)?;
    let prefill_secs = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut ids = Vec::new();
    let mut printed = 0usize;
    for n in 0..opts.max_new_tokens {
        let next = sampler.pick(&logits) as u32;
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
        if n + 1 < opts.max_new_tokens {
            logits = step(&mut cache, &[next])?;
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

/// How the next token is picked from a row of logits: greedy at temperature 0, otherwise a
/// seeded draw from softmax(logits / temperature), restricted to the smallest set of most likely
/// tokens whose probability reaches `top_p` (ties kept in id order).
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    /// A sampler; `top_p` in (0, 1] (1 keeps every token).
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Sampler {
        Sampler {
            temperature,
            top_p,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// The next token's id.
    pub fn pick(&mut self, logits: &[f32]) -> usize {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weights: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / self.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut order: Vec<usize> = (0..weights.len()).collect();
        let mut kept = total;
        if self.top_p < 1.0 {
            order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
            let mut mass = 0.0;
            let mut cut = order.len();
            for (n, &i) in order.iter().enumerate() {
                mass += weights[i];
                if mass >= self.top_p * total {
                    cut = n + 1;
                    break;
                }
            }
            order.truncate(cut);
            kept = mass.min(total);
        }
        let mut u = self.rng.gen::<f64>() * kept;
        for &i in &order {
            u -= weights[i];
            if u <= 0.0 {
                return i;
            }
        }
        *order.last().expect("a non-empty vocabulary")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_is_greedy_at_zero_and_follows_weights_otherwise() {
        assert_eq!(Sampler::new(0.0, 1.0, 1).pick(&[0.1, 3.0, 2.9]), 1);
        let mut s = Sampler::new(1.0, 1.0, 1);
        // With one overwhelming logit sampling must pick it.
        assert_eq!(s.pick(&[0.0, 100.0, 0.0]), 1);
        // Frequencies follow the softmax: p = e^1 / (e^0 + e^1) ~ 0.731.
        let n = 20_000;
        let ones = (0..n).filter(|_| s.pick(&[0.0, 1.0]) == 1).count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.7311).abs() < 0.015, "p = {p}");
    }

    #[test]
    fn top_p_keeps_the_smallest_likely_set_and_renormalises() {
        // Probabilities ~ [0.09, 0.24, 0.67]: top_p 0.6 keeps only the last, 0.8 the last two.
        let logits = [0.0f32, 1.0, 2.0];
        let mut s = Sampler::new(1.0, 0.6, 2);
        assert!((0..500).all(|_| s.pick(&logits) == 2));
        let mut s = Sampler::new(1.0, 0.8, 3);
        let picks: Vec<usize> = (0..20_000).map(|_| s.pick(&logits)).collect();
        assert!(!picks.contains(&0));
        let p1 = picks.iter().filter(|&&i| i == 1).count() as f64 / picks.len() as f64;
        let want = 1f64.exp() / (1f64.exp() + 2f64.exp());
        assert!((p1 - want).abs() < 0.015, "p1 = {p1}, want {want}");
    }
}
