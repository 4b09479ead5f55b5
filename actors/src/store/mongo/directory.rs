//! Users, devices and accounts in MongoDB (`users`, `devices`), cached where the
//! gateway reads them on every connection.

use super::*;

#[async_trait]
impl Directory for MongoStore {
    async fn members(&self, with_devices: bool) -> Result<Members, StoreError> {
        self.check_reachable()?;
        let users = self
            .collect(
                self.users
                    .find(doc! {})
                    .projection(doc! { "uuid": 1, "username": 1, "admin": 1, "allDevices": 1 }),
            )
            .await?;
        let macs: HashMap<ObjectId, String> = if with_devices {
            let devices = self
                .collect(
                    self.devices
                        .find(doc! {})
                        .projection(doc! { "macAddress": 1 }),
                )
                .await?;
            devices
                .iter()
                .filter_map(|d| {
                    Some((
                        d.get_object_id("_id").ok()?,
                        d.get_str("macAddress").ok()?.to_owned(),
                    ))
                })
                .collect()
        } else {
            HashMap::new()
        };
        Ok(users
            .iter()
            .filter_map(|u| {
                let member = Member {
                    username: u.get_str("username").unwrap_or_default().to_owned(),
                    admin: u.get_bool("admin").unwrap_or(false),
                    devices: object_ids(u.get("allDevices"))
                        .iter()
                        .filter_map(|id| macs.get(id).cloned())
                        .collect(),
                };
                Some((u.get_str("uuid").ok()?.to_owned(), member))
            })
            .collect())
    }

    async fn remove_device(&self, mac: &str) -> Result<bool, StoreError> {
        let Some(device) = self
            .devices
            .find_one_and_delete(doc! { "macAddress": mac })
            .await
            .map_err(unavailable)?
        else {
            return Ok(false);
        };
        if let Ok(id) = device.get_object_id("_id") {
            self.users
                .update_many(
                    doc! { "allDevices": id },
                    doc! { "$pull": { "allDevices": id } },
                )
                .await
                .map_err(unavailable)?;
        }
        self.cache().devices.remove(mac);
        Ok(true)
    }

    async fn remove_user(&self, username: &str) -> Result<bool, StoreError> {
        let gone = self
            .users
            .delete_one(doc! { "username": username })
            .await
            .map_err(unavailable)?;
        Ok(gone.deleted_count > 0)
    }

    async fn set_admin(&self, username: &str, admin: bool) -> Result<bool, StoreError> {
        let set = self
            .users
            .update_one(
                doc! { "username": username },
                doc! { "$set": { "admin": admin } },
            )
            .await
            .map_err(unavailable)?;
        Ok(set.matched_count > 0)
    }

    fn forget_users(&self, uuids: &[String]) {
        let mut cache = self.cache();
        for uuid in uuids {
            cache.users.remove(uuid);
            cache.answers.remove(uuid);
        }
    }

    async fn user_exists(&self, uuid: &str) -> Result<bool, StoreError> {
        if let Some(user) = self.cache().users.get(uuid) {
            if user.read_at.elapsed() < USER_TTL {
                return Ok(true);
            }
        }
        self.check_reachable()?;
        Ok(self
            .read_users(&[uuid.to_owned()])
            .await?
            .contains_key(uuid))
    }

    async fn account(&self, key: AccountKey<'_>) -> Result<Option<Account>, StoreError> {
        self.check_reachable()?;
        let filter = match key {
            AccountKey::Uuid(uuid) => doc! { "uuid": uuid },
            AccountKey::Username(name) => doc! { "username": name },
        };
        let find = self
            .users
            .find(filter)
            .projection(doc! { "uuid": 1, "username": 1, "admin": 1 })
            .limit(1);
        let docs = self.collect(find).await?;
        Ok(docs.first().map(|d| Account {
            uuid: d.get_str("uuid").unwrap_or_default().to_owned(),
            username: d.get_str("username").unwrap_or_default().to_owned(),
            admin: d.get_bool("admin").unwrap_or(false),
        }))
    }

    async fn user_devices(&self, uuid: &str) -> Result<Option<Vec<Device>>, StoreError> {
        match self.fetch_user_devices(uuid).await {
            Ok(answer) => {
                let mut cache = self.cache();
                match &answer {
                    Some(devices) => cache.answers.insert(uuid.to_owned(), devices.clone()),
                    None => cache.answers.remove(uuid),
                };
                Ok(answer)
            }
            Err(e) => match self.cache().answers.get(uuid) {
                Some(devices) => Ok(Some(devices.clone())),
                None => Err(e),
            },
        }
    }

    async fn add_user(&self, username: &str, uuid: &str) -> Result<(), StoreError> {
        let taken = self
            .users
            .find_one(doc! { "$or": [ { "username": username }, { "uuid": uuid } ] })
            .await
            .map_err(unavailable)?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "a user named {username:?} or with uuid {uuid} already exists"
            )));
        }
        self.users
            .insert_one(doc! {
                "uuid": uuid,
                "username": username,
                "admin": false,
                "allDevices": [],
            })
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn users(&self) -> Result<Vec<User>, StoreError> {
        let docs = self
            .collect(
                self.users
                    .find(doc! {})
                    .projection(doc! { "uuid": 1, "username": 1, "admin": 1, "allDevices": 1 }),
            )
            .await?;
        Ok(docs
            .iter()
            .map(|d| User {
                uuid: d.get_str("uuid").unwrap_or_default().to_owned(),
                username: d.get_str("username").unwrap_or_default().to_owned(),
                admin: d.get_bool("admin").unwrap_or(false),
                devices: object_ids(d.get("allDevices")).len(),
            })
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pong = self.db.run_command(doc! { "ping": 1 }).await;
        self.health.watch(pong).map(drop).map_err(unavailable)
    }

    async fn devices(&self, owner: Option<&str>) -> Result<Vec<OwnedDevice>, StoreError> {
        let filter = owner.map_or_else(Document::new, |uuid| doc! { "uuid": uuid });
        let users = self
            .collect(
                self.users
                    .find(filter)
                    .projection(doc! { "uuid": 1, "allDevices": 1 }),
            )
            .await?;
        let mut owners: HashMap<ObjectId, String> = HashMap::new();
        let mut order: Vec<ObjectId> = Vec::new();
        for u in &users {
            for id in object_ids(u.get("allDevices")) {
                owners.insert(id, u.get_str("uuid").unwrap_or_default().to_owned());
                order.push(id);
            }
        }
        let mut found = if owner.is_some() {
            self.read_devices(&order).await?
        } else {
            let all = self.collect(self.devices.find(doc! {})).await?;
            let mut found = HashMap::new();
            for d in &all {
                if let (Ok(id), Some(device)) = (d.get_object_id("_id"), device_from_doc(d)) {
                    if !owners.contains_key(&id) {
                        order.push(id);
                    }
                    found.insert(id, device);
                }
            }
            found
        };
        Ok(order
            .iter()
            .filter_map(|id| {
                Some(OwnedDevice {
                    device: found.remove(id)?,
                    owner: owners.get(id).cloned(),
                })
            })
            .collect())
    }
}
