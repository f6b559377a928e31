//! Synthetic models written as real files: a small byte-level BPE tokenizer and any LLaMA config
//! with given (usually random) weights, stored as a GGUF file the way llama.cpp's converter lays
//! it out. Tests, fuzz seeds and benchmarks use these for shapes and speeds no downloaded file has;
//! everything reads them back through the same loader as a real model.

use std::path::Path;

use crate::formats::config::ModelConfig;
use crate::formats::gguf::{self, Value};
use crate::kernels::quant::{self, Format};
use crate::model::loader::{hf_to_gguf_name, permute_rope_rows};
use crate::model::weight::Weights;
use crate::{Error, Result};

/// Vocabulary size of [`byte_level_tokenizer`]: 3 ChatML specials, 256 bytes, 3 merges.
pub const BYTE_LEVEL_VOCAB: usize = 262;

/// GPT-2's byte-to-unicode map: the printable stand-in for each byte in byte-level BPE vocabularies.
pub fn byte_to_unicode() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('?')
        };
    }
    out
}

/// GGUF tokenizer metadata for a tiny byte-level BPE: `<|endoftext|>`, `<|im_start|>`,
/// `<|im_end|>`, then the 256 bytes, then merged tokens for " t", "he" and " the".
pub fn byte_level_tokenizer() -> Vec<(String, Value)> {
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

/// The `llama.*` GGUF metadata describing `cfg`.
pub fn llama_metadata(cfg: &ModelConfig) -> Vec<(String, Value)> {
    let u = |k: &str, v: usize| (format!("llama.{k}"), Value::U64(v as u64));
    vec![
        ("general.architecture".into(), Value::Str("llama".into())),
        u("block_count", cfg.num_layers),
        u("context_length", cfg.max_position_embeddings),
        u("embedding_length", cfg.hidden_size),
        u("feed_forward_length", cfg.intermediate_size),
        u("attention.head_count", cfg.num_heads),
        u("attention.head_count_kv", cfg.num_kv_heads),
        u("rope.dimension_count", cfg.head_dim),
        ("llama.rope.freq_base".into(), Value::F64(cfg.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F64(cfg.rms_norm_eps),
        ),
        u("vocab_size", cfg.vocab_size),
    ]
}

/// Write `weights` (canonical Hugging Face names and layout) as a GGUF file with the byte-level
/// tokenizer: GGUF names, q/k rows permuted as llama.cpp does, f32 norms and biases, `format`
/// for the matrices.
pub fn write_gguf(path: &Path, cfg: &ModelConfig, weights: &Weights, format: Format) -> Result<()> {
    let mut meta = llama_metadata(cfg);
    meta.extend(byte_level_tokenizer());
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = &weights[name];
        let mut data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let shape = t.dims().to_vec();
        let gguf_name =
            hf_to_gguf_name(name).ok_or_else(|| Error::Invalid(format!("no GGUF name for tensor `{name}`")))?;
        let row_len = if shape.len() == 1 { 1 } else { shape[1] };
        if name.contains("q_proj.") {
            data = permute_rope_rows(&data, cfg.num_heads, row_len);
        } else if name.contains("k_proj.") {
            data = permute_rope_rows(&data, cfg.num_kv_heads, row_len);
        }
        let fmt = if shape.len() == 2 { format } else { Format::F32 };
        let bytes = quant::quantize(fmt, &data)
            .ok_or_else(|| Error::Invalid(format!("`{name}` ({} values) is not whole {fmt:?} blocks", data.len())))?;
        tensors.push((gguf_name, shape, fmt, bytes));
    }
    gguf::write(path, &meta, &tensors)
}
