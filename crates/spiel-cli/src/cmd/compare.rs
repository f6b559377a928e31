//! `spiel compare`: train several methods on one split and budget, evaluate them and the base,
//! and write the report.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use spiel::formats::assets;
use spiel::model::adapter::AdapterSet;
use spiel::model::loader;

use crate::shared::{load_model, ModelArgs};

/// `spiel compare` arguments.
#[derive(Args)]
pub struct CompareArgs {
    /// The comparison config (see configs/compare-smollm2.toml).
    #[arg(long)]
    config: PathBuf,
}

impl CompareArgs {
    /// Run the command.
    pub fn run(self, home: &Path, threads: Option<usize>) -> Result<()> {
        run_compare(&self.config, home, threads)
    }
}

/// Train one run of a comparison in a child `spiel train` (so its peak memory is its own) and
/// return that peak in MiB.
fn train_in_child(run_toml: &Path, home: &Path, threads: Option<usize>) -> Result<f64> {
    let exe = std::env::current_exe().context("locating the spiel binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--home").arg(home);
    if let Some(n) = threads {
        cmd.arg("--threads").arg(n.to_string());
    }
    cmd.arg("train").arg("--config").arg(run_toml).arg("--resume");
    let child = cmd.spawn().context("starting spiel train")?;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 reaps exactly our child and fills both out-parameters.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    if r < 0 {
        bail!("waiting for spiel train: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!(
            "training with {} did not finish; rerun the same `spiel compare` to continue from its checkpoint",
            run_toml.display()
        );
    }
    // ru_maxrss is in KiB on Linux.
    Ok(usage.ru_maxrss as f64 / 1024.0)
}

/// Train one run (unless it finished before) and return its config.
fn ensure_trained(
    cfg: &spiel::tasks::compare::CompareConfig,
    arm: &spiel::tasks::compare::Arm,
    seed: u64,
    lr: Option<f64>,
    home: &Path,
    threads: Option<usize>,
) -> Result<spiel::train::config::TrainConfig> {
    let rc = cfg.run_config(arm, seed, lr)?;
    let record = rc.out.join("compare-run.json");
    if !rc.out.join("summary.json").exists() || !record.exists() {
        eprintln!(
            "== training {} (seed {seed}, lr {}) in {}",
            arm.name,
            lr.map(|x| format!("{x:e}")).unwrap_or_else(|| "default".into()),
            rc.out.display()
        );
        std::fs::create_dir_all(&rc.out).with_context(|| format!("creating {}", rc.out.display()))?;
        let toml_path = rc.out.join("compare-run.toml");
        spiel::formats::fsutil::write_atomic(&toml_path, rc.to_toml()?.as_bytes())?;
        let peak = train_in_child(&toml_path, home, threads)?;
        spiel::formats::fsutil::write_atomic(
            &record,
            serde_json::json!({ "peak_rss_mib": peak }).to_string().as_bytes(),
        )?;
    }
    Ok(rc)
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    let t = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&t).with_context(|| format!("parsing {}", p.display()))
}

fn run_compare(config: &Path, home: &Path, threads: Option<usize>) -> Result<()> {
    use spiel::tasks::compare::{self, CompareConfig, RunResult, SweepPoint};
    let cfg = CompareConfig::from_toml_file(config)?;
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let arms = cfg.arms();
    let first = cfg.run_config(&arms[0], cfg.seeds[0], None)?;
    if first.heldout == 0 || first.eval_every == 0 {
        bail!(
            "{}: [train] needs heldout > 0 and eval_every > 0: the comparison is scored on held-out loss",
            config.display()
        );
    }
    // 1. Sweep: every rate of every grid with the first seed; keep the best validation loss.
    let mut sweep = Vec::new();
    let mut chosen = std::collections::BTreeMap::new();
    for arm in &arms {
        let Some(grid) = cfg.sweep.get(&arm.name) else { continue };
        for &lr in grid {
            let rc = ensure_trained(&cfg, arm, cfg.seeds[0], Some(lr), home, threads)?;
            let summary = read_json(&rc.out.join("summary.json"))?;
            let Some(v) = summary["final_eval_loss"].as_f64() else {
                bail!("{}: no final held-out loss", rc.out.join("summary.json").display());
            };
            sweep.push(SweepPoint {
                arm: arm.name.clone(),
                lr,
                validation_loss: v,
            });
        }
        if let Some((lr, edge)) = compare::choose_lr(&sweep, &arm.name) {
            eprintln!("== {}: lr {lr:e} chosen on validation loss", arm.name);
            if edge {
                eprintln!(
                    "warning: {}'s best rate {lr:e} is on its grid's edge; widen [sweep] {}",
                    arm.name, arm.name
                );
            }
            chosen.insert(arm.name.clone(), lr);
        }
    }
    let lr_of = |arm: &compare::Arm| -> Option<f64> {
        chosen
            .get(&arm.name)
            .or_else(|| arm.lr_from.as_ref().and_then(|f| chosen.get(f)))
            .copied()
    };
    // 2. Train every arm with every seed at its rate (each in its own process).
    let mut trained = Vec::new();
    for &seed in &cfg.seeds {
        for arm in &arms {
            let lr = lr_of(arm);
            trained.push((
                arm.clone(),
                seed,
                lr,
                ensure_trained(&cfg, arm, seed, lr, home, threads)?,
            ));
        }
    }
    // 3. Evaluate the base model and every run (results cached per run in eval.json), in f32
    // unless [train] names a dtype, so that a study's scores do not depend on the CPU.
    let eval_dtype = match first.dtype {
        spiel::model::loader::Dtype::Auto => spiel::model::loader::Dtype::F32,
        d => d,
    };
    let m = load_model(
        &ModelArgs {
            model: first.model.clone(),
            quantize: Some(first.quantize),
            dtype: Some(eval_dtype),
        },
        home,
    )?;
    let data = match &first.data {
        Some(p) => p.clone(),
        None => assets::ensure(&assets::ALPACA, home)?,
    };
    let plan = &cfg.eval;
    let benchmarks =
        |model: &spiel::model::transformer::Llama, adapters: &AdapterSet, what: &str| -> Result<serde_json::Value> {
            let mmlu = if plan.mmlu_limit > 0 {
                eprintln!("== MMLU ({} questions) on {what}", plan.mmlu_limit);
                let path = assets::ensure(&assets::MMLU, home)?;
                let r = spiel::tasks::eval::mmlu(
                    model,
                    adapters,
                    &m.tokenizer,
                    &path,
                    plan.mmlu_shots,
                    Some(plan.mmlu_limit),
                    &[],
                    0,
                    8,
                    |_, _| {},
                )?;
                Some(r.accuracy)
            } else {
                None
            };
            let gsm = if plan.gsm8k_limit > 0 {
                eprintln!("== GSM8K ({} problems) on {what}", plan.gsm8k_limit);
                let path = assets::ensure(&assets::GSM8K, home)?;
                let r = spiel::tasks::eval::gsm8k(
                    model,
                    adapters,
                    &m.tokenizer,
                    &path,
                    plan.gsm8k_shots,
                    Some(plan.gsm8k_limit),
                    plan.gsm8k_max_new_tokens,
                    |_, _| {},
                )?;
                Some(r.accuracy)
            } else {
                None
            };
            let forgetting = if plan.forgetting_limit > 0 {
                eprintln!("== GSM8K solution NLL ({} solutions) on {what}", plan.forgetting_limit);
                let path = assets::ensure(&assets::GSM8K, home)?;
                Some(spiel::tasks::eval::gsm8k_nll(
                    model,
                    adapters,
                    &m.tokenizer,
                    &path,
                    plan.forgetting_limit,
                    first.max_len.max(512),
                    first.eval_batch_size,
                )?)
            } else {
                None
            };
            Ok(serde_json::json!({ "mmlu": mmlu, "gsm8k": gsm, "forgetting_nll": forgetting }))
        };
    let cached = |path: &Path, compute: &mut dyn FnMut() -> Result<serde_json::Value>| -> Result<serde_json::Value> {
        if let Some(v) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            return Ok(v);
        }
        let v = compute()?;
        spiel::formats::fsutil::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
        Ok(v)
    };
    let base_eval = cached(&cfg.out.join("base-eval.json"), &mut || {
        eprintln!("== held-out and test loss of the base model");
        let (heldout, test) = spiel::tasks::eval::split_losses(
            &m.model,
            &AdapterSet::none(),
            &m.tokenizer,
            &data,
            first.heldout,
            first.test,
            cfg.split_seed,
            first.max_len,
            first.eval_batch_size,
        )?;
        let mut v = benchmarks(&m.model, &AdapterSet::none(), "the base model")?;
        v["heldout_loss"] = heldout.into();
        v["test_loss"] = test.into();
        Ok(v)
    })?;
    let base = RunResult {
        arm: String::new(),
        method: None,
        lr: None,
        seed: 0,
        trainable: 0,
        train_secs: 0.0,
        peak_rss_mib: 0.0,
        heldout_loss: base_eval["heldout_loss"].as_f64().unwrap_or(f64::NAN),
        test_loss: base_eval["test_loss"].as_f64(),
        forgetting_nll: base_eval["forgetting_nll"].as_f64(),
        mmlu: base_eval["mmlu"].as_f64(),
        gsm8k: base_eval["gsm8k"].as_f64(),
        curve: Vec::new(),
    };
    let mut runs = Vec::new();
    for (arm, seed, lr, rc) in trained {
        let summary = read_json(&rc.out.join("summary.json"))?;
        let peak = read_json(&rc.out.join("compare-run.json"))?["peak_rss_mib"]
            .as_f64()
            .unwrap_or(0.0);
        let ev = cached(&rc.out.join("eval.json"), &mut || {
            let what = format!("{} (seed {seed})", arm.name);
            if arm.method == spiel::model::adapter::Method::Full {
                let full = loader::load(&rc.out.join("model"), &Device::Cpu)?;
                benchmarks(&full.model, &AdapterSet::none(), &what)
            } else {
                let a = m.model.load_adapter(&rc.out.join("adapter"))?;
                benchmarks(&m.model, &a.to_set(), &what)
            }
        })?;
        runs.push(RunResult {
            arm: arm.name.clone(),
            method: Some(arm.method),
            lr,
            seed,
            trainable: summary["trainable_parameters"].as_u64().unwrap_or(0) as usize,
            train_secs: summary["train_secs"].as_f64().unwrap_or(0.0),
            peak_rss_mib: peak,
            heldout_loss: summary["final_eval_loss"].as_f64().unwrap_or(f64::NAN),
            test_loss: summary["test_loss"].as_f64(),
            forgetting_nll: ev["forgetting_nll"].as_f64(),
            mmlu: ev["mmlu"].as_f64(),
            gsm8k: ev["gsm8k"].as_f64(),
            curve: compare::read_curve(&rc.out.join("metrics.jsonl"))?,
        });
    }
    compare::write_report(&cfg, &base, &runs, &sweep)?;
    print!("{}", compare::render_markdown(&cfg, &base, &runs, &sweep));
    eprintln!("wrote {}/results.md, results.json and curves.png", cfg.out.display());
    Ok(())
}
