//! Users, devices and accounts in SQLite.

use super::*;

#[async_trait]
impl Directory for EmbeddedStore {
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
}

fn device_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Device> {
    Ok(Device {
        host: row.get(0)?,
        mac: row.get(1)?,
        last_seen: DateTime::from_timestamp_millis(row.get(2)?).unwrap_or_default(),
    })
}
