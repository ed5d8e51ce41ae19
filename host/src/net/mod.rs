//! One listener and shutdown shape for every front end (HTTP, MQTT, remoting), and the TLS
//! setup they share ([`tls`]).
//!
//! A front end supplies only its per-connection function (a [`Handler`]); [`Listener`] owns the
//! accept loop and [`Shutdown`] owns the stop. The shape follows mini-redis's server:
//! - **Connection cap.** The loop takes a permit from the listener's semaphore *before* it accepts.
//!   Past `max_connections` it stops accepting, so new connections wait in the kernel's accept
//!   backlog and are served as soon as one closes (nginx does the same when `worker_connections`
//!   run out). Accepting and closing at once would instead turn a busy moment into a storm of
//!   reconnecting clients; a client that waits too long sees its own connect timeout. The loop
//!   logs a warning when it reaches the cap (at most once a minute).
//! - **Accept errors** never end the loop. A peer that gave up before we accepted is skipped; any
//!   other error (EMFILE, ENFILE, ENOBUFS, ...) is logged and retried after a back-off that doubles
//!   from 5 ms to 1 s, because retrying at once would spin on an error that only time clears.
//! - **Shutdown** is a [`CancellationToken`] plus a [`TaskTracker`] that every accept loop and every
//!   connection task runs on. [`Shutdown::stop`] cancels the token (loops stop accepting and drop
//!   their sockets; handlers finish the request in hand and close; long polls return), waits for
//!   the tracker to empty within the grace period, and past it cuts the remaining connections.
//! - Each connection runs in a `conn` tracing span with the listener's name and the peer address.

#[cfg(test)]
mod tests;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

/// Serves one accepted connection; a front end implements only this.
pub trait Handler: Send + Sync + 'static {
    /// Serves `conn` until it closes; once `conn.shutdown` is cancelled, finishes the request in
    /// hand and returns (the connection is cut anyway when the grace period ends).
    fn serve(&self, conn: Connection) -> impl Future<Output = ()> + Send;
}

/// One accepted connection, as a [`Handler`] gets it.
#[derive(Debug)]
pub struct Connection {
    /// The socket (TCP_NODELAY already set: small request/answer pairs would wait on Nagle).
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// Cancelled when the host starts stopping.
    pub shutdown: CancellationToken,
}

/// A bound socket with its name and connection cap, ready for [`Shutdown::serve`].
#[derive(Debug)]
pub struct Listener {
    name: &'static str,
    tcp: TcpListener,
    addr: SocketAddr,
    max_connections: usize,
}

impl Listener {
    /// Binds `listen` (`IP:PORT`; port 0 picks a free port) for the listener called `name`, which
    /// serves at most `max_connections` connections at once (0 counts as 1: it would never accept).
    pub async fn bind(
        name: &'static str,
        listen: &str,
        max_connections: usize,
    ) -> io::Result<Listener> {
        let tcp = TcpListener::bind(listen).await?;
        let addr = tcp.local_addr()?;
        Ok(Listener {
            name,
            tcp,
            addr,
            max_connections: max_connections.max(1),
        })
    }

    /// The address actually bound (the free port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The accept loop: runs until `stopping` is cancelled.
    async fn run<H: Handler>(self, handler: Arc<H>, shutdown: Shutdown) {
        let name = self.name;
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let mut backoff = Backoff::default();
        let mut cap_warned: Option<Instant> = None;
        loop {
            let permit = match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    if cap_warned.is_none_or(|t| t.elapsed() >= CAP_WARN_EVERY) {
                        cap_warned = Some(Instant::now());
                        warn!(
                            max_connections = self.max_connections,
                            "connection cap reached: new connections wait in the accept backlog \
                             until one closes (raise [{name}] max_connections if this is normal load)"
                        );
                    }
                    tokio::select! {
                        biased;
                        () = shutdown.stopping.cancelled() => break,
                        p = permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            // Never closed; ending the loop is the only sane answer if it were.
                            Err(_) => break,
                        },
                    }
                }
            };
            // Stopping wins over a connection that is ready at the same moment.
            let accepted = tokio::select! {
                biased;
                () = shutdown.stopping.cancelled() => break,
                r = self.tcp.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff.reset();
                    let _ = stream.set_nodelay(true);
                    let conn = Connection {
                        stream,
                        peer,
                        shutdown: shutdown.stopping.clone(),
                    };
                    let handler = handler.clone();
                    let cut = shutdown.cut.clone();
                    let span = info_span!(parent: None, "conn", listener = name, peer = %peer);
                    shutdown.tracker.spawn(
                        async move {
                            // Held for the connection's life: closing it frees a place under the cap.
                            let _permit = permit;
                            tokio::select! {
                                () = handler.serve(conn) => {}
                                () = cut.cancelled() => {
                                    debug!("connection cut: the shutdown grace period is over");
                                }
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(e) if is_peer_gone(&e) => {
                    debug!(error = %e, "peer left before its connection was accepted");
                }
                Err(e) => {
                    let delay = backoff.next();
                    warn!(
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot accept a connection (out of file descriptors or memory?); retrying"
                    );
                    tokio::select! {
                        () = shutdown.stopping.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        debug!("stopped accepting");
    }
}

/// How often the "connection cap reached" warning may repeat.
const CAP_WARN_EVERY: Duration = Duration::from_secs(60);

/// Accept errors that concern one connection only: the next accept can go ahead at once.
fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// Delay before retrying a failed accept: doubles from [`Backoff::FIRST`] up to [`Backoff::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Backoff::FIRST,
        }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    /// The delay to wait now; the one after it is twice as long, up to the maximum.
    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(Backoff::MAX);
        d
    }

    /// A successful accept: the next failure starts from the first delay again.
    fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }
}

/// The host's stop: one token and one task tracker for every listener and connection.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled by [`Shutdown::stop`]: stop accepting, finish in-flight work.
    stopping: CancellationToken,
    /// Cancelled when the grace period is over: drop whatever is still running.
    cut: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A shutdown that has not started.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Cancelled when the host starts stopping; long-running work (long polls) watches it.
    pub fn token(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Runs `listener`'s accept loop on the tracker, handing each connection to `handler`.
    pub fn serve<H: Handler>(&self, listener: Listener, handler: H) {
        let span =
            info_span!(parent: None, "listener", listener = listener.name, addr = %listener.addr);
        self.tracker.spawn(
            listener
                .run(Arc::new(handler), self.clone())
                .instrument(span),
        );
    }

    /// Stops accepting, lets connections finish within `grace`, then cuts the rest; returns
    /// `false` when some had to be cut.
    pub async fn stop(&self, grace: Duration) -> bool {
        self.stopping.cancel();
        self.tracker.close();
        let finished = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if !finished {
            self.cut.cancel();
            self.tracker.wait().await;
        }
        finished
    }
}
