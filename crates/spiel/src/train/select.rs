//! SpIEL index selection: the parameter budget, the reselection schedule, and the
//! prune-and-regrow step for SpIEL-AG (accumulated gradients) and SpIEL-MA (SM3 momenta).
//!
//! Every decision here is a function of per-module statistics (`g_sum`, `g2_sum`, SM3 row and
//! column accumulators, values) that a data-parallel run all-reduces first (deviation 6), so every
//! rank picks the same indices; the hooks here sum their dense gradients over the ranks
//! ([`Reduce`]) before choosing from them.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::dist::Group;
use crate::kernels::optim::{AdamState, AdamW};
use crate::kernels::sparse::WeightGradHook;

/// Per-module entry counts: `k_m = floor(total * numel_m / sum numel)`.
pub fn split_budget(total: usize, numels: &[usize]) -> Vec<usize> {
    let sum: u128 = numels.iter().map(|&n| n as u128).sum();
    numels
        .iter()
        .map(|&n| ((total as u128 * n as u128) / sum.max(1)).min(n as u128) as usize)
        .collect()
}

/// How the replaced fraction decays over training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// `zeta0 * (1 - c / T)` (with the reference's initial mask, the first reselection replaces
    /// everything).
    Linear,
    /// `zeta0 * (1 + cos(pi c / T)) / 2`.
    Cosine,
}

/// The reselection schedule over `total` updates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// S: updates between reselections.
    pub reselection_steps: usize,
    /// A: updates in each SpIEL-AG gradient window (A <= S).
    pub accumulation_steps: usize,
    /// zeta0: initial fraction replaced.
    pub rate: f64,
    /// Decay of the fraction.
    pub policy: Policy,
    /// T: total updates.
    pub total: usize,
    /// No reselection follows an update after this one (the last quarter of a run keeps its
    /// mask, as dynamic sparse training usually does).
    pub end: usize,
    /// The first reselection replaces every entry (the reference's random initial mask, whose
    /// entries are all placeholders until then).
    pub full_first: bool,
}

impl Schedule {
    /// Whether a reselection follows update `c` (1-based).
    pub fn is_reselection(&self, c: usize) -> bool {
        self.reselection_steps > 0 && c.is_multiple_of(self.reselection_steps) && c < self.total && c <= self.end
    }

    /// Whether update `c` (1-based) lies in an AG window: exactly the A updates ending at a
    /// reselection (the reference spans A + 1; deviation 4).
    pub fn in_window(&self, c: usize) -> bool {
        if self.reselection_steps == 0 || c == 0 {
            return false;
        }
        let next = c.div_ceil(self.reselection_steps) * self.reselection_steps;
        self.is_reselection(next) && c + self.accumulation_steps > next
    }

    /// Fraction of each module's entries replaced at the reselection after update `c`.
    pub fn fraction(&self, c: usize) -> f64 {
        let t = self.total.max(1) as f64;
        match self.policy {
            Policy::Linear if self.full_first && c == self.reselection_steps => 1.0,
            Policy::Linear => self.rate * (1.0 - c as f64 / t),
            Policy::Cosine => self.rate * (1.0 + (std::f64::consts::PI * c as f64 / t).cos()) / 2.0,
        }
        .clamp(0.0, 1.0)
    }
}

/// Gradient statistics of one module over an AG window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgWindow {
    /// Candidate flat indices (sorted), chosen at the window's first micro-batch.
    pub candidates: Vec<u32>,
    /// Sum over updates of the update gradient at each candidate.
    pub g_sum: Vec<f32>,
    /// Sum over updates of its square.
    pub g2_sum: Vec<f32>,
    /// Gradient of the update in progress (summed over its micro-batches).
    pub current: Vec<f32>,
    /// Updates accumulated.
    pub count: u32,
    /// How many candidates to keep (k_m).
    pub k: usize,
}

impl AgWindow {
    /// An empty window that will keep `k` candidates.
    pub fn new(k: usize) -> AgWindow {
        AgWindow {
            k,
            ..Default::default()
        }
    }

    /// Take one micro-batch's dense gradient `[out, in]` (already scaled to update scale). The
    /// window's first picks the candidates: the top-k of its magnitude.
    pub fn observe(&mut self, dense: &[f32]) {
        if self.candidates.is_empty() {
            self.choose(top_k_abs(dense, self.k));
        }
        for (cur, &i) in self.current.iter_mut().zip(&self.candidates) {
            *cur += dense[i as usize];
        }
    }

    /// Fix the candidates (sorted flat indices), with empty sums.
    pub fn choose(&mut self, candidates: Vec<u32>) {
        let n = candidates.len();
        self.candidates = candidates;
        self.g_sum = vec![0.0; n];
        self.g2_sum = vec![0.0; n];
        self.current = vec![0.0; n];
    }

    /// Take one micro-batch's gradient at the candidates (in their order), once they are chosen.
    pub fn observe_at(&mut self, at_candidates: &[f32]) {
        debug_assert_eq!(at_candidates.len(), self.candidates.len());
        for (cur, g) in self.current.iter_mut().zip(at_candidates) {
            *cur += g;
        }
    }

    /// Close the update: fold its gradient into the sums.
    pub fn end_update(&mut self) {
        for ((s, s2), c) in self
            .g_sum
            .iter_mut()
            .zip(self.g2_sum.iter_mut())
            .zip(self.current.iter_mut())
        {
            *s += *c;
            *s2 += *c * *c;
            *c = 0.0;
        }
        if !self.candidates.is_empty() {
            self.count += 1;
        }
    }
}

/// Where a module's hook sums its statistics over a data-parallel group: the group, and the
/// module's place in the trainer's fixed order, which every rank checks it reached in step.
#[derive(Clone)]
pub struct Reduce {
    /// The ranks training together.
    pub group: Arc<Group>,
    /// The module's place in the trainer's order of modules.
    pub module: u64,
}

impl Reduce {
    /// `grad` summed over the group, or a message when the ranks are not all at this module
    /// (then every rank keeps its own gradient and reports the fault).
    fn sum(&self, grad: &[f32]) -> std::result::Result<Vec<f32>, String> {
        if !self
            .group
            .agree(&[self.module, grad.len() as u64])
            .iter()
            .all(|&same| same)
        {
            return Err(format!(
                "the ranks reached different modules (module #{} here) when summing a dense gradient",
                self.module
            ));
        }
        let mut summed = vec![0.0; grad.len()];
        self.group.sum_f32_into(grad, &mut summed);
        Ok(summed)
    }
}

/// A module's window as a backward hook. Over several ranks the candidates come from the dense
/// gradient summed over all of them (so every rank picks the same set), while `current` takes
/// this rank's own gradient; the trainer sums `current` over the ranks before each update closes.
pub struct WindowHook {
    window: Mutex<AgWindow>,
    reduce: Option<Reduce>,
    fault: Mutex<Option<String>>,
}

impl WindowHook {
    /// A hook around `window`; `reduce` where several ranks train together.
    pub fn new(window: AgWindow, reduce: Option<Reduce>) -> WindowHook {
        WindowHook {
            window: Mutex::new(window),
            reduce,
            fault: Mutex::new(None),
        }
    }

    /// The window.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, AgWindow> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fault met while summing over the ranks, once.
    pub fn take_fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl WeightGradHook for WindowHook {
    fn positions(&self) -> Option<Vec<u32>> {
        let w = self.lock();
        (!w.candidates.is_empty()).then(|| w.candidates.clone())
    }

    fn observe_dense(&self, grad: &[f32], _out: usize, _in: usize) {
        let mut w = self.lock();
        if let (Some(r), true) = (&self.reduce, w.candidates.is_empty()) {
            match r.sum(grad) {
                Ok(summed) => {
                    let chosen = top_k_abs(&summed, w.k);
                    w.choose(chosen)
                }
                Err(e) => *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(e),
            }
        }
        w.observe(grad);
    }

    fn observe_at(&self, grad: &[f32]) {
        self.lock().observe_at(grad);
    }
}

/// A module's gradient-informed initial mask as a backward hook: the dense weight gradient at
/// zero deltas, summed over the initial pass's micro-batches (and over the ranks), and the top-k
/// of its magnitude. With one micro-batch only the k indices are kept (the dense gradient stays
/// transient, as in an AG window); with several, one f32 sum of the module's size lives for the
/// pass.
pub struct InitialMaskHook(Mutex<MaskSum>);

struct MaskSum {
    k: usize,
    micro_batches: usize,
    sum: Vec<f32>,
    chosen: Option<Vec<u32>>,
    reduce: Option<Reduce>,
    fault: Option<String>,
}

impl MaskSum {
    /// Top-k of |grad| summed over the ranks.
    fn top_k_summed(&mut self, grad: &[f32]) -> Vec<u32> {
        match &self.reduce {
            None => top_k_abs(grad, self.k),
            Some(r) => match r.sum(grad) {
                Ok(summed) => top_k_abs(&summed, self.k),
                Err(e) => {
                    self.fault = Some(e);
                    top_k_abs(grad, self.k)
                }
            },
        }
    }
}

impl InitialMaskHook {
    /// A hook that keeps `k` indices from `micro_batches` backward passes; `reduce` where
    /// several ranks train together.
    pub fn new(k: usize, micro_batches: usize, reduce: Option<Reduce>) -> InitialMaskHook {
        InitialMaskHook(Mutex::new(MaskSum {
            k,
            micro_batches,
            sum: Vec::new(),
            chosen: None,
            reduce,
            fault: None,
        }))
    }

    /// The chosen indices (sorted): top-k of |summed gradient|; `None` if no gradient came.
    /// Over several ranks, every rank calls this for its modules in the same order.
    pub fn indices(&self) -> std::result::Result<Option<Vec<u32>>, String> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.chosen.is_none() && !m.sum.is_empty() {
            let sum = std::mem::take(&mut m.sum);
            m.chosen = Some(m.top_k_summed(&sum));
        }
        match m.fault.take() {
            Some(e) => Err(e),
            None => Ok(m.chosen.clone()),
        }
    }
}

impl WeightGradHook for InitialMaskHook {
    fn positions(&self) -> Option<Vec<u32>> {
        None
    }

    fn observe_dense(&self, grad: &[f32], _out: usize, _in: usize) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.micro_batches <= 1 {
            m.chosen = Some(m.top_k_summed(grad));
        } else if m.sum.is_empty() {
            m.sum = grad.to_vec();
        } else {
            m.sum.iter_mut().zip(grad).for_each(|(s, g)| *s += g);
        }
    }

    fn observe_at(&self, _grad: &[f32]) {}
}

/// Order by score descending, then index ascending (deterministic ties).
fn better(a: (f32, u32), b: (f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Flat indices of the `k` largest `|x|`, sorted by index.
pub fn top_k_abs(x: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(x.len());
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        better((x[a as usize].abs(), a), (x[b as usize].abs(), b))
    });
    // A fresh vector: the window keeps it, and `idx` has a slot for every entry of the matrix.
    let mut top = idx[..k].to_vec();
    top.sort_unstable();
    top
}

/// Slots of the `n` active entries with the smallest `|value|` (ties: lower index first), ascending
/// by slot.
pub fn prune(values: &[f32], indices: &[u32], n: usize) -> Vec<usize> {
    let mut slots: Vec<usize> = (0..values.len()).collect();
    smallest_n(&mut slots, n, |&a, &b| {
        values[a]
            .abs()
            .total_cmp(&values[b].abs())
            .then(indices[a].cmp(&indices[b]))
    });
    slots.sort_unstable();
    slots
}

/// Keep in `v` only its `n` first elements under the total order `cmp` (in no particular order):
/// a linear-time selection instead of a sort of the whole vector.
fn smallest_n<T>(v: &mut Vec<T>, n: usize, mut cmp: impl FnMut(&T, &T) -> Ordering) {
    if n == 0 {
        v.clear();
    } else if n < v.len() {
        v.select_nth_unstable_by(n - 1, &mut cmp);
        v.truncate(n);
    }
}

/// SpIEL-AG regrowth: candidates that are not staying active, best `n` by `|g_sum|`.
/// Returns positions into `window.candidates`.
pub fn regrow_ag(window: &AgWindow, staying: &[u32], n: usize) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..window.candidates.len())
        .filter(|&j| staying.binary_search(&window.candidates[j]).is_err())
        .collect();
    let order = |&a: &usize, &b: &usize| {
        better(
            (window.g_sum[a].abs(), window.candidates[a]),
            (window.g_sum[b].abs(), window.candidates[b]),
        )
    };
    smallest_n(&mut pool, n, order);
    pool.sort_by(order);
    pool
}

#[derive(PartialEq)]
struct Scored(f32, u32);
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    // Max-heap on "worse": the heap top is the worst kept entry.
    fn cmp(&self, other: &Self) -> Ordering {
        better((self.0, self.1), (other.0, other.1))
    }
}

/// SpIEL-MA regrowth: the `n` inactive positions with the largest `R[r] * C[c]`, never
/// materialising the `[out, in]` score matrix: rows are scanned with columns in descending `C`
/// order, stopping each row as soon as it cannot beat the worst kept entry. `active` (sorted)
/// holds every currently active index, including those just dropped.
pub fn regrow_ma(row: &[f32], col: &[f32], active: &[u32], n: usize) -> Vec<u32> {
    let in_dim = col.len();
    let mut cols: Vec<usize> = (0..in_dim).collect();
    cols.sort_by(|&a, &b| col[b].total_cmp(&col[a]).then(a.cmp(&b)));
    let mut heap: BinaryHeap<Scored> = BinaryHeap::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    for (r, &rv) in row.iter().enumerate() {
        for &c in &cols {
            let s = rv * col[c];
            let i = (r * in_dim + c) as u32;
            if heap.len() == n {
                let worst = heap.peek().map(|w| (w.0, w.1)).unwrap_or((f32::NEG_INFINITY, u32::MAX));
                // Columns are in descending C: if this one cannot win, none after it can.
                if better((s, i), worst) != Ordering::Less {
                    if s < worst.0 {
                        break;
                    }
                    continue;
                }
            }
            if active.binary_search(&i).is_ok() {
                continue;
            }
            heap.push(Scored(s, i));
            if heap.len() > n {
                heap.pop();
            }
        }
    }
    let mut out: Vec<u32> = heap.into_iter().map(|s| s.1).collect();
    out.sort_unstable();
    out
}

/// One module's trainable sparse state, as the selector rewrites it.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseModule {
    /// Sorted unique flat indices.
    pub indices: Vec<u32>,
    /// Values at those indices.
    pub values: Vec<f32>,
    /// AdamW state per entry (SpIEL-AG); `None` for SM3 (SpIEL-MA).
    pub adam: Option<AdamState>,
}

/// What one reselection did to one module.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReselectStats {
    /// Entries removed for good.
    pub dropped: usize,
    /// Genuinely new entries.
    pub grown: usize,
    /// Entries both dropped and regrown (kept with their value and state).
    pub cancelled: usize,
}

/// Replace entries of `m`: `drop` slots leave, `grow` indices enter (value 0, state from `seed`),
/// except grown indices that were just dropped, which keep their slot (cancellation). Entries
/// stay sorted by index, values and optimizer state permuted with them (deviation 3).
pub fn apply(
    m: &mut SparseModule,
    drop: &[usize],
    grow: &[u32],
    mut seed: impl FnMut(u32) -> (f32, f32, u32),
) -> ReselectStats {
    let dropped_idx: Vec<u32> = drop.iter().map(|&s| m.indices[s]).collect();
    let mut keep = vec![true; m.indices.len()];
    let mut stats = ReselectStats::default();
    for (&s, i) in drop.iter().zip(&dropped_idx) {
        if grow.binary_search(i).is_ok() {
            stats.cancelled += 1;
        } else {
            keep[s] = false;
            stats.dropped += 1;
        }
    }
    // (index, value, AdamW (m, v, age)) of every entry after the change.
    type Entry = (u32, f32, Option<(f32, f32, u32)>);
    let mut entries: Vec<Entry> = Vec::with_capacity(m.indices.len());
    for (s, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
        let st = m.adam.as_ref().map(|a| (a.m[s], a.v[s], a.age[s]));
        entries.push((m.indices[s], m.values[s], st));
    }
    let mut dropped_sorted = dropped_idx.clone();
    dropped_sorted.sort_unstable();
    for &i in grow {
        if dropped_sorted.binary_search(&i).is_ok() {
            continue;
        }
        stats.grown += 1;
        entries.push((i, 0.0, m.adam.as_ref().map(|_| seed(i))));
    }
    entries.sort_unstable_by_key(|e| e.0);
    m.indices = entries.iter().map(|e| e.0).collect();
    m.values = entries.iter().map(|e| e.1).collect();
    if let Some(a) = m.adam.as_mut() {
        a.m = entries.iter().map(|e| e.2.map_or(0.0, |s| s.0)).collect();
        a.v = entries.iter().map(|e| e.2.map_or(0.0, |s| s.1)).collect();
        a.age = entries.iter().map(|e| e.2.map_or(0, |s| s.2)).collect();
    }
    stats
}

/// AdamW state for a slot regrown from window statistics, as if it had been active the whole
/// window: `age = count`, `m = mean g * (1 - beta1^age)`, `v = mean g^2 * (1 - beta2^age)`, with
/// update-scale gradients (deviation 5).
pub fn seed_adam(g_sum: f32, g2_sum: f32, count: u32, h: &AdamW) -> (f32, f32, u32) {
    if count == 0 {
        return (0.0, 0.0, 0);
    }
    let n = count as f64;
    let m = g_sum as f64 / n * (1.0 - h.beta1.powi(count as i32));
    let v = g2_sum as f64 / n * (1.0 - h.beta2.powi(count as i32));
    (m as f32, v as f32, count)
}

/// SpIEL-AG reselection of one module replacing `n` entries.
pub fn reselect_ag(m: &mut SparseModule, window: &AgWindow, n: usize, h: &AdamW) -> ReselectStats {
    let mut n = n.min(m.indices.len());
    loop {
        let drop = prune(&m.values, &m.indices, n);
        let staying: Vec<u32> = {
            let mut k = vec![true; m.indices.len()];
            drop.iter().for_each(|&s| k[s] = false);
            m.indices.iter().zip(&k).filter(|(_, &k)| k).map(|(&i, _)| i).collect()
        };
        let grow_pos = regrow_ag(window, &staying, n);
        if grow_pos.len() < n {
            // Not enough candidates: replace fewer, keeping the count per module fixed.
            n = grow_pos.len();
            continue;
        }
        let mut grow: Vec<(u32, usize)> = grow_pos.iter().map(|&j| (window.candidates[j], j)).collect();
        grow.sort_unstable();
        let grow_idx: Vec<u32> = grow.iter().map(|g| g.0).collect();
        return apply(m, &drop, &grow_idx, |i| {
            let j = grow[grow.binary_search_by_key(&i, |g| g.0).unwrap_or(0)].1;
            seed_adam(window.g_sum[j], window.g2_sum[j], window.count, h)
        });
    }
}

/// SpIEL-MA reselection of one module replacing `n` entries; `in_dim` columns.
pub fn reselect_ma(m: &mut SparseModule, row: &[f32], col: &[f32], n: usize) -> ReselectStats {
    let n = n.min(m.indices.len());
    let grow = regrow_ma(row, col, &m.indices, n);
    // Replace only as many as could be regrown (a nearly full matrix), keeping k fixed.
    let drop = prune(&m.values, &m.indices, grow.len());
    apply(m, &drop, &grow, |_| (0.0, 0.0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(indices: &[u32], values: &[f32], adam: bool) -> SparseModule {
        SparseModule {
            indices: indices.to_vec(),
            values: values.to_vec(),
            adam: adam.then(|| AdamState {
                m: values.iter().map(|v| v * 10.0).collect(),
                v: values.iter().map(|v| v * 100.0).collect(),
                age: vec![7; values.len()],
            }),
        }
    }

    const H: AdamW = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-6,
        weight_decay: 0.0,
    };

    #[test]
    fn budget_is_proportional_and_floored() {
        assert_eq!(split_budget(100, &[300, 100, 600]), vec![30, 10, 60]);
        assert_eq!(split_budget(10, &[3, 3, 3]), vec![3, 3, 3]);
        assert_eq!(split_budget(7, &[10, 10]), vec![3, 3]);
    }

    #[test]
    fn schedule_steps_windows_and_rates() {
        let s = Schedule {
            reselection_steps: 20,
            accumulation_steps: 5,
            rate: 0.2,
            policy: Policy::Linear,
            total: 100,
            end: 100,
            full_first: true,
        };
        let resel: Vec<usize> = (1..=100).filter(|&c| s.is_reselection(c)).collect();
        assert_eq!(resel, vec![20, 40, 60, 80]);
        let window: Vec<usize> = (1..=45).filter(|&c| s.in_window(c)).collect();
        assert_eq!(window, vec![16, 17, 18, 19, 20, 36, 37, 38, 39, 40]);
        assert!(!s.in_window(96), "no window before the end of training");
        assert_eq!(s.fraction(20), 1.0);
        assert!((s.fraction(40) - 0.2 * 0.6).abs() < 1e-12);
        // With an informed initial mask the first reselection is like the others, and none
        // follows update `end` (nor opens a window before it).
        let g = Schedule {
            full_first: false,
            end: 75,
            ..s
        };
        assert!((g.fraction(20) - 0.2 * 0.8).abs() < 1e-12);
        let resel: Vec<usize> = (1..=100).filter(|&c| g.is_reselection(c)).collect();
        assert_eq!(resel, vec![20, 40, 60]);
        assert!(!g.in_window(79));
        let c = Schedule {
            policy: Policy::Cosine,
            ..s
        };
        assert!((c.fraction(20) - 0.2 * (1.0 + (std::f64::consts::PI * 0.2).cos()) / 2.0).abs() < 1e-12);
        assert!((c.fraction(50) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn window_picks_candidates_first_and_accumulates_update_sums() {
        let mut w = AgWindow::new(2);
        w.observe(&[0.1, -5.0, 0.2, 3.0]);
        assert_eq!(w.candidates, vec![1, 3]);
        w.observe(&[9.0, 1.0, 9.0, 1.0]); // second micro-batch of the same update
        w.end_update();
        w.observe(&[0.0, 2.0, 0.0, -1.0]);
        w.end_update();
        assert_eq!(w.g_sum, vec![-4.0 + 2.0, 4.0 - 1.0]);
        assert_eq!(w.g2_sum, vec![16.0 + 4.0, 16.0 + 1.0]);
        assert_eq!(w.count, 2);
    }

    /// Through its hook, a window asks for the dense gradient until it has candidates, then
    /// takes the gradient at them alone, into the same sums.
    #[test]
    fn window_hook_samples_its_candidates_after_the_first_micro_batch() {
        use crate::kernels::sparse::WeightGradHook;
        let hook = WindowHook::new(AgWindow::new(2), None);
        assert_eq!(hook.positions(), None);
        hook.observe_dense(&[0.1, -5.0, 0.2, 3.0], 2, 2);
        assert_eq!(hook.positions(), Some(vec![1, 3]));
        hook.observe_at(&[1.0, 1.0]);
        let mut w = hook.lock();
        w.end_update();
        assert_eq!(w.g_sum, vec![-4.0, 4.0]);
        assert_eq!(w.g2_sum, vec![16.0, 16.0]);
    }

    /// The window holds its candidates for several updates: k slots, not one per matrix entry
    /// (which cost the size of the model in u32 on every AG window).
    #[test]
    fn window_candidates_hold_k_slots_only() {
        let dense: Vec<f32> = (0..10_000).map(|i| ((i * 7919) % 1000) as f32 - 500.0).collect();
        let mut w = AgWindow::new(16);
        w.observe(&dense);
        assert_eq!(w.candidates.len(), 16);
        assert!(w.candidates.capacity() <= 16, "capacity {}", w.candidates.capacity());
    }

    #[test]
    fn prune_drops_smallest_magnitudes() {
        assert_eq!(prune(&[0.5, -0.01, 0.3, 0.02, -0.9], &[1, 2, 3, 4, 5], 2), vec![1, 3]);
        // Ties broken by lower index.
        assert_eq!(prune(&[0.1, 0.1, 0.1], &[7, 3, 5], 1), vec![1]);
    }

    #[test]
    fn ag_regrows_by_gsum_excluding_staying_and_cancels_drop_and_regrow() {
        // Active: 10 (small, dropped), 20 (big, stays), 30 (small, dropped).
        let mut m = module(&[10, 20, 30], &[0.01, 0.9, -0.02], true);
        let w = AgWindow {
            candidates: vec![5, 10, 20, 40],
            g_sum: vec![0.5, 2.0, 100.0, 1.0],
            g2_sum: vec![0.25, 4.0, 1e4, 1.0],
            current: vec![0.0; 4],
            count: 5,
            k: 4,
        };
        let stats = reselect_ag(&mut m, &w, 2, &H);
        // 20 stays so it is not a candidate; best two of {5, 10, 40} by |g_sum|: 10 and 40.
        assert_eq!(m.indices, vec![10, 20, 40]);
        assert_eq!(
            stats,
            ReselectStats {
                dropped: 1,
                grown: 1,
                cancelled: 1
            }
        );
        // 10 was dropped and regrown: keeps its value and optimizer state.
        assert_eq!(m.values, vec![0.01, 0.9, 0.0]);
        let a = m.adam.as_ref().unwrap();
        assert_eq!((a.m[0], a.age[0]), (0.01 * 10.0, 7));
        assert_eq!((a.m[1], a.age[1]), (9.0, 7));
        // 40 is new: seeded from the window (count 5).
        let (sm, sv, age) = seed_adam(1.0, 1.0, 5, &H);
        assert_eq!((a.m[2], a.v[2], a.age[2]), (sm, sv, age));
    }

    #[test]
    fn adam_seeding_formula() {
        let (m, v, age) = seed_adam(2.0, 8.0, 4, &H);
        assert_eq!(age, 4);
        assert!((m as f64 - 0.5 * (1.0 - 0.9f64.powi(4))).abs() < 1e-7);
        assert!((v as f64 - 2.0 * (1.0 - 0.999f64.powi(4))).abs() < 1e-7);
        // After bias correction at age 4 the slot's moments equal the window means.
        assert!(((m as f64) / (1.0 - 0.9f64.powi(4)) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn ma_regrows_top_row_times_column_among_inactive() {
        // 3 x 4; R and C give scores R[r] * C[c].
        let row = [1.0f32, 3.0, 2.0];
        let col = [1.0f32, 0.5, 4.0, 2.0];
        // Active: (1,2) = 6 (best score) and (0,0) = 4.
        let mut m = module(&[6, 0], &[0.5, 0.001], false);
        m.indices.sort();
        m.values = vec![0.001, 0.5];
        let stats = reselect_ma(&mut m, &row, &col, 1);
        // (0,0) dropped (smallest |value|); best inactive: (2,2) score 8 (not (1,2), active).
        assert_eq!(m.indices, vec![6, 10]);
        assert_eq!(m.values, vec![0.5, 0.0]);
        assert_eq!(
            stats,
            ReselectStats {
                dropped: 1,
                grown: 1,
                cancelled: 0
            }
        );
        // Brute force agrees on random cases.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..20 {
            let (o, i) = (rng.gen_range(1..9), rng.gen_range(1..9));
            let row: Vec<f32> = (0..o).map(|_| rng.gen_range(0.0..1.0)).collect();
            let col: Vec<f32> = (0..i).map(|_| rng.gen_range(0.0..1.0)).collect();
            let mut active: Vec<u32> = (0..(o * i) as u32).filter(|_| rng.gen_bool(0.3)).collect();
            active.sort();
            let n = rng.gen_range(0..5);
            let mut all: Vec<(f32, u32)> = (0..(o * i) as u32)
                .filter(|x| active.binary_search(x).is_err())
                .map(|x| (row[x as usize / i] * col[x as usize % i], x))
                .collect();
            all.sort_by(|a, b| better(*a, *b));
            let mut want: Vec<u32> = all.into_iter().take(n).map(|x| x.1).collect();
            want.sort();
            assert_eq!(regrow_ma(&row, &col, &active, n), want);
        }
    }

    #[test]
    fn counts_conserved_and_indices_sorted_unique_under_random_reselections() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let numel = 500u32;
        let mut idx: Vec<u32> = (0..numel).filter(|_| rng.gen_bool(0.1)).collect();
        idx.sort();
        let k = idx.len();
        let vals: Vec<f32> = (0..k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut m = module(&idx, &vals, true);
        for round in 0..10 {
            let dense: Vec<f32> = (0..numel).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut w = AgWindow::new(k);
            w.observe(&dense);
            w.end_update();
            let n = rng.gen_range(0..=k);
            reselect_ag(&mut m, &w, n, &H);
            assert_eq!(m.indices.len(), k, "round {round}");
            assert!(m.indices.windows(2).all(|p| p[0] < p[1]));
            assert_eq!(m.values.len(), k);
            assert_eq!(m.adam.as_ref().unwrap().m.len(), k);
            let row: Vec<f32> = (0..20).map(|_| rng.gen_range(0.0..1.0)).collect();
            let col: Vec<f32> = (0..25).map(|_| rng.gen_range(0.0..1.0)).collect();
            let mut mm = SparseModule {
                adam: None,
                ..m.clone()
            };
            reselect_ma(&mut mm, &row, &col, n);
            assert_eq!(mm.indices.len(), k);
            assert!(mm.indices.windows(2).all(|p| p[0] < p[1]));
        }
    }
}
