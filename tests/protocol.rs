//! Protocol v1 end to end (docs/PROTOCOL.md), over real sockets against the real
//! binary: what devices, the desktop client and the web backend see.

mod common;

use std::time::Duration;

use common::{failed_reason, Gateway};

const MAC: &str = "F0FE6B2A1C3D";

fn all_bytes() -> Vec<u8> {
    (0..=255u8).collect()
}

#[test]
fn a_device_beat_without_terminator_shows_in_query() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let _device = gw.device(&uuid, MAC, "plc-1");
    let devices = gw.query(&uuid);
    let listed = devices.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    let entry = listed[0].as_object().unwrap();
    assert_eq!(
        entry.keys().collect::<Vec<_>>(),
        ["hostname", "macaddress", "lastseendate", "status"],
        "keys in protocol order"
    );
    assert_eq!(entry["hostname"], "plc-1");
    assert_eq!(entry["macaddress"], MAC);
    assert_eq!(entry["status"], "online");
    let date = entry["lastseendate"].as_str().unwrap();
    let budapest = chrono::Utc::now()
        .with_timezone(&chrono_tz::Europe::Budapest)
        .format("%Y. %m. %d. ")
        .to_string();
    assert!(
        date.starts_with(&budapest) && date.len() == "2024. 03. 12. 14:05:33".len(),
        "{date}"
    );
}

#[test]
fn query_reply_is_one_line_in_original_key_order() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let _device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.connect();
    client.send(format!("query;{uuid}").as_bytes());
    let line = client.line();
    assert!(
        line.starts_with(&format!(
            r#"[{{"hostname":"plc-1","macaddress":"{MAC}","lastseendate":""#
        )),
        "{line}"
    );
    assert!(line.ends_with(r#"","status":"online"}]"#), "{line}");
}

#[test]
fn query_for_an_unknown_user_is_an_empty_array() {
    let gw = Gateway::start(&[]);
    let mut client = gw.connect();
    client.send(b"query;no-such-user");
    assert_eq!(client.line(), "[]");
}

#[test]
fn a_device_goes_offline_after_the_online_window() {
    let gw = Gateway::start(&[("ELFIN__HEARTBEAT__ONLINE_WINDOW_SECS", "1")]);
    let uuid = gw.add_user("alice");
    let _device = gw.device(&uuid, MAC, "plc-1");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(gw.query(&uuid)[0]["status"], "offline");
}

#[test]
fn connme_tunnels_every_byte_value_both_ways() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.tunnel(&uuid, MAC);

    let mut frame = format!("data;{uuid};T5000;T5000;1;").into_bytes();
    frame.extend(all_bytes());
    client.send(&frame);
    assert_eq!(
        device.bytes(256),
        all_bytes(),
        "client -> device, header stripped"
    );

    let mut frame = format!("data;{uuid};{MAC};plc-1;0;").into_bytes();
    frame.extend(all_bytes());
    device.send(&frame);
    assert_eq!(
        client.bytes(256),
        all_bytes(),
        "device -> client, header stripped"
    );
}

#[test]
fn the_web_backend_connme_with_a_priority_field_gets_json() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut web = gw.connect();
    web.send(format!("connme;{uuid};{MAC};1").as_bytes());
    let reply: serde_json::Value = serde_json::from_str(&web.line()).unwrap();
    assert_eq!(reply["status"], "success");
    // Modbus request with a random connection id as mac and "Web Backend" as host.
    let modbus = [0x01, 0x03, 0x00, 0x00, 0x00, 0x0a, 0xc5, 0xcd];
    let mut frame = format!("data;{uuid};8f3a2c;Web Backend;1;").into_bytes();
    frame.extend(modbus);
    web.send(&frame);
    assert_eq!(device.bytes(8), modbus);
}

#[test]
fn two_device_frames_in_one_write_arrive_without_headers() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let device_header = format!("data;{uuid};{MAC};plc-1;0;");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.tunnel(&uuid, MAC);
    let write = [
        device_header.as_bytes(),
        b"first;\r\n\x00",
        device_header.as_bytes(),
        b"second",
    ]
    .concat();
    device.send(&write);
    assert_eq!(client.bytes(15), b"first;\r\n\x00second");
    client.expect_silence(Duration::from_millis(200));
}

#[test]
fn a_beat_and_a_data_frame_in_one_write() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.tunnel(&uuid, MAC);
    device.send(format!("beat;{uuid};{MAC};plc-1;0data;{uuid};{MAC};plc-1;0;payload").as_bytes());
    assert_eq!(client.bytes(7), b"payload");
    device.send(format!("data;{uuid};{MAC};plc-1;0;xbeat;{uuid};{MAC};plc-1;0").as_bytes());
    assert_eq!(client.bytes(1), b"x");
    client.expect_silence(Duration::from_millis(200));
}

#[test]
fn a_one_mib_frame_split_across_many_reads_arrives_whole_and_in_order() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.tunnel(&uuid, MAC);
    let payload: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let frame = [format!("data;{uuid};{MAC};plc-1;0;").as_bytes(), &payload].concat();
    let writer = std::thread::spawn(move || {
        for piece in frame.chunks(4096) {
            device.send(piece);
        }
        // The next frame right behind it still splits off.
        device.send(format!("data;{uuid};{MAC};plc-1;0;tail").as_bytes());
        device
    });
    assert!(
        client.bytes(payload.len()) == payload,
        "1 MiB payload corrupted"
    );
    assert_eq!(client.bytes(4), b"tail");
    writer.join().unwrap();
}

#[test]
fn line_terminated_control_messages_work() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.connect();
    client.send(format!("query;{uuid}\r\n").as_bytes());
    let devices: serde_json::Value = serde_json::from_str(&client.line()).unwrap();
    assert_eq!(devices[0]["macaddress"], MAC);
    client.send(format!("connme;{uuid};{MAC}\n").as_bytes());
    assert_eq!(client.line(), r#"{"status":"success"}"#);
    client.send(format!("data;{uuid};T1;T1;1;hi").as_bytes());
    assert_eq!(device.bytes(2), b"hi");
}

#[test]
fn connthem_tunnels_two_devices_of_one_user() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let mut a = gw.device(&uuid, "AAAAAAAAAAAA", "a");
    let mut b = gw.device(&uuid, "BBBBBBBBBBBB", "b");
    let mut requester = gw.connect();
    requester.send(format!("connthem;{uuid};AAAAAAAAAAAA;BBBBBBBBBBBB").as_bytes());
    assert_eq!(requester.line(), r#"{"status":"success"}"#);
    a.send(format!("data;{uuid};AAAAAAAAAAAA;a;0;to-b").as_bytes());
    assert_eq!(b.bytes(4), b"to-b");
    b.send(format!("data;{uuid};BBBBBBBBBBBB;b;0;to-a").as_bytes());
    assert_eq!(a.bytes(4), b"to-a");
    requester.expect_silence(Duration::from_millis(100));
}

#[test]
fn connme_failures_answer_failed_with_a_reason() {
    let gw = Gateway::start(&[]);
    let alice = gw.add_user("alice");
    let bob = gw.add_user("bob");
    let mut bobs_device = gw.device(&bob, MAC, "bob-plc");
    let mut client = gw.connect();
    for request in [
        format!("connme;{alice};000000000000"), // offline / unknown device
        format!("connme;{alice};{MAC}"),        // another user's device
        "connme;no-such-user;000000000000".to_owned(),
        format!("connme;{alice}"),             // too few fields
        format!("connme;{alice};{MAC};1;2"),   // too many fields
        format!("connme;;{MAC}"),              // empty uuid
        format!("connthem;{alice};{MAC}"),     // too few fields
        format!("connthem;{bob};{MAC};{MAC}"), // to itself
    ] {
        client.send(request.as_bytes());
        failed_reason(&client.line());
    }
    // The device itself asking for a tunnel to itself.
    bobs_device.send(format!("connme;{bob};{MAC}").as_bytes());
    assert!(failed_reason(&bobs_device.line()).contains("itself"));
}

#[test]
fn closing_either_side_removes_the_tunnel_and_nothing_else() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let client = gw.tunnel(&uuid, MAC);
    client.close();
    // The device stays connected; its data now goes nowhere.
    std::thread::sleep(Duration::from_millis(100));
    device.send(format!("data;{uuid};{MAC};plc-1;0;lost").as_bytes());
    device.expect_silence(Duration::from_millis(100));
    gw.wait_online(&uuid, MAC);
    // A new client can tunnel to it again.
    let mut client = gw.tunnel(&uuid, MAC);
    device.send(format!("data;{uuid};{MAC};plc-1;0;again").as_bytes());
    assert_eq!(client.bytes(5), b"again");
    // Closing the device side leaves the client connected.
    device.close();
    client.expect_silence(Duration::from_millis(200));
    client.send(format!("query;{uuid}").as_bytes());
    assert!(client.line().starts_with('['));
}

#[test]
fn a_second_connme_to_the_same_device_replaces_the_first_tunnel() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut first = gw.tunnel(&uuid, MAC);
    let mut second = gw.tunnel(&uuid, MAC);
    device.send(format!("data;{uuid};{MAC};plc-1;0;for-second").as_bytes());
    assert_eq!(second.bytes(10), b"for-second");
    first.expect_silence(Duration::from_millis(200));
    // The first client is still connected, just no longer tunnelled.
    first.send(format!("data;{uuid};T1;T1;1;ignored").as_bytes());
    second.send(format!("data;{uuid};T2;T2;1;ok").as_bytes());
    assert_eq!(device.bytes(2), b"ok");
    first.send(format!("query;{uuid}").as_bytes());
    assert!(first.line().starts_with('['));
}

#[test]
fn garbage_and_oversized_input_do_not_disturb_other_connections() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.tunnel(&uuid, MAC);

    let mut vandal = gw.connect();
    let garbage: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    let huge_header = [b"beat;".as_slice(), &vec![b'u'; 100_000]].concat();
    let flood = std::thread::spawn(move || {
        vandal.send(&garbage);
        vandal.send(&huge_header);
        vandal.send(b"what;ever\n\xff\xfe\x00");
        vandal.send(b"connme;\xff\xff;x");
        let reply = vandal.line();
        failed_reason(&reply);
        vandal
    });
    for i in 0..50 {
        let msg = format!("msg-{i:02}");
        device.send(format!("data;{uuid};{MAC};plc-1;0;{msg}").as_bytes());
        assert_eq!(client.bytes(6), msg.as_bytes());
    }
    let mut vandal = flood.join().unwrap();
    // The vandal's connection still works for well-formed messages.
    vandal.send(format!("query;{uuid}").as_bytes());
    assert!(vandal.line().starts_with("[{"));
}

#[test]
fn a_device_reconnecting_takes_over_its_registration() {
    let gw = Gateway::start(&[]);
    let uuid = gw.add_user("alice");
    let old = gw.device(&uuid, MAC, "plc-1");
    let mut new = gw.device(&uuid, MAC, "plc-1");
    old.close();
    std::thread::sleep(Duration::from_millis(100));
    let mut client = gw.tunnel(&uuid, MAC);
    new.send(format!("data;{uuid};{MAC};plc-1;0;new").as_bytes());
    assert_eq!(client.bytes(3), b"new");
}

#[test]
fn a_slow_tunnel_peer_does_not_grow_the_gateway_without_bound() {
    let gw = Gateway::start(&[("ELFIN__SERVER__TUNNEL_STALL_SECS", "1")]);
    let uuid = gw.add_user("alice");
    let device = gw.device(&uuid, MAC, "plc-1");
    let client = gw.tunnel(&uuid, MAC); // never reads
    let header = format!("data;{uuid};{MAC};plc-1;0;");
    let mut stream = device.raw().try_clone().unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let chunk = [header.as_bytes(), &vec![7u8; 60_000]].concat();
    // The gateway stops reading the device once the client's queue is full, so the
    // device's writes block; after the stall timeout the tunnel is dropped and the
    // gateway reads (and discards) again.
    let mut sent = 0usize;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        use std::io::Write;
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(
        sent > 50 << 20 || gw.log_contains("closing the tunnel"),
        "sent {sent}"
    );
    assert!(gw.log_contains("closing the tunnel"));
    drop(client);
}
