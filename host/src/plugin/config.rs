//! `[plugins]` config section, apart from the runtime so the config parser builds on its own.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
