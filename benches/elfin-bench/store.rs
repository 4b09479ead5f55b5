//! Scenario 6: sightings of distinct devices persisted per second through the
//! persistence actor, on the embedded store and on MongoDB (the wire-protocol
//! stand-in of the tests, or `--mongodb-uri`), against the same store written
//! directly in batches of the same size; and store round trips per 1000 sightings
//! in steady state (devices already known).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use elfin_actors::persistence::{Flush, Persistence, Record};
use elfin_actors::store::embedded::EmbeddedStore;
use elfin_actors::store::mongo::{MongoStore, HOUSEKEEPING_COMMANDS};
use elfin_actors::store::{Directory, Recorded, Sighting, Sightings, Store, StoreError};

use crate::report::{Row, Target};

const BATCH: usize = 1000;
const UUID: &str = "bench-store-user";

fn sightings(n: usize, at_secs: i64) -> Vec<Sighting> {
    let at = DateTime::<Utc>::from_timestamp(at_secs, 0).unwrap();
    (0..n)
        .map(|i| Sighting {
            uuid: UUID.into(),
            mac: crate::net::mac(i).into(),
            host: format!("dev-{i}").into(),
            at,
        })
        .collect()
}

/// Sightings a second through the persistence actor, until all are written.
async fn through_persistence(store: Arc<dyn Sightings>, batch: Vec<Sighting>) -> f64 {
    let n = batch.len();
    let persistence = Persistence::new(store, Duration::from_secs(1), BATCH).start();
    let started = Instant::now();
    for s in batch {
        persistence.do_send(Record::Sighting(s));
    }
    while persistence.send(Flush).await.unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Sightings a second written straight to the store in batches of [`BATCH`].
async fn direct(store: &dyn Sightings, batch: &[Sighting]) -> f64 {
    let started = Instant::now();
    for chunk in batch.chunks(BATCH) {
        store.record(chunk).await.unwrap();
    }
    batch.len() as f64 / started.elapsed().as_secs_f64()
}

/// One backend: (sightings/s through persistence, directly, round trips per 1000).
async fn measure(
    store: Arc<dyn Sightings>,
    directory: &dyn Directory,
    n: usize,
    round_trips: impl Fn() -> usize,
) -> (f64, f64, f64) {
    directory.add_user("bench", UUID).await.unwrap();
    // First sightings insert the devices; steady state is what follows.
    through_persistence(store.clone(), sightings(n, 1_000)).await;
    let before = round_trips();
    let rate = through_persistence(store.clone(), sightings(n, 2_000)).await;
    let per_thousand = (round_trips() - before) as f64 * 1000.0 / n as f64;
    let base = direct(&*store, &sightings(n, 3_000)).await;
    (rate, base, per_thousand)
}

fn rows(backend: &str, n: usize, (rate, base, trips): (f64, f64, f64)) -> Vec<Row> {
    vec![
        Row::new(
            "store-writes",
            format!("{backend}: {n} distinct devices"),
            "sightings/s",
            rate,
            Some(base),
            Target::None,
        ),
        Row::new(
            "store-writes",
            format!("{backend}: round trips per 1000 sightings"),
            "",
            trips,
            None,
            Target::AtMost(2.0),
        ),
    ]
}

/// Sightings into the embedded store, counting its transactions (one per batch): the
/// one role the persistence actor writes through.
struct Counted {
    inner: Arc<dyn Sightings>,
    writes: AtomicUsize,
}

#[async_trait::async_trait]
impl Sightings for Counted {
    async fn record(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.record(batch).await
    }
    async fn record_existing(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.record_existing(batch).await
    }
}

/// The tests' MongoDB stand-in, if `tests/run.sh` prepared its virtualenv.
pub struct StandIn(Child);

impl StandIn {
    pub fn start(state: &std::path::Path) -> Option<(StandIn, String)> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let python = root.join("target/standin-venv/bin/python");
        if !python.exists() {
            return None;
        }
        let mut child = Command::new(python)
            .arg(root.join("tests/mongo/standin.py"))
            .args(["--port", "0", "--state"])
            .arg(state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take()?)
            .read_line(&mut line)
            .ok()?;
        let port = line.trim().strip_prefix("listening on ")?.to_owned();
        Some((
            StandIn(child),
            format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
        ))
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn store_writes(full: bool, mongodb_uri: Option<String>) -> Vec<Row> {
    actix_rt::System::new().block_on(async move {
        let mut out = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        let n = if full { 100_000 } else { 20_000 };
        let real = Arc::new(EmbeddedStore::open(&dir.path().join("bench.db")).unwrap());
        let embedded = Arc::new(Counted {
            inner: real.clone(),
            writes: AtomicUsize::new(0),
        });
        let counted = embedded.clone();
        let writes = || counted.writes.load(Ordering::Relaxed);
        out.extend(rows(
            "embedded",
            n,
            measure(embedded, &*real, n, writes).await,
        ));

        let standin;
        let uri = match mongodb_uri {
            Some(uri) => uri,
            None => match StandIn::start(&dir.path().join("standin.state")) {
                Some((process, uri)) => {
                    standin = process;
                    let _ = &standin;
                    uri
                }
                None => {
                    out.push(Row::new(
                        "store-writes",
                        "mongodb: skipped (run tests/run.sh once, or --mongodb-uri)",
                        "",
                        f64::NAN,
                        None,
                        Target::None,
                    ));
                    return out;
                }
            },
        };
        let mut options = mongodb::options::ClientOptions::parse(&uri).await.unwrap();
        let commands = Arc::new(Mutex::new(0usize));
        let seen = commands.clone();
        options.command_event_handler =
            Some(mongodb::event::EventHandler::callback(move |event| {
                if let mongodb::event::command::CommandEvent::Started(started) = event {
                    if !HOUSEKEEPING_COMMANDS.contains(&started.command_name.as_str()) {
                        *seen.lock().unwrap() += 1;
                    }
                }
            }));
        let database = format!("elfin_bench_{}", std::process::id());
        let mongo: Arc<dyn Store> = Arc::new(MongoStore::with_options(options, &database).unwrap());
        // The stand-in (mongomock in Python) takes milliseconds a sighting; a batch is
        // 1000, so fewer would not show round trips per 1000.
        let n = if full { 5_000 } else { 1_000 };
        out.extend(rows(
            "mongodb",
            n,
            measure(mongo.clone(), &*mongo, n, || *commands.lock().unwrap()).await,
        ));
        if let Ok(client) = mongodb::Client::with_uri_str(&uri).await {
            let _ = client.database(&database).drop().await;
        }
        out
    })
}
