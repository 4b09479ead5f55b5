//! Protocol v1 (docs/PROTOCOL.md §2, §3, §6) end to end over real sockets, with the
//! gateway in-process on a paused clock: what devices, the desktop client and the web
//! backend see.

mod common;

use std::time::Duration;

use common::{failed_reason, TestGateway};
use elfin_actors::store::Directory;

const MAC: &str = "F0FE6B2A1C3D";

fn all_bytes() -> Vec<u8> {
    (0..=255u8).collect()
}

#[actix_rt::test]
async fn a_device_beat_without_terminator_shows_in_query() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let _device = gw.device(&uuid, MAC, "plc-1").await;
    let devices = gw.query(&uuid).await;
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
    assert_eq!(date.len(), "2024. 03. 12. 14:05:33".len(), "{date}");
    assert_eq!(&date[4..6], ". ", "{date}");
}

#[actix_rt::test]
async fn query_reply_is_one_line_in_original_key_order() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let _device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.connect().await;
    client.send(format!("query;{uuid}")).await;
    let line = client.line().await;
    assert!(
        line.starts_with(&format!(
            r#"[{{"hostname":"plc-1","macaddress":"{MAC}","lastseendate":""#
        )),
        "{line}"
    );
    assert!(line.ends_with(r#"","status":"online"}]"#), "{line}");
}

#[actix_rt::test]
async fn query_for_an_unknown_user_is_an_empty_array() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let mut client = gw.connect().await;
    client.send("query;no-such-user").await;
    assert_eq!(client.line().await, "[]");
}

#[actix_rt::test]
async fn a_device_goes_offline_after_the_online_window() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.heartbeat.online_window = Duration::from_secs(60)).await;
    let uuid = gw.add_user("alice").await;
    let _device = gw.device(&uuid, MAC, "plc-1").await;
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(gw.query(&uuid).await[0]["status"], "online");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gw.query(&uuid).await[0]["status"], "offline");
}

#[actix_rt::test]
async fn connme_tunnels_every_byte_value_both_ways() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;

    let frame = [
        format!("data;{uuid};T5000;T5000;1;").as_bytes(),
        &all_bytes(),
    ]
    .concat();
    client.send(&frame).await;
    assert_eq!(
        device.bytes(256).await,
        all_bytes(),
        "client -> device, header stripped"
    );

    let frame = [
        format!("data;{uuid};{MAC};plc-1;0;").as_bytes(),
        &all_bytes(),
    ]
    .concat();
    device.send(&frame).await;
    assert_eq!(
        client.bytes(256).await,
        all_bytes(),
        "device -> client, header stripped"
    );
}

#[actix_rt::test]
async fn the_web_backend_connme_with_a_priority_field_gets_json() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut web = gw.connect().await;
    web.send(format!("connme;{uuid};{MAC};1")).await;
    let reply: serde_json::Value = serde_json::from_str(&web.line().await).unwrap();
    assert_eq!(reply["status"], "success");
    // Modbus request with a random connection id as mac and "Web Backend" as host.
    let modbus = [0x01, 0x03, 0x00, 0x00, 0x00, 0x0a, 0xc5, 0xcd];
    let frame = [
        format!("data;{uuid};8f3a2c;Web Backend;1;").as_bytes(),
        &modbus,
    ]
    .concat();
    web.send(&frame).await;
    assert_eq!(device.bytes(8).await, modbus);
}

#[actix_rt::test]
async fn two_device_frames_in_one_write_arrive_without_headers() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let header = format!("data;{uuid};{MAC};plc-1;0;");
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    let write = [
        header.as_bytes(),
        b"first;\r\n\x00",
        header.as_bytes(),
        b"second",
    ]
    .concat();
    device.send(&write).await;
    assert_eq!(client.bytes(15).await, b"first;\r\n\x00second");
    client.expect_silence(Duration::from_millis(200)).await;
}

#[actix_rt::test]
async fn a_beat_and_a_data_frame_in_one_write() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    device
        .send(format!(
            "beat;{uuid};{MAC};plc-1;0data;{uuid};{MAC};plc-1;0;payload"
        ))
        .await;
    assert_eq!(client.bytes(7).await, b"payload");
    device
        .send(format!(
            "data;{uuid};{MAC};plc-1;0;xbeat;{uuid};{MAC};plc-1;0"
        ))
        .await;
    assert_eq!(client.bytes(1).await, b"x");
    client.expect_silence(Duration::from_millis(200)).await;
}

#[actix_rt::test]
async fn a_one_mib_frame_split_across_many_reads_arrives_whole_and_in_order() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;
    let payload: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let frame = [format!("data;{uuid};{MAC};plc-1;0;").as_bytes(), &payload].concat();
    let tail = format!("data;{uuid};{MAC};plc-1;0;tail");
    let writer = actix_rt::spawn(async move {
        for piece in frame.chunks(4096) {
            device.send(piece).await;
        }
        // The next frame right behind it still splits off.
        device.send(tail).await;
        device
    });
    assert!(
        client.bytes(payload.len()).await == payload,
        "1 MiB payload corrupted"
    );
    assert_eq!(client.bytes(4).await, b"tail");
    writer.await.unwrap();
}

#[actix_rt::test]
async fn line_terminated_control_messages_work() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.connect().await;
    client.send(format!("query;{uuid}\r\n")).await;
    let devices: serde_json::Value = serde_json::from_str(&client.line().await).unwrap();
    assert_eq!(devices[0]["macaddress"], MAC);
    client.send(format!("connme;{uuid};{MAC}\n")).await;
    assert_eq!(client.line().await, r#"{"status":"success"}"#);
    client.send(format!("data;{uuid};T1;T1;1;hi")).await;
    assert_eq!(device.bytes(2).await, b"hi");
}

#[actix_rt::test]
async fn connthem_tunnels_two_devices_of_one_user() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut a = gw.device(&uuid, "AAAAAAAAAAAA", "a").await;
    let mut b = gw.device(&uuid, "BBBBBBBBBBBB", "b").await;
    let mut requester = gw.connect().await;
    requester
        .send(format!("connthem;{uuid};AAAAAAAAAAAA;BBBBBBBBBBBB"))
        .await;
    assert_eq!(requester.line().await, r#"{"status":"success"}"#);
    a.send(format!("data;{uuid};AAAAAAAAAAAA;a;0;to-b")).await;
    assert_eq!(b.bytes(4).await, b"to-b");
    b.send(format!("data;{uuid};BBBBBBBBBBBB;b;0;to-a")).await;
    assert_eq!(a.bytes(4).await, b"to-a");
    requester.expect_silence(Duration::from_millis(100)).await;
}

#[actix_rt::test]
async fn failed_requests_answer_failed_with_a_reason() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let alice = gw.add_user("alice").await;
    let bob = gw.add_user("bob").await;
    let mut bobs_device = gw.device(&bob, MAC, "bob-plc").await;
    let mut client = gw.connect().await;
    for (request, reason) in [
        (format!("connme;{alice};000000000000"), "offline"),
        (format!("connme;{alice};{MAC}"), "offline"), // another user's device
        ("connme;no-such-user;000000000000".to_owned(), "offline"),
        (format!("connme;{alice}"), "expected connme"),
        (format!("connme;{alice};{MAC};1;2"), "expected connme"),
        (format!("connme;;{MAC}"), "empty"),
        (format!("connthem;{alice};{MAC}"), "expected connthem"),
        (format!("connthem;{bob};{MAC};{MAC}"), "itself"),
        (format!("query;{alice};x"), "expected query"),
    ] {
        client.send(request.as_bytes()).await;
        let got = failed_reason(&client.line().await);
        assert!(got.contains(reason), "{request}: {got}");
    }
    client.send(b"connme;\xff\xfe;x").await;
    assert!(failed_reason(&client.line().await).contains("UTF-8"));
    // The device itself asking for a tunnel to itself.
    bobs_device.send(format!("connme;{bob};{MAC}")).await;
    assert!(failed_reason(&bobs_device.line().await).contains("itself"));
}

#[actix_rt::test]
async fn garbage_and_oversized_input_do_not_disturb_other_connections() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = gw.tunnel(&uuid, MAC).await;

    let mut vandal = gw.connect().await;
    let garbage: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    let huge_header = [b"beat;".as_slice(), &vec![b'u'; 100_000]].concat();
    let flood = actix_rt::spawn(async move {
        vandal.send(&garbage).await;
        vandal.send(&huge_header).await;
        vandal.send(b"what;ever\n\xff\xfe\x00").await;
        vandal.send(b"connme;\xff\xff;x").await;
        failed_reason(&vandal.line().await);
        vandal
    });
    for i in 0..50 {
        let msg = format!("msg-{i:02}");
        device
            .send(format!("data;{uuid};{MAC};plc-1;0;{msg}"))
            .await;
        assert_eq!(client.bytes(6).await, msg.as_bytes());
    }
    let mut vandal = flood.await.unwrap();
    // The vandal's connection still works for well-formed messages.
    vandal.send(format!("query;{uuid}")).await;
    assert!(vandal.line().await.starts_with("[{"));
}

#[actix_rt::test]
async fn unknown_users_are_refused_when_required() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let mut device = gw.connect().await;
    device.send(format!("beat;stranger;{MAC};plc;0")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut client = gw.connect().await;
    client.send(format!("connme;stranger;{MAC}")).await;
    // The same answer as for an offline device: a guessed uuid learns nothing.
    assert_eq!(
        failed_reason(&client.line().await),
        format!("device {MAC} is offline")
    );
    assert_eq!(gw.query("stranger").await, serde_json::json!([]));
}

#[actix_rt::test]
async fn verbose_reasons_tell_an_unknown_user_from_an_offline_device() {
    tokio::time::pause();
    let gw = TestGateway::start_with(|c| c.auth.verbose_reasons = true).await;
    let alice = gw.add_user("alice").await;
    let mut client = gw.connect().await;
    client.send(format!("connme;stranger;{MAC}")).await;
    assert_eq!(failed_reason(&client.line().await), "unknown user");
    client.send(format!("connme;{alice};{MAC}")).await;
    assert_eq!(
        failed_reason(&client.line().await),
        format!("device {MAC} is offline")
    );
}

#[actix_rt::test]
async fn unknown_users_may_tunnel_when_allowed_but_nothing_is_stored() {
    tokio::time::pause();
    let mut gw = TestGateway::start_with(|c| c.auth.require_known_user = false).await;
    let mut device = gw.device("stranger", MAC, "plc").await;
    let mut client = gw.tunnel("stranger", MAC).await;
    device
        .send(format!("data;stranger;{MAC};plc;0;hello"))
        .await;
    assert_eq!(client.bytes(5).await, b"hello");
    gw.stop().await.unwrap();
    assert!(gw.store.devices(None).await.unwrap().is_empty());
}

#[actix_rt::test]
async fn a_user_added_while_running_is_accepted_within_a_second() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    // Before the user exists, its device is ignored and queries are empty.
    let mut early = gw.connect().await;
    early.send(format!("beat;late-user;{MAC};plc;0")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.query("late-user").await, serde_json::json!([]));

    gw.store.add_user("late", "late-user").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await; // the negative cache lasts 1 s
    early.send(format!("beat;late-user;{MAC};plc;0")).await;
    gw.wait_online("late-user", MAC).await;
    let _client = gw.tunnel("late-user", MAC).await;
}

#[actix_rt::test]
async fn a_device_that_only_streams_data_is_stored_at_its_first_frame() {
    tokio::time::pause();
    let gw = TestGateway::start().await;
    let uuid = gw.add_user("alice").await;
    let mut meter = gw.connect().await;
    meter
        .send(format!("data;{uuid};{MAC};meter;0;\x01\x02"))
        .await;
    gw.wait_online(&uuid, MAC).await;
    // Within a batch, not after the debouncer's first timer (30 s).
    let mut stored = Vec::new();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stored = gw
            .store
            .user_devices(&uuid)
            .await
            .unwrap()
            .unwrap_or_default();
        if !stored.is_empty() {
            break;
        }
    }
    assert_eq!(stored.len(), 1, "written at its first frame");
    assert_eq!(stored[0].mac, MAC);
    assert_eq!(stored[0].host, "meter");
}
