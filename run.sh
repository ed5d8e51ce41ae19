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
wharf=target/release/wharf

# The host address `serve` will bind (default, or --http ADDR among the arguments).
http=127.0.0.1:8080
prev=""
for a in "$@"; do
    [ "$prev" = "--http" ] && http=$a
    case "$a" in --http=*) http=${a#--http=} ;; esac
    prev=$a
done
export WHARF_SERVER="http://${http/0.0.0.0/127.0.0.1}"

"$wharf" serve "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid"' INT TERM

# Topics must exist before anything is sent to them (spec: TOPIC_NOT_EXIST). On a fresh data
# dir, create the ones the example plugins use, then deploy the plugins the host skipped at
# start for want of them. Both steps are no-ops when already done.
for _ in $(seq 1 100); do
    curl -fs "$WHARF_SERVER/healthz" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || wait "$pid"
    sleep 0.1
done
for topic in Trade Notify Flaky Plain GID_iot_MQTT DeviceState; do
    "$wharf" topic create "$topic" >/dev/null 2>&1 || true
done
# MQTT clients GID_iot@@@<device> (device-presence tracks them).
"$wharf" group create GID_iot --kind mqtt >/dev/null 2>&1 || true
for manifest in plugins/*/plugin.toml; do
    name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$manifest" | head -n1)
    if ! "$wharf" plugin status "$name" >/dev/null 2>&1; then
        "$wharf" plugin deploy "$manifest"
    fi
done
echo "run.sh: host ready at $WHARF_SERVER with the example plugins; Ctrl-C stops it"
wait "$pid"
