//! Bad input gives a one-line error that names the problem, never a panic.

mod common;

use spiel::model::adapter::AdapterSet;

use std::path::Path;

use candle_core::Device;
use spiel::formats::gguf::Value;
use spiel::kernels::quant::Format;
use spiel::model::random::random_weights;

fn load_err(path: &Path) -> String {
    match spiel::model::loader::load(path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line error: {msg}");
            msg
        }
    }
}

fn tiny_gguf(dir: &Path) -> std::path::PathBuf {
    let cfg = common::tiny_cfg();
    let w = random_weights(&cfg, 1, &Device::Cpu).unwrap();
    let p = dir.join("tiny.gguf");
    spiel::testkit::synth::write_gguf(&p, &cfg, &w, Format::F32).unwrap();
    p
}

#[test]
fn truncated_gguf_is_reported_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(tiny_gguf(dir.path())).unwrap();
    let cut = dir.path().join("cut.gguf");
    // Cut inside the magic, the header, the metadata, the tensor table and the data.
    for len in [0, 3, 10, 30, 200, 3000, good.len() / 2, good.len() - 1] {
        std::fs::write(&cut, &good[..len]).unwrap();
        let msg = load_err(&cut);
        assert!(
            msg.contains("cut.gguf") && (msg.contains("truncated") || msg.contains("more than the file")),
            "len {len}: {msg}"
        );
    }
}

#[test]
fn corrupted_gguf_headers_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(tiny_gguf(dir.path())).unwrap();
    let p = dir.path().join("bad.gguf");
    let mut bad = good.clone();
    bad[0] = b'X';
    std::fs::write(&p, &bad).unwrap();
    assert!(load_err(&p).contains("bad magic"));
    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&p, &bad).unwrap();
    assert!(load_err(&p).contains("unsupported GGUF version 99"));
    // A tensor count that would need terabytes.
    let mut bad = good.clone();
    bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &bad).unwrap();
    assert!(load_err(&p).contains("more than the file holds"));
    // The first key's length claims far more bytes than exist.
    let mut bad = good;
    bad[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&p, &bad).unwrap();
    assert!(load_err(&p).contains("truncated"));
}

#[test]
fn unsupported_tensor_type_and_architecture_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q4k.gguf");
    // Hand-write a GGUF whose tensor claims type 12 (Q4_K): patch the type field of a valid file.
    let meta = vec![("general.architecture".to_string(), Value::Str("llama".into()))];
    let tensors = vec![(
        "token_embd.weight".to_string(),
        vec![2, 32],
        Format::F32,
        vec![0u8; 256],
    )];
    spiel::formats::gguf::write(&p, &meta, &tensors).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let type_at = at + 4 + 2 * 8; // n_dims, two dims
    bytes[type_at..type_at + 4].copy_from_slice(&12u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let msg = load_err(&p);
    assert!(msg.contains("unsupported tensor type Q4_K"), "{msg}");

    let p = dir.path().join("gpt2.gguf");
    let meta = vec![("general.architecture".to_string(), Value::Str("gpt2".into()))];
    spiel::formats::gguf::write(&p, &meta, &[]).unwrap();
    assert!(load_err(&p).contains("unsupported GGUF architecture `gpt2`"));
}

fn tiny_hf_dir(dir: &Path) -> std::path::PathBuf {
    let m = spiel::model::loader::load(&tiny_gguf(dir), &Device::Cpu).unwrap();
    let out = dir.join("hf");
    spiel::model::loader::export_hf(&m.model, &m.tokenizer, &out).unwrap();
    out
}

#[test]
fn bad_config_json_is_reported_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_hf_dir(dir.path());
    let cfg_path = hf.join("config.json");
    let good: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();

    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg_path, missing.to_string()).unwrap();
    let msg = load_err(&hf);
    assert!(
        msg.contains("config.json") && msg.contains("missing field `hidden_size`"),
        "{msg}"
    );

    let mut arch = good.clone();
    arch["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&cfg_path, arch.to_string()).unwrap();
    let msg = load_err(&hf);
    assert!(msg.contains("unsupported architecture `GPT2LMHeadModel`"), "{msg}");

    std::fs::write(&cfg_path, "{ not json").unwrap();
    assert!(load_err(&hf).contains("config.json"));
}

#[test]
fn bad_safetensors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_hf_dir(dir.path());
    let st = hf.join("model.safetensors");
    let good = std::fs::read(&st).unwrap();
    for len in [0, 5, 100, good.len() / 2, good.len() - 1] {
        std::fs::write(&st, &good[..len]).unwrap();
        let msg = load_err(&hf);
        assert!(
            msg.contains("model.safetensors") && msg.contains("safetensors"),
            "len {len}: {msg}"
        );
    }
    // A header length that claims more than the file.
    let mut bad = good.clone();
    bad[0..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&st, &bad).unwrap();
    assert!(load_err(&hf).contains("model.safetensors"));
    // A missing tensor is named.
    std::fs::write(&st, &good).unwrap();
    let m = spiel::model::loader::load(&hf, &Device::Cpu).unwrap();
    let kept: Vec<_> = m
        .model
        .named_weights()
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !n.contains("layers.1.mlp.up_proj"))
        .collect();
    spiel::model::loader::write_safetensors(&st, &kept).unwrap();
    let msg = load_err(&hf);
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn empty_prompt_and_text_are_rejected() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let m = spiel::model::loader::load(&tiny_gguf(dir.path()), &dev).unwrap();
    let opts = spiel::tasks::generate::GenerateOptions {
        max_new_tokens: 4,
        temperature: 0.0,
        seed: 0,
        stop_strings: Vec::new(),
    };
    let e =
        spiel::tasks::generate::generate(&m.model, &AdapterSet::none(), &m.tokenizer, &[], &opts, |_| {}).unwrap_err();
    assert!(e.to_string().contains("prompt is empty"));
    let e = spiel::tasks::score::score(&m.model, &AdapterSet::none(), &m.tokenizer, "", 5).unwrap_err();
    assert!(e.to_string().contains("empty"));
}
