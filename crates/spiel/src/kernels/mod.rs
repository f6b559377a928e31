//! The numerical kernels: candle custom ops with explicit backward passes, and the plain loops
//! under them, each beside a simple reference in its tests. They know nothing of models, files or
//! training; every layer above may use them.
//!
//! Inside, from the bottom: [`common`] (reading tensors in place, bf16 rounding, gradient
//! buffers), [`profile`] and [`peak`] (one core's measured arithmetic peak) use nothing; [`gemm`] (f32 products, dots) and [`quant`] (the GGUF
//! block codecs) sit on [`common`]; [`bf16mm`] (bf16 products on AMX tiles) on those; then the
//! element-wise [`ops`], the frozen and quantised weight products [`qmatrix`], the sparse-delta op
//! and SDDMM [`sparse`], [`attention`], the vocabulary head with its loss [`head`], the LoRA op
//! [`lora`], the optimizer loops [`optim`], and the batch-invariant decoding loops [`rowwise`].

pub mod attention;
pub mod bf16mm;
pub mod common;
pub mod gemm;
pub mod head;
pub mod lora;
pub mod ops;
pub mod optim;
pub mod peak;
pub mod profile;
pub mod qmatrix;
pub mod quant;
pub mod rowwise;
pub mod sparse;
#[cfg(test)]
pub(crate) mod testing;
