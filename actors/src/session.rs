//! The `Session` actor: one per TCP connection.
//!
//! It reads the socket as a stream of chunks into its input buffer, decodes messages
//! with [`Decoder`] and acts on them: registers the device it speaks for, answers
//! `connme`, `connthem` and `query`, and forwards data payloads to its tunnel peer.
//!
//! Output goes through a bounded queue drained by a writer task that owns the socket's
//! write half, so replies keep their order and a tunnel peer writes payloads straight
//! into this queue (see [`PeerLink`]). When a peer's queue is full the session stops
//! reading its own socket until there is room (TCP back-pressure end to end); if the
//! peer reads nothing for `stall_timeout`, the tunnel is closed with a warning.
//!
//! Steps that wait for another actor or the store (`ctx.wait`) pause the session's
//! input, so messages are handled strictly in order.

use std::io;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::bridge::{Link, TunnelId, Unlink};
use crate::clock::Stamp;
use crate::debouncer::DataSeen;
use crate::frame::{Decoder, Frame, Header};
use crate::persistence::{PendingFor, Record};
use crate::registry::{Activity, LiveDevices, Lookup, Register, Unregister};
use crate::store::Sighting;
use crate::users::UserStatus;
use crate::Hub;

pub type SessionId = u64;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How long a payload tail that may start the next header waits for more input before
/// it is forwarded as payload.
const HOLD: Duration = Duration::from_millis(5);
/// How long queued output may take to drain once a session has closed.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);

const SUCCESS: &str = "{\"status\":\"success\"}\n";

/// What another actor needs to reach a session: its address for messages, and its
/// output queue for tunnel payloads and replies.
#[derive(Clone, Debug)]
pub struct PeerLink {
    pub id: SessionId,
    pub addr: Addr<Session>,
    pub out: mpsc::Sender<Bytes>,
}

/// The connection this session speaks for as a device.
struct Identity {
    uuid: ByteString,
    mac: ByteString,
    host: ByteString,
    activity: Arc<Activity>,
    /// False for devices of unknown users (they may tunnel, but nothing is stored).
    persist: bool,
}

pub struct Session {
    id: SessionId,
    remote: SocketAddr,
    hub: Hub,
    out: mpsc::Sender<Bytes>,
    inbox: BytesMut,
    decoder: Decoder,
    device: Option<Identity>,
    tunnel: Option<(TunnelId, PeerLink)>,
    /// Tunnels up to this id are gone for this session; a late `SetPeer` for one of
    /// them is ignored.
    cleared: TunnelId,
    hold: Option<SpawnHandle>,
    /// Dropped with the session: tells the writer task to finish.
    _closing: oneshot::Sender<()>,
    /// Dropped with the session: shutdown waits for all of these.
    _alive: mpsc::Sender<()>,
}

impl Session {
    /// Starts a session for an accepted connection on the current arbiter.
    pub fn start(stream: TcpStream, hub: Hub) -> io::Result<Addr<Session>> {
        let remote = stream.peer_addr()?;
        let (read, write) = stream.into_split();
        let (out, queue) = mpsc::channel(hub.config.out_queue);
        let (closing, closed) = oneshot::channel();
        actix_rt::spawn(write_loop(write, queue, closed));
        let chunk = hub.config.read_buffer;
        Ok(Session::create(move |ctx| {
            let chunks = ReadChunks {
                io: read,
                buf: BytesMut::new(),
                chunk,
            };
            // Gateway shutdown ends the input like an end of file.
            ctx.add_stream(chunks.take_until(hub.shutdown.clone().cancelled_owned()));
            Session {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                remote,
                out,
                inbox: BytesMut::new(),
                decoder: Decoder::new(),
                device: None,
                tunnel: None,
                cleared: 0,
                hold: None,
                _closing: closing,
                _alive: hub.alive.clone(),
                hub,
            }
        }))
    }

    fn link(&self, ctx: &Context<Self>) -> PeerLink {
        PeerLink {
            id: self.id,
            addr: ctx.address(),
            out: self.out.clone(),
        }
    }

    /// Decodes and handles buffered input until it runs out or a step has to wait
    /// (that step calls `drain` again when done).
    fn drain(&mut self, ctx: &mut Context<Self>) {
        while let Some(frame) = self.decoder.decode(&mut self.inbox) {
            if self.handle_frame(frame, ctx).is_break() {
                return;
            }
        }
        if self.decoder.holding(&self.inbox) {
            self.hold = Some(ctx.run_later(HOLD, |act, ctx| {
                act.hold = None;
                if let Some(frame) = act.decoder.flush_held(&mut act.inbox) {
                    let _ = act.handle_frame(frame, ctx);
                }
            }));
        }
    }

    fn handle_frame(&mut self, frame: Frame, ctx: &mut Context<Self>) -> ControlFlow<()> {
        match frame {
            Frame::Payload(bytes) => self.forward(bytes, ctx),
            Frame::Beat(header) => self.sighted(header, true, ctx),
            Frame::Data(header) if header.kind == crate::frame::Kind::Device => {
                self.sighted(header, false, ctx)
            }
            Frame::Data(_) => ControlFlow::Continue(()),
            Frame::Connme { uuid, mac, .. } => self.connme(uuid, mac, ctx),
            Frame::Connthem { uuid, mac1, mac2 } => self.connthem(uuid, mac1, mac2, ctx),
            Frame::Query { uuid } => self.query(uuid, ctx),
            Frame::Rejected { reply, reason } => {
                metrics::counter!("elfin_messages_rejected_total").increment(1);
                log::debug!("{}: rejected message: {reason}", self.remote);
                if reply {
                    let _ = self.out.try_send(failed(&reason));
                }
                ControlFlow::Continue(())
            }
            Frame::Garbage(n) => {
                metrics::counter!("elfin_garbage_bytes_total").increment(n as u64);
                log::debug!("{}: dropped {n} bytes that are not a message", self.remote);
                ControlFlow::Continue(())
            }
        }
    }

    /// Writes a payload into the tunnel peer's queue, waiting (with input paused) when
    /// it is full.
    fn forward(&mut self, bytes: Bytes, ctx: &mut Context<Self>) -> ControlFlow<()> {
        let Some((_, peer)) = &self.tunnel else {
            log::debug!(
                "{}: no tunnel, dropped {} payload bytes",
                self.remote,
                bytes.len()
            );
            metrics::counter!("elfin_payload_dropped_bytes_total").increment(bytes.len() as u64);
            return ControlFlow::Continue(());
        };
        let len = bytes.len() as u64;
        match peer.out.try_send(bytes) {
            Ok(()) => {
                metrics::counter!("elfin_tunnel_bytes_total").increment(len);
                ControlFlow::Continue(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                log::debug!(
                    "{}: tunnel peer gone, dropped {len} payload bytes",
                    self.remote
                );
                self.tunnel = None;
                metrics::counter!("elfin_payload_dropped_bytes_total").increment(len);
                ControlFlow::Continue(())
            }
            Err(mpsc::error::TrySendError::Full(bytes)) => {
                let out = peer.out.clone();
                let stall = self.hub.config.stall_timeout;
                async move { tokio::time::timeout(stall, out.send(bytes)).await }
                    .into_actor(self)
                    .map(move |sent, act, ctx| {
                        match sent {
                            Ok(Ok(())) => {
                                metrics::counter!("elfin_tunnel_bytes_total").increment(len)
                            }
                            Ok(Err(_closed)) => act.tunnel = None,
                            Err(_elapsed) => {
                                log::warn!(
                                    "{}: tunnel peer read nothing for {:?}; closing the tunnel",
                                    act.remote,
                                    act.hub.config.stall_timeout
                                );
                                act.tunnel = None;
                                act.hub.bridge.do_send(Unlink { session: act.id });
                            }
                        }
                        act.drain(ctx);
                    })
                    .wait(ctx);
                ControlFlow::Break(())
            }
        }
    }

    /// A `beat` or device `data` header: register or refresh the device.
    fn sighted(&mut self, h: Header, beat: bool, ctx: &mut Context<Self>) -> ControlFlow<()> {
        if let Some(d) = &self.device {
            if d.uuid == h.uuid && d.mac == h.mac && d.host == h.host {
                self.refresh(beat);
                return ControlFlow::Continue(());
            }
        }
        let users = self.hub.users.clone();
        let uuid = h.uuid.clone();
        async move { users.check(&uuid).await }
            .into_actor(self)
            .map(move |status, act, ctx| {
                act.register(h, status, ctx);
                act.refresh(beat);
                act.drain(ctx);
            })
            .wait(ctx);
        ControlFlow::Break(())
    }

    fn register(&mut self, h: Header, status: UserStatus, ctx: &mut Context<Self>) {
        if status == UserStatus::Unknown && self.hub.config.require_known_user {
            metrics::counter!("elfin_unknown_user_messages_total").increment(1);
            log::debug!(
                "{}: device {} of an unknown user ignored",
                self.remote,
                h.mac
            );
            return;
        }
        if let Some(old) = self.device.take() {
            self.hub.registry.do_send(Unregister {
                uuid: old.uuid,
                mac: old.mac,
                session: self.id,
            });
        }
        log::info!(
            "device {} ({}) of user {} online from {}",
            h.mac,
            h.host,
            short(&h.uuid),
            self.remote
        );
        let activity = Activity::new();
        self.hub.registry.do_send(Register {
            uuid: h.uuid.clone(),
            mac: h.mac.clone(),
            host: h.host.clone(),
            link: self.link(ctx),
            activity: activity.clone(),
        });
        self.device = Some(Identity {
            uuid: h.uuid,
            mac: h.mac,
            host: h.host,
            activity,
            persist: status != UserStatus::Unknown,
        });
    }

    /// Refreshes last-seen: a `beat` is persisted at once (batched), device data goes
    /// through the heartbeat debouncer.
    fn refresh(&self, beat: bool) {
        let Some(d) = &self.device else { return };
        d.activity.touch();
        if !d.persist {
            return;
        }
        if beat {
            self.hub.persistence.do_send(Record(Sighting {
                uuid: d.uuid.clone(),
                mac: d.mac.clone(),
                host: d.host.clone(),
                at: d.activity.last_seen().to_utc(),
            }));
        } else if d.activity.arm() {
            self.hub.debouncer.do_send(DataSeen {
                uuid: d.uuid.clone(),
                mac: d.mac.clone(),
                host: d.host.clone(),
                activity: d.activity.clone(),
                at: d.activity.last_seen(),
            });
        }
    }

    fn connme(
        &mut self,
        uuid: ByteString,
        mac: ByteString,
        ctx: &mut Context<Self>,
    ) -> ControlFlow<()> {
        let hub = self.hub.clone();
        let me = self.link(ctx);
        let device = mac.clone();
        async move {
            let target = find_device(&hub, &uuid, &mac).await?;
            if target.id == me.id {
                return Err("cannot tunnel a connection to itself".to_owned());
            }
            let tunnel = hub
                .bridge
                .send(Link {
                    a: me.clone(),
                    b: target.clone(),
                    notify: false,
                })
                .await
                .map_err(|_| "gateway is shutting down".to_owned())?;
            // The reply goes into our queue before the device learns of the tunnel, so
            // it reaches the client ahead of any data from the device.
            me.out
                .send(Bytes::from_static(SUCCESS.as_bytes()))
                .await
                .map_err(|_| "connection closed".to_owned())?;
            target.addr.do_send(SetPeer { tunnel, peer: me });
            Ok((tunnel, target))
        }
        .into_actor(self)
        .map(move |linked, act, ctx| {
            match linked {
                Ok((tunnel, peer)) => {
                    log::info!("{}: tunnel {tunnel} to device {device}", act.remote);
                    act.set_peer(tunnel, peer);
                }
                Err(reason) => act.reply_failed(&reason),
            }
            act.drain(ctx);
        })
        .wait(ctx);
        ControlFlow::Break(())
    }

    fn connthem(
        &mut self,
        uuid: ByteString,
        mac1: ByteString,
        mac2: ByteString,
        ctx: &mut Context<Self>,
    ) -> ControlFlow<()> {
        let hub = self.hub.clone();
        async move {
            if mac1 == mac2 {
                return Err("cannot tunnel a device to itself".to_owned());
            }
            let a = find_device(&hub, &uuid, &mac1).await?;
            let b = find_device(&hub, &uuid, &mac2).await?;
            hub.bridge
                .send(Link { a, b, notify: true })
                .await
                .map_err(|_| "gateway is shutting down".to_owned())
        }
        .into_actor(self)
        .map(move |linked, act, ctx| {
            match linked {
                Ok(_) => {
                    let _ = act.out.try_send(Bytes::from_static(SUCCESS.as_bytes()));
                }
                Err(reason) => act.reply_failed(&reason),
            }
            act.drain(ctx);
        })
        .wait(ctx);
        ControlFlow::Break(())
    }

    fn query(&mut self, uuid: ByteString, ctx: &mut Context<Self>) -> ControlFlow<()> {
        let hub = self.hub.clone();
        let out = self.out.clone();
        async move {
            let status = hub.users.check(&uuid).await;
            let line = if status == UserStatus::Unknown && hub.config.require_known_user {
                "[]\n".to_owned()
            } else {
                let stored = async {
                    match hub.store.user_devices(&uuid).await {
                        Ok(devices) => devices.unwrap_or_default(),
                        Err(e) => {
                            log::debug!("query answered from memory: {e}");
                            Vec::new()
                        }
                    }
                };
                let pending = hub.persistence.send(PendingFor { uuid: uuid.clone() });
                let live = hub.registry.send(LiveDevices { uuid: uuid.clone() });
                let (stored, pending, live) = futures::join!(stored, pending, live);
                crate::query::render(
                    stored,
                    pending.unwrap_or_default(),
                    live.unwrap_or_default(),
                    Stamp::now().to_utc(),
                    &hub.config.query,
                )
            };
            let _ = out.send(Bytes::from(line)).await;
        }
        .into_actor(self)
        .map(|(), act, ctx| act.drain(ctx))
        .wait(ctx);
        ControlFlow::Break(())
    }

    fn reply_failed(&self, reason: &str) {
        log::debug!("{}: request failed: {reason}", self.remote);
        let _ = self.out.try_send(failed(reason));
    }

    fn set_peer(&mut self, tunnel: TunnelId, peer: PeerLink) {
        // Tunnel ids grow in the order the bridge made them: an older one is stale.
        if self
            .tunnel
            .as_ref()
            .is_none_or(|(current, _)| *current <= tunnel)
        {
            self.tunnel = Some((tunnel, peer));
        }
    }
}

/// The live connection of the user's device, checking the user first.
async fn find_device(hub: &Hub, uuid: &ByteString, mac: &ByteString) -> Result<PeerLink, String> {
    if hub.users.check(uuid).await == UserStatus::Unknown && hub.config.require_known_user {
        return Err("unknown user".to_owned());
    }
    hub.registry
        .send(Lookup {
            uuid: uuid.clone(),
            mac: mac.clone(),
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| format!("device {mac} is offline"))
}

/// The first characters of a uuid, enough to tell users apart in logs without
/// writing their secret there.
fn short(uuid: &str) -> String {
    let end = uuid.char_indices().nth(8).map_or(uuid.len(), |(i, _)| i);
    format!("{}…", &uuid[..end])
}

fn failed(reason: &str) -> Bytes {
    #[derive(Serialize)]
    struct Failed<'a> {
        status: &'static str,
        reason: &'a str,
    }
    let mut line = serde_json::to_vec(&Failed {
        status: "failed",
        reason,
    })
    .unwrap_or_default();
    line.push(b'\n');
    line.into()
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        metrics::counter!("elfin_connections_total").increment(1);
        metrics::gauge!("elfin_connections_open").increment(1);
        log::debug!("{}: connected", self.remote);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        metrics::gauge!("elfin_connections_open").decrement(1);
        log::debug!("{}: disconnected", self.remote);
        if let Some(d) = self.device.take() {
            log::info!(
                "device {} ({}) of user {} went away",
                d.mac,
                d.host,
                short(&d.uuid)
            );
            self.hub.registry.do_send(Unregister {
                uuid: d.uuid,
                mac: d.mac,
                session: self.id,
            });
        }
        if self.tunnel.take().is_some() {
            self.hub.bridge.do_send(Unlink { session: self.id });
        }
    }
}

impl StreamHandler<io::Result<BytesMut>> for Session {
    fn handle(&mut self, chunk: io::Result<BytesMut>, ctx: &mut Context<Self>) {
        match chunk {
            Ok(chunk) => {
                if let Some(hold) = self.hold.take() {
                    ctx.cancel_future(hold);
                }
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
        // End of input: hand out a held-back payload tail before closing.
        if let Some(frame) = self.decoder.flush_held(&mut self.inbox) {
            let _ = self.handle_frame(frame, ctx);
        }
        ctx.stop();
    }
}

/// The bridge made this session one side of a tunnel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetPeer {
    pub tunnel: TunnelId,
    pub peer: PeerLink,
}

/// The bridge removed this tunnel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClearPeer {
    pub tunnel: TunnelId,
}

impl Handler<SetPeer> for Session {
    type Result = ();

    fn handle(&mut self, msg: SetPeer, _: &mut Context<Self>) {
        self.set_peer(msg.tunnel, msg.peer);
    }
}

impl Handler<ClearPeer> for Session {
    type Result = ();

    fn handle(&mut self, msg: ClearPeer, _: &mut Context<Self>) {
        // Tunnels are made in id order, so every older tunnel of ours is gone too.
        self.cleared = self.cleared.max(msg.tunnel);
        if self.tunnel.as_ref().is_some_and(|(t, _)| *t <= msg.tunnel) {
            self.tunnel = None;
        }
    }
}

/// The socket's read half as a stream of chunks. Each chunk is split off one growing
/// buffer, so consecutive chunks are usually contiguous and the session's `unsplit`
/// of them costs nothing.
struct ReadChunks {
    io: OwnedReadHalf,
    buf: BytesMut,
    chunk: usize,
}

impl Stream for ReadChunks {
    type Item = io::Result<BytesMut>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.buf.capacity() < this.chunk / 4 {
            this.buf.reserve(this.chunk);
        }
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut this.io),
            cx,
            &mut this.buf
        )) {
            Ok(0) => Poll::Ready(None),
            Ok(_) => Poll::Ready(Some(Ok(this.buf.split()))),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

/// Drains a session's output queue into its socket; once the session is gone, writes
/// what is still queued (bounded by the queue and [`CLOSE_DRAIN`]) and closes.
async fn write_loop(
    mut io: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Bytes>,
    mut closed: oneshot::Receiver<()>,
) {
    loop {
        let chunk = tokio::select! {
            biased;
            _ = &mut closed => break,
            chunk = queue.recv() => chunk,
        };
        let Some(chunk) = chunk else { break };
        if io.write_all(&chunk).await.is_err() {
            return;
        }
    }
    queue.close();
    let rest = async {
        while let Some(chunk) = queue.recv().await {
            io.write_all(&chunk).await?;
        }
        io.shutdown().await
    };
    let _ = tokio::time::timeout(CLOSE_DRAIN, rest).await;
}
