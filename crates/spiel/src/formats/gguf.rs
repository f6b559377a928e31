//! A validating reader for GGUF (v2, v3) files.
//!
//! Nothing in the header is trusted: every string, array and tensor is checked against the bytes
//! that remain in the file before anything is allocated, so a truncated or hostile file gives an
//! error naming the problem rather than a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::kernels::quant::{ggml_type_name, Format};
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values (possibly nested).
    Array(Vec<Value>),
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Name as stored (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Shape, slowest dimension first (row-major; the reverse of GGUF's listing).
    pub shape: Vec<usize>,
    /// Element format.
    pub format: Format,
    /// Byte offset of the data from the start of the file.
    pub offset: usize,
    /// Bytes of data.
    pub len: usize,
}

/// A parsed GGUF file, memory-mapped.
pub struct Gguf {
    path: PathBuf,
    data: memmap2::Mmap,
    /// Key-value metadata.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor table, in file order.
    pub tensors: Vec<TensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("GGUF: {msg} (at byte {})", self.pos))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "file truncated: {what} needs {n} bytes, {} remain",
                self.buf.len() - self.pos
            ))),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| self.err(format!("{what}: length {n} too large")))?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what}: not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.take(1, what)?[0] as u64),
            1 => Value::I64(self.take(1, what)?[0] as i8 as i64),
            2 => {
                let b = self.take(2, what)?;
                Value::U64(u16::from_le_bytes([b[0], b[1]]) as u64)
            }
            3 => {
                let b = self.take(2, what)?;
                Value::I64(i16::from_le_bytes([b[0], b[1]]) as i64)
            }
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(self.u32(what)? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32(what)?) as f64),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 4 {
                    return Err(self.err(format!("{what}: arrays nested too deeply")));
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count beyond the remaining bytes is a lie.
                let remaining = (self.buf.len() - self.pos) as u64;
                if n > remaining {
                    return Err(self.err(format!(
                        "{what}: array claims {n} elements but only {remaining} bytes remain"
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => return Err(self.err(format!("{what}: unknown metadata value type {t}"))),
        })
    }
}

impl Gguf {
    /// Open and validate a GGUF file.
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; spiel never writes model files it has open, and a file
        // changed underneath us by another process can give wrong numbers but not memory errors
        // in safe code reading a byte slice.
        let data = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (metadata, tensors) = parse(&data, path)?;
        Ok(Gguf {
            path: path.to_path_buf(),
            data,
            metadata,
            tensors,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.data[info.offset..info.offset + info.len]
    }

    /// Look up a tensor by its GGUF name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor dequantised to f32, row-major.
    pub fn dequantize(&self, info: &TensorInfo) -> Vec<f32> {
        let n: usize = info.shape.iter().product();
        let mut out = vec![0f32; n];
        crate::kernels::quant::dequantize(info.format, self.tensor_bytes(info), &mut out);
        out
    }

    fn field_err(&self, key: &str, msg: &str) -> Error {
        Error::format(&self.path, format!("GGUF metadata `{key}`: {msg}"))
    }

    /// A required unsigned integer field.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        match self.metadata.get(key) {
            Some(Value::U64(v)) => Ok(*v),
            Some(Value::I64(v)) if *v >= 0 => Ok(*v as u64),
            Some(_) => Err(self.field_err(key, "expected an unsigned integer")),
            None => Err(self.field_err(key, "missing")),
        }
    }

    /// A required float field.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.metadata.get(key) {
            Some(Value::F64(v)) => Ok(*v),
            Some(Value::U64(v)) => Ok(*v as f64),
            Some(_) => Err(self.field_err(key, "expected a number")),
            None => Err(self.field_err(key, "missing")),
        }
    }

    /// A required string field.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.metadata.get(key) {
            Some(Value::Str(s)) => Ok(s),
            Some(_) => Err(self.field_err(key, "expected a string")),
            None => Err(self.field_err(key, "missing")),
        }
    }

    /// A required array field.
    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        match self.metadata.get(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(self.field_err(key, "expected an array")),
            None => Err(self.field_err(key, "missing")),
        }
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s.as_str()),
                _ => Err(self.field_err(key, "expected an array of strings")),
            })
            .collect()
    }

    /// An optional field; `None` when absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

fn parse(buf: &[u8], path: &Path) -> Result<(BTreeMap<String, Value>, Vec<TensorInfo>)> {
    let mut c = Cursor { buf, pos: 0, path };
    let magic = c.take(4, "magic")?;
    if magic != MAGIC {
        return Err(c.err("not a GGUF file (bad magic)"));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(c.err(format!("unsupported GGUF version {version} (spiel reads 2 and 3)")));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // A key-value pair takes at least 12 bytes, a tensor entry at least 24.
    let remaining = (buf.len() - c.pos) as u64;
    if n_kv.saturating_mul(12) > remaining || n_tensors.saturating_mul(24) > remaining {
        return Err(c.err(format!(
            "header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file holds"
        )));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let ty = c.u32(&key)?;
        let v = c.value(ty, &key, 0)?;
        metadata.insert(key, v);
    }
    let alignment = match metadata.get("general.alignment") {
        Some(Value::U64(a)) if *a > 0 && a.is_power_of_two() => *a,
        Some(_) => return Err(c.err("general.alignment must be a power of two")),
        None => DEFAULT_ALIGNMENT,
    };
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor #{i} name"))?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.err(format!("tensor `{name}`: {n_dims} dimensions (1 to 4 allowed)")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&name)?);
        }
        let ty = c.u32(&name)?;
        let offset = c.u64(&name)?;
        raw.push((name, dims, ty, offset));
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, ty, offset) in raw {
        let bad = |msg: String| Error::format(path, format!("GGUF: tensor `{name}`: {msg}"));
        let format = Format::from_ggml_id(ty).ok_or_else(|| {
            bad(format!(
                "unsupported tensor type {} (id {ty}); spiel reads F32, F16, BF16, Q8_0, Q4_0, Q4_1",
                ggml_type_name(ty)
            ))
        })?;
        let n = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= file_len.saturating_mul(2))
            .ok_or_else(|| bad(format!("shape {dims:?} is larger than the file could hold")))?;
        let (per, _) = format.block();
        if dims[0] % per as u64 != 0 {
            return Err(bad(format!(
                "row length {} is not a multiple of the block size {per}",
                dims[0]
            )));
        }
        let len = format
            .bytes_for(n as usize)
            .ok_or_else(|| bad(format!("shape {dims:?} does not fit whole blocks")))?;
        let start = data_start
            .checked_add(offset)
            .ok_or_else(|| bad(format!("offset {offset} overflows")))?;
        if start.checked_add(len as u64).is_none_or(|end| end > file_len) {
            return Err(bad(format!(
                "data at {start}..{} lies past the end of the file ({file_len} bytes); the file is truncated",
                start + len as u64
            )));
        }
        tensors.push(TensorInfo {
            name,
            shape: dims.iter().rev().map(|&d| d as usize).collect(),
            format,
            offset: start as usize,
            len,
        });
    }
    Ok((metadata, tensors))
}

/// Write a GGUF v3 file: for tests and tools that build small models. Tensors are given with
/// row-major shapes (slowest first) and already-encoded bytes.
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, Vec<usize>, Format, Vec<u8>)],
) -> Result<()> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(b) => out.push(*b as u8),
            Value::Str(s) => put_str(out, s),
            Value::Array(a) => {
                let elem = a.first().map(type_id).unwrap_or(4);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    put_value(out, x);
                }
            }
        }
    }
    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for (name, shape, format, bytes) in tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&format.ggml_id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + bytes.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    let start = (out.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    out.resize(start as usize, 0);
    for ((_, _, _, bytes), off) in tensors.iter().zip(offsets) {
        out.resize((start + off) as usize, 0);
        out.extend_from_slice(bytes);
    }
    crate::formats::fsutil::write_atomic(path, &out)
}
