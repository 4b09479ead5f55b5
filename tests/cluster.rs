//! Cluster mode, end to end: a real `nats-server` on a loopback port, three gateway
//! binaries (nodes a, b and c) sharing one MongoDB database (the stand-in, or the
//! server at MONGODB_URI), and blocking TCP peers as devices and clients.
//!
//! Without nats-server installed these tests skip, unless ELFIN_REQUIRE_NATS is set
//! (`tests/run.sh` installs it and sets it).

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mongo::Mongo;
use common::nats::{self, Nats};
use common::webhooks::{Receiver, SECRET as HOOK_SECRET};
use common::{eventually, failed_reason, lists_online, Binary, BlockingPeer as Peer, TIMEOUT};

const DEVICE_A: &str = "AABBCCDD000A";
const DEVICE_C: &str = "AABBCCDD000C";

/// Three nodes on one NATS and one database, and a user.
struct Fleet {
    nodes: Vec<Binary>,
    uuid: String,
    nats: Nats,
    /// Kept for the nodes' lifetime.
    _mongo: Mongo,
}

/// The cluster secret of the tests' nodes.
const SECRET: &str = "test-cluster-secret-of-32-bytes-or-more";

/// Settings every node of a test shares: short timeouts, so failures show fast.
const QUICK: &[(&str, &str)] = &[
    ("ELFIN__SERVER__TUNNEL_STALL_SECS", "4"),
    ("ELFIN__CLUSTER__NODE_TIMEOUT_SECS", "2"),
    ("ELFIN__HEARTBEAT__ONLINE_WINDOW_SECS", "3"),
];

impl Fleet {
    /// A NATS server and three nodes on it, meshed; `None` (the test skips) without
    /// nats-server.
    fn start() -> Option<Fleet> {
        Self::start_with(&[])
    }

    /// [`Fleet::start`], every node with these settings too.
    fn start_with(settings: &[(&str, &str)]) -> Option<Fleet> {
        let nats = Nats::start()?;
        let mongo = Mongo::start();
        let nodes: Vec<Binary> = ["a", "b", "c"]
            .iter()
            .map(|id| node_with(&mongo, &nats.url(), id, settings))
            .collect();
        let uuid = nodes[0].add_user("alice");
        let fleet = Fleet {
            nodes,
            uuid,
            nats,
            _mongo: mongo,
        };
        fleet.wait_meshed();
        Some(fleet)
    }

    fn a(&self) -> &Binary {
        &self.nodes[0]
    }

    fn b(&self) -> &Binary {
        &self.nodes[1]
    }

    fn c(&self) -> &Binary {
        &self.nodes[2]
    }

    /// Waits until every node has heard from the two others.
    fn wait_meshed(&self) {
        let ids = ["a", "b", "c"];
        for (node, id) in self.nodes.iter().zip(ids) {
            for other in ids.iter().filter(|other| **other != id) {
                node.wait_log(&format!("cluster node {other} is up"));
            }
        }
    }

    /// A device on `node` that beats, registered and seen by the cluster.
    fn device(&self, node: &Binary, mac: &str) -> Peer {
        let mut device = node.connect();
        device.send(format!("beat;{};{mac};plc-{mac};0", self.uuid).as_bytes());
        node.wait_online(&self.uuid, mac);
        device
    }
}

/// Node `id` of a cluster on `nats_url`, storing in `mongo`.
fn node(mongo: &Mongo, nats_url: &str, id: &str) -> Binary {
    node_with(mongo, nats_url, id, &[])
}

/// [`node`] with these settings too.
fn node_with(mongo: &Mongo, nats_url: &str, id: &str, settings: &[(&str, &str)]) -> Binary {
    let mut env = vec![
        ("ELFIN__STORAGE__BACKEND", "mongodb"),
        ("ELFIN__MONGODB__URI", mongo.uri.as_str()),
        ("ELFIN__MONGODB__DATABASE", mongo.database.as_str()),
        ("ELFIN__MONGODB__SERVER_SELECTION_TIMEOUT_MS", "2000"),
        ("ELFIN__CLUSTER__NATS_URL", nats_url),
        ("ELFIN__CLUSTER__NODE_ID", id),
        ("ELFIN__CLUSTER__SECRET", SECRET),
        ("ELFIN__CLUSTER__PEER_LISTEN", "127.0.0.1:0"),
    ];
    env.extend_from_slice(QUICK);
    env.extend_from_slice(settings);
    Binary::start(&env)
}

/// `connme` on `node` until it succeeds (the cluster may still be settling).
fn tunnel_eventually(node: &Binary, uuid: &str, mac: &str) -> Peer {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut client = node.connect();
        client.send(format!("connme;{uuid};{mac}").as_bytes());
        let reply = client.line();
        if reply == r#"{"status":"success"}"# {
            return client;
        }
        assert!(Instant::now() < deadline, "connme never succeeded: {reply}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `payload` from `from` as data frames of `mac` (or a client's), and checks
/// that `to` receives exactly it.
fn carry(from: &mut Peer, to: &mut Peer, uuid: &str, mac: &str, kind: u8, payload: &[u8]) {
    let header = format!("data;{uuid};{mac};plc;{kind};");
    for chunk in payload.chunks(16 * 1024) {
        from.send(&[header.as_bytes(), chunk].concat());
    }
    assert!(to.bytes(payload.len()) == payload, "bytes differ");
}

fn every_byte_value_and_a_mebibyte() -> Vec<u8> {
    let mut payload: Vec<u8> = (0..=255u8).collect();
    payload.extend(common::random_bytes(1 << 20, 0x2545_f491));
    payload
}

fn online_on(node: &Binary, uuid: &str, mac: &str) -> bool {
    lists_online(&node.query(uuid), mac)
}

#[test]
fn a_client_on_one_node_reaches_a_device_on_another_byte_exact() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let mut device = fleet.device(fleet.a(), DEVICE_A);

    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    let payload = every_byte_value_and_a_mebibyte();
    carry(&mut client, &mut device, &uuid, "T", 1, &payload);
    carry(&mut device, &mut client, &uuid, DEVICE_A, 0, &payload);
    // Raw bytes, no header, both ways too.
    client.send(b"\x00\xffraw from the client");
    assert_eq!(device.bytes(21), b"\x00\xffraw from the client");
    device.send(b"raw from the device\x00\xff");
    assert_eq!(client.bytes(21), b"raw from the device\x00\xff");

    // The client hangs up: the device stays connected, its data goes nowhere, and a
    // new client on another node reaches it.
    client.close();
    fleet.a().wait_log("tunnel 1: its end on node c");
    device.expect_silence(Duration::from_millis(300));
    let mut again = tunnel_eventually(fleet.b(), &uuid, DEVICE_A);
    carry(&mut device, &mut again, &uuid, DEVICE_A, 0, b"still here");

    // The device hangs up: the client on the other node is closed.
    device.close();
    again.expect_closed();

    // Each tunnel is in the shared audit trail once, recorded by its client's node.
    let trail = common::eventually(
        || {
            let trail: Vec<serde_json::Value> = fleet
                .a()
                .cli(&["audit", "--json", "--device", DEVICE_A])
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| v.get("tunnel").cloned())
                .collect();
            trail
        },
        |trail| trail.iter().filter(|t| !t["closed"].is_null()).count() == 2,
    );
    let nodes: Vec<&str> = trail.iter().map(|t| t["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["b", "c"], "{trail:?}");
    let first = &trail[1];
    let carried = payload.len() as u64 + 21;
    assert_eq!(first["cause"], "client closed");
    assert_eq!(first["bytes_to_device"], carried);
    assert_eq!(first["bytes_from_device"], carried);
    assert_eq!(trail[0]["cause"], "device closed");
}

#[test]
fn cross_node_ends_on_two_workers_carry_every_tunnel_byte_exact() {
    // Each cross-node end moves, with its peer connections, to the worker thread of
    // the local connection it is tunnelled to. With two workers, connections are
    // dealt to both in turn, so these ends move to either thread on both nodes.
    let Some(fleet) = Fleet::start_with(&[("ELFIN__SERVER__WORKERS", "2")]) else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let macs: Vec<String> = (0..4).map(|i| format!("AABBCCDDEE{i:02X}")).collect();
    let mut devices: Vec<Peer> = macs.iter().map(|m| fleet.device(fleet.a(), m)).collect();
    let mut clients: Vec<Peer> = macs
        .iter()
        .map(|m| tunnel_eventually(fleet.b(), &uuid, m))
        .collect();
    let payload = every_byte_value_and_a_mebibyte();
    for ((mac, device), client) in macs.iter().zip(&mut devices).zip(&mut clients) {
        carry(client, device, &uuid, "T", 1, &payload);
        carry(device, client, &uuid, mac, 0, &payload);
    }
    // And all of them at once, both ways.
    std::thread::scope(|s| {
        for ((mac, device), client) in macs.iter().zip(&mut devices).zip(&mut clients) {
            let (uuid, payload) = (&uuid, &payload);
            // One thread writes each stream, another reads it.
            let (mut device_out, mut client_in) = (device.try_clone(), client.try_clone());
            s.spawn(move || carry(client, device, uuid, "T", 1, payload));
            s.spawn(move || carry(&mut device_out, &mut client_in, uuid, mac, 0, payload));
        }
    });
}

#[test]
fn what_an_end_sends_before_it_hangs_up_still_crosses_whole() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let payload = every_byte_value_and_a_mebibyte();
    let header = |mac: &str, kind: u8| format!("data;{uuid};{mac};plc;{kind};");

    // The client writes a mebibyte and closes at once: the device gets all of it.
    let mut device = fleet.device(fleet.a(), DEVICE_A);
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    for chunk in payload.chunks(16 * 1024) {
        client.send(&[header("T", 1).as_bytes(), chunk].concat());
    }
    client.close();
    assert!(device.bytes(payload.len()) == payload, "bytes differ");
    device.expect_silence(Duration::from_millis(300));

    // The device does the same: the client gets all of it, then is closed.
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    for chunk in payload.chunks(16 * 1024) {
        device.send(&[header(DEVICE_A, 0).as_bytes(), chunk].concat());
    }
    device.close();
    assert!(client.bytes(payload.len()) == payload, "bytes differ");
    client.expect_closed();
}

#[test]
fn query_on_any_node_lists_the_devices_of_every_node() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let _a = fleet.device(fleet.a(), DEVICE_A);
    let _c = fleet.device(fleet.c(), DEVICE_C);
    // At once, not after a database flush: the nodes are asked.
    let devices = fleet.b().query(&uuid);
    assert!(lists_online(&devices, DEVICE_A), "{devices}");
    assert!(lists_online(&devices, DEVICE_C), "{devices}");
    assert_eq!(devices.as_array().unwrap().len(), 2, "{devices}");
    let host = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["macaddress"] == DEVICE_C)
        .unwrap()["hostname"]
        .clone();
    assert_eq!(host, format!("plc-{DEVICE_C}"));
    // A user of no node gets an empty list, as from one gateway.
    let unknown = fleet.b().query("00000000-0000-0000-0000-000000000000");
    assert_eq!(unknown, serde_json::json!([]));
}

#[test]
fn the_admin_server_shows_the_cluster() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let status = fleet.b().get("/api/status").json();
    assert_eq!(status["cluster"]["node"], "b", "{status}");
    assert_eq!(status["cluster"]["connected"], true);
    assert_eq!(status["cluster"]["nodes"], serde_json::json!(["a", "c"]));
    let metrics = fleet.b().get("/metrics").body;
    assert!(metrics.contains("elfin_cluster_nodes 2"), "{metrics}");
    assert!(metrics.contains("elfin_cluster_connected 1"));
    // The peer certificate's expiry, for the alert rules: a fresh one, years ahead.
    let expiry = fleet
        .b()
        .metric("elfin_certificate_expiry_timestamp_seconds{which=\"peer\"}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(expiry > now + 365 * 86_400, "{expiry}");
    // A gateway that runs alone says nothing of clusters.
    let alone = Binary::start(&[]);
    assert!(alone.get("/api/status").json()["cluster"].is_null());
}

#[test]
fn connthem_joins_devices_on_two_other_nodes() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let mut on_a = fleet.device(fleet.a(), DEVICE_A);
    let mut on_c = fleet.device(fleet.c(), DEVICE_C);
    let mut client = fleet.b().connect();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        client.send(format!("connthem;{uuid};{DEVICE_A};{DEVICE_C}").as_bytes());
        let reply = client.line();
        if reply == r#"{"status":"success"}"# {
            break;
        }
        assert!(Instant::now() < deadline, "{reply}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let payload = every_byte_value_and_a_mebibyte();
    carry(&mut on_a, &mut on_c, &uuid, DEVICE_A, 0, &payload);
    carry(&mut on_c, &mut on_a, &uuid, DEVICE_C, 0, &payload[..4096]);
    // An offline device fails the whole request and touches no tunnel.
    client.send(format!("connthem;{uuid};{DEVICE_A};AABBCCDD00FF").as_bytes());
    assert!(failed_reason(&client.line()).contains("offline"));
    carry(&mut on_a, &mut on_c, &uuid, DEVICE_A, 0, b"still joined");
}

#[test]
fn a_slow_reader_on_one_node_pauses_the_device_on_another() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let device = fleet.device(fleet.a(), DEVICE_A);
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);

    // The device writes 64 MiB as fast as it can; the client reads nothing yet.
    const TOTAL: usize = 64 << 20;
    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, done) = (written.clone(), done.clone());
        let mut socket = device.raw().try_clone().unwrap();
        let header = format!("data;{uuid};{DEVICE_A};plc;0;");
        std::thread::spawn(move || {
            for block in 0..TOTAL / 16384 {
                let chunk = vec![(block % 251) as u8; 16384];
                socket
                    .write_all(&[header.as_bytes(), &chunk].concat())
                    .unwrap();
                written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // Whatever the socket buffers on both sides take, the writer stalls well short
    // of 64 MiB: nothing in between buffers without bound.
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = written.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    assert!(!done.load(Ordering::SeqCst), "64 MiB went through unread");
    assert!(last < 40 << 20, "{last} bytes accepted with nobody reading");

    // The client reads: everything arrives, in order.
    for block in 0..TOTAL / 16384 {
        let got = client.bytes(16384);
        assert!(
            got.iter().all(|&b| b == (block % 251) as u8),
            "block {block} differs"
        );
    }
    writer.join().unwrap();
    drop(device);
}

#[test]
fn a_killed_node_s_devices_go_offline_and_are_reachable_again_elsewhere() {
    let Some(mut fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let device = fleet.device(fleet.a(), DEVICE_A);
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    assert!(online_on(fleet.b(), &uuid, DEVICE_A));

    fleet.a().signal("KILL");
    // The cross-node tunnel ends when a goes quiet (node timeout 2 s)...
    client.expect_closed();
    fleet.c().wait_log("node a stopped answering");
    // ...and the device shows offline everywhere within the online window (3 s).
    let deadline = Instant::now() + Duration::from_secs(8);
    while online_on(fleet.b(), &uuid, DEVICE_A) {
        assert!(Instant::now() < deadline, "still online on b");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!online_on(fleet.c(), &uuid, DEVICE_A));
    drop(device);

    // It reconnects to b: reachable from c at once.
    let mut moved = fleet.device(fleet.b(), DEVICE_A);
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    carry(&mut client, &mut moved, &uuid, "T", 1, b"after the move");
    fleet.nodes.remove(0);
}

#[test]
fn a_device_that_moves_to_another_node_closes_its_old_connection() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let mut old = fleet.device(fleet.a(), DEVICE_A);
    let mut new = fleet.device(fleet.b(), DEVICE_A);
    old.expect_closed();
    fleet
        .a()
        .wait_log(&format!("device {DEVICE_A} connected to node b"));
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    carry(
        &mut client,
        &mut new,
        &uuid,
        "T",
        1,
        b"to the new connection",
    );
    let devices = fleet.c().query(&uuid);
    assert_eq!(devices.as_array().unwrap().len(), 1, "{devices}");
}

#[test]
fn losing_nats_ends_cross_node_tunnels_only_and_presence_returns_with_it() {
    let Some(mut fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let mut device = fleet.device(fleet.a(), DEVICE_A);
    let mut local_device = fleet.device(fleet.a(), DEVICE_C);
    let mut remote_client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    let mut local_client = fleet.a().tunnel(&uuid, DEVICE_C);
    carry(&mut remote_client, &mut device, &uuid, "T", 1, b"before");

    fleet.nats.stop();
    remote_client.expect_closed();
    fleet.a().wait_log("lost the NATS connection");
    fleet.c().wait_log("lost the NATS connection");
    // The local tunnel never noticed.
    let payload = every_byte_value_and_a_mebibyte();
    carry(
        &mut local_client,
        &mut local_device,
        &uuid,
        "T",
        1,
        &payload,
    );
    carry(
        &mut local_device,
        &mut local_client,
        &uuid,
        DEVICE_C,
        0,
        &payload,
    );
    // Meanwhile c cannot reach a's devices, and says so as for an offline device.
    let mut refused = fleet.c().connect();
    refused.send(format!("connme;{uuid};{DEVICE_A}").as_bytes());
    assert!(failed_reason(&refused.line()).contains("offline"));

    fleet.nats.resume();
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    carry(&mut client, &mut device, &uuid, "T", 1, b"after");
    assert!(online_on(fleet.b(), &uuid, DEVICE_A));
}

#[test]
fn a_device_that_moved_while_nats_was_away_keeps_only_its_newer_connection() {
    let Some(mut fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let mut old = fleet.device(fleet.a(), DEVICE_A);
    fleet.nats.stop();
    fleet.a().wait_log("lost the NATS connection");
    fleet.b().wait_log("lost the NATS connection");
    let mut new = fleet.device(fleet.b(), DEVICE_A);
    fleet.nats.resume();
    old.expect_closed();
    new.expect_silence(Duration::from_millis(300));
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    carry(
        &mut client,
        &mut new,
        &uuid,
        "T",
        1,
        b"to the newer connection",
    );
}

#[test]
fn nodes_run_alone_while_nats_is_down_at_start_and_join_when_it_comes() {
    let Some(_) = nats::server() else { return };
    let port = nats::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let mongo = Mongo::start();
    let mut a = node(&mongo, &url, "a");
    let c = node(&mongo, &url, "c");
    a.wait_log("does not answer: this node runs alone");
    let uuid = a.add_user("alice");
    // Alone, each node serves its own devices.
    let mut device = a.connect();
    device.send(format!("beat;{uuid};{DEVICE_A};plc;0").as_bytes());
    a.wait_online(&uuid, DEVICE_A);
    let mut local = a.tunnel(&uuid, DEVICE_A);
    carry(&mut local, &mut device, &uuid, "T", 1, b"alone");
    drop(local);

    let mut nats = Nats::start_on(port).unwrap();
    let mut client = tunnel_eventually(&c, &uuid, DEVICE_A);
    carry(&mut device, &mut client, &uuid, DEVICE_A, 0, b"joined");
    // A node stops cleanly whether or not NATS answers.
    nats.stop();
    a.wait_log("lost the NATS connection");
    assert!(a.stop().success());
}

#[test]
fn a_node_that_shuts_down_closes_its_cross_node_tunnels_at_once() {
    let Some(mut fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let _device = fleet.device(fleet.a(), DEVICE_A);
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    let stopping = Instant::now();
    fleet.a().signal("TERM");
    client.expect_closed();
    // Told by the node itself, not found out by its silence (node timeout 2 s).
    assert!(
        stopping.elapsed() < Duration::from_millis(1500),
        "{:?}",
        stopping.elapsed()
    );
    let mut a = fleet.nodes.remove(0);
    let status = a.stop();
    assert!(status.success(), "{status:?}: {:?}", a.log.lock().unwrap());
}

#[test]
fn a_node_that_stops_answering_ends_its_tunnels_within_the_stall_time() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let _device = fleet.device(fleet.a(), DEVICE_A);
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    fleet.a().signal("STOP");
    let stopped = Instant::now();
    client.expect_closed();
    fleet.a().signal("CONT");
    assert!(
        stopped.elapsed() < Duration::from_secs(4),
        "{:?}",
        stopped.elapsed()
    );
}

#[test]
fn with_when_silent_a_heartbeat_replayed_to_another_node_takes_nothing_over() {
    let Some(fleet) = Fleet::start_with(&[("ELFIN__AUTH__DEVICE_TAKEOVER", "when-silent")]) else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let mac = "F0FE6B2A1C3D";
    let mut device = fleet.device(fleet.a(), mac);
    // Whoever sniffed the heartbeat replays it to another node, from another host.
    let mut attacker = fleet.b().connect_from(2);
    attacker.send(format!("beat;{uuid};{mac};plc-{mac};0").as_bytes());
    let line = fleet.b().wait_log("refused 127.0.0.2 (takeover)");
    assert!(line.contains("another node"), "{line}");
    attacker.expect_closed();
    // The device keeps its connection on a, and an engineer on c reaches it.
    device.send(format!("beat;{uuid};{mac};plc-{mac};0").as_bytes());
    let mut engineer = tunnel_eventually(fleet.c(), &uuid, mac);
    carry(&mut engineer, &mut device, &uuid, "T", 1, b"WRITE-COIL-42");
    assert!(!fleet.a().log_contains("closing its connection here"));
}

#[test]
fn with_when_silent_a_holder_that_does_not_answer_keeps_its_device_and_a_left_device_is_remembered()
{
    let Some(fleet) = Fleet::start_with(&[("ELFIN__AUTH__DEVICE_TAKEOVER", "when-silent")]) else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let beat = |mac: &str| format!("beat;{uuid};{mac};plc-{mac};0");

    // The holder node is paused: the node the impostor reaches cannot learn where the
    // device was seen, so it refuses (fail closed) instead of handing it over.
    let paused = "F0FE6B2A1C01";
    let _device = fleet.device(fleet.a(), paused);
    fleet.a().signal("STOP");
    let mut impostor = fleet.b().connect_from(2);
    impostor.send(beat(paused).as_bytes());
    let line = fleet.b().wait_log("did not answer in time");
    fleet.a().signal("CONT");
    assert!(line.contains("fail closed"), "{line}");
    impostor.expect_closed();
    assert!(!fleet.a().log_contains("closing its connection here"));

    // The device's connection to a closes; within the online window an impostor on
    // another node is refused (a remembers where it was seen), and the real device,
    // back from its own address on yet another node, takes its place at once.
    let left = "F0FE6B2A1C02";
    let device = fleet.device(fleet.a(), left);
    drop(device);
    fleet
        .a()
        .wait_log(&format!("device {left} (plc-{left}) of user"));
    eventually(
        || fleet.a().log_count(&format!("device {left} (plc-{left})")),
        |n| *n >= 2,
    );
    let mut impostor = fleet.b().connect_from(3);
    impostor.send(beat(left).as_bytes());
    impostor.expect_closed();
    let line = fleet
        .b()
        .wait_log("another node saw it lately from another address");
    assert!(line.contains(left), "{line}");
    let mut real = fleet.c().connect();
    real.send(beat(left).as_bytes());
    fleet.c().wait_online(&uuid, left);
}

/// A copy of `message` with one byte of its payload flipped, or, for an empty
/// payload, one character of its MAC.
fn flipped(message: &async_nats::Message) -> async_nats::Message {
    let mut forged = message.clone();
    if forged.payload.is_empty() {
        if let Some(headers) = forged.headers.as_mut() {
            let mac = headers.get("Elfin-Mac").map(|v| v.as_str().to_owned());
            if let Some(mut mac) = mac {
                let last = if mac.ends_with('0') { "1" } else { "0" };
                mac.replace_range(mac.len() - 1.., last);
                headers.insert("Elfin-Mac", mac.as_str());
            }
        }
    } else {
        let mut payload = forged.payload.to_vec();
        let middle = payload.len() / 2;
        payload[middle] ^= 0x01;
        forged.payload = payload.into();
    }
    forged
}

/// Whether `haystack` holds `needle` anywhere.
fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// How many messages or peer connections `node` rejected for `reason`.
fn rejected(node: &Binary, reason: &str) -> u64 {
    node.metric(&format!(
        "elfin_cluster_rejected_total{{reason=\"{reason}\"}}"
    ))
}

#[test]
fn a_rogue_on_nats_sees_no_payload_and_its_replays_and_forgeries_change_nothing() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let rogue = nats::Rogue::listen(&fleet.nats.url());
    // It watches a device come online, a query, and a 1 MiB tunnel across nodes.
    let mut device = fleet.device(fleet.a(), DEVICE_A);
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    assert!(online_on(fleet.b(), &uuid, DEVICE_A));
    let payload = every_byte_value_and_a_mebibyte();
    carry(&mut client, &mut device, &uuid, "T", 1, &payload);
    carry(&mut device, &mut client, &uuid, DEVICE_A, 0, &payload);
    std::thread::sleep(Duration::from_millis(300));
    let seen = rogue.seen();
    assert!(
        seen.len() > 5,
        "the rogue saw the cluster talk: {}",
        seen.len()
    );
    for start in (0..payload.len() - 32).step_by(4099) {
        let piece = &payload[start..start + 32];
        for message in &seen {
            assert!(
                !holds(&message.payload, piece),
                "payload at {start} crossed NATS on {}",
                message.subject
            );
        }
    }

    // It replays everything, then everything with one byte changed, and forges
    // messages with no MAC: a hello of a new node, one under b's name, a claim.
    rogue.replay(&seen);
    let forged: Vec<async_nats::Message> = seen.iter().map(flipped).collect();
    rogue.replay(&forged);
    let hello = r#"{"peer":"6.6.6.6:666","fingerprint":"00","started_ms":1}"#;
    rogue.publish("elfin.hello", &[], hello.as_bytes());
    rogue.publish("elfin.hello", &[("Elfin-Node", "b")], hello.as_bytes());
    let device_subject = seen
        .iter()
        .find(|m| m.subject.starts_with("elfin.dev."))
        .map(|m| m.subject.to_string())
        .expect("the rogue saw a device's subject");
    rogue.publish(
        &device_subject,
        &[],
        br#"{"op":"claim","since_ms":9999999999999}"#,
    );
    std::thread::sleep(Duration::from_millis(1500));

    // No device was evicted, no tunnel opened, no node or device added.
    device.expect_silence(Duration::from_millis(100));
    assert!(!fleet.a().log_contains("closing its connection here"));
    for node in &fleet.nodes {
        let status = node.get("/api/status").json();
        assert_eq!(
            status["cluster"]["nodes"].as_array().unwrap().len(),
            2,
            "{status}"
        );
        let devices = node.query(&uuid);
        assert_eq!(devices.as_array().unwrap().len(), 1, "{devices}");
        assert!(lists_online(&devices, DEVICE_A), "{devices}");
    }
    for node in [fleet.a(), fleet.c()] {
        assert_eq!(node.metric("elfin_cluster_tunnel_ends"), 1);
    }
    // Every node counted what it dropped, and said why.
    assert!(rejected(fleet.a(), "replay") > 0);
    assert!(
        rejected(fleet.a(), "own_name") > 0,
        "its own claim reflected"
    );
    assert!(rejected(fleet.a(), "bad_mac") > 0);
    assert!(rejected(fleet.b(), "unsigned") > 0);
    fleet.a().wait_log("cluster: rejected (replay)");
    fleet.b().wait_log("cluster: rejected (bad_mac)");
    // The tunnel it watched still carries its bytes intact.
    carry(&mut client, &mut device, &uuid, "T", 1, &payload[..65536]);
    carry(
        &mut device,
        &mut client,
        &uuid,
        DEVICE_A,
        0,
        &payload[..65536],
    );
}

#[test]
fn a_node_with_another_secret_is_refused_and_says_so() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let _device = fleet.device(fleet.a(), DEVICE_A);
    let stranger = node_with(
        &fleet._mongo,
        &fleet.nats.url(),
        "d",
        &[(
            "ELFIN__CLUSTER__SECRET",
            "another-secret-of-32-bytes-or-more",
        )],
    );
    stranger.wait_log("cluster: rejected (bad_mac)");
    let line = fleet.a().wait_log("cluster: rejected (bad_mac)");
    assert!(line.contains("claiming node \"d\""), "{line}");
    assert!(line.contains("cluster.secret"), "{line}");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!fleet.a().log_contains("cluster node d is up"));
    assert!(!stranger.log_contains("cluster node a is up"));
    // It reaches none of the cluster's devices (it shares the database, so `query`
    // there still shows what the store knows).
    let mut client = stranger.connect();
    client.send(format!("connme;{uuid};{DEVICE_A}").as_bytes());
    assert!(failed_reason(&client.line()).contains("offline"));
}

/// A TCP relay that can cut every connection it carries, as a failed network path
/// between two nodes would.
struct Cutter {
    addr: std::net::SocketAddr,
    carried: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Cutter {
    fn to(target: std::net::SocketAddr) -> Cutter {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let carried = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = carried.clone();
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { return };
                let Ok(outbound) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let mut kept = kept.lock().unwrap();
                for (from, to) in [(&inbound, &outbound), (&outbound, &inbound)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
                kept.extend([inbound, outbound]);
            }
        });
        Cutter { addr, carried }
    }

    /// Cuts what it carries now; later connections go through.
    fn cut(&self) {
        for stream in self.carried.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_cut_peer_connection_ends_its_tunnels_and_the_next_connme_opens_a_new_one() {
    let Some(nats) = Nats::start() else { return };
    let mongo = Mongo::start();
    // Node a takes peer connections behind the cutter; c dials it there.
    let port = nats::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cutter = Cutter::to(listen.parse().unwrap());
    let advertise = cutter.addr.to_string();
    let a = node_with(
        &mongo,
        &nats.url(),
        "a",
        &[
            ("ELFIN__CLUSTER__PEER_LISTEN", listen.as_str()),
            ("ELFIN__CLUSTER__PEER_ADVERTISE", advertise.as_str()),
        ],
    );
    let c = node(&mongo, &nats.url(), "c");
    a.wait_log("cluster node c is up");
    c.wait_log("cluster node a is up");
    let uuid = a.add_user("alice");
    let mut device = c.connect();
    device.send(format!("beat;{uuid};{DEVICE_C};plc;0").as_bytes());
    c.wait_online(&uuid, DEVICE_C);
    let mut client = tunnel_eventually(&a, &uuid, DEVICE_C);
    carry(&mut client, &mut device, &uuid, "T", 1, b"before the cut");

    let cut = Instant::now();
    cutter.cut();
    client.expect_closed();
    assert!(
        cut.elapsed() < Duration::from_secs(2),
        "{:?}",
        cut.elapsed()
    );
    // The device stays connected, and the next connme opens a new tunnel.
    device.expect_silence(Duration::from_millis(200));
    let mut client = tunnel_eventually(&a, &uuid, DEVICE_C);
    carry(&mut client, &mut device, &uuid, "T", 1, b"after the cut");
    carry(&mut device, &mut client, &uuid, DEVICE_C, 0, b"and back");
}

#[test]
fn a_claim_replayed_to_the_node_a_device_moved_to_closes_nothing() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let rogue = nats::Rogue::listen(&fleet.nats.url());
    let mut old = fleet.device(fleet.b(), DEVICE_A);
    std::thread::sleep(Duration::from_millis(200));
    let claims = rogue.seen();
    // The device moves to a; b closes its old connection.
    let mut new = fleet.device(fleet.a(), DEVICE_A);
    old.expect_closed();
    // a never saw b's claim (it held no such device then): replayed to it now, well
    // within the seal's window, it is authentic and fresh, but older than a's own.
    rogue.replay(&claims);
    std::thread::sleep(Duration::from_millis(500));
    new.expect_silence(Duration::from_millis(100));
    assert!(!fleet.a().log_contains("closing its connection here"));
    let mut client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    carry(&mut client, &mut new, &uuid, "T", 1, b"still on a");
}

#[test]
fn a_cross_node_tunnel_that_carried_nothing_ends_on_both_nodes_when_a_side_leaves() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let uuid = fleet.uuid.clone();
    let _device = fleet.device(fleet.a(), DEVICE_A);
    let client = tunnel_eventually(fleet.c(), &uuid, DEVICE_A);
    let ends = |node: &Binary| node.metric("elfin_cluster_tunnel_ends");
    let deadline = Instant::now() + TIMEOUT;
    while ends(fleet.a()) != 1 || ends(fleet.c()) != 1 {
        assert!(
            Instant::now() < deadline,
            "the tunnel never had its two ends"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = Instant::now();
    client.close();
    while ends(fleet.a()) != 0 || ends(fleet.c()) != 0 {
        assert!(
            left.elapsed() < Duration::from_secs(1),
            "ends left after {:?}",
            left.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn one_node_tells_of_a_device_that_moves_and_of_one_whose_node_is_killed() {
    let Some(receiver) = Receiver::start(HOOK_SECRET, &[]) else {
        return;
    };
    let hooks = receiver.setting(HOOK_SECRET, "");
    let Some(mut fleet) = Fleet::start_with(&[
        ("ELFIN__EVENTS__OFFLINE_AFTER_SECS", "3"),
        ("ELFIN__WEBHOOKS", hooks.as_str()),
    ]) else {
        return;
    };
    let told = |mac: &str| receiver.types_of(mac);

    // Online on a, then it moves to b and back to a, and on to c: a move, no outage.
    let on_a = fleet.device(fleet.a(), DEVICE_A);
    receiver.wait(TIMEOUT, |e| !e.is_empty());
    let on_b = fleet.device(fleet.b(), DEVICE_A);
    drop(on_a);
    std::thread::sleep(Duration::from_secs(1));
    let on_a = fleet.device(fleet.a(), DEVICE_A);
    drop(on_b);
    std::thread::sleep(Duration::from_millis(500));
    let on_c = fleet.device(fleet.c(), DEVICE_A);
    drop(on_a);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(told(DEVICE_A), ["device.online"], "one node, once");

    // It leaves c for good: c tells, once.
    drop(on_c);
    receiver.wait(TIMEOUT, |_| told(DEVICE_A).len() == 2);
    // Back on b: b tells.
    let _back = fleet.device(fleet.b(), DEVICE_A);
    receiver.wait(TIMEOUT, |_| told(DEVICE_A).len() == 3);
    assert_eq!(
        told(DEVICE_A),
        ["device.online", "device.offline", "device.back_online"]
    );
    let nodes: Vec<String> = receiver
        .events()
        .iter()
        .map(|e| e["data"]["node"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(nodes, ["a", "c", "b"]);

    // A device on b; b is killed and the device never comes back: a (the smallest
    // name left) takes over b's devices and tells, once.
    let _lost = fleet.device(fleet.b(), DEVICE_C);
    receiver.wait(TIMEOUT, |_| told(DEVICE_C) == ["device.online"]);
    fleet.b().signal("KILL");
    let events = receiver.wait(Duration::from_secs(20), |_| told(DEVICE_C).len() == 2);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(told(DEVICE_C), ["device.online", "device.offline"]);
    let offline = events
        .iter()
        .find(|e| e["type"] == "device.offline" && e["data"]["mac"] == DEVICE_C)
        .unwrap();
    assert_eq!(offline["data"]["node"], "a");
    // DEVICE_A, live on b when it died, is told too: once.
    assert_eq!(
        told(DEVICE_A),
        [
            "device.online",
            "device.offline",
            "device.back_online",
            "device.offline"
        ]
    );
    assert_eq!(receiver.refused(), 0);
    fleet.nodes.remove(1);
}
