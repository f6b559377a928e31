//! A run's metrics: one [`StepRecord`] per update in metrics.jsonl, and the loss plot drawn
//! from them.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::formats::fsutil;
use crate::formats::plot::{line_chart, Series};
use crate::train::select::ReselectStats;
use crate::{Error, Result};

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepRecord {
    /// Update number (0 = before training).
    pub step: usize,
    /// Mean training loss of the update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Learning rate used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Real tokens processed per second in this update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Seconds since the start of the run (excluding evaluation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_secs: Option<f64>,
    /// Held-out loss after this update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Reselection after this update: totals over modules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reselection: Option<ReselectStats>,
}

/// Append records to metrics.jsonl (flushed per line).
pub(crate) fn append_metrics(path: &Path, rec: &StepRecord) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(rec).map_err(|e| Error::Invalid(e.to_string()))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// Keep only the metrics of steps `<= step` (after resuming from that step's checkpoint).
pub(crate) fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepRecord>(l).is_ok_and(|r| r.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    fsutil::write_atomic(path, kept.as_bytes())
}

/// Read metrics.jsonl.
pub fn read_metrics(path: &Path) -> Result<Vec<StepRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1))))
        .collect()
}

/// An exponential moving average of `points` (`m = beta m + (1 - beta) y`), divided by
/// `1 - beta^n` so the first points are not pulled towards zero (as TensorBoard smooths).
pub fn ema(points: &[(f64, f64)], beta: f64) -> Vec<(f64, f64)> {
    let mut m = 0.0;
    let mut weight = 0.0;
    points
        .iter()
        .map(|&(x, y)| {
            m = beta * m + (1.0 - beta) * y;
            weight = beta * weight + (1.0 - beta);
            (x, m / weight)
        })
        .collect()
}

/// Draw `loss.png` (training loss per update, its moving average, and held-out loss against
/// step) from metrics.jsonl.
pub fn plot_losses(metrics: &Path, png: &Path, title: &str) -> Result<()> {
    let recs = read_metrics(metrics)?;
    let train: Vec<(f64, f64)> = recs.iter().filter_map(|r| r.loss.map(|l| (r.step as f64, l))).collect();
    let eval: Vec<(f64, f64)> = recs
        .iter()
        .filter_map(|r| r.eval_loss.map(|l| (r.step as f64, l)))
        .collect();
    let smoothed = ema(&train, 0.9);
    let mut series = vec![
        Series {
            name: "train loss".into(),
            points: train,
        },
        Series {
            name: "train loss, EMA 0.9".into(),
            points: smoothed,
        },
    ];
    if !eval.is_empty() {
        series.push(Series {
            name: "held-out loss".into(),
            points: eval,
        });
    }
    line_chart(png, title, "update", "mean NLL per response token", &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_is_debiased_and_follows_a_step() {
        let pts: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, if i < 10 { 2.0 } else { 1.0 })).collect();
        let e = ema(&pts, 0.9);
        // A constant stays itself from the first point on.
        assert!(e[..10].iter().all(|p| (p.1 - 2.0).abs() < 1e-12));
        // After the step it moves towards 1 monotonically, and is close after 40 points.
        assert!(e[10..].windows(2).all(|w| w[1].1 < w[0].1));
        assert!((e[49].1 - 1.0).abs() < 0.02);
        // Reference: the plain recurrence, divided by 1 - 0.9^n.
        let (mut m, mut n) = (0.0, 0);
        for (p, want) in pts.iter().zip(&e) {
            m = 0.9 * m + 0.1 * p.1;
            n += 1;
            assert!((m / (1.0 - 0.9f64.powi(n)) - want.1).abs() < 1e-12);
        }
    }
}
