//! The memory model: expected peak bytes of a training run, by component, from the model's
//! shape, the method, the base-weight format and the batch. It counts what spiel allocates:
//! every intermediate tensor of the forward graph stays alive until backward (candle keeps each
//! op's inputs), so activations are the sum of the outputs of the ops a block runs, per token;
//! the model, adapter, optimizer and selector state are counted element by element.
//! `spiel plan` prints it; `spiel train` prints it at start and refuses a run that would not fit.

use serde::Serialize;

use crate::formats::config::ModelConfig;
use crate::kernels::qmatrix::{QFormat, NF4_BLOCK};
use crate::kernels::quant::Format;
use crate::model::adapter::Method;
use crate::model::loader::Dtype;
use crate::train::config::TrainConfig;

/// How the frozen projections are stored, for the plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseFormat {
    /// f32.
    F32,
    /// NF4 with double-quantised scales.
    Nf4,
    /// GGUF blocks kept as loaded.
    Ggml(Format),
}

impl BaseFormat {
    /// Bytes per projection weight.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            BaseFormat::F32 => 4.0,
            // 4 bits + one int8 absmax code per block + one f32 per 256 blocks.
            BaseFormat::Nf4 => 0.5 + 1.0 / NF4_BLOCK as f64 + 4.0 / (NF4_BLOCK * 256) as f64,
            BaseFormat::Ggml(f) => {
                let (per, bytes) = f.block();
                bytes as f64 / per as f64
            }
        }
    }
}

impl From<Option<QFormat>> for BaseFormat {
    fn from(f: Option<QFormat>) -> BaseFormat {
        match f {
            None => BaseFormat::F32,
            Some(QFormat::Nf4) => BaseFormat::Nf4,
            Some(QFormat::Ggml(g)) => BaseFormat::Ggml(g),
        }
    }
}

/// One line of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// What it is.
    pub what: &'static str,
    /// Expected bytes.
    pub bytes: u64,
}

/// Expected peak memory of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Components, in the order printed.
    pub items: Vec<Item>,
    /// Their sum.
    pub total: u64,
}

/// Bytes of code, tokenizer, thread stacks and allocator slack measured for an idle process
/// (`spiel generate` with a 1-token budget, minus its weights).
const RUNTIME_BYTES: f64 = 90e6;

/// The plan for `cfg` on a model of shape `m` with projections stored as `base`.
pub fn plan(m: &ModelConfig, cfg: &TrainConfig, base: BaseFormat) -> Plan {
    let f = 4.0f64;
    let (h, i, v, l) = (
        m.hidden_size as f64,
        m.intermediate_size as f64,
        m.vocab_size as f64,
        m.num_layers as f64,
    );
    let q = (m.num_heads * m.head_dim) as f64;
    let kv = (m.num_kv_heads * m.head_dim) as f64;
    // (short name, out, in) of the projections of one block.
    let projections = [
        ("q_proj", q, h),
        ("k_proj", kv, h),
        ("v_proj", kv, h),
        ("o_proj", h, q),
        ("gate_proj", i, h),
        ("up_proj", i, h),
        ("down_proj", h, i),
    ];
    let targeted = |name: &str| cfg.target_modules.iter().any(|t| t == name);
    let proj_params: f64 = projections.iter().map(|(_, o, n)| o * n).sum::<f64>() * l;
    let targeted_params: f64 = projections
        .iter()
        .filter(|(n, _, _)| targeted(n))
        .map(|(_, o, n)| o * n)
        .sum::<f64>()
        * l;
    let other_params = v * h * if m.tie_word_embeddings { 1.0 } else { 2.0 } + (2.0 * l + 1.0) * h;
    let full = cfg.method == Method::Full;
    let dtype = cfg.dtype.resolved(full);
    let base_bytes = if full {
        // The trainable copy, which replaces the frozen original once it is made.
        (proj_params + other_params) * f
    } else {
        let (proj, other) = match (dtype, base) {
            (Dtype::Bf16, BaseFormat::F32) => (2.0, 2.0),
            (Dtype::Bf16, b) => (b.bytes_per_weight(), 2.0),
            (_, b) => (b.bytes_per_weight(), f),
        };
        proj_params * proj + other_params * other
    };

    // Trainable entries, and the budget the sparse methods match.
    let lora_params = |r: f64| -> f64 {
        projections
            .iter()
            .filter(|(n, _, _)| targeted(n))
            .map(|(_, o, n)| r * (o + n))
            .sum::<f64>()
            * l
    };
    let total_params = proj_params + other_params;
    let trainable = match cfg.method {
        Method::SpielAg | Method::SpielMa | Method::Shira => match cfg.density {
            Some(d) => (d * total_params).min(targeted_params),
            None => lora_params(cfg.lora_equivalent_rank as f64).min(targeted_params),
        },
        Method::Lora => lora_params(cfg.lora_rank as f64),
        Method::Full => total_params,
    };
    let (adapter, optimizer, selector) = match cfg.method {
        // Values and u32 indices; AdamW m, v, age and the gradient buffer; window candidates
        // with three f32 sums each, plus one module's dense gradient while a window is open.
        // (A SHiRA config is refused before a plan is made.)
        Method::SpielAg | Method::Shira => {
            let largest = projections.iter().map(|(_, o, n)| o * n).fold(0.0, f64::max);
            (trainable * 8.0, trainable * 16.0, trainable * 16.0 + largest * f)
        }
        // Values and indices; the gradient buffer plus SM3's row and column accumulators.
        Method::SpielMa => {
            let sm3: f64 = projections
                .iter()
                .filter(|(n, _, _)| targeted(n))
                .map(|(_, o, n)| o + n)
                .sum::<f64>()
                * l;
            (trainable * 8.0, trainable * 4.0 + sm3 * f, 0.0)
        }
        // A and B; AdamW m and v (one update count per tensor). The gradient buffers are
        // filled by the backward as the blocks' activations are freed, and emptied by the
        // optimizer step, so they are not held at the peak (the head's forward).
        Method::Lora => (trainable * f, trainable * 8.0, 0.0),
        // The trainable copy is counted with the base; AdamW m and v (gradients as for LoRA).
        Method::Full => (0.0, trainable * 8.0, 0.0),
    };

    // Activations: outputs of the ops of one block, per token, kept until backward, at 4 bytes
    // (f32) or 2 (`--dtype bf16`, [`crate::model::transformer::Llama::compute_in`]). A projection leaves one
    // output whatever its adapter: sparse values ride in a dense f32 base or their product is
    // fused with the base's ([`crate::kernels::sparse::SparseBase`]), and LoRA is one op with the base
    // product that recomputes its rank-r part in the backward ([`crate::kernels::lora`]).
    let act = match dtype {
        Dtype::Bf16 => 2.0,
        _ => f,
    };
    // Floats per token of one block, with `lin(name, out, in)` the floats a projection leaves.
    // Values per token that one block keeps, each projection one output (`out`).
    let per_token_layer = h // input norm
        + q + kv + kv // q_proj, k_proj, v_proj
        + q // attention's output (one op from the projections' layout, crate::kernels::attention)
        + h + h // o_proj, residual
        + h // post-attention norm
        + i + i + i // gate_proj, up_proj, silu(gate) * up (fused)
        + h + h; // down_proj, residual
    let tokens = (cfg.batch_size * cfg.max_len) as f64;
    // With checkpointing only each block's input stays, plus one block's activations at a time
    // (its forward recomputed in the backward).
    let activations = if cfg.checkpoint_activations {
        tokens * (l * h + per_token_layer) * act
    } else {
        // The residual sum is the copy of the block's output that the next block takes as its
        // input variable; the graph keeps its two addends (crate::model::transformer::BlockGraphs).
        tokens * l * per_token_layer * act
    };
    // The head runs fused with the loss ([`crate::kernels::head`]): the gathered rows and their gradient,
    // and one chunk of logits at a time (two while the backward forms `p W`). A trainable head
    // (full fine-tuning) also holds its weight gradient from the forward to the backward. With
    // bf16 a frozen head keeps its two packed bf16 forms (`QMatrix::keep_bf16_packs`).
    let chunk_rows = (crate::kernels::head::chunk_rows(v as usize, full) as f64).min(tokens);
    let kept_packs = match (dtype, full) {
        (Dtype::Bf16, false) => 2.0 * v * h * 2.0,
        _ => 0.0,
    };
    // With bf16 products on the tile unit an adapter run keeps each targeted projection's two
    // packed forms (2 bytes a value each): a sparse run with its delta patched in, plus a copy
    // of the indices and the base values at them ([`crate::kernels::bf16mm::DeltaPacks`]); LoRA the
    // base's alone.
    let tiles = crate::kernels::bf16mm::kernel().packs();
    let delta_packs = match (dtype, cfg.method) {
        (Dtype::Bf16, Method::SpielAg | Method::SpielMa) if tiles => targeted_params * 2.0 * 2.0 + trainable * 8.0,
        (Dtype::Bf16, Method::Lora) if tiles => targeted_params * 2.0 * 2.0,
        _ => 0.0,
    };
    let head = tokens * 2.0 * h * f + 2.0 * chunk_rows * v * f + if full { v * h * f } else { 0.0 } + kept_packs;
    // Backward frontier: about one block's worth of gradients in flight (one per op output,
    // whatever the adapter adds to a projection).
    // With bf16 activations each op also holds f32 copies while it runs: at most a projection's
    // widened output gradient, input gradient and input (`down_proj`'s backward), or the
    // attention backward's widened q, k, v, output and output gradient.
    let widened = match dtype {
        Dtype::Bf16 => tokens * (h + 2.0 * i).max(3.0 * q + 2.0 * kv) * f,
        _ => 0.0,
    };
    let transient = tokens * per_token_layer * act + widened;
    // A `gradient` initial mask over several micro-batches sums each targeted matrix's dense
    // gradient for the pass before the first update (one micro-batch keeps only the indices).
    let initial_mask = match cfg.method {
        Method::SpielAg | Method::SpielMa
            if cfg.initial_mask == crate::train::config::InitialMask::Gradient
                && cfg.initial_mask_micro_batches() > 1 =>
        {
            targeted_params * 4.0
        }
        _ => 0.0,
    };

    let items = vec![
        Item {
            what: "base weights",
            bytes: base_bytes as u64,
        },
        Item {
            what: "adapter values",
            bytes: adapter as u64,
        },
        Item {
            what: "packed weights",
            bytes: delta_packs as u64,
        },
        Item {
            what: "optimizer state",
            bytes: optimizer as u64,
        },
        Item {
            what: "selector state",
            bytes: selector as u64,
        },
        Item {
            what: "activations",
            bytes: activations as u64,
        },
        Item {
            what: "lm head and loss",
            bytes: head as u64,
        },
        Item {
            what: "transient buffers",
            bytes: transient as u64,
        },
        Item {
            what: "initial mask sums",
            bytes: initial_mask as u64,
        },
        Item {
            what: "runtime",
            bytes: RUNTIME_BYTES as u64,
        },
    ];
    let total = items.iter().map(|i| i.bytes).sum();
    Plan { items, total }
}

impl Plan {
    /// A table in MiB.
    pub fn render(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut s = String::new();
        for it in &self.items {
            s.push_str(&format!("  {:<18} {:>9.0} MiB\n", it.what, mib(it.bytes)));
        }
        s.push_str(&format!("  {:<18} {:>9.0} MiB\n", "total", mib(self.total)));
        s
    }
}

/// Memory the system can give this process now (`MemAvailable`), if known.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> ModelConfig {
        ModelConfig {
            architecture: "LlamaForCausalLM".into(),
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rope_theta: 100000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    #[test]
    fn components_scale_as_they_should() {
        let m = smollm();
        let cfg = TrainConfig {
            dtype: Dtype::F32,
            ..TrainConfig::default()
        };
        let f32p = plan(&m, &cfg, BaseFormat::F32);
        let nf4 = plan(&m, &cfg, BaseFormat::Nf4);
        let get = |p: &Plan, w: &str| p.items.iter().find(|i| i.what == w).unwrap().bytes as f64;
        // 135M parameters, 28M in the embedding: f32 base ~540 MB; NF4 projections ~8x smaller.
        assert!((get(&f32p, "base weights") / 1e6 - 538.0).abs() < 5.0);
        let proj = 106_168_320.0;
        let saved = get(&f32p, "base weights") - get(&nf4, "base weights");
        assert!((saved - proj * (4.0 - BaseFormat::Nf4.bytes_per_weight())).abs() < 1e3);
        // The LoRA-rank-8-equivalent budget: 2,442,240 values and indices.
        assert_eq!(get(&f32p, "adapter values") as u64, 2_442_240 * 8);
        // Activations are linear in the batch.
        let b8 = TrainConfig {
            batch_size: 8,
            ..cfg.clone()
        };
        let p8 = plan(&m, &b8, BaseFormat::F32);
        assert!((get(&p8, "activations") / get(&f32p, "activations") - 2.0).abs() < 1e-9);
        // Checkpointing keeps one hidden state per layer instead of all of a layer's activations.
        let ck = TrainConfig {
            checkpoint_activations: true,
            ..cfg.clone()
        };
        let pc = plan(&m, &ck, BaseFormat::F32);
        let per_layer = get(&f32p, "activations") / m.num_layers as f64;
        let want = per_layer + (cfg.batch_size * cfg.max_len * m.hidden_size * m.num_layers * 4) as f64;
        assert!((get(&pc, "activations") - want).abs() < 1.0);
        // bf16 products on the tile unit keep the targeted projections packed twice (2 bytes a
        // value each), plus the indices and the base values at them.
        let bf16 = TrainConfig {
            dtype: Dtype::Bf16,
            ..cfg.clone()
        };
        let packs = get(&plan(&m, &bf16, BaseFormat::F32), "packed weights");
        let tiles = crate::kernels::bf16mm::kernel().packs();
        assert_eq!(packs, if tiles { proj * 4.0 + 2_442_240.0 * 8.0 } else { 0.0 });
        let lora16 = TrainConfig {
            method: Method::Lora,
            ..bf16.clone()
        };
        let lora_packs = get(&plan(&m, &lora16, BaseFormat::F32), "packed weights");
        assert_eq!(lora_packs, if tiles { proj * 4.0 } else { 0.0 });
        assert_eq!(get(&f32p, "packed weights"), 0.0);
        assert_eq!(f32p.total, f32p.items.iter().map(|i| i.bytes).sum::<u64>());
        assert!(f32p.render().contains("total"));
    }

    #[test]
    fn nf4_bytes_per_weight_matches_the_storage() {
        let w = vec![0.01f32; 64 * 256 * 4];
        let q = crate::kernels::qmatrix::QMatrix::nf4(&w, 64, 1024).unwrap();
        let want = BaseFormat::Nf4.bytes_per_weight() * w.len() as f64;
        assert!((q.bytes() as f64 - want).abs() < 1.0, "{} vs {want}", q.bytes());
    }
}
