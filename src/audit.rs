//! The audit trail for people: what `elfin-gateway audit`, `/api/audit` and the device
//! page show. Filters come from their arguments (a user's name, a MAC, `--since 24h`);
//! rows name the user instead of showing a uuid (an unknown one appears masked) and
//! give times in `query.time_zone` and `query.time_format`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use elfin_actors::audit::{DeviceEvent, Filter, RefusalRecord, TunnelRecord};
use elfin_actors::masked::masked;
use elfin_actors::query::QueryFormat;
use elfin_actors::store::{AccountKey, Store, StoreError};

/// What to read: as the command line and the API take it.
#[derive(Debug, Default, Clone)]
pub struct Wanted {
    /// A user's name.
    pub user: Option<String>,
    pub device: Option<String>,
    /// `24h`, `30m`, `7d`, `2w`, `90s`, or a time (`2026-12-01T08:00:00Z`, `2026-12-01`).
    pub since: Option<String>,
    pub offset: usize,
    pub limit: usize,
}

/// Why a request for the trail cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    BadArgument(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// When `--since` starts, from now.
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.to_utc());
    }
    if let Ok(day) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => 0,
    };
    let amount: i64 = number.parse().unwrap_or(-1);
    let start = amount
        .checked_mul(seconds)
        .filter(|_| seconds > 0 && amount >= 0)
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|age| now.checked_sub_signed(age));
    start.ok_or_else(|| {
        format!(
            "since {text:?}: expected an age such as 30m, 24h, 7d (at most a few thousand \
             years) or a time such as 2026-12-01T08:00:00Z"
        )
    })
}

/// `--since` as the command line takes it: checked when the arguments are parsed, so
/// a bad one is a usage error (exit 2) naming the argument.
pub fn since_arg(text: &str) -> Result<String, String> {
    parse_since(text, Utc::now()).map(|_| text.to_owned())
}

/// The store's filter for `wanted`; `None` when it names a user that does not exist
/// (nothing can match).
pub async fn filter(store: &dyn Store, wanted: &Wanted) -> Result<Option<Filter>, AuditError> {
    let since = wanted
        .since
        .as_deref()
        .map(|s| parse_since(s, Utc::now()))
        .transpose()
        .map_err(AuditError::BadArgument)?;
    let uuid = match &wanted.user {
        Some(name) => match store.account(AccountKey::Username(name)).await? {
            Some(account) => Some(account.uuid),
            None => return Ok(None),
        },
        None => None,
    };
    Ok(Some(Filter {
        uuid,
        mac: wanted.device.clone(),
        since,
        offset: wanted.offset,
        limit: wanted.limit,
    }))
}

/// Turns records into rows: user names, times in the configured zone and format.
pub struct Shown<'a> {
    /// uuid -> user name.
    pub names: &'a HashMap<String, String>,
    pub format: &'a QueryFormat,
}

#[derive(Debug, Serialize)]
pub struct TunnelRow {
    pub user: String,
    pub device: String,
    pub device_address: String,
    pub peer_device: Option<String>,
    pub client_address: String,
    pub client_certificate: Option<String>,
    pub client_certificate_serial: Option<String>,
    pub node: String,
    /// In `query.time_zone` and `query.time_format`.
    pub opened: String,
    /// None while the tunnel is open.
    pub closed: Option<String>,
    /// The same two times in RFC 3339, UTC, for scripts.
    pub opened_utc: DateTime<Utc>,
    pub closed_utc: Option<DateTime<Utc>>,
    pub seconds: Option<i64>,
    pub cause: Option<String>,
    pub bytes_to_device: u64,
    pub bytes_from_device: u64,
}

#[derive(Debug, Serialize)]
pub struct RefusalRow {
    /// In `query.time_zone` and `query.time_format`.
    pub at: String,
    /// The same in RFC 3339, UTC.
    pub at_utc: DateTime<Utc>,
    /// connme, connthem, query, handshake or takeover.
    pub request: &'static str,
    /// The user the peer named (masked if it is no user), and the device.
    pub user: Option<String>,
    pub device: Option<String>,
    /// `elfin_refusals_total`'s reason, and in words.
    pub reason: String,
    pub detail: String,
    pub source: String,
    pub certificate: Option<String>,
    pub certificate_serial: Option<String>,
    pub node: String,
}

#[derive(Debug, Serialize)]
pub struct EventRow {
    /// In `query.time_zone` and `query.time_format`.
    pub at: String,
    /// The same in RFC 3339, UTC.
    pub at_utc: DateTime<Utc>,
    pub user: String,
    pub device: String,
    pub host: String,
    /// "online", "offline" or "refused".
    pub event: &'static str,
    pub address: String,
    pub cause: Option<String>,
    pub node: String,
}

impl Shown<'_> {
    pub fn time(&self, at: DateTime<Utc>) -> String {
        at.with_timezone(&self.format.time_zone)
            .format(&self.format.time_format)
            .to_string()
    }

    fn user(&self, uuid: &str) -> String {
        self.names
            .get(uuid)
            .cloned()
            .unwrap_or_else(|| masked(uuid))
    }

    pub fn tunnel(&self, t: TunnelRecord) -> TunnelRow {
        TunnelRow {
            user: self.user(&t.uuid),
            seconds: t.closed.map(|c| (c - t.opened).num_seconds().max(0)),
            opened: self.time(t.opened),
            closed: t.closed.map(|c| self.time(c)),
            opened_utc: t.opened,
            closed_utc: t.closed,
            device: t.device,
            device_address: t.device_addr,
            peer_device: t.peer_device,
            client_address: t.client_addr,
            client_certificate: t.client_cert,
            client_certificate_serial: t.client_cert_serial,
            node: t.node,
            cause: t.cause,
            bytes_to_device: t.to_device,
            bytes_from_device: t.from_device,
        }
    }

    pub fn refusal(&self, r: RefusalRecord) -> RefusalRow {
        RefusalRow {
            at: self.time(r.at),
            at_utc: r.at,
            request: r.request.label(),
            user: r.uuid.as_deref().map(|uuid| self.user(uuid)),
            device: r.device,
            reason: r.reason,
            detail: r.detail,
            source: r.source,
            certificate: r.certificate,
            certificate_serial: r.certificate_serial,
            node: r.node,
        }
    }

    pub fn event(&self, e: DeviceEvent) -> EventRow {
        EventRow {
            at: self.time(e.at),
            at_utc: e.at,
            user: self.user(&e.uuid),
            event: e.change.label(),
            device: e.mac,
            host: e.host,
            address: e.address,
            cause: e.cause,
            node: e.node,
        }
    }
}

/// uuid -> name of every stored user.
pub async fn user_names(store: &dyn Store) -> Result<HashMap<String, String>, StoreError> {
    Ok(store
        .users()
        .await?
        .into_iter()
        .map(|u| (u.uuid, u.username))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_ages_and_times() {
        let now = DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z")
            .unwrap()
            .to_utc();
        let at = |s: &str| parse_since(s, now).map(|t| t.to_rfc3339());
        assert_eq!(at("24h").unwrap(), "2026-12-01T12:00:00+00:00");
        assert_eq!(at("30m").unwrap(), "2026-12-02T11:30:00+00:00");
        assert_eq!(at("7d").unwrap(), "2026-11-25T12:00:00+00:00");
        assert_eq!(at("2026-12-01").unwrap(), "2026-12-01T00:00:00+00:00");
        assert_eq!(
            at("2026-12-01T08:00:00+01:00").unwrap(),
            "2026-12-01T07:00:00+00:00"
        );
        for bad in [
            "",
            "h",
            "24",
            "24x",
            "-1h",
            "99999999999999999999d",
            "300000000d",
            "9223372036854775807s",
            "15250284452w",
        ] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Whatever `since` says, it is a time or a message, never a panic.
        #[test]
        fn since_never_panics(text in "\\PC{0,40}", digits in "[0-9]{1,25}", unit in "[smhdwx]?") {
            let now = Utc::now();
            let _ = parse_since(&text, now);
            let _ = parse_since(&format!("{digits}{unit}"), now);
            let _ = parse_since(&format!("{digits}{unit}"), DateTime::<Utc>::MIN_UTC);
        }
    }
}
