//! Optimizers as fused loops over raw slices (one pass per tensor, no temporaries):
//! AdamW with decoupled weight decay (per-element step counts for sparse slots that were
//! regrown at different times) and SM3 with row/column accumulators for sparse deltas.

use rayon::prelude::*;

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamW {
    /// Learning rate for this step (after the schedule).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW moments for a tensor; `age` counts the updates each element has seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdamState {
    /// First moments.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Per-element update counts (for bias correction).
    pub age: Vec<u32>,
}

impl AdamState {
    /// Zeroed state for `n` elements.
    pub fn new(n: usize) -> AdamState {
        AdamState {
            m: vec![0.0; n],
            v: vec![0.0; n],
            age: vec![0; n],
        }
    }
}

/// AdamW moments for a dense tensor (LoRA factors, full fine-tuning), whose elements have all
/// seen the same number of updates: one count instead of one per element.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DenseAdamState {
    /// First moments.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Updates seen (for bias correction).
    pub age: u32,
}

impl DenseAdamState {
    /// Zeroed state for `n` elements.
    pub fn new(n: usize) -> DenseAdamState {
        DenseAdamState {
            m: vec![0.0; n],
            v: vec![0.0; n],
            age: 0,
        }
    }
}

/// [`adamw_step`] for a dense tensor: every block takes the bias corrections as constants.
pub fn adamw_dense_step(values: &mut [f32], grads: &[f32], st: &mut DenseAdamState, h: &AdamW) {
    assert!(
        grads.len() == values.len() && st.m.len() == values.len() && st.v.len() == values.len(),
        "adamw: values, gradients and state differ in length"
    );
    st.age += 1;
    let c = corrections(h, st.age);
    values
        .par_chunks_mut(ADAM_BLOCK)
        .zip(grads.par_chunks(ADAM_BLOCK))
        .zip(st.m.par_chunks_mut(ADAM_BLOCK).zip(st.v.par_chunks_mut(ADAM_BLOCK)))
        .for_each(|((xs, gs), (ms, vs))| adamw_one_age(xs, gs, ms, vs, c, h));
}

/// The AdamW update of a block whose elements share the bias corrections `c` (vectorises).
fn adamw_one_age(xs: &mut [f32], gs: &[f32], ms: &mut [f32], vs: &mut [f32], c: (f32, f32), h: &AdamW) {
    for (((x, g), m), v) in xs.iter_mut().zip(gs).zip(ms.iter_mut()).zip(vs.iter_mut()) {
        adamw_update(h, x, *g, m, v, c);
    }
}

/// Elements per parallel block of the AdamW loops.
const ADAM_BLOCK: usize = 1 << 14;

/// AdamW's bias corrections `(1 - beta1^age, 1 - beta2^age)`, formed in f64 and rounded once
/// (`powi` may multiply in any order; in f64 the order does not reach the f32 result).
fn corrections(h: &AdamW, age: u32) -> (f32, f32) {
    let c = |beta: f64| (1.0 - beta.powi(age as i32)) as f32;
    (c(h.beta1), c(h.beta2))
}

/// One element's AdamW update with bias corrections `(c1, c2)`.
#[inline(always)]
fn adamw_update(h: &AdamW, x: &mut f32, g: f32, m: &mut f32, v: &mut f32, (c1, c2): (f32, f32)) {
    let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
    let (lr, eps, wd) = (h.lr as f32, h.eps as f32, h.weight_decay as f32);
    *m = b1 * *m + (1.0 - b1) * g;
    *v = b2 * *v + (1.0 - b2) * g * g;
    let (mhat, vhat) = (*m / c1, *v / c2);
    let y = *x - lr * mhat / (vhat.sqrt() + eps);
    *x = y - lr * wd * y;
}

/// One AdamW step: moments, bias correction with each element's own age, the update, then
/// decoupled weight decay `value -= lr * wd * value`. Runs in parallel blocks; a block whose
/// elements share one age (slots grown at the same reselection) takes the bias corrections as
/// constants, so that its loop vectorises; the arithmetic per element is the same either way.
pub fn adamw_step(values: &mut [f32], grads: &[f32], st: &mut AdamState, h: &AdamW) {
    assert!(
        grads.len() == values.len()
            && st.m.len() == values.len()
            && st.v.len() == values.len()
            && st.age.len() == values.len(),
        "adamw: values, gradients and state differ in length"
    );
    values
        .par_chunks_mut(ADAM_BLOCK)
        .zip(grads.par_chunks(ADAM_BLOCK))
        .zip(st.m.par_chunks_mut(ADAM_BLOCK).zip(st.v.par_chunks_mut(ADAM_BLOCK)))
        .zip(st.age.par_chunks_mut(ADAM_BLOCK))
        .for_each(|(((x, g), (m, v)), age)| adamw_block(x, g, m, v, age, h));
}

/// [`adamw_step`] on one block.
fn adamw_block(xs: &mut [f32], gs: &[f32], ms: &mut [f32], vs: &mut [f32], ages: &mut [u32], h: &AdamW) {
    let first = ages.first().copied().unwrap_or(0);
    if ages.iter().all(|&a| a == first) {
        adamw_one_age(xs, gs, ms, vs, corrections(h, first + 1), h);
        ages.fill(first + 1);
    } else {
        for ((((x, g), m), v), age) in xs
            .iter_mut()
            .zip(gs)
            .zip(ms.iter_mut())
            .zip(vs.iter_mut())
            .zip(ages.iter_mut())
        {
            *age += 1;
            adamw_update(h, x, *g, m, v, corrections(h, *age));
        }
    }
}

/// SM3 accumulators of one `[out, in]` matrix (never decayed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sm3State {
    /// Row accumulators `[out]`.
    pub row: Vec<f32>,
    /// Column accumulators `[in]`.
    pub col: Vec<f32>,
}

/// SM3 hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sm3 {
    /// Learning rate for this step.
    pub lr: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// One SM3 step on the active entries of a sparse delta: `nu = min(R[r], C[c]) + g^2`, then each
/// row (column) accumulator with any active entry becomes the max `nu` over its entries; the
/// update is `g / sqrt(nu + eps)`, followed by decoupled weight decay.
pub fn sm3_step(values: &mut [f32], grads: &[f32], indices: &[u32], in_dim: usize, st: &mut Sm3State, h: &Sm3) {
    let (lr, eps, wd) = (h.lr as f32, h.eps as f32, h.weight_decay as f32);
    let mut new_row: Vec<Option<f32>> = vec![None; st.row.len()];
    let mut new_col: Vec<Option<f32>> = vec![None; st.col.len()];
    for (n, &i) in indices.iter().enumerate() {
        let (r, c) = (i as usize / in_dim, i as usize % in_dim);
        let g = grads[n];
        let nu = st.row[r].min(st.col[c]) + g * g;
        new_row[r] = Some(new_row[r].map_or(nu, |x: f32| x.max(nu)));
        new_col[c] = Some(new_col[c].map_or(nu, |x: f32| x.max(nu)));
        let mut x = values[n] - lr * g / (nu + eps).sqrt();
        x -= lr * wd * x;
        values[n] = x;
    }
    for (a, n) in st.row.iter_mut().zip(new_row) {
        if let Some(n) = n {
            *a = n;
        }
    }
    for (a, n) in st.col.iter_mut().zip(new_col) {
        if let Some(n) = n {
            *a = n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_hand_computation() {
        let h = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.5,
        };
        let mut v = vec![1.0f32, -2.0];
        let mut st = AdamState::new(2);
        // Element 1 is older (as if regrown earlier): its bias correction differs.
        st.age[1] = 3;
        st.m[1] = 0.2;
        st.v[1] = 0.01;
        adamw_step(&mut v, &[0.5, -1.0], &mut st, &h);
        // Element 0, first step: mhat = g, vhat = g^2, update = lr * g / (|g| + eps).
        let x0 = 1.0f64 - 0.1 * 0.5 / (0.5 + 1e-6);
        let x0 = x0 - 0.1 * 0.5 * x0;
        assert!((v[0] as f64 - x0).abs() < 1e-6);
        let m = 0.9 * 0.2 - 0.1f64;
        let s = 0.999 * 0.01 + 0.001 * 1.0f64;
        let (mh, sh) = (m / (1.0 - 0.9f64.powi(4)), s / (1.0 - 0.999f64.powi(4)));
        let x1 = -2.0 - 0.1 * mh / (sh.sqrt() + 1e-6);
        let x1 = x1 - 0.1 * 0.5 * x1;
        assert!((v[1] as f64 - x1).abs() < 1e-5, "{} vs {x1}", v[1]);
        assert_eq!(st.age, vec![1, 4]);
    }

    /// Blocks of one age (vectorised) and of mixed ages, over several blocks and a ragged end,
    /// against the update computed in f64.
    #[test]
    fn adamw_blocks_match_an_f64_reference() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let h = AdamW {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let n = 3 * (1 << 14) + 17;
        let mut st = AdamState::new(n);
        let (x0, g): (Vec<f32>, Vec<f32>) = (0..n)
            .map(|_| (rng.gen_range(-1.0..1.0), rng.gen_range(-0.1..0.1)))
            .unzip();
        for i in 0..n {
            st.m[i] = rng.gen_range(-0.01..0.01);
            st.v[i] = rng.gen_range(0.0..1e-3);
            // The second block has mixed ages; the others one age each.
            st.age[i] = if (1 << 14..2 << 14).contains(&i) {
                rng.gen_range(0..50)
            } else {
                7
            };
        }
        let before = st.clone();
        let mut x = x0.clone();
        adamw_step(&mut x, &g, &mut st, &h);
        for i in 0..n {
            let age = before.age[i] as i32 + 1;
            let m = 0.9 * before.m[i] as f64 + 0.1 * g[i] as f64;
            let v = 0.95 * before.v[i] as f64 + 0.05 * (g[i] as f64).powi(2);
            let (mh, vh) = (m / (1.0 - 0.9f64.powi(age)), v / (1.0 - 0.95f64.powi(age)));
            let y = x0[i] as f64 - 0.01 * mh / (vh.sqrt() + 1e-8);
            let want = y - 0.01 * 0.1 * y;
            assert!(
                (x[i] as f64 - want).abs() < 1e-5 * want.abs().max(1e-2),
                "element {i}: {} vs {want}",
                x[i]
            );
            assert_eq!(st.age[i], before.age[i] + 1);
            assert!((st.m[i] as f64 - m).abs() < 1e-7 && (st.v[i] as f64 - v).abs() < 1e-8);
        }
    }

    /// The dense state's step is the per-element step with every age equal, bit for bit.
    #[test]
    fn dense_adamw_equals_per_element_adamw_at_one_age() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let h = AdamW {
            lr: 0.02,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
        };
        let n = (1 << 14) + 333;
        let mut x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut y = x.clone();
        let (mut each, mut dense) = (AdamState::new(n), DenseAdamState::new(n));
        for _ in 0..3 {
            let g: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.1..0.1)).collect();
            adamw_step(&mut x, &g, &mut each, &h);
            adamw_dense_step(&mut y, &g, &mut dense, &h);
        }
        let diff = x.iter().zip(&y).position(|(a, b)| a != b);
        assert!(
            diff.is_none(),
            "element {diff:?}: {:?}",
            diff.map(|i| (x[i], y[i], each.m[i], dense.m[i]))
        );
        assert!(each.m == dense.m && each.v == dense.v);
        assert!(each.age.iter().all(|&a| a == 3) && dense.age == 3);
    }

    #[test]
    fn sm3_updates_accumulators_with_row_and_column_maxima() {
        // 2 x 3 matrix; active (0,0), (0,2), (1,2).
        let idx = [0u32, 2, 5];
        let mut st = Sm3State {
            row: vec![1.0, 0.5],
            col: vec![0.25, 9.0, 2.0],
        };
        let mut v = vec![0.0f32; 3];
        let g = [1.0f32, 2.0, 3.0];
        sm3_step(
            &mut v,
            &g,
            &idx,
            3,
            &mut st,
            &Sm3 {
                lr: 0.1,
                eps: 0.0,
                weight_decay: 0.0,
            },
        );
        // nu: (0,0): min(1, .25) + 1 = 1.25; (0,2): min(1, 2) + 4 = 5; (1,2): min(.5, 2) + 9 = 9.5.
        assert_eq!(st.row, vec![5.0, 9.5]);
        // Column 1 has no active entry: unchanged.
        assert_eq!(st.col, vec![1.25, 9.0, 9.5]);
        let want = [
            -0.1 * 1.0 / 1.25f32.sqrt(),
            -0.1 * 2.0 / 5f32.sqrt(),
            -0.1 * 3.0 / 9.5f32.sqrt(),
        ];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-7);
        }
    }
}
