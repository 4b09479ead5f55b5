//! The server's lifetime: accept connections, start a session for each, and on
//! shutdown close them all and flush what is pending.
//!
//! [`serve`] owns the listener. It hands every accepted connection to a worker (or
//! runs it on the calling arbiter, see [`Workers`]) and never waits on anything but
//! `accept` and the shutdown future. When that future completes it stops accepting,
//! ends every session's input, waits (bounded) for them to close, and calls
//! [`Hub::shutdown`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::connection::{Io, Lease};
use crate::hub::{Hub, ShutdownError, Workers};
use crate::limits::{Admission, Warnings};
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
    let tls_warnings = Arc::new(Warnings::default());
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
                    Ok(ticket) => ((stream, peer), ticket),
                    Err(refused) => {
                        metrics::counter!("elfin_connections_refused_total", "limit" => refused.label())
                            .increment(1);
                        if admission.warnings.should_warn(peer.ip()) {
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
        let (stream, peer) = stream;
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
        let (hub, tls_warnings) = (hub.clone(), tls_warnings.clone());
        let start = async move {
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => return log::debug!("connection lost at accept: {e}"),
            };
            if let Some(io) = transport(stream, peer, &hub, &tls_warnings).await {
                Session::start(io, peer, hub, lease);
            }
        };
        if workers.is_empty() {
            actix_rt::spawn(start);
        } else {
            workers[next].spawn(start);
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

/// A TLS record starts with this byte; a protocol v1 message with an ASCII keyword.
const TLS_HANDSHAKE: u8 = 0x16;

/// Plain TCP or TLS, told by the first byte the peer sends. A TLS handshake must
/// finish within its timeout; a TLS client on a gateway without TLS is closed at once.
async fn transport(
    stream: TcpStream,
    peer: SocketAddr,
    hub: &Hub,
    warnings: &Warnings,
) -> Option<Io> {
    let mut first = [0u8; 1];
    let identify = hub.config.limits.identify;
    match tokio::time::timeout(identify, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
        // Protocol v1 (or a peer that already left: its session sees the end).
        Ok(Ok(_)) => return Some(Io::plain(stream)),
        Err(_) => {
            metrics::counter!("elfin_connections_closed_total", "limit" => "identify").increment(1);
            log::debug!("{peer}: sent nothing within {identify:?}");
            return None;
        }
        Ok(Err(e)) => {
            log::debug!("{peer}: connection lost before its first byte: {e}");
            return None;
        }
    }
    let Some(tls) = &hub.config.tls else {
        metrics::counter!("elfin_tls_handshakes_total", "result" => "not_configured").increment(1);
        if warnings.should_warn(peer.ip()) {
            log::warn!(
                "a TLS client connected from {}, but tls.cert and tls.key are not set: closed",
                peer.ip()
            );
        }
        return None;
    };
    match tokio::time::timeout(tls.handshake_timeout(), tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => {
            metrics::counter!("elfin_tls_handshakes_total", "result" => "ok").increment(1);
            Some(Io::tls(stream))
        }
        Ok(Err(e)) => {
            metrics::counter!("elfin_tls_handshakes_total", "result" => "failed").increment(1);
            log::debug!("{peer}: TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            metrics::counter!("elfin_tls_handshakes_total", "result" => "timeout").increment(1);
            log::debug!(
                "{peer}: TLS handshake not finished in {:?}",
                tls.handshake_timeout()
            );
            None
        }
    }
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
