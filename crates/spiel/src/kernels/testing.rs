//! Helpers shared by the kernels' unit tests: random inputs and relative errors.

use candle_core::Tensor;
use rand::Rng;

/// `n` values drawn uniformly from `[-bound, bound)`.
pub(crate) fn uniform(n: usize, bound: f32, rng: &mut impl Rng) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
}

/// A CPU tensor of `shape` with values uniform in `[-bound, bound)`.
pub(crate) fn uniform_tensor(shape: &[usize], bound: f32, rng: &mut impl Rng) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(uniform(n, bound, rng), shape, &candle_core::Device::Cpu).expect("shape matches")
}

/// `|a - b| / |b|` in f64 (Euclidean norms).
pub(crate) fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

/// [`rel_err`] of two tensors of any dtype, read as f32.
pub(crate) fn rel_err_tensors(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        crate::kernels::common::vec_of(a).expect("readable"),
        crate::kernels::common::vec_of(b).expect("readable"),
    );
    rel_err(&a, &b)
}
