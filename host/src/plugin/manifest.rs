//! `plugin.toml`: serde structs (parse), then cross-field checks (validate), with errors that point
//! at file, line and column and say what is allowed.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};
use wharf_codec::tags::{TagExpression, check_tag};

use crate::broker::ConsumeModel;
use crate::error::{ErrorCode, ErrorKind, WharfError};
use crate::model::validate_name;

/// Largest `batch_max`.
pub const MAX_BATCH: u32 = 32;
/// Largest `concurrency` (each is one instance and one worker thread).
pub const MAX_CONCURRENCY: u32 = 64;
/// Largest `limits.memory_mib` (the pooling allocator reserves this per instance slot).
pub const MAX_MEMORY_MIB: u32 = 1024;
/// Largest `max_reconsume_times` the broker accepts.
pub const MAX_RECONSUME_TIMES: u32 = 1000;
/// Longest `consume_timeout_ms`: 24 h.
pub const MAX_CONSUME_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// A whole `plugin.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `name = "order-timeout"`: unique plugin name.
    pub name: String,
    /// `version = "1.0.0"`: the author's version label (the host numbers deploys separately).
    pub version: String,
    /// `component = "order_timeout.wasm"`: path of the component, relative to the manifest.
    pub component: String,
    /// `[consumer]`
    pub consumer: ConsumerSection,
    /// `[[subscription]]`: at least one.
    #[serde(default)]
    pub subscription: Vec<SubscriptionEntry>,
    /// `[limits]`
    #[serde(default)]
    pub limits: LimitsSection,
    /// `[permissions]`
    #[serde(default)]
    pub permissions: PermissionsSection,
    /// `[[http]]`: optional HTTP triggers.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
}

/// `[consumer]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSection {
    /// `group = "GID_order_timeout"`: consumer group; created if absent, settings updated if present.
    pub group: String,
    /// `model = "clustering"` or `"broadcasting"`.
    #[serde(default)]
    pub model: ConsumeModel,
    /// `max_reconsume_times = 16`: retries before dead-lettering (0..=1000).
    #[serde(default = "default_max_reconsume")]
    pub max_reconsume_times: u32,
    /// `consume_timeout_ms = 900000`: one call's deadline; past it the call is stopped and retried.
    #[serde(default = "default_timeout")]
    pub consume_timeout_ms: u64,
    /// `concurrency = 20`: instances (and workers) per host; broadcasting always uses one.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// `batch_max = 1`: messages per call, 1..=32 (above 1 the component's `consume-batch` is used).
    #[serde(default = "default_batch")]
    pub batch_max: u32,
}

fn default_max_reconsume() -> u32 {
    crate::broker::specs::DEFAULT_MAX_RECONSUME_TIMES
}
fn default_timeout() -> u64 {
    crate::broker::specs::DEFAULT_CONSUME_TIMEOUT_MS
}
fn default_concurrency() -> u32 {
    20
}
fn default_batch() -> u32 {
    1
}

/// One `[[subscription]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionEntry {
    /// `topic = "Trade"`
    pub topic: String,
    /// `expression = "order||pay"`: `*` for all tags.
    #[serde(default = "default_expression")]
    pub expression: String,
}

fn default_expression() -> String {
    "*".to_string()
}

/// `[limits]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// `memory_mib = 64`: linear memory cap per instance (1..=1024); growing past it traps.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
}

fn default_memory() -> u32 {
    64
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            memory_mib: default_memory(),
        }
    }
}

/// `[permissions]` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionsSection {
    /// `publish = ["Notify"]`: topics the plugin may send to; everything else is NO_PERMISSION.
    #[serde(default)]
    pub publish: Vec<String>,
}

/// One `[[http]]` trigger: `POST /t<path>` becomes a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    /// `path = "/hooks/orders"`: served at `/t/hooks/orders`; must start with `/`.
    pub path: String,
    /// `topic = "Trade"`: where the message goes.
    pub topic: String,
    /// `tag = "order"`: optional tag of the message.
    #[serde(default)]
    pub tag: Option<String>,
    /// `headers = ["x-request-id"]`: request headers copied into properties of the same
    /// (lower-case) name when present.
    #[serde(default)]
    pub headers: Vec<String>,
    /// `key_header = "x-order-id"`: a header whose value becomes the message key.
    #[serde(default)]
    pub key_header: Option<String>,
}

/// A manifest problem with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// File name as given (e.g. `plugins/x/plugin.toml` or `plugin.toml` for uploads).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong and what is allowed.
    pub message: String,
    /// The spec's code it is reported with: `SUBSCRIPTION_PARSE_FAILED` for a bad expression,
    /// `SYSTEM_ERROR` (a 400) for everything else.
    pub code: ErrorCode,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ManifestError {}

impl From<ManifestError> for WharfError {
    fn from(e: ManifestError) -> Self {
        WharfError::new(
            e.code,
            ErrorKind::Invalid,
            format!("invalid plugin manifest: {e}"),
        )
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl Manifest {
    /// Parses and validates `text`; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            ManifestError {
                file: file.to_string(),
                line,
                column,
                message: e.message().trim_end().to_string(),
                code: ErrorCode::SystemError,
            }
        })?;
        manifest.validate(file, text)?;
        Ok(manifest)
    }

    /// Cross-field and range checks, each pointing at the offending value.
    pub fn validate(&self, file: &str, text: &str) -> Result<(), ManifestError> {
        let locate = Locator::new(file, text);
        let c = &self.consumer;
        if validate_name("plugin", &self.name).is_err() {
            return Err(locate.at(
                &["name"],
                format!(
                    "name = \"{}\" is not allowed; use 3-64 characters from letters, digits, '_', '-'",
                    self.name
                ),
            ));
        }
        if self.name.contains('%') {
            return Err(locate.at(&["name"], "name must not contain '%'".to_string()));
        }
        if self.version.trim().is_empty() {
            return Err(locate.at(&["version"], "version must not be empty".to_string()));
        }
        if self.component.trim().is_empty() {
            return Err(locate.at(
                &["component"],
                "component must name the .wasm file, relative to the manifest".to_string(),
            ));
        }
        if let Err(e) = validate_name("group", &c.group) {
            return Err(locate.at(&["consumer", "group"], e.message));
        }
        locate.in_range(&["consumer", "batch_max"], c.batch_max, 1..=MAX_BATCH, "")?;
        locate.in_range(
            &["consumer", "concurrency"],
            c.concurrency,
            1..=MAX_CONCURRENCY,
            "",
        )?;
        locate.in_range(
            &["consumer", "max_reconsume_times"],
            c.max_reconsume_times,
            0..=MAX_RECONSUME_TIMES,
            "",
        )?;
        locate.in_range(
            &["consumer", "consume_timeout_ms"],
            c.consume_timeout_ms,
            1..=MAX_CONSUME_TIMEOUT_MS,
            " (1 ms to 24 h)",
        )?;
        locate.in_range(
            &["limits", "memory_mib"],
            self.limits.memory_mib,
            1..=MAX_MEMORY_MIB,
            "",
        )?;
        if self.subscription.is_empty() {
            return Err(locate.whole(
                "no [[subscription]]: add at least one with topic and expression".to_string(),
            ));
        }
        for (i, s) in self.subscription.iter().enumerate() {
            if let Err(e) = validate_name("topic", &s.topic) {
                return Err(locate.in_array("subscription", i, "topic", e.message));
            }
            if let Err(e) = TagExpression::parse(&s.expression) {
                return Err(ManifestError {
                    code: ErrorCode::SubscriptionParseFailed,
                    ..locate.in_array("subscription", i, "expression", e.to_string())
                });
            }
        }
        for (i, topic) in self.permissions.publish.iter().enumerate() {
            if let Err(e) = validate_name("topic", topic) {
                return Err(locate.at_index(&["permissions", "publish"], i, e.message));
            }
        }
        for (i, route) in self.http.iter().enumerate() {
            if let Err(why) = check_route_path(&route.path) {
                return Err(locate.in_array(
                    "http",
                    i,
                    "path",
                    format!("path = \"{}\" is not valid: {why}", route.path),
                ));
            }
            if let Err(e) = validate_name("topic", &route.topic) {
                return Err(locate.in_array("http", i, "topic", e.message));
            }
            if let Some(Err(e)) = route.tag.as_deref().map(check_tag) {
                return Err(locate.in_array("http", i, "tag", e.to_string()));
            }
            let bad_header = route
                .headers
                .iter()
                .chain(route.key_header.iter())
                .find(|h| !is_header_name(h));
            if let Some(h) = bad_header {
                return Err(locate.in_array(
                    "http",
                    i,
                    if route.headers.contains(h) {
                        "headers"
                    } else {
                        "key_header"
                    },
                    format!(
                        "header name \"{h}\" is not valid; use lower-case letters, digits and '-'"
                    ),
                ));
            }
            if let Some(j) = self.http[..i].iter().position(|r| r.path == route.path) {
                return Err(locate.in_array(
                    "http",
                    i,
                    "path",
                    format!(
                        "path \"{}\" is already used by [[http]] #{}",
                        route.path,
                        j + 1
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Subscriptions with the same topic twice collapse to the last one (spec: the last wins).
    pub fn subscriptions(&self) -> Vec<crate::broker::specs::Subscription> {
        let mut out: Vec<crate::broker::specs::Subscription> = Vec::new();
        for s in &self.subscription {
            out.retain(|o| o.topic != s.topic);
            out.push(crate::broker::specs::Subscription {
                topic: s.topic.clone(),
                expression: s.expression.clone(),
            });
        }
        out
    }
}

fn check_route_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("it must start with '/'");
    }
    if path.len() < 2 {
        return Err("it must name something after '/'");
    }
    let ok = path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/-_.~".contains(c));
    if !ok {
        return Err("use letters, digits and '/', '-', '_', '.', '~'");
    }
    if path.contains("//") || path.ends_with('/') {
        return Err("no empty segments ('//') and no trailing '/'");
    }
    Ok(())
}

fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn lookup<'t, 'a>(table: &'t DeTable<'a>, key: &str) -> Option<&'t toml::Spanned<DeValue<'a>>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| v)
}

/// Finds where a key sits in the manifest text, for validation errors.
struct Locator<'a> {
    file: &'a str,
    text: &'a str,
    root: Option<toml::Spanned<DeTable<'a>>>,
}

impl<'a> Locator<'a> {
    fn new(file: &'a str, text: &'a str) -> Self {
        Locator {
            file,
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    fn error(&self, span: Option<Range<usize>>, message: String) -> ManifestError {
        let (line, column) = match span {
            Some(s) => {
                let (l, c) = line_col(self.text, s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ManifestError {
            file: self.file.to_string(),
            line,
            column,
            message,
            code: ErrorCode::SystemError,
        }
    }

    fn value(&self, path: &[&str]) -> Option<&toml::Spanned<DeValue<'a>>> {
        let root = self.root.as_ref()?;
        let (first, rest) = path.split_first()?;
        let mut v = lookup(root.get_ref(), first)?;
        for key in rest {
            v = lookup(v.get_ref().as_table()?, key)?;
        }
        Some(v)
    }

    /// The value at a dotted key path (falls back to the whole file).
    /// `key = value is out of range; allowed a..=b` at `path` unless `range` holds `value`.
    fn in_range<T: PartialOrd + fmt::Display>(
        &self,
        path: &[&str],
        value: T,
        range: std::ops::RangeInclusive<T>,
        note: &str,
    ) -> Result<(), ManifestError> {
        if range.contains(&value) {
            return Ok(());
        }
        let key = path.last().copied().unwrap_or_default();
        Err(self.at(
            path,
            format!(
                "{key} = {value} is out of range; allowed {}..={}{note}",
                range.start(),
                range.end()
            ),
        ))
    }

    fn at(&self, path: &[&str], message: String) -> ManifestError {
        self.error(self.value(path).map(|v| v.span()), message)
    }

    /// Element `i` of the array at `path`.
    fn at_index(&self, path: &[&str], i: usize, message: String) -> ManifestError {
        let span = self
            .value(path)
            .and_then(|v| v.get_ref().as_array()?.get(i).map(|e| e.span()));
        self.error(span, message)
    }

    /// `key` of table `i` in the array of tables `array`.
    fn in_array(&self, array: &str, i: usize, key: &str, message: String) -> ManifestError {
        let span = self.value(&[array]).and_then(|v| {
            let table = v.get_ref().as_array()?.get(i)?;
            let inner = table.get_ref().as_table()?;
            Some(lookup(inner, key).map_or(table.span(), |e| e.span()))
        });
        self.error(span, message)
    }

    fn whole(&self, message: String) -> ManifestError {
        self.error(None, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"name = "order-timeout"
version = "1.0.0"
component = "order_timeout.wasm"

[consumer]
group = "GID_order_timeout"
model = "clustering"
max_reconsume_times = 16
consume_timeout_ms = 900000
concurrency = 20
batch_max = 1

[[subscription]]
topic = "Trade"
expression = "order||pay"

[limits]
memory_mib = 64

[permissions]
publish = ["Notify"]

[[http]]
path = "/hooks/orders"
topic = "Trade"
tag = "order"
"#;

    fn err(text: &str) -> ManifestError {
        Manifest::parse("plugin.toml", text).expect_err("manifest should be refused")
    }

    #[test]
    fn contract_example_parses() {
        let m = Manifest::parse("plugin.toml", GOOD).unwrap();
        assert_eq!(m.name, "order-timeout");
        assert_eq!(m.consumer.model, ConsumeModel::Clustering);
        assert_eq!(m.consumer.batch_max, 1);
        assert_eq!(m.limits.memory_mib, 64);
        assert_eq!(m.permissions.publish, vec!["Notify".to_string()]);
        assert_eq!(m.http[0].path, "/hooks/orders");
        assert_eq!(m.subscriptions().len(), 1);
    }

    #[test]
    fn unknown_key_names_line_column_and_allowed_keys() {
        let text = GOOD.replace("batch_max = 1", "batch_max = 1\ncolour = \"red\"");
        let e = err(&text);
        assert_eq!((e.line, e.column), (Some(12), Some(1)));
        assert!(e.message.contains("unknown field `colour`"), "{e}");
        assert!(
            e.message.contains("batch_max"),
            "lists the allowed keys: {e}"
        );
        assert!(e.to_string().starts_with("plugin.toml:12:1: "), "{e}");
    }

    #[test]
    fn batch_max_out_of_range_points_at_value() {
        let e = err(&GOOD.replace("batch_max = 1", "batch_max = 64"));
        assert_eq!((e.line, e.column), (Some(11), Some(13)));
        assert!(e.message.contains("allowed 1..=32"), "{e}");
    }

    #[test]
    fn other_ranges_are_checked() {
        let e = err(&GOOD.replace("concurrency = 20", "concurrency = 0"));
        assert_eq!(e.line, Some(10));
        assert!(e.message.contains("concurrency"), "{e}");
        let e = err(&GOOD.replace("memory_mib = 64", "memory_mib = 4096"));
        assert_eq!((e.line, e.column), (Some(18), Some(14)));
        let e = err(&GOOD.replace("consume_timeout_ms = 900000", "consume_timeout_ms = 0"));
        assert_eq!(e.line, Some(9));
        let e = err(&GOOD.replace("max_reconsume_times = 16", "max_reconsume_times = 5000"));
        assert_eq!(e.line, Some(8));
        assert!(e.message.contains("0..=1000"), "{e}");
    }

    #[test]
    fn bad_expression_is_refused_with_its_place() {
        let e = err(&GOOD.replace("order||pay", "order|||pay"));
        assert_eq!((e.line, e.column), (Some(15), Some(14)));
        assert_eq!(e.code, ErrorCode::SubscriptionParseFailed);
        // One wording wherever an expression is refused: the broker's parser says it.
        assert_eq!(
            e.message,
            crate::broker::consume::filter::TagFilter::parse("order|||pay")
                .unwrap_err()
                .message
        );
        assert_eq!(WharfError::from(e).code.code(), 23);
        assert!(
            err(&GOOD.replace("order||pay", "order|| ||pay"))
                .message
                .contains("a tag between '||' separators is empty")
        );
        assert!(
            err(&GOOD.replace("order||pay", "*||pay"))
                .message
                .contains("'*'")
        );
    }

    #[test]
    fn missing_component_and_wrong_types_are_reported() {
        let e = err(&GOOD.replace("component = \"order_timeout.wasm\"\n", ""));
        assert!(e.message.contains("missing field `component`"), "{e}");
        let e = err(&GOOD.replace("batch_max = 1", "batch_max = \"one\""));
        assert_eq!(e.line, Some(11));
        assert!(e.message.contains("invalid type"), "{e}");
        let e = err(&GOOD.replace("model = \"clustering\"", "model = \"fanout\""));
        assert_eq!(e.line, Some(7));
        assert!(e.message.contains("broadcasting"), "{e}");
    }

    #[test]
    fn subscriptions_and_routes_are_checked() {
        let start = GOOD.find("[[subscription]]").unwrap();
        let end = GOOD.find("[limits]").unwrap();
        let none = format!("{}{}", &GOOD[..start], &GOOD[end..]);
        assert!(err(&none).message.contains("no [[subscription]]"));
        let e = err(&GOOD.replace("path = \"/hooks/orders\"", "path = \"hooks\""));
        assert_eq!(e.line, Some(24));
        assert!(e.message.contains("start with '/'"), "{e}");
        let twice = format!("{GOOD}\n[[http]]\npath = \"/hooks/orders\"\ntopic = \"Trade\"\n");
        assert!(err(&twice).message.contains("already used"));
        let e = err(&GOOD.replace("publish = [\"Notify\"]", "publish = [\"Notify\", \"a b\"]"));
        assert_eq!((e.line, e.column), (Some(21), Some(22)));
    }

    #[test]
    fn same_topic_twice_keeps_the_last_expression() {
        let text = GOOD.replace(
            "[limits]",
            "[[subscription]]\ntopic = \"Trade\"\nexpression = \"pay\"\n\n[limits]",
        );
        let m = Manifest::parse("plugin.toml", &text).unwrap();
        let subs = m.subscriptions();
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].expression, "pay");
    }
}
