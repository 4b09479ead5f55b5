//! The tunnel vocabulary: how the shared actors reach a session, and what they tell it.
//!
//! A [`PeerLink`] is everything another actor holds of a connection: its id, its
//! address for [`PeerEvent`]s and its [`Outbox`], into which a tunnel peer writes
//! payloads directly. Nothing here knows the session actor's type, so the registry and
//! the bridge sit below the session in the module graph.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use bytes::{Buf, Bytes};
use bytestring::ByteString;
use tokio::io::AsyncWrite;
use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::{mpsc, Semaphore};

use crate::tls::Transport;

/// A connection, numbered in accept order for the life of the process.
pub type SessionId = u64;

/// A tunnel, numbered by the bridge in creation order: of two tunnels, the one with the
/// larger id is the newer.
pub type TunnelId = u64;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

pub fn next_session_id() -> SessionId {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// A socket's write half.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A connection's output: replies and tunnel payloads, written to its socket in the
/// order each sender hands them over. Bounded in chunks and in bytes; a full queue
/// pauses whoever fills it.
///
/// When nothing is queued and no writer task holds the socket, a chunk is written
/// straight into the socket by the sender (plain TCP only: a TLS write would buffer
/// inside the TLS session). That is a tunnel's common case, and it saves a hand-over
/// to another task per frame. What the socket does not take at once goes to a queue
/// drained by the connection's writer task, which is started then: most devices never
/// receive a byte and never get one. A chunk's bytes are taken from the byte budget
/// while it waits and given back once it is written.
#[derive(Clone)]
pub struct Outbox(Arc<Out>);

struct Out {
    port: Mutex<Port>,
    capacity: usize,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    /// Whether senders may write into the socket themselves.
    direct: bool,
}

/// Who holds the socket's write half, and the writer task's queue.
struct Port {
    /// The write half, while no writer task holds it.
    idle: Option<Writer>,
    /// The writer task's queue, once a chunk had to wait.
    chunks: Option<mpsc::Sender<Bytes>>,
    /// Starts the writer task; taken by the first chunk that has to wait.
    start: Option<StartWriter>,
    /// Chunks handed to the queue and not yet written. Direct writes happen only at
    /// zero, so they never overtake a queued chunk.
    queued: usize,
}

/// What starts a connection's writer task, given its queue.
pub type StartWriter = Box<dyn FnOnce(OutQueue) + Send>;

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queued = self.0.port().queued;
        write!(f, "Outbox {{ queued: {queued} }}")
    }
}

/// The writer task's end of an [`Outbox`].
pub struct OutQueue {
    chunks: mpsc::Receiver<Bytes>,
    out: Arc<Out>,
}

impl std::fmt::Debug for OutQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutQueue")
    }
}

/// The output of a connection whose socket's write half is `writer`: at most
/// `chunks` chunks and `bytes` bytes wait (a larger chunk takes the whole byte
/// budget); with `direct`, senders write into the socket when nothing waits; `start`
/// starts the writer task when the first chunk has to wait.
pub fn outbox(
    chunks: usize,
    bytes: usize,
    writer: Writer,
    direct: bool,
    start: StartWriter,
) -> Outbox {
    let max_bytes = bytes.clamp(1, Semaphore::MAX_PERMITS);
    Outbox(Arc::new(Out {
        port: Mutex::new(Port {
            idle: Some(writer),
            chunks: None,
            start: Some(start),
            queued: 0,
        }),
        capacity: chunks.max(1),
        bytes: Arc::new(Semaphore::new(max_bytes)),
        max_bytes,
        direct,
    }))
}

/// What a chunk takes of a byte budget of `max` bytes.
fn cost(chunk: &Bytes, max: usize) -> usize {
    chunk.len().min(max)
}

impl Out {
    fn port(&self) -> std::sync::MutexGuard<'_, Port> {
        self.port.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Outbox {
    fn cost(&self, chunk: &Bytes) -> usize {
        cost(chunk, self.0.max_bytes)
    }

    /// Writes as much of `chunk` as the socket takes now, if nothing is queued and
    /// the socket is idle; returns what is left (all of it if nothing was written).
    fn write_now(&self, port: &mut Port, mut chunk: Bytes) -> Option<Bytes> {
        if !self.0.direct || port.queued > 0 {
            return Some(chunk);
        }
        let Some(io) = port.idle.as_mut() else {
            return Some(chunk);
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while !chunk.is_empty() {
            match std::pin::Pin::new(&mut **io).poll_write(&mut cx, &chunk) {
                std::task::Poll::Ready(Ok(n)) if n > 0 => chunk.advance(n),
                // Would block, or failed: the writer task finds out and closes.
                _ => return Some(chunk),
            }
        }
        None
    }

    /// The writer task's queue, started on first use; `None` once the output is
    /// closed.
    fn queue(&self, port: &mut Port) -> Option<mpsc::Sender<Bytes>> {
        if port.chunks.is_none() {
            let start = port.start.take()?;
            let (tx, rx) = mpsc::channel(self.0.capacity);
            start(OutQueue {
                chunks: rx,
                out: self.0.clone(),
            });
            port.chunks = Some(tx);
        }
        port.chunks.clone()
    }

    /// Hands `chunk` on if there is room for it now: written directly when it can be,
    /// queued otherwise.
    pub fn try_send(&self, chunk: Bytes) -> Result<(), TrySendError<Bytes>> {
        self.offer(chunk, true)
    }

    /// Queues `chunk` for the writer task if there is room, never writing it
    /// directly: for a sender that has more chunks at hand, which the writer then
    /// sends together with one vectored write.
    pub fn try_queue(&self, chunk: Bytes) -> Result<(), TrySendError<Bytes>> {
        self.offer(chunk, false)
    }

    fn offer(&self, chunk: Bytes, direct: bool) -> Result<(), TrySendError<Bytes>> {
        let cost = self.cost(&chunk);
        let permit = match self.0.bytes.try_acquire_many(cost as u32) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(TrySendError::Full(chunk)),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(TrySendError::Closed(chunk)),
        };
        let mut port = self.0.port();
        let rest = if direct {
            match self.write_now(&mut port, chunk) {
                None => return Ok(()), // written: the permit goes back
                Some(rest) => rest,
            }
        } else {
            chunk
        };
        let Some(queue) = self.queue(&mut port) else {
            return Err(TrySendError::Closed(rest));
        };
        // Nothing was written unless nothing was queued, so a partly written chunk
        // always finds room.
        let rest_cost = self.cost(&rest);
        queue.try_send(rest)?;
        port.queued += 1;
        permit.forget();
        self.0.bytes.add_permits(cost - rest_cost);
        Ok(())
    }

    /// Queues `chunk`, waiting for room.
    pub async fn send(&self, chunk: Bytes) -> Result<(), SendError<Bytes>> {
        let cost = self.cost(&chunk);
        let Ok(permit) = self.0.bytes.acquire_many(cost as u32).await else {
            return Err(SendError(chunk));
        };
        let (queue, rest) = {
            let mut port = self.0.port();
            let Some(rest) = self.write_now(&mut port, chunk) else {
                return Ok(());
            };
            let Some(queue) = self.queue(&mut port) else {
                return Err(SendError(rest));
            };
            // Counted before it is in the queue, so no direct write overtakes it.
            port.queued += 1;
            (queue, rest)
        };
        let rest_cost = self.cost(&rest);
        if let Err(e) = queue.send(rest).await {
            self.0.port().queued -= 1;
            return Err(e);
        }
        permit.forget();
        self.0.bytes.add_permits(cost - rest_cost);
        Ok(())
    }

    /// The connection is closing: if its writer task never started, the socket's
    /// write half is dropped now (closing it) rather than with the last clone of this
    /// outbox, and later chunks are refused.
    pub fn close_unused(&self) {
        let mut port = self.0.port();
        if port.start.take().is_some() {
            port.idle = None;
        }
    }
}

impl OutQueue {
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.chunks.recv().await
    }

    /// The next chunk if one is queued now.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.chunks.try_recv().ok()
    }

    /// What `chunk` took of the byte budget (ask before writing any of it).
    pub fn cost(&self, chunk: &Bytes) -> usize {
        cost(chunk, self.out.max_bytes)
    }

    /// The socket's write half, unless the writer task holds it already.
    pub fn take_writer(&self, io: &mut Option<Writer>) {
        if io.is_none() {
            *io = self.out.port().idle.take();
        }
    }

    /// `chunks` chunks of `cost` bytes are written: their budget goes back, and the
    /// write half too if nothing else is queued (senders write directly again).
    pub fn written(&self, io: &mut Option<Writer>, chunks: usize, cost: usize) {
        self.out.bytes.add_permits(cost);
        let mut port = self.out.port();
        port.queued -= chunks;
        if port.queued == 0 && self.out.direct {
            port.idle = io.take();
        }
    }

    /// Refuses further chunks (and wakes whoever waits for room); what is queued can
    /// still be received.
    pub fn close(&mut self) {
        self.chunks.close();
        self.out.bytes.close();
    }
}

/// What another actor needs to reach a session.
#[derive(Clone, Debug)]
pub struct PeerLink {
    pub id: SessionId,
    pub remote: SocketAddr,
    pub transport: Transport,
    pub events: Recipient<PeerEvent>,
    pub out: Outbox,
}

/// Which side of a tunnel a connection is on; it decides what happens to that
/// connection when the tunnel ends from the other side (`docs/PROTOCOL.md` §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Asked for the tunnel with `connme`: closed when its tunnel ends from the device
    /// side, as a TCP relay would close it.
    Client,
    /// The device with this mac: stays connected when its tunnel ends.
    Device(ByteString),
}

/// One end of a tunnel.
#[derive(Clone, Debug)]
pub struct End {
    pub link: PeerLink,
    pub role: Role,
}

/// The bytes one end has forwarded into its tunnel: counted by its session, read by
/// the bridge for the status page, and added to `elfin_tunnel_bytes_total` by the
/// receiving side's role.
#[derive(Clone)]
pub struct Meter {
    bytes: Arc<AtomicU64>,
    /// `elfin_tunnel_bytes_total` of this direction, looked up once per tunnel.
    total: metrics::Counter,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Meter({})", self.get())
    }
}

impl Meter {
    /// A meter for bytes sent to an end with this role.
    pub fn towards(role: &Role) -> Meter {
        let direction = match role {
            Role::Client => "to_client",
            Role::Device(_) => "to_device",
        };
        Meter {
            bytes: Arc::default(),
            total: metrics::counter!("elfin_tunnel_bytes_total", "direction" => direction),
        }
    }

    pub fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.total.increment(n);
    }

    pub fn get(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// What the bridge and the registry tell a session.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum PeerEvent {
    /// This session is now one end of `tunnel`, `peer` the other; what it forwards
    /// is counted on `sent`.
    Linked {
        tunnel: TunnelId,
        peer: PeerLink,
        sent: Meter,
    },
    /// `tunnel` is gone. With `close`, this session is a client whose tunnel ended from
    /// the device side: it writes what is queued and closes.
    Unlinked { tunnel: TunnelId, close: bool },
    /// A newer connection took over device (uuid, mac), which this session spoke for:
    /// it ends its tunnel, writes what is queued and closes.
    Replaced { uuid: ByteString, mac: ByteString },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::AsyncReadExt;

    type Started = Arc<Mutex<Option<OutQueue>>>;

    /// An outbox on `writer` whose writer-task start is recorded, with the queue it
    /// would drain.
    fn recorded(writer: Writer, direct: bool) -> (Outbox, Arc<AtomicUsize>, Started) {
        let (starts, queue) = (Arc::new(AtomicUsize::new(0)), Started::default());
        let (s, q) = (starts.clone(), queue.clone());
        let start = Box::new(move |queue| {
            s.fetch_add(1, Ordering::SeqCst);
            *q.lock().unwrap() = Some(queue);
        });
        (outbox(4, 100, writer, direct, start), starts, queue)
    }

    fn sink() -> Writer {
        Box::new(tokio::io::sink())
    }

    #[test]
    fn the_writer_task_starts_with_the_first_waiting_chunk_and_only_once() {
        let (out, starts, queue) = recorded(sink(), false);
        let clone = out.clone();
        assert_eq!(
            starts.load(Ordering::SeqCst),
            0,
            "an idle output starts nothing"
        );
        out.try_send(Bytes::from_static(b"a")).unwrap();
        clone.try_send(Bytes::from_static(b"b")).unwrap();
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        let mut queue = queue.lock().unwrap().take().unwrap();
        assert_eq!(queue.try_recv().unwrap(), &b"a"[..]);
        assert_eq!(queue.try_recv().unwrap(), &b"b"[..]);
    }

    #[test]
    fn bytes_come_back_to_the_budget_only_when_written() {
        let (out, _, queue) = recorded(sink(), false);
        out.try_send(Bytes::from(vec![1; 60])).unwrap();
        let full = out.try_send(Bytes::from(vec![2; 60]));
        assert!(matches!(full, Err(TrySendError::Full(_))), "60 + 60 > 100");
        let queue = queue.lock().unwrap().take().unwrap();
        queue.written(&mut None, 1, 60);
        out.try_send(Bytes::from(vec![2; 60])).unwrap();
    }

    #[test]
    fn an_output_closed_unused_refuses_chunks_and_never_starts_a_writer() {
        let (out, starts, _) = recorded(sink(), false);
        out.close_unused();
        let refused = out.try_send(Bytes::from_static(b"late"));
        assert!(
            matches!(refused, Err(TrySendError::Closed(_))),
            "{refused:?}"
        );
        assert_eq!(starts.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn senders_write_directly_until_the_socket_is_full_and_never_overtake_the_queue() {
        let (socket, mut peer) = tokio::io::duplex(64);
        let (out, starts, queue) = recorded(Box::new(socket), true);
        out.try_send(Bytes::from_static(b"hello")).unwrap();
        assert_eq!(
            starts.load(Ordering::SeqCst),
            0,
            "written without a writer task"
        );
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");

        // The socket takes 64 of 90 bytes; the rest waits, and so does what follows.
        let big: Vec<u8> = (0..90).collect();
        out.try_send(Bytes::from(big.clone())).unwrap();
        out.try_send(Bytes::from_static(b"tail")).unwrap();
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        let mut queue = queue.lock().unwrap().take().unwrap();
        let mut io = None;
        queue.take_writer(&mut io);
        let mut first = vec![0u8; 64];
        peer.read_exact(&mut first).await.unwrap();
        assert_eq!(first, big[..64]);
        // Play the writer task: write what waits, in order.
        let writer = io.as_mut().expect("the writer task takes the write half");
        for _ in 0..2 {
            let chunk = queue.try_recv().unwrap();
            tokio::io::AsyncWriteExt::write_all(writer, &chunk)
                .await
                .unwrap();
        }
        let mut rest = vec![0u8; 30];
        peer.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest[..26], big[64..]);
        assert_eq!(&rest[26..], b"tail");
        // Nothing waits: the write half goes back, and senders write directly again.
        queue.written(&mut io, 2, 26 + 4);
        assert!(io.is_none());
        out.try_send(Bytes::from_static(b"again")).unwrap();
        let mut again = [0u8; 5];
        peer.read_exact(&mut again).await.unwrap();
        assert_eq!(&again, b"again");
    }
}
