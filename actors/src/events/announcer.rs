//! Where the herald's events go out: each one's user named (from the account cache,
//! a store read on a miss), counted, logged, and handed to every endpoint whose
//! filters take it. One task does it for the node, in the order events were decided,
//! so a device's events never overtake each other, and the herald never waits on the
//! store: it keeps answering the other nodes while names are read.

use std::collections::HashMap;
use std::sync::Arc;

use bytestring::ByteString;
use tokio::sync::mpsc;

use super::webhook::{Prepared, Queue};
use super::{Event, EventData, EventKind, EventUser};
use crate::masked::masked;
use crate::metric;
use crate::users::UserDirectory;

/// An event before its user is named.
#[derive(Debug)]
pub struct Draft {
    pub kind: EventKind,
    /// The user's uuid, when the event concerns a device.
    pub uuid: Option<ByteString>,
    /// The user's name when it is known already (a certificate's user).
    pub user: Option<String>,
    pub data: EventData,
}

/// The handle drafts are handed through; the task ends when it is dropped.
#[derive(Clone)]
pub struct Announcer(mpsc::UnboundedSender<Vec<Draft>>);

impl Announcer {
    /// Starts the task on the current arbiter.
    pub fn start(users: Arc<UserDirectory>, queues: Vec<Queue>) -> Announcer {
        let (tx, rx) = mpsc::unbounded_channel();
        actix_rt::spawn(announce_all(users, queues, rx));
        Announcer(tx)
    }

    pub fn announce(&self, drafts: Vec<Draft>) {
        if !drafts.is_empty() {
            let _ = self.0.send(drafts);
        }
    }
}

async fn announce_all(
    users: Arc<UserDirectory>,
    queues: Vec<Queue>,
    mut rx: mpsc::UnboundedReceiver<Vec<Draft>>,
) {
    while let Some(drafts) = rx.recv().await {
        // One read per user of a batch (10 000 devices offline at once are a few
        // hundred users).
        let mut names: HashMap<ByteString, Option<String>> = HashMap::new();
        for mut draft in drafts {
            if let (Some(uuid), None) = (&draft.uuid, &draft.user) {
                if !names.contains_key(uuid) {
                    names.insert(uuid.clone(), users.name_of(uuid).await);
                }
                draft.user = names[uuid].clone();
            }
            draft.data.user = match (&draft.uuid, draft.user) {
                (Some(uuid), name) => Some(EventUser {
                    name,
                    uuid_prefix: Some(masked(uuid)),
                }),
                (None, Some(name)) => Some(EventUser {
                    name: Some(name),
                    uuid_prefix: None,
                }),
                (None, None) => None,
            };
            let event = Event::new(draft.kind, draft.data);
            send(&queues, &event, draft.uuid.as_deref());
        }
    }
}

fn send(queues: &[Queue], event: &Event, uuid: Option<&str>) {
    metrics::counter!(metric::EVENTS_TOTAL, "type" => event.kind.name()).increment(1);
    log::info!(
        "event {}: {} {}{}",
        event.kind.name(),
        event.data.mac.as_deref().unwrap_or(""),
        event.data.reason,
        event
            .data
            .source
            .as_ref()
            .map(|s| format!(" (from {s})"))
            .unwrap_or_default()
    );
    let mut prepared = None;
    for queue in queues {
        if queue.endpoint().takes(event, uuid) {
            let body = prepared.get_or_insert_with(|| Prepared::of(event));
            queue.push(body.clone());
        }
    }
}
