#!/usr/bin/env bash
# Builds the example plugins and starts the host on the embedded store:
# HTTP API on 127.0.0.1:8080, data in ./data, config from config/wharf.toml, and every
# plugins/*/plugin.toml deployed at start. Extra arguments go to `wharf serve`
# (e.g. ./run.sh --http 0.0.0.0:8080 --data-dir /var/lib/wharf).
set -euo pipefail
cd "$(dirname "$0")"

channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
rustup toolchain install "$channel" --profile minimal --component rustfmt,clippy >/dev/null
rustup target add --toolchain "$channel" wasm32-wasip2 >/dev/null

# The example manifests name their components as ../../target/wasm32-wasip2/release/*.wasm.
export CARGO_TARGET_DIR="$PWD/target"

# Every plugin that ships a manifest is a deployable example.
args=()
for manifest in plugins/*/plugin.toml; do
    [ -e "$manifest" ] || continue
    crate=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$(dirname "$manifest")/Cargo.toml" | head -n1)
    args+=(-p "$crate")
done
if [ ${#args[@]} -gt 0 ]; then
    cargo build --release --target wasm32-wasip2 "${args[@]}"
fi

cargo build --release -p wharf
exec target/release/wharf serve "$@"
