//! `spiel serve`: one base model and many adapters behind an OpenAI-compatible HTTP API, requests
//! for different adapters decoded together in one batch.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use spiel::serve::engine::{Engine, EngineConfig};
use spiel::serve::registry::Registry;

use crate::http;
use crate::shared::{load_model, ModelArgs};

/// `spiel serve` arguments.
#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Serve every adapter directory under DIR by its folder name (a `spiel train` run directory
    /// serves its adapter), each loaded on first use.
    #[arg(long, value_name = "DIR")]
    adapters: Option<PathBuf>,
    /// Serve one more adapter as NAME=PATH (repeatable).
    #[arg(long = "adapter", value_name = "NAME=PATH")]
    adapter: Vec<String>,
    /// The name requests use for the base model alone [default: the model file's stem].
    #[arg(long)]
    served_name: Option<String>,
    /// Address to bind; loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0 picks a free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests waiting at most; more get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// The most new tokens one request may ask for (chat completions default to it).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Prompt tokens read per decode step at most, over all new requests (a long prompt is read in
    /// chunks between the others' tokens).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// MiB of adapters kept in memory; least recently used ones no request holds are evicted.
    #[arg(long, default_value_t = 1024)]
    adapter_memory: usize,
    /// Turn on POST /v1/load_lora_adapter and /v1/unload_lora_adapter (paths confined to
    /// --adapters).
    #[arg(long)]
    allow_adapter_loading: bool,
    /// Seconds running requests get to finish after Ctrl-C or SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_deadline: u64,
}

impl ServeArgs {
    /// Run the server until Ctrl-C or SIGTERM.
    pub fn run(self, home: &Path) -> Result<()> {
        if self.max_batch == 0 || self.max_tokens == 0 || self.prefill_chunk == 0 {
            bail!("--max-batch, --max-tokens and --prefill-chunk must be at least 1");
        }
        let mut named = Vec::new();
        for a in &self.adapter {
            let (name, path) = a
                .split_once('=')
                .with_context(|| format!("--adapter {a}: expected NAME=PATH"))?;
            named.push((name.to_string(), PathBuf::from(path)));
        }
        if let Some(dir) = &self.adapters {
            if !dir.is_dir() {
                bail!("--adapters {}: not a directory", dir.display());
            }
        }
        let m = load_model(&self.model, home)?;
        let base_name = self.served_name.clone().unwrap_or_else(|| {
            m.source
                .file_stem()
                .map_or("base".to_string(), |s| s.to_string_lossy().into_owned())
        });
        let context = m.model.cfg.max_position_embeddings;
        let model = Arc::new(m.model);
        let tokenizer = Arc::new(m.tokenizer);
        let registry = Registry::new(
            model.clone(),
            self.adapters.as_deref(),
            &named,
            self.adapter_memory << 20,
        )?;
        let (engine, worker) = Engine::new(
            model,
            tokenizer.clone(),
            EngineConfig {
                max_batch: self.max_batch,
                max_queue: self.max_queue,
                prefill_chunk: self.prefill_chunk,
            },
        );
        let engine = Arc::new(engine);
        let listener = std::net::TcpListener::bind((self.host.as_str(), self.port))
            .with_context(|| format!("binding {}:{}", self.host, self.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let mut registry = registry;
        let adapters = registry.names().len();
        let state = Arc::new(http::State {
            engine: engine.clone(),
            registry: Arc::new(Mutex::new(registry)),
            tokenizer,
            base_name: base_name.clone(),
            context,
            max_tokens: self.max_tokens.min(context),
            allow_loading: self.allow_adapter_loading,
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            next_id: AtomicU64::new(1),
        });
        eprintln!("spiel serve: listening on http://{addr} (base `{base_name}`, {adapters} adapters)");
        let deadline = Duration::from_secs(self.shutdown_deadline);
        // The HTTP side runs on its own small runtime; this thread, a worker of the compute pool,
        // drives the engine so the decode step's parallel loops have every core.
        let http_engine = engine.clone();
        let server = std::thread::Builder::new().name("spiel-http".into()).spawn(move || {
            let result = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the HTTP runtime")
                .and_then(|rt| {
                    rt.block_on(async {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        http::serve(listener, state, deadline).await
                    })
                });
            http_engine.close();
            result
        })?;
        worker.run();
        match server.join() {
            Ok(r) => r,
            Err(_) => bail!("the HTTP thread panicked"),
        }
    }
}
