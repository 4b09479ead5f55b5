//! The codec's other half: what goes back to a client ([`Reply`]), one JSON line
//! made by [`Reply::encode`].

use bytes::Bytes;
use serde::Serialize;

/// What the gateway answers a `connme`, `connthem` or `query`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `{"status":"success"}`
    Success,
    /// `{"status":"failed","reason":"…"}`
    Failed(String),
    /// The `query` reply: a JSON array of the user's devices.
    Devices(Vec<QueryRow>),
}

/// One device in a `query` reply, fields in the protocol's key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueryRow {
    pub hostname: String,
    pub macaddress: String,
    pub lastseendate: String,
    pub status: OnlineStatus,
}

/// Whether a device in a `query` reply is online.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnlineStatus {
    Online,
    Offline,
}

impl Reply {
    /// The reply as it goes on the wire: one JSON line ending in `\n`.
    pub fn encode(&self) -> Bytes {
        #[derive(Serialize)]
        struct Outcome<'a> {
            status: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: Option<&'a str>,
        }
        let json = match self {
            Reply::Success => serde_json::to_vec(&Outcome {
                status: "success",
                reason: None,
            }),
            Reply::Failed(reason) => serde_json::to_vec(&Outcome {
                status: "failed",
                reason: Some(reason),
            }),
            Reply::Devices(rows) => serde_json::to_vec(rows),
        };
        // Serializing strings and enums cannot fail.
        let mut line = json.unwrap_or_else(|_| b"[]".to_vec());
        line.push(b'\n');
        line.into()
    }
}
