//! The serving engine and the adapter registry, without HTTP: a mixed batch gives every request
//! exactly the tokens it gets alone and from `generate`, and the registry stays under its budget.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use spiel::model::adapter::AdapterSet;
use spiel::model::loader::{self, LoadedModel};
use spiel::serve::engine::{Engine, EngineConfig, Event, EventSink, Request, SamplingParams};
use spiel::serve::registry::{Registry, RegistryError};
use spiel::tasks::generate::{generate, GenerateOptions};
use spiel::testkit::adapters::{random_lora, random_sparse};

struct Sink(Sender<Event>);

impl EventSink for Sink {
    fn send(&mut self, e: Event) -> bool {
        self.0.send(e).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

fn tiny(dir: &std::path::Path) -> LoadedModel {
    let cfg = spiel::formats::config::ModelConfig {
        vocab_size: spiel::testkit::synth::BYTE_LEVEL_VOCAB,
        max_position_embeddings: 256,
        ..spiel::model::random::tiny_config()
    };
    let w = spiel::model::random::random_weights(&cfg, 5, &Device::Cpu).unwrap();
    let p = dir.join("tiny.gguf");
    spiel::testkit::synth::write_gguf(&p, &cfg, &w, spiel::kernels::quant::Format::F32).unwrap();
    loader::load_gguf(&p, &Device::Cpu).unwrap()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop: Vec::new(),
        ignore_eos: false,
    }
}

/// The ids and text a request's events carry.
fn outcome(rx: &Receiver<Event>) -> (Vec<u32>, String) {
    let mut text = String::new();
    loop {
        match rx.recv().expect("an event") {
            Event::Text(t) => text.push_str(&t),
            Event::Finished { ids, .. } => return (ids, text),
            Event::Failed(m) => panic!("request failed: {m}"),
        }
    }
}

#[test]
fn a_mixed_batch_gives_each_request_its_tokens_alone_and_from_generate() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let mut adapters: Vec<_> = (0..8)
        .map(|i| random_sparse(&m.model, 100 + i, 0.1, 1.0).unwrap())
        .collect();
    adapters.push(random_lora(&m.model, 7, 4, 0.5).unwrap());
    let served: Vec<_> = adapters
        .iter()
        .map(|a| Arc::new(m.model.served_adapter(&a.to_set()).unwrap()))
        .collect();
    let prompts: Vec<Vec<u32>> = (0..10)
        .map(|i| m.tokenizer.encode(&format!("request {i}: the weather is")).unwrap())
        .collect();
    // Rows 0-8 use adapters 0-8 (8 sparse, 1 LoRA); row 9 the base alone.
    let row_adapters = |i: usize| if i < 9 { vec![(served[i].clone(), 1.0)] } else { vec![] };
    let model = Arc::new(m.model.clone());
    let tokenizer = Arc::new(m.tokenizer.clone());
    let run = |rows: &[usize], max_batch: usize, prefill_chunk: usize| -> Vec<(Vec<u32>, String)> {
        let (engine, worker) = Engine::new(
            model.clone(),
            tokenizer.clone(),
            EngineConfig {
                max_batch,
                max_queue: 64,
                prefill_chunk,
            },
        );
        let mut rxs = Vec::new();
        for &i in rows {
            let (tx, rx) = channel();
            engine
                .submit(Request {
                    prompt: prompts[i].clone(),
                    adapters: row_adapters(i),
                    params: greedy(12),
                    label: format!("a{i}"),
                    sink: Box::new(Sink(tx)),
                })
                .unwrap();
            rxs.push(rx);
        }
        engine.close();
        worker.run();
        assert_eq!(engine.stats().running.load(std::sync::atomic::Ordering::SeqCst), 0);
        rxs.iter().map(outcome).collect()
    };
    let all: Vec<usize> = (0..10).collect();
    let mixed = run(&all, 16, 7);
    for i in 0..10 {
        let alone = run(&[i], 1, 256);
        assert_eq!(mixed[i], alone[0], "request {i}: mixed batch vs alone");
        let set = if i < 9 {
            adapters[i].to_set()
        } else {
            AdapterSet::none()
        };
        let opts = GenerateOptions {
            max_new_tokens: 12,
            temperature: 0.0,
            seed: 0,
            stop_strings: Vec::new(),
        };
        let g = generate(&m.model, &set, &m.tokenizer, &prompts[i], &opts, |_| {}).unwrap();
        assert_eq!(mixed[i].0, g.ids, "request {i}: mixed batch vs generate");
        assert_eq!(mixed[i].1, g.text, "request {i}: text");
    }
    // The adapters matter: most rows differ from what the base alone gives for the same prompt.
    let base_runs: Vec<_> = (0..9)
        .map(|i| {
            let opts = GenerateOptions {
                max_new_tokens: 12,
                temperature: 0.0,
                seed: 0,
                stop_strings: Vec::new(),
            };
            generate(&m.model, &AdapterSet::none(), &m.tokenizer, &prompts[i], &opts, |_| {})
                .unwrap()
                .ids
        })
        .collect();
    let differ = (0..9).filter(|&i| mixed[i].0 != base_runs[i]).count();
    assert!(differ >= 7, "only {differ} of 9 adapted rows differ from the base");
}

#[test]
fn the_registry_keeps_under_budget_evicting_unheld_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let root = dir.path().join("adapters");
    for i in 0..64 {
        random_sparse(&m.model, i, 0.02, 0.05)
            .unwrap()
            .save(&root.join(format!("ad{i:02}")))
            .unwrap();
    }
    // A run directory of `spiel train` serves the adapter inside it, by the run's name.
    random_sparse(&m.model, 99, 0.02, 0.05)
        .unwrap()
        .save(&dir.path().join("runs").join("run7").join("adapter"))
        .unwrap();
    let model = Arc::new(m.model.clone());
    let mut runs = Registry::new(model.clone(), Some(&dir.path().join("runs")), &[], 1 << 30).unwrap();
    assert_eq!(runs.names(), vec!["run7".to_string()]);
    runs.get("run7").unwrap();
    let one = model
        .served_adapter(&model.load_adapter(&root.join("ad00")).unwrap().to_set())
        .unwrap()
        .bytes();
    let budget = 8 * one + one / 2;
    let reg = Arc::new(Mutex::new(Registry::new(model, Some(&root), &[], budget).unwrap()));
    assert_eq!(reg.lock().unwrap().names().len(), 64);
    let mut held = Vec::new();
    for round in 0..2 {
        for i in 0..64 {
            let a = reg.lock().unwrap().get(&format!("ad{i:02}")).unwrap();
            // Hold up to 4 at a time, as running requests would.
            held.push(a);
            if held.len() > 4 {
                held.remove(0);
            }
            let s = reg.lock().unwrap().stats();
            assert!(
                s.resident_bytes <= budget,
                "round {round}, adapter {i}: {} > {budget}",
                s.resident_bytes
            );
        }
    }
    let s = reg.lock().unwrap().stats();
    assert_eq!(s.loads, 128, "every get past the budget reloads");
    assert!(s.evictions >= 120);
    // A held adapter is never evicted: the last four are still resident.
    let before = reg.lock().unwrap().stats().loads;
    reg.lock().unwrap().get("ad63").unwrap();
    assert_eq!(reg.lock().unwrap().stats().loads, before);
    // Names are plain; unknown ones and other bases are refused.
    let mut r = reg.lock().unwrap();
    assert!(matches!(r.get("../ad00"), Err(RegistryError::Unknown(_))));
    assert!(matches!(r.get("nope"), Err(RegistryError::Unknown(_))));
    assert!(matches!(
        r.register("x", &dir.path().join("tiny.gguf")),
        Err(RegistryError::Refused(_))
    ));
    assert!(matches!(
        r.register("a/b", &root.join("ad01")),
        Err(RegistryError::Refused(_))
    ));
    let other = tiny_other(dir.path());
    other.save(&root.join("other")).unwrap();
    let err = r.get("other").unwrap_err();
    assert!(err.to_string().contains("other"), "{err}");
    r.register("alias", &root.join("ad05")).unwrap();
    r.get("alias").unwrap();
    r.unregister("alias").unwrap();
    assert!(matches!(r.get("alias"), Err(RegistryError::Unknown(_))));
}

/// An adapter trained on a model with another shape.
fn tiny_other(dir: &std::path::Path) -> spiel::model::adapter::Adapter {
    let cfg = spiel::formats::config::ModelConfig {
        vocab_size: spiel::testkit::synth::BYTE_LEVEL_VOCAB,
        intermediate_size: 80,
        ..spiel::model::random::tiny_config()
    };
    let _ = dir;
    let m = spiel::model::transformer::Llama::random(cfg, 1, &Device::Cpu).unwrap();
    random_sparse(&m, 1, 0.02, 0.05).unwrap()
}

#[test]
fn a_request_that_panics_fails_alone_and_its_batch_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    // An adapter prepared for a one-layer model: applying it in layer 1 indexes past its modules.
    let small = spiel::model::transformer::Llama::random(
        spiel::formats::config::ModelConfig {
            num_layers: 1,
            vocab_size: spiel::testkit::synth::BYTE_LEVEL_VOCAB,
            ..spiel::model::random::tiny_config()
        },
        2,
        &Device::Cpu,
    )
    .unwrap();
    let foreign = Arc::new(
        small
            .served_adapter(&random_sparse(&small, 3, 0.05, 0.5).unwrap().to_set())
            .unwrap(),
    );
    let good = Arc::new(
        m.model
            .served_adapter(&random_sparse(&m.model, 4, 0.05, 0.5).unwrap().to_set())
            .unwrap(),
    );
    let prompt = m.tokenizer.encode("a prompt").unwrap();
    let run = |adapters: Vec<Vec<(Arc<spiel::model::decode::ServedAdapter>, f32)>>| {
        let (engine, worker) = Engine::new(
            Arc::new(m.model.clone()),
            Arc::new(m.tokenizer.clone()),
            EngineConfig {
                max_batch: 8,
                max_queue: 8,
                prefill_chunk: 64,
            },
        );
        let rxs: Vec<Receiver<Event>> = adapters
            .into_iter()
            .map(|a| {
                let (tx, rx) = channel();
                engine
                    .submit(Request {
                        prompt: prompt.clone(),
                        adapters: a,
                        params: greedy(6),
                        label: "x".into(),
                        sink: Box::new(Sink(tx)),
                    })
                    .unwrap();
                rx
            })
            .collect();
        engine.close();
        worker.run();
        let errors = engine
            .stats()
            .outcomes
            .lock()
            .unwrap()
            .get(&("x".to_string(), "error".to_string()))
            .copied();
        (rxs, errors)
    };
    let (rxs, errors) = run(vec![vec![], vec![(foreign, 1.0)], vec![(good.clone(), 1.0)]]);
    let (alone, _) = run(vec![vec![], vec![(good, 1.0)]]);
    assert_eq!(outcome(&rxs[0]), outcome(&alone[0]), "the base-only request");
    match rxs[1].recv().unwrap() {
        Event::Failed(msg) => assert!(msg.contains("internal error"), "{msg}"),
        other => panic!("the bad request got {other:?}"),
    }
    assert_eq!(outcome(&rxs[2]), outcome(&alone[1]), "the adapted request");
    assert_eq!(errors, Some(1));
}

#[test]
fn the_registry_comes_back_under_budget_once_held_adapters_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let root = dir.path().join("adapters");
    for i in 0..10 {
        random_sparse(&m.model, i, 0.02, 0.05)
            .unwrap()
            .save(&root.join(format!("ad{i}")))
            .unwrap();
    }
    let model = Arc::new(m.model.clone());
    let one = model
        .served_adapter(&model.load_adapter(&root.join("ad0")).unwrap().to_set())
        .unwrap()
        .bytes();
    let budget = 4 * one + one / 2;
    let mut reg = Registry::new(model, Some(&root), &[], budget).unwrap();
    // Six held at once cannot fit a budget for four: it is passed, not refused.
    let held: Vec<_> = (0..6).map(|i| reg.get(&format!("ad{i}")).unwrap()).collect();
    assert_eq!(reg.stats().resident, 6);
    assert!(reg.stats().resident_bytes > budget);
    drop(held);
    // The next lookup, a hit, evicts back under the budget.
    reg.get("ad5").unwrap();
    let s = reg.stats();
    assert!(s.resident_bytes <= budget, "{} > {budget}", s.resident_bytes);
    assert_eq!(s.resident, 4);
    assert_eq!(s.loads, 6);
}
