//! The model: the transformer and its projections over frozen base weights ([`weight`],
//! [`linear`], [`transformer`]), the adapters that ride on them and their files ([`adapter`]),
//! adapters in stock PEFT's files ([`peft`]), loading a model from the file formats and writing
//! one back ([`loader`]), random weights ([`random`]), and the batched incremental decoding that
//! generation and the server share ([`decode`]). Uses [`crate::kernels`] and
//! [`crate::formats`]; nothing here knows about training or tasks.
//!
//! Inside: [`weight`] < [`adapter`] < [`peft`], [`linear`] < [`transformer`] < [`decode`], [`loader`],
//! [`random`]; an adapter never reaches back into the transformer (it is checked against a
//! model's config and module shapes, [`transformer::Llama::load_adapter`]).

pub mod adapter;
pub mod decode;
pub mod linear;
pub mod loader;
pub mod peft;
pub mod random;
pub mod transformer;
pub mod weight;
