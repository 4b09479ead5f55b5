//! Every refusal visible to the operator: why a peer was refused ([`Reason`]), counted
//! in `elfin_refusals_total{reason}` and logged at info with the peer's address, at
//! most once a minute per address and reason, or per user and reason for a user's
//! limits ([`Refusals`]), so a flood costs a line a minute and an operator still sees
//! why an engineer or a device is turned away. "Per address" is per [`Source`] (an
//! IPv6 network counts once), and the table of what was logged is bounded
//! ([`BoundedMap`]).

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytestring::ByteString;

use crate::bounded::OncePer;
use crate::metric;
use crate::source::{Ipv6Prefix, Source};

/// Why the gateway refused what a peer asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A request over a transport `auth.clients` does not accept.
    Transport,
    /// A TLS handshake that failed on the client's certificate.
    Certificate,
    /// A client certificate's user is not the user the request names.
    UserBinding,
    /// A device message or request naming a uuid that is no user's.
    UnknownUser,
    /// A connection that spoke as one device naming another.
    Identity,
    /// A user at `limits.max_devices_per_user`.
    DeviceQuota,
    /// A user past `limits.new_devices_per_minute`.
    NewDeviceRate,
    /// A device not in the store while `auth.devices = "registered"`.
    Enrollment,
    /// A second connection for a live device that still beats, under
    /// `auth.device_takeover = "when-silent"`.
    Takeover,
    /// A wrong admin token (bearer or login form).
    AdminToken,
    /// An admin request from an address still waiting after a wrong token.
    AdminPaced,
    /// An admin request for a `Host:` the admin server does not answer.
    AdminHost,
}

impl Reason {
    /// The `reason` label of `elfin_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Transport => "transport",
            Reason::Certificate => "certificate",
            Reason::UserBinding => "user_binding",
            Reason::UnknownUser => "unknown_user",
            Reason::Identity => "identity",
            Reason::DeviceQuota => "device_quota",
            Reason::NewDeviceRate => "new_device_rate",
            Reason::Enrollment => "enrollment",
            Reason::Takeover => "takeover",
            Reason::AdminToken => "admin_token",
            Reason::AdminPaced => "admin_paced",
            Reason::AdminHost => "admin_host",
        }
    }
}

/// When each (source or user, reason) was last logged.
pub struct Refusals {
    prefix: Ipv6Prefix,
    logged: Mutex<OncePer<(Per, Reason)>>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self::new(Ipv6Prefix::DEFAULT)
    }
}

/// What a refusal's log line is rate-limited by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Per {
    Address(Source),
    User(ByteString),
}

/// How often one address is logged for one reason.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// (Source or user, reason) pairs whose last log line is remembered, at most.
const MAX_ENTRIES: usize = 10_000;

impl Refusals {
    /// Refusals whose log lines are rate-limited per source as `prefix` groups them.
    pub fn new(prefix: Ipv6Prefix) -> Self {
        Self {
            prefix,
            logged: Mutex::new(OncePer::new("refusal log", MAX_ENTRIES, LOG_EVERY)),
        }
    }

    /// Counts a refusal of `peer` and logs `detail` (what was refused, in words) at
    /// most once a minute per source and reason.
    pub fn report(&self, peer: IpAddr, reason: Reason, detail: impl FnOnce() -> String) {
        let source = self.prefix.source_of(peer);
        self.count_and_log(peer, Per::Address(source), reason, detail);
    }

    /// As [`Refusals::report`], logged at most once a minute per user and reason
    /// (a user's limits, which many addresses may run into at once).
    pub fn report_for_user(
        &self,
        peer: IpAddr,
        uuid: &ByteString,
        reason: Reason,
        detail: impl FnOnce() -> String,
    ) {
        self.count_and_log(peer, Per::User(uuid.clone()), reason, detail);
    }

    fn count_and_log(
        &self,
        peer: IpAddr,
        per: Per,
        reason: Reason,
        detail: impl FnOnce() -> String,
    ) {
        metrics::counter!(metric::REFUSALS_TOTAL, "reason" => reason.label()).increment(1);
        if self.should_log(per, reason) {
            log::info!("refused {peer} ({}): {}", reason.label(), detail());
        }
    }

    fn should_log(&self, per: Per, reason: Reason) -> bool {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        logged.first(&(per, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_address_and_reason_is_logged_once_a_minute() {
        let refusals = Refusals::default();
        let a = Per::Address(Source::V4([10, 0, 0, 1].into()));
        let b = Per::Address(Source::V4([10, 0, 0, 2].into()));
        assert!(refusals.should_log(a.clone(), Reason::Takeover));
        assert!(!refusals.should_log(a.clone(), Reason::Takeover));
        assert!(
            refusals.should_log(a.clone(), Reason::Identity),
            "another reason"
        );
        assert!(refusals.should_log(b, Reason::Takeover), "another address");
        let alice = Per::User("alice".into());
        assert!(refusals.should_log(alice.clone(), Reason::DeviceQuota));
        assert!(!refusals.should_log(alice, Reason::DeviceQuota), "per user");
        tokio::time::sleep(LOG_EVERY).await;
        assert!(refusals.should_log(a, Reason::Takeover));
    }
}
