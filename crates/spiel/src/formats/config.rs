//! The resolved configuration of a LLaMA-family model, read from GGUF metadata or from a
//! Hugging Face `config.json` (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::formats::gguf::Gguf;
use crate::{Error, Result};

/// Architectures whose weights and forward pass spiel's transformer reproduces.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// Everything the transformer needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Hugging Face architecture name, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// Width of the residual stream (576 for SmolLM2-135M).
    pub hidden_size: usize,
    /// Width of the SwiGLU hidden layer (1536).
    pub intermediate_size: usize,
    /// Number of transformer blocks (30).
    pub num_layers: usize,
    /// Query heads (9).
    pub num_heads: usize,
    /// Key/value heads, fewer than query heads under GQA (3).
    pub num_kv_heads: usize,
    /// Per-head width (64).
    pub head_dim: usize,
    /// Vocabulary size (49152).
    pub vocab_size: usize,
    /// RoPE base frequency (100000).
    pub rope_theta: f64,
    /// RMSNorm epsilon (1e-5).
    pub rms_norm_eps: f64,
    /// Longest context the model was trained for (8192).
    pub max_position_embeddings: usize,
    /// Whether lm_head shares the token-embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q, k and v projections carry a bias (Qwen2).
    pub attention_bias: bool,
}

/// `config.json` as Hugging Face writes it; optional fields get the library defaults.
#[derive(Debug, Deserialize)]
struct HfConfig {
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rope_theta: Option<f64>,
    rms_norm_eps: f64,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
}

impl ModelConfig {
    /// Read a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        let arch = raw
            .architectures
            .first()
            .ok_or_else(|| Error::format(path, "field `architectures` is empty"))?
            .clone();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(Error::format(
                path,
                format!(
                    "unsupported architecture `{arch}` (supported: {})",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            ));
        }
        if let Some(s) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(Error::format(
                path,
                format!("field `rope_scaling` ({s}) is not supported yet"),
            ));
        }
        let cfg = ModelConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            vocab_size: raw.vocab_size,
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: raw.rms_norm_eps,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == "Qwen2ForCausalLM"),
            architecture: arch,
        };
        cfg.validate().map_err(|m| Error::format(path, m))?;
        Ok(cfg)
    }

    /// Read the `llama.*` metadata of a GGUF file.
    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig> {
        let arch = g.get_str("general.architecture")?;
        let architecture = match arch {
            "llama" => "LlamaForCausalLM",
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            other => {
                return Err(Error::format(
                    g.path(),
                    format!("unsupported GGUF architecture `{other}` (supported: llama, mistral, qwen2)"),
                ))
            }
        };
        let k = |s: &str| format!("{arch}.{s}");
        let num_heads = g.get_u64(&k("attention.head_count"))? as usize;
        let hidden_size = g.get_u64(&k("embedding_length"))? as usize;
        let head_dim = match g.get(&k("rope.dimension_count")) {
            Some(_) => g.get_u64(&k("rope.dimension_count"))? as usize,
            None => hidden_size / num_heads.max(1),
        };
        let vocab_size = match g.get(&k("vocab_size")) {
            Some(_) => g.get_u64(&k("vocab_size"))? as usize,
            None => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let cfg = ModelConfig {
            architecture: architecture.to_string(),
            hidden_size,
            intermediate_size: g.get_u64(&k("feed_forward_length"))? as usize,
            num_layers: g.get_u64(&k("block_count"))? as usize,
            num_heads,
            num_kv_heads: match g.get(&k("attention.head_count_kv")) {
                Some(_) => g.get_u64(&k("attention.head_count_kv"))? as usize,
                None => num_heads,
            },
            head_dim,
            vocab_size,
            rope_theta: match g.get(&k("rope.freq_base")) {
                Some(_) => shortest_f32(g.get_f64(&k("rope.freq_base"))?),
                None => 10_000.0,
            },
            rms_norm_eps: shortest_f32(g.get_f64(&k("attention.layer_norm_rms_epsilon"))?),
            max_position_embeddings: g.get_u64(&k("context_length"))? as usize,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            attention_bias: g.tensor("blk.0.attn_q.bias").is_some(),
        };
        cfg.validate().map_err(|m| Error::format(g.path(), m))?;
        Ok(cfg)
    }

    /// Check the invariants the transformer relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("field `{name}` must be positive"));
            }
        }
        // Far beyond any real model, and small enough that every size product fits in a u64:
        // a config cannot make spiel attempt an absurd allocation.
        let limits = [
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_layers", self.num_layers, 1 << 10),
            ("num_heads", self.num_heads, 1 << 10),
            ("num_kv_heads", self.num_kv_heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 14),
            ("vocab_size", self.vocab_size, 1 << 24),
            ("max_position_embeddings", self.max_position_embeddings, 1 << 24),
        ];
        for (name, v, max) in limits {
            if v > max {
                return Err(format!("field `{name}` = {v} is larger than spiel supports ({max})"));
            }
        }
        if self.num_heads * self.head_dim > 1 << 20 {
            return Err(format!(
                "num_heads x head_dim = {} is larger than spiel supports",
                self.num_heads * self.head_dim
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.rope_theta.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
            || self.rms_norm_eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return Err("rope_theta and rms_norm_eps must be positive".into());
        }
        Ok(())
    }

    /// The config.json a Hugging Face loader expects for this model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let model_type = match self.architecture.as_str() {
            "MistralForCausalLM" => "mistral",
            "Qwen2ForCausalLM" => "qwen2",
            _ => "llama",
        };
        serde_json::json!({
            "architectures": [self.architecture],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }

    /// Total parameter count (embeddings, blocks, norms, and an untied head).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h + if self.attention_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * self.intermediate_size;
        let block = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * block + h + head
    }

    /// A short stable hash of the config, used to tie adapters to their base model. Its floats
    /// are hashed at f32 precision, the precision a GGUF file stores them in, so a model and its
    /// Hugging Face export (`1e-5` in config.json, `9.999999747e-6` once widened from GGUF's f32)
    /// hash the same.
    pub fn fingerprint(&self) -> String {
        let at_f32 = |x: f64| (x as f32) as f64;
        ModelConfig {
            rope_theta: at_f32(self.rope_theta),
            rms_norm_eps: at_f32(self.rms_norm_eps),
            ..self.clone()
        }
        .legacy_fingerprint()
    }

    /// The hash as spiel wrote it before [`ModelConfig::fingerprint`] rounded the floats (the
    /// config's own values), still accepted when checking an adapter's base.
    pub fn legacy_fingerprint(&self) -> String {
        use sha2::Digest;
        let json = serde_json::to_string(self).unwrap_or_default();
        let digest = sha2::Sha256::digest(json.as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// A float GGUF stored as f32, as the shortest decimal that rounds to that f32 (`1e-5`, not the
/// widened `9.999999747378752e-6`): the value the model's authors wrote, and the one a Hugging
/// Face config.json of the same model holds. A value that is not an f32 is returned as it is.
pub fn shortest_f32(x: f64) -> f64 {
    let f = x as f32;
    if f as f64 != x {
        return x;
    }
    f.to_string().parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_floats_take_their_shortest_decimal() {
        // GGUF's f32 1e-5, widened, is 9.999999747378752e-6.
        let widened = 1e-5f32 as f64;
        assert_eq!(shortest_f32(widened), 1e-5);
        assert_eq!(shortest_f32(100_000.0), 100_000.0);
        assert_eq!(shortest_f32(1e-6f32 as f64), 1e-6);
        // A value no f32 holds stays as it is.
        assert_eq!(shortest_f32(0.1), 0.1);
        // Every result rounds back to the same f32.
        for x in [1e-5f32, 1e-6, 2.71, 1e-12, 5e5, 123.456] {
            assert_eq!(shortest_f32(x as f64) as f32, x);
        }
    }

    #[test]
    fn hash_is_the_same_at_f32_and_at_the_shortest_decimal() {
        let cfg = ModelConfig {
            architecture: "LlamaForCausalLM".into(),
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            vocab_size: 10,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 32,
            tie_word_embeddings: true,
            attention_bias: false,
        };
        let widened = ModelConfig {
            rms_norm_eps: 1e-5f32 as f64,
            ..cfg.clone()
        };
        assert_eq!(cfg.fingerprint(), widened.fingerprint());
        // The hash spiel wrote before was of the widened value: adapters trained on a GGUF base
        // keep theirs.
        assert_eq!(widened.fingerprint(), widened.legacy_fingerprint());
        assert_ne!(cfg.legacy_fingerprint(), widened.legacy_fingerprint());
        let other = ModelConfig {
            rms_norm_eps: 1e-6,
            ..cfg.clone()
        };
        assert_ne!(other.fingerprint(), cfg.fingerprint());
    }
}
