//! `spiel`: the command line. Parses arguments, sets up logging and the compute threads, and
//! hands the command to its verb in `cmd/`; every error is reported as one line and a non-zero
//! exit code.

mod cmd;
mod http;
mod shared;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "spiel", version, about = "Sparse fine-tuning (SpIEL) of LLaMA-family models")]
struct Cli {
    /// Asset folder for fetched models and data (default: $SPIEL_HOME, else ./assets).
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch the default model, instruction data, MMLU and GSM8K into the asset folder.
    #[command(after_help = "Example: spiel fetch\n         spiel fetch --only model")]
    Fetch(cmd::fetch::FetchArgs),
    /// Next-token top-k logits and the teacher-forced mean NLL of a text.
    #[command(after_help = "Example: spiel score --text \"The capital of France is\" --json")]
    Score(cmd::score::ScoreArgs),
    /// Generate text, streaming tokens as they come (greedy at temperature 0).
    #[command(after_help = "Example: spiel generate --chat --prompt \"What is the capital of France?\"")]
    Generate(cmd::generate::GenerateArgs),
    /// Write the model in another format.
    #[command(after_help = "Example: spiel export --to hf out/smollm2-hf")]
    Export(cmd::export::ExportArgs),
    /// Fine-tune a model (SpIEL-AG by default) and write the adapter, metrics and checkpoints.
    #[command(
        after_help = "Examples:\n  spiel train\n  spiel train --method spiel-ma --steps 100 --out runs/ma\n  spiel train --config configs/spiel-ag-smollm2.toml --lr 1e-3\n  spiel train --out runs/ma --resume"
    )]
    Train(Box<cmd::train::TrainArgs>),
    /// Print the expected peak memory of a training run, by component, and whether it fits.
    #[command(
        after_help = "Examples:\n  spiel plan\n  spiel plan --method lora --batch-size 8 --seq-len 512 --quantize nf4"
    )]
    Plan(Box<cmd::plan::PlanArgs>),
    /// Evaluate: held-out response loss, MMLU (k-shot log-likelihood) or GSM8K (k-shot CoT).
    #[command(
        after_help = "Examples:\n  spiel eval --task heldout --adapter runs/spiel-ag/adapter\n  spiel eval --task mmlu --limit 500\n  spiel eval --task gsm8k --limit 100 --json"
    )]
    Eval(Box<cmd::eval::EvalArgs>),
    /// Describe an adapter: method, budget, per-module counts and density, value norms, layers.
    #[command(after_help = "Example: spiel inspect runs/spiel-ag/adapter")]
    Inspect(cmd::inspect::InspectArgs),
    /// Merge adapters into the base weights and write a Hugging Face model directory.
    #[command(after_help = "Example: spiel merge --adapter runs/spiel-ag/adapter --out merged/")]
    Merge(cmd::merge::MergeArgs),
    /// Train several methods on the same split and budget, evaluate each and the base model, and
    /// write results.md, results.json and curves.png. Rerunning continues where it stopped.
    #[command(after_help = "Example: spiel compare --config configs/compare-smollm2.toml")]
    Compare(cmd::compare::CompareArgs),
    /// Serve the base model and many adapters over an OpenAI-compatible HTTP API, requests for
    /// different adapters batched together.
    #[command(
        after_help = "Examples:\n  spiel serve --adapters runs/ --port 8080\n  spiel serve --adapter support=runs/spiel-ag/adapter --max-batch 32"
    )]
    Serve(Box<cmd::serve::ServeArgs>),
    /// Throughput tables.
    Bench(cmd::bench::BenchArgs),
}

/// Run the command on a worker of the global compute pool, so that the parallel loops it starts
/// run on this thread and the other workers, with no thread of its own waiting on them: with the
/// command on the main thread, every loop is a hand-off to the pool and back, and between loops
/// the idle workers spin against the main thread for the same cores (3 threads on 2 cores).
fn run_in_pool(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle reads its thread count from the same variable.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads.unwrap_or(0))
        // The command's own stack: candle's backward walks the graph recursively.
        .stack_size(64 << 20)
        .build_global()
        .context("starting the compute threads")?;
    rayon::scope(|_| run(cli))
}

/// Hand the command to its verb.
fn run(cli: Cli) -> Result<()> {
    let home = shared::home(&cli.home);
    let threads = cli.threads;
    match cli.command {
        Cmd::Fetch(a) => a.run(&home),
        Cmd::Score(a) => a.run(&home),
        Cmd::Generate(a) => a.run(&home),
        Cmd::Export(a) => a.run(&home),
        Cmd::Train(a) => a.run(&home),
        Cmd::Plan(a) => a.run(&home),
        Cmd::Eval(a) => a.run(&home),
        Cmd::Inspect(a) => a.run(),
        Cmd::Merge(a) => a.run(&home),
        Cmd::Compare(a) => a.run(&home, threads),
        Cmd::Serve(a) => a.run(&home),
        Cmd::Bench(a) => a.run(&home, threads),
    }
}

fn main() -> ExitCode {
    shared::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SPIEL_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run_in_pool(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
