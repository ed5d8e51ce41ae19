//! MQTT gateway counters for `/metrics` and the per-topic rates inspection shows.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::metrics::gauge;

/// Packet types in the order of their type numbers (1..=14).
const TYPES: [&str; 14] = [
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
];

fn type_index(name: &str) -> usize {
    TYPES.iter().position(|t| *t == name).unwrap_or(0)
}

/// Messages in and out of one broker topic through MQTT, for recent rates.
#[derive(Debug, Default, Clone, Copy)]
pub struct TopicCounts {
    /// Messages MQTT clients published to it.
    pub published: u64,
    /// Messages the router routed from it.
    pub routed: u64,
    /// Deliveries to MQTT clients.
    pub delivered: u64,
}

/// The gateway's counters.
#[derive(Debug, Default)]
pub struct MqttMetrics {
    /// Connections accepted (all listeners).
    pub connections_total: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
    packets_in: [AtomicU64; 14],
    packets_out: [AtomicU64; 14],
    /// Bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    /// QoS 0 messages dropped because a client's queue was full.
    pub dropped_qos0: AtomicU64,
    /// Clients disconnected because their QoS 1/2 queue passed the cap.
    pub overflow_disconnects: AtomicU64,
    /// Deliveries read back from the store for clients that fell behind the live stream.
    pub lagged_deliveries: AtomicU64,
    /// Connections closed for a malformed or oversized packet.
    pub protocol_errors: AtomicU64,
    /// Connections refused at CONNECT (any non-zero CONNACK).
    pub connect_refused: AtomicU64,
    /// Clean-session=false sessions kept (online or not).
    pub sessions_stored: AtomicU64,
    topics: Mutex<HashMap<String, TopicCounts>>,
}

impl MqttMetrics {
    /// Counts a packet read.
    pub fn packet_in(&self, name: &str) {
        self.packets_in[type_index(name)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts packets written.
    pub fn packets_out(&self, name: &str, n: u64) {
        self.packets_out[type_index(name)].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a publish by an MQTT client into a broker topic.
    pub fn record_published(&self, parent: &str, n: u64) {
        self.topics
            .lock()
            .entry(parent.to_owned())
            .or_default()
            .published += n;
    }

    /// Counts a message the router routed from a broker topic.
    pub fn record_in_router(&self, parent: &str) {
        let mut t = self.topics.lock();
        match t.get_mut(parent) {
            Some(c) => c.routed += 1,
            None => {
                t.insert(
                    parent.to_owned(),
                    TopicCounts {
                        routed: 1,
                        ..Default::default()
                    },
                );
            }
        }
    }

    /// Counts deliveries to clients from a broker topic.
    pub fn record_delivered(&self, parent: &str, n: u64) {
        let mut t = self.topics.lock();
        match t.get_mut(parent) {
            Some(c) => c.delivered += n,
            None => {
                t.insert(
                    parent.to_owned(),
                    TopicCounts {
                        delivered: n,
                        ..Default::default()
                    },
                );
            }
        }
    }

    /// Totals for one broker topic.
    pub fn topic(&self, parent: &str) -> TopicCounts {
        self.topics.lock().get(parent).copied().unwrap_or_default()
    }

    /// Every counter in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            out,
            "wharf_mqtt_connections_total",
            "counter",
            "MQTT connections accepted.",
            g(&self.connections_total),
        );
        gauge(
            out,
            "wharf_mqtt_connections",
            "gauge",
            "MQTT connections open now.",
            g(&self.connections_open),
        );
        for (dir, arr) in [("in", &self.packets_in), ("out", &self.packets_out)] {
            let _ = writeln!(
                out,
                "# HELP wharf_mqtt_packets_{dir}_total MQTT packets {dir}, by type."
            );
            let _ = writeln!(out, "# TYPE wharf_mqtt_packets_{dir}_total counter");
            for (i, t) in TYPES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "wharf_mqtt_packets_{dir}_total{{type=\"{t}\"}} {}",
                    g(&arr[i])
                );
            }
        }
        for (name, help, v) in [
            (
                "wharf_mqtt_bytes_in_total",
                "Bytes read from MQTT clients.",
                &self.bytes_in,
            ),
            (
                "wharf_mqtt_bytes_out_total",
                "Bytes written to MQTT clients.",
                &self.bytes_out,
            ),
            (
                "wharf_mqtt_dropped_qos0_total",
                "QoS 0 messages dropped because a client's queue was full.",
                &self.dropped_qos0,
            ),
            (
                "wharf_mqtt_overflow_disconnects_total",
                "Clients disconnected because their QoS 1/2 queue passed [mqtt] max_queued.",
                &self.overflow_disconnects,
            ),
            (
                "wharf_mqtt_lagged_deliveries_total",
                "Deliveries read back from the store for clients that fell behind the live stream.",
                &self.lagged_deliveries,
            ),
            (
                "wharf_mqtt_protocol_errors_total",
                "Connections closed for a malformed or oversized packet.",
                &self.protocol_errors,
            ),
            (
                "wharf_mqtt_connect_refused_total",
                "CONNECTs refused with a non-zero CONNACK.",
                &self.connect_refused,
            ),
        ] {
            gauge(out, name, "counter", help, g(v));
        }
        gauge(
            out,
            "wharf_mqtt_sessions_stored",
            "gauge",
            "Clean-session=false sessions kept (online or not).",
            g(&self.sessions_stored),
        );
    }
}
