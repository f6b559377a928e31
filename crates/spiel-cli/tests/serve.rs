//! `spiel serve` as a user runs it: the real binary on a loopback port, a random model and
//! adapters written as real files, and a real HTTP client (ureq) making OpenAI-style requests.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A model big enough that a few hundred tokens take a noticeable fraction of a second.
fn write_model(dir: &Path) -> PathBuf {
    let cfg = spiel::formats::config::ModelConfig {
        vocab_size: spiel::testkit::synth::BYTE_LEVEL_VOCAB,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 32,
        max_position_embeddings: 512,
        ..spiel::model::random::tiny_config()
    };
    let w = spiel::model::random::random_weights(&cfg, 3, &candle_core::Device::Cpu).unwrap();
    let p = dir.join("tiny.gguf");
    spiel::testkit::synth::write_gguf(&p, &cfg, &w, spiel::kernels::quant::Format::F32).unwrap();
    p
}

/// `n` sparse adapters `ad0..` and one LoRA adapter `lora` under `dir/adapters`.
fn write_adapters(model: &Path, dir: &Path, n: usize) -> PathBuf {
    let m = spiel::model::loader::load_gguf(model, &candle_core::Device::Cpu).unwrap();
    let root = dir.join("adapters");
    for i in 0..n {
        spiel::testkit::adapters::random_sparse(&m.model, i as u64, 0.05, 0.5)
            .unwrap()
            .save(&root.join(format!("ad{i}")))
            .unwrap();
    }
    spiel::testkit::adapters::random_lora(&m.model, 99, 4, 0.2)
        .unwrap()
        .save(&root.join("lora"))
        .unwrap();
    root
}

/// A client of a running server.
#[derive(Clone)]
struct Client {
    base: String,
}

/// A temporary folder with the model and `n` sparse adapters (plus `lora`) in it.
fn fixture(n: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = write_model(dir.path());
    let root = write_adapters(&model, dir.path(), n);
    (dir, model, root)
}

struct Server {
    child: Child,
    client: Client,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl std::ops::Deref for Server {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Server {
    #[allow(clippy::zombie_processes)] // waited for in Drop
    fn start(model: &Path, adapters: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_spiel"))
            .args(["--threads", "2", "serve", "--port", "0", "--served-name", "base"])
            .arg("--model")
            .arg(model)
            .arg("--adapters")
            .arg(adapters)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the server prints its address");
            if let Some(rest) = line.split("listening on ").nth(1) {
                let url = rest.split_whitespace().next().unwrap().to_string();
                return Server {
                    child,
                    client: Client { base: url },
                    stderr: rx,
                };
            }
        }
    }
}

impl Client {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn post(&self, path: &str, body: &str) -> (u16, String) {
        let mut r = agent()
            .post(&self.url(path))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut r = agent().get(&self.url(path)).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    /// A metric's value (summed over its label sets that contain `labels`).
    fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(labels))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// POST a streaming request and read its server-sent events up to `[DONE]`: the data lines.
fn stream(server: &Client, path: &str, body: &Value) -> Vec<String> {
    let r = agent()
        .post(&server.url(path))
        .header("content-type", "application/json")
        .send(body.to_string().as_str())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers().get("content-type").unwrap().to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut lines = Vec::new();
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            lines.push(d.to_string());
            if d == "[DONE]" {
                break;
            }
        }
    }
    lines
}

/// The text of a stream's chunks (completion `text` or chat `delta.content`).
fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| json_of(e))
        .filter_map(|v| {
            let c = v["choices"].get(0)?.clone();
            c["text"]
                .as_str()
                .or(c["delta"]["content"].as_str())
                .map(str::to_string)
        })
        .collect()
}

fn completion(model: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn the_openai_api_serves_adapters_and_refuses_bad_requests() {
    let (dir, model, root) = fixture(4);
    let s = Server::start(&model, &root, &["--allow-adapter-loading"]);

    // The model list: the base and every adapter, each with the base as parent.
    let (code, body) = s.get("/v1/models");
    assert_eq!(code, 200);
    let ids: Vec<(String, Value)> = json_of(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m["parent"].clone()))
        .collect();
    assert_eq!(ids[0], ("base".to_string(), Value::Null));
    for name in ["ad0", "ad1", "ad2", "ad3", "lora"] {
        assert!(ids.contains(&(name.to_string(), json!("base"))), "{name} in {ids:?}");
    }
    assert_eq!(s.get("/health").0, 200);

    // A completion equals `spiel generate --adapter` (greedy), streamed or not.
    let prompt = "The weather today is";
    let (code, body) = s.post("/v1/completions", &completion("ad1", prompt, 24).to_string());
    assert_eq!(code, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap() + v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["total_tokens"].as_u64().unwrap()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_spiel"))
        .args([
            "--threads",
            "2",
            "generate",
            "--max-new-tokens",
            "24",
            "--prompt",
            prompt,
        ])
        .arg("--model")
        .arg(&model)
        .arg("--adapter")
        .arg(root.join("ad1"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{text}\n"),
        "server vs spiel generate"
    );
    let (_, base_body) = s.post("/v1/completions", &completion("base", prompt, 24).to_string());
    assert_ne!(
        json_of(&base_body)["choices"][0]["text"],
        v["choices"][0]["text"],
        "the adapter matters"
    );

    let mut body = completion("ad1", prompt, 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = stream(&s, "/v1/completions", &body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(streamed_text(&events), text);
    let usage = json_of(&events[events.len() - 2]);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], v["usage"]);

    // Chat, with the template, streamed and not; composition of two adapters by the extension.
    let chat = json!({"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "temperature": 0,
        "adapters": [{"name": "ad2", "scale": 0.5}]});
    let (code, body) = s.post("/v1/chat/completions", &chat.to_string());
    assert_eq!(code, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let mut chat_stream = chat.clone();
    chat_stream["stream"] = json!(true);
    let events = stream(&s, "/v1/chat/completions", &chat_stream);
    assert_eq!(json_of(&events[0])["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(json_of(&events[0])["object"], "chat.completion.chunk");
    assert_eq!(
        streamed_text(&events),
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // Errors: OpenAI's shape and the right status.
    let err = |code: u16, body: &str, want: u16, needle: &str| {
        assert_eq!(code, want, "{body}");
        let v = json_of(body);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "`{msg}` lacks `{needle}`");
        assert!(v["error"]["type"].is_string());
    };
    let (c, b) = s.post("/v1/completions", &completion("nope", prompt, 4).to_string());
    err(c, &b, 404, "nope");
    let (c, b) = s.post("/v1/completions", "{\"model\": \"base\", \"prompt\": ");
    err(c, &b, 400, "request body");
    let (c, b) = s.post(
        "/v1/completions",
        &json!({"model": "base", "prompt": "x", "temperature": "hot"}).to_string(),
    );
    err(c, &b, 400, "temperature");
    let (c, b) = s.post(
        "/v1/completions",
        &completion("base", &"word ".repeat(200), 200).to_string(),
    );
    err(c, &b, 400, "context");
    let (c, b) = s.post("/v1/completions", &completion("base", "x", 100_000).to_string());
    err(c, &b, 400, "max_tokens");
    let (c, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": "base", "messages": [{"role": "robot", "content": "x"}]}).to_string(),
    );
    err(c, &b, 400, "messages[0].role");

    // Loading: confined to the root, then usable, then gone after unloading.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for (src, dst) in [
        ("adapter_config.json", "adapter_config.json"),
        ("adapter_model.safetensors", "adapter_model.safetensors"),
    ] {
        std::fs::copy(root.join("ad0").join(src), outside.join(dst)).unwrap();
    }
    let load = |name: &str, path: &Path| json!({"lora_name": name, "lora_path": path}).to_string();
    let (c, b) = s.post("/v1/load_lora_adapter", &load("evil", &outside));
    err(c, &b, 400, "outside the adapters root");
    let (c, b) = s.post("/v1/load_lora_adapter", &load("../x", &root.join("ad0")));
    err(c, &b, 400, "plain");
    let (c, b) = s.post("/v1/load_lora_adapter", &load("mine", &root.join("ad3")));
    assert_eq!(c, 200, "{b}");
    let (c, b) = s.post("/v1/completions", &completion("mine", prompt, 8).to_string());
    assert_eq!(c, 200, "{b}");
    let (c, b) = s.post("/v1/unload_lora_adapter", &json!({"lora_name": "mine"}).to_string());
    assert_eq!(c, 200, "{b}");
    let (c, b) = s.post("/v1/completions", &completion("mine", prompt, 8).to_string());
    err(c, &b, 404, "mine");

    // 32 concurrent streams over 5 adapters and the base: each gets what it gets alone.
    let names = ["base", "ad0", "ad1", "ad2", "ad3", "lora"];
    let alone: Vec<String> = names
        .iter()
        .map(|n| {
            let (_, b) = s.post("/v1/completions", &completion(n, prompt, 20).to_string());
            json_of(&b)["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    let handles: Vec<_> = (0..32)
        .map(|i| {
            let client = s.client.clone();
            let name = names[i % names.len()];
            std::thread::spawn(move || {
                let server = client;
                let mut body = completion(name, "The weather today is", 20);
                body["stream"] = json!(true);
                streamed_text(&stream(&server, "/v1/completions", &body))
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), alone[i % names.len()], "stream {i}");
    }

    // A client that goes away mid-stream frees its sequence.
    let mut body = completion("ad0", prompt, 400);
    body["stream"] = json!(true);
    let r = agent()
        .post(&s.url("/v1/completions"))
        .header("content-type", "application/json")
        .send(body.to_string().as_str())
        .unwrap();
    let mut reader = r.into_body().into_reader();
    let mut first = [0u8; 64];
    reader.read_exact(&mut first).unwrap();
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.metric("spiel_requests_total", "outcome=\"cancelled\"") < 1.0 {
        assert!(Instant::now() < deadline, "the abandoned stream was never dropped");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.metric("spiel_running_batch", ""), 0.0);
    assert!(s.metric("spiel_generated_tokens_total", "") > 0.0);
    assert!(s.metric("spiel_requests_total", "adapter=\"ad1\",outcome=\"ok\"") >= 2.0);
    assert!(s.metric("spiel_requests_total", "adapter=\"nope\",outcome=\"rejected_404\"") >= 1.0);
}

#[test]
fn a_full_queue_is_429_and_sixty_four_adapters_stay_under_the_budget() {
    let (_dir, model, root) = fixture(64);
    let m = spiel::model::loader::load_gguf(&model, &candle_core::Device::Cpu).unwrap();
    let one = m
        .model
        .served_adapter(&m.model.load_adapter(&root.join("ad0")).unwrap().to_set())
        .unwrap()
        .bytes();
    // A budget for 8 adapters, in whole MiB.
    let mib = (8 * one) >> 20;
    assert!(mib >= 1, "adapters of {one} bytes are too small for a MiB budget");
    let budget = mib << 20;
    let s = Server::start(
        &model,
        &root,
        &[
            "--max-batch",
            "4",
            "--max-queue",
            "4",
            "--adapter-memory",
            &mib.to_string(),
        ],
    );
    // 24 clients at once at a server that runs 4 and queues 4: some are refused, none fails.
    let handles: Vec<_> = (0..24)
        .map(|i| {
            let client = s.client.clone();
            std::thread::spawn(move || {
                client.post(
                    "/v1/completions",
                    &completion(&format!("ad{i}"), "Once upon a time", 120).to_string(),
                )
            })
        })
        .collect();
    let codes: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap().0).collect();
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
    assert!(codes.contains(&429), "no request was refused: {codes:?}");
    assert!(codes.contains(&200));
    // Every one of 64 adapters served, four at a time, under a budget for 8.
    for chunk in (0..64).collect::<Vec<_>>().chunks(4) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let client = s.client.clone();
                std::thread::spawn(move || {
                    client.post(
                        "/v1/completions",
                        &completion(&format!("ad{i}"), "Hello", 8).to_string(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (code, body) = h.join().unwrap();
            assert_eq!(code, 200, "{body}");
        }
        let resident = s.metric("spiel_adapter_resident_bytes", "");
        assert!(resident <= budget as f64, "{resident} > {budget}");
    }
    assert!(s.metric("spiel_adapter_evictions_total", "") >= 50.0);
    assert!(s.metric("spiel_adapter_loads_total", "") >= 64.0);
}

#[test]
fn sigterm_lets_the_running_request_finish_and_exits_zero() {
    let (_dir, model, root) = fixture(1);
    let mut s = Server::start(&model, &root, &[]);
    let mut body = completion("ad0", "Once upon a time", 400);
    body["stream"] = json!(true);
    let r = agent()
        .post(&s.url("/v1/completions"))
        .header("content-type", "application/json")
        .send(body.to_string().as_str())
        .unwrap();
    let mut lines = BufReader::new(r.into_body().into_reader()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("data: "), "{first}");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let rest: Vec<String> = lines
        .map_while(Result::ok)
        .filter(|l| l.starts_with("data: "))
        .collect();
    assert_eq!(rest.last().map(String::as_str), Some("data: [DONE]"));
    let finish = json_of(rest[rest.len() - 2].strip_prefix("data: ").unwrap());
    assert_eq!(
        finish["choices"][0]["finish_reason"], "length",
        "the request ran to its end"
    );
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let said: Vec<String> = s.stderr.try_iter().collect();
    assert!(said.iter().any(|l| l.contains("shutting down")), "{said:?}");
}
