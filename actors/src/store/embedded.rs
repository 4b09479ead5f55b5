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
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    Account, AccountKey, Device, Member, Members, OwnedDevice, Recorded, Sighting, Store,
    StoreError, User,
};
use crate::audit::{
    Attempt, AuditBatch, AuditSize, DeviceChange, DeviceEvent, Filter, RefusalRecord, TunnelRecord,
};

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
CREATE TABLE IF NOT EXISTS audit_tunnels (
    id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    uuid TEXT NOT NULL,
    device TEXT NOT NULL,
    device_addr TEXT NOT NULL,
    peer_device TEXT,
    client_addr TEXT NOT NULL,
    client_cert TEXT,
    client_cert_serial TEXT,
    opened_ms INTEGER NOT NULL,
    closed_ms INTEGER,
    cause TEXT,
    to_device INTEGER NOT NULL,
    from_device INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_tunnels_opened ON audit_tunnels(opened_ms);
CREATE INDEX IF NOT EXISTS audit_tunnels_uuid ON audit_tunnels(uuid, opened_ms);
CREATE INDEX IF NOT EXISTS audit_tunnels_device ON audit_tunnels(device, opened_ms);
CREATE INDEX IF NOT EXISTS audit_tunnels_peer ON audit_tunnels(peer_device, opened_ms);
CREATE TABLE IF NOT EXISTS audit_devices (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    node TEXT NOT NULL,
    uuid TEXT NOT NULL,
    mac TEXT NOT NULL,
    host TEXT NOT NULL,
    change TEXT NOT NULL,
    address TEXT NOT NULL,
    cause TEXT
);
CREATE INDEX IF NOT EXISTS audit_devices_at ON audit_devices(at_ms);
CREATE INDEX IF NOT EXISTS audit_devices_uuid ON audit_devices(uuid, at_ms);
CREATE INDEX IF NOT EXISTS audit_devices_mac ON audit_devices(mac, at_ms);
CREATE TABLE IF NOT EXISTS audit_refusals (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    node TEXT NOT NULL,
    request TEXT NOT NULL,
    uuid TEXT,
    device TEXT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    source TEXT NOT NULL,
    certificate TEXT,
    certificate_serial TEXT
);
CREATE INDEX IF NOT EXISTS audit_refusals_at ON audit_refusals(at_ms);
CREATE INDEX IF NOT EXISTS audit_refusals_uuid ON audit_refusals(uuid, at_ms);
CREATE INDEX IF NOT EXISTS audit_refusals_device ON audit_refusals(device, at_ms);
";

/// Columns added since a table was first made: (table, column, type).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[("audit_tunnels", "client_cert_serial", "TEXT")];

/// Adds the columns an older database file lacks.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, kind) in ADDED_COLUMNS {
        let has: bool = conn.query_row(
            &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
            [column],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

pub struct EmbeddedStore {
    conn: Arc<Mutex<Connection>>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let cannot = |e: &dyn std::fmt::Display| {
            StoreError::Unusable(format!(
                "cannot open the database file {}: {e}",
                path.display()
            ))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| cannot(&e))?;
        }
        let conn = Connection::open(path).map_err(|e| cannot(&e))?;
        let setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(Duration::from_secs(5))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.execute_batch(SCHEMA)?;
            migrate(&conn)
        };
        setup().map_err(|e| cannot(&e))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The audit rows `select` reads for `filter` (its parameters: uuid, MAC, since,
    /// limit and offset, as `?1`..`?5`), each made by `row`.
    async fn newest_first<T: Send + 'static>(
        &self,
        select: &'static str,
        filter: &Filter,
        row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let (uuid, mac, since, limit, offset) = filter_params(filter);
        self.with(move |conn| {
            let mut q = conn.prepare_cached(select).map_err(unavailable)?;
            let rows = q
                .query_map(params![uuid, mac, since, limit, offset], row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(unavailable)?;
            Ok(rows)
        })
        .await
    }

    /// Writes each sighting of a stored user with `write` (its parameters: MAC, host,
    /// last-seen in ms, the owner's row id) in one transaction; one that changes no
    /// row counts as refused.
    async fn write_sightings(
        &self,
        batch: &[Sighting],
        write: &'static str,
    ) -> Result<Recorded, StoreError> {
        let batch = batch.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let mut recorded = Recorded::default();
            {
                let mut user = tx
                    .prepare_cached("SELECT id FROM users WHERE uuid = ?1")
                    .map_err(unavailable)?;
                let mut write = tx.prepare_cached(write).map_err(unavailable)?;
                for s in &batch {
                    let owner: Option<i64> = user
                        .query_row([&*s.uuid], |r| r.get(0))
                        .optional()
                        .map_err(unavailable)?;
                    let Some(owner) = owner else {
                        recorded.unknown_user += 1;
                        continue;
                    };
                    let changed = write
                        .execute(params![&*s.mac, &*s.host, s.at.timestamp_millis(), owner])
                        .map_err(unavailable)?;
                    match changed {
                        0 => recorded.refused += 1,
                        _ => recorded.written += 1,
                    }
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(recorded)
        })
        .await
    }

    /// Runs one statement with `values`; whether it changed a row.
    async fn changes(
        &self,
        statement: &'static str,
        values: Vec<rusqlite::types::Value>,
    ) -> Result<bool, StoreError> {
        self.with(move |conn| {
            conn.execute(statement, rusqlite::params_from_iter(values))
                .map(|n| n > 0)
                .map_err(unavailable)
        })
        .await
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
                .map_err(|_| StoreError::Permanent("database lock poisoned".into()))?;
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Transient(e.to_string()))?
    }
}

/// Busy, locked, out of space or an I/O error may pass; anything else (a constraint,
/// a corrupt file) will not.
fn unavailable(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(
            DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull | FileLockingProtocolFailed,
        ) => StoreError::Transient(e.to_string()),
        _ => StoreError::Permanent(e.to_string()),
    }
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
        self.write_sightings(
            batch,
            "INSERT INTO devices (mac, host, last_seen_ms, owner) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (mac) DO UPDATE SET
                 host = excluded.host,
                 last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
                 owner = excluded.owner",
        )
        .await
    }

    async fn record_existing(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
        self.write_sightings(
            batch,
            "UPDATE devices SET host = ?2, last_seen_ms = max(last_seen_ms, ?3)
             WHERE mac = ?1 AND owner = ?4",
        )
        .await
    }

    async fn members(&self, with_devices: bool) -> Result<Members, StoreError> {
        self.with(move |conn| {
            let mut members = Members::new();
            let mut users = conn
                .prepare_cached("SELECT uuid, username, admin FROM users")
                .map_err(unavailable)?;
            let rows = users
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        Member {
                            username: r.get(1)?,
                            admin: r.get(2)?,
                            devices: Default::default(),
                        },
                    ))
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(unavailable)?;
            members.extend(rows);
            if with_devices {
                let mut devices = conn
                    .prepare_cached(
                        "SELECT u.uuid, d.mac FROM devices d JOIN users u ON u.id = d.owner",
                    )
                    .map_err(unavailable)?;
                let rows = devices
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                    .map_err(unavailable)?;
                for (uuid, mac) in rows {
                    if let Some(member) = members.get_mut(&uuid) {
                        member.devices.insert(mac);
                    }
                }
            }
            Ok(members)
        })
        .await
    }

    async fn remove_device(&self, mac: &str) -> Result<bool, StoreError> {
        self.changes(
            "DELETE FROM devices WHERE mac = ?1",
            vec![mac.to_owned().into()],
        )
        .await
    }

    async fn remove_user(&self, username: &str) -> Result<bool, StoreError> {
        let name = username.to_owned().into();
        self.changes("DELETE FROM users WHERE username = ?1", vec![name])
            .await
    }

    async fn set_admin(&self, username: &str, admin: bool) -> Result<bool, StoreError> {
        let values = vec![username.to_owned().into(), i64::from(admin).into()];
        self.changes("UPDATE users SET admin = ?2 WHERE username = ?1", values)
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

    async fn account(&self, key: AccountKey<'_>) -> Result<Option<Account>, StoreError> {
        let (query, value) = match key {
            AccountKey::Uuid(uuid) => (
                "SELECT uuid, username, admin FROM users WHERE uuid = ?1",
                uuid,
            ),
            AccountKey::Username(name) => (
                "SELECT uuid, username, admin FROM users WHERE username = ?1",
                name,
            ),
        };
        let value = value.to_owned();
        self.with(move |conn| {
            conn.prepare_cached(query)
                .and_then(|mut q| {
                    q.query_row([value], |r| {
                        Ok(Account {
                            uuid: r.get(0)?,
                            username: r.get(1)?,
                            admin: r.get(2)?,
                        })
                    })
                    .optional()
                })
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

    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT count(*) FROM users", [], |_| Ok(()))
                .map_err(|e| StoreError::Transient(e.to_string()))
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

    async fn write_audit(&self, batch: &AuditBatch) -> Result<(), StoreError> {
        let batch = batch.clone();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            {
                let mut tunnel = tx
                    .prepare_cached(
                        "INSERT INTO audit_tunnels (id, node, uuid, device, device_addr,
                             peer_device, client_addr, client_cert, client_cert_serial,
                             opened_ms, closed_ms, cause, to_device, from_device)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                         ON CONFLICT (id) DO UPDATE SET
                             closed_ms = excluded.closed_ms, cause = excluded.cause,
                             to_device = excluded.to_device,
                             from_device = excluded.from_device",
                    )
                    .map_err(unavailable)?;
                for t in &batch.tunnels {
                    tunnel
                        .execute(params![
                            t.id,
                            t.node,
                            t.uuid,
                            t.device,
                            t.device_addr,
                            t.peer_device,
                            t.client_addr,
                            t.client_cert,
                            t.client_cert_serial,
                            t.opened.timestamp_millis(),
                            t.closed.map(|c| c.timestamp_millis()),
                            t.cause,
                            i64::try_from(t.to_device).unwrap_or(i64::MAX),
                            i64::try_from(t.from_device).unwrap_or(i64::MAX),
                        ])
                        .map_err(unavailable)?;
                }
                let mut event = tx
                    .prepare_cached(
                        "INSERT INTO audit_devices (at_ms, node, uuid, mac, host, change,
                             address, cause)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )
                    .map_err(unavailable)?;
                for e in &batch.events {
                    event
                        .execute(params![
                            e.at.timestamp_millis(),
                            e.node,
                            e.uuid,
                            e.mac,
                            e.host,
                            e.change.label(),
                            e.address,
                            e.cause,
                        ])
                        .map_err(unavailable)?;
                }
                let mut refusal = tx
                    .prepare_cached(
                        "INSERT INTO audit_refusals (at_ms, node, request, uuid, device,
                             reason, detail, source, certificate, certificate_serial)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    )
                    .map_err(unavailable)?;
                for r in &batch.refusals {
                    refusal
                        .execute(params![
                            r.at.timestamp_millis(),
                            r.node,
                            r.request.label(),
                            r.uuid,
                            r.device,
                            r.reason,
                            r.detail,
                            r.source,
                            r.certificate,
                            r.certificate_serial,
                        ])
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn audit_tunnels(&self, filter: &Filter) -> Result<Vec<TunnelRecord>, StoreError> {
        self.newest_first(
            "SELECT id, node, uuid, device, device_addr, peer_device, client_addr,
                 client_cert, opened_ms, closed_ms, cause, to_device, from_device,
                 client_cert_serial
             FROM audit_tunnels
             WHERE (?1 IS NULL OR uuid = ?1)
               AND (?2 IS NULL OR device = ?2 OR peer_device = ?2)
               AND (?3 IS NULL OR closed_ms IS NULL OR closed_ms >= ?3)
             ORDER BY opened_ms DESC, id DESC LIMIT ?4 OFFSET ?5",
            filter,
            |r| {
                Ok(TunnelRecord {
                    id: r.get(0)?,
                    node: r.get(1)?,
                    uuid: r.get(2)?,
                    device: r.get(3)?,
                    device_addr: r.get(4)?,
                    peer_device: r.get(5)?,
                    client_addr: r.get(6)?,
                    client_cert: r.get(7)?,
                    client_cert_serial: r.get(13)?,
                    opened: time(r.get(8)?),
                    closed: r.get::<_, Option<i64>>(9)?.map(time),
                    cause: r.get(10)?,
                    to_device: r.get::<_, i64>(11)?.max(0) as u64,
                    from_device: r.get::<_, i64>(12)?.max(0) as u64,
                })
            },
        )
        .await
    }

    async fn audit_devices(&self, filter: &Filter) -> Result<Vec<DeviceEvent>, StoreError> {
        self.newest_first(
            "SELECT at_ms, node, uuid, mac, host, change, address, cause
             FROM audit_devices
             WHERE (?1 IS NULL OR uuid = ?1) AND (?2 IS NULL OR mac = ?2)
               AND (?3 IS NULL OR at_ms >= ?3)
             ORDER BY at_ms DESC, id DESC LIMIT ?4 OFFSET ?5",
            filter,
            |r| {
                Ok(DeviceEvent {
                    at: time(r.get(0)?),
                    node: r.get(1)?,
                    uuid: r.get(2)?,
                    mac: r.get(3)?,
                    host: r.get(4)?,
                    change: DeviceChange::parse(&r.get::<_, String>(5)?)
                        .unwrap_or(DeviceChange::Offline),
                    address: r.get(6)?,
                    cause: r.get(7)?,
                })
            },
        )
        .await
    }

    async fn audit_refusals(&self, filter: &Filter) -> Result<Vec<RefusalRecord>, StoreError> {
        self.newest_first(
            "SELECT at_ms, node, request, uuid, device, reason, detail, source,
                 certificate, certificate_serial
             FROM audit_refusals
             WHERE (?1 IS NULL OR uuid = ?1) AND (?2 IS NULL OR device = ?2)
               AND (?3 IS NULL OR at_ms >= ?3)
             ORDER BY at_ms DESC, id DESC LIMIT ?4 OFFSET ?5",
            filter,
            |r| {
                Ok(RefusalRecord {
                    at: time(r.get(0)?),
                    node: r.get(1)?,
                    request: Attempt::parse(&r.get::<_, String>(2)?).unwrap_or(Attempt::Query),
                    uuid: r.get(3)?,
                    device: r.get(4)?,
                    reason: r.get(5)?,
                    detail: r.get(6)?,
                    source: r.get(7)?,
                    certificate: r.get(8)?,
                    certificate_serial: r.get(9)?,
                })
            },
        )
        .await
    }

    async fn audit_size(&self) -> Result<AuditSize, StoreError> {
        self.with(|conn| {
            let count = |table: &str| -> Result<u64, StoreError> {
                conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n.max(0) as u64)
                .map_err(unavailable)
            };
            Ok(AuditSize {
                tunnels: count("audit_tunnels")?,
                device_events: count("audit_devices")?,
                refusals: count("audit_refusals")?,
            })
        })
        .await
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let before = before.timestamp_millis();
        self.with(move |conn| {
            let tunnels = conn
                .execute(
                    "DELETE FROM audit_tunnels WHERE coalesce(closed_ms, opened_ms) < ?1",
                    [before],
                )
                .map_err(unavailable)?;
            let events = conn
                .execute("DELETE FROM audit_devices WHERE at_ms < ?1", [before])
                .map_err(unavailable)?;
            let refusals = conn
                .execute("DELETE FROM audit_refusals WHERE at_ms < ?1", [before])
                .map_err(unavailable)?;
            Ok((tunnels + events + refusals) as u64)
        })
        .await
    }
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The filter's parameters: uuid, mac, since (ms), limit, offset.
fn filter_params(f: &Filter) -> (Option<String>, Option<String>, Option<i64>, i64, i64) {
    (
        f.uuid.clone(),
        f.mac.clone(),
        f.since.map(|t| t.timestamp_millis()),
        i64::try_from(f.limit).unwrap_or(i64::MAX),
        i64::try_from(f.offset).unwrap_or(i64::MAX),
    )
}

/// The rules every store follows are tested once for both backends, in the
/// workspace's `tests/store.rs`; here is what is particular to the file.
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

    #[test]
    fn missing_directories_are_created_and_an_impossible_path_is_unusable() {
        let dir = tempfile::tempdir().unwrap();
        assert!(EmbeddedStore::open(&dir.path().join("a/b/elfin.db")).is_ok());
        let file = dir.path().join("a/b/elfin.db");
        let under_a_file = file.join("elfin.db");
        assert!(matches!(
            EmbeddedStore::open(&under_a_file),
            Err(StoreError::Unusable(e)) if e.contains(&*under_a_file.to_string_lossy())
        ));
    }

    #[test]
    fn busy_and_io_errors_are_transient_constraints_are_not() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(unavailable(busy).is_transient());
        let constraint = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
            None,
        );
        assert!(!unavailable(constraint).is_transient());
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
