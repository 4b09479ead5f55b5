//! The embedded store: SQLite in one local file, the default backend.
//!
//! Users and devices mirror the MongoDB collections of `docs/PROTOCOL.md` §5; a device
//! belongs to at most one user through its `owner` column, which is what `allDevices`
//! expresses there. The file is opened in WAL mode, so `elfin-gateway user add` can
//! write while the gateway runs.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::DateTime;
use rusqlite::{params, Connection, OptionalExtension};

use super::{Device, OwnedDevice, Recorded, Sighting, Store, StoreError, User};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    username TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY,
    mac TEXT NOT NULL UNIQUE,
    host TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    owner INTEGER REFERENCES users(id) ON DELETE SET NULL
);
CREATE INDEX IF NOT EXISTS devices_owner ON devices(owner);
";

pub struct EmbeddedStore {
    conn: Arc<Mutex<Connection>>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path).map_err(unavailable)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(unavailable)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(unavailable)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection on tokio's blocking pool.
    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| StoreError::Unavailable("database lock poisoned".into()))?;
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn device_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Device> {
    Ok(Device {
        host: row.get(0)?,
        mac: row.get(1)?,
        last_seen: DateTime::from_timestamp_millis(row.get(2)?).unwrap_or_default(),
    })
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn record(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
        let batch = batch.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let mut recorded = Recorded::default();
            {
                let mut user = tx
                    .prepare_cached("SELECT id FROM users WHERE uuid = ?1")
                    .map_err(unavailable)?;
                let mut upsert = tx
                    .prepare_cached(
                        "INSERT INTO devices (mac, host, last_seen_ms, owner) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (mac) DO UPDATE SET
                             host = excluded.host,
                             last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
                             owner = excluded.owner",
                    )
                    .map_err(unavailable)?;
                for s in &batch {
                    let owner: Option<i64> = user
                        .query_row([&*s.uuid], |r| r.get(0))
                        .optional()
                        .map_err(unavailable)?;
                    let Some(owner) = owner else {
                        recorded.unknown_user += 1;
                        continue;
                    };
                    upsert
                        .execute(params![&*s.mac, &*s.host, s.at.timestamp_millis(), owner])
                        .map_err(unavailable)?;
                    recorded.written += 1;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(recorded)
        })
        .await
    }

    async fn user_exists(&self, uuid: &str) -> Result<bool, StoreError> {
        let uuid = uuid.to_owned();
        self.with(move |conn| {
            conn.prepare_cached("SELECT 1 FROM users WHERE uuid = ?1")
                .and_then(|mut q| q.exists([uuid]))
                .map_err(unavailable)
        })
        .await
    }

    async fn user_devices(&self, uuid: &str) -> Result<Option<Vec<Device>>, StoreError> {
        let uuid = uuid.to_owned();
        self.with(move |conn| {
            let user: Option<i64> = conn
                .prepare_cached("SELECT id FROM users WHERE uuid = ?1")
                .and_then(|mut q| q.query_row([&uuid], |r| r.get(0)).optional())
                .map_err(unavailable)?;
            let Some(user) = user else { return Ok(None) };
            let mut q = conn
                .prepare_cached(
                    "SELECT host, mac, last_seen_ms FROM devices WHERE owner = ?1 ORDER BY id",
                )
                .map_err(unavailable)?;
            let devices = q
                .query_map([user], device_from_row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(unavailable)?;
            Ok(Some(devices))
        })
        .await
    }

    async fn add_user(&self, username: &str, uuid: &str) -> Result<(), StoreError> {
        let (username, uuid) = (username.to_owned(), uuid.to_owned());
        self.with(move |conn| {
            match conn.execute(
                "INSERT INTO users (uuid, username) VALUES (?1, ?2)",
                [&uuid, &username],
            ) {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::Conflict(format!(
                        "a user named {username:?} or with uuid {uuid} already exists"
                    )))
                }
                Err(e) => Err(unavailable(e)),
            }
        })
        .await
    }

    async fn users(&self) -> Result<Vec<User>, StoreError> {
        self.with(|conn| {
            let mut q = conn
                .prepare(
                    "SELECT u.uuid, u.username, u.admin, count(d.id) FROM users u
                     LEFT JOIN devices d ON d.owner = u.id GROUP BY u.id ORDER BY u.id",
                )
                .map_err(unavailable)?;
            let users = q
                .query_map([], |r| {
                    Ok(User {
                        uuid: r.get(0)?,
                        username: r.get(1)?,
                        admin: r.get(2)?,
                        devices: r.get::<_, i64>(3)? as usize,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(unavailable)?;
            Ok(users)
        })
        .await
    }

    async fn devices(&self, owner: Option<&str>) -> Result<Vec<OwnedDevice>, StoreError> {
        let owner = owner.map(str::to_owned);
        self.with(move |conn| {
            let mut q = conn
                .prepare(
                    "SELECT d.host, d.mac, d.last_seen_ms, u.uuid FROM devices d
                     LEFT JOIN users u ON u.id = d.owner
                     WHERE ?1 IS NULL OR u.uuid = ?1 ORDER BY d.id",
                )
                .map_err(unavailable)?;
            let devices = q
                .query_map([owner], |r| {
                    Ok(OwnedDevice {
                        device: device_from_row(r)?,
                        owner: r.get(3)?,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(unavailable)?;
            Ok(devices)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sighting(uuid: &str, mac: &str, host: &str, at_ms: i64) -> Sighting {
        Sighting {
            uuid: uuid.into(),
            mac: mac.into(),
            host: host.into(),
            at: DateTime::from_timestamp_millis(at_ms).unwrap(),
        }
    }

    fn open() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("sub/elfin.db")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn sightings_of_unknown_users_are_not_written() {
        let (_dir, store) = open();
        let got = store
            .record(&[sighting("nobody", "M1", "h", 1000)])
            .await
            .unwrap();
        assert_eq!(
            got,
            Recorded {
                written: 0,
                unknown_user: 1
            }
        );
        assert!(store.devices(None).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_new_device_is_inserted_and_listed_under_its_user() {
        let (_dir, store) = open();
        store.add_user("alice", "ua").await.unwrap();
        store
            .record(&[sighting("ua", "M1", "plc-1", 1000)])
            .await
            .unwrap();
        let devices = store.user_devices("ua").await.unwrap().unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].host, "plc-1");
        assert_eq!(devices[0].last_seen.timestamp_millis(), 1000);
        assert_eq!(store.user_devices("nobody").await.unwrap(), None);
    }

    #[tokio::test]
    async fn last_seen_never_moves_backwards_but_host_follows() {
        let (_dir, store) = open();
        store.add_user("alice", "ua").await.unwrap();
        store
            .record(&[sighting("ua", "M1", "old", 5000)])
            .await
            .unwrap();
        store
            .record(&[sighting("ua", "M1", "new", 4000)])
            .await
            .unwrap();
        let d = &store.user_devices("ua").await.unwrap().unwrap()[0];
        assert_eq!(
            (d.host.as_str(), d.last_seen.timestamp_millis()),
            ("new", 5000)
        );
    }

    #[tokio::test]
    async fn a_device_reporting_another_uuid_changes_owner() {
        let (_dir, store) = open();
        store.add_user("alice", "ua").await.unwrap();
        store.add_user("bob", "ub").await.unwrap();
        store
            .record(&[sighting("ua", "M1", "h", 1000)])
            .await
            .unwrap();
        store
            .record(&[sighting("ub", "M1", "h", 2000)])
            .await
            .unwrap();
        assert!(store.user_devices("ua").await.unwrap().unwrap().is_empty());
        assert_eq!(store.user_devices("ub").await.unwrap().unwrap().len(), 1);
        let users = store.users().await.unwrap();
        assert_eq!(
            users
                .iter()
                .map(|u| (u.username.as_str(), u.devices))
                .collect::<Vec<_>>(),
            [("alice", 0), ("bob", 1)]
        );
    }

    #[tokio::test]
    async fn duplicate_users_are_refused() {
        let (_dir, store) = open();
        store.add_user("alice", "ua").await.unwrap();
        assert!(matches!(
            store.add_user("alice", "other").await,
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.add_user("carol", "ua").await,
            Err(StoreError::Conflict(_))
        ));
    }

    #[tokio::test]
    async fn data_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("elfin.db");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            store.add_user("alice", "ua").await.unwrap();
            store
                .record(&[sighting("ua", "M1", "h", 1000)])
                .await
                .unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let listed = store.devices(Some("ua")).await.unwrap();
        assert_eq!(listed[0].owner.as_deref(), Some("ua"));
    }
}
