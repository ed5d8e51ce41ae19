//! Pieces every benchmark needs: flush-mode parsing, a scratch store directory that is removed
//! however the run ends, a broker over a fresh store, resident memory, and the start/stop
//! waits of the peer processes some benches compare against.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::broker::api::BrokerApi;
use crate::broker::{BrokerConfig, ConsumeModel, GroupKind, GroupSpec};
use crate::clock::{SharedClock, SystemClock};
use crate::store::{FlushMode, Store, StoreConfig, open_store};

/// Parses `--flush`: `sync` (acknowledge after fsync) or `async` (after write).
pub fn parse_flush(s: &str) -> Result<FlushMode, String> {
    match s {
        "sync" => Ok(FlushMode::Sync),
        "async" => Ok(FlushMode::Async),
        _ => Err(format!("'{s}' is not a flush mode; use sync or async")),
    }
}

/// A bench's data directory; removed on drop when the bench created it itself.
pub struct ScratchDir {
    path: PathBuf,
    owned: bool,
}

impl ScratchDir {
    /// `given` as is (kept afterwards), else a fresh `./<prefix>-<pid>` in the current
    /// directory — on the current disk, not /tmp, which is often tmpfs where fsync is free.
    pub fn new(given: Option<&Path>, prefix: &str) -> anyhow::Result<ScratchDir> {
        Ok(match given {
            Some(d) => ScratchDir {
                path: d.to_path_buf(),
                owned: false,
            },
            None => ScratchDir {
                path: std::env::current_dir()
                    .context("read the current directory")?
                    .join(format!("{prefix}-{}", std::process::id())),
                owned: true,
            },
        })
    }

    /// A fresh `<temp dir>/<prefix>-<pid>`, created now and removed on drop; for files whose
    /// disk does not matter (configs, logs).
    pub fn temp(prefix: &str) -> anyhow::Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(ScratchDir { path, owned: true })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Opens the store in `dir` with `flush` and a broker over it, on the system clock.
pub async fn open_broker(
    dir: &Path,
    flush: FlushMode,
) -> anyhow::Result<(BrokerApi, Arc<dyn Store>, SharedClock)> {
    let config = StoreConfig {
        data_dir: dir.to_path_buf(),
        flush,
        ..StoreConfig::default()
    };
    open_broker_on(&config).await
}

/// Opens the store `config` names (any backend) and a broker over it, on the system clock.
pub async fn open_broker_on(
    config: &StoreConfig,
) -> anyhow::Result<(BrokerApi, Arc<dyn Store>, SharedClock)> {
    let clock: SharedClock = Arc::new(SystemClock::default());
    let store: Arc<dyn Store> = open_store(config, clock.clone())
        .await
        .context("open the store")?;
    let broker = crate::broker::Broker::open(BrokerConfig::default(), store.clone(), clock.clone())
        .await
        .context("open the broker")?;
    let broker = BrokerApi::new(broker);
    Ok((broker, store, clock))
}

/// Creates the clustering consumer group `name` with the default retry settings.
pub async fn create_consumer_group(broker: &BrokerApi, name: &str) -> anyhow::Result<()> {
    broker
        .create_group(GroupSpec {
            name: name.into(),
            kind: GroupKind::Consumer,
            model: ConsumeModel::Clustering,
            max_reconsume_times: None,
            consume_timeout_ms: None,
        })
        .await?;
    Ok(())
}

/// Resident set size of this process in bytes (Linux `/proc/self/status` VmRSS).
pub fn rss_bytes() -> Option<u64> {
    rss_of("self")
}

/// Resident set size of process `pid` in bytes.
pub fn rss_bytes_of(pid: u32) -> Option<u64> {
    rss_of(&pid.to_string())
}

fn rss_of(proc_dir: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{proc_dir}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A local port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("find a free local port")?;
    Ok(l.local_addr()?.port())
}

/// Polls until the peer process `label` (its `child`) accepts connections on `addr`; fails with
/// `log()` (what explains it) if the process exits first (then `child` is cleared) or after
/// `timeout`.
pub fn wait_listening(
    label: &str,
    addr: SocketAddr,
    child: &mut Option<Child>,
    timeout: Duration,
    log: impl Fn() -> String,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(c) = child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            *child = None;
            bail!(
                "{label} exited ({status}) before listening on {addr}; its log:\n{}",
                log()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{label} did not listen on {addr} within {timeout:?}; its log:\n{}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `timeout` for `child` to exit after it was asked to stop; true if it did.
pub fn wait_exited(child: &mut Child, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_modes_parse() {
        assert_eq!(parse_flush("sync"), Ok(FlushMode::Sync));
        assert_eq!(parse_flush("async"), Ok(FlushMode::Async));
        assert!(parse_flush("fast").is_err());
    }

    #[test]
    fn scratch_dir_is_removed_only_when_owned() {
        let kept = std::env::temp_dir().join(format!("wharf-util-kept-{}", std::process::id()));
        std::fs::create_dir_all(&kept).unwrap();
        drop(ScratchDir::new(Some(&kept), "unused").unwrap());
        assert!(kept.exists());
        std::fs::remove_dir_all(&kept).unwrap();

        let owned = ScratchDir::new(None, "wharf-util-test").unwrap();
        let path = owned.path().to_path_buf();
        std::fs::create_dir_all(&path).unwrap();
        drop(owned);
        assert!(!path.exists());

        let temp = ScratchDir::temp("wharf-util-temp").unwrap();
        let path = temp.path().to_path_buf();
        assert!(path.is_dir());
        drop(temp);
        assert!(!path.exists());
    }

    #[test]
    fn rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(rss_bytes().is_some_and(|b| b > 0));
            assert_eq!(
                rss_bytes_of(std::process::id()).is_some(),
                rss_bytes().is_some()
            );
        }
    }
}
