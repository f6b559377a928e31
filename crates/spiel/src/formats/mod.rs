//! What spiel reads and writes on disk, parsed into plain values: GGUF files ([`gguf`]),
//! config.json ([`config`]), the tokenizer and chat template ([`tokenizer`]), training
//! checkpoints ([`checkpoint`]), loss plots as PNG ([`plot`]), safetensors files as PyTorch
//! writes them ([`safetensors`]), the fetched assets ([`assets`])
//! and atomic writes under all of them ([`fsutil`]). Uses only [`crate::kernels`] (the GGUF
//! block codecs in [`crate::kernels::quant`], which the quantised products read too); knows
//! nothing of models or training.

pub mod assets;
pub mod checkpoint;
pub mod config;
pub mod fsutil;
pub mod gguf;
pub mod plot;
pub mod safetensors;
pub mod tokenizer;
