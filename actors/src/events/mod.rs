//! Fleet events: what operators are told without looking — a device went offline,
//! came back, was contested, or a peer was refused — as signed webhooks.
//!
//! - [`Event`] and [`EventKind`]: the catalogue, and the JSON body every receiver
//!   gets (`{type, timestamp, data}`).
//! - [`ledger`]: when a device that left counts as offline (the grace period), and
//!   when one that comes back is back online; pure, so its rules read as tests.
//! - [`herald`]: the [`Herald`](herald::Herald) actor that keeps the ledger for this
//!   node, asks the other nodes in cluster mode, and decides each event.
//! - [`announcer`]: the task that names each event's user and hands it to the
//!   endpoints whose filters take it, in order.
//! - [`webhook`]: one endpoint's bounded queue and its delivery (Standard Webhooks,
//!   retries with backoff), and the `[[webhooks]]` settings.
//! - [`signature`]: the Standard Webhooks signature.

pub mod announcer;
pub mod herald;
pub mod ledger;
pub mod signature;
pub mod webhook;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::de;

/// What happened, as receivers filter it (`events` of a `[[webhooks]]` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// A device connected that no node was waiting for.
    #[serde(rename = "device.online")]
    Online,
    /// No node has held the device for `events.offline_after_secs`.
    #[serde(rename = "device.offline")]
    Offline,
    /// A device announced offline connected again.
    #[serde(rename = "device.back_online")]
    BackOnline,
    /// A connection from another address claimed a device that still beats.
    #[serde(rename = "device.contested")]
    Contested,
    /// Such a claim, refused (`auth.device_takeover = "when-silent"`).
    #[serde(rename = "device.takeover_refused")]
    TakeoverRefused,
    /// A device not in the store while `auth.devices = "registered"`.
    #[serde(rename = "device.enrollment_refused")]
    EnrollmentRefused,
    /// A client's certificate refused at its handshake, or revoked or expired while
    /// its connection was open.
    #[serde(rename = "client.certificate_refused")]
    CertificateRefused,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Online,
        EventKind::Offline,
        EventKind::BackOnline,
        EventKind::Contested,
        EventKind::TakeoverRefused,
        EventKind::EnrollmentRefused,
        EventKind::CertificateRefused,
    ];

    /// The event's `type`.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Online => "device.online",
            EventKind::Offline => "device.offline",
            EventKind::BackOnline => "device.back_online",
            EventKind::Contested => "device.contested",
            EventKind::TakeoverRefused => "device.takeover_refused",
            EventKind::EnrollmentRefused => "device.enrollment_refused",
            EventKind::CertificateRefused => "client.certificate_refused",
        }
    }

    /// Refusals are said at most once a minute per subject (see [`herald`]); the
    /// presence events are bounded by the grace period.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            EventKind::TakeoverRefused
                | EventKind::EnrollmentRefused
                | EventKind::CertificateRefused
        )
    }
}

/// The user an event concerns: the name (if the store knows the uuid) and the
/// uuid's first characters, never the whole uuid (it is the user's secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventUser {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// None for a certificate's user (the certificate names the user, not a uuid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid_prefix: Option<String>,
}

/// What an event says, beyond its type and timestamp. Keys without a value are
/// left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EventData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<EventUser>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The peer's address (for `device.offline`, the one it was last seen from).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The node that saw it.
    pub node: String,
    /// When it happened (for `device.offline`, when the device was last held).
    pub time: DateTime<Utc>,
    pub reason: String,
    /// `device.back_online`: how long it was away, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub away_secs: Option<u64>,
    /// `client.certificate_refused`: the certificate's serial, if it was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
}

/// One event: the body every receiver gets, and the id its delivery carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// `webhook-id`: the same on every attempt, so a receiver can drop repeats.
    #[serde(skip)]
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub timestamp: DateTime<Utc>,
    pub data: EventData,
}

impl Event {
    pub fn new(kind: EventKind, data: EventData) -> Event {
        Event {
            id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            kind,
            timestamp: Utc::now(),
            data,
        }
    }

    /// The JSON body (these types always serialize).
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `[events]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsSettings {
    /// How long no node may hold a device before `device.offline`: a reconnect or a
    /// move between nodes within it is no outage.
    #[serde(rename = "offline_after_secs", with = "de::positive_secs")]
    pub offline_after: Duration,
    /// Hosts (names or addresses) webhooks may reach over plain `http`, besides
    /// loopback; every other endpoint must be `https`. (Here rather than under
    /// `[webhooks]`: that name is the list of endpoints.)
    #[serde(with = "de::list")]
    pub allow_http_hosts: Vec<String>,
}

impl Default for EventsSettings {
    fn default() -> Self {
        Self {
            offline_after: Duration::from_secs(300),
            allow_http_hosts: Vec::new(),
        }
    }
}

/// What the gateway's fleet events run on: `[events]`, and the `[[webhooks]]`
/// endpoints, each checked.
#[derive(Debug, Clone, Default)]
pub struct FleetEvents {
    pub settings: EventsSettings,
    pub endpoints: Vec<webhook::Endpoint>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_has_type_timestamp_and_data_and_leaves_out_what_it_does_not_know() {
        let event = Event::new(
            EventKind::BackOnline,
            EventData {
                mac: Some("AABBCCDDEEFF".into()),
                node: "n1".into(),
                time: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
                reason: "back after 400 s".into(),
                away_secs: Some(400),
                ..EventData::default()
            },
        );
        let body: serde_json::Value = serde_json::from_slice(&event.body()).unwrap();
        assert_eq!(body["type"], "device.back_online");
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(body["data"]["time"], "2027-01-15T08:00:00Z");
        assert_eq!(body["data"]["away_secs"], 400);
        assert!(body["data"].get("host").is_none());
        assert!(event.id.starts_with("msg_"));
        for kind in EventKind::ALL {
            let named: EventKind = serde_json::from_value(serde_json::json!(kind.name())).unwrap();
            assert_eq!(named, kind);
        }
    }
}
