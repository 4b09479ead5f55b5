//! The status page in a real browser: headless Chromium, driven over WebDriver by
//! chromedriver (Debian's `chromium` and `chromium-driver`, which `tests/run.sh`
//! installs), against the real binary with a device online, a tunnel carrying data
//! and 20 000 stored devices to search among; then the device's own page.
//!
//! Without Chromium the test says it is skipped, unless `ELFIN_REQUIRE_BROWSER` is
//! set (as `tests/run.sh` does), in which case it fails.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::webhooks::{Receiver, SECRET};
use common::{Binary, TIMEOUT};
use serde_json::{json, Value};

const MAC: &str = "F0FE6B2A1C3D";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver process and one browser session in it.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts headless Chromium, or says why it cannot.
    fn start() -> Result<Browser, String> {
        for program in [CHROMIUM, CHROMEDRIVER] {
            if !Path::new(program).exists() {
                return Err(format!("{program} is not installed"));
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start chromedriver: {e}"))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + TIMEOUT;
        while agent.get(format!("{base}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            agent,
            _profile: profile,
        };
        // The flags keep Chromium off the (closed) network and work as root.
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let created = browser.call(
            "POST",
            "/session",
            json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
            }}}),
        );
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"))
            .to_owned();
        Ok(browser)
    }

    /// One WebDriver command; returns its `value`.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let response = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self.agent.post(&url).send_json(&body),
        };
        let mut response = response.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let reply: Value = response.body_mut().read_json().unwrap();
        assert_eq!(response.status(), 200, "{method} {path}: {reply}");
        reply["value"].clone()
    }

    fn open(&self, url: &str) {
        let path = format!("/session/{}/url", self.session);
        self.call("POST", &path, json!({ "url": url }));
    }

    /// Runs `script` (a function body) in the page; returns what it returns.
    fn eval(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.session);
        self.call("POST", &path, json!({ "script": script, "args": [] }))
    }

    /// Polls `script` until `done` holds for its value.
    fn wait(&self, script: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let value = self.eval(script);
            if done(&value) {
                return value;
            }
            assert!(Instant::now() < deadline, "{script}: still {value}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, to: &Path) {
        let path = format!("/session/{}/screenshot", self.session);
        let png = self.call("GET", &path, Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(to, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = self.agent.delete(format!("{}{path}", self.base)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The bytes the page shows for the tunnel's client-to-device direction.
const TUNNEL_BYTES: &str = "const c = document.querySelector('tr[data-tunnel] td.bytes-a-b'); \
                            return c ? Number(c.dataset.bytes) : null;";

#[test]
fn the_status_page_shows_a_device_online_and_its_tunnel_counting_live() {
    let browser = match Browser::start() {
        Ok(browser) => browser,
        Err(why) if std::env::var_os("ELFIN_REQUIRE_BROWSER").is_none() => {
            eprintln!("SKIPPED the_status_page_shows_…: {why}");
            return;
        }
        Err(why) => panic!("ELFIN_REQUIRE_BROWSER is set but {why}"),
    };
    // Fleet events go to a webhook receiver, whose state the page shows.
    let receiver = Receiver::start(SECRET, &[]);
    let hooks = receiver
        .as_ref()
        .map(|r| r.setting(SECRET, r#"name = "ops""#));
    let env: Vec<(&str, &str)> = hooks
        .iter()
        .map(|h| ("ELFIN__WEBHOOKS", h.as_str()))
        .collect();
    let gw = Binary::start(&env);
    let uuid = gw.add_user("alice");
    // Another user's fleet (a user may have at most 10 000 devices by default).
    let fleet = gw.add_user("fleet");
    gw.store_devices(
        &fleet,
        (0..20_000).map(|i| (format!("AC{i:010X}"), format!("meter-{i:05}"))),
    );
    let mut device = gw.device(&uuid, MAC, "plc-1");
    let mut client = gw.tunnel(&uuid, MAC);
    let header = format!("data;{uuid};T;T;1;");
    client.send(&[header.as_bytes(), &[0x55; 1000]].concat());
    device.bytes(1000);

    browser.open(&format!("http://{}/", gw.admin.unwrap()));
    let status = browser.wait(
        &format!(
            "const c = document.querySelector('tr[data-mac=\"{MAC}\"] td.status'); \
             return c ? c.textContent : null;"
        ),
        |v| !v.is_null(),
    );
    assert_eq!(status, "online");
    let row = browser.eval(&format!(
        "return document.querySelector('tr[data-mac=\"{MAC}\"]').textContent;"
    ));
    let row = row.as_str().unwrap();
    assert!(row.contains("plc-1") && row.contains("alice"), "{row}");
    assert!(!row.contains(&uuid), "the page shows a whole uuid: {row}");
    assert_eq!(
        browser.wait(TUNNEL_BYTES, |v| v.as_u64() == Some(1000)),
        1000
    );

    if receiver.is_some() {
        let webhook = browser.wait(
            "const r = document.querySelector('#webhook-table tr[data-endpoint=\"ops\"]'); \
             return r && !document.getElementById('webhooks').hidden ? \
             [...r.cells].map(c => c.textContent) : null;",
            |v| v[3] == "1",
        );
        assert!(webhook[1].as_str().unwrap().ends_with("/hook"), "{webhook}");
        assert_eq!(webhook[5], "0", "nothing dropped: {webhook}");
        assert_ne!(webhook[6], "never", "{webhook}");
    }

    // More data flows: the counter grows on the page as it is, without a reload.
    browser.eval("window.notReloaded = true; return null;");
    client.send(&[header.as_bytes(), &[0xAA; 5000]].concat());
    device.bytes(5000);
    browser.wait(TUNNEL_BYTES, |v| v.as_u64() == Some(6000));
    assert_eq!(browser.eval("return window.notReloaded === true;"), true);
    // The charts have drawn their lines.
    browser.wait(
        "return document.querySelectorAll('svg polyline').length;",
        |v| v.as_u64() == Some(2),
    );
    assert_eq!(
        browser.eval("return document.getElementById('devices-online').textContent;"),
        "1"
    );

    // One page of devices is on screen, not 20 001 rows.
    let shown = "return document.querySelectorAll('#device-table tbody tr').length;";
    assert_eq!(browser.eval(shown), 50);
    browser.wait(
        "return document.getElementById('page-of').textContent;",
        |v| v == "page 1 of 401",
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    browser.screenshot(&shot);
    eprintln!("screenshot of the status page: {}", shot.display());
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);

    // The device a customer calls about, typed into the search box: on screen
    // within a second.
    browser.eval(
        "const s = document.getElementById('search'); s.value = 'ac00000030d4'; \
         window.searchStarted = performance.now(); \
         s.dispatchEvent(new Event('input')); return null;",
    );
    let found = browser.wait(
        "const rows = document.querySelectorAll('#device-table tbody tr'); \
         return rows.length === 1 && rows[0].dataset.mac === 'AC00000030D4' \
           ? performance.now() - window.searchStarted : null;",
        |v| !v.is_null(),
    );
    let took = found.as_f64().unwrap();
    eprintln!("search among 20 001 devices on the page: {took:.0} ms");
    assert!(took < 1000.0, "the device showed after {took:.0} ms");
    let row = browser.eval("return document.querySelector('#device-table tbody tr').textContent;");
    assert!(row.as_str().unwrap().contains("meter-12500"), "{row}");

    // The filter and the pager.
    browser.eval(
        "const s = document.getElementById('search'); s.value = ''; \
         s.dispatchEvent(new Event('input')); \
         const f = document.getElementById('status-filter'); f.value = 'online'; \
         f.dispatchEvent(new Event('change')); return null;",
    );
    browser.wait(shown, |v| v == 1);
    browser.eval(
        "const f = document.getElementById('status-filter'); f.value = 'offline'; \
         f.dispatchEvent(new Event('change')); return null;",
    );
    browser.wait(
        "return document.getElementById('page-of').textContent;",
        |v| v == "page 1 of 400",
    );
    browser.eval("document.getElementById('next').click(); return null;");
    browser.wait(
        "return document.getElementById('page-of').textContent;",
        |v| v == "page 2 of 400",
    );
    let first =
        browser.eval("return document.querySelector('#device-table tbody tr').dataset.mac;");
    assert_eq!(
        first, "AC0000000032",
        "the 51st offline device by host name"
    );

    // The device's own page: its connection, its open tunnel, its coming online.
    browser.open(&format!("http://{}/devices/{MAC}", gw.admin.unwrap()));
    browser.wait(
        "return document.querySelectorAll('#open-tunnels tbody tr[data-tunnel]').length;",
        |v| v == 1,
    );
    assert_eq!(
        browser.eval("return document.getElementById('status').textContent;"),
        "online"
    );
    assert_eq!(
        browser.eval("return document.getElementById('host').textContent;"),
        "plc-1"
    );
    browser.wait(
        "const c = document.querySelector('#device-events tbody tr td.status'); \
         return c ? c.textContent : null;",
        |v| v == "online",
    );
    // A past tunnel appears in its history once it ends.
    drop(client);
    browser.wait(
        "const r = document.querySelector('#tunnel-history tbody tr'); \
         return r ? r.textContent : null;",
        |v| {
            v.as_str()
                .is_some_and(|t| t.contains("client closed") && t.contains("5.9 KiB"))
        },
    );
    let page = browser.eval("return document.body.textContent;");
    assert!(
        !page.as_str().unwrap().contains(&uuid),
        "a whole uuid on the device page"
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("device-page.png");
    browser.screenshot(&shot);
    eprintln!("screenshot of the device page: {}", shot.display());
}
