//! Entry points that hand untrusted bytes to each parser of outside input exactly the way a
//! user's file reaches it: the bytes are written to a scratch directory beside valid companion
//! files (a tiny synthetic model, its tokenizer, a valid adapter) and read back through the public
//! loaders. The fuzz targets under `fuzz/` and the regression tests over `fuzz/regressions/` both
//! call [`Target::run`]: an `Err` is a correct answer to bad input; a panic, an abort or an
//! allocation of memory the input does not justify is a bug.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};

use crate::formats::config::ModelConfig;
use crate::formats::gguf::Gguf;
use crate::formats::tokenizer::{Message, Tokenizer};
use crate::kernels::quant::Format;
use crate::model::adapter::{Adapter, AdapterConfig, BaseModel, Delta, LoraDelta, Method, SparseDelta};
use crate::model::loader::{self, LoadedModel};
use crate::model::random;
use crate::{testkit::synth, train::data, Error, Result};

/// One parser (or pair of parsers) under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A whole GGUF model file: header, metadata, tensor table, config, tokenizer, weights.
    Gguf,
    /// GGUF metadata turned into a tokenizer, then used to encode, template and decode.
    GgufTokenizer,
    /// A Hugging Face `config.json`.
    ConfigJson,
    /// `model.safetensors` of a Hugging Face directory (header, offsets, dtypes, shapes).
    Safetensors,
    /// `model.safetensors.index.json` of a sharded Hugging Face directory.
    SafetensorsIndex,
    /// A training data file: Alpaca JSON array or chat/Alpaca JSONL, then tokenized.
    Data,
    /// `adapter_config.json` next to a valid tensor file of the kind it declares.
    AdapterConfig,
    /// `adapter_model.safetensors` next to a valid config of the kind its tensor names suggest, then merged.
    AdapterSafetensors,
}

impl Target {
    /// Every target, in the order `scripts/fuzz.sh` runs them.
    pub const ALL: [Target; 8] = [
        Target::Gguf,
        Target::GgufTokenizer,
        Target::ConfigJson,
        Target::Safetensors,
        Target::SafetensorsIndex,
        Target::Data,
        Target::AdapterConfig,
        Target::AdapterSafetensors,
    ];

    /// The target's name: the fuzz binary and its corpus and regression folders.
    pub fn name(self) -> &'static str {
        match self {
            Target::Gguf => "gguf",
            Target::GgufTokenizer => "gguf_tokenizer",
            Target::ConfigJson => "config_json",
            Target::Safetensors => "safetensors",
            Target::SafetensorsIndex => "safetensors_index",
            Target::Data => "data",
            Target::AdapterConfig => "adapter_config",
            Target::AdapterSafetensors => "adapter_safetensors",
        }
    }

    /// Feed `bytes` to the parser. Never panics on any input (that is what is being tested).
    pub fn run(self, bytes: &[u8]) -> Result<()> {
        let fx = fixture()?;
        let case = fx.case_dir(self.name())?;
        let write = |name: &str, b: &[u8]| -> Result<PathBuf> {
            let p = case.join(name);
            std::fs::write(&p, b).map_err(|e| Error::io(&p, e))?;
            Ok(p)
        };
        let copy = |name: &str| -> Result<()> {
            let from = fx.hf.join(name);
            std::fs::copy(&from, case.join(name)).map_err(|e| Error::io(&from, e))?;
            Ok(())
        };
        let cpu = Device::Cpu;
        match self {
            Target::Gguf => {
                let p = write("model.gguf", bytes)?;
                let m = loader::load_gguf(&p, &cpu)?;
                exercise_tokenizer(&m.tokenizer)?;
            }
            Target::GgufTokenizer => {
                let p = write("model.gguf", bytes)?;
                let g = Gguf::open(&p)?;
                exercise_tokenizer(&Tokenizer::from_gguf(&g)?)?;
            }
            Target::ConfigJson => {
                let p = write("config.json", bytes)?;
                let cfg = ModelConfig::from_hf_file(&p)?;
                let _ = (cfg.num_parameters(), cfg.fingerprint(), cfg.to_hf_json());
            }
            Target::Safetensors => {
                copy("config.json")?;
                copy("tokenizer.json")?;
                write("model.safetensors", bytes)?;
                loader::load_hf_dir(&case, &cpu)?;
            }
            Target::SafetensorsIndex => {
                copy("config.json")?;
                copy("tokenizer.json")?;
                let shard = "model-00001-of-00001.safetensors";
                std::fs::copy(fx.hf.join("model.safetensors"), case.join(shard))
                    .map_err(|e| Error::io(case.join(shard), e))?;
                write("model.safetensors.index.json", bytes)?;
                loader::load_hf_dir(&case, &cpu)?;
            }
            Target::Data => {
                let p = write("data.jsonl", bytes)?;
                let convs = data::read_conversations(&p)?;
                data::tokenize_all(&convs, &fx.model.tokenizer, 64)?;
            }
            Target::AdapterConfig => {
                write("adapter_config.json", bytes)?;
                // The companion tensor file of the kind the config declares (PEFT's default: LoRA).
                let method = serde_json::from_slice::<serde_json::Value>(bytes)
                    .ok()
                    .and_then(|v| v.get("method").and_then(|m| m.as_str()).map(str::to_string));
                let kind = match method.as_deref() {
                    Some("spiel-ag" | "spiel-ma") => "sparse",
                    _ => "lora",
                };
                let st = fx.adapters.join(kind).join("adapter_model.safetensors");
                std::fs::copy(&st, case.join("adapter_model.safetensors")).map_err(|e| Error::io(&st, e))?;
                fx.model.model.load_adapter(&case)?;
            }
            Target::AdapterSafetensors => {
                write("adapter_model.safetensors", bytes)?;
                // The companion config of the kind the tensor names suggest; then merged.
                let lora = bytes.windows(6).any(|w| w == b"lora_A");
                let kind = if lora { "lora" } else { "sparse" };
                let c = fx.adapters.join(kind).join("adapter_config.json");
                std::fs::copy(&c, case.join("adapter_config.json")).map_err(|e| Error::io(&c, e))?;
                let a = fx.model.model.load_adapter(&case)?;
                fx.model.model.merged(&a.to_set())?;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Target> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| Error::Invalid(format!("unknown fuzz target `{s}`")))
    }
}

/// Use a tokenizer the way training and generation do.
fn exercise_tokenizer(tok: &Tokenizer) -> Result<()> {
    let msgs = [
        Message::new("user", "Hi there, the cat?"),
        Message::new("assistant", "Yes."),
    ];
    let text = tok.apply_chat_template(&msgs, true)?;
    let ids = tok.encode(&text)?;
    tok.decode(&ids)?;
    for &id in ids.iter().take(8) {
        tok.token_text(id);
    }
    Ok(())
}

/// Valid companion files, made once per process.
struct Fixture {
    /// Scratch root. It lives in a static, which is never dropped, so it is left in the system
    /// temp directory when the process exits (a few hundred kilobytes).
    root: tempfile::TempDir,
    /// A tiny synthetic model, loaded.
    model: LoadedModel,
    /// Its Hugging Face export (config.json, tokenizer.json, model.safetensors).
    hf: PathBuf,
    /// `sparse/` and `lora/` adapter directories for it.
    adapters: PathBuf,
}

impl Fixture {
    /// An emptied directory for one case of one target on this thread.
    fn case_dir(&self, name: &str) -> Result<PathBuf> {
        let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_alphanumeric(), "");
        let dir = self.root.path().join("case").join(format!("{name}-{thread}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(dir)
    }
}

fn fixture() -> Result<&'static Fixture> {
    static FIXTURE: OnceLock<std::result::Result<Fixture, String>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| build_fixture().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Invalid(format!("building the fuzz fixture: {e}")))
}

/// The config the fixture and the fuzz seeds use: one layer, hidden 32 (one quantisation block
/// per row), so whole model files stay a few kilobytes.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 16,
        vocab_size: synth::BYTE_LEVEL_VOCAB,
        max_position_embeddings: 64,
        ..random::tiny_config()
    }
}

/// Write a tiny synthetic GGUF model (random weights, byte-level tokenizer) to `path`.
pub fn write_tiny_model(path: &Path, format: Format) -> Result<()> {
    let cfg = tiny_config();
    let w = random::random_weights(&cfg, 1, &Device::Cpu)?;
    synth::write_gguf(path, &cfg, &w, format)
}

/// Valid sparse (SpIEL-AG, 6 deltas per module) and LoRA (rank 2) adapters for `m`.
pub fn tiny_adapters(m: &LoadedModel) -> Result<[Adapter; 2]> {
    let base = BaseModel {
        name: "tiny".into(),
        config_hash: m.model.cfg.fingerprint(),
    };
    let mut sparse = BTreeMap::new();
    let mut lora = BTreeMap::new();
    let mut counts = BTreeMap::new();
    let mut shapes = BTreeMap::new();
    for l in m.model.linears() {
        let (out, inp) = l.shape();
        let indices: Vec<u32> = (0..6).map(|i| (i * (out * inp / 6)) as u32).collect();
        let values: Vec<f32> = (0..6).map(|i| 0.01 * i as f32).collect();
        counts.insert(l.name.clone(), indices.len());
        shapes.insert(l.name.clone(), [out, inp]);
        sparse.insert(
            l.name.clone(),
            Delta::Sparse(SparseDelta {
                shape: (out, inp),
                indices: Arc::new(indices),
                values: Tensor::from_vec(values, 6, &Device::Cpu)?,
                hook: None,
                in_base: false,
                packs: None,
            }),
        );
        lora.insert(
            l.name.clone(),
            Delta::Lora(LoraDelta {
                a: Tensor::full(0.01f32, (2, inp), &Device::Cpu)?,
                b: Tensor::full(0.02f32, (out, 2), &Device::Cpu)?,
                scale: 1.0,
                dropout: 0.0,
                dropout_seed: 0,
                packs: None,
            }),
        );
    }
    let config = |method: Method| AdapterConfig {
        method,
        base_model: Some(base.clone()),
        base_model_name_or_path: Some("tiny".into()),
        target_modules: vec!["q_proj".into(), "k_proj".into()],
        module_counts: if method.is_sparse() {
            counts.clone()
        } else {
            BTreeMap::new()
        },
        module_shapes: if method.is_sparse() {
            shapes.clone()
        } else {
            BTreeMap::new()
        },
        r: (method == Method::Lora).then_some(2),
        lora_alpha: (method == Method::Lora).then_some(2.0),
        lora_dropout: None,
        peft_type: (method == Method::Lora).then(|| "LORA".into()),
        task_type: (method == Method::Lora).then(|| "CAUSAL_LM".into()),
        bias: None,
        hyperparameters: serde_json::Value::Null,
        training: serde_json::Value::Null,
    };
    Ok([
        Adapter {
            config: config(Method::SpielAg),
            deltas: sparse,
        },
        Adapter {
            config: config(Method::Lora),
            deltas: lora,
        },
    ])
}

fn build_fixture() -> Result<Fixture> {
    let root = tempfile::Builder::new()
        .prefix("spiel-fuzz-")
        .tempdir()
        .map_err(|e| Error::io(Path::new("/tmp"), e))?;
    let gguf = root.path().join("tiny.gguf");
    write_tiny_model(&gguf, Format::F32)?;
    let model = loader::load_gguf(&gguf, &Device::Cpu)?;
    let hf = root.path().join("hf");
    loader::export_hf(&model.model, &model.tokenizer, &hf)?;
    let adapters = root.path().join("adapters");
    let [sparse, lora] = tiny_adapters(&model)?;
    sparse.save(&adapters.join("sparse"))?;
    lora.save(&adapters.join("lora"))?;
    Ok(Fixture {
        root,
        model,
        hf,
        adapters,
    })
}

/// Seed inputs for `target`, made from real files: the synthetic model written by the same GGUF
/// and safetensors writers spiel uses, its adapters as `spiel train` saves them, and, when the
/// assets are fetched under `home`, the default model's config and GGUF header and the first
/// records of the Alpaca data.
pub fn seeds(target: Target, home: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    use crate::formats::assets;
    let fx = fixture()?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
    let model_path = assets::path_in(home, &assets::MODEL);
    let alpaca_path = assets::path_in(home, &assets::ALPACA);
    let mut out = Vec::new();
    let gguf_seeds = |out: &mut Vec<(String, Vec<u8>)>, with_tensors: bool| -> Result<()> {
        for format in [Format::F32, Format::F16, Format::Q8_0, Format::Q4_0, Format::Q4_1] {
            let p = fx.root.path().join(format!("seed-{format:?}.gguf"));
            if with_tensors {
                write_tiny_model(&p, format)?;
            } else {
                let mut meta = synth::llama_metadata(&tiny_config());
                meta.extend(synth::byte_level_tokenizer());
                crate::formats::gguf::write(&p, &meta, &[])?;
            }
            out.push((format!("tiny-{format:?}.gguf").to_lowercase(), read(&p)?));
            if !with_tensors {
                break;
            }
        }
        if model_path.exists() {
            let mut b = read(&model_path)?;
            b.truncate(64 << 10);
            out.push(("smollm2-header-64k.gguf".into(), b));
        }
        Ok(())
    };
    match target {
        Target::Gguf => gguf_seeds(&mut out, true)?,
        Target::GgufTokenizer => gguf_seeds(&mut out, false)?,
        Target::ConfigJson => {
            out.push(("tiny-config.json".into(), read(&fx.hf.join("config.json"))?));
            if model_path.exists() {
                let cfg = ModelConfig::from_gguf(&Gguf::open(&model_path)?)?;
                let json = serde_json::to_vec_pretty(&cfg.to_hf_json()).map_err(|e| Error::Invalid(e.to_string()))?;
                out.push(("smollm2-config.json".into(), json));
            }
        }
        Target::Safetensors => out.push(("tiny.safetensors".into(), read(&fx.hf.join("model.safetensors"))?)),
        Target::SafetensorsIndex => {
            let st = read(&fx.hf.join("model.safetensors"))?;
            let names: Vec<String> = safetensors::SafeTensors::deserialize(&st)
                .map_err(|e| Error::Invalid(e.to_string()))?
                .names()
                .into_iter()
                .map(str::to_string)
                .collect();
            let map: serde_json::Map<String, serde_json::Value> = names
                .into_iter()
                .map(|n| (n, "model-00001-of-00001.safetensors".into()))
                .collect();
            let index = serde_json::json!({"metadata": {"total_size": st.len()}, "weight_map": map});
            out.push(("index.json".into(), index.to_string().into_bytes()));
        }
        Target::Data => {
            out.push((
                "chat.jsonl".into(),
                br#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#
                    .to_vec(),
            ));
            if alpaca_path.exists() {
                let text = std::fs::read_to_string(&alpaca_path).map_err(|e| Error::io(&alpaca_path, e))?;
                let records: Vec<serde_json::Value> =
                    serde_json::from_str(&text).map_err(|e| Error::format(&alpaca_path, e.to_string()))?;
                let head = &records[..records.len().min(12)];
                out.push((
                    "alpaca-head.json".into(),
                    serde_json::to_vec_pretty(head).map_err(|e| Error::Invalid(e.to_string()))?,
                ));
                let lines: String = head.iter().map(|r| format!("{r}\n")).collect();
                out.push(("alpaca-head.jsonl".into(), lines.into_bytes()));
            }
        }
        Target::AdapterConfig | Target::AdapterSafetensors => {
            let file = if target == Target::AdapterConfig {
                "adapter_config.json"
            } else {
                "adapter_model.safetensors"
            };
            for kind in ["sparse", "lora"] {
                out.push((format!("{kind}-{file}"), read(&fx.adapters.join(kind).join(file))?));
            }
        }
    }
    Ok(out)
}
