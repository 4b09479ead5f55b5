//! A MongoDB for the tests: the wire-protocol stand-in (`tests/mongo/standin.py`, run
//! from the virtualenv `tests/run.sh` prepares), or the real server at `MONGODB_URI`.
//!
//! Each test gets its own database. To play an outage, the stand-in process is
//! stopped and started again on the same port (it keeps its data in a state file); a
//! real server is reached through a relay in this process that is stopped instead.

use std::io::{BufRead, BufReader};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::{doc, Document};
use elfin_actors::store::mongo::HOUSEKEEPING_COMMANDS;
use mongodb::event::command::CommandEvent;
use mongodb::event::EventHandler;
use mongodb::options::ClientOptions;

pub struct Mongo {
    /// What the gateway is configured with.
    pub uri: String,
    pub database: String,
    backend: Backend,
}

enum Backend {
    StandIn {
        process: Option<(Child, ChildStdin)>,
        port: u16,
        state: PathBuf,
        _dir: tempfile::TempDir,
    },
    Real {
        uri: String,
        relay: Relay,
    },
}

static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

impl Mongo {
    pub fn start() -> Mongo {
        let database = format!(
            "elfin_test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        match std::env::var("MONGODB_URI") {
            Ok(uri) if !uri.is_empty() => {
                let relay = Relay::start(host_port(&uri));
                Mongo {
                    uri: through_relay(&uri, relay.port),
                    database,
                    backend: Backend::Real { uri, relay },
                }
            }
            _ => {
                let dir = tempfile::tempdir().unwrap();
                let state = dir.path().join("standin.state");
                let (child, stdin, port) = spawn_standin(0, &state);
                Mongo {
                    uri: format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
                    database,
                    backend: Backend::StandIn {
                        process: Some((child, stdin)),
                        port,
                        state,
                        _dir: dir,
                    },
                }
            }
        }
    }

    pub fn is_standin(&self) -> bool {
        matches!(self.backend, Backend::StandIn { .. })
    }

    /// The database goes away: connections drop, new ones are refused.
    pub fn stop(&mut self) {
        match &mut self.backend {
            Backend::StandIn { process, .. } => {
                if let Some((mut child, stdin)) = process.take() {
                    drop(stdin);
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            Backend::Real { relay, .. } => relay.stop(),
        }
    }

    /// The database is back on the same address, with its data.
    pub fn restart(&mut self) {
        match &mut self.backend {
            Backend::StandIn {
                process,
                port,
                state,
                ..
            } => {
                let (child, stdin, _) = spawn_standin(*port, state);
                *process = Some((child, stdin));
            }
            Backend::Real { relay, .. } => relay.resume(),
        }
    }

    /// Driver options for this database, with a monitor counting data commands.
    pub async fn options(&self) -> (ClientOptions, CommandCounter) {
        let mut options = ClientOptions::parse(&self.uri).await.unwrap();
        options.server_selection_timeout = Some(Duration::from_secs(5));
        let counter = CommandCounter::default();
        let seen = counter.0.clone();
        options.command_event_handler = Some(EventHandler::callback(move |event| {
            if let CommandEvent::Started(started) = event {
                if !HOUSEKEEPING_COMMANDS.contains(&started.command_name.as_str()) {
                    seen.lock().unwrap().push(started.command_name);
                }
            }
        }));
        (options, counter)
    }

    /// A plain driver handle on the test database, to look at what the gateway wrote.
    pub async fn db(&self) -> mongodb::Database {
        let (options, _) = self.options().await;
        mongodb::Client::with_options(options)
            .unwrap()
            .database(&self.database)
    }

    /// Data commands the stand-in received since the last reset (stand-in only).
    pub async fn standin_counts(&self) -> Document {
        let db = self.db().await;
        let reply = db.run_command(doc! { "standinStats": 1 }).await.unwrap();
        reply.get_document("counts").unwrap().clone()
    }

    pub async fn standin_reset(&self) {
        self.db()
            .await
            .run_command(doc! { "standinReset": 1 })
            .await
            .unwrap();
    }

    /// A gateway storing in this database (short driver timeouts, so that outage
    /// tests run fast).
    pub fn gateway(&self) -> super::Binary {
        self.gateway_with(&[])
    }

    /// [`Mongo::gateway`] with these settings too.
    pub fn gateway_with(&self, settings: &[(&str, &str)]) -> super::Binary {
        let mut env = vec![
            ("ELFIN__STORAGE__BACKEND", "mongodb"),
            ("ELFIN__MONGODB__URI", self.uri.as_str()),
            ("ELFIN__MONGODB__DATABASE", self.database.as_str()),
            ("ELFIN__MONGODB__SERVER_SELECTION_TIMEOUT_MS", "1000"),
            ("ELFIN__MONGODB__CONNECT_TIMEOUT_MS", "1000"),
        ];
        env.extend_from_slice(settings);
        super::Binary::start(&env)
    }
}

impl Drop for Mongo {
    fn drop(&mut self) {
        if let Backend::Real { uri, .. } = &self.backend {
            // Best effort: remove the test database from the real server.
            let (uri, name) = (uri.clone(), self.database.clone());
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().ok()?;
                rt.block_on(async {
                    let client = mongodb::Client::with_uri_str(&uri).await.ok()?;
                    client.database(&name).drop().await.ok()
                })
            })
            .join();
        }
        self.stop();
    }
}

/// Names of the data commands a driver sent, in order.
#[derive(Clone, Default)]
pub struct CommandCounter(Arc<Mutex<Vec<String>>>);

impl CommandCounter {
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

fn python() -> PathBuf {
    let python = super::repo_file("target/standin-venv/bin/python");
    assert!(
        python.exists(),
        "the MongoDB stand-in's virtualenv is missing: run tests/run.sh (or set MONGODB_URI)"
    );
    python
}

fn spawn_standin(port: u16, state: &std::path::Path) -> (Child, ChildStdin, u16) {
    let mut child = Command::new(python())
        .arg(super::repo_file("tests/mongo/standin.py"))
        .args(["--port", &port.to_string(), "--state"])
        .arg(state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the MongoDB stand-in");
    let stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    let started = std::time::Instant::now();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    // A restart on the same port may have to wait for the old socket to go.
    while out.read_line(&mut line).unwrap_or(0) == 0 {
        assert!(started.elapsed() < super::TIMEOUT, "stand-in did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let port = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected stand-in output: {line:?}"));
    (child, stdin, port)
}

/// The same URI (credentials and options kept) with the relay as its only host.
pub fn through_relay(uri: &str, port: u16) -> String {
    let (scheme, rest) = uri
        .split_once("://")
        .expect("MONGODB_URI must be a mongodb:// URI");
    assert_eq!(
        scheme, "mongodb",
        "the outage tests relay MONGODB_URI: use a mongodb:// URI"
    );
    let (hosts_part, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let credentials = hosts_part
        .rsplit_once('@')
        .map(|(c, _)| format!("{c}@"))
        .unwrap_or_default();
    let tail = if tail.is_empty() { "/" } else { tail };
    let joiner = if tail.contains('?') { "&" } else { "?" };
    format!("mongodb://{credentials}127.0.0.1:{port}{tail}{joiner}directConnection=true")
}

/// The first host of a URI (a standalone server, or the member the relay goes to).
pub fn host_port(uri: &str) -> String {
    let rest = uri.split("://").nth(1).unwrap_or(uri);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let host = rest.split(['/', '?', ',']).next().unwrap_or(rest);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:27017")
    }
}

/// A TCP relay to a real server that can be stopped (dropping every connection and
/// refusing new ones) and resumed on the same port.
struct Relay {
    port: u16,
    target: String,
    running: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = Relay {
            port: listener.local_addr().unwrap().port(),
            target,
            running: Arc::new(AtomicBool::new(true)),
            conns: Arc::default(),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&self, listener: TcpListener) {
        let (target, running, conns) = (
            self.target.clone(),
            self.running.clone(),
            self.conns.clone(),
        );
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
                conns.lock().unwrap().extend([client, server]);
            }
        });
    }

    fn stop(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50)); // the accept loop sees it
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    fn resume(&mut self) {
        self.running.store(true, Ordering::SeqCst);
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        self.serve(listener);
    }
}
