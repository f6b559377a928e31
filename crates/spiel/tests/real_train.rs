//! SpIEL on the real SmolLM2-135M-Instruct and the Alpaca demo data: short SpIEL-AG and SpIEL-MA
//! runs each lower the held-out response loss below the untouched base model's, and with the
//! default gradient initial mask no reselection replaces more than zeta0 of the entries; default
//! SpIEL-AG ends within the quality study's spread of default LoRA.

mod common;

use spiel::model::adapter::Method;
use spiel::train::config::TrainConfig;
use spiel::train::{self, trainer::Trainer};

#[test]
fn spiel_ag_and_ma_lower_heldout_loss_on_smollm2() {
    let Some(m) = common::smollm() else { return };
    let Some(data) = common::asset(&spiel::formats::assets::ALPACA) else {
        return;
    };
    let convs = spiel::train::data::read_conversations(&data).unwrap();
    assert_eq!(convs.len(), 999);
    let dir = tempfile::tempdir().unwrap();
    for method in [Method::SpielAg, Method::SpielMa] {
        let cfg = TrainConfig {
            method,
            out: dir.path().join(method.as_str()),
            heldout: 100,
            seed: 0,
            steps: 8,
            batch_size: 4,
            max_len: 128,
            reselection_steps: Some(4),
            accumulation_steps: Some(2),
            eval_every: 8,
            eval_batch_size: 20,
            save_every: 0,
            ..TrainConfig::default()
        };
        let (mut t, stats) = Trainer::new(cfg, m.model.clone(), "smollm2", &m.tokenizer, &convs).unwrap();
        let budget = t.trainable_parameters();
        let zeta0 = t.config().reselection_rate;
        let mut replaced = Vec::new();
        let s = train::run::run(&mut t, &m.tokenizer, &stats, false, |ev| {
            if let train::run::Event::Step(r) = ev {
                if let Some(rs) = r.reselection {
                    replaced.push((r.step, rs.dropped + rs.cancelled));
                }
            }
            train::run::Flow::Continue
        })
        .unwrap();
        assert!(!replaced.is_empty(), "{method:?}: no reselection ran");
        for (step, n) in &replaced {
            assert!(
                *n as f64 <= zeta0 * budget as f64,
                "{method:?}: the reselection after update {step} replaced {n} of {budget} entries"
            );
        }
        let (before, after) = (s.initial_eval.unwrap(), s.final_eval.unwrap());
        eprintln!("{}: held-out loss {before:.4} -> {after:.4}", method.as_str());
        assert!(after < before, "{method:?}: held-out loss {before} -> {after}");
        assert!(s.output.join("adapter_model.safetensors").exists());
    }
}

/// How far default SpIEL-AG may end above default LoRA: in the quality study SpIEL-AG trailed
/// LoRA slightly, its paired difference (SpIEL-AG minus LoRA, test loss, seeds 1-3) being
/// 0.0036 with a sample standard deviation of 0.0017 (docs/results.md); this allows the mean
/// plus two standard deviations (this run's gap was 0.0027 on the AMD EPYC VM).
const TIED_WITHIN: f64 = 0.0070;

/// Default SpIEL-AG against default LoRA on the same seed, split and examples (the study's
/// example length, a quarter of its updates): SpIEL-AG's held-out loss ends at most
/// [`TIED_WITHIN`] above LoRA's.
#[test]
fn default_spiel_ag_stays_within_the_studys_spread_of_default_lora() {
    let Some(m) = common::smollm() else { return };
    let Some(data) = common::asset(&spiel::formats::assets::ALPACA) else {
        return;
    };
    let convs = spiel::train::data::read_conversations(&data).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut ends = Vec::new();
    for method in [Method::SpielAg, Method::Lora] {
        let cfg = TrainConfig {
            method,
            out: dir.path().join(method.as_str()),
            heldout: 64,
            steps: 40,
            max_len: 128,
            eval_every: 40,
            eval_batch_size: 16,
            save_every: 0,
            ..TrainConfig::default()
        };
        let (mut t, stats) = Trainer::new(cfg, m.model.clone(), "smollm2", &m.tokenizer, &convs).unwrap();
        let s = train::run::run(&mut t, &m.tokenizer, &stats, false, |_| train::run::Flow::Continue).unwrap();
        let (before, after) = (s.initial_eval.unwrap(), s.final_eval.unwrap());
        eprintln!("{}: held-out loss {before:.4} -> {after:.4}", method.as_str());
        ends.push(after);
    }
    let (ag, lora) = (ends[0], ends[1]);
    assert!(
        ag <= lora + TIED_WITHIN,
        "default SpIEL-AG ended at {ag:.4}, default LoRA at {lora:.4}: more than {TIED_WITHIN} apart"
    );
}
