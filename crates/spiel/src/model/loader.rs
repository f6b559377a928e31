//! Loading a model and its tokenizer from either real format, and exporting a loaded model as a
//! Hugging Face directory.
//!
//! - GGUF: tensors are dequantised to f32 and renamed to canonical Hugging Face names; q/k rows
//!   are un-permuted from GGUF's adjacent-pair RoPE layout back to rotate-half, so the model code
//!   has one layout whatever the source.
//! - Hugging Face directory: `config.json`, `model.safetensors` or a sharded
//!   `model.safetensors.index.json`, `tokenizer.json`, optional `tokenizer_config.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::formats::config::ModelConfig;
use crate::formats::fsutil;
use crate::formats::gguf::Gguf;
use crate::formats::tokenizer::Tokenizer;
use crate::kernels::qmatrix::{QFormat, QMatrix};
use crate::kernels::quant::Format;
use crate::model::transformer::Llama;
use crate::model::weight::{QWeights, Weights};
use crate::{Error, Result};

/// A model ready to use: weights, tokenizer, and where it came from.
pub struct LoadedModel {
    /// The transformer.
    pub model: Llama,
    /// Its tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// The file or directory it was loaded from.
    pub source: PathBuf,
}

/// How to hold the projection weights (q, k, v, o, gate, up, down) of a loaded model. Embeddings,
/// norms and the head stay in the model's [`Dtype`] whatever the choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quantize {
    /// Dense f32.
    #[default]
    None,
    /// Keep a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks as loaded (other formats load dense).
    Keep,
    /// NF4 with double-quantised scales, whatever the file's format.
    Nf4,
}

impl std::str::FromStr for Quantize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Quantize> {
        match s {
            "none" => Ok(Quantize::None),
            "keep" => Ok(Quantize::Keep),
            "nf4" => Ok(Quantize::Nf4),
            _ => Err(Error::Invalid(format!("unknown quantisation `{s}` (none, keep, nf4)"))),
        }
    }
}

/// The element type of the frozen base's dense matrices (embeddings, head, and projections not
/// held quantised) and of the activations (`Llama::compute_in`). Adapter values, their
/// gradients and optimizer state are f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dtype {
    /// bf16 where bf16 products beat f32 ones on this CPU and the method is an adapter one,
    /// else f32: see [`Dtype::resolved`].
    Auto,
    /// f32.
    F32,
    /// bf16, widened to f32 a tile at a time inside each product.
    Bf16,
}

impl Dtype {
    /// The name the CLI and configs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Auto => "auto",
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The concrete dtype this one stands for on this CPU, for a full (`full`) or adapter run:
    /// `Auto` becomes bf16 where bf16 products beat f32 ones here ([`bf16_verdict`]) and the
    /// frozen base is what is held in bf16 (adapter methods; full fine-tuning trains its weights
    /// in f32), else f32.
    pub fn resolved(self, full: bool) -> Dtype {
        match self {
            Dtype::Auto => Dtype::auto_choice(bf16_verdict().pays, full),
            d => d,
        }
    }

    /// What `Auto` picks given whether bf16 products pay on this CPU (`bf16_pays`) and whether
    /// the run is full fine-tuning.
    pub fn auto_choice(bf16_pays: bool, full: bool) -> Dtype {
        if bf16_pays && !full {
            Dtype::Bf16
        } else {
            Dtype::F32
        }
    }
}

/// The least ratio of one core's measured AVX-512 BF16 dot peak to its f32 FMA peak at which
/// `--dtype auto` takes bf16 without a tile unit. A bf16 step also halves the bytes the base's
/// products read, but spends passes widening and rounding, so the products must be clearly
/// faster: measured 1.87 on AMD Zen 5 (bf16 step 0.63x f32) and 0.49 on an Intel Xeon whose tile
/// unit is hidden (docs/performance.md).
pub const DOT_PAYS_AT: f64 = 1.3;

/// Whether bf16 products beat f32 ones on this CPU, and why, for `--dtype auto`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bf16Verdict {
    /// bf16 pays: the AMX tile unit, or AVX-512 BF16 dot products at least [`DOT_PAYS_AT`]
    /// times the f32 FMA peak.
    pub pays: bool,
    /// One line saying what was found, for the line a run prints at start.
    pub reason: String,
}

impl Bf16Verdict {
    /// The verdict for a CPU whose bf16 products run on `kernel`; `peaks` measures one core's
    /// (f32 FMA, bf16 dot) GFLOP/s, asked only for the dot kernel.
    pub fn decide(kernel: crate::kernels::bf16mm::Kernel, peaks: impl FnOnce() -> (f64, f64)) -> Bf16Verdict {
        use crate::kernels::bf16mm::Kernel;
        match kernel {
            Kernel::Amx => Bf16Verdict {
                pays: true,
                reason: "this CPU multiplies bf16 on the AMX tile unit".into(),
            },
            Kernel::Dot => {
                let (fma, dot) = peaks();
                let ratio = dot / fma;
                let pays = ratio >= DOT_PAYS_AT;
                Bf16Verdict {
                    pays,
                    reason: format!(
                        "no AMX; one core's AVX-512 BF16 dot peak is {ratio:.2}x its f32 FMA peak ({dot:.0} vs {fma:.0} GFLOP/s), {} the {DOT_PAYS_AT}x at which bf16 pays",
                        if pays { "at or above" } else { "below" }
                    ),
                }
            }
            Kernel::Rounded => Bf16Verdict {
                pays: false,
                reason: "no bf16 products in hardware here (no AMX, no AVX512-BF16)".into(),
            },
        }
    }
}

/// This process's [`Bf16Verdict`], decided once (`SPIEL_NO_AMX` hides the tile unit; the dot
/// peaks take a few milliseconds to measure).
pub fn bf16_verdict() -> &'static Bf16Verdict {
    static VERDICT: std::sync::OnceLock<Bf16Verdict> = std::sync::OnceLock::new();
    VERDICT.get_or_init(|| {
        Bf16Verdict::decide(crate::kernels::bf16mm::kernel(), || {
            let p = crate::kernels::peak::measure(200_000, 5);
            (p.f32_fma, p.bf16_dot.unwrap_or(0.0))
        })
    })
}

impl std::str::FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Dtype> {
        match s {
            "auto" => Ok(Dtype::Auto),
            "f32" => Ok(Dtype::F32),
            "bf16" => Ok(Dtype::Bf16),
            _ => Err(Error::Invalid(format!("unknown dtype `{s}` (auto, f32, bf16)"))),
        }
    }
}

/// Load a model from a GGUF file or a Hugging Face directory, projections in f32.
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_with(path, device, Quantize::None)
}

/// Load a model, holding its projection weights as `quantize` says.
pub fn load_with(path: &Path, device: &Device, quantize: Quantize) -> Result<LoadedModel> {
    if path.is_dir() {
        let mut m = load_hf_dir(path, device)?;
        match quantize {
            Quantize::None => {}
            Quantize::Keep => tracing::warn!(
                "{}: safetensors hold no quantised blocks to keep; the projections stay f32",
                path.display()
            ),
            Quantize::Nf4 => m.model.quantize_linears(QFormat::Nf4)?,
        }
        Ok(m)
    } else if path.exists() {
        load_gguf_with(path, device, quantize)
    } else {
        Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file or directory"),
        ))
    }
}

/// Map a GGUF tensor name to its canonical Hugging Face name.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    let simple = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Map a canonical Hugging Face tensor name to its GGUF name (the inverse of [`gguf_to_hf_name`]).
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    let simple = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
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
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// llama.cpp's q/k row permutation (the inverse of [`unpermute_rope_rows`]): rotate-half row
/// `j * D/2 + i` of a head becomes GGUF row `2*i + j`.
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

/// Undo llama.cpp's q/k row permutation for one head-major matrix (or bias) of `n_heads` heads:
/// GGUF row `2*i + j` of a head holds rotate-half row `j * D/2 + i`.
/// Works on any row layout: f32 values, or the bytes of whole quantised blocks per row.
pub fn unpermute_rope_rows<T: Copy + Default>(data: &[T], n_heads: usize, row_len: usize) -> Vec<T> {
    let rows = data.len() / row_len;
    let d = rows / n_heads;
    let half = d / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                let src = (h * d + 2 * i + j) * row_len;
                let dst = (h * d + j * half + i) * row_len;
                out[dst..dst + row_len].copy_from_slice(&data[src..src + row_len]);
            }
        }
    }
    out
}

/// Load a GGUF file: config, tokenizer and f32 weights.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_gguf_with(path, device, Quantize::None)
}

/// Load a GGUF file, holding the projections as `quantize` says. Each projection is quantised as
/// it is read, so the dense model never exists in memory at once.
pub fn load_gguf_with(path: &Path, device: &Device, quantize: Quantize) -> Result<LoadedModel> {
    let g = Gguf::open(path)?;
    let cfg = ModelConfig::from_gguf(&g)?;
    let tokenizer = Tokenizer::from_gguf(&g)?;
    let mut weights = Weights::new();
    let mut qweights = QWeights::new();
    for info in &g.tensors {
        let Some(name) = gguf_to_hf_name(&info.name) else {
            tracing::debug!("ignoring GGUF tensor {}", info.name);
            continue;
        };
        // Rows are the slowest dimension; a 1-D tensor (a bias) has one element per row.
        let row_len = if info.shape.len() == 1 {
            1
        } else {
            info.shape[info.shape.len() - 1]
        };
        // llama.cpp's converter permutes q/k only for LLaMA-style models (llama, mistral);
        // Qwen2 GGUFs keep the rotate-half layout.
        let permuted = cfg.architecture != "Qwen2ForCausalLM";
        let heads = if name.contains("self_attn.q_proj") {
            Some(cfg.num_heads)
        } else if name.contains("self_attn.k_proj") {
            Some(cfg.num_kv_heads)
        } else {
            None
        }
        .filter(|_| permuted);
        let projection = name.starts_with("model.layers.") && name.ends_with("_proj.weight") && info.shape.len() == 2;
        let block_format = matches!(info.format, Format::Q4_0 | Format::Q4_1 | Format::Q8_0);
        if projection && quantize == Quantize::Keep && block_format {
            let row_bytes = info.format.bytes_for(row_len).unwrap_or(0);
            let mut bytes = g.tensor_bytes(info).to_vec();
            if let Some(h) = heads {
                bytes = unpermute_rope_rows(&bytes, h, row_bytes);
            }
            let q = QMatrix::from_ggml(info.format, bytes, info.shape[0], row_len)
                .map_err(|e| Error::format(path, format!("{name}: {e}")))?;
            qweights.insert(name, q);
            continue;
        }
        let mut data = g.dequantize(info);
        if let Some(h) = heads {
            data = unpermute_rope_rows(&data, h, row_len);
        }
        if projection && quantize == Quantize::Nf4 {
            let q =
                QMatrix::nf4(&data, info.shape[0], row_len).map_err(|e| Error::format(path, format!("{name}: {e}")))?;
            qweights.insert(name, q);
            continue;
        }
        weights.insert(name, Tensor::from_vec(data, info.shape.clone(), device)?);
    }
    if quantize == Quantize::Keep && qweights.is_empty() {
        tracing::warn!(
            "{}: no Q4_0 / Q4_1 / Q8_0 projections to keep; they stay f32",
            path.display()
        );
    }
    let model = Llama::from_parts(cfg, weights, qweights, device).map_err(|e| Error::format(path, e.to_string()))?;
    Ok(LoadedModel {
        model,
        tokenizer,
        source: path.to_path_buf(),
    })
}

/// Read every needed tensor from the safetensors files of a Hugging Face directory.
fn read_safetensors(dir: &Path, device: &Device) -> Result<Weights> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(&index, e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(&index, "field `weight_map` is missing or not an object"))?;
        let mut shards = BTreeSet::new();
        for (tensor, file) in map {
            let f = file
                .as_str()
                .filter(|f| !f.contains('/') && !f.contains('\\') && *f != ".." && !f.is_empty())
                .ok_or_else(|| {
                    Error::format(&index, format!("weight_map entry `{tensor}` is not a plain file name"))
                })?;
            shards.insert(f.to_string());
        }
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else {
        return Err(Error::format(
            dir,
            "no model.safetensors or model.safetensors.index.json in this directory",
        ));
    };
    let mut weights = Weights::new();
    for file in files {
        let f = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
        // SAFETY: read-only map of a file spiel does not modify while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&file, e))?;
        let st = safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::format(&file, format!("safetensors: {e}")))?;
        for (name, view) in st.tensors() {
            let format = match view.dtype() {
                safetensors::Dtype::F32 => Format::F32,
                safetensors::Dtype::F16 => Format::F16,
                safetensors::Dtype::BF16 => Format::BF16,
                other => {
                    return Err(Error::format(
                        &file,
                        format!("tensor `{name}` has dtype {other:?}; spiel reads F32, F16, BF16"),
                    ))
                }
            };
            let n: usize = view.shape().iter().product();
            let mut data = vec![0f32; n];
            crate::kernels::quant::dequantize(format, view.data(), &mut data);
            weights.insert(name, Tensor::from_vec(data, view.shape(), device)?);
        }
    }
    Ok(weights)
}

/// Load a Hugging Face model directory.
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let weights = read_safetensors(dir, device)?;
    let model = Llama::from_weights(cfg, weights, device).map_err(|e| Error::format(dir, e.to_string()))?;
    Ok(LoadedModel {
        model,
        tokenizer,
        source: dir.to_path_buf(),
    })
}

/// Write `model` and `tokenizer` as a Hugging Face directory (f32 safetensors, rotate-half q/k;
/// config.json and generation_config.json with the tokenizer's bos, eos and pad ids, so
/// `generate` stops at the end of a turn), atomically: `out` appears complete or not at all.
pub fn export_hf(model: &Llama, tokenizer: &Tokenizer, out: &Path) -> Result<()> {
    fsutil::write_dir_atomic(out, |dir| {
        let ids = tokenizer.generation_ids();
        let mut config = model.cfg.to_hf_json();
        config["bos_token_id"] = serde_json::json!(ids.bos);
        config["eos_token_id"] = serde_json::json!(ids.eos);
        config["pad_token_id"] = serde_json::json!(ids.pad);
        let generation = serde_json::json!({
            "bos_token_id": ids.bos,
            // One id where the turn end is the eos token, else all of them (as Llama 3's does).
            "eos_token_id": if ids.stop.len() > 1 { serde_json::json!(ids.stop) } else { serde_json::json!(ids.eos) },
            "pad_token_id": ids.pad,
        });
        let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()));
        fsutil::write_atomic(&dir.join("config.json"), json(&config)?.as_bytes())?;
        fsutil::write_atomic(&dir.join("generation_config.json"), json(&generation)?.as_bytes())?;
        fsutil::write_atomic(&dir.join("tokenizer.json"), tokenizer.to_json()?.as_bytes())?;
        let tc = serde_json::to_string_pretty(&tokenizer.config_json()).map_err(|e| Error::Invalid(e.to_string()))?;
        fsutil::write_atomic(&dir.join("tokenizer_config.json"), tc.as_bytes())?;
        write_safetensors(&dir.join("model.safetensors"), &model.named_weights()?)
    })
}

/// Write named f32 tensors as one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut raw = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        raw.push((name.clone(), safetensors::Dtype::F32, t.dims().to_vec(), bytes));
    }
    fsutil::write_atomic(path, &crate::formats::safetensors::serialize(&raw)?)
}

#[cfg(test)]
mod tests {
    use super::{Bf16Verdict, Dtype, DOT_PAYS_AT};
    use crate::kernels::bf16mm::Kernel;

    #[test]
    fn bf16_pays_on_the_tile_unit_and_on_dot_products_clearly_faster_than_f32() {
        let unasked = || -> (f64, f64) { panic!("peaks measured without the dot kernel") };
        assert!(Bf16Verdict::decide(Kernel::Amx, unasked).pays);
        assert!(!Bf16Verdict::decide(Kernel::Rounded, unasked).pays);
        // The measured ratios of docs/performance.md: AMD Zen 5 and an Intel Xeon without AMX.
        let zen5 = Bf16Verdict::decide(Kernel::Dot, || (270.2, 504.9));
        assert!(zen5.pays && zen5.reason.contains("1.87x"), "{}", zen5.reason);
        let xeon = Bf16Verdict::decide(Kernel::Dot, || (200.0, 98.0));
        assert!(!xeon.pays && xeon.reason.contains("0.49x"), "{}", xeon.reason);
        assert!(Bf16Verdict::decide(Kernel::Dot, || (100.0, 100.0 * DOT_PAYS_AT)).pays);
        assert!(!Bf16Verdict::decide(Kernel::Dot, || (100.0, 100.0 * DOT_PAYS_AT - 0.1)).pays);
    }

    #[test]
    fn auto_dtype_is_bf16_only_for_adapter_runs_where_bf16_pays() {
        assert_eq!(Dtype::auto_choice(true, false), Dtype::Bf16);
        assert_eq!(Dtype::auto_choice(true, true), Dtype::F32);
        assert_eq!(Dtype::auto_choice(false, false), Dtype::F32);
        assert_eq!(Dtype::auto_choice(false, true), Dtype::F32);
        // Concrete dtypes stay as they are; `auto` never survives resolution.
        assert_eq!(Dtype::Bf16.resolved(false), Dtype::Bf16);
        assert_eq!(Dtype::F32.resolved(false), Dtype::F32);
        assert_ne!(Dtype::Auto.resolved(false), Dtype::Auto);
        assert_eq!(Dtype::Auto.resolved(true), Dtype::F32);
        for d in [Dtype::Auto, Dtype::F32, Dtype::Bf16] {
            assert_eq!(d.as_str().parse::<Dtype>().unwrap(), d);
        }
        assert!("fp16"
            .parse::<Dtype>()
            .unwrap_err()
            .to_string()
            .contains("auto, f32, bf16"));
    }
}
