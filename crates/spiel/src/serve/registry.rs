//! The adapters a server can apply, by name: every adapter directory under a root (its folder
//! name; a `spiel train` run directory serves the adapter inside it), ones named on the command
//! line, and ones registered at run time. Each is loaded on first
//! use into the decoding form ([`ServedAdapter`]) and kept while a byte budget allows; when a load
//! would pass the budget, the least recently used adapters that no running request holds are
//! evicted first. Only while running requests hold more than fits is the budget passed (with a
//! warning), and the next lookup evicts back under it once they are done. An adapter trained on another base is refused by its config hash.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::model::adapter::Adapter;
use crate::model::decode::ServedAdapter;
use crate::model::transformer::Llama;

/// Why an adapter could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No adapter of that name exists.
    #[error("the model `{0}` does not exist")]
    Unknown(String),
    /// The request itself is not acceptable (a name with path characters, a path outside the
    /// root, loading turned off).
    #[error("{0}")]
    Refused(String),
    /// The adapter's files could not be loaded or do not fit the base.
    #[error("adapter `{name}`: {err}")]
    Load {
        /// The adapter.
        name: String,
        /// What went wrong.
        err: crate::Error,
    },
}

/// Counters the server exports.
#[derive(Debug, Clone, Default)]
pub struct RegistryStats {
    /// Loads from disk.
    pub loads: u64,
    /// Evictions to stay under the budget.
    pub evictions: u64,
    /// Seconds spent loading.
    pub load_seconds: f64,
    /// Bytes of the adapters held now.
    pub resident_bytes: usize,
    /// Adapters held now.
    pub resident: usize,
}

struct Entry {
    path: PathBuf,
    resident: Option<Arc<ServedAdapter>>,
    last_used: u64,
}

/// The registry (module docs). Not shared by itself: the server keeps it behind a lock.
pub struct Registry {
    model: Arc<Llama>,
    root: Option<PathBuf>,
    entries: BTreeMap<String, Entry>,
    /// Folders under the root that were unloaded by name, not scanned again until registered.
    unloaded: BTreeSet<String>,
    budget: usize,
    tick: u64,
    stats: RegistryStats,
}

/// Whether `name` is a plain adapter name: non-empty, no path separators, not `.` or `..`.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && name.chars().all(|c| !c.is_control())
}

impl Registry {
    /// A registry over `model` serving the adapter directories under `root` and the `named`
    /// ones, holding at most `budget` bytes of adapters that no request uses.
    pub fn new(
        model: Arc<Llama>,
        root: Option<&Path>,
        named: &[(String, PathBuf)],
        budget: usize,
    ) -> Result<Registry, RegistryError> {
        let root = match root {
            Some(r) => Some(
                r.canonicalize()
                    .map_err(|e| RegistryError::Refused(format!("adapters root {}: {e}", r.display())))?,
            ),
            None => None,
        };
        let mut reg = Registry {
            model,
            root,
            entries: BTreeMap::new(),
            unloaded: BTreeSet::new(),
            budget,
            tick: 0,
            stats: RegistryStats::default(),
        };
        for (name, path) in named {
            if !plain_name(name) {
                return Err(RegistryError::Refused(format!(
                    "adapter name `{name}` must be plain (no path separators, not `.` or `..`)"
                )));
            }
            reg.insert(name, path.clone());
        }
        reg.scan();
        Ok(reg)
    }

    fn insert(&mut self, name: &str, path: PathBuf) {
        self.entries.insert(
            name.to_string(),
            Entry {
                path,
                resident: None,
                last_used: 0,
            },
        );
    }

    /// Pick up adapter directories added under the root since the last look.
    fn scan(&mut self) {
        let Some(root) = self.root.clone() else { return };
        let Ok(dir) = std::fs::read_dir(&root) else { return };
        for entry in dir.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            if !plain_name(&name) || self.entries.contains_key(&name) || self.unloaded.contains(&name) {
                continue;
            }
            // An adapter directory, or a `spiel train` run directory with its adapter inside.
            if path.join("adapter_config.json").is_file() {
                self.insert(&name, path);
            } else if path.join("adapter").join("adapter_config.json").is_file() {
                self.insert(&name, path.join("adapter"));
            }
        }
    }

    /// Every adapter's name, sorted.
    pub fn names(&mut self) -> Vec<String> {
        self.scan();
        self.entries.keys().cloned().collect()
    }

    /// Counters for the metrics.
    pub fn stats(&self) -> RegistryStats {
        self.stats.clone()
    }

    /// The adapter `name`, loaded if it is not held (evicting others to stay in budget).
    pub fn get(&mut self, name: &str) -> Result<Arc<ServedAdapter>, RegistryError> {
        if !plain_name(name) {
            return Err(RegistryError::Unknown(name.to_string()));
        }
        if !self.entries.contains_key(name) {
            self.scan();
        }
        self.tick += 1;
        let tick = self.tick;
        let entry = self
            .entries
            .get_mut(name)
            .ok_or_else(|| RegistryError::Unknown(name.to_string()))?;
        entry.last_used = tick;
        if let Some(a) = entry.resident.clone() {
            // Past the budget (loads made while every resident adapter was held), come back
            // under it now that some may be free.
            self.make_room(0, name);
            return Ok(a);
        }
        let path = entry.path.clone();
        let start = Instant::now();
        let served = self.load(name, &path)?;
        self.stats.loads += 1;
        self.stats.load_seconds += start.elapsed().as_secs_f64();
        self.make_room(served.bytes(), name);
        let served = Arc::new(served);
        self.stats.resident_bytes += served.bytes();
        self.stats.resident += 1;
        self.entries.get_mut(name).expect("present").resident = Some(served.clone());
        tracing::info!(
            adapter = name,
            bytes = served.bytes(),
            secs = start.elapsed().as_secs_f64(),
            "loaded adapter"
        );
        Ok(served)
    }

    fn load(&self, name: &str, path: &Path) -> Result<ServedAdapter, RegistryError> {
        let err = |err| RegistryError::Load {
            name: name.to_string(),
            err,
        };
        let adapter: Adapter = self.model.load_adapter(path).map_err(err)?;
        self.model.served_adapter(&adapter.to_set()).map_err(err)
    }

    /// Evict least recently used adapters no request holds (and not `keep`) until `incoming` more
    /// bytes fit.
    fn make_room(&mut self, incoming: usize, keep: &str) {
        while self.stats.resident_bytes + incoming > self.budget {
            let victim = self
                .entries
                .iter()
                .filter(|(n, e)| *n != keep && e.resident.as_ref().is_some_and(|a| Arc::strong_count(a) == 1))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(n, _)| n.clone());
            let Some(victim) = victim else {
                tracing::warn!(
                    budget = self.budget,
                    resident = self.stats.resident_bytes,
                    incoming,
                    "adapter budget exceeded: every resident adapter is in use"
                );
                return;
            };
            self.evict(&victim);
            self.stats.evictions += 1;
        }
    }

    fn evict(&mut self, name: &str) {
        if let Some(a) = self.entries.get_mut(name).and_then(|e| e.resident.take()) {
            self.stats.resident_bytes -= a.bytes();
            self.stats.resident -= 1;
            tracing::info!(adapter = name, "evicted adapter");
        }
    }

    /// Register `path` (which must lie inside the root) as `name` and load it, checking that it
    /// fits the base.
    pub fn register(&mut self, name: &str, path: &Path) -> Result<(), RegistryError> {
        if !plain_name(name) {
            return Err(RegistryError::Refused(format!(
                "lora_name `{name}` must be plain (no path separators, not `.` or `..`)"
            )));
        }
        let root = self
            .root
            .clone()
            .ok_or_else(|| RegistryError::Refused("no adapters root (--adapters DIR) to load from".into()))?;
        let joined = if path.is_absolute() {
            path.to_path_buf()
        } else {
            root.join(path)
        };
        let canonical = joined
            .canonicalize()
            .map_err(|e| RegistryError::Refused(format!("lora_path {}: {e}", path.display())))?;
        if !canonical.starts_with(&root) {
            return Err(RegistryError::Refused(format!(
                "lora_path {} is outside the adapters root {}",
                path.display(),
                root.display()
            )));
        }
        if self.entries.get(name).is_some_and(|e| e.path != canonical) {
            return Err(RegistryError::Refused(format!(
                "an adapter named `{name}` is already loaded"
            )));
        }
        let before = self.entries.contains_key(name);
        if !before {
            self.insert(name, canonical);
        }
        if let Err(e) = self.get(name) {
            if !before {
                self.entries.remove(name);
            }
            return Err(e);
        }
        self.unloaded.remove(name);
        Ok(())
    }

    /// Forget `name` (running requests keep their copy until they finish).
    pub fn unregister(&mut self, name: &str) -> Result<(), RegistryError> {
        if !self.entries.contains_key(name) {
            return Err(RegistryError::Unknown(name.to_string()));
        }
        self.evict(name);
        self.entries.remove(name);
        // A folder under the root would come straight back on the next scan.
        self.unloaded.insert(name.to_string());
        Ok(())
    }
}
