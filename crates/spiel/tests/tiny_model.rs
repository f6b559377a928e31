//! Fast exhaustive checks of the transformer and both file formats on tiny random models.

mod common;

use spiel::model::adapter::AdapterSet;

use candle_core::{DType, Device, Tensor, Var};
use spiel::kernels::quant::Format;
use spiel::model::random::random_weights;
use spiel::model::transformer::{KvCache, Llama};
use spiel::model::weight::Grad;

fn ids(v: &[u32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

#[test]
fn gguf_file_loads_to_the_same_model() {
    let dev = Device::Cpu;
    for bias in [false, true] {
        let cfg = spiel::formats::config::ModelConfig {
            attention_bias: bias,
            ..common::tiny_cfg()
        };
        let w = random_weights(&cfg, 3, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        spiel::testkit::synth::write_gguf(&path, &cfg, &w, Format::F32).unwrap();
        let loaded = spiel::model::loader::load(&path, &dev).unwrap();
        assert_eq!(loaded.model.cfg, cfg);
        let reference = Llama::from_weights(cfg.clone(), w, &dev).unwrap();
        let x = ids(&[5, 17, 200, 3, 99, 261, 42]);
        let a = reference.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
        let b = loaded.model.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
        // Same f32 weights, same ops: differences are summation-order only.
        assert!(
            common::max_abs_diff(&a, &b) < 1e-5,
            "bias={bias}: {}",
            common::max_abs_diff(&a, &b)
        );
        // The BPE merges from the metadata are used: " the" is one token.
        assert_eq!(
            loaded.tokenizer.encode("the the").unwrap(),
            vec![b't' as u32 + 3, 260, 261]
        );
    }
}

#[test]
fn quantized_gguf_stays_close_to_f32() {
    let dev = Device::Cpu;
    let cfg = common::tiny_cfg();
    let w = random_weights(&cfg, 4, &dev).unwrap();
    let reference = Llama::from_weights(cfg.clone(), w.clone(), &dev).unwrap();
    let x = ids(&[5, 17, 200, 3, 99]);
    let a = reference.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Relative to the largest logit: f16 keeps ~3 decimal digits, Q8_0 ~2, 4-bit ~1.
    let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    for (format, tol) in [
        (Format::F16, 1e-3 * scale),
        (Format::Q8_0, 2e-2 * scale),
        (Format::Q4_1, 0.2 * scale),
        (Format::Q4_0, 0.2 * scale),
    ] {
        let path = dir.path().join(format!("{format:?}.gguf"));
        spiel::testkit::synth::write_gguf(&path, &cfg, &w, format).unwrap();
        let b = spiel::model::loader::load(&path, &dev)
            .unwrap()
            .model
            .forward(&x, None, Grad::No, &AdapterSet::none())
            .unwrap();
        let d = common::max_abs_diff(&a, &b);
        assert!(d < tol && d > 0.0, "{format:?}: {d}");
    }
}

#[test]
fn hf_export_round_trips() {
    let dev = Device::Cpu;
    let cfg = spiel::formats::config::ModelConfig {
        tie_word_embeddings: false,
        attention_bias: true,
        ..common::tiny_cfg()
    };
    let w = random_weights(&cfg, 5, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    spiel::testkit::synth::write_gguf(&gguf, &cfg, &w, Format::F32).unwrap();
    let m = spiel::model::loader::load(&gguf, &dev).unwrap();
    let out = dir.path().join("hf");
    spiel::model::loader::export_hf(&m.model, &m.tokenizer, &out).unwrap();
    // Exporting again over an existing directory replaces it whole.
    spiel::model::loader::export_hf(&m.model, &m.tokenizer, &out).unwrap();
    let hf = spiel::model::loader::load(&out, &dev).unwrap();
    assert_eq!(hf.model.cfg, cfg);
    let x = ids(&[1, 2, 3, 250, 7]);
    let a = m.model.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
    let b = hf.model.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    assert_eq!(
        hf.tokenizer.encode("the the").unwrap(),
        m.tokenizer.encode("the the").unwrap()
    );
}

#[test]
fn training_and_inference_paths_agree() {
    let dev = Device::Cpu;
    let m = Llama::random(common::tiny_cfg(), 6, &dev).unwrap();
    let x = ids(&[9, 8, 7, 6, 5, 4, 3, 2, 1]);
    let a = m.forward(&x, None, Grad::Yes, &AdapterSet::none()).unwrap();
    let b = m.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
    assert!(common::max_abs_diff(&a, &b) < 1e-5);
}

#[test]
fn right_padding_does_not_change_real_positions() {
    let dev = Device::Cpu;
    let m = Llama::random(common::tiny_cfg(), 7, &dev).unwrap();
    let long = [11u32, 22, 33, 44, 55, 66];
    let short = [77u32, 88, 99];
    let batch = Tensor::new(&[long, [77, 88, 99, 2, 2, 2]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32; 6], [1, 1, 1, 0, 0, 0]], &dev).unwrap();
    let both = m.forward(&batch, Some(&mask), Grad::Yes, &AdapterSet::none()).unwrap();
    let alone_long = m.forward(&ids(&long), None, Grad::Yes, &AdapterSet::none()).unwrap();
    let alone_short = m.forward(&ids(&short), None, Grad::Yes, &AdapterSet::none()).unwrap();
    assert!(common::max_abs_diff(&both.get(0).unwrap(), &alone_long.get(0).unwrap()) < 1e-5);
    assert!(
        common::max_abs_diff(
            &both.get(1).unwrap().narrow(0, 0, 3).unwrap(),
            &alone_short.get(0).unwrap()
        ) < 1e-5
    );
}

#[test]
fn kv_cache_in_chunks_matches_full_forward() {
    let dev = Device::Cpu;
    let m = Llama::random(common::tiny_cfg(), 8, &dev).unwrap();
    let seq: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 262).collect();
    let full = m
        .forward(&ids(&seq), None, Grad::No, &AdapterSet::none())
        .unwrap()
        .get(0)
        .unwrap();
    let mut cache = KvCache::new();
    let mut pos = 0;
    for chunk in [5usize, 3, 1, 1, 2] {
        let last = m
            .forward_cached(&ids(&seq[pos..pos + chunk]), &mut cache, &AdapterSet::none())
            .unwrap();
        pos += chunk;
        assert_eq!(cache.len(), pos);
        let want = full.get(pos - 1).unwrap().unsqueeze(0).unwrap();
        assert!(common::max_abs_diff(&last, &want) < 1e-5, "after {pos} tokens");
    }
}

/// Decoding past the cache's first capacity (64 positions), two sequences at once, with a sparse
/// delta and a LoRA pair attached: every step's logits equal the full forward's at that position.
#[test]
fn kv_cache_growing_batched_with_adapters_matches_full_forward() {
    use spiel::model::adapter::{Delta, LoraDelta, SparseDelta};
    use std::sync::Arc;
    let dev = Device::Cpu;
    let cfg = common::tiny_cfg();
    let m = Llama::random(cfg.clone(), 12, &dev).unwrap();
    let mut adapters = AdapterSet::none();
    let q = m
        .linears()
        .into_iter()
        .find(|l| l.name.ends_with("0.self_attn.q_proj"))
        .unwrap();
    let (out, inp) = q.shape();
    let indices: Vec<u32> = (0..(out * inp) as u32).step_by(7).collect();
    let values: Vec<f32> = (0..indices.len()).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    adapters.add(
        &q.name,
        Delta::Sparse(SparseDelta {
            shape: (out, inp),
            values: Tensor::new(values.as_slice(), &dev).unwrap(),
            indices: Arc::new(indices),
            hook: None,
            in_base: false,
            packs: None,
        }),
    );
    let up = m
        .linears()
        .into_iter()
        .find(|l| l.name.ends_with("1.mlp.up_proj"))
        .unwrap();
    let (out, inp) = up.shape();
    let ramp = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| ((i * 31 % 17) as f32 - 8.0) * s).collect() };
    adapters.add(
        &up.name,
        Delta::Lora(LoraDelta {
            a: Tensor::from_vec(ramp(4 * inp, 0.01), (4, inp), &dev).unwrap(),
            b: Tensor::from_vec(ramp(out * 4, 0.02), (out, 4), &dev).unwrap(),
            scale: 2.0,
            dropout: 0.0,
            dropout_seed: 0,
            packs: None,
        }),
    );
    let n = 150;
    let rows: Vec<Vec<u32>> = (0..2u32)
        .map(|r| (0..n as u32).map(|i| (i * 37 + 5 + 11 * r) % 262).collect())
        .collect();
    let batch = |a: usize, b: usize| {
        let flat: Vec<u32> = rows.iter().flat_map(|r| r[a..b].to_vec()).collect();
        Tensor::from_vec(flat, (2, b - a), &dev).unwrap()
    };
    let full = m.forward(&batch(0, n), None, Grad::No, &adapters).unwrap();
    let plain = m.forward(&batch(0, n), None, Grad::No, &AdapterSet::none()).unwrap();
    assert!(
        common::max_abs_diff(&full, &plain) > 1e-3,
        "the adapters change the logits"
    );
    let mut cache = KvCache::new();
    let mut pos = 0;
    let mut chunks = vec![40usize, 23, 1, 2, 60];
    chunks.extend(std::iter::repeat_n(1, n - 126));
    for chunk in chunks {
        let last = m
            .forward_cached(&batch(pos, pos + chunk), &mut cache, &adapters)
            .unwrap();
        pos += chunk;
        assert_eq!(cache.len(), pos);
        let want = full.narrow(1, pos - 1, 1).unwrap().squeeze(1).unwrap();
        assert!(common::max_abs_diff(&last, &want) < 1e-4, "after {pos} tokens");
    }
    assert_eq!(pos, n);
}

#[test]
fn gradients_reach_the_weights_and_match_finite_differences() {
    let dev = Device::Cpu;
    let cfg = common::tiny_cfg();
    let mut w = random_weights(&cfg, 9, &dev).unwrap();
    let name = "model.layers.1.self_attn.q_proj.weight";
    let base: Vec<f32> = w[name].flatten_all().unwrap().to_vec1().unwrap();
    let var = Var::from_tensor(&w[name]).unwrap();
    w.insert(name.into(), var.as_tensor().clone());
    let m = Llama::from_weights(cfg.clone(), w.clone(), &dev).unwrap();
    let x = ids(&[3, 1, 4, 1, 5, 9, 2, 6]);
    let probe = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let v: Vec<f32> = (0..8 * cfg.vocab_size).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, (1, 8, cfg.vocab_size), &dev).unwrap()
    };
    let loss = |m: &Llama| {
        (m.forward(&x, None, Grad::Yes, &AdapterSet::none()).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(&m).backward().unwrap();
    let g: Vec<f32> = grads
        .get(var.as_tensor())
        .expect("no gradient")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // Central differences in f64 arithmetic over f32 forwards: h = 1e-2 keeps rounding noise small.
    let h = 1e-2f32;
    for idx in [0usize, 17, 640, 1023, 4000] {
        let eval = |delta: f32| {
            let mut v = base.clone();
            v[idx] += delta;
            let mut w2 = w.clone();
            w2.insert(name.into(), Tensor::from_vec(v, (64, 64), &dev).unwrap());
            let m2 = Llama::from_weights(cfg.clone(), w2, &dev).unwrap();
            loss(&m2).to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
        let err = (fd - g[idx] as f64).abs();
        assert!(
            err < 2e-2 * fd.abs().max(1e-2),
            "entry {idx}: autograd {} vs finite difference {fd}",
            g[idx]
        );
    }
}

/// Kept GGUF blocks compute what the same file dequantised computes (batched and cached paths),
/// and NF4 stays close to the f32 model.
#[test]
fn quantised_projections_match_their_dequantised_model() {
    use spiel::model::loader::{load_with, Quantize};
    let dev = Device::Cpu;
    let cfg = common::tiny_cfg();
    let w = random_weights(&cfg, 8, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let x = ids(&[5, 17, 200, 3, 99, 42]);
    for format in [Format::Q4_0, Format::Q4_1, Format::Q8_0] {
        let path = dir.path().join(format!("{format:?}.gguf"));
        spiel::testkit::synth::write_gguf(&path, &cfg, &w, format).unwrap();
        let dense = load_with(&path, &dev, Quantize::None).unwrap().model;
        let kept = load_with(&path, &dev, Quantize::Keep).unwrap().model;
        assert!(kept.is_quantized() && !dense.is_quantized());
        let a = dense.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
        let b = kept.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
        assert!(
            common::max_abs_diff(&a, &b) < 1e-4,
            "{format:?}: {}",
            common::max_abs_diff(&a, &b)
        );
        let mut ca = KvCache::new();
        let mut cb = KvCache::new();
        let a = dense.forward_cached(&x, &mut ca, &AdapterSet::none()).unwrap();
        let b = kept.forward_cached(&x, &mut cb, &AdapterSet::none()).unwrap();
        assert!(common::max_abs_diff(&a, &b) < 1e-4, "{format:?} cached");
    }
    let path = dir.path().join("f32.gguf");
    spiel::testkit::synth::write_gguf(&path, &cfg, &w, Format::F32).unwrap();
    let f = load_with(&path, &dev, Quantize::None).unwrap().model;
    let q = load_with(&path, &dev, Quantize::Nf4).unwrap().model;
    assert!(q.weight_bytes() < f.weight_bytes());
    let a = f.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
    let b = q.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
    let d = common::max_abs_diff(&a, &b);
    let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        d > 0.0 && d < 0.2 * scale,
        "NF4 logits moved by {d} (largest logit {scale})"
    );
}

/// A base held in bf16 (embeddings, tied head and projections widened a tile at a time) computes
/// what the same bf16 values held in f32 compute, batched and cached, in about half the bytes.
#[test]
fn bf16_base_matches_the_same_values_in_f32() {
    let dev = Device::Cpu;
    let cfg = common::tiny_cfg();
    let w = random_weights(&cfg, 9, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bf16.gguf");
    spiel::testkit::synth::write_gguf(&path, &cfg, &w, Format::BF16).unwrap();
    let f32_model = spiel::model::loader::load(&path, &dev).unwrap().model;
    let mut bf16 = f32_model.clone();
    bf16.hold_in_bf16().unwrap();
    assert!(bf16.is_quantized());
    // Only the norms (and nothing else) stay 4 bytes wide.
    let norms = (2 * cfg.num_layers + 1) * cfg.hidden_size * 4;
    assert_eq!((bf16.weight_bytes() - norms) * 2, f32_model.weight_bytes() - norms);
    let x = ids(&[5, 17, 200, 3, 99, 42]);
    let a = f32_model.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
    let b = bf16.forward(&x, None, Grad::No, &AdapterSet::none()).unwrap();
    assert!(common::max_abs_diff(&a, &b) < 1e-4, "{}", common::max_abs_diff(&a, &b));
    let (mut ca, mut cb) = (KvCache::new(), KvCache::new());
    let a = f32_model.forward_cached(&x, &mut ca, &AdapterSet::none()).unwrap();
    let b = bf16.forward_cached(&x, &mut cb, &AdapterSet::none()).unwrap();
    assert!(common::max_abs_diff(&a, &b) < 1e-4, "cached");
    // Exporting widens back to exactly the stored values.
    let named: std::collections::HashMap<_, _> = bf16.named_weights().unwrap().into_iter().collect();
    let orig: std::collections::HashMap<_, _> = f32_model.named_weights().unwrap().into_iter().collect();
    for (k, t) in &orig {
        assert_eq!(common::max_abs_diff(t, &named[k]), 0.0, "{k}");
    }
}

/// The block-by-block backward, with graphs kept or recomputed, gives the gradients of one
/// plain backward for every weight (embeddings, norms, projections) and the same loss.
#[test]
fn backward_by_blocks_matches_one_backward() {
    use spiel::model::transformer::BlockGraphs;
    use std::collections::HashMap;
    let dev = Device::Cpu;
    let cfg = common::tiny_cfg();
    let mut w = random_weights(&cfg, 12, &dev).unwrap();
    let vars: Vec<(String, Var)> = w
        .iter()
        .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    for (n, v) in &vars {
        w.insert(n.clone(), v.as_tensor().clone());
    }
    let m = Llama::from_weights(cfg.clone(), w, &dev).unwrap();
    let x = Tensor::new(&[[3u32, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], &dev).unwrap();
    let probe = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let v: Vec<f32> = (0..2 * 6 * cfg.hidden_size)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, (2, 6, cfg.hidden_size), &dev).unwrap()
    };
    let loss = |h: &Tensor| Ok((h * &probe)?.sum_all()?);
    let h = m
        .forward_hidden(&x, Some(&mask), Grad::Yes, &AdapterSet::none())
        .unwrap();
    let plain = loss(&h).unwrap();
    let scale = 0.5;
    let want = (&plain * scale).unwrap().backward().unwrap();
    for graphs in [BlockGraphs::Kept, BlockGraphs::Recomputed] {
        let mut got: HashMap<String, Vec<f32>> = HashMap::new();
        let value = m
            .backward_by_blocks(&x, Some(&mask), &AdapterSet::none(), graphs, loss, scale, |g| {
                for (n, v) in &vars {
                    if let Some(t) = g.get(v.as_tensor()) {
                        let t: Vec<f32> = t.flatten_all()?.to_vec1()?;
                        let e = got.entry(n.clone()).or_insert_with(|| vec![0.0; t.len()]);
                        e.iter_mut().zip(t).for_each(|(a, b)| *a += b);
                    }
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(value, plain.to_scalar::<f32>().unwrap(), "{graphs:?}");
        for (n, v) in &vars {
            let w: Vec<f32> = want
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let g = got.get(n).unwrap_or_else(|| panic!("{graphs:?}: no gradient for {n}"));
            let scale = w.iter().fold(0f32, |a, x| a.max(x.abs())).max(1e-6);
            let diff = w.iter().zip(g).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(diff <= 1e-5 * scale, "{graphs:?} {n}: {diff} (largest {scale})");
        }
    }
}
