//! Deploy history: which versions exist and which one runs, kept durably.
//!
//! A version's manifest and component bytes live under `<data_dir>/plugins/<name>/v<N>/`; the
//! record of versions and the running one lives in store metadata (namespace `plugins`), written
//! only after the files, so a restart finds everything the record names.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, WharfError};
use crate::store::Store;

/// Metadata namespace of plugin records.
pub const NAMESPACE: &str = "plugins";
const MANIFEST_FILE: &str = "plugin.toml";
const COMPONENT_FILE: &str = "component.wasm";

/// One deployed version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Host-assigned number (1, 2, …).
    pub version: u64,
    /// The manifest's `version` string.
    pub manifest_version: String,
    /// SHA-256 of the component (hex).
    pub sha256: String,
    /// When it was deployed (ms).
    pub deployed_ms: u64,
}

/// Everything durable about one plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    /// Plugin name.
    pub name: String,
    /// The running version.
    pub current: u64,
    /// Every version still kept, oldest first.
    pub versions: Vec<VersionRecord>,
    /// Versions the plugin ran before the current one, most recent last (rollback pops it).
    pub history: Vec<u64>,
}

impl PluginRecord {
    /// The record of the running version.
    pub fn current_version(&self) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.version == self.current)
    }

    /// The number the next deploy gets.
    pub fn next_version(&self) -> u64 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1
    }
}

/// Files of deployed versions under the data dir.
pub struct VersionFiles {
    root: PathBuf,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> WharfError {
    WharfError::unavailable(format!("cannot {what} {}: {e}", path.display()))
}

impl VersionFiles {
    /// Files under `<data_dir>/plugins`.
    pub fn new(data_dir: &Path) -> Self {
        VersionFiles {
            root: data_dir.join("plugins"),
        }
    }

    fn dir(&self, name: &str, version: u64) -> PathBuf {
        self.root.join(name).join(format!("v{version}"))
    }

    /// Writes a version's manifest and component (durable on return).
    pub fn write(&self, name: &str, version: u64, manifest: &str, component: &[u8]) -> Result<()> {
        let dir = self.dir(name, version);
        std::fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        for (file, bytes) in [
            (MANIFEST_FILE, manifest.as_bytes()),
            (COMPONENT_FILE, component),
        ] {
            let path = dir.join(file);
            let tmp = dir.join(format!("{file}.tmp"));
            let written = std::fs::File::create(&tmp).and_then(|mut f| {
                std::io::Write::write_all(&mut f, bytes)?;
                f.sync_all()
            });
            written.map_err(|e| io_error("write", &tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io_error("rename", &path, e))?;
        }
        Ok(())
    }

    /// Reads a version's manifest text and component bytes.
    pub fn read(&self, name: &str, version: u64) -> Result<(String, Vec<u8>)> {
        let dir = self.dir(name, version);
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest = std::fs::read_to_string(&manifest_path)
            .map_err(|e| io_error("read", &manifest_path, e))?;
        let component_path = dir.join(COMPONENT_FILE);
        let component =
            std::fs::read(&component_path).map_err(|e| io_error("read", &component_path, e))?;
        Ok((manifest, component))
    }

    /// Deletes every version of a plugin.
    pub fn remove_all(&self, name: &str) -> Result<()> {
        let dir = self.root.join(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", &dir, e)),
        }
    }
}

/// Loads every plugin record from store metadata.
pub async fn load(store: &dyn Store) -> Result<Vec<PluginRecord>> {
    let mut out = Vec::new();
    for (name, raw) in store.meta_list(NAMESPACE).await? {
        let rec: PluginRecord = serde_json::from_slice(&raw).map_err(|e| {
            WharfError::internal(format!("stored plugin record '{name}' is unreadable: {e}"))
        })?;
        out.push(rec);
    }
    Ok(out)
}

/// Writes one record (durable on return).
pub async fn save(store: &dyn Store, record: &PluginRecord) -> Result<()> {
    let raw = serde_json::to_vec(record)
        .map_err(|e| WharfError::internal(format!("cannot encode plugin record: {e}")))?;
    store.meta_put(NAMESPACE, &record.name, raw).await
}

/// Deletes one record.
pub async fn delete(store: &dyn Store, name: &str) -> Result<()> {
    store.meta_delete(NAMESPACE, name).await
}
