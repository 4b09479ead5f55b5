//! Simulated peers and the baselines they are measured against: Elfin devices and
//! clients over loopback, a relay with the gateway's read size, a bare acceptor, and
//! what the kernel says (RSS, listen-queue overflows).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Connections per loopback source address, so that ports never run out and no
/// address reaches the gateway's per-address limit (2000).
const PER_SOURCE: usize = 500;

/// Connects to `to` from 127.0.0.x, x chosen by the peer's number.
pub async fn connect(i: usize, to: SocketAddr) -> TcpStream {
    let source = Ipv4Addr::new(
        127,
        0,
        (i / PER_SOURCE / 250) as u8,
        (1 + i / PER_SOURCE % 250) as u8,
    );
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    let stream = socket
        .connect(to)
        .await
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    stream.set_nodelay(true).unwrap();
    stream
}

/// A connection of either kind: plain TCP or TLS.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Duplex for T {}
pub type Stream = Box<dyn Duplex>;

pub fn mac(i: usize) -> String {
    format!("BE{i:010X}")
}

pub fn device_header(uuid: &str, i: usize) -> Vec<u8> {
    format!("data;{uuid};{};dev-{i};0;", mac(i)).into_bytes()
}

pub fn client_header(uuid: &str) -> Vec<u8> {
    format!("data;{uuid};T1;T1;1;").into_bytes()
}

/// Device `i` of `uuid`, connected and registered with one beat.
pub async fn device(i: usize, to: SocketAddr, uuid: &str) -> TcpStream {
    let mut stream = connect(i, to).await;
    stream
        .write_all(format!("beat;{uuid};{};dev-{i};0", mac(i)).as_bytes())
        .await
        .unwrap();
    stream
}

/// A client tunnelled to device `i` (`connme`, success checked), over TLS with
/// `tls`.
pub async fn client(
    i: usize,
    to: SocketAddr,
    uuid: &str,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> Stream {
    let tcp = connect(i, to).await;
    let mut stream: Stream = match tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            Box::new(connector.connect(name, tcp).await.expect("TLS handshake"))
        }
    };
    stream
        .write_all(format!("connme;{uuid};{}", mac(i)).as_bytes())
        .await
        .unwrap();
    let mut reply = [0u8; 21];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"{\"status\":\"success\"}\n", "connme refused");
    stream
}

/// One `query`: (devices listed online, reply bytes).
pub async fn query(to: SocketAddr, uuid: &str) -> (usize, usize) {
    let stream = connect(0, to).await;
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(format!("query;{uuid}").as_bytes())
        .await
        .unwrap();
    let mut line = Vec::new();
    stream.read_until(b'\n', &mut line).await.unwrap();
    let online = memchr_count(&line, b"\"online\"");
    (online, line.len())
}

fn memchr_count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// Polls `query` until `n` devices are online; how long that took from `since`.
pub async fn wait_online(to: SocketAddr, uuid: &str, n: usize, since: Instant) -> Duration {
    let deadline = since + Duration::from_secs(120);
    loop {
        if query(to, uuid).await.0 >= n {
            return since.elapsed();
        }
        assert!(Instant::now() < deadline, "devices did not come online");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Payload content: a fixed pseudo-random pattern of prime length, so a receiver
/// checks every byte by its position with a memcmp. It holds every byte value but
/// `b`, `c`, `d` and `q` (the first bytes of a header), so no frame ends in bytes
/// the gateway would hold back for a moment (`server.header_hold_ms`): the last frame
/// of a run is not delayed. The byte-exact tests cover every byte value.
pub struct Pattern(Vec<u8>);

const PATTERN_LEN: usize = 65_521;

impl Pattern {
    pub fn new() -> Pattern {
        let mut x: u32 = 0x9e37_79b9;
        let bytes = (0..PATTERN_LEN + 64 * 1024)
            .map(|_| loop {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let b = (x >> 24) as u8;
                if !b"bcdq".contains(&b) {
                    break b;
                }
            })
            .collect::<Vec<u8>>();
        // The tail repeats the head, so any window up to 64 KiB is one slice.
        let mut bytes = bytes;
        let head: Vec<u8> = bytes[..64 * 1024].to_vec();
        bytes[PATTERN_LEN..].copy_from_slice(&head);
        Pattern(bytes)
    }

    /// The `len` bytes at stream position `at` (len at most 64 KiB).
    pub fn at(&self, at: u64, len: usize) -> &[u8] {
        let start = (at % PATTERN_LEN as u64) as usize;
        &self.0[start..start + len]
    }
}

/// Reads `total` payload bytes, each checked against the pattern. With `frame` set,
/// the stream carries frames of `frame.0` header bytes and `frame.1` payload bytes
/// (the raw relay forwards headers), and only payload is counted and checked.
pub async fn receive_checked(
    stream: &mut (impl AsyncReadExt + Unpin),
    total: u64,
    frame: Option<(usize, usize)>,
    pattern: &Pattern,
    progress: impl Fn(u64),
) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got: u64 = 0;
    // Position inside the current frame (header, then payload).
    let mut in_frame = 0usize;
    while got < total {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {got} of {total} bytes");
        let mut data = &buf[..n];
        while !data.is_empty() {
            let take = match frame {
                None => data.len(),
                Some((header, payload)) => {
                    if in_frame < header {
                        let skip = (header - in_frame).min(data.len());
                        in_frame += skip;
                        data = &data[skip..];
                        continue;
                    }
                    let left = header + payload - in_frame;
                    let take = left.min(data.len());
                    in_frame = (in_frame + take) % (header + payload);
                    take
                }
            };
            let (chunk, rest) = data.split_at(take);
            for piece in chunk.chunks(32 * 1024) {
                let expected = pattern.at(got, piece.len());
                if expected != piece {
                    corrupt(got, expected, piece, n);
                }
                got += piece.len() as u64;
            }
            data = rest;
        }
        progress(got);
    }
    assert_eq!(got, total, "more bytes than sent");
}

/// Panics saying where `got` first differs from `expected` (at stream offset `at`)
/// and what came instead, in the read of `read` bytes it was part of.
fn corrupt(at: u64, expected: &[u8], got: &[u8], read: usize) -> ! {
    let first = expected.iter().zip(got).take_while(|(e, g)| e == g).count();
    let show = |bytes: &[u8]| {
        let end = (first + 48).min(bytes.len());
        String::from_utf8_lossy(&bytes[first..end])
            .escape_debug()
            .to_string()
    };
    panic!(
        "corrupt bytes at offset {} (a read of {read} bytes): expected \"{}\", got \"{}\"",
        at + first as u64,
        show(expected),
        show(got)
    )
}

/// Writes `total` payload bytes as frames of `frame` payload bytes, each after
/// `header`.
pub async fn send_frames(
    stream: &mut (impl AsyncWriteExt + Unpin),
    total: u64,
    frame: usize,
    header: &[u8],
    pattern: &Pattern,
) {
    let mut buf = Vec::with_capacity(header.len() + frame);
    let mut sent = 0u64;
    while sent < total {
        let len = frame.min((total - sent) as usize);
        buf.clear();
        buf.extend_from_slice(header);
        buf.extend_from_slice(pattern.at(sent, len));
        stream.write_all(&buf).await.unwrap();
        sent += len as u64;
    }
    stream.flush().await.unwrap();
}

/// The baseline relay, in a process of its own like the gateway (`elfin-bench
/// __relay <threads>`): pairs connections by an 8-byte id each sends first, then
/// copies both ways with a 64 KiB buffer, as the gateway reads (a
/// `copy_bidirectional` copies through 8 KiB).
pub fn relay(threads: usize) -> Baseline {
    Baseline::start(&["__relay", &threads.to_string()])
}

/// A baseline server in a process of its own (this binary, run with `args`), which
/// prints its address first; stops when dropped.
pub struct Baseline {
    pub addr: SocketAddr,
    child: std::process::Child,
}

impl Baseline {
    pub fn start(args: &[&str]) -> Baseline {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start the baseline {args:?}: {e}"));
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        Baseline {
            addr: line.trim().parse().expect("the baseline's address"),
            child,
        }
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id()).unwrap_or(0)
    }

    pub fn usage(&self) -> Usage {
        Usage::of(self.child.id()).unwrap_or_default()
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The relay process's main: serves until killed.
pub async fn serve_relay() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    let waiting = std::sync::Arc::new(tokio::sync::Mutex::new(std::collections::HashMap::<
        u64,
        TcpStream,
    >::new()));
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let waiting = waiting.clone();
        tokio::spawn(async move {
            stream.set_nodelay(true).unwrap();
            let Ok(id) = stream.read_u64().await else {
                return;
            };
            let mut waiting = waiting.lock().await;
            match waiting.remove(&id) {
                None => {
                    waiting.insert(id, stream);
                }
                Some(other) => {
                    drop(waiting);
                    let (ar, aw) = stream.into_split();
                    let (br, bw) = other.into_split();
                    tokio::spawn(copy(ar, bw));
                    tokio::spawn(copy(br, aw));
                }
            }
        });
    }
}

async fn copy(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Both ends of relay pair `id`, connected.
pub async fn relay_pair(i: usize, relay: SocketAddr) -> (TcpStream, TcpStream) {
    let mut a = connect(i, relay).await;
    a.write_u64(i as u64).await.unwrap();
    let mut b = connect(i, relay).await;
    b.write_u64(i as u64).await.unwrap();
    (a, b)
}

/// A process's resident memory in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What a process has used so far: CPU time (user and system) and minor page
/// faults. Unlike a rate, CPU time per byte hardly moves with the host's steal time.
#[derive(Clone, Copy, Default)]
pub struct Usage {
    pub cpu_secs: f64,
    pub minor_faults: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Option<Usage> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the command name (which may hold spaces and parentheses),
        // from the third (state) on.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        // SAFETY: sysconf only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some(Usage {
            cpu_secs: (field(14)? + field(15)?) as f64 / ticks,
            minor_faults: field(10)?,
        })
    }

    /// CPU milliseconds and page faults per GiB of `bytes` carried.
    pub fn per_gib(self, bytes: u64) -> (f64, f64) {
        let gib = bytes as f64 / f64::from(1 << 30);
        (self.cpu_secs * 1e3 / gib, self.minor_faults as f64 / gib)
    }
}

impl std::ops::Sub for Usage {
    type Output = Usage;

    /// What was used between two readings.
    fn sub(self, earlier: Usage) -> Usage {
        Usage {
            cpu_secs: self.cpu_secs - earlier.cpu_secs,
            minor_faults: self.minor_faults.saturating_sub(earlier.minor_faults),
        }
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;

    fn add(self, other: Usage) -> Usage {
        Usage {
            cpu_secs: self.cpu_secs + other.cpu_secs,
            minor_faults: self.minor_faults + other.minor_faults,
        }
    }
}

/// Waits (at most 20 s) until the kernel has let go of the sockets of earlier
/// scenarios: tearing down tens of thousands of them competes with the next one.
pub async fn settle() {
    let in_use = || {
        std::fs::read_to_string("/proc/net/sockstat")
            .ok()
            .and_then(|t| {
                let line = t.lines().find(|l| l.starts_with("TCP:"))?.to_owned();
                let mut words = line.split_whitespace();
                words.position(|w| w == "inuse")?;
                words.next()?.parse::<u64>().ok()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while in_use() > 1_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// The kernel's count of connections dropped because a listen queue was full.
pub fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Sorted microseconds -> the value below which a share `q` lies.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}
