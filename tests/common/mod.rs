//! Test harnesses: the gateway started in-process ([`TestGateway`], most tests, on
//! tokio's paused clock), the real binary ([`Binary`]) and a MongoDB ([`mongo`]).
#![allow(dead_code)]

pub mod binary;
pub mod inproc;
pub mod mongo;
pub mod nats;
pub mod pki;
pub mod webhooks;

#[allow(unused_imports)]
pub use binary::{
    eventually, failed_reason, repo_file, run_cli, Binary, Peer as BlockingPeer, TIMEOUT,
};
#[allow(unused_imports)]
pub use inproc::{Peer, TestGateway};

/// `len` bytes of every value in no pattern a tunnel could mistake for anything
/// (xorshift32 from `seed`, which must not be 0): payloads to check byte for byte.
pub fn random_bytes(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

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
