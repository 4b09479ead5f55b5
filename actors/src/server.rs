//! The server's lifetime: accept connections, start a session for each, and on
//! shutdown close them all and flush what is pending.
//!
//! [`serve`] owns the listener. Its accept loops run on a thread of their own that
//! does nothing but accept, admit and hand each connection to a worker (with
//! [`Workers::Caller`], on the calling arbiter like everything else): a reconnect storm
//! is taken off the listen queue at once even while the threads that register devices
//! are busy with it. When that future completes it stops accepting,
//! ends every session's input, waits (bounded) for them to close, and calls
//! [`Hub::shutdown`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{Attempt, Refused};
use crate::certificate::ClientCert;
use crate::config::Workers;
use crate::connection::{Io, Lease};
use crate::hub::{Hub, ShutdownError};
use crate::limits::Warnings;
use crate::metric;
use crate::refusal::Reason;
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

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// TLS or protocol v1, told by the first byte (the gateway's own port).
    Detect,
    /// TLS only (`tls.listen`, e.g. port 443 for networks that pass nothing else).
    TlsOnly,
}

/// Serves connections from `listener` until `shutdown` completes, then closes them and
/// flushes the hub.
pub async fn serve(
    listener: TcpListener,
    hub: Hub,
    shutdown: impl Future,
) -> Result<(), ShutdownError> {
    serve_all(vec![(listener, Listen::Detect)], hub, shutdown).await
}

/// What every accept loop shares.
struct Accepting {
    /// Shared by every session (one pointer each, not a copy of its handles).
    hub: Arc<Hub>,
    tls_warnings: Warnings,
    stop: CancellationToken,
    alive: mpsc::Sender<()>,
    /// Where sessions run: the worker threads, or the caller's arbiter.
    workers: Vec<ArbiterHandle>,
    next: AtomicUsize,
}

/// [`serve`] on several listeners, one accept loop each, sharing the limits.
pub async fn serve_all(
    listeners: Vec<(TcpListener, Listen)>,
    hub: Hub,
    shutdown: impl Future,
) -> Result<(), ShutdownError> {
    let workers: Vec<Arbiter> = match hub.config.server.workers {
        Workers::Caller => Vec::new(),
        Workers::Threads(n) => (0..n.get()).map(|_| Arbiter::new()).collect(),
    };
    let handles = match workers.is_empty() {
        true => vec![Arbiter::current()],
        false => workers.iter().map(Arbiter::handle).collect(),
    };
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let shared = Arc::new(Accepting {
        tls_warnings: Warnings::new(hub.config.limits.ipv6_prefix),
        stop: CancellationToken::new(),
        alive,
        workers: handles,
        next: AtomicUsize::new(0),
        hub: Arc::new(hub.clone()),
    });
    // With worker threads, the accept loops get a thread of their own; with
    // `Workers::Caller` (tests on a paused clock) everything stays on this arbiter.
    let acceptor = (!workers.is_empty()).then(Arbiter::new);
    let mut loops = Vec::new();
    for (listener, mode) in listeners {
        let (done, ended) = tokio::sync::oneshot::channel::<()>();
        let shared = shared.clone();
        match &acceptor {
            Some(acceptor) => {
                // Registered again with the acceptor thread's own reactor, so its
                // readiness does not wait for this thread.
                let listener = listener.into_std();
                acceptor.spawn(async move {
                    match listener.and_then(TcpListener::from_std) {
                        Ok(listener) => accept_loop(listener, mode, shared).await,
                        Err(e) => log::error!("cannot accept connections: {e}"),
                    }
                    drop(done);
                });
            }
            None => {
                actix_rt::spawn(async move {
                    accept_loop(listener, mode, shared).await;
                    drop(done);
                });
            }
        }
        loops.push(ended);
    }
    hub.accepting.store(true, Ordering::Relaxed);
    shutdown.await;

    log::info!("shutting down");
    hub.accepting.store(false, Ordering::Relaxed);
    shared.stop.cancel();
    for accept in loops {
        let _ = accept.await;
    }
    if let Some(acceptor) = acceptor {
        acceptor.stop();
    }
    drop(shared);
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

/// Accepts until the gateway stops: admits each connection, hands it to a worker,
/// and waits on nothing else.
async fn accept_loop(listener: TcpListener, mode: Listen, s: Arc<Accepting>) {
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            _ = s.stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                failing = false;
                accepted
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning,
                // and say so once per episode.
                if !failing {
                    log::warn!("accept failed: {e}");
                    failing = true;
                }
                metrics::counter!(metric::ACCEPT_ERRORS_TOTAL).increment(1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ticket = match s.hub.admission.admit(peer.ip()) {
            Ok(ticket) => ticket,
            Err(refused) => {
                metrics::counter!(metric::CONNECTIONS_REFUSED_TOTAL, "limit" => refused.label())
                    .increment(1);
                if s.hub.admission.warnings.should_warn(peer.ip()) {
                    log::warn!("refused connections from {}: {refused}", peer.ip());
                }
                continue;
            }
        };
        let stream = match configure(stream, &s.hub) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("connection lost at accept: {e}");
                continue;
            }
        };
        let accepted = tokio::time::Instant::now();
        let lease = Lease {
            stop: s.stop.clone(),
            alive: s.alive.clone(),
            ticket,
        };
        let shared = s.clone();
        // What crosses to the worker is only the socket and its lease: the session's
        // start (a TLS handshake's state among it) is made there, so a storm queued
        // for a busy worker costs little memory on this thread.
        let start =
            async move { Box::pin(start(stream, peer, mode, accepted, lease, shared)).await };
        let next = s.next.fetch_add(1, Ordering::Relaxed) % s.workers.len();
        s.workers[next].spawn(start);
    }
}

/// On the worker: the connection's transport (a TLS handshake if it starts one), then
/// its session.
async fn start(
    stream: std::net::TcpStream,
    peer: SocketAddr,
    mode: Listen,
    accepted: tokio::time::Instant,
    lease: Lease,
    shared: Arc<Accepting>,
) {
    let stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(e) => return log::debug!("connection lost at accept: {e}"),
    };
    let hub = &shared.hub;
    if let Some(io) = transport(stream, peer, mode, hub, &shared.tls_warnings).await {
        Session::start(io, peer, accepted, hub.clone(), lease);
    }
}

/// A TLS record starts with this byte; a protocol v1 message with an ASCII keyword.
const TLS_HANDSHAKE: u8 = 0x16;

/// Plain TCP or TLS, told by the first byte the peer sends (or TLS only). A TLS
/// handshake must finish within its timeout; a TLS client on a gateway without TLS is
/// closed at once.
async fn transport(
    stream: TcpStream,
    peer: SocketAddr,
    mode: Listen,
    hub: &Hub,
    warnings: &Warnings,
) -> Option<Io> {
    if mode == Listen::TlsOnly {
        return handshake(stream, peer, hub, warnings).await;
    }
    let mut first = [0u8; 1];
    let identify = hub.config.limits.identify;
    match tokio::time::timeout(identify, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
        // Protocol v1 (or a peer that already left: its session sees the end).
        Ok(Ok(_)) => return Some(Io::plain(stream)),
        Err(_) => {
            metrics::counter!(metric::CONNECTIONS_CLOSED_TOTAL, "limit" => "identify").increment(1);
            log::debug!("{peer}: sent nothing within {identify:?}");
            return None;
        }
        Ok(Err(e)) => {
            log::debug!("{peer}: connection lost before its first byte: {e}");
            return None;
        }
    }
    handshake(stream, peer, hub, warnings).await
}

/// A handshake refused for its client certificate: counted, logged and recorded.
fn refuse_certificate(hub: &Hub, peer: SocketAddr, certificate: Option<&ClientCert>, why: String) {
    let detail = match certificate {
        Some(c) => format!(
            "a TLS handshake from {peer} with the certificate of {:?} (serial {}): its \
             certificate is {why}",
            c.user, c.serial
        ),
        None => format!("a TLS handshake from {peer}: {why}"),
    };
    hub.refusals
        .report(peer.ip(), Reason::Certificate, || detail.clone());
    hub.trail.refusal(Refused {
        request: Attempt::Handshake,
        reason: Reason::Certificate,
        source: peer,
        uuid: None,
        device: None,
        certificate,
        detail: detail.clone(),
    });
    hub.herald.do_send(crate::events::herald::PeerRefused {
        kind: crate::events::EventKind::CertificateRefused,
        uuid: None,
        mac: None,
        host: None,
        source: peer,
        certificate: certificate.cloned(),
        reason: detail,
    });
}

/// The server side of a TLS handshake, bounded by its timeout.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    hub: &Hub,
    warnings: &Warnings,
) -> Option<Io> {
    let Some(tls) = &hub.config.tls else {
        metrics::counter!(metric::TLS_HANDSHAKES_TOTAL, "result" => "not_configured").increment(1);
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
            let io = Io::tls(stream);
            let revoked = io
                .certificate
                .as_deref()
                .and_then(|c| Some((c, tls.revocations().check(c, chrono::Utc::now())?)));
            if let Some((certificate, why)) = revoked {
                // Revoked by its user's revocation time, which rustls does not know.
                metrics::counter!(metric::TLS_HANDSHAKES_TOTAL, "result" => "failed").increment(1);
                refuse_certificate(hub, peer, Some(certificate), why.to_string());
                return None;
            }
            metrics::counter!(metric::TLS_HANDSHAKES_TOTAL, "result" => "ok").increment(1);
            Some(io)
        }
        Ok(Err(e)) => {
            metrics::counter!(metric::TLS_HANDSHAKES_TOTAL, "result" => "failed").increment(1);
            match crate::tls::certificate_refusal(&e) {
                Some(why) => refuse_certificate(hub, peer, None, why),
                None => log::debug!("{peer}: TLS handshake failed: {e}"),
            }
            None
        }
        Err(_) => {
            metrics::counter!(metric::TLS_HANDSHAKES_TOTAL, "result" => "timeout").increment(1);
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
    let keepalive = hub.config.server.keepalive;
    if !keepalive.is_zero() {
        sock.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(keepalive)
                .with_interval(keepalive / 4),
        )?;
    }
    stream.into_std()
}
