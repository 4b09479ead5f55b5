//! The `Session` actor: one per TCP connection; where tunnel data is forwarded.
//!
//! It reads the socket as a stream of chunks into its input buffer, decodes them with
//! [`Decoder`] and acts on each frame: a `beat` or device `data` header registers the
//! device this connection speaks for, a payload goes to the tunnel peer, a request
//! goes to [`Command`].
//!
//! Output goes through a bounded queue (the [`Outbox`]) drained by a writer task that
//! owns the socket's write half, so replies keep their order and a tunnel peer writes
//! payloads straight into this queue. When a peer's queue is full the session stops
//! reading its own socket until there is room (TCP back-pressure end to end); if the
//! peer reads nothing for the stall time, the tunnel ends (see [`crate::bridge`]).
//!
//! Any step that waits for another actor or the store goes through [`Session::pause`]:
//! input stays paused until the step is done and decoding resumes right after, so
//! messages are handled strictly in order and no step can forget to resume.
//!
//! Every peer is bounded ([`crate::limits`]): a connection must send a valid message
//! within `identify`, finish any message it starts within the same time, and is closed
//! when it is no tunnel end and sent nothing valid for `idle`; requests are paced by a
//! token bucket; one turn handles at most `turn_bytes` of input before other
//! connections run; the output queue is bounded in bytes, and an idle connection keeps
//! no read buffer.
//!
//! The device this connection speaks for — its admission, the trust decision — is
//! in `session/speaking.rs`; its client certificate's hold in `session/certified.rs`;
//! what closed it in `session/closing.rs`; its socket halves in `connection.rs`, its
//! commands in `command.rs`.

mod certified;
mod closing;
mod speaking;

pub use closing::Closing;
use speaking::Speaking;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::bridge::{Cause, Unlink};
use crate::command::{answer, refuse, Applied, Command};
use crate::connection::{
    header_hold, precise_sleep, Io, Lease, ReadChunks, SocketProbe, UNTUNNELLED_READ,
};
use crate::frame::{Decoder, Frame, Reply, Request, Role};
use crate::hub::Hub;
use crate::limits::TokenBucket;
use crate::link::{next_session_id, PeerEvent, PeerLink, SessionId, Tunnel, TunnelId};
use crate::masked::masked;
use crate::metric;
use crate::outbox::{Bounds, Outbox, Unsent};
use crate::tls::Transport;

pub struct Session {
    id: SessionId,
    remote: SocketAddr,
    hub: Arc<Hub>,
    out: Outbox,
    inbox: BytesMut,
    decoder: Decoder,
    /// The device this connection speaks for.
    device: Option<Speaking>,
    /// Payload after a refused header is dropped until the next message.
    discard: bool,
    /// The tunnel this session is in (boxed: most connections never carry one).
    tunnel: Option<Box<Tunnel>>,
    /// The newest tunnel this session has been in: only its end may close the session.
    latest: TunnelId,
    /// Tunnels up to this id are gone for this session; a late `Linked` for one of
    /// them is ignored.
    cleared: TunnelId,
    /// A payload tail held back for the rest of a header, if any.
    hold: Option<Held>,
    /// The socket's round trip and when it was read (see [`Session::link_rtt`]).
    rtt: Option<(Duration, Instant)>,
    probe: Arc<SocketProbe>,
    /// Runs while a message is incomplete; closes the connection if it stays so.
    unfinished: Option<SpawnHandle>,
    /// No more input will be read (end of file, or the session was told to close):
    /// close once what was read is handled.
    eof: bool,
    /// Whether a valid message has arrived, and when the last one did.
    identified: bool,
    last_message: Instant,
    requests: TokenBucket,
    /// The largest read: the configured size while in a tunnel, small otherwise.
    read_limit: Arc<AtomicUsize>,
    transport: Transport,
    /// The user its client certificate names, if any.
    certificate: Option<Arc<crate::certificate::ClientCert>>,
    /// What this connection has shown itself to be; none until it has spoken (the
    /// `role` label of `elfin_connections_open`).
    role: Option<Role>,
    /// The limit that closed the connection, if one did.
    closed_by: Option<Closing>,
    /// Dropped with the session: tells the writer task to finish.
    _closing: oneshot::Sender<()>,
    /// Its place in the limits and shutdown's wait (released when the session is
    /// dropped), and when it was accepted.
    lease: Lease,
}

/// A held-back payload tail: the timer that forwards it as payload, and since when.
struct Held {
    timer: SpawnHandle,
    since: Instant,
}

/// How long a connection's round trip is used before it is read again.
const RTT_REFRESH: Duration = Duration::from_secs(1);

impl Session {
    /// Starts a session for an accepted connection on the current arbiter.
    pub fn start(io: Io, remote: SocketAddr, hub: Arc<Hub>, lease: Lease) -> Addr<Session> {
        let Io {
            read,
            write,
            transport,
            certificate,
            fd,
        } = io;
        let config = &hub.config;
        let (closing, closed) = oneshot::channel();
        let bounds = Bounds {
            chunks: config.server.output_queue_chunks.get(),
            bytes: config.limits.output_queue_bytes.get(),
            direct: transport == Transport::Plain,
        };
        let out = Outbox::new(bounds, write, actix_rt::Arbiter::current(), closed);
        let read_limit = Arc::new(AtomicUsize::new(
            UNTUNNELLED_READ.min(config.server.read_buffer_bytes.get()),
        ));
        let probe = Arc::new(SocketProbe::new(fd));
        let chunks = ReadChunks::new(read, read_limit.clone()).probed_by(probe.clone());
        let requests = TokenBucket::new(
            f64::from(config.limits.requests_per_sec.get()),
            f64::from(config.limits.request_burst.get()),
        );
        Session::create(move |ctx| {
            // Gateway shutdown ends the input like an end of file.
            ctx.add_stream(chunks.take_until(lease.stop.clone().cancelled_owned()));
            Session {
                id: next_session_id(),
                remote,
                out,
                inbox: BytesMut::new(),
                decoder: Decoder::new(),
                device: None,
                discard: false,
                tunnel: None,
                latest: 0,
                cleared: 0,
                hold: None,
                rtt: None,
                probe,
                unfinished: None,
                eof: false,
                identified: false,
                last_message: Instant::now(),
                requests,
                read_limit,
                closed_by: None,
                _closing: closing,
                lease,
                transport,
                certificate,
                role: None,
                hub,
            }
        })
    }

    fn link(&self, ctx: &Context<Self>) -> PeerLink {
        PeerLink {
            id: self.id,
            remote: self.remote,
            transport: self.transport,
            certificate: self.certificate.clone(),
            events: ctx.address().recipient(),
            out: self.out.clone(),
            home: actix_rt::Arbiter::current(),
        }
    }

    /// Decodes and handles buffered input until it runs out, a step pauses, or this
    /// turn's budget is spent (the step, or a yield, resumes it). At the end of input,
    /// closes once everything is handled.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        let mut budget = self.hub.config.limits.turn_bytes;
        let mut progress = false;
        loop {
            let before = self.inbox.len();
            let Some(frame) = self.decoder.decode(&mut self.inbox) else {
                break;
            };
            progress = true;
            // Each frame costs its bytes and a little more, so a flood of tiny frames
            // yields too.
            budget = budget.saturating_sub(before - self.inbox.len() + 64);
            if self.handle_frame(frame, ctx).is_break() {
                return;
            }
            if budget == 0 && !self.inbox.is_empty() {
                metrics::counter!(metric::SESSION_YIELDS_TOTAL).increment(1);
                let _ = self.pause(ctx, tokio::task::yield_now(), |_, (), _| {});
                return;
            }
        }
        if self.eof {
            // A held-back tail is payload after all: no header can follow it now.
            if let Some(frame) = self.decoder.flush_held(&mut self.inbox) {
                if self.handle_frame(frame, ctx).is_break() {
                    return;
                }
            }
            ctx.stop();
            return;
        }
        self.watch_unfinished(progress, ctx);
        if self.decoder.holding(&self.inbox) && self.hold.is_none() {
            self.hold_tail(ctx);
        }
        if self.inbox.is_empty() {
            // Let go of the read buffer this view still points into.
            self.inbox = BytesMut::new();
        }
    }

    /// Holds back the payload tail the decoder kept (it could start this connection's
    /// next header) for about two round trips of its link (see
    /// [`crate::connection::header_hold`]), then forwards it as payload. The held
    /// bytes are acknowledged at once, so a sender whose Nagle algorithm waits for
    /// that ACK sends the rest of the header within one round trip.
    ///
    /// Right after a backlog the tail waits the longest hold instead: a sender whose
    /// writes outran the tunnel is cut wherever its socket was full, and sends the
    /// rest when it is scheduled again, which the link's round trip says nothing
    /// about. A bulk stream that really ends in such a tail has its last bytes late;
    /// no header byte becomes payload.
    fn hold_tail(&mut self, ctx: &mut Context<Self>) {
        self.probe.ack_now();
        let server = &self.hub.config.server;
        let (floor, ceiling) = (server.header_hold_min, server.header_hold);
        let wait = match self.probe.backlogged_within(ceiling) {
            true => ceiling,
            false => header_hold(self.link_rtt(), floor, ceiling),
        };
        let timer = ctx.spawn(precise_sleep(wait).into_actor(self).map(|(), act, ctx| {
            act.end_hold(None, "timed_out");
            if let Some(frame) = act.decoder.flush_held(&mut act.inbox) {
                if act.handle_frame(frame, ctx).is_continue() {
                    act.drain(ctx);
                }
            }
        }));
        metrics::counter!(metric::HELD_TAILS_TOTAL).increment(1);
        self.hold = Some(Held {
            timer,
            since: Instant::now(),
        });
    }

    /// The held tail is decided: more input came, the hold ran out, or the connection
    /// closes. Cancels its timer (unless it is the timer that ran out) and records how
    /// long it was held.
    fn end_hold(&mut self, ctx: Option<&mut Context<Self>>, outcome: &'static str) {
        let Some(held) = self.hold.take() else {
            return;
        };
        if let Some(ctx) = ctx {
            ctx.cancel_future(held.timer);
        }
        metrics::histogram!(metric::HEADER_HOLD_SECONDS, "outcome" => outcome)
            .record(held.since.elapsed().as_secs_f64());
    }

    /// The connection's round trip, read from the socket at most once a second.
    fn link_rtt(&mut self) -> Option<Duration> {
        let now = Instant::now();
        match self.rtt {
            Some((rtt, read)) if now - read < RTT_REFRESH => Some(rtt),
            _ => {
                let rtt = self.probe.min_rtt();
                self.rtt = rtt.map(|rtt| (rtt, now));
                rtt
            }
        }
    }

    /// A message left incomplete must be finished within the identify time; the timer
    /// restarts whenever a message completes.
    fn watch_unfinished(&mut self, progress: bool, ctx: &mut Context<Self>) {
        let unfinished = !self.inbox.is_empty() && !self.decoder.holding(&self.inbox);
        if progress || !unfinished {
            if let Some(timer) = self.unfinished.take() {
                ctx.cancel_future(timer);
            }
        }
        if unfinished && self.unfinished.is_none() {
            let limit = self.hub.config.limits.identify;
            self.unfinished = Some(ctx.run_later(limit, move |act, ctx| {
                act.unfinished = None;
                act.limit_reached(Closing::UnfinishedMessage, ctx);
            }));
        }
    }

    /// Closes the connection for a limit or a rule, counting which.
    fn limit_reached(&mut self, limit: Closing, ctx: &mut Context<Self>) {
        self.closed_by = Some(limit);
        let label = limit.label();
        metrics::counter!(metric::CONNECTIONS_CLOSED_TOTAL, "limit" => label).increment(1);
        log::debug!("{}: closed by limit {label}", self.remote);
        self.inbox.clear();
        self.close(ctx);
    }

    /// Runs `step` with input paused, then `done`, then resumes decoding: the one way
    /// a session waits for anything. Returns `Break` for the caller to hand on.
    fn pause<R: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        step: impl Future<Output = R> + 'static,
        done: impl FnOnce(&mut Self, R, &mut Context<Self>) + 'static,
    ) -> ControlFlow<()> {
        step.into_actor(self)
            .map(move |result, act, ctx| {
                done(act, result, ctx);
                act.drain(ctx);
            })
            .wait(ctx);
        ControlFlow::Break(())
    }

    fn handle_frame(&mut self, frame: Frame, ctx: &mut Context<Self>) -> ControlFlow<()> {
        if let Some(counter) = MESSAGES.of(&frame) {
            counter.increment(1);
            // A new message: what follows is its own payload. Only a message of a
            // known user identifies the connection and keeps it alive (set where that
            // is known).
            self.discard = false;
        }
        match frame {
            Frame::Payload(bytes) => self.forward(bytes, ctx),
            Frame::Beat(header) => self.sighted(header, true, ctx),
            Frame::Data(header) if header.role == Role::Device => self.sighted(header, false, ctx),
            Frame::Data(_) => ControlFlow::Continue(()),
            Frame::Request { .. } | Frame::Rejected { reply: true, .. } if self.out.is_closed() => {
                // Nobody would read the reply: the work is not done.
                metrics::counter!(metric::REQUESTS_DROPPED_TOTAL).increment(1);
                log::debug!(
                    "{}: request dropped, the connection's output is closed",
                    self.remote
                );
                ControlFlow::Continue(())
            }
            Frame::Request { request, fields } => {
                if self.device.is_none() {
                    self.set_role(Role::Client);
                }
                let (hub, me) = (self.hub.clone(), self.link(ctx));
                let wait = self.requests.take();
                let step = async move {
                    if let Some(wait) = wait {
                        metrics::counter!(metric::REQUESTS_PACED_TOTAL).increment(1);
                        tokio::time::sleep(wait).await;
                    }
                    match Command::from_frame(request, fields) {
                        Ok(command) => command.apply(&hub, &me).await,
                        Err(refusal) => refuse(&hub, &me, refusal)
                            .await
                            .map(|()| Applied::default()),
                    }
                };
                self.pause(ctx, step, |act, applied, ctx| match applied {
                    Ok(applied) => {
                        if applied.known_user {
                            act.identified = true;
                            act.last_message = Instant::now();
                        }
                        if let Some(tunnel) = applied.tunnel {
                            act.linked(tunnel);
                        }
                        if applied.close {
                            act.close(ctx);
                        }
                    }
                    Err(_unread) => act.limit_reached(Closing::UnreadReplies, ctx),
                })
            }
            Frame::Rejected { reply, reason } => {
                metrics::counter!(metric::MESSAGES_REJECTED_TOTAL, "reason" => reason.label())
                    .increment(1);
                log::debug!("{}: rejected message: {reason}", self.remote);
                if !reply {
                    return ControlFlow::Continue(());
                }
                let (hub, out) = (self.hub.clone(), self.out.clone());
                let line = Reply::Failed(reason.words().into()).encode();
                let step = async move { answer(&hub, &out, line).await };
                self.pause(ctx, step, |act, answered, ctx| {
                    if answered.is_err() {
                        act.limit_reached(Closing::UnreadReplies, ctx);
                    }
                })
            }
            Frame::Garbage(n) => {
                metrics::counter!(metric::GARBAGE_BYTES_TOTAL).increment(n as u64);
                log::debug!("{}: dropped {n} bytes that are not a message", self.remote);
                ControlFlow::Continue(())
            }
        }
    }

    /// Writes a payload into the tunnel peer's queue, pausing while it is full. A peer
    /// that takes nothing for the stall time ends the tunnel.
    fn forward(&mut self, bytes: Bytes, ctx: &mut Context<Self>) -> ControlFlow<()> {
        let len = bytes.len() as u64;
        if self.discard {
            metrics::counter!(metric::PAYLOAD_DROPPED_BYTES_TOTAL).increment(len);
            return ControlFlow::Continue(());
        }
        let Some(Tunnel {
            id: tunnel,
            peer,
            sent,
        }) = self.tunnel.as_deref()
        else {
            log::debug!("{}: no tunnel, dropped {len} payload bytes", self.remote);
            metrics::counter!(metric::PAYLOAD_DROPPED_BYTES_TOTAL).increment(len);
            return ControlFlow::Continue(());
        };
        // With more input at hand, queue: the peer's writer sends this read's frames
        // with one system call. The last (or only) one may be written directly.
        let handed = if self.inbox.is_empty() {
            peer.out.try_send(bytes)
        } else {
            peer.out.try_queue(bytes)
        };
        let bytes = match handed {
            Ok(()) => {
                sent.add(len);
                return ControlFlow::Continue(());
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The peer is closing; the bridge is about to tell us.
                metrics::counter!(metric::PAYLOAD_DROPPED_BYTES_TOTAL).increment(len);
                return ControlFlow::Continue(());
            }
            Err(mpsc::error::TrySendError::Full(bytes)) => bytes,
        };
        let (tunnel, out, sent) = (*tunnel, peer.out.clone(), sent.clone());
        let stall = self.hub.config.server.tunnel_stall;
        let step = async move { out.send_within(bytes, stall).await };
        self.pause(ctx, step, move |act, result, _| match result {
            Ok(()) => sent.add(len),
            Err(Unsent::Closed) => {
                metrics::counter!(metric::PAYLOAD_DROPPED_BYTES_TOTAL).increment(len)
            }
            Err(Unsent::Stalled) => {
                metrics::counter!(metric::PAYLOAD_DROPPED_BYTES_TOTAL).increment(len);
                act.unlinked(tunnel);
                act.hub.bridge.do_send(Unlink {
                    session: act.id,
                    cause: Cause::Stalled(stall),
                });
            }
        })
    }

    /// Moves this connection to another `role` in `elfin_connections_open`.
    fn set_role(&mut self, role: Role) {
        if self.role != Some(role) {
            self.open_gauge().decrement(1);
            self.role = Some(role);
            self.decoder.expect_from(role);
            self.open_gauge().increment(1);
        }
    }

    /// This connection's series of `elfin_connections_open`.
    fn open_gauge(&self) -> metrics::Gauge {
        let (transport, role) = (self.transport.label(), Role::label(self.role));
        metrics::gauge!(metric::CONNECTIONS_OPEN, "transport" => transport, "role" => role)
    }

    /// This session is now one end of `tunnel`, unless that tunnel is already gone or
    /// older than the one it is in.
    fn linked(&mut self, tunnel: Tunnel) {
        let current = self.tunnel.as_deref().map_or(0, |t| t.id);
        if tunnel.id > self.cleared && tunnel.id > current {
            self.latest = self.latest.max(tunnel.id);
            self.tunnel = Some(Box::new(tunnel));
            self.read_limit.store(
                self.hub.config.server.read_buffer_bytes.get(),
                Ordering::Relaxed,
            );
        }
    }

    /// Stops reading and closes once what was read is handled; a held-back payload
    /// tail is delivered first, so every byte accepted reaches the tunnel.
    fn close(&mut self, ctx: &mut Context<Self>) {
        self.end_hold(Some(ctx), "closed");
        self.eof = true;
        self.drain(ctx);
    }

    /// `tunnel` is gone; every older one too (tunnels are made in id order). Returns
    /// whether it was the newest this session has been in.
    fn unlinked(&mut self, tunnel: TunnelId) -> bool {
        self.cleared = self.cleared.max(tunnel);
        if self.tunnel.as_deref().is_some_and(|t| t.id <= tunnel) {
            self.tunnel = None;
            let small = UNTUNNELLED_READ.min(self.hub.config.server.read_buffer_bytes.get());
            self.read_limit.store(small, Ordering::Relaxed);
        }
        tunnel >= self.latest
    }
}

/// `elfin_messages_total` by type, looked up once: a look-up per message would cost
/// more than decoding a beat.
struct MessageCounters {
    beat: metrics::Counter,
    device_data: metrics::Counter,
    client_data: metrics::Counter,
    connme: metrics::Counter,
    connthem: metrics::Counter,
    query: metrics::Counter,
}

impl MessageCounters {
    /// The counter of a message; none for payload, garbage and rejected input.
    fn of(&self, frame: &Frame) -> Option<&metrics::Counter> {
        Some(match frame {
            Frame::Beat(_) => &self.beat,
            Frame::Data(h) if h.role == Role::Device => &self.device_data,
            Frame::Data(_) => &self.client_data,
            Frame::Request { request, .. } => match request {
                Request::Connme => &self.connme,
                Request::Connthem => &self.connthem,
                Request::Query => &self.query,
            },
            _ => return None,
        })
    }
}

static MESSAGES: std::sync::LazyLock<MessageCounters> = std::sync::LazyLock::new(|| {
    let of = |kind: &'static str| metrics::counter!(metric::MESSAGES_TOTAL, "type" => kind);
    MessageCounters {
        beat: of("beat"),
        device_data: of("device_data"),
        client_data: of("client_data"),
        connme: of(Request::Connme.keyword()),
        connthem: of(Request::Connthem.keyword()),
        query: of(Request::Query.keyword()),
    }
});

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let transport = self.transport.label();
        metrics::counter!(metric::CONNECTIONS_TOTAL, "transport" => transport).increment(1);
        self.open_gauge().increment(1);
        log::debug!("{}: connected", self.remote);
        let limits = &self.hub.config.limits;
        // Counted from accept: the server already spent some of it telling TLS apart.
        let identify =
            (self.lease.accepted + limits.identify).saturating_duration_since(Instant::now());
        ctx.run_later(identify, |act, ctx| {
            if !act.identified {
                act.limit_reached(Closing::Identify, ctx);
            }
        });
        let idle = limits.idle;
        ctx.run_interval(idle / 4, move |act, ctx| {
            if act.tunnel.is_none() && act.last_message.elapsed() >= idle {
                act.limit_reached(Closing::Idle, ctx);
            }
        });
        self.hold_certificate(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.out.close_unused();
        self.open_gauge().decrement(1);
        log::debug!("{}: disconnected", self.remote);
        if let Some(Speaking {
            identity: d,
            live: true,
            ..
        }) = self.device.take()
        {
            log::info!(
                "device {} ({}) of user {} went away",
                d.key.mac,
                d.host,
                masked(&d.key.uuid)
            );
            self.unregister(d, self.end_cause());
        }
        if self.tunnel.take().is_some() {
            let cause = match self.closed_by {
                _ if self.lease.stop.is_cancelled() => Cause::Shutdown,
                Some(Closing::CertificateRevoked) => Cause::Certificate("revoked"),
                Some(Closing::CertificateExpired) => Cause::Certificate("expired"),
                _ => Cause::Closed,
            };
            self.hub.bridge.do_send(Unlink {
                session: self.id,
                cause,
            });
        }
    }
}

impl StreamHandler<io::Result<BytesMut>> for Session {
    fn handle(&mut self, chunk: io::Result<BytesMut>, ctx: &mut Context<Self>) {
        match chunk {
            Ok(chunk) => {
                self.end_hold(Some(ctx), "more_input");
                self.inbox.unsplit(chunk);
                self.drain(ctx);
            }
            Err(e) => {
                log::debug!("{}: read error: {e}", self.remote);
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.close(ctx);
    }
}

impl Handler<PeerEvent> for Session {
    type Result = ();

    fn handle(&mut self, event: PeerEvent, ctx: &mut Context<Self>) {
        match event {
            PeerEvent::Linked(tunnel) => self.linked(tunnel),
            PeerEvent::Unlinked { tunnel, close } => {
                if self.unlinked(tunnel) && close {
                    log::debug!("{}: tunnel {tunnel} ended; closing", self.remote);
                    self.close(ctx);
                }
            }
            PeerEvent::Replaced(device) => {
                if self
                    .device
                    .as_ref()
                    .is_some_and(|d| d.identity.key == device)
                {
                    // The registry already points at the new connection.
                    self.device = None;
                    self.close(ctx);
                }
            }
            PeerEvent::Withdrawn(device, why) => {
                if self
                    .device
                    .as_ref()
                    .is_some_and(|d| d.identity.key == device)
                {
                    log::info!(
                        "device {} of user {} from {}: closed, {why}",
                        device.mac,
                        masked(&device.uuid),
                        self.remote
                    );
                    // The registry has already removed it.
                    self.device = None;
                    self.limit_reached(Closing::Removed, ctx);
                }
            }
        }
    }
}
