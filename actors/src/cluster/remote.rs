//! The [`Remote`] actor: on this node, the stand-in for a tunnel's end on another node.
//!
//! To the bridge and to the local session it is tunnelled to, a `Remote` is one more
//! connection: it has a [`PeerLink`], the session writes payload into its
//! [`Outbox`](crate::link::Outbox)
//! and it writes payload into the session's. Between the two nodes the tunnel is two
//! NATS subjects per end: its data inbox (payload, in order, then one `Close`) and
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

use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;
use async_nats::{Client, HeaderMap, Subscriber};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::oneshot;

use super::wire::{self, Close, CONTROL};
use crate::bridge::{BridgeManager, Cause, Unlink};
use crate::link::{
    self, next_session_id, Meter, OutQueue, PeerEvent, PeerLink, SessionId, TunnelId,
};
use crate::tls::Transport;

/// Credit each NATS message costs beyond its bytes: a window of W bytes allows at most
/// W / MESSAGE_COST messages in flight, so a subscriber's buffer never overflows.
pub const MESSAGE_COST: u64 = 256;

/// Several queued chunks go out as one message of up to this many bytes (plus one
/// chunk).
pub const BATCH_BYTES: usize = 64 * 1024;

/// What a new [`Remote`] needs.
pub struct Parts {
    pub nats: Client,
    /// The node the other end is on.
    pub node: String,
    /// This end's subscriptions: its data inbox, and `<inbox>.credit`.
    pub data: Subscriber,
    pub credits: Subscriber,
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
    /// Hands the local end to the receiving task once the tunnel is linked.
    linked: Option<oneshot::Sender<(PeerLink, Meter)>>,
    receive: Option<Receive>,
    /// Tells the sending task to send what is queued and then `Close`.
    finish: Option<oneshot::Sender<()>>,
    sender: actix_rt::task::JoinHandle<()>,
    stall: Duration,
    bridge: Addr<BridgeManager>,
    tracker: Recipient<Tracked>,
}

/// The receiving task's parts, until the actor starts it.
struct Receive {
    data: Subscriber,
    linked: oneshot::Receiver<(PeerLink, Meter)>,
    nats: Client,
    credit_to: String,
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
    let (queue_tx, queue_rx) = oneshot::channel();
    let out = link::queue_only(
        out_chunks,
        out_bytes,
        Box::new(move |queue| {
            let _ = queue_tx.send(queue);
        }),
    );
    let (finish, finished) = oneshot::channel();
    let sending = Sending {
        nats: nats.clone(),
        to: peer_inbox.clone(),
        credits,
        credit: send_credit,
        stall,
    };
    let sender = actix_rt::spawn(sending.run(queue_rx, finished));
    let (linked, on_link) = oneshot::channel();
    let id = next_session_id();
    let addr = Remote {
        id,
        node,
        remote,
        tunnel: 0,
        linked: Some(linked),
        receive: Some(Receive {
            data,
            linked: on_link,
            nats,
            credit_to: format!("{peer_inbox}.credit"),
            window: receive_window,
        }),
        finish: Some(finish),
        sender,
        stall,
        bridge,
        tracker,
    }
    .start();
    PeerLink {
        id,
        remote,
        transport: Transport::Plain,
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

    fn stopped(&mut self, _: &mut Context<Self>) {
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
                self.sender.abort();
                self.leave(Cause::Closed, ctx);
            }
            Ended::Stalled => {
                // The bridge logs the stall; the other node hears `Close`.
                self.finish.take().map(|f| f.send(()));
                self.leave(Cause::Stalled(self.stall), ctx);
            }
            // The local end is closing; its `Unlinked` finishes this end.
            Ended::LocalGone => {}
            Ended::Unsubscribed => ctx.notify(Lost("its NATS subscription ended".into())),
        }
    }
}

impl Handler<PeerEvent> for Remote {
    type Result = ();

    fn handle(&mut self, event: PeerEvent, ctx: &mut Context<Self>) {
        match event {
            PeerEvent::Linked { tunnel, peer, sent } => {
                if let Some(linked) = self.linked.take() {
                    self.tunnel = tunnel;
                    let _ = linked.send((peer, sent));
                }
            }
            PeerEvent::Unlinked { tunnel, .. } if tunnel >= self.tunnel => {
                // The local end left: send it all, then `Close`.
                self.finish.take().map(|f| f.send(()));
                ctx.stop();
            }
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
        metrics::counter!("elfin_cluster_tunnels_lost_total").increment(1);
        self.sender.abort();
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
            let handed = match peer.out.try_send(message.payload) {
                Ok(()) => Ok(()),
                Err(tokio::sync::mpsc::error::TrySendError::Full(payload)) => {
                    match tokio::time::timeout(stall, peer.out.send(payload)).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(_)) => Err(Ended::LocalGone),
                        Err(_) => Err(Ended::Stalled),
                    }
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Err(Ended::LocalGone),
            };
            if let Err(ended) = handed {
                return ended;
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

/// The sending task: forwards what the local end queues, as credit allows.
struct Sending {
    nats: Client,
    to: String,
    credits: Subscriber,
    credit: u64,
    stall: Duration,
}

impl Sending {
    /// Forwards until told to finish, then sends what is still queued (for at most the
    /// stall time) and `Close`.
    async fn run(mut self, queue: oneshot::Receiver<OutQueue>, mut finish: oneshot::Receiver<()>) {
        let queue = tokio::select! {
            biased;
            queue = queue => queue.ok(),
            _ = &mut finish => None,
        };
        if let Some(mut queue) = queue {
            loop {
                let first = tokio::select! {
                    biased;
                    first = queue.recv() => first,
                    _ = &mut finish => break,
                };
                let Some(first) = first else { return };
                if !self.forward(first, &mut queue).await {
                    return;
                }
            }
            queue.close();
            let stall = self.stall;
            let rest = async {
                while let Some(first) = queue.try_recv() {
                    if !self.forward(first, &mut queue).await {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(stall, rest).await;
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTROL, "close");
        let close = wire::encode(&Close {
            reason: "the other end closed".into(),
        });
        let _ = self
            .nats
            .publish_with_headers(self.to, headers, close)
            .await;
    }

    /// Sends `first` and what else is queued now (up to a batch) as one message, once
    /// there is credit for it. False if the other end can no longer be reached.
    async fn forward(&mut self, first: Bytes, queue: &mut OutQueue) -> bool {
        let (mut cost, mut chunks) = (queue.cost(&first), 1);
        let mut batch = first;
        if batch.len() < BATCH_BYTES {
            if let Some(second) = queue.try_recv() {
                let mut joined = BytesMut::with_capacity(BATCH_BYTES);
                joined.extend_from_slice(&batch);
                let mut next = Some(second);
                while let Some(chunk) = next {
                    cost += queue.cost(&chunk);
                    chunks += 1;
                    joined.extend_from_slice(&chunk);
                    next = (joined.len() < BATCH_BYTES)
                        .then(|| queue.try_recv())
                        .flatten();
                }
                batch = joined.freeze();
            }
        }
        let need = batch.len() as u64 + MESSAGE_COST;
        while self.credit < need {
            let Some(grant) = self.credits.next().await else {
                return false;
            };
            let granted = std::str::from_utf8(&grant.payload)
                .ok()
                .and_then(|g| g.parse::<u64>().ok());
            self.credit += granted.unwrap_or(0);
        }
        self.credit -= need;
        let sent = self.nats.publish(self.to.clone(), batch).await.is_ok();
        queue.written(&mut None, chunks, cost);
        sent
    }
}
