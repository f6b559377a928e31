//! Random weights for any config, for tests and for benchmarks at shapes no downloaded model has
//! (`spiel bench train --random-shape 1b`).

use candle_core::{DType, Device, Tensor};

use crate::formats::config::ModelConfig;
use crate::kernels::qmatrix::{QFormat, QMatrix};
use crate::model::weight::{QWeights, Weights};
use crate::Result;

/// Random canonical-named weights for `cfg` (normal, std 0.02; norm weights 1).
pub fn random_weights(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Weights> {
    Ok(random_parts(cfg, seed, device, None)?.0)
}

/// Random weights with the projections generated straight into `quantize` (one projection's
/// f32 values at a time), so a model far larger than memory in f32 can be built: the dense
/// tensors (embeddings, norms) and the quantised projections.
pub fn random_parts(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
    quantize: Option<QFormat>,
) -> Result<(Weights, QWeights)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Box-Muller from two uniforms: plain and dependency-free.
    let values = |rng: &mut rand::rngs::StdRng, n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * 0.02) as f32
            })
            .collect()
    };
    let mut qw = QWeights::new();
    let normal = |rng: &mut rand::rngs::StdRng, shape: &[usize]| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Ok(Tensor::from_vec(values(rng, n), shape, device)?)
    };
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let mut w = Weights::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        normal(&mut rng, &[cfg.vocab_size, h])?,
    );
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            let key = format!("{p}.{name}.weight");
            match quantize {
                Some(f) => {
                    // Straight from the generator into the format: one f32 matrix at a time.
                    let data = values(&mut rng, shape[0] * shape[1]);
                    qw.insert(key, QMatrix::quantize(f, &data, shape[0], shape[1])?);
                }
                None => {
                    w.insert(key, normal(&mut rng, &shape)?);
                }
            }
        }
        if cfg.attention_bias {
            for (name, n) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                w.insert(format!("{p}.self_attn.{name}.bias"), normal(&mut rng, &[n])?);
            }
        }
        w.insert(
            format!("{p}.input_layernorm.weight"),
            Tensor::ones(h, DType::F32, device)?,
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            Tensor::ones(h, DType::F32, device)?,
        );
    }
    w.insert("model.norm.weight".into(), Tensor::ones(h, DType::F32, device)?);
    if !cfg.tie_word_embeddings {
        w.insert("lm_head.weight".into(), normal(&mut rng, &[cfg.vocab_size, h])?);
    }
    Ok((w, qw))
}

/// A small config for tests: 2 layers, hidden 64, GQA 4/2 heads of 16, vocab 97.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: "LlamaForCausalLM".into(),
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: 97,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        attention_bias: false,
    }
}
