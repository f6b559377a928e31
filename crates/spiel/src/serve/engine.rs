//! The serving engine: continuous batching over one frozen base. A scheduler thread owns the
//! running sequences; between steps it admits waiting requests (up to `max_batch` running),
//! gives each step one token per decoding sequence plus up to `prefill_chunk` prompt tokens of
//! the sequences still reading their prompts (so a long prompt never stalls the others), runs
//! them through one [`Llama::decode_step`] with each row's own adapters, samples, streams text to
//! each request's [`EventSink`], and retires finished, failed or abandoned sequences. No HTTP
//! here: the server's handlers submit [`Request`]s and read [`Event`]s.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use crate::formats::tokenizer::Tokenizer;
use crate::model::decode::{SeqCache, ServedAdapter, StepInput};
use crate::model::transformer::Llama;
use crate::tasks::generate::Sampler;

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Requests waiting for a place at most; more are refused ([`SubmitError::QueueFull`]).
    pub max_queue: usize,
    /// Prompt tokens read per step at most, over all prefilling sequences.
    pub prefill_chunk: usize,
}

/// How a request's tokens are picked and when it stops.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// New tokens at most.
    pub max_tokens: usize,
    /// 0 for greedy.
    pub temperature: f64,
    /// Nucleus cut in (0, 1].
    pub top_p: f64,
    /// Sampling seed.
    pub seed: u64,
    /// Stop before the first of these in the generated text (it is not returned).
    pub stop: Vec<String>,
    /// Go on past end-of-turn tokens until `max_tokens` (for benchmarks).
    pub ignore_eos: bool,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` reached (or the context is full).
    Length,
}

impl FinishReason {
    /// The OpenAI name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a request receives, in order: text pieces, then one `Finished` or `Failed`.
#[derive(Debug, Clone)]
pub enum Event {
    /// New text (complete characters; text that may begin a stop string is held back).
    Text(String),
    /// The end, with the token counts and the generated ids (the stop token excluded).
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
        /// The generated ids.
        ids: Vec<u32>,
    },
    /// The request failed inside the engine (it is logged; the others go on).
    Failed(String),
}

/// Where a request's events go.
pub trait EventSink: Send {
    /// Deliver an event; `false` when the receiver is gone.
    fn send(&mut self, event: Event) -> bool;
    /// Whether the receiver is gone (the client disconnected): the sequence is dropped.
    fn is_closed(&self) -> bool;
}

/// One generation request.
pub struct Request {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Adapters with their scales, applied in order.
    pub adapters: Vec<(Arc<ServedAdapter>, f32)>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// The name requests are counted under in the metrics.
    pub label: String,
    /// Where its events go.
    pub sink: Box<dyn EventSink>,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// `max_queue` requests are already waiting.
    #[error("the queue is full")]
    QueueFull,
    /// The engine is stopping.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Live counters, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests waiting for a place.
    pub queued: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Prompt tokens read.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Decode steps run.
    pub steps: AtomicU64,
    /// Finished requests by (label, outcome).
    pub outcomes: Mutex<BTreeMap<(String, String), u64>>,
}

impl EngineStats {
    /// Count one request for `label` ending as `outcome`.
    pub fn count(&self, label: &str, outcome: &str) {
        let mut m = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((label.to_string(), outcome.to_string())).or_default() += 1;
    }
}

/// The handle requests are submitted through (module docs); shared by the server's handlers.
pub struct Engine {
    tx: Mutex<Option<Sender<Request>>>,
    stats: Arc<EngineStats>,
    stopping: AtomicBool,
    aborting: Arc<AtomicBool>,
    max_queue: usize,
}

/// The scheduler loop, to be run on the thread that should drive the compute (for the CLI, a
/// worker of the compute pool, so the step's parallel loops use every core).
pub struct Worker {
    scheduler: Scheduler,
    rx: Receiver<Request>,
}

impl Worker {
    /// Schedule and run requests until [`Engine::close`] is called and every queued and running
    /// request has finished.
    pub fn run(self) {
        self.scheduler.run(self.rx)
    }
}

impl Engine {
    /// An engine over `model` and the worker that runs it.
    pub fn new(model: Arc<Llama>, tokenizer: Arc<Tokenizer>, config: EngineConfig) -> (Engine, Worker) {
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let max_queue = config.max_queue;
        let aborting = Arc::new(AtomicBool::new(false));
        let scheduler = Scheduler {
            aborting: aborting.clone(),
            model,
            tokenizer,
            config,
            stats: stats.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
        };
        let engine = Engine {
            tx: Mutex::new(Some(tx)),
            stats,
            stopping: AtomicBool::new(false),
            aborting,
            max_queue,
        };
        (engine, Worker { scheduler, rx })
    }

    /// Queue a request.
    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let queued = self.stats.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.max_queue {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref().map(|t| t.send(request).is_ok()) {
            Some(true) => Ok(()),
            _ => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                Err(SubmitError::ShuttingDown)
            }
        }
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Refuse new requests from now on; queued and running ones go on.
    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether [`Engine::stop_accepting`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// End every queued and running request now with [`Event::Failed`] (a shutdown past its
    /// deadline), and close.
    pub fn abort(&self) {
        self.aborting.store(true, Ordering::SeqCst);
        self.close();
    }

    /// Stop accepting; the worker returns once every queued and running request has finished.
    pub fn close(&self) {
        self.stop_accepting();
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// One running sequence.
struct Seq {
    req: Request,
    cache: SeqCache,
    /// Prompt tokens already read.
    fed: usize,
    generated: Vec<u32>,
    /// The token to feed next once the prompt is read.
    next: Option<u32>,
    sampler: Sampler,
    /// Bytes of the decoded text already sent.
    sent: usize,
}

enum Outcome {
    Continue,
    Done,
}

struct Scheduler {
    aborting: Arc<AtomicBool>,
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    waiting: VecDeque<Request>,
    running: Vec<Seq>,
}

impl Scheduler {
    fn run(mut self, rx: Receiver<Request>) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if !open {
                    return;
                }
                match rx.recv() {
                    Ok(r) => self.waiting.push_back(r),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(r) => self.waiting.push_back(r),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            if self.aborting.load(Ordering::SeqCst) {
                self.abort_all();
            }
            self.drop_abandoned();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    /// End every request: the server is stopping past its deadline.
    fn abort_all(&mut self) {
        let msg = "the server shut down before this request finished";
        for mut r in self.waiting.drain(..) {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            r.sink.send(Event::Failed(msg.into()));
            self.stats.count(&r.label, "aborted");
        }
        for mut s in self.running.drain(..) {
            s.req.sink.send(Event::Failed(msg.into()));
            self.stats.count(&s.req.label, "aborted");
        }
        self.stats.running.store(0, Ordering::SeqCst);
    }

    /// Forget waiting and running requests whose clients are gone.
    fn drop_abandoned(&mut self) {
        let stats = self.stats.clone();
        self.waiting.retain(|r| {
            let gone = r.sink.is_closed();
            if gone {
                stats.queued.fetch_sub(1, Ordering::SeqCst);
                stats.count(&r.label, "cancelled");
            }
            !gone
        });
        self.running.retain(|s| {
            let gone = s.req.sink.is_closed();
            if gone {
                stats.count(&s.req.label, "cancelled");
                tracing::info!(label = s.req.label, "client gone: sequence dropped");
            }
            !gone
        });
        self.stats.running.store(self.running.len(), Ordering::SeqCst);
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch.max(1) {
            let Some(req) = self.waiting.pop_front() else { break };
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            let p = &req.params;
            let sampler = Sampler::new(p.temperature, p.top_p, p.seed);
            self.running.push(Seq {
                req,
                cache: SeqCache::new(),
                fed: 0,
                generated: Vec::new(),
                next: None,
                sampler,
                sent: 0,
            });
        }
        self.stats.running.store(self.running.len(), Ordering::SeqCst);
    }

    /// One decode step over the running sequences.
    fn step(&mut self) {
        let mut budget = self.config.prefill_chunk.max(1);
        // (index into running, tokens this step), the prompt tokens copied out.
        let mut plan: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if let Some(t) = s.next {
                plan.push((i, vec![t]));
            } else if budget > 0 {
                let n = (s.req.prompt.len() - s.fed).min(budget);
                budget -= n;
                plan.push((i, s.req.prompt[s.fed..s.fed + n].to_vec()));
            }
        }
        let held: Vec<Vec<(Arc<ServedAdapter>, f32)>> = plan
            .iter()
            .map(|(i, _)| self.running[*i].req.adapters.clone())
            .collect();
        let adapters: Vec<Vec<(&ServedAdapter, f32)>> = held
            .iter()
            .map(|h| h.iter().map(|(a, s)| (&**a, *s)).collect())
            .collect();
        let mut caches: Vec<SeqCache> = plan
            .iter()
            .map(|(i, _)| std::mem::take(&mut self.running[*i].cache))
            .collect();
        let tokens: Vec<&[u32]> = plan.iter().map(|(_, t)| t.as_slice()).collect();
        let results: Vec<Result<Vec<f32>, String>> = match run_step(&self.model, &mut caches, &tokens, &adapters) {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            // One request's failure must not fail the others: rerun each alone to find it.
            Err(msg) if plan.len() > 1 => {
                tracing::warn!(
                    "a decode step of {} sequences failed ({msg}); running them one by one",
                    plan.len()
                );
                (0..plan.len())
                    .map(|k| {
                        let one = std::slice::from_mut(&mut caches[k]);
                        run_step(&self.model, one, &tokens[k..k + 1], &adapters[k..k + 1]).map(|mut r| r.remove(0))
                    })
                    .collect()
            }
            Err(msg) => vec![Err(msg)],
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        for ((i, _), cache) in plan.iter().zip(caches) {
            self.running[*i].cache = cache;
        }
        let mut done = Vec::new();
        for ((i, tokens), row) in plan.iter().zip(results) {
            let tokenizer = self.tokenizer.clone();
            let model = self.model.clone();
            let seq = &mut self.running[*i];
            let row = match row {
                Ok(row) => row,
                Err(msg) => {
                    tracing::error!(label = seq.req.label, "request failed: {msg}");
                    seq.req.sink.send(Event::Failed(msg));
                    done.push((*i, "error"));
                    continue;
                }
            };
            if seq.next.is_none() {
                seq.fed += tokens.len();
                self.stats
                    .prompt_tokens
                    .fetch_add(tokens.len() as u64, Ordering::Relaxed);
                if seq.fed < seq.req.prompt.len() {
                    continue;
                }
            }
            let stats = &self.stats;
            let outcome = catch_unwind(AssertUnwindSafe(|| advance(seq, &row, &tokenizer, &model, stats)));
            match outcome {
                Ok(Ok(Outcome::Continue)) => {}
                Ok(Ok(Outcome::Done)) => {
                    done.push((*i, "ok"));
                    continue;
                }
                Ok(Err(msg)) => {
                    tracing::error!(label = seq.req.label, "request failed: {msg}");
                    seq.req.sink.send(Event::Failed(msg));
                    done.push((*i, "error"));
                    continue;
                }
                Err(panic) => {
                    let msg = panic_message(&panic);
                    tracing::error!(label = seq.req.label, "request panicked: {msg}");
                    seq.req.sink.send(Event::Failed(msg));
                    done.push((*i, "error"));
                    continue;
                }
            };
        }
        self.retire(done);
    }

    fn retire(&mut self, mut done: Vec<(usize, &str)>) {
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, outcome) in done {
            let s = self.running.remove(i);
            self.stats.count(&s.req.label, outcome);
        }
        self.stats.running.store(self.running.len(), Ordering::SeqCst);
    }
}

/// One decode step, a panic caught as an error; on failure every cache is rolled back to before
/// the step.
fn run_step(
    model: &Llama,
    caches: &mut [SeqCache],
    tokens: &[&[u32]],
    adapters: &[Vec<(&ServedAdapter, f32)>],
) -> Result<Vec<Vec<f32>>, String> {
    let result = {
        let mut inputs: Vec<StepInput> = caches
            .iter_mut()
            .zip(tokens)
            .zip(adapters)
            .map(|((cache, tokens), ad)| StepInput {
                cache,
                tokens,
                adapters: ad,
            })
            .collect();
        catch_unwind(AssertUnwindSafe(|| model.decode_step(&mut inputs)))
    };
    let err = match result {
        Ok(Ok(rows)) => return Ok(rows),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic_message(&panic),
    };
    for c in caches.iter_mut() {
        c.discard_partial();
    }
    Err(err)
}

/// Take the sampled token for a sequence whose prompt is read: stream its text, decide whether it
/// ends.
fn advance(
    seq: &mut Seq,
    logits: &[f32],
    tokenizer: &Tokenizer,
    model: &Llama,
    stats: &EngineStats,
) -> Result<Outcome, String> {
    let next = seq.sampler.pick(logits) as u32;
    let p = &seq.req.params;
    let finish = |seq: &mut Seq, reason| {
        let ids = std::mem::take(&mut seq.generated);
        seq.req.sink.send(Event::Finished {
            reason,
            prompt_tokens: seq.req.prompt.len(),
            completion_tokens: ids.len(),
            ids,
        });
        Ok(Outcome::Done)
    };
    if !p.ignore_eos && tokenizer.stop_ids.contains(&next) {
        return finish(seq, FinishReason::Stop);
    }
    seq.generated.push(next);
    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let text = tokenizer.decode(&seq.generated).map_err(|e| e.to_string())?;
    if let Some(cut) = first_stop(&text, &p.stop, seq.sent) {
        send_text(seq, &text, cut);
        return finish(seq, FinishReason::Stop);
    }
    let full = seq.generated.len() >= p.max_tokens
        || seq.req.prompt.len() + seq.generated.len() >= model.cfg.max_position_embeddings;
    if full {
        send_text(seq, &text, text.len());
        return finish(seq, FinishReason::Length);
    }
    if !text.ends_with('\u{FFFD}') {
        let safe = text.len() - held_back(&text, &p.stop);
        send_text(seq, &text, safe);
    }
    seq.next = Some(next);
    Ok(Outcome::Continue)
}

/// Send `text[sent..end]` if it is non-empty and on character boundaries.
fn send_text(seq: &mut Seq, text: &str, end: usize) {
    if end > seq.sent && text.is_char_boundary(seq.sent) && text.is_char_boundary(end) {
        seq.req.sink.send(Event::Text(text[seq.sent..end].to_string()));
        seq.sent = end;
    }
}

/// Byte offset of the earliest stop string in `text` (searching from a little before `from`).
fn first_stop(text: &str, stops: &[String], from: usize) -> Option<usize> {
    let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut start = from.saturating_sub(longest);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text[start..].find(s.as_str()).map(|i| start + i))
        .min()
}

/// Length of the longest suffix of `text` that begins some stop string (held back until it is
/// known not to be one).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_their_prefixes_held_back() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(first_stop("abc END x", &stops, 0), Some(4));
        assert_eq!(first_stop("a\n\nb END", &stops, 2), Some(1));
        assert_eq!(first_stop("abc", &stops, 0), None);
        assert_eq!(held_back("abc E", &stops), 1);
        assert_eq!(held_back("abc EN", &stops), 2);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("é", &["éa".to_string()]), 2);
    }
}
