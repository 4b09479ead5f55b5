//! The audit trail in MongoDB: the gateway's own collections (`gatewayAudit…`),
//! which the Web UI ignores.

use super::*;

#[async_trait]
impl AuditLog for MongoStore {
    async fn write_audit(&self, batch: &AuditBatch) -> Result<(), StoreError> {
        if !batch.tunnels.is_empty() {
            let updates: Vec<Document> = batch
                .tunnels
                .iter()
                .map(|t| {
                    let mut fields = tunnel_doc(t);
                    fields.remove("_id");
                    doc! { "q": { "_id": &t.id }, "u": { "$set": fields }, "upsert": true }
                })
                .collect();
            self.write(doc! { "update": AUDIT_TUNNELS, "updates": updates, "ordered": false })
                .await?;
        }
        for (collection, documents) in [
            (
                AUDIT_DEVICES,
                batch.events.iter().map(event_doc).collect::<Vec<_>>(),
            ),
            (
                AUDIT_REFUSALS,
                batch.refusals.iter().map(refusal_doc).collect(),
            ),
        ] {
            if !documents.is_empty() {
                self.write(doc! { "insert": collection, "documents": documents, "ordered": false })
                    .await?;
            }
        }
        Ok(())
    }

    async fn audit_tunnels(&self, filter: &Filter) -> Result<Vec<TunnelRecord>, StoreError> {
        let mut clauses = Vec::new();
        if let Some(uuid) = &filter.uuid {
            clauses.push(doc! { "uuid": uuid });
        }
        if let Some(mac) = &filter.mac {
            clauses.push(doc! { "$or": [ { "device": mac }, { "peerDevice": mac } ] });
        }
        if let Some(since) = filter.since {
            let since = bson::DateTime::from_chrono(since);
            clauses.push(doc! { "$or": [ { "closed": null }, { "closed": { "$gte": since } } ] });
        }
        let docs = self
            .newest_first(&self.audit_tunnels, clauses, "opened", filter)
            .await?;
        Ok(docs.iter().filter_map(tunnel_from_doc).collect())
    }

    async fn audit_devices(&self, filter: &Filter) -> Result<Vec<DeviceEvent>, StoreError> {
        let clauses = at_clauses(filter, "mac");
        let docs = self
            .newest_first(&self.audit_devices, clauses, "at", filter)
            .await?;
        Ok(docs.iter().filter_map(event_from_doc).collect())
    }

    async fn audit_refusals(&self, filter: &Filter) -> Result<Vec<RefusalRecord>, StoreError> {
        let clauses = at_clauses(filter, "device");
        let docs = self
            .newest_first(&self.audit_refusals, clauses, "at", filter)
            .await?;
        Ok(docs.iter().filter_map(refusal_from_doc).collect())
    }

    async fn audit_size(&self) -> Result<AuditSize, StoreError> {
        self.check_reachable()?;
        let count = |coll: &Collection<Document>| {
            let coll = coll.clone();
            async move {
                self.health
                    .watch(coll.estimated_document_count().await)
                    .map_err(unavailable)
            }
        };
        Ok(AuditSize {
            tunnels: count(&self.audit_tunnels).await?,
            device_events: count(&self.audit_devices).await?,
            refusals: count(&self.audit_refusals).await?,
        })
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let before = bson::DateTime::from_chrono(before);
        let tunnels = self
            .health
            .watch(
                self.audit_tunnels
                    .delete_many(doc! { "$or": [
                        { "closed": { "$lt": before } },
                        { "closed": null, "opened": { "$lt": before } },
                    ] })
                    .await,
            )
            .map_err(unavailable)?;
        let mut deleted = tunnels.deleted_count;
        for coll in [&self.audit_devices, &self.audit_refusals] {
            let gone = self
                .health
                .watch(coll.delete_many(doc! { "at": { "$lt": before } }).await)
                .map_err(unavailable)?;
            deleted += gone.deleted_count;
        }
        Ok(deleted)
    }
}

fn tunnel_doc(t: &TunnelRecord) -> Document {
    doc! {
        "_id": &t.id,
        "node": &t.node,
        "uuid": &t.uuid,
        "device": &t.device,
        "deviceAddress": &t.device_addr,
        "peerDevice": t.peer_device.as_deref(),
        "clientAddress": &t.client_addr,
        "clientCertificate": t.client_cert.as_deref(),
        "clientCertificateSerial": t.client_cert_serial.as_deref(),
        "opened": bson::DateTime::from_chrono(t.opened),
        "closed": t.closed.map(bson::DateTime::from_chrono),
        "cause": t.cause.as_deref(),
        "bytesToDevice": i64::try_from(t.to_device).unwrap_or(i64::MAX),
        "bytesFromDevice": i64::try_from(t.from_device).unwrap_or(i64::MAX),
    }
}

fn tunnel_from_doc(d: &Document) -> Option<TunnelRecord> {
    let text = |key: &str| d.get_str(key).ok().map(str::to_owned);
    let count = |key: &str| d.get(key).and_then(bson_usize).unwrap_or(0) as u64;
    Some(TunnelRecord {
        id: text("_id")?,
        node: text("node").unwrap_or_default(),
        uuid: text("uuid").unwrap_or_default(),
        device: text("device").unwrap_or_default(),
        device_addr: text("deviceAddress").unwrap_or_default(),
        peer_device: text("peerDevice"),
        client_addr: text("clientAddress").unwrap_or_default(),
        client_cert: text("clientCertificate"),
        client_cert_serial: text("clientCertificateSerial"),
        opened: d.get_datetime("opened").ok()?.to_chrono(),
        closed: d.get_datetime("closed").ok().map(|c| c.to_chrono()),
        cause: text("cause"),
        to_device: count("bytesToDevice"),
        from_device: count("bytesFromDevice"),
    })
}

fn event_doc(e: &DeviceEvent) -> Document {
    doc! {
        "at": bson::DateTime::from_chrono(e.at),
        "node": &e.node,
        "uuid": &e.uuid,
        "mac": &e.mac,
        "host": &e.host,
        "change": e.change.label(),
        "address": &e.address,
        "cause": e.cause.as_deref(),
    }
}

fn event_from_doc(d: &Document) -> Option<DeviceEvent> {
    let text = |key: &str| d.get_str(key).ok().map(str::to_owned);
    Some(DeviceEvent {
        at: d.get_datetime("at").ok()?.to_chrono(),
        node: text("node").unwrap_or_default(),
        uuid: text("uuid").unwrap_or_default(),
        mac: text("mac").unwrap_or_default(),
        host: text("host").unwrap_or_default(),
        change: DeviceChange::parse(d.get_str("change").ok()?)?,
        address: text("address").unwrap_or_default(),
        cause: text("cause"),
    })
}

/// The filter's clauses for an audit collection of records at one time (`at`),
/// the device named in `device_field`.
fn at_clauses(filter: &Filter, device_field: &str) -> Vec<Document> {
    let mut clauses = Vec::new();
    if let Some(uuid) = &filter.uuid {
        clauses.push(doc! { "uuid": uuid });
    }
    if let Some(mac) = &filter.mac {
        clauses.push(doc! { device_field: mac });
    }
    if let Some(since) = filter.since {
        clauses.push(doc! { "at": { "$gte": bson::DateTime::from_chrono(since) } });
    }
    clauses
}

fn refusal_doc(r: &RefusalRecord) -> Document {
    doc! {
        "at": bson::DateTime::from_chrono(r.at),
        "node": &r.node,
        "request": r.request.label(),
        "uuid": r.uuid.as_deref(),
        "device": r.device.as_deref(),
        "reason": &r.reason,
        "detail": &r.detail,
        "source": &r.source,
        "certificate": r.certificate.as_deref(),
        "certificateSerial": r.certificate_serial.as_deref(),
    }
}

fn refusal_from_doc(d: &Document) -> Option<RefusalRecord> {
    let text = |key: &str| d.get_str(key).ok().map(str::to_owned);
    Some(RefusalRecord {
        at: d.get_datetime("at").ok()?.to_chrono(),
        node: text("node").unwrap_or_default(),
        request: Attempt::parse(d.get_str("request").ok()?)?,
        uuid: text("uuid"),
        device: text("device"),
        reason: text("reason").unwrap_or_default(),
        detail: text("detail").unwrap_or_default(),
        source: text("source").unwrap_or_default(),
        certificate: text("certificate"),
        certificate_serial: text("certificateSerial"),
    })
}
