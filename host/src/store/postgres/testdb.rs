//! A real PostgreSQL 15 for tests, from Debian's `postgresql-15` package.
//!
//! One server per test run: nextest runs every test in its own process, so the server is
//! shared by all processes with the same parent (the test runner) through a directory keyed by
//! the parent's pid, created under a file lock by whichever test comes first (`initdb` and
//! `pg_ctl` as the `postgres` user when running as root, on a free port, its unix socket in
//! that directory). A watchdog stops the server and deletes the directory once the runner has
//! exited. Every test gets its own fresh database (`CREATE DATABASE t_<pid>_<n>`).

use std::fs::{self, File};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

/// Where Debian's postgresql-15 package puts the server binaries.
const BIN: &str = "/usr/lib/postgresql/15/bin";

struct Server {
    port: u16,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a server binary, as the postgres user when we are root (the server refuses root).
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

fn start(base: &Path) -> u16 {
    assert!(
        Path::new(BIN).join("initdb").exists(),
        "PostgreSQL 15 is not installed ({BIN}/initdb is missing); the PostgreSQL tests need \
         Debian's postgresql-15 package: apt-get install -y postgresql-15"
    );
    let _ = fs::remove_dir_all(base.join("data"));
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(base);
                c
            },
            "chown of the test server directory",
        );
    }
    let data = base.join("data");
    let mut init = pg_command("initdb");
    init.arg("-D").arg(&data).args([
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
    let port = free_port();
    // fsync off: the tests check what the store makes visible and when, not the disk.
    let opts = format!(
        "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
         -c fsync=off -c full_page_writes=off -c max_connections=300",
        base.display()
    );
    let mut ctl = pg_command("pg_ctl");
    ctl.arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(base.join("server.log"))
        .args(["-w", "-o", &opts, "start"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    run(ctl, "pg_ctl start");
    port
}

/// Stops the server and removes its directory once process `runner` is gone.
#[expect(
    clippy::zombie_processes,
    reason = "the watchdog must outlive this test process; init reaps it"
)]
fn spawn_watchdog(base: &Path, runner: u32) {
    let data = base.join("data");
    let stop = if is_root() {
        format!(
            "runuser -u postgres -- {BIN}/pg_ctl -D '{}' -m immediate stop",
            data.display()
        )
    } else {
        format!("{BIN}/pg_ctl -D '{}' -m immediate stop", data.display())
    };
    let script = format!(
        "while kill -0 {runner} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; \
         rm -rf '{}' '{}'",
        base.display(),
        lock_path(runner).display()
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

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        let runner = std::os::unix::process::parent_id();
        let base: PathBuf = std::env::temp_dir().join(format!("wharf-pg-{runner}"));
        fs::create_dir_all(&base).expect("create the test server directory");
        let lock = File::create(lock_path(runner)).expect("create the test server lock file");
        lock.lock().expect("lock the test server directory");
        let port_file = base.join("port");
        let known = fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
            .filter(|p| answers(*p));
        let port = match known {
            Some(p) => p,
            None => {
                let p = start(&base);
                let mut f = File::create(&port_file).expect("write the port file");
                let _ = writeln!(f, "{p}");
                spawn_watchdog(&base, runner);
                p
            }
        };
        let _ = lock.unlock();
        Server { port }
    })
}

/// The URL of database `db` on the shared test server (trust auth: any password is accepted).
pub fn url(db: &str) -> String {
    format!(
        "postgres://postgres:pw-not-checked@127.0.0.1:{}/{db}",
        server().port
    )
}

/// Creates a fresh, empty database on the shared server and returns its URL.
pub async fn fresh_database() -> String {
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let port = tokio::task::spawn_blocking(|| server().port)
        .await
        .expect("start the test server");
    let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let mut c = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to the test server");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut c)
        .await
        .expect("create a test database");
    let _ = c.close().await;
    url(&name)
}
