//! `spiel plan`: the expected peak memory of a training run by component, and whether it fits.

use std::path::Path;

use anyhow::Result;
use clap::Args;
use spiel::formats::assets;
use spiel::model::loader;
use spiel::train::config::TrainConfig;

use crate::cmd::train::TrainArgs;
use crate::shared::mib;

/// `spiel plan` arguments: those of `spiel train`.
#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    train: TrainArgs,
}

impl PlanArgs {
    /// Run the command.
    pub fn run(self, home: &Path) -> Result<()> {
        let cfg = self.train.resolve()?;
        let (plan, fits) = memory_plan(&cfg, home)?;
        print!("{}", plan.render());
        match fits {
            Fit::Fits(avail) => println!("fits: {:.0} MiB available", mib(avail)),
            Fit::Unknown => println!("available memory unknown (no /proc/meminfo)"),
            Fit::TooBig { avail, hint } => println!("does not fit: {:.0} MiB available; {hint}", mib(avail)),
        }
        Ok(())
    }
}

/// Whether a plan fits the memory available now.
pub(crate) enum Fit {
    Fits(u64),
    Unknown,
    TooBig { avail: u64, hint: String },
}

/// The memory plan of `cfg` (reading only the model's header) and whether it fits; when it does
/// not, the flags that would.
pub(crate) fn memory_plan(cfg: &TrainConfig, home: &Path) -> Result<(spiel::train::plan::Plan, Fit)> {
    use spiel::train::plan::{plan, BaseFormat};
    let path = match &cfg.model {
        Some(p) => p.clone(),
        None => assets::ensure(&assets::MODEL, home)?,
    };
    let (model_cfg, file_format) = if path.is_dir() {
        (
            spiel::formats::config::ModelConfig::from_hf_file(&path.join("config.json"))?,
            None,
        )
    } else {
        let g = spiel::formats::gguf::Gguf::open(&path)?;
        let fmt = g.tensor("blk.0.attn_q.weight").map(|t| t.format);
        (spiel::formats::config::ModelConfig::from_gguf(&g)?, fmt)
    };
    let base_of = |q: loader::Quantize| match (q, file_format) {
        (loader::Quantize::Nf4, _) => BaseFormat::Nf4,
        (
            loader::Quantize::Keep,
            Some(
                f @ (spiel::kernels::quant::Format::Q4_0
                | spiel::kernels::quant::Format::Q4_1
                | spiel::kernels::quant::Format::Q8_0),
            ),
        ) => BaseFormat::Ggml(f),
        _ => BaseFormat::F32,
    };
    let p = plan(&model_cfg, cfg, base_of(cfg.quantize));
    let Some(avail) = spiel::train::plan::available_bytes() else {
        return Ok((p, Fit::Unknown));
    };
    if p.total <= avail {
        return Ok((p, Fit::Fits(avail)));
    }
    // Suggest the first of: a 4-bit base, then halving the batch, that fits.
    let mut hints = Vec::new();
    if cfg.quantize == loader::Quantize::None && cfg.method != spiel::model::adapter::Method::Full {
        let q = TrainConfig {
            quantize: loader::Quantize::Nf4,
            ..cfg.clone()
        };
        if plan(&model_cfg, &q, BaseFormat::Nf4).total <= avail {
            hints.push("--quantize nf4".to_string());
        }
    }
    if hints.is_empty() && !cfg.checkpoint_activations {
        let c = TrainConfig {
            checkpoint_activations: true,
            ..cfg.clone()
        };
        if plan(&model_cfg, &c, base_of(cfg.quantize)).total <= avail {
            hints.push("--checkpoint-activations".to_string());
        }
    }
    let mut b = cfg.batch_size;
    while hints.is_empty() && b > 1 {
        b /= 2;
        let c = TrainConfig {
            batch_size: b,
            grad_accum: cfg.grad_accum * cfg.batch_size / b,
            ..cfg.clone()
        };
        if plan(&model_cfg, &c, base_of(cfg.quantize)).total <= avail {
            hints.push(format!("--batch-size {b} --grad-accum {}", c.grad_accum));
        }
    }
    let hint = if hints.is_empty() {
        "no smaller setting found; try a shorter --max-len".to_string()
    } else {
        format!("it would fit with {}", hints.join(" or "))
    };
    Ok((p, Fit::TooBig { avail, hint }))
}
