//! What crosses NATS between nodes, and how a node knows a message is from another
//! node of its cluster: the [`Bus`].
//!
//! Whoever can publish on NATS can write anything on any subject, so every message a
//! node sends carries four headers: its node id, the time, a random nonce, and an
//! HMAC-SHA256 over all of them, the subject, the reply subject and the payload, under
//! a key derived (HKDF-SHA256) from `cluster.secret`. A message is dropped, counted
//! (`elfin_cluster_rejected_total{reason}`) and logged at most once a minute per
//! reason when its MAC does not check, when its time is more than [`WINDOW`] away from
//! this node's clock, or when its nonce was seen within that window (a replay). The
//! node id is inside the MAC: a message cannot be relabelled as another node's.
//!
//! The MAC authenticates; it does not hide. What nodes say on NATS (device subjects
//! are keyed hashes, requests name no uuid) stays readable to whoever reaches NATS;
//! tunnel payload never crosses it ([`super::peer`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, HeaderMap, Message, StatusCode};
use futures::{Stream, StreamExt};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;

use super::wire::NodeId;
use super::Subscription;
use crate::metric;

/// The fewest bytes a cluster secret may have.
pub const MIN_SECRET: usize = 32;

/// How far a message's time may be from this node's clock (the nodes' clocks must
/// agree that well), and how long a nonce is remembered.
pub const WINDOW: Duration = Duration::from_secs(30);

/// Nonces remembered at most: far more than a cluster's nodes send in [`WINDOW`]
/// (only messages whose MAC checks are remembered, so only nodes fill it).
const MAX_NONCES: usize = 262_144;

const NODE: &str = "Elfin-Node";
const TIME: &str = "Elfin-Time";
const NONCE: &str = "Elfin-Nonce";
const MAC: &str = "Elfin-Mac";

/// Keys derived from the cluster secret.
pub struct Keys {
    mac: hmac::Key,
    /// Hashes device subjects, when `cluster.subject_key` is not set.
    pub subjects: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(****)")
    }
}

/// HKDF output of `N` bytes.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl Keys {
    /// The keys of the cluster whose secret is `secret`.
    pub fn derive(secret: &[u8]) -> Keys {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"elfin-cluster-v1").extract(secret);
        let expand = |info: &'static [u8]| -> [u8; 32] {
            let mut key = [0; 32];
            prk.expand(&[info], Len(32))
                .and_then(|okm| okm.fill(&mut key))
                .expect("32 bytes is a valid HKDF-SHA256 length");
            key
        };
        Keys {
            mac: hmac::Key::new(hmac::HMAC_SHA256, &expand(b"message mac")),
            subjects: hex(&expand(b"subject key")),
        }
    }
}

/// Why a message from NATS was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejected {
    /// No or malformed authentication headers.
    Unsigned,
    /// The MAC does not check: another secret, or a forgery or alteration.
    BadMac,
    /// Its time is outside the window.
    Stale,
    /// Its nonce was seen before.
    Replay,
    /// Too many nonces to remember.
    Flood,
    /// Under this node's own name: it never hears itself, so a replay of its own
    /// message (which it never saw, so no nonce of it is remembered) or another
    /// node with the same name.
    OwnName,
    /// Authentic, but not a message this node expects there (unreadable, or a node
    /// speaking under a name another live node holds).
    Unexpected,
    /// A node connection to the peer port that is not one this node asked for.
    Peer,
}

impl Rejected {
    pub fn label(self) -> &'static str {
        match self {
            Rejected::Unsigned => "unsigned",
            Rejected::BadMac => "bad_mac",
            Rejected::Stale => "stale",
            Rejected::Replay => "replay",
            Rejected::Flood => "flood",
            Rejected::OwnName => "own_name",
            Rejected::Unexpected => "unexpected",
            Rejected::Peer => "peer",
        }
    }
}

/// Seals and opens this node's messages; shared by everything that talks to NATS.
pub struct Seal {
    node: NodeId,
    key: hmac::Key,
    random: SystemRandom,
    seen: Mutex<Seen>,
    logged: Mutex<HashMap<Rejected, Instant>>,
}

/// Nonces seen within the window, and when each may be forgotten.
#[derive(Default)]
struct Seen {
    nonces: HashSet<[u8; 16]>,
    expiry: VecDeque<(i64, [u8; 16])>,
}

/// How often one reason is logged.
const LOG_EVERY: Duration = Duration::from_secs(60);

impl Seal {
    pub fn new(node: NodeId, keys: &Keys) -> Seal {
        Seal {
            node,
            key: keys.mac.clone(),
            random: SystemRandom::new(),
            seen: Mutex::default(),
            logged: Mutex::default(),
        }
    }

    /// The headers that make a message on `subject` (replies to `reply`) this node's.
    pub fn seal(&self, subject: &str, reply: Option<&str>, payload: &[u8]) -> HeaderMap {
        let mut nonce = [0u8; 16];
        // The system's random source does not fail on Linux once booted.
        let _ = self.random.fill(&mut nonce);
        let (time, nonce) = (now_ms().to_string(), hex(&nonce));
        let signed = self.input(subject, reply, self.node.as_str(), &time, &nonce, payload);
        let mac = hmac::sign(&self.key, &signed);
        let mut headers = HeaderMap::new();
        headers.insert(NODE, self.node.as_str());
        headers.insert(TIME, time.as_str());
        headers.insert(NONCE, nonce.as_str());
        headers.insert(MAC, hex(mac.as_ref()).as_str());
        headers
    }

    /// The node that sent `message`, if it is authentic, fresh and not a replay.
    pub fn open(&self, message: &Message) -> Result<NodeId, Rejected> {
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let (Some(node), Some(time), Some(nonce_hex), Some(mac)) =
            (header(NODE), header(TIME), header(NONCE), header(MAC))
        else {
            return Err(Rejected::Unsigned);
        };
        let (Some(mac), Some(nonce), Ok(sent)) =
            (unhex(&mac), unhex(&nonce_hex), time.parse::<i64>())
        else {
            return Err(Rejected::Unsigned);
        };
        let nonce: [u8; 16] = nonce.try_into().map_err(|_| Rejected::Unsigned)?;
        let reply = message.reply.as_ref().map(|r| r.as_str());
        let signed = self.input(
            message.subject.as_str(),
            reply,
            &node,
            &time,
            &nonce_hex,
            &message.payload,
        );
        hmac::verify(&self.key, &signed, &mac).map_err(|_| Rejected::BadMac)?;
        if self.node == *node {
            return Err(Rejected::OwnName);
        }
        let now = now_ms();
        if sent.abs_diff(now) > WINDOW.as_millis() as u64 {
            return Err(Rejected::Stale);
        }
        self.remember(nonce, sent, now)?;
        Ok(NodeId::new(node))
    }

    /// Records a nonce; a replay if it was seen.
    fn remember(&self, nonce: [u8; 16], sent: i64, now: i64) -> Result<(), Rejected> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        while seen.expiry.front().is_some_and(|(until, _)| *until < now) {
            if let Some((_, old)) = seen.expiry.pop_front() {
                seen.nonces.remove(&old);
            }
        }
        if seen.nonces.contains(&nonce) {
            return Err(Rejected::Replay);
        }
        if seen.nonces.len() >= MAX_NONCES {
            return Err(Rejected::Flood);
        }
        seen.nonces.insert(nonce);
        // Forgotten once a replay of it would be stale anyway.
        let until = sent + WINDOW.as_millis() as i64;
        seen.expiry.push_back((until, nonce));
        Ok(())
    }

    /// What the MAC covers: each part length-prefixed, so no boundary can move.
    fn input(
        &self,
        subject: &str,
        reply: Option<&str>,
        node: &str,
        time: &str,
        nonce: &str,
        payload: &[u8],
    ) -> Vec<u8> {
        let parts: [&[u8]; 7] = [
            b"elfin-cluster-message-v1",
            subject.as_bytes(),
            reply.unwrap_or("").as_bytes(),
            node.as_bytes(),
            time.as_bytes(),
            nonce.as_bytes(),
            payload,
        ];
        let mut input = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
        for part in parts {
            input.extend_from_slice(&(part.len() as u64).to_be_bytes());
            input.extend_from_slice(part);
        }
        input
    }

    /// Counts a dropped message and logs it at most once a minute per reason.
    pub fn reject(&self, why: Rejected, detail: impl FnOnce() -> String) {
        metrics::counter!(metric::CLUSTER_REJECTED_TOTAL, "reason" => why.label()).increment(1);
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if logged
            .get(&why)
            .is_some_and(|at| now.duration_since(*at) < LOG_EVERY)
        {
            return;
        }
        logged.insert(why, now);
        let hint = match why {
            Rejected::BadMac => {
                ": not made with this node's cluster.secret (a node with another secret, \
                 or someone else on NATS)"
            }
            Rejected::Unsigned => ": not from a node of this cluster (someone else on NATS)",
            Rejected::Stale => ": check that the nodes' clocks agree (NTP), or a replay",
            Rejected::Replay => ": a copy of a message already seen (someone on NATS replays)",
            Rejected::OwnName => {
                ": a copy of this node's own message (someone on NATS replays), or another \
                 node with the same cluster.node_id"
            }
            _ => "",
        };
        log::warn!(
            "cluster: rejected ({}) {}{hint} [logged once a minute]",
            why.label(),
            detail()
        );
    }
}

/// This node's NATS connection, through which every message is sealed and opened.
#[derive(Clone)]
pub struct Bus {
    pub nats: Client,
    pub seal: Arc<Seal>,
}

impl Bus {
    /// Publishes `message` on `subject`.
    pub async fn publish<T: Serialize>(&self, subject: String, message: &T) {
        self.publish_raw(subject, encode(message)).await;
    }

    /// Publishes an encoded message on `subject`.
    pub async fn publish_raw(&self, subject: String, payload: bytes::Bytes) {
        let headers = self.seal.seal(&subject, None, &payload);
        let _ = self
            .nats
            .publish_with_headers(subject, headers, payload)
            .await;
    }

    /// Answers `to`, if it asked for an answer.
    pub async fn reply<T: Serialize>(&self, to: &Message, answer: &T) {
        if let Some(reply) = &to.reply {
            self.publish(reply.to_string(), answer).await;
        }
    }

    /// Publishes `message` on `subject` with a new reply subject; the authentic
    /// answers, with the node that sent each, until the stream is dropped.
    pub async fn ask<T: Serialize, R: DeserializeOwned + Send + 'static>(
        &self,
        subject: String,
        message: &T,
    ) -> Option<std::pin::Pin<Box<dyn Stream<Item = (NodeId, R)> + Send>>> {
        let inbox = self.nats.new_inbox();
        let answers = Subscription::new(&self.nats, inbox.clone()).await.ok()?;
        let payload = encode(message);
        let headers = self.seal.seal(&subject, Some(&inbox), &payload);
        self.nats
            .publish_with_reply_and_headers(subject, inbox, headers, payload)
            .await
            .ok()?;
        let bus = self.clone();
        // The NATS server's own status messages carry no seal: "no responders" (nobody
        // subscribes to the subject) ends the answers at once.
        let answers = answers
            .take_while(|m| std::future::ready(m.status != Some(StatusCode::NO_RESPONDERS)))
            .filter(|m| std::future::ready(m.status.is_none()));
        Some(Box::pin(answers.filter_map(move |answer| {
            std::future::ready(bus.open(&answer))
        })))
    }

    /// Asks and waits at most `timeout` for the first authentic answer.
    pub async fn request<T: Serialize, R: DeserializeOwned + Send + 'static>(
        &self,
        subject: String,
        message: &T,
        timeout: Duration,
    ) -> Option<R> {
        match self.request_reply(subject, message, timeout).await {
            Replied::Answer(answer) => Some(answer),
            Replied::Nobody | Replied::Unanswered => None,
        }
    }

    /// As [`Bus::request`], telling "nobody listens on the subject" apart from "no
    /// answer in time" (a slow node, or NATS unreachable).
    pub async fn request_reply<T: Serialize, R: DeserializeOwned + Send + 'static>(
        &self,
        subject: String,
        message: &T,
        timeout: Duration,
    ) -> Replied<R> {
        let Some(mut answers) = self.ask::<T, R>(subject, message).await else {
            return Replied::Unanswered;
        };
        match tokio::time::timeout(timeout, answers.next()).await {
            Ok(Some((_, answer))) => Replied::Answer(answer),
            // NATS said no responders: no node listens on the subject.
            Ok(None) => Replied::Nobody,
            Err(_) => Replied::Unanswered,
        }
    }

    /// The sender and content of `message` if it is authentic and readable; counted
    /// and logged if not.
    pub fn open<T: DeserializeOwned>(&self, message: &Message) -> Option<(NodeId, T)> {
        let node = match self.seal.open(message) {
            Ok(node) => node,
            Err(why) => {
                let claimed = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(NODE))
                    .map_or("(none)", |v| v.as_str());
                self.seal.reject(why, || {
                    format!("a message on {} claiming node {claimed:?}", message.subject)
                });
                return None;
            }
        };
        match serde_json::from_slice(&message.payload) {
            Ok(content) => Some((node, content)),
            Err(e) => {
                self.seal.reject(Rejected::Unexpected, || {
                    format!(
                        "an unreadable message from node {node} on {}: {e}",
                        message.subject
                    )
                });
                None
            }
        }
    }
}

/// Encodes a message (these types always serialize).
pub fn encode<T: Serialize>(message: &T) -> bytes::Bytes {
    serde_json::to_vec(message).unwrap_or_default().into()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(subject: &str, reply: Option<&str>, headers: HeaderMap, payload: &[u8]) -> Message {
        Message {
            subject: subject.into(),
            reply: reply.map(Into::into),
            payload: bytes::Bytes::copy_from_slice(payload),
            headers: Some(headers),
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    fn seal(node: &str, secret: &[u8]) -> Seal {
        Seal::new(node.into(), &Keys::derive(secret))
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_sealed_message_opens_once_and_names_its_node() {
        let (a, b) = (seal("a", SECRET), seal("b", SECRET));
        let headers = a.seal("elfin.hello", Some("_INBOX.1"), b"{}");
        let sent = message("elfin.hello", Some("_INBOX.1"), headers, b"{}");
        assert_eq!(b.open(&sent), Ok("a".into()));
        assert_eq!(b.open(&sent), Err(Rejected::Replay));
        assert_eq!(
            a.open(&sent),
            Err(Rejected::OwnName),
            "reflected to its sender"
        );
    }

    #[test]
    fn any_change_breaks_the_mac() {
        let (a, b) = (seal("a", SECRET), seal("b", SECRET));
        let headers = a.seal("elfin.dev.x", Some("_INBOX.1"), b"payload");
        let other_node = {
            let mut h = headers.clone();
            h.insert(NODE, "c");
            h
        };
        for (why, forged) in [
            (
                "subject",
                message("elfin.dev.y", Some("_INBOX.1"), headers.clone(), b"payload"),
            ),
            (
                "reply",
                message("elfin.dev.x", Some("_INBOX.2"), headers.clone(), b"payload"),
            ),
            (
                "payload",
                message("elfin.dev.x", Some("_INBOX.1"), headers.clone(), b"paylaod"),
            ),
            (
                "node",
                message("elfin.dev.x", Some("_INBOX.1"), other_node, b"payload"),
            ),
        ] {
            assert_eq!(b.open(&forged), Err(Rejected::BadMac), "{why}");
        }
        let unsigned = message("elfin.dev.x", None, HeaderMap::new(), b"payload");
        assert_eq!(b.open(&unsigned), Err(Rejected::Unsigned));
        let wrong = seal("c", b"another secret of thirty-two byte");
        let by_wrong = message(
            "elfin.dev.x",
            None,
            wrong.seal("elfin.dev.x", None, b"p"),
            b"p",
        );
        assert_eq!(b.open(&by_wrong), Err(Rejected::BadMac));
    }

    #[test]
    fn old_messages_are_stale_and_nonces_are_forgotten_after_the_window() {
        let b = seal("b", SECRET);
        let node = "a";
        let old = now_ms() - WINDOW.as_millis() as i64 - 1;
        let (time, nonce) = (old.to_string(), hex(&[7; 16]));
        let mac = hmac::sign(&b.key, &b.input("s", None, node, &time, &nonce, b"x"));
        let mut headers = HeaderMap::new();
        headers.insert(NODE, node);
        headers.insert(TIME, time.as_str());
        headers.insert(NONCE, nonce.as_str());
        headers.insert(MAC, hex(mac.as_ref()).as_str());
        assert_eq!(
            b.open(&message("s", None, headers, b"x")),
            Err(Rejected::Stale)
        );

        let now = now_ms();
        b.remember([1; 16], now - WINDOW.as_millis() as i64 + 5, now)
            .unwrap();
        assert_eq!(b.remember([1; 16], now, now), Err(Rejected::Replay));
        b.remember([2; 16], now, now + 10).unwrap();
        assert!(
            !b.seen.lock().unwrap().nonces.contains(&[1; 16]),
            "forgotten"
        );
    }

    #[test]
    fn keys_differ_per_secret_and_purpose() {
        let (one, two) = (
            Keys::derive(SECRET),
            Keys::derive(b"another secret of thirty-two byte"),
        );
        assert_ne!(one.subjects, two.subjects);
        assert_eq!(one.subjects.len(), 64);
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])), Some(vec![0, 1, 254, 255]));
        assert_eq!(unhex("zz"), None);
    }
}

/// What a request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replied<R> {
    Answer(R),
    /// No node listens on the subject.
    Nobody,
    /// Someone may listen, but no authentic answer came in time (or NATS is away).
    Unanswered,
}
