//! Wharf: a message broker, MQTT gateway and WebAssembly consumer runtime in one host.

pub mod bench;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crashpoint;
pub mod error;
pub mod http;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod net;
pub mod plugin;
pub mod remoting;
pub mod serve;
pub mod store;
