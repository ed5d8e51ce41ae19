//! Client subcommands: talk to a running host over its HTTP API and print the answers.
//!
//! Output is human-readable by default and the host's JSON with `--json`. Any failure exits
//! non-zero; server errors print their spec code and name on stderr.

pub mod client;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};

use self::client::{Body, Client, Credentials};

/// Connection options shared by every client subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOpts {
    /// Base URL of the host's HTTP API (`https://...` when the host has [http] tls_cert).
    #[arg(
        long,
        env = "WHARF_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
    /// PEM file of CA certificates to trust for https, on top of the system's roots (for a host
    /// with a private or self-signed certificate).
    #[arg(long, env = "WHARF_CA", global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Print the host's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Access key for signed requests (with --secret-key).
    #[arg(long, env = "WHARF_ACCESS_KEY", global = true, hide_env_values = true)]
    pub access_key: Option<String>,
    /// Secret key for signed requests (with --access-key).
    #[arg(long, env = "WHARF_SECRET_KEY", global = true, hide_env_values = true)]
    pub secret_key: Option<String>,
}

impl ClientOpts {
    fn client(&self) -> anyhow::Result<Client> {
        let creds = match (&self.access_key, &self.secret_key) {
            (Some(a), Some(s)) => Some(Credentials {
                access_key: a.clone(),
                secret_key: s.clone(),
            }),
            (None, None) => None,
            _ => bail!(
                "give both --access-key and --secret-key (or WHARF_ACCESS_KEY and WHARF_SECRET_KEY)"
            ),
        };
        Client::new(&self.server, creds, self.ca.as_deref())
    }
}

/// `wharf topic …`
#[derive(Debug, clap::Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name (3-64 letters, digits, '_', '-').
        name: String,
        /// Message type.
        #[arg(long = "type", default_value = "normal", value_parser = ["normal", "delay", "transaction", "order"])]
        topic_type: String,
        /// Number of queues (default: the host's [broker] default_queues).
        #[arg(long)]
        queues: Option<u32>,
    },
    /// List topics.
    List,
    /// Show one topic.
    Show {
        /// Topic name.
        name: String,
    },
    /// Delete a topic.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// `wharf group …`
#[derive(Debug, clap::Subcommand)]
pub enum GroupCommand {
    /// Create a group.
    Create {
        /// Group name.
        name: String,
        /// What the group is for.
        #[arg(long, default_value = "consumer", value_parser = ["consumer", "producer", "mqtt"])]
        kind: String,
        /// Consumption model.
        #[arg(long, default_value = "clustering", value_parser = ["clustering", "broadcasting"])]
        model: String,
        /// Retries before a message is dead-lettered (default 16).
        #[arg(long)]
        max_reconsume_times: Option<u32>,
        /// Consume timeout in milliseconds (default 15 minutes).
        #[arg(long)]
        consume_timeout_ms: Option<u64>,
    },
    /// Change a group's settings; the latest wins for every instance at once.
    #[command(group(clap::ArgGroup::new("settings").required(true).multiple(true)))]
    Update {
        /// Group name.
        name: String,
        /// Retries before a message is dead-lettered (0-1000).
        #[arg(long, group = "settings")]
        max_reconsume_times: Option<u32>,
        /// Consume timeout in milliseconds (1 ms to 24 h).
        #[arg(long, group = "settings")]
        consume_timeout_ms: Option<u64>,
    },
    /// List groups.
    List,
    /// Delete a group and its offsets.
    Delete {
        /// Group name.
        name: String,
    },
    /// Consumer status: online, consistency, backlog, instances.
    Status {
        /// Group name.
        name: String,
    },
}

/// `wharf send …`
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Topic to send to.
    pub topic: String,
    /// Message tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Business key (repeatable).
    #[arg(long = "key", value_name = "K")]
    pub keys: Vec<String>,
    /// User property `k=v` (repeatable).
    #[arg(long = "prop", value_name = "k=v", value_parser = parse_prop)]
    pub props: Vec<(String, String)>,
    /// Absolute start-deliver time (epoch ms).
    #[arg(long, value_name = "MS", conflicts_with = "delay")]
    pub deliver_at: Option<u64>,
    /// Delay before delivery (ms).
    #[arg(long, value_name = "MS")]
    pub delay: Option<u64>,
    /// Body text; `-` reads the body from stdin (sent as binary when it is not UTF-8).
    pub body: String,
}

fn parse_prop(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("property '{s}' must be written key=value"))
}

/// `wharf query …`
#[derive(Debug, clap::Subcommand)]
pub enum QueryCommand {
    /// A message by id, with per-group delivery status.
    Id {
        /// Message id (32 hex characters).
        id: String,
    },
    /// The newest ≤ 64 messages of a topic carrying a key.
    Key {
        /// Topic.
        topic: String,
        /// Business key.
        key: String,
    },
    /// Messages stored in a time range (epoch ms, inclusive).
    Range {
        /// Topic.
        topic: String,
        /// Range start (epoch ms).
        begin_ms: u64,
        /// Range end (epoch ms).
        end_ms: u64,
        /// Page size (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
    },
}

/// `wharf plugin …`
#[derive(Debug, clap::Subcommand)]
pub enum PluginCommand {
    /// Deploy a new version from a plugin.toml (its component path is relative to the manifest).
    Deploy {
        /// Path to plugin.toml.
        manifest: PathBuf,
    },
    /// List plugins.
    List,
    /// One plugin's versions, instances and counters.
    Status {
        /// Plugin name.
        name: String,
    },
    /// Return to the previous version.
    Rollback {
        /// Plugin name.
        name: String,
    },
    /// Stop and remove a plugin.
    Remove {
        /// Plugin name.
        name: String,
    },
}

/// Percent-encodes one path segment or query value.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Prints the answer as JSON (`--json`) or through `human`.
fn show(opts: &ClientOpts, v: &Value, human: impl FnOnce(&Value) -> String) {
    let text = if opts.json {
        serde_json::to_string_pretty(v).unwrap_or_default()
    } else {
        human(v)
    };
    if !text.is_empty() {
        // A closed pipe (`wharf topic list | head`) is not an error worth a panic.
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), "{}", text.trim_end());
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A plain table: header row, then one row per item.
fn table(items: &Value, cols: &[&str]) -> String {
    let rows: Vec<Vec<String>> = items
        .as_array()
        .map(|a| {
            a.iter()
                .map(|it| cols.iter().map(|c| s(&it[*c])).collect())
                .collect()
        })
        .unwrap_or_default();
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(cols.iter().map(|c| c.to_uppercase()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

fn message_text(m: &Value) -> String {
    let mut out = format!(
        "message_id: {}\ntopic: {}  queue: {}  offset: {}\ntag: {}  keys: {}\nborn_ms: {}  stored_ms: {}  reconsume_times: {}\n",
        s(&m["message_id"]),
        s(&m["topic"]),
        s(&m["queue_id"]),
        s(&m["queue_offset"]),
        s(&m["tag"]),
        m["keys"]
            .as_array()
            .map(|k| k.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
        s(&m["born_ms"]),
        s(&m["stored_ms"]),
        s(&m["reconsume_times"]),
    );
    if !m["deliver_at_ms"].is_null() {
        out.push_str(&format!("deliver_at_ms: {}\n", s(&m["deliver_at_ms"])));
    }
    if let Some(p) = m["properties"].as_object().filter(|p| !p.is_empty()) {
        out.push_str("properties:\n");
        for (k, v) in p {
            out.push_str(&format!("  {k} = {}\n", s(v)));
        }
    }
    if let Some(b) = m["body"].as_str() {
        out.push_str(&format!("body: {b}\n"));
    } else if let Some(b) = m["body_base64"].as_str() {
        out.push_str(&format!("body_base64: {b}\n"));
    }
    out
}

fn messages_text(v: &Value) -> String {
    let mut out = table(
        &v["messages"],
        &["message_id", "queue_id", "queue_offset", "tag", "stored_ms"],
    );
    if let Some(t) = v["next_page_token"].as_str() {
        out.push_str(&format!("next page: --page-token {t}\n"));
    }
    out
}

/// `wharf topic …`
pub async fn topic(opts: &ClientOpts, cmd: TopicCommand) -> anyhow::Result<()> {
    let c = opts.client()?;
    match cmd {
        TopicCommand::Create {
            name,
            topic_type,
            queues,
        } => {
            let mut body = json!({"name": name, "type": topic_type});
            if let Some(q) = queues {
                body["queues"] = json!(q);
            }
            let v = c.call(Method::POST, "/v1/topics", Body::Json(body)).await?;
            show(opts, &v, |v| {
                format!(
                    "created topic {} ({}, {} queues)",
                    s(&v["name"]),
                    s(&v["type"]),
                    s(&v["queues"])
                )
            });
        }
        TopicCommand::List => {
            let v = c.call(Method::GET, "/v1/topics", Body::Empty).await?;
            show(opts, &v, |v| {
                table(v, &["name", "type", "queues", "created_ms"])
            });
        }
        TopicCommand::Show { name } => {
            let v = c
                .call(
                    Method::GET,
                    &format!("/v1/topics/{}", enc(&name)),
                    Body::Empty,
                )
                .await?;
            show(opts, &v, |v| {
                table(&json!([v]), &["name", "type", "queues", "created_ms"])
            });
        }
        TopicCommand::Delete { name } => {
            let v = c
                .call(
                    Method::DELETE,
                    &format!("/v1/topics/{}", enc(&name)),
                    Body::Empty,
                )
                .await?;
            show(opts, &v, |_| format!("deleted topic {name}"));
        }
    }
    Ok(())
}

/// `wharf group …`
pub async fn group(opts: &ClientOpts, cmd: GroupCommand) -> anyhow::Result<()> {
    let c = opts.client()?;
    match cmd {
        GroupCommand::Create {
            name,
            kind,
            model,
            max_reconsume_times,
            consume_timeout_ms,
        } => {
            let mut body = json!({"name": name, "kind": kind, "model": model});
            if let Some(n) = max_reconsume_times {
                body["max_reconsume_times"] = json!(n);
            }
            if let Some(n) = consume_timeout_ms {
                body["consume_timeout_ms"] = json!(n);
            }
            let v = c.call(Method::POST, "/v1/groups", Body::Json(body)).await?;
            show(opts, &v, |v| {
                format!(
                    "created {} group {} ({})",
                    s(&v["kind"]),
                    s(&v["name"]),
                    s(&v["model"])
                )
            });
        }
        GroupCommand::Update {
            name,
            max_reconsume_times,
            consume_timeout_ms,
        } => {
            let mut body = json!({});
            if let Some(n) = max_reconsume_times {
                body["max_reconsume_times"] = json!(n);
            }
            if let Some(n) = consume_timeout_ms {
                body["consume_timeout_ms"] = json!(n);
            }
            let v = c
                .call(
                    Method::PATCH,
                    &format!("/v1/groups/{}", enc(&name)),
                    Body::Json(body),
                )
                .await?;
            show(opts, &v, |v| {
                format!(
                    "updated group {}: max_reconsume_times {}, consume_timeout_ms {}",
                    s(&v["name"]),
                    s(&v["max_reconsume_times"]),
                    s(&v["consume_timeout_ms"])
                )
            });
        }
        GroupCommand::List => {
            let v = c.call(Method::GET, "/v1/groups", Body::Empty).await?;
            show(opts, &v, |v| {
                table(
                    v,
                    &[
                        "name",
                        "kind",
                        "model",
                        "max_reconsume_times",
                        "consume_timeout_ms",
                    ],
                )
            });
        }
        GroupCommand::Delete { name } => {
            let v = c
                .call(
                    Method::DELETE,
                    &format!("/v1/groups/{}", enc(&name)),
                    Body::Empty,
                )
                .await?;
            show(opts, &v, |_| format!("deleted group {name}"));
        }
        GroupCommand::Status { name } => {
            let v = c
                .call(
                    Method::GET,
                    &format!("/v1/groups/{}/status", enc(&name)),
                    Body::Empty,
                )
                .await?;
            show(opts, &v, |v| {
                let mut out = format!(
                    "online: {}  consistent: {}  backlog: {}  consume_tps: {}  last_consume_ms: {}\n",
                    s(&v["online"]),
                    s(&v["consistent"]),
                    s(&v["backlog"]),
                    s(&v["consume_tps"]),
                    s(&v["last_consume_ms"])
                );
                out.push_str("subscriptions:\n");
                out.push_str(&table(&v["subscriptions"], &["topic", "expression"]));
                out.push_str("instances:\n");
                out.push_str(&table(
                    &v["instances"],
                    &["instance_id", "address", "pid", "backlog"],
                ));
                out
            });
        }
    }
    Ok(())
}

/// `wharf send …`
pub async fn send(opts: &ClientOpts, a: SendArgs) -> anyhow::Result<()> {
    let c = opts.client()?;
    let mut msg = json!({});
    if a.body == "-" {
        let mut raw = Vec::new();
        std::io::stdin()
            .read_to_end(&mut raw)
            .context("reading the body from stdin")?;
        match String::from_utf8(raw) {
            Ok(text) => msg["body"] = json!(text),
            Err(e) => {
                msg["body_base64"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
        }
    } else {
        msg["body"] = json!(a.body);
    }
    if let Some(t) = a.tag {
        msg["tag"] = json!(t);
    }
    if !a.keys.is_empty() {
        msg["keys"] = json!(a.keys);
    }
    if !a.props.is_empty() {
        let props: BTreeMap<String, String> = a.props.into_iter().collect();
        msg["properties"] = json!(props);
    }
    if let Some(at) = a.deliver_at {
        msg["deliver_at_ms"] = json!(at);
    }
    if let Some(d) = a.delay {
        msg["delay_ms"] = json!(d);
    }
    let v = c
        .call(
            Method::POST,
            &format!("/v1/topics/{}/messages", enc(&a.topic)),
            Body::Json(msg),
        )
        .await?;
    show(opts, &v, |v| {
        format!(
            "sent {}  queue {}  offset {}",
            s(&v["message_id"]),
            s(&v["queue_id"]),
            s(&v["queue_offset"])
        )
    });
    Ok(())
}

/// `wharf query …`
pub async fn query(opts: &ClientOpts, cmd: QueryCommand) -> anyhow::Result<()> {
    let c = opts.client()?;
    match cmd {
        QueryCommand::Id { id } => {
            let v = c
                .call(
                    Method::GET,
                    &format!("/v1/messages/{}", enc(&id)),
                    Body::Empty,
                )
                .await?;
            show(opts, &v, |v| {
                let mut out = message_text(v);
                out.push_str("deliveries:\n");
                out.push_str(&table(&v["deliveries"], &["group", "status"]));
                out
            });
        }
        QueryCommand::Key { topic, key } => {
            let v = c
                .call(
                    Method::GET,
                    &format!("/v1/topics/{}/messages?key={}", enc(&topic), enc(&key)),
                    Body::Empty,
                )
                .await?;
            show(opts, &v, messages_text);
        }
        QueryCommand::Range {
            topic,
            begin_ms,
            end_ms,
            limit,
            page_token,
        } => {
            let mut path = format!(
                "/v1/topics/{}/messages?begin_ms={begin_ms}&end_ms={end_ms}&limit={limit}",
                enc(&topic)
            );
            if let Some(t) = page_token {
                path.push_str(&format!("&page_token={}", enc(&t)));
            }
            let v = c.call(Method::GET, &path, Body::Empty).await?;
            show(opts, &v, messages_text);
        }
    }
    Ok(())
}

/// Reads a manifest and the component it names (relative to the manifest's directory).
pub fn read_plugin(manifest: &Path) -> anyhow::Result<(String, String, Vec<u8>)> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("reading manifest {}", manifest.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not valid TOML: {e}", manifest.display()))?;
    let Some(component) = table.get("component").and_then(|v| v.as_str()) else {
        bail!(
            "{} has no `component = \"file.wasm\"` key naming the wasm component",
            manifest.display()
        );
    };
    let path = manifest
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(component);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading component {} (named by {}; paths are relative to the manifest)",
            path.display(),
            manifest.display()
        )
    })?;
    let file = Path::new(component)
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| "component.wasm".into());
    Ok((text, file, bytes))
}

/// `wharf plugin …`
pub async fn plugin(opts: &ClientOpts, cmd: PluginCommand) -> anyhow::Result<()> {
    let c = opts.client()?;
    let deploy_text = |v: &Value| {
        format!(
            "{} version {} ({}): {}",
            s(&v["name"]),
            s(&v["version"]),
            s(&v["manifest_version"]),
            s(&v["status"])
        )
    };
    match cmd {
        PluginCommand::Deploy { manifest } => {
            let (text, file, bytes) = read_plugin(&manifest)?;
            let v = c
                .call(
                    Method::POST,
                    "/v1/plugins",
                    Body::Multipart(vec![
                        (
                            "manifest".into(),
                            "plugin.toml".into(),
                            "application/toml".into(),
                            text.into_bytes(),
                        ),
                        ("component".into(), file, "application/wasm".into(), bytes),
                    ]),
                )
                .await?;
            show(opts, &v, deploy_text);
        }
        PluginCommand::List => {
            let v = c.call(Method::GET, "/v1/plugins", Body::Empty).await?;
            show(opts, &v, |v| table(v, &["name", "version", "status"]));
        }
        PluginCommand::Status { name } => {
            let v = c
                .call(
                    Method::GET,
                    &format!("/v1/plugins/{}", enc(&name)),
                    Body::Empty,
                )
                .await?;
            // Status is nested (versions, instances, counters): pretty JSON reads best.
            show(opts, &v, |v| {
                serde_json::to_string_pretty(v).unwrap_or_default()
            });
        }
        PluginCommand::Rollback { name } => {
            let v = c
                .call(
                    Method::POST,
                    &format!("/v1/plugins/{}/rollback", enc(&name)),
                    Body::Empty,
                )
                .await?;
            show(opts, &v, deploy_text);
        }
        PluginCommand::Remove { name } => {
            let v = c
                .call(
                    Method::DELETE,
                    &format!("/v1/plugins/{}", enc(&name)),
                    Body::Empty,
                )
                .await?;
            show(opts, &v, deploy_text);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_path_segments() {
        assert_eq!(enc("Trade"), "Trade");
        assert_eq!(enc("%RETRY%g"), "%25RETRY%25g");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn props_need_an_equals_sign() {
        assert_eq!(parse_prop("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_prop("ab").is_err());
        assert!(parse_prop("=b").is_err());
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &json!([{"name":"Trade","queues":8},{"name":"T2"}]),
            &["name", "queues"],
        );
        assert_eq!(t, "NAME   QUEUES\nTrade  8\nT2     -\n");
    }

    #[test]
    fn plugin_component_is_relative_to_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("p")).unwrap();
        std::fs::write(
            dir.path().join("p/plugin.toml"),
            "name = \"x\"\ncomponent = \"x.wasm\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("p/x.wasm"), b"\0asm").unwrap();
        let (_, file, bytes) = read_plugin(&dir.path().join("p/plugin.toml")).unwrap();
        assert_eq!(file, "x.wasm");
        assert_eq!(bytes, b"\0asm");
        std::fs::write(dir.path().join("p/plugin.toml"), "name = \"x\"\n").unwrap();
        assert!(read_plugin(&dir.path().join("p/plugin.toml")).is_err());
    }
}

/// `wharf mqtt …`
#[derive(Debug, clap::Subcommand)]
pub enum MqttCommand {
    /// A device: online, address, last connect, subscriptions with QoS.
    Device {
        /// Client id (`GroupID@@@DeviceID` in strict mode).
        client_id: String,
    },
    /// An MQTT group: online count, pending deliveries.
    Group {
        /// Group id (`GID_…`).
        group: String,
    },
    /// An MQTT parent topic: subscribers, recent in/out rates.
    Topic {
        /// Broker topic.
        topic: String,
    },
}

/// Runs `wharf mqtt …`.
pub async fn mqtt(opts: &ClientOpts, cmd: MqttCommand) -> anyhow::Result<()> {
    let c = opts.client()?;
    let path = match &cmd {
        MqttCommand::Device { client_id } => format!("/v1/mqtt/devices/{}", enc(client_id)),
        MqttCommand::Group { group } => format!("/v1/mqtt/groups/{}", enc(group)),
        MqttCommand::Topic { topic } => format!("/v1/mqtt/topics/{}", enc(topic)),
    };
    let v = c.call(Method::GET, &path, Body::Empty).await?;
    show(opts, &v, |v| match cmd {
        MqttCommand::Device { .. } => {
            let mut out = format!(
                "{}: {} from {} (last connect {} ms{})\n",
                s(&v["client_id"]),
                if v["online"].as_bool() == Some(true) {
                    "online"
                } else {
                    "offline"
                },
                s(&v["address"]),
                s(&v["last_connect_ms"]),
                if v["persistent"].as_bool() == Some(true) {
                    ", session kept"
                } else {
                    ""
                },
            );
            out.push_str(&format!(
                "queued {}, in flight {}\n",
                s(&v["queued"]),
                s(&v["inflight"])
            ));
            out.push_str(&table(&v["subscriptions"], &["filter", "qos"]));
            out
        }
        MqttCommand::Group { .. } => format!(
            "{}: {} online, {} sessions, {} pending",
            s(&v["group"]),
            s(&v["online"]),
            s(&v["sessions"]),
            s(&v["pending"])
        ),
        MqttCommand::Topic { .. } => format!(
            "{}: {} subscribers; in {:.1}/s, out {:.1}/s; totals published {}, delivered {}",
            s(&v["topic"]),
            s(&v["subscribers"]),
            v["rates"]["in_per_sec"].as_f64().unwrap_or(0.0),
            v["rates"]["out_per_sec"].as_f64().unwrap_or(0.0),
            s(&v["published_total"]),
            s(&v["delivered_total"])
        ),
    });
    Ok(())
}
