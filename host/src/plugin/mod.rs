//! Plugin runtime: manifests, the wasmtime host, the deploy registry, HTTP triggers.
//!
//! A deploy parses and validates the manifest, compiles the component (or loads the cached
//! artifact), makes sure the consumer group exists with the manifest's settings, stores the
//! version's bytes and the record through the broker, then swaps versions: the old workers
//! settle what they hold and unregister before the new ones register, so no message runs in
//! two versions at once and nothing is lost (un-settled messages go back to the group).
//!
//! Hosts sharing a store follow each other: a deploy, rollback or removal made on one host
//! moves the store's change feed of plugin records, and every other host applies it
//! ([`PluginHost::sync`]) from the bytes in the store, within a second or so.

mod config;
pub mod manifest;
pub mod registry;
pub mod runtime;
pub mod trigger;
pub mod worker;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::api::BrokerApi;
use crate::broker::{ConsumeModel, GroupKind, GroupSpec, SendReceipt};
use crate::error::{ErrorCode, Result, WharfError};
pub use config::PluginsConfig;
use manifest::Manifest;
use registry::{PluginRecord, VersionFiles, VersionRecord};
use runtime::{BrokerSender, InstanceConfig, Loaded, Runtime};
use trigger::Routes;
use worker::{PluginStats, WorkerSpec, Workers};

/// Answer to a deploy, rollback or remove.
#[derive(Debug, Clone, Serialize)]
pub struct DeployResult {
    /// Plugin name.
    pub name: String,
    /// Version number the host assigned (1, 2, …) — every deploy is a new version.
    pub version: u64,
    /// The manifest's `version` string.
    pub manifest_version: String,
    /// `running`, `removed`, …
    pub status: String,
}

/// Reads a manifest file and the component it names (relative to the manifest's directory).
pub fn read_bundle(manifest_path: &Path) -> Result<(String, Bytes)> {
    let text = std::fs::read_to_string(manifest_path).map_err(|e| {
        WharfError::bad_request(format!(
            "cannot read manifest {}: {e}",
            manifest_path.display()
        ))
    })?;
    let file = manifest_path.display().to_string();
    let manifest = Manifest::parse(&file, &text)?;
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    let component_path = base.join(&manifest.component);
    let component = std::fs::read(&component_path).map_err(|e| {
        WharfError::bad_request(format!(
            "{file}: component = \"{}\" cannot be read at {}: {e}; build it first (cargo build --release --target wasm32-wasip2)",
            manifest.component,
            component_path.display()
        ))
    })?;
    Ok((text, Bytes::from(component)))
}

/// One deployed plugin: its durable record and what runs now.
struct Slot {
    record: PluginRecord,
    /// The running version's manifest text.
    text: String,
    manifest: Manifest,
    loaded: Option<Loaded>,
    workers: Option<Workers>,
    stats: Arc<PluginStats>,
    /// Why the current version is not running (restored at start but failed to load).
    problem: Option<String>,
}

/// The plugin runtime.
pub struct PluginHost {
    broker: BrokerApi,
    runtime: Arc<Runtime>,
    /// Where hosts before version bytes moved into the store kept them (read-only fallback).
    files: VersionFiles,
    handle: tokio::runtime::Handle,
    /// Ends the task following other hosts' plugin changes.
    stop: CancellationToken,
    /// Deploy, rollback, remove and shutdown happen one at a time.
    ops: tokio::sync::Mutex<()>,
    slots: parking_lot::Mutex<BTreeMap<String, Slot>>,
    routes: Routes,
    /// Test hook: worker instantiations of components loaded from now on fail this many times.
    #[cfg(test)]
    fail_instantiations: Arc<std::sync::atomic::AtomicU32>,
}

impl PluginHost {
    /// Starts the runtime: loads deployed versions from the store, deploys `[plugins] dir`.
    pub async fn start(
        broker: BrokerApi,
        config: PluginsConfig,
        data_dir: PathBuf,
    ) -> Result<Arc<PluginHost>> {
        let cache = data_dir.join("plugin-cache");
        let runtime = tokio::task::spawn_blocking(move || Runtime::new(cache))
            .await
            .map_err(|e| WharfError::internal(format!("plugin runtime start panicked: {e}")))??;
        // Watch before restoring, so a deploy another host makes meanwhile is not missed.
        let changes = broker.watch_deployments();
        let host = Arc::new(PluginHost {
            broker,
            runtime: Arc::new(runtime),
            files: VersionFiles::new(&data_dir),
            handle: tokio::runtime::Handle::current(),
            stop: CancellationToken::new(),
            ops: tokio::sync::Mutex::new(()),
            slots: parking_lot::Mutex::new(BTreeMap::new()),
            routes: Routes::default(),
            #[cfg(test)]
            fail_instantiations: Arc::default(),
        });
        host.restore().await?;
        host.deploy_dir(&config.dir).await;
        spawn_sync(&host, changes);
        Ok(host)
    }

    /// A version's manifest text and component: from the store, else from the data dir, where
    /// hosts kept them before the bytes moved into the store.
    async fn read_version(&self, name: &str, version: u64) -> Result<(String, Vec<u8>)> {
        if let Some(found) = self.broker.plugin_version(name, version).await? {
            return Ok(found);
        }
        self.files.read(name, version).map_err(|e| {
            WharfError::unavailable(format!(
                "version v{version} of plugin '{name}' is not in the store ({}); deploy it again",
                e.message
            ))
        })
    }

    /// Applies what other hosts changed: runs the version each stored record names (from the
    /// bytes in the store) and stops plugins whose record is gone. Records equal to what runs
    /// here (this host's own changes) are left alone.
    async fn sync(&self) -> Result<()> {
        let _ops = self.ops.lock().await;
        if self.stop.is_cancelled() {
            return Ok(());
        }
        let stored: BTreeMap<String, PluginRecord> = self
            .broker
            .deployments()
            .await?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let gone: Vec<String> = self
            .slots
            .lock()
            .keys()
            .filter(|n| !stored.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if self.unload(&name).await.is_some() {
                info!(plugin = %name, "plugin removed on another host; stopped here");
            }
        }
        // The group a new version needs may have been created a moment ago on that host.
        self.broker.refresh_registry().await?;
        for (name, record) in stored {
            let local = self.slots.lock().get(&name).map(|s| s.record.clone());
            match local {
                Some(r) if r == record => continue,
                Some(r) if r.current == record.current => {
                    // Same version runs; only the history or version list moved on.
                    if let Some(slot) = self.slots.lock().get_mut(&name) {
                        slot.record = record;
                    }
                    continue;
                }
                _ => {}
            }
            let version = record.current;
            let started = async {
                let (text, component) = self.read_version(&name, version).await?;
                let manifest = Manifest::parse("plugin.toml", &text)?;
                let loaded = self.load_component(component.into()).await?;
                let previous = self.slots.lock().get(&name).map(|s| s.record.clone());
                self.switch(manifest, text, loaded, record, previous, false)
                    .await
            };
            match started.await {
                Ok(()) => {
                    info!(plugin = %name, version, "plugin version deployed on another host now runs here")
                }
                Err(e) => {
                    error!(plugin = %name, version, error = %e, "cannot run the version another host deployed")
                }
            }
        }
        Ok(())
    }

    /// Restarts the running version of every plugin in the registry (from cached artifacts).
    async fn restore(&self) -> Result<()> {
        let _ops = self.ops.lock().await;
        for record in self.broker.deployments().await? {
            let name = record.name.clone();
            let stats = Arc::new(PluginStats::default());
            let restored = self.restore_one(&record, &stats).await;
            let (manifest, loaded, workers, problem) = match restored {
                Ok((m, l, w)) => (Some(m), Some(l), Some(w), None),
                Err(e) => {
                    error!(plugin = %name, version = record.current, error = %e, "cannot restart plugin");
                    (None, None, None, Some(e.to_string()))
                }
            };
            let (text, manifest) = match manifest {
                Some(m) => m,
                None => match self.read_version(&name, record.current).await {
                    Ok((text, _)) => match Manifest::parse("plugin.toml", &text) {
                        Ok(m) => (text, m),
                        Err(_) => continue,
                    },
                    Err(_) => continue,
                },
            };
            if workers.is_some() {
                self.routes.install(&name, &manifest.http);
            }
            self.slots.lock().insert(
                name,
                Slot {
                    record,
                    text,
                    manifest,
                    loaded,
                    workers,
                    stats,
                    problem,
                },
            );
        }
        Ok(())
    }

    async fn restore_one(
        &self,
        record: &PluginRecord,
        stats: &Arc<PluginStats>,
    ) -> Result<((String, Manifest), Loaded, Workers)> {
        let (text, component) = self.read_version(&record.name, record.current).await?;
        let manifest = Manifest::parse("plugin.toml", &text)?;
        let loaded = self.load_component(component.into()).await?;
        self.ensure_group(&manifest).await?;
        let workers = self
            .start_workers(&manifest, record.current, &loaded, stats.clone())
            .await?;
        info!(plugin = %record.name, version = record.current, cache_hit = loaded.cache_hit,
            load_ms = loaded.took.as_secs_f64() * 1e3, "plugin restarted");
        Ok(((text, manifest), loaded, workers))
    }

    /// Deploys every `<dir>/*/plugin.toml` whose content is not already the running version.
    async fn deploy_dir(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut manifests: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("plugin.toml"))
            .filter(|p| p.is_file())
            .collect();
        manifests.sort();
        for path in manifests {
            let (text, component) = match read_bundle(&path) {
                Ok(b) => b,
                Err(e) => {
                    warn!(manifest = %path.display(), error = %e.message, "plugin in [plugins] dir not deployed");
                    continue;
                }
            };
            if self.is_running(&text, &component) {
                continue;
            }
            match self
                .deploy_named(&path.display().to_string(), &text, component)
                .await
            {
                Ok(r) => {
                    info!(plugin = %r.name, version = r.version, manifest = %path.display(), "plugin deployed from [plugins] dir")
                }
                Err(e) => {
                    warn!(manifest = %path.display(), error = %e.message, "plugin in [plugins] dir not deployed")
                }
            }
        }
    }

    /// True when this manifest text and component are exactly the running version.
    fn is_running(&self, text: &str, component: &[u8]) -> bool {
        let Ok(m) = Manifest::parse("plugin.toml", text) else {
            return false;
        };
        let sha = runtime::component_hash(component);
        let slots = self.slots.lock();
        let Some(slot) = slots.get(&m.name) else {
            return false;
        };
        let same_component = slot
            .record
            .current_version()
            .is_some_and(|v| v.sha256 == sha);
        same_component && slot.workers.is_some() && slot.text == text
    }

    /// Deploys a new version from manifest text and component bytes.
    pub async fn deploy(&self, manifest_toml: &str, component: Bytes) -> Result<DeployResult> {
        self.deploy_named("plugin.toml", manifest_toml, component)
            .await
    }

    async fn deploy_named(&self, file: &str, text: &str, component: Bytes) -> Result<DeployResult> {
        let _ops = self.ops.lock().await;
        let manifest = Manifest::parse(file, text)?;
        self.check_conflicts(&manifest)?;
        let loaded = self.load_component(component.clone()).await?;
        self.check_instantiates(&manifest, &loaded).await?;
        self.ensure_group(&manifest).await?;
        let name = manifest.name.clone();
        // The store's record is the truth when hosts share it; this host's may lag by a sync.
        let (previous, expected) = match self.broker.deployment(&name).await? {
            Some((r, v)) => (Some(r), Some(v)),
            None => (None, None),
        };
        let local_next = self
            .slots
            .lock()
            .get(&name)
            .map_or(1, |s| s.record.next_version());
        let from = previous
            .as_ref()
            .map_or(1, |r| r.next_version())
            .max(local_next);
        let version = self
            .broker
            .store_plugin_version(&name, from, text, &component)
            .await?;
        crate::crashpoint::reached(crate::crashpoint::DEPLOY_STORED);
        let mut record = previous.clone().unwrap_or(PluginRecord {
            name: name.clone(),
            current: version,
            versions: Vec::new(),
            history: Vec::new(),
        });
        if let Some(p) = &previous {
            record.history.push(p.current);
        }
        record.current = version;
        record.versions.push(VersionRecord {
            version,
            manifest_version: manifest.version.clone(),
            sha256: loaded.hash.clone(),
            deployed_ms: self.broker.clock().now_ms(),
        });
        let saved = self.broker.save_deployment_if(&record, expected).await;
        let recorded = record.clone();
        let switched = match saved {
            Ok(()) => {
                crate::crashpoint::reached(crate::crashpoint::DEPLOY_RECORDED);
                self.switch(manifest, text.to_string(), loaded, record, previous, true)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = switched {
            // The version never ran: its bytes go (the record no longer names it).
            let _ = self.broker.delete_plugin_version(&name, version).await;
            return Err(e);
        }
        info!(plugin = %name, version, "plugin deployed");
        if let Err(e) = self.broker.prune_plugin_versions(&recorded).await {
            // Only space is at stake; the next deploy tries again.
            warn!(plugin = %name, error = %e, "deleting unused plugin versions failed");
        }
        self.result(&name, "running")
    }

    /// Returns to the previous version.
    pub async fn rollback(&self, name: &str) -> Result<DeployResult> {
        let _ops = self.ops.lock().await;
        let (previous, expected) = self
            .broker
            .deployment(name)
            .await?
            .ok_or_else(|| not_deployed(name))?;
        let Some(&target) = previous.history.last() else {
            return Err(WharfError::bad_request(format!(
                "plugin '{name}' has no earlier version to roll back to (it runs v{}); deploy a new version instead",
                previous.current
            )));
        };
        let (text, component) = self.read_version(name, target).await?;
        let manifest = Manifest::parse("plugin.toml", &text)?;
        self.check_conflicts(&manifest)?;
        let loaded = self.load_component(component.into()).await?;
        self.ensure_group(&manifest).await?;
        let mut record = previous.clone();
        record.history.pop();
        record.current = target;
        self.broker
            .save_deployment_if(&record, Some(expected))
            .await?;
        self.switch(manifest, text, loaded, record, Some(previous), true)
            .await?;
        info!(plugin = %name, version = target, "plugin rolled back");
        self.result(name, "running")
    }

    /// Stops the running version and starts `manifest`'s (whose record the caller stored); on
    /// failure the old version runs again, and with `persist` its record is stored again (a
    /// change made here; a change another host made is that host's to undo).
    async fn switch(
        &self,
        manifest: Manifest,
        text: String,
        loaded: Loaded,
        record: PluginRecord,
        previous: Option<PluginRecord>,
        persist: bool,
    ) -> Result<()> {
        let name = manifest.name.clone();
        let (old_workers, old_state, stats) = {
            let mut slots = self.slots.lock();
            match slots.get_mut(&name) {
                Some(s) => (
                    s.workers.take(),
                    Some((s.manifest.clone(), s.loaded.clone())),
                    s.stats.clone(),
                ),
                None => (None, None, Arc::new(PluginStats::default())),
            }
        };
        if let Some(w) = old_workers {
            w.stop().await;
        }
        match self
            .start_workers(&manifest, record.current, &loaded, stats.clone())
            .await
        {
            Ok(workers) => {
                self.routes.install(&name, &manifest.http);
                self.slots.lock().insert(
                    name,
                    Slot {
                        record,
                        text,
                        manifest,
                        loaded: Some(loaded),
                        workers: Some(workers),
                        stats,
                        problem: None,
                    },
                );
                Ok(())
            }
            Err(e) => {
                warn!(plugin = %name, error = %e, "new version did not start; restoring the previous one");
                match previous {
                    Some(prev) => {
                        if persist {
                            let _ = self.broker.save_deployment(&prev).await;
                        }
                        if let Some((old_manifest, Some(old_loaded))) = old_state {
                            let restarted = self
                                .start_workers(&old_manifest, prev.current, &old_loaded, stats)
                                .await;
                            if let Some(slot) = self.slots.lock().get_mut(&name) {
                                match restarted {
                                    Ok(w) => slot.workers = Some(w),
                                    Err(e2) => slot.problem = Some(e2.to_string()),
                                }
                            }
                        }
                    }
                    None if persist => {
                        let _ = self.broker.delete_deployment(&name).await;
                        let _ = self.broker.delete_plugin_versions(&name).await;
                        let _ = self.files.remove_all(&name);
                    }
                    None => {}
                }
                Err(e)
            }
        }
    }

    /// Stops and removes a plugin.
    pub async fn remove(&self, name: &str) -> Result<DeployResult> {
        let _ops = self.ops.lock().await;
        let stored = self.broker.deployment(name).await?.map(|(r, _)| r);
        let record = match (self.unload(name).await, stored) {
            (Some(record), _) | (None, Some(record)) => record,
            (None, None) => return Err(not_deployed(name)),
        };
        self.broker.delete_deployment(name).await?;
        if let Err(e) = self.broker.delete_plugin_versions(name).await {
            warn!(plugin = %name, error = %e, "stored versions of the removed plugin left behind");
        }
        if let Err(e) = self.files.remove_all(name) {
            warn!(plugin = %name, error = %e, "plugin files left behind");
        }
        info!(plugin = %name, version = record.current, "plugin removed");
        Ok(DeployResult {
            name: name.to_string(),
            version: record.current,
            manifest_version: record
                .current_version()
                .map(|v| v.manifest_version.clone())
                .unwrap_or_default(),
            status: "removed".to_string(),
        })
    }

    /// Stops what runs of `name` here (routes, then workers settle and unregister) and forgets
    /// it; the record it ran under, if it ran.
    async fn unload(&self, name: &str) -> Option<PluginRecord> {
        let slot = self.slots.lock().remove(name)?;
        self.routes.remove(name);
        if let Some(w) = slot.workers {
            w.stop().await;
        }
        Some(slot.record)
    }

    fn result(&self, name: &str, status: &str) -> Result<DeployResult> {
        let slots = self.slots.lock();
        let slot = slots.get(name).ok_or_else(|| not_deployed(name))?;
        Ok(DeployResult {
            name: name.to_string(),
            version: slot.record.current,
            manifest_version: slot.manifest.version.clone(),
            status: status.to_string(),
        })
    }

    /// Refuses routes or groups another plugin holds, and subscriptions to missing topics.
    fn check_conflicts(&self, m: &Manifest) -> Result<()> {
        if let Some((path, owner)) = self.routes.conflict(&m.name, &m.http) {
            return Err(WharfError::conflict(format!(
                "HTTP trigger path {path} is already served by plugin '{owner}'; choose another [[http]] path"
            )));
        }
        {
            let slots = self.slots.lock();
            let shared = slots
                .values()
                .find(|s| s.record.name != m.name && s.manifest.consumer.group == m.consumer.group);
            if let Some(other) = shared {
                return Err(WharfError::conflict(format!(
                    "consumer group '{}' is already used by plugin '{}'; give each plugin its own [consumer] group",
                    m.consumer.group, other.record.name
                )));
            }
        }
        for s in &m.subscription {
            self.broker.topic(&s.topic)?;
        }
        Ok(())
    }

    /// Creates the group if absent, else makes its settings the manifest's (latest wins).
    async fn ensure_group(&self, m: &Manifest) -> Result<()> {
        let c = &m.consumer;
        match self.broker.group(&c.group) {
            Ok(g) => {
                if g.kind != GroupKind::Consumer {
                    return Err(WharfError::bad_request(format!(
                        "group '{}' is not a consumer group; name a consumer group in [consumer] group",
                        c.group
                    )));
                }
                if g.model != c.model
                    || g.max_reconsume_times != c.max_reconsume_times
                    || g.consume_timeout_ms != c.consume_timeout_ms
                {
                    let mut updated = g.clone();
                    updated.model = c.model;
                    updated.max_reconsume_times = c.max_reconsume_times;
                    updated.consume_timeout_ms = c.consume_timeout_ms;
                    self.broker.update_group(updated).await?;
                }
                Ok(())
            }
            Err(e) if e.code == ErrorCode::SubscriptionGroupNotExist => {
                let spec = GroupSpec {
                    name: c.group.clone(),
                    kind: GroupKind::Consumer,
                    model: c.model,
                    max_reconsume_times: Some(c.max_reconsume_times),
                    consume_timeout_ms: Some(c.consume_timeout_ms),
                };
                match self.broker.create_group(spec).await {
                    Ok(_) => Ok(()),
                    // Created meanwhile by someone else (perhaps another host, so this
                    // host's registry may not list it yet): fine, retry as an update.
                    Err(e) if e.kind == crate::error::ErrorKind::Conflict => {
                        self.broker.refresh_registry().await?;
                        if self.broker.group(&c.group).is_err() {
                            return Err(e);
                        }
                        Box::pin(self.ensure_group(m)).await
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Compiles or loads the cached artifact, off the async threads.
    async fn load_component(&self, bytes: Bytes) -> Result<Loaded> {
        let rt = self.runtime.clone();
        #[allow(unused_mut)] // changed only by the test hook
        let mut loaded = tokio::task::spawn_blocking(move || rt.load(&bytes))
            .await
            .map_err(|e| WharfError::internal(format!("component load panicked: {e}")))??;
        #[cfg(test)]
        {
            loaded.pre.fail_instantiations = self.fail_instantiations.clone();
        }
        Ok(loaded)
    }

    /// Test hook: the next `n` worker instantiations fail as an exhausted instance pool does
    /// (the deploy-time check is not affected).
    #[cfg(test)]
    pub(crate) fn fail_instantiations(&self, n: u32) {
        self.fail_instantiations
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn instance_config(&self, m: &Manifest, version: u64) -> Arc<InstanceConfig> {
        let mut readable: Vec<String> = m.subscription.iter().map(|s| s.topic.clone()).collect();
        readable.extend(m.permissions.publish.iter().cloned());
        Arc::new(InstanceConfig {
            plugin: m.name.clone(),
            version,
            group: m.consumer.group.clone(),
            publish: m.permissions.publish.clone(),
            readable,
            memory_bytes: m.limits.memory_mib as usize * 1024 * 1024,
            timeout: Duration::from_millis(m.consumer.consume_timeout_ms),
            api: Arc::new(BrokerSender {
                broker: self.broker.clone(),
                handle: self.handle.clone(),
            }),
        })
    }

    /// Instantiates once with the manifest's limits, so a component whose start-up traps or
    /// needs more than `memory_mib` is refused at deploy instead of failing every message.
    async fn check_instantiates(&self, m: &Manifest, loaded: &Loaded) -> Result<()> {
        let config = self.instance_config(m, 0);
        let (engine, pre) = (self.runtime.engine().clone(), loaded.pre.clone());
        let memory_mib = m.limits.memory_mib;
        tokio::task::spawn_blocking(move || runtime::Instance::new(&engine, &pre, config).map(drop))
            .await
            .map_err(|e| WharfError::internal(format!("instantiation check panicked: {e}")))?
            .map_err(|e| {
                WharfError::bad_request(format!(
                    "the component does not start within its limits ({}); check [limits] memory_mib = {memory_mib} and the plugin's start-up code",
                    e.message
                ))
            })
    }

    async fn start_workers(
        &self,
        m: &Manifest,
        version: u64,
        loaded: &Loaded,
        stats: Arc<PluginStats>,
    ) -> Result<Workers> {
        let config = self.instance_config(m, version);
        let count = match m.consumer.model {
            // Every instance of a broadcasting group gets every message: one per host.
            ConsumeModel::Broadcasting => 1,
            ConsumeModel::Clustering => m.consumer.concurrency as usize,
        };
        let spec = WorkerSpec {
            broker: self.broker.clone(),
            handle: self.handle.clone(),
            handler: worker::Handler::Wasm {
                engine: self.runtime.engine().clone(),
                pre: loaded.pre.clone(),
            },
            config,
            subscriptions: m.subscriptions(),
            batch_max: m.consumer.batch_max as usize,
            stats,
        };
        Workers::start(spec, count).await
    }

    /// Every plugin with its current version and counters (JSON for `GET /v1/plugins`).
    pub fn list(&self) -> serde_json::Value {
        let slots = self.slots.lock();
        serde_json::Value::Array(slots.values().map(summary).collect())
    }

    /// One plugin's status: versions, instances, counters (`GET /v1/plugins/{name}`).
    pub fn status(&self, name: &str) -> Result<serde_json::Value> {
        let slots = self.slots.lock();
        let slot = slots.get(name).ok_or_else(|| not_deployed(name))?;
        let mut v = summary(slot);
        let m = &slot.manifest;
        v["model"] = serde_json::json!(m.consumer.model);
        v["subscriptions"] = serde_json::json!(m.subscriptions());
        v["publish"] = serde_json::json!(m.permissions.publish);
        v["http"] = serde_json::json!(m.http);
        v["limits"] = serde_json::json!({
            "memory_mib": m.limits.memory_mib,
            "consume_timeout_ms": m.consumer.consume_timeout_ms,
            "concurrency": m.consumer.concurrency,
            "batch_max": m.consumer.batch_max,
            "max_reconsume_times": m.consumer.max_reconsume_times,
        });
        v["instance_ids"] = serde_json::json!(slot.workers.as_ref().map(|w| w.ids().to_vec()));
        v["versions"] = serde_json::json!(slot.record.versions);
        v["rollback_to"] = serde_json::json!(slot.record.history.last());
        v["artifact"] = serde_json::json!(slot.loaded.as_ref().map(|l| serde_json::json!({
            "sha256": l.hash,
            "cache_hit": l.cache_hit,
            "load_ms": l.took.as_secs_f64() * 1e3,
        })));
        Ok(v)
    }

    /// Handles `POST /t/<path>`: `None` when no route matches, else the send result.
    /// `headers` are all request headers (lower-case names); the route picks which become properties.
    /// The caller needs the right to publish to the route's topic, as for any send.
    pub async fn trigger(
        &self,
        path: &str,
        headers: &[(String, String)],
        body: Bytes,
        who: &crate::http::auth::Principal,
    ) -> Option<Result<SendReceipt>> {
        let (topic, message) = self.routes.message(path, headers, body)?;
        if let Err(e) = who.check_publish(&topic) {
            return Some(Err(e));
        }
        let sent = self.broker.send(&topic, vec![message]).await;
        Some(sent.and_then(|mut r| {
            r.pop()
                .ok_or_else(|| WharfError::internal("send returned no receipt"))
        }))
    }

    /// Appends per-plugin metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let slots = self.slots.lock();
        if slots.is_empty() {
            return;
        }
        for (i, (counter, help, _)) in PluginStats::default().counters().into_iter().enumerate() {
            let metric = format!("wharf_plugin_{counter}_total");
            family(out, &slots, &metric, "counter", help, |s| {
                s.stats.counters()[i].2
            });
        }
        family(
            out,
            &slots,
            "wharf_plugin_instances",
            "gauge",
            "Running instances (worker threads)",
            |s| s.workers.as_ref().map_or(0, |w| w.live() as u64),
        );
        family(
            out,
            &slots,
            "wharf_plugin_version",
            "gauge",
            "Running version number",
            |s| s.record.current,
        );
        for (i, (name, slot)) in slots.iter().enumerate() {
            let mut one = String::new();
            slot.stats.duration_us.snapshot().render(
                &mut one,
                "wharf_plugin_call_duration_seconds",
                "Duration of one plugin call",
                &format!("plugin=\"{name}\""),
            );
            // HELP and TYPE may appear once per metric family.
            for line in one.lines().filter(|l| i == 0 || !l.starts_with('#')) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }

    /// Stops every plugin, handing in-flight messages back (graceful shutdown).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let _ops = self.ops.lock().await;
        let running: Vec<(String, Workers)> = self
            .slots
            .lock()
            .iter_mut()
            .filter_map(|(n, s)| s.workers.take().map(|w| (n.clone(), w)))
            .collect();
        let mut stopping = tokio::task::JoinSet::new();
        for (name, w) in running {
            stopping.spawn(async move {
                w.stop().await;
                name
            });
        }
        while let Some(done) = stopping.join_next().await {
            if let Ok(name) = done {
                info!(plugin = %name, "plugin stopped");
            }
        }
    }
}

/// Pause before a failed sync tries again (the store is unreachable).
const SYNC_RETRY: Duration = Duration::from_millis(500);

/// Follows the store's plugin records until shutdown (see [`PluginHost::sync`]).
fn spawn_sync(host: &Arc<PluginHost>, mut changes: watch::Receiver<u64>) {
    let weak = Arc::downgrade(host);
    let stop = host.stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            let Some(host) = weak.upgrade() else { return };
            if let Err(e) = host.sync().await {
                warn!(error = %e, "cannot apply plugin changes from the store; will retry");
                changes.mark_changed();
                drop(host);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(SYNC_RETRY) => {}
                }
            }
        }
    });
}

/// Writes one Prometheus metric family with a sample per plugin.
fn family(
    out: &mut String,
    slots: &BTreeMap<String, Slot>,
    metric: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&Slot) -> u64,
) {
    let _ = writeln!(out, "# HELP {metric} {help}");
    let _ = writeln!(out, "# TYPE {metric} {kind}");
    for (name, slot) in slots {
        let _ = writeln!(out, "{metric}{{plugin=\"{name}\"}} {}", value(slot));
    }
}

fn not_deployed(name: &str) -> WharfError {
    WharfError::not_found(format!(
        "plugin '{name}' is not deployed; see `wharf plugin list`, deploy with `wharf plugin deploy MANIFEST`"
    ))
}

fn summary(slot: &Slot) -> serde_json::Value {
    let s = &slot.stats;
    let d = s.duration_us.snapshot();
    let host_error = s.host_error();
    let status = match (&slot.workers, &slot.problem) {
        // Every worker waits for an instance the host cannot create.
        (Some(w), _)
            if host_error.is_some()
                && s.paused_workers.load(std::sync::atomic::Ordering::SeqCst) >= w.live() =>
        {
            "paused".to_string()
        }
        (Some(_), _) => "running".to_string(),
        (None, Some(p)) => format!("failed: {p}"),
        (None, None) => "stopped".to_string(),
    };
    serde_json::json!({
        "name": slot.record.name,
        "status": status,
        "version": slot.record.current,
        "manifest_version": slot.manifest.version,
        "group": slot.manifest.consumer.group,
        "instances": slot.workers.as_ref().map_or(0, |w| w.live()),
        "counters": s
            .counters()
            .iter()
            .map(|(name, _, v)| (name.to_string(), serde_json::json!(v)))
            .collect::<serde_json::Map<_, _>>(),
        "duration_us": {"p50": d.quantile(0.5), "p99": d.quantile(0.99), "count": d.count},
        // A host-side failure going on now (null when none): delivery pauses, retries are kept.
        "host_error": host_error.map(|e| serde_json::json!({
            "message": e.message,
            "since_ms": e.since_ms,
            "last_ms": e.last_ms,
            "paused_workers": s.paused_workers.load(std::sync::atomic::Ordering::SeqCst),
        })),
    })
}

#[cfg(test)]
mod host_tests;
#[cfg(test)]
mod runtime_tests;
#[cfg(test)]
pub(crate) mod testkit;
