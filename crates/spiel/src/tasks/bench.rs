//! Throughput measurements that print tables (never timed tests).

use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use crate::model::decode::{SeqCache, ServedAdapter, StepInput};
use crate::model::transformer::Llama;
use crate::tasks::generate::argmax;
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

/// The batched decode step alone (no server): milliseconds per step of `batch` sequences with no
/// adapter against the same batch with row i using adapter i mod K (medians over rounds that
/// alternate the two).
#[derive(Debug, Clone, Serialize)]
pub struct DecodeStepBench {
    /// Sequences per step.
    pub batch: usize,
    /// Distinct adapters in the mixed batch.
    pub adapters: usize,
    /// Cached positions of each sequence when the timed steps start.
    pub context: usize,
    /// Median ms per step, base alone.
    pub base_ms: f64,
    /// Median ms per step, adapters mixed.
    pub mixed_ms: f64,
}

/// Time [`Llama::decode_step`] over `batch` sequences of `context` cached tokens, `steps` steps
/// per round, base alone and with `adapters` mixed in, alternating for `rounds` rounds after one
/// warm-up.
pub fn bench_decode_step(
    model: &Llama,
    adapters: &[&ServedAdapter],
    batch: usize,
    context: usize,
    steps: usize,
    rounds: usize,
) -> Result<DecodeStepBench> {
    let vocab = model.cfg.vocab_size as u32;
    let token = |i: usize, j: usize| 300 + ((i * 7919 + j * 104_729) as u32) % (vocab - 300).max(1);
    let run = |mixed: bool| -> Result<f64> {
        let rows: Vec<Vec<(&ServedAdapter, f32)>> = (0..batch)
            .map(|i| match (mixed, adapters.is_empty()) {
                (true, false) => vec![(adapters[i % adapters.len()], 1.0)],
                _ => Vec::new(),
            })
            .collect();
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|i| (0..context).map(|j| token(i, j)).collect())
            .collect();
        let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new()).collect();
        let mut step = |tokens: &[&[u32]]| -> Result<()> {
            let mut inputs: Vec<StepInput> = caches
                .iter_mut()
                .zip(tokens)
                .zip(&rows)
                .map(|((cache, tokens), adapters)| StepInput {
                    cache,
                    tokens,
                    adapters,
                })
                .collect();
            model.decode_step(&mut inputs)?;
            Ok(())
        };
        step(&prompts.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
        let next: Vec<[u32; 1]> = (0..batch).map(|i| [token(i, context)]).collect();
        let next: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        let start = Instant::now();
        for _ in 0..steps {
            step(&next)?;
        }
        Ok(start.elapsed().as_secs_f64() * 1e3 / steps as f64)
    };
    let (mut base, mut mixed) = (Vec::new(), Vec::new());
    for round in 0..=rounds {
        let (b, m) = (run(false)?, run(true)?);
        if round > 0 {
            base.push(b);
            mixed.push(m);
        }
    }
    Ok(DecodeStepBench {
        batch,
        adapters: adapters.len(),
        context,
        base_ms: median(base),
        mixed_ms: median(mixed),
    })
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
        let mut cache = SeqCache::new();
        let step = |cache: &mut SeqCache, tokens: &[u32]| -> Result<u32> {
            let logits = model.decode_step(&mut [StepInput {
                cache,
                tokens,
                adapters: &[],
            }])?;
            Ok(argmax(&logits[0]) as u32)
        };
        let t0 = Instant::now();
        let mut next = step(&mut cache, &prompt)?;
        let t1 = Instant::now();
        for _ in 0..decode_tokens {
            next = step(&mut cache, &[next])?;
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
    /// Resident memory when training started: the loaded model and the runtime (MiB).
    #[serde(default)]
    pub start_rss_mib: f64,
    /// What the memory plan ([`crate::train::plan`]) predicts for this run (MiB).
    pub plan_mib: f64,
    /// Trainable parameters.
    pub trainable: usize,
    /// Time, FLOPs and bytes by phase of the step (with `--profile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<Vec<PhaseRow>>,
    /// Data-parallel ranks that ran the updates (each with its share of the batch).
    #[serde(default = "one")]
    pub ranks: usize,
    /// Median seconds per update inside collectives (waiting for a slower rank included).
    #[serde(default)]
    pub comm_s: f64,
    /// Median bytes all-reduced per update.
    #[serde(default)]
    pub comm_bytes: f64,
}

fn one() -> usize {
    1
}

/// One phase of the step in a profile: measured time and the modelled work.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PhaseRow {
    /// The phase (`other` is the step time no phase accounts for).
    pub phase: String,
    /// Mean seconds per update.
    pub secs_per_step: f64,
    /// Share of the mean update time.
    pub share: f64,
    /// Modelled GFLOP per update (mean over the measured updates).
    pub gflop_per_step: f64,
    /// Modelled GB moved per update (mean over the measured updates).
    pub gb_per_step: f64,
}

/// The work of each phase of one update, `(phase, FLOPs, bytes)`, averaged over updates with
/// `window` and `reselection` the fractions of updates inside AG windows and at reselections.
/// A model to set measured times against, not a count: element-wise phases count their passes
/// over f32 tensors, GEMM phases their multiply-adds and the weights and activations they read.
fn phase_work(
    base: &Llama,
    cfg: &crate::train::config::TrainConfig,
    seq: usize,
    trainable: usize,
    window: f64,
    reselection: f64,
) -> Vec<(crate::kernels::profile::Phase, f64, f64)> {
    use crate::kernels::profile::Phase;
    use crate::model::adapter::Method;
    let m = &base.cfg;
    let (h, l, v) = (m.hidden_size as f64, m.num_layers as f64, m.vocab_size as f64);
    let q = (m.num_heads * m.head_dim) as f64;
    let kv = (m.num_kv_heads * m.head_dim) as f64;
    let i = m.intermediate_size as f64;
    let b = (cfg.batch_size * cfg.grad_accum) as f64;
    let s = seq as f64;
    let t = b * s;
    let n = b * (s - 1.0);
    let k = trainable as f64;
    let proj = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)];
    let params: f64 = proj.iter().map(|(o, n)| o * n).sum::<f64>() * l;
    let io: f64 = proj.iter().map(|(o, n)| o + n).sum::<f64>() * l;
    let wbytes = base.linears().iter().map(|x| x.weight.bytes()).sum::<usize>() as f64;
    let head_bytes = v
        * h
        * if cfg.dtype.resolved(cfg.method == crate::model::adapter::Method::Full) == crate::model::loader::Dtype::Bf16
        {
            2.0
        } else {
            4.0
        };
    let f = 4.0;
    let sparse = cfg.method.is_sparse();
    // Over dense f32 projections the values ride in the base weights: no separate sparse product.
    let separate_product = sparse && base.linears().iter().any(|x| x.weight.dense_f32_frozen().is_none());
    let norms = (2.0 * l + 1.0) * t * h;
    let rope = l * t * (q + kv);
    let probs = l * b * m.num_heads as f64 * s * s;
    vec![
        (Phase::Embedding, 0.0, 2.0 * t * h * f),
        (Phase::Norms, 12.0 * norms, 6.0 * norms * f),
        (Phase::Rope, 6.0 * rope, 4.0 * rope * f),
        // Fused attention: QK^T and PV forward; QK^T again, dV, dP, dQ and dK backward; softmax.
        (
            Phase::Attention,
            14.0 * probs * m.head_dim as f64 + 9.0 * probs,
            l * t * (4.0 * q + 4.0 * kv) * f,
        ),
        (Phase::SwiGlu, 20.0 * l * t * i, 8.0 * l * t * i * f),
        (Phase::ProjectionsForward, 2.0 * t * params, wbytes + t * io * f),
        (Phase::ProjectionsInputGrad, 2.0 * t * params, wbytes + t * io * f),
        (
            Phase::SparseProducts,
            if separate_product { 4.0 * t * k } else { 0.0 },
            if separate_product {
                2.0 * (8.0 * k + t * io * f)
            } else {
                0.0
            },
        ),
        (
            Phase::Sddmm,
            if sparse { (1.0 - window) * 2.0 * t * k } else { 0.0 },
            if sparse {
                (1.0 - window) * (8.0 * k + t * io * f)
            } else {
                0.0
            },
        ),
        (
            Phase::AgDenseGradients,
            if cfg.method == Method::SpielAg {
                window * 2.0 * t * params
            } else {
                0.0
            },
            if cfg.method == Method::SpielAg {
                window * (3.0 * params * f + t * io * f)
            } else {
                0.0
            },
        ),
        (
            Phase::WeightGradients,
            if cfg.method == Method::Full {
                2.0 * t * params
            } else {
                0.0
            },
            if cfg.method == Method::Full {
                params * f + t * io * f
            } else {
                0.0
            },
        ),
        // The fused head forms the input gradient in its forward; the backward only scales it.
        (Phase::HeadForward, 4.0 * n * h * v, 2.0 * head_bytes + 3.0 * n * v * f),
        (Phase::HeadBackward, n * h, 2.0 * n * h * f),
        (Phase::GradientCollection, k, 3.0 * k * f),
        (Phase::Optimizer, 15.0 * k, 7.0 * k * f),
        (Phase::Selection, reselection * 30.0 * k, reselection * 10.0 * k * f),
    ]
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// Resident set size of this process now, in MiB (Linux `VmRSS`), 0 where unknown.
pub fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// FLOPs of one update: forward `2 P T` plus backward `2 P T` through the frozen weights (input
/// gradients only), or `4 P T` for full fine-tuning (weight gradients too), with P the matrix
/// parameters in the blocks plus the head over the predicted tokens, and attention `4 T S H` per
/// layer forward (twice that backward).
pub fn train_flops(cfg: &crate::formats::config::ModelConfig, tokens: usize, seq: usize, full: bool) -> f64 {
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
/// predicted), after one warm-up update; with `profile`, also the time of each phase. The base
/// is taken over, as a run takes it, so that full fine-tuning frees the frozen original.
pub fn bench_train(
    base: Llama,
    mut cfg: crate::train::config::TrainConfig,
    seq_len: usize,
    steps: usize,
    profile: bool,
    group: std::sync::Arc<crate::dist::Group>,
) -> Result<TrainBench> {
    use crate::train::data::Example;
    let start_rss_mib = rss_mib();
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
    let mut t = crate::train::trainer::Trainer::from_examples(cfg, base, "bench", 0, examples, Vec::new())?;
    t.set_group(group.clone());
    crate::kernels::profile::enable(profile);
    let (mut comm_s, mut comm_bytes) = (Vec::new(), Vec::new());
    let mut plain = Vec::new();
    let mut window = Vec::new();
    let mut resel = Vec::new();
    let mut all = Vec::new();
    for c in 1..=steps + 1 {
        let (t0, comm0) = (Instant::now(), group.stats());
        t.step()?;
        let secs = t0.elapsed().as_secs_f64();
        if c == 1 {
            crate::kernels::profile::reset();
            continue;
        }
        let comm = group.stats();
        comm_s.push(comm.secs - comm0.secs);
        comm_bytes.push((comm.bytes - comm0.bytes) as f64);
        all.push(secs);
        let ag_window = method == crate::model::adapter::Method::SpielAg && schedule.in_window(c);
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
    let mean_cycle_s = if method.is_sparse() && schedule.reselection_steps > 0 {
        // One cycle: S updates, of which one reselection and (AG) A - 1 other window updates.
        let s = schedule.reselection_steps as f64;
        let (w, r) = (med(&window), med(&resel));
        let n_window = if method == crate::model::adapter::Method::SpielAg {
            schedule.accumulation_steps as f64 - 1.0
        } else {
            0.0
        };
        let r = r.unwrap_or(plain_m);
        let w = w.unwrap_or(plain_m);
        (r + n_window * w + (s - 1.0 - n_window) * plain_m) / s
    } else {
        median(all.clone())
    };
    crate::kernels::profile::enable(false);
    let tokens = sched.batch_size * sched.grad_accum * seq_len;
    let phases = profile.then(|| {
        let mean_step = all.iter().sum::<f64>() / all.len().max(1) as f64;
        let measured = all.len().max(1) as f64;
        let work = phase_work(
            t.base(),
            &sched,
            seq_len,
            t.trainable_parameters(),
            (window.len() + resel.len() * usize::from(method == crate::model::adapter::Method::SpielAg)) as f64
                / measured,
            resel.len() as f64 / measured,
        );
        let mut rows: Vec<PhaseRow> = crate::kernels::profile::totals()
            .into_iter()
            .zip(work)
            .map(|((phase, secs), (_, flops, bytes))| PhaseRow {
                phase: serde_json::to_value(phase)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                secs_per_step: secs / measured,
                share: secs / measured / mean_step,
                gflop_per_step: flops / 1e9,
                gb_per_step: bytes / 1e9,
            })
            .collect();
        let accounted: f64 = rows.iter().map(|r| r.secs_per_step).sum();
        rows.push(PhaseRow {
            phase: "other".into(),
            secs_per_step: mean_step - accounted,
            share: (mean_step - accounted) / mean_step,
            gflop_per_step: 0.0,
            gb_per_step: 0.0,
        });
        rows
    });
    let flops = train_flops(
        &t.base().cfg,
        tokens,
        seq_len,
        method == crate::model::adapter::Method::Full,
    );
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
        start_rss_mib,
        plan_mib: crate::train::plan::plan(&t.base().cfg, &sched, t.base().projection_format().into()).total as f64
            / (1024.0 * 1024.0),
        trainable: t.trainable_parameters(),
        phases,
        ranks: group.size(),
        comm_s: median(comm_s),
        comm_bytes: median(comm_bytes),
    })
}

/// One all-reduce size's measured time across the group.
#[derive(Debug, Clone, Serialize)]
pub struct AllReduceBench {
    /// Bytes of f32 payload per rank.
    pub bytes: usize,
    /// Median seconds per all-reduce.
    pub secs: f64,
    /// Payload over time (GB/s).
    pub algbw_gbs: f64,
    /// What each rank sends and receives in a ring all-reduce, `2 (p - 1) / p` payloads, over
    /// time (GB/s): the link's rate, comparable across group sizes.
    pub busbw_gbs: f64,
}

/// Time f32 sum all-reduces of each size in `bytes` over `group`: `rounds` after one warm-up,
/// medians (every rank must call this with the same arguments).
pub fn bench_all_reduce(group: &crate::dist::Group, bytes: &[usize], rounds: usize) -> Vec<AllReduceBench> {
    let p = group.size() as f64;
    bytes
        .iter()
        .map(|&b| {
            let mut buf = vec![1.0f32; (b / 4).max(1)];
            let mut times = Vec::with_capacity(rounds);
            for r in 0..=rounds {
                group.barrier();
                let t = Instant::now();
                group.sum_f32(&mut buf);
                if r > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            let secs = median(times);
            let payload = (buf.len() * 4) as f64;
            AllReduceBench {
                bytes: buf.len() * 4,
                secs,
                algbw_gbs: payload / secs / 1e9,
                busbw_gbs: payload * 2.0 * (p - 1.0) / p / secs / 1e9,
            }
        })
        .collect()
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
    /// Median GFLOP/s of the same product over bf16-rounded operands (`--dtype bf16`), packing
    /// included.
    pub bf16_gflops: f64,
}

/// The code that runs `--dtype bf16` products on this CPU: `"amx"`, `"avx512-bf16 dot
/// products"` or `"f32 over rounded operands"`.
pub fn bf16_kernel() -> &'static str {
    crate::kernels::bf16mm::kernel().name()
}

/// The machine's f32 GEMM rate at the model's training shapes (`x W^T` with `x: [tokens, in]`,
/// `W: [out, in]`, as the projections and the head run), median of `rounds` after a warm-up; and
/// the rate of the same products over bf16 operands.
pub fn bench_gemm(cfg: &crate::formats::config::ModelConfig, tokens: usize, rounds: usize) -> Result<Vec<GemmBench>> {
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
        let flop = 2.0 * (tokens * k * n) as f64;
        let (mut rates, mut bf16_rates) = (Vec::new(), Vec::new());
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let frozen = crate::kernels::qmatrix::Frozen::Dense(w.clone());
        for r in 0..=rounds {
            let t0 = Instant::now();
            let y = x.matmul(&w.t()?)?;
            let secs = t0.elapsed().as_secs_f64();
            drop(y);
            let t0 = Instant::now();
            let y16 = frozen.bf16_product((&xs).into(), tokens, true, None, None);
            let secs16 = t0.elapsed().as_secs_f64();
            drop(y16);
            if r > 0 {
                rates.push(flop / secs / 1e9);
                bf16_rates.push(flop / secs16 / 1e9);
            }
        }
        out.push(GemmBench {
            name: name.to_string(),
            m: tokens,
            k,
            n,
            gflops: median(rates),
            bf16_gflops: median(bf16_rates),
        });
    }
    Ok(out)
}
