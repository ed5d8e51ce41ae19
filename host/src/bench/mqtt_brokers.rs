//! The brokers `wharf bench mqtt` measures, each a child process on a loopback port: this very
//! binary as `wharf serve` (open mode, a scratch data dir, a chosen `[store] flush`) and Debian's
//! Mosquitto with a generated minimal config. Both are stopped on drop.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

use super::util::{ScratchDir, free_port, rss_bytes_of, wait_exited, wait_listening};
use crate::store::FlushMode;

/// Where Debian installs the Mosquitto broker.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// How long a broker may take to start listening or to stop.
const START_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A broker child process under measurement.
pub struct BrokerProcess {
    /// Shown in the table, e.g. `wharf flush=sync`.
    pub label: String,
    /// Its MQTT TCP listener.
    pub addr: SocketAddr,
    child: Option<Child>,
    log: std::path::PathBuf,
    // Declared last: the directories go only after the process has stopped.
    _data: Option<ScratchDir>,
    _dir: ScratchDir,
}

impl BrokerProcess {
    /// Starts `wharf serve` (this executable) in open mode with `flush`, data in `data_dir`
    /// (default a fresh directory on the current disk).
    pub fn wharf(flush: FlushMode, data_dir: Option<&Path>) -> anyhow::Result<BrokerProcess> {
        let flush_name = match flush {
            FlushMode::Sync => "sync",
            FlushMode::Async => "async",
        };
        let dir = ScratchDir::temp(&format!("wharf-bench-mqtt-{flush_name}"))?;
        let data = ScratchDir::new(data_dir, &format!("wharf-bench-mqtt-data-{flush_name}"))?;
        let conf = dir.path().join("wharf.toml");
        std::fs::write(&conf, wharf_config(flush_name))
            .with_context(|| format!("write {}", conf.display()))?;
        let log = dir.path().join("wharf.log");
        let exe = std::env::current_exe().context("find this executable")?;
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut child = Command::new(&exe)
            .arg("serve")
            .arg("--config")
            .arg(&conf)
            .arg("--data-dir")
            .arg(data.path())
            .args([
                "--http",
                "127.0.0.1:0",
                "--mqtt",
                "127.0.0.1:0",
                "--remoting",
                "",
            ])
            // No plugins: `[plugins] dir` is relative and this directory has none.
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("start {} serve", exe.display()))?;
        let stdout = child.stdout.take().context("wharf serve stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = mqtt_addr_from_listening_line(&line) {
                    let _ = tx.send(addr);
                }
            }
        });
        let mut p = BrokerProcess {
            label: format!("wharf flush={flush_name}"),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            child: Some(child),
            log,
            _data: Some(data),
            _dir: dir,
        };
        match rx.recv_timeout(START_STOP_TIMEOUT) {
            Ok(addr) => p.addr = addr,
            Err(_) => bail!(
                "wharf serve printed no `wharf: listening … mqtt=` line within {START_STOP_TIMEOUT:?}; its log:\n{}",
                p.log_text()
            ),
        }
        Ok(p)
    }

    /// Starts Mosquitto on a free loopback port with the generated config.
    pub fn mosquitto(binary: &Path) -> anyhow::Result<BrokerProcess> {
        if !binary.is_file() {
            bail!(
                "Mosquitto not found at {}; install it with `apt-get install -y mosquitto` \
                 (or pass --no-mosquitto)",
                binary.display()
            );
        }
        let dir = ScratchDir::temp("wharf-bench-mosquitto")?;
        let port = free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, mosquitto_config(port))
            .with_context(|| format!("write {}", conf.display()))?;
        let log = dir.path().join("mosquitto.log");
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let mut p = BrokerProcess {
            label: format!("mosquitto {}", mosquitto_version(binary)),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            child: Some(child),
            log,
            _data: None,
            _dir: dir,
        };
        p.wait_listening()?;
        Ok(p)
    }

    /// Polls until the port accepts connections; fails with the log if the process exits first.
    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let (label, addr, log) = (self.label.clone(), self.addr, self.log.clone());
        wait_listening(&label, addr, &mut self.child, START_STOP_TIMEOUT, || {
            log_tail(&log)
        })
    }

    /// The process id (for its resident memory).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident set size of the broker process in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes_of(self.pid()?)
    }

    /// Fails when the broker has died (a crash under load must not pass for a slow row).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.child = None;
            bail!(
                "{} exited ({status}) during the run; its log:\n{}",
                self.label,
                self.log_text()
            );
        }
        Ok(())
    }

    fn log_text(&self) -> String {
        log_tail(&self.log)
    }

    /// SIGTERM, then SIGKILL after the timeout.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on the pid of a child this process spawned and has not reaped.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        if rc == 0 && wait_exited(&mut child, START_STOP_TIMEOUT)? {
            return Ok(());
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "{} (pid {}) did not stop on SIGTERM within {START_STOP_TIMEOUT:?}; killed it; its log:\n{}",
            self.label,
            child.id(),
            self.log_text()
        )
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// The config of the measured `wharf serve`: open mode, warnings only (a log line per
/// connection would measure the logger), the flush mode under test.
fn wharf_config(flush: &str) -> String {
    format!("[store]\nflush = \"{flush}\"\n\n[mqtt]\nmode = \"open\"\n\n[log]\nfilter = \"warn\"\n")
}

/// Mosquitto's config: one loopback listener, anonymous, no persistence file, TCP_NODELAY like
/// Wharf, and every queue limit left at its default (`max_queued_messages 1000`), as shipped.
fn mosquitto_config(port: u16) -> String {
    format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
         set_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n"
    )
}

/// `2.0.11` from `mosquitto -h`'s first line, or `?`.
fn mosquitto_version(binary: &Path) -> String {
    let out = Command::new(binary)
        .arg("-h")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    out.ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .unwrap_or_else(|| "?".into())
}

/// The `mqtt=ADDR` of serve's `wharf: listening …` line.
fn mqtt_addr_from_listening_line(line: &str) -> Option<SocketAddr> {
    let rest = line.strip_prefix("wharf: listening ")?;
    rest.split_whitespace()
        .find_map(|kv| kv.strip_prefix("mqtt="))
        .and_then(|a| a.parse().ok())
}

/// The last 40 lines of a log: what explains an exit.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Raises this process's open-file limit to at least `want` (children inherit it), up to the
/// hard limit; returns the soft limit now in force.
pub fn raise_fd_limit(want: u64) -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    lim.rlim_cur = want.min(lim.rlim_max);
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!(
            "setrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_gives_the_mqtt_address() {
        assert_eq!(
            mqtt_addr_from_listening_line(
                "wharf: listening http=127.0.0.1:4000 mqtt=127.0.0.1:1883 mqtts=127.0.0.1:8883"
            ),
            Some("127.0.0.1:1883".parse().unwrap())
        );
        assert_eq!(
            mqtt_addr_from_listening_line("wharf: listening http=127.0.0.1:4000"),
            None
        );
        assert_eq!(mqtt_addr_from_listening_line("mqtt=127.0.0.1:1"), None);
    }

    #[test]
    fn configs_name_what_is_measured() {
        let w = wharf_config("sync");
        assert!(
            w.contains("flush = \"sync\"") && w.contains("mode = \"open\""),
            "{w}"
        );
        let parsed: crate::config::Config = toml::from_str(&w).expect("a valid wharf config");
        assert_eq!(parsed.mqtt.mode, Some(crate::config::MqttMode::Open));
        let m = mosquitto_config(18831);
        assert!(m.contains("listener 18831 127.0.0.1"), "{m}");
        assert!(m.contains("allow_anonymous true") && m.contains("set_tcp_nodelay true"));
        assert!(
            !m.contains("max_queued_messages"),
            "Mosquitto runs with its default queue limit"
        );
    }

    #[test]
    fn fd_limit_is_at_least_what_it_was() {
        let now = raise_fd_limit(0).unwrap();
        assert!(raise_fd_limit(now).unwrap() >= now);
    }
}
