//! The library's one error type. Every variant renders as a single line that names the file,
//! field or argument at fault, so the CLI can print it as is.

use std::path::{Path, PathBuf};

/// Errors returned by the `spiel` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {err}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error (already in the message, so not a separate `source`).
        err: std::io::Error,
    },
    /// A file's contents are malformed, truncated or unsupported.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A caller-supplied argument is invalid (an empty prompt, a bad flag value).
    #[error("{0}")]
    Invalid(String),
    /// Fetching an asset failed; the message says what to run by hand.
    #[error("{0}")]
    Asset(String),
    /// The tokenizer could not be built or could not encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A format error about `path`.
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            err: source,
        }
    }
}
