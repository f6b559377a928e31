//! A run directory and the loop that fills it: resume from the newest checkpoint, evaluate,
//! train, log metrics, plot, checkpoint and save the adapter (or model), reporting progress to
//! a front end through [`Event`]s.

use std::path::{Path, PathBuf};

use crate::formats::tokenizer::Tokenizer;
use crate::formats::{checkpoint, fsutil};
use crate::model::adapter::AdapterSet;
use crate::train::data;
use crate::train::metrics::{append_metrics, plot_losses, read_metrics, truncate_metrics, StepRecord};
use crate::train::trainer::Trainer;
use crate::{Error, Result};

/// Where a run's files go.
pub struct RunPaths {
    /// The run directory.
    pub out: PathBuf,
    /// metrics.jsonl.
    pub metrics: PathBuf,
    /// The adapter directory (sparse / LoRA).
    pub adapter: PathBuf,
    /// The model directory (full fine-tuning).
    pub model: PathBuf,
    /// The resolved config.
    pub config: PathBuf,
    /// summary.json, written last: the run finished.
    pub summary: PathBuf,
}

impl RunPaths {
    /// Paths inside `out`.
    pub fn new(out: &Path) -> RunPaths {
        RunPaths {
            out: out.to_path_buf(),
            metrics: out.join("metrics.jsonl"),
            adapter: out.join("adapter"),
            model: out.join("model"),
            config: out.join("config.toml"),
            summary: out.join("summary.json"),
        }
    }
}

/// Progress events for a front end (progress bar, logs).
pub enum Event<'a> {
    /// Training is about to start.
    Start {
        /// Total updates.
        total: usize,
        /// First update to run (after a resume, > 1).
        first: usize,
        /// Trainable parameters.
        trainable: usize,
        /// Examples in the train and held-out splits.
        train_examples: usize,
        /// Held-out examples.
        heldout_examples: usize,
        /// Tokenization outcome.
        stats: &'a data::TokenizeStats,
    },
    /// An update finished.
    Step(&'a StepRecord),
    /// A checkpoint was written.
    Checkpoint(&'a Path),
}

/// What the front end wants after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep training.
    Continue,
    /// Stop after this update: write a checkpoint and return (e.g. on Ctrl-C).
    Stop,
}

/// What a finished run produced.
pub struct RunSummary {
    /// Held-out loss before training (step 0), if evaluated.
    pub initial_eval: Option<f64>,
    /// Held-out loss after the last update, if evaluated.
    pub final_eval: Option<f64>,
    /// Test-split loss after the last update, if the run has a test split.
    pub test_eval: Option<f64>,
    /// Where the adapter (or full model) was written.
    pub output: PathBuf,
    /// Trainable parameters.
    pub trainable: usize,
    /// Seconds of training (excluding evaluation).
    pub train_secs: f64,
    /// Whether the front end stopped the run early (a checkpoint was written; resume it).
    pub stopped: bool,
}

/// Run (or resume) training to completion, writing metrics, checkpoints and the final adapter.
/// Over several ranks (see [`Trainer::set_group`]) every rank runs this loop and only rank 0
/// writes files; a stop asked for on any rank stops all of them after the same update.
pub fn run(
    trainer: &mut Trainer,
    tokenizer: &Tokenizer,
    stats: &data::TokenizeStats,
    resume: bool,
    mut on_event: impl FnMut(Event) -> Flow,
) -> Result<RunSummary> {
    let cfg = trainer.cfg.clone();
    let paths = RunPaths::new(&cfg.out);
    let group = trainer.group().clone();
    let root = group.is_root();
    if root {
        std::fs::create_dir_all(&paths.out).map_err(|e| Error::io(&paths.out, e))?;
        // A run killed mid-write leaves staging files behind: finish or discard them first.
        for dir in [paths.out.clone(), paths.out.join("checkpoints")] {
            let n = fsutil::recover_dir(&dir)?;
            if n > 0 {
                tracing::info!(
                    "{}: cleaned up {n} leftover staging file(s) of an interrupted write",
                    dir.display()
                );
            }
        }
        let toml_text = cfg.to_run_toml()?;
        fsutil::write_atomic(&paths.config, toml_text.as_bytes())?;
    }
    // Every rank reads the checkpoint once rank 0 has tidied the directory.
    group.barrier();
    let mut initial_eval = None;
    if resume {
        if let Some((step, dir)) = checkpoint::list(&paths.out)?.pop() {
            trainer.restore(&dir)?;
            if root {
                truncate_metrics(&paths.metrics, step)?;
            }
        }
    }
    // Nobody writes a checkpoint before every rank has read the one it resumes from.
    group.barrier();
    if trainer.step == 0 {
        if root {
            let _ = std::fs::remove_file(&paths.metrics);
        }
        if cfg.eval_every > 0 && !trainer.heldout.is_empty() {
            let e = trainer.eval()?;
            initial_eval = Some(e);
            let rec = StepRecord {
                step: 0,
                eval_loss: Some(e),
                ..Default::default()
            };
            if root {
                append_metrics(&paths.metrics, &rec)?;
            }
            on_event(Event::Step(&rec));
        }
        if cfg.save_every > 0 && root {
            trainer.save_checkpoint()?;
        }
    } else if let Ok(recs) = read_metrics(&paths.metrics) {
        initial_eval = recs.iter().find(|r| r.step == 0).and_then(|r| r.eval_loss);
    }
    on_event(Event::Start {
        total: cfg.steps,
        first: trainer.step + 1,
        trainable: trainer.trainable_parameters(),
        train_examples: trainer.train.len(),
        heldout_examples: trainer.heldout.len(),
        stats,
    });
    let mut final_eval = None;
    let delay = test_update_delay();
    while trainer.step < cfg.steps {
        let mut rec = trainer.step()?;
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let c = rec.step;
        if cfg.eval_every > 0 && !trainer.heldout.is_empty() && (c % cfg.eval_every == 0 || c == cfg.steps) {
            let e = trainer.eval()?;
            rec.eval_loss = Some(e);
            final_eval = Some(e);
        }
        if root {
            append_metrics(&paths.metrics, &rec)?;
            if rec.eval_loss.is_some() || c == cfg.steps {
                plot_losses(&paths.metrics, &paths.out.join("loss.png"), cfg.method.as_str())?;
            }
        }
        let flow = match group.any(on_event(Event::Step(&rec)) == Flow::Stop) {
            true => Flow::Stop,
            false => Flow::Continue,
        };
        let save = flow == Flow::Stop || (cfg.save_every > 0 && (c % cfg.save_every == 0 || c == cfg.steps));
        if save && root {
            let dir = trainer.save_checkpoint()?;
            on_event(Event::Checkpoint(&dir));
        }
        if flow == Flow::Stop {
            return Ok(RunSummary::of(
                trainer,
                initial_eval,
                final_eval,
                None,
                paths.out.clone(),
                true,
            ));
        }
    }
    // The test split is scored once, here, after every choice has been made.
    let test_eval = trainer.test_loss()?;
    let summary = serde_json::json!({
        "steps": trainer.step,
        "train_secs": trainer.train_secs,
        "initial_eval_loss": initial_eval,
        "final_eval_loss": final_eval,
        "test_loss": test_eval,
        "trainable_parameters": trainer.trainable_parameters(),
    });
    if !root {
        return Ok(RunSummary::of(
            trainer,
            initial_eval,
            final_eval,
            test_eval,
            paths.out.clone(),
            false,
        ));
    }
    let output = match trainer.adapter(summary)? {
        Some(adapter) => {
            adapter.save(&paths.adapter)?;
            paths.adapter.clone()
        }
        None => {
            let model = trainer.full_model().expect("full fine-tuning has a model");
            crate::model::loader::export_hf(&model.merged(&AdapterSet::none())?, tokenizer, &paths.model)?;
            paths.model.clone()
        }
    };
    let record = serde_json::json!({
        "method": cfg.method.as_str(),
        "steps": trainer.step,
        "train_secs": trainer.train_secs,
        "initial_eval_loss": initial_eval,
        "final_eval_loss": final_eval,
        "test_loss": test_eval,
        "trainable_parameters": trainer.trainable_parameters(),
        "output": output,
    });
    let text = serde_json::to_string_pretty(&record).map_err(|e| Error::Invalid(e.to_string()))?;
    fsutil::write_atomic(&paths.summary, text.as_bytes())?;
    Ok(RunSummary::of(
        trainer,
        initial_eval,
        final_eval,
        test_eval,
        output,
        false,
    ))
}

impl RunSummary {
    fn of(
        trainer: &Trainer,
        initial_eval: Option<f64>,
        final_eval: Option<f64>,
        test_eval: Option<f64>,
        output: PathBuf,
        stopped: bool,
    ) -> RunSummary {
        RunSummary {
            initial_eval,
            final_eval,
            test_eval,
            output,
            trainable: trainer.trainable_parameters(),
            train_secs: trainer.train_secs,
            stopped,
        }
    }
}

/// The pause after each update named by `SPIEL_TEST_UPDATE_DELAY_MS`, for tests only: it lets a
/// test kill or interrupt a short run of a tiny model mid-way without making the run long (a
/// long run's different summation orders over ranks eventually flip a near-tied selection).
fn test_update_delay() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var("SPIEL_TEST_UPDATE_DELAY_MS").ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}
