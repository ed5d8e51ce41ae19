//! A do-nothing HTTP server for `wharf bench http --compare-nginx`: Debian's nginx, started by
//! the bench on a free port with a generated config, answering every request with a fixed send
//! receipt, so the same client measures what HTTP alone costs on this machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use super::util::{ScratchDir, free_port, wait_exited, wait_listening};

/// Where Debian installs nginx.
pub const NGINX: &str = "/usr/sbin/nginx";

/// What nginx answers to every request: the shape of Wharf's receipt for one sent message.
const RECEIPT: &str =
    r#"{"message_id":"0000019AD7E3F1A20000BEEF3ADE68B1","queue_id":0,"queue_offset":0}"#;

/// How long nginx may take to start listening or to stop.
const START_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Fails with the install command when nginx is missing, before anything else is measured.
pub fn check_installed() -> anyhow::Result<()> {
    if Path::new(NGINX).is_file() {
        return Ok(());
    }
    bail!(
        "--compare-nginx needs Debian's nginx at {NGINX}; install it with \
         `apt-get install -y nginx-light` (or `apt-get install -y nginx`) and run again"
    )
}

/// The generated config. `worker_processes auto` (one worker per core) because Wharf's host
/// serves HTTP on a runtime with one worker thread per core: a single nginx worker would be held
/// to one core and make Wharf's ratio look better than it is.
fn config(prefix: &Path, port: u16, connections: usize) -> String {
    let p = prefix.display();
    // Keep-alive limits raised so nginx never closes a bench connection mid-run (the default
    // `keepalive_requests 1000` would, and the client counts a closed connection as a failure).
    format!(
        "daemon off;
master_process on;
worker_processes auto;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{
    worker_connections {workers};
}}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{RECEIPT}';
        }}
    }}
}}
",
        workers = (connections * 2).max(1024),
    )
}

/// A running nginx; stopped on drop.
pub struct Nginx {
    child: Option<Child>,
    conf: PathBuf,
    addr: SocketAddr,
    // Declared last: the prefix directory goes only after nginx has stopped.
    dir: ScratchDir,
}

impl Nginx {
    /// Starts nginx on a free local port, ready for `connections` keep-alive connections.
    pub fn start(connections: usize) -> anyhow::Result<Nginx> {
        check_installed()?;
        let dir = ScratchDir::temp("wharf-bench-nginx")?;
        let port = free_port()?;
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config(dir.path(), port, connections))
            .with_context(|| format!("write {}", conf.display()))?;
        let child = Command::new(NGINX)
            .args(prefix_args(dir.path(), &conf))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {NGINX}"))?;
        let mut nginx = Nginx {
            child: Some(child),
            conf,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            dir,
        };
        nginx.wait_listening()?;
        Ok(nginx)
    }

    /// `host:port` to connect to.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Polls until nginx accepts connections; fails with its error log if it exits first.
    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let errors = self.dir.path().join("error.log");
        wait_listening(
            "nginx",
            self.addr,
            &mut self.child,
            START_STOP_TIMEOUT,
            || std::fs::read_to_string(&errors).unwrap_or_default(),
        )
    }

    /// Stops nginx (fast shutdown through its own `-s stop`, so the workers go too) and waits.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let signalled = Command::new(NGINX)
            .args(prefix_args(self.dir.path(), &self.conf))
            .args(["-s", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if signalled.as_ref().is_ok_and(|s| s.success())
            && wait_exited(&mut child, START_STOP_TIMEOUT)?
        {
            return Ok(());
        }
        // Last resort; the master's workers may outlive it, so say so.
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "nginx (pid {}) did not stop on `nginx -s stop`; killed the master, check for leftover `nginx: worker process` processes",
            child.id()
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// `-p PREFIX -c CONF -e ERRORLOG`: everything nginx touches stays in the bench's directory
/// (`-e` also covers the messages nginx logs before it has read the config).
fn prefix_args(prefix: &Path, conf: &Path) -> Vec<String> {
    vec![
        "-p".into(),
        prefix.display().to_string(),
        "-c".into(),
        conf.display().to_string(),
        "-e".into(),
        prefix.join("error.log").display().to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_everything_in_the_prefix_and_answers_a_receipt() {
        let c = config(Path::new("/tmp/x"), 18123, 16);
        for line in [
            "daemon off;",
            "worker_processes auto;",
            "pid /tmp/x/nginx.pid;",
            "error_log /tmp/x/error.log warn;",
            "access_log off;",
            "client_body_temp_path /tmp/x/body;",
            "listen 127.0.0.1:18123;",
            "default_type application/json;",
            "keepalive_requests 1000000000;",
            "worker_connections 1024;",
        ] {
            assert!(c.contains(line), "missing `{line}` in:\n{c}");
        }
        assert!(c.contains(&format!("return 200 '{RECEIPT}';")));
        assert!(config(Path::new("/p"), 1, 4000).contains("worker_connections 8000;"));
    }

    #[test]
    fn receipt_is_the_shape_wharf_answers() {
        let v: serde_json::Value = serde_json::from_str(RECEIPT).unwrap();
        assert_eq!(v["message_id"].as_str().map(str::len), Some(32));
        assert_eq!(v["queue_id"], 0);
        assert_eq!(v["queue_offset"], 0);
        assert!(
            !RECEIPT.contains('\''),
            "the receipt is quoted with ' in the config"
        );
    }
}
