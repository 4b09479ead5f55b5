//! The `query` reply: the user's devices as a JSON array (`docs/PROTOCOL.md` §3).
//!
//! Three sources are merged by mac, the newest last-seen winning: the store, sightings
//! the persistence actor has not written yet, and the registry's live connections. So
//! a sighting shows at once, and the reply still lists what the gateway knows while
//! the database is unreachable.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use crate::registry::LiveDevice;
use crate::store::{Device, Sighting};

/// How `lastseendate` and `status` are computed.
#[derive(Debug, Clone)]
pub struct QueryFormat {
    pub time_zone: Tz,
    /// A chrono `strftime` pattern, checked at start-up.
    pub time_format: String,
    pub online_window: std::time::Duration,
}

#[derive(Serialize)]
struct Entry<'a> {
    hostname: &'a str,
    macaddress: &'a str,
    lastseendate: String,
    status: &'static str,
}

/// Merges the sources (store order first, then devices only the gateway knows) and
/// renders the reply line, `\n` included.
pub fn render(
    stored: Vec<Device>,
    pending: Vec<Sighting>,
    live: Vec<LiveDevice>,
    now: DateTime<Utc>,
    format: &QueryFormat,
) -> String {
    let mut devices = stored;
    let mut merge = |mac: &str, host: &str, at: DateTime<Utc>| match devices
        .iter_mut()
        .find(|d| d.mac == mac)
    {
        Some(d) if d.last_seen >= at => {}
        Some(d) => {
            d.host = host.to_owned();
            d.last_seen = at;
        }
        None => devices.push(Device {
            host: host.to_owned(),
            mac: mac.to_owned(),
            last_seen: at,
        }),
    };
    for s in &pending {
        merge(&s.mac, &s.host, s.at);
    }
    for d in &live {
        merge(&d.mac, &d.host, d.last_seen.to_utc());
    }
    let window = chrono::Duration::from_std(format.online_window).unwrap_or(chrono::Duration::MAX);
    let entries: Vec<Entry> = devices
        .iter()
        .map(|d| Entry {
            hostname: &d.host,
            macaddress: &d.mac,
            lastseendate: d
                .last_seen
                .with_timezone(&format.time_zone)
                .format(&format.time_format)
                .to_string(),
            status: if now.signed_duration_since(d.last_seen) <= window {
                "online"
            } else {
                "offline"
            },
        })
        .collect();
    let mut line = serde_json::to_string(&entries).unwrap_or_else(|_| "[]".into());
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn format() -> QueryFormat {
        QueryFormat {
            time_zone: "Europe/Budapest".parse().unwrap(),
            time_format: "%Y. %m. %d. %H:%M:%S".into(),
            online_window: Duration::from_secs(60),
        }
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
