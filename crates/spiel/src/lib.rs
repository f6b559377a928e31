//! spiel: sparse fine-tuning (SpIEL) of LLaMA-family language models on candle.
//!
//! The modules follow the data flow: files in ([`assets`], [`gguf`], [`quant`], [`config`],
//! [`tokenizer`], [`loader`]) feed the transformer ([`model`]), which scores ([`score`]) and
//! generates ([`generate`]); [`bench`] measures it.

pub mod adapter;
pub mod assets;
pub mod attention;
pub mod bench;
pub mod bf16mm;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod data;
mod error;
pub mod eval;
pub mod fsutil;
pub mod fuzzing;
pub mod generate;
pub mod gguf;
pub mod head;
pub mod inspect;
pub mod loader;
pub mod lora;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod profile;
pub mod qmatrix;
pub mod quant;
pub mod score;
pub mod select;
pub mod sparse;
pub mod synth;
#[cfg(test)]
mod testing;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
