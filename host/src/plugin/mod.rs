//! Plugin runtime: manifests, the wasmtime host, the deploy registry, HTTP triggers.
//!
//! SKELETON: signatures are the contract the HTTP front end and `serve` call; the plugin work
//! fills in the bodies.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::broker::{Broker, SendReceipt};
use crate::error::{Result, WharfError};

/// `[plugins]` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// `dir = "./plugins"`: every `*/plugin.toml` under it is deployed at start (missing dir = none).
    pub dir: PathBuf,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: PathBuf::from("./plugins"),
        }
    }
}

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

/// The plugin runtime.
pub struct PluginHost {
    #[allow(dead_code)]
    broker: Arc<Broker>,
}

impl PluginHost {
    /// Starts the runtime: loads deployed versions from the store, deploys `[plugins] dir`.
    pub async fn start(
        broker: Arc<Broker>,
        config: PluginsConfig,
        data_dir: PathBuf,
    ) -> Result<Arc<PluginHost>> {
        let _ = (config, data_dir);
        Ok(Arc::new(PluginHost { broker }))
    }

    /// Deploys a new version from manifest text and component bytes.
    pub async fn deploy(&self, manifest_toml: &str, component: Bytes) -> Result<DeployResult> {
        let _ = (manifest_toml, component);
        Err(WharfError::internal("plugin runtime not built yet"))
    }

    /// Every plugin with its current version and counters (JSON for `GET /v1/plugins`).
    pub fn list(&self) -> serde_json::Value {
        serde_json::json!([])
    }

    /// One plugin's status: versions, instances, counters (`GET /v1/plugins/{name}`).
    pub fn status(&self, name: &str) -> Result<serde_json::Value> {
        Err(WharfError::not_found(format!(
            "plugin '{name}' is not deployed"
        )))
    }

    /// Returns to the previous version.
    pub async fn rollback(&self, name: &str) -> Result<DeployResult> {
        Err(WharfError::not_found(format!(
            "plugin '{name}' is not deployed"
        )))
    }

    /// Stops and removes a plugin.
    pub async fn remove(&self, name: &str) -> Result<DeployResult> {
        Err(WharfError::not_found(format!(
            "plugin '{name}' is not deployed"
        )))
    }

    /// Handles `POST /t/<path>`: `None` when no route matches, else the send result.
    /// `headers` are all request headers (lower-case names); the route picks which become properties.
    pub async fn trigger(
        &self,
        path: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Option<Result<SendReceipt>> {
        let _ = (path, headers, body);
        None
    }

    /// Appends per-plugin metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let _ = out;
    }

    /// Stops every plugin, handing in-flight messages back (graceful shutdown).
    pub async fn shutdown(&self) {}
}
