//! What Hugging Face tools read from spiel's files, checked without Python: an exported model's
//! config.json and generation_config.json name the token that ends a chat turn (so `generate`
//! stops), its floats parse back to the model's values, its tokenizer.json and safetensors take
//! the forms older releases read; sparse adapters carry the paper fork's fields and round-trip
//! through PEFT's SHiRA format exactly. (`bench/peers/interop.py` loads the same files in
//! transformers and PEFT.)

mod common;

use candle_core::{Device, Tensor};
use serde_json::Value;
use spiel::formats::tokenizer::Message;
use spiel::kernels::quant::Format;
use spiel::model::adapter::{Adapter, Delta, Method};
use spiel::model::loader::{self, LoadedModel};
use spiel::model::peft;
use spiel::train::config::{BudgetSplit, TrainConfig};
use spiel::train::data::Conversation;

fn tiny(dir: &std::path::Path) -> LoadedModel {
    let cfg = common::tiny_cfg();
    let w = spiel::model::random::random_weights(&cfg, 5, &Device::Cpu).unwrap();
    let p = dir.join("tiny.gguf");
    spiel::testkit::synth::write_gguf(&p, &cfg, &w, Format::F32).unwrap();
    loader::load(&p, &Device::Cpu).unwrap()
}

fn read_json(p: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The checks every exported directory must pass, for the tiny and the real model alike.
fn check_export(m: &LoadedModel, out: &std::path::Path) {
    loader::export_hf(&m.model, &m.tokenizer, out).unwrap();
    let config = read_json(&out.join("config.json"));
    let generation = read_json(&out.join("generation_config.json"));
    // The chat template (ChatML here) ends a turn with <|im_end|>: that is generation's end.
    let im_end = m.tokenizer.token_to_id("<|im_end|>").expect("ChatML end token") as u64;
    assert_eq!(config["eos_token_id"].as_u64(), Some(im_end), "config.json: {config}");
    let gen_eos = match &generation["eos_token_id"] {
        Value::Array(ids) => ids[0].as_u64(),
        v => v.as_u64(),
    };
    assert_eq!(gen_eos, Some(im_end), "generation_config.json: {generation}");
    assert_eq!(config["pad_token_id"].as_u64(), Some(m.tokenizer.pad_id as u64));
    assert_eq!(generation["pad_token_id"], config["pad_token_id"]);
    assert_eq!(config["bos_token_id"].as_u64(), m.tokenizer.bos_id.map(u64::from));
    // Floats parse back to the model's values exactly, and in their shortest form.
    assert_eq!(config["rms_norm_eps"].as_f64(), Some(m.model.cfg.rms_norm_eps));
    assert_eq!(config["rope_theta"].as_f64(), Some(m.model.cfg.rope_theta));
    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    let eps = text
        .split("\"rms_norm_eps\": ")
        .nth(1)
        .and_then(|t| t.split([',', '\n']).next())
        .unwrap();
    assert!(eps == "0.00001" || eps == "1e-5", "rms_norm_eps written as {eps}");
    // tokenizer.json: merges as "a b" strings (tokenizers < 0.20 read only those).
    let tok = read_json(&out.join("tokenizer.json"));
    let merges = tok["model"]["merges"].as_array().expect("merges");
    assert!(
        !merges.is_empty()
            && merges
                .iter()
                .all(|m| m.as_str().is_some_and(|s| s.split(' ').count() == 2))
    );
    // model.safetensors: PyTorch's format tag in the header (transformers 4.x requires it).
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    // And spiel reads it all back as the same model: config (hash included) and tokenizer.
    let back = loader::load(out, &Device::Cpu).unwrap();
    assert_eq!(back.model.cfg, m.model.cfg);
    assert_eq!(back.model.cfg.fingerprint(), m.model.cfg.fingerprint());
    let sample = m
        .tokenizer
        .apply_chat_template(&[Message::new("user", "What is 12 + 7? Think: 1 2 3.")], true)
        .unwrap();
    assert_eq!(
        back.tokenizer.encode(&sample).unwrap(),
        m.tokenizer.encode(&sample).unwrap()
    );
    assert_eq!(back.tokenizer.generation_ids(), m.tokenizer.generation_ids());
}

#[test]
fn exported_tiny_model_names_the_turn_end_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    check_export(&m, &dir.path().join("hf"));
}

#[test]
fn exported_smollm2_stops_at_im_end() {
    let Some(m) = common::smollm() else { return };
    let dir = tempfile::tempdir().unwrap();
    check_export(&m, &dir.path().join("hf"));
    // The Hugging Face checkpoint of SmolLM2-135M-Instruct: bos 1, eos 2, pad 2.
    let config = read_json(&dir.path().join("hf/config.json"));
    assert_eq!(
        (config["bos_token_id"].as_u64(), config["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );
}

/// A sparse adapter trained on the tiny model with `budget_split`.
fn train_sparse(m: &LoadedModel, out: &std::path::Path, split: BudgetSplit) -> Adapter {
    let convs: Vec<Conversation> = (0..24)
        .map(|i| Conversation {
            messages: vec![
                Message::new("user", &format!("count to {}", i % 5)),
                Message::new("assistant", &format!("{} {} {}", i, i + 1, i + 2)),
            ],
            line: i + 1,
        })
        .collect();
    let cfg = TrainConfig {
        method: Method::SpielAg,
        out: out.to_path_buf(),
        steps: 3,
        batch_size: 4,
        max_len: 48,
        reselection_steps: Some(2),
        accumulation_steps: Some(1),
        lr: Some(1e-2),
        heldout: 4,
        eval_every: 0,
        save_every: 0,
        lora_equivalent_rank: 2,
        budget_split: split,
        ..TrainConfig::default()
    };
    let (mut t, stats) =
        spiel::train::trainer::Trainer::new(cfg, m.model.clone(), "tiny.gguf", &m.tokenizer, &convs).unwrap();
    spiel::train::run::run(&mut t, &m.tokenizer, &stats, false, |_| {
        spiel::train::run::Flow::Continue
    })
    .unwrap();
    m.model.load_adapter(&out.join("adapter")).unwrap()
}

#[test]
fn sparse_adapter_round_trips_through_peft_shira_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let a = train_sparse(&m, &dir.path().join("run"), BudgetSplit::Lora);
    // The paper's fork reads these beside spiel's own fields.
    let cfg = read_json(&dir.path().join("run/adapter/adapter_config.json"));
    assert_eq!(cfg["peft_type"], "SFT");
    assert_eq!(cfg["num_deltas"], cfg["module_counts"]);
    assert!(cfg["num_deltas"]["model.layers.0.self_attn.q_proj"].as_u64().is_some());
    // budget_split = "lora": r * (in + out) per module.
    for (name, d) in &a.deltas {
        let Delta::Sparse(s) = d else { panic!("sparse") };
        assert_eq!(s.indices.len(), 2 * (s.shape.0 + s.shape.1), "{name}");
    }
    let out = dir.path().join("shira");
    peft::export_peft(&a, &out).unwrap();
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!((cfg["peft_type"].as_str(), cfg["r"].as_u64()), (Some("SHIRA"), Some(2)));
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    let w = st.tensor(&format!("{q}.shira_weight")).unwrap();
    let ix = st.tensor(&format!("{q}.shira_indices")).unwrap();
    assert_eq!(
        (w.dtype(), ix.dtype()),
        (safetensors::Dtype::F32, safetensors::Dtype::I32)
    );
    let Delta::Sparse(s) = &a.deltas["model.layers.0.self_attn.q_proj"] else {
        panic!()
    };
    let k = s.indices.len();
    assert_eq!((w.shape(), ix.shape()), (&[k][..], &[2, k][..]));
    let pairs: Vec<i32> = ix
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (j, &flat) in s.indices.iter().enumerate() {
        let (r, c) = (pairs[j] as u32, pairs[k + j] as u32);
        assert_eq!(r * s.shape.1 as u32 + c, flat, "entry {j}");
    }
    // Read back: the same entries, and the same logits.
    let back = m.model.load_adapter(&out).unwrap();
    assert_eq!(back.config.method, Method::Shira);
    assert_eq!(back.deltas.len(), a.deltas.len());
    for (name, d) in &a.deltas {
        let (Delta::Sparse(x), Delta::Sparse(y)) = (d, &back.deltas[name]) else {
            panic!()
        };
        assert_eq!(x.indices, y.indices, "{name}");
        assert_eq!(
            x.values.to_vec1::<f32>().unwrap(),
            y.values.to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }
    let ids = Tensor::new(&[[3u32, 40, 41, 42, 7]], &Device::Cpu).unwrap();
    let grad = spiel::model::weight::Grad::No;
    let want = m.model.forward(&ids, None, grad, &a.to_set()).unwrap();
    let got = m.model.forward(&ids, None, grad, &back.to_set()).unwrap();
    assert_eq!(common::max_abs_diff(&want, &got), 0.0);
}

#[test]
fn shira_export_refuses_counts_peft_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    // The default split is by matrix size: counts are not r * (in + out).
    let a = train_sparse(&m, &dir.path().join("run"), BudgetSplit::Size);
    let out = dir.path().join("shira");
    let e = peft::export_peft(&a, &out).unwrap_err().to_string();
    assert!(
        e.contains("budget_split = \"lora\"") && e.contains("module `model.layers."),
        "{e}"
    );
    assert!(!out.exists(), "nothing is written for a refused export");
}
