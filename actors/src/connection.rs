//! A connection's socket: its read half as a stream of chunks, its write half drained
//! from the session's output queue by a writer task.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

/// How long queued output may take to drain once a session has closed.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);

/// The socket's read half as a stream of chunks. Each chunk is split off one growing
/// buffer, so consecutive chunks are usually contiguous and the session's `unsplit`
/// of them costs nothing.
pub struct ReadChunks {
    io: OwnedReadHalf,
    buf: BytesMut,
    chunk: usize,
}

impl ReadChunks {
    /// Reads up to `chunk` bytes at a time.
    pub fn new(io: OwnedReadHalf, chunk: usize) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            chunk,
        }
    }
}

impl Stream for ReadChunks {
    type Item = io::Result<BytesMut>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
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
pub async fn write_loop(
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
