//! Training checkpoints: named f32 / u32 arrays in one safetensors file plus a JSON state, in a
//! directory `checkpoints/step-NNNNNNNN` that is written to a temporary name, fsynced and renamed,
//! so a checkpoint either exists complete or not at all. The previous one is removed only after
//! the new one is in place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{formats::fsutil, Error, Result};

/// One stored array.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    /// f32 data.
    F32(Vec<f32>),
    /// u32 data (indices, ages).
    U32(Vec<u32>),
}

/// Named arrays of a checkpoint.
pub type Arrays = HashMap<String, Array>;

const STATE: &str = "state.json";
const TENSORS: &str = "tensors.safetensors";

fn step_dir(root: &Path, step: usize) -> PathBuf {
    root.join("checkpoints").join(format!("step-{step:08}"))
}

/// Write checkpoint `step` under `root` and then delete older ones.
pub fn save(root: &Path, step: usize, state: &serde_json::Value, arrays: &Arrays) -> Result<PathBuf> {
    let mut names: Vec<&String> = arrays.keys().collect();
    names.sort();
    let bufs: Vec<(String, safetensors::Dtype, usize, Vec<u8>)> = names
        .iter()
        .map(|n| match &arrays[*n] {
            Array::F32(v) => (
                (*n).clone(),
                safetensors::Dtype::F32,
                v.len(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            Array::U32(v) => (
                (*n).clone(),
                safetensors::Dtype::U32,
                v.len(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        })
        .collect();
    let views = bufs
        .iter()
        .map(|(n, dt, len, b)| {
            safetensors::tensor::TensorView::new(*dt, vec![*len], b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Invalid(format!("checkpoint array `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::Invalid(format!("checkpoint: {e}")))?;
    let state = serde_json::to_vec_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
    let dir = step_dir(root, step);
    fsutil::write_dir_atomic(&dir, |tmp| {
        fsutil::write_atomic(&tmp.join(TENSORS), &bytes)?;
        // The state goes last: a directory with state.json is complete.
        fsutil::write_atomic(&tmp.join(STATE), &state)
    })?;
    for (s, old) in list(root)? {
        if s < step {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
    }
    Ok(dir)
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = root.join("checkpoints");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in entries {
        let p = e.map_err(|e| Error::io(&dir, e))?.path();
        let step = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(step) = step {
            if p.join(STATE).exists() && p.join(TENSORS).exists() {
                out.push((step, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Read a checkpoint directory.
pub fn load(dir: &Path) -> Result<(serde_json::Value, Arrays)> {
    let sp = dir.join(STATE);
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&sp).map_err(|e| Error::io(&sp, e))?)
        .map_err(|e| Error::format(&sp, e.to_string()))?;
    let tp = dir.join(TENSORS);
    let bytes = std::fs::read(&tp).map_err(|e| Error::io(&tp, e))?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::format(&tp, format!("safetensors: {e}")))?;
    let mut arrays = Arrays::new();
    for (name, v) in st.tensors() {
        let d = v.data();
        let a = match v.dtype() {
            safetensors::Dtype::F32 => Array::F32(
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            safetensors::Dtype::U32 => Array::U32(
                d.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            other => return Err(Error::format(&tp, format!("array `{name}` has dtype {other:?}"))),
        };
        arrays.insert(name, a);
    }
    Ok((state, arrays))
}

/// Take an f32 array out of a loaded checkpoint.
pub fn take_f32(a: &mut Arrays, name: &str, path: &Path) -> Result<Vec<f32>> {
    match a.remove(name) {
        Some(Array::F32(v)) => Ok(v),
        _ => Err(Error::format(
            path,
            format!("checkpoint array `{name}` is missing or not f32"),
        )),
    }
}

/// Take a u32 array out of a loaded checkpoint.
pub fn take_u32(a: &mut Arrays, name: &str, path: &Path) -> Result<Vec<u32>> {
    match a.remove(name) {
        Some(Array::U32(v)) => Ok(v),
        _ => Err(Error::format(
            path,
            format!("checkpoint array `{name}` is missing or not u32"),
        )),
    }
}
