//! Evaluation tasks: held-out response loss, MMLU (k-shot multiple choice by the log-likelihood
//! of " A" / " B" / " C" / " D") and GSM8K (k-shot chain of thought, greedy, exact match of the
//! final number). Deterministic: samples and exemplars depend only on the seed and the file.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::formats::tokenizer::Tokenizer;
use crate::model::adapter::AdapterSet;
use crate::model::transformer::Llama;
use crate::model::weight::Grad;
use crate::tasks::generate::{generate, GenerateOptions};
use crate::{Error, Result};

/// Held-out response loss.
#[derive(Debug, Clone, Serialize)]
pub struct HeldoutResult {
    /// Examples evaluated.
    pub examples: usize,
    /// Response tokens scored.
    pub tokens: usize,
    /// Mean NLL per response token (nats).
    pub nll: f64,
    /// exp(nll).
    pub perplexity: f64,
}

/// Mean response NLL on the held-out split of an instruction data file: the same split (`heldout`
/// examples chosen by `seed`; 0 = the whole file), chat template, loss mask and truncation as
/// training, so it matches the trainer's `eval_loss`.
#[allow(clippy::too_many_arguments)]
pub fn heldout(
    model: &Llama,
    adapters: &AdapterSet,
    tok: &Tokenizer,
    path: &Path,
    heldout: usize,
    seed: u64,
    max_len: usize,
    batch_size: usize,
    limit: Option<usize>,
) -> Result<HeldoutResult> {
    let convs = crate::train::data::read_conversations(path)?;
    let mut held = if heldout == 0 {
        convs
    } else {
        crate::train::data::split(&convs, heldout, seed)?.1
    };
    if let Some(n) = limit {
        held.truncate(n);
    }
    let (examples, _) = crate::train::data::tokenize_all(&held, tok, max_len)?;
    if examples.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no held-out example has a response within max_len",
            path.display()
        )));
    }
    let tokens: usize = examples.iter().map(|e| e.n_targets()).sum();
    let nll = crate::train::loss::eval_loss(model, adapters, &examples, batch_size, tok.pad_id)?;
    Ok(HeldoutResult {
        examples: examples.len(),
        tokens,
        nll,
        perplexity: nll.exp(),
    })
}

/// Response NLL of `model` on the held-out and test splits a run with these settings draws
/// (see [`crate::train::data::three_way_split`]); the test loss is `None` without a test split.
#[allow(clippy::too_many_arguments)]
pub fn split_losses(
    model: &Llama,
    adapters: &AdapterSet,
    tok: &Tokenizer,
    path: &Path,
    heldout: usize,
    test: usize,
    seed: u64,
    max_len: usize,
    batch_size: usize,
) -> Result<(f64, Option<f64>)> {
    let convs = crate::train::data::read_conversations(path)?;
    let (_, held, test_c) = crate::train::data::three_way_split(&convs, heldout, test, seed)?;
    let loss = |convs: &[crate::train::data::Conversation]| -> Result<f64> {
        let (examples, _) = crate::train::data::tokenize_all(convs, tok, max_len)?;
        crate::train::loss::eval_loss(model, adapters, &examples, batch_size, tok.pad_id)
    };
    let test_loss = match test_c.is_empty() {
        true => None,
        false => Some(loss(&test_c)?),
    };
    Ok((loss(&held)?, test_loss))
}

/// Forgetting: the response NLL of the first `limit` GSM8K worked solutions, each as a one-turn
/// chat (the question from the user, the solution from the assistant): text unlike the
/// instruction data, so a fine-tune that moves it has changed more than its task.
pub fn gsm8k_nll(
    model: &Llama,
    adapters: &AdapterSet,
    tok: &Tokenizer,
    path: &Path,
    limit: usize,
    max_len: usize,
    batch_size: usize,
) -> Result<f64> {
    use crate::formats::tokenizer::Message;
    let parsed = read_gsm8k(path)?;
    let convs: Vec<crate::train::data::Conversation> = parsed
        .rows
        .into_iter()
        .take(limit)
        .map(|(line, r)| crate::train::data::Conversation {
            messages: vec![Message::new("user", &r.question), Message::new("assistant", &r.answer)],
            line,
        })
        .collect();
    let (examples, _) = crate::train::data::tokenize_all(&convs, tok, max_len)?;
    if examples.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no GSM8K solution fits in {max_len} tokens",
            path.display()
        )));
    }
    crate::train::loss::eval_loss(model, adapters, &examples, batch_size, tok.pad_id)
}

/// Rows of a JSONL file that parsed, and the lines that did not (1-based, with the reason).
pub struct Parsed<T> {
    /// Good rows with their line numbers.
    pub rows: Vec<(usize, T)>,
    /// `(line, reason)` of each skipped row.
    pub skipped: Vec<(usize, String)>,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path, check: impl Fn(&T) -> Option<String>) -> Result<Parsed<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(line) {
            Ok(r) => match check(&r) {
                None => rows.push((i + 1, r)),
                Some(why) => skipped.push((i + 1, why)),
            },
            Err(e) => skipped.push((i + 1, e.to_string())),
        }
    }
    if rows.is_empty() {
        return Err(Error::format(path, "no valid rows"));
    }
    for (line, why) in skipped.iter().take(5) {
        tracing::warn!("{}: line {line}: skipped ({why})", path.display());
    }
    Ok(Parsed { rows, skipped })
}

/// One MMLU question.
#[derive(Debug, Clone, Deserialize)]
pub struct MmluRow {
    /// The question.
    pub question: String,
    /// Choice A.
    pub answer_a: String,
    /// Choice B.
    pub answer_b: String,
    /// Choice C.
    pub answer_c: String,
    /// Choice D.
    pub answer_d: String,
    /// "A".."D".
    pub correct_answer: String,
    /// Subject.
    pub topic: String,
}

/// Read an MMLU JSONL file; rows with a malformed record or an answer outside A-D are skipped.
pub fn read_mmlu(path: &Path) -> Result<Parsed<MmluRow>> {
    read_jsonl(path, |r: &MmluRow| {
        (!matches!(r.correct_answer.as_str(), "A" | "B" | "C" | "D"))
            .then(|| format!("correct_answer `{}` is not A, B, C or D", r.correct_answer))
    })
}

fn mmlu_block(r: &MmluRow, with_answer: bool) -> String {
    let mut s = format!(
        "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
        r.question.trim(),
        r.answer_a,
        r.answer_b,
        r.answer_c,
        r.answer_d
    );
    if with_answer {
        s += &format!(" {}\n\n", r.correct_answer);
    }
    s
}

/// The k-shot prompt for question `i`: the first `k` other questions of the same subject (in
/// file order) with their answers, then the question.
pub fn mmlu_prompt(rows: &[(usize, MmluRow)], i: usize, k: usize) -> String {
    let r = &rows[i].1;
    let mut s = format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        r.topic
    );
    for (_, ex) in rows
        .iter()
        .enumerate()
        .filter(|(j, (_, x))| *j != i && x.topic == r.topic)
        .map(|(_, x)| x)
        .take(k)
    {
        s += &mmlu_block(ex, true);
    }
    s + &mmlu_block(r, false)
}

/// Index (0..4) of the best choice given the log-likelihoods of " A", " B", " C", " D".
pub fn pick_choice(choice_logits: &[f32; 4]) -> usize {
    crate::tasks::generate::argmax(choice_logits)
}

/// MMLU accuracy, overall and per subject.
#[derive(Debug, Clone, Serialize)]
pub struct MmluResult {
    /// Questions scored.
    pub questions: usize,
    /// Fraction correct.
    pub accuracy: f64,
    /// subject -> (correct, total).
    pub per_subject: PerSubject,
    /// Malformed rows skipped.
    pub skipped_rows: usize,
}

/// Logits of the given candidate tokens after each prompt (batched, right-padded).
pub fn next_token_logits(
    model: &Llama,
    adapters: &AdapterSet,
    prompts: &[Vec<u32>],
    candidates: &[u32],
    pad_id: u32,
) -> Result<Vec<Vec<f32>>> {
    let t = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let b = prompts.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0u32; b * t];
    let mut last = Vec::with_capacity(b);
    for (i, p) in prompts.iter().enumerate() {
        ids[i * t..i * t + p.len()].copy_from_slice(p);
        mask[i * t..i * t + p.len()].iter_mut().for_each(|m| *m = 1);
        last.push((i * t + p.len().max(1) - 1) as u32);
    }
    let dev = model.device();
    let ids = Tensor::from_vec(ids, (b, t), dev)?;
    let mask = Tensor::from_vec(mask, (b, t), dev)?;
    let h = model.forward_hidden(&ids, Some(&mask), Grad::No, adapters)?;
    let hid = h.dims()[2];
    let rows = h
        .reshape((b * t, hid))?
        .index_select(&Tensor::new(last.as_slice(), dev)?, 0)?;
    let logits: Vec<Vec<f32>> = model.logits(&rows)?.to_vec2()?;
    Ok(logits
        .into_iter()
        .map(|row| candidates.iter().map(|&c| row[c as usize]).collect())
        .collect())
}

/// (correct, total) per MMLU subject.
pub type PerSubject = BTreeMap<String, (usize, usize)>;

/// Score the questions `chosen` of `rows`: `score` maps a batch of prompts to the logits of the
/// four answer letters. Returns the number correct and (correct, total) per subject.
pub fn mmlu_score(
    rows: &[(usize, MmluRow)],
    chosen: &[usize],
    k: usize,
    batch_size: usize,
    encode: impl Fn(&str) -> Result<Vec<u32>>,
    mut score: impl FnMut(&[Vec<u32>]) -> Result<Vec<[f32; 4]>>,
    mut progress: impl FnMut(usize, usize),
) -> Result<(usize, PerSubject)> {
    let mut per_subject = PerSubject::new();
    let mut correct = 0;
    let mut done = 0;
    for batch in chosen.chunks(batch_size.max(1)) {
        let prompts: Vec<Vec<u32>> = batch
            .iter()
            .map(|&i| encode(&mmlu_prompt(rows, i, k)))
            .collect::<Result<_>>()?;
        for (&i, s) in batch.iter().zip(score(&prompts)?) {
            let want = (rows[i].1.correct_answer.as_bytes()[0] - b'A') as usize;
            let e = per_subject.entry(rows[i].1.topic.clone()).or_default();
            e.1 += 1;
            if pick_choice(&s) == want {
                e.0 += 1;
                correct += 1;
            }
        }
        done += batch.len();
        progress(done, chosen.len());
    }
    Ok((correct, per_subject))
}

/// Score MMLU: `limit` questions sampled by `seed` (all when `None`), optional subject filter.
#[allow(clippy::too_many_arguments)]
pub fn mmlu(
    model: &Llama,
    adapters: &AdapterSet,
    tok: &Tokenizer,
    path: &Path,
    k: usize,
    limit: Option<usize>,
    subjects: &[String],
    seed: u64,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<MmluResult> {
    let parsed = read_mmlu(path)?;
    let rows = parsed.rows;
    let mut chosen: Vec<usize> = (0..rows.len())
        .filter(|&i| subjects.is_empty() || subjects.iter().any(|s| *s == rows[i].1.topic))
        .collect();
    if chosen.is_empty() {
        return Err(Error::Invalid(format!(
            "--subjects {subjects:?}: no such subject in {}",
            path.display()
        )));
    }
    chosen.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    if let Some(n) = limit {
        chosen.truncate(n);
    }
    chosen.sort_unstable();
    let mut letters = Vec::new();
    for l in [" A", " B", " C", " D"] {
        let ids = tok.encode_piece(l)?;
        if ids.len() != 1 {
            return Err(Error::Tokenizer(format!(
                "`{l}` is not a single token in this vocabulary"
            )));
        }
        letters.push(ids[0]);
    }
    let encode = |text: &str| tok.encode(text);
    let score = |prompts: &[Vec<u32>]| -> Result<Vec<[f32; 4]>> {
        let s = next_token_logits(model, adapters, prompts, &letters, tok.pad_id)?;
        Ok(s.into_iter().map(|v| [v[0], v[1], v[2], v[3]]).collect())
    };
    let (correct, per_subject) = mmlu_score(&rows, &chosen, k, batch_size, encode, score, &mut progress)?;
    Ok(MmluResult {
        questions: chosen.len(),
        accuracy: correct as f64 / chosen.len() as f64,
        per_subject,
        skipped_rows: parsed.skipped.len(),
    })
}

/// One GSM8K problem.
#[derive(Debug, Clone, Deserialize)]
pub struct GsmRow {
    /// The problem.
    pub question: String,
    /// Worked solution ending in `#### N`.
    pub answer: String,
}

/// Read a GSM8K JSONL file; rows without a parsable `#### N` answer are skipped.
pub fn read_gsm8k(path: &Path) -> Result<Parsed<GsmRow>> {
    read_jsonl(path, |r: &GsmRow| match r.answer.rsplit_once("####") {
        Some((_, n)) if parse_number(n).is_some() => None,
        _ => Some("answer has no `#### N` final number".into()),
    })
}

/// Parse a number as written in answers: "1,234", "$18", "-3", "2.50", "18.".
pub fn parse_number(s: &str) -> Option<f64> {
    let cleaned: String = s.trim().chars().filter(|c| !matches!(c, ',' | '$' | ' ')).collect();
    let cleaned = cleaned.trim_end_matches('.');
    cleaned.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// The final number of a generated solution: after the last `####` if present, else the last
/// number in the text.
pub fn extract_answer(text: &str) -> Option<f64> {
    if let Some((_, tail)) = text.rsplit_once("####") {
        if let Some(n) = numbers(tail).into_iter().next() {
            return Some(n);
        }
    }
    numbers(text).into_iter().last()
}

/// Every number in `text`, in order (with sign, thousands separators, $ and decimals).
fn numbers(text: &str) -> Vec<f64> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            || (chars[i] == '-' && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit() || *c == '$'));
        if !starts {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < chars.len() {
            let c = chars[j];
            let inner = (c == ',' || c == '.') && chars.get(j + 1).is_some_and(|d| d.is_ascii_digit());
            if c.is_ascii_digit() || c == '$' || inner {
                j += 1;
            } else {
                break;
            }
        }
        if let Some(v) = parse_number(&chars[i..j].iter().collect::<String>()) {
            out.push(v);
        }
        i = j;
    }
    out
}

/// Remove GSM8K's calculator annotations `<<...>>` from a worked solution.
fn strip_calculator(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(a) = rest.find("<<") {
        out += &rest[..a];
        match rest[a..].find(">>") {
            Some(b) => rest = &rest[a + b + 2..],
            None => {
                rest = &rest[a..];
                break;
            }
        }
    }
    out + rest
}

/// The k-shot prompt: the first `k` problems of the file (never the question itself) with their
/// worked answers, then the question.
pub fn gsm8k_prompt(rows: &[(usize, GsmRow)], i: usize, k: usize) -> String {
    let mut s = String::new();
    for (_, ex) in rows.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, x)| x).take(k) {
        s += &format!(
            "Question: {}\nAnswer: {}\n\n",
            ex.question.trim(),
            strip_calculator(ex.answer.trim())
        );
    }
    s + &format!("Question: {}\nAnswer:", rows[i].1.question.trim())
}

/// GSM8K accuracy.
#[derive(Debug, Clone, Serialize)]
pub struct GsmResult {
    /// Problems attempted.
    pub problems: usize,
    /// Fraction whose final number matched.
    pub accuracy: f64,
    /// Malformed rows skipped.
    pub skipped_rows: usize,
}

/// Score GSM8K on `limit` problems (after the k exemplars, in file order), greedy decoding up to
/// `max_new_tokens`, stopping at the next "Question:".
#[allow(clippy::too_many_arguments)]
pub fn gsm8k(
    model: &Llama,
    adapters: &AdapterSet,
    tok: &Tokenizer,
    path: &Path,
    k: usize,
    limit: Option<usize>,
    max_new_tokens: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<GsmResult> {
    let parsed = read_gsm8k(path)?;
    let rows = parsed.rows;
    // Exemplars are the first k rows; evaluate on the rest.
    let pool: Vec<usize> = (k.min(rows.len())..rows.len()).collect();
    let n = limit.unwrap_or(pool.len()).min(pool.len());
    if n == 0 {
        return Err(Error::Invalid(format!(
            "{}: no problems left after {k} exemplars",
            path.display()
        )));
    }
    let mut correct = 0;
    for (done, &i) in pool[..n].iter().enumerate() {
        let prompt = tok.encode(&gsm8k_prompt(&rows, i, k))?;
        // Stop as soon as the model starts the next question.
        let opts = GenerateOptions {
            max_new_tokens,
            temperature: 0.0,
            seed: 0,
            stop_strings: vec!["Question:".into()],
        };
        let g = generate(model, adapters, tok, &prompt, &opts, |_| {})?.text;
        let solution = g.split("Question:").next().unwrap_or_default();
        let answer = extract_answer(solution);
        let want = rows[i].1.answer.rsplit_once("####").and_then(|(_, n)| parse_number(n));
        if let (Some(a), Some(w)) = (answer, want) {
            if (a - w).abs() < 1e-6 {
                correct += 1;
            }
        }
        progress(done + 1, n);
    }
    Ok(GsmResult {
        problems: n,
        accuracy: correct as f64 / n as f64,
        skipped_rows: parsed.skipped.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_extraction_handles_the_usual_forms() {
        assert_eq!(extract_answer("so the total is 5 + 3 = 8.\n#### 1,234"), Some(1234.0));
        assert_eq!(extract_answer("She makes $18 every day."), Some(18.0));
        assert_eq!(extract_answer("The change is -7 degrees"), Some(-7.0));
        assert_eq!(extract_answer("It costs 2.50 dollars, not 3."), Some(3.0));
        assert_eq!(extract_answer("It costs $2.50."), Some(2.5));
        assert_eq!(extract_answer("#### -$3"), Some(-3.0));
        assert_eq!(extract_answer("no numbers here"), None);
        assert_eq!(extract_answer("1,000,000 grains"), Some(1_000_000.0));
        assert_eq!(parse_number(" 18 "), Some(18.0));
        assert_eq!(parse_number("abc"), None);
    }

    #[test]
    fn calculator_annotations_are_removed() {
        assert_eq!(strip_calculator("16 - 3 = <<16-3=13>>13 eggs"), "16 - 3 = 13 eggs");
        assert_eq!(strip_calculator("a <<b"), "a <<b");
    }

    #[test]
    fn mmlu_picks_the_most_likely_letter_and_never_uses_the_question_as_exemplar() {
        assert_eq!(pick_choice(&[-3.0, -1.0, -2.0, -5.0]), 1);
        let row = |q: &str, t: &str| MmluRow {
            question: q.into(),
            answer_a: "a".into(),
            answer_b: "b".into(),
            answer_c: "c".into(),
            answer_d: "d".into(),
            correct_answer: "C".into(),
            topic: t.into(),
        };
        let rows: Vec<(usize, MmluRow)> = vec![
            (1, row("Q1", "math")),
            (2, row("Q2", "law")),
            (3, row("Q3", "math")),
            (4, row("Q4", "math")),
        ];
        let p = mmlu_prompt(&rows, 0, 5);
        assert!(p.starts_with("The following are multiple choice questions (with answers) about math."));
        assert_eq!(p.matches("Q1").count(), 1, "the question appears only once, at the end");
        assert!(p.contains("Q3\nA. a") && p.contains("Q4") && !p.contains("Q2"));
        assert!(p.ends_with("Q1\nA. a\nB. b\nC. c\nD. d\nAnswer:"));
        assert_eq!(mmlu_prompt(&rows, 0, 1).matches("Answer: C").count(), 1);
    }

    /// A fake model whose letter log-probabilities are known: it prefers the letter named in the
    /// prompt's last question text ("pick X"), so the expected accuracy is known exactly.
    #[test]
    fn mmlu_scoring_with_a_fake_model() {
        let row = |q: &str, ans: &str, t: &str| MmluRow {
            question: q.into(),
            answer_a: "a".into(),
            answer_b: "b".into(),
            answer_c: "c".into(),
            answer_d: "d".into(),
            correct_answer: ans.into(),
            topic: t.into(),
        };
        let rows: Vec<(usize, MmluRow)> = vec![
            (1, row("pick A", "A", "s1")),
            (2, row("pick B", "C", "s1")),
            (3, row("pick D", "D", "s2")),
            (4, row("pick C", "C", "s2")),
            (5, row("pick B", "B", "s2")),
        ];
        // "Tokenize" to bytes; the fake scorer finds the last "pick X" in the prompt.
        let encode = |t: &str| Ok(t.bytes().map(u32::from).collect::<Vec<u32>>());
        let score = |prompts: &[Vec<u32>]| {
            Ok(prompts
                .iter()
                .map(|p| {
                    let text: String = p.iter().map(|&b| b as u8 as char).collect();
                    let at = text.rfind("pick ").unwrap() + 5;
                    let letter = (text.as_bytes()[at] - b'A') as usize;
                    let mut l = [-2.0f32; 4];
                    l[letter] = -0.1;
                    l
                })
                .collect())
        };
        let chosen = [0, 1, 2, 3, 4];
        let (correct, per) = mmlu_score(&rows, &chosen, 5, 2, encode, score, |_, _| {}).unwrap();
        assert_eq!(correct, 4);
        assert_eq!(per["s1"], (1, 2));
        assert_eq!(per["s2"], (3, 3));
    }

    #[test]
    fn malformed_rows_are_skipped_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        let good = r#"{"question": "q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", "correct_answer": "B", "topic": "t"}"#;
        let bad_answer = good.replace("\"B\"", "\"answer\"");
        std::fs::write(&p, format!("{good}\n{{broken\n{bad_answer}\n{good}\n")).unwrap();
        let parsed = read_mmlu(&p).unwrap();
        assert_eq!(parsed.rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(parsed.skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 3]);
        let g = dir.path().join("g.jsonl");
        std::fs::write(
            &g,
            "{\"question\": \"q\", \"answer\": \"x\\n#### 5\"}\n{\"question\": \"q\", \"answer\": \"none\"}\n",
        )
        .unwrap();
        let parsed = read_gsm8k(&g).unwrap();
        assert_eq!((parsed.rows.len(), parsed.skipped[0].0), (1, 2));
        std::fs::write(&g, "{oops\n").unwrap();
        assert!(read_gsm8k(&g).err().unwrap().to_string().contains("no valid rows"));
    }
}
