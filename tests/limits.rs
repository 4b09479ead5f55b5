//! Every peer is bounded (the `[limits]` settings): connection caps, time limits,
//! bounded output, paced requests and slowed-down uuid guessing. The gateway runs
//! in-process on a paused clock, with small limits so each test takes moments.

mod common;

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::time::Instant;

use common::{failed_reason, Peer, TestGateway};

const MAC: &str = "F0FE6B2A1C3D";

/// A connection from a chosen loopback source address.
async fn connect_from(source: [u8; 4], to: SocketAddr) -> Peer {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let stream = socket.connect(to).await.unwrap();
    Peer::from_stream(stream)
}

#[actix_rt::test]
async fn connections_over_the_cap_are_closed_at_once() {
    tokio::time::pause();
    let gw =
        TestGateway::start_with(|c| c.limits.max_connections = NonZeroUsize::new(3).unwrap()).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(gw.connect().await);
    }
    let mut refused = gw.connect().await;
    refused
        .expect_closed_within(Duration::from_millis(10))
        .await;
    for peer in &mut open {
        peer.expect_silence(Duration::from_millis(10)).await;
    }
    // A place that frees up is taken again.
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut again = gw.connect().await;
    again.expect_silence(Duration::from_millis(10)).await;
}

#[actix_rt::test]
async fn one_address_cannot_take_every_place() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| {
        c.limits.max_connections_per_ip = NonZeroUsize::new(2).unwrap()
    })
    .await;
    let _a = connect_from([127, 0, 0, 1], gw.addr).await;
    let _b = connect_from([127, 0, 0, 1], gw.addr).await;
    let mut third = connect_from([127, 0, 0, 1], gw.addr).await;
    third.expect_closed_within(Duration::from_millis(10)).await;
    let mut elsewhere = connect_from([127, 0, 0, 2], gw.addr).await;
    elsewhere.expect_silence(Duration::from_millis(10)).await;
}

#[actix_rt::test]
async fn a_connection_that_sends_no_valid_message_is_closed_after_the_identify_time() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.limits.identify = Duration::from_secs(10)).await;
    let mut silent = gw.connect().await;
    let mut vandal = gw.connect().await;
    let mut late = gw.connect().await;
    vandal.send("hello there\n").await;
    silent.expect_silence(Duration::from_secs(9)).await;
    // A byte at 9 s does not buy a new identify time: it counts from accept.
    late.send("x").await;
    silent.expect_closed_within(Duration::from_secs(2)).await;
    vandal.expect_closed_within(Duration::from_secs(1)).await;
    late.expect_closed_within(Duration::from_millis(1500)).await;
}

#[actix_rt::test]
async fn a_header_dribbled_a_byte_at_a_time_must_finish_within_the_identify_time() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.limits.identify = Duration::from_secs(10)).await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let started = Instant::now();
    let header = format!("beat;{uuid};{MAC};plc-1;0");
    let mut sent = 0;
    let closed = loop {
        if sent < header.len() {
            let _ = device
                .stream
                .write_all(&header.as_bytes()[sent..=sent])
                .await;
            sent += 1;
        }
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_millis(500), device.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => panic!("unexpected {:?}", &buf[..n]),
            Err(_) => assert!(started.elapsed() < Duration::from_secs(30), "never closed"),
        }
    };
    assert!(
        closed >= Duration::from_secs(10) && closed < Duration::from_secs(11),
        "{closed:?}"
    );
}

#[actix_rt::test]
async fn idle_connections_are_closed_but_not_devices_clients_or_tunnels_that_keep_talking() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| {
        c.limits.idle = Duration::from_secs(180);
        c.heartbeat.online_window = Duration::from_secs(600);
    })
    .await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut asker = gw.connect().await;
    asker.send(format!("query;{uuid}")).await;
    asker.line().await;
    let mut quiet = gw.connect().await;
    quiet.send(format!("query;{uuid}")).await;
    quiet.line().await;
    let mut tunnel = gw.tunnel(&uuid, MAC).await;
    // Ten minutes: the device beats and the client asks every 30 s; the others are
    // silent.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        device.send(format!("beat;{uuid};{MAC};plc-1;0")).await;
        asker.send(format!("query;{uuid}")).await;
        asker.line().await;
    }
    quiet.expect_closed_within(Duration::ZERO).await;
    device.send(format!("data;{uuid};{MAC};plc-1;0;hi")).await;
    assert_eq!(tunnel.bytes(2).await, b"hi", "a silent tunnel end stays");
}

#[actix_rt::test]
async fn a_client_that_never_reads_its_replies_is_closed_after_the_stall_time() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| {
        c.server.tunnel_stall = Duration::from_secs(5);
        c.limits.output_queue_bytes = NonZeroUsize::new(64 * 1024).unwrap();
        c.limits.requests_per_sec = NonZeroU32::new(1000).unwrap();
        c.limits.request_burst = NonZeroU32::new(1000).unwrap();
    })
    .await;
    let uuid = gw.add_user("alice").await;
    gw.store_fleet(&uuid, 2000).await;
    // A small receive window, so the kernel buffers fill up soon.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut hoarder = Peer::from_stream(socket.connect(gw.addr).await.unwrap());
    let started = Instant::now();
    let requests = format!("query;{uuid}\n").repeat(200);
    let _ = hoarder.stream.write_all(requests.as_bytes()).await;
    // Nothing read for a while; then everything it is sent ends in end of file.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), hoarder.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received += n,
            Err(_) => panic!("still open after {:?}", started.elapsed()),
        }
    }
    let one_reply = 2000 * 100;
    assert!(
        received < 200 * one_reply,
        "all {received} bytes were sent: nothing was bounded"
    );
}

#[actix_rt::test]
async fn requests_beyond_the_burst_are_paced_not_refused() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| {
        c.limits.requests_per_sec = NonZeroU32::new(20).unwrap();
        c.limits.request_burst = NonZeroU32::new(40).unwrap();
    })
    .await;
    let uuid = gw.add_user("alice").await;
    let mut client = gw.connect().await;
    let started = Instant::now();
    client.send(format!("query;{uuid}\n").repeat(80)).await;
    for _ in 0..80 {
        assert_eq!(client.line().await, "[]");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1950) && took < Duration::from_millis(2100),
        "{took:?}"
    );
}

#[actix_rt::test]
async fn guessing_uuids_slows_down_after_the_threshold() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| {
        c.limits.failed_lookups_per_min = 5;
        c.limits.failed_lookup_delay = Duration::from_secs(1);
    })
    .await;
    let uuid = gw.add_user("alice").await;
    let _device = gw.device(&uuid, MAC, "plc-1").await;
    let mut guesser = gw.connect().await;
    let started = Instant::now();
    for i in 0..10 {
        guesser.send(format!("connme;guess-{i};{MAC}\n")).await;
        assert_eq!(
            failed_reason(&guesser.line().await),
            format!("device {MAC} is offline")
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_millis(5100),
        "{took:?}"
    );
    // Another address is not slowed down, and a good uuid still works.
    let mut other = connect_from([127, 0, 0, 3], gw.addr).await;
    let started = Instant::now();
    other.send(format!("connme;guess;{MAC}\n")).await;
    failed_reason(&other.line().await);
    other.send(format!("connme;{uuid};{MAC}\n")).await;
    assert_eq!(other.line().await, r#"{"status":"success"}"#);
    assert!(started.elapsed() < Duration::from_millis(100));
}
