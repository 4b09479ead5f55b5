//! The server's lifetime: accept connections, start a session for each, and on
//! shutdown close them all and flush what is pending.
//!
//! [`serve`] owns the listener. It hands every accepted connection to a worker (or
//! runs it on the calling arbiter, see [`Workers`]) and never waits on anything but
//! `accept` and the shutdown future. When that future completes it stops accepting,
//! ends every session's input, waits (bounded) for them to close, and calls
//! [`Hub::shutdown`].

use std::future::Future;
use std::time::Duration;

use actix::prelude::*;
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::connection::Lease;
use crate::hub::{Hub, ShutdownError, Workers};
use crate::limits::Admission;
use crate::session::Session;

/// How long shutdown waits for sessions to write what is queued and close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The listening socket, with room for `backlog` connections waiting to be accepted
/// (a reconnect storm), capped by the system's own limit.
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(4096);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog.min(somaxconn)).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// Serves connections from `listener` until `shutdown` completes, then closes them and
/// flushes the hub.
pub async fn serve(
    listener: TcpListener,
    hub: Hub,
    shutdown: impl Future,
) -> Result<(), ShutdownError> {
    let workers: Vec<Arbiter> = match hub.config.workers {
        Workers::Caller => Vec::new(),
        Workers::Threads(n) => (0..n.max(1)).map(|_| Arbiter::new()).collect(),
    };
    let stop = CancellationToken::new();
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let limits = &hub.config.limits;
    let admission = Admission::new(limits.max_connections, limits.max_connections_per_ip);
    tokio::pin!(shutdown);
    let mut next = 0;
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, ticket) = match accepted {
            Ok((stream, peer)) => {
                failing = false;
                match admission.admit(peer.ip()) {
                    Ok(ticket) => (stream, ticket),
                    Err(refused) => {
                        metrics::counter!("elfin_connections_refused_total", "limit" => refused.label())
                            .increment(1);
                        if admission.should_warn(peer.ip()) {
                            log::warn!("refused connections from {}: {refused}", peer.ip());
                        }
                        continue;
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning,
                // and say so once per episode.
                if !failing {
                    log::warn!("accept failed: {e}");
                    failing = true;
                }
                metrics::counter!("elfin_accept_errors_total").increment(1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let stream = match configure(stream, &hub) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("connection lost at accept: {e}");
                continue;
            }
        };
        let lease = Lease {
            stop: stop.clone(),
            alive: alive.clone(),
            ticket,
        };
        let hub = hub.clone();
        let start = move |stream: std::net::TcpStream| {
            if let Err(e) = TcpStream::from_std(stream).and_then(|s| Session::start(s, hub, lease))
            {
                log::debug!("connection lost before its session started: {e}");
            }
        };
        if workers.is_empty() {
            start(stream);
        } else {
            workers[next].spawn(async move { start(stream) });
            next = (next + 1) % workers.len();
        }
    }

    log::info!("shutting down");
    drop(listener);
    stop.cancel();
    drop(alive);
    if tokio::time::timeout(CLOSE_TIMEOUT, all_closed.recv())
        .await
        .is_err()
    {
        log::warn!("some connections did not close within {CLOSE_TIMEOUT:?}");
    }
    let flushed = hub.shutdown().await;
    for worker in workers {
        worker.stop();
    }
    flushed
}

/// Low latency (no Nagle) and keepalive probes to find dead peers; returns the socket
/// detached from this thread's reactor, for a worker to adopt.
fn configure(stream: TcpStream, hub: &Hub) -> std::io::Result<std::net::TcpStream> {
    let sock = SockRef::from(&stream);
    sock.set_tcp_nodelay(true)?;
    let keepalive = hub.config.keepalive;
    if !keepalive.is_zero() {
        sock.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(keepalive)
                .with_interval(keepalive / 4),
        )?;
    }
    stream.into_std()
}
