//! Sightings in MongoDB: a batch in one `update` round trip in steady state, device
//! ids and users from the cache, ownership moves in one more.

use super::*;

impl MongoStore {
    /// Writes the batch's devices (§5 step 1) in one round trip: an upsert per device,
    /// last-seen by `$max`. Returns each device's id (from the cache or the upsert) and
    /// the indexes of the writes the server refused.
    async fn upsert_devices(
        &self,
        known: &[(&Sighting, &CachedUser)],
    ) -> Result<(Vec<Option<ObjectId>>, Vec<usize>), StoreError> {
        let unknown_macs: Vec<&str> = {
            let cache = self.cache();
            known
                .iter()
                .map(|(s, _)| &*s.mac)
                .filter(|mac| !cache.devices.contains_key(*mac))
                .collect()
        };
        self.read_device_ids(unknown_macs).await?;
        let updates: Vec<Document> = known
            .iter()
            .map(|(s, _)| {
                doc! {
                    "q": { "macAddress": &*s.mac },
                    "u": {
                        "$set": { "hostName": &*s.host },
                        "$max": { "lastSeenDate": bson::DateTime::from_chrono(s.at) },
                        "$setOnInsert": { "__v": 0_i32 },
                    },
                    "upsert": true,
                }
            })
            .collect();
        let (reply, refused) = self
            .write(doc! { "update": "devices", "updates": updates, "ordered": false })
            .await?;
        let upserted = reply
            .get_array("upserted")
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut cache = self.cache();
        for u in upserted.iter().filter_map(|u| u.as_document()) {
            let index = u.get("index").and_then(bson_usize);
            if let (Some((s, _)), Ok(id)) =
                (index.and_then(|i| known.get(i)), u.get_object_id("_id"))
            {
                cache.devices.insert(s.mac.to_string(), id);
            }
        }
        let ids = known
            .iter()
            .map(|(s, _)| cache.devices.get(&*s.mac).copied())
            .collect();
        Ok((ids, refused))
    }

    /// Gives each (user, device) pair's device to its user (§5 steps 2-3): pulled from
    /// whoever else lists it, added to the user's `allDevices`; one round trip.
    async fn give_devices(&self, moves: Vec<(ObjectId, ObjectId)>) -> Result<(), StoreError> {
        if moves.is_empty() {
            return Ok(());
        }
        let statements: Vec<Document> = moves
            .iter()
            .flat_map(|&(user, device)| {
                [
                    doc! {
                        "q": { "allDevices": device, "_id": { "$ne": user } },
                        "u": { "$pull": { "allDevices": device } },
                        "multi": true,
                    },
                    doc! {
                        "q": { "_id": user },
                        "u": { "$addToSet": { "allDevices": device } },
                    },
                ]
            })
            .collect();
        self.write(doc! { "update": "users", "updates": statements, "ordered": false })
            .await?;
        let mut cache = self.cache();
        for (user_id, device) in moves {
            for user in cache.users.values_mut() {
                if user.id == user_id {
                    user.devices.insert(device);
                } else {
                    user.devices.remove(&device);
                }
            }
        }
        Ok(())
    }
}

/// The sightings whose user is in `users`, each with its user.
fn of_known_users<'a>(
    batch: &'a [Sighting],
    users: &'a HashMap<String, CachedUser>,
) -> Vec<(&'a Sighting, &'a CachedUser)> {
    batch
        .iter()
        .filter_map(|s| users.get(&*s.uuid).map(|u| (s, u)))
        .collect()
}

#[async_trait]
impl Sightings for MongoStore {
    async fn record(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
        let users = self.batch_users(batch).await?;
        let known = of_known_users(batch, &users);
        let mut recorded = Recorded {
            written: known.len(),
            unknown_user: batch.len() - known.len(),
            refused: 0,
        };
        if known.is_empty() {
            return Ok(recorded);
        }
        let (ids, refused) = self.upsert_devices(&known).await?;
        recorded.refused = refused.len();
        recorded.written -= refused.len();
        // Ownership (§5 steps 2-3): a device not yet in its user's allDevices moves.
        let mut moves: Vec<(ObjectId, ObjectId)> = Vec::new();
        for (index, ((_, user), id)) in known.iter().zip(&ids).enumerate() {
            if refused.contains(&index) {
                continue;
            }
            let Some(id) = *id else {
                recorded.written -= 1; // cannot happen: upserted or found above
                continue;
            };
            if !user.devices.contains(&id) && !moves.contains(&(user.id, id)) {
                moves.push((user.id, id));
            }
        }
        self.give_devices(moves).await?;
        Ok(recorded)
    }

    async fn record_existing(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
        let users = self.batch_users(batch).await?;
        let known = of_known_users(batch, &users);
        let mut recorded = Recorded {
            written: 0,
            unknown_user: batch.len() - known.len(),
            refused: 0,
        };
        if known.is_empty() {
            return Ok(recorded);
        }
        // Only a device its user lists: never inserted, never moved.
        let updates: Vec<Document> = known
            .iter()
            .map(|(s, user)| {
                let listed: Vec<ObjectId> = user.devices.iter().copied().collect();
                doc! {
                    "q": { "macAddress": &*s.mac, "_id": { "$in": listed } },
                    "u": {
                        "$set": { "hostName": &*s.host },
                        "$max": { "lastSeenDate": bson::DateTime::from_chrono(s.at) },
                    },
                    "upsert": false,
                }
            })
            .collect();
        let (reply, refused) = self
            .write(doc! { "update": "devices", "updates": updates, "ordered": false })
            .await?;
        let matched = reply.get("n").and_then(bson_usize).unwrap_or(0);
        recorded.written = matched;
        recorded.refused = known.len().saturating_sub(matched).max(refused.len());
        Ok(recorded)
    }
}
