//! The [`Remote`] actor: on this node, the stand-in for a tunnel's end on another node.
//!
//! To the bridge and to the local session it is tunnelled to, a `Remote` is one more
//! connection: it has a [`PeerLink`] and an [`Outbox`] the session writes payload
//! into, and it writes payload into the session's. Its outbox's socket is the
//! tunnel's write lane to the other node ([`super::peer`]); a task reads the read
//! lane into the local end's outbox.
//!
//! Flow control is TCP's, end to end: a slow reader fills its own output queue, this
//! end stops reading the peer connection, the other node's end cannot write, its
//! outbox fills, and the far session stops reading its socket: nothing buffers
//! without bound. An end that cannot hand bytes on for the stall time ends the tunnel,
//! as a local tunnel would.
//!
//! Both ends learn when the other closes: a local end that goes away makes its
//! `Remote` write what is queued and then close the connection; the other `Remote`
//! reads the end of the stream and leaves the tunnel, so the bridge tells its session.
//! A node that stops answering, a lost NATS connection or a cut peer connection ends
//! the tunnel through [`Lost`] or the end of the stream.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;

use actix::prelude::*;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::peer;
use super::wire::NodeId;
use crate::bridge::{BridgeManager, Cause, Unlink};
use crate::connection::{ReadChunks, SocketProbe};
use crate::link::{next_session_id, Meter, PeerEvent, PeerLink, SessionId, Tunnel, TunnelId};
use crate::metric;
use crate::outbox::{Bounds, Outbox, Unsent};
use crate::tls::Transport;

/// The write half of a peer connection (TLS), flushing eagerly: each write hands
/// what TLS took to the socket at once if it can, so a direct write from the outbox
/// leaves nothing behind in the common case. When the socket is full, TLS keeps what
/// it took; the write still reports it taken (as `AsyncWrite` requires), the next
/// write flushes it first, and the outbox, seeing `poll_flush` pending after a direct
/// write, has its writer task flush it. Dropped without a shutdown (its outbox never
/// needed a writer task), it still ends the stream, in the background.
struct EagerFlush<W: AsyncWrite + Unpin + Send + 'static> {
    /// `None` once shut down.
    tls: Option<W>,
    /// TLS holds bytes it took that the socket has not taken yet.
    unflushed: bool,
}

impl<W: AsyncWrite + Unpin + Send + 'static> EagerFlush<W> {
    fn tls(&mut self) -> io::Result<Pin<&mut W>> {
        match &mut self.tls {
            Some(tls) => Ok(Pin::new(tls)),
            None => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> AsyncWrite for EagerFlush<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.unflushed {
            // What an earlier write left goes first; until then nothing is taken.
            ready!(this.tls()?.poll_flush(cx))?;
            this.unflushed = false;
        }
        let taken = ready!(this.tls()?.poll_write_vectored(cx, bufs))?;
        // Taken either way; a flush that cannot finish now (or fails) is left to the
        // next write or flush, which reports it.
        this.unflushed = !matches!(this.tls()?.poll_flush(cx), Poll::Ready(Ok(())));
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.as_ref().is_some_and(W::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.tls()?.poll_flush(cx))?;
        this.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.tls.is_none() {
            return Poll::Ready(Ok(()));
        }
        let shut = ready!(this.tls()?.poll_shutdown(cx));
        this.tls = None;
        Poll::Ready(shut)
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> Drop for EagerFlush<W> {
    fn drop(&mut self) {
        let Some(mut tls) = self.tls.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(CLOSE_DRAIN, tls.shutdown()).await;
            });
        }
    }
}

/// The largest read from a peer connection.
const READ_SIZE: usize = 64 * 1024;

/// What a new [`Remote`] needs besides its peer connections.
pub struct Parts {
    /// The node the other end is on.
    pub node: NodeId,
    /// The address of the connection the other end stands for (for logs).
    pub remote: SocketAddr,
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
        node: NodeId,
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
    node: NodeId,
    remote: SocketAddr,
    tunnel: TunnelId,
    out: Outbox,
    /// Hands the local end to the receiving task once the tunnel is linked.
    linked: Option<oneshot::Sender<(PeerLink, Meter)>>,
    receive: Option<Receive>,
    /// Dropped when this end closes: its writer task writes what is queued, then
    /// closes the connection.
    _closing: oneshot::Sender<()>,
    /// Dropped when this end stops: the receiving task ends.
    _gone: oneshot::Sender<()>,
    stall: Duration,
    bridge: Addr<BridgeManager>,
    tracker: Recipient<Tracked>,
}

/// The receiving task's parts, until the actor starts it.
struct Receive {
    read: ReadChunks,
    linked: oneshot::Receiver<(PeerLink, Meter)>,
    /// Ends when the actor stops.
    gone: oneshot::Receiver<()>,
}

/// Starts a `Remote` on `home`, the thread of the local connection it is to be
/// tunnelled to, its peer connections `lanes` moved there
/// ([`peer::Lanes::start_on`]); returns its link.
pub async fn start_on(
    lanes: peer::Lanes,
    parts: Parts,
    home: &ArbiterHandle,
) -> io::Result<PeerLink> {
    lanes.start_on(home, move |lanes| start(lanes, parts)).await
}

/// Starts a `Remote` on this thread; returns its link, to tunnel a local connection
/// to.
fn start(lanes: peer::Lanes, parts: Parts) -> PeerLink {
    let Parts {
        node,
        remote,
        stall,
        out_chunks,
        out_bytes,
        bridge,
        tracker,
    } = parts;
    let peer::Lanes { read, write } = lanes;
    let (closing, closed) = oneshot::channel();
    let bounds = Bounds {
        chunks: out_chunks,
        bytes: out_bytes,
        direct: true,
    };
    let out = Outbox::new(
        bounds,
        Box::new(EagerFlush {
            tls: Some(write),
            unflushed: false,
        }),
        actix_rt::Arbiter::current(),
        closed,
    );
    let (linked, on_link) = oneshot::channel();
    let (gone_tx, gone) = oneshot::channel();
    let id = next_session_id();
    let read = ReadChunks::new(
        Box::new(read),
        Arc::new(SocketProbe::without_socket(READ_SIZE)),
    );
    let addr = Remote {
        id,
        node,
        remote,
        tunnel: 0,
        out: out.clone(),
        linked: Some(linked),
        receive: Some(Receive {
            read,
            linked: on_link,
            gone,
        }),
        _closing: closing,
        _gone: gone_tx,
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
        home: actix_rt::Arbiter::current(),
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
            let (stall, me) = (self.stall, ctx.address());
            actix_rt::spawn(receive.run(stall, me));
        }
    }

    /// Closes the output: what is queued goes out, then the connection closes
    /// (dropping `_closing` tells a running writer task; an unused writer is dropped).
    /// The receiving task hears it through `_gone`.
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
}

impl Handler<Ended> for Remote {
    type Result = ();

    fn handle(&mut self, ended: Ended, ctx: &mut Context<Self>) {
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
            // The bridge logs the stall; the other node reads the end of the stream.
            Ended::Stalled => self.leave(Cause::Stalled(self.stall), ctx),
            // The local end is closing; its `Unlinked` stops this end.
            Ended::LocalGone => {}
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
            // The local end left: what it sent goes out, then the connection closes.
            PeerEvent::Unlinked { tunnel, .. } if tunnel >= self.tunnel => ctx.stop(),
            PeerEvent::Unlinked { .. } | PeerEvent::Replaced(_) | PeerEvent::Withdrawn(..) => {}
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

/// Why the receiving task stopped handing bytes on.
#[derive(Message)]
#[rtype(result = "()")]
enum Ended {
    /// The other end closed the connection, or it broke.
    Closed(String),
    /// The local end took nothing for the stall time.
    Stalled,
    /// The local end is closing.
    LocalGone,
}

/// How long a write lane dropped without a shutdown may take to end its stream.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);

impl Receive {
    /// Hands payload from the other node to the local end, in order; tells `me` why
    /// it stopped. (Its lane carries only the other end's bytes: closing it unread
    /// resets nothing this end sent.)
    async fn run(self, stall: Duration, me: Addr<Remote>) {
        let Receive {
            mut read,
            linked,
            mut gone,
        } = self;
        let ended = tokio::select! {
            linked = linked => match linked {
                Ok((peer, sent)) => hand_on(&mut read, &peer, &sent, stall, &mut gone).await,
                Err(_) => Ended::LocalGone,
            },
            _ = &mut gone => Ended::LocalGone,
        };
        me.do_send(ended);
    }
}

/// Reads the peer connection into the local end's outbox until either side ends.
async fn hand_on(
    read: &mut ReadChunks,
    peer: &PeerLink,
    sent: &Meter,
    stall: Duration,
    gone: &mut oneshot::Receiver<()>,
) -> Ended {
    loop {
        let next = tokio::select! {
            next = read.next() => next,
            // This end stopped (its local end left, or its node was lost).
            _ = &mut *gone => return Ended::LocalGone,
        };
        let mut chunk = match next {
            Some(Ok(chunk)) => chunk,
            None => return Ended::Closed("closed".into()),
            Some(Err(e)) => return Ended::Closed(format!("connection lost: {e}")),
        };
        // TLS hands over one record (at most 16 KiB) at a time: what has arrived
        // already goes on together, one write to the local socket instead of several.
        let mut end = None;
        while chunk.len() < READ_SIZE && end.is_none() {
            match read.next().now_or_never() {
                None => break,
                Some(Some(Ok(more))) => chunk.unsplit(more),
                Some(None) => end = Some(Ended::Closed("closed".into())),
                Some(Some(Err(e))) => end = Some(Ended::Closed(format!("connection lost: {e}"))),
            }
        }
        let len = chunk.len() as u64;
        match peer.out.send_within(chunk.freeze(), stall).await {
            Ok(()) => sent.add(len),
            Err(Unsent::Closed) => return Ended::LocalGone,
            Err(Unsent::Stalled) => return Ended::Stalled,
        }
        if let Some(end) = end {
            return end;
        }
    }
}
