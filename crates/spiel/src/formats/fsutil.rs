//! Crash-safe file output: everything spiel writes goes to a temporary name first, is flushed to
//! disk, and is then renamed over the destination, so a reader never sees half a file.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Name prefix of files and directories being written (removed by [`recover_dir`]).
const STAGING: &str = ".spiel-tmp-";
/// Name prefix of a directory moved aside while its replacement is renamed into place.
const ASIDE: &str = ".spiel-old-";

/// Write `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(STAGING)
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
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
        .prefix(STAGING)
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
            "{ASIDE}{}",
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

/// Clean up after writes interrupted by a crash in `dir`: staging files and directories are
/// removed; a directory moved aside whose replacement never arrived is moved back (it is the
/// complete previous version), otherwise removed. Returns how many entries were handled.
pub fn recover_dir(dir: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut n = 0;
    for e in entries {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let remove = |p: &Path| {
            if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            }
            .map_err(|e| Error::io(p, e))
        };
        if name.starts_with(STAGING) {
            remove(&p)?;
            n += 1;
        } else if let Some(original) = name.strip_prefix(ASIDE) {
            let dest = dir.join(original);
            if dest.exists() || original.is_empty() {
                remove(&p)?;
            } else {
                std::fs::rename(&p, &dest).map_err(|e| Error::io(&dest, e))?;
            }
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recover_dir_discards_staging_and_restores_a_lost_directory() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir(d.join(".spiel-tmp-abc")).unwrap();
        std::fs::write(d.join(".spiel-tmp-abc/x"), b"half").unwrap();
        std::fs::write(d.join(".spiel-tmp-file"), b"half").unwrap();
        // Killed between the two renames: only the moved-aside copy exists.
        std::fs::create_dir(d.join(".spiel-old-adapter")).unwrap();
        std::fs::write(d.join(".spiel-old-adapter/a"), b"complete").unwrap();
        // Killed after the new one was in place: the old copy is stale.
        std::fs::create_dir(d.join("ckpt")).unwrap();
        std::fs::create_dir(d.join(".spiel-old-ckpt")).unwrap();
        std::fs::write(d.join("keep.txt"), b"user file").unwrap();
        assert_eq!(recover_dir(d).unwrap(), 4);
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["adapter", "ckpt", "keep.txt"]);
        assert_eq!(std::fs::read(d.join("adapter/a")).unwrap(), b"complete");
        assert_eq!(recover_dir(d).unwrap(), 0);
        assert_eq!(recover_dir(&d.join("missing")).unwrap(), 0);
    }

    #[test]
    fn write_dir_atomic_replaces_and_leaves_no_staging() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("out");
        for v in [b"one".as_slice(), b"two"] {
            write_dir_atomic(&dest, |tmp| write_atomic(&tmp.join("f"), v)).unwrap();
            assert_eq!(std::fs::read(dest.join("f")).unwrap(), v);
        }
        let left: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }
}
