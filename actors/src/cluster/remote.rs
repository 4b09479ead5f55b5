//! The [`Remote`] actor: on this node, the stand-in for a tunnel's end on another node.
//!
//! To the bridge and to the local session it is tunnelled to, a `Remote` is one more
//! connection: it has a [`PeerLink`] and an [`Outbox`] the session writes payload
//! into, and it writes payload into the session's. Its outbox's "socket" is a
//! `NatsWriter`, so the session writes straight into NATS while nothing waits, and
//! the usual writer task drains the queue otherwise. Between the two nodes, each end
//! has two subjects: its data inbox (payload in order, then one `Close`) and
//! `<inbox>.credit`.
//!
//! Flow control is a credit window, end to end: a sender may have `window` bytes
//! (each message also costs [`MESSAGE_COST`], which bounds the message count too) that
//! the receiver has not yet handed to its connection's output queue; the receiver
//! grants credit back as it hands bytes on. A slow reader fills its own output queue,
//! stops granting, its far end's outbox fills, and the far session stops reading its
//! socket: nothing buffers without bound. An end that cannot hand bytes on for the
//! stall time ends the tunnel, as a local tunnel would.
//!
//! Both ends learn when the other closes: a local end that goes away makes its
//! `Remote` send what is queued and then `Close`; a `Close` received makes the other
//! `Remote` leave the tunnel, so the bridge tells its session. A node that stops
//! answering or a lost NATS connection ends the tunnel through [`Lost`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use actix::prelude::*;
use async_nats::{Client, HeaderMap, PublishError, Subject};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::io::AsyncWrite;
use tokio::sync::oneshot;

use super::wire::{self, Close, CONTROL};
use super::Subscription;
use crate::bridge::{BridgeManager, Cause, Unlink};
use crate::link::{next_session_id, Meter, PeerEvent, PeerLink, SessionId, Tunnel, TunnelId};
use crate::metric;
use crate::outbox::{Bounds, Outbox, Unsent};
use crate::tls::Transport;

/// Credit each NATS message costs beyond its bytes: a window of W bytes allows at most
/// W / MESSAGE_COST messages in flight, so a subscriber's buffer never overflows.
pub const MESSAGE_COST: u64 = 256;

/// The largest message a tunnel end sends (NATS servers take 1 MB by default).
pub const MAX_MESSAGE: usize = 128 * 1024;

/// What a new [`Remote`] needs.
pub struct Parts {
    pub nats: Client,
    /// The node the other end is on.
    pub node: String,
    /// This end's subscriptions: its data inbox, and `<inbox>.credit`.
    pub data: Subscription,
    pub credits: Subscription,
    /// The other end's data inbox.
    pub peer_inbox: String,
    /// The address of the connection the other end stands for (for logs).
    pub remote: SocketAddr,
    /// Bytes this end may send before the other grants more (its receive window).
    pub send_credit: u64,
    /// This end grants credit back each time it has handed on a quarter of this.
    pub receive_window: u64,
    pub stall: Duration,
    /// This end's output queue, in chunks and bytes.
    pub out_chunks: usize,
    pub out_bytes: usize,
    pub bridge: Addr<BridgeManager>,
    pub tracker: Recipient<Tracked>,
}

/// A cross-node end opened or closed, for the cluster to end it when its node is lost.
#[derive(Message)]
#[rtype(result = "()")]
pub enum Tracked {
    Open {
        id: SessionId,
        node: String,
        end: Addr<Remote>,
    },
    Closed(SessionId),
}

/// The other node stopped answering, or NATS is gone: the tunnel ends.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Lost(pub String);

pub struct Remote {
    id: SessionId,
    node: String,
    remote: SocketAddr,
    tunnel: TunnelId,
    out: Outbox,
    /// Hands the local end to the receiving task once the tunnel is linked.
    linked: Option<oneshot::Sender<(PeerLink, Meter)>>,
    receive: Option<Receive>,
    /// Dropped when this end closes: its writer task sends what is queued, then
    /// `Close`.
    _closing: oneshot::Sender<()>,
    stall: Duration,
    bridge: Addr<BridgeManager>,
    tracker: Recipient<Tracked>,
}

/// The receiving task's parts, until the actor starts it.
struct Receive {
    data: Subscription,
    linked: oneshot::Receiver<(PeerLink, Meter)>,
    nats: Client,
    credit_to: Subject,
    window: u64,
}

/// Starts a `Remote`; returns its link, to tunnel a local connection to.
pub fn start(parts: Parts) -> PeerLink {
    let Parts {
        nats,
        node,
        data,
        credits,
        peer_inbox,
        remote,
        send_credit,
        receive_window,
        stall,
        out_chunks,
        out_bytes,
        bridge,
        tracker,
    } = parts;
    let writer = NatsWriter {
        nats: nats.clone(),
        to: peer_inbox.clone().into(),
        credits,
        credit: send_credit,
        pending: None,
        closed: false,
    };
    let (closing, closed) = oneshot::channel();
    let bounds = Bounds {
        chunks: out_chunks,
        bytes: out_bytes,
        direct: true,
    };
    let out = Outbox::new(
        bounds,
        Box::new(writer),
        actix_rt::Arbiter::current(),
        closed,
    );
    let (linked, on_link) = oneshot::channel();
    let id = next_session_id();
    let addr = Remote {
        id,
        node,
        remote,
        tunnel: 0,
        out: out.clone(),
        linked: Some(linked),
        receive: Some(Receive {
            data,
            linked: on_link,
            nats,
            credit_to: format!("{peer_inbox}.credit").into(),
            window: receive_window,
        }),
        _closing: closing,
        stall,
        bridge,
        tracker,
    }
    .start();
    PeerLink {
        id,
        remote,
        transport: Transport::Plain,
        certificate: None,
        events: addr.recipient(),
        out,
    }
}

impl Actor for Remote {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.tracker.do_send(Tracked::Open {
            id: self.id,
            node: self.node.clone(),
            end: ctx.address(),
        });
        if let Some(receive) = self.receive.take() {
            let stall = self.stall;
            ctx.spawn(
                receive
                    .run(stall)
                    .into_actor(self)
                    .map(|ended, act, ctx| act.ended(ended, ctx)),
            );
        }
    }

    /// Closes the output: what is queued goes out, then `Close` (dropping `_closing`
    /// tells a running writer task; an unused writer sends it when dropped).
    fn stopped(&mut self, _: &mut Context<Self>) {
        self.out.close_unused();
        self.tracker.do_send(Tracked::Closed(self.id));
    }
}

impl Remote {
    /// Leaves the tunnel from this side: the bridge tells the local end.
    fn leave(&mut self, cause: Cause, ctx: &mut Context<Self>) {
        self.bridge.do_send(Unlink {
            session: self.id,
            cause,
        });
        ctx.stop();
    }

    fn ended(&mut self, ended: Ended, ctx: &mut Context<Self>) {
        match ended {
            Ended::Closed(reason) => {
                log::info!(
                    "tunnel {}: its end on node {} ({}) closed: {reason}",
                    self.tunnel,
                    self.node,
                    self.remote
                );
                self.leave(Cause::Closed, ctx);
            }
            // The bridge logs the stall; the other node hears `Close`.
            Ended::Stalled => self.leave(Cause::Stalled(self.stall), ctx),
            // The local end is closing; its `Unlinked` stops this end.
            Ended::LocalGone => {}
            Ended::Unsubscribed => ctx.notify(Lost("its NATS subscription ended".into())),
        }
    }
}

impl Handler<PeerEvent> for Remote {
    type Result = ();

    fn handle(&mut self, event: PeerEvent, ctx: &mut Context<Self>) {
        match event {
            PeerEvent::Linked(Tunnel {
                id: tunnel,
                peer,
                sent,
            }) => {
                if let Some(linked) = self.linked.take() {
                    self.tunnel = tunnel;
                    let _ = linked.send((peer, sent));
                }
            }
            // The local end left: what it sent goes out, then `Close`.
            PeerEvent::Unlinked { tunnel, .. } if tunnel >= self.tunnel => ctx.stop(),
            PeerEvent::Unlinked { .. } | PeerEvent::Replaced { .. } => {}
        }
    }
}

impl Handler<Lost> for Remote {
    type Result = ();

    fn handle(&mut self, Lost(why): Lost, ctx: &mut Context<Self>) {
        log::warn!(
            "tunnel {} to {} on node {} ended: {why}",
            self.tunnel,
            self.remote,
            self.node
        );
        metrics::counter!(metric::CLUSTER_TUNNELS_LOST_TOTAL).increment(1);
        self.leave(Cause::Closed, ctx);
    }
}

/// Why the receiving task ended.
enum Ended {
    /// The other end sent `Close`.
    Closed(String),
    /// The local end took nothing for the stall time.
    Stalled,
    /// The local end is closing.
    LocalGone,
    Unsubscribed,
}

impl Receive {
    /// Hands payload from the other node to the local end, in order, granting credit
    /// back as it goes.
    async fn run(self, stall: Duration) -> Ended {
        let Receive {
            mut data,
            linked,
            nats,
            credit_to,
            window,
        } = self;
        let Ok((peer, sent)) = linked.await else {
            return Ended::LocalGone;
        };
        let mut consumed = 0u64;
        while let Some(message) = data.next().await {
            if message
                .headers
                .as_ref()
                .is_some_and(|h| h.get(CONTROL).is_some())
            {
                let close: Option<Close> = serde_json::from_slice(&message.payload).ok();
                return Ended::Closed(close.map_or_else(|| "closed".into(), |c| c.reason));
            }
            let len = message.payload.len() as u64;
            match peer.out.send_within(message.payload, stall).await {
                Ok(()) => {}
                Err(Unsent::Closed) => return Ended::LocalGone,
                Err(Unsent::Stalled) => return Ended::Stalled,
            }
            sent.add(len);
            consumed += len + MESSAGE_COST;
            if consumed >= window / 4 {
                let grant = Bytes::from(consumed.to_string());
                if nats.publish(credit_to.clone(), grant).await.is_err() {
                    return Ended::Unsubscribed;
                }
                consumed = 0;
            }
        }
        Ended::Unsubscribed
    }
}

/// The write half of a cross-node end: what is written goes to the other end's data
/// inbox as NATS messages, as far as credit allows; shutting it down (or dropping it)
/// sends `Close` after them. The connection's writer task drives it like a socket, and
/// senders write into it directly while nothing waits. A write that publishes returns
/// `Pending` until the client has taken the message, and answers the repeated write
/// with its length: the outbox's contract for a write half (see [`crate::outbox`]).
struct NatsWriter {
    nats: Client,
    to: Subject,
    credits: Subscription,
    credit: u64,
    /// A message handed to the client that it has not taken yet, and its length: the
    /// write that made it is answered once it is taken (the caller repeats that
    /// write, so no byte is sent twice).
    pending: Option<(BoxFuture<'static, Result<(), PublishError>>, usize)>,
    closed: bool,
}

impl NatsWriter {
    /// Credit granted so far; how many bytes may go in the next message.
    fn poll_room(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<usize>> {
        while let Poll::Ready(grant) = self.credits.poll_next_unpin(cx) {
            let Some(grant) = grant else {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            };
            let granted = std::str::from_utf8(&grant.payload)
                .ok()
                .and_then(|g| g.parse::<u64>().ok());
            self.credit += granted.unwrap_or(0);
        }
        match self.credit.saturating_sub(MESSAGE_COST) {
            0 => Poll::Pending,
            room => Poll::Ready(Ok(room.min(MAX_MESSAGE as u64) as usize)),
        }
    }

    /// Publishes `message`; `Pending` keeps it for the repeated write.
    fn publish(
        &mut self,
        message: Bytes,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let len = message.len();
        self.credit -= len as u64 + MESSAGE_COST;
        let (nats, to) = (self.nats.clone(), self.to.clone());
        self.pending = Some((
            Box::pin(async move { nats.publish(to, message).await }),
            len,
        ));
        self.poll_pending(cx).map_ok(|()| len)
    }

    fn poll_pending(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        if let Some((publishing, _)) = &mut self.pending {
            let published = std::task::ready!(publishing.as_mut().poll(cx));
            self.pending = None;
            published.map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        }
        Poll::Ready(Ok(()))
    }

    fn close_message(&self) -> (HeaderMap, Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert(CONTROL, "close");
        let close = Close {
            reason: "the other end closed".into(),
        };
        (headers, wire::encode(&close))
    }
}

impl AsyncWrite for NatsWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    /// One message of as many of `bufs` as credit allows.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some((_, len)) = this.pending {
            return this.poll_pending(cx).map_ok(|()| len);
        }
        let room = std::task::ready!(this.poll_room(cx))?;
        let mut message = BytesMut::with_capacity(room.min(bufs.iter().map(|b| b.len()).sum()));
        for buf in bufs {
            let take = buf.len().min(room - message.len());
            message.extend_from_slice(&buf[..take]);
        }
        if message.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.publish(message.freeze(), cx)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_pending(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pending(cx))?;
        if !this.closed {
            this.closed = true;
            let (nats, to) = (this.nats.clone(), this.to.clone());
            let (headers, close) = this.close_message();
            let publishing = async move { nats.publish_with_headers(to, headers, close).await };
            this.pending = Some((Box::pin(publishing), 0));
        }
        this.poll_pending(cx)
    }
}

impl Drop for NatsWriter {
    /// A writer dropped without a shutdown (its writer task never ran) still ends
    /// the stream with `Close`, after everything it sent.
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let (nats, to) = (self.nats.clone(), self.to.clone());
        let (headers, close) = self.close_message();
        let pending = self.pending.take();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Some((publishing, _)) = pending {
                let _ = publishing.await;
            }
            let _ = nats.publish_with_headers(to, headers, close).await;
        });
    }
}
