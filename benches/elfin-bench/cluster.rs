//! Scenario 7: a tunnel across two cluster nodes against a tunnel within one, in the
//! same run. Nodes a and b are release binaries sharing the tests' MongoDB stand-in
//! and a `nats-server` on loopback; the device is on a, one client on a and one on b.
//!
//! Bare NATS is measured too, as the floor of what crossing nodes costs: two clients
//! exchanging the same round trips (four socket hops through the server, as a
//! cross-node round trip has beyond a same-node one) and streaming both ways with the
//! same credit window as the gateway.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gateway::Gateway;
use crate::net::{self, percentile, Stream};
use crate::report::{Row, Target};
use crate::store::StandIn;
use crate::tunnel;

/// Debian's nats-server on a loopback port of its own.
struct NatsServer(Child, u16);

impl NatsServer {
    fn start() -> Option<NatsServer> {
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(NatsServer(child, port))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn skipped(why: &str) -> Vec<Row> {
    vec![Row::new(
        "cross-node",
        format!("skipped: {why}"),
        "",
        f64::NAN,
        None,
        Target::None,
    )]
}

/// A client on `to` tunnelled to device `i` of `uuid`, retrying `connme` while the
/// cluster learns where the device is.
async fn client_eventually(i: usize, to: SocketAddr, uuid: &str) -> Stream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut stream = net::connect(i, to).await;
        let connme = format!("connme;{uuid};{}", net::mac(i));
        stream.write_all(connme.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        let mut byte = [0u8];
        while stream.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
            reply.push(byte[0]);
        }
        if reply == b"{\"status\":\"success\"}" {
            return Box::new(stream);
        }
        assert!(
            Instant::now() < deadline,
            "connme across nodes never succeeded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Round trips of 32 B between two bare NATS clients; microseconds, sorted.
async fn bare_round_trips(url: &str, count: usize) -> Vec<f64> {
    let (asker, echo) = (connect(url).await, connect(url).await);
    let mut pings = echo.subscribe("bench.ping").await.unwrap();
    let mut pongs = asker.subscribe("bench.pong").await.unwrap();
    // Both subscriptions are in place at the server before the first ping.
    echo.flush().await.unwrap();
    let echoing = tokio::spawn(async move {
        while let Some(ping) = pings.next().await {
            echo.publish("bench.pong", ping.payload).await.unwrap();
        }
    });
    asker.flush().await.unwrap();
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + count / 10 {
        let started = Instant::now();
        let (request, _) = tunnel::fixed(i);
        asker.publish("bench.ping", request.into()).await.unwrap();
        next(&mut pongs).await;
        if i >= count / 10 {
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    echoing.abort();
    samples.sort_by(f64::total_cmp);
    samples
}

/// The gateway's credit window and largest message (its defaults).
const WINDOW: usize = 1 << 20;
const MESSAGE: usize = 64 * 1024;

/// `total` bytes each way at once between two bare NATS clients, in messages of the
/// gateway's largest size, with credit granted back every quarter window; MB/s both
/// ways together.
async fn bare_both_ways(url: &str, total: usize) -> f64 {
    let (a, b) = (connect(url).await, connect(url).await);
    let started = Instant::now();
    let mut ends = Vec::new();
    for (from, to, name) in [(&a, &b, "ab"), (&b, &a, "ba")] {
        let data = to.subscribe(format!("bench.{name}")).await.unwrap();
        let credits = from
            .subscribe(format!("bench.{name}.credit"))
            .await
            .unwrap();
        to.flush().await.unwrap();
        from.flush().await.unwrap();
        let (sender, receiver) = (from.clone(), to.clone());
        ends.push(tokio::spawn(stream_out(sender, credits, name, total)));
        ends.push(tokio::spawn(stream_in(receiver, data, name, total)));
    }
    for end in ends {
        end.await.unwrap();
    }
    2.0 * total as f64 / started.elapsed().as_secs_f64() / 1e6
}

async fn stream_out(
    nats: async_nats::Client,
    mut credits: async_nats::Subscriber,
    name: &'static str,
    total: usize,
) {
    let message = bytes::Bytes::from(vec![7u8; MESSAGE]);
    let (mut credit, mut sent) = (WINDOW, 0);
    while sent < total {
        while credit < MESSAGE {
            let grant = next(&mut credits).await;
            credit += std::str::from_utf8(&grant.payload)
                .unwrap()
                .parse::<usize>()
                .unwrap();
        }
        nats.publish(format!("bench.{name}"), message.clone())
            .await
            .unwrap();
        (credit, sent) = (credit - MESSAGE, sent + MESSAGE);
    }
}

async fn stream_in(
    nats: async_nats::Client,
    mut data: async_nats::Subscriber,
    name: &'static str,
    total: usize,
) {
    let (mut got, mut consumed) = (0, 0);
    while got < total {
        let message = next(&mut data).await;
        got += message.payload.len();
        consumed += message.payload.len();
        if consumed >= WINDOW / 4 {
            let grant = bytes::Bytes::from(consumed.to_string());
            nats.publish(format!("bench.{name}.credit"), grant)
                .await
                .unwrap();
            consumed = 0;
        }
    }
}

/// The next message, or a failed bench rather than a hung one.
async fn next(subscriber: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(10), subscriber.next())
        .await
        .expect("bare NATS: nothing for 10 s")
        .expect("bare NATS: subscription ended")
}

async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .subscription_capacity(64 * 1024)
        .connect(url)
        .await
        .expect("connect to nats-server")
}

pub async fn cross_node(full: bool) -> Vec<Row> {
    let state = tempfile::tempdir().unwrap();
    let Some((_standin, mongodb)) = StandIn::start(&state.path().join("standin.state")) else {
        return skipped("run tests/run.sh once (MongoDB stand-in)");
    };
    let Some(nats) = NatsServer::start() else {
        return skipped("nats-server is not installed (tests/run.sh installs it)");
    };
    let nats_url = format!("nats://127.0.0.1:{}", nats.1);
    let node = |id: &'static str| {
        let env = [
            ("ELFIN__STORAGE__BACKEND", "mongodb"),
            ("ELFIN__MONGODB__URI", mongodb.as_str()),
            ("ELFIN__MONGODB__DATABASE", "elfin_bench_cluster"),
            ("ELFIN__CLUSTER__NATS_URL", nats_url.as_str()),
            ("ELFIN__CLUSTER__NODE_ID", id),
            (
                "ELFIN__CLUSTER__SECRET",
                "elfin-bench-cluster-secret-0123456789",
            ),
            ("ELFIN__CLUSTER__PEER_LISTEN", "127.0.0.1:0"),
        ];
        Gateway::start_for(&format!("bench-{id}"), &env, false)
    };
    let (a, b) = (node("a"), node("b"));
    let uuid = a.uuid.clone();
    let headers = (net::client_header(&uuid), net::device_header(&uuid, 0));

    // Latency: 32 B round trips, same node and across, in alternating blocks.
    let count = if full { 20_000 } else { 4_000 };
    let same_device = Box::new(net::device(0, a.addr, &uuid).await) as Stream;
    let mut cross_device = Box::new(net::device(1, a.addr, &uuid).await) as Stream;
    net::wait_online(a.addr, &uuid, 2, Instant::now()).await;
    let mut same = (net::client(0, a.addr, &uuid, None).await, same_device);
    let mut cross_client = client_eventually(1, b.addr, &uuid).await;
    // Device 1's header for the cross-node pair.
    let cross_headers = (headers.0.clone(), net::device_header(&uuid, 1));
    let (mut on_one, mut across) = (Vec::new(), Vec::new());
    const BLOCKS: usize = 10;
    for block in 0..BLOCKS {
        let warm_up = if block == 0 { count / 10 } else { 0 };
        let first = block * count / BLOCKS;
        let payloads = |i: usize| tunnel::fixed(first + i);
        let (samples, pair) = tunnel::round_trips(
            same,
            (&headers.0, &headers.1),
            false,
            count / BLOCKS,
            warm_up,
            payloads,
        )
        .await;
        on_one.extend(samples);
        same = pair;
        let (samples, pair) = tunnel::round_trips(
            (cross_client, cross_device),
            (&cross_headers.0, &cross_headers.1),
            false,
            count / BLOCKS,
            warm_up,
            payloads,
        )
        .await;
        across.extend(samples);
        (cross_client, cross_device) = pair;
    }
    on_one.sort_by(f64::total_cmp);
    across.sort_by(f64::total_cmp);

    // Throughput: 16 KiB frames both ways at once, every byte checked.
    let total: u64 = if full { 1 << 30 } else { 128 << 20 };
    let (same_mbs, _) = tunnel::both_ways(same, headers.clone(), false, total).await;
    let (cross_mbs, _) =
        tunnel::both_ways((cross_client, cross_device), cross_headers, false, total).await;
    let bare = bare_round_trips(&nats_url, count).await;
    let bare_mbs = bare_both_ways(&nats_url, total as usize).await;
    let added = percentile(&across, 0.5) - percentile(&on_one, 0.5);
    vec![
        Row::new(
            "cross-node",
            "latency p50, 32 B each way (baseline: same node)",
            "us",
            percentile(&across, 0.5),
            Some(percentile(&on_one, 0.5)),
            Target::AtMostBaselinePlus(150.0),
        ),
        Row::new(
            "cross-node",
            "latency p99 (baseline: same node)",
            "us",
            percentile(&across, 0.99),
            Some(percentile(&on_one, 0.99)),
            Target::None,
        ),
        Row::new(
            "cross-node",
            format!(
                "throughput, {} MiB each way (baseline: same node)",
                total >> 20
            ),
            "MB/s",
            cross_mbs,
            Some(same_mbs),
            Target::RatioAtLeast(0.5),
        ),
        Row::new(
            "cross-node",
            "p50 added by crossing (baseline: bare NATS round trip)",
            "us",
            added,
            Some(percentile(&bare, 0.5)),
            Target::None,
        ),
        Row::new(
            "cross-node",
            "throughput (baseline: bare NATS, same window, both ways)",
            "MB/s",
            cross_mbs,
            Some(bare_mbs),
            Target::None,
        ),
    ]
}
