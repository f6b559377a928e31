//! The batched decoding step ([`spiel::model::decode`]): against the whole-sequence forward, with
//! sequences of different lengths and adapters in one step, and bit-identical whatever a sequence
//! is batched with or however its prompt is chunked.

mod common;

use candle_core::{Device, Tensor};
use spiel::model::adapter::AdapterSet;
use spiel::model::decode::{SeqCache, ServedAdapter, StepInput};
use spiel::model::transformer::Llama;
use spiel::model::weight::Grad;
use spiel::testkit::adapters::{random_lora, random_sparse};

fn model() -> Llama {
    Llama::random(common::tiny_cfg(), 21, &Device::Cpu).unwrap()
}

/// Random sparse deltas on every projection (values times `scale`) and, with `lora`, a random
/// LoRA pair on every projection too.
fn adapters(m: &Llama, seed: u64, scale: f32, lora: bool) -> AdapterSet {
    let mut set = random_sparse(m, seed, 0.05, 0.5 * scale).unwrap().to_set();
    if lora {
        set.extend(&random_lora(m, seed + 100, 4, 0.1).unwrap().to_set());
    }
    set
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 5 + 11 * salt) % 262).collect()
}

/// Logits at every position of `seq` from the whole-sequence forward.
fn full_logits(m: &Llama, seq: &[u32], set: &AdapterSet) -> Vec<Vec<f32>> {
    let ids = Tensor::new(seq, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let l = m.forward(&ids, None, Grad::No, set).unwrap().squeeze(0).unwrap();
    l.to_vec2().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Run sequences through decode steps in the given chunk plans (one list of chunk lengths per
/// sequence, all advancing together), returning every logits vector each step produced.
/// A sequence's tokens and the adapters its rows use.
type Seq<'a> = (Vec<u32>, Vec<(&'a ServedAdapter, f32)>);

fn run(m: &Llama, seqs: &[Seq], plans: &[Vec<usize>]) -> Vec<Vec<Vec<f32>>> {
    let mut caches: Vec<SeqCache> = seqs.iter().map(|_| SeqCache::new()).collect();
    let mut pos = vec![0usize; seqs.len()];
    let mut out = vec![Vec::new(); seqs.len()];
    let steps = plans.iter().map(|p| p.len()).max().unwrap();
    for step in 0..steps {
        let active: Vec<usize> = (0..seqs.len()).filter(|&s| step < plans[s].len()).collect();
        let mut inputs: Vec<StepInput> = Vec::new();
        for (s, cache) in caches.iter_mut().enumerate() {
            if !active.contains(&s) {
                continue;
            }
            let n = plans[s][step];
            inputs.push(StepInput {
                cache,
                tokens: &seqs[s].0[pos[s]..pos[s] + n],
                adapters: &seqs[s].1,
            });
        }
        let logits = m.decode_step(&mut inputs).unwrap();
        for (&s, l) in active.iter().zip(logits) {
            pos[s] += plans[s][step];
            out[s].push(l);
        }
    }
    out
}

#[test]
fn a_mixed_step_matches_each_sequence_s_full_forward() {
    let m = model();
    let (a1, a2) = (adapters(&m, 1, 1.0, true), adapters(&m, 2, 1.0, false));
    let (s1, s2) = (m.served_adapter(&a1).unwrap(), m.served_adapter(&a2).unwrap());
    // Composition adds the deltas; a scale multiplies a sparse delta's values.
    let mut both = a1.clone();
    both.extend(&a2);
    let half = adapters(&m, 2, 0.5, false);
    let seqs = vec![
        (tokens(12, 0), vec![(&s1, 1.0)]),
        (tokens(70, 1), vec![]),
        (tokens(9, 2), vec![(&s1, 1.0), (&s2, 1.0)]),
        (tokens(11, 3), vec![(&s2, 0.5)]),
    ];
    let plans = vec![vec![5, 3, 1, 1, 2], vec![64, 1, 1, 1, 1, 1, 1], vec![1; 9], vec![11]];
    let got = run(&m, &seqs, &plans);
    for (s, set) in [(0, &a1), (1, &AdapterSet::none()), (2, &both), (3, &half)] {
        let full = full_logits(&m, &seqs[s].0, set);
        let mut pos = 0;
        for (step, n) in plans[s].iter().enumerate() {
            pos += n;
            let d = max_diff(&got[s][step], &full[pos - 1]);
            assert!(d < 1e-4, "sequence {s} after {pos} tokens: {d}");
        }
    }
    // The adapters matter: without them sequence 0 differs.
    let plain = full_logits(&m, &seqs[0].0, &AdapterSet::none());
    assert!(max_diff(&got[0][4], &plain[11]) > 1e-3);
}

#[test]
fn a_sequence_s_logits_do_not_depend_on_its_batch_or_its_chunks() {
    let m = model();
    let (a1, a2) = (adapters(&m, 3, 1.0, true), adapters(&m, 4, 1.0, true));
    let (s1, s2) = (m.served_adapter(&a1).unwrap(), m.served_adapter(&a2).unwrap());
    let seq = tokens(20, 7);
    let alone = run(&m, &[(seq.clone(), vec![(&s1, 1.0)])], &[vec![20]]);
    let chunked = run(&m, &[(seq.clone(), vec![(&s1, 1.0)])], &[vec![3, 16, 1]]);
    let crowd = vec![
        (tokens(30, 1), vec![(&s2, 1.0)]),
        (seq.clone(), vec![(&s1, 1.0)]),
        (tokens(5, 2), vec![]),
        (tokens(8, 3), vec![(&s1, 1.0), (&s2, 0.25)]),
    ];
    let batched = run(&m, &crowd, &[vec![30], vec![7, 7, 6], vec![5], vec![2, 2, 2, 2]]);
    assert_eq!(chunked[0][2], alone[0][0], "chunked prefill");
    assert_eq!(batched[1][2], alone[0][0], "batched with others");
    // And decoding on: one more token, alone and in a crowd.
    let mut c_alone = SeqCache::new();
    let mut c_crowd = SeqCache::new();
    let mut c_other = SeqCache::new();
    let ad = [(&s1, 1.0f32)];
    let other_ad = [(&s2, 1.0f32)];
    m.decode_step(&mut [StepInput {
        cache: &mut c_alone,
        tokens: &seq,
        adapters: &ad,
    }])
    .unwrap();
    let other = tokens(4, 9);
    m.decode_step(&mut [
        StepInput {
            cache: &mut c_other,
            tokens: &other,
            adapters: &other_ad,
        },
        StepInput {
            cache: &mut c_crowd,
            tokens: &seq,
            adapters: &ad,
        },
    ])
    .unwrap();
    let next = [17u32];
    let x = m
        .decode_step(&mut [StepInput {
            cache: &mut c_alone,
            tokens: &next,
            adapters: &ad,
        }])
        .unwrap();
    let y = m
        .decode_step(&mut [
            StepInput {
                cache: &mut c_crowd,
                tokens: &next,
                adapters: &ad,
            },
            StepInput {
                cache: &mut c_other,
                tokens: &next,
                adapters: &other_ad,
            },
        ])
        .unwrap();
    assert_eq!(x[0], y[0]);
    assert_eq!(c_alone.len(), 21);
}

#[test]
fn bad_steps_are_errors() {
    let m = model();
    let mut c = SeqCache::new();
    let err = m
        .decode_step(&mut [StepInput {
            cache: &mut c,
            tokens: &[],
            adapters: &[],
        }])
        .unwrap_err();
    assert!(err.to_string().contains("no new tokens"), "{err}");
    let err = m
        .decode_step(&mut [StepInput {
            cache: &mut c,
            tokens: &[100_000],
            adapters: &[],
        }])
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let long = vec![1u32; m.cfg.max_position_embeddings + 1];
    let err = m
        .decode_step(&mut [StepInput {
            cache: &mut c,
            tokens: &long,
            adapters: &[],
        }])
        .unwrap_err();
    assert!(err.to_string().contains("exceeds the model's context"), "{err}");
    assert!(c.is_empty());
}
