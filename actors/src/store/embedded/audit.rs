//! The audit trail in SQLite: `audit_tunnels`, `audit_devices`, `audit_refusals`.

use super::*;

#[async_trait]
impl AuditLog for EmbeddedStore {
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
