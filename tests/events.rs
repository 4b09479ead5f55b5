//! Fleet events, end to end: the gateway binary, devices on real sockets, and a
//! webhook receiver that verifies every delivery with the reference Standard
//! Webhooks library (`tests/webhooks/receiver.py`). The grace period is two
//! seconds here (`events.offline_after_secs`).

mod common;

use std::time::{Duration, Instant};

use common::webhooks::{Receiver, SECRET};
use common::{Binary, TIMEOUT};

const GRACE: &str = "2";
const PUMP: &str = "AABBCCDDEE01";
const METER: &str = "AABBCCDDEE02";

/// A gateway sending every event to `receiver`, with `extra` keys for its entry.
fn gateway(receiver: &Receiver, secret: &str, extra: &str, env: &[(&str, &str)]) -> Binary {
    let hooks = receiver.setting(secret, extra);
    let mut all = vec![
        ("ELFIN__EVENTS__OFFLINE_AFTER_SECS", GRACE),
        ("ELFIN__WEBHOOKS", hooks.as_str()),
    ];
    all.extend_from_slice(env);
    Binary::start(&all)
}

fn types(events: &[serde_json::Value], mac: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["data"]["mac"] == mac)
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_device_gone_for_the_grace_period_is_offline_then_back_online_and_a_flap_is_not() {
    let Some(receiver) = Receiver::start(SECRET, &[]) else {
        return;
    };
    let gateway = gateway(&receiver, SECRET, "", &[]);
    let uuid = gateway.add_user("alice");

    let pump = gateway.device(&uuid, PUMP, "heat-pump");
    let events = receiver.wait(TIMEOUT, |e| types(e, PUMP) == ["device.online"]);
    let online = &events[0];
    assert_eq!(online["data"]["user"]["name"], "alice");
    assert_eq!(
        online["data"]["user"]["uuid_prefix"],
        format!("{}…", &uuid[..8])
    );
    assert_eq!(online["data"]["host"], "heat-pump");
    assert!(online["data"]["source"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(
        !online.to_string().contains(&uuid),
        "the uuid is the user's secret"
    );

    // Flapping within the grace period: a reconnect, no outage.
    drop(pump);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        drop(gateway.device(&uuid, PUMP, "heat-pump"));
    }
    let pump = gateway.device(&uuid, PUMP, "heat-pump");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(receiver.types_of(PUMP), ["device.online"]);

    // Gone for good: one offline after the grace period, then back.
    let left = Instant::now();
    drop(pump);
    let events = receiver.wait(TIMEOUT, |e| types(e, PUMP).len() == 2);
    assert!(left.elapsed() >= Duration::from_secs(2));
    let offline = events
        .iter()
        .find(|e| e["type"] == "device.offline")
        .unwrap();
    assert_eq!(offline["data"]["host"], "heat-pump");
    assert!(offline["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("offline_after_secs"));
    std::thread::sleep(Duration::from_secs(1));
    let _pump = gateway.device(&uuid, PUMP, "heat-pump");
    let events = receiver.wait(TIMEOUT, |e| types(e, PUMP).len() == 3);
    assert_eq!(
        types(&events, PUMP),
        ["device.online", "device.offline", "device.back_online"]
    );
    let back = events
        .iter()
        .find(|e| e["type"] == "device.back_online")
        .unwrap();
    assert!(back["data"]["away_secs"].as_u64().unwrap() >= 3, "{back}");
    assert_eq!(
        gateway.metric("elfin_events_total{type=\"device.offline\"}"),
        1
    );
    assert_eq!(receiver.refused(), 0);
}

#[test]
fn events_wait_for_a_receiver_that_is_down_and_arrive_in_order_per_device() {
    let Some(mut receiver) = Receiver::start(SECRET, &[]) else {
        return;
    };
    receiver.stop();
    let gateway = gateway(&receiver, SECRET, "", &[]);
    let uuid = gateway.add_user("alice");
    // Both devices online, offline, back online while nobody answers.
    for mac in [PUMP, METER] {
        drop(gateway.device(&uuid, mac, "d"));
    }
    gateway.wait_log("event device.offline");
    std::thread::sleep(Duration::from_millis(500));
    let _devices: Vec<_> = [PUMP, METER]
        .iter()
        .map(|mac| gateway.device(&uuid, mac, "d"))
        .collect();
    gateway.wait_log("event device.back_online");
    assert!(gateway.log_contains("delivery failed"));
    // The status page shows the endpoint waiting.
    let status = gateway.get("/api/status").json();
    let webhook = &status["webhooks"][0];
    assert!(webhook["queued"].as_u64().unwrap() >= 1, "{webhook}");
    assert!(webhook["last_error"].as_str().is_some(), "{webhook}");
    assert_eq!(webhook["delivered"], 0);

    receiver.restart();
    let events = receiver.wait(Duration::from_secs(40), |e| e.len() == 6);
    for mac in [PUMP, METER] {
        assert_eq!(
            types(&events, mac),
            ["device.online", "device.offline", "device.back_online"]
        );
    }
    let endpoint = format!("127.0.0.1:{}", receiver.port);
    assert_eq!(
        gateway.metric(&format!(
            "elfin_webhook_delivered_total{{endpoint=\"{endpoint}\"}}"
        )),
        6
    );
    assert!(
        gateway.metric(&format!(
            "elfin_webhook_retries_total{{endpoint=\"{endpoint}\"}}"
        )) > 0
    );
    gateway.wait_log("delivering again");
    let status = gateway.get("/api/status").json();
    assert_eq!(status["webhooks"][0]["delivered"], 6);
    assert_eq!(status["webhooks"][0]["queued"], 0);
}

#[test]
fn a_receiver_that_fails_forever_fills_a_bounded_queue_and_drops_are_counted() {
    let Some(receiver) = Receiver::start(SECRET, &["--status", "500"]) else {
        return;
    };
    let gateway = gateway(&receiver, SECRET, "queue = 2", &[]);
    let uuid = gateway.add_user("alice");
    let _devices: Vec<_> = (0..6)
        .map(|i| gateway.device(&uuid, &format!("AABBCCDDEE1{i}"), "d"))
        .collect();
    gateway.wait_log("dropping new ones");
    let endpoint = format!("127.0.0.1:{}", receiver.port);
    let dropped =
        format!("elfin_webhook_dropped_total{{endpoint=\"{endpoint}\",reason=\"queue_full\"}}");
    common::eventually(|| gateway.metric(&dropped), |n| *n >= 3);
    // The receiver verified what it got (and answered 500): the first event, over
    // and over; none of the others got past the queue.
    assert!(!receiver.events().is_empty());
    assert_eq!(receiver.refused(), 0);
    assert_eq!(gateway.log_count("dropping new ones"), 1, "said once");
    let depth = format!("elfin_webhook_queue_depth{{endpoint=\"{endpoint}\"}}");
    assert!(gateway.metric(&depth) <= 2);
}

#[test]
fn a_wrong_secret_is_refused_by_the_verifier() {
    let Some(receiver) = Receiver::start(SECRET, &[]) else {
        return;
    };
    let other = "whsec_c2VjcmV0LW9mLWFub3RoZXItZ2F0ZXdheS0xMjM0NTY=";
    let gateway = gateway(&receiver, other, "", &[]);
    let uuid = gateway.add_user("alice");
    let _pump = gateway.device(&uuid, PUMP, "heat-pump");
    common::eventually(|| receiver.refused(), |n| *n >= 1);
    assert!(receiver.events().is_empty());
}

#[test]
fn a_slow_receiver_slows_no_tunnel() {
    let Some(receiver) = Receiver::start(SECRET, &["--delay", "2"]) else {
        return;
    };
    let gateway = gateway(&receiver, SECRET, "", &[]);
    let uuid = gateway.add_user("alice");
    let mut device = gateway.device(&uuid, PUMP, "heat-pump");
    // Events keep the receiver busy for a while.
    let _others: Vec<_> = (0..5)
        .map(|i| gateway.device(&uuid, &format!("AABBCCDDEE2{i}"), "d"))
        .collect();
    let mut client = gateway.tunnel(&uuid, PUMP);
    let mut slowest = Duration::ZERO;
    for i in 0..50u8 {
        let started = Instant::now();
        client.send(&[format!("data;{uuid};T;T;1;").as_bytes(), &[i; 16]].concat());
        assert_eq!(device.bytes(16), [i; 16]);
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a tunnel round took {slowest:?} while the receiver was slow"
    );
    assert!(receiver.events().len() < 6, "deliveries were still waiting");
}

#[test]
fn an_unregistered_device_is_told_once_a_minute_not_per_message() {
    let Some(receiver) = Receiver::start(SECRET, &[]) else {
        return;
    };
    let gateway = gateway(
        &receiver,
        SECRET,
        "",
        &[("ELFIN__AUTH__DEVICES", "registered")],
    );
    let uuid = gateway.add_user("alice");
    for _ in 0..3 {
        let mut stranger = gateway.connect();
        stranger.send(format!("beat;{uuid};{PUMP};intruder;0").as_bytes());
        std::thread::sleep(Duration::from_millis(300));
    }
    let events = receiver.wait(TIMEOUT, |e| !e.is_empty());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        types(&receiver.events(), PUMP),
        ["device.enrollment_refused"]
    );
    assert!(events[0]["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("registered"));
}

#[test]
fn events_test_sends_a_signed_sample_and_names_a_wrong_secret() {
    let Some(receiver) = Receiver::start(SECRET, &[]) else {
        return;
    };
    let gateway = Binary::start(&[]);
    let out = gateway.cli(&["events", "test", &receiver.url(), "--secret", SECRET]);
    assert!(
        out.contains("took a signed sample device.offline event"),
        "{out}"
    );
    let events = receiver.wait(TIMEOUT, |e| e.len() == 1);
    assert_eq!(events[0]["type"], "device.offline");

    let other = "whsec_c2VjcmV0LW9mLWFub3RoZXItZ2F0ZXdheS0xMjM0NTY=";
    let (code, err) = gateway.cli_fails(&["events", "test", &receiver.url(), "--secret", other]);
    assert_eq!(code, 1);
    assert!(err.contains("400"), "{err}");
    let (_, err) =
        gateway.cli_fails(&["events", "test", "http://10.1.2.3/hook", "--secret", SECRET]);
    assert!(err.contains("use https"), "{err}");
    let secret = gateway.cli(&["events", "secret"]);
    assert!(secret.trim().starts_with("whsec_"));
}

#[test]
fn a_webhook_without_a_proper_secret_stops_the_gateway_naming_the_entry() {
    for (entry, named) in [
        (
            r#"[{url = "http://127.0.0.1:9/x", secret = "hunter2"}]"#,
            "webhooks[0].secret",
        ),
        (
            r#"[{url = "http://10.0.0.9/x", secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]"#,
            "webhooks[0].url",
        ),
        (
            r#"[{url = "http://127.0.0.1:9/x", secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", events = ["device.gone"]}]"#,
            "webhooks[0].events",
        ),
        (
            r#"[{url = "http://127.0.0.1:9/x", secrets = "x"}]"#,
            "secrets",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_elfin-gateway"))
            .current_dir(dir.path())
            .env("ELFIN__WEBHOOKS", entry)
            .args(["user", "list"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{entry}: {err}");
        assert!(err.contains(named), "{entry}: {err}");
    }
}

#[test]
fn a_claim_from_elsewhere_is_told_as_a_contest_and_a_refused_takeover() {
    let Some(receiver) = Receiver::start(SECRET, &[]) else {
        return;
    };
    let gateway = gateway(
        &receiver,
        SECRET,
        "events = [\"device.contested\", \"device.takeover_refused\"]",
        &[("ELFIN__AUTH__DEVICE_TAKEOVER", "when-silent")],
    );
    let uuid = gateway.add_user("alice");
    let _pump = gateway.device(&uuid, PUMP, "heat-pump");
    for _ in 0..3 {
        let mut impostor = gateway.connect_from(2);
        impostor.send(format!("beat;{uuid};{PUMP};heat-pump;0").as_bytes());
        impostor.expect_closed();
    }
    let events = receiver.wait(TIMEOUT, |e| e.len() >= 2);
    std::thread::sleep(Duration::from_millis(500));
    let mut said = types(&receiver.events(), PUMP);
    said.sort();
    assert_eq!(
        said,
        ["device.contested", "device.takeover_refused"],
        "once each"
    );
    let contested = events
        .iter()
        .find(|e| e["type"] == "device.contested")
        .unwrap();
    assert!(contested["data"]["source"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.2:"));
    assert!(contested["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("127.0.0.1"));
}

#[test]
fn a_clean_shutdown_delivers_the_events_already_decided() {
    let Some(receiver) = Receiver::start(SECRET, &["--delay", "0.5"]) else {
        return;
    };
    let mut gateway = gateway(&receiver, SECRET, "", &[]);
    let uuid = gateway.add_user("alice");
    let _devices: Vec<_> = (0..4)
        .map(|i| gateway.device(&uuid, &format!("AABBCCDDEE3{i}"), "d"))
        .collect();
    gateway.wait_log("event device.online: AABBCCDDEE33");
    assert!(receiver.events().len() < 4, "still being delivered");
    assert!(gateway.stop().success());
    assert_eq!(receiver.events().len(), 4, "every event decided went out");
}

#[test]
fn https_receivers_are_verified_against_the_configured_ca_or_the_system_s() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let (cert_arg, key_arg) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let Some(receiver) = Receiver::start(SECRET, &["--tls", &cert_arg, &key_arg]) else {
        return;
    };
    // One entry trusts the receiver's certificate; the other only the system's CAs.
    let url = format!("https://localhost:{}/hook", receiver.port);
    let hooks = format!(
        "[{{url = \"{url}\", secret = \"{SECRET}\", name = \"trusted\", ca_file = \"{cert_arg}\"}}, \
          {{url = \"{url}\", secret = \"{SECRET}\", name = \"system\"}}]"
    );
    let gateway = Binary::start(&[("ELFIN__WEBHOOKS", &hooks)]);
    let uuid = gateway.add_user("alice");
    let _pump = gateway.device(&uuid, PUMP, "heat-pump");
    receiver.wait(TIMEOUT, |e| e.len() == 1);
    common::eventually(
        || gateway.metric("elfin_webhook_retries_total{endpoint=\"system\"}"),
        |n| *n >= 1,
    );
    common::eventually(
        || gateway.metric("elfin_webhook_delivered_total{endpoint=\"trusted\"}"),
        |n| *n == 1,
    );
    assert_eq!(
        gateway.metric("elfin_webhook_delivered_total{endpoint=\"system\"}"),
        0
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        receiver.events().len(),
        1,
        "the unverified endpoint delivered nothing"
    );
    let status = gateway.get("/api/status").json();
    let system = &status["webhooks"][1];
    assert!(
        system["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("certificate"),
        "{system}"
    );
}

#[test]
fn a_receiver_that_never_answers_times_out_and_is_retried_without_holding_a_tunnel() {
    let Some(receiver) = Receiver::start(SECRET, &["--delay", "30"]) else {
        return;
    };
    let gateway = gateway(&receiver, SECRET, "timeout_secs = 1", &[]);
    let uuid = gateway.add_user("alice");
    let mut device = gateway.device(&uuid, PUMP, "heat-pump");
    let endpoint = format!("127.0.0.1:{}", receiver.port);
    let retries = format!("elfin_webhook_retries_total{{endpoint=\"{endpoint}\"}}");
    common::eventually(|| gateway.metric(&retries), |n| *n >= 1);
    let status = gateway.get("/api/status").json();
    let error = status["webhooks"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        error.contains("timeout") || error.contains("timed out"),
        "{error}"
    );
    // Meanwhile the device's tunnel carries its bytes at once.
    let mut client = gateway.tunnel(&uuid, PUMP);
    let started = Instant::now();
    client.send(&[format!("data;{uuid};T;T;1;").as_bytes(), b"ping"].concat());
    assert_eq!(device.bytes(4), b"ping");
    assert!(started.elapsed() < Duration::from_millis(500));
}
