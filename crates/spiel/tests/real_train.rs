//! SpIEL on the real SmolLM2-135M-Instruct and the Alpaca demo data: short SpIEL-AG and SpIEL-MA
//! runs each lower the held-out response loss below the untouched base model's, and with the
//! default gradient initial mask no reselection replaces more than zeta0 of the entries.

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
