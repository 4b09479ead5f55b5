//! Scenario 9, the operator's view: finding one device among 20 000 at
//! `/api/devices`, and the audit trail under 1 000 tunnels opened and closed a second
//! (what it costs a tunnel's round trip, and whether every tunnel is in the trail
//! after a SIGTERM).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gateway::Gateway;
use crate::net::{self, percentile};
use crate::report::{Row, Target};
use crate::tunnel;

const STORED: usize = 20_000;
/// Devices the churning clients tunnel to, round robin.
const CHURN_DEVICES: usize = 50;
const TUNNELS_PER_SEC: u64 = 1_000;

pub async fn operator_view(full: bool) -> Vec<Row> {
    // Capacity, not tenancy: one user holds the whole fleet.
    // One engineer opening a thousand tunnels a second is past the audit trail's
    // budget per user and source (it would count the rest, not record them): what
    // this scenario measures is that the trail keeps up, so the budget is lifted.
    let mut gw = Gateway::start(&[("ELFIN__AUDIT__BUDGET_PER_10MIN", "4000000000")], false);
    let mut rows = search(&gw, full);
    rows.extend(churn(&mut gw, full).await);
    rows
}

/// Search timings at the API with 20 000 stored devices.
fn search(gw: &Gateway, full: bool) -> Vec<Row> {
    let dir = gw.dir().expect("the bench's own gateway");
    {
        let mut db = rusqlite::Connection::open(dir.join("data/elfin.db")).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        let tx = db.transaction().unwrap();
        for i in 0..STORED {
            tx.execute(
                "INSERT INTO devices (mac, host, last_seen_ms, owner)
                 SELECT ?1, ?2, 0, id FROM users WHERE uuid = ?3",
                rusqlite::params![format!("AC{i:010X}"), format!("meter-{i:05}"), gw.uuid],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let admin = gw.admin.expect("the bench's gateway has an admin server");
    let get = |path: &str| -> String {
        let mut reply = ureq::get(format!("http://{admin}{path}")).call().unwrap();
        reply.body_mut().read_to_string().unwrap()
    };
    // The first request reads the store's listing (kept 10 s): not a search.
    assert!(get("/api/devices").contains(&format!("\"total\":{STORED}")));
    let searches = if full { 1_000 } else { 200 };
    let mut took: Vec<f64> = (0..searches)
        .map(|k| {
            let i = (k * 7_919) % STORED;
            let started = Instant::now();
            let page = get(&format!("/api/devices?q=ac{i:010x}"));
            let ms = started.elapsed().as_secs_f64() * 1e3;
            assert!(page.contains(&format!("meter-{i:05}")), "{page}");
            ms
        })
        .collect();
    took.sort_by(f64::total_cmp);
    let biggest = get("/api/devices?per_page=200");
    vec![
        Row::new(
            "operator-view",
            format!("search among {STORED} devices, p50"),
            "ms",
            percentile(&took, 0.5),
            None,
            Target::AtMost(50.0),
        ),
        Row::new(
            "operator-view",
            format!("search among {STORED} devices, p99"),
            "ms",
            percentile(&took, 0.99),
            None,
            Target::AtMost(50.0),
        ),
        Row::new(
            "operator-view",
            "a page of 200 devices",
            "KiB",
            biggest.len() as f64 / 1024.0,
            None,
            Target::AtMost(64.0),
        ),
    ]
}

/// Round-trip times through a tunnel while nothing else happens, then while
/// 1 000 tunnels a second open and close; then SIGTERM and count the trail.
async fn churn(gw: &mut Gateway, full: bool) -> Vec<Row> {
    let secs = if full { 60 } else { 10 };
    let rounds = if full { 20_000 } else { 5_000 };
    let mut devices = Vec::new();
    for i in 1..=CHURN_DEVICES {
        devices.push(net::device(i, gw.addr, &gw.uuid).await);
    }
    net::wait_online(gw.addr, &gw.uuid, CHURN_DEVICES, Instant::now()).await;
    // The devices read (and drop) what clients send, so no tunnel stalls.
    let readers: Vec<_> = devices
        .into_iter()
        .map(|mut d| {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while d.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            })
        })
        .collect();

    let quiet = tunnel::alternating(gw, rounds, false, tunnel::fixed).await;
    let opened = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churner = {
        let (addr, uuid) = (gw.addr, gw.uuid.clone());
        let (opened, stop) = (opened.clone(), stop.clone());
        tokio::spawn(async move {
            let limit = Arc::new(tokio::sync::Semaphore::new(256));
            let mut every =
                tokio::time::interval(Duration::from_micros(1_000_000 / TUNNELS_PER_SEC));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut k = 0usize;
            let mut tasks = tokio::task::JoinSet::new();
            while !stop.load(Ordering::Relaxed) {
                every.tick().await;
                let permit = limit.clone().acquire_owned().await.unwrap();
                let (uuid, opened) = (uuid.clone(), opened.clone());
                // Sources from 127.0.10.x: apart from the devices' and the
                // latency pair's.
                let i = 2_500_000 + k;
                let device = 1 + k % CHURN_DEVICES;
                k += 1;
                tasks.spawn(async move {
                    let mut client = net::connect(i, addr).await;
                    client
                        .write_all(format!("connme;{uuid};{}", net::mac(device)).as_bytes())
                        .await
                        .unwrap();
                    let mut reply = [0u8; 21];
                    client.read_exact(&mut reply).await.unwrap();
                    if &reply == b"{\"status\":\"success\"}\n" {
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(client);
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            k
        })
    };
    let started = Instant::now();
    let busy = tunnel::alternating(gw, rounds, false, tunnel::fixed).await;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let asked = churner.await.unwrap();
    let rate = opened.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    // Every tunnel, the churning ones and the two latency pairs', in the trail.
    let tunnels = opened.load(Ordering::Relaxed) + 2;
    assert!(
        gw.terminate(),
        "the gateway did not exit cleanly on SIGTERM"
    );
    for r in readers {
        r.abort();
    }
    let db = rusqlite::Connection::open(gw.dir().unwrap().join("data/elfin.db")).unwrap();
    let (recorded, closed): (u64, u64) = db
        .query_row(
            "SELECT count(*), count(closed_ms) FROM audit_tunnels",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    eprintln!("  operator-view: {asked} tunnels asked, {tunnels} opened, {recorded} recorded ({closed} closed)");
    let (quiet_gw, _) = &quiet;
    let (busy_gw, busy_relay) = &busy;
    let mut rows = tunnel::latency_rows(
        "operator-view",
        "round trip during the churn (baseline: relay, same time)",
        busy_gw,
        busy_relay,
    );
    rows.extend([
        Row::new(
            "operator-view",
            "tunnels opened and closed a second",
            "/s",
            rate,
            None,
            Target::AtLeast(0.95 * TUNNELS_PER_SEC as f64),
        ),
        Row::new(
            "operator-view",
            "round trip p50 during the churn (baseline: before it)",
            "us",
            percentile(busy_gw, 0.5),
            Some(percentile(quiet_gw, 0.5)),
            Target::None,
        ),
        Row::new(
            "operator-view",
            "tunnels in the audit trail after SIGTERM, closed",
            "",
            closed as f64,
            Some(tunnels as f64),
            Target::Equals(tunnels as f64),
        ),
    ]);
    rows
}
