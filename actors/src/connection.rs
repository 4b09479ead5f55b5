//! A connection's socket, plain TCP or TLS ([`Io`]): its read half as a stream of
//! chunks ([`ReadChunks`]); its write half goes to the connection's
//! [`crate::outbox::Outbox`]. And the [`Lease`] the server gives each connection.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use futures::Stream;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::limits::Ticket;
use crate::outbox::Writer;
use crate::tls::Transport;

type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// An accepted connection's two halves, and how it reached the gateway.
pub struct Io {
    pub read: Reader,
    pub write: Writer,
    pub transport: Transport,
    /// The user its client certificate names, if it presented one.
    pub certificate: Option<Arc<str>>,
}

impl Io {
    pub fn plain(stream: TcpStream) -> Io {
        let (read, write) = stream.into_split();
        Io {
            read: Box::new(read),
            write: Box::new(write),
            transport: Transport::Plain,
            certificate: None,
        }
    }

    pub fn tls(stream: tokio_rustls::server::TlsStream<TcpStream>) -> Io {
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(<[_]>::first);
        let client_cert = leaf.is_some();
        let certificate = leaf.and_then(|der| crate::tls::certificate_user(der));
        let (read, write) = tokio::io::split(stream);
        Io {
            read: Box::new(read),
            write: Box::new(write),
            transport: Transport::Tls { client_cert },
            certificate,
        }
    }
}

/// What the server gives each connection: when to stop reading (shutdown), and what
/// it holds until it has closed (the server waits for every `alive`; the ticket is
/// its place in the connection limits).
#[derive(Debug)]
pub struct Lease {
    /// When the connection was accepted: its time limits count from here.
    pub accepted: tokio::time::Instant,
    pub stop: CancellationToken,
    pub alive: mpsc::Sender<()>,
    pub ticket: Ticket,
}

/// The socket's read half as a stream of chunks. Each chunk is split off one buffer,
/// so consecutive chunks are usually contiguous and the session's `unsplit` of them
/// costs nothing. Reads start small and double while they fill the buffer, up to the
/// current limit (the session raises it to the configured read size while it carries
/// a tunnel; beats and requests need no more than [`UNTUNNELLED_READ`]); a short read
/// (the peer paused) drops back to the smallest size and lets a large block go. Reads
/// of the smallest size go through the stack and are copied out, so an idle device
/// holds no read buffer at all, and a busy tunnel reads 64 KiB at a time.
pub struct ReadChunks {
    io: Reader,
    buf: BytesMut,
    size: usize,
    limit: Arc<AtomicUsize>,
}

/// The smallest read: a heartbeat or a short request fits many times.
const MIN_READ: usize = 1024;

/// The largest read of a connection that carries no tunnel.
pub const UNTUNNELLED_READ: usize = 4096;

impl ReadChunks {
    /// Reads at most `limit` bytes at a time (the caller may change it any time).
    pub fn new(io: Reader, limit: Arc<AtomicUsize>) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            size: MIN_READ,
            limit,
        }
    }
}

impl ReadChunks {
    /// A small read through the stack, so a quiet connection holds no read buffer
    /// while it waits (a block per idle device would be most of its memory).
    fn poll_small(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<BytesMut>>> {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); MIN_READ];
        let mut read = ReadBuf::uninit(&mut stack[..self.size]);
        if let Err(e) = ready!(Pin::new(&mut self.io).poll_read(cx, &mut read)) {
            return Poll::Ready(Some(Err(e)));
        }
        let filled = read.filled();
        if filled.is_empty() {
            return Poll::Ready(None);
        }
        if filled.len() == self.size {
            // More is coming: the next reads go to a growing block on the heap.
            self.size = (self.size * 2).min(self.limit.load(Ordering::Relaxed).max(1));
        }
        Poll::Ready(Some(Ok(BytesMut::from(filled))))
    }
}

impl Stream for ReadChunks {
    type Item = io::Result<BytesMut>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let max = this.limit.load(Ordering::Relaxed).max(1);
        this.size = this.size.min(max);
        if this.size <= MIN_READ && this.buf.capacity() == 0 {
            return this.poll_small(cx);
        }
        let spare = this.buf.capacity();
        if spare < this.size / 4 || spare > this.size * 4 {
            // A fresh block, rather than growing the old one in place, so a buffer
            // that grew under load is let go once its chunks are handled.
            this.buf = BytesMut::with_capacity(this.size);
        }
        let room = this.buf.capacity();
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut this.io),
            cx,
            &mut this.buf
        )) {
            Ok(0) => Poll::Ready(None),
            Ok(n) => {
                let chunk = this.buf.split();
                if n == room {
                    this.size = (this.size * 2).min(max);
                } else if n < this.size / 8 {
                    // The peer paused: keep no spare block while it is quiet.
                    this.size = MIN_READ.min(max);
                    this.buf = BytesMut::new();
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}
