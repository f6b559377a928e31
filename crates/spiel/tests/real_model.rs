//! Golden parity and end-to-end behaviour on the real SmolLM2-135M-Instruct (f32 dequantised).

mod common;

use spiel::model::adapter::AdapterSet;

use candle_core::Tensor;
use spiel::formats::tokenizer::{Message, Tokenizer, CHATML_TEMPLATE};
use spiel::model::transformer::KvCache;
use spiel::model::weight::Grad;
use spiel::tasks::generate::{argmax, generate, GenerateOptions};
use spiel::tasks::score::score;

/// Golden top-5 from the spec (reference implementation, f32 dequantised weights).
const GOLDEN_TOP5: [(u32, &str, f32); 5] = [
    (7042, " Paris", 17.371),
    (260, " the", 14.889),
    (4528, " London", 13.245),
    (2250, " Le", 13.009),
    (1315, " New", 12.952),
];

#[test]
fn golden_score_matches_reference() {
    let Some(m) = common::smollm() else { return };
    let s = score(
        &m.model,
        &AdapterSet::none(),
        &m.tokenizer,
        "The capital of France is",
        5,
    )
    .unwrap();
    assert_eq!(s.ids, vec![504, 3575, 282, 4649, 314]);
    for (got, (id, tok, logit)) in s.top.iter().zip(GOLDEN_TOP5) {
        assert_eq!(got.id, id);
        assert_eq!(got.token, tok);
        // Golden values are printed to 3 decimals; 1e-2 allows for summation order.
        assert!((got.logit - logit).abs() < 1e-2, "{tok}: {} vs {logit}", got.logit);
    }
    let nll = s.nll.unwrap();
    assert!((nll - 3.6916).abs() < 1e-3, "nll {nll}");
}

fn greedy_chat(tok: &Tokenizer, model: &spiel::model::transformer::Llama, prompt: &str) -> String {
    let text = tok.apply_chat_template(&[Message::new("user", prompt)], true).unwrap();
    let ids = tok.encode(&text).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 40,
        temperature: 0.0,
        seed: 0,
        stop_strings: Vec::new(),
    };
    generate(model, &AdapterSet::none(), tok, &ids, &opts, |_| {})
        .unwrap()
        .text
}

#[test]
fn greedy_chat_answer_is_paris() {
    let Some(m) = common::smollm() else { return };
    // Plain ChatML with no system prompt (the golden setting) ...
    let mut plain = m.tokenizer.clone();
    plain.chat_template = CHATML_TEMPLATE.to_string();
    let rendered = plain.apply_chat_template(&[Message::new("user", "hi")], true).unwrap();
    assert_eq!(rendered, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(
        greedy_chat(&plain, &m.model, "What is the capital of France?"),
        "The capital of France is Paris."
    );
    // ... and the model's own template (which adds SmolLM's default system prompt).
    assert_eq!(
        greedy_chat(&m.tokenizer, &m.model, "What is the capital of France?"),
        "The capital of France is Paris."
    );
}

#[test]
fn kv_cache_matches_full_recomputation() {
    let Some(m) = common::smollm() else { return };
    let dev = m.model.device();
    let mut ids = m
        .tokenizer
        .encode("Once upon a time, in a small village by the sea,")
        .unwrap();
    let prompt_len = ids.len();
    // Cached: prefill, then one token at a time, never stopping early.
    let mut cache = KvCache::new();
    let mut logits = m
        .model
        .forward_cached(
            &Tensor::new(ids.as_slice(), dev).unwrap().unsqueeze(0).unwrap(),
            &mut cache,
            &AdapterSet::none(),
        )
        .unwrap();
    let mut cached = Vec::new();
    for _ in 0..32 {
        let next = argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()) as u32;
        cached.push(next);
        logits = m
            .model
            .forward_cached(
                &Tensor::new(&[next], dev).unwrap().unsqueeze(0).unwrap(),
                &mut cache,
                &AdapterSet::none(),
            )
            .unwrap();
    }
    // Full recomputation of the whole sequence for every new token.
    for _ in 0..32 {
        let input = Tensor::new(ids.as_slice(), dev).unwrap().unsqueeze(0).unwrap();
        let all = m.model.forward(&input, None, Grad::No, &AdapterSet::none()).unwrap();
        let last: Vec<f32> = all.get(0).unwrap().get(ids.len() - 1).unwrap().to_vec1().unwrap();
        ids.push(argmax(&last) as u32);
    }
    assert_eq!(cached, ids[prompt_len..].to_vec());
}

#[test]
fn exported_hf_directory_reproduces_gguf_logits() {
    let Some(m) = common::smollm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-hf");
    spiel::model::loader::export_hf(&m.model, &m.tokenizer, &out).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let hf = spiel::model::loader::load(&out, &candle_core::Device::Cpu).unwrap();
    let text = "The capital of France is";
    let a = score(&m.model, &AdapterSet::none(), &m.tokenizer, text, 5).unwrap();
    let b = score(&hf.model, &AdapterSet::none(), &hf.tokenizer, text, 5).unwrap();
    assert_eq!(a.ids, b.ids);
    for (x, y) in a.top.iter().zip(&b.top) {
        assert_eq!(x.id, y.id);
        assert!((x.logit - y.logit).abs() < 1e-4, "{} vs {}", x.logit, y.logit);
    }
    assert!((a.nll.unwrap() - b.nll.unwrap()).abs() < 1e-4);
    assert_eq!(m.tokenizer.chat_template, hf.tokenizer.chat_template);
    assert_eq!(m.tokenizer.stop_ids, hf.tokenizer.stop_ids);
}

#[test]
fn tokenizer_round_trips_alpaca_and_keeps_specials_atomic() {
    let Some(m) = common::smollm() else { return };
    let Some(path) = common::asset(&spiel::formats::assets::ALPACA) else {
        return;
    };
    let data: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(data.len(), 999);
    let tok = &m.tokenizer;
    let mut n = 0;
    for ex in &data {
        for field in ["instruction", "input", "output"] {
            let text = ex[field].as_str().unwrap();
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text);
            n += ids.len();
        }
    }
    assert!(n > 100_000, "only {n} tokens encoded");
    // Special tokens are single ids, never split by BPE.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|endoftext|>").unwrap();
    assert_eq!(ids[0], 1);
    assert!(ids.contains(&2) && ids.contains(&0));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    // SmolLM splits digits individually.
    let digits = tok.encode("12345").unwrap();
    assert_eq!(digits.len(), 5);
    assert_eq!(tok.decode(&digits).unwrap(), "12345");
    // Leading spaces survive decoding of single tokens.
    assert_eq!(tok.token_text(7042), " Paris");
}
