//! The method comparison (`spiel compare`): one TOML names the shared training setup, the
//! methods, the seeds and the evaluations; every method trains on the same split with the same
//! budget (LoRA rank r, and as many sparse deltas as rank-r LoRA has parameters), and the results
//! become one table (`results.md`) and one plot of held-out loss against step (`curves.png`).
//! The front end runs each training in its own process (so its peak memory is its own) and the
//! evaluations in-process; this module holds the config, the per-run record and the report.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::formats::plot::{self, Series};
use crate::model::adapter::Method;
use crate::train::config::TrainConfig;
use crate::{formats::fsutil, Error, Result};

/// `compare` config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    /// Output directory: one run directory per seed and method, plus the report.
    pub out: PathBuf,
    /// Methods to train, in table order.
    pub methods: Vec<Method>,
    /// Training seeds (data order, indices, initialisation); the held-out split is the same for
    /// all of them, fixed by `split_seed`.
    pub seeds: Vec<u64>,
    /// Seed of the train / held-out split (shared by every run).
    #[serde(default)]
    pub split_seed: u64,
    /// Shared training settings (any `spiel train` config field but `method`, `out` and `seed`).
    pub train: toml::Table,
    /// Evaluations after training.
    #[serde(default)]
    pub eval: EvalPlan,
}

/// Which benchmark evaluations to run on the base model and every trained one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalPlan {
    /// MMLU questions (a fixed sample); 0 skips MMLU.
    pub mmlu_limit: usize,
    /// MMLU exemplars per question.
    pub mmlu_shots: usize,
    /// GSM8K problems (the first N); 0 skips GSM8K.
    pub gsm8k_limit: usize,
    /// GSM8K exemplars per problem.
    pub gsm8k_shots: usize,
    /// Longest GSM8K answer in tokens.
    pub gsm8k_max_new_tokens: usize,
}

impl Default for EvalPlan {
    fn default() -> EvalPlan {
        EvalPlan {
            mmlu_limit: 0,
            mmlu_shots: 5,
            gsm8k_limit: 0,
            gsm8k_shots: 8,
            gsm8k_max_new_tokens: 256,
        }
    }
}

impl CompareConfig {
    /// Read and check a config file; errors name the file and the field.
    pub fn from_toml_file(path: &Path) -> Result<CompareConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: CompareConfig =
            toml::from_str(&text).map_err(|e| Error::format(path, crate::train::config::toml_message(&text, &e)))?;
        if c.methods.is_empty() || c.seeds.is_empty() {
            return Err(Error::format(path, "`methods` and `seeds` must each name at least one"));
        }
        for k in ["method", "out", "seed"] {
            if c.train.contains_key(k) {
                return Err(Error::format(
                    path,
                    format!("[train] must not set `{k}`: compare sets it per run"),
                ));
            }
        }
        // Every run's config must be valid now, not an hour in.
        c.run_config(c.methods[0], c.seeds[0])
            .map_err(|e| Error::format(path, format!("[train]: {e}")))?;
        Ok(c)
    }

    /// The training config of one run.
    pub fn run_config(&self, method: Method, seed: u64) -> Result<TrainConfig> {
        let mut t = self.train.clone();
        t.insert("method".into(), method.as_str().into());
        t.insert(
            "out".into(),
            self.run_dir(method, seed).to_string_lossy().into_owned().into(),
        );
        t.insert("seed".into(), (seed as i64).into());
        t.insert("split_seed".into(), (self.split_seed as i64).into());
        let text = toml::to_string(&t).map_err(|e| Error::Invalid(e.to_string()))?;
        TrainConfig::from_toml_str(&text)
    }

    /// Where one run lives.
    pub fn run_dir(&self, method: Method, seed: u64) -> PathBuf {
        self.out.join(format!("seed-{seed}")).join(method.as_str())
    }
}

/// What one finished run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// The method (`None` for the untouched base model).
    pub method: Option<Method>,
    /// Training seed.
    pub seed: u64,
    /// Trainable parameters.
    pub trainable: usize,
    /// Seconds of training (evaluation excluded).
    pub train_secs: f64,
    /// Peak resident memory of the training process, MiB.
    pub peak_rss_mib: f64,
    /// Held-out response NLL after training.
    pub heldout_loss: f64,
    /// MMLU accuracy, if run.
    pub mmlu: Option<f64>,
    /// GSM8K accuracy, if run.
    pub gsm8k: Option<f64>,
    /// (step, held-out loss) over training.
    pub curve: Vec<(usize, f64)>,
}

fn mean_spread(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, if v.len() > 1 { (hi - lo) / 2.0 } else { 0.0 })
}

fn cell(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, s) = mean_spread(v);
    if v.len() > 1 {
        format!("{m:.digits$} ± {s:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

/// The report: a table with one row per method (mean ± half the range over seeds), the base
/// model first, then every run on its own row.
pub fn render_markdown(cfg: &CompareConfig, base: &RunResult, runs: &[RunResult]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Seeds {:?}, split seed {}; cells are the mean ± half the range over seeds.\n\n",
        cfg.seeds, cfg.split_seed
    ));
    s.push_str("| method | trainable params | train time (s) | peak memory (MiB) | held-out loss | MMLU | GSM8K |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    let opt = |v: Option<f64>| v.map(|x| vec![x]).unwrap_or_default();
    s.push_str(&format!(
        "| base model | 0 | - | - | {} | {} | {} |\n",
        cell(&[base.heldout_loss], 4),
        cell(&opt(base.mmlu), 3),
        cell(&opt(base.gsm8k), 3)
    ));
    for &m in &cfg.methods {
        let rs: Vec<&RunResult> = runs.iter().filter(|r| r.method == Some(m)).collect();
        let col = |f: &dyn Fn(&RunResult) -> Option<f64>| rs.iter().filter_map(|r| f(r)).collect::<Vec<f64>>();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            m.as_str(),
            rs.first().map(|r| r.trainable).unwrap_or(0),
            cell(&col(&|r| Some(r.train_secs)), 0),
            cell(&col(&|r| Some(r.peak_rss_mib)), 0),
            cell(&col(&|r| Some(r.heldout_loss)), 4),
            cell(&col(&|r| r.mmlu), 3),
            cell(&col(&|r| r.gsm8k), 3),
        ));
    }
    s.push_str(
        "\nEvery run:\n\n| method | seed | train time (s) | peak memory (MiB) | held-out loss | MMLU | GSM8K |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    let o = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    for r in runs {
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.4} | {} | {} |\n",
            r.method.map(Method::as_str).unwrap_or("base"),
            r.seed,
            r.train_secs,
            r.peak_rss_mib,
            r.heldout_loss,
            o(r.mmlu),
            o(r.gsm8k)
        ));
    }
    s
}

/// Write `results.md`, `results.json` and `curves.png` (held-out loss against step, one line per
/// run) into `cfg.out`.
pub fn write_report(cfg: &CompareConfig, base: &RunResult, runs: &[RunResult]) -> Result<()> {
    let md = format!("# spiel compare\n\n{}", render_markdown(cfg, base, runs));
    fsutil::write_atomic(&cfg.out.join("results.md"), md.as_bytes())?;
    let json = serde_json::json!({"base": base, "runs": runs});
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Invalid(e.to_string()))?;
    fsutil::write_atomic(&cfg.out.join("results.json"), text.as_bytes())?;
    let series: Vec<Series> = runs
        .iter()
        .map(|r| Series {
            name: format!("{} s{}", r.method.map(Method::as_str).unwrap_or("base"), r.seed),
            points: r.curve.iter().map(|&(x, y)| (x as f64, y)).collect(),
        })
        .collect();
    plot::line_chart(
        &cfg.out.join("curves.png"),
        "held-out loss",
        "step",
        "response NLL",
        &series,
    )
}

/// Read `(step, eval_loss)` pairs from a run's metrics.jsonl.
pub fn read_curve(metrics: &Path) -> Result<Vec<(usize, f64)>> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| Error::format(metrics, format!("line {}: {e}", i + 1)))?;
        if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["eval_loss"].as_f64()) {
            out.push((step as usize, loss));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CompareConfig {
        toml::from_str(
            r#"
out = "runs/c"
methods = ["spiel-ag", "lora"]
seeds = [0, 1]
[train]
steps = 3
lora_rank = 8
lora_equivalent_rank = 8
"#,
        )
        .unwrap()
    }

    #[test]
    fn run_configs_share_everything_but_method_seed_and_out() {
        let c = cfg();
        let a = c.run_config(Method::SpielAg, 0).unwrap();
        let b = c.run_config(Method::Lora, 1).unwrap();
        assert_eq!((a.steps, b.steps), (3, 3));
        assert_eq!((a.seed, b.seed), (0, 1));
        assert_eq!(a.split_seed, b.split_seed);
        assert_eq!(a.out, PathBuf::from("runs/c/seed-0/spiel-ag"));
        assert_eq!(b.method, Method::Lora);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for (text, needle) in [
            ("out='x'\nmethods=['lora']\nseeds=[0]\n[train]\nseed=3\n", "`seed`"),
            ("out='x'\nmethods=['lora']\nseeds=[0]\n[train]\nstepz=3\n", "stepz"),
            ("out='x'\nmethods=[]\nseeds=[0]\n[train]\n", "at least one"),
            ("out='x'\nmethods=['dora']\nseeds=[0]\n[train]\n", "dora"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = CompareConfig::from_toml_file(&p).unwrap_err().to_string();
            assert!(e.contains("c.toml") && e.contains(needle), "{e}");
        }
    }

    #[test]
    fn table_has_base_and_mean_with_spread() {
        let c = cfg();
        let r = |m, seed, loss| RunResult {
            method: m,
            seed,
            trainable: 100,
            train_secs: 10.0,
            peak_rss_mib: 500.0,
            heldout_loss: loss,
            mmlu: Some(0.25),
            gsm8k: None,
            curve: vec![(0, 2.0), (3, loss)],
        };
        let base = r(None, 0, 2.0);
        let runs = [
            r(Some(Method::SpielAg), 0, 1.5),
            r(Some(Method::SpielAg), 1, 1.7),
            r(Some(Method::Lora), 0, 1.8),
            r(Some(Method::Lora), 1, 1.8),
        ];
        let md = render_markdown(&c, &base, &runs);
        assert!(md.contains("| base model | 0 | - | - | 2.0000 | 0.250 | - |"), "{md}");
        assert!(
            md.contains("| spiel-ag | 100 | 10 ± 0 | 500 ± 0 | 1.6000 ± 0.1000 | 0.250 ± 0.000 | - |"),
            "{md}"
        );
        assert!(md.contains("| lora | 100 |"), "{md}");
        assert_eq!(md.matches("\n| spiel-ag | ").count(), 3, "{md}");
    }
}
