//! Writing safetensors files the way PyTorch's own writer does, so every Hugging Face release
//! reads them: the header carries `__metadata__ {"format": "pt"}` (transformers 4.x refuses a
//! `model.safetensors` without it).

use std::collections::HashMap;

use crate::{Error, Result};

/// One tensor to write: name, dtype, shape and little-endian bytes.
pub type RawTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// The file's bytes for `tensors` (any order; safetensors sorts them), with PyTorch's metadata.
pub fn serialize(tensors: &[RawTensor]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(n, dt, shape, b)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Invalid(format!("safetensors `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Invalid(format!("safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_carries_pytorch_format_metadata_and_tensors_read_back() {
        let t: RawTensor = (
            "w".into(),
            safetensors::Dtype::F32,
            vec![2],
            [1f32, -2.5].iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        let bytes = serialize(&[t]).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let v = st.tensor("w").unwrap();
        assert_eq!(v.shape(), [2]);
        assert_eq!(v.data(), &bytes[bytes.len() - 8..]);
    }
}
