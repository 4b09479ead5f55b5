//! Scenario `events`: a network outage takes every device offline at once. The
//! gateway announces each one offline when the grace period ends and delivers the
//! events to a local webhook receiver (signatures checked), while a tunnel's round
//! trips are timed against the relay in the same run; then the same outage with the
//! receiver down for a while (10 minutes at full size), the gateway's RSS growth
//! measured while the events wait, and every one delivered once it is back.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elfin_actors::events::signature::SigningKey;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::fleet::connect_devices;
use crate::gateway::Gateway;
use crate::net::{self, percentile};
use crate::report::{Row, Target};
use crate::tunnel;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The fleet's devices are numbered from here (device 0 carries the timed tunnel).
const FIRST: usize = 1_000;

/// What the receiver took: event ids (a repeat counts once), and offline events.
#[derive(Default)]
struct Received {
    ids: HashSet<String>,
    offline: usize,
    online: usize,
    bad_signatures: usize,
}

/// A webhook receiver on `addr`: HTTP/1.1 keep-alive, 204 to each delivery.
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// A port for a receiver that is not listening yet.
    fn reserve() -> Receiver {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        Receiver {
            addr,
            received: Arc::default(),
            task: None,
        }
    }

    async fn listen(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let received = self.received.clone();
        self.task = Some(tokio::spawn(async move {
            let key = SigningKey::parse(SECRET).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, key.clone(), received.clone()));
            }
        }));
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn offline(&self) -> usize {
        self.received.lock().unwrap().offline
    }

    fn online(&self) -> usize {
        self.received.lock().unwrap().online
    }
}

/// One connection's deliveries: each request's headers and body, the signature
/// checked, answered 204.
async fn serve(stream: TcpStream, key: SigningKey, received: Arc<Mutex<Received>>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let (mut length, mut id, mut timestamp, mut signature) =
            (0, String::new(), 0, String::new());
        let mut line = String::new();
        loop {
            line.clear();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.parse().unwrap_or(0),
                    "webhook-id" => id = value.to_owned(),
                    "webhook-timestamp" => timestamp = value.parse().unwrap_or(0),
                    "webhook-signature" => signature = value.to_owned(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        if read.read_exact(&mut body).await.is_err() {
            return;
        }
        {
            let mut got = received.lock().unwrap();
            if key.sign(&id, timestamp, &body) != signature {
                got.bad_signatures += 1;
            } else if got.ids.insert(id) {
                let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                match event["type"].as_str() {
                    Some("device.offline") => got.offline += 1,
                    Some("device.online") => got.online += 1,
                    _ => {}
                }
            }
        }
        let answer = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n";
        if write.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Waits until `done`, at most `within`; how long it took, or `None`.
async fn until(within: Duration, done: impl Fn() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(started.elapsed())
}

pub async fn events(full: bool) -> Vec<Row> {
    let n = if full { 10_000 } else { 2_000 }.min(crate::fleet::fleet_limit() / 2);
    let grace = if full { 20 } else { 5 };
    let down = Duration::from_secs(if full { 600 } else { 30 });
    let mut rows = Vec::new();

    // 1. The receiver is up: the outage's offline events, and a tunnel meanwhile.
    let mut receiver = Receiver::reserve();
    receiver.listen().await;
    let gw = start(&receiver, grace, n);
    let mut devices = connect_devices(FIRST, FIRST + n, gw.addr, &gw.uuid).await;
    net::wait_online(gw.addr, &gw.uuid, n, Instant::now()).await;
    until(Duration::from_secs(120), || receiver.online() >= n).await;
    let rounds = if full { 20_000 } else { 5_000 };
    let (quiet, quiet_relay) = tunnel::alternating(&gw, rounds, false, tunnel::fixed).await;
    devices.clear(); // the outage
    let gone = Instant::now();
    tokio::time::sleep(Duration::from_secs(grace)).await;
    let timed = {
        let gw = &gw;
        async move { tunnel::alternating(gw, rounds, false, tunnel::fixed).await }
    };
    let delivered =
        async { until(Duration::from_secs(grace + 120), || receiver.offline() >= n).await };
    let ((gateway, base), delivered) = tokio::join!(timed, delivered);
    let after_grace = delivered.map_or(f64::INFINITY, |_| {
        gone.elapsed().as_secs_f64() - grace as f64
    });
    rows.push(Row::new(
        "events",
        format!("{n} devices offline at once: all events delivered, after the grace period"),
        "s",
        after_grace,
        None,
        Target::AtMost(30.0),
    ));
    // Unchanged within noise: the p50's margin over the relay while events go out,
    // against the same margin measured just before the outage.
    let margin = |gateway: &[f64], relay: &[f64]| percentile(gateway, 0.5) - percentile(relay, 0.5);
    rows.push(Row::new(
        "events",
        "tunnel p50 before the outage, 32 B (baseline: relay)",
        "us",
        percentile(&quiet, 0.5),
        Some(percentile(&quiet_relay, 0.5)),
        Target::None,
    ));
    rows.push(Row::new(
        "events",
        "tunnel p50 over the relay while delivered (baseline: before)",
        "us",
        margin(&gateway, &base),
        Some(margin(&quiet, &quiet_relay)),
        Target::AtMostBaselinePlus(10.0),
    ));
    let bad = receiver.received.lock().unwrap().bad_signatures;
    rows.push(Row::new(
        "events",
        "deliveries with a bad signature",
        "count",
        bad as f64,
        None,
        Target::Equals(0.0),
    ));
    drop(gw);
    net::settle().await;

    // 2. The receiver is down during the outage: what waiting costs, and delivery
    // once it is back.
    let mut receiver = Receiver::reserve();
    let gw = start(&receiver, grace, n);
    let mut devices = connect_devices(FIRST, FIRST + n, gw.addr, &gw.uuid).await;
    net::wait_online(gw.addr, &gw.uuid, n, Instant::now()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = gw.rss_kib().unwrap_or(0);
    devices.clear();
    tokio::time::sleep(down).await;
    let during = gw.rss_kib().unwrap_or(0);
    rows.push(Row::new(
        "events",
        format!(
            "RSS growth, receiver down {} s through the outage",
            down.as_secs()
        ),
        "MiB",
        during.saturating_sub(before) as f64 / 1024.0,
        None,
        Target::AtMost(16.0),
    ));
    receiver.listen().await;
    // The endpoint's backoff reaches 5 minutes; the next retry comes within it.
    let back = until(Duration::from_secs(400), || receiver.offline() >= n).await;
    rows.push(Row::new(
        "events",
        "offline events delivered once the receiver is back",
        "events",
        receiver.offline() as f64,
        None,
        Target::Equals(n as f64),
    ));
    if let Some(back) = back {
        rows.push(Row::new(
            "events",
            "from the receiver's return to the last event (backoff included)",
            "s",
            back.as_secs_f64(),
            None,
            Target::None,
        ));
    }
    if let Some(task) = receiver.task.take() {
        task.abort();
    }
    rows
}

/// The bench's gateway with a webhook to `receiver` and grace period `grace`.
fn start(receiver: &Receiver, grace: u64, n: usize) -> Gateway {
    let hooks = format!(
        "[{{url = \"{}\", secret = \"{SECRET}\", queue = {}}}]",
        receiver.url(),
        2 * n + 100
    );
    let grace = grace.to_string();
    Gateway::start(
        &[
            ("ELFIN__EVENTS__OFFLINE_AFTER_SECS", grace.as_str()),
            ("ELFIN__WEBHOOKS", hooks.as_str()),
        ],
        false,
    )
}
