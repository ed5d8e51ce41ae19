//! Wharf: a message broker, MQTT gateway and WebAssembly consumer runtime in one host.

pub mod bench;
pub mod broker;
pub mod clock;
pub mod error;
pub mod metrics;
pub mod model;
pub mod plugin;
pub mod store;
