//! The embedded store: SQLite in one local file, the default backend.
//!
//! Users and devices mirror the MongoDB collections of `docs/PROTOCOL.md` §5; a device
//! belongs to at most one user through its `owner` column, which is what `allDevices`
//! expresses there. The file is opened in WAL mode, so `elfin-gateway user add` can
//! write while the gateway runs.
//!
//! One file per role: sightings (`sightings.rs`), users and devices
//! (`directory.rs`), the audit trail (`audit.rs`); here the schema and its
//! migration, the connection and the blocking-pool calls they share.

mod audit;
mod directory;
mod sightings;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    Account, AccountKey, AuditLog, Device, Directory, Member, Members, OwnedDevice, Recorded,
    Sighting, Sightings, StoreError, User,
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

/// The rules every store follows are tested once for both backends, in the
/// workspace's `tests/store.rs`; here is what is particular to the file.
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
