//! Tokenizer and chat template: rebuilt from GGUF `tokenizer.ggml.*` metadata or read from a
//! Hugging Face `tokenizer.json` / `tokenizer_config.json`.

use std::path::Path;

use serde_json::{json, Value as Json};

use crate::formats::gguf::{Gguf, Value};
use crate::{Error, Result};

/// A ChatML template, used when a model ships none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One chat message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with the given role and text.
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Token ids for generation, as written to an exported model's config files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationIds {
    /// The beginning-of-sequence token, if the model names one.
    pub bos: Option<u32>,
    /// The end of an assistant turn (generation's end).
    pub eos: Option<u32>,
    /// Every id that ends generation, `eos` first.
    pub stop: Vec<u32>,
    /// Padding.
    pub pad: u32,
}

/// The model's tokenizer plus what generation and training need around it.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Jinja chat template (the model's own, or ChatML).
    pub chat_template: String,
    /// Token ids that end generation (the eos token, and `<|im_end|>`/`<|endoftext|>` where present).
    pub stop_ids: Vec<u32>,
    /// The end-of-sequence token's text.
    pub eos_token: String,
    /// The beginning-of-sequence token's text, when the model prepends one to every text.
    pub bos_token: Option<String>,
    /// The id of the beginning-of-sequence token the model names, prepended or not (written to
    /// an exported config.json as `bos_token_id`).
    pub bos_id: Option<u32>,
    /// Token id used for padding batches.
    pub pad_id: u32,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Rebuild the tokenizer from a GGUF file's metadata (byte-level BPE models).
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::format(
                g.path(),
                format!("tokenizer model `{model}` is not supported from GGUF (only byte-level BPE, `gpt2`); use a Hugging Face directory with tokenizer.json"),
            ));
        }
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let merges = g.get_str_array("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::U64(x) => Ok(*x),
                    Value::I64(x) => Ok(*x as u64),
                    _ => Err(Error::format(
                        g.path(),
                        "GGUF metadata `tokenizer.ggml.token_type`: expected integers",
                    )),
                })
                .collect::<Result<_>>()?,
            _ => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(Error::format(
                g.path(),
                format!("GGUF metadata: {} token types for {} tokens", types.len(), tokens.len()),
            ));
        }
        let pre = match g.get("tokenizer.ggml.pre") {
            Some(Value::Str(s)) => s.as_str(),
            _ => "default",
        };
        let pre_tokenizer = byte_level_pre_tokenizer(pre).ok_or_else(|| {
            Error::format(g.path(), format!("GGUF tokenizer pre-tokenizer `{pre}` is not supported (supported: smollm, gpt2, default, llama-bpe, qwen2)"))
        })?;
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            vocab.insert(t.to_string(), json!(id));
            // 3 = control, 4 = user-defined: matched whole before BPE.
            if *ty == 3 || *ty == 4 {
                added.push(json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": *ty == 3}));
            }
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        });
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&spec).map_err(tok_err)?)
            .map_err(|e| Error::format(g.path(), format!("building tokenizer from metadata: {e}")))?;
        let id_text = |key: &str| -> Option<String> {
            let id = g.get_u64(key).ok()? as usize;
            tokens.get(id).map(|s| s.to_string())
        };
        let eos_token = id_text("tokenizer.ggml.eos_token_id").unwrap_or_else(|| "<|endoftext|>".into());
        let add_bos = matches!(g.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
        let bos_named = id_text("tokenizer.ggml.bos_token_id");
        let bos_token = if add_bos { bos_named.clone() } else { None };
        let chat_template = match g.get("tokenizer.chat_template") {
            Some(Value::Str(s)) => s.clone(),
            _ => CHATML_TEMPLATE.to_string(),
        };
        let pad = id_text("tokenizer.ggml.padding_token_id").unwrap_or_else(|| eos_token.clone());
        Tokenizer::assemble(inner, chat_template, eos_token, bos_token, bos_named, &pad)
    }

    /// Read `tokenizer.json` and (optionally) `tokenizer_config.json` from a model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::format(&path, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| Error::format(&cfg_path, e.to_string()))?,
            Err(_) => Json::Null,
        };
        let token_field = |k: &str| -> Option<String> {
            match cfg.get(k)? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let eos_token = token_field("eos_token").unwrap_or_else(|| "<|endoftext|>".into());
        let add_bos = cfg.get("add_bos_token").and_then(Json::as_bool).unwrap_or(false);
        let bos_named = token_field("bos_token");
        let bos_token = if add_bos { bos_named.clone() } else { None };
        let chat_template = match cfg.get("chat_template") {
            Some(Json::String(s)) => s.clone(),
            _ => CHATML_TEMPLATE.to_string(),
        };
        let pad = token_field("pad_token").unwrap_or_else(|| eos_token.clone());
        Tokenizer::assemble(inner, chat_template, eos_token, bos_token, bos_named, &pad)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        chat_template: String,
        eos_token: String,
        bos_token: Option<String>,
        bos_named: Option<String>,
        pad: &str,
    ) -> Result<Tokenizer> {
        let bos_id = bos_named.as_deref().and_then(|b| inner.token_to_id(b));
        let mut stop_ids = Vec::new();
        for t in [eos_token.as_str(), "<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = inner.token_to_id(t) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        let pad_id = inner
            .token_to_id(pad)
            .or_else(|| stop_ids.first().copied())
            .unwrap_or(0);
        Ok(Tokenizer {
            inner,
            chat_template,
            stop_ids,
            eos_token,
            bos_token,
            bos_id,
            pad_id,
        })
    }

    /// Encode text; special-token strings in the text map to their single ids. A BOS token is
    /// prepended when the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let Some(bos) = self.bos_token.as_deref().and_then(|b| self.inner.token_to_id(b)) {
            if !text.starts_with(self.bos_token.as_deref().unwrap_or_default()) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Encode without ever adding a BOS token (for pieces of a longer sequence).
    pub fn encode_piece(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(tok_err)?.get_ids().to_vec())
    }

    /// Decode ids to text, keeping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// The text of one token id, as stored in the vocabulary, decoded to plain text.
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id]).unwrap_or_default()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Render messages with the chat template.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", &self.chat_template)
            .map_err(|e| Error::Template(e.to_string()))?;
        let tmpl = env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            eos_token => self.eos_token.clone(),
            bos_token => self.bos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Template(e.to_string()))
    }

    /// The tokenizer as `tokenizer.json` text, for exporting a Hugging Face directory. BPE merges
    /// are written as `"a b"` strings, the form every release of the tokenizers library reads
    /// (releases before 0.20 reject the `["a", "b"]` pairs newer ones write); a merge whose parts
    /// hold a space cannot take that form, and then the pairs stay.
    pub fn to_json(&self) -> Result<String> {
        let text = self.inner.to_string(false).map_err(tok_err)?;
        let mut spec: Json = serde_json::from_str(&text).map_err(tok_err)?;
        if let Some(merges) = spec.pointer_mut("/model/merges").and_then(Json::as_array_mut) {
            let joined: Option<Vec<Json>> = merges
                .iter()
                .map(|m| match m.as_array().map(Vec::as_slice) {
                    Some([Json::String(a), Json::String(b)]) if !a.contains(' ') && !b.contains(' ') => {
                        Some(Json::String(format!("{a} {b}")))
                    }
                    _ => m.as_str().map(|s| Json::String(s.to_string())),
                })
                .collect();
            if let Some(joined) = joined {
                *merges = joined;
            }
        }
        serde_json::to_string(&spec).map_err(tok_err)
    }

    /// The ids generation needs, as a Hugging Face config.json and generation_config.json give
    /// them: `eos` is the token that ends an assistant turn in the chat template (ChatML's
    /// `<|im_end|>`, Llama 3's `<|eot_id|>`), or the eos token when the template ends turns with
    /// none; `stop` is every id that ends generation, `eos` first.
    pub fn generation_ids(&self) -> GenerationIds {
        let eos_id = self.token_to_id(&self.eos_token);
        let eos = self.turn_end_id().or(eos_id).or_else(|| self.stop_ids.first().copied());
        let mut stop: Vec<u32> = eos.into_iter().collect();
        if let Some(e) = eos_id.filter(|e| !stop.contains(e)) {
            stop.push(e);
        }
        GenerationIds {
            bos: self.bos_id,
            eos,
            stop,
            pad: self.pad_id,
        }
    }

    /// The special token the chat template writes right after an assistant message's content.
    fn turn_end_id(&self) -> Option<u32> {
        const MARK: &str = "spiel-turn-end-probe";
        let msgs = [Message::new("user", "hi"), Message::new("assistant", MARK)];
        let text = self.apply_chat_template(&msgs, false).ok()?;
        let after = &text[text.find(MARK)? + MARK.len()..];
        let specials = self.inner.get_added_tokens_decoder();
        self.encode_piece(after)
            .ok()?
            .into_iter()
            .find(|id| specials.get(id).is_some_and(|t| t.special))
    }

    /// A `tokenizer_config.json` describing the special tokens and chat template.
    pub fn config_json(&self) -> Json {
        json!({
            "chat_template": self.chat_template,
            "eos_token": self.eos_token,
            "bos_token": self.bos_token.clone().or_else(|| self.bos_id.and_then(|id| self.inner.id_to_token(id))),
            "add_bos_token": self.bos_token.is_some(),
            "pad_token": self.inner.id_to_token(self.pad_id),
            "tokenizer_class": "PreTrainedTokenizerFast",
        })
    }
}

/// The pre-tokenizer JSON for a GGUF `tokenizer.ggml.pre` name (byte-level BPE families).
fn byte_level_pre_tokenizer(pre: &str) -> Option<Json> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    // The Llama-3 / Qwen2 split: numbers in runs of at most three digits.
    let llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        // SmolLM: every digit is its own piece, then the GPT-2 byte-level split.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "gpt2" | "default" => byte_level(true),
        "llama-bpe" | "llama3" | "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": llama3}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        _ => return None,
    })
}
