//! Adapters in the files stock Hugging Face PEFT reads. LoRA adapters already are PEFT's format
//! ([`Adapter::save`]); a sparse adapter becomes a SHiRA adapter (`peft_type: "SHIRA"`): per
//! module `shira_weight` (the values, F32 `[K]`) and `shira_indices` (I32 `[2, K]`: rows, then
//! columns), with one rank `r` for all modules and exactly `r * (in + out)` entries in each, the
//! count PEFT's SHiRA layer builds. spiel reads SHiRA files back ([`Adapter::load`]).

use std::collections::BTreeSet;
use std::path::Path;

use crate::formats::fsutil;
use crate::model::adapter::{Adapter, Delta, SparseDelta, PREFIX};
use crate::{Error, Result};

/// The one rank `r` with `k = r * (in + out)` in every module of a sparse adapter, or an error
/// naming the first module whose count no such `r` gives (train with `budget_split = "lora"` and
/// `lora_equivalent_rank = r` for counts that fit).
pub fn shira_rank(adapter: &Adapter) -> Result<usize> {
    Ok(sparse_modules(adapter)?.0)
}

/// [`shira_rank`] and every module's sparse delta, by module path.
fn sparse_modules(adapter: &Adapter) -> Result<(usize, Vec<(&String, &SparseDelta)>)> {
    let mut rank = None;
    let mut modules = Vec::with_capacity(adapter.deltas.len());
    for (m, d) in &adapter.deltas {
        let Delta::Sparse(s) = d else {
            return Err(Error::Invalid(format!(
                "module `{m}` holds a LoRA pair; only a sparse adapter becomes a SHiRA adapter (a LoRA adapter is already PEFT's format)"
            )));
        };
        let (out, inp) = s.shape;
        let k = s.indices.len();
        let side = out + inp;
        if k == 0 || !k.is_multiple_of(side) {
            return Err(Error::Invalid(format!(
                "module `{m}` has {k} entries, not a multiple of in + out = {side}: SHiRA needs exactly r * (in + out) per module (train with budget_split = \"lora\")"
            )));
        }
        let r = k / side;
        match rank {
            None => rank = Some(r),
            Some(r0) if r0 != r => {
                return Err(Error::Invalid(format!(
                    "module `{m}` has {k} entries = {r} * (in + out), other modules have rank {r0}: SHiRA has one r for every module (train with budget_split = \"lora\")"
                )))
            }
            _ => {}
        }
        modules.push((m, s));
    }
    let r = rank.ok_or_else(|| Error::Invalid("the adapter has no modules".into()))?;
    Ok((r, modules))
}

/// Write `adapter` into `dir` as a stock PEFT adapter: SHiRA for sparse deltas, the usual PEFT
/// LoRA files for LoRA. Atomic, like every adapter write.
pub fn export_peft(adapter: &Adapter, dir: &Path) -> Result<()> {
    if adapter.config.method == crate::model::adapter::Method::Lora {
        return adapter.save(dir);
    }
    let (r, modules) = sparse_modules(adapter)?;
    let mut tensors = Vec::new();
    let mut short: BTreeSet<String> = BTreeSet::new();
    for (m, s) in modules {
        let inp = s.shape.1 as u32;
        let values: Vec<f32> = s.values.to_vec1()?;
        let rows = s.indices.iter().map(|&i| (i / inp) as i32);
        let cols = s.indices.iter().map(|&i| (i % inp) as i32);
        let pairs: Vec<u8> = rows.chain(cols).flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((
            format!("{PREFIX}{m}.shira_weight"),
            safetensors::Dtype::F32,
            vec![values.len()],
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
        tensors.push((
            format!("{PREFIX}{m}.shira_indices"),
            safetensors::Dtype::I32,
            vec![2, s.indices.len()],
            pairs,
        ));
        short.insert(m.rsplit('.').next().unwrap_or(m).to_string());
    }
    let config = serde_json::json!({
        "peft_type": "SHIRA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "mask_type": "random",
        "random_seed": null,
        "target_modules": short,
        "fan_in_fan_out": false,
        "init_weights": true,
        "modules_to_save": null,
        "inference_mode": true,
        "base_model_name_or_path": adapter.config.base_model_name_or_path,
        // spiel's record of the base, so `spiel` refuses the file on another base.
        "base_model": adapter.config.base_model,
    });
    let bytes = crate::formats::safetensors::serialize(&tensors)?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Invalid(e.to_string()))?;
    fsutil::write_dir_atomic(dir, |tmp| {
        fsutil::write_atomic(&tmp.join("adapter_config.json"), text.as_bytes())?;
        fsutil::write_atomic(&tmp.join("adapter_model.safetensors"), &bytes)
    })
}
