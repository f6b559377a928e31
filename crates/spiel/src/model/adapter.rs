//! Adapters over a frozen base: sparse deltas (SpIEL) and LoRA. A loaded base model never owns
//! them: every forward pass takes an [`AdapterSet`], so adapters attach and detach per call (or
//! per request, when serving) without touching the base weights. Several adapters on the same
//! module add up.
//!
//! On disk an adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`:
//! sparse deltas as `base_model.model.<module>.sft_delta.{indices,values}` (U32 or I64 indices,
//! sorted; F32 values), LoRA as Hugging Face PEFT names it (`base_model.model.<module>.lora_A.weight`,
//! `lora_B.weight`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::formats::config::ModelConfig;
use crate::kernels::bf16mm::{DeltaPacks, PackCache};
use crate::kernels::qmatrix::Frozen;
use crate::kernels::sparse::{sparse_delta_matmul, WeightGradHook};
use crate::model::weight::Grad;
use crate::{formats::fsutil, Error, Result};

/// One module's sparse delta over an `[out, in]` weight.
#[derive(Clone)]
pub struct SparseDelta {
    /// `(out, in)` of the weight it modifies.
    pub shape: (usize, usize),
    /// Sorted unique flat indices `r * in + c`.
    pub indices: Arc<Vec<u32>>,
    /// Values at those indices, `[K]` f32 (a variable while training).
    pub values: Tensor,
    /// Dense-gradient observer while a SpIEL-AG window is open.
    pub hook: Option<Arc<dyn WeightGradHook>>,
    /// The values are already added into the module's dense base weight (the trainer does this
    /// for one update with [`crate::kernels::sparse::DeltaInBase`]): the forward is then the base product
    /// alone, and this delta only records the value gradient. Never set for a loaded adapter.
    pub in_base: bool,
    /// The base's packed bf16 operands with these values added, kept across training updates
    /// (set by the trainer; used by bf16 products over a frozen base). `None` packs per product.
    pub packs: Option<Arc<DeltaPacks>>,
}

/// One module's LoRA pair: `y += scale * dropout(x) A^T B^T`.
#[derive(Clone)]
pub struct LoraDelta {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout probability on the input (training only).
    pub dropout: f64,
    /// Seed for this forward's dropout mask (set by the trainer per step and module).
    pub dropout_seed: u64,
    /// The base's packed bf16 operands, kept across training updates (set by the trainer; used
    /// by bf16 products over a frozen base). `None` packs per product.
    pub packs: Option<Arc<PackCache>>,
}

/// A trainable or loaded change to one linear layer.
#[derive(Clone)]
pub enum Delta {
    /// SpIEL sparse delta.
    Sparse(SparseDelta),
    /// Low-rank adapter.
    Lora(LoraDelta),
}

impl Delta {
    /// The contribution `[N, out]` of this delta for input rows `x: [N, in]`.
    pub fn apply(&self, x: &Tensor, grad: Grad) -> Result<Tensor> {
        match self {
            Delta::Sparse(s) => {
                let hook = if grad == Grad::Yes { s.hook.clone() } else { None };
                Ok(sparse_delta_matmul(x, &s.values, s.indices.clone(), s.shape, hook)?)
            }
            Delta::Lora(l) => {
                let x = if grad == Grad::Yes && l.dropout > 0.0 {
                    dropout(x, l.dropout, l.dropout_seed)?
                } else {
                    x.clone()
                };
                // A and B are f32 master values, used in the activations' dtype (a no-op for
                // f32; for bf16 their gradients return to f32 through the cast).
                let (a, b) = (l.a.to_dtype(x.dtype())?, l.b.to_dtype(x.dtype())?);
                Ok((x.matmul(&a.t()?)?.matmul(&b.t()?)? * l.scale)?)
            }
        }
    }
}

impl Delta {
    /// `x W^T` plus this delta's product, as one op with one output, for a frozen base `W`
    /// ([`crate::kernels::sparse::SparseBase::Plus`], [`crate::kernels::lora`]).
    pub fn apply_with_base(&self, x: &Tensor, base: &Frozen, grad: Grad) -> Result<Tensor> {
        match self {
            Delta::Sparse(s) => {
                let hook = if grad == Grad::Yes { s.hook.clone() } else { None };
                Ok(crate::kernels::sparse::frozen_plus_delta_matmul(
                    x,
                    base,
                    &s.values,
                    s.indices.clone(),
                    hook,
                    s.packs.clone(),
                )?)
            }
            Delta::Lora(l) => {
                let dropout = (grad == Grad::Yes && l.dropout > 0.0).then_some((l.dropout, l.dropout_seed));
                Ok(crate::kernels::lora::frozen_plus_lora_matmul(
                    x,
                    base,
                    &l.a,
                    &l.b,
                    l.scale,
                    dropout,
                    l.packs.clone(),
                )?)
            }
        }
    }

    /// This delta as a dense `[out, in]` matrix (for merging).
    pub fn dense(&self, shape: (usize, usize)) -> Result<Tensor> {
        match self {
            Delta::Sparse(s) => {
                let mut d = vec![0f32; shape.0 * shape.1];
                for (&i, v) in s.indices.iter().zip(s.values.to_vec1::<f32>()?) {
                    d[i as usize] += v;
                }
                Ok(Tensor::from_vec(d, shape, s.values.device())?)
            }
            Delta::Lora(l) => Ok((l.b.matmul(&l.a)? * l.scale)?),
        }
    }
}

/// Inverted dropout with a seeded mask, so runs and resumes are reproducible.
fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let mask = crate::kernels::lora::dropout_mask(x.elem_count(), p, seed);
    Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?)
}

/// The adapters applied in one forward pass, by canonical module path.
#[derive(Clone, Default)]
pub struct AdapterSet {
    modules: HashMap<String, Vec<Delta>>,
}

impl AdapterSet {
    /// No adapters: the base model.
    pub fn none() -> AdapterSet {
        AdapterSet::default()
    }

    /// Attach `delta` to `module` (added to any already there).
    pub fn add(&mut self, module: &str, delta: Delta) {
        self.modules.entry(module.to_string()).or_default().push(delta);
    }

    /// The deltas on `module`.
    pub fn get(&self, module: &str) -> &[Delta] {
        self.modules.get(module).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every delta of `other` added on top of these.
    pub fn extend(&mut self, other: &AdapterSet) {
        for (m, ds) in &other.modules {
            self.modules.entry(m.clone()).or_default().extend(ds.iter().cloned());
        }
    }

    /// Every module with its deltas, by module path.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Delta])> {
        let mut v: Vec<(&str, &[Delta])> = self.modules.iter().map(|(m, d)| (m.as_str(), d.as_slice())).collect();
        v.sort_unstable_by_key(|e| e.0);
        v.into_iter()
    }

    /// Whether no module has a delta.
    pub fn is_empty(&self) -> bool {
        self.modules.values().all(Vec::is_empty)
    }
}

/// Training method of an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// SpIEL with accumulated-gradient regrowth (AdamW).
    SpielAg,
    /// SpIEL with momentum-approximation regrowth (SM3).
    SpielMa,
    /// LoRA.
    Lora,
    /// Full fine-tuning (saved as a whole model, not an adapter).
    Full,
    /// A SHiRA adapter read from Hugging Face PEFT (sparse deltas at fixed random indices, as
    /// many per module as LoRA of rank `r`); spiel reads, applies and writes these, but does
    /// not train them.
    Shira,
}

impl Method {
    /// The name used on the command line and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::SpielAg => "spiel-ag",
            Method::SpielMa => "spiel-ma",
            Method::Lora => "lora",
            Method::Full => "full",
            Method::Shira => "shira",
        }
    }

    /// Whether this method trains sparse deltas.
    pub fn is_sparse(self) -> bool {
        matches!(self, Method::SpielAg | Method::SpielMa | Method::Shira)
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        Ok(match s {
            "spiel-ag" => Method::SpielAg,
            "spiel-ma" => Method::SpielMa,
            "lora" => Method::Lora,
            "full" => Method::Full,
            "shira" => {
                return Err(Error::Invalid(
                    "method `shira`: spiel reads and writes PEFT's SHiRA adapters but trains sparse deltas with spiel-ag or spiel-ma".into(),
                ))
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown method `{s}` (spiel-ag, spiel-ma, lora, full)"
                )))
            }
        })
    }
}

/// Which base model an adapter belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseModel {
    /// Human name (file or directory name of the base).
    pub name: String,
    /// [`ModelConfig::fingerprint`] of the base.
    pub config_hash: String,
}

/// `adapter_config.json` for both kinds. LoRA adapters also carry PEFT's fields so PEFT loads them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// How it was trained (a PEFT LoRA config without it reads as `lora`).
    #[serde(default = "default_method")]
    pub method: Method,
    /// The base it was trained on; absent in adapters made by other tools (then not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<BaseModel>,
    /// PEFT's record of the base model (name or path), kept for PEFT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    /// Short module names targeted (q_proj, ...).
    pub target_modules: Vec<String>,
    /// Sparse: number of trainable deltas per module (canonical path -> k).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub module_counts: BTreeMap<String, usize>,
    /// Sparse: `[out, in]` of each module's weight.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub module_shapes: BTreeMap<String, [usize; 2]>,
    /// LoRA rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<usize>,
    /// LoRA alpha.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// PEFT's adapter type (`LORA`), present for LoRA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft_type: Option<String>,
    /// PEFT's task type (`CAUSAL_LM`), present for LoRA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    /// PEFT's bias mode (`none`), present for LoRA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<String>,
    /// Training hyperparameters (free-form, for the record).
    #[serde(default)]
    pub hyperparameters: serde_json::Value,
    /// Training summary (steps, final losses, time).
    #[serde(default)]
    pub training: serde_json::Value,
}

fn default_method() -> Method {
    Method::Lora
}

/// A loaded adapter: config plus tensors, detached from any model.
#[derive(Clone)]
pub struct Adapter {
    /// Its config.
    pub config: AdapterConfig,
    /// Module path -> delta.
    pub deltas: BTreeMap<String, Delta>,
}

pub(crate) const PREFIX: &str = "base_model.model.";

impl Adapter {
    /// The deltas as a set for a forward pass.
    pub fn to_set(&self) -> AdapterSet {
        let mut s = AdapterSet::none();
        for (m, d) in &self.deltas {
            s.add(m, d.clone());
        }
        s
    }

    /// Write `adapter_config.json` and `adapter_model.safetensors` into `dir`, atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (m, d) in &self.deltas {
            match d {
                Delta::Sparse(s) => {
                    let vals: Vec<f32> = s.values.to_vec1()?;
                    tensors.push((
                        format!("{PREFIX}{m}.sft_delta.indices"),
                        safetensors::Dtype::U32,
                        vec![s.indices.len()],
                        s.indices.iter().flat_map(|i| i.to_le_bytes()).collect(),
                    ));
                    tensors.push((
                        format!("{PREFIX}{m}.sft_delta.values"),
                        safetensors::Dtype::F32,
                        vec![vals.len()],
                        vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ));
                }
                Delta::Lora(l) => {
                    for (name, t) in [("lora_A", &l.a), ("lora_B", &l.b)] {
                        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                        tensors.push((
                            format!("{PREFIX}{m}.{name}.weight"),
                            safetensors::Dtype::F32,
                            t.dims().to_vec(),
                            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                        ));
                    }
                }
            }
        }
        let bytes = crate::formats::safetensors::serialize(&tensors)?;
        let mut json = serde_json::to_value(&self.config).map_err(|e| Error::Invalid(e.to_string()))?;
        if self.config.method.is_sparse() && self.config.method != Method::Shira {
            // The fields the paper's PEFT fork (`SftConfig`) reads, beside spiel's own.
            json["peft_type"] = "SFT".into();
            json["num_deltas"] = serde_json::json!(self.config.module_counts);
        }
        let config = serde_json::to_string_pretty(&json).map_err(|e| Error::Invalid(e.to_string()))?;
        fsutil::write_dir_atomic(dir, |tmp| {
            fsutil::write_atomic(&tmp.join("adapter_config.json"), config.as_bytes())?;
            fsutil::write_atomic(&tmp.join("adapter_model.safetensors"), &bytes)
        })
    }

    /// Read an adapter directory and check it against a base model (its config and the `(out,
    /// in)` shape of each of its projections by module name): same base (config hash), every
    /// module present with the right shape, indices sorted, unique and in range.
    pub fn load(dir: &Path, base: &ModelConfig, module_shapes: &HashMap<String, (usize, usize)>) -> Result<Adapter> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, e.to_string()))?;
        let mut config: AdapterConfig =
            serde_json::from_value(raw.clone()).map_err(|e| Error::format(&cfg_path, e.to_string()))?;
        // PEFT's own SHiRA config names no spiel method.
        if raw.get("method").is_none() && config.peft_type.as_deref() == Some("SHIRA") {
            config.method = Method::Shira;
        }
        check_base(&config, base, &cfg_path)?;
        let st_path = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&st_path).map_err(|e| Error::io(&st_path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(&st_path, format!("safetensors: {e}")))?;
        let shapes = module_shapes;
        let bad = |m: String| Error::format(&st_path, m);
        let mut deltas = BTreeMap::new();
        let mut modules: Vec<String> = st
            .names()
            .iter()
            .filter_map(|n| n.strip_prefix(PREFIX))
            .filter_map(|n| {
                n.strip_suffix(".sft_delta.values")
                    .or_else(|| n.strip_suffix(".lora_A.weight"))
                    .or_else(|| n.strip_suffix(".shira_weight"))
            })
            .map(str::to_string)
            .collect();
        modules.sort();
        for m in modules {
            let &(out, inp) = shapes
                .get(&m)
                .ok_or_else(|| bad(format!("module `{m}` does not exist in the base model")))?;
            let delta = if config.method == Method::Lora {
                let a = f32_tensor(&st, &format!("{PREFIX}{m}.lora_A.weight"), &st_path)?;
                let b = f32_tensor(&st, &format!("{PREFIX}{m}.lora_B.weight"), &st_path)?;
                let r = a.0.first().copied().unwrap_or(0);
                if a.0 != [r, inp] || b.0 != [out, r] {
                    return Err(bad(format!(
                        "`{m}`: lora_A {:?} / lora_B {:?} do not fit a [{out}, {inp}] weight",
                        a.0, b.0
                    )));
                }
                if config.r.is_some_and(|cr| cr != r) {
                    return Err(bad(format!(
                        "`{m}`: adapter_config.json says rank {}, the tensors have rank {r}",
                        config.r.unwrap_or(0)
                    )));
                }
                if !config.lora_alpha.unwrap_or(1.0).is_finite() {
                    return Err(Error::format(&cfg_path, "field `lora_alpha` is not a finite number"));
                }
                let rank = r.max(1) as f64;
                Delta::Lora(LoraDelta {
                    a: Tensor::from_vec(a.1, (r, inp), &Device::Cpu)?,
                    b: Tensor::from_vec(b.1, (out, r), &Device::Cpu)?,
                    scale: config.lora_alpha.unwrap_or(rank) / rank,
                    dropout: 0.0,
                    dropout_seed: 0,
                    packs: None,
                })
            } else {
                let (vshape, values, indices) = if st.tensor(&format!("{PREFIX}{m}.shira_weight")).is_ok() {
                    let (vshape, values) = f32_tensor(&st, &format!("{PREFIX}{m}.shira_weight"), &st_path)?;
                    let name = format!("{PREFIX}{m}.shira_indices");
                    let (values, indices) = read_shira_entries(&st, &name, &st_path, (out, inp), values)?;
                    (vshape, values, indices)
                } else {
                    let (vshape, values) = f32_tensor(&st, &format!("{PREFIX}{m}.sft_delta.values"), &st_path)?;
                    let indices = read_indices(&st, &format!("{PREFIX}{m}.sft_delta.indices"), &st_path)?;
                    (vshape, values, indices)
                };
                if vshape.len() != 1 || values.len() != indices.len() {
                    return Err(bad(format!(
                        "`{m}`: {} values for {} indices",
                        values.len(),
                        indices.len()
                    )));
                }
                let numel = (out * inp) as u64;
                for w in indices.windows(2) {
                    if w[0] >= w[1] {
                        return Err(bad(format!(
                            "`{m}`: indices are not sorted and unique ({} then {})",
                            w[0], w[1]
                        )));
                    }
                }
                if let Some(&last) = indices.last() {
                    if last >= numel {
                        return Err(bad(format!(
                            "`{m}`: index {last} is out of range for a [{out}, {inp}] weight"
                        )));
                    }
                }
                if let Some(&k) = config.module_counts.get(&m) {
                    if k != indices.len() {
                        return Err(bad(format!(
                            "`{m}`: config says {k} entries, file has {}",
                            indices.len()
                        )));
                    }
                }
                let n = values.len();
                Delta::Sparse(SparseDelta {
                    shape: (out, inp),
                    indices: Arc::new(indices.into_iter().map(|i| i as u32).collect()),
                    values: Tensor::from_vec(values, n, &Device::Cpu)?,
                    hook: None,
                    in_base: false,
                    packs: None,
                })
            };
            deltas.insert(m, delta);
        }
        Ok(Adapter { config, deltas })
    }
}

/// Refuse an adapter trained on a different base model.
pub fn check_base(config: &AdapterConfig, base: &ModelConfig, path: &Path) -> Result<()> {
    let hash = base.fingerprint();
    let Some(trained_on) = &config.base_model else {
        tracing::warn!(
            "{}: no base-model record (not made by spiel); shapes are still checked",
            path.display()
        );
        return Ok(());
    };
    // Adapters written before the hash rounded its floats carry the config's own values' hash.
    if trained_on.config_hash != hash && trained_on.config_hash != base.legacy_fingerprint() {
        return Err(Error::format(
            path,
            format!(
                "adapter was trained on base model `{}` (config hash {}), but the loaded model has config hash {hash}; load it with the model it was trained on",
                trained_on.name, trained_on.config_hash
            ),
        ));
    }
    Ok(())
}

fn f32_tensor(st: &safetensors::SafeTensors, name: &str, path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let v = st
        .tensor(name)
        .map_err(|_| Error::format(path, format!("tensor `{name}` is missing")))?;
    if v.dtype() != safetensors::Dtype::F32 {
        return Err(Error::format(
            path,
            format!("tensor `{name}` has dtype {:?}, expected F32", v.dtype()),
        ));
    }
    let data = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((v.shape().to_vec(), data))
}

/// A SHiRA module's entries: `indices` is `[2, K]` (rows, then columns; I32 or I64 as PEFT
/// writes them, F32 as it writes them on Windows), turned into sorted flat indices `r * in + c`
/// with `values` reordered alongside. A row or column out of range is an error naming it.
fn read_shira_entries(
    st: &safetensors::SafeTensors,
    name: &str,
    path: &Path,
    (out, inp): (usize, usize),
    values: Vec<f32>,
) -> Result<(Vec<f32>, Vec<u64>)> {
    let v = st
        .tensor(name)
        .map_err(|_| Error::format(path, format!("tensor `{name}` is missing")))?;
    let k = values.len();
    if v.shape() != [2, k] {
        return Err(Error::format(
            path,
            format!(
                "tensor `{name}` has shape {:?}, expected [2, {k}] (rows, columns)",
                v.shape()
            ),
        ));
    }
    let d = v.data();
    let ints: Vec<i64> = match v.dtype() {
        safetensors::Dtype::I32 => d
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        safetensors::Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        safetensors::Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        other => {
            return Err(Error::format(
                path,
                format!("tensor `{name}` has dtype {other:?}, expected I32, I64 or F32"),
            ))
        }
    };
    let mut entries = Vec::with_capacity(k);
    for (j, value) in values.into_iter().enumerate() {
        let (r, c) = (ints[j], ints[k + j]);
        if !(0..out as i64).contains(&r) || !(0..inp as i64).contains(&c) {
            return Err(Error::format(
                path,
                format!("tensor `{name}`: entry {j} at ({r}, {c}) is outside a [{out}, {inp}] weight"),
            ));
        }
        entries.push((r as u64 * inp as u64 + c as u64, value));
    }
    entries.sort_unstable_by_key(|e| e.0);
    Ok(entries.into_iter().map(|(i, v)| (v, i)).unzip())
}

fn read_indices(st: &safetensors::SafeTensors, name: &str, path: &Path) -> Result<Vec<u64>> {
    let v = st
        .tensor(name)
        .map_err(|_| Error::format(path, format!("tensor `{name}` is missing")))?;
    let d = v.data();
    Ok(match v.dtype() {
        safetensors::Dtype::U32 => d
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64)
            .collect(),
        safetensors::Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .map(|i| u64::try_from(i).map_err(|_| Error::format(path, format!("tensor `{name}`: negative index {i}"))))
            .collect::<Result<_>>()?,
        other => {
            return Err(Error::format(
                path,
                format!("tensor `{name}` has dtype {other:?}, expected U32 or I64"),
            ))
        }
    })
}
