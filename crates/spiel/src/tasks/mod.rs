//! What a user does with a model and its adapters: evaluate ([`eval`]), generate
//! ([`generate`]), score a text ([`score`]), compare methods ([`compare`]), describe an adapter
//! ([`inspect`]) and measure speed and memory ([`bench`]). Uses [`crate::train`] (held-out
//! splits, the loss, the trainer for benchmarks) and everything below it.

pub mod bench;
pub mod compare;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod score;
