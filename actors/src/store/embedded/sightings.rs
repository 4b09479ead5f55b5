//! Sightings in SQLite: a batch in one transaction, last-seen never moving back.

use super::*;

#[async_trait]
impl Sightings for EmbeddedStore {
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
}
