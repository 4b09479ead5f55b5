//! A connection's socket, plain TCP or TLS ([`Io`]): its read half as a stream of
//! chunks ([`ReadChunks`]); its write half goes to the connection's
//! [`crate::outbox::Outbox`]; what the reader and its session share of the TCP socket
//! ([`SocketProbe`]: the read size, the link's round trip, an acknowledgement now).
//! And the [`Lease`] the server gives each connection.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::Stream;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::certificate::ClientCert;
use crate::limits::Ticket;
use crate::outbox::Writer;
use crate::tls::Transport;

type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// An accepted connection's two halves, and how it reached the gateway.
pub struct Io {
    pub read: Reader,
    pub write: Writer,
    pub transport: Transport,
    /// Its client certificate (the user it names, its serial), if it presented one.
    pub certificate: Option<Arc<ClientCert>>,
    /// The TCP socket under both halves (for [`SocketProbe`]).
    pub fd: RawFd,
}

impl Io {
    pub fn plain(stream: TcpStream) -> Io {
        let fd = stream.as_raw_fd();
        let (read, write) = stream.into_split();
        Io {
            read: Box::new(read),
            write: Box::new(write),
            transport: Transport::Plain,
            certificate: None,
            fd,
        }
    }

    pub fn tls(stream: tokio_rustls::server::TlsStream<TcpStream>) -> Io {
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(<[_]>::first);
        let client_cert = leaf.is_some();
        let certificate = leaf.and_then(|der| crate::certificate::client_cert(der));
        let fd = stream.get_ref().0.as_raw_fd();
        let (read, write) = tokio::io::split(stream);
        Io {
            read: Box::new(read),
            write: Box::new(write),
            transport: Transport::Tls { client_cert },
            certificate,
            fd,
        }
    }
}

/// The TCP socket under a connection, as its reader and its session share it: how
/// much the reader may take at once (the session raises it while it carries a
/// tunnel), the link's round trip, an acknowledgement sent at once, and whether the
/// peer's bytes were backing up just now (told by the reader). The socket is owned by
/// the halves of [`Io`]; the reader ([`ReadChunks`]) forgets it here when it is
/// dropped, so this never touches a descriptor that was closed (and perhaps reused by
/// another connection). Both run on the session's thread, so the check and the call
/// cannot be split by a drop. One small allocation per connection: every field is a
/// 32-bit atomic.
#[derive(Debug)]
pub struct SocketProbe {
    fd: AtomicI32,
    /// The largest read, in bytes.
    read_limit: AtomicU32,
    /// When a read last took all it had room for, as [`coarse_ms`].
    full_read: AtomicU32,
    /// The link's round trip in microseconds (0: unknown) and when it was read, as
    /// [`coarse_ms`] (see [`SocketProbe::link_rtt`]).
    rtt_us: AtomicU32,
    rtt_read: AtomicU32,
}

/// How long a connection's round trip is used before it is read again.
const RTT_REFRESH_MS: u32 = 1000;

/// Milliseconds since the first call, wrapping (about every 49 days), on the
/// runtime's clock (paused in tests).
fn coarse_ms() -> u32 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    Instant::now().duration_since(epoch).as_millis() as u32
}

impl SocketProbe {
    /// The probe of socket `fd`, whose reader takes at most `read_limit` bytes at once.
    pub fn new(fd: RawFd, read_limit: usize) -> Self {
        // Long ago: no backlog yet, no round trip read.
        let long_ago = coarse_ms().wrapping_sub(u32::MAX / 2);
        Self {
            fd: AtomicI32::new(fd),
            read_limit: AtomicU32::new(clamp_u32(read_limit)),
            full_read: AtomicU32::new(long_ago),
            rtt_us: AtomicU32::new(0),
            rtt_read: AtomicU32::new(long_ago),
        }
    }

    /// For a reader of something that is not a TCP socket of this process (a TLS
    /// stream of another node's connection): only its read limit.
    pub fn without_socket(read_limit: usize) -> Self {
        Self::new(-1, read_limit)
    }

    /// Lets the reader take up to `bytes` at once from its next read on.
    pub fn set_read_limit(&self, bytes: usize) {
        self.read_limit.store(clamp_u32(bytes), Ordering::Relaxed);
    }

    fn read_limit(&self) -> usize {
        self.read_limit.load(Ordering::Relaxed).max(1) as usize
    }

    /// The link's round trip ([`SocketProbe::min_rtt`]), read from the socket at most
    /// once a second.
    pub fn link_rtt(&self) -> Option<Duration> {
        let now = coarse_ms();
        let cached = self.rtt_us.load(Ordering::Relaxed);
        if cached > 0 && now.wrapping_sub(self.rtt_read.load(Ordering::Relaxed)) < RTT_REFRESH_MS {
            return Some(Duration::from_micros(cached.into()));
        }
        let rtt = self.min_rtt();
        let micros = rtt.map_or(0, |rtt| {
            u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX).max(1)
        });
        self.rtt_us.store(micros, Ordering::Relaxed);
        self.rtt_read.store(now, Ordering::Relaxed);
        rtt
    }

    fn socket(&self) -> Option<BorrowedFd<'_>> {
        let fd = self.fd.load(Ordering::Relaxed);
        // SAFETY: `fd` is the connection's socket, open while its reader lives (it
        // sets -1 here when dropped; see the type's doc).
        (fd >= 0).then(|| unsafe { BorrowedFd::borrow_raw(fd) })
    }

    /// The link's round trip without the peer's delayed acknowledgements: the
    /// kernel's windowed minimum (`tcpi_min_rtt`). The smoothed RTT (`tcpi_rtt`) of a
    /// request/response link is mostly the peer's delayed ACK (measured: 2 to 40 ms on
    /// loopback), not the link.
    #[cfg(target_os = "linux")]
    pub fn min_rtt(&self) -> Option<Duration> {
        let fd = self.socket()?;
        // SAFETY: an all-zero `tcp_info` is valid; getsockopt writes at most `len`
        // bytes into it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let done = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        // A kernel without `tcpi_min_rtt` (before 4.6) returns a shorter struct.
        let has_min_rtt = std::mem::offset_of!(libc::tcp_info, tcpi_min_rtt) + 4;
        (done == 0 && len as usize >= has_min_rtt && info.tcpi_min_rtt > 0)
            .then(|| Duration::from_micros(info.tcpi_min_rtt.into()))
    }

    #[cfg(not(target_os = "linux"))]
    pub fn min_rtt(&self) -> Option<Duration> {
        None
    }

    /// Acknowledges what has arrived now instead of after the delayed-ACK timer (up
    /// to 40 ms on Linux): a peer whose Nagle algorithm holds back the rest of a
    /// message sends it as soon as this ACK reaches it.
    pub fn ack_now(&self) {
        if let Some(fd) = self.socket() {
            let _ = socket2::SockRef::from(&fd).set_tcp_quickack(true);
        }
    }

    fn forget(&self) {
        self.fd.store(-1, Ordering::Relaxed);
    }

    /// A read took all it had room for (more was waiting), or a whole TLS record.
    fn read_full(&self) {
        self.full_read.store(coarse_ms(), Ordering::Relaxed);
    }

    /// Whether the peer's bytes backed up within `window`: a read took all it had
    /// room for. Such a peer's writes outran the connection, so they are cut
    /// wherever its socket was full, and the rest waits on the peer's scheduling.
    pub fn backlogged_within(&self, window: Duration) -> bool {
        let since = coarse_ms().wrapping_sub(self.full_read.load(Ordering::Relaxed));
        u128::from(since) <= window.as_millis()
    }
}

/// A held tail waits this many of its link's round trips: one for the gateway's
/// acknowledgement to reach a sender whose Nagle algorithm waits for it and the rest
/// to come back, one for queueing and jitter on the way (BENCHMARKS.md, "Header
/// hold").
pub const HOLD_RTTS: u32 = 2;
/// And this much more: the sender's own gap between two writes of one message, which
/// no round trip measures (two processes on loopback, this 2-core machine idle or
/// with both cores busy: 99.9 % within 70 µs, the longest of 20 000 252 µs).
pub const HOLD_MARGIN: Duration = Duration::from_micros(250);

/// How long a payload tail that could start a header waits for the rest on a link
/// whose round trip is `rtt`: `HOLD_RTTS × rtt + HOLD_MARGIN`, at least `floor` and
/// at most `ceiling` (`server.header_hold_min_ms`, `server.header_hold_ms`); the
/// ceiling when the round trip is unknown.
pub fn header_hold(rtt: Option<Duration>, floor: Duration, ceiling: Duration) -> Duration {
    match rtt {
        Some(rtt) => (rtt * HOLD_RTTS + HOLD_MARGIN).max(floor).min(ceiling),
        None => ceiling,
    }
}

/// Holds shorter than this wait on a timer of their own ([`precise_sleep`]).
const COARSE: Duration = Duration::from_millis(2);

/// Sleeps `wait`, to within tens of microseconds when it is short. Tokio's timer counts
/// whole milliseconds, and rounds a 0.3 ms sleep up to 1 to 2 ms (measured: 1.6 ms on
/// average), which held 2 % of a Modbus master's polls that long; a short sleep waits
/// on a timerfd of its own instead (a few syscalls, once per held tail). A longer
/// one, one past the bound on such timers, or one whose timer cannot be made uses the
/// runtime's timer (and so follows a paused test clock).
pub async fn precise_sleep(wait: Duration) {
    if wait < COARSE {
        // Each is a descriptor while it runs: at most `MAX_TIMERS` at once, so peers
        // that keep tails held cannot take the descriptors connections need.
        let running = TIMERS.fetch_add(1, Ordering::Relaxed);
        let _release = Release;
        if running < MAX_TIMERS {
            if let Ok(timer) = timerfd(wait) {
                let _ = timer.readable().await;
                return;
            }
        }
    }
    tokio::time::sleep(wait).await;
}

/// Short holds waiting on a timerfd right now, and their bound.
static TIMERS: AtomicUsize = AtomicUsize::new(0);
const MAX_TIMERS: usize = 256;

/// Gives a place among [`TIMERS`] back when dropped (a hold also ends by cancel).
struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        TIMERS.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(target_os = "linux")]
fn timerfd(wait: Duration) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
    let fd = rustix::time::timerfd_create(
        TimerfdClockId::Monotonic,
        TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
    )?;
    // A zero time would disarm the timer.
    let wait = wait.max(Duration::from_micros(1));
    let at = Itimerspec {
        it_interval: Timespec::default(),
        it_value: Timespec {
            tv_sec: wait.as_secs() as _,
            tv_nsec: wait.subsec_nanos().into(),
        },
    };
    rustix::time::timerfd_settime(&fd, TimerfdTimerFlags::empty(), &at)?;
    let readable = tokio::io::Interest::READABLE;
    // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, so the descriptor stays
    // open and the same for the registration's whole life.
    Ok(unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, readable) }?)
}

#[cfg(not(target_os = "linux"))]
fn timerfd(_: Duration) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    Err(io::ErrorKind::Unsupported.into())
}

/// What the server gives each connection: when to stop reading (shutdown), and what
/// it holds until it has closed (the server waits for every `alive`; the ticket is
/// its place in the connection limits).
#[derive(Debug)]
pub struct Lease {
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
    /// The socket's probe, which this reader keeps valid (see [`SocketProbe`]); its
    /// read limit bounds `size`.
    probe: Arc<SocketProbe>,
}

impl Drop for ReadChunks {
    fn drop(&mut self) {
        self.probe.forget();
    }
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The smallest read: a heartbeat or a short request fits many times.
const MIN_READ: usize = 1024;

/// A read this large means the peer sends in bulk, like one that fills its buffer:
/// it is the most plaintext one TLS read hands over (a record).
const RECORD: usize = 16 * 1024;

/// The largest read of a connection that carries no tunnel.
pub const UNTUNNELLED_READ: usize = 4096;

impl ReadChunks {
    /// Reads `io` at most `probe`'s read limit at a time (which its holders may change
    /// any time), and keeps `probe`, the probe of `io`'s socket, valid while it lives.
    pub fn new(io: Reader, probe: Arc<SocketProbe>) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            size: MIN_READ,
            probe,
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
            self.probe.read_full();
            // More is coming: the next reads go to a growing block on the heap.
            self.size = (self.size * 2).min(self.probe.read_limit());
        }
        Poll::Ready(Some(Ok(BytesMut::from(filled))))
    }
}

impl Stream for ReadChunks {
    type Item = io::Result<BytesMut>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let max = this.probe.read_limit();
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
                if n == room || n >= RECORD {
                    this.probe.read_full();
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_hold_is_two_round_trips_and_a_margin_within_its_bounds() {
        let (floor, ceiling) = (Duration::ZERO, 100 * MS);
        let loopback = Duration::from_micros(20);
        assert_eq!(
            header_hold(Some(loopback), floor, ceiling),
            Duration::from_micros(290)
        );
        assert_eq!(
            header_hold(Some(30 * MS), floor, ceiling),
            60 * MS + HOLD_MARGIN
        );
        // A far link is held at most the ceiling; an unknown one the ceiling too.
        assert_eq!(header_hold(Some(80 * MS), floor, ceiling), ceiling);
        assert_eq!(header_hold(None, floor, ceiling), ceiling);
        // The floor wins over a short link (a TLS proxy in front of the gateway).
        assert_eq!(header_hold(Some(loopback), 50 * MS, ceiling), 50 * MS);
    }

    #[tokio::test]
    async fn a_short_sleep_is_not_rounded_to_the_runtimes_millisecond() {
        let wait = Duration::from_micros(300);
        let mut took = Duration::MAX;
        // The shortest of a few: a busy machine may delay any one wake-up.
        for _ in 0..5 {
            let started = std::time::Instant::now();
            precise_sleep(wait).await;
            took = took.min(started.elapsed());
        }
        assert!(
            took >= wait && took < 900 * Duration::from_micros(1),
            "{took:?}"
        );
        assert_eq!(TIMERS.load(Ordering::Relaxed), 0, "every timer given back");
    }

    #[tokio::test]
    async fn a_socket_reports_its_round_trip_while_its_reader_lives() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let io = Io::plain(server);
        let probe = Arc::new(SocketProbe::new(io.fd, MIN_READ));
        let reader = ReadChunks::new(io.read, probe.clone());
        // The handshake gave the server its first round-trip sample.
        let rtt = probe
            .min_rtt()
            .expect("a connected socket has a round trip");
        assert!(rtt > Duration::ZERO && rtt < 50 * MS, "loopback: {rtt:?}");
        let cached = probe.link_rtt().expect("read from the socket");
        assert_eq!(probe.link_rtt(), Some(cached), "kept for a second");
        probe.ack_now();
        tokio::io::AsyncWriteExt::write_all(&mut client, b"d")
            .await
            .unwrap();
        probe.ack_now();
        drop(reader);
        assert_eq!(
            probe.min_rtt(),
            None,
            "the reader is gone, and so is the socket"
        );
        assert_eq!(
            probe.link_rtt(),
            Some(cached),
            "still the second's round trip"
        );
    }
}
