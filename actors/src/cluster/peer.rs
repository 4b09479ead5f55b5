//! Where a cross-node tunnel's bytes travel: a direct TCP connection between the two
//! nodes, two per tunnel, with mutual TLS 1.3.
//!
//! No PKI of the operator's is needed: each node has a key pair and certificate
//! ([`PeerIdentity`]; made fresh at start unless `cluster.peer_cert`/`peer_key` name
//! one), and announces the certificate's SHA-256 fingerprint and its peer address in
//! its authenticated hello ([`super::bus`]). Both sides of a peer connection accept
//! exactly the certificates so announced (`peer_tls.rs`): the dialing node only the
//! certificate of the node it dials, the listening node only those of nodes it has
//! heard from.
//!
//! The node that opens a tunnel (where the client is) asks, over NATS, the node that
//! holds the device, with a one-time token; that node dials back and presents the
//! token first thing, so only the node that was asked can attach to the tunnel
//! ([`AwaitedTunnels`]). After the listener's one-byte acknowledgement, everything on the
//! connection is the tunnel's payload, with TCP's flow control end to end.
//!
//! The lanes are made on the cluster's thread and then move, sockets and all, to the
//! worker thread of the local connection their tunnel serves ([`Lanes::start_on`]).
//!
//! A tunnel has two such connections, one per direction ([`Lanes`]): a TLS session
//! is one state machine, so the two directions of one connection would take turns
//! on a lock, and a tunnel busy both ways would run at half speed. Connections per
//! tunnel, rather than one per node pair, cost their handshakes when the tunnel opens
//! (about a millisecond on a LAN, both lanes at once) and spare a multiplexer its
//! framing and credit.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::prelude::ArbiterHandle;

use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::ServerName;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::bus::{Rejected, Seal};
pub use super::peer_tls::{fingerprint, Known, PeerIdentity, PeerIdentityError, PeerTls};
use super::wire::NodeId;

/// What a dialing node sends first: a tag, then the token.
const GREETING: &[u8; 4] = b"ELT1";

/// The listener's acknowledgement: the tunnel is attached.
const ATTACHED: u8 = 1;

/// Peer connections in their handshake at once, at most: a stranger opening
/// connections to the peer port holds at most this many, each for at most the
/// request timeout.
const MAX_ATTACHING: usize = 256;

/// A one-time token: 128 random bits.
pub type Token = [u8; 16];

/// A peer connection, either side of it, after the greeting: TLS over a [`Socket`].
pub trait PeerStream: AsyncRead + AsyncWrite + Send + Unpin {
    fn socket(&mut self) -> &mut Socket;
}

impl PeerStream for tokio_rustls::client::TlsStream<BufReader<Socket>> {
    fn socket(&mut self) -> &mut Socket {
        self.get_mut().0.get_mut()
    }
}

impl PeerStream for tokio_rustls::server::TlsStream<BufReader<Socket>> {
    fn socket(&mut self) -> &mut Socket {
        self.get_mut().0.get_mut()
    }
}

pub type Stream = Box<dyn PeerStream>;

/// A tunnel's two connections, as one end sees them: it reads the other end's bytes
/// from `read` and writes its own into `write`.
pub struct Lanes {
    pub read: Stream,
    pub write: Stream,
}

impl Lanes {
    /// Runs `start` with these lanes on `home` (the thread of the local connection
    /// they are tunnelled to), their sockets registered with that thread's reactor:
    /// a tunnel's bytes then never wait for another thread to wake, on either
    /// node, as a tunnel within one worker does not. On this thread if `home` is
    /// gone.
    pub async fn start_on<T: Send + 'static>(
        mut self,
        home: &ArbiterHandle,
        start: impl FnOnce(Lanes) -> T + Send + 'static,
    ) -> io::Result<T> {
        self.read.socket().detach()?;
        self.write.socket().detach()?;
        let (done, started) = oneshot::channel();
        let there = Arc::new(Mutex::new(Some((self, start, done))));
        let run = move || {
            let Some((mut lanes, start, done)) = there.lock().ok().and_then(|mut m| m.take())
            else {
                return;
            };
            let attached = lanes
                .read
                .socket()
                .attach()
                .and_then(|()| lanes.write.socket().attach())
                .map(|()| start(lanes));
            let _ = done.send(attached);
        };
        if !home.spawn_fn(run.clone()) {
            run();
        }
        // Only the spawned copy may hold the lanes now: if `home` stops before it
        // runs, dropping it ends `started`.
        drop(run);
        started
            .await
            .map_err(|_| io::Error::other("the connection's thread stopped"))?
    }
}

/// A peer connection's TCP socket, which can move from one thread's reactor to
/// another's ([`Lanes::start_on`]) under its TLS session and read buffer.
pub struct Socket(Bound);

enum Bound {
    /// Registered with this thread's reactor.
    Here(TcpStream),
    /// On its way to another thread.
    Moving(std::net::TcpStream),
    /// Failed to register.
    Lost,
}

impl Socket {
    fn new(tcp: TcpStream) -> Socket {
        Socket(Bound::Here(tcp))
    }

    fn detach(&mut self) -> io::Result<()> {
        self.0 = match std::mem::replace(&mut self.0, Bound::Lost) {
            Bound::Here(tcp) => Bound::Moving(tcp.into_std()?),
            other => other,
        };
        Ok(())
    }

    /// Registers with the current thread's reactor (an already readable socket is
    /// reported at once).
    fn attach(&mut self) -> io::Result<()> {
        self.0 = match std::mem::replace(&mut self.0, Bound::Lost) {
            Bound::Moving(std) => Bound::Here(TcpStream::from_std(std)?),
            other => other,
        };
        match self.0 {
            Bound::Lost => Err(io::Error::other("peer connection lost while moving")),
            _ => Ok(()),
        }
    }

    fn tcp(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match &mut self.0 {
            Bound::Here(tcp) => Ok(Pin::new(tcp)),
            _ => Err(io::Error::other("peer connection not attached to a thread")),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().tcp()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().tcp()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().tcp()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.get_mut().tcp()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.get_mut().tcp()?.poll_shutdown(cx)
    }
}

/// Which way a lane carries bytes, as the dialing node says in its greeting.
const FROM_DIALER: u8 = 0;
const TO_DIALER: u8 = 1;

/// A tunnel's lanes as attached: the node that attached them, and the lanes.
pub type Attached = (NodeId, Lanes);

/// Tokens of tunnels this node asked another node to attach, and where the lanes
/// go once both are attached (the asker checks that the node that attached them is
/// the one that answered).
#[derive(Default)]
pub struct AwaitedTunnels(Mutex<HashMap<Token, Waiting>>);

/// A tunnel waiting for its lanes: who attached the first, and the lanes so far.
struct Waiting {
    attached: oneshot::Sender<Attached>,
    node: Option<NodeId>,
    from_dialer: Option<Stream>,
    to_dialer: Option<Stream>,
}

impl AwaitedTunnels {
    /// A new token; the receiver gets the lanes attached with it. The token is
    /// forgotten when the receiver is dropped unused.
    pub fn expect(&self) -> (Token, oneshot::Receiver<Attached>) {
        let mut token = [0u8; 16];
        let _ = SystemRandom::new().fill(&mut token);
        let (tx, rx) = oneshot::channel();
        let mut expected = self.0.lock().unwrap_or_else(|e| e.into_inner());
        expected.retain(|_, waiting| !waiting.attached.is_closed());
        let waiting = Waiting {
            attached: tx,
            node: None,
            from_dialer: None,
            to_dialer: None,
        };
        expected.insert(token, waiting);
        (token, rx)
    }

    /// Whether node `node` may attach lane `lane` of the tunnel `token` (once each,
    /// both by one node).
    fn admits(&self, token: &Token, node: &str, lane: u8) -> bool {
        let expected = self.0.lock().unwrap_or_else(|e| e.into_inner());
        expected.get(token).is_some_and(|w| {
            let free = match lane {
                FROM_DIALER => w.from_dialer.is_none(),
                TO_DIALER => w.to_dialer.is_none(),
                _ => false,
            };
            free && !w.attached.is_closed() && w.node.as_ref().is_none_or(|n| n.as_str() == node)
        })
    }

    /// Attaches a lane that [`AwaitedTunnels::admits`]; hands the tunnel over once both are.
    fn attach(&self, token: &Token, node: NodeId, lane: u8, stream: Stream) {
        let mut expected = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(waiting) = expected.get_mut(token) else {
            return;
        };
        waiting.node = Some(node);
        match lane {
            FROM_DIALER => waiting.from_dialer = Some(stream),
            _ => waiting.to_dialer = Some(stream),
        }
        if waiting.from_dialer.is_some() && waiting.to_dialer.is_some() {
            let Some(waiting) = expected.remove(token) else {
                return;
            };
            if let (Some(node), Some(read), Some(write)) =
                (waiting.node, waiting.from_dialer, waiting.to_dialer)
            {
                // The asker may have given up meanwhile; dropping the lanes closes them.
                let _ = waiting.attached.send((node, Lanes { read, write }));
            }
        }
    }
}

/// Socket options of a peer connection: no Nagle delay (tunnels carry request and
/// answer), and keepalive probes so that a cut path ends its tunnels within
/// `timeout`, as a node that stops answering does.
fn tune(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = SockRef::from(stream);
    let idle = (timeout / 2).max(Duration::from_secs(1));
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(idle)
            .with_interval((timeout / 8).max(Duration::from_secs(1)))
            .with_retries(3),
    )?;
    // Sent data unacknowledged for this long ends the connection too.
    socket.set_tcp_user_timeout(Some(timeout))
}

/// A peer connection's socket with a read buffer under TLS: rustls reads at most
/// 4 KiB at a time, which would be four system calls for each 16 KiB record.
fn buffered(tcp: TcpStream) -> BufReader<Socket> {
    BufReader::with_capacity(64 * 1024, Socket::new(tcp))
}

/// Dials node `node` at `addr`, whose certificate is `fingerprint`, and attaches the
/// tunnel `token` there: both its lanes, at once.
pub async fn dial(
    tls: &PeerTls,
    addr: &str,
    fingerprint: &str,
    token: Token,
    timeout: Duration,
    keepalive: Duration,
) -> io::Result<Lanes> {
    let config = tls
        .client(fingerprint)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let lane = |lane: u8| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tune(&tcp, keepalive)?;
            let name = ServerName::try_from("elfin-node").expect("a valid DNS name");
            let mut stream = connector.connect(name, buffered(tcp)).await?;
            let mut greeting = GREETING.to_vec();
            greeting.extend_from_slice(&token);
            greeting.push(lane);
            stream.write_all(&greeting).await?;
            stream.flush().await?;
            match stream.read_u8().await? {
                ATTACHED => Ok(Box::new(stream) as Stream),
                _ => Err(io::Error::other("the node did not attach the tunnel")),
            }
        }
    };
    let both = futures::future::try_join(lane(FROM_DIALER), lane(TO_DIALER));
    let (write, read) = tokio::time::timeout(timeout, both)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))??;
    Ok(Lanes { read, write })
}

/// Accepts peer connections on `listener` until the runtime stops: each must be
/// a known node presenting a token it was given.
pub async fn listen(
    listener: TcpListener,
    tls: Arc<PeerTls>,
    expected: Arc<AwaitedTunnels>,
    seal: Arc<Seal>,
    timeout: Duration,
    keepalive: Duration,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let attaching = Arc::new(tokio::sync::Semaphore::new(MAX_ATTACHING));
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                log::warn!("cluster peer port: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = attaching.clone().try_acquire_owned() else {
            seal.reject(Rejected::Peer, || {
                format!(
                    "a connection from {from} to the cluster peer port: {MAX_ATTACHING} \
                     connections are attaching already"
                )
            });
            continue;
        };
        let (acceptor, tls, expected, seal) = (
            acceptor.clone(),
            tls.clone(),
            expected.clone(),
            seal.clone(),
        );
        tokio::spawn(async move {
            let attached =
                tokio::time::timeout(timeout, attach(tcp, &acceptor, &tls, &expected, keepalive))
                    .await
                    .unwrap_or_else(|_| Err("no token within the request timeout".into()));
            drop(slot);
            if let Err(why) = attached {
                seal.reject(Rejected::Peer, || {
                    format!("a connection from {from} to the cluster peer port: {why}")
                });
            }
        });
    }
}

/// One accepted peer connection: the handshake, the token, the acknowledgement.
async fn attach(
    tcp: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    tls: &PeerTls,
    expected: &AwaitedTunnels,
    keepalive: Duration,
) -> Result<(), String> {
    tune(&tcp, keepalive).map_err(|e| e.to_string())?;
    let mut stream = acceptor
        .accept(buffered(tcp))
        .await
        .map_err(|e| format!("TLS handshake failed ({e}): not a node of this cluster"))?;
    let node = tls
        .node_of(
            stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(<[_]>::first),
        )
        .ok_or("a certificate no node announced")?;
    let mut greeting = [0u8; GREETING.len() + 17];
    stream
        .read_exact(&mut greeting)
        .await
        .map_err(|e| format!("node {node} sent no greeting: {e}"))?;
    let (tag, rest) = greeting.split_at(GREETING.len());
    let (token, lane) = rest.split_at(16);
    let token: Token = token.try_into().map_err(|_| "a short token")?;
    if tag != GREETING || !expected.admits(&token, node.as_str(), lane[0]) {
        return Err(format!("node {node} presented a token no tunnel waits for"));
    }
    stream
        .write_all(&[ATTACHED])
        .await
        .map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    expected.attach(&token, node, lane[0], Box::new(stream));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// Two nodes' peer TLS, each knowing the other (as their hellos would tell).
    fn pair() -> (PeerTls, PeerTls, Arc<PeerIdentity>, Arc<PeerIdentity>) {
        let (a, b) = (
            Arc::new(PeerIdentity::generate("a")),
            Arc::new(PeerIdentity::generate("b")),
        );
        let known_by_a: Known = Arc::default();
        known_by_a
            .write()
            .unwrap()
            .insert(b.fingerprint.clone(), "b".into());
        let known_by_b: Known = Arc::default();
        known_by_b
            .write()
            .unwrap()
            .insert(a.fingerprint.clone(), "a".into());
        (
            PeerTls::new(a.clone(), known_by_a).unwrap(),
            PeerTls::new(b.clone(), known_by_b).unwrap(),
            a,
            b,
        )
    }

    async fn listening(tls: PeerTls, expected: Arc<AwaitedTunnels>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seal = Arc::new(Seal::new(
            "a".into(),
            &super::super::bus::Keys::derive(&[0; 32]),
        ));
        let second = Duration::from_secs(1);
        tokio::spawn(listen(
            listener,
            Arc::new(tls),
            expected,
            seal,
            second,
            second,
        ));
        addr
    }

    #[tokio::test]
    async fn the_asked_node_attaches_with_its_token_and_bytes_flow_both_ways() {
        let (a_tls, b_tls, a, _) = pair();
        let expected = Arc::new(AwaitedTunnels::default());
        let addr = listening(a_tls, expected.clone()).await.to_string();
        let (token, attached) = expected.expect();
        let second = Duration::from_secs(1);
        let mut at_b = dial(&b_tls, &addr, &a.fingerprint, token, second, second)
            .await
            .unwrap();
        let (by, mut at_a) = attached.await.unwrap();
        assert_eq!(by, "b");
        at_b.write.write_all(b"to a").await.unwrap();
        let mut got = [0; 4];
        at_a.read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"to a");
        at_a.write.write_all(b"to b").await.unwrap();
        at_b.read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"to b");
        // A token attaches once.
        assert!(dial(&b_tls, &addr, &a.fingerprint, token, second, second)
            .await
            .is_err());
    }

    #[actix_rt::test]
    async fn lanes_moved_to_another_thread_carry_bytes_there_and_start_here_if_it_is_gone() {
        let (a_tls, b_tls, a, _) = pair();
        let expected = Arc::new(AwaitedTunnels::default());
        let addr = listening(a_tls, expected.clone()).await.to_string();
        let second = Duration::from_secs(1);
        let lanes = async || {
            let (token, attached) = expected.expect();
            let at_b = dial(&b_tls, &addr, &a.fingerprint, token, second, second)
                .await
                .unwrap();
            (at_b, attached.await.unwrap().1)
        };
        let here = std::thread::current().id();

        // b's lanes move to a worker thread, which echoes what a sends.
        let worker = actix_rt::Arbiter::new();
        let (at_b, mut at_a) = lanes().await;
        let ran_on = at_b
            .start_on(&worker.handle(), |mut lanes| {
                actix_rt::spawn(async move {
                    let mut got = [0u8; 5];
                    lanes.read.read_exact(&mut got).await.unwrap();
                    lanes.write.write_all(&got).await.unwrap();
                    lanes.write.flush().await.unwrap();
                });
                std::thread::current().id()
            })
            .await
            .unwrap();
        assert_ne!(ran_on, here);
        at_a.write.write_all(b"hello").await.unwrap();
        at_a.write.flush().await.unwrap();
        let mut echoed = [0u8; 5];
        at_a.read.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"hello");

        // A thread that has stopped: they start on this one.
        let gone = worker.handle();
        worker.stop();
        worker.join().unwrap();
        let (at_b, _at_a) = lanes().await;
        let ran_on = at_b
            .start_on(&gone, |_| std::thread::current().id())
            .await
            .unwrap();
        assert_eq!(ran_on, here);
    }

    #[tokio::test]
    async fn a_stranger_or_another_node_cannot_attach() {
        let (a_tls, b_tls, a, _) = pair();
        let expected = Arc::new(AwaitedTunnels::default());
        let addr = listening(a_tls, expected.clone()).await.to_string();
        let second = Duration::from_secs(1);
        // Node c is not known to a: its handshake fails.
        let stranger = PeerTls::new(Arc::new(PeerIdentity::generate("c")), Arc::default()).unwrap();
        let (token, _waiting) = expected.expect();
        assert!(
            dial(&stranger, &addr, &a.fingerprint, token, second, second)
                .await
                .is_err()
        );
        // b with a token nobody gave.
        assert!(dial(&b_tls, &addr, &a.fingerprint, [9; 16], second, second)
            .await
            .is_err());
        // b dialing a certificate other than the one pinned.
        let impostor = PeerIdentity::generate("a");
        assert!(
            dial(&b_tls, &addr, &impostor.fingerprint, token, second, second)
                .await
                .is_err()
        );
        // And b with its own token still attaches.
        assert!(dial(&b_tls, &addr, &a.fingerprint, token, second, second)
            .await
            .is_ok());
    }
}
