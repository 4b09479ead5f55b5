//! The trust rules (`docs/PROTOCOL.md` §7, README "Threat model"), tried as someone
//! who sniffed a heartbeat would: one device identity per connection, every tenant
//! bounded, unknown users identify nothing, enrollment, the takeover policy, and
//! paced guessing. The gateway runs in-process on a paused clock.

mod common;

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use elfin_actors::audit::{DeviceChange, Filter};
use elfin_actors::device::DeviceKey;
use elfin_actors::persistence::Flush;
use elfin_actors::registry::Takeover;
use elfin_actors::registry::{AllLive, Lookup};
use elfin_actors::store::{AuditLog, Directory, Sightings};
use elfin_actors::tenants::Devices;
use tokio::time::Instant;

use common::{failed_reason, Peer, TestGateway};

const MAC: &str = "F0FE6B2A1C3D";

/// Waits until everything `peer` sent is handled: a request on the same connection
/// is answered after it. Returns the request's `failed` reason.
async fn settle(peer: &mut Peer, uuid: &str) -> String {
    peer.send(format!("\nconnme;{uuid};NOSUCHDEVICE\n")).await;
    failed_reason(&peer.line().await)
}

async fn registered(gw: &TestGateway, uuid: &str, mac: &str) -> bool {
    let lookup = Lookup(DeviceKey::new(uuid, mac));
    gw.hub.registry.send(lookup).await.unwrap().is_some()
}

/// A connection that sent one heartbeat, handled.
async fn beat(gw: &TestGateway, uuid: &str, mac: &str) -> Peer {
    let mut peer = gw.connect().await;
    peer.send(format!("beat;{uuid};{mac};plc;0")).await;
    settle(&mut peer, uuid).await;
    peer
}

#[actix_rt::test]
async fn a_connection_speaks_for_one_device_whatever_it_names_next() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    // The flood that once grew to a gigabyte: a new MAC in every beat.
    for i in 0..1000 {
        device
            .send(format!("beat;{uuid};{i:012X};junk-{i};0"))
            .await;
    }
    settle(&mut device, &uuid).await;
    let listed = gw.query(&uuid).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(!registered(&gw, &uuid, "000000000001").await);
    assert!(registered(&gw, &uuid, MAC).await, "the first stays");

    // Data under another identity does not reach the first device's tunnel.
    let mut client = gw.tunnel(&uuid, MAC).await;
    device
        .send(format!("data;{uuid};BBBBBBBBBBBB;plc-1;0;forged"))
        .await;
    device.send(format!("data;{uuid};{MAC};plc-1;0;real")).await;
    assert_eq!(client.bytes(4).await, b"real");
    client.expect_silence(Duration::from_millis(50)).await;
    // The host name may change.
    device.send(format!("beat;{uuid};{MAC};renamed;0")).await;
    settle(&mut device, &uuid).await;
    assert_eq!(gw.query(&uuid).await[0]["hostname"], "renamed");
}

#[actix_rt::test]
async fn a_device_of_an_unknown_user_identifies_nothing_and_keeps_nothing_alive() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.limits.identify = Duration::from_secs(10)).await;
    let mut junk = gw.connect().await;
    junk.send("beat;no-such-user;AAAAAAAAAAAA;x;0").await;
    junk.send("beat;no-such-user;AAAAAAAAAAAA;x;0").await;
    junk.expect_closed_within(Duration::from_secs(11)).await;
    // A query of an unknown user does not keep a connection either.
    let mut asker = gw.connect().await;
    asker.send("query;no-such-user\n").await;
    assert_eq!(asker.line().await, "[]");
    asker.expect_closed_within(Duration::from_secs(11)).await;
}

#[actix_rt::test]
async fn a_user_gets_its_device_limit_and_no_more() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| {
        c.limits.max_devices_per_user = NonZeroUsize::new(2).unwrap();
    })
    .await;
    let uuid = gw.add_user("alice").await;
    let _a = beat(&gw, &uuid, "AAAAAAAAAAA1").await;
    let _b = beat(&gw, &uuid, "AAAAAAAAAAA2").await;
    let _c = beat(&gw, &uuid, "AAAAAAAAAAA3").await;
    assert!(registered(&gw, &uuid, "AAAAAAAAAAA1").await);
    assert!(registered(&gw, &uuid, "AAAAAAAAAAA2").await);
    assert!(!registered(&gw, &uuid, "AAAAAAAAAAA3").await);
    // Another user is not affected.
    let bob = gw.add_user("bob").await;
    let _d = beat(&gw, &bob, "AAAAAAAAAAA3").await;
    assert!(registered(&gw, &bob, "AAAAAAAAAAA3").await);
}

#[actix_rt::test]
async fn new_devices_come_in_a_burst_then_paced_and_known_ones_always() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| {
        c.limits.new_devices_burst = NonZeroU32::new(2).unwrap();
        c.limits.new_devices_per_minute = NonZeroU32::new(60).unwrap();
    })
    .await;
    let uuid = gw.add_user("alice").await;
    gw.store_fleet(&uuid, 5).await; // stored: 000000000000 to 000000000004
    let _stored: Vec<Peer> = futures::future::join_all(
        (0..5).map(|i| beat(&gw, &uuid, Box::leak(format!("{i:012X}").into_boxed_str()))),
    )
    .await;
    for i in 0..5 {
        assert!(
            registered(&gw, &uuid, &format!("{i:012X}")).await,
            "stored {i}"
        );
    }
    let _n1 = beat(&gw, &uuid, "NEW000000001").await;
    let _n2 = beat(&gw, &uuid, "NEW000000002").await;
    let mut n3 = beat(&gw, &uuid, "NEW000000003").await;
    assert!(registered(&gw, &uuid, "NEW000000002").await);
    assert!(!registered(&gw, &uuid, "NEW000000003").await);
    // A second later there is room for one more, and the waiting device's next
    // heartbeat takes it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    n3.send(format!("beat;{uuid};NEW000000003;plc;0")).await;
    settle(&mut n3, &uuid).await;
    assert!(registered(&gw, &uuid, "NEW000000003").await);
}

#[actix_rt::test]
async fn only_stored_devices_register_when_enrollment_is_required() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.auth.devices = Devices::Registered).await;
    let uuid = gw.add_user("alice").await;
    gw.store_fleet(&uuid, 1).await;
    let _known = beat(&gw, &uuid, "000000000000").await;
    let _unknown = beat(&gw, &uuid, MAC).await;
    assert!(registered(&gw, &uuid, "000000000000").await);
    assert!(!registered(&gw, &uuid, MAC).await);
}

/// The device's events in the audit trail, oldest first: (what, address, why).
async fn device_story(gw: &TestGateway, mac: &str) -> Vec<(DeviceChange, String, String)> {
    // What the registry was told is passed on; then written.
    gw.hub.registry.send(AllLive).await.unwrap();
    while gw.hub.audit_writer.send(Flush).await.unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let filter = Filter {
        mac: Some(mac.into()),
        limit: 100,
        ..Filter::default()
    };
    let events = gw.store.audit_devices(&filter).await.unwrap();
    events
        .into_iter()
        .rev()
        .map(|e| (e.change, e.address, e.cause.unwrap_or_default()))
        .collect()
}

#[actix_rt::test]
async fn a_sniffed_heartbeat_takes_over_nothing_while_the_device_beats() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.auth.device_takeover = Takeover::WhenSilent).await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut tunnel = gw.tunnel(&uuid, MAC).await;

    // The attacker replays the device's heartbeat from another host: refused and
    // closed, not kept to ask again.
    let mut attacker = gw.connect_from(2).await;
    attacker.send(format!("beat;{uuid};{MAC};plc-1;0")).await;
    attacker.expect_closed().await;

    // The refusal is in the audit trail, with the attacker's address.
    let device_addr = device.stream.local_addr().unwrap().to_string();
    let attacker_addr = attacker.stream.local_addr().unwrap().to_string();
    assert_eq!(
        device_story(&gw, MAC).await,
        [
            (DeviceChange::Online, device_addr.clone(), String::new()),
            (
                DeviceChange::Refused,
                attacker_addr,
                format!("takeover refused: still beating from {device_addr}")
            ),
        ]
    );

    // The live tunnel is untouched, and the next engineer reaches the real device.
    tunnel.send(format!("data;{uuid};T;T;1;READ-1")).await;
    assert_eq!(device.bytes(6).await, b"READ-1");
    drop(tunnel);
    let mut engineer = gw.tunnel(&uuid, MAC).await;
    engineer
        .send(format!("data;{uuid};T;T;1;WRITE-COIL-42"))
        .await;
    assert_eq!(device.bytes(13).await, b"WRITE-COIL-42");

    // While it keeps beating, it keeps the device.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        device.send(format!("beat;{uuid};{MAC};plc-1;0")).await;
        let mut attacker = gw.connect_from(2).await;
        attacker.send(format!("beat;{uuid};{MAC};plc-1;0")).await;
        attacker.expect_closed().await;
    }
    engineer.send(format!("data;{uuid};T;T;1;STILL-MINE")).await;
    assert_eq!(device.bytes(10).await, b"STILL-MINE");

    // Once it falls silent past the online window, a new connection takes over.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let mut replacement = gw.connect().await;
    replacement.send(format!("beat;{uuid};{MAC};plc-1;0")).await;
    settle(&mut replacement, &uuid).await;
    device.expect_closed().await;
    let replacement_addr = replacement.stream.local_addr().unwrap().to_string();
    let story = device_story(&gw, MAC).await;
    assert_eq!(
        story[story.len() - 2..],
        [
            (
                DeviceChange::Offline,
                device_addr,
                format!("replaced by {replacement_addr}")
            ),
            (DeviceChange::Online, replacement_addr, String::new()),
        ]
    );
}

#[actix_rt::test]
async fn a_device_that_falls_silent_goes_offline_as_silent() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.limits.idle = Duration::from_secs(180)).await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let addr = device.stream.local_addr().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(181)).await;
    device.expect_closed().await;
    let closes = gw.device(&uuid, MAC, "plc-1").await;
    let closes_addr = closes.stream.local_addr().unwrap().to_string();
    drop(closes);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        device_story(&gw, MAC).await,
        [
            (DeviceChange::Online, addr.clone(), String::new()),
            (DeviceChange::Offline, addr, "silent".into()),
            (DeviceChange::Online, closes_addr.clone(), String::new()),
            (DeviceChange::Offline, closes_addr, "closed".into()),
        ]
    );
}

#[actix_rt::test]
async fn by_default_the_newest_connection_takes_over() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut old = gw.device(&uuid, MAC, "plc-1").await;
    let _new = beat(&gw, &uuid, MAC).await;
    old.expect_closed().await;
}

#[actix_rt::test]
async fn a_request_refused_for_its_transport_is_answered_then_closed() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.auth.clients = elfin_actors::tls::Clients::Tls).await;
    let uuid = gw.add_user("alice").await;
    let mut client = gw.connect().await;
    client.send(format!("query;{uuid}\n")).await;
    assert!(failed_reason(&client.line().await).contains("only over TLS"));
    client.expect_closed().await;
}

#[actix_rt::test]
async fn guessing_from_many_connections_of_one_address_is_paced_as_one() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| {
        c.limits.failed_lookups_per_min = 2;
        c.limits.failed_lookup_delay = Duration::from_secs(1);
    })
    .await;
    let started = Instant::now();
    let guesses = (0..6).map(|i| {
        let addr = gw.addr;
        async move {
            let mut guesser = Peer::connect(addr).await;
            guesser.send(format!("connme;guess-{i};{MAC}\n")).await;
            guesser.line().await;
            started.elapsed()
        }
    });
    let mut took = futures::future::join_all(guesses).await;
    took.sort();
    // Two free failures, then one answer a second, not four at once.
    assert!(took[1] < Duration::from_millis(100), "{took:?}");
    assert!(took[5] >= Duration::from_secs(4), "{took:?}");
}

#[actix_rt::test]
async fn a_flapping_device_costs_the_audit_trail_a_bounded_number_of_rows() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    // Twenty connections of one device, each replacing the one before (a flapping
    // modem, or someone replaying its heartbeat): 39 events.
    let mut last = None;
    for _ in 0..20 {
        last = Some(beat(&gw, &uuid, MAC).await);
    }
    let story = device_story(&gw, MAC).await;
    assert_eq!(story.len(), 30, "at most 30 a window");
    // The last connection falls silent (closed after `limits.idle`, still in the
    // full window: not recorded either). The next window records again, and says how
    // many were left out.
    tokio::time::sleep(Duration::from_secs(601)).await;
    last.unwrap().expect_closed().await;
    let _next = beat(&gw, &uuid, MAC).await;
    let story = device_story(&gw, MAC).await;
    assert_eq!(story.len(), 31);
    assert_eq!(
        (story[30].0, story[30].2.as_str()),
        (DeviceChange::Online, "10 earlier events not recorded")
    );
}

/// The registry's open contest for the device, if any.
async fn contest(gw: &TestGateway, uuid: &str) -> Option<elfin_actors::registry::Contest> {
    let key = DeviceKey::new(uuid, MAC);
    gw.hub
        .registry
        .send(elfin_actors::registry::ContestOf(key))
        .await
        .unwrap()
}

#[actix_rt::test]
async fn the_real_device_reconnecting_from_where_it_was_seen_wins_the_race_against_an_impostor() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.auth.device_takeover = Takeover::WhenSilent).await;
    let uuid = gw.add_user("alice").await;
    let device = gw.device(&uuid, MAC, "plc-1").await;
    let beat = format!("beat;{uuid};{MAC};plc-1;0");

    // An impostor from another host is refused and closed while the device beats.
    let mut impostor = gw.connect_from(2).await;
    impostor.send(&beat).await;
    impostor.expect_closed().await;

    // The device's connection drops (a NAT rebinding); before it is back, the
    // impostor tries again: the device was seen half a second ago, from elsewhere.
    drop(device);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!registered(&gw, &uuid, MAC).await, "its connection is gone");
    let mut impostor = gw.connect_from(2).await;
    impostor.send(&beat).await;
    impostor.expect_closed().await;
    assert!(
        !registered(&gw, &uuid, MAC).await,
        "the impostor did not take it"
    );

    // The real device, back from the address it was seen from, has its place at once.
    let mut device = gw.connect().await;
    device.send(&beat).await;
    assert_eq!(
        settle(&mut device, &uuid).await,
        "device NOSUCHDEVICE is offline"
    );
    assert!(registered(&gw, &uuid, MAC).await);
    let mut engineer = gw.tunnel(&uuid, MAC).await;
    engineer.send(format!("data;{uuid};T;T;1;MINE")).await;
    assert_eq!(device.bytes(4).await, b"MINE");

    // The impostor is seen: a contest with its address, and refusal records.
    let open = contest(&gw, &uuid).await.expect("contested");
    assert_eq!(open.claimants.len(), 1);
    assert_eq!(open.claimants[0].ip().to_string(), "127.0.0.2");
    let story = device_story(&gw, MAC).await;
    let refused = story
        .iter()
        .filter(|(change, ..)| *change == DeviceChange::Refused)
        .count();
    assert_eq!(refused, 2, "{story:?}");
}

#[actix_rt::test]
async fn a_device_whose_address_changes_while_an_impostor_beats_is_contested_not_handed_over() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.auth.device_takeover = Takeover::WhenSilent).await;
    let uuid = gw.add_user("alice").await;
    let device = gw.device(&uuid, MAC, "plc-1").await;
    let beat = format!("beat;{uuid};{MAC};plc-1;0");
    drop(device);
    // Within the window both the impostor (127.0.0.2) and the device from its new
    // address (127.0.0.3) are refused: neither is where it was seen.
    for from in [2, 3, 2, 3] {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let mut claimant = gw.connect_from(from).await;
        claimant.send(&beat).await;
        claimant.expect_closed().await;
    }
    assert!(!registered(&gw, &uuid, MAC).await);
    let open = contest(&gw, &uuid).await.expect("contested");
    let mut claimants: Vec<String> = open.claimants.iter().map(|c| c.ip().to_string()).collect();
    claimants.sort();
    assert_eq!(claimants, ["127.0.0.2", "127.0.0.3"]);
    // Once the device has been silent for the online window, a new address takes it.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let mut device = gw.connect_from(3).await;
    device.send(&beat).await;
    assert_eq!(
        settle(&mut device, &uuid).await,
        "device NOSUCHDEVICE is offline"
    );
    assert!(registered(&gw, &uuid, MAC).await);
    assert!(contest(&gw, &uuid).await.is_none(), "settled");
}

#[actix_rt::test]
async fn registered_devices_follow_the_database_added_and_removed() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.auth.devices = Devices::Registered).await;
    let uuid = gw.add_user("alice").await;
    gw.store_fleet(&uuid, 1).await;
    let stored = "000000000000";
    let mut device = gw.connect().await;
    device.send(format!("beat;{uuid};{stored};plc;0")).await;
    settle(&mut device, &uuid).await;
    assert!(registered(&gw, &uuid, stored).await);

    // A device not stored yet is refused; added by any writer, it is admitted within
    // 10 s without a restart (its connection asks again once a second).
    let mut newcomer = gw.connect().await;
    newcomer.send(format!("beat;{uuid};{MAC};plc;0")).await;
    settle(&mut newcomer, &uuid).await;
    assert!(!registered(&gw, &uuid, MAC).await);
    gw.store
        .record(&[common::sighting(&uuid, MAC, "plc", 0)])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    newcomer.send(format!("beat;{uuid};{MAC};plc;0")).await;
    settle(&mut newcomer, &uuid).await;
    assert!(
        registered(&gw, &uuid, MAC).await,
        "admitted without a restart"
    );

    // Removed from the database: closed within 10 s with a reason, refused after,
    // and its row is never written back by a sighting.
    let mut tunnel = gw.tunnel(&uuid, stored).await;
    assert!(gw.store.remove_device(stored).await.unwrap());
    device.send(format!("beat;{uuid};{stored};plc;0")).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    device.expect_closed().await;
    tunnel.expect_closed().await;
    assert!(!registered(&gw, &uuid, stored).await);
    let story = device_story(&gw, stored).await;
    let (_, _, why) = story.last().unwrap();
    assert!(why.contains("removed from the database"), "{story:?}");
    let again = beat(&gw, &uuid, stored).await;
    drop(again);
    assert!(
        !registered(&gw, &uuid, stored).await,
        "refused from then on"
    );
    while gw.hub.persistence.send(Flush).await.unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rows = gw.store.user_devices(&uuid).await.unwrap().unwrap();
    assert!(
        rows.iter().all(|d| d.mac != stored),
        "never written back: {rows:?}"
    );
}

#[actix_rt::test]
async fn a_user_removed_from_the_database_loses_its_devices_connections_within_seconds() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut tunnel = gw.tunnel(&uuid, MAC).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(gw.store.remove_user("alice").await.unwrap());
    tokio::time::sleep(Duration::from_secs(6)).await;
    device.expect_closed().await;
    tunnel.expect_closed().await;
    assert!(!registered(&gw, &uuid, MAC).await);
    let story = device_story(&gw, MAC).await;
    let (_, _, why) = story.last().unwrap();
    assert_eq!(why, "its user was removed from the database");
    // Refused from then on, as a user that does not exist.
    let again = beat(&gw, &uuid, MAC).await;
    drop(again);
    assert!(!registered(&gw, &uuid, MAC).await);
}
