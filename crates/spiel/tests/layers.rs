//! The library's folders are layers: a file may use (`crate::...`) only files of its own folder or
//! of a lower layer, and no two files use each other, directly or through others. This test reads
//! every `crate::` path in `src/` (comments left out) and fails naming each import that breaks
//! either rule, so the layering in docs/design.md stays true as the code grows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level folders (and root files) from the bottom up. A folder not listed here fails the test:
/// a new one must be given its place.
const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("kernels", 1),
    ("formats", 2),
    // Data-parallel training's process group: used by the trainer, so below it.
    ("dist", 3),
    ("model", 4),
    ("train", 5),
    ("tasks", 6),
    ("serve", 7),
    ("testkit", 8),
];

fn rank(module: &str) -> Option<u32> {
    let top = module.split("::").next().unwrap_or("");
    if module.is_empty() {
        return Some(u32::MAX);
    }
    LAYERS.iter().find(|(name, _)| *name == top).map(|&(_, r)| r)
}

/// Every `.rs` file under `dir`, with its module path (`kernels/ops.rs` -> `kernels::ops`,
/// `kernels/mod.rs` -> `kernels`, `lib.rs` -> ``).
fn modules(dir: &Path, root: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            modules(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).expect("under src").with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                parts.pop();
            }
            out.insert(parts.join("::"), path);
        }
    }
}

/// The source without `//` comments (doc comments included), so doc links do not count.
fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path named after `crate::`, with `use crate::{a::{b, c}, d}` trees expanded.
fn crate_paths(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = src.as_bytes();
    let mut at = 0;
    while let Some(i) = src[at..].find("crate::") {
        let start = at + i + "crate::".len();
        // `pub(crate)` and other words ending in `crate` are not paths.
        let before = src[..at + i].chars().next_back();
        at = start;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if bytes.get(start) == Some(&b'{') {
            let mut depth = 0;
            let mut end = start;
            for (j, c) in src[start..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = start + j;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            expand("", &src[start + 1..end], &mut out);
            at = end;
        } else {
            let path: String = src[start..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(path.trim_end_matches(':').to_string());
        }
    }
    out
}

/// Expand one brace group of a use tree under `prefix`.
fn expand(prefix: &str, body: &str, out: &mut Vec<String>) {
    let mut depth = 0;
    let mut item = String::new();
    let mut items = Vec::new();
    for c in body.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    items.push(item);
    for it in items {
        let it = it.trim();
        if it.is_empty() {
            continue;
        }
        let joined = |p: &str| {
            if prefix.is_empty() {
                p.to_string()
            } else {
                format!("{prefix}::{p}")
            }
        };
        match it.find('{') {
            Some(b) => {
                let head = it[..b].trim().trim_end_matches("::");
                expand(&joined(head), &it[b + 1..it.rfind('}').unwrap_or(it.len())], out);
            }
            None => out.push(joined(it.split_whitespace().next().unwrap_or(""))),
        }
    }
}

/// The module a path lands in: its longest prefix that is a file's module.
fn target<'a>(path: &str, known: &'a BTreeMap<String, PathBuf>) -> Option<&'a str> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .find_map(|k| known.get_key_value(&parts[..k].join("::")).map(|(m, _)| m.as_str()))
}

#[test]
fn imports_run_down_the_layers_and_form_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    modules(&src, &src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut broken = Vec::new();
    for (module, path) in &files {
        let Some(own) = rank(module) else {
            broken.push(format!("{}: folder not in LAYERS; give it its place", path.display()));
            continue;
        };
        let text = strip_comments(&std::fs::read_to_string(path).expect("readable source"));
        for p in crate_paths(&text) {
            let Some(dep) = target(&p, &files) else { continue };
            if dep == module || dep.is_empty() || module.starts_with(&format!("{dep}::")) {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(dep.to_string());
            let same_folder = module.split("::").next() == dep.split("::").next();
            if !same_folder && rank(dep).is_none_or(|r| r > own) {
                broken.push(format!("{}: uses crate::{p}, a higher layer", path.display()));
            }
        }
    }
    // A circle: a module that reaches itself through the imports.
    for start in edges.keys() {
        let mut stack: Vec<Vec<&str>> = vec![vec![start.as_str()]];
        let mut seen = BTreeSet::new();
        while let Some(chain) = stack.pop() {
            let last = *chain.last().expect("non-empty");
            for next in edges.get(last).into_iter().flatten() {
                if next == start {
                    broken.push(format!("import circle: {} -> {start}", chain.join(" -> ")));
                } else if seen.insert(next.as_str()) {
                    let mut longer = chain.clone();
                    longer.push(next);
                    stack.push(longer);
                }
            }
        }
    }
    broken.sort();
    broken.dedup();
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
    // The walk saw the real tree (guards against a parser that finds nothing).
    assert!(edges
        .get("model::transformer")
        .is_some_and(|d| d.contains("kernels::attention")));
}

#[test]
fn use_trees_expand_to_full_paths() {
    let src = "use crate::{a::{b, c::D}, e as f};\nlet x = crate::g::h(1); pub(crate) fn y() {}";
    assert_eq!(crate_paths(src), ["a::b", "a::c::D", "e", "g::h"]);
    assert_eq!(strip_comments("x // crate::z\n/// [`crate::w`]"), "x \n");
}
