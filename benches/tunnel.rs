//! Tunnel throughput and latency: the gateway against a raw tokio relay, side by side.
//!
//! `cargo bench --bench tunnel` starts the release binary on a temporary database, adds
//! a user, connects a simulated device and client, and measures
//! - throughput: one data message streaming 1 GiB from the client to the device;
//! - latency: 64-byte request/response round trips (client -> device -> client);
//! - Modbus-like polls: 32-byte random request and response, whose last byte sometimes
//!   could start a header, so the gateway holds it back (`server.header_hold_ms`):
//!   how often a poll pays that, and how much;
//!
//! and the same through a relay that only does `tokio::io::copy_bidirectional`, and
//! through the gateway with the client on TLS 1.3 (same port, same run); and the
//! latency again while the admin status page is open and refreshing (eight viewers'
//! worth of `/api/status` and `/metrics` requests).
//! Everything runs on loopback; the numbers include this process's own work.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const BULK: usize = 1 << 30;
const ROUND_TRIPS: usize = 20_000;
const POLLS: usize = 3_000;
const MAC: &str = "BENCH0000001";

/// A client connection: plain TCP or TLS.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// A connected device and client, and what each must put before its bytes.
struct Tunnel {
    device: TcpStream,
    client: Box<dyn Duplex>,
    client_header: Vec<u8>,
    device_header: Vec<u8>,
}

async fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A relay that pairs the first two connections and copies bytes both ways.
async fn raw_relay() -> Tunnel {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut a, _) = listener.accept().await.unwrap();
        let (mut b, _) = listener.accept().await.unwrap();
        a.set_nodelay(true).unwrap();
        b.set_nodelay(true).unwrap();
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    });
    let device = connect(port).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let client = Box::new(connect(port).await);
    Tunnel {
        device,
        client,
        client_header: Vec::new(),
        device_header: Vec::new(),
    }
}

async fn gateway_tunnel(port: u16, uuid: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Tunnel {
    let mut device = connect(port).await;
    device
        .write_all(format!("beat;{uuid};{MAC};bench;0").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client: Box<dyn Duplex> = match tls {
        None => Box::new(connect(port).await),
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            Box::new(connector.connect(name, connect(port).await).await.unwrap())
        }
    };
    client
        .write_all(format!("connme;{uuid};{MAC}").as_bytes())
        .await
        .unwrap();
    let mut reply = [0u8; 21];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"{\"status\":\"success\"}\n");
    tokio::time::sleep(Duration::from_millis(50)).await;
    Tunnel {
        device,
        client,
        client_header: format!("data;{uuid};T1;T1;1;").into_bytes(),
        device_header: format!("data;{uuid};{MAC};bench;0;").into_bytes(),
    }
}

/// MB/s of one data message streaming BULK bytes from the client to the device.
async fn throughput(t: Tunnel) -> f64 {
    let Tunnel {
        mut device,
        client,
        client_header,
        ..
    } = t;
    let (_read, mut write) = tokio::io::split(client);
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        write.write_all(&client_header).await.unwrap();
        let chunk = vec![0x5a_u8; 64 * 1024];
        for _ in 0..BULK / chunk.len() {
            write.write_all(&chunk).await.unwrap();
        }
        write
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0;
    while received < BULK {
        let n = device.read(&mut buf).await.unwrap();
        assert!(n > 0, "tunnel closed after {received} bytes");
        received += n;
    }
    let secs = started.elapsed().as_secs_f64();
    drop(sender.await);
    BULK as f64 / secs / 1e6
}

/// Microseconds of each request/response round trip (client -> device -> client),
/// after `warm_up` untimed ones; every byte is checked.
async fn round_trips(
    t: Tunnel,
    count: usize,
    warm_up: usize,
    mut payloads: impl FnMut() -> (Vec<u8>, Vec<u8>),
) -> Vec<f64> {
    let Tunnel {
        mut device,
        mut client,
        client_header,
        device_header,
    } = t;
    let mut samples = Vec::with_capacity(count);
    for i in 0..warm_up + count {
        let (request, response) = payloads();
        let (request_frame, response_frame) = (
            [&client_header[..], &request].concat(),
            [&device_header[..], &response].concat(),
        );
        let mut buf = vec![0u8; request.len().max(response.len())];
        let started = Instant::now();
        client.write_all(&request_frame).await.unwrap();
        client.flush().await.unwrap();
        device.read_exact(&mut buf[..request.len()]).await.unwrap();
        assert_eq!(buf[..request.len()], request);
        device.write_all(&response_frame).await.unwrap();
        client.read_exact(&mut buf[..response.len()]).await.unwrap();
        assert_eq!(buf[..response.len()], response);
        if i >= warm_up {
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples
}

/// The value below which a share `q` of the samples lie.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// p50, p99 and p99.9 in microseconds of 64-byte round trips.
async fn latency(t: Tunnel) -> [f64; 3] {
    let mut samples = round_trips(t, ROUND_TRIPS, 1000, || (vec![0x11; 64], vec![0x22; 64])).await;
    samples.sort_by(f64::total_cmp);
    [0.5, 0.99, 0.999].map(|q| percentile(&samples, q))
}

/// Round-trip times in microseconds of 32-byte random requests and responses.
async fn polls(t: Tunnel) -> Vec<f64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(32);
    round_trips(t, POLLS, 0, || {
        let (request, response): ([u8; 32], [u8; 32]) = (rng.random(), rng.random());
        (request.to_vec(), response.to_vec())
    })
    .await
}

fn describe_polls(name: &str, mut samples: Vec<f64>) {
    let held = samples.iter().filter(|&&us| us > 10_000.0).count();
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    samples.sort_by(f64::total_cmp);
    println!(
        "{name:<22} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>9.2}%",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        mean,
        samples[samples.len() - 1],
        100.0 * held as f64 / samples.len() as f64
    );
}

/// Eight open status pages: `/api/status` and `/metrics` every 250 ms (a page asks
/// every 2 s), on a thread of their own, until stopped.
struct AdminViewers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl AdminViewers {
    fn start(base: &str) -> AdminViewers {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, base) = (stop.clone(), base.to_owned());
        let thread = std::thread::spawn(move || {
            let mut requests = 0;
            while !flag.load(Ordering::Relaxed) {
                for path in ["/api/status", "/metrics"] {
                    let mut reply = ureq::get(format!("{base}{path}")).call().unwrap();
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
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A certificate for `localhost` written into `dir`, and a client that trusts it.
fn tls_setup(dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_elfin-gateway");
    let tls = tls_setup(dir.path());
    let env = [
        ("ELFIN__SERVER__LISTEN", "127.0.0.1:0"),
        ("ELFIN__LOG__LEVEL", "info"),
        ("ELFIN__TLS__CERT", "cert.pem"),
        ("ELFIN__TLS__KEY", "key.pem"),
        ("ELFIN__ADMIN__LISTEN", "127.0.0.1:0"),
    ];
    let out = Command::new(binary)
        .current_dir(dir.path())
        .envs(env)
        .args(["user", "add", "bench"])
        .output()
        .unwrap();
    let uuid = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let mut gateway = tokio::process::Command::new(binary)
        .current_dir(dir.path())
        .envs(env)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = BufReader::new(gateway.stderr.take().unwrap()).lines();
    let mut admin = String::new();
    let port: u16 = loop {
        let line = log.next_line().await.unwrap().expect("gateway exited");
        if let Some(rest) = line.split("admin pages on ").nth(1) {
            admin = rest.trim_end_matches('/').to_owned();
        }
        if let Some(rest) = line.split(" listening on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap();
            break addr.rsplit(':').next().unwrap().parse().unwrap();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });

    let raw_mbs = throughput(raw_relay().await).await;
    let gw_mbs = throughput(gateway_tunnel(port, &uuid, None).await).await;
    let tls_mbs = throughput(gateway_tunnel(port, &uuid, Some(&tls)).await).await;
    let raw_rtt = latency(raw_relay().await).await;
    let gw_rtt = latency(gateway_tunnel(port, &uuid, None).await).await;
    let tls_rtt = latency(gateway_tunnel(port, &uuid, Some(&tls)).await).await;
    let viewers = AdminViewers::start(&admin);
    let admin_rtt = latency(gateway_tunnel(port, &uuid, None).await).await;
    let refreshes = viewers.stop();
    let raw_polls = polls(raw_relay().await).await;
    let gw_polls = polls(gateway_tunnel(port, &uuid, None).await).await;

    println!(
        "tunnel benchmark (loopback, {} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10}",
        "", "MB/s", "p50 us", "p99 us", "p99.9 us"
    );
    for (name, mbs, rtt) in [
        ("raw tokio relay", raw_mbs, raw_rtt),
        ("elfin-gateway", gw_mbs, gw_rtt),
        ("elfin-gateway, TLS 1.3", tls_mbs, tls_rtt),
        ("gateway, admin open", f64::NAN, admin_rtt),
    ] {
        let mbs = if mbs.is_nan() {
            "-".to_owned()
        } else {
            format!("{mbs:.0}")
        };
        println!(
            "{name:<22} {mbs:>10} {:>10.1} {:>10.1} {:>10.1}",
            rtt[0], rtt[1], rtt[2]
        );
    }
    println!(
        "gateway / raw: throughput {:.2}x, added p50 latency {:.1} us",
        gw_mbs / raw_mbs,
        gw_rtt[0] - raw_rtt[0]
    );
    println!(
        "TLS / plain: throughput {:.2}x, added p50 latency {:.1} us",
        tls_mbs / gw_mbs,
        tls_rtt[0] - gw_rtt[0]
    );
    println!(
        "admin page open / closed: added p50 latency {:.1} us, p99 {:.1} us ({refreshes} status and metrics requests)",
        admin_rtt[0] - gw_rtt[0],
        admin_rtt[1] - gw_rtt[1],
    );
    println!("\n{POLLS} polls of 32 random bytes each way (held: round trip over 10 ms)");
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "p50 us", "p99 us", "mean us", "max us", "held"
    );
    describe_polls("raw tokio relay", raw_polls);
    describe_polls("elfin-gateway", gw_polls);
}
