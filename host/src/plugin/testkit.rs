//! Test support: builds the wasm test components from `plugins/` once per test process.
//!
//! `.ci/run` builds them first (`cargo build --release --target wasm32-wasip2 -p probe
//! -p order-timeout -p logistics -p flaky -p consume-only`), then this finds them in
//! `target/wasm32-wasip2/release`. When run alone, it builds them into `target/plugin-test-build`
//! (a separate target dir, so the outer `cargo test` lock is not contended).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Packages built for tests.
const PACKAGES: [&str; 5] = [
    "probe",
    "order-timeout",
    "logistics",
    "flaky",
    "consume-only",
];

/// Bytes of the built component of `package` (e.g. `probe`).
pub fn component(package: &str) -> Vec<u8> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = workspace_root();
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let ci = target_dir.join("wasm32-wasip2/release");
        if std::env::var_os("CI").is_some()
            && PACKAGES
                .iter()
                .all(|p| ci.join(format!("{}.wasm", p.replace('-', "_"))).exists())
        {
            return ci;
        }
        let target = root.join("target/plugin-test-build");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&root)
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .env("CARGO_TARGET_DIR", &target);
        for p in PACKAGES {
            cmd.args(["-p", p]);
        }
        let status = cmd.status().expect("run cargo to build test plugins");
        assert!(status.success(), "building the test plugins failed");
        target.join("wasm32-wasip2/release")
    });
    let path = dir.join(format!("{}.wasm", package.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
