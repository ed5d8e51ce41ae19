//! Durable records of deployed plugins: which versions exist and which one runs, and each
//! version's manifest and component bytes.
//!
//! The plugin runtime owns what a deployment means; the broker only keeps the records, in the
//! store's metadata namespace `plugins` as one JSON document per plugin (the layout data dirs
//! already hold), so plugin code never reaches the store itself. Version bytes live in the
//! store too (namespace `plugin.versions/<name>`, key `v<N>`), so every host sharing a store
//! can run every version; a version number is claimed create-if-absent, so two hosts
//! deploying at once never overwrite each other's bytes.

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, instrument};

use super::Broker;
use crate::error::{Result, WharfError};
use crate::store::{PutCondition, PutOutcome};

/// Metadata namespace of plugin records.
const NAMESPACE: &str = "plugins";
/// Prefix of the per-plugin namespaces holding version bytes (one namespace per plugin, so
/// the embedded store rewrites only that plugin's file on a deploy).
const VERSIONS_PREFIX: &str = "plugin.versions/";
/// Leading bytes of a stored version: format 1 of (manifest length, manifest, component).
const BUNDLE_MAGIC: &[u8; 4] = b"WPV1";
/// Version numbers tried past the expected one before a deploy gives up (each taken number
/// is a deploy another host made at the same time, or one that failed half-way).
const MAX_VERSION_CLAIMS: u64 = 64;

fn versions_namespace(plugin: &str) -> String {
    format!("{VERSIONS_PREFIX}{plugin}")
}

fn encode_bundle(manifest: &str, component: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + manifest.len() + component.len());
    out.extend_from_slice(BUNDLE_MAGIC);
    out.extend_from_slice(&(manifest.len() as u32).to_be_bytes());
    out.extend_from_slice(manifest.as_bytes());
    out.extend_from_slice(component);
    out
}

fn decode_bundle(plugin: &str, version: u64, raw: &[u8]) -> Result<(String, Vec<u8>)> {
    let damaged = |why: &str| {
        WharfError::internal(format!(
            "stored version v{version} of plugin '{plugin}' is unreadable ({why}); deploy the plugin again"
        ))
    };
    let rest = raw
        .strip_prefix(BUNDLE_MAGIC.as_slice())
        .ok_or_else(|| damaged("unknown format"))?;
    let (len, rest) = rest
        .split_at_checked(4)
        .ok_or_else(|| damaged("truncated"))?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let (manifest, component) = rest
        .split_at_checked(len)
        .ok_or_else(|| damaged("truncated manifest"))?;
    let manifest =
        String::from_utf8(manifest.to_vec()).map_err(|_| damaged("manifest is not UTF-8"))?;
    Ok((manifest, component.to_vec()))
}

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
            out.push(decode_record(&name, &raw)?);
        }
        Ok(out)
    }

    /// One plugin's record with its store version (for [`Broker::save_deployment_if`]).
    #[instrument(skip(self))]
    pub(in crate::broker) async fn deployment(
        &self,
        name: &str,
    ) -> Result<Option<(PluginRecord, u64)>> {
        let Some(entry) = self.store.meta_get(NAMESPACE, name).await? else {
            return Ok(None);
        };
        Ok(Some((decode_record(name, &entry.value)?, entry.version)))
    }

    /// Writes one plugin's record (durable on return).
    #[instrument(skip_all, fields(plugin = %record.name))]
    pub(in crate::broker) async fn save_deployment(&self, record: &PluginRecord) -> Result<()> {
        self.store
            .meta_put(NAMESPACE, &record.name, encode_record(record)?)
            .await
    }

    /// Writes one plugin's record only if it is still at store version `expected` (`None`:
    /// only if there is none), so of two hosts changing one plugin at once one gets a 409.
    #[instrument(skip_all, fields(plugin = %record.name))]
    pub(in crate::broker) async fn save_deployment_if(
        &self,
        record: &PluginRecord,
        expected: Option<u64>,
    ) -> Result<()> {
        let cond = expected.map_or(PutCondition::Absent, PutCondition::Version);
        match self
            .store
            .meta_put_if(NAMESPACE, &record.name, encode_record(record)?, cond)
            .await?
        {
            PutOutcome::Written { .. } => Ok(()),
            PutOutcome::Conflict { .. } => Err(WharfError::conflict(format!(
                "plugin '{}' was changed on another host meanwhile (deployed, rolled back or \
                 removed); check GET /v1/plugins/{} and try again",
                record.name, record.name
            ))),
        }
    }

    /// Deletes one plugin's record.
    #[instrument(skip(self))]
    pub(in crate::broker) async fn delete_deployment(&self, name: &str) -> Result<()> {
        self.store.meta_delete(NAMESPACE, name).await
    }

    /// Stores a version's manifest and component under the first free number from `from`
    /// (create-if-absent, durable on return) and returns that number.
    #[instrument(skip(self, manifest, component))]
    pub(in crate::broker) async fn store_plugin_version(
        &self,
        name: &str,
        from: u64,
        manifest: &str,
        component: &[u8],
    ) -> Result<u64> {
        let ns = versions_namespace(name);
        let bundle = encode_bundle(manifest, component);
        for version in from..from + MAX_VERSION_CLAIMS {
            let key = format!("v{version}");
            match self
                .store
                .meta_put_if(&ns, &key, bundle.clone(), PutCondition::Absent)
                .await?
            {
                PutOutcome::Written { .. } => return Ok(version),
                PutOutcome::Conflict { .. } => continue,
            }
        }
        Err(WharfError::busy(format!(
            "plugin '{name}': versions v{from}..v{} are all taken by deploys in progress; try again",
            from + MAX_VERSION_CLAIMS - 1
        )))
    }

    /// A stored version's manifest text and component bytes; `None` if the store lacks it.
    #[instrument(skip(self))]
    pub(in crate::broker) async fn plugin_version(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Option<(String, Vec<u8>)>> {
        let entry = self
            .store
            .meta_get(&versions_namespace(name), &format!("v{version}"))
            .await?;
        entry
            .map(|e| decode_bundle(name, version, &e.value))
            .transpose()
    }

    /// Deletes the bytes of one stored version (a deploy that did not go through).
    #[instrument(skip(self))]
    pub(in crate::broker) async fn delete_plugin_version(
        &self,
        name: &str,
        version: u64,
    ) -> Result<()> {
        self.store
            .meta_delete(&versions_namespace(name), &format!("v{version}"))
            .await
    }

    /// Deletes the bytes of every stored version of a plugin.
    #[instrument(skip(self))]
    pub(in crate::broker) async fn delete_plugin_versions(&self, name: &str) -> Result<()> {
        let ns = versions_namespace(name);
        for (key, _) in self.store.meta_list(&ns).await? {
            self.store.meta_delete(&ns, &key).await?;
        }
        Ok(())
    }

    /// Deletes stored versions older than the newest `record` names and not named by it: bytes
    /// of deploys that died (a crash between storing them and storing the record) or lost the
    /// race for the record. A deploy still in progress elsewhere with such a number can no
    /// longer store its record (it was read before this one), so it fails and needs none.
    #[instrument(skip(self, record), fields(plugin = %record.name))]
    pub(in crate::broker) async fn prune_plugin_versions(
        &self,
        record: &PluginRecord,
    ) -> Result<()> {
        let ns = versions_namespace(&record.name);
        let newest = record.versions.iter().map(|v| v.version).max().unwrap_or(0);
        for (key, _) in self.store.meta_list(&ns).await? {
            let Some(n) = key.strip_prefix('v').and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            if n < newest && !record.versions.iter().any(|v| v.version == n) {
                self.store.meta_delete(&ns, &key).await?;
                info!(plugin = %record.name, version = n, "deleted the bytes of a version no deployment names");
            }
        }
        Ok(())
    }

    /// Change feed of the plugin records (any host's deploy, rollback or removal moves it).
    pub(in crate::broker) fn watch_deployments(&self) -> watch::Receiver<u64> {
        self.store.watch_meta(NAMESPACE)
    }
}

fn encode_record(record: &PluginRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(record)
        .map_err(|e| WharfError::internal(format!("cannot encode plugin record: {e}")))
}

fn decode_record(name: &str, raw: &[u8]) -> Result<PluginRecord> {
    serde_json::from_slice(raw).map_err(|e| {
        WharfError::internal(format!(
            "stored plugin record '{name}' is unreadable ({e}); restore the store's metadata from a backup or remove the plugin"
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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

    /// A broker on a fresh embedded store (the directory lives as long as the guard).
    async fn embedded_broker() -> (tempfile::TempDir, Arc<EmbeddedStore>, Arc<Broker>) {
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
        (dir, store, broker)
    }

    #[tokio::test]
    async fn records_round_trip_in_the_layout_data_dirs_hold() {
        let (_dir, store, broker) = embedded_broker().await;
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

    #[tokio::test]
    async fn versions_are_claimed_once_and_read_back_byte_for_byte() {
        let (_dir, store, broker) = embedded_broker().await;
        let wasm = vec![0u8, 97, 115, 109, 255, 0];
        assert_eq!(
            broker
                .store_plugin_version("alpha", 1, "name = \"alpha\"", &wasm)
                .await
                .unwrap(),
            1
        );
        // A second deploy expecting v1 (another host's, or one racing it) gets the next number.
        assert_eq!(
            broker
                .store_plugin_version("alpha", 1, "second", b"x")
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            broker.plugin_version("alpha", 1).await.unwrap(),
            Some(("name = \"alpha\"".to_string(), wasm))
        );
        assert_eq!(
            broker.plugin_version("alpha", 2).await.unwrap(),
            Some(("second".to_string(), b"x".to_vec()))
        );
        assert_eq!(broker.plugin_version("alpha", 3).await.unwrap(), None);
        store
            .meta_put("plugin.versions/alpha", "v3", b"garbage".to_vec())
            .await
            .unwrap();
        let e = broker.plugin_version("alpha", 3).await.unwrap_err();
        assert!(
            e.message.contains("v3 of plugin 'alpha' is unreadable"),
            "{e}"
        );
        broker.delete_plugin_versions("alpha").await.unwrap();
        assert_eq!(broker.plugin_version("alpha", 1).await.unwrap(), None);
    }

    #[tokio::test]
    async fn pruning_deletes_only_older_versions_no_record_names() {
        let (_dir, _store, broker) = embedded_broker().await;
        for _ in 1..=4 {
            broker
                .store_plugin_version("alpha", 1, "m", b"c")
                .await
                .unwrap();
        }
        // v1 and v3 are named; v2 died between its bytes and its record; v4 is newer than
        // anything named (a deploy still in flight) and stays.
        let mut r = record("alpha", 3);
        r.versions.insert(
            0,
            VersionRecord {
                version: 1,
                ..r.versions[0].clone()
            },
        );
        broker.prune_plugin_versions(&r).await.unwrap();
        let mut left = Vec::new();
        for v in 1..=4 {
            left.push(broker.plugin_version("alpha", v).await.unwrap().is_some());
        }
        assert_eq!(left, [true, false, true, true]);
    }

    #[tokio::test]
    async fn a_stale_record_write_is_a_conflict() {
        let (_dir, _store, broker) = embedded_broker().await;
        broker
            .save_deployment_if(&record("alpha", 1), None)
            .await
            .unwrap();
        let e = broker
            .save_deployment_if(&record("alpha", 2), None)
            .await
            .unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Conflict);
        let (_, v) = broker.deployment("alpha").await.unwrap().unwrap();
        broker
            .save_deployment_if(&record("alpha", 2), Some(v))
            .await
            .unwrap();
        assert!(
            broker
                .save_deployment_if(&record("alpha", 3), Some(v))
                .await
                .is_err()
        );
        assert_eq!(
            broker.deployment("alpha").await.unwrap().unwrap().0,
            record("alpha", 2)
        );
    }
}
