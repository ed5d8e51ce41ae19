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

target_dir=${CARGO_TARGET_DIR:-target}

# Plugins that ship a manifest are deployable examples; build them for the component target and
# put each component where its manifest's `component = "..."` points.
crates=()
dirs=()
for manifest in plugins/*/plugin.toml; do
    [ -e "$manifest" ] || continue
    dir=$(dirname "$manifest")
    crates+=("$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$dir/Cargo.toml" | head -n1)")
    dirs+=("$dir")
done
if [ ${#crates[@]} -gt 0 ]; then
    args=()
    for c in "${crates[@]}"; do args+=(-p "$c"); done
    cargo build --release --target wasm32-wasip2 "${args[@]}"
    for i in "${!crates[@]}"; do
        dir=${dirs[$i]}
        component=$(sed -n 's/^component *= *"\(.*\)"/\1/p' "$dir/plugin.toml" | head -n1)
        built="$target_dir/wasm32-wasip2/release/${crates[$i]//-/_}.wasm"
        cp "$built" "$dir/$component"
        echo "plugin ${crates[$i]}: $dir/$component"
    done
fi

cargo build --release -p wharf
exec "$target_dir/release/wharf" serve "$@"
