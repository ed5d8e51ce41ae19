//! Test-only crash points: `WHARF_TEST_CRASH_AT=<point>[:<n>]` makes the host kill itself with
//! SIGKILL the `n`th time (default the first) it reaches `<point>`, so end-to-end tests can crash
//! it exactly inside a segment roll, a retention pass or a plugin deploy instead of hoping a
//! timed `kill -9` lands there. Never set in production, where it would only crash the host.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A log segment has been sealed and its successor created, before any record is in it.
pub const SEGMENT_ROLL: &str = "segment-roll";
/// A retention pass has just deleted an expired segment (queue minimums already moved), before
/// it deletes the next one, the key-index files it frees and writes the checkpoint.
pub const RETENTION: &str = "retention";
/// A plugin deploy has stored the new version's bytes, before the deployment record names it.
pub const DEPLOY_STORED: &str = "deploy-stored";
/// A plugin deploy has stored the deployment record naming the new version, before this host
/// stops the old version and starts it.
pub const DEPLOY_RECORDED: &str = "deploy-recorded";

struct Armed {
    point: String,
    nth: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("WHARF_TEST_CRASH_AT").ok()?;
            let (point, nth) = match v.split_once(':') {
                Some((p, n)) => (p, n.parse().ok()?),
                None => (v.as_str(), 1),
            };
            Some(Armed {
                point: point.to_string(),
                nth,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Kills the process with SIGKILL if `WHARF_TEST_CRASH_AT` names `point` and this is its
/// chosen hit; otherwise does nothing (one atomic load when unset).
pub fn reached(point: &str) {
    let Some(a) = armed() else {
        return;
    };
    if a.point != point || a.hits.fetch_add(1, Ordering::AcqRel) + 1 != a.nth {
        return;
    }
    eprintln!("wharf: test crash point '{point}' reached; killing the host with SIGKILL");
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
