#!/usr/bin/env bash
# Builds every example plugin (and the test probe) as wasm components into
# target/wasm32-wasip2/release/, where the plugin.toml files point.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --target wasm32-wasip2 -p order-timeout -p logistics -p flaky -p probe -p consume-only
