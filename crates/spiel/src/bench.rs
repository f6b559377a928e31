//! Throughput measurements that print tables (never timed tests).

use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use crate::adapter::AdapterSet;
use crate::generate::argmax;
use crate::model::{KvCache, Llama};
use crate::Result;

/// Generation throughput: prefill and decode tokens per second (medians over rounds).
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBench {
    /// Prompt length used for prefill.
    pub prompt_tokens: usize,
    /// Tokens decoded per round.
    pub decode_tokens: usize,
    /// Rounds measured.
    pub rounds: usize,
    /// Median prefill throughput.
    pub prefill_tokens_per_s: f64,
    /// Median decode throughput.
    pub decode_tokens_per_s: f64,
    /// Threads used by the compute pool.
    pub threads: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Measure prefill of `prompt_tokens` tokens and greedy decode of `decode_tokens` tokens
/// (never stopping early), `rounds` times after one warm-up round.
pub fn bench_generate(
    model: &Llama,
    prompt_tokens: usize,
    decode_tokens: usize,
    rounds: usize,
) -> Result<GenerateBench> {
    let vocab = model.cfg.vocab_size as u32;
    // A fixed, deterministic prompt of ordinary token ids.
    let prompt: Vec<u32> = (0..prompt_tokens as u32)
        .map(|i| 300 + (i * 7919) % (vocab - 300).max(1))
        .collect();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for round in 0..=rounds {
        let mut cache = KvCache::new();
        let t0 = Instant::now();
        let logits = model.forward_cached(
            &Tensor::new(prompt.as_slice(), model.device())?.unsqueeze(0)?,
            &mut cache,
            &AdapterSet::none(),
        )?;
        let mut next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?) as u32;
        let t1 = Instant::now();
        for _ in 0..decode_tokens {
            let logits = model.forward_cached(
                &Tensor::new(&[next], model.device())?.unsqueeze(0)?,
                &mut cache,
                &AdapterSet::none(),
            )?;
            next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?) as u32;
        }
        let t2 = Instant::now();
        if round > 0 {
            prefill.push(prompt_tokens as f64 / (t1 - t0).as_secs_f64());
            decode.push(decode_tokens as f64 / (t2 - t1).as_secs_f64());
        }
    }
    Ok(GenerateBench {
        prompt_tokens,
        decode_tokens,
        rounds,
        prefill_tokens_per_s: median(prefill),
        decode_tokens_per_s: median(decode),
        threads: candle_core::utils::get_num_threads(),
    })
}
