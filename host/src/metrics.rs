//! Lock-free counters and latency histograms, rendered in Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (microseconds) of histogram buckets; the last bucket is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    50, 100, 200, 350, 500, 750, 1_000, 2_000, 3_500, 5_000, 10_000, 25_000, 50_000, 100_000,
    500_000, 1_000_000,
];

/// A fixed-bucket histogram that many threads record into without locks.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, value: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// A consistent-enough copy for rendering.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's values at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Per-bucket (non-cumulative) counts; index `LATENCY_BUCKETS_US.len()` is +Inf.
    pub buckets: Vec<u64>,
    /// Sum of observations.
    pub sum: u64,
    /// Number of observations.
    pub count: u64,
}

impl HistogramSnapshot {
    /// Approximate quantile (bucket upper bound), e.g. `q = 0.99`.
    pub fn quantile(&self, q: f64) -> u64 {
        let target = (self.count as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target && target > 0 {
                return LATENCY_BUCKETS_US.get(i).copied().unwrap_or(u64::MAX);
            }
        }
        0
    }

    /// Appends this histogram in Prometheus text format, converting µs to seconds.
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n;
            let le = match LATENCY_BUCKETS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Messages and bytes sent to one topic.
#[derive(Debug, Default)]
pub struct TopicSendCounters {
    messages: AtomicU64,
    bytes: AtomicU64,
}

/// Per-topic send counters for `/metrics`, fed by the broker's send path (every front end).
///
/// Process-wide, like the metrics endpoint that shows them; a topic's entry is created on its first
/// send and looked up under a read lock afterwards, so the hot path takes no write lock.
#[derive(Debug, Default)]
pub struct SendCounters {
    topics: parking_lot::RwLock<std::collections::BTreeMap<String, TopicSendCounters>>,
}

impl SendCounters {
    /// Counts `messages` stored messages of `bytes` body bytes in all for `topic`.
    pub fn record(&self, topic: &str, messages: u64, bytes: u64) {
        let add = |c: &TopicSendCounters| {
            c.messages.fetch_add(messages, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        };
        if let Some(c) = self.topics.read().get(topic) {
            add(c);
            return;
        }
        add(self.topics.write().entry(topic.to_string()).or_default());
    }

    /// `(messages, bytes)` sent to `topic` so far.
    pub fn get(&self, topic: &str) -> (u64, u64) {
        self.topics.read().get(topic).map_or((0, 0), |c| {
            (
                c.messages.load(Ordering::Relaxed),
                c.bytes.load(Ordering::Relaxed),
            )
        })
    }

    /// Appends the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        type Field = fn(&TopicSendCounters) -> &AtomicU64;
        let families: [(&str, &str, Field); 2] = [
            (
                "wharf_sent_messages_total",
                "Messages stored by sends, per topic.",
                |c| &c.messages,
            ),
            (
                "wharf_sent_bytes_total",
                "Body bytes stored by sends, per topic.",
                |c| &c.bytes,
            ),
        ];
        let topics = self.topics.read();
        for (metric, help, field) in families {
            let _ = writeln!(out, "# HELP {metric} {help}");
            let _ = writeln!(out, "# TYPE {metric} counter");
            for (t, c) in topics.iter() {
                let _ = writeln!(
                    out,
                    "{metric}{{topic=\"{}\"}} {}",
                    escape_label(t),
                    field(c).load(Ordering::Relaxed)
                );
            }
        }
    }
}

/// Escapes a Prometheus label value.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes one metric with its HELP and TYPE lines (`kind` = `counter` or `gauge`).
pub fn gauge(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// The process-wide send counters.
pub fn send_counters() -> &'static SendCounters {
    static COUNTERS: std::sync::LazyLock<SendCounters> =
        std::sync::LazyLock::new(SendCounters::default);
    &COUNTERS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_into_buckets_and_renders() {
        let h = Histogram::default();
        for v in [10, 60, 60, 2_000_000] {
            h.record(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[1], 2);
        assert_eq!(*s.buckets.last().unwrap(), 1);
        assert_eq!(s.quantile(0.5), 100);
        let mut out = String::new();
        s.render(&mut out, "x_seconds", "test", "");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 4"));
        assert!(out.contains("x_seconds_count 4"));
    }

    #[test]
    fn send_counters_render_per_topic() {
        let c = SendCounters::default();
        c.record("Trade", 2, 10);
        c.record("Trade", 1, 5);
        c.record("a\"b", 1, 1);
        assert_eq!(c.get("Trade"), (3, 15));
        let mut out = String::new();
        c.render(&mut out);
        assert!(
            out.contains("wharf_sent_messages_total{topic=\"Trade\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("wharf_sent_bytes_total{topic=\"Trade\"} 15"),
            "{out}"
        );
        assert!(out.contains("topic=\"a\\\"b\""), "{out}");
    }
}
