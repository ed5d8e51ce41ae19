//! Durable records of deployed plugins: which versions exist and which one runs.
//!
//! The plugin runtime owns what a deployment means; the broker only keeps the records, in the
//! store's metadata namespace `plugins` as one JSON document per plugin (the layout data dirs
//! already hold), so plugin code never reaches the store itself.

use serde::{Deserialize, Serialize};
use tracing::instrument;

use super::Broker;
use crate::error::{Result, WharfError};

/// Metadata namespace of plugin records.
const NAMESPACE: &str = "plugins";

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

impl Broker {
    /// Every plugin deployment record.
    #[instrument(skip(self))]
    pub(in crate::broker) async fn deployments(&self) -> Result<Vec<PluginRecord>> {
        let mut out = Vec::new();
        for (name, raw) in self.store.meta_list(NAMESPACE).await? {
            let record: PluginRecord = serde_json::from_slice(&raw).map_err(|e| {
                WharfError::internal(format!(
                    "stored plugin record '{name}' is unreadable ({e}); restore the data dir's metadata from a backup or remove the plugin"
                ))
            })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Writes one plugin's record (durable on return).
    #[instrument(skip_all, fields(plugin = %record.name))]
    pub(in crate::broker) async fn save_deployment(&self, record: &PluginRecord) -> Result<()> {
        let raw = serde_json::to_vec(record)
            .map_err(|e| WharfError::internal(format!("cannot encode plugin record: {e}")))?;
        self.store.meta_put(NAMESPACE, &record.name, raw).await
    }

    /// Deletes one plugin's record.
    #[instrument(skip(self))]
    pub(in crate::broker) async fn delete_deployment(&self, name: &str) -> Result<()> {
        self.store.meta_delete(NAMESPACE, name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerConfig;
    use crate::clock::{ManualClock, SharedClock};
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{Store, StoreConfig};

    fn record(name: &str, current: u64) -> PluginRecord {
        PluginRecord {
            name: name.into(),
            current,
            versions: vec![VersionRecord {
                version: current,
                manifest_version: "1.0.0".into(),
                sha256: "ab".repeat(32),
                deployed_ms: 7,
            }],
            history: vec![],
        }
    }

    #[tokio::test]
    async fn records_round_trip_in_the_layout_data_dirs_hold() {
        let dir = tempfile::tempdir().unwrap();
        let clock: SharedClock = ManualClock::new(1_700_000_000_000);
        let sc = StoreConfig {
            data_dir: dir.path().to_path_buf(),
            ..StoreConfig::default()
        };
        let store = EmbeddedStore::open(&sc, clock.clone()).await.unwrap();
        let broker = Broker::open(BrokerConfig::default(), store.clone(), clock)
            .await
            .unwrap();
        broker.save_deployment(&record("alpha", 1)).await.unwrap();
        broker.save_deployment(&record("beta", 2)).await.unwrap();
        broker.save_deployment(&record("alpha", 3)).await.unwrap();
        let mut got = broker.deployments().await.unwrap();
        got.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(got, vec![record("alpha", 3), record("beta", 2)]);
        // The same key and JSON as before the records moved behind the broker.
        let raw = store.meta_list("plugins").await.unwrap();
        let alpha = raw.iter().find(|(k, _)| k == "alpha").unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&alpha.1).unwrap(),
            serde_json::json!({"name": "alpha", "current": 3, "history": [], "versions": [
                {"version": 3, "manifest_version": "1.0.0", "sha256": "ab".repeat(32), "deployed_ms": 7}
            ]})
        );
        broker.delete_deployment("alpha").await.unwrap();
        let left: Vec<String> = broker
            .deployments()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(left, ["beta"]);
    }
}
