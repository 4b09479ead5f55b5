//! Scenarios 1 to 3: one tunnel's throughput and latency, and a thousand tunnels at
//! once, each against a relay with the gateway's read size in the same run. (The
//! round-trip and both-ways steps serve scenario 7 too.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gateway::{self, Gateway};
use crate::net::{self, percentile, Pattern, Stream};
use crate::plot::Figures;
use crate::report::{Row, Target};

const FRAME: usize = 16 * 1024;
const SMALL: usize = 32;

/// A gateway tunnel: (client, device), with device `i` online; the client on TLS
/// when `tls` (the gateway must have a certificate).
async fn gateway_tunnel(gw: &Gateway, i: usize, tls: bool) -> (Stream, Stream) {
    let device = net::device(i, gw.addr, &gw.uuid).await;
    net::wait_online(gw.addr, &gw.uuid, 1, Instant::now()).await;
    let config = tls.then(|| gw.tls.as_ref().expect("a gateway with TLS"));
    let client = net::client(i, gw.addr, &gw.uuid, config).await;
    (client, Box::new(device))
}

/// Both ends of relay pair `i`, as the scenarios take them.
async fn relay_pair(i: usize, relay: &net::Baseline) -> (Stream, Stream) {
    let (a, b) = net::relay_pair(i, relay.addr).await;
    (Box::new(a), Box::new(b))
}

/// Streams `total` bytes each way at once through (a, b) in 16 KiB frames with
/// headers; every byte is checked. Returns MB/s both ways together and the
/// throughput over time (seconds, MB/s).
pub async fn both_ways(
    pair: (Stream, Stream),
    headers: (Vec<u8>, Vec<u8>),
    relayed: bool,
    total: u64,
) -> (f64, Vec<(f64, f64)>) {
    let (mbs, timeline, _) = both_ways_kept(pair, headers, relayed, total).await;
    (mbs, timeline)
}

/// [`both_ways`], handing the pair back open for more.
pub async fn both_ways_kept(
    (a, b): (Stream, Stream),
    headers: (Vec<u8>, Vec<u8>),
    relayed: bool,
    total: u64,
) -> (f64, Vec<(f64, f64)>, (Stream, Stream)) {
    let pattern = Arc::new(Pattern::new());
    let received = Arc::new(AtomicU64::new(0));
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let started = Instant::now();
    // Writers stay open until both directions are read: the gateway ends a tunnel
    // when its client closes, as a relay would not for a half-close.
    let mut senders = Vec::new();
    for (header, mut writer) in [(headers.0.clone(), aw), (headers.1.clone(), bw)] {
        let pattern = pattern.clone();
        senders.push(tokio::spawn(async move {
            net::send_frames(&mut writer, total, FRAME, &header, &pattern).await;
            writer
        }));
    }
    let mut tasks = Vec::new();
    // What a relay forwards still has the sender's headers in it.
    let framing = |h: &Vec<u8>| relayed.then_some((h.len(), FRAME));
    let (from_b, from_a) = (framing(&headers.1), framing(&headers.0));
    for (mut reader, frame) in [(ar, from_b), (br, from_a)] {
        let (pattern, received) = (pattern.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            let seen = AtomicU64::new(0);
            net::receive_checked(&mut reader, total, frame, &pattern, |got| {
                let before = seen.swap(got, Ordering::Relaxed);
                received.fetch_add(got - before, Ordering::Relaxed);
            })
            .await;
            reader
        }));
    }
    let sampler = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut timeline = Vec::new();
            let mut last = (Instant::now(), 0);
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = (Instant::now(), received.load(Ordering::Relaxed));
                let mbs =
                    (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64() / 1e6;
                timeline.push((now.0.duration_since(started).as_secs_f64(), mbs));
                last = now;
                if now.1 >= 2 * total {
                    return timeline;
                }
            }
        })
    };
    let mut readers = Vec::new();
    for task in tasks {
        readers.push(task.await.expect("a tunnel end failed"));
    }
    let secs = started.elapsed().as_secs_f64();
    let mut writers = Vec::new();
    for sender in senders {
        writers.push(sender.await.expect("a tunnel end failed"));
    }
    let timeline = sampler.await.unwrap();
    let (Some(bw), Some(aw)) = (writers.pop(), writers.pop()) else {
        unreachable!("two writers")
    };
    let (Some(br), Some(ar)) = (readers.pop(), readers.pop()) else {
        unreachable!("two readers")
    };
    let pair = (ar.unsplit(aw), br.unsplit(bw));
    (2.0 * total as f64 / secs / 1e6, timeline, pair)
}

pub async fn throughput(gw: &Gateway, full: bool, figures: &mut Figures) -> Vec<Row> {
    let total: u64 = if full { 2 << 30 } else { 128 << 20 };
    let headers = (
        net::client_header(&gw.uuid),
        net::device_header(&gw.uuid, 0),
    );
    let relay = net::relay(1);
    let relayed = relay_pair(1, &relay).await;
    let before = relay.usage();
    let (base, base_timeline) = both_ways(relayed, headers.clone(), true, total).await;
    let relay_used = relay.usage() - before;
    let tunnel = gateway_tunnel(gw, 0, false).await;
    let before = gw.usage();
    let (plain, gw_timeline) = both_ways(tunnel, headers.clone(), false, total).await;
    let gw_used = gw.usage().zip(before).map(|(after, before)| after - before);
    figures.throughput = Some((gw_timeline, base_timeline));
    let mut rows = vec![Row::new(
        "tunnel-throughput",
        format!("{} MiB each way, 16 KiB frames, all checked", total >> 20),
        "MB/s",
        plain,
        Some(base),
        Target::RatioAtLeast(0.9),
    )];
    // None when the gateway's process is unknown (`--target` without `--target-pid`).
    if let Some(used) = gw_used {
        let ((cpu, faults), (relay_cpu, relay_faults)) =
            (used.per_gib(2 * total), relay_used.per_gib(2 * total));
        rows.push(Row::new(
            "tunnel-throughput",
            "CPU time per GiB carried (baseline: relay)",
            "ms",
            cpu,
            Some(relay_cpu),
            Target::None,
        ));
        rows.push(Row::new(
            "tunnel-throughput",
            "page faults per GiB carried (baseline: relay)",
            "",
            faults,
            Some(relay_faults),
            Target::None,
        ));
    }
    if gw.tls.is_some() {
        let tunnel = gateway_tunnel(gw, 0, true).await;
        let (tls, _) = both_ways(tunnel, headers, false, total).await;
        rows.push(Row::new(
            "tunnel-throughput",
            "client on TLS 1.3 (baseline: plain client)",
            "MB/s",
            tls,
            Some(plain),
            Target::RatioAtLeast(0.5),
        ));
    }
    rows
}

/// Round trips of `request`/`response` payloads (client -> device -> client), every
/// byte checked; microseconds each (in order), after `warm_up` untimed ones. Hands
/// the connections back.
pub async fn round_trips(
    (mut client, mut device): (Stream, Stream),
    headers: (&[u8], &[u8]),
    relayed: bool,
    count: usize,
    warm_up: usize,
    mut payloads: impl FnMut(usize) -> (Vec<u8>, Vec<u8>),
) -> (Vec<f64>, (Stream, Stream)) {
    let mut samples = Vec::with_capacity(count);
    let mut buf = vec![0u8; 4096];
    for i in 0..warm_up + count {
        let (request, response) = payloads(i);
        let took = round_trip(
            &mut client,
            &mut device,
            headers,
            relayed,
            (&request, &response),
            &mut buf,
        )
        .await;
        if i >= warm_up {
            samples.push(took);
        }
    }
    (samples, (client, device))
}

/// One request from the client to the device and its response back, each after its
/// header; every byte is checked. Microseconds.
async fn round_trip(
    client: &mut Stream,
    device: &mut Stream,
    headers: (&[u8], &[u8]),
    relayed: bool,
    (request, response): (&[u8], &[u8]),
    buf: &mut [u8],
) -> f64 {
    let frames = (
        [headers.0, request].concat(),
        [headers.1, response].concat(),
    );
    // What arrives: the payload, or through the relay the whole frame.
    let arrives = |frame: &[u8], payload: &[u8]| if relayed { frame.len() } else { payload.len() };
    let started = Instant::now();
    client.write_all(&frames.0).await.unwrap();
    let n = arrives(&frames.0, request);
    device.read_exact(&mut buf[..n]).await.unwrap();
    assert!(buf[..n].ends_with(request), "request corrupted");
    device.write_all(&frames.1).await.unwrap();
    let n = arrives(&frames.1, response);
    client.read_exact(&mut buf[..n]).await.unwrap();
    assert!(buf[..n].ends_with(response), "response corrupted");
    started.elapsed().as_secs_f64() * 1e6
}

/// Fixed 32-byte payloads from the pattern (none ends in a header's first byte).
pub fn fixed(i: usize) -> (Vec<u8>, Vec<u8>) {
    thread_local!(static PATTERN: Pattern = Pattern::new());
    PATTERN.with(|p| {
        (
            p.at((i * 2 * SMALL) as u64, SMALL).to_vec(),
            p.at((i * 2 * SMALL + SMALL) as u64, SMALL).to_vec(),
        )
    })
}

/// Sorted round-trip times of 32-byte payloads through the gateway and through the
/// relay, taken in alternating blocks so that drift on a shared machine (another
/// process waking up, frequency changes) falls on both alike.
async fn latency_pair(gw: &Gateway, count: usize, tls: bool) -> (Vec<f64>, Vec<f64>) {
    alternating(gw, count, tls, fixed).await
}

/// Sorted round-trip times of `payloads(i)` for the i-th round trip through the
/// gateway and through the relay, in ten alternating blocks of the same payloads.
pub async fn alternating(
    gw: &Gateway,
    count: usize,
    tls: bool,
    payloads: impl Fn(usize) -> (Vec<u8>, Vec<u8>),
) -> (Vec<f64>, Vec<f64>) {
    const BLOCKS: usize = 10;
    let relay = net::relay(1);
    let (ch, dh) = (
        net::client_header(&gw.uuid),
        net::device_header(&gw.uuid, 0),
    );
    let mut relayed = relay_pair(2, &relay).await;
    let mut tunnel = gateway_tunnel(gw, 0, tls).await;
    let (mut gateway, mut base) = (Vec::new(), Vec::new());
    let per_block = count / BLOCKS;
    for block in 0..BLOCKS {
        let first = block * per_block;
        let warm_up = if block == 0 { count / 10 } else { 0 };
        let payloads = |i: usize| payloads(first + i);
        let (samples, pair) =
            round_trips(relayed, (&ch, &dh), true, per_block, warm_up, payloads).await;
        base.extend(samples);
        relayed = pair;
        let (samples, pair) =
            round_trips(tunnel, (&ch, &dh), false, per_block, warm_up, payloads).await;
        gateway.extend(samples);
        tunnel = pair;
    }
    gateway.sort_by(f64::total_cmp);
    base.sort_by(f64::total_cmp);
    (gateway, base)
}

/// p50 and p99 of round trips through the gateway against the relay's in the same
/// run, held to scenario 2's targets.
pub fn latency_rows(
    scenario: &'static str,
    label: &str,
    gateway: &[f64],
    base: &[f64],
) -> Vec<Row> {
    vec![
        Row::new(
            scenario,
            format!("p50, {label}"),
            "us",
            percentile(gateway, 0.5),
            Some(percentile(base, 0.5)),
            Target::AtMostBaselinePlus(10.0),
        ),
        Row::new(
            scenario,
            format!("p99, {label}"),
            "us",
            percentile(gateway, 0.99),
            Some(percentile(base, 0.99)),
            Target::RatioAtMost(1.5),
        ),
    ]
}

pub async fn latency(gw: &Gateway, full: bool, figures: &mut Figures) -> Vec<Row> {
    let count = if full { 50_000 } else { 5_000 };
    let (gateway, base) = latency_pair(gw, count, false).await;
    let mut rows = latency_rows("tunnel-latency", "32 B each way", &gateway, &base);
    figures.latency = Some((gateway, base));
    if gw.tls.is_some() {
        let (tls, base) = latency_pair(gw, count / 2, true).await;
        rows.push(Row::new(
            "tunnel-latency",
            "p50, client on TLS 1.3",
            "us",
            percentile(&tls, 0.5),
            Some(percentile(&base, 0.5)),
            Target::None,
        ));
    }
    if let Some(admin) = gw.admin {
        let viewers = AdminViewers::start(admin);
        let (gateway, base) = latency_pair(gw, count / 2, false).await;
        let requests = viewers.stop();
        rows.extend(latency_rows(
            "tunnel-latency",
            &format!("status page open ({requests} admin requests)"),
            &gateway,
            &base,
        ));
    }

    // Random payloads: a response or request ending in b, c, d or q waits for the
    // header hold (it could start the next header).
    let polls = if full { 5_000 } else { 1_000 };
    let (ch, dh) = (
        net::client_header(&gw.uuid),
        net::device_header(&gw.uuid, 0),
    );
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut random = move |_| {
        let mut bytes = || {
            (0..SMALL)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
        };
        (bytes(), bytes())
    };
    let (samples, _) = round_trips(
        gateway_tunnel(gw, 0, false).await,
        (&ch, &dh),
        false,
        polls,
        0,
        &mut random,
    )
    .await;
    let held = samples.iter().filter(|&&us| us > 10_000.0).count();
    rows.push(Row::new(
        "tunnel-latency",
        "random 32 B: round trips held back",
        "%",
        100.0 * held as f64 / samples.len() as f64,
        None,
        Target::None,
    ));
    rows
}

/// A request/response loop on each (client, device) pair at once for `run`, the
/// device of pair k sending as device `first + k`: (round trips a second, p99 us).
async fn many_loops(
    pairs: Vec<(Stream, Stream)>,
    uuid: &str,
    first: usize,
    relayed: bool,
    run: Duration,
) -> (f64, f64) {
    let until = Instant::now() + run;
    let mut tasks = Vec::new();
    for (i, (mut client, mut device)) in pairs.into_iter().enumerate() {
        let headers = (
            net::client_header(uuid),
            net::device_header(uuid, first + i),
        );
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut buf = vec![0u8; 256];
            let mut n = i;
            while Instant::now() < until {
                let (request, response) = fixed(n);
                n += 1;
                let headers = (&headers.0[..], &headers.1[..]);
                let payloads = (&request[..], &response[..]);
                let took = round_trip(
                    &mut client,
                    &mut device,
                    headers,
                    relayed,
                    payloads,
                    &mut buf,
                );
                samples.push(took.await);
            }
            samples
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    (all.len() as f64 / secs, percentile(&all, 0.99))
}

/// The gateway's `tunnels` tunnels (devices 1..=tunnels, each with a client).
async fn gateway_tunnels(gw: &Gateway, tunnels: usize) -> Vec<(Stream, Stream)> {
    let mut devices = Vec::new();
    for i in 1..=tunnels {
        devices.push(net::device(i, gw.addr, &gw.uuid).await);
    }
    net::wait_online(gw.addr, &gw.uuid, tunnels, Instant::now()).await;
    let mut pairs = Vec::new();
    for (i, device) in (1..=tunnels).zip(devices) {
        let device: Stream = Box::new(device);
        pairs.push((net::client(i, gw.addr, &gw.uuid, None).await, device));
    }
    pairs
}

/// With `target`, on that gateway as it is; otherwise on gateways of our own with 1
/// worker and with one per core.
pub async fn many_tunnels(target: Option<&Gateway>, full: bool) -> Vec<Row> {
    let tunnels = 1000;
    let run = Duration::from_secs(if full { 10 } else { 2 });
    let mut rows = Vec::new();
    let mut per_workers = Vec::new();
    for workers in [1usize, 0] {
        // Our own gateway with that many workers, or the one given (as it is).
        let workers_setting = workers.to_string();
        let gw = &*gateway::target_or_start(
            target,
            &[("ELFIN__SERVER__WORKERS", &workers_setting)],
            false,
        );
        let threads = if workers == 0 { 2 } else { workers };
        let relay = net::relay(threads);
        let mut pairs = Vec::new();
        for i in 0..tunnels {
            pairs.push(relay_pair(10_000 + i, &relay).await);
        }
        let (base_rate, base_p99) = many_loops(pairs, &gw.uuid, 1, true, run).await;
        let pairs = gateway_tunnels(gw, tunnels).await;
        let (rate, p99) = many_loops(pairs, &gw.uuid, 1, false, run).await;
        let label = if workers == 0 {
            "workers = 0 (2 cores)".to_owned()
        } else {
            format!("workers = {workers}")
        };
        rows.push(Row::new(
            "many-tunnels",
            format!("{tunnels} tunnels, {label}"),
            "rt/s",
            rate,
            Some(base_rate),
            Target::None,
        ));
        rows.push(Row::new(
            "many-tunnels",
            format!("p99, {label}"),
            "us",
            p99,
            Some(base_p99),
            Target::None,
        ));
        per_workers.push(rate);
        if workers == 0 {
            let count = if full { 20_000 } else { 3_000 };
            let (gateway, base) = latency_pair(gw, count, false).await;
            rows.extend(latency_rows(
                "tunnel-latency",
                "one tunnel, workers = 0",
                &gateway,
                &base,
            ));
        }
        if target.is_some() {
            break;
        }
    }
    if let [one, two] = per_workers[..] {
        rows.push(Row::new(
            "many-tunnels",
            "aggregate, 2 workers / 1 worker",
            "x",
            two / one,
            None,
            Target::AtLeast(1.6),
        ));
    }
    rows
}

/// Eight open status pages: `/api/status` and `/metrics` every 250 ms (a page asks
/// every 2 s), on a thread of their own until stopped.
struct AdminViewers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl AdminViewers {
    fn start(admin: std::net::SocketAddr) -> AdminViewers {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut requests = 0;
            while !flag.load(Ordering::Relaxed) {
                for path in ["/api/status", "/metrics"] {
                    let mut reply = ureq::get(format!("http://{admin}{path}")).call().unwrap();
                    reply.body_mut().read_to_string().unwrap();
                    requests += 1;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            requests
        });
        AdminViewers { stop, thread }
    }

    /// Stops; returns how many requests were made.
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}
