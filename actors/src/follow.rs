//! The gateway follows its database: users and devices removed, and admin flags
//! changed, by any writer of the shared collections (`elfin-gateway user remove`,
//! `device remove`, `user admin`, the Web UI) take effect within [`FOLLOW_EVERY`]
//! plus a batch, not only for the next connection.
//!
//! The [`Follower`] re-reads every stored user (and under `auth.devices =
//! "registered"` their devices' MACs) in one bounded read per period — never a read
//! per message — and compares with the last read:
//! - a user that is gone: its live devices are closed ("its user was removed from the
//!   database"), and the user caches forget it, so it is refused from then on;
//! - a user whose admin flag changed: the caches forget it;
//! - under "registered": each user's device list is replaced by the stored one (new
//!   devices are admitted, removed ones refused), and a live device that is no longer
//!   stored as its user's is closed. Its row is never written back: the persistence
//!   actor only updates devices that are stored ([`crate::store::Store::record_existing`]).
//!
//! A read that fails changes nothing (the last read stands) and is retried next period.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::device::DeviceKey;
use crate::registry::{AllLive, DeviceRegistry, Withdraw};
use crate::store::{Members, Store};
use crate::tenants::Tenants;
use crate::users::UserDirectory;

/// How often the users (and registered devices) are read again.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(5);

pub struct Follower {
    store: Arc<dyn Store>,
    registry: Addr<DeviceRegistry>,
    tenants: Arc<Tenants>,
    users: Arc<UserDirectory>,
    /// `auth.devices = "registered"`: devices are followed too.
    registered: bool,
    /// `auth.require_known_user`: a live device of a user that is not stored cannot
    /// be a guest's, so it is closed even if no read saw the user before.
    known_users_only: bool,
    last: Option<Members>,
    reading: bool,
}

impl Follower {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Addr<DeviceRegistry>,
        tenants: Arc<Tenants>,
        users: Arc<UserDirectory>,
        registered: bool,
        known_users_only: bool,
    ) -> Self {
        Self {
            store,
            registry,
            tenants,
            users,
            registered,
            known_users_only,
            last: None,
            reading: false,
        }
    }

    /// Reads again now, unless a read is under way.
    fn read(&mut self, ctx: &mut Context<Self>) {
        if self.reading {
            return;
        }
        self.reading = true;
        let (store, registered) = (self.store.clone(), self.registered);
        let registry = self.registry.clone();
        // The live devices first: each was admitted before the users are read, so a
        // user missing from that read was removed, not added since.
        let read = async move {
            let live = registry.send(AllLive).await.unwrap_or_default();
            let members = store.members(registered).await;
            (members, live)
        };
        ctx.spawn(read.into_actor(self).map(|(members, live), act, _| {
            act.reading = false;
            match members {
                Ok(members) => act.apply(members, live),
                Err(e) => log::debug!("cannot read the users to follow them now: {e}"),
            }
        }));
    }

    /// Applies what changed since the last read.
    fn apply(&mut self, now: Members, live: Vec<crate::registry::Connected>) {
        let mut changed: Vec<String> = Vec::new();
        let mut removed: HashSet<String> = HashSet::new();
        if let Some(last) = &self.last {
            for (uuid, was) in last {
                match now.get(uuid) {
                    None => {
                        log::info!("user {:?} was removed from the database", was.username);
                        removed.insert(uuid.clone());
                        changed.push(uuid.clone());
                    }
                    Some(is) if is.admin != was.admin || is.devices != was.devices => {
                        if is.admin != was.admin {
                            log::info!(
                                "user {:?} is {} now",
                                is.username,
                                if is.admin { "an admin" } else { "no admin" }
                            );
                        }
                        changed.push(uuid.clone());
                    }
                    Some(_) => {}
                }
            }
        }
        if !changed.is_empty() {
            self.store.forget_users(&changed);
            self.users.forget_all();
        }
        if self.registered {
            self.tenants.follow(&now);
        }
        for device in live {
            let key = DeviceKey::new(&device.uuid, &device.device.mac);
            let gone = removed.contains(&*device.uuid)
                || (self.known_users_only && !now.contains_key(&*device.uuid));
            let why = if gone {
                Some("its user was removed from the database")
            } else if self.registered
                && now
                    .get(&*device.uuid)
                    .is_some_and(|m| !m.devices.contains(&*device.device.mac))
            {
                Some("it was removed from the database (auth.devices = \"registered\")")
            } else {
                None
            };
            if let Some(why) = why {
                self.registry.do_send(Withdraw { device: key, why });
            }
        }
        self.last = Some(now);
    }
}

impl Actor for Follower {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.read(ctx);
        ctx.run_interval(FOLLOW_EVERY, |act, ctx| act.read(ctx));
    }
}
