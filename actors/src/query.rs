//! The `query` reply: the user's devices as a JSON array (`docs/PROTOCOL.md` §3).
//!
//! Three sources are merged by mac, the newest last-seen winning: the store, sightings
//! not stored yet (the persistence actor's pending ones, and in cluster mode devices
//! live on other nodes) and the registry's live connections. So a sighting shows at
//! once, and the reply still lists what the gateway knows while the database is
//! unreachable.

use std::collections::HashMap;

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::frame::{OnlineStatus, QueryRow};
use crate::registry::LiveDevice;
use crate::store::{Device, Sighting};

/// The `[query]` section: how `lastseendate` is written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryFormat {
    #[serde(with = "crate::de::parsed")]
    pub time_zone: Tz,
    pub time_format: TimeFormat,
}

impl Default for QueryFormat {
    fn default() -> Self {
        Self {
            time_zone: chrono_tz::Europe::Budapest,
            time_format: TimeFormat("%Y. %m. %d. %H:%M:%S".into()),
        }
    }
}

/// A chrono `strftime` pattern that formats every time without error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeFormat(String);

impl TryFrom<String> for TimeFormat {
    type Error = String;
    fn try_from(pattern: String) -> Result<Self, String> {
        if StrftimeItems::new(&pattern).any(|i| matches!(i, Item::Error)) {
            return Err(format!("{pattern:?} is not a valid strftime pattern"));
        }
        Ok(TimeFormat(pattern))
    }
}

impl From<TimeFormat> for String {
    fn from(format: TimeFormat) -> String {
        format.0
    }
}

impl std::ops::Deref for TimeFormat {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Merges the sources (store order first, then devices only the gateway knows) into
/// the reply's rows; a device seen within `online_window` of `now` is online. Linear in
/// the number of devices.
pub fn rows(
    stored: Vec<Device>,
    pending: Vec<Sighting>,
    live: Vec<LiveDevice>,
    now: DateTime<Utc>,
    format: &QueryFormat,
    online_window: std::time::Duration,
) -> Vec<QueryRow> {
    let mut devices = stored;
    let mut index: HashMap<String, usize> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (d.mac.clone(), i))
        .collect();
    let mut merge = |mac: &str, host: &str, at: DateTime<Utc>| match index.get(mac) {
        Some(&i) if devices[i].last_seen >= at => {}
        Some(&i) => {
            devices[i].host = host.to_owned();
            devices[i].last_seen = at;
        }
        None => {
            index.insert(mac.to_owned(), devices.len());
            devices.push(Device {
                host: host.to_owned(),
                mac: mac.to_owned(),
                last_seen: at,
            });
        }
    };
    for s in &pending {
        merge(&s.mac, &s.host, s.at);
    }
    for d in &live {
        merge(&d.mac, &d.host, d.last_seen.to_utc());
    }
    let window = chrono::Duration::from_std(online_window).unwrap_or(chrono::Duration::MAX);
    devices
        .into_iter()
        .map(|d| QueryRow {
            lastseendate: d
                .last_seen
                .with_timezone(&format.time_zone)
                .format(&format.time_format)
                .to_string(),
            status: if now.signed_duration_since(d.last_seen) <= window {
                OnlineStatus::Online
            } else {
                OnlineStatus::Offline
            },
            hostname: d.host,
            macaddress: d.mac,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Reply;
    use std::time::Duration;

    fn render(
        stored: Vec<Device>,
        pending: Vec<Sighting>,
        live: Vec<LiveDevice>,
        now: DateTime<Utc>,
        format: &QueryFormat,
    ) -> String {
        let window = Duration::from_secs(60);
        let line = Reply::Devices(rows(stored, pending, live, now, format, window)).encode();
        String::from_utf8(line.to_vec()).unwrap()
    }

    fn format() -> QueryFormat {
        QueryFormat::default()
    }

    #[test]
    fn a_time_format_that_cannot_format_is_refused() {
        assert!(TimeFormat::try_from("%Y %Q".to_owned()).is_err());
        assert!(TimeFormat::try_from("%d.%m.%Y".to_owned()).is_ok());
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn renders_keys_in_order_with_local_time_and_status() {
        let stored = vec![
            Device {
                host: "plc-1".into(),
                mac: "F0FE6B2A1C3D".into(),
                last_seen: at("2024-03-12T13:05:33Z"),
            },
            Device {
                host: "meter".into(),
                mac: "AA".into(),
                last_seen: at("2024-03-12T12:00:00Z"),
            },
        ];
        let line = render(
            stored,
            vec![],
            vec![],
            at("2024-03-12T13:06:00Z"),
            &format(),
        );
        assert_eq!(
            line,
            concat!(
                r#"[{"hostname":"plc-1","macaddress":"F0FE6B2A1C3D","lastseendate":"2024. 03. 12. 14:05:33","status":"online"},"#,
                r#"{"hostname":"meter","macaddress":"AA","lastseendate":"2024. 03. 12. 13:00:00","status":"offline"}]"#,
                "\n"
            )
        );
    }

    #[test]
    fn newer_pending_sightings_override_the_store_and_new_devices_are_appended() {
        let stored = vec![Device {
            host: "old".into(),
            mac: "M1".into(),
            last_seen: at("2024-01-01T00:00:00Z"),
        }];
        let pending = vec![
            Sighting {
                uuid: "u".into(),
                mac: "M1".into(),
                host: "new".into(),
                at: at("2024-06-01T00:00:00Z"),
            },
            Sighting {
                uuid: "u".into(),
                mac: "M2".into(),
                host: "two".into(),
                at: at("2024-06-01T00:00:00Z"),
            },
        ];
        let line = render(
            stored,
            pending,
            vec![],
            at("2024-06-01T00:00:30Z"),
            &format(),
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v[0]["hostname"], "new");
        assert_eq!(v[0]["status"], "online");
        assert_eq!(v[1]["macaddress"], "M2");
    }

    #[test]
    fn no_devices_is_an_empty_array() {
        assert_eq!(
            render(vec![], vec![], vec![], Utc::now(), &format()),
            "[]\n"
        );
    }
}
