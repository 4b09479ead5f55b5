//! Scenarios 4 and 5: a fleet of idle devices (memory per device, `query` of a big
//! user) and a reconnect storm, each against a bare tokio acceptor in a process of
//! its own (`elfin-bench __acceptor`): the least any tokio server holding the same
//! connections costs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::gateway::{self, Gateway};
use crate::net::{self, percentile, Baseline};
use crate::plot::Figures;
use crate::report::{Row, Target};

/// The baseline server: accepts, writes one byte, reads and discards.
fn acceptor() -> Baseline {
    Baseline::start(&["__acceptor"])
}

/// The acceptor's main: serves until killed.
pub async fn serve_acceptor() {
    let listener = elfin_actors::server::bind("127.0.0.1:0".parse().unwrap(), 4096).unwrap();
    println!("{}", listener.local_addr().unwrap());
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.write_all(b"!").await;
            let mut buf = [0u8; 512];
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
}

/// How many devices the machine lets us hold: each is a descriptor here and one in
/// the gateway.
pub fn fleet_limit() -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    (limit as usize).saturating_sub(300)
}

/// Least-squares slope and R² of y against x.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    let slope = sxy / sxx;
    (slope, (sxy * sxy) / (sxx * syy))
}

/// Connects devices `from..to` (a beat each), concurrently.
pub async fn connect_devices(
    from: usize,
    to: usize,
    addr: SocketAddr,
    uuid: &str,
) -> Vec<TcpStream> {
    let tasks: Vec<_> = (from..to)
        .map(|i| {
            let uuid = uuid.to_owned();
            tokio::spawn(async move { net::device(i, addr, &uuid).await })
        })
        .collect();
    let mut devices = Vec::with_capacity(tasks.len());
    for task in tasks {
        devices.push(task.await.unwrap());
    }
    devices
}

/// RSS (KiB) against devices connected, in ten steps up to `n`; each step's devices
/// beat twice and `ready` confirms they are held before RSS is read.
async fn rss_curve(
    n: usize,
    addr: SocketAddr,
    uuid: &str,
    rss: impl Fn() -> u64,
    gateway: bool,
) -> (Vec<(f64, f64)>, Vec<TcpStream>) {
    let mut points = vec![(0.0, rss() as f64)];
    let mut all = Vec::with_capacity(n);
    for step in 1..=10 {
        let (from, to) = ((step - 1) * n / 10, step * n / 10);
        let mut devices = connect_devices(from, to, addr, uuid).await;
        if gateway {
            net::wait_online(addr, uuid, to, Instant::now()).await;
            for (i, d) in (from..to).zip(devices.iter_mut()) {
                d.write_all(format!("beat;{uuid};{};dev-{i};0", net::mac(i)).as_bytes())
                    .await
                    .unwrap();
            }
        } else {
            for d in devices.iter_mut() {
                d.read_u8().await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        points.push((to as f64, rss() as f64));
        all.extend(devices);
    }
    (points, all)
}

pub async fn device_fleet(target: Option<&Gateway>, full: bool, figures: &mut Figures) -> Vec<Row> {
    let limit = fleet_limit();
    let n = if full {
        limit.min(15_000)
    } else {
        2_000.min(limit)
    };
    let gw = gateway::target_or_start(target, &[], false);
    let mut rows = vec![Row::new(
        "device-fleet",
        "devices held (open files limit allows)",
        "devices",
        n as f64,
        Some(limit as f64),
        Target::None,
    )];
    net::settle().await;
    let acceptor = acceptor();
    let (base_points, held) =
        rss_curve(n, acceptor.addr, &gw.uuid, || acceptor.rss_kib(), false).await;
    drop(held);
    drop(acceptor);
    net::settle().await;
    let Some(_) = gw.rss_kib() else {
        rows.push(Row::new(
            "device-fleet",
            "RSS unknown: give --target-pid",
            "",
            f64::NAN,
            None,
            Target::None,
        ));
        return rows;
    };
    let (points, devices) =
        rss_curve(n, gw.addr, &gw.uuid, || gw.rss_kib().unwrap_or(0), true).await;
    let (slope, r2) = fit(&points);
    let (base_slope, _) = fit(&base_points);
    rows.push(Row::new(
        "device-fleet",
        format!("RSS per device ({n} devices)"),
        "KiB",
        slope,
        Some(base_slope),
        Target::AtMost(3.5),
    ));
    rows.push(Row::new(
        "device-fleet",
        "RSS linear in devices (R^2)",
        "",
        r2,
        None,
        Target::AtLeast(0.98),
    ));
    figures.rss = Some((points, base_points));

    // `query` of a user with all these devices.
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..if full { 100 } else { 30 } {
        let started = Instant::now();
        let (online, bytes) = net::query(gw.addr, &gw.uuid).await;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(online, n, "query lists {online} of {n} online");
        size = bytes;
    }
    times.sort_by(f64::total_cmp);
    rows.push(Row::new(
        "device-fleet",
        format!("query of {n} devices, p99"),
        "ms",
        percentile(&times, 0.99),
        None,
        Target::None,
    ));
    rows.push(Row::new(
        "device-fleet",
        format!("query of {n} devices, reply size"),
        "KiB",
        size as f64 / 1024.0,
        None,
        Target::None,
    ));
    drop(devices);
    rows
}

pub async fn reconnect_storm(target: Option<&Gateway>, full: bool) -> Vec<Row> {
    let n = if full { 15_000 } else { 3_000 }.min(fleet_limit());
    net::settle().await;
    // Baseline: the same storm at a bare acceptor; all accepted = each got its byte.
    let acceptor = acceptor();
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let addr = acceptor.addr;
            tokio::spawn(async move {
                let mut s = net::connect(i, addr).await;
                s.read_u8().await.unwrap();
                s
            })
        })
        .collect();
    let mut held = Vec::with_capacity(n);
    for t in tasks {
        held.push(t.await.unwrap());
    }
    let base = started.elapsed().as_secs_f64();
    drop(held);
    drop(acceptor);
    net::settle().await;

    let gw = gateway::target_or_start(target, &[], false);
    let overflows = net::listen_overflows();
    let started = Instant::now();
    let devices = connect_devices(0, n, gw.addr, &gw.uuid).await;
    let connected = started.elapsed().as_secs_f64();
    let took = net::wait_online(gw.addr, &gw.uuid, n, started)
        .await
        .as_secs_f64();
    let overflowed = net::listen_overflows() - overflows;
    drop(devices);
    vec![
        Row::new(
            "reconnect-storm",
            format!("{n} devices at once, all online in query"),
            "s",
            took,
            Some(base),
            Target::AtMost(2.0),
        ),
        Row::new(
            "reconnect-storm",
            "all connected and beating after",
            "s",
            connected,
            None,
            Target::None,
        ),
        Row::new(
            "reconnect-storm",
            "listen queue overflows",
            "",
            overflowed as f64,
            None,
            Target::Equals(0.0),
        ),
    ]
}
