//! The tunnel vocabulary: how the shared actors reach a session, and what they tell it.
//!
//! A [`PeerLink`] is everything another actor holds of a connection: its id, its
//! address for [`PeerEvent`]s and its [`Outbox`], into which a tunnel peer writes
//! payloads directly. Nothing here knows the session actor's type, so the registry and
//! the bridge sit below the session in the module graph.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use actix::prelude::*;
use bytes::Bytes;
use bytestring::ByteString;
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

/// A connection's output queue: replies and tunnel payloads, written to its socket in
/// order by the session's writer task. Bounded in chunks and in bytes; a full queue
/// pauses whoever fills it.
///
/// The queue and its writer task come into being with the first chunk: most devices
/// never receive a byte (they beat, and stream data nobody tunnels), and a channel
/// block and a task would be a third of such a connection's memory. A chunk's bytes
/// are taken from the byte budget when it is queued and given back by the writer once
/// it is written ([`OutQueue::written`]), so the channel carries bare chunks.
#[derive(Clone)]
pub struct Outbox(Arc<Out>);

struct Out {
    chunks: OnceLock<mpsc::Sender<Bytes>>,
    /// Starts the writer on the queue's receiving end; taken by the first chunk, or
    /// dropped by [`Outbox::close_unused`].
    writer: Mutex<Option<StartWriter>>,
    capacity: usize,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

/// What starts a connection's writer task, given its queue.
pub type StartWriter = Box<dyn FnOnce(OutQueue) + Send>;

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let started = self.0.chunks.get().is_some();
        write!(f, "Outbox {{ started: {started} }}")
    }
}

/// The writer's end of an [`Outbox`].
#[derive(Debug)]
pub struct OutQueue {
    chunks: mpsc::Receiver<Bytes>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

/// An output queue of at most `chunks` chunks and `bytes` bytes (a larger chunk takes
/// the whole byte budget), whose first chunk calls `writer` with the queue to drain.
pub fn outbox(chunks: usize, bytes: usize, writer: StartWriter) -> Outbox {
    Outbox(Arc::new(Out {
        chunks: OnceLock::new(),
        writer: Mutex::new(Some(writer)),
        capacity: chunks.max(1),
        bytes: Arc::new(Semaphore::new(bytes.clamp(1, Semaphore::MAX_PERMITS))),
        max_bytes: bytes.clamp(1, Semaphore::MAX_PERMITS),
    }))
}

/// What a chunk takes of a byte budget of `max` bytes.
fn cost(chunk: &Bytes, max: usize) -> usize {
    chunk.len().min(max)
}

impl Outbox {
    fn cost(&self, chunk: &Bytes) -> u32 {
        u32::try_from(cost(chunk, self.0.max_bytes)).unwrap_or(u32::MAX)
    }

    /// The queue, made (and its writer started) on first use. Once the writer is
    /// gone, or was never started and has been dropped, sends fail as closed.
    fn chunks(&self) -> &mpsc::Sender<Bytes> {
        let out = &self.0;
        out.chunks.get_or_init(|| {
            let (tx, rx) = mpsc::channel(out.capacity);
            let writer = out.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(start) = writer {
                start(OutQueue {
                    chunks: rx,
                    bytes: out.bytes.clone(),
                    max_bytes: out.max_bytes,
                });
            }
            tx
        })
    }

    /// Queues `chunk` if there is room for it now.
    pub fn try_send(&self, chunk: Bytes) -> Result<(), TrySendError<Bytes>> {
        let permit = match self.0.bytes.try_acquire_many(self.cost(&chunk)) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(TrySendError::Full(chunk)),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(TrySendError::Closed(chunk)),
        };
        self.chunks().try_send(chunk)?;
        // The writer gives the bytes back once the chunk is written.
        permit.forget();
        Ok(())
    }

    /// Queues `chunk`, waiting for room.
    pub async fn send(&self, chunk: Bytes) -> Result<(), SendError<Bytes>> {
        let Ok(permit) = self.0.bytes.acquire_many(self.cost(&chunk)).await else {
            return Err(SendError(chunk));
        };
        self.chunks().send(chunk).await?;
        permit.forget();
        Ok(())
    }

    /// The connection is closing: if nothing was ever queued, its writer (and with it
    /// the socket's write half) is dropped now rather than with the last clone of
    /// this outbox; later chunks are refused.
    pub fn close_unused(&self) {
        let unused = self
            .0
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(unused);
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
        cost(chunk, self.max_bytes)
    }

    /// Gives back the budget of chunks written: `cost` bytes, as [`OutQueue::cost`]
    /// told of them.
    pub fn written(&self, cost: usize) {
        self.bytes.add_permits(cost);
    }

    /// Refuses further chunks (and wakes whoever waits for room); what is queued can
    /// still be received.
    pub fn close(&mut self) {
        self.chunks.close();
        self.bytes.close();
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

    /// An outbox whose writer start is recorded, and the queue it would drain.
    fn recorded() -> (Outbox, Arc<AtomicUsize>, Arc<Mutex<Option<OutQueue>>>) {
        let (starts, queue) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(None)));
        let (s, q) = (starts.clone(), queue.clone());
        let out = outbox(
            4,
            100,
            Box::new(move |queue| {
                s.fetch_add(1, Ordering::SeqCst);
                *q.lock().unwrap() = Some(queue);
            }),
        );
        (out, starts, queue)
    }

    #[test]
    fn the_writer_starts_with_the_first_chunk_and_only_once() {
        let (out, starts, queue) = recorded();
        let clone = out.clone();
        assert_eq!(
            starts.load(Ordering::SeqCst),
            0,
            "an idle outbox starts nothing"
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
        let (out, _, queue) = recorded();
        out.try_send(Bytes::from(vec![1; 60])).unwrap();
        let full = out.try_send(Bytes::from(vec![2; 60]));
        assert!(matches!(full, Err(TrySendError::Full(_))), "60 + 60 > 100");
        let queue = queue.lock().unwrap().take().unwrap();
        queue.written(60);
        out.try_send(Bytes::from(vec![2; 60])).unwrap();
    }

    #[test]
    fn an_outbox_closed_unused_refuses_chunks_and_never_starts_a_writer() {
        let (out, starts, _) = recorded();
        out.close_unused();
        let refused = out.try_send(Bytes::from_static(b"late"));
        assert!(
            matches!(refused, Err(TrySendError::Closed(_))),
            "{refused:?}"
        );
        assert_eq!(starts.load(Ordering::SeqCst), 0);
    }
}
