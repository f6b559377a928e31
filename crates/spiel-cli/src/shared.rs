//! What the verbs share: the model flags, loading a model and adapters, the allocator settings
//! and small output helpers.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use spiel::formats::assets;
use spiel::model::adapter::AdapterSet;
use spiel::model::loader::{self, LoadedModel};

/// The model flags every verb that loads a model takes.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face directory (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Hold the projection weights as: none (f32), keep (the GGUF file's Q4_0/Q4_1/Q8_0 blocks),
    /// nf4 (4-bit NormalFloat, double-quantised scales) [default: none].
    #[arg(long)]
    pub quantize: Option<loader::Quantize>,
    /// f32; bf16: the frozen dense matrices held in bf16 and the activations computed in bf16
    /// (adapter values and optimizer state stay f32); auto: bf16 where bf16 products beat f32
    /// here (the AMX tile unit, or AVX-512 BF16 dot products at 1.3x the f32 FMA peak or more),
    /// else f32 [default: auto for `train`, f32 for the other commands].
    #[arg(long)]
    pub dtype: Option<loader::Dtype>,
}

/// The asset folder: `--home`, else $SPIEL_HOME, else ./assets.
pub fn home(cli_home: &Option<PathBuf>) -> PathBuf {
    cli_home.clone().unwrap_or_else(assets::home)
}

/// Load the model the flags name (fetching the default one on first use), in their dtype.
pub fn load_model(args: &ModelArgs, home: &Path) -> Result<LoadedModel> {
    let path = match &args.model {
        Some(p) => p.clone(),
        None => {
            let p = assets::path_in(home, &assets::MODEL);
            if !p.exists() {
                eprintln!("default model not found at {}; fetching it", p.display());
            }
            assets::ensure(&assets::MODEL, home)?
        }
    };
    let mut m = loader::load_with(&path, &Device::Cpu, args.quantize.unwrap_or_default())?;
    in_dtype(&mut m.model, args.dtype)?;
    release_freed_memory();
    Ok(m)
}
/// `--dtype bf16` (or `auto` on a CPU with AMX): hold the frozen matrices in bf16 and compute
/// the activations in bf16.
pub fn in_dtype(m: &mut spiel::model::transformer::Llama, dtype: Option<loader::Dtype>) -> Result<()> {
    if dtype.map(|d| d.resolved(false)) == Some(loader::Dtype::Bf16) {
        m.hold_in_bf16()?;
        m.compute_in(candle_core::DType::BF16)?;
    }
    Ok(())
}

/// Why `--dtype auto` chose what it did (for full fine-tuning when `full`), for the line a run
/// prints at start.
pub fn auto_dtype_reason(full: bool) -> &'static str {
    if full {
        "full fine-tuning trains its weights in f32"
    } else {
        &loader::bf16_verdict().reason
    }
}

/// Load adapter directories for `m` into one additive set.
pub fn load_adapters(dirs: &[PathBuf], m: &LoadedModel) -> Result<AdapterSet> {
    let mut set = AdapterSet::none();
    for d in dirs {
        set.extend(&m.model.load_adapter(d)?.to_set());
    }
    Ok(set)
}
/// Print a line above the progress bar (also when the bar is hidden because stderr is not a terminal).
pub fn say(bar: &indicatif::ProgressBar, line: String) {
    bar.suspend(|| eprintln!("{line}"));
}

/// Bytes in MiB.
pub fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Keep freed large buffers in the heap instead of returning them to the kernel: a training step
/// allocates and frees hundreds of multi-megabyte tensors, and with glibc's defaults each one is a
/// fresh mmap whose pages the kernel must fault in and zero (a fifth of a step's time, measured).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before any other thread exists.
    unsafe {
        // Serve every size from the heap (no per-buffer mmap) and never trim it back.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        // One heap for all threads: the command runs on a compute worker (`run_in_pool`), and a
        // heap per thread kept a second set of freed buffers (+250 MiB peak, measured).
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Return the heap's free pages to the kernel once, after loading: converting or quantising a
/// model frees its f32 copy, which [`tune_allocator`] would otherwise keep resident for the whole
/// run (160 MiB for the default model in bf16).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
