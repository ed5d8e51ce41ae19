//! Deploy history: which versions exist and which one runs, kept durably.
//!
//! A version's manifest and component bytes live under `<data_dir>/plugins/<name>/v<N>/`; the
//! record of versions and the running one is kept by the broker (`Broker::save_deployment`),
//! written only after the files, so a restart finds everything the record names.

use std::path::{Path, PathBuf};

use crate::error::{Result, WharfError};

pub use crate::broker::deployments::{PluginRecord, VersionRecord};

const MANIFEST_FILE: &str = "plugin.toml";
const COMPONENT_FILE: &str = "component.wasm";

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
