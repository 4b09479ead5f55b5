//! The tunnel vocabulary: how the shared actors reach a session, and what they tell it.
//!
//! A [`PeerLink`] is everything another actor holds of a connection: its id, its
//! address for [`PeerEvent`]s and its [`Outbox`], into which a tunnel peer writes
//! payloads directly. Nothing here knows the session actor's type, so the registry and
//! the bridge sit below the session in the module graph.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
/// A chunk's bytes are taken from the byte budget when it is queued and given back
/// by the writer once it is written ([`OutQueue::written`]); the queue holds the bare
/// chunks, so its block of slots (allocated for every connection) stays small.
#[derive(Clone, Debug)]
pub struct Outbox {
    chunks: mpsc::Sender<Bytes>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

/// The writer's end of an [`Outbox`].
#[derive(Debug)]
pub struct OutQueue {
    chunks: mpsc::Receiver<Bytes>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

/// An output queue of at most `chunks` chunks and `bytes` bytes (a larger chunk takes
/// the whole byte budget).
pub fn outbox(chunks: usize, bytes: usize) -> (Outbox, OutQueue) {
    let max_bytes = bytes.clamp(1, Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::channel(chunks.max(1));
    let budget = Arc::new(Semaphore::new(max_bytes));
    (
        Outbox {
            chunks: tx,
            bytes: budget.clone(),
            max_bytes,
        },
        OutQueue {
            chunks: rx,
            bytes: budget,
            max_bytes,
        },
    )
}

/// What a chunk takes of a byte budget of `max` bytes.
fn cost(chunk: &Bytes, max: usize) -> usize {
    chunk.len().min(max)
}

impl Outbox {
    fn cost(&self, chunk: &Bytes) -> u32 {
        u32::try_from(cost(chunk, self.max_bytes)).unwrap_or(u32::MAX)
    }

    /// Queues `chunk` if there is room for it now.
    pub fn try_send(&self, chunk: Bytes) -> Result<(), TrySendError<Bytes>> {
        let permit = match self.bytes.try_acquire_many(self.cost(&chunk)) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(TrySendError::Full(chunk)),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(TrySendError::Closed(chunk)),
        };
        self.chunks.try_send(chunk)?;
        // The writer gives the bytes back once the chunk is written.
        permit.forget();
        Ok(())
    }

    /// Queues `chunk`, waiting for room.
    pub async fn send(&self, chunk: Bytes) -> Result<(), SendError<Bytes>> {
        let Ok(permit) = self.bytes.acquire_many(self.cost(&chunk)).await else {
            return Err(SendError(chunk));
        };
        self.chunks.send(chunk).await?;
        permit.forget();
        Ok(())
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
