//! The wire format: protocol v1 messages in, replies out.
//!
//! [`Decoder`] splits a connection's byte stream into [`Frame`]s. Peers write
//! `;`-separated ASCII messages with no terminator, so message boundaries come from the
//! message structure itself (`docs/PROTOCOL.md` §2 and its appendix):
//!
//! * `beat;<uuid>;<mac>;<host>;<kind>` ends after its one-byte kind (so a `beat` followed
//!   at once by a `data` frame splits cleanly), or at `\n` / `\r\n`.
//! * `data;<uuid>;<mac>;<host>;<kind>;` is a header; the payload after it is arbitrary
//!   bytes and runs until the next message of the same user starts (`beat;<uuid>;`,
//!   `data;<uuid>;`, `connme;<uuid>;`, `connthem;<uuid>;`, `query;<uuid>`). The uuid is
//!   the user's secret, so binary payloads practically never contain it. Payload is
//!   handed out as it arrives, as zero-copy slices of the read buffer, so a frame of any
//!   size streams through in constant memory.
//! * `connme`, `connthem` and `query` end at `\n` / `\r\n` or at the end of what has been
//!   read so far (clients send one of them per write and wait for the reply).
//!
//! A `beat` or `data` header cut short by a read boundary waits for the rest. A payload
//! tail that could be the start of the next header, down to a single byte, is held back
//! (see [`Decoder::holding`]) until more input decides, or the caller's hold time runs
//! out; so no header byte ever leaks into a payload. Everything else that does not
//! parse becomes [`Frame::Rejected`] or [`Frame::Garbage`], always consuming input, so
//! a hostile peer can neither stall the decoder nor make it buffer without bound.
//!
//! [`Reply`] is what goes back: one `\n`-terminated JSON line, made by [`Reply::encode`].
//!
//! The decoder's boundary rules are read together here; the encoder, the codec's
//! other half, is in `frame/reply.rs` and the specification tests in
//! `frame/tests.rs`.

use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;
use memchr::memmem;

/// Longest accepted header field (uuid, mac, host, priority).
pub const MAX_FIELD: usize = 128;
/// Longest accepted control message or data header, terminator excluded.
pub const MAX_HEADER: usize = 4 * (MAX_FIELD + 1) + "connthem;".len();

const KEYWORDS: [&[u8]; 5] = [b"beat;", b"data;", b"connme;", b"connthem;", b"query;"];

/// The messages a connection may send next, as far as holding back a payload tail
/// goes: only a tail that can start one of them is held (`docs/PROTOCOL.md`, appendix).
#[derive(Debug)]
struct Expected {
    keywords: &'static [&'static [u8]],
    /// Which bytes start one of `keywords`.
    starts: [bool; 256],
}

impl Expected {
    const fn new(keywords: &'static [&'static [u8]]) -> Self {
        let mut starts = [false; 256];
        let mut k = 0;
        while k < keywords.len() {
            starts[keywords[k][0] as usize] = true;
            k += 1;
        }
        Self { keywords, starts }
    }
}

/// A connection that has not shown what it is may send any message.
static ANY: Expected = Expected::new(&KEYWORDS);
/// A device sends only its own heartbeats and data (PROTOCOL.md §1).
static FROM_DEVICE: Expected = Expected::new(&[b"beat;", b"data;"]);
/// A client sends data and requests; heartbeats are a device's.
static FROM_CLIENT: Expected = Expected::new(&[b"data;", b"connme;", b"connthem;", b"query;"]);

/// Who a connection speaks as: the fifth header field, what a session has shown
/// itself to be, and the side of a tunnel end (`docs/PROTOCOL.md` §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `0`: a physical device.
    Device,
    /// `1`: a virtual peer (desktop client, web backend).
    Client,
}

impl Role {
    /// The `role` label of metrics; `None` is a connection that has not spoken yet.
    pub fn label(role: Option<Role>) -> &'static str {
        match role {
            Some(Role::Device) => "device",
            Some(Role::Client) => "client",
            None => "unidentified",
        }
    }
}

/// Why a message was rejected: its words (a `failed` reply's reason, the log) and its
/// `reason` label of `elfin_messages_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    TooFewFields,
    FieldTooLong,
    KindNotFollowedBySeparator,
    BeatFieldCount,
    Kind,
    TooLong,
    EmptyField,
    NotUtf8,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.words())
    }
}

impl Rejection {
    /// The `reason` label of `elfin_messages_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::TooFewFields => "too_few_fields",
            Rejection::FieldTooLong => "field_too_long",
            Rejection::KindNotFollowedBySeparator | Rejection::BeatFieldCount => "field_count",
            Rejection::Kind => "kind",
            Rejection::TooLong => "too_long",
            Rejection::EmptyField => "empty_field",
            Rejection::NotUtf8 => "not_utf8",
        }
    }

    /// What a peer or an operator reads.
    pub fn words(self) -> &'static str {
        match self {
            Rejection::TooFewFields => "too few fields",
            Rejection::FieldTooLong => "header field too long",
            Rejection::KindNotFollowedBySeparator => "kind must be one byte followed by ';'",
            Rejection::BeatFieldCount => "beat takes exactly 5 fields",
            Rejection::Kind => "kind must be 0 or 1",
            Rejection::TooLong => "message too long",
            Rejection::EmptyField => "empty uuid or mac",
            Rejection::NotUtf8 => "header field is not UTF-8",
        }
    }
}

/// The four fields after `beat;` or `data;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub uuid: ByteString,
    pub mac: ByteString,
    pub host: ByteString,
    pub role: Role,
}

/// The messages that get a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Connme,
    Connthem,
    Query,
}

impl Request {
    /// Its keyword, as on the wire.
    pub fn keyword(self) -> &'static str {
        match self {
            Request::Connme => "connme",
            Request::Connthem => "connthem",
            Request::Query => "query",
        }
    }
}

/// One decoded unit of a connection's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Beat(Header),
    /// A data header; the payload follows as zero or more [`Frame::Payload`]s.
    Data(Header),
    /// The next slice of the current data message's payload, header stripped.
    Payload(Bytes),
    /// `connme`, `connthem` or `query` with its fields (valid UTF-8, each at most
    /// [`MAX_FIELD`] bytes); `crate::command` checks what each one needs.
    Request {
        request: Request,
        fields: Vec<ByteString>,
    },
    /// A message with a known keyword that is malformed. `reply` says whether its kind
    /// has a reply (`connme`, `connthem`, `query`), i.e. whether the peer waits for one.
    Rejected {
        reply: bool,
        reason: Rejection,
    },
    /// Bytes dropped because they are not a message (or are the payload of a rejected
    /// data header).
    Garbage(usize),
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    /// Inside a data payload (of the user [`Decoder::finder`] searches for); `discard`
    /// drops it instead (bad header).
    Payload { discard: bool },
}

/// Incremental decoder for one connection. Feed it the connection's input buffer; it
/// consumes whole units from the front and leaves incomplete ones in place.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// Searches payloads for the uuid of the current data message's user; kept across
    /// messages since a connection almost always speaks for one user.
    /// Boxed: it is a few hundred bytes, and most connections (beats, requests)
    /// never need one.
    finder: Option<Box<memmem::Finder<'static>>>,
    /// What the connection may send next: only a tail that can start it is held.
    next: &'static Expected,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            state: State::default(),
            finder: None,
            next: &ANY,
        }
    }
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The connection has shown itself to be a device or a client: from now on a
    /// payload tail is held back only if it can start a message of that role
    /// (a device's `beat` or `data`; a client's `data`, `connme`, `connthem` or
    /// `query`). Every message is still recognised where it arrives whole.
    pub fn expect_from(&mut self, role: Role) {
        self.next = match role {
            Role::Device => &FROM_DEVICE,
            Role::Client => &FROM_CLIENT,
        };
    }

    /// Takes the next frame off the front of `buf`, or `None` when `buf` holds no
    /// complete unit yet (more input is needed).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        loop {
            let State::Payload { discard } = self.state else {
                return self.decode_message(buf);
            };
            if buf.is_empty() {
                return None;
            }
            let Some(finder) = &self.finder else {
                self.state = State::Idle;
                continue;
            };
            let end = match find_boundary(finder, buf) {
                Some(at) => {
                    self.state = State::Idle;
                    at
                }
                None => buf.len() - held_suffix(buf, finder.needle(), self.next),
            };
            if end == 0 {
                match self.state {
                    State::Idle => continue,
                    State::Payload { .. } => return None,
                }
            }
            return Some(payload(buf.split_to(end).freeze(), discard));
        }
    }

    /// True while a payload tail that could be the start of the next header is held
    /// back waiting for more input. The caller flushes it with [`Decoder::flush_held`]
    /// if nothing arrives within its hold time.
    pub fn holding(&self, buf: &BytesMut) -> bool {
        matches!(self.state, State::Payload { .. }) && !buf.is_empty()
    }

    /// Hands out a held-back payload tail as payload: no more input came to make it a
    /// header.
    pub fn flush_held(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        let State::Payload { discard } = self.state else {
            return None;
        };
        if buf.is_empty() {
            return None;
        }
        Some(payload(buf.split().freeze(), discard))
    }

    fn decode_message(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        let blank = buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        buf.advance(blank);
        if buf.is_empty() {
            return None;
        }
        let Some(keyword) = KEYWORDS.iter().find(|k| buf.starts_with(k)) else {
            if KEYWORDS.iter().any(|k| k.starts_with(buf)) {
                return None; // a keyword cut short by a read boundary
            }
            return Some(Frame::Garbage(skip_garbage(buf)));
        };
        match *keyword {
            b"beat;" | b"data;" => self.decode_header(buf, keyword.len()),
            b"connme;" => Some(decode_request(buf, keyword.len(), Request::Connme)),
            b"connthem;" => Some(decode_request(buf, keyword.len(), Request::Connthem)),
            _ => Some(decode_request(buf, keyword.len(), Request::Query)),
        }
    }

    /// `beat;u;m;h;k` or `data;u;m;h;k;`: the three fields, each ended by `;`, then the kind.
    fn decode_header(&mut self, buf: &mut BytesMut, start: usize) -> Option<Frame> {
        let is_data = buf[0] == b'd';
        let mut fields = [0..0, 0..0, 0..0];
        let mut at = start;
        for field in &mut fields {
            let rest = &buf[at..buf.len().min(at + MAX_FIELD + 1)];
            match memchr::memchr3(b';', b'\n', b'\r', rest) {
                Some(i) if rest[i] == b';' => {
                    *field = at..at + i;
                    at += i + 1;
                }
                Some(_) => return Some(reject_line(buf, false, Rejection::TooFewFields)),
                None if rest.len() > MAX_FIELD => {
                    return Some(reject_line(buf, false, Rejection::FieldTooLong))
                }
                None => return None, // cut short by a read boundary
            }
        }
        // The kind: one byte; `data` follows it with `;`, `beat` with a line end or the
        // next message.
        let need = if is_data { 2 } else { 1 };
        if buf.len() < at + need {
            return None;
        }
        // The kind field says who is talking.
        let role = match buf[at] {
            b'0' => Some(Role::Device),
            b'1' => Some(Role::Client),
            _ => None,
        };
        let end = at + 1;
        let follows = buf.get(end).copied();
        if is_data && follows != Some(b';') || !is_data && follows == Some(b';') {
            let reason = if is_data {
                Rejection::KindNotFollowedBySeparator
            } else {
                Rejection::BeatFieldCount
            };
            return Some(self.reject_header(buf, is_data, &fields, reason));
        }
        let Some(role) = role else {
            return Some(self.reject_header(buf, is_data, &fields, Rejection::Kind));
        };
        let head = buf.split_to(if is_data { end + 1 } else { end }).freeze();
        let [uuid, mac, host] = fields.map(|r| head.slice(r));
        let header = match (text(uuid, false), text(mac, false), text(host, true)) {
            (Ok(uuid), Ok(mac), Ok(host)) => Header {
                uuid,
                mac,
                host,
                role,
            },
            (Err(reason), ..) | (_, Err(reason), _) | (.., Err(reason)) => {
                if is_data {
                    self.enter_payload(&head.slice(fields_start(&head)), true);
                }
                return Some(Frame::Rejected {
                    reply: false,
                    reason,
                });
            }
        };
        if !is_data {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
            } else if buf.first() == Some(&b'\n') {
                buf.advance(1);
            }
            return Some(Frame::Beat(header));
        }
        self.enter_payload(header.uuid.as_bytes(), false);
        Some(Frame::Data(header))
    }

    /// Drops a header with well-formed fields but a bad kind. A data header's payload
    /// is discarded up to the next message.
    fn reject_header(
        &mut self,
        buf: &mut BytesMut,
        is_data: bool,
        fields: &[std::ops::Range<usize>; 3],
        reason: Rejection,
    ) -> Frame {
        if !is_data {
            return reject_line(buf, false, reason);
        }
        let uuid = Bytes::copy_from_slice(&buf[fields[0].clone()]);
        // Skip through the kind field.
        let kind_end = buf[fields[2].end + 1..]
            .iter()
            .position(|&b| b == b';')
            .map_or(buf.len(), |i| fields[2].end + 2 + i);
        buf.advance(kind_end.min(buf.len()));
        self.enter_payload(&uuid, true);
        Frame::Rejected {
            reply: false,
            reason,
        }
    }

    fn enter_payload(&mut self, uuid: &[u8], discard: bool) {
        if self.finder.as_ref().is_none_or(|f| f.needle() != uuid) {
            self.finder = Some(Box::new(memmem::Finder::new(uuid).into_owned()));
        }
        self.state = State::Payload { discard };
    }
}

fn payload(bytes: Bytes, discard: bool) -> Frame {
    if discard {
        Frame::Garbage(bytes.len())
    } else {
        Frame::Payload(bytes)
    }
}

/// Where the uuid field of a data header starts (after `data;`).
fn fields_start(head: &Bytes) -> std::ops::Range<usize> {
    let start = "data;".len();
    let end = head[start..]
        .iter()
        .position(|&b| b == b';')
        .map_or(head.len(), |i| start + i);
    start..end
}

/// `connme;…`, `connthem;…`, `query;…`: ends at a line end or at the end of the input
/// read so far. Splits the fields; the command checks how many it needs.
fn decode_request(buf: &mut BytesMut, keyword: usize, request: Request) -> Frame {
    let window = &buf[..buf.len().min(MAX_HEADER + 1)];
    let line_end = memchr::memchr(b'\n', window).unwrap_or(buf.len());
    if line_end > MAX_HEADER {
        return reject_line(buf, true, Rejection::TooLong);
    }
    let line = buf.split_to(line_end).freeze();
    if buf.first() == Some(&b'\n') {
        buf.advance(1);
    }
    let body_end = line.len() - usize::from(line.last() == Some(&b'\r'));
    let body = line.slice(keyword..body_end);
    let mut fields = Vec::with_capacity(4);
    let mut from = 0;
    for i in memchr::memchr_iter(b';', &body).chain([body.len()]) {
        match text(body.slice(from..i), true) {
            Ok(field) => fields.push(field),
            Err(reason) => {
                return Frame::Rejected {
                    reply: true,
                    reason,
                }
            }
        }
        from = i + 1;
    }
    Frame::Request { request, fields }
}

/// Drops the rest of a bad line: through the next `\n`, or all input read so far.
fn reject_line(buf: &mut BytesMut, reply: bool, reason: Rejection) -> Frame {
    let end = memchr::memchr(b'\n', buf).map_or(buf.len(), |i| i + 1);
    buf.advance(end);
    Frame::Rejected { reply, reason }
}

/// Drops bytes that start no message, up to the next line end or keyword; keeps a tail
/// that may be a keyword cut short. Always drops at least one byte.
fn skip_garbage(buf: &mut BytesMut) -> usize {
    // One pass that stops at the first line end or keyword (every keyword ends in
    // `;`, so only those are checked): a flood of junk costs linear time, and so does
    // a junk byte in front of each message.
    let stop = memchr::memchr2_iter(b';', b'\n', buf).find_map(|i| {
        if buf[i] == b'\n' {
            return Some(i + 1);
        }
        let before = &buf[..=i];
        KEYWORDS
            .iter()
            .find(|k| before.ends_with(k) && before.len() > k.len())
            .map(|k| before.len() - k.len())
    });
    let end = stop.unwrap_or_else(|| {
        let keep = (1..buf.len().min(9))
            .rev()
            .find(|&n| {
                let tail = &buf[buf.len() - n..];
                KEYWORDS.iter().any(|k| k.starts_with(tail))
            })
            .unwrap_or(0);
        buf.len() - keep
    });
    buf.advance(end);
    end
}

/// A header field as text: valid UTF-8, at most [`MAX_FIELD`] bytes, non-empty unless
/// `may_be_empty`.
fn text(field: Bytes, may_be_empty: bool) -> Result<ByteString, Rejection> {
    if field.is_empty() && !may_be_empty {
        return Err(Rejection::EmptyField);
    }
    if field.len() > MAX_FIELD {
        return Err(Rejection::FieldTooLong);
    }
    ByteString::try_from(field).map_err(|_| Rejection::NotUtf8)
}

/// Checks a uuid as the decoder would accept it in a header (for `user add`).
pub fn check_uuid(uuid: &str) -> Result<(), &'static str> {
    if uuid.contains([';', '\r', '\n']) {
        return Err("a uuid must not contain ';' or line breaks");
    }
    text(Bytes::copy_from_slice(uuid.as_bytes()), false)
        .map(drop)
        .map_err(Rejection::words)
}

/// The start of the first message of this user in a payload: a keyword right before an
/// occurrence of the uuid, followed by `;` or a line end. `query;<uuid>` may also end
/// at the end of the input read so far (it has nothing after the uuid); any other
/// keyword and uuid there are held back by [`held_suffix`] until the next byte decides.
fn find_boundary(finder: &memmem::Finder<'_>, buf: &[u8]) -> Option<usize> {
    let uuid_len = finder.needle().len();
    finder.find_iter(buf).find_map(|at| {
        let keyword = KEYWORDS.iter().find(|k| buf[..at].ends_with(k))?;
        match buf.get(at + uuid_len) {
            Some(b';' | b'\r' | b'\n') => Some(at - keyword.len()),
            None if *keyword == b"query;" => Some(at - keyword.len()),
            _ => None,
        }
    })
}

/// Length of the longest tail of `buf` that could be the start of a message of this
/// user that the connection may send next (`<keyword><uuid>;`), down to a single byte:
/// such a tail is held back until more input shows whether it is payload.
fn held_suffix(buf: &[u8], uuid: &[u8], next: &Expected) -> usize {
    let longest = "connthem;".len() + uuid.len() + 1;
    // Longest first; a random tail has one candidate start in about 64 bytes, so the
    // check per payload costs a scan of its last few dozen bytes.
    (buf.len().saturating_sub(longest)..buf.len())
        .filter(|&at| next.starts[usize::from(buf[at])])
        .map(|at| buf.len() - at)
        .find(|&n| {
            let tail = &buf[buf.len() - n..];
            next.keywords.iter().any(|k| {
                let (kw, rest) = tail.split_at(tail.len().min(k.len()));
                k.starts_with(kw)
                    && (rest.is_empty() || uuid.starts_with(&rest[..rest.len().min(uuid.len())]))
                    && (rest.len() <= uuid.len() || rest[uuid.len()..] == b";"[..])
            })
        })
        .unwrap_or(0)
}

mod reply;
pub use reply::{OnlineStatus, QueryRow, Reply};

#[cfg(test)]
mod tests;
