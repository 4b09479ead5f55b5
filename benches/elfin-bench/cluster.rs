//! Scenario 7: a tunnel across two cluster nodes against a tunnel within one, in the
//! same run. Nodes a and b are release binaries sharing the tests' MongoDB stand-in
//! and a `nats-server` on loopback; the device is on a, one client on a and one on b.
//! A cross-node tunnel's bytes go over a direct TLS connection between a and b
//! (NATS only opens it), so crossing adds two socket hops and TLS each way.
//!
//! Also: how long `connme` takes to open a tunnel across nodes against one on the
//! same node (the NATS request and the peer connection's handshake), and that a
//! cross-node tunnel is bounded end to end: a client on b that stops reading stalls
//! the device's socket on a, and neither node's memory grows with what waits.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gateway::Gateway;
use crate::net::{self, percentile, Stream, Usage};
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

    // Throughput: 16 KiB frames both ways at once, every byte checked, in alternating
    // blocks like the round trips: what share of the two cores the host leaves this
    // machine moves within seconds (steal time 20 to 45 % in one run), and a phase
    // each would compare two different machines.
    let total: u64 = if full { 1 << 30 } else { 128 << 20 };
    let block = total / BLOCKS as u64;
    let (mut same_secs, mut cross_secs) = (0.0, 0.0);
    // CPU time of a and of b: in the same-node blocks, b only idles.
    let (mut same_used, mut cross_a, mut cross_b) = <(Usage, Usage, Usage)>::default();
    let nodes = || (a.usage().unwrap_or_default(), b.usage().unwrap_or_default());
    let mut cross = (cross_client, cross_device);
    for _ in 0..BLOCKS {
        let before = nodes();
        let (mbs, _, pair) = tunnel::both_ways_kept(same, headers.clone(), false, block).await;
        let after = nodes();
        same_used = same_used + (after.0 - before.0) + (after.1 - before.1);
        same_secs += 2.0 * block as f64 / 1e6 / mbs;
        same = pair;
        let before = nodes();
        let (mbs, _, pair) =
            tunnel::both_ways_kept(cross, cross_headers.clone(), false, block).await;
        let after = nodes();
        cross_a = cross_a + (after.0 - before.0);
        cross_b = cross_b + (after.1 - before.1);
        cross_secs += 2.0 * block as f64 / 1e6 / mbs;
        cross = pair;
    }
    let ms_per_gib = |used: Usage| used.per_gib(2 * total).0;
    let same_ms = ms_per_gib(same_used);
    // On machines of their own, a crossing tunnel runs as fast as its busier node.
    let busier_ms = ms_per_gib(cross_a).max(ms_per_gib(cross_b));
    drop((same, cross));
    let mbs = |secs: f64| 2.0 * total as f64 / 1e6 / secs;
    let (same_mbs, cross_mbs) = (mbs(same_secs), mbs(cross_secs));
    let opens = if full { 500 } else { 100 };
    // A device of its own (the throughput run closed the others), reached from b
    // once before the clock runs.
    let _opened = net::device(3, a.addr, &uuid).await;
    drop(client_eventually(3, b.addr, &uuid).await);
    let open_same = open_times(a.addr, &uuid, 3, opens).await;
    let open_cross = open_times(b.addr, &uuid, 3, opens).await;
    let stalled = stalled_reader(&a, &b, &uuid).await;
    vec![
        Row::new(
            "cross-node",
            "latency p50, 32 B each way (baseline: same node)",
            "us",
            percentile(&across, 0.5),
            Some(percentile(&on_one, 0.5)),
            Target::AtMostBaselinePlus(80.0),
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
                "throughput, {} MiB each way, every byte checked (baseline: same node)",
                total >> 20
            ),
            "MB/s",
            cross_mbs,
            Some(same_mbs),
            Target::RatioAtLeast(0.6),
        ),
        Row::new(
            "cross-node",
            "throughput: CPU time of both nodes per GiB carried (baseline: same node)",
            "ms",
            ms_per_gib(cross_a + cross_b),
            Some(same_ms),
            Target::None,
        ),
        Row::new(
            "cross-node",
            "throughput: CPU time of the busier node per GiB carried (baseline: same node)",
            "ms",
            busier_ms,
            Some(same_ms),
            Target::None,
        ),
        Row::new(
            "cross-node",
            format!("connme to success p50, {opens} tunnels (baseline: same node)"),
            "us",
            percentile(&open_cross, 0.5),
            Some(percentile(&open_same, 0.5)),
            Target::None,
        ),
        Row::new(
            "cross-node",
            "client stops reading: MiB the device wrote before its socket stalled",
            "MiB",
            stalled.accepted as f64 / (1 << 20) as f64,
            None,
            Target::AtMost(64.0),
        ),
        Row::new(
            "cross-node",
            "client stops reading: RSS growth of both nodes",
            "MiB",
            stalled.growth_kib as f64 / 1024.0,
            None,
            Target::AtMost(64.0),
        ),
    ]
}

/// Microseconds from `connme` sent to its success read, `count` times, sorted.
async fn open_times(to: SocketAddr, uuid: &str, device: usize, count: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(count);
    let connme = format!("connme;{uuid};{}", net::mac(device));
    for i in 0..count {
        let mut stream = net::connect(i, to).await;
        let started = Instant::now();
        stream.write_all(connme.as_bytes()).await.unwrap();
        let mut reply = [0u8; 21];
        stream.read_exact(&mut reply).await.unwrap();
        times.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(&reply, b"{\"status\":\"success\"}\n", "connme failed");
    }
    times.sort_by(f64::total_cmp);
    times
}

/// What a device could write to a cross-node client that reads nothing.
struct Stalled {
    accepted: u64,
    growth_kib: u64,
}

/// Device 2 on a writes 16 KiB frames to a client on b that never reads, until its
/// writes have stalled for a second.
async fn stalled_reader(a: &Gateway, b: &Gateway, uuid: &str) -> Stalled {
    let mut device = net::device(2, a.addr, uuid).await;
    let _client = client_eventually(2, b.addr, uuid).await;
    let rss = || a.rss_kib().unwrap_or(0) + b.rss_kib().unwrap_or(0);
    let before = rss();
    let frame = [net::device_header(uuid, 2), vec![0x5a; 16 * 1024]].concat();
    let mut accepted = 0u64;
    loop {
        let write = tokio::time::timeout(Duration::from_secs(1), device.write_all(&frame));
        match write.await {
            Ok(Ok(())) => accepted += 16 * 1024,
            Ok(Err(e)) => panic!("the device's connection failed: {e}"),
            Err(_) => break,
        }
        assert!(accepted < 1 << 30, "1 GiB went through with nobody reading");
    }
    Stalled {
        accepted,
        growth_kib: rss().saturating_sub(before),
    }
}
