//! Which uuids belong to known users, cached in front of the store, and what that
//! means for a peer presenting one (the `auth.require_known_user` policy).
//!
//! Every new device identity, `connme`, `connthem` and `query` asks; the answers are
//! cached (known users for a minute, unknown ones for a second, so a user added while
//! the gateway runs is accepted almost at once and a peer repeating an unknown uuid
//! costs at most one database read a second). Both caches hold at most
//! [`MAX_ENTRIES`] answers, misses included, the least recently used going first: a
//! peer sending random uuids costs reads (paced by the failed look-up guard), never
//! memory.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use tokio::time::Instant;

use crate::store::{Account, AccountKey, Store, StoreError};

const KNOWN_TTL: Duration = Duration::from_secs(60);
const UNKNOWN_TTL: Duration = Duration::from_secs(1);
/// Answers each cache keeps at most.
pub const MAX_ENTRIES: usize = 100_000;

/// What a peer presenting a uuid may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A known user, or the store cannot be asked (the gateway keeps serving through a
    /// database outage): everything, and its devices are stored.
    Member,
    /// An unknown user while unknown users are allowed: may register devices, tunnel
    /// and query, but nothing is stored for it.
    Guest,
    /// An unknown user while only known users are allowed.
    Refused,
}

impl Access {
    pub fn refused(self) -> bool {
        self == Access::Refused
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UserStatus {
    Known,
    Unknown,
    Unreachable,
}

pub struct UserDirectory {
    store: Arc<dyn Store>,
    require_known_user: bool,
    /// uuid -> (known?, when read).
    cache: Mutex<LruCache<String, (bool, Instant)>>,
    /// Accounts by uuid and by name, for client certificates (`auth.clients =
    /// "user-cert"`), kept as long as known users.
    accounts: Mutex<Accounts>,
}

/// Accounts read, by (looked up by uuid?, uuid or name), with when they were read.
type Accounts = LruCache<(bool, String), (Option<Account>, Instant)>;

/// Why a client certificate may not reach a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unbound {
    #[error(
        "it names user {certificate:?}, the request names another, and {certificate:?} is no admin"
    )]
    OtherUser { certificate: String },
    #[error("the users cannot be read now: {0}")]
    Unreadable(String),
}

impl UserDirectory {
    pub fn new(store: Arc<dyn Store>, require_known_user: bool) -> Self {
        Self::with_capacity(store, require_known_user, MAX_ENTRIES)
    }

    fn with_capacity(store: Arc<dyn Store>, require_known_user: bool, entries: usize) -> Self {
        let entries = NonZeroUsize::new(entries).unwrap_or(NonZeroUsize::MIN);
        Self {
            store,
            require_known_user,
            cache: Mutex::new(LruCache::new(entries)),
            accounts: Mutex::new(LruCache::new(entries)),
        }
    }

    /// Whether the client certificate of user `certificate` may reach user `uuid`: its
    /// own, or any if it is an admin. Fails closed when the store cannot be read.
    pub async fn may_reach(&self, certificate: &str, uuid: &str) -> Result<(), Unbound> {
        let unreadable = |e: StoreError| Unbound::Unreadable(e.to_string());
        let target = self
            .account(AccountKey::Uuid(uuid))
            .await
            .map_err(unreadable)?;
        if target.is_some_and(|a| a.username == certificate) {
            return Ok(());
        }
        let holder = self
            .account(AccountKey::Username(certificate))
            .await
            .map_err(unreadable)?;
        match holder {
            Some(a) if a.admin => Ok(()),
            _ => Err(Unbound::OtherUser {
                certificate: certificate.to_owned(),
            }),
        }
    }

    async fn account(&self, key: AccountKey<'_>) -> Result<Option<Account>, StoreError> {
        let cache_key = match key {
            AccountKey::Uuid(uuid) => (true, uuid.to_owned()),
            AccountKey::Username(name) => (false, name.to_owned()),
        };
        let cached = self.lock_accounts().get(&cache_key).cloned();
        if let Some((account, at)) = cached {
            if at.elapsed() < KNOWN_TTL {
                return Ok(account);
            }
        }
        let account = self.store.account(key).await?;
        self.lock_accounts()
            .put(cache_key, (account.clone(), Instant::now()));
        Ok(account)
    }

    fn lock_accounts(&self) -> std::sync::MutexGuard<'_, Accounts> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The name of the user `uuid`, if the store knows it (cached as accounts are).
    pub async fn name_of(&self, uuid: &str) -> Option<String> {
        match self.account(AccountKey::Uuid(uuid)).await {
            Ok(account) => account.map(|a| a.username),
            Err(e) => {
                log::debug!("cannot read the name of a user: {e}");
                None
            }
        }
    }

    /// Forgets every cached answer: a user was removed or changed in the database.
    pub fn forget_all(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
        self.lock_accounts().clear();
    }

    /// What a peer presenting `uuid` may do.
    pub async fn access(&self, uuid: &str) -> Access {
        match self.check(uuid).await {
            UserStatus::Known | UserStatus::Unreachable => Access::Member,
            UserStatus::Unknown if self.require_known_user => Access::Refused,
            UserStatus::Unknown => Access::Guest,
        }
    }

    async fn check(&self, uuid: &str) -> UserStatus {
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|mut c| c.get(uuid).copied());
        if let Some((known, at)) = cached {
            let ttl = if known { KNOWN_TTL } else { UNKNOWN_TTL };
            if at.elapsed() < ttl {
                return status(known);
            }
        }
        match self.store.user_exists(uuid).await {
            Ok(known) => {
                if let Ok(mut cache) = self.cache.lock() {
                    cache.put(uuid.to_owned(), (known, Instant::now()));
                }
                status(known)
            }
            Err(e) => {
                log::debug!("cannot check user: {e}");
                match cached {
                    Some((known, _)) => status(known),
                    None => UserStatus::Unreachable,
                }
            }
        }
    }
}

fn status(known: bool) -> UserStatus {
    if known {
        UserStatus::Known
    } else {
        UserStatus::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use crate::store::Directory;

    #[tokio::test]
    async fn the_caches_stay_within_their_bound_whatever_uuids_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("db")).unwrap());
        store.add_user("alice", "ua").await.unwrap();
        let users = UserDirectory::with_capacity(store, true, 50);
        assert_eq!(users.access("ua").await, Access::Member);
        for i in 0..500 {
            let uuid = format!("random-{i}");
            assert_eq!(users.access(&uuid).await, Access::Refused);
            let _ = users.may_reach("alice", &uuid).await;
        }
        assert_eq!(users.cache.lock().unwrap().len(), 50, "misses included");
        assert_eq!(users.lock_accounts().len(), 50);
        // The known user is read again once pushed out: still a member.
        assert_eq!(users.access("ua").await, Access::Member);
    }
}
