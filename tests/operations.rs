//! The operator's view on the real binary: finding a device among 20 000 at
//! `/api/devices`, a device's own page data, and the audit trail of tunnels and
//! devices, from `elfin-gateway audit` and `/api/audit`, complete after a SIGTERM.
//! The pages in a real browser are `tests/status_page.rs`.

mod common;

use std::time::Instant;

use common::{eventually, Binary};
use serde_json::Value;

const MAC: &str = "F0FE6B2A1C3D";

fn macs(page: &Value) -> Vec<String> {
    page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["mac"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_device_among_twenty_thousand_is_found_by_any_of_its_names_and_pages_stay_small() {
    let gw = Binary::start(&[]);
    let alice = gw.add_user("alice");
    let bob = gw.add_user("bob");
    gw.store_devices(
        &alice,
        (0..20_000).map(|i| (format!("AC{i:010X}"), format!("meter-{i:05}"))),
    );
    gw.store_devices(
        &bob,
        (0..5).map(|i| (format!("B0{i:010X}"), format!("pump-{i}"))),
    );
    let _live = gw.device(&bob, MAC, "heat-pump-7");

    let all = eventually(|| gw.get("/api/devices").json(), |p| p["total"] == 20_006);
    assert_eq!(all["per_page"], 50);
    assert_eq!(all["pages"], 401);
    assert_eq!(macs(&all)[0], MAC, "online first");
    assert_eq!(macs(&all)[1], "AC0000000000", "then by host name");

    let started = Instant::now();
    let by_mac = gw.get("/api/devices?q=ac00000030d4").json();
    eprintln!("search among 20 006 devices: {:?}", started.elapsed());
    assert_eq!(macs(&by_mac), ["AC00000030D4"], "any case");
    assert_eq!(by_mac["devices"][0]["host"], "meter-12500");
    assert_eq!(by_mac["devices"][0]["user"], "alice");
    let by_host = gw.get("/api/devices?q=METER-1250").json();
    assert_eq!(by_host["total"], 10);
    let by_user = gw.get("/api/devices?q=bob").json();
    assert_eq!(by_user["total"], 6);
    let by_address = gw.get("/api/devices?q=127.0.0.1").json();
    assert_eq!(macs(&by_address), [MAC]);
    let online = gw.get("/api/devices?status=online").json();
    assert_eq!(macs(&online), [MAC]);
    let offline_of_bob = gw.get("/api/devices?status=offline&user=bob").json();
    assert_eq!(offline_of_bob["total"], 5);
    assert!(offline_of_bob["devices"][0]["host"] == "pump-0");
    let nothing = gw.get("/api/devices?q=no-such-device").json();
    assert_eq!(
        (nothing["total"].clone(), nothing["pages"].clone()),
        (0.into(), 1.into())
    );

    // Paging: the pages are disjoint and in order; a page is a few tens of KiB.
    let second = gw.get("/api/devices?page=2&per_page=100").json();
    let third = gw.get("/api/devices?page=3&per_page=100").json();
    assert_eq!(
        (second["page"].clone(), second["pages"].clone()),
        (2.into(), 201.into())
    );
    assert_eq!(macs(&second).len(), 100);
    assert!(macs(&second).last() < macs(&third).first());
    let biggest = gw.get("/api/devices?per_page=100000");
    assert_eq!(biggest.json()["per_page"], 200, "clamped");
    assert!(
        biggest.body.len() < 64 * 1024,
        "{} bytes",
        biggest.body.len()
    );
    let past_the_end = gw.get("/api/devices?page=9999").json();
    assert_eq!(past_the_end["page"], 401);
    assert!(!biggest.body.contains(&alice) && !all.to_string().contains(&bob));

    // A device's own page: its connection and its coming online.
    let detail = eventually(
        || gw.get(&format!("/api/devices/{MAC}")).json(),
        |d| d["events"].as_array().is_some_and(|e| !e.is_empty()),
    );
    assert_eq!(detail["device"]["online"], true);
    assert_eq!(detail["device"]["user"], "bob");
    assert!(detail["device"]["connected_from"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(detail["events"][0]["event"], "online");
    assert_eq!(gw.get("/api/devices/000000000000").status, 404);
    let stored = gw.get("/api/devices/AC00000030D4").json();
    assert_eq!(stored["device"]["online"], false);
}

/// `elfin-gateway audit --json` lines of one kind (`tunnel` or `device_event`).
fn trail(gw: &Binary, args: &[&str], kind: &str) -> Vec<Value> {
    let mut all = vec!["audit", "--json"];
    all.extend_from_slice(args);
    gw.cli(&all)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get(kind).cloned())
        .collect()
}

#[test]
fn every_tunnel_and_device_event_is_in_the_audit_trail_even_after_a_sigterm() {
    let mut gw = Binary::start(&[("ELFIN__QUERY__TIME_ZONE", "UTC")]);
    let alice = gw.add_user("alice");
    let bob = gw.add_user("bob");
    let mut device = gw.device(&alice, MAC, "plc-1");

    // A tunnel that carries bytes both ways and is closed by its client.
    let mut client = gw.tunnel(&alice, MAC);
    client.send(&[format!("data;{alice};T;T;1;").as_bytes(), &[7u8; 1000]].concat());
    device.bytes(1000);
    device.send(
        &[
            format!("data;{alice};{MAC};plc-1;0;").as_bytes(),
            &[9u8; 300],
        ]
        .concat(),
    );
    client.bytes(300);
    let client_addr = client.raw().local_addr().unwrap().to_string();
    client.close();
    gw.wait_log("tunnel 1 closed by client");

    // The device reconnects: its old connection is replaced.
    let mut replacement = gw.device(&alice, MAC, "plc-1");
    drop(device);
    let new_addr = replacement.raw().local_addr().unwrap().to_string();
    // Another user's device, and a tunnel left open when the gateway stops.
    let _other = gw.device(&bob, "B0B0B0B0B0B0", "pump");
    let _open = gw.tunnel(&alice, MAC);
    replacement.send(format!("beat;{alice};{MAC};plc-1;0").as_bytes());

    // The API serves the trail while the gateway runs, paged.
    let page = eventually(
        || gw.get("/api/audit?kind=devices&per_page=2").json(),
        |p| p["more"] == true,
    );
    assert_eq!(page["rows"].as_array().unwrap().len(), 2);
    let tunnels = eventually(
        || gw.get(&format!("/api/audit?device={MAC}")).json(),
        |p| p["rows"].as_array().is_some_and(|r| r.len() == 2),
    );
    let closed = &tunnels["rows"][1];
    assert_eq!(closed["user"], "alice");
    assert_eq!(closed["client_address"], client_addr);
    assert_eq!(closed["cause"], "client closed");
    assert_eq!(closed["bytes_to_device"], 1000);
    assert_eq!(closed["bytes_from_device"], 300);
    assert!(!tunnels.to_string().contains(&alice), "no whole uuid");
    assert_eq!(
        gw.get("/api/audit?user=nobody").json()["rows"],
        serde_json::json!([])
    );
    assert_eq!(gw.get("/api/audit?since=yesterday").status, 400);
    assert_eq!(gw.get("/api/audit?kind=everything").status, 400);

    assert!(gw.stop().success());

    // After the SIGTERM, everything is in the store.
    let tunnels = trail(&gw, &["--device", MAC], "tunnel");
    assert_eq!(tunnels.len(), 2, "{tunnels:?}");
    let (open, closed) = (&tunnels[0], &tunnels[1]);
    assert_eq!(open["cause"], "gateway shut down");
    assert!(open["seconds"].is_u64());
    let utc = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert!(utc(&open["closed_utc"]) >= utc(&open["opened_utc"]));
    assert_eq!(closed["cause"], "client closed");
    assert_eq!(closed["device"], MAC);
    assert_eq!(closed["node"], tunnels[0]["node"]);
    assert!(closed["device_address"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));

    let events = trail(&gw, &["--device", MAC], "device_event");
    let story: Vec<(String, String)> = events
        .iter()
        .rev()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["cause"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("online", String::new()),
        ("offline", format!("replaced by {new_addr}")),
        ("online", String::new()),
        ("offline", "gateway shut down".to_owned()),
    ]
    .into_iter()
    .map(|(e, c)| (e.to_owned(), c))
    .collect();
    assert_eq!(story, expected);

    // Filters: by user, by age; the table form names the columns.
    assert_eq!(trail(&gw, &["--user", "bob"], "tunnel").len(), 0);
    assert_eq!(trail(&gw, &["--user", "bob"], "device_event").len(), 2);
    assert_eq!(trail(&gw, &["--since", "1h"], "tunnel").len(), 2);
    let table = gw.cli(&["audit", "--user", "alice", "--since", "24h"]);
    assert!(
        table.contains("TUNNELS (2)") && table.contains("DEVICE EVENTS (4)"),
        "{table}"
    );
    assert!(
        table.contains("client closed") && table.contains(&client_addr),
        "{table}"
    );
    assert!(!table.contains(&alice), "no whole uuid: {table}");
}

#[test]
fn control_characters_from_peers_never_reach_the_operators_terminal() {
    let mut gw = Binary::start(&[("ELFIN__QUERY__TIME_ZONE", "UTC")]);
    let alice = gw.add_user("alice");
    let evil = "\x1b[31mpump\x1b]0:owned\x07";
    let device = gw.device(&alice, MAC, evil);
    drop(device);
    gw.wait_log("went away");
    assert!(gw.stop().success());

    let raw = |text: &str| text.chars().any(|c| c.is_control() && c != '\n');
    let log = gw.log_lines();
    assert!(
        log.iter()
            .any(|l| l.contains("\\x1b[31mpump\\x1b]0:owned\\x07")),
        "escaped in the log: {log:?}"
    );
    assert!(
        !log.iter().any(|l| raw(l)),
        "no raw control character in the log"
    );

    for args in [&["audit"][..], &["device", "list"], &["user", "list"]] {
        let table = gw.cli(args);
        assert!(!raw(&table), "{args:?}: {table:?}");
    }
    assert!(gw.cli(&["device", "list"]).contains("\\x1b[31mpump"));
    // JSON output keeps the host name as it is (JSON escapes it).
    let json = gw.cli(&["audit", "--json"]);
    let event: Value = serde_json::from_str(json.lines().last().unwrap()).unwrap();
    assert_eq!(event["device_event"]["host"], evil);
}

#[test]
fn time_arguments_out_of_range_are_usage_errors_not_panics() {
    let gw = Binary::start(&[]);
    for since in ["300000000d", "9223372036854775807s", "-1h", "soon"] {
        let (code, stderr) = gw.cli_fails(&["audit", &format!("--since={since}")]);
        assert_eq!(code, 2, "{since}: {stderr}");
        assert!(stderr.contains("--since"), "{since}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (code, stderr) = gw.cli_fails(&["user", "cert", "alice", "--days", "4000000000"]);
    assert_eq!(code, 2, "{stderr}");
    for query in [
        "since=300000000d",
        "page=18446744073709551615&per_page=200",
        "page=99999999999999999999999",
        "per_page=-3",
    ] {
        let answer = gw.get(&format!("/api/audit?{query}"));
        assert_eq!(answer.status, 400, "{query}");
        assert!(answer.json()["error"].is_string(), "{query}");
    }
    assert_eq!(gw.get("/healthz").status, 200, "still serving");
}

#[test]
fn refusals_are_in_the_audit_trail_and_tunnel_records_stay_within_their_budget() {
    let mut gw = Binary::start(&[
        ("ELFIN__QUERY__TIME_ZONE", "UTC"),
        ("ELFIN__AUDIT__BUDGET_PER_10MIN", "3"),
    ]);
    let alice = gw.add_user("alice");
    let mut device = gw.device(&alice, MAC, "plc-1");

    // An open tunnel's row shows the bytes it has carried so far.
    let mut client = gw.tunnel(&alice, MAC);
    client.send(&[format!("data;{alice};T;T;1;").as_bytes(), &[7u8; 1000]].concat());
    device.bytes(1000);
    let page = eventually(
        || gw.get(&format!("/api/devices/{MAC}")).json(),
        |p| p["tunnels"][0]["bytes_to_device"] == 1000,
    );
    assert_eq!(page["tunnels"][0]["closed"], Value::Null, "still open");
    client.close();
    gw.wait_log("tunnel 1 closed by client");

    // Five more tunnels from one engineer: the budget records two more, counts the rest.
    for n in 2..=6 {
        gw.tunnel(&alice, MAC).close();
        gw.wait_log(&format!("tunnel {n} closed by client"));
    }
    // A stranger guesses a user: refused, and recorded with what it named.
    let mut stranger = gw.connect();
    let guessed = "5f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b";
    stranger.send(format!("connme;{guessed};{MAC}\n").as_bytes());
    let _ = stranger.line();
    let stranger_addr = stranger.raw().local_addr().unwrap().to_string();

    let refusals = eventually(
        || gw.get("/api/audit?kind=refusals").json(),
        |p| p["rows"].as_array().is_some_and(|r| !r.is_empty()),
    );
    let refusal = &refusals["rows"][0];
    assert_eq!(refusal["request"], "connme");
    assert_eq!(refusal["reason"], "unknown_user");
    assert_eq!(refusal["device"], MAC);
    assert_eq!(refusal["source"], stranger_addr);
    assert!(!refusals.to_string().contains(guessed), "no whole uuid");
    let page = gw.get(&format!("/api/devices/{MAC}")).json();
    assert_eq!(page["refusals"][0]["request"], "connme", "{page}");

    let tunnels = eventually(
        || gw.get(&format!("/api/audit?device={MAC}")).json(),
        |p| p["rows"].as_array().is_some_and(|r| r.len() == 3),
    );
    assert_eq!(tunnels["rows"].as_array().unwrap().len(), 3, "{tunnels}");
    assert!(gw.metric("elfin_audit_records_dropped_total") >= 3);
    assert!(gw.log_contains("more than 3 tunnels in 10 min"));

    assert!(gw.stop().success());
    let table = gw.cli(&["audit"]);
    assert!(table.contains("REFUSALS (1)"), "{table}");
    assert!(table.contains("unknown_user"), "{table}");
    let json = gw.cli(&["audit", "--json"]);
    let refusal: Value = json
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find_map(|v| v.get("refusal").cloned())
        .unwrap();
    assert_eq!(refusal["request"], "connme");
}

#[test]
fn a_contested_device_shows_on_its_page_and_in_the_metrics() {
    let gw = Binary::start(&[("ELFIN__AUTH__DEVICE_TAKEOVER", "when-silent")]);
    let alice = gw.add_user("alice");
    let _device = gw.device(&alice, MAC, "plc-1");
    let mut impostor = gw.connect_from(2);
    impostor.send(format!("beat;{alice};{MAC};plc-1;0").as_bytes());
    impostor.expect_closed();
    let page = eventually(
        || gw.get(&format!("/api/devices/{MAC}")).json(),
        |p| p["contested"].is_object(),
    );
    assert_eq!(page["contested"]["seen_from"], "127.0.0.1");
    let claimant = page["contested"]["claimants"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(claimant.starts_with("127.0.0.2:"), "{claimant}");
    assert_eq!(gw.metric("elfin_devices_contested"), 1);
    assert!(gw.log_contains("contested: 127.0.0.2:"));
    assert_eq!(
        gw.metric(r#"elfin_connections_closed_total{limit="takeover_refused"}"#),
        1
    );
}
