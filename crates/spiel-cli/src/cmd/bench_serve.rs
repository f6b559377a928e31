//! `spiel bench serve`: a load generator over loopback. It writes K random sparse adapters of
//! the default budget for the model, starts `spiel serve` on them as a child process, and for
//! each scenario (the base alone, one adapter, K adapters mixed) runs N concurrent streaming
//! clients, each sending requests back to back; it prints generated tokens/s, time to first token
//! and inter-token latency (p50, p99), and the cold load time of one adapter.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::shared::{load_model, ModelArgs};

/// `spiel bench serve` arguments.
#[derive(Args)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    requests: usize,
    /// Mixed scenarios' numbers of distinct adapters (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    adapters: Vec<usize>,
    /// How requests pick among the adapters: uniform, or zipf (probability ~ 1/rank).
    #[arg(long, default_value = "uniform")]
    pick: String,
    /// Prompt length in tokens (about; words of a fixed text).
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    output_tokens: usize,
    /// Deltas per adapter [default: LoRA rank 8's count on all seven projections].
    #[arg(long)]
    budget: Option<usize>,
    /// Running sequences at most in the server (--max-batch).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Print JSON (one object per scenario, then the cold load).
    #[arg(long)]
    json: bool,
}

/// One scenario's measurements.
struct Measured {
    tokens: u64,
    secs: f64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

impl ServeBenchArgs {
    /// Run the benchmark.
    pub fn run(self, home: &Path, threads: Option<usize>) -> Result<()> {
        if self.clients == 0 || self.requests == 0 || self.output_tokens == 0 {
            bail!("--clients, --requests and --output-tokens must be at least 1");
        }
        if !matches!(self.pick.as_str(), "uniform" | "zipf") {
            bail!("--pick: `{}` is not uniform or zipf", self.pick);
        }
        let m = load_model(&self.model, home)?;
        let budget = self.budget.unwrap_or_else(|| {
            m.model
                .linears()
                .iter()
                .map(|l| 8 * (l.shape().0 + l.shape().1))
                .sum::<usize>()
        });
        let total: usize = m.model.linears().iter().map(|l| l.shape().0 * l.shape().1).sum();
        let density = budget as f64 / total as f64;
        let most = self.adapters.iter().copied().max().unwrap_or(1).max(1);
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("adapters");
        eprintln!(
            "writing {most} random adapters of {budget} deltas each under {}",
            root.display()
        );
        for i in 0..most {
            spiel::testkit::adapters::random_sparse(&m.model, i as u64, density, 0.01)?
                .save(&root.join(format!("ad{i}")))?;
        }
        // Cold load of one adapter (read, check, convert), as the server does on first use.
        let start = Instant::now();
        let served = m
            .model
            .served_adapter(&m.model.load_adapter(&root.join("ad0"))?.to_set())?;
        let cold_ms = start.elapsed().as_secs_f64() * 1e3;
        let adapter_mb = served.bytes() as f64 / 1e6;
        drop(served);
        // The decode step alone, one distinct adapter per row against none.
        let load = |i: usize| -> Result<_> {
            Ok(m.model
                .served_adapter(&m.model.load_adapter(&root.join(format!("ad{i}")))?.to_set())?)
        };
        let distinct: Vec<_> = (0..self.clients.min(most)).map(load).collect::<Result<_>>()?;
        let refs: Vec<_> = distinct.iter().collect();
        let step = spiel::tasks::bench::bench_decode_step(&m.model, &refs, self.clients, self.prompt_tokens, 16, 3)?;
        drop((distinct, m));

        let server = Server::start(&self.model, home, &root, threads, self.max_batch)?;
        let prompt = "the quick brown fox jumps over a lazy dog ".repeat(self.prompt_tokens.div_ceil(9).max(1));
        let mut scenarios: Vec<(String, usize)> = vec![("base alone".into(), 0), ("one adapter".into(), 1)];
        scenarios.extend(
            self.adapters
                .iter()
                .map(|&k| (format!("{k} adapters mixed ({})", self.pick), k)),
        );
        // Warm-up: one request, so the first scenario does not pay for page faults.
        server.run(&prompt, 8, 1, 1, &|_, _| "base".to_string())?;
        let mut rows = Vec::new();
        for (name, k) in &scenarios {
            let zipf = self.pick == "zipf";
            let pick = move |client: usize, request: usize| -> String {
                match *k {
                    0 => "base".into(),
                    1 => "ad0".into(),
                    k => {
                        let mut rng = rand::rngs::StdRng::seed_from_u64((client * 1000 + request) as u64);
                        let i = if zipf {
                            zipf_index(&mut rng, k)
                        } else {
                            rng.gen_range(0..k)
                        };
                        format!("ad{i}")
                    }
                }
            };
            let mut r = server.run(&prompt, self.output_tokens, self.clients, self.requests, &pick)?;
            let tps = r.tokens as f64 / r.secs;
            rows.push((
                name.clone(),
                tps,
                r.tokens,
                (percentile(&mut r.ttft, 0.5), percentile(&mut r.ttft, 0.99)),
                (percentile(&mut r.itl, 0.5), percentile(&mut r.itl, 0.99)),
            ));
        }
        let base_tps = rows[0].1;
        if self.json {
            let list: Vec<Value> = rows
                .iter()
                .map(|(name, tps, tokens, ttft, itl)| {
                    json!({"scenario": name, "tokens_per_s": tps, "generated_tokens": tokens,
                        "ttft_p50_s": ttft.0, "ttft_p99_s": ttft.1, "itl_p50_s": itl.0, "itl_p99_s": itl.1})
                })
                .collect();
            let out = json!({"scenarios": list, "cold_load_ms": cold_ms, "adapter_mb": adapter_mb,
                "clients": self.clients, "budget": budget, "decode_step": step});
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(());
        }
        println!(
            "model: {} ({} threads, {} clients x {} requests, ~{} prompt + {} output tokens, adapters of {budget} deltas = {adapter_mb:.1} MB)",
            self.model.model.as_deref().map_or("default".into(), |p| p.display().to_string()),
            threads.map_or("all".into(), |t| t.to_string()),
            self.clients,
            self.requests,
            self.prompt_tokens,
            self.output_tokens
        );
        println!("| scenario | generated tokens/s | vs base | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for (name, tps, _, ttft, itl) in &rows {
            println!(
                "| {name} | {tps:.1} | {:.2}x | {:.0} | {:.0} | {:.1} | {:.1} |",
                tps / base_tps,
                ttft.0 * 1e3,
                ttft.1 * 1e3,
                itl.0 * 1e3,
                itl.1 * 1e3
            );
        }
        println!("cold adapter load (read, check, convert): {cold_ms:.1} ms");
        println!(
            "decode step alone, {} sequences at {} cached tokens: {:.1} ms base, {:.1} ms with {} distinct adapters ({:.2}x the base's throughput)",
            step.batch,
            step.context,
            step.base_ms,
            step.mixed_ms,
            step.adapters,
            step.base_ms / step.mixed_ms
        );
        Ok(())
    }
}

/// An index in `0..k` with probability proportional to 1 / (index + 1).
fn zipf_index(rng: &mut impl Rng, k: usize) -> usize {
    let h: f64 = (1..=k).map(|i| 1.0 / i as f64).sum();
    let mut u = rng.gen::<f64>() * h;
    for i in 0..k {
        u -= 1.0 / (i + 1) as f64;
        if u <= 0.0 {
            return i;
        }
    }
    k - 1
}

/// A `spiel serve` child process.
struct Server {
    child: std::process::Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(model: &ModelArgs, home: &Path, root: &Path, threads: Option<usize>, max_batch: usize) -> Result<Server> {
        let exe = std::env::current_exe().context("finding the spiel binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg("--home").arg(home);
        if let Some(t) = threads {
            cmd.args(["--threads", &t.to_string()]);
        }
        cmd.args(["serve", "--port", "0", "--served-name", "base", "--max-queue", "100000"])
            .args(["--max-batch", &max_batch.to_string(), "--adapter-memory", "4096"])
            .arg("--adapters")
            .arg(root);
        if let Some(p) = &model.model {
            cmd.arg("--model").arg::<&PathBuf>(p);
        }
        let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn()?;
        let err = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(err).lines();
        let base = loop {
            let Some(line) = lines.next() else {
                bail!("spiel serve exited before listening");
            };
            let line = line?;
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap_or_default().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Ok(Server { child, base })
    }

    /// `clients` threads each streaming `requests` completions; the adapter of each from `pick`.
    fn run(
        &self,
        prompt: &str,
        output: usize,
        clients: usize,
        requests: usize,
        pick: &(dyn Fn(usize, usize) -> String + Sync),
    ) -> Result<Measured> {
        let start = Instant::now();
        let results: Vec<Result<Measured>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    s.spawn(move || {
                        let mut m = Measured {
                            tokens: 0,
                            secs: 0.0,
                            ttft: Vec::new(),
                            itl: Vec::new(),
                        };
                        for r in 0..requests {
                            let body = json!({"model": pick(c, r), "prompt": prompt, "max_tokens": output,
                                "temperature": 0, "ignore_eos": true, "stream": true,
                                "stream_options": {"include_usage": true}});
                            self.stream(&body, &mut m)?;
                        }
                        Ok(m)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("client thread")).collect()
        });
        let mut all = Measured {
            tokens: 0,
            secs: start.elapsed().as_secs_f64(),
            ttft: Vec::new(),
            itl: Vec::new(),
        };
        for r in results {
            let r = r?;
            all.tokens += r.tokens;
            all.ttft.extend(r.ttft);
            all.itl.extend(r.itl);
        }
        Ok(all)
    }

    fn stream(&self, body: &Value, m: &mut Measured) -> Result<()> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into();
        let sent = Instant::now();
        let r = agent
            .post(&format!("{}/v1/completions", self.base))
            .header("content-type", "application/json")
            .send(body.to_string().as_str())
            .context("a benchmark request")?;
        let mut last: Option<Instant> = None;
        for line in BufReader::new(r.into_body().into_reader()).lines() {
            let line = line?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data)?;
            if let Some(u) = v.get("usage") {
                m.tokens += u["completion_tokens"].as_u64().unwrap_or(0);
            }
            if let Some(e) = v.get("error") {
                bail!("the server failed a request: {e}");
            }
            let has_text = v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty());
            if has_text {
                let now = Instant::now();
                match last {
                    None => m.ttft.push((now - sent).as_secs_f64()),
                    Some(prev) => m.itl.push((now - prev).as_secs_f64()),
                }
                last = Some(now);
            }
        }
        Ok(())
    }
}
