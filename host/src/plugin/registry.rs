//! Deploy history: which versions exist and which one runs, kept durably.
//!
//! A version's manifest and component bytes, and the record of versions and the running one,
//! are kept by the broker in the store (`Broker::store_plugin_version`, written before the
//! record, so every host finds everything the record names). Hosts before that kept the bytes
//! under `<data_dir>/plugins/<name>/v<N>/`; [`VersionFiles`] still reads them, so such a data
//! dir keeps its plugins, and removing a plugin deletes them.

use std::path::{Path, PathBuf};

use crate::error::{Result, WharfError};

pub use crate::broker::deployments::{PluginRecord, VersionRecord};

const MANIFEST_FILE: &str = "plugin.toml";
const COMPONENT_FILE: &str = "component.wasm";

/// Files of versions deployed by hosts that kept them in the data dir (read and removed only).
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
