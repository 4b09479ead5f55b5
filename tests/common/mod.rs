//! Test harnesses: the gateway started in-process ([`TestGateway`], most tests, on
//! tokio's paused clock), the real binary ([`Binary`]) and a MongoDB ([`mongo`]).
#![allow(dead_code)]

pub mod binary;
pub mod inproc;
pub mod mongo;
pub mod nats;
pub mod pki;

#[allow(unused_imports)]
pub use binary::{
    eventually, failed_reason, repo_file, run_cli, Binary, Peer as BlockingPeer, TIMEOUT,
};
#[allow(unused_imports)]
pub use inproc::{Peer, TestGateway};

/// A moment a fixed number of seconds into a fixed day, for stored sightings.
pub fn at(secs: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
}

/// A sighting of device `mac` of user `uuid` at [`at`]`(secs)`.
pub fn sighting(uuid: &str, mac: &str, host: &str, secs: i64) -> elfin_actors::store::Sighting {
    elfin_actors::store::Sighting {
        uuid: uuid.into(),
        mac: mac.into(),
        host: host.into(),
        at: at(secs),
    }
}

/// Whether a `query` reply lists device `mac` as online.
pub fn lists_online(devices: &serde_json::Value, mac: &str) -> bool {
    devices
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["macaddress"] == mac && d["status"] == "online")
}
