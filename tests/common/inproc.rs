//! The gateway inside the test: the library's `serve` on an ephemeral loopback port,
//! sessions on the test's own arbiter, a real embedded database file in a temporary
//! directory, and async peers on real sockets. With `tokio::time::pause()` the
//! gateway's timers (debounce, hold-back, stall) run on the test's paused clock, so no
//! test sleeps on the wall clock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use elfin_actors::device::DeviceKey;
use elfin_actors::store::embedded::EmbeddedStore;
use elfin_actors::store::{Directory, Sightings};
use elfin_actors::{Config, Hub, Listen, ShutdownError, Workers};

/// How long a peer waits for anything (virtual time on a paused clock).
pub const WAIT: Duration = Duration::from_secs(10);

/// The settings' defaults, with sessions on the test's arbiter and fast flushes.
pub fn config() -> Config {
    let mut config = Config::default();
    config.server.workers = Workers::Caller;
    config.persistence.flush_interval = Duration::from_millis(50);
    config
}

pub struct TestGateway {
    pub addr: SocketAddr,
    /// The TLS-only listener, if started with one.
    pub tls_addr: Option<SocketAddr>,
    pub hub: Hub,
    pub store: Arc<EmbeddedStore>,
    pub dir: Arc<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), ShutdownError>>>,
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with(|_| {}).await
    }

    /// Starts with the defaults of [`config`] changed by `tune`.
    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> TestGateway {
        Self::start_in(Arc::new(tempfile::tempdir().unwrap()), tune).await
    }

    /// Starts on the database file of an earlier gateway's directory.
    pub async fn start_in(
        dir: Arc<tempfile::TempDir>,
        tune: impl FnOnce(&mut Config),
    ) -> TestGateway {
        Self::start_listening(dir, tune, false).await
    }

    /// Starts with a second, TLS-only listener as well (`tls.listen`).
    pub async fn start_with_tls_port(tune: impl FnOnce(&mut Config)) -> TestGateway {
        Self::start_listening(Arc::new(tempfile::tempdir().unwrap()), tune, true).await
    }

    async fn start_listening(
        dir: Arc<tempfile::TempDir>,
        tune: impl FnOnce(&mut Config),
        tls_port: bool,
    ) -> TestGateway {
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("elfin.db")).unwrap());
        let mut config = config();
        tune(&mut config);
        let bind = || elfin_actors::server::bind("127.0.0.1:0".parse().unwrap(), 4096).unwrap();
        let listener = bind();
        let addr = listener.local_addr().unwrap();
        let mut listeners = vec![(listener, Listen::Detect)];
        let mut tls_addr = None;
        if tls_port {
            let tls_only = bind();
            tls_addr = Some(tls_only.local_addr().unwrap());
            listeners.push((tls_only, Listen::TlsOnly));
        }
        let hub = Hub::start(store.clone(), config);
        let (stop, stopped) = oneshot::channel::<()>();
        let served = actix_rt::spawn(elfin_actors::serve_all(listeners, hub.clone(), async {
            let _ = stopped.await;
        }));
        TestGateway {
            addr,
            tls_addr,
            hub,
            store,
            dir,
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// Shuts down as SIGTERM does: closes every connection and flushes.
    pub async fn stop(&mut self) -> Result<(), ShutdownError> {
        let _ = self.stop.take().expect("running").send(());
        self.served.take().unwrap().await.unwrap()
    }

    /// Adds a user to the database and returns its uuid.
    pub async fn add_user(&self, name: &str) -> String {
        let uuid = format!("uuid-of-{name}-{}", self.addr.port());
        self.store.add_user(name, &uuid).await.unwrap();
        uuid
    }

    /// Stores `count` devices for the user, as if each had been seen once.
    pub async fn store_fleet(&self, uuid: &str, count: usize) {
        let fleet: Vec<elfin_actors::store::Sighting> = (0..count)
            .map(|i| elfin_actors::store::Sighting {
                uuid: uuid.into(),
                mac: format!("{i:012X}").into(),
                host: format!("meter-{i}").into(),
                at: chrono::Utc::now(),
            })
            .collect();
        self.store.record(&fleet).await.unwrap();
    }

    pub async fn connect(&self) -> Peer {
        Peer::connect(self.addr).await
    }

    /// A connection from another loopback address (`127.0.0.<last>`): another host,
    /// as far as per-address rules can tell.
    pub async fn connect_from(&self, last: u8) -> Peer {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, last], 0)))
            .unwrap();
        Peer::from_stream(socket.connect(self.addr).await.unwrap())
    }

    /// A device connection that has sent its first heartbeat and is registered.
    pub async fn device(&self, uuid: &str, mac: &str, host: &str) -> Peer {
        let mut device = self.connect().await;
        device.send(format!("beat;{uuid};{mac};{host};0")).await;
        self.wait_online(uuid, mac).await;
        device
    }

    /// A device connection that has sent its first heartbeat, waited for through the
    /// registry (for gateways that refuse a plain `query`).
    pub async fn device_registered(&self, uuid: &str, mac: &str, host: &str) -> Peer {
        let mut device = self.connect().await;
        device.send(format!("beat;{uuid};{mac};{host};0")).await;
        for _ in 0..500 {
            let lookup = elfin_actors::registry::Lookup(DeviceKey::new(uuid, mac));
            if self.hub.registry.send(lookup).await.unwrap().is_some() {
                return device;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{mac} never registered");
    }

    /// Polls `query` until the device is listed online.
    pub async fn wait_online(&self, uuid: &str, mac: &str) {
        for _ in 0..500 {
            let devices = self.query(uuid).await;
            if super::lists_online(&devices, mac) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{mac} never came online");
    }

    /// One `query` on a fresh connection, parsed.
    pub async fn query(&self, uuid: &str) -> serde_json::Value {
        let mut client = self.connect().await;
        client.send(format!("query;{uuid}")).await;
        serde_json::from_str(&client.line().await).unwrap()
    }

    /// A client connection tunnelled to the device (`connme`, success checked).
    pub async fn tunnel(&self, uuid: &str, mac: &str) -> Peer {
        let mut client = self.connect().await;
        client.send(format!("connme;{uuid};{mac}")).await;
        assert_eq!(client.line().await, r#"{"status":"success"}"#);
        client
    }
}

/// One TCP connection to the gateway.
pub struct Peer {
    pub stream: TcpStream,
    buffered: Vec<u8>,
}

impl Peer {
    pub async fn connect(addr: SocketAddr) -> Peer {
        Peer::from_stream(TcpStream::connect(addr).await.unwrap())
    }

    pub fn from_stream(stream: TcpStream) -> Peer {
        stream.set_nodelay(true).unwrap();
        Peer {
            stream,
            buffered: Vec::new(),
        }
    }

    /// One write (peers write one message per write).
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.unwrap();
    }

    /// Reads once more into the buffer; 0 at end of file.
    async fn fill(&mut self) -> usize {
        let mut buf = vec![0u8; 65536];
        match tokio::time::timeout(WAIT, self.stream.read(&mut buf)).await {
            Ok(Ok(n)) => {
                self.buffered.extend_from_slice(&buf[..n]);
                n
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Ok(Err(e)) => panic!("read failed: {e}"),
            Err(_) => panic!(
                "nothing arrived within {WAIT:?} (have {:?})",
                String::from_utf8_lossy(&self.buffered)
            ),
        }
    }

    /// The next `\n`-terminated line, without the terminator.
    pub async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buffered.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffered.drain(..=i).collect();
                return String::from_utf8(line[..i].to_vec()).unwrap();
            }
            assert!(
                self.fill().await > 0,
                "closed before a full line: {:?}",
                String::from_utf8_lossy(&self.buffered)
            );
        }
    }

    /// Exactly `n` bytes.
    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buffered.len() < n {
            let have = self.buffered.len();
            assert!(self.fill().await > 0, "closed after {have} of {n} bytes");
        }
        self.buffered.drain(..n).collect()
    }

    /// Asserts that nothing arrives within `wait` and the connection stays open.
    pub async fn expect_silence(&mut self, wait: Duration) {
        assert!(self.buffered.is_empty(), "unread: {:?}", self.buffered);
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(wait, self.stream.read(&mut buf)).await {
            Err(_elapsed) => {}
            Ok(Ok(0)) => panic!("connection closed"),
            Ok(Ok(n)) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
            Ok(Err(e)) => panic!("read failed: {e}"),
        }
    }

    /// Asserts the gateway closes this connection (end of file) within `wait`, after
    /// at most the bytes already expected.
    pub async fn expect_closed_within(&mut self, wait: Duration) {
        let mut buf = [0u8; 1024];
        let closed = async {
            match self.stream.read(&mut buf).await {
                Ok(0) => {}
                Ok(n) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("read failed: {e}"),
            }
        };
        assert!(
            tokio::time::timeout(wait, closed).await.is_ok(),
            "still open after {wait:?}"
        );
    }

    pub async fn expect_closed(&mut self) {
        self.expect_closed_within(WAIT).await
    }
}
