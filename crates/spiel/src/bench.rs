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

/// Training-step timings of one method (`spiel bench train`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TrainBench {
    /// spiel-ag, spiel-ma, lora or full.
    pub method: String,
    /// Median seconds per update over all measured updates.
    pub median_s: f64,
    /// Smallest and largest update time.
    pub min_s: f64,
    /// Largest update time.
    pub max_s: f64,
    /// Median over updates outside AG windows and reselections (the common step).
    pub plain_median_s: f64,
    /// Median over updates inside SpIEL-AG windows (dense gradients formed), if any.
    pub window_median_s: Option<f64>,
    /// Median over updates that ended with a reselection, if any.
    pub reselection_median_s: Option<f64>,
    /// Mean update time over one whole reselection cycle (equal to the median without one).
    pub mean_cycle_s: f64,
    /// Tokens per second at the cycle mean.
    pub tokens_per_s: f64,
    /// Model FLOPs per update (forward + backward for the frozen base, adapter terms ignored).
    pub flops_per_step: f64,
    /// Achieved GFLOP/s at the cycle mean.
    pub gflops: f64,
    /// Peak resident memory of the process so far (MiB).
    pub peak_rss_mib: f64,
    /// What the memory plan ([`crate::plan`]) predicts for this run (MiB).
    pub plan_mib: f64,
    /// Trainable parameters.
    pub trainable: usize,
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// FLOPs of one update: forward `2 P T` plus backward `2 P T` through the frozen weights (input
/// gradients only), or `4 P T` for full fine-tuning (weight gradients too), with P the matrix
/// parameters in the blocks plus the head over the predicted tokens, and attention `4 T S H` per
/// layer forward (twice that backward).
pub fn train_flops(cfg: &crate::config::ModelConfig, tokens: usize, seq: usize, full: bool) -> f64 {
    let h = cfg.hidden_size as f64;
    let q = (cfg.num_heads * cfg.head_dim) as f64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as f64;
    let per_layer = h * q * 2.0 + 2.0 * h * kv + 3.0 * h * cfg.intermediate_size as f64;
    let blocks = per_layer * cfg.num_layers as f64;
    let head = h * cfg.vocab_size as f64;
    let t = tokens as f64;
    let bwd = if full { 4.0 } else { 2.0 };
    let attn = 4.0 * t * seq as f64 / 2.0 * q * cfg.num_layers as f64;
    (2.0 + bwd) * (blocks + head) * t + 3.0 * attn
}

/// Time `steps` updates of `method` on synthetic examples of exactly `seq_len` tokens (all
/// predicted), after one warm-up update.
pub fn bench_train(
    base: &Llama,
    mut cfg: crate::train::TrainConfig,
    seq_len: usize,
    steps: usize,
) -> Result<TrainBench> {
    use crate::data::Example;
    cfg.steps = steps + 1;
    cfg.eval_every = 0;
    cfg.save_every = 0;
    cfg.max_len = seq_len;
    let vocab = base.cfg.vocab_size as u32;
    let examples: Vec<Example> = (0..cfg.batch_size * 4)
        .map(|e| Example {
            ids: (0..seq_len as u32)
                .map(|i| 300 + (i * 7919 + e as u32 * 104_729) % (vocab - 300).max(1))
                .collect(),
            loss: vec![true; seq_len],
        })
        .collect();
    let sched = cfg.clone();
    let schedule = cfg.schedule();
    let method = cfg.method;
    let mut t = crate::train::Trainer::from_examples(cfg, base.clone(), "bench", 0, examples, Vec::new())?;
    let mut plain = Vec::new();
    let mut window = Vec::new();
    let mut resel = Vec::new();
    let mut all = Vec::new();
    for c in 1..=steps + 1 {
        let t0 = Instant::now();
        t.step()?;
        let secs = t0.elapsed().as_secs_f64();
        if c == 1 {
            continue;
        }
        all.push(secs);
        let ag_window = method == crate::adapter::Method::SpielAg && schedule.in_window(c);
        let is_resel = method.is_sparse() && schedule.is_reselection(c);
        if is_resel {
            resel.push(secs);
        } else if ag_window {
            window.push(secs);
        } else {
            plain.push(secs);
        }
    }
    let med = |v: &Vec<f64>| if v.is_empty() { None } else { Some(median(v.clone())) };
    let plain_m = med(&plain).unwrap_or(f64::NAN);
    let mean_cycle_s = if method.is_sparse() && sched.reselection_steps > 0 {
        // One cycle: S updates, of which one reselection and (AG) A - 1 other window updates.
        let s = sched.reselection_steps as f64;
        let (w, r) = (med(&window), med(&resel));
        let n_window = if method == crate::adapter::Method::SpielAg {
            sched.accumulation_steps as f64 - 1.0
        } else {
            0.0
        };
        let r = r.unwrap_or(plain_m);
        let w = w.unwrap_or(plain_m);
        (r + n_window * w + (s - 1.0 - n_window) * plain_m) / s
    } else {
        median(all.clone())
    };
    let tokens = sched.batch_size * sched.grad_accum * seq_len;
    let flops = train_flops(&base.cfg, tokens, seq_len, method == crate::adapter::Method::Full);
    Ok(TrainBench {
        method: method.as_str().to_string(),
        median_s: median(all.clone()),
        min_s: all.iter().copied().fold(f64::INFINITY, f64::min),
        max_s: all.iter().copied().fold(0.0, f64::max),
        plain_median_s: plain_m,
        window_median_s: med(&window),
        reselection_median_s: med(&resel),
        mean_cycle_s,
        tokens_per_s: tokens as f64 / mean_cycle_s,
        flops_per_step: flops,
        gflops: flops / mean_cycle_s / 1e9,
        peak_rss_mib: peak_rss_mib(),
        plan_mib: crate::plan::plan(&base.cfg, &sched, base.projection_format().into()).total as f64
            / (1024.0 * 1024.0),
        trainable: t.trainable_parameters(),
    })
}

/// One GEMM shape's measured rate.
#[derive(Debug, Clone, Serialize)]
pub struct GemmBench {
    /// What the shape is in the model.
    pub name: String,
    /// Rows of the activation (tokens).
    pub m: usize,
    /// Inner dimension.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Median GFLOP/s over the rounds.
    pub gflops: f64,
}

/// The machine's f32 GEMM rate at the model's training shapes (`x W^T` with `x: [tokens, in]`,
/// `W: [out, in]`, as the projections and the head run), median of `rounds` after a warm-up.
pub fn bench_gemm(cfg: &crate::config::ModelConfig, tokens: usize, rounds: usize) -> Result<Vec<GemmBench>> {
    let dev = candle_core::Device::Cpu;
    let h = cfg.hidden_size;
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let i = cfg.intermediate_size;
    let shapes = [
        ("q_proj / o_proj", h, q),
        ("k_proj / v_proj", h, kv),
        ("gate_proj / up_proj", h, i),
        ("down_proj", i, h),
        ("lm_head", h, cfg.vocab_size),
    ];
    let mut out = Vec::new();
    for (name, k, n) in shapes {
        let x = Tensor::randn(0f32, 1.0, (tokens, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let mut rates = Vec::new();
        for r in 0..=rounds {
            let t0 = Instant::now();
            let y = x.matmul(&w.t()?)?;
            let secs = t0.elapsed().as_secs_f64();
            drop(y);
            if r > 0 {
                rates.push(2.0 * (tokens * k * n) as f64 / secs / 1e9);
            }
        }
        out.push(GemmBench {
            name: name.to_string(),
            m: tokens,
            k,
            n,
            gflops: median(rates),
        });
    }
    Ok(out)
}
