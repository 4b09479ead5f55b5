//! The admin server (`admin.listen`) of the real binary: health and readiness, the
//! Prometheus metrics, the status API, access with and without a token, and the logs
//! an operator reads. The page in a real browser is `tests/status_page.rs`.

mod common;

use std::time::Duration;

use common::{eventually, Binary};

const MAC: &str = "F0FE6B2A1C3D";
const TOKEN: &str = "6b1f0e8a93c24d57b0a1e6f3c9d28475";

#[test]
fn health_and_readiness_answer_on_loopback_without_a_token() {
    let gw = Binary::start(&[]);
    let health = gw.get("/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = gw.get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["ready"], true);
}

#[test]
fn metrics_follow_prometheus_conventions_and_count_what_happened() {
    let gw = Binary::start(&[]);
    let uuid = gw.add_user("alice");
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.tunnel(&uuid, MAC);
    client.send(format!("data;{uuid};T;T;1;12345").as_bytes());
    assert_eq!(device.bytes(5), b"12345");
    // Could start the client's next `data;<uuid>`: held for about two round trips of
    // the loopback link (well under 25 ms, the default ceiling being 100), then sent.
    client.send(format!("data;{uuid};T;T;1;abd").as_bytes());
    assert_eq!(device.bytes(3), b"abd");
    let mut vandal = gw.connect();
    vandal.send(b"garbage garbage\n");
    // A batch's round trip is timed as it returns and the batch counted after its
    // audit write: wait for both.
    let scrape = eventually(
        || gw.get("/metrics").body,
        |body| {
            body.contains("elfin_garbage_bytes_total 16")
                && body.contains("op=\"record\"")
                && body.contains("elfin_store_batches_total")
        },
    );
    for series in [
        "elfin_connections_open{transport=\"plain\",role=\"device\"} 1",
        "elfin_connections_open{transport=\"plain\",role=\"client\"} 1",
        "elfin_devices_online 1",
        "elfin_tunnels_open 1",
        "elfin_messages_total{type=\"beat\"}",
        "elfin_messages_total{type=\"connme\"} 1",
        "elfin_tunnel_bytes_total{direction=\"to_device\"} 8",
        "elfin_store_round_trip_seconds_bucket{op=\"record\",le=\"0.001\"}",
        "elfin_held_tails_total 1",
        "elfin_header_hold_seconds_bucket{outcome=\"timed_out\",le=\"0.025\"} 1",
        "elfin_header_hold_seconds_count{outcome=\"timed_out\"} 1",
        "elfin_store_batches_total",
        "# TYPE elfin_garbage_bytes_total counter",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(scrape.contains(series), "no {series} in\n{scrape}");
    }
    assert_eq!(
        gw.get("/metrics").header("content-type"),
        Some("text/plain; version=0.0.4")
    );
}

#[test]
fn the_status_api_lists_devices_and_tunnels_and_never_a_whole_uuid() {
    let gw = Binary::start(&[("ELFIN__QUERY__TIME_ZONE", "UTC")]);
    let uuid = gw.add_user("alice");
    // One device that came and went (stored, offline) and one that stays.
    drop(gw.device(&uuid, "AABBCCDDEEFF", "meter-7"));
    // Stored before the page first reads the store (it keeps that listing for 10 s).
    eventually(
        || gw.cli(&["device", "list"]),
        |list| list.contains("AABBCCDDEEFF"),
    );
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.tunnel(&uuid, MAC);
    client.send(&[format!("data;{uuid};T;T;1;").as_bytes(), &[0u8; 1000]].concat());
    device.bytes(1000);
    device.send(
        &[
            format!("data;{uuid};{MAC};plc-1;0;").as_bytes(),
            &[1u8; 300],
        ]
        .concat(),
    );
    client.bytes(300);

    let status = eventually(
        || gw.get("/api/status"),
        |s| {
            let s = s.json();
            s["totals"]["devices_offline"] == 1 && s["tunnels"][0]["bytes_b_to_a"] == 300
        },
    );
    assert!(!status.body.contains(&uuid), "{}", status.body);
    let s = status.json();
    assert_eq!(s["totals"]["devices_online"], 1);
    assert_eq!(s["totals"]["tunnels"], 1);
    assert_eq!(s["totals"]["connections"], 2);
    assert!(s.get("users").is_none(), "devices are paged apart: {s}");
    // The devices: searched and paged at /api/devices.
    let page = eventually(|| gw.get("/api/devices").json(), |p| p["total"] == 2);
    let rows = page["devices"].as_array().unwrap();
    let (online, offline) = (rows[0].clone(), rows[1].clone());
    assert_eq!(online["mac"], MAC, "online first: {page}");
    assert_eq!(online["online"], true);
    assert_eq!(online["host"], "plc-1");
    assert_eq!(online["user"], "alice");
    assert_eq!(online["uuid"], format!("{}…", &uuid[..8]));
    let from = online["connected_from"].as_str().unwrap();
    assert!(from.starts_with("127.0.0.1:"), "{from}");
    assert_eq!(offline["mac"], "AABBCCDDEEFF");
    assert_eq!(offline["online"], false);
    assert_eq!(offline["connected_from"], serde_json::Value::Null);
    // Last seen in the configured zone and format.
    let today = chrono::Utc::now().format("%Y. %m. %d.").to_string();
    assert!(
        online["last_seen"].as_str().unwrap().starts_with(&today),
        "{online}"
    );

    let tunnel = &s["tunnels"][0];
    assert_eq!(tunnel["a"]["kind"], "client");
    assert_eq!(tunnel["b"]["kind"], "device");
    assert_eq!(tunnel["b"]["mac"], MAC);
    assert_eq!(tunnel["bytes_a_to_b"], 1000);
    assert_eq!(tunnel["bytes_b_to_a"], 300);

    // Throughput history: samples every 2 s, the bytes show up as a rate.
    let s = eventually(
        || gw.get("/api/status").json(),
        |s| s["history"].as_array().is_some_and(|h| h.len() >= 2),
    );
    let peak = s["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["bytes_per_sec"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(peak > 0.0, "{}", s["history"]);
    assert_eq!(
        gw.get("/api/status").header("cache-control"),
        Some("no-store")
    );
}

#[test]
fn with_a_token_every_request_needs_it_and_the_login_form_opens_a_session() {
    let gw = Binary::start(&[
        ("ELFIN__ADMIN__TOKEN", TOKEN),
        // With a token, any address may be served; the test still uses loopback.
        ("ELFIN__ADMIN__LISTEN", "127.0.0.1:0"),
    ]);
    let bearer = format!("Bearer {TOKEN}");
    for path in ["/healthz", "/readyz", "/metrics", "/api/status", "/app.js"] {
        let refused = gw.get(path);
        assert_eq!(refused.status, 401, "{path}");
        assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
        let right = gw.http("GET", path, &[("Authorization", &bearer)], None);
        assert_eq!(right.status, 200, "{path}: {}", right.body);
    }
    // A browser goes to the login form first; the form and its style load without
    // the token, so the page is styled.
    let page = gw.get("/");
    assert_eq!(page.status, 303);
    assert_eq!(page.header("location"), Some("/login"));
    assert_eq!(gw.get("/login").status, 200);
    let style = gw.get("/style.css");
    assert_eq!(style.status, 200);
    assert!(style.body.contains(".login"));

    let signed_in = gw.http("POST", "/login", &[], Some(&[("token", TOKEN)]));
    assert_eq!(signed_in.status, 303);
    assert_eq!(signed_in.header("location"), Some("/"));
    let cookie = signed_in.header("set-cookie").unwrap().to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(cookie.contains("Max-Age=43200"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP, no proxy: {cookie}");
    assert!(
        !cookie.contains(TOKEN),
        "the session id is not the token: {cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let page = gw.http("GET", "/", &[("Cookie", &pair)], None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Elfin Connect gateway"));
    assert_eq!(
        gw.http("GET", "/api/status", &[("Cookie", &pair)], None)
            .status,
        200
    );
    let forged = format!("elfin_session={TOKEN}");
    assert_eq!(
        gw.http("GET", "/api/status", &[("Cookie", &forged)], None)
            .status,
        401
    );
    // Signing out ends the session.
    assert_eq!(
        gw.http("POST", "/logout", &[("Cookie", &pair)], None)
            .status,
        303
    );
    assert_eq!(
        gw.http("GET", "/api/status", &[("Cookie", &pair)], None)
            .status,
        401
    );
}

#[test]
fn wrong_tokens_make_their_address_wait_however_many_requests_it_sends() {
    let gw = Binary::start(&[
        ("ELFIN__ADMIN__TOKEN", TOKEN),
        ("ELFIN__ADMIN__LISTEN", "127.0.0.1:0"),
    ]);
    let wrong = gw.http("POST", "/login", &[], Some(&[("token", "guess")]));
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("not the admin token"));
    assert!(wrong.header("set-cookie").is_none());
    // 40 guesses in parallel right after: none is checked, not even the right token.
    let answers: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let guesses: Vec<_> = (0..40)
            .map(|i| {
                let gw = &gw;
                s.spawn(move || {
                    let guess = if i == 39 {
                        TOKEN.to_owned()
                    } else {
                        format!("guess{i}")
                    };
                    let bearer = format!("Bearer {guess}");
                    let r = gw.http("GET", "/api/status", &[("Authorization", &bearer)], None);
                    (r.status, r.header("retry-after").map(str::to_owned))
                })
            })
            .collect();
        guesses.into_iter().map(|g| g.join().unwrap()).collect()
    });
    for (status, retry_after) in &answers {
        assert_eq!(*status, 429, "{answers:?}");
        let secs: u64 = retry_after.as_deref().unwrap().parse().unwrap();
        assert!((1..=60).contains(&secs), "{answers:?}");
    }
    let paced_login = gw.http("POST", "/login", &[], Some(&[("token", TOKEN)]));
    assert_eq!(paced_login.status, 429);
    assert!(
        paced_login.body.contains("try again"),
        "{}",
        paced_login.body
    );
    // After the wait, the right token works again, and the refusals were counted
    // and logged with the address.
    std::thread::sleep(Duration::from_millis(1100));
    let bearer = format!("Bearer {TOKEN}");
    let metrics = gw.http("GET", "/metrics", &[("Authorization", &bearer)], None);
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains(r#"elfin_refusals_total{reason="admin_token"} 1"#),
        "{}",
        metrics.body
    );
    assert!(metrics
        .body
        .contains(r#"elfin_refusals_total{reason="admin_paced"} 41"#));
    gw.wait_log("refused 127.0.0.1 (admin_token)");
    assert_eq!(gw.log_count("(admin_paced)"), 1, "logged once a minute");
}

#[test]
fn without_a_token_only_loopback_host_names_are_answered() {
    let gw = Binary::start(&[]);
    let port = gw.admin.unwrap().port();
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let r = gw.http("GET", "/api/status", &[("Host", &host)], None);
        assert_eq!(r.status, 200, "{host}");
    }
    // A page of evil.example whose name was rebound to 127.0.0.1.
    let rebound = gw.http("GET", "/api/status", &[("Host", "evil.example")], None);
    assert_eq!(rebound.status, 403);
    assert!(!rebound.body.contains("totals"));
    gw.wait_log("(admin_host)");
    // Named in admin.allowed_hosts: answered.
    let gw = Binary::start(&[("ELFIN__ADMIN__ALLOWED_HOSTS", "gw.plant.example")]);
    let named = gw.http(
        "GET",
        "/api/status",
        &[("Host", "gw.plant.example:9100")],
        None,
    );
    assert_eq!(named.status, 200);
}

#[test]
fn through_a_trusted_proxy_the_login_cookie_is_secure() {
    let gw = Binary::start(&[
        ("ELFIN__ADMIN__TOKEN", TOKEN),
        ("ELFIN__ADMIN__LISTEN", "127.0.0.1:0"),
        ("ELFIN__ADMIN__TRUSTED_PROXIES", "127.0.0.1"),
    ]);
    let signed_in = gw.http(
        "POST",
        "/login",
        &[("X-Forwarded-For", "198.51.100.4")],
        Some(&[("token", TOKEN)]),
    );
    let cookie = signed_in.header("set-cookie").unwrap();
    assert!(cookie.contains("Secure"), "{cookie}");
    // Pacing follows the forwarded address, not the proxy's.
    let wrong = [("X-Forwarded-For", "198.51.100.4")];
    assert_eq!(
        gw.http("POST", "/login", &wrong, Some(&[("token", "x")]))
            .status,
        401
    );
    assert_eq!(
        gw.http("POST", "/login", &wrong, Some(&[("token", TOKEN)]))
            .status,
        429
    );
    let other = [("X-Forwarded-For", "198.51.100.5")];
    assert_eq!(
        gw.http("POST", "/login", &other, Some(&[("token", TOKEN)]))
            .status,
        303
    );
}

#[test]
fn an_all_digit_token_from_the_environment_keeps_every_digit() {
    let token = "31415926535897932384626433832795028841971";
    let gw = Binary::start(&[
        ("ELFIN__ADMIN__TOKEN", token),
        ("ELFIN__ADMIN__LISTEN", "127.0.0.1:0"),
    ]);
    let status = |presented: &str| {
        let bearer = format!("Bearer {presented}");
        gw.http("GET", "/healthz", &[("Authorization", &bearer)], None)
            .status
    };
    assert_eq!(status(token), 200);
    // What reading the token as a number made of it.
    assert_eq!(status("31415926535897932000000000000000000000000"), 401);
}

#[test]
fn the_page_and_its_assets_are_served_from_the_binary() {
    let gw = Binary::start(&[]);
    let page = gw.get("/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<script src=\"/app.js\""));
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(!page.body.contains("http://") && !page.body.contains("https://"));
    let script = gw.get("/app.js");
    assert_eq!(script.status, 200);
    assert!(script.body.contains("/api/status"));
    // Device-supplied text is set as text, never as markup.
    assert!(!script.body.contains("innerHTML"));
    assert_eq!(gw.get("/style.css").status, 200);
    assert_eq!(gw.get("/nothing-here").status, 404);
}

#[test]
fn the_log_tells_each_device_and_tunnel_coming_and_going_with_masked_uuids() {
    let gw = Binary::start(&[]);
    let uuid = gw.add_user("alice");
    let device = gw.device(&uuid, MAC, "plc-1");
    let client = gw.tunnel(&uuid, MAC);
    client.close();
    gw.wait_log("closed by client");
    device.close();
    gw.wait_log("went away");
    let masked = format!("{}…", &uuid[..8]);
    let log = gw.log.lock().unwrap().join("\n");
    for line in [
        format!("device {MAC} (plc-1) of user {masked} online from 127.0.0.1:"),
        "tunnel 1 opened: client 127.0.0.1:".into(),
        format!("device {MAC} (plc-1) of user {masked} went away"),
    ] {
        assert!(log.contains(&line), "no {line:?} in\n{log}");
    }
    assert!(!log.contains(&uuid), "the whole uuid is in the log:\n{log}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let gw = Binary::start(&[("ELFIN__LOG__FORMAT", "json")]);
    let uuid = gw.add_user("alice");
    let _device = gw.device(&uuid, MAC, "plc-1");
    gw.wait_log("online from");
    let lines = gw.log.lock().unwrap().clone();
    assert!(lines.len() >= 3, "{lines:?}");
    for line in &lines {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["ts", "level", "target", "msg"] {
            assert!(entry[key].is_string(), "{key} missing: {line}");
        }
    }
    assert!(lines
        .iter()
        .any(|l| l.contains("\"level\":\"INFO\"") && l.contains("online from")));
}
