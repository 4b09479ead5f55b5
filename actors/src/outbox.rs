//! A connection's output ([`Outbox`]): replies and tunnel payloads on their way into
//! its socket's write half, in the order each sender hands them over.
//!
//! The contract, for senders:
//! - The output is bounded in chunks and in bytes. [`Outbox::try_send`] hands a chunk
//!   on only if there is room now; [`Outbox::send`] waits for room;
//!   [`Outbox::send_within`] waits at most a stall time, and a receiver that takes
//!   nothing for that long is [`Unsent::Stalled`]. A chunk's bytes count against the
//!   budget until they are written.
//! - When nothing is queued and no writer task holds the write half (the idle case),
//!   a sender writes straight into it, with a non-blocking write (plain TCP and
//!   cross-node ends only: a TLS write would buffer inside the TLS session). That is a
//!   tunnel's common case, and it saves a hand-over to another task per frame.
//!   [`Outbox::try_queue`] never writes directly, for a sender with more at hand.
//! - What the write half does not take at once is queued, and everything after it
//!   too, so a direct write never overtakes a queued chunk.
//! - [`Outbox::close_unused`] closes an output whose writer never started.
//!
//! For the write half ([`Writer`], any `AsyncWrite` that keeps its contract): what a
//! direct write did not take goes to the head of the queue, and the writer task
//! writes the queue in order; a direct write after which `poll_flush` is pending
//! (bytes the write half took but holds, as TLS does under a full socket) wakes the
//! writer task with an empty chunk, and the task flushes after every batch.
//!
//! The writer task ([`write_loop`]) starts with the first chunk that has to wait, on
//! the connection's own arbiter: most devices never receive a byte and never get one.
//! It holds the write half while chunks wait, writes them in vectored batches, and
//! hands the write half back when the queue is empty; once the connection is gone it
//! writes what is still queued (bounded by [`CLOSE_DRAIN`]) and shuts the socket down.

use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::ArbiterHandle;
use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// A socket's write half.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A connection's output; see the module's contract. Cloned by every sender.
#[derive(Clone)]
pub struct Outbox(Arc<Out>);

struct Out {
    port: Mutex<Port>,
    capacity: usize,
    bytes: Semaphore,
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
type StartWriter = Box<dyn FnOnce(OutQueue) + Send>;

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

/// How much may wait in an output, and whether senders write directly.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Chunks waiting at most.
    pub chunks: usize,
    /// Bytes waiting at most (a larger chunk takes the whole budget).
    pub bytes: usize,
    /// Senders write into the write half when nothing waits.
    pub direct: bool,
}

impl Outbox {
    /// The output into `writer`; its writer task, once needed, runs on `arbiter` and
    /// learns from `closed` (its sender dropped) that the connection is gone.
    pub fn new(
        bounds: Bounds,
        writer: Writer,
        arbiter: ArbiterHandle,
        closed: oneshot::Receiver<()>,
    ) -> Outbox {
        let start = Box::new(move |queue| {
            arbiter.spawn(write_loop(queue, closed));
        });
        with_start(bounds, writer, start)
    }
}

/// An output whose writer task is started by `start`.
fn with_start(bounds: Bounds, writer: Writer, start: StartWriter) -> Outbox {
    let Bounds {
        chunks,
        bytes,
        direct,
    } = bounds;
    let max_bytes = bytes.clamp(1, Semaphore::MAX_PERMITS);
    Outbox(Arc::new(Out {
        port: Mutex::new(Port {
            idle: Some(writer),
            chunks: None,
            start: Some(start),
            queued: 0,
        }),
        capacity: chunks.max(1),
        bytes: Semaphore::new(max_bytes),
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
        // A write half that took the bytes but holds some of them (TLS under a full
        // socket) is flushed by the writer task, woken with an empty chunk.
        match std::pin::Pin::new(&mut **io).poll_flush(&mut cx) {
            std::task::Poll::Ready(Ok(())) => None,
            _ => Some(Bytes::new()),
        }
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

    /// Hands `chunk` on, waiting for room at most `stall`.
    pub async fn send_within(&self, chunk: Bytes, stall: Duration) -> Result<(), Unsent> {
        match tokio::time::timeout(stall, self.send(chunk)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Unsent::Closed),
            Err(_) => Err(Unsent::Stalled),
        }
    }

    /// Hands `chunk` on, waiting for room.
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

    /// Whether the output is closed (the socket failed or the connection is gone):
    /// nothing sent now would reach the peer.
    pub fn is_closed(&self) -> bool {
        self.0.bytes.is_closed()
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

/// Why [`Outbox::send_within`] did not hand a chunk on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsent {
    /// The connection is closing.
    Closed,
    /// The receiver took nothing for the stall time.
    Stalled,
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

/// How long queued output may take to drain once a session has closed.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);

/// Chunks written with one system call at most, and their largest total.
const WRITE_BATCH: usize = 16;
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// Drains a session's output queue into its socket; once the session is gone, writes
/// what is still queued (bounded by the queue and [`CLOSE_DRAIN`]) and closes.
///
/// It holds the socket's write half while chunks wait, and hands it back to the
/// outbox when none do, so senders write directly again.
/// Chunks queued together go out in one vectored write: a tunnel carrying 16 KiB
/// frames hands over one chunk per frame, and a system call per chunk would cost more
/// than the copy.
async fn write_loop(mut queue: OutQueue, mut closed: oneshot::Receiver<()>) {
    let mut io: Option<Writer> = None;
    loop {
        let chunk = tokio::select! {
            biased;
            _ = &mut closed => break,
            chunk = queue.recv() => chunk,
        };
        let Some(first) = chunk else { break };
        queue.take_writer(&mut io);
        let Some(writer) = io.as_mut() else { break };
        // Flushed too: TLS may hold back part of what it took while the socket was
        // full, and nothing else would drive it out.
        let written = match write_batch(writer, first, &mut queue).await {
            Ok(batch) => writer.flush().await.map(|()| batch),
            Err(e) => Err(e),
        };
        match written {
            Ok((chunks, cost)) => queue.written(&mut io, chunks, cost),
            Err(_) => {
                queue.close();
                return;
            }
        }
    }
    queue.close();
    queue.take_writer(&mut io);
    let Some(mut io) = io else { return };
    let rest = async {
        while let Some(first) = queue.try_recv() {
            write_batch(&mut io, first, &mut queue).await?;
        }
        io.shutdown().await
    };
    let _ = tokio::time::timeout(CLOSE_DRAIN, rest).await;
}

/// Writes `first` and whatever else is queued right now (up to a batch); returns how
/// many chunks that was and what they took of the byte budget.
async fn write_batch(
    io: &mut Writer,
    first: Bytes,
    queue: &mut OutQueue,
) -> io::Result<(usize, usize)> {
    let mut cost = queue.cost(&first);
    let mut bytes = first.len();
    let Some(second) = (bytes < WRITE_BATCH_BYTES)
        .then(|| queue.try_recv())
        .flatten()
    else {
        io.write_all(&first).await?;
        return Ok((1, cost));
    };
    bytes += second.len();
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    batch.extend([first, second]);
    while batch.len() < WRITE_BATCH && bytes < WRITE_BATCH_BYTES {
        let Some(next) = queue.try_recv() else { break };
        bytes += next.len();
        batch.push(next);
    }
    cost += batch[1..].iter().map(|c| queue.cost(c)).sum::<usize>();
    write_all_vectored(io, &mut batch).await?;
    Ok((batch.len(), cost))
}

/// Writes every chunk of `batch`, as few system calls as the socket takes.
async fn write_all_vectored(io: &mut Writer, batch: &mut [Bytes]) -> io::Result<()> {
    let mut done = 0;
    loop {
        while batch.get(done).is_some_and(Bytes::is_empty) {
            done += 1;
        }
        if done == batch.len() {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); WRITE_BATCH];
        let count = batch.len() - done;
        for (slice, chunk) in slices.iter_mut().zip(&batch[done..]) {
            *slice = IoSlice::new(chunk);
        }
        let mut n = io.write_vectored(&slices[..count]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Drop what is written, and advance into a chunk written in part.
        while n > 0 {
            let chunk = &mut batch[done];
            let take = n.min(chunk.len());
            chunk.advance(take);
            n -= take;
            if chunk.is_empty() {
                done += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
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
        let bounds = Bounds {
            chunks: 4,
            bytes: 100,
            direct,
        };
        (with_start(bounds, writer, start), starts, queue)
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

    #[tokio::test(start_paused = true)]
    async fn send_within_tells_a_stalled_receiver_from_a_closed_one() {
        let (out, _, queue) = recorded(sink(), false);
        out.try_send(Bytes::from(vec![1; 60])).unwrap();
        let stall = Duration::from_secs(5);
        let started = tokio::time::Instant::now();
        let waited = out.send_within(Bytes::from(vec![2; 60]), stall).await;
        assert_eq!(waited, Err(Unsent::Stalled));
        assert_eq!(started.elapsed(), stall, "waited exactly the stall time");
        queue.lock().unwrap().take().unwrap().close();
        let closed = out.send_within(Bytes::from_static(b"x"), stall).await;
        assert_eq!(closed, Err(Unsent::Closed));
    }

    /// A write half that takes every byte it is given but holds it until flushed,
    /// and whose flush finishes only on its second poll: TLS under a full socket.
    #[derive(Default)]
    struct Holding {
        held: Vec<u8>,
        flush_polls: usize,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for Holding {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.held.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            self.flush_polls += 1;
            if self.flush_polls % 2 == 1 && !self.held.is_empty() {
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            let held = std::mem::take(&mut self.held);
            self.written.lock().unwrap().extend_from_slice(&held);
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[actix_rt::test]
    async fn what_a_write_half_holds_after_a_direct_write_is_flushed_without_another_write() {
        let writer = Holding::default();
        let written = writer.written.clone();
        let (_closing, closed) = oneshot::channel();
        let bounds = Bounds {
            chunks: 8,
            bytes: 1 << 16,
            direct: true,
        };
        let out = Outbox::new(
            bounds,
            Box::new(writer),
            actix_rt::Arbiter::current(),
            closed,
        );
        for word in [&b"hello"[..], b"world", b"!"] {
            out.try_send(Bytes::from_static(word)).unwrap();
        }
        // Nothing more is sent: the last bytes leave only if someone flushes them.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while written.lock().unwrap().len() < 11 {
            assert!(tokio::time::Instant::now() < deadline, "{written:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            &written.lock().unwrap()[..],
            b"helloworld!",
            "each byte once, in order"
        );
    }
}
