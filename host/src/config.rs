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
    /// `max_connections = 10000`: open connections at once; past it new ones wait to be accepted.
    pub max_connections: usize,
    /// `header_read_timeout_ms = 30000`: how long a client may take to send a request's headers
    /// (from the first byte, or from the end of the previous request on a keep-alive connection;
    /// the TLS handshake counts too). Past it the connection is closed.
    pub header_read_timeout_ms: u64,
    /// `body_read_timeout_ms = 60000`: how long a client may take to send a whole request body,
    /// from the end of its headers. Past it the request fails with 408 and the connection closes.
    pub body_read_timeout_ms: u64,
    /// `max_long_polls = 1000`: receives waiting (`wait_ms` > 0) at once; more get SYSTEM_BUSY.
    pub max_long_polls: usize,
    /// `tls_cert = ""`: PEM certificate chain; with `tls_key`, the API is served over HTTPS only.
    pub tls_cert: String,
    /// `tls_key = ""`: PEM private key (PKCS#8, PKCS#1 or SEC1) for `tls_cert`.
    pub tls_key: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 8 * 1024 * 1024,
            max_upload_bytes: 64 * 1024 * 1024,
            max_wait_ms: 30_000,
            shutdown_grace_ms: 10_000,
            max_connections: 10_000,
            header_read_timeout_ms: 30_000,
            body_read_timeout_ms: 60_000,
            max_long_polls: 1_000,
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

impl HttpConfig {
    /// True when `tls_cert` and `tls_key` are set: the API speaks HTTPS only.
    pub fn tls(&self) -> bool {
        !self.tls_cert.is_empty() && !self.tls_key.is_empty()
    }
}

/// `[mqtt]` section: the MQTT 3.1.1 gateway's listeners and limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// `listen = "127.0.0.1:1883"`: plain TCP; `""` disables it.
    pub listen: String,
    /// `tls_listen = ""`: MQTT over TLS (8883 by convention); needs `tls_cert` and `tls_key`.
    pub tls_listen: String,
    /// `ws_listen = ""`: MQTT over WebSocket (subprotocol `mqtt`).
    pub ws_listen: String,
    /// `wss_listen = ""`: MQTT over secure WebSocket; needs `tls_cert` and `tls_key`.
    pub wss_listen: String,
    /// `ws_path = "/mqtt"`: the HTTP path WebSocket clients connect to.
    pub ws_path: String,
    /// `tls_cert = ""`: PEM certificate chain for `tls_listen` and `wss_listen`.
    pub tls_cert: String,
    /// `tls_key = ""`: PEM private key for `tls_listen` and `wss_listen`.
    pub tls_key: String,
    /// `mode = "strict" | "open"`; absent: strict when `[[auth.keys]]` exist, else open.
    pub mode: Option<MqttMode>,
    /// `max_subscriptions = 30`: topic filters one client may hold; more get SUBACK 0x80.
    pub max_subscriptions: usize,
    /// `deny_subscribe = []`: filters no client may subscribe to (SUBACK 0x80); a wider filter
    /// is granted but never delivers their topics.
    pub deny_subscribe: Vec<String>,
    /// `max_packet_bytes = 4259840`: largest packet accepted; a larger one closes the connection.
    pub max_packet_bytes: usize,
    /// `connect_timeout_ms = 10000`: a connection that sends no CONNECT in time is closed.
    pub connect_timeout_ms: u64,
    /// `max_inflight = 64`: unacknowledged QoS 1/2 messages to one client at once.
    pub max_inflight: usize,
    /// `max_queued = 100000`: messages one client may be behind beyond the in-flight window (an
    /// eighth of them, at most 10,000, wait in memory; the rest is read back from the store as it
    /// catches up); past it QoS 0 messages are dropped (counted) and a QoS 1/2 message
    /// disconnects the client.
    pub max_queued: usize,
    /// `max_connections = 100000`: open MQTT connections at once per listener.
    pub max_connections: usize,
    /// `session_flush_ms = 200`: how often changed sessions of clean-session=false clients are
    /// written to the store (on top of every SUBSCRIBE, UNSUBSCRIBE and disconnect).
    pub session_flush_ms: u64,
}

/// How the MQTT gateway admits clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttMode {
    /// The spec's rules: `GroupID@@@DeviceID`, signed passwords, permissions.
    Strict,
    /// A plain MQTT broker: any client id, anonymous login.
    Open,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: "127.0.0.1:1883".into(),
            tls_listen: String::new(),
            ws_listen: String::new(),
            wss_listen: String::new(),
            ws_path: "/mqtt".into(),
            tls_cert: String::new(),
            tls_key: String::new(),
            mode: None,
            max_subscriptions: 30,
            deny_subscribe: Vec::new(),
            max_packet_bytes: 4 * 1024 * 1024 + 64 * 1024,
            connect_timeout_ms: 10_000,
            max_inflight: 64,
            max_queued: 100_000,
            max_connections: 100_000,
            session_flush_ms: 200,
        }
    }
}

/// `[remoting]` section: the RocketMQ remoting listener (name server + broker on one port).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemotingConfig {
    /// `listen = "0.0.0.0:9876"`; `""` disables it.
    pub listen: String,
    /// `advertised_addr = ""`: the `IPv4:PORT` routes and message ids name; empty = the address
    /// each client connected to (right unless clients reach the host through NAT or a proxy).
    pub advertised_addr: String,
    /// `auto_create_groups = "auto"`: create a consumer group on its first heartbeat (like
    /// RocketMQ's autoCreateSubscriptionGroup). `"auto"` = on when the host runs open (no
    /// `[[auth.keys]]`), off when keys exist; `true` / `false` force it.
    pub auto_create_groups: AutoCreate,
    /// `max_connections = 10000`: connections served at once; more wait in the accept backlog.
    pub max_connections: usize,
}

impl Default for RemotingConfig {
    fn default() -> Self {
        RemotingConfig {
            listen: "0.0.0.0:9876".into(),
            advertised_addr: String::new(),
            auto_create_groups: AutoCreate::Auto,
            max_connections: 10_000,
        }
    }
}

/// `[remoting] auto_create_groups`: `"auto"`, `true` or `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoCreate {
    /// On in open mode, off when access keys exist.
    #[default]
    Auto,
    /// Always (`true`).
    On,
    /// Never (`false`).
    Off,
}

impl AutoCreate {
    /// Whether groups are created, given whether the host runs open.
    pub fn enabled(self, open: bool) -> bool {
        match self {
            AutoCreate::Auto => open,
            AutoCreate::On => true,
            AutoCreate::Off => false,
        }
    }
}

impl Serialize for AutoCreate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AutoCreate::Auto => s.serialize_str("auto"),
            AutoCreate::On => s.serialize_bool(true),
            AutoCreate::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for AutoCreate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = AutoCreate;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\", true or false")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<AutoCreate, E> {
                Ok(if v { AutoCreate::On } else { AutoCreate::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AutoCreate, E> {
                match v {
                    "auto" => Ok(AutoCreate::Auto),
                    other => Err(E::custom(format!(
                        "auto_create_groups = \"{other}\" is not allowed: use \"auto\", true or false"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
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
#[derive(Clone, Serialize, Deserialize)]
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
    /// `admin = false`: may create/delete topics and groups and deploy plugins. Off unless
    /// written, so a key has only the rights its entry names.
    #[serde(default)]
    pub admin: bool,
}

/// Never prints the secret key: configs are logged and shown in errors.
impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessKey")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("allow_publish", &self.allow_publish)
            .field("allow_subscribe", &self.allow_subscribe)
            .field("admin", &self.admin)
            .finish()
    }
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
        config.check(Some((text, file)), &Overrides::default())?;
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
        config.check(
            source.as_ref().map(|(t, f)| (t.as_str(), f.as_str())),
            overrides,
        )?;
        config.source = path;
        Ok(config)
    }

    /// Validates, pointing at the key in `source` (text, file name) when it is written there;
    /// a value a flag set is reported as the flag's.
    fn check(
        &self,
        source: Option<(&str, &str)>,
        overrides: &Overrides,
    ) -> Result<(), ConfigError> {
        let Err(problem) = self.validate() else {
            return Ok(());
        };
        if let Some(flag) = overrides.flag_for(&problem.path) {
            return Err(ConfigError {
                file: "<command line>".into(),
                position: None,
                message: format!("{} (set by {flag})", problem.message),
            });
        }
        let position = source.and_then(|(text, _)| locate(text, &problem.path));
        Err(ConfigError {
            file: match (position, source) {
                (Some(_), Some((_, file))) => file.to_string(),
                _ => "<defaults>".into(),
            },
            position,
            message: problem.message,
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

    /// Range and cross-field checks of every section; the problem names the key at fault.
    fn validate(&self) -> Result<(), Problem> {
        use Part::{Index, Key};
        let addr = |section: &'static str, v: &str, optional: bool| -> Result<(), Problem> {
            if (optional && v.is_empty()) || v.parse::<SocketAddr>().is_ok() {
                return Ok(());
            }
            Err(Problem::at(
                &[Key(section), Key("listen")],
                format!(
                    "{section}.listen = \"{v}\" is not an address; write IP:PORT such as \"127.0.0.1:8080\"{}",
                    if optional {
                        " (or \"\" to turn it off)"
                    } else {
                        ""
                    }
                ),
            ))
        };
        addr("http", &self.http.listen, false)?;
        if self.http.tls_cert.is_empty() != self.http.tls_key.is_empty() {
            let (set, missing) = if self.http.tls_cert.is_empty() {
                ("tls_key", "tls_cert")
            } else {
                ("tls_cert", "tls_key")
            };
            return Err(Problem::at(
                &[Key("http"), Key(set)],
                format!(
                    "http.{set} is set but http.{missing} is not; HTTPS needs both (PEM file paths), \
                     or leave both \"\" for plain HTTP"
                ),
            ));
        }
        addr("mqtt", &self.mqtt.listen, true)?;
        for (key, v) in [
            ("tls_listen", &self.mqtt.tls_listen),
            ("ws_listen", &self.mqtt.ws_listen),
            ("wss_listen", &self.mqtt.wss_listen),
        ] {
            if !v.is_empty() && v.parse::<SocketAddr>().is_err() {
                return Err(Problem::at(
                    &[Key("mqtt"), Key(key)],
                    format!(
                        "mqtt.{key} = \"{v}\" is not an address; write IP:PORT such as \"0.0.0.0:8883\" (or \"\" to turn it off)"
                    ),
                ));
            }
        }
        let needs_tls = !self.mqtt.tls_listen.is_empty() || !self.mqtt.wss_listen.is_empty();
        if needs_tls && (self.mqtt.tls_cert.is_empty() || self.mqtt.tls_key.is_empty()) {
            return Err(Problem::at(
                &[
                    Key("mqtt"),
                    Key(if self.mqtt.tls_cert.is_empty() {
                        "tls_cert"
                    } else {
                        "tls_key"
                    }),
                ],
                "mqtt.tls_listen / mqtt.wss_listen need both tls_cert and tls_key (PEM file paths)"
                    .to_string(),
            ));
        }
        if !self.mqtt.ws_path.starts_with('/') {
            return Err(Problem::at(
                &[Key("mqtt"), Key("ws_path")],
                format!(
                    "mqtt.ws_path = \"{}\" must start with '/', such as \"/mqtt\"",
                    self.mqtt.ws_path
                ),
            ));
        }
        for (i, f) in self.mqtt.deny_subscribe.iter().enumerate() {
            if let Err(e) = crate::mqtt::topic::check_filter(f) {
                return Err(Problem::at(
                    &[Key("mqtt"), Key("deny_subscribe"), Index(i)],
                    e,
                ));
            }
        }
        addr("remoting", &self.remoting.listen, true)?;
        if !self.remoting.advertised_addr.is_empty()
            && !matches!(
                self.remoting.advertised_addr.parse::<SocketAddr>(),
                Ok(SocketAddr::V4(_))
            )
        {
            return Err(Problem::at(
                &[Key("remoting"), Key("advertised_addr")],
                format!(
                    "advertised_addr = \"{}\" is not IPv4:PORT; RocketMQ clients and message ids need an IPv4 address clients can reach, e.g. \"10.0.0.5:9876\"",
                    self.remoting.advertised_addr
                ),
            ));
        }

        let tree = toml::Value::try_from(self).map_err(|e| {
            Problem::at(
                &[],
                format!("the config cannot be checked ({e}); please report it"),
            )
        })?;
        for r in INT_RANGES {
            let value = tree
                .get(r.section)
                .and_then(|t| t.get(r.key))
                .and_then(toml::Value::as_integer);
            match value {
                Some(v) if (r.min..=r.max).contains(&v) => {}
                Some(v) => {
                    return Err(Problem::at(
                        &[Key(r.section), Key(r.key)],
                        format!(
                            "{}.{} = {v} is out of range; allowed {}..={}{}",
                            r.section, r.key, r.min, r.max, r.note
                        ),
                    ));
                }
                None => {
                    return Err(Problem::at(
                        &[Key(r.section), Key(r.key)],
                        format!(
                            "{}.{} has no integer value to check; please report it",
                            r.section, r.key
                        ),
                    ));
                }
            }
        }
        let scale = self.broker.retry_delay_scale;
        if !(scale > 0.0 && scale <= MAX_RETRY_DELAY_SCALE) {
            return Err(Problem::at(
                &[Key("broker"), Key("retry_delay_scale")],
                format!(
                    "broker.retry_delay_scale = {scale} is out of range; allowed more than 0 and at \
                     most {MAX_RETRY_DELAY_SCALE} (1.0 = the spec's schedule, 0.001 for tests)"
                ),
            ));
        }

        let store = &self.store;
        if store.data_dir.as_os_str().is_empty() {
            return Err(Problem::at(
                &[Key("store"), Key("data_dir")],
                "store.data_dir must name a directory, e.g. \"./data\"".into(),
            ));
        }
        let url = &store.postgres.url;
        if store.backend == crate::store::Backend::Postgres && url.is_empty() {
            return Err(Problem::at(
                &[Key("store"), Key("backend")],
                "store.backend = \"postgres\" needs [store.postgres] url = \"postgres://user:pass@host/db\"".into(),
            ));
        }
        if !url.is_empty() && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(Problem::at(
                &[Key("store"), Key("postgres"), Key("url")],
                format!(
                    "store.postgres.url = \"{}\" is not a PostgreSQL URL; write \
                     \"postgres://user:pass@host/db\" (or \"\" when backend = \"embedded\")",
                    crate::store::postgres::redacted_url(url)
                ),
            ));
        }
        let pg = &store.postgres;
        if !(2..=1000).contains(&pg.pool_size) {
            return Err(Problem::at(
                &[Key("store"), Key("postgres"), Key("pool_size")],
                format!(
                    "store.postgres.pool_size = {} is out of range; allowed 2..=1000 connections",
                    pg.pool_size
                ),
            ));
        }
        if pg.statement_timeout_ms > 3_600_000 {
            return Err(Problem::at(
                &[Key("store"), Key("postgres"), Key("statement_timeout_ms")],
                format!(
                    "store.postgres.statement_timeout_ms = {} is out of range; allowed 0..=3600000 \
                     (0 = no timeout)",
                    pg.statement_timeout_ms
                ),
            ));
        }
        if self.plugins.dir.as_os_str().is_empty() {
            return Err(Problem::at(
                &[Key("plugins"), Key("dir")],
                "plugins.dir must name a directory, e.g. \"./plugins\"".into(),
            ));
        }

        let mut seen = std::collections::HashMap::new();
        for (i, k) in self.auth.keys.iter().enumerate() {
            let entry = i + 1;
            let at = |key: &'static str| [Key("auth"), Key("keys"), Index(i), Key(key)];
            let ak = &k.access_key;
            if ak.is_empty()
                || ak.len() > 128
                || !ak.chars().all(|c| c.is_ascii_graphic() && c != ':')
            {
                return Err(Problem::at(
                    &at("access_key"),
                    format!(
                        "access_key = \"{ak}\" in [[auth.keys]] entry {entry} is not allowed; use 1-128 \
                         printable ASCII characters without spaces or ':' (the signature header \
                         separates key and signature with ':')"
                    ),
                ));
            }
            if let Some(first) = seen.insert(ak.as_str(), entry) {
                return Err(Problem::at(
                    &at("access_key"),
                    format!(
                        "access_key = \"{ak}\" in [[auth.keys]] entry {entry} is already used by entry \
                         {first}; every key needs its own access_key"
                    ),
                ));
            }
            if k.secret_key.is_empty() {
                return Err(Problem::at(
                    &at("secret_key"),
                    format!("secret_key in [[auth.keys]] entry {entry} ({ak}) must not be empty"),
                ));
            }
            for (list, names) in [
                ("allow_publish", &k.allow_publish),
                ("allow_subscribe", &k.allow_subscribe),
            ] {
                for (j, name) in names.iter().enumerate() {
                    if name != "*" && crate::model::validate_name("topic or group", name).is_err() {
                        return Err(Problem::at(
                            &[Key("auth"), Key("keys"), Index(i), Key(list), Index(j)],
                            format!(
                                "{list} in [[auth.keys]] entry {entry} ({ak}) lists \"{name}\", which \
                                 is not a topic or group name; use \"*\" or 3-64 characters from \
                                 letters, digits, '_', '-'"
                            ),
                        ));
                    }
                }
            }
        }

        tracing_subscriber::EnvFilter::try_new(&self.log.filter).map_err(|e| {
            Problem::at(
                &[Key("log"), Key("filter")],
                format!(
                    "log.filter = \"{}\" is not a valid filter: {e}; write e.g. \"info\" or \
                     \"info,wharf::http=debug\"",
                    self.log.filter
                ),
            )
        })?;
        Ok(())
    }
}

impl Overrides {
    /// The flag that set the value at `path`, if one did.
    fn flag_for(&self, path: &[Part]) -> Option<&'static str> {
        let set = |flag: &'static str, is_set: bool| is_set.then_some(flag);
        match path {
            [Part::Key("http"), Part::Key("listen")] => set("--http", self.http.is_some()),
            [Part::Key("mqtt"), Part::Key("listen")] => set("--mqtt", self.mqtt.is_some()),
            [Part::Key("remoting"), Part::Key("listen")] => {
                set("--remoting", self.remoting.is_some())
            }
            [Part::Key("store"), Part::Key("data_dir")] => {
                set("--data-dir", self.data_dir.is_some())
            }
            _ => None,
        }
    }
}

/// Largest `broker.retry_delay_scale` (1000 × the 2 h last step is 83 days; more is a typo).
const MAX_RETRY_DELAY_SCALE: f64 = 1000.0;

/// The allowed range of one integer key.
#[derive(Debug, Clone, Copy)]
struct IntRange {
    /// `[section]`
    section: &'static str,
    /// Key in the section.
    key: &'static str,
    /// Smallest allowed value.
    min: i64,
    /// Largest allowed value.
    max: i64,
    /// Appended to the error: why, or the range in words (starts with a space or ';', or is empty).
    note: &'static str,
}

const fn range(
    section: &'static str,
    key: &'static str,
    min: i64,
    max: i64,
    note: &'static str,
) -> IntRange {
    IntRange {
        section,
        key,
        min,
        max,
        note,
    }
}

const MIB: i64 = 1024 * 1024;
const GIB: i64 = 1024 * MIB;
const DAY_MS: i64 = 24 * 3_600_000;

/// Every integer key of the config and what it may be; [`Config::parse`] enforces them all.
const INT_RANGES: &[IntRange] = &[
    range("http", "max_body_bytes", 1024, GIB, " (1 KiB to 1 GiB)"),
    range("http", "max_upload_bytes", 1024, GIB, " (1 KiB to 1 GiB)"),
    range("http", "max_wait_ms", 0, 600_000, " (up to 10 minutes)"),
    range(
        "http",
        "shutdown_grace_ms",
        0,
        600_000,
        " (up to 10 minutes)",
    ),
    range(
        "http",
        "max_connections",
        1,
        1_000_000,
        "; past it new connections wait to be accepted",
    ),
    range(
        "http",
        "header_read_timeout_ms",
        100,
        600_000,
        " (100 ms to 10 minutes)",
    ),
    range(
        "http",
        "body_read_timeout_ms",
        100,
        3_600_000,
        " (100 ms to 1 hour)",
    ),
    range(
        "http",
        "max_long_polls",
        1,
        1_000_000,
        "; past it a receive with wait_ms gets SYSTEM_BUSY",
    ),
    range("mqtt", "max_subscriptions", 1, 100_000, ""),
    range(
        "mqtt",
        "max_packet_bytes",
        64,
        256 * MIB,
        " (64 B to 256 MiB)",
    ),
    range(
        "mqtt",
        "connect_timeout_ms",
        100,
        600_000,
        " (100 ms to 10 minutes)",
    ),
    range("mqtt", "max_inflight", 1, 65_535, ""),
    range("mqtt", "max_queued", 1, 10_000_000, ""),
    range("mqtt", "max_connections", 1, 10_000_000, ""),
    range("mqtt", "session_flush_ms", 1, 60_000, " (1 ms to 1 minute)"),
    range(
        "store",
        "flush_interval_ms",
        1,
        60_000,
        " (1 ms to 1 minute)",
    ),
    range(
        "store",
        "segment_bytes",
        4096,
        GIB,
        " (4 KiB to 1 GiB per segment file)",
    ),
    range(
        "store",
        "retention_hours",
        1,
        87_600,
        " (1 hour to 10 years)",
    ),
    range(
        "store",
        "write_queue_requests",
        1,
        10_000_000,
        " (sends waiting for the disk at most)",
    ),
    range(
        "store",
        "write_queue_bytes",
        65_536,
        16 * GIB,
        " (64 KiB to 16 GiB of sends waiting for the disk)",
    ),
    range(
        "store",
        "min_free_bytes",
        0,
        1024 * GIB,
        " (0 turns the free-space check off)",
    ),
    range(
        "broker",
        "default_queues",
        1,
        crate::broker::specs::MAX_QUEUES as i64,
        "",
    ),
    range(
        "broker",
        "max_body_bytes",
        1,
        crate::broker::config::MAX_MESSAGE_BYTES as i64,
        " (4 MiB is the spec's ceiling)",
    ),
    range(
        "broker",
        "max_properties_bytes",
        1,
        32_767,
        " (32767 is the spec's ceiling)",
    ),
    range(
        "broker",
        "max_delay_ms",
        1,
        40 * DAY_MS,
        " (40 days is the spec's ceiling)",
    ),
    range(
        "broker",
        "consumer_heartbeat_timeout_ms",
        100,
        3_600_000,
        " (100 ms to 1 hour)",
    ),
    range(
        "broker",
        "max_in_flight_messages",
        1,
        1_000_000,
        "; 0 would stop every receive",
    ),
    range(
        "broker",
        "max_in_flight_bytes",
        1,
        64 * GIB,
        "; 0 would stop every receive",
    ),
    range(
        "testing",
        "clock_offset_ms",
        -3650 * DAY_MS,
        3650 * DAY_MS,
        " (plus or minus 10 years)",
    ),
];

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Key(&'static str),
    Index(usize),
}

/// A validation failure: the key at fault and what to do.
#[derive(Debug)]
struct Problem {
    path: Vec<Part>,
    message: String,
}

impl Problem {
    fn at(path: &[Part], message: String) -> Problem {
        Problem {
            path: path.to_vec(),
            message,
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Where `path` is written in `text`, from the TOML parser's spans: the key itself, else an array
/// element, else the nearest enclosing key that is written (a key left to its default has no
/// place of its own).
fn locate(text: &str, path: &[Part]) -> Option<(usize, usize)> {
    use toml::Spanned;
    use toml::de::{DeTable, DeValue};
    fn key<'t, 'a>(
        table: &'t DeTable<'a>,
        name: &str,
    ) -> Option<(std::ops::Range<usize>, &'t Spanned<DeValue<'a>>)> {
        table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == name)
            .map(|(k, v)| (k.span(), v))
    }
    let root = DeTable::parse(text).ok()?;
    // `None` is the root table.
    let mut here: Option<&Spanned<DeValue<'_>>> = None;
    let mut found = None;
    for part in path {
        let next = match (part, here) {
            (Part::Key(name), None) => key(root.get_ref(), name),
            (Part::Key(name), Some(v)) => v.get_ref().as_table().and_then(|t| key(t, name)),
            (Part::Index(i), Some(v)) => v
                .get_ref()
                .as_array()
                .and_then(|items| items.get(*i))
                .map(|e| (e.span(), e)),
            (Part::Index(_), None) => None,
        };
        let Some((span, v)) = next else { break };
        found = Some(span.start);
        here = Some(v);
    }
    found.map(|offset| line_col(text, offset))
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
        assert!(!c.auth.keys[0].admin, "admin must be asked for");
    }

    #[test]
    fn https_needs_both_the_certificate_and_the_key() {
        let e = Config::parse("[http]\ntls_cert = \"c.pem\"\n", "w.toml").unwrap_err();
        assert_eq!(e.position, Some((2, 1)), "{e}");
        assert!(e.message.contains("tls_key"), "{e}");
        let e = Config::parse("[http]\n\ntls_key = \"k.pem\"\n", "w.toml").unwrap_err();
        assert_eq!(e.position, Some((3, 1)), "{e}");
        assert!(e.message.contains("tls_cert"), "{e}");
        let c = Config::parse(
            "[http]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
            "w.toml",
        )
        .unwrap();
        assert!(c.http.tls() && !Config::default().http.tls());
    }

    #[test]
    fn secret_keys_never_show_in_debug_output() {
        let text = "[[auth.keys]]\naccess_key = \"AK\"\nsecret_key = \"very-secret\"\n";
        let c = Config::parse(text, "w.toml").unwrap();
        let shown = format!("{c:?}");
        assert!(
            shown.contains("AK") && !shown.contains("very-secret"),
            "{shown}"
        );
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

    /// `text` must fail at `(line, col)` with a message naming `key`.
    fn fails_at(text: &str, line: usize, col: usize, key: &str) -> ConfigError {
        let e = Config::parse(text, "w.toml").expect_err(text);
        assert_eq!(e.file, "w.toml", "{text} -> {e}");
        assert_eq!(e.position, Some((line, col)), "{text} -> {e}");
        assert!(e.message.contains(key), "{text} -> {e}");
        e
    }

    #[test]
    fn every_integer_range_is_enforced_at_both_ends() {
        for r in INT_RANGES {
            let key = format!("{}.{}", r.section, r.key);
            for ok in [r.min, r.max] {
                let text = format!("[{}]\n{} = {ok}\n", r.section, r.key);
                assert!(
                    Config::parse(&text, "w.toml").is_ok(),
                    "{key} = {ok} is allowed"
                );
            }
            let mut bad = vec![r.max + 1];
            // Below 0 the unsigned types already refuse the value while parsing.
            if r.min > 0 || r.section == "testing" {
                bad.push(r.min - 1);
            }
            for v in bad {
                let text = format!("# {key}\n[{}]\n\n  {} = {v}\n", r.section, r.key);
                let e = fails_at(&text, 4, 3, &format!("{key} = {v} is out of range"));
                assert!(
                    e.message
                        .contains(&format!("allowed {}..={}", r.min, r.max)),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn shipped_config_documents_every_range() {
        let text = include_str!("../../config/wharf.toml");
        for r in INT_RANGES {
            let header = format!("\n[{}]\n", r.section);
            let section = &text[text.find(&header).expect(r.section)..];
            let at = section
                .find(&format!("\n{} = ", r.key))
                .unwrap_or_else(|| panic!("{}.{} is in config/wharf.toml", r.section, r.key));
            let comment = section[..at].lines().last().unwrap_or_default();
            assert_eq!(
                comment,
                format!("# Allowed: {}..={}.", r.min, r.max),
                "the comment above {}.{} in config/wharf.toml",
                r.section,
                r.key
            );
        }
    }

    #[test]
    fn zero_in_flight_messages_is_refused_instead_of_stopping_receives() {
        let e = fails_at(
            "[broker]\nmax_in_flight_messages = 0\n",
            2,
            1,
            "broker.max_in_flight_messages",
        );
        assert!(e.message.contains("0 would stop every receive"), "{e}");
        fails_at(
            "[broker]\nmax_in_flight_bytes = 0\n",
            2,
            1,
            "broker.max_in_flight_bytes",
        );
    }

    #[test]
    fn remoting_keys_parse_and_are_checked() {
        let c = Config::parse(
            "[remoting]\nadvertised_addr = \"10.0.0.5:9876\"\nauto_create_groups = false\n",
            "w.toml",
        )
        .unwrap();
        assert_eq!(c.remoting.advertised_addr, "10.0.0.5:9876");
        assert_eq!(c.remoting.auto_create_groups, AutoCreate::Off);
        assert!(!c.remoting.auto_create_groups.enabled(true));
        assert!(AutoCreate::Auto.enabled(true) && !AutoCreate::Auto.enabled(false));
        let c = Config::parse("[remoting]\nauto_create_groups = true\n", "w.toml").unwrap();
        assert_eq!(c.remoting.auto_create_groups, AutoCreate::On);
        let e = Config::parse("[remoting]\nauto_create_groups = \"yes\"\n", "w.toml").unwrap_err();
        assert!(e.message.contains("auto_create_groups"), "{e}");
        let e =
            Config::parse("[remoting]\nadvertised_addr = \"[::1]:9876\"\n", "w.toml").unwrap_err();
        assert!(e.message.contains("IPv4"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    }

    #[test]
    fn retry_delay_scale_must_be_positive_and_sane() {
        for bad in ["0.0", "-1.0", "1000.5", "nan", "inf"] {
            fails_at(
                &format!("[broker]\nretry_delay_scale = {bad}\n"),
                2,
                1,
                "broker.retry_delay_scale",
            );
        }
        for ok in ["0.0001", "1.0", "1000.0"] {
            let text = format!("[broker]\nretry_delay_scale = {ok}\n");
            assert!(Config::parse(&text, "w.toml").is_ok(), "{ok}");
        }
    }

    #[test]
    fn enum_like_strings_name_what_is_allowed() {
        for (text, allowed) in [
            ("[store]\nflush = \"sometimes\"\n", "`sync`"),
            ("[store]\nbackend = \"sqlite\"\n", "`embedded`"),
            ("[log]\nformat = \"xml\"\n", "`human`"),
        ] {
            let e = Config::parse(text, "w.toml").unwrap_err();
            assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
            assert!(e.message.contains(allowed), "{e}");
        }
        fails_at("[log]\nfilter = \"info,[\"\n", 2, 1, "log.filter");
        fails_at("[mqtt]\nlisten = \"1883\"\n", 2, 1, "mqtt.listen");
        fails_at("[remoting]\nlisten = \"x:y\"\n", 2, 1, "remoting.listen");
        assert!(Config::parse("[mqtt]\nlisten = \"\"\n", "w.toml").is_ok());
        fails_at("[store]\ndata_dir = \"\"\n", 2, 1, "store.data_dir");
        fails_at("[plugins]\ndir = \"\"\n", 2, 1, "plugins.dir");
        fails_at(
            "[store.postgres]\nurl = \"mysql://x\"\n",
            2,
            1,
            "store.postgres.url",
        );
        fails_at("[store]\nbackend = \"postgres\"\n", 2, 1, "store.backend");
        fails_at(
            "[store.postgres]\npool_size = 1\n",
            2,
            1,
            "store.postgres.pool_size",
        );
        fails_at(
            "[store.postgres]\nstatement_timeout_ms = 3600001\n",
            2,
            1,
            "store.postgres.statement_timeout_ms",
        );
        let e = Config::parse(
            "[store.postgres]\nurl = \"mysql://u:hunter2@h/d\"\n",
            "w.toml",
        )
        .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    const TWO_KEYS: &str = "[[auth.keys]]\naccess_key = \"AK_A\"\nsecret_key = \"a\"\nallow_subscribe = [\"Trade\"]\n\n[[auth.keys]]\naccess_key = \"AK_B\"\nsecret_key = \"b\"\n";

    #[test]
    fn auth_key_errors_point_into_the_entry_at_fault() {
        assert!(Config::parse(TWO_KEYS, "w.toml").is_ok());
        // The same key name exists in entry 1: the location must still be entry 2's.
        let e = fails_at(
            &format!("{TWO_KEYS}allow_subscribe = [\"Trade\", \"bad name\"]\n"),
            9,
            29,
            "allow_subscribe",
        );
        assert!(e.message.contains("entry 2"), "{e}");
        let e = fails_at(
            &TWO_KEYS.replace("\"AK_B\"", "\"AK_A\""),
            7,
            1,
            "access_key",
        );
        assert!(e.message.contains("already used by entry 1"), "{e}");
        fails_at(
            &TWO_KEYS.replace("\"AK_B\"", "\"AK:B\""),
            7,
            1,
            "access_key",
        );
        fails_at(&TWO_KEYS.replace("\"b\"", "\"\""), 8, 1, "secret_key");
        fails_at(
            &format!("{TWO_KEYS}allow_publish = [\"*\", \"x\"]\n"),
            9,
            23,
            "allow_publish",
        );
        // Unknown keys inside an entry are located by the parser, also in the second entry.
        let e = Config::parse(&format!("{TWO_KEYS}admn = true\n"), "w.toml").unwrap_err();
        assert_eq!(e.position, Some((9, 1)), "{e}");
        assert!(e.message.contains("admn"), "{e}");
    }

    #[test]
    fn a_bad_flag_value_is_reported_as_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(&path, "[http]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let o = Overrides {
            http: Some("nowhere".into()),
            ..Overrides::default()
        };
        let e = Config::resolve(Some(&path), &o).unwrap_err();
        assert_eq!(e.file, "<command line>");
        assert_eq!(e.position, None);
        assert!(e.message.contains("--http"), "{e}");
    }
}
