//! Random adapters for a model, saved and loaded like trained ones: sparse deltas at random
//! indices and LoRA pairs with random factors, large enough to change a tiny model's greedy
//! tokens. The server's tests and `spiel bench serve` use many of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::model::adapter::{Adapter, AdapterConfig, BaseModel, Delta, LoraDelta, Method, SparseDelta};
use crate::model::transformer::Llama;
use crate::Result;

/// A SpIEL-AG adapter over every projection of `m` with `density` of each weight's entries set to
/// values uniform in `[-scale, scale)`.
pub fn random_sparse(m: &Llama, seed: u64, density: f64, scale: f32) -> Result<Adapter> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut deltas = BTreeMap::new();
    let (mut counts, mut shapes) = (BTreeMap::new(), BTreeMap::new());
    for l in m.linears() {
        let (out, inp) = l.shape();
        let n = out * inp;
        let k = ((n as f64 * density).round() as usize).clamp(1, n);
        let mut indices: Vec<u32> = rand::seq::index::sample(&mut rng, n, k)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        indices.sort_unstable();
        let values: Vec<f32> = (0..k).map(|_| rng.gen_range(-scale..scale)).collect();
        counts.insert(l.name.clone(), k);
        shapes.insert(l.name.clone(), [out, inp]);
        deltas.insert(
            l.name.clone(),
            Delta::Sparse(SparseDelta {
                shape: (out, inp),
                indices: Arc::new(indices),
                values: Tensor::from_vec(values, k, &Device::Cpu)?,
                hook: None,
                in_base: false,
                packs: None,
            }),
        );
    }
    Ok(Adapter {
        config: config(m, Method::SpielAg, counts, shapes, None),
        deltas,
    })
}

/// A LoRA adapter of `rank` over every projection of `m`, factors uniform in `[-scale, scale)`.
pub fn random_lora(m: &Llama, seed: u64, rank: usize, scale: f32) -> Result<Adapter> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut deltas = BTreeMap::new();
    let mut uniform = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-scale..scale)).collect() };
    for l in m.linears() {
        let (out, inp) = l.shape();
        deltas.insert(
            l.name.clone(),
            Delta::Lora(LoraDelta {
                a: Tensor::from_vec(uniform(rank * inp), (rank, inp), &Device::Cpu)?,
                b: Tensor::from_vec(uniform(out * rank), (out, rank), &Device::Cpu)?,
                scale: 1.0,
                dropout: 0.0,
                dropout_seed: 0,
                packs: None,
            }),
        );
    }
    Ok(Adapter {
        config: config(m, Method::Lora, BTreeMap::new(), BTreeMap::new(), Some(rank)),
        deltas,
    })
}

/// The projections' short names (`q_proj`, ...), each once, in the model's order.
fn short_names(m: &Llama) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for l in m.linears() {
        let short = l.name.rsplit('.').next().unwrap_or(&l.name).to_string();
        if !names.contains(&short) {
            names.push(short);
        }
    }
    names
}

fn config(
    m: &Llama,
    method: Method,
    module_counts: BTreeMap<String, usize>,
    module_shapes: BTreeMap<String, [usize; 2]>,
    r: Option<usize>,
) -> AdapterConfig {
    let lora = method == Method::Lora;
    AdapterConfig {
        method,
        base_model: Some(BaseModel {
            name: "random".into(),
            config_hash: m.cfg.fingerprint(),
        }),
        base_model_name_or_path: Some("random".into()),
        target_modules: short_names(m),
        module_counts,
        module_shapes,
        r,
        lora_alpha: r.map(|r| r as f64),
        lora_dropout: None,
        peft_type: lora.then(|| "LORA".into()),
        task_type: lora.then(|| "CAUSAL_LM".into()),
        bias: None,
        hyperparameters: serde_json::Value::Null,
        training: serde_json::Value::Null,
    }
}
