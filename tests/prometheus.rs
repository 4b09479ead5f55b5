//! What `deploy/` ships for monitoring: the alert rules pass `promtool`'s checks and
//! their unit tests, every series the rules and the Grafana dashboard query is one
//! the gateway exports (the metric catalogue), and Debian's Prometheus, scraping a
//! running gateway with the shipped rules, sees its series and fires an alert.
//!
//! Without Prometheus installed the promtool and Prometheus tests skip, unless
//! ELFIN_REQUIRE_PROMETHEUS is set (`tests/run.sh` installs it and sets it).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{repo_file, Binary};
use elfin_actors::metric::{Kind, CATALOGUE};

const RULES: &str = "deploy/prometheus/elfin-gateway.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/elfin-gateway.rules.test.yml";
const DASHBOARD: &str = "deploy/grafana/elfin-gateway.json";

fn tool(name: &str) -> Option<PathBuf> {
    let found = ["/usr/bin", "/usr/local/bin", "/usr/sbin"]
        .iter()
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|path| path.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("ELFIN_REQUIRE_PROMETHEUS").is_none(),
            "{name} is not installed: run tests/run.sh"
        );
        eprintln!("SKIPPED: {name} is not installed (Debian's prometheus package)");
    }
    found
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    for args in [
        vec!["check", "rules", RULES],
        vec!["test", "rules", RULE_TESTS],
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(repo_file(""))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The series names the gateway exports: each catalogue entry, a histogram's with
/// its `_bucket`, `_sum` and `_count` series.
fn exported() -> BTreeSet<String> {
    CATALOGUE
        .iter()
        .flat_map(|(name, kind, _, _)| match kind {
            Kind::Histogram => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{name}{suffix}"))
                .collect::<Vec<_>>(),
            _ => vec![name.to_string()],
        })
        .collect()
}

/// Every `elfin_…` name in `text`.
fn named_series(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("elfin_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_series_the_rules_and_the_dashboard_query_is_one_the_gateway_exports() {
    let exported = exported();
    let rules = std::fs::read_to_string(repo_file(RULES)).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file(DASHBOARD)).unwrap()).unwrap();
    let mut queries = Vec::new();
    collect_exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for (what, text) in [("rules", rules), ("dashboard", queries.join("\n"))] {
        let named = named_series(&text);
        assert!(named.len() >= 8, "{what} names {named:?}");
        let unknown: Vec<&String> = named.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{what} queries series the gateway does not export: {unknown:?}"
        );
    }
    // The metrics an alert is about are on the dashboard too.
    let on_dashboard = named_series(&queries.join("\n"));
    for series in named_series(&std::fs::read_to_string(repo_file(RULES)).unwrap()) {
        assert!(
            on_dashboard.contains(&series),
            "{series} alerts but is on no panel"
        );
    }
    // Every panel queries through the dashboard's data source variable.
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
        }
    }
}

fn collect_exprs(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => into.push(expr.clone()),
                    _ => collect_exprs(value, into),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, into)),
        _ => {}
    }
}

/// A running Prometheus with the shipped rules, scraping `target` every second.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(binary: PathBuf, target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: elfin-gateway\n    static_configs:\n      - targets: [\"{target}\"]\n",
            repo_file(RULES).display()
        );
        let path = dir.path().join("prometheus.yml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// GET `path` of the HTTP API, as JSON, or `None` while it does not answer.
    fn api(&self, path: &str) -> Option<serde_json::Value> {
        let mut response = ureq::get(&format!("{}{path}", self.url)).call().ok()?;
        response.body_mut().read_json().ok()
    }

    /// Polls `path` until `done` holds for its `data` (at most a minute).
    fn wait(&self, path: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let data = self.api(path).map(|v| v["data"].clone());
            if let Some(data) = data.filter(|d| done(d)) {
                return data;
            }
            assert!(Instant::now() < deadline, "{path}: never as expected");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server certificate that expires in `days`, written as `server.pem`/`server.key`.
fn certificate_expiring_in(dir: &std::path::Path, days: i64) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

#[test]
fn prometheus_scrapes_a_running_gateway_and_fires_the_certificate_alert() {
    let Some(binary) = tool("prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    certificate_expiring_in(dir.path(), 7);
    let cert = dir.path().join("server.pem").display().to_string();
    let key = dir.path().join("server.key").display().to_string();
    let gateway = Binary::start(&[("ELFIN__TLS__CERT", &cert), ("ELFIN__TLS__KEY", &key)]);
    let uuid = gateway.add_user("alice");
    let _device = gateway.device(&uuid, "AABBCCDDEE01", "pump");
    let prometheus = Prometheus::start(binary, gateway.admin.unwrap());

    let up = prometheus.wait("/api/v1/query?query=up", |d| {
        d["result"][0]["value"][1] == "1"
    });
    assert_eq!(up["result"][0]["metric"]["job"], "elfin-gateway");
    for (series, value) in [
        ("elfin_devices_online", Some("1")),
        ("elfin_connections_total", None),
        ("elfin_certificate_expiry_timestamp_seconds", None),
        ("elfin_messages_total", None),
    ] {
        let data = prometheus.wait(&format!("/api/v1/query?query={series}"), |d| {
            d["result"].as_array().is_some_and(|r| !r.is_empty())
        });
        if let Some(value) = value {
            assert_eq!(data["result"][0]["value"][1], value, "{series}");
        }
    }
    let alerts = prometheus.wait("/api/v1/alerts", |d| {
        d["alerts"].as_array().is_some_and(|alerts| {
            alerts.iter().any(|a| {
                a["labels"]["alertname"] == "ElfinCertificateExpiringSoon" && a["state"] == "firing"
            })
        })
    });
    let firing: Vec<&serde_json::Value> = alerts["alerts"].as_array().unwrap().iter().collect();
    let certificate = firing
        .iter()
        .find(|a| a["labels"]["alertname"] == "ElfinCertificateExpiringSoon")
        .unwrap();
    assert_eq!(certificate["labels"]["which"], "server");
    assert!(
        certificate["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("expires in 6d"),
        "{certificate}"
    );
    // Nothing else is wrong with this gateway.
    assert!(
        firing
            .iter()
            .all(|a| a["labels"]["alertname"] == "ElfinCertificateExpiringSoon"),
        "{firing:#?}"
    );
}
