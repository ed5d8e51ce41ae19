//! `wharf.toml`: the typed host configuration, its defaults, and errors that point at the file.
//!
//! Parsing (serde, `deny_unknown_fields` everywhere) and validation (cross-field checks) are two
//! steps; both report the file, line and column of the offending key so a typo is found at once.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::broker::BrokerConfig;
use crate::plugin::PluginsConfig;
use crate::store::StoreConfig;

/// Where `wharf serve` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/wharf.toml";

/// The whole host configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[http]`
    pub http: HttpConfig,
    /// `[mqtt]`
    pub mqtt: MqttConfig,
    /// `[remoting]`
    pub remoting: RemotingConfig,
    /// `[store]`
    pub store: StoreConfig,
    /// `[broker]`
    pub broker: BrokerConfig,
    /// `[auth]`
    pub auth: AuthConfig,
    /// `[plugins]`
    pub plugins: PluginsConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[testing]`
    pub testing: TestingConfig,
    /// The file this config came from (`None` = built-in defaults); not a config key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[http]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// `listen = "127.0.0.1:8080"` (port 0 picks a free port)
    pub listen: String,
    /// `max_body_bytes = 8388608`: largest API request body (a send batch, base64 included).
    pub max_body_bytes: usize,
    /// `max_upload_bytes = 67108864`: largest plugin deploy (manifest + component).
    pub max_upload_bytes: usize,
    /// `max_wait_ms = 30000`: longest long poll a receive may ask for.
    pub max_wait_ms: u64,
    /// `shutdown_grace_ms = 10000`: how long in-flight requests may run after SIGINT/SIGTERM.
    pub shutdown_grace_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 8 * 1024 * 1024,
            max_upload_bytes: 64 * 1024 * 1024,
            max_wait_ms: 30_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

/// `[mqtt]` section: where the MQTT listener binds (the listener itself is a later issue).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// `listen = "127.0.0.1:1883"`; `""` disables it.
    pub listen: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: "127.0.0.1:1883".into(),
        }
    }
}

/// `[remoting]` section: where the RocketMQ remoting listener binds (a later issue).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemotingConfig {
    /// `listen = "127.0.0.1:9876"`; `""` disables it.
    pub listen: String,
}

impl Default for RemotingConfig {
    fn default() -> Self {
        RemotingConfig {
            listen: "127.0.0.1:9876".into(),
        }
    }
}

/// `[auth]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `[[auth.keys]]`: no keys = the host runs open.
    pub keys: Vec<AccessKey>,
    /// `metrics_open = false`: serve `/metrics` without a signature (for Prometheus scrapers).
    pub metrics_open: bool,
}

/// One `[[auth.keys]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKey {
    /// `access_key = "AK..."`
    pub access_key: String,
    /// `secret_key = "..."`
    pub secret_key: String,
    /// `allow_publish = ["Trade"]`: topics this key may send to; `"*"` = every topic.
    #[serde(default)]
    pub allow_publish: Vec<String>,
    /// `allow_subscribe = ["Trade", "GID_x"]`: topics AND consumer groups this key may read
    /// (receive, ack, query, status, dead letters); `"*"` = all.
    #[serde(default)]
    pub allow_subscribe: Vec<String>,
    /// `admin = true`: may create/delete topics and groups and deploy plugins.
    #[serde(default = "default_true")]
    pub admin: bool,
}

fn default_true() -> bool {
    true
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event.
    Json,
}

/// `[log]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `format = "human"` or `"json"`.
    pub format: LogFormat,
    /// `filter = "info"`: RUST_LOG-style directives; the `RUST_LOG` variable wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            filter: "info".into(),
        }
    }
}

/// `[testing]` section: knobs for end-to-end tests only.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TestingConfig {
    /// `clock_offset_ms = 0`: shifts the host clock, so multi-day rules can be tested at once.
    pub clock_offset_ms: i64,
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--http`
    pub http: Option<String>,
    /// `--mqtt`
    pub mqtt: Option<String>,
    /// `--remoting`
    pub remoting: Option<String>,
    /// `--log-format`
    pub log_format: Option<LogFormat>,
}

/// A config file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `<flags>` for a bad flag value).
    pub file: String,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config = Config::parse_unchecked(text, file)?;
        config.check(Some((text, file)))?;
        Ok(config)
    }

    /// Parses config text without the cross-field checks (flags may still fix a value).
    fn parse_unchecked(text: &str, file: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_string(),
            position: e.span().map(|s| line_col(text, s.start)),
            message: e.message().trim().to_string(),
        })
    }

    /// Reads a config file's text.
    fn read(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            position: None,
            message: format!("cannot read the config file: {e}"),
        })
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&Config::read(path)?, &path.display().to_string())
    }

    /// The config `wharf serve` uses: `--config FILE` if given (must exist), else
    /// `config/wharf.toml` if present, else defaults; then flags override, then validation.
    pub fn resolve(explicit: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let path = match explicit {
            Some(p) => Some(p.to_path_buf()),
            None if Path::new(DEFAULT_CONFIG_PATH).is_file() => {
                Some(PathBuf::from(DEFAULT_CONFIG_PATH))
            }
            None => None,
        };
        let source = match &path {
            Some(p) => Some((Config::read(p)?, p.display().to_string())),
            None => None,
        };
        let mut config = match &source {
            Some((text, file)) => Config::parse_unchecked(text, file)?,
            None => Config::default(),
        };
        config.apply(overrides);
        config.check(source.as_ref().map(|(t, f)| (t.as_str(), f.as_str())))?;
        config.source = path;
        Ok(config)
    }

    /// Validates, pointing at the key in `source` when it is written there.
    fn check(&self, source: Option<(&str, &str)>) -> Result<(), ConfigError> {
        self.validate().map_err(|(key, message)| {
            let position = source.and_then(|(text, _)| find_key(text, &key));
            ConfigError {
                file: match (position, source) {
                    (Some(_), Some((_, file))) => file.to_string(),
                    _ => "<command line or defaults>".into(),
                },
                position,
                message,
            }
        })
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(d) = &o.data_dir {
            self.store.data_dir = d.clone();
        }
        if let Some(a) = &o.http {
            self.http.listen = a.clone();
        }
        if let Some(a) = &o.mqtt {
            self.mqtt.listen = a.clone();
        }
        if let Some(a) = &o.remoting {
            self.remoting.listen = a.clone();
        }
        if let Some(f) = o.log_format {
            self.log.format = f;
        }
    }

    /// Cross-field checks; the error names the dotted key at fault.
    fn validate(&self) -> Result<(), (String, String)> {
        let addr = |key: &str, v: &str, optional: bool| -> Result<(), (String, String)> {
            if optional && v.is_empty() {
                return Ok(());
            }
            v.parse::<SocketAddr>().map(|_| ()).map_err(|_| {
                (
                    key.to_string(),
                    format!("{key} = \"{v}\" is not an address; write IP:PORT such as \"127.0.0.1:8080\""),
                )
            })
        };
        addr("http.listen", &self.http.listen, false)?;
        addr("mqtt.listen", &self.mqtt.listen, true)?;
        addr("remoting.listen", &self.remoting.listen, true)?;
        if self.http.max_body_bytes < 1024 {
            return Err((
                "http.max_body_bytes".into(),
                "http.max_body_bytes must be at least 1024".into(),
            ));
        }
        if self.broker.max_body_bytes == 0
            || self.broker.max_body_bytes > crate::broker::config::MAX_MESSAGE_BYTES
        {
            return Err((
                "broker.max_body_bytes".into(),
                "broker.max_body_bytes must be 1..=4194304 (4 MiB)".into(),
            ));
        }
        let b = &self.broker;
        if !(1..=crate::broker::resources::MAX_QUEUES).contains(&b.default_queues) {
            return Err((
                "broker.default_queues".into(),
                format!(
                    "broker.default_queues must be 1..={}",
                    crate::broker::resources::MAX_QUEUES
                ),
            ));
        }
        // The spec fixes these ceilings; the config may only tighten them.
        if !(1..=32_767).contains(&b.max_properties_bytes) {
            return Err((
                "broker.max_properties_bytes".into(),
                "broker.max_properties_bytes must be 1..=32767".into(),
            ));
        }
        if !(1..=40 * 24 * 3_600_000).contains(&b.max_delay_ms) {
            return Err((
                "broker.max_delay_ms".into(),
                "broker.max_delay_ms must be 1..=3456000000 (40 days)".into(),
            ));
        }
        if !(self.broker.retry_delay_scale > 0.0 && self.broker.retry_delay_scale.is_finite()) {
            return Err((
                "broker.retry_delay_scale".into(),
                "broker.retry_delay_scale must be a positive number".into(),
            ));
        }
        if self.store.backend == crate::store::Backend::Postgres
            && self.store.postgres.url.is_empty()
        {
            return Err((
                "store.postgres.url".into(),
                "store.backend = \"postgres\" needs [store.postgres] url".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for k in &self.auth.keys {
            if k.access_key.is_empty() || k.secret_key.is_empty() {
                return Err((
                    "access_key".into(),
                    "every [[auth.keys]] entry needs a non-empty access_key and secret_key".into(),
                ));
            }
            if !seen.insert(k.access_key.as_str()) {
                return Err((
                    "access_key".into(),
                    format!(
                        "access key '{}' is listed twice in [[auth.keys]]",
                        k.access_key
                    ),
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.filter).map_err(|e| {
            (
                "log.filter".into(),
                format!(
                    "log.filter = \"{}\" is not a valid filter: {e}",
                    self.log.filter
                ),
            )
        })?;
        Ok(())
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// Best-effort position of a dotted key's last part (`http.listen` → the `listen =` line after `[http]`).
fn find_key(text: &str, dotted: &str) -> Option<(usize, usize)> {
    let (section, key) = match dotted.rsplit_once('.') {
        Some((s, k)) => (Some(s), k),
        None => (None, dotted),
    };
    let mut in_section = section.is_none();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with('[') {
            let name = t.trim_matches(|c: char| c == '[' || c == ']' || c.is_whitespace());
            let name = name.split(']').next().unwrap_or("");
            in_section = section.is_none_or(|s| s == name);
        } else if in_section {
            let lhs = t.split('=').next().unwrap_or("").trim();
            if t.contains('=') && lhs == key {
                return Some(line_col(text, offset + (line.len() - t.len())));
            }
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", "x.toml").unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:8080");
        assert_eq!(c.http.max_body_bytes, 8 * 1024 * 1024);
        assert_eq!(c.store.data_dir, PathBuf::from("./data"));
        assert_eq!(c.broker.default_queues, 8);
        assert!(c.auth.keys.is_empty());
        assert_eq!(c.log.format, LogFormat::Human);
        assert_eq!(c.testing.clock_offset_ms, 0);
    }

    #[test]
    fn shipped_config_parses_and_equals_defaults() {
        let text = include_str!("../../config/wharf.toml");
        let c = Config::parse(text, "config/wharf.toml").unwrap();
        let d = Config::default();
        // Serialising both proves every documented default matches the code.
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::to_value(&d).unwrap(),
            "config/wharf.toml and Config::default() disagree"
        );
    }

    /// Every key the code knows, as dotted paths (arrays of tables count as one key).
    fn key_paths(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, child) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if child.is_table() {
                    key_paths(child, &path, out);
                } else {
                    out.push(path);
                }
            }
        }
    }

    #[test]
    fn shipped_config_lists_every_key() {
        let text = include_str!("../../config/wharf.toml");
        let shipped: toml::Value = toml::from_str(text).unwrap();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let (mut want, mut have) = (Vec::new(), Vec::new());
        key_paths(&defaults, "", &mut want);
        key_paths(&shipped, "", &mut have);
        want.sort();
        have.sort();
        assert_eq!(
            have, want,
            "config/wharf.toml must list every key with its default"
        );
    }

    #[test]
    fn unknown_key_points_at_line_and_column() {
        let text = "[http]\nlisten = \"127.0.0.1:1\"\n\n[store]\n  segmnt_bytes = 5\n";
        let e = Config::parse(text, "w.toml").unwrap_err();
        assert_eq!(e.file, "w.toml");
        assert_eq!(e.position, Some((5, 3)), "{e}");
        assert!(e.message.contains("segmnt_bytes"), "{e}");
        assert!(e.to_string().starts_with("w.toml:5:3: "), "{e}");
    }

    #[test]
    fn unknown_section_and_wrong_type_are_errors() {
        let e = Config::parse("[htp]\nlisten = \"x\"\n", "w.toml").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(1), "{e}");
        let e = Config::parse("[broker]\ndefault_queues = \"eight\"\n", "w.toml").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
        assert!(e.message.contains("invalid type"), "{e}");
    }

    #[test]
    fn validation_errors_point_at_the_key() {
        let e = Config::parse("[http]\n\nlisten = \"nowhere\"\n", "w.toml").unwrap_err();
        assert_eq!(e.position, Some((3, 1)), "{e}");
        assert!(e.message.contains("IP:PORT"), "{e}");
        let text = "[[auth.keys]]\naccess_key = \"a\"\nsecret_key = \"\"\n";
        assert!(Config::parse(text, "w.toml").is_err());
    }

    #[test]
    fn broker_limits_cannot_pass_the_spec_ceilings() {
        for (text, key) in [
            ("[broker]\ndefault_queues = 0\n", "default_queues"),
            ("[broker]\ndefault_queues = 257\n", "default_queues"),
            (
                "[broker]\nmax_properties_bytes = 32768\n",
                "max_properties_bytes",
            ),
            ("[broker]\nmax_delay_ms = 3456000001\n", "max_delay_ms"),
        ] {
            let e = Config::parse(text, "w.toml").unwrap_err();
            assert!(e.message.contains(key), "{text} -> {e}");
        }
        let ok =
            "[broker]\ndefault_queues = 256\nmax_properties_bytes = 1024\nmax_delay_ms = 60000\n";
        assert!(Config::parse(ok, "w.toml").is_ok());
    }

    #[test]
    fn auth_keys_parse_with_defaults() {
        let text = "[[auth.keys]]\naccess_key = \"AK\"\nsecret_key = \"SK\"\nallow_publish = [\"Trade\"]\n";
        let c = Config::parse(text, "w.toml").unwrap();
        assert_eq!(c.auth.keys.len(), 1);
        assert_eq!(c.auth.keys[0].allow_publish, vec!["Trade"]);
        assert!(c.auth.keys[0].allow_subscribe.is_empty());
        assert!(c.auth.keys[0].admin);
    }

    #[test]
    fn flags_override_the_file() {
        let mut c = Config::parse(
            "[http]\nlisten = \"127.0.0.1:1\"\n[store]\ndata_dir = \"/a\"\n[log]\nformat = \"human\"\n",
            "w.toml",
        )
        .unwrap();
        c.apply(&Overrides {
            data_dir: Some("/b".into()),
            http: Some("127.0.0.1:0".into()),
            mqtt: None,
            remoting: Some("127.0.0.1:9".into()),
            log_format: Some(LogFormat::Json),
        });
        assert_eq!(c.store.data_dir, PathBuf::from("/b"));
        assert_eq!(c.http.listen, "127.0.0.1:0");
        assert_eq!(c.mqtt.listen, "127.0.0.1:1883");
        assert_eq!(c.remoting.listen, "127.0.0.1:9");
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn a_flag_can_fix_a_bad_file_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(&path, "[http]\nlisten = \"nowhere\"\n").unwrap();
        let e = Config::resolve(Some(&path), &Overrides::default()).unwrap_err();
        assert_eq!(e.position, Some((2, 1)), "{e}");
        let o = Overrides {
            http: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        };
        assert_eq!(
            Config::resolve(Some(&path), &o).unwrap().http.listen,
            "127.0.0.1:0"
        );
        let o = Overrides {
            http: Some("bad flag".into()),
            ..Overrides::default()
        };
        let e = Config::resolve(None, &o).unwrap_err();
        assert!(e.message.contains("bad flag"), "{e}");
    }
}
