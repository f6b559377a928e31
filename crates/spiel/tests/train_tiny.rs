//! Training end to end on a tiny random model with the tiny byte-level tokenizer: adapters save,
//! reload, merge and resume exactly; bad adapters are refused; a diverging run stops cleanly.

mod common;

use candle_core::{Device, Tensor};
use spiel::formats::tokenizer::Message;
use spiel::kernels::quant::Format;
use spiel::model::adapter::{AdapterSet, Method};
use spiel::model::loader::LoadedModel;
use spiel::model::weight::Grad;
use spiel::train::config::TrainConfig;
use spiel::train::data::Conversation;
use spiel::train::{self, trainer::Trainer};

fn tiny(dir: &std::path::Path) -> LoadedModel {
    let cfg = common::tiny_cfg();
    let w = spiel::model::random::random_weights(&cfg, 11, &Device::Cpu).unwrap();
    let p = dir.join("tiny.gguf");
    spiel::testkit::synth::write_gguf(&p, &cfg, &w, Format::F32).unwrap();
    spiel::model::loader::load(&p, &Device::Cpu).unwrap()
}

fn conversations(n: usize) -> Vec<Conversation> {
    (0..n)
        .map(|i| Conversation {
            messages: vec![
                Message::new("user", &format!("add {} and {}", i % 7, i % 5)),
                Message::new("assistant", &format!("the sum is {}", i % 7 + i % 5)),
            ],
            line: i + 1,
        })
        .collect()
}

fn config(method: Method, out: &std::path::Path) -> TrainConfig {
    TrainConfig {
        method,
        out: out.to_path_buf(),
        steps: 12,
        batch_size: 4,
        grad_accum: 2,
        max_len: 64,
        reselection_steps: Some(4),
        accumulation_steps: Some(2),
        lora_dropout: if method == Method::Lora { 0.1 } else { 0.0 },
        lr: Some(1e-2),
        heldout: 8,
        eval_every: 4,
        save_every: 3,
        lora_equivalent_rank: 2,
        ..TrainConfig::default()
    }
}

fn run(m: &LoadedModel, cfg: TrainConfig, resume: bool) -> Vec<train::metrics::StepRecord> {
    run_from(m, cfg, resume).0
}

/// Train to the end; returns the metrics file's records and the first update this call ran.
fn run_from(m: &LoadedModel, cfg: TrainConfig, resume: bool) -> (Vec<train::metrics::StepRecord>, usize) {
    let (mut t, stats) = Trainer::new(cfg.clone(), m.model.clone(), "tiny", &m.tokenizer, &conversations(40)).unwrap();
    let mut first_step = 0;
    train::run::run(&mut t, &m.tokenizer, &stats, resume, |ev| {
        if let train::run::Event::Start { first, .. } = ev {
            first_step = first;
        }
        train::run::Flow::Continue
    })
    .unwrap();
    (
        train::metrics::read_metrics(&cfg.out.join("metrics.jsonl")).unwrap(),
        first_step,
    )
}

fn logits(m: &LoadedModel, a: &AdapterSet) -> Tensor {
    let ids = Tensor::new(&[[1u32, 40, 50, 60, 70, 2, 100]], &Device::Cpu).unwrap();
    m.model.forward(&ids, None, Grad::No, a).unwrap()
}

#[test]
fn every_method_trains_saves_reloads_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    for method in [Method::SpielAg, Method::SpielMa, Method::Lora] {
        let out = dir.path().join(method.as_str());
        let metrics = run(&m, config(method, &out), false);
        assert!(std::fs::read(out.join("loss.png")).unwrap().starts_with(b"\x89PNG"));
        assert!(out.join("config.toml").exists());
        // Step 0 is the base model's held-out loss; every step is logged once.
        assert_eq!(
            metrics.iter().map(|r| r.step).collect::<Vec<_>>(),
            (0..=12).collect::<Vec<_>>()
        );
        let first = metrics[0].eval_loss.unwrap();
        let last = metrics[12].eval_loss.unwrap();
        assert!(last < first, "{method:?}: held-out loss {first} -> {last}");
        if method.is_sparse() {
            let resel: Vec<usize> = metrics
                .iter()
                .filter(|r| r.reselection.is_some())
                .map(|r| r.step)
                .collect();
            assert_eq!(resel, vec![4, 8]);
        }
        let adapter = m.model.load_adapter(&out.join("adapter")).unwrap();
        let set = adapter.to_set();
        let unmerged = logits(&m, &set);
        assert!(
            common::max_abs_diff(&unmerged, &logits(&m, &AdapterSet::none())) > 1e-4,
            "{method:?}: adapter changes nothing"
        );
        // Merged weights give the same logits.
        let merged = m.model.merged(&set).unwrap();
        let ids = Tensor::new(&[[1u32, 40, 50, 60, 70, 2, 100]], &Device::Cpu).unwrap();
        let ml = merged.forward(&ids, None, Grad::No, &AdapterSet::none()).unwrap();
        assert!(
            common::max_abs_diff(&ml, &unmerged) < 1e-4,
            "{method:?}: merged differs by {}",
            common::max_abs_diff(&ml, &unmerged)
        );
        // Save again and reload: identical logits.
        let copy = dir.path().join(format!("{}-copy", method.as_str()));
        adapter.save(&copy).unwrap();
        let again = m.model.load_adapter(&copy).unwrap();
        assert_eq!(common::max_abs_diff(&logits(&m, &again.to_set()), &unmerged), 0.0);
        let report = spiel::tasks::inspect::inspect(&copy).unwrap();
        assert_eq!(report.method, method);
        assert!(report.total > 0 && report.render().contains("per layer"));
    }
}

#[test]
fn sparse_budget_matches_lora_rank_and_counts_are_conserved() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let out = dir.path().join("ag");
    run(&m, config(Method::SpielAg, &out), false);
    let a = m.model.load_adapter(&out.join("adapter")).unwrap();
    // Rank 2 on 7 modules x 2 layers: 2 * sum(in + out).
    let lora_equiv: usize = m.model.linears().iter().map(|l| 2 * (l.shape().0 + l.shape().1)).sum();
    let total: usize = a.config.module_counts.values().sum();
    assert!(
        total <= lora_equiv && total + 14 > lora_equiv,
        "{total} vs {lora_equiv}"
    );
    for (name, d) in &a.deltas {
        let spiel::model::adapter::Delta::Sparse(s) = d else {
            panic!("not sparse")
        };
        assert_eq!(s.indices.len(), a.config.module_counts[name]);
        assert!(s.indices.windows(2).all(|w| w[0] < w[1]));
    }
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    for method in [Method::SpielAg, Method::SpielMa, Method::Lora, Method::Full] {
        let full_out = dir.path().join(format!("{}-full", method.as_str()));
        let whole = run(&m, config(method, &full_out), false);
        // Interrupted after step 7, in the middle of the AG window 7..8, then resumed.
        let part_out = dir.path().join(format!("{}-part", method.as_str()));
        let cfg = config(method, &part_out);
        let (mut t, stats) =
            Trainer::new(cfg.clone(), m.model.clone(), "tiny", &m.tokenizer, &conversations(40)).unwrap();
        let stop = |ev: train::run::Event| match ev {
            train::run::Event::Step(r) if r.step == 7 => train::run::Flow::Stop,
            _ => train::run::Flow::Continue,
        };
        let s = train::run::run(&mut t, &m.tokenizer, &stats, false, stop).unwrap();
        assert!(s.stopped);
        drop(t);
        let (resumed, first) = run_from(&m, cfg, true);
        assert_eq!(
            first, 8,
            "{method:?}: the resumed run must continue after the checkpoint"
        );
        assert_eq!(resumed.len(), whole.len(), "{method:?}");
        for (a, b) in whole.iter().zip(&resumed) {
            assert_eq!(a.step, b.step);
            if let (Some(x), Some(y)) = (a.loss, b.loss) {
                assert!((x - y).abs() < 1e-5, "{method:?} step {}: {x} vs {y}", a.step);
            }
            if let (Some(x), Some(y)) = (a.eval_loss, b.eval_loss) {
                assert!((x - y).abs() < 1e-5, "{method:?} step {} eval: {x} vs {y}", a.step);
            }
        }
    }
}

#[test]
fn adapters_for_another_base_or_broken_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let out = dir.path().join("ag");
    run(&m, config(Method::SpielAg, &out), false);
    let adir = out.join("adapter");
    // Another base: a config that differs in one field.
    let other_cfg = spiel::formats::config::ModelConfig {
        rope_theta: 500_000.0,
        ..common::tiny_cfg()
    };
    let other = spiel::model::transformer::Llama::random(other_cfg, 1, &Device::Cpu).unwrap();
    let e = other.load_adapter(&adir).err().unwrap().to_string();
    assert!(
        e.contains("trained on base model `tiny`") && e.contains("config hash"),
        "{e}"
    );
    // Unsorted indices.
    let a = m.model.load_adapter(&adir).unwrap();
    let mut broken = a.clone();
    if let Some(spiel::model::adapter::Delta::Sparse(s)) = broken.deltas.values_mut().next() {
        let mut idx = (*s.indices).clone();
        idx.swap(0, 1);
        s.indices = std::sync::Arc::new(idx);
    }
    let bdir = dir.path().join("broken");
    broken.save(&bdir).unwrap();
    let e = m.model.load_adapter(&bdir).err().unwrap().to_string();
    assert!(e.contains("not sorted and unique"), "{e}");
    // Index out of range.
    let mut broken = a.clone();
    if let Some(spiel::model::adapter::Delta::Sparse(s)) = broken.deltas.values_mut().next() {
        let mut idx = (*s.indices).clone();
        *idx.last_mut().unwrap() = 1 << 30;
        s.indices = std::sync::Arc::new(idx);
    }
    broken.save(&bdir).unwrap();
    let e = m.model.load_adapter(&bdir).err().unwrap().to_string();
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let out = dir.path().join("nan");
    let cfg = TrainConfig {
        lr: Some(1e30),
        save_every: 1,
        eval_every: 0,
        warmup_ratio: 0.0,
        ..config(Method::Lora, &out)
    };
    let (mut t, stats) = Trainer::new(cfg, m.model.clone(), "tiny", &m.tokenizer, &conversations(40)).unwrap();
    let e = train::run::run(&mut t, &m.tokenizer, &stats, false, |_| train::run::Flow::Continue)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("loss became"), "{e}");
    let ckpts = spiel::formats::checkpoint::list(&out).unwrap();
    assert_eq!(ckpts.len(), 1);
    let (_, arrays) = spiel::formats::checkpoint::load(&ckpts[0].1).unwrap();
    for (name, a) in arrays {
        if let spiel::formats::checkpoint::Array::F32(v) = a {
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name} is not finite in the kept checkpoint"
            );
        }
    }
}

#[test]
fn two_adapters_add_up_and_peft_style_configs_load() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let (a_out, b_out) = (dir.path().join("a"), dir.path().join("b"));
    run(&m, config(Method::SpielAg, &a_out), false);
    let mut cfg_b = config(Method::SpielMa, &b_out);
    cfg_b.seed = 7;
    run(&m, cfg_b, false);
    let a = m.model.load_adapter(&a_out.join("adapter")).unwrap();
    let b = m.model.load_adapter(&b_out.join("adapter")).unwrap();
    let mut both = a.to_set();
    both.extend(&b.to_set());
    // Applying both equals merging one and applying the other on top.
    let merged_a = m.model.merged(&a.to_set()).unwrap();
    let ids = Tensor::new(&[[1u32, 40, 50, 60, 70, 2, 100]], &Device::Cpu).unwrap();
    let stacked = merged_a.forward(&ids, None, Grad::No, &b.to_set()).unwrap();
    assert!(common::max_abs_diff(&logits(&m, &both), &stacked) < 1e-4);
    assert!(common::max_abs_diff(&logits(&m, &both), &logits(&m, &a.to_set())) > 1e-4);

    // A LoRA adapter_config.json as PEFT writes it (no spiel fields) loads; shapes are still checked.
    let l_out = dir.path().join("l");
    run(&m, config(Method::Lora, &l_out), false);
    let ldir = l_out.join("adapter");
    let peft = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "fan_in_fan_out": false,
        "inference_mode": true
    });
    std::fs::write(ldir.join("adapter_config.json"), peft.to_string()).unwrap();
    let l = m.model.load_adapter(&ldir).unwrap();
    assert_eq!(l.config.method, Method::Lora);
    assert_eq!(l.deltas.len(), 14);
}

#[test]
fn toml_configs_parse_partially_and_name_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "method = \"spiel-ma\"\nsteps = 7\nreselection_policy = \"cosine\"\ntarget_modules = [\"q_proj\"]\n",
    )
    .unwrap();
    let c = TrainConfig::from_toml_file(&p).unwrap();
    assert_eq!(
        (c.method, c.steps, c.batch_size),
        (Method::SpielMa, 7, TrainConfig::default().batch_size)
    );
    assert_eq!(c.reselection_policy, spiel::train::select::Policy::Cosine);
    std::fs::write(&p, "steps = 7\nlearning_rate = 1e-3\n").unwrap();
    let e = TrainConfig::from_toml_file(&p).unwrap_err().to_string();
    assert!(e.contains("c.toml") && e.contains("learning_rate"), "{e}");
    let bad = TrainConfig {
        accumulation_steps: Some(30),
        reselection_steps: Some(20),
        ..TrainConfig::default()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("accumulation_steps"));
}

/// qSpIEL: SpIEL-AG and LoRA over NF4 and kept-Q4_0 projections train (held-out loss falls), the
/// projections stay packed, and the adapter evaluates unmerged on the same quantised base.
#[test]
fn adapters_train_over_a_quantised_base() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_cfg();
    let w = spiel::model::random::random_weights(&cfg, 11, &Device::Cpu).unwrap();
    let p = dir.path().join("tiny-q4.gguf");
    spiel::testkit::synth::write_gguf(&p, &cfg, &w, Format::Q4_0).unwrap();
    let f32_path = dir.path().join("tiny.gguf");
    spiel::testkit::synth::write_gguf(&f32_path, &cfg, &w, Format::F32).unwrap();
    let dense = spiel::model::loader::load(&f32_path, &Device::Cpu).unwrap();
    for (path, q) in [
        (&f32_path, spiel::model::loader::Quantize::Nf4),
        (&p, spiel::model::loader::Quantize::Keep),
    ] {
        let m = spiel::model::loader::load_with(path, &Device::Cpu, q).unwrap();
        assert!(m.model.is_quantized());
        // Projections at ~4.1-4.5 bits instead of 32.
        let proj_f32: usize = dense.model.linears().iter().map(|l| l.weight.bytes()).sum();
        let proj_q: usize = m.model.linears().iter().map(|l| l.weight.bytes()).sum();
        assert!(proj_q * 6 < proj_f32, "{q:?}: {proj_q} vs {proj_f32} bytes");
        for method in [Method::SpielAg, Method::Lora] {
            let out = dir.path().join(format!("{q:?}-{}", method.as_str()));
            let c = TrainConfig {
                quantize: q,
                ..config(method, &out)
            };
            let metrics = run(&m, c, false);
            let (first, last) = (metrics[0].eval_loss.unwrap(), metrics[12].eval_loss.unwrap());
            assert!(last < first, "{q:?} {method:?}: held-out loss {first} -> {last}");
            let a = m.model.load_adapter(&out.join("adapter")).unwrap();
            let with = logits(&m, &a.to_set());
            assert!(common::max_abs_diff(&with, &logits(&m, &AdapterSet::none())) > 1e-4);
            // Merging writes a dense model that gives the same logits as the unmerged adapter.
            let merged = m.model.merged(&a.to_set()).unwrap();
            assert!(!merged.is_quantized());
            let ids = Tensor::new(&[[1u32, 40, 50, 60, 70, 2, 100]], &Device::Cpu).unwrap();
            let ml = merged.forward(&ids, None, Grad::No, &AdapterSet::none()).unwrap();
            assert!(common::max_abs_diff(&ml, &with) < 1e-4);
        }
    }
    // A bf16 base: adapters train and merge the same way.
    let mut m = spiel::model::loader::load(&f32_path, &Device::Cpu).unwrap();
    m.model.hold_in_bf16().unwrap();
    for method in [Method::SpielMa, Method::Lora] {
        let out = dir.path().join(format!("bf16-{}", method.as_str()));
        let c = TrainConfig {
            dtype: spiel::model::loader::Dtype::Bf16,
            ..config(method, &out)
        };
        let metrics = run(&m, c, false);
        let (first, last) = (metrics[0].eval_loss.unwrap(), metrics[12].eval_loss.unwrap());
        assert!(last < first, "bf16 {method:?}: held-out loss {first} -> {last}");
        let a = m.model.load_adapter(&out.join("adapter")).unwrap();
        let with = logits(&m, &a.to_set());
        let merged = m.model.merged(&a.to_set()).unwrap();
        let ids = Tensor::new(&[[1u32, 40, 50, 60, 70, 2, 100]], &Device::Cpu).unwrap();
        let ml = merged.forward(&ids, None, Grad::No, &AdapterSet::none()).unwrap();
        assert!(common::max_abs_diff(&ml, &with) < 1e-4);
    }
    let bad = TrainConfig {
        dtype: spiel::model::loader::Dtype::Bf16,
        ..config(Method::Full, &dir.path().join("full-bf16"))
    };
    assert!(bad.validate().unwrap_err().to_string().contains("dtype"));
    // Full fine-tuning over a quantised base is refused with the field named.
    let bad = TrainConfig {
        quantize: spiel::model::loader::Quantize::Nf4,
        ..config(Method::Full, &dir.path().join("full"))
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("quantize"), "{e}");
}

#[test]
fn checkpointed_training_gives_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let nf4 = spiel::model::loader::load_with(
        &dir.path().join("tiny.gguf"),
        &Device::Cpu,
        spiel::model::loader::Quantize::Nf4,
    )
    .unwrap();
    let cases = [
        (Method::SpielAg, &m),
        (Method::SpielMa, &m),
        (Method::Lora, &m),
        (Method::Full, &m),
        (Method::SpielAg, &nf4),
    ];
    for (i, (method, model)) in cases.into_iter().enumerate() {
        let quantize = if model.model.is_quantized() {
            spiel::model::loader::Quantize::Nf4
        } else {
            spiel::model::loader::Quantize::None
        };
        let metrics = |checkpoint_activations: bool| {
            let out = dir.path().join(format!("{i}-{checkpoint_activations}"));
            let c = TrainConfig {
                checkpoint_activations,
                quantize,
                ..config(method, &out)
            };
            (
                run(model, c, false),
                model.model.load_adapter(&out.join("adapter")).ok(),
            )
        };
        let (plain, plain_adapter) = metrics(false);
        let (ckpt, ckpt_adapter) = metrics(true);
        assert_eq!(plain.len(), ckpt.len());
        let mut compared = 0;
        for (a, b) in plain.iter().zip(&ckpt) {
            for (x, y) in [(a.loss, b.loss), (a.eval_loss, b.eval_loss)] {
                if let (Some(x), Some(y)) = (x, y) {
                    assert!(
                        (x - y).abs() < 1e-5,
                        "{method:?} {quantize:?} step {}: {x} vs {y}",
                        a.step
                    );
                    compared += 1;
                }
            }
        }
        assert!(compared >= 12 + 4, "{method:?}: only {compared} losses compared");
        // The trained deltas agree too (full fine-tuning writes a model, not an adapter).
        if let (Some(p), Some(c)) = (plain_adapter, ckpt_adapter) {
            let (a, b) = (p.to_set(), c.to_set());
            assert!(common::max_abs_diff(&logits(model, &a), &logits(model, &b)) < 1e-4);
        } else {
            assert_eq!(method, Method::Full);
        }
    }
}

/// Over a dense f32 base the trainer adds the sparse values into the base for each update; over a
/// bf16 base it keeps the separate sparse product. With the same weight values (bf16-exact) both
/// give the same losses, and the f32 base is bit for bit as it was after training.
#[test]
fn sparse_deltas_added_into_the_base_train_like_the_separate_product() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_cfg();
    let w = spiel::model::random::random_weights(&cfg, 13, &Device::Cpu).unwrap();
    let p = dir.path().join("bf16.gguf");
    spiel::testkit::synth::write_gguf(&p, &cfg, &w, Format::BF16).unwrap();
    let dense = spiel::model::loader::load(&p, &Device::Cpu).unwrap();
    let mut held = spiel::model::loader::load(&p, &Device::Cpu).unwrap();
    held.model.hold_in_bf16().unwrap();
    let before: Vec<(String, Vec<f32>)> = dense
        .model
        .named_weights()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    for method in [Method::SpielAg, Method::SpielMa] {
        let out = |tag: &str| dir.path().join(format!("{method:?}-{tag}"));
        let a = run(&dense, config(method, &out("f32")), false);
        let b = run(
            &held,
            TrainConfig {
                dtype: spiel::model::loader::Dtype::Bf16,
                ..config(method, &out("bf16"))
            },
            false,
        );
        assert_eq!(a.len(), b.len());
        let mut compared = 0;
        for (x, y) in a.iter().zip(&b) {
            for (u, v) in [(x.loss, y.loss), (x.eval_loss, y.eval_loss)] {
                if let (Some(u), Some(v)) = (u, v) {
                    assert!((u - v).abs() < 1e-5, "{method:?} step {}: {u} vs {v}", x.step);
                    compared += 1;
                }
            }
        }
        assert!(compared >= 12 + 4, "{method:?}: only {compared} losses compared");
    }
    for ((k, was), (_, now)) in before.iter().zip(dense.model.named_weights().unwrap()) {
        assert_eq!(
            was,
            &now.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k} changed"
        );
    }
}

#[test]
fn bf16_activations_train_like_f32_activations() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_cfg();
    let w = spiel::model::random::random_weights(&cfg, 17, &Device::Cpu).unwrap();
    let p = dir.path().join("bf16.gguf");
    spiel::testkit::synth::write_gguf(&p, &cfg, &w, Format::BF16).unwrap();
    // The same bf16-held base computing in f32 (the reference) and in bf16.
    let mut f32_acts = spiel::model::loader::load(&p, &Device::Cpu).unwrap();
    f32_acts.model.hold_in_bf16().unwrap();
    let mut bf16_acts = spiel::model::loader::load(&p, &Device::Cpu).unwrap();
    bf16_acts.model.hold_in_bf16().unwrap();
    bf16_acts.model.compute_in(candle_core::DType::BF16).unwrap();
    assert!(bf16_acts.model.compute_in(candle_core::DType::F16).is_err());
    let mut worst = 0f64;
    for method in [Method::SpielAg, Method::SpielMa, Method::Lora] {
        let out = |tag: &str| dir.path().join(format!("{method:?}-{tag}"));
        let c = |tag: &str| TrainConfig {
            dtype: spiel::model::loader::Dtype::Bf16,
            ..config(method, &out(tag))
        };
        let a = run(&f32_acts, c("f32"), false);
        let b = run(&bf16_acts, c("bf16"), false);
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            for (u, v) in [(x.loss, y.loss), (x.eval_loss, y.eval_loss)] {
                if let (Some(u), Some(v)) = (u, v) {
                    // bf16 keeps 8 significant bits: activations round at ~0.4% each.
                    assert!(
                        (u - v).abs() < 0.02 * u.abs().max(1.0),
                        "{method:?} step {}: {u} vs {v}",
                        x.step
                    );
                    worst = worst.max((u - v).abs());
                    assert_ne!(u, v, "{method:?} step {}: bf16 activations changed nothing", x.step);
                }
            }
        }
        let (first, last) = (b[0].eval_loss.unwrap(), b[12].eval_loss.unwrap());
        assert!(last < first, "bf16 {method:?}: held-out loss {first} -> {last}");
        // The adapter holds f32 values and gives nearly the f32 model's logits.
        let ad = bf16_acts.model.load_adapter(&out("bf16").join("adapter")).unwrap();
        let (l16, l32) = (logits(&bf16_acts, &ad.to_set()), logits(&f32_acts, &ad.to_set()));
        assert_eq!(l16.dtype(), candle_core::DType::F32);
        let scale = l32.abs().unwrap().max_keepdim(1).unwrap().max_keepdim(2).unwrap();
        let scale = scale.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(common::max_abs_diff(&l16, &l32) < 0.05 * scale, "{method:?} logits");
    }
    eprintln!("largest loss difference, bf16 vs f32 activations: {worst}");
    // Checkpointing recomputes the same bf16 forward.
    let plain = run(
        &bf16_acts,
        TrainConfig {
            dtype: spiel::model::loader::Dtype::Bf16,
            ..config(Method::SpielAg, &dir.path().join("p"))
        },
        false,
    );
    let ckpt = run(
        &bf16_acts,
        TrainConfig {
            dtype: spiel::model::loader::Dtype::Bf16,
            checkpoint_activations: true,
            ..config(Method::SpielAg, &dir.path().join("c"))
        },
        false,
    );
    for (x, y) in plain.iter().zip(&ckpt) {
        if let (Some(u), Some(v)) = (x.loss, y.loss) {
            assert!(
                (u - v).abs() < 1e-3 * u.abs().max(1.0),
                "checkpointed step {}: {u} vs {v}",
                x.step
            );
        }
    }
}

/// `initial_mask = "gradient"`: before any update, each module's indices are the top-k of the
/// magnitude of its dense weight gradient summed over the initial micro-batches, here checked
/// against candle's autograd on the dense base (every weight a variable, no adapter at all:
/// the deltas are zero) summed in f64. Entries whose summed gradient ties the k-th within f32
/// rounding may fall either way; every other entry must agree.
#[test]
fn gradient_initial_mask_is_the_top_k_of_the_accumulated_gradient() {
    use spiel::train::config::InitialMask;
    use spiel::train::data;
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let cfg = TrainConfig {
        steps: 1,
        eval_every: 0,
        save_every: 0,
        reselection_steps: Some(8),
        initial_mask: InitialMask::Gradient,
        initial_mask_examples: Some(8),
        ..config(Method::SpielAg, &dir.path().join("run"))
    };
    let convs = conversations(40);
    let (mut t, _) = Trainer::new(cfg.clone(), m.model.clone(), "tiny", &m.tokenizer, &convs).unwrap();
    let random: Vec<Vec<u32>> = t
        .current()
        .1
        .iter()
        .map(|(_, ds)| match &ds[0] {
            spiel::model::adapter::Delta::Sparse(s) => s.indices.to_vec(),
            _ => panic!("sparse"),
        })
        .collect();
    // One update: the mask is chosen before it, and no reselection moves the indices after it.
    t.step().unwrap();
    let (_, set) = t.current();
    // The reference: the same micro-batches (the run's first two), the same loss, f64 sums.
    let (train_c, _) = data::split(&convs, cfg.heldout, cfg.seed).unwrap();
    let (train, _) = data::tokenize_all(&train_c, &m.tokenizer, cfg.max_len).unwrap();
    let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
    let batches = data::epoch_batches(&lengths, cfg.batch_size, cfg.seed, 0);
    assert_eq!(cfg.initial_mask_micro_batches(), 2);
    let mut vars = std::collections::HashMap::new();
    let mut weights = spiel::model::weight::Weights::new();
    for (name, w) in m.model.named_weights().unwrap() {
        let v = candle_core::Var::from_tensor(&w).unwrap();
        weights.insert(name.clone(), v.as_tensor().clone());
        vars.insert(name, v);
    }
    let dense = spiel::model::transformer::Llama::from_weights(m.model.cfg.clone(), weights, &Device::Cpu).unwrap();
    let mut sums: std::collections::HashMap<String, Vec<f64>> = std::collections::HashMap::new();
    for idx in &batches[..2] {
        let refs: Vec<&data::Example> = idx.iter().map(|&i| &train[i]).collect();
        let b = data::make_batch(&refs, m.tokenizer.pad_id, &Device::Cpu).unwrap();
        let h = dense
            .forward_hidden(&b.ids, Some(&b.mask), Grad::Yes, &AdapterSet::none())
            .unwrap();
        let (bs, tt, hid) = h.dims3().unwrap();
        let rows = h
            .reshape((bs * tt, hid))
            .unwrap()
            .index_select(&b.positions, 0)
            .unwrap();
        let grads = dense.head_loss(&rows, &b.targets).unwrap().backward().unwrap();
        for (name, _) in set.iter() {
            let g: Vec<f32> = grads
                .get(vars[&format!("{name}.weight")].as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let s = sums.entry(name.to_string()).or_insert_with(|| vec![0.0; g.len()]);
            s.iter_mut().zip(&g).for_each(|(s, g)| *s += *g as f64);
        }
    }
    let mut checked = 0;
    for ((name, ds), random) in set.iter().zip(&random) {
        let spiel::model::adapter::Delta::Sparse(s) = &ds[0] else {
            panic!()
        };
        let sum = &sums[name];
        let k = s.indices.len();
        let mut order: Vec<usize> = (0..sum.len()).collect();
        order.sort_by(|&a, &b| sum[b].abs().total_cmp(&sum[a].abs()));
        let kth = sum[order[k - 1]].abs();
        let want: std::collections::BTreeSet<u32> = order[..k].iter().map(|&i| i as u32).collect();
        let got: std::collections::BTreeSet<u32> = s.indices.iter().copied().collect();
        for i in want.symmetric_difference(&got) {
            let v = sum[*i as usize].abs();
            assert!(
                (v - kth).abs() <= 1e-4 * kth,
                "{name}: entry {i} (|g| {v}) vs k-th {kth}"
            );
        }
        assert!(
            want.intersection(&got).count() * 100 >= k * 99,
            "{name}: the masks barely overlap"
        );
        assert_ne!(&s.indices.to_vec(), random, "{name}: still the random placeholder mask");
        checked += 1;
    }
    assert_eq!(checked, set.iter().count());
    assert!(checked > 0);
}
