//! Instruction data: Alpaca JSON (`instruction`, `input`, `output`) and chat JSONL (`messages`
//! with roles), rendered with the model's chat template, tokenized with a loss mask on assistant
//! tokens only, split into train / held-out by seed, and grouped by length into padded batches.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::formats::tokenizer::{Message, Tokenizer};
use crate::{Error, Result};

/// One conversation, with the file line it came from (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// The turns, in order; at least one is from the assistant.
    pub messages: Vec<Message>,
    /// 1-based line in the source file where the record starts.
    pub line: usize,
}

#[derive(Deserialize)]
struct AlpacaRecord {
    instruction: String,
    #[serde(default)]
    input: String,
    output: String,
    #[serde(default)]
    system: Option<String>,
}

#[derive(Deserialize)]
struct ChatRecord {
    messages: Vec<Message>,
}

fn record_to_conversation(raw: &str, path: &Path, line: usize) -> Result<Conversation> {
    let at = |e: String| Error::format(path, format!("line {line}: {e}"));
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| at(e.to_string()))?;
    let messages = if v.get("messages").is_some() {
        let r: ChatRecord = serde_json::from_value(v).map_err(|e| at(e.to_string()))?;
        for m in &r.messages {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(at(format!("unknown role `{}` (system, user, assistant)", m.role)));
            }
        }
        if !r.messages.iter().any(|m| m.role == "assistant") {
            return Err(at("no assistant message to learn from".into()));
        }
        r.messages
    } else {
        let r: AlpacaRecord = serde_json::from_value(v).map_err(|e| at(e.to_string()))?;
        let mut msgs = Vec::new();
        if let Some(s) = r.system.filter(|s| !s.is_empty()) {
            msgs.push(Message::new("system", &s));
        }
        let user = if r.input.is_empty() {
            r.instruction
        } else {
            format!("{}\n\n{}", r.instruction, r.input)
        };
        msgs.push(Message::new("user", &user));
        msgs.push(Message::new("assistant", &r.output));
        msgs
    };
    Ok(Conversation { messages, line })
}

/// Read a data file: a JSON array of Alpaca or chat records, or JSONL with one record per line.
/// A malformed record is an error naming the file and line.
pub fn read_conversations(path: &Path) -> Result<Vec<Conversation>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let trimmed = text.trim_start();
    let mut out = Vec::new();
    if trimmed.starts_with('[') {
        let records: Vec<&RawValue> = serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        for r in records {
            let offset = r.get().as_ptr() as usize - text.as_ptr() as usize;
            let line = text[..offset].bytes().filter(|&b| b == b'\n').count() + 1;
            out.push(record_to_conversation(r.get(), path, line)?);
        }
    } else {
        for (i, l) in text.lines().enumerate() {
            if !l.trim().is_empty() {
                out.push(record_to_conversation(l, path, i + 1)?);
            }
        }
    }
    if out.is_empty() {
        return Err(Error::format(path, "no examples in the file"));
    }
    Ok(out)
}

/// A tokenized example: ids and, per id, whether it is an assistant token to predict.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids of the whole rendered conversation.
    pub ids: Vec<u32>,
    /// `loss[t]`: token `t` is part of an assistant turn (predicted from `t - 1`).
    pub loss: Vec<bool>,
}

impl Example {
    /// Number of predicted (loss-bearing) tokens.
    pub fn n_targets(&self) -> usize {
        self.loss.iter().skip(1).filter(|&&b| b).count()
    }
}

/// Outcome of tokenizing a data set.
#[derive(Debug, Clone, Default)]
pub struct TokenizeStats {
    /// Examples longer than the maximum length that were cut.
    pub truncated: usize,
    /// Examples dropped because no assistant token survived truncation.
    pub skipped: usize,
}

/// Render `conv` with the chat template and mark assistant tokens. Each assistant turn spans the
/// tokens between the rendering of the conversation before it (with the generation prompt) and
/// the rendering up to and including it.
pub fn tokenize(conv: &Conversation, tok: &Tokenizer) -> Result<Example> {
    let full = tok.encode(&tok.apply_chat_template(&conv.messages, false)?)?;
    let mut loss = vec![false; full.len()];
    for (i, m) in conv.messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.encode(&tok.apply_chat_template(&conv.messages[..i], true)?)?.len();
        let upto = tok
            .encode(&tok.apply_chat_template(&conv.messages[..=i], false)?)?
            .len();
        for l in loss.iter_mut().take(upto.min(full.len())).skip(before) {
            *l = true;
        }
    }
    Ok(Example { ids: full, loss })
}

/// Tokenize all conversations, truncating to `max_len` tokens.
pub fn tokenize_all(convs: &[Conversation], tok: &Tokenizer, max_len: usize) -> Result<(Vec<Example>, TokenizeStats)> {
    let mut stats = TokenizeStats::default();
    let mut out = Vec::with_capacity(convs.len());
    for c in convs {
        let mut ex = tokenize(c, tok)?;
        if ex.ids.len() > max_len {
            ex.ids.truncate(max_len);
            ex.loss.truncate(max_len);
            stats.truncated += 1;
        }
        if ex.n_targets() == 0 {
            stats.skipped += 1;
            continue;
        }
        out.push(ex);
    }
    Ok((out, stats))
}

/// Split off `heldout` examples chosen by `seed`; returns (train, heldout), each in file order.
pub fn split<T: Clone>(items: &[T], heldout: usize, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    if heldout >= items.len() {
        return Err(Error::Invalid(format!(
            "holding out {heldout} examples leaves no training data out of {} (lower --heldout or --test)",
            items.len()
        )));
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x005e_ed0f_4e1d));
    let mut held = vec![false; items.len()];
    for &i in &order[..heldout] {
        held[i] = true;
    }
    let train = items
        .iter()
        .zip(&held)
        .filter(|(_, h)| !**h)
        .map(|(x, _)| x.clone())
        .collect();
    let test = items
        .iter()
        .zip(&held)
        .filter(|(_, h)| **h)
        .map(|(x, _)| x.clone())
        .collect();
    Ok((train, test))
}

/// A run's three splits of `items`: (train, held-out, test). The test split (`test` items) is
/// drawn first and never trained on or chosen by; the held-out split (`heldout` items, the
/// validation split of a study) is drawn from the rest. With `test = 0` the held-out split is
/// the one [`split`] draws from all items, so runs without a test split keep theirs.
pub fn three_way_split<T: Clone>(
    items: &[T],
    heldout: usize,
    test: usize,
    seed: u64,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let (rest, test_items) = match test {
        0 => (items.to_vec(), Vec::new()),
        n => split(items, n, seed ^ 0x7e57_0000_7e57)?,
    };
    let (train, held) = split(&rest, heldout, seed)?;
    Ok((train, held, test_items))
}

/// The micro-batches of one epoch: indices into the examples, grouped by length (sorted within
/// windows of 16 batches so padding stays small), then the batch order shuffled. Deterministic in
/// `(seed, epoch)`, which is what makes resuming exact.
pub fn epoch_batches(lengths: &[usize], batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(epoch));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches = Vec::new();
    for window in order.chunks(batch_size * 16) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(w.chunks(batch_size).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches
}

/// A padded micro-batch on the device.
pub struct Batch {
    /// `[B, T]` u32 token ids, right-padded.
    pub ids: Tensor,
    /// `[B, T]` u32, 1 for real tokens.
    pub mask: Tensor,
    /// Flat positions `b * T + t` whose next token is a target.
    pub positions: Tensor,
    /// The target id at each of those positions.
    pub targets: Tensor,
    /// Number of targets.
    pub n_targets: usize,
    /// Real (unpadded) tokens in the batch.
    pub n_tokens: usize,
}

/// Pad `examples` into a batch.
pub fn make_batch(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let b = examples.len();
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0u32; b * t];
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut n_tokens = 0;
    for (bi, e) in examples.iter().enumerate() {
        for (ti, &id) in e.ids.iter().enumerate() {
            ids[bi * t + ti] = id;
            mask[bi * t + ti] = 1;
            if ti + 1 < e.ids.len() && e.loss[ti + 1] {
                positions.push((bi * t + ti) as u32);
                targets.push(e.ids[ti + 1]);
            }
        }
        n_tokens += e.ids.len();
    }
    let n_targets = targets.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        positions: Tensor::from_vec(positions, n_targets, device)?,
        targets: Tensor::from_vec(targets, n_targets, device)?,
        n_targets,
        n_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_alpaca_and_chat_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.json",
            "[\n {\"instruction\": \"Add\", \"input\": \"1+1\", \"output\": \"2\"},\n {\"instruction\": \"Hi\", \"output\": \"Hello\"}\n]",
        );
        let c = read_conversations(&p).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].messages[0], Message::new("user", "Add\n\n1+1"));
        assert_eq!(c[0].messages[1], Message::new("assistant", "2"));
        assert_eq!((c[0].line, c[1].line), (2, 3));
        let p = write(
            dir.path(),
            "c.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n\n{\"instruction\": \"x\", \"output\": \"y\"}\n",
        );
        let c = read_conversations(&p).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].line, 3);
    }

    #[test]
    fn malformed_records_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "bad.jsonl",
            "{\"instruction\": \"x\", \"output\": \"y\"}\n{not json\n",
        );
        let e = read_conversations(&p).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
        let p = write(
            dir.path(),
            "missing.json",
            "[\n{\"instruction\": \"x\", \"output\": \"y\"},\n\n{\"instruction\": \"x\"}]",
        );
        let e = read_conversations(&p).unwrap_err().to_string();
        assert!(e.contains("line 4") && e.contains("missing field `output`"), "{e}");
        let p = write(
            dir.path(),
            "role.jsonl",
            "{\"messages\": [{\"role\": \"bot\", \"content\": \"a\"}]}\n",
        );
        assert!(read_conversations(&p)
            .unwrap_err()
            .to_string()
            .contains("unknown role `bot`"));
        let p = write(dir.path(), "empty.jsonl", "\n\n");
        assert!(read_conversations(&p).unwrap_err().to_string().contains("no examples"));
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let items: Vec<usize> = (0..50).collect();
        let (a, b) = split(&items, 10, 7).unwrap();
        let (a2, b2) = split(&items, 10, 7).unwrap();
        assert_eq!((a.clone(), b.clone()), (a2, b2));
        assert_eq!((a.len(), b.len()), (40, 10));
        assert!(b.iter().all(|x| !a.contains(x)));
        assert_ne!(split(&items, 10, 8).unwrap().1, b);
        assert!(split(&items, 50, 7).is_err());
    }

    #[test]
    fn epoch_batches_cover_everything_once_and_group_lengths() {
        let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 200 + 1).collect();
        let batches = epoch_batches(&lengths, 4, 1, 0);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
        assert_eq!(batches, epoch_batches(&lengths, 4, 1, 0));
        assert_ne!(batches, epoch_batches(&lengths, 4, 1, 1));
        // Within a batch lengths are sorted (descending) because of grouping.
        for b in &batches {
            assert!(b.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
    }

    #[test]
    fn batch_targets_follow_the_loss_mask() {
        let e1 = Example {
            ids: vec![5, 6, 7, 8],
            loss: vec![false, false, true, true],
        };
        let e2 = Example {
            ids: vec![9, 10],
            loss: vec![false, true],
        };
        let b = make_batch(&[&e1, &e2], 0, &Device::Cpu).unwrap();
        assert_eq!(
            b.ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7, 8], vec![9, 10, 0, 0]]
        );
        assert_eq!(
            b.mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]
        );
        // Position 1 predicts 7, 2 predicts 8, and position 4 (row 1, t 0) predicts 10.
        assert_eq!(b.positions.to_vec1::<u32>().unwrap(), vec![1, 2, 4]);
        assert_eq!(b.targets.to_vec1::<u32>().unwrap(), vec![7, 8, 10]);
        assert_eq!((b.n_targets, b.n_tokens), (3, 6));
    }
}
