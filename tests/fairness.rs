//! Fairness on the wall clock: one peer's work must not hold up another's tunnel.
//! These measure CPU time on the gateway's thread, so they run one at a time and in a
//! test binary of their own (the gateway runs in-process, its peers as real sockets).

mod common;

use std::num::NonZeroU32;
use std::time::Duration;

use common::{Peer, TestGateway};

const MAC: &str = "F0FE6B2A1C3D";

/// The worst round trip a fair gateway allows here: well under the quarter second and
/// more that one peer holding the thread costs, well over the hiccups of a busy VM.
const FAIR: Duration = Duration::from_millis(150);

/// Measurements a test may take: a second one only if the first saw a round trip
/// over [`FAIR`]. The host's hiccups come at random and seldom twice in a row (once
/// in a few suite runs on a VM with heavy steal time); an unfair gateway stalls the
/// tunnel every time.
const ATTEMPTS: usize = 2;

/// Whether to measure (again): no attempt yet was fair, and attempts are left.
fn measure_again(worsts: &[Duration]) -> bool {
    worsts.len() < ATTEMPTS && worsts.iter().all(|worst| *worst >= FAIR)
}

/// Held by each test: the wall-clock measurements must not share the cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One byte through the tunnel and back to the test, timed on the wall clock. Digits
/// only: no payload byte could start a header, so none is held back.
async fn round_trip(client: &mut Peer, device: &mut Peer, uuid: &str, i: usize) -> Duration {
    let digit = b'0' + (i % 10) as u8;
    let started = std::time::Instant::now();
    client
        .send(format!("data;{uuid};T;T;1;{}", digit as char))
        .await;
    assert_eq!(device.bytes(1).await, [digit]);
    started.elapsed()
}

/// One connection flooding junk and beats does not hold up another tunnel (real
/// time, not the paused clock: this is about CPU).
#[actix_rt::test]
async fn a_flooding_peer_does_not_stall_other_tunnels() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    let mut worsts = Vec::new();
    while measure_again(&worsts) {
        let mut flooder = gw.connect().await;
        let flood = format!("xbeat;{uuid};AAAAAAAAAAAA;f;0").repeat(200_000);
        let flooding = actix_rt::spawn(async move {
            flooder.send(flood).await;
            flooder
        });
        let mut worst = Duration::ZERO;
        for i in 0..100 {
            worst = worst.max(round_trip(&mut client, &mut device, &uuid, i).await);
        }
        flooding.await.unwrap();
        worsts.push(worst);
    }
    // A quarter of a second or more without fair turns; with them, a few ms to
    // 70 ms in a debug build on a loaded 2-core VM (one scheduler hiccup is enough).
    assert!(
        worsts.iter().any(|worst| *worst < FAIR),
        "the worst round trip of each flood: {worsts:?}"
    );
}

/// `query` for a user with 18 000 devices, asked over and over, does not hold up
/// another user's tunnel (real time: this is about CPU on the session's thread).
#[actix_rt::test]
async fn a_huge_query_does_not_stall_other_tunnels() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let gw = TestGateway::start_with(|c| {
        c.limits.requests_per_sec = NonZeroU32::new(1000).unwrap();
        c.limits.request_burst = NonZeroU32::new(1000).unwrap();
    })
    .await;
    let big = gw.add_user("big").await;
    gw.store_fleet(&big, 18_000).await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    let mut worsts = Vec::new();
    while measure_again(&worsts) {
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // The askers run on threads of their own: reading 1.7 MB replies is their
        // CPU, not the gateway's.
        let mut askers = Vec::new();
        for _ in 0..4 {
            let (big, answered, addr) = (big.clone(), answered.clone(), gw.addr);
            askers.push(std::thread::spawn(move || {
                let mut asker = common::BlockingPeer::connect(addr);
                for _ in 0..5 {
                    asker.send(format!("query;{big}\n").as_bytes());
                    let reply = asker.line();
                    assert!(reply.len() > 18_000 * 80, "{}", reply.len());
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }));
        }
        // Round trips for as long as the queries are being answered.
        let mut worst = Duration::ZERO;
        let mut i = 0;
        while answered.load(std::sync::atomic::Ordering::SeqCst) < 20 {
            i += 1;
            worst = worst.max(round_trip(&mut client, &mut device, &uuid, i).await);
        }
        for asker in askers {
            asker.join().unwrap();
        }
        worsts.push(worst);
    }
    assert!(
        worsts.iter().any(|worst| *worst < FAIR),
        "the worst round trip of each round of queries: {worsts:?}"
    );
}
