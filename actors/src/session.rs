//! The `Session` actor: one per TCP connection. It owns the connection's state and
//! decides what each decoded frame means: a `beat` or device `data` header speaks for
//! a device, a payload goes to the tunnel peer, a request goes to [`Command`].
//!
//! Output goes through a bounded queue (the [`Outbox`]) drained by a writer task that
//! owns the socket's write half, so replies keep their order and a tunnel peer writes
//! payloads straight into this queue.
//!
//! Every peer is bounded ([`crate::limits`]): a connection must send a valid message
//! within `identify`, finish any message it starts within the same time, and is closed
//! when it is no tunnel end and sent nothing valid for `idle`; requests are paced by a
//! token bucket; one turn handles at most `turn_bytes` of input before other
//! connections run; the output queue is bounded in bytes, and an idle connection keeps
//! no read buffer.
//!
//! Its parts, one job each: reading and decoding, the header hold and the deadlines
//! (`session/input.rs`); payload into the tunnel and what the bridge and registry tell
//! it (`session/forwarding.rs`); the device it speaks for — admission, the trust
//! decision (`session/speaking.rs`); its client certificate's hold
//! (`session/certified.rs`); what closed it (`session/closing.rs`). Its socket halves
//! are in `connection.rs`, its commands in `command.rs`.
mod certified;
mod closing;
mod forwarding;
mod input;
mod speaking;

pub use closing::Closing;
use input::Held;
use speaking::Speaking;

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;

use actix::prelude::*;
use bytes::BytesMut;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::bridge::{Cause, Unlink};
use crate::command::{answer, refuse, Applied, Command};
use crate::connection::{Io, Lease, ReadChunks, SocketProbe, UNTUNNELLED_READ};
use crate::frame::{Decoder, Frame, Reply, Request, Role};
use crate::hub::Hub;
use crate::limits::TokenBucket;
use crate::link::{next_session_id, PeerLink, SessionId, Tunnel, TunnelId};
use crate::masked::masked;
use crate::metric;
use crate::outbox::{Bounds, Outbox};
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
    probe: Arc<SocketProbe>,
    /// Runs while a message is incomplete; closes the connection if it stays so.
    unfinished: Option<SpawnHandle>,
    /// No more input will be read (end of file, or the session was told to close):
    /// close once what was read is handled.
    eof: bool,
    /// Whether a valid message has arrived, and when the last one did (before one
    /// has: when the connection was accepted).
    identified: bool,
    last_message: Instant,
    requests: TokenBucket,
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
    /// dropped).
    lease: Lease,
}

impl Session {
    /// Starts a session for a connection from `remote` accepted at `accepted` (its time
    /// limits count from there) on the current arbiter.
    pub fn start(
        io: Io,
        remote: SocketAddr,
        accepted: Instant,
        hub: Arc<Hub>,
        lease: Lease,
    ) -> Addr<Session> {
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
        let probe = Arc::new(SocketProbe::new(
            fd,
            UNTUNNELLED_READ.min(config.server.read_buffer_bytes.get()),
        ));
        let chunks = ReadChunks::new(read, probe.clone());
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
                probe,
                unfinished: None,
                eof: false,
                identified: false,
                last_message: accepted,
                requests: TokenBucket::new(),
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

    /// Closes the connection for a limit or a rule, counting which.
    fn limit_reached(&mut self, limit: Closing, ctx: &mut Context<Self>) {
        self.closed_by = Some(limit);
        let label = limit.label();
        metrics::counter!(metric::CONNECTIONS_CLOSED_TOTAL, "limit" => label).increment(1);
        log::debug!("{}: closed by limit {label}", self.remote);
        self.inbox.clear();
        self.close(ctx);
    }

    /// The one timer of a quiet connection: it closes one that sent no valid message
    /// within `limits.identify` of being accepted, or, outside a tunnel, for
    /// `limits.idle`; otherwise it sets itself for when either could next be due.
    fn watch_silence(&mut self, ctx: &mut Context<Self>) {
        let limits = &self.hub.config.limits;
        let silent = self.last_message.elapsed();
        if !self.identified && silent >= limits.identify {
            return self.limit_reached(Closing::Identify, ctx);
        }
        if self.tunnel.is_none() && silent >= limits.idle {
            return self.limit_reached(Closing::Idle, ctx);
        }
        let mut next = match self.tunnel {
            // A tunnel end is never idle: looked at again as often as before.
            Some(_) => limits.idle / 4,
            None => limits.idle - silent,
        };
        if !self.identified {
            next = next.min(limits.identify - silent);
        }
        ctx.run_later(next, |act, ctx| act.watch_silence(ctx));
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
                let wait = self.requests.take(&self.hub.config.limits.requests());
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

    /// Stops reading and closes once what was read is handled; a held-back payload
    /// tail is delivered first, so every byte accepted reaches the tunnel.
    fn close(&mut self, ctx: &mut Context<Self>) {
        self.end_hold(Some(ctx), "closed");
        self.eof = true;
        self.drain(ctx);
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
        self.watch_silence(ctx);
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

#[cfg(test)]
mod tests {
    use actix::dev::ContextFut;

    use super::*;

    /// Most of an idle device's memory is its session's task: tokio's task cell (104
    /// bytes of its own in tokio 1.54) around actix's context and the `Session`,
    /// rounded up to 128 bytes (the cell is cache-line aligned). Up to 664 bytes of
    /// future it takes 768 bytes (BENCHMARKS.md, "Memory per device"); past that, every
    /// connection costs 128 bytes more.
    #[test]
    fn a_session_task_stays_within_768_bytes() {
        let future = std::mem::size_of::<ContextFut<Session, Context<Session>>>();
        assert!(
            future <= 664,
            "a session's future is {future} bytes: its task takes 896 bytes or more"
        );
    }
}
