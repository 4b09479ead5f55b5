//! A reconnect storm on the real binary: thousands of devices connect at the same
//! instant (as after a gateway restart or a network outage). With `server.backlog`
//! and an accept loop that waits on nothing else, none waits out a SYN retry: the
//! kernel's listen-queue overflow counter does not move, and every device comes online
//! in `query`. How fast (15 000 in two seconds on a release build) is a speed target,
//! measured by elfin-bench's reconnect-storm scenario, not here: a debug build on a
//! VM with heavy steal time took 2.5 s for 5 000 once in a dozen suite runs.

mod common;

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::Binary;

/// How many devices storm in; `ELFIN_STORM_DEVICES` sets another number.
fn devices() -> usize {
    std::env::var("ELFIN_STORM_DEVICES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000)
}

/// `TcpExtListenOverflows` from `/proc/net/netstat` (system-wide).
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap();
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_absorbed_without_listen_queue_overflows() {
    // All of them come from 127.0.0.1, as from behind one big NAT, and belong to one
    // user whose whole fleet connects for the first time.
    let gw = Binary::start(&[
        ("ELFIN__LIMITS__MAX_CONNECTIONS_PER_IP", "50000"),
        ("ELFIN__LIMITS__MAX_DEVICES_PER_USER", "100000"),
        ("ELFIN__LIMITS__NEW_DEVICES_BURST", "100000"),
    ]);
    let count = devices();
    let uuid = gw.add_user("fleet");
    let addr = gw.addr;
    let overflows = listen_overflows();
    let started = Instant::now();
    let connects: Vec<_> = (0..count)
        .map(|i| {
            let beat = format!("beat;{uuid};{i:012X};meter-{i};0");
            tokio::spawn(async move {
                let mut device = TcpStream::connect(addr).await.unwrap();
                device.write_all(beat.as_bytes()).await.unwrap();
                device
            })
        })
        .collect();
    let mut devices = Vec::with_capacity(count);
    for connect in connects {
        devices.push(connect.await.unwrap());
    }
    let gw = std::sync::Arc::new(gw);
    let online = loop {
        let (g, u) = (gw.clone(), uuid.clone());
        let listed = tokio::task::spawn_blocking(move || g.query(&u))
            .await
            .unwrap();
        let online = listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["status"] == "online")
            .count();
        if online == count || started.elapsed() > Duration::from_secs(10) {
            break online;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    eprintln!("{online} of {count} devices online after {took:?}");
    assert_eq!(online, count);
    assert_eq!(listen_overflows(), overflows, "the listen queue overflowed");
    drop(devices);
}
