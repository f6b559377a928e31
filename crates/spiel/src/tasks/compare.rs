//! The method comparison (`spiel compare`): one TOML names the shared training setup, the arms
//! (methods, and controls: a method with its own overrides), the seeds and the evaluations; every
//! arm trains on the same split with the same budget (LoRA rank r, and as many sparse deltas as
//! rank-r LoRA has parameters), and the results become one table (`results.md`) and one plot of
//! held-out loss against step (`curves.png`).
//!
//! A study adds a learning-rate grid per arm (`[sweep]`: each rate trained with the first seed,
//! the one with the lowest final held-out loss kept for every seed), a test split (`[train]
//! test`) that only the report reads, paired differences against a `baseline` arm, and a
//! forgetting check (`[eval] forgetting_limit`: NLL on GSM8K solutions). The front end runs each
//! training in its own process (so its peak memory is its own) and the evaluations in-process;
//! this module holds the config, the per-run record and the report.

use std::collections::BTreeMap;
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
    /// Methods to train, in table order (each an arm named after it).
    pub methods: Vec<Method>,
    /// Extra arms after the methods, such as controls.
    #[serde(default)]
    pub control: Vec<Control>,
    /// Learning-rate grid by arm name, chosen on the held-out (validation) loss of the first seed.
    #[serde(default)]
    pub sweep: BTreeMap<String, Vec<f64>>,
    /// The arm every other is compared with, seed by seed (paired differences).
    #[serde(default)]
    pub baseline: Option<String>,
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
    /// Forgetting: response NLL on the first N GSM8K worked solutions; 0 skips it.
    pub forgetting_limit: usize,
}

/// An arm beyond the plain methods: a method trained with overrides of `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// The arm's name (its row and run directory).
    pub name: String,
    /// The method it trains.
    pub method: Method,
    /// Train at the learning rate chosen for this arm's sweep.
    #[serde(default)]
    pub lr_from: Option<String>,
    /// Fields that replace `[train]`'s for this arm.
    #[serde(default)]
    pub train: toml::Table,
}

/// One row of the comparison: a name, a method and its training overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct Arm {
    /// Row and directory name.
    pub name: String,
    /// The method.
    pub method: Method,
    /// Overrides of `[train]`.
    pub train: toml::Table,
    /// The arm whose chosen learning rate this one uses.
    pub lr_from: Option<String>,
}

impl Default for EvalPlan {
    fn default() -> EvalPlan {
        EvalPlan {
            mmlu_limit: 0,
            mmlu_shots: 5,
            gsm8k_limit: 0,
            gsm8k_shots: 8,
            gsm8k_max_new_tokens: 256,
            forgetting_limit: 0,
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
        c.check().map_err(|e| Error::format(path, e))?;
        // Every run's config must be valid now, not an hour in.
        for arm in c.arms() {
            c.run_config(&arm, c.seeds[0], None)
                .map_err(|e| Error::format(path, format!("arm `{}`: {e}", arm.name)))?;
        }
        Ok(c)
    }

    fn check(&self) -> std::result::Result<(), String> {
        for (what, t) in std::iter::once(("[train]".to_string(), &self.train))
            .chain(self.control.iter().map(|c| (format!("control `{}`", c.name), &c.train)))
        {
            for k in ["method", "out", "seed", "split_seed"] {
                if t.contains_key(k) {
                    return Err(format!("{what} must not set `{k}`: compare sets it per run"));
                }
            }
        }
        let arms = self.arms();
        let names: Vec<&str> = arms.iter().map(|a| a.name.as_str()).collect();
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) || n.is_empty() || n.contains(['/', '\\', '.']) {
                return Err(format!("arm name `{n}` is empty, repeated or has a path character"));
            }
        }
        for (name, grid) in &self.sweep {
            if !names.contains(&name.as_str()) {
                return Err(format!("[sweep] `{name}` is not an arm ({})", names.join(", ")));
            }
            if grid.is_empty() || grid.iter().any(|&lr| !(lr > 0.0 && lr.is_finite())) {
                return Err(format!(
                    "[sweep] `{name}`: learning rates must be positive and at least one"
                ));
            }
        }
        for a in &arms {
            if let Some(from) = &a.lr_from {
                if !self.sweep.contains_key(from) {
                    return Err(format!("control `{}`: lr_from `{from}` has no [sweep] grid", a.name));
                }
            }
        }
        if let Some(b) = &self.baseline {
            if !names.contains(&b.as_str()) {
                return Err(format!("baseline `{b}` is not an arm ({})", names.join(", ")));
            }
        }
        Ok(())
    }

    /// The arms in table order: the methods, then the controls.
    pub fn arms(&self) -> Vec<Arm> {
        self.methods
            .iter()
            .map(|&m| Arm {
                name: m.as_str().to_string(),
                method: m,
                train: toml::Table::new(),
                lr_from: None,
            })
            .chain(self.control.iter().map(|c| Arm {
                name: c.name.clone(),
                method: c.method,
                train: c.train.clone(),
                lr_from: c.lr_from.clone(),
            }))
            .collect()
    }

    /// The training config of one run; `lr` overrides the configured learning rate.
    pub fn run_config(&self, arm: &Arm, seed: u64, lr: Option<f64>) -> Result<TrainConfig> {
        let mut t = self.train.clone();
        t.extend(arm.train.clone());
        t.insert("method".into(), arm.method.as_str().into());
        t.insert(
            "out".into(),
            self.run_dir(arm, seed, lr).to_string_lossy().into_owned().into(),
        );
        t.insert("seed".into(), (seed as i64).into());
        t.insert("split_seed".into(), (self.split_seed as i64).into());
        if let Some(lr) = lr {
            t.insert("lr".into(), lr.into());
        }
        let text = toml::to_string(&t).map_err(|e| Error::Invalid(e.to_string()))?;
        TrainConfig::from_toml_str(&text)
    }

    /// Where one run lives: a swept arm's first-seed runs under `sweep/ARM/lr-LR` (the chosen
    /// one is also that seed's final run), every other under `seed-S/ARM`.
    pub fn run_dir(&self, arm: &Arm, seed: u64, lr: Option<f64>) -> PathBuf {
        match (self.sweep.contains_key(&arm.name), lr) {
            (true, Some(lr)) if seed == self.seeds[0] => {
                self.out.join("sweep").join(&arm.name).join(format!("lr-{lr:e}"))
            }
            _ => self.out.join(format!("seed-{seed}")).join(&arm.name),
        }
    }
}

/// One point of a learning-rate sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    /// The arm.
    pub arm: String,
    /// The learning rate.
    pub lr: f64,
    /// Final held-out (validation) loss of the first seed's run.
    pub validation_loss: f64,
}

/// The rate with the lowest validation loss among `points` of `arm` (the first on ties), and
/// whether it sits on the grid's edge (then the grid should be widened).
pub fn choose_lr(points: &[SweepPoint], arm: &str) -> Option<(f64, bool)> {
    let mut pts: Vec<&SweepPoint> = points.iter().filter(|p| p.arm == arm).collect();
    pts.sort_by(|a, b| a.lr.total_cmp(&b.lr));
    let best = pts
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.validation_loss.total_cmp(&b.1.validation_loss).then(a.0.cmp(&b.0)))?;
    let edge = pts.len() > 1 && (best.0 == 0 || best.0 == pts.len() - 1);
    Some((best.1.lr, edge))
}

/// What one finished run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// The arm (empty for the untouched base model).
    #[serde(default)]
    pub arm: String,
    /// The method (`None` for the untouched base model).
    pub method: Option<Method>,
    /// The learning rate it trained at (`None`: the method's default, or the base model).
    #[serde(default)]
    pub lr: Option<f64>,
    /// Training seed.
    pub seed: u64,
    /// Trainable parameters.
    pub trainable: usize,
    /// Seconds of training (evaluation excluded).
    pub train_secs: f64,
    /// Peak resident memory of the training process, MiB.
    pub peak_rss_mib: f64,
    /// Held-out (validation) response NLL after training.
    pub heldout_loss: f64,
    /// Test-split response NLL after training, if the runs have a test split.
    #[serde(default)]
    pub test_loss: Option<f64>,
    /// Response NLL on GSM8K solutions (forgetting), if run.
    #[serde(default)]
    pub forgetting_nll: Option<f64>,
    /// MMLU accuracy, if run.
    pub mmlu: Option<f64>,
    /// GSM8K accuracy, if run.
    pub gsm8k: Option<f64>,
    /// (step, held-out loss) over training.
    pub curve: Vec<(usize, f64)>,
}

/// Mean and sample standard deviation (0 for one value).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = match v.len() {
        0 | 1 => 0.0,
        k => v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1) as f64,
    };
    (mean, var.sqrt())
}

fn cell(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, s) = mean_sd(v);
    if v.len() > 1 {
        format!("{m:.digits$} ± {s:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

fn lr_text(lr: Option<f64>) -> String {
    lr.map(|x| format!("{x:e}")).unwrap_or_else(|| "default".into())
}

/// The loss a run is reported on: its test loss where the runs have a test split, else its
/// held-out loss.
fn reported(r: &RunResult) -> f64 {
    r.test_loss.unwrap_or(r.heldout_loss)
}

/// The report: the sweep (if any), a table with one row per arm (mean ± sample standard
/// deviation over seeds, and the paired difference to the baseline arm), the base model first,
/// then every run on its own row.
pub fn render_markdown(cfg: &CompareConfig, base: &RunResult, runs: &[RunResult], sweep: &[SweepPoint]) -> String {
    let mut s = String::new();
    let has_test = runs.iter().any(|r| r.test_loss.is_some());
    let reported_name = if has_test { "test" } else { "held-out" };
    s.push_str(&format!(
        "Seeds {:?}, split seed {}; cells are the mean ± the sample standard deviation over seeds.\n\n",
        cfg.seeds, cfg.split_seed
    ));
    if !sweep.is_empty() {
        s.push_str(&format!(
            "Learning rates, each trained with seed {} and chosen on its final held-out (validation) loss:\n\n",
            cfg.seeds[0]
        ));
        s.push_str("| arm | lr | validation loss | |\n|---|---:|---:|---|\n");
        for arm in cfg.arms() {
            let Some((chosen, edge)) = choose_lr(sweep, &arm.name) else {
                continue;
            };
            let mut pts: Vec<&SweepPoint> = sweep.iter().filter(|p| p.arm == arm.name).collect();
            pts.sort_by(|a, b| a.lr.total_cmp(&b.lr));
            for p in pts {
                let mark = match (p.lr == chosen, edge) {
                    (true, true) => "chosen (on the grid's edge)",
                    (true, false) => "chosen",
                    _ => "",
                };
                s.push_str(&format!(
                    "| {} | {:e} | {:.4} | {mark} |\n",
                    arm.name, p.lr, p.validation_loss
                ));
            }
        }
        s.push('\n');
    }
    let delta_head = match &cfg.baseline {
        Some(b) => format!(" {reported_name} loss - {b} (paired) |"),
        None => String::new(),
    };
    s.push_str(&format!(
        "| arm | lr | trainable params | train time (s) | peak memory (MiB) | held-out loss | test loss |{delta_head} GSM8K NLL (forgetting) | MMLU | GSM8K |\n"
    ));
    s.push_str(&format!(
        "|---|---:|---:|---:|---:|---:|---:|{}---:|---:|---:|\n",
        if cfg.baseline.is_some() { "---:|" } else { "" }
    ));
    let opt = |v: Option<f64>| v.map(|x| vec![x]).unwrap_or_default();
    s.push_str(&format!(
        "| base model | - | 0 | - | - | {} | {} |{} {} | {} | {} |\n",
        cell(&[base.heldout_loss], 4),
        cell(&opt(base.test_loss), 4),
        if cfg.baseline.is_some() { " - |" } else { "" },
        cell(&opt(base.forgetting_nll), 4),
        cell(&opt(base.mmlu), 3),
        cell(&opt(base.gsm8k), 3)
    ));
    let baseline: Vec<&RunResult> = match &cfg.baseline {
        Some(b) => runs.iter().filter(|r| &r.arm == b).collect(),
        None => Vec::new(),
    };
    for arm in cfg.arms() {
        let rs: Vec<&RunResult> = runs.iter().filter(|r| r.arm == arm.name).collect();
        let col = |f: &dyn Fn(&RunResult) -> Option<f64>| rs.iter().filter_map(|r| f(r)).collect::<Vec<f64>>();
        let delta = match &cfg.baseline {
            Some(b) if *b == arm.name => " - |".to_string(),
            Some(_) => {
                let diffs: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| {
                        baseline
                            .iter()
                            .find(|x| x.seed == r.seed)
                            .map(|x| reported(r) - reported(x))
                    })
                    .collect();
                format!(" {} |", cell(&diffs, 4))
            }
            None => String::new(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |{delta} {} | {} | {} |\n",
            arm.name,
            lr_text(rs.first().and_then(|r| r.lr)),
            rs.first().map(|r| r.trainable).unwrap_or(0),
            cell(&col(&|r| Some(r.train_secs)), 0),
            cell(&col(&|r| Some(r.peak_rss_mib)), 0),
            cell(&col(&|r| Some(r.heldout_loss)), 4),
            cell(&col(&|r| r.test_loss), 4),
            cell(&col(&|r| r.forgetting_nll), 4),
            cell(&col(&|r| r.mmlu), 3),
            cell(&col(&|r| r.gsm8k), 3),
        ));
    }
    s.push_str(
        "\nEvery run:\n\n| arm | lr | seed | train time (s) | peak memory (MiB) | held-out loss | test loss | GSM8K NLL | MMLU | GSM8K |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let o = |v: Option<f64>, d: usize| v.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "-".into());
    for r in runs {
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.4} | {} | {} | {} | {} |\n",
            r.arm,
            lr_text(r.lr),
            r.seed,
            r.train_secs,
            r.peak_rss_mib,
            r.heldout_loss,
            o(r.test_loss, 4),
            o(r.forgetting_nll, 4),
            o(r.mmlu, 3),
            o(r.gsm8k, 3)
        ));
    }
    s
}

/// Write `results.md`, `results.json` and `curves.png` (held-out loss against step, one line per
/// run) into `cfg.out`.
pub fn write_report(cfg: &CompareConfig, base: &RunResult, runs: &[RunResult], sweep: &[SweepPoint]) -> Result<()> {
    let md = format!("# spiel compare\n\n{}", render_markdown(cfg, base, runs, sweep));
    fsutil::write_atomic(&cfg.out.join("results.md"), md.as_bytes())?;
    let json = serde_json::json!({"base": base, "runs": runs, "sweep": sweep});
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Invalid(e.to_string()))?;
    fsutil::write_atomic(&cfg.out.join("results.json"), text.as_bytes())?;
    let series: Vec<Series> = runs
        .iter()
        .map(|r| Series {
            name: format!("{} s{}", r.arm, r.seed),
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
        let arms = c.arms();
        let a = c.run_config(&arms[0], 0, None).unwrap();
        let b = c.run_config(&arms[1], 1, None).unwrap();
        assert_eq!((a.steps, b.steps), (3, 3));
        assert_eq!((a.seed, b.seed), (0, 1));
        assert_eq!(a.split_seed, b.split_seed);
        assert_eq!(a.out, PathBuf::from("runs/c/seed-0/spiel-ag"));
        assert_eq!(b.method, Method::Lora);
    }

    fn study() -> CompareConfig {
        toml::from_str(
            r#"
out = "runs/s"
methods = ["spiel-ag", "lora"]
seeds = [1, 2]
baseline = "lora"
[sweep]
spiel-ag = [1e-4, 3e-4]
[[control]]
name = "ag-fixed"
method = "spiel-ag"
lr_from = "spiel-ag"
train = { reselection_end = 0.0 }
[train]
steps = 3
test = 5
"#,
        )
        .unwrap()
    }

    #[test]
    fn sweeps_share_the_first_seed_run_and_controls_override_train() {
        let c = study();
        c.check().unwrap();
        let arms = c.arms();
        assert_eq!(
            arms.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
            ["spiel-ag", "lora", "ag-fixed"]
        );
        let swept = c.run_config(&arms[0], 1, Some(3e-4)).unwrap();
        assert_eq!(swept.out, PathBuf::from("runs/s/sweep/spiel-ag/lr-3e-4"));
        assert_eq!(swept.lr, Some(3e-4));
        assert_eq!(swept.test, 5);
        let second = c.run_config(&arms[0], 2, Some(3e-4)).unwrap();
        assert_eq!(second.out, PathBuf::from("runs/s/seed-2/spiel-ag"));
        let control = c.run_config(&arms[2], 1, Some(1e-4)).unwrap();
        assert_eq!(control.out, PathBuf::from("runs/s/seed-1/ag-fixed"));
        assert_eq!((control.reselection_end, control.method), (0.0, Method::SpielAg));
        let pts = |v: &[(f64, f64)]| -> Vec<SweepPoint> {
            v.iter()
                .map(|&(lr, l)| SweepPoint {
                    arm: "spiel-ag".into(),
                    lr,
                    validation_loss: l,
                })
                .collect()
        };
        assert_eq!(
            choose_lr(&pts(&[(3e-4, 1.5), (1e-4, 1.6), (1e-3, 1.7)]), "spiel-ag"),
            Some((3e-4, false))
        );
        assert_eq!(
            choose_lr(&pts(&[(3e-4, 1.5), (1e-4, 1.4)]), "spiel-ag"),
            Some((1e-4, true))
        );
        assert_eq!(choose_lr(&pts(&[]), "spiel-ag"), None);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let head = "out='x'\nmethods=['lora']\nseeds=[0]\n";
        for (text, needle) in [
            (format!("{head}[train]\nseed=3\n"), "`seed`"),
            (format!("{head}[train]\nstepz=3\n"), "stepz"),
            ("out='x'\nmethods=[]\nseeds=[0]\n[train]\n".to_string(), "at least one"),
            ("out='x'\nmethods=['dora']\nseeds=[0]\n[train]\n".to_string(), "dora"),
            (format!("{head}[sweep]\nspiel-ag=[1e-3]\n[train]\n"), "not an arm"),
            (format!("{head}[sweep]\nlora=[-1.0]\n[train]\n"), "positive"),
            (format!("{head}baseline='full'\n[train]\n"), "baseline `full`"),
            (
                format!("{head}[[control]]\nname='lora'\nmethod='lora'\n[train]\n"),
                "repeated",
            ),
            (
                format!("{head}[[control]]\nname='c'\nmethod='lora'\nlr_from='lora'\n[train]\n"),
                "no [sweep] grid",
            ),
            (
                format!("{head}[[control]]\nname='c'\nmethod='lora'\ntrain={{stepz=1}}\n[train]\n"),
                "arm `c`",
            ),
        ] {
            std::fs::write(&p, &text).unwrap();
            let e = CompareConfig::from_toml_file(&p).unwrap_err().to_string();
            assert!(e.contains("c.toml") && e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn table_has_base_mean_with_sd_and_paired_differences() {
        let c = study();
        let r = |arm: &str, m, seed, loss: f64| RunResult {
            arm: arm.into(),
            method: m,
            lr: Some(3e-4),
            seed,
            trainable: 100,
            train_secs: 10.0,
            peak_rss_mib: 500.0,
            heldout_loss: loss,
            test_loss: Some(loss + 0.1),
            forgetting_nll: Some(1.0),
            mmlu: Some(0.25),
            gsm8k: None,
            curve: vec![(0, 2.0), (3, loss)],
        };
        let base = r("", None, 0, 2.0);
        let runs = [
            r("spiel-ag", Some(Method::SpielAg), 1, 1.5),
            r("spiel-ag", Some(Method::SpielAg), 2, 1.7),
            r("lora", Some(Method::Lora), 1, 1.6),
            r("lora", Some(Method::Lora), 2, 1.9),
        ];
        let sweep = [
            SweepPoint {
                arm: "spiel-ag".into(),
                lr: 1e-4,
                validation_loss: 1.6,
            },
            SweepPoint {
                arm: "spiel-ag".into(),
                lr: 3e-4,
                validation_loss: 1.5,
            },
        ];
        let md = render_markdown(&c, &base, &runs, &sweep);
        assert!(
            md.contains("| spiel-ag | 3e-4 | 1.5000 | chosen (on the grid's edge) |"),
            "{md}"
        );
        assert!(
            md.contains("| base model | - | 0 | - | - | 2.0000 | 2.1000 | - | 1.0000 | 0.250 | - |"),
            "{md}"
        );
        // Held-out 1.5 and 1.7: mean 1.6, sample sd 0.1414; paired test differences -0.1 and -0.2.
        assert!(
            md.contains("| spiel-ag | 3e-4 | 100 | 10 ± 0 | 500 ± 0 | 1.6000 ± 0.1414 | 1.7000 ± 0.1414 | -0.1500 ± 0.0707 | 1.0000 ± 0.0000 |"),
            "{md}"
        );
        assert!(md.contains("| lora | 3e-4 | 100 |"), "{md}");
        assert!(md.contains("test loss - lora (paired)"), "{md}");
        // The control has no runs: an empty row, not a panic.
        assert!(md.contains("| ag-fixed | default | 0 |"), "{md}");
        // The sweep row, the arm row and the two runs.
        assert_eq!(md.matches("\n| spiel-ag | 3e-4 | ").count(), 4, "{md}");
    }

    #[test]
    fn every_shipped_config_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if table.contains_key("methods") {
                CompareConfig::from_toml_file(&path).unwrap_or_else(|e| panic!("{e}"));
            } else {
                TrainConfig::from_toml_file(&path)
                    .and_then(|c| c.validate())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            seen += 1;
        }
        assert!(seen >= 4, "{seen} configs in {}", dir.display());
    }
}
