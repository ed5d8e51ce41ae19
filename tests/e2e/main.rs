//! End-to-end tests against the real `wharf` binary: one test executable, one module per area.
//!
//! Build the binary first (`cargo build -p wharf`, same profile as the tests) or point `WHARF_BIN`
//! at one; `.ci/run` does both.

mod consume;
mod crash;
mod defects;
mod delivery;
mod foundation;
mod harness;
mod listener;
mod mqtt;
mod mqtt_clients;
mod multihost;
mod plugin_runtime;
mod plugins;
mod postgres;
mod remoting;
mod security;
mod storefaults;
// The PostgreSQL test server, shared with the host crate's PostgreSQL tests.
#[allow(dead_code)]
#[path = "../../host/src/store/postgres/testdb.rs"]
mod testdb;
