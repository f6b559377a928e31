//! `spiel inspect`: what an adapter holds, read from its files alone (no base model needed).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::model::adapter::{AdapterConfig, Method};
use crate::{Error, Result};

/// One module's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    /// Canonical module path.
    pub module: String,
    /// Trainable entries (sparse) or parameters (LoRA).
    pub count: usize,
    /// Trainable parameters over the matrix size, when the shape is known.
    pub density: Option<f64>,
    /// L2 norm of the values (sparse) or of B A (upper bound: |B| |A|, LoRA).
    pub norm: f64,
    /// Largest |value|.
    pub max_abs: f64,
}

/// Everything `spiel inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Training method.
    pub method: Method,
    /// Base model name and config hash.
    pub base_model: String,
    /// Targeted module names.
    pub target_modules: Vec<String>,
    /// Total trainable parameters.
    pub total: usize,
    /// Per-module details.
    pub modules: Vec<ModuleReport>,
    /// Per-layer totals by module kind (layer -> kind -> count).
    pub layers: BTreeMap<usize, BTreeMap<String, usize>>,
    /// Training summary from the config.
    pub training: serde_json::Value,
}

/// Read an adapter directory and summarise it.
pub fn inspect(dir: &Path) -> Result<Report> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, e.to_string()))?;
    let st_path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&st_path).map_err(|e| Error::io(&st_path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(&st_path, format!("safetensors: {e}")))?;
    let mut per: BTreeMap<String, (usize, f64, f64, Option<usize>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Some(rest) = name.strip_prefix("base_model.model.") else {
            continue;
        };
        let (module, what) = match rest.rsplit_once(".sft_delta.") {
            Some((m, w)) => (m.to_string(), w.to_string()),
            None => match rest.rsplit_once(".lora_") {
                Some((m, w)) => (m.to_string(), format!("lora_{w}")),
                None => continue,
            },
        };
        if what == "indices" {
            continue;
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(Error::format(&st_path, format!("tensor `{name}` is not F32")));
        }
        let vals: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let e = per.entry(module).or_insert((0, 0.0, 0.0, None));
        e.0 += vals.len();
        e.1 += vals.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        e.2 = vals.iter().fold(e.2, |m, v| m.max(v.abs() as f64));
        // LoRA A is [r, in], B is [out, r]: together they give the matrix size.
        let shape = view.shape();
        if what.starts_with("lora_A") {
            e.3 = Some(e.3.unwrap_or(1) * shape[1]);
        } else if what.starts_with("lora_B") {
            e.3 = Some(e.3.unwrap_or(1) * shape[0]);
        }
    }
    let numel = |m: &str| config.module_shapes.get(m).map(|[o, i]| o * i);
    let mut modules = Vec::new();
    let mut layers: BTreeMap<usize, BTreeMap<String, usize>> = BTreeMap::new();
    for (m, (count, sq, max, lora_numel)) in per {
        let size = if config.method == Method::Lora {
            lora_numel
        } else {
            numel(&m)
        };
        let layer = m
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse().ok());
        if let Some(l) = layer {
            let kind = m.rsplit('.').next().unwrap_or(&m).to_string();
            *layers.entry(l).or_default().entry(kind).or_default() += count;
        }
        modules.push(ModuleReport {
            density: size.map(|s| count as f64 / s as f64),
            module: m,
            count,
            norm: sq.sqrt(),
            max_abs: max,
        });
    }
    Ok(Report {
        method: config.method,
        base_model: match &config.base_model {
            Some(b) => format!("{} (config {})", b.name, b.config_hash),
            None => config
                .base_model_name_or_path
                .clone()
                .unwrap_or_else(|| "unknown".into()),
        },
        target_modules: config.target_modules.clone(),
        total: modules.iter().map(|m| m.count).sum(),
        modules,
        layers,
        training: config.training,
    })
}

impl Report {
    /// The report as text tables.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s += &format!("method:      {}\n", self.method.as_str());
        s += &format!("base model:  {}\n", self.base_model);
        s += &format!("targets:     {}\n", self.target_modules.join(", "));
        s += &format!("trainable:   {}\n", self.total);
        if !self.training.is_null() {
            s += &format!("training:    {}\n", self.training);
        }
        s += "\n| module | count | density | L2 norm | max |v| |\n|---|---:|---:|---:|---:|\n";
        for m in &self.modules {
            let d = m
                .density
                .map(|d| format!("{:.4}%", d * 100.0))
                .unwrap_or_else(|| "-".into());
            s += &format!(
                "| {} | {} | {} | {:.4e} | {:.4e} |\n",
                m.module, m.count, d, m.norm, m.max_abs
            );
        }
        let kinds: Vec<String> = {
            let mut k: Vec<String> = self.layers.values().flat_map(|m| m.keys().cloned()).collect();
            k.sort();
            k.dedup();
            k
        };
        s += &format!(
            "\nper layer (entries):\n| layer | {} | total |\n|---:|{}---:|\n",
            kinds.join(" | "),
            "---:|".repeat(kinds.len())
        );
        for (l, m) in &self.layers {
            let cells: Vec<String> = kinds
                .iter()
                .map(|k| m.get(k).copied().unwrap_or(0).to_string())
                .collect();
            s += &format!("| {l} | {} | {} |\n", cells.join(" | "), m.values().sum::<usize>());
        }
        s
    }
}
