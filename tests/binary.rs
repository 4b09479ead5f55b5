//! What only the real binary does: operator commands, the settings file and the
//! environment, start-up failures, signals and a restart that keeps every sighting.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Binary;

const MAC: &str = "F0FE6B2A1C3D";

#[test]
fn user_add_prints_the_uuid_then_the_device_strings() {
    let gw = Binary::start(&[]);
    let out = gw.cli(&["user", "add", "alice"]);
    let lines: Vec<&str> = out.lines().collect();
    let uuid = lines[0];
    assert!(uuid::Uuid::parse_str(uuid).is_ok(), "{uuid}");
    assert!(
        lines[1].ends_with(&format!("beat;{uuid};%MAC;%HOST;0")),
        "{out}"
    );
    assert!(
        lines[2].ends_with(&format!("data;{uuid};%MAC;%HOST;0;")),
        "{out}"
    );

    let out = gw.cli(&["user", "add", "bob", "--uuid", "bobs-own-uuid"]);
    assert_eq!(out.lines().next(), Some("bobs-own-uuid"));
    let listed = gw.cli(&["user", "list"]);
    assert!(
        listed.contains("alice") && listed.contains("bobs-own-uuid"),
        "{listed}"
    );
}

#[test]
fn sightings_survive_a_restart() {
    let mut gw = Binary::start(&[
        // Long intervals: only the shutdown flush can have written them.
        ("ELFIN__PERSISTENCE__FLUSH_INTERVAL_MS", "3600000"),
        ("ELFIN__HEARTBEAT__DEBOUNCE_SECS", "3600"),
    ]);
    let uuid = gw.add_user("alice");
    let _beating = gw.device(&uuid, MAC, "plc-1");
    // A device that only streams data (persisted through the debouncer).
    let mut streaming = gw.connect();
    streaming.send(format!("data;{uuid};AABBCCDDEEFF;meter;0;\x01\x02").as_bytes());
    gw.wait_online(&uuid, "AABBCCDDEEFF");
    let before = gw.query(&uuid);

    let status = gw.stop();
    assert!(status.success(), "exit status {status}");
    let listed = gw.cli(&["device", "list", &uuid]);
    assert!(
        listed.contains(MAC) && listed.contains("AABBCCDDEEFF"),
        "{listed}"
    );

    let gw = Binary::start_in(Arc::clone(&gw.dir), &[]);
    let after = gw.query(&uuid);
    let dates = |v: &serde_json::Value| {
        let mut d: Vec<(String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["macaddress"].to_string(), d["lastseendate"].to_string()))
            .collect();
        d.sort();
        d
    };
    assert_eq!(dates(&after), dates(&before));
}

#[test]
fn sigterm_closes_connections_and_exits_zero() {
    let mut gw = Binary::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let status = gw.stop();
    assert!(status.success());
    device.expect_closed();
    assert!(gw.log_contains("stopped"));
}

/// Runs the binary with `env` in a fresh directory and returns (success, stderr).
fn run_with(env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_elfin-gateway"))
        .current_dir(dir.path())
        .env("ELFIN__ADMIN__LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn start_up_failures_print_one_line_naming_the_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let db_in_a_file = tempfile::NamedTempFile::new().unwrap();
    let not_a_dir = db_in_a_file.path().join("elfin.db").display().to_string();
    for (env, cause) in [
        (
            vec![("ELFIN__SERVER__LISTEN", addr.as_str())],
            "Address already in use",
        ),
        (
            vec![
                ("ELFIN__SERVER__LISTEN", "127.0.0.1:0"),
                ("ELFIN__STORAGE__PATH", not_a_dir.as_str()),
            ],
            "cannot open the database file",
        ),
        (
            vec![
                ("ELFIN__SERVER__LISTEN", "127.0.0.1:0"),
                ("ELFIN__TLS__CERT", "/nonexistent/cert.pem"),
                ("ELFIN__TLS__KEY", "/nonexistent/key.pem"),
            ],
            "/nonexistent/cert.pem",
        ),
        (
            vec![
                ("ELFIN__SERVER__LISTEN", "127.0.0.1:0"),
                ("ELFIN__ADMIN__LISTEN", addr.as_str()),
            ],
            "(admin.listen)",
        ),
    ] {
        let (ok, err) = run_with(&env);
        assert!(!ok, "{env:?} started");
        assert!(err.contains(cause), "{env:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{env:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bad_settings_fail_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, named) in [
        ("ELFIN__SERVER__LISTEN", "not-an-address", "server.listen"),
        (
            "ELFIN__HEARTBEAT__DEBOUNCE_SECS",
            "soon",
            "heartbeat.debounce_secs",
        ),
        ("ELFIN__QUERY__TIME_ZONE", "Mars/Olympus", "query.time_zone"),
        ("ELFIN__STORAGE__BACKEND", "floppy", "storage.backend"),
        ("ELFIN__AUTH__CLIENTS", "tls", "auth.clients"),
        ("ELFIN__TLS__MIN_VERSION", "1.1", "tls.min_version"),
        ("ELFIN__LOG__FORMAT", "xml", "log.format"),
        // Beyond loopback only with a token, and a token must be long.
        ("ELFIN__ADMIN__LISTEN", "0.0.0.0:0", "admin.listen"),
        ("ELFIN__ADMIN__TOKEN", "letmein", "admin.token"),
        // Cluster mode shares one database among the nodes.
        (
            "ELFIN__CLUSTER__NATS_URL",
            "nats://127.0.0.1:4222",
            "storage.backend = \"mongodb\"",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_elfin-gateway"))
            .current_dir(dir.path())
            .env(key, value)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{key}={value}: {err}");
    }
}

#[test]
fn the_settings_file_is_read_and_the_environment_overrides_it() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(
        dir.path().join("custom.toml"),
        "[query]\ntime_zone = \"UTC\"\ntime_format = \"%H:%M\"\n\n[server]\nlisten = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    // The harness sets ELFIN__SERVER__LISTEN, which must win over the file.
    let gw = Binary::start_with_args(dir, &[], &["--config", "custom.toml"]);
    let uuid = gw.add_user("alice");
    let _device = gw.device(&uuid, MAC, "plc-1");
    let before = chrono::Utc::now();
    let date = gw.query(&uuid)[0]["lastseendate"]
        .as_str()
        .unwrap()
        .to_owned();
    let after = chrono::Utc::now();
    // The beat was seen a moment ago: its minute is now's, or the one before.
    let minutes =
        [before - chrono::Duration::seconds(5), after].map(|t| t.format("%H:%M").to_string());
    assert!(minutes.contains(&date), "{date} not in {minutes:?}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_elfin-gateway"))
        .current_dir(gw.dir.path())
        .args(["--config", "missing.toml", "user", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a named settings file must exist");
}

#[test]
fn a_stalled_tunnel_is_logged_naming_the_device_and_its_client_is_closed() {
    let gw = Binary::start(&[("ELFIN__SERVER__TUNNEL_STALL_SECS", "1")]);
    let uuid = gw.add_user("alice");
    let device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.tunnel(&uuid, MAC); // reads nothing until the stall
    let mut stream = device.raw().try_clone().unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let chunk = [
        format!("data;{uuid};{MAC};plc-1;0;").as_bytes(),
        &vec![7u8; 60_000],
    ]
    .concat();
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while !gw.log_contains("stalled") {
        assert!(std::time::Instant::now() < deadline, "no stall logged");
        use std::io::Write;
        let _ = stream.write(&chunk);
    }
    let log = gw.log.lock().unwrap().clone();
    let warning = log.iter().find(|l| l.contains("stalled")).unwrap();
    assert!(
        warning.contains("WARN")
            && warning.contains(&format!("device {MAC}"))
            && warning.contains("and its client"),
        "{warning}"
    );
    client.expect_closed();
}

#[test]
fn sighup_reloads_the_tls_certificate_and_a_broken_file_keeps_the_one_in_use() {
    let pki = common::pki::Pki::new();
    pki.issue("localhost", "server");
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let gw = Binary::start(&[
        ("ELFIN__TLS__CERT", cert.to_str().unwrap()),
        ("ELFIN__TLS__KEY", key.to_str().unwrap()),
    ]);
    std::fs::write(&key, "not a key").unwrap();
    gw.signal("HUP");
    let error = gw.wait_log("not reloaded");
    assert!(
        error.contains("ERROR") && error.contains("server.key"),
        "{error}"
    );
    let other = common::pki::Pki::new();
    other.issue("localhost", "server");
    std::fs::copy(other.path("server.key"), &key).unwrap();
    std::fs::copy(other.path("server.pem"), &cert).unwrap();
    gw.signal("HUP");
    gw.wait_log("TLS certificate reloaded");
    // Plain devices are still served on the same port.
    let uuid = gw.add_user("alice");
    let _device = gw.device(&uuid, MAC, "plc-1");
}

#[test]
fn a_tls_client_on_a_gateway_without_tls_is_closed_and_warned_about_once() {
    let gw = Binary::start(&[]);
    for _ in 0..3 {
        let mut tls_client = gw.connect();
        tls_client.send(&[0x16, 0x03, 0x01, 0x00, 0x10]);
        tls_client.expect_closed();
    }
    let warning = gw.wait_log("a TLS client connected");
    assert!(
        warning.contains("tls.cert") && warning.contains("WARN"),
        "{warning}"
    );
    let log = gw.log.lock().unwrap().clone();
    let warnings = log
        .iter()
        .filter(|l| l.contains("a TLS client connected"))
        .count();
    assert_eq!(warnings, 1, "{log:?}");
}

/// A sender whose writes outran the tunnel (its bytes backed up in the gateway) is
/// cut wherever its socket was full, inside a header too, and sends the rest when it
/// is scheduled again: on a busy host that is far longer than the link's round trip
/// (here 20 ms; a loopback's hold is a fraction of a millisecond). After a backlog a
/// held tail waits the longest hold, so that rest is still a header.
#[test]
fn a_sender_cut_mid_header_after_a_backlog_keeps_the_tunnel_exact() {
    let gw = Binary::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.connect();
    device.send(format!("beat;{uuid};{MAC};plc;0").as_bytes());
    gw.wait_online(&uuid, MAC);
    let mut client = gw.tunnel(&uuid, MAC);
    let header = format!("data;{uuid};T;T;1;");
    let cut = "data;".len() + 8;
    let (first, second) = (
        common::random_bytes(1 << 20, 7),
        common::random_bytes(64 << 10, 11),
    );
    let want = [&first[..], &second].concat();
    let reader = std::thread::spawn(move || device.bytes(want.len()) == want);
    client.send(&[header.as_bytes(), &first, &header.as_bytes()[..cut]].concat());
    std::thread::sleep(Duration::from_millis(20));
    client.send(&[&header.as_bytes()[cut..], &second[..]].concat());
    assert!(
        reader.join().unwrap(),
        "header bytes leaked into the payload"
    );
}

#[test]
fn tunnels_stay_byte_exact_with_their_ends_on_different_workers() {
    // Connections are dealt to the two workers in turn: devices k..k+3 alternate, and
    // so do the clients, with one spare connection between the second and third, so
    // either the first two tunnels or the last two have their ends on different
    // workers (a sender then writes into a socket of the other worker).
    let gw = Binary::start(&[("ELFIN__SERVER__WORKERS", "2")]);
    let uuid = gw.add_user("alice");
    let macs: Vec<String> = (0..4).map(|i| format!("AABBCCDDEE{i:02X}")).collect();
    let devices: Vec<_> = macs
        .iter()
        .map(|mac| {
            let mut device = gw.connect();
            device.send(format!("beat;{uuid};{mac};plc;0").as_bytes());
            device
        })
        .collect();
    for mac in &macs {
        gw.wait_online(&uuid, mac);
    }
    let mut clients = Vec::new();
    let mut spare = None;
    for (i, mac) in macs.iter().enumerate() {
        if i == 2 {
            spare = Some(gw.connect());
        }
        clients.push(gw.tunnel(&uuid, mac));
    }
    let payload: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    for ((mac, mut device), mut client) in macs.iter().zip(devices).zip(clients) {
        for chunk in payload.chunks(1500) {
            client.send(&[format!("data;{uuid};T;T;1;").as_bytes(), chunk].concat());
        }
        assert_eq!(device.bytes(payload.len()), payload, "to {mac}");
        for chunk in payload.chunks(1500) {
            device.send(&[format!("data;{uuid};{mac};plc;0;").as_bytes(), chunk].concat());
        }
        assert_eq!(client.bytes(payload.len()), payload, "from {mac}");
    }
    drop(spare);
}

#[test]
fn with_enrollment_only_added_devices_register_and_the_refusal_is_logged_and_counted() {
    let gw = Binary::start(&[("ELFIN__AUTH__DEVICES", "registered")]);
    let uuid = gw.add_user("alice");
    let added = gw.cli(&["device", "add", &uuid, "AAAAAAAAAAAA", "plc-1"]);
    assert!(added.contains("AAAAAAAAAAAA"), "{added}");
    assert!(gw.cli(&["device", "list", &uuid]).contains("plc-1"));

    let _enrolled = gw.device(&uuid, "AAAAAAAAAAAA", "plc-1");
    let mut stranger = gw.connect();
    stranger.send(format!("beat;{uuid};BBBBBBBBBBBB;intruder;0").as_bytes());
    let line = gw.wait_log("refused 127.0.0.1 (enrollment)");
    assert!(
        line.contains("BBBBBBBBBBBB") && line.contains("INFO"),
        "{line}"
    );
    let listed = gw.query(&uuid);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let metrics = gw.get("/metrics").body;
    assert!(
        metrics.contains(r#"elfin_refusals_total{reason="enrollment"} 1"#),
        "{metrics}"
    );
}

#[test]
fn query_replies_are_not_rendered_for_a_client_that_has_gone() {
    let gw = Binary::start(&[
        ("ELFIN__LIMITS__REQUESTS_PER_SEC", "10000"),
        ("ELFIN__LIMITS__REQUEST_BURST", "10000"),
    ]);
    let uuid = gw.add_user("alice");
    // 5 000 stored devices: each reply is about half a megabyte.
    gw.store_devices(
        &uuid,
        (0..5_000).map(|i| (format!("AC{i:010X}"), format!("meter-{i}"))),
    );
    let requests = 200;
    let mut client = gw.connect();
    client.send(format!("query;{uuid}\n").repeat(requests).as_bytes());
    // A few replies fill the socket and the output queue; the rest wait their turn.
    std::thread::sleep(Duration::from_millis(500));
    // Gone without reading: the kernel resets the connection.
    drop(client);
    // (Was 0: every queued reply was rendered for nobody.)
    common::eventually(
        || gw.metric("elfin_requests_dropped_total"),
        |&dropped| dropped as usize >= requests - 40,
    );
    assert_eq!(
        gw.metric(r#"elfin_messages_total{type="query"}"#),
        requests as u64
    );
    // A client that only closed its sending side (netcat) still reads every reply.
    let mut half = gw.connect();
    half.send(format!("query;{uuid}\n").repeat(3).as_bytes());
    half.raw().shutdown(std::net::Shutdown::Write).unwrap();
    for _ in 0..3 {
        let reply: serde_json::Value = serde_json::from_str(&half.line()).unwrap();
        assert_eq!(reply.as_array().unwrap().len(), 5_000);
    }
}
