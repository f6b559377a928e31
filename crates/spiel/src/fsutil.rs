//! Crash-safe file output: everything spiel writes goes to a temporary name first, is flushed to
//! disk, and is then renamed over the destination, so a reader never sees half a file.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Write `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| Error::io(&dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Build a directory atomically: `fill` writes into a fresh temporary directory beside `dest`,
/// which then replaces `dest` (an existing `dest` is moved aside and removed only afterwards).
pub fn write_dir_atomic(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_dir(dest);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".spiel-tmp-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    fill(tmp.path())?;
    for entry in std::fs::read_dir(tmp.path()).map_err(|e| Error::io(tmp.path(), e))? {
        let p = entry.map_err(|e| Error::io(tmp.path(), e))?.path();
        if p.is_file() {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&p, e))?;
        }
    }
    let staged = tmp.keep();
    let old = if dest.exists() {
        let old = parent.join(format!(
            ".spiel-old-{}",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
        Some(old)
    } else {
        None
    };
    std::fs::rename(&staged, dest).map_err(|e| Error::io(dest, e))?;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
