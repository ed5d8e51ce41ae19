//! A real PostgreSQL 15 for tests, from Debian's `postgresql-15` package (std and libc only,
//! so the end-to-end tests include this same file).
//!
//! [`PgServer::shared`]: one server per test run. nextest runs every test in its own process,
//! so the server is shared by all processes with the same parent (the test runner) through a
//! directory keyed by the parent's pid, created under a file lock by whichever test comes
//! first. A watchdog stops it and deletes the directory once the runner has exited.
//! [`PgServer::private`]: a server of one test's own, which it may stop and start again (an
//! outage); stopped and deleted on drop, or by its watchdog if the test process dies.
//!
//! Either way: `initdb` and `pg_ctl` run as the `postgres` user when we are root (the server
//! refuses root), on a free port, trust authentication, the unix socket in the server's
//! directory.

use std::fs::{self, File};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where Debian's postgresql-15 package puts the server binaries.
const BIN: &str = "/usr/lib/postgresql/15/bin";

static SHARED: OnceLock<PgServer> = OnceLock::new();
static NEXT_PRIVATE: AtomicU32 = AtomicU32::new(0);

/// A PostgreSQL server started for tests.
pub struct PgServer {
    base: PathBuf,
    port: u16,
    private: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a server binary, as the postgres user when we are root.
fn pg_command(tool: &str) -> Command {
    let path = Path::new(BIN).join(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

fn answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Stops the server in `base` and removes `base` and `also` once process `pid` is gone.
#[expect(
    clippy::zombie_processes,
    reason = "the watchdog must outlive this test process; init reaps it"
)]
fn spawn_watchdog(base: &Path, pid: u32, also: Option<&Path>) {
    let data = base.join("data");
    let runuser = if is_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         {runuser}{BIN}/pg_ctl -D '{}' -m immediate stop >/dev/null 2>&1; rm -rf '{}' '{}'",
        data.display(),
        base.display(),
        also.map_or(PathBuf::new(), Path::to_path_buf).display()
    );
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn the test server's watchdog");
}

fn lock_path(runner: u32) -> PathBuf {
    std::env::temp_dir().join(format!("wharf-pg-{runner}.lock"))
}

impl PgServer {
    /// Creates a cluster in `base/data` and starts it on a free port.
    fn init(base: &Path, private: bool) -> PgServer {
        assert!(
            Path::new(BIN).join("initdb").exists(),
            "PostgreSQL 15 is not installed ({BIN}/initdb is missing); the PostgreSQL tests \
             need Debian's postgresql-15 package: apt-get install -y postgresql-15"
        );
        let _ = fs::remove_dir_all(base.join("data"));
        fs::create_dir_all(base).expect("create the test server directory");
        if is_root() {
            let mut c = Command::new("chown");
            c.arg("postgres:postgres").arg(base);
            run(c, "chown of the test server directory");
        }
        let mut init = pg_command("initdb");
        init.arg("-D").arg(base.join("data")).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(init, "initdb");
        let s = PgServer {
            base: base.to_path_buf(),
            port: free_port(),
            private,
        };
        s.start();
        s
    }

    /// The server every test of this run shares (each test makes its own database on it).
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(|| {
            let runner = std::os::unix::process::parent_id();
            let base = std::env::temp_dir().join(format!("wharf-pg-{runner}"));
            let lock = File::create(lock_path(runner)).expect("create the test server lock file");
            lock.lock().expect("lock the test server directory");
            let port_file = base.join("port");
            let known = fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.trim().parse::<u16>().ok())
                .filter(|p| answers(*p));
            let server = match known {
                Some(port) => PgServer {
                    base,
                    port,
                    private: false,
                },
                None => {
                    let s = PgServer::init(&base, false);
                    let mut f = File::create(&port_file).expect("write the port file");
                    let _ = writeln!(f, "{}", s.port);
                    spawn_watchdog(&base, runner, Some(&lock_path(runner)));
                    s
                }
            };
            let _ = lock.unlock();
            server
        })
    }

    /// A server of the calling test's own.
    pub fn private() -> PgServer {
        let base = std::env::temp_dir().join(format!(
            "wharf-pg-own-{}-{}",
            std::process::id(),
            NEXT_PRIVATE.fetch_add(1, Ordering::Relaxed)
        ));
        let s = PgServer::init(&base, true);
        spawn_watchdog(&base, std::process::id(), None);
        s
    }

    /// The URL of database `db` (trust auth: the password is sent but not checked).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:pw-not-checked@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// Starts the (stopped) server again on the same port.
    pub fn start(&self) {
        // fsync off: the tests check what the store makes visible and when, not the disk.
        let opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c fsync=off -c full_page_writes=off -c max_connections=300",
            self.port,
            self.base.display()
        );
        let mut ctl = pg_command("pg_ctl");
        // Its own process group: the server outlives the test process that started it
        // (the shared one serves every later test), whatever the runner does to that group.
        use std::os::unix::process::CommandExt;
        ctl.process_group(0);
        ctl.arg("-D")
            .arg(self.base.join("data"))
            .arg("-l")
            .arg(self.base.join("server.log"))
            .args(["-w", "-o", &opts, "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        run(ctl, "pg_ctl start");
    }

    /// Stops the server (fast shutdown: open connections are cut, as in an outage).
    pub fn stop(&self) {
        let mut ctl = pg_command("pg_ctl");
        ctl.arg("-D")
            .arg(self.base.join("data"))
            .args(["-m", "fast", "-w", "stop"]);
        run(ctl, "pg_ctl stop");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.private {
            let mut ctl = pg_command("pg_ctl");
            ctl.arg("-D")
                .arg(self.base.join("data"))
                .args(["-m", "immediate", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = ctl.status();
            let _ = fs::remove_dir_all(&self.base);
        }
    }
}
