//! `[broker]` config section.

use serde::{Deserialize, Serialize};

/// Broker limits and schedules.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// `default_queues = 8`: queues of a topic created without `queues`.
    pub default_queues: u32,
    /// `max_body_bytes = 262144`: body cap (at most 4 MiB).
    pub max_body_bytes: usize,
    /// `max_properties_bytes = 32767`: encoded properties cap.
    pub max_properties_bytes: usize,
    /// `max_delay_ms = 3456000000`: furthest start-deliver time ahead (40 days).
    pub max_delay_ms: u64,
    /// `retry_delay_scale = 1.0`: multiplies every retry delay; tests use e.g. 0.001.
    pub retry_delay_scale: f64,
    /// `consumer_heartbeat_timeout_ms = 30000`: an instance silent this long is removed.
    pub consumer_heartbeat_timeout_ms: u64,
    /// `max_in_flight_messages = 5000`: delivered-but-unsettled messages one consumer instance
    /// may hold; receive hands out fewer (or none) beyond it.
    pub max_in_flight_messages: usize,
    /// `max_in_flight_bytes = 536870912`: the same cap in body bytes (512 MiB).
    pub max_in_flight_bytes: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            default_queues: 8,
            max_body_bytes: 256 * 1024,
            max_properties_bytes: 32_767,
            max_delay_ms: 40 * 24 * 3600 * 1000,
            retry_delay_scale: 1.0,
            consumer_heartbeat_timeout_ms: 30_000,
            max_in_flight_messages: 5_000,
            max_in_flight_bytes: 512 * 1024 * 1024,
        }
    }
}

/// Hard ceiling on total message size, whatever the config says.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
