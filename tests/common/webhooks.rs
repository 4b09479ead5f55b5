//! A webhook receiver that verifies every delivery with the reference Standard
//! Webhooks library (`tests/webhooks/receiver.py`, PyPI's `standardwebhooks` in the
//! virtualenv `tests/run.sh` prepares), and what it received.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// A secret in Standard Webhooks form, the receiver's and the gateway's.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub struct Receiver {
    child: Child,
    pub port: u16,
    secret: String,
    args: Vec<String>,
    /// Every line it printed: `{"verified": true, "event": …}` or `{"verified": false, …}`.
    pub deliveries: Arc<Mutex<Vec<serde_json::Value>>>,
}

fn python() -> Option<std::path::PathBuf> {
    let python = super::repo_file("target/webhooks-venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    if std::env::var_os("ELFIN_REQUIRE_WEBHOOK_VERIFIER").is_some() {
        panic!("{} is missing: run tests/run.sh", python.display());
    }
    eprintln!("SKIPPED: no webhook verifier (run tests/run.sh to prepare it)");
    None
}

impl Receiver {
    /// A receiver on a free port verifying with `secret`; `args`: `--status 500`,
    /// `--delay 2`. `None` (the test skips) without the verifier, unless required.
    pub fn start(secret: &str, args: &[&str]) -> Option<Receiver> {
        let deliveries = Arc::default();
        let (child, port) = spawn(0, secret, args, &deliveries)?;
        Some(Receiver {
            child,
            port,
            secret: secret.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            deliveries,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// The settings of a `[[webhooks]]` entry for this receiver, as the environment
    /// writes it, with `extra` keys (`queue = 2`).
    pub fn setting(&self, secret: &str, extra: &str) -> String {
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(", {extra}")
        };
        format!(
            "[{{url = \"{}\", secret = \"{secret}\"{extra}}}]",
            self.url()
        )
    }

    /// Stops answering (the port is free until [`Receiver::restart`]).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Answers again on the same port, keeping what it received.
    pub fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let (child, _) =
            spawn(self.port, &self.secret, &args, &self.deliveries).expect("the verifier is there");
        self.child = child;
    }

    /// The verified events so far, in the order they arrived.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.deliveries
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d["verified"] == true)
            .map(|d| d["event"].clone())
            .collect()
    }

    /// The verified events of device `mac`, by type, in order.
    pub fn types_of(&self, mac: &str) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["data"]["mac"] == mac)
            .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Deliveries the verifier refused.
    pub fn refused(&self) -> usize {
        self.deliveries
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d["verified"] == false)
            .count()
    }

    /// Waits (up to `within`) until `done` holds for the verified events.
    pub fn wait(
        &self,
        within: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let events = self.events();
            if done(&events) {
                return events;
            }
            assert!(Instant::now() < deadline, "events so far: {events:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `receiver.py` on `port` (0: any); its lines go to `deliveries`.
fn spawn(
    port: u16,
    secret: &str,
    args: &[&str],
    deliveries: &Arc<Mutex<Vec<serde_json::Value>>>,
) -> Option<(Child, u16)> {
    let mut child = Command::new(python()?)
        .arg(super::repo_file("tests/webhooks/receiver.py"))
        .args(["--port", &port.to_string(), "--secret", secret])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the webhook receiver");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let lines = deliveries.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            match value.get("port").and_then(|p| p.as_u64()) {
                Some(port) => {
                    let _ = tx.send(port as u16);
                }
                None => lines.lock().unwrap().push(value),
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the webhook receiver did not start");
    Some((child, port))
}
