//! Tunnels (docs/PROTOCOL.md §4) over real sockets, the gateway in-process on a paused
//! clock: every byte delivered once, in order, unchanged; tunnel ends that reach the
//! client like a TCP relay's; one live connection per device.

mod common;

use std::time::Duration;

use actix::prelude::*;

use common::{Peer, TestGateway};
use elfin_actors::device::DeviceKey;
use elfin_actors::frame::Role;
use elfin_actors::link::{Meter, PeerEvent, PeerLink, Tunnel};
use elfin_actors::outbox::{Bounds, Outbox};
use elfin_actors::registry::Lookup;
use tokio::io::AsyncReadExt;

const MAC: &str = "F0FE6B2A1C3D";

const MS: Duration = Duration::from_millis(1);

/// Within this, a client must see the end of its tunnel.
const PROMPTLY: Duration = Duration::from_secs(1);

#[actix_rt::test]
async fn a_header_split_after_its_first_byte_leaks_no_byte() {
    tokio::time::pause();
    // At once (a split write), and 50 ms later on a connection held 100 ms (what a
    // far link, or header_hold_min_ms behind a TLS proxy, gives).
    for (pause, floor) in [(Duration::ZERO, Duration::ZERO), (50 * MS, 100 * MS)] {
        let gw = TestGateway::start_with(|c| c.server.header_hold_min = floor).await;
        let uuid = gw.add_user("alice").await;
        let mut device = gw.device(&uuid, MAC, "plc-1").await;
        let mut client = gw.tunnel(&uuid, MAC).await;
        client
            .send([format!("data;{uuid};T;T;1;").as_bytes(), b"\x01\x02\x03d"].concat())
            .await;
        tokio::time::sleep(pause).await;
        client
            .send([format!("ata;{uuid};T;T;1;").as_bytes(), b"\x04\x05"].concat())
            .await;
        assert_eq!(device.bytes(5).await, b"\x01\x02\x03\x04\x05", "{pause:?}");
        device.expect_silence(Duration::from_secs(1)).await;
    }
}

#[actix_rt::test]
async fn a_payload_ending_in_a_header_start_is_delivered_after_the_links_hold() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    // Loopback: about 2 round trips + 0.25 ms, on a real-time timer of its own.
    let started = std::time::Instant::now();
    client
        .send([format!("data;{uuid};T;T;1;").as_bytes(), b"\x01\x03\x00d"].concat())
        .await;
    assert_eq!(device.bytes(4).await, b"\x01\x03\x00d");
    let waited = started.elapsed();
    assert!(waited < 20 * MS, "{waited:?}");

    // With the floor at the ceiling, the whole header_hold_ms (the runtime's timer,
    // here the test's paused clock).
    let gw = TestGateway::start_with(|c| c.server.header_hold_min = c.server.header_hold).await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    let started = tokio::time::Instant::now();
    client
        .send([format!("data;{uuid};T;T;1;").as_bytes(), b"\x01\x03\x00d"].concat())
        .await;
    assert_eq!(device.bytes(4).await, b"\x01\x03\x00d");
    let waited = started.elapsed();
    assert!(waited >= 100 * MS && waited < 150 * MS, "{waited:?}");
}

#[actix_rt::test]
async fn when_the_device_closes_the_client_gets_what_was_queued_then_end_of_file() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    device
        .send(format!("data;{uuid};{MAC};plc-1;0;last words, held")) // a tail that could start a header
        .await;
    drop(device);
    assert_eq!(client.bytes(16).await, b"last words, held");
    client.expect_closed_within(PROMPTLY).await;
}

#[actix_rt::test]
async fn when_the_client_closes_the_device_stays_connected() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let client = gw.tunnel(&uuid, MAC).await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Its data goes nowhere now, and it stays registered and reachable.
    device.send(format!("data;{uuid};{MAC};plc-1;0;lost")).await;
    device.expect_silence(Duration::from_secs(1)).await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    device
        .send(format!("data;{uuid};{MAC};plc-1;0;again"))
        .await;
    assert_eq!(client.bytes(5).await, b"again");
}

#[actix_rt::test]
async fn a_connthem_tunnel_ending_leaves_both_devices_connected() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let (a, b) = ("AAAAAAAAAAAA", "BBBBBBBBBBBB");
    let mut dev_a = gw.device(&uuid, a, "a").await;
    let mut dev_b = gw.device(&uuid, b, "b").await;
    let mut requester = gw.connect().await;
    requester.send(format!("connthem;{uuid};{a};{b}")).await;
    assert_eq!(requester.line().await, r#"{"status":"success"}"#);
    // A client takes device A: the A-B tunnel ends, B stays connected.
    let mut client = gw.tunnel(&uuid, a).await;
    dev_b.expect_silence(Duration::from_secs(1)).await;
    dev_a.send(format!("data;{uuid};{a};a;0;for-client")).await;
    assert_eq!(client.bytes(10).await, b"for-client");
    gw.wait_online(&uuid, b).await;
    let mut other = gw.tunnel(&uuid, b).await;
    dev_b.send(format!("data;{uuid};{b};b;0;b-ok")).await;
    assert_eq!(other.bytes(4).await, b"b-ok");

    // The audit trail: the pair, asked for by the requester, ended by the relink.
    gw.hub
        .bridge
        .send(elfin_actors::bridge::Tunnels)
        .await
        .unwrap();
    while gw
        .hub
        .audit_writer
        .send(elfin_actors::persistence::Flush)
        .await
        .unwrap()
        > 0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let filter = elfin_actors::audit::Filter {
        mac: Some(b.into()),
        limit: 10,
        ..Default::default()
    };
    let trail = elfin_actors::store::AuditLog::audit_tunnels(&*gw.store, &filter)
        .await
        .unwrap();
    let pair = trail.last().unwrap();
    assert_eq!(
        (pair.device.as_str(), pair.peer_device.as_deref()),
        (a, Some(b))
    );
    assert_eq!(
        pair.client_addr,
        requester.stream.local_addr().unwrap().to_string()
    );
    assert_eq!(
        pair.cause.as_deref(),
        Some("replaced by a newer tunnel of the device")
    );
    assert_eq!(trail.len(), 2, "the pair, and the client's tunnel to {b}");
}

#[actix_rt::test]
async fn a_second_client_taking_the_device_closes_the_first() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut first = gw.tunnel(&uuid, MAC).await;
    let mut second = gw.tunnel(&uuid, MAC).await;
    first.expect_closed_within(PROMPTLY).await;
    device
        .send(format!("data;{uuid};{MAC};plc-1;0;for-second"))
        .await;
    assert_eq!(second.bytes(10).await, b"for-second");
    second.send(format!("data;{uuid};T2;T2;1;ok")).await;
    assert_eq!(device.bytes(2).await, b"ok");
}

#[actix_rt::test]
async fn a_client_moving_its_tunnel_to_another_device_leaves_the_first_connected() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut one = gw.device(&uuid, "111111111111", "one").await;
    let mut two = gw.device(&uuid, "222222222222", "two").await;
    let mut client = gw.tunnel(&uuid, "111111111111").await;
    client.send(format!("connme;{uuid};222222222222")).await;
    assert_eq!(client.line().await, r#"{"status":"success"}"#);
    client.send(format!("data;{uuid};T;T;1;to-two")).await;
    assert_eq!(two.bytes(6).await, b"to-two");
    one.expect_silence(Duration::from_millis(200)).await;
    let mut again = gw.tunnel(&uuid, "111111111111").await;
    one.send(format!("data;{uuid};111111111111;one;0;one-ok"))
        .await;
    assert_eq!(again.bytes(6).await, b"one-ok");
}

#[actix_rt::test]
async fn a_takeover_closes_the_old_connection_and_its_client() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut old = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    old.send(format!("data;{uuid};{MAC};plc-1;0;queued")).await;
    // The device reconnects (its old socket half-open, as after a network glitch).
    let mut new = gw.connect().await;
    new.send(format!("beat;{uuid};{MAC};plc-1;0")).await;
    assert_eq!(client.bytes(6).await, b"queued");
    client.expect_closed_within(PROMPTLY).await;
    old.expect_closed_within(PROMPTLY).await;
    // Reachable through the new connection at once, never through the old one.
    let mut client = gw.tunnel(&uuid, MAC).await;
    new.send(format!("data;{uuid};{MAC};plc-1;0;new")).await;
    assert_eq!(client.bytes(3).await, b"new");
    client.send(format!("data;{uuid};T;T;1;hello")).await;
    assert_eq!(new.bytes(5).await, b"hello");
    // When the new connection leaves, the device is gone, not answered by a ghost.
    drop(new);
    client.expect_closed_within(PROMPTLY).await;
    let mut late = gw.connect().await;
    late.send(format!("connme;{uuid};{MAC}")).await;
    assert!(common::failed_reason(&late.line().await).contains("offline"));
}

#[actix_rt::test]
async fn a_stalled_tunnel_closes_its_client_side_and_the_device_stays() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.server.tunnel_stall = Duration::from_secs(5)).await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await; // reads nothing for now
    let chunk = [
        format!("data;{uuid};{MAC};plc-1;0;").as_bytes(),
        &vec![7u8; 60_000],
    ]
    .concat();
    // The gateway stops reading the device once the client's queue and socket are
    // full, so the device's writes block until the stall ends the tunnel; then the
    // gateway reads (and drops) again.
    // The clock only moves while everything waits, so a write that took a second or
    // more was blocked until the stall let the gateway read again: then it stops.
    let started = tokio::time::Instant::now();
    let flood = actix_rt::spawn(async move {
        loop {
            let before = started.elapsed();
            device.stream.write_all(&chunk).await.unwrap();
            if started.elapsed() - before >= Duration::from_secs(1) {
                return (device, started.elapsed());
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Past the stall time the client reads: what was queued, then end of file.
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), client.stream.read(&mut buf))
            .await
            .expect("the stalled client was not closed")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        received += n;
    }
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "end of file came late"
    );
    assert!(received > 0);
    let (mut device, released) = flood.await.unwrap();
    assert!(
        released >= Duration::from_secs(5) && released < Duration::from_millis(5500),
        "the device's input was paused until {released:?}, not the stall time"
    );
    // The device kept its connection and is reachable again.
    gw.wait_online(&uuid, MAC).await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    device
        .send(format!("data;{uuid};{MAC};plc-1;0;still here"))
        .await;
    assert_eq!(client.bytes(10).await, b"still here");
}

/// The web backend's Modbus client keeps its connection, polls every 200 ms and only
/// reconnects from its close handler.
#[actix_rt::test]
async fn the_web_backend_recovers_when_the_device_drops_and_returns() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let device = gw.device(&uuid, MAC, "plc-1").await;
    let echo = echo_device(device, uuid.clone());
    let mut web = web_backend(&gw, &uuid).await;
    let poll = [0x01, 0x03, 0x00, 0x00, 0x00, 0x01, 0x84, 0x0a];
    for _ in 0..3 {
        assert_eq!(
            modbus_poll(&mut web, &uuid, &poll).await,
            Some(poll.to_vec())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The device drops, and is back within a second.
    echo.stop();
    let device = gw.device(&uuid, MAC, "plc-1").await;
    let _echo = echo_device(device, uuid.clone());
    // The next poll on the old connection fails by a close, never by a hang...
    assert_eq!(modbus_poll(&mut web, &uuid, &poll).await, None);
    // ...so the backend reconnects, and its next poll succeeds.
    let mut web = web_backend(&gw, &uuid).await;
    assert_eq!(
        modbus_poll(&mut web, &uuid, &poll).await,
        Some(poll.to_vec())
    );
}

async fn web_backend(gw: &TestGateway, uuid: &str) -> Peer {
    let mut web = gw.connect().await;
    web.send(format!("connme;{uuid};{MAC};1")).await;
    assert_eq!(web.line().await, r#"{"status":"success"}"#);
    web
}

/// One Modbus request; the response, or `None` if the connection closed first.
async fn modbus_poll(web: &mut Peer, uuid: &str, request: &[u8]) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let frame = [
        format!("data;{uuid};8f3a2c;Web Backend;1;").as_bytes(),
        request,
    ]
    .concat();
    if web.stream.write_all(&frame).await.is_err() {
        return None;
    }
    let mut response = vec![0u8; request.len()];
    match tokio::time::timeout(Duration::from_secs(5), web.stream.read_exact(&mut response)).await {
        Ok(Ok(_)) => Some(response),
        Ok(Err(_)) => None,
        Err(_) => panic!("the poll hung: the gateway kept a dead tunnel open"),
    }
}

/// A device that echoes every byte it gets back to its tunnel.
struct Echo(actix_rt::task::JoinHandle<()>);

impl Echo {
    fn stop(self) {
        self.0.abort();
    }
}

fn echo_device(device: Peer, uuid: String) -> Echo {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = device.stream;
    Echo(actix_rt::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let frame =
                        [format!("data;{uuid};{MAC};plc-1;0;").as_bytes(), &buf[..n]].concat();
                    if stream.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            }
        }
    }))
}

/// A tiny actor standing in for a session, to send the bridge's events in any order.
struct Sink;

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<PeerEvent> for Sink {
    type Result = ();
    fn handle(&mut self, _: PeerEvent, _: &mut Context<Self>) {}
}

#[actix_rt::test]
async fn a_tunnel_announced_after_its_removal_is_not_reinstalled() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let session = gw
        .hub
        .registry
        .send(Lookup(DeviceKey::new(&uuid, MAC)))
        .await
        .unwrap()
        .expect("registered");
    // The fake peer's socket: what its outbox writes, the test reads.
    let (socket, mut peer_end) = tokio::io::duplex(1 << 16);
    let (_closing, closed) = tokio::sync::oneshot::channel();
    let bounds = Bounds {
        chunks: 16,
        bytes: 1 << 20,
        direct: false,
    };
    let out = Outbox::new(
        bounds,
        Box::new(socket),
        actix_rt::Arbiter::current(),
        closed,
    );
    let fake = PeerLink {
        id: u64::MAX,
        remote: "127.0.0.1:9".parse().unwrap(),
        transport: elfin_actors::tls::Transport::Plain,
        certificate: None,
        events: Sink.start().recipient(),
        out,
        home: actix_rt::Arbiter::current(),
    };
    // Removal first, announcement second (as when the bridge's messages cross).
    session.events.do_send(PeerEvent::Unlinked {
        tunnel: 1_000,
        close: false,
    });
    session.events.do_send(PeerEvent::Linked(Tunnel {
        id: 1_000,
        peer: fake.clone(),
        sent: Meter::towards(Role::Client),
    }));
    device.send(format!("data;{uuid};{MAC};plc-1;0;dead")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut got = [0u8; 4];
    let nothing = tokio::time::timeout(Duration::from_millis(10), peer_end.read(&mut got)).await;
    assert!(nothing.is_err(), "a dead tunnel carried data");
    // A newer tunnel is installed as usual.
    session.events.do_send(PeerEvent::Linked(Tunnel {
        id: 1_001,
        peer: fake,
        sent: Meter::towards(Role::Client),
    }));
    device.send(format!("data;{uuid};{MAC};plc-1;0;live")).await;
    let read = tokio::time::timeout(Duration::from_secs(1), peer_end.read_exact(&mut got)).await;
    read.unwrap().unwrap();
    assert_eq!(&got, b"live");
    device.expect_silence(Duration::from_millis(10)).await;
}
