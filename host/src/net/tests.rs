//! The accept loop against real sockets: the cap, shutdown with and without a grace overrun, and
//! recovery from running out of file descriptors.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{Backoff, Connection, Handler, Listener, Shutdown, is_peer_gone};

/// Reports each connection, then holds it until the client closes (ignoring shutdown).
struct Hold(mpsc::UnboundedSender<SocketAddr>);

impl Handler for Hold {
    async fn serve(&self, mut conn: Connection) {
        let _ = self.0.send(conn.peer);
        let mut buf = [0u8; 64];
        while matches!(conn.stream.read(&mut buf).await, Ok(n) if n > 0) {}
    }
}

/// Says "bye" and closes as soon as the host stops.
struct Polite;

impl Handler for Polite {
    async fn serve(&self, mut conn: Connection) {
        conn.shutdown.cancelled().await;
        let _ = conn.stream.write_all(b"bye").await;
    }
}

async fn start<H: Handler>(cap: usize, handler: H) -> (Shutdown, SocketAddr) {
    let listener = Listener::bind("test", "127.0.0.1:0", cap).await.unwrap();
    let addr = listener.local_addr();
    let shutdown = Shutdown::new();
    shutdown.serve(listener, handler);
    (shutdown, addr)
}

/// Reads until the server closes; returns what it sent.
async fn read_to_close(c: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out).await;
    out
}

#[tokio::test]
async fn past_the_cap_a_connection_waits_until_one_closes() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (shutdown, addr) = start(1, Hold(tx)).await;
    let a = TcpStream::connect(addr).await.unwrap();
    assert_eq!(seen.recv().await, Some(a.local_addr().unwrap()));
    // The kernel completes the handshake (the backlog), but the loop does not accept it. (A wrong
    // loop would hand it over at once; waiting longer only makes a wrong pass less likely.)
    let b = TcpStream::connect(addr).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), seen.recv())
            .await
            .is_err(),
        "a second connection was served past max_connections = 1"
    );
    drop(a);
    assert_eq!(seen.recv().await, Some(b.local_addr().unwrap()));
    drop(b);
    assert!(shutdown.stop(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn stop_lets_connections_finish_and_closes_the_socket() {
    let (shutdown, addr) = start(8, Polite).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    // Wait until the connection is being served: a write is only answered by a live handler.
    c.write_all(b"hi").await.unwrap();
    let stop = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { shutdown.stop(Duration::from_secs(30)).await }
    });
    assert_eq!(read_to_close(&mut c).await, b"bye");
    assert!(stop.await.unwrap(), "every connection finished in time");
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "the listener socket is closed after stop");
}

#[tokio::test]
async fn past_the_grace_period_connections_are_cut() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (shutdown, addr) = start(8, Hold(tx)).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    seen.recv().await.unwrap();
    assert!(
        !shutdown.stop(Duration::from_millis(50)).await,
        "a handler that ignores shutdown is cut, and stop says so"
    );
    assert!(read_to_close(&mut c).await.is_empty());
}

#[test]
fn accept_backoff_doubles_to_a_ceiling_and_resets() {
    let mut b = Backoff::default();
    let delays: Vec<u64> = (0..10).map(|_| b.next().as_millis() as u64).collect();
    assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
    b.reset();
    assert_eq!(b.next(), Backoff::FIRST);
}

#[test]
fn only_per_connection_accept_errors_skip_the_back_off() {
    assert!(is_peer_gone(&io::Error::from(
        io::ErrorKind::ConnectionAborted
    )));
    assert!(is_peer_gone(&io::Error::from(
        io::ErrorKind::ConnectionReset
    )));
    // EMFILE, ENFILE, ENOBUFS
    for errno in [24, 23, 105] {
        assert!(!is_peer_gone(&io::Error::from_raw_os_error(errno)));
    }
}

/// Running out of file descriptors makes `accept` fail; the loop must outlive it.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_loop_survives_running_out_of_file_descriptors() {
    // The descriptor limit is per process: under `cargo test` the other tests share it.
    if std::env::var_os("NEXTEST").is_none() {
        eprintln!("skipped: needs a process of its own (run it with cargo nextest)");
        return;
    }
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (shutdown, addr) = start(8, Hold(tx)).await;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit/dup/close on this process's own limits and descriptors.
    let saved = unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let saved = limit;
        // Few enough free descriptors to use them all up quickly.
        limit.rlim_cur = (std::fs::read_dir("/proc/self/fd").unwrap().count() + 64) as u64;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        saved
    };
    let mut spare = Vec::new();
    loop {
        // SAFETY: duplicating stdin only takes a descriptor number.
        let fd = unsafe { libc::dup(0) };
        if fd < 0 {
            break;
        }
        spare.push(fd);
    }
    // One descriptor for the client; then the host's accept has none left.
    // SAFETY: `fd` is a descriptor this test duplicated above.
    unsafe { libc::close(spare.pop().unwrap()) };
    let client = std::net::TcpStream::connect(addr).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), seen.recv())
            .await
            .is_err(),
        "accept cannot succeed without a free descriptor"
    );
    for fd in spare {
        // SAFETY: as above.
        unsafe { libc::close(fd) };
    }
    let got = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
    // SAFETY: restores the limit read above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &saved) };
    assert_eq!(
        got.ok().flatten(),
        Some(client.local_addr().unwrap()),
        "after descriptors free up, the same loop accepts the waiting connection"
    );
    drop(client);
    assert!(shutdown.stop(Duration::from_secs(5)).await);
}
