//! A NATS server for the cluster tests: Debian's `nats-server` (installed by
//! `tests/run.sh`) on a loopback port of its own, stopped and started again on the
//! same port to play an outage.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nats {
    child: Option<Child>,
    pub port: u16,
}

/// `nats-server`, if installed. Without it a test skips, unless ELFIN_REQUIRE_NATS
/// is set (as `tests/run.sh` sets it), in which case it fails.
pub fn server() -> Option<PathBuf> {
    let found = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("ELFIN_REQUIRE_NATS").is_none(),
            "nats-server is not installed (tests/run.sh installs Debian's package)"
        );
        eprintln!("SKIPPED: nats-server is not installed (tests/run.sh installs it)");
    }
    found
}

/// A loopback port nothing listens on (now).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nats {
    /// Starts a server on a new port; `None` if nats-server is not installed.
    pub fn start() -> Option<Nats> {
        Nats::start_on(free_port())
    }

    /// Starts a server on `port`; `None` if nats-server is not installed.
    pub fn start_on(port: u16) -> Option<Nats> {
        server()?;
        let mut nats = Nats { child: None, port };
        nats.resume();
        Some(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (an outage, not a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on its port, and waits until it accepts.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(server().expect("nats-server"))
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Someone else on the NATS server, without the cluster secret: subscribed to every
/// subject, it keeps what it sees and can publish it again.
pub struct Rogue {
    runtime: tokio::runtime::Runtime,
    client: async_nats::Client,
    seen: std::sync::Arc<std::sync::Mutex<Vec<async_nats::Message>>>,
}

impl Rogue {
    /// Connects to `url` and listens on `>`.
    pub fn listen(url: &str) -> Rogue {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = runtime.block_on(async {
            let client = async_nats::connect(url).await.expect("rogue connects");
            let mut everything = client.subscribe(">").await.unwrap();
            client.flush().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                use futures::StreamExt;
                while let Some(message) = everything.next().await {
                    seen.lock().unwrap().push(message);
                }
            });
            client
        });
        Rogue {
            runtime,
            client,
            seen,
        }
    }

    /// What it has seen so far.
    pub fn seen(&self) -> Vec<async_nats::Message> {
        self.seen.lock().unwrap().clone()
    }

    /// Publishes each message as it was seen: subject, reply subject, headers, payload.
    pub fn replay(&self, messages: &[async_nats::Message]) {
        self.runtime.block_on(async {
            for m in messages {
                let headers = m.headers.clone().unwrap_or_default();
                let _ = match &m.reply {
                    Some(reply) => {
                        self.client
                            .publish_with_reply_and_headers(
                                m.subject.clone(),
                                reply.clone(),
                                headers,
                                m.payload.clone(),
                            )
                            .await
                    }
                    None => {
                        self.client
                            .publish_with_headers(m.subject.clone(), headers, m.payload.clone())
                            .await
                    }
                };
            }
            self.client.flush().await.unwrap();
        });
    }

    /// Publishes `payload` on `subject` with these headers, as a forger would.
    pub fn publish(&self, subject: &str, headers: &[(&str, &str)], payload: &[u8]) {
        self.runtime.block_on(async {
            let mut map = async_nats::HeaderMap::new();
            for (name, value) in headers {
                map.insert(*name, *value);
            }
            let payload = bytes::Bytes::copy_from_slice(payload);
            let _ = self
                .client
                .publish_with_headers(subject.to_owned(), map, payload)
                .await;
            self.client.flush().await.unwrap();
        });
    }
}
