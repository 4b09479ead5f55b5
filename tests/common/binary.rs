//! The real `elfin-gateway` binary on an ephemeral port with its own temporary
//! database, and blocking TCP peers that play devices and clients: for what only the
//! binary does (command line, settings, signals) and the MongoDB end-to-end tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Binary {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The admin server's address, if it is on.
    pub admin: Option<SocketAddr>,
    pub dir: Arc<tempfile::TempDir>,
    env: Vec<(String, String)>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Binary {
    /// Starts the gateway with test-friendly defaults (fast flushes) plus `env`.
    pub fn start(env: &[(&str, &str)]) -> Binary {
        Self::start_in(Arc::new(tempfile::tempdir().unwrap()), env)
    }

    /// Starts a gateway on the database directory of an earlier one.
    pub fn start_in(dir: Arc<tempfile::TempDir>, env: &[(&str, &str)]) -> Binary {
        Self::start_with_args(dir, env, &[])
    }

    /// Starts a gateway with extra command-line arguments (e.g. `--config`), run in
    /// `dir`.
    pub fn start_with_args(
        dir: Arc<tempfile::TempDir>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Binary {
        let mut all: Vec<(String, String)> = vec![
            ("ELFIN__SERVER__LISTEN".into(), "127.0.0.1:0".into()),
            (
                "ELFIN__STORAGE__PATH".into(),
                dir.path().join("elfin.db").display().to_string(),
            ),
            ("ELFIN__PERSISTENCE__FLUSH_INTERVAL_MS".into(), "50".into()),
            ("ELFIN__ADMIN__LISTEN".into(), "127.0.0.1:0".into()),
            ("RUST_LOG".into(), "info".into()),
        ];
        for (k, v) in env {
            all.retain(|(key, _)| key != k);
            all.push((k.to_string(), v.to_string()));
        }
        let mut child = command(&dir, &all)
            .args(args)
            .arg("serve")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start elfin-gateway");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut admin = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("admin pages on http://").nth(1) {
                    admin = addr.split('/').next().and_then(|a| a.parse().ok());
                }
                if let Some(addr) = line.split(" listening on ").nth(1) {
                    let addr = addr.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(addr.parse::<SocketAddr>().ok().map(|a| (a, admin)));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let (addr, admin) = match rx.recv_timeout(TIMEOUT) {
            Ok(Some(addrs)) => addrs,
            _ => {
                let _ = child.kill();
                panic!("gateway did not start: {:?}", log.lock().unwrap());
            }
        };
        Binary {
            child: Some(child),
            addr,
            admin,
            dir,
            env: all,
            log,
        }
    }

    /// A request to the admin server: (status, response headers, body). Redirects are
    /// returned, not followed.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        form: Option<&[(&str, &str)]>,
    ) -> Http {
        let url = format!("http://{}{path}", self.admin.expect("admin server on"));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(TIMEOUT))
            .build()
            .into();
        let response = match method {
            "GET" => {
                let mut req = agent.get(&url);
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.call()
            }
            _ => {
                let mut req = agent.post(&url);
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.send_form(form.unwrap_or_default().iter().copied())
            }
        };
        let mut response = response.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        Http {
            status: response.status().as_u16(),
            headers: response
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
                .collect(),
            body: response.body_mut().read_to_string().unwrap_or_default(),
        }
    }

    /// `GET path` from the admin server, without credentials.
    pub fn get(&self, path: &str) -> Http {
        self.http("GET", path, &[], None)
    }

    /// Runs an operator command against this gateway's settings; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        succeeded(command(&self.dir, &self.env).args(args), args)
    }

    /// Runs an operator command that must fail; returns its exit code and stderr.
    pub fn cli_fails(&self, args: &[&str]) -> (i32, String) {
        let out = command(&self.dir, &self.env)
            .args(args)
            .output()
            .expect("run elfin-gateway");
        assert!(!out.status.success(), "{args:?} succeeded");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Adds a user through the CLI and returns its uuid.
    pub fn add_user(&self, name: &str) -> String {
        self.cli(&["user", "add", name])
            .lines()
            .next()
            .unwrap()
            .to_owned()
    }

    pub fn connect(&self) -> Peer {
        Peer::connect(self.addr)
    }

    /// A connection from another loopback address (`127.0.0.<last>`): another host,
    /// as far as per-address rules can tell.
    pub fn connect_from(&self, last: u8) -> Peer {
        self.connect_from_ip(std::net::IpAddr::from([127, 0, 0, last]))
    }

    /// A connection from `local`, an address of this host (or of the test's own
    /// network namespace).
    pub fn connect_from_ip(&self, local: std::net::IpAddr) -> Peer {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stream = runtime.block_on(async {
            let socket = match local {
                std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .unwrap();
            socket.bind(SocketAddr::new(local, 0)).unwrap();
            socket.connect(self.addr).await.unwrap()
        });
        let stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        Peer::from_std(stream)
    }

    /// A device connection that has sent its first heartbeat and is registered.
    pub fn device(&self, uuid: &str, mac: &str, host: &str) -> Peer {
        let mut device = self.connect();
        device.send(format!("beat;{uuid};{mac};{host};0").as_bytes());
        self.wait_online(uuid, mac);
        device
    }

    /// Polls `query` until the device is listed online.
    pub fn wait_online(&self, uuid: &str, mac: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let devices = self.query(uuid);
            if super::lists_online(&devices, mac) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{mac} never came online: {devices}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One `query` on a fresh connection, parsed.
    pub fn query(&self, uuid: &str) -> serde_json::Value {
        let mut client = self.connect();
        client.send(format!("query;{uuid}").as_bytes());
        serde_json::from_str(&client.line()).unwrap()
    }

    /// A client connection tunnelled to the device (`connme`, success checked).
    pub fn tunnel(&self, uuid: &str, mac: &str) -> Peer {
        let mut client = self.connect();
        client.send(format!("connme;{uuid};{mac}").as_bytes());
        assert_eq!(client.line(), r#"{"status":"success"}"#);
        client
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The gateway's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub fn log_contains(&self, text: &str) -> bool {
        self.log_count(text) > 0
    }

    /// Stores devices of the user `uuid` straight in the embedded database file (as if
    /// each had connected once, at the Unix epoch): (mac, host) pairs.
    pub fn store_devices(&self, uuid: &str, devices: impl IntoIterator<Item = (String, String)>) {
        let mut db = rusqlite::Connection::open(self.dir.path().join("elfin.db")).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        let tx = db.transaction().unwrap();
        for (mac, host) in devices {
            tx.execute(
                "INSERT INTO devices (mac, host, last_seen_ms, owner)
                 SELECT ?1, ?2, 0, id FROM users WHERE uuid = ?3",
                rusqlite::params![mac, host, uuid],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    /// The value of the series `series` (a metric's name with its labels) on
    /// `/metrics`, 0 if absent.
    pub fn metric(&self, series: &str) -> u64 {
        let metrics = self.get("/metrics").body;
        let prefix = format!("{series} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    /// How many log lines so far contain `text`.
    pub fn log_count(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the gateway.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status();
    }

    /// Waits until a log line contains `text`.
    pub fn wait_log(&self, text: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(text)) {
                return line.clone();
            }
            assert!(Instant::now() < deadline, "no log line with {text:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + TIMEOUT * 2;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("gateway did not stop: {:?}", self.log.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn command(dir: &tempfile::TempDir, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_elfin-gateway"));
    cmd.current_dir(dir.path())
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    cmd
}

/// Runs an operator command (`user add`, ...) in `dir` on the database a [`Binary`]
/// started there uses, before or while it runs; returns what it printed.
pub fn run_cli(dir: &tempfile::TempDir, env: &[(&str, &str)], args: &[&str]) -> String {
    let mut all: Vec<(String, String)> = vec![(
        "ELFIN__STORAGE__PATH".into(),
        dir.path().join("elfin.db").display().to_string(),
    )];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    succeeded(command(dir, &all).args(args), args)
}

/// What an operator command printed; fails the test if it failed.
fn succeeded(command: &mut Command, args: &[&str]) -> String {
    let out = command.output().expect("run elfin-gateway");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The repository root, for files shipped with it.
pub fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// An admin server's answer.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Http {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One TCP connection to the gateway.
pub struct Peer {
    stream: TcpStream,
    buffered: Vec<u8>,
}

impl Peer {
    pub fn connect(addr: SocketAddr) -> Peer {
        Peer::from_std(TcpStream::connect(addr).unwrap())
    }

    pub fn from_std(stream: TcpStream) -> Peer {
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Peer {
            stream,
            buffered: Vec::new(),
        }
    }

    /// The same connection, for another thread (what this one has buffered stays
    /// here).
    pub fn try_clone(&self) -> Peer {
        Peer {
            stream: self.stream.try_clone().unwrap(),
            buffered: Vec::new(),
        }
    }

    /// One write (peers write one message per write).
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn fill(&mut self) -> usize {
        let mut buf = [0u8; 65536];
        match self.stream.read(&mut buf) {
            Ok(n) => {
                self.buffered.extend_from_slice(&buf[..n]);
                n
            }
            Err(e) => panic!(
                "read failed (have {:?}): {e}",
                String::from_utf8_lossy(&self.buffered)
            ),
        }
    }

    /// The next `\n`-terminated line, without the terminator.
    pub fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buffered.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffered.drain(..=i).collect();
                return String::from_utf8(line[..i].to_vec()).unwrap();
            }
            assert!(
                self.fill() > 0,
                "closed before a full line: {:?}",
                self.buffered
            );
        }
    }

    /// Exactly `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buffered.len() < n {
            assert!(
                self.fill() > 0,
                "closed after {} of {n} bytes",
                self.buffered.len()
            );
        }
        self.buffered.drain(..n).collect()
    }

    /// Asserts that nothing arrives within `wait` (and the connection stays open).
    pub fn expect_silence(&mut self, wait: Duration) {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 1024];
        match self.stream.read(&mut buf) {
            Ok(0) => panic!("connection closed"),
            Ok(n) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{e}"
            ),
        }
        self.stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    }

    /// Asserts the gateway closed this connection.
    pub fn expect_closed(&mut self) {
        let mut buf = [0u8; 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("connection still open: {e}"),
            }
        }
    }

    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    pub fn raw(&self) -> &TcpStream {
        &self.stream
    }
}

/// A `failed` reply's reason, asserting the reply's shape.
pub fn failed_reason(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["status"], "failed", "{line}");
    let reason = v["reason"].as_str().unwrap().to_owned();
    assert!(!reason.is_empty());
    reason
}

/// Polls `get` until `done` holds for its result (every 50 ms, at most [`TIMEOUT`]),
/// or fails with the last one.
pub fn eventually<T: std::fmt::Debug>(mut get: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let value = get();
        if done(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {value:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
