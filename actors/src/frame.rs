//! The wire format: splitting a connection's byte stream into protocol v1 messages.
//!
//! Peers write `;`-separated ASCII messages with no terminator, so message boundaries
//! come from the message structure itself (`docs/PROTOCOL.md` §2):
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
//! A `beat` or `data` header cut short by a read boundary waits for the rest; a payload
//! tail that could be the start of the next header is held back briefly (see
//! [`Decoder::holding`]). Everything else that does not parse becomes
//! [`Frame::Rejected`] or [`Frame::Garbage`], always consuming input, so a hostile peer
//! can neither stall the decoder nor make it buffer without bound.

use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;
use memchr::memmem;

/// Longest accepted header field (uuid, mac, host, priority).
pub const MAX_FIELD: usize = 128;
/// Longest accepted control message or data header, terminator excluded.
pub const MAX_HEADER: usize = 4 * (MAX_FIELD + 1) + "connthem;".len();

const KEYWORDS: [&[u8]; 5] = [b"beat;", b"data;", b"connme;", b"connthem;", b"query;"];

/// The fifth header field: who is talking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `0`: a physical device.
    Device,
    /// `1`: a virtual peer (desktop client, web backend).
    Client,
}

/// The four fields after `beat;` or `data;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub uuid: ByteString,
    pub mac: ByteString,
    pub host: ByteString,
    pub kind: Kind,
}

/// One decoded unit of a connection's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Beat(Header),
    /// A data header; the payload follows as zero or more [`Frame::Payload`]s.
    Data(Header),
    /// The next slice of the current data message's payload, header stripped.
    Payload(Bytes),
    Connme {
        uuid: ByteString,
        mac: ByteString,
        priority: Option<ByteString>,
    },
    Connthem {
        uuid: ByteString,
        mac1: ByteString,
        mac2: ByteString,
    },
    Query {
        uuid: ByteString,
    },
    /// A message with a known keyword that is malformed. `reply` says whether its kind
    /// has a reply (`connme`, `connthem`, `query`), i.e. whether the peer waits for one.
    Rejected {
        reply: bool,
        reason: String,
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
    Payload {
        discard: bool,
        /// The last payload byte handed out, to spot a header whose first byte already
        /// went out as payload when it was flushed from the hold-back.
        last: Option<u8>,
    },
}

/// Incremental decoder for one connection. Feed it the connection's input buffer; it
/// consumes whole units from the front and leaves incomplete ones in place.
#[derive(Debug, Default)]
pub struct Decoder {
    state: State,
    /// Searches payloads for the uuid of the current data message's user; kept across
    /// messages since a connection almost always speaks for one user.
    finder: Option<memmem::Finder<'static>>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next frame off the front of `buf`, or `None` when `buf` holds no
    /// complete unit yet (more input is needed).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        loop {
            match &mut self.state {
                State::Idle => return self.decode_message(buf),
                State::Payload { discard, last } => {
                    if buf.is_empty() {
                        return None;
                    }
                    let Some(finder) = &self.finder else {
                        self.state = State::Idle;
                        continue;
                    };
                    let uuid = finder.needle();
                    // A header whose first byte was already flushed out as payload.
                    let resumed = last.is_some_and(|b| resumes_boundary(b, buf, uuid));
                    let (end, next) = if resumed {
                        (0, Some(0))
                    } else {
                        match find_boundary(finder, buf) {
                            Some(at) => (at, Some(at)),
                            None => (buf.len() - held_suffix(buf, uuid), None),
                        }
                    };
                    if resumed {
                        // Put the flushed first byte back so the header parses whole.
                        let mut whole = BytesMut::with_capacity(buf.len() + 1);
                        whole.extend_from_slice(&[last.unwrap_or_default()]);
                        whole.extend_from_slice(buf);
                        *buf = whole;
                    }
                    let discard = *discard;
                    if next.is_some() {
                        self.state = State::Idle;
                    }
                    if end == 0 {
                        if next.is_some() {
                            continue;
                        }
                        return None;
                    }
                    let payload = buf.split_to(end).freeze();
                    if let State::Payload { last, .. } = &mut self.state {
                        *last = payload.last().copied();
                    }
                    return Some(if discard {
                        Frame::Garbage(payload.len())
                    } else {
                        Frame::Payload(payload)
                    });
                }
            }
        }
    }

    /// True while a payload tail that could be the start of the next header is held
    /// back waiting for more input. The caller flushes it with [`Decoder::flush_held`]
    /// if nothing arrives shortly.
    pub fn holding(&self, buf: &BytesMut) -> bool {
        matches!(self.state, State::Payload { .. }) && !buf.is_empty()
    }

    /// Hands out a held-back payload tail as payload.
    pub fn flush_held(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        let State::Payload { discard, last, .. } = &mut self.state else {
            return None;
        };
        if buf.is_empty() {
            return None;
        }
        let payload = buf.split().freeze();
        *last = payload.last().copied();
        Some(if *discard {
            Frame::Garbage(payload.len())
        } else {
            Frame::Payload(payload)
        })
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
            _ => Some(decode_control(buf, keyword)),
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
                Some(_) => return Some(reject_line(buf, false, "too few fields")),
                None if rest.len() > MAX_FIELD => {
                    return Some(reject_line(buf, false, "header field too long"))
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
        let kind = match buf[at] {
            b'0' => Some(Kind::Device),
            b'1' => Some(Kind::Client),
            _ => None,
        };
        let end = at + 1;
        let follows = buf.get(end).copied();
        if is_data && follows != Some(b';') || !is_data && follows == Some(b';') {
            let reason = if is_data {
                "kind must be one byte followed by ';'"
            } else {
                "beat takes exactly 5 fields"
            };
            return Some(self.reject_header(buf, is_data, &fields, reason));
        }
        let Some(kind) = kind else {
            return Some(self.reject_header(buf, is_data, &fields, "kind must be 0 or 1"));
        };
        let head = buf.split_to(if is_data { end + 1 } else { end }).freeze();
        let [uuid, mac, host] = fields.map(|r| head.slice(r));
        let header = match (text(uuid, false), text(mac, false), text(host, true)) {
            (Ok(uuid), Ok(mac), Ok(host)) => Header {
                uuid,
                mac,
                host,
                kind,
            },
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
                if is_data {
                    self.enter_payload(&head.slice(fields_start(&head)), true);
                }
                return Some(Frame::Rejected {
                    reply: false,
                    reason: e.into(),
                });
            }
        };
        if !is_data {
            if buf.first() == Some(&b'\r') && buf.get(1) == Some(&b'\n') {
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
        reason: &str,
    ) -> Frame {
        if is_data {
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
                reason: reason.into(),
            }
        } else {
            reject_line(buf, false, reason)
        }
    }

    fn enter_payload(&mut self, uuid: &[u8], discard: bool) {
        if self.finder.as_ref().is_none_or(|f| f.needle() != uuid) {
            self.finder = Some(memmem::Finder::new(uuid).into_owned());
        }
        self.state = State::Payload {
            discard,
            last: None,
        };
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

/// `connme;u;m[;p]`, `connthem;u;m1;m2`, `query;u`: ends at a line end or at the end of
/// the input read so far.
fn decode_control(buf: &mut BytesMut, keyword: &[u8]) -> Frame {
    let line_end = memchr::memchr(b'\n', buf).unwrap_or(buf.len());
    if line_end > MAX_HEADER {
        return reject_line(buf, true, "message too long");
    }
    let line = buf.split_to(line_end).freeze();
    if buf.first() == Some(&b'\n') {
        buf.advance(1);
    }
    let body_end = line.len() - usize::from(line.last() == Some(&b'\r'));
    let body = line.slice(keyword.len()..body_end);
    let mut fields = Vec::with_capacity(4);
    let mut from = 0;
    for i in memchr::memchr_iter(b';', &body) {
        fields.push(body.slice(from..i));
        from = i + 1;
    }
    fields.push(body.slice(from..));

    let parsed = match (keyword, fields.len()) {
        (b"connme;", 2 | 3) => {
            let mut it = fields.into_iter();
            let (uuid, mac, priority) = (it.next(), it.next(), it.next());
            (|| {
                Ok(Frame::Connme {
                    uuid: text(uuid.unwrap_or_default(), false)?,
                    mac: text(mac.unwrap_or_default(), false)?,
                    priority: priority.map(|p| text(p, true)).transpose()?,
                })
            })()
        }
        (b"connme;", _) => Err("expected connme;<uuid>;<mac>[;<priority>]"),
        (b"connthem;", 3) => {
            let [uuid, mac1, mac2]: [Bytes; 3] = fields.try_into().unwrap_or_default();
            (|| {
                Ok(Frame::Connthem {
                    uuid: text(uuid, false)?,
                    mac1: text(mac1, false)?,
                    mac2: text(mac2, false)?,
                })
            })()
        }
        (b"connthem;", _) => Err("expected connthem;<uuid>;<mac1>;<mac2>"),
        (_, 1) => text(fields.pop().unwrap_or_default(), false).map(|uuid| Frame::Query { uuid }),
        _ => Err("expected query;<uuid>"),
    };
    parsed.unwrap_or_else(|reason| Frame::Rejected {
        reply: true,
        reason: reason.into(),
    })
}

/// Drops the rest of a bad line: through the next `\n`, or all input read so far.
fn reject_line(buf: &mut BytesMut, reply: bool, reason: &str) -> Frame {
    let end = memchr::memchr(b'\n', buf).map_or(buf.len(), |i| i + 1);
    buf.advance(end);
    Frame::Rejected {
        reply,
        reason: reason.into(),
    }
}

/// Drops bytes that start no message, up to the next line end or keyword; keeps a tail
/// that may be a keyword cut short. Always drops at least one byte.
fn skip_garbage(buf: &mut BytesMut) -> usize {
    // Only the current line is searched for a keyword, so a flood of short garbage
    // lines costs linear time.
    let line_end = memchr::memchr(b'\n', buf).map(|i| i + 1);
    let line = &buf[1..line_end.unwrap_or(buf.len())];
    let keyword = KEYWORDS
        .iter()
        .filter_map(|k| memmem::find(line, k).map(|i| i + 1))
        .min();
    let end = keyword.or(line_end).unwrap_or_else(|| {
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
fn text(field: Bytes, may_be_empty: bool) -> Result<ByteString, &'static str> {
    if field.is_empty() && !may_be_empty {
        return Err("empty uuid or mac");
    }
    if field.len() > MAX_FIELD {
        return Err("header field too long");
    }
    ByteString::try_from(field).map_err(|_| "header field is not UTF-8")
}

/// The start of the first message of this user in a payload: a keyword right before an
/// occurrence of the uuid, followed by `;`, a line end or the end of the input read so
/// far (`query;<uuid>` has nothing after the uuid).
fn find_boundary(finder: &memmem::Finder<'_>, buf: &[u8]) -> Option<usize> {
    let uuid_len = finder.needle().len();
    finder.find_iter(buf).find_map(|at| {
        let keyword = KEYWORDS.iter().find(|k| buf[..at].ends_with(k))?;
        match buf.get(at + uuid_len) {
            None | Some(b';' | b'\r' | b'\n') => Some(at - keyword.len()),
            _ => None,
        }
    })
}

/// Length of the longest tail of `buf` that could be the start of a message of this
/// user (`<keyword><uuid>;`). A single byte is not held: it would delay every payload
/// ending in `b`, `c`, `d` or `q`; a header cut after its first byte is caught by
/// [`resumes_boundary`] instead.
fn held_suffix(buf: &[u8], uuid: &[u8]) -> usize {
    let longest = "connthem;".len() + uuid.len() + 1;
    (2..=buf.len().min(longest))
        .rev()
        .find(|&n| {
            let tail = &buf[buf.len() - n..];
            KEYWORDS.iter().any(|k| {
                let (kw, rest) = tail.split_at(tail.len().min(k.len()));
                k.starts_with(kw)
                    && (rest.is_empty() || uuid.starts_with(&rest[..rest.len().min(uuid.len())]))
                    && (rest.len() <= uuid.len() || rest[uuid.len()..] == b";"[..])
            })
        })
        .unwrap_or(0)
}

/// Whether `first` (the last byte handed out) plus the start of `buf` begin a message
/// of this user, i.e. a read boundary fell right after a header's first byte.
fn resumes_boundary(first: u8, buf: &[u8], uuid: &[u8]) -> bool {
    KEYWORDS.iter().any(|k| {
        k[0] == first && buf.starts_with(&k[1..]) && buf[k.len() - 1..].starts_with(uuid) && {
            let after = k.len() - 1 + uuid.len();
            matches!(buf.get(after), Some(b';' | b'\r' | b'\n'))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(uuid: &str, mac: &str, host: &str, kind: Kind) -> Header {
        Header {
            uuid: uuid.into(),
            mac: mac.into(),
            host: host.into(),
            kind,
        }
    }

    /// Feeds `chunks` one read at a time and collects every frame, merging payload
    /// slices so tests can compare whole payloads.
    fn decode_reads(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut decoder = Decoder::new();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(frame) = decoder.decode(&mut buf) {
                match (frames.last_mut(), frame) {
                    (Some(Frame::Payload(prev)), Frame::Payload(more)) => {
                        *prev = [prev.as_ref(), more.as_ref()].concat().into()
                    }
                    (_, frame) => frames.push(frame),
                }
            }
        }
        if let Some(Frame::Payload(more)) = decoder.flush_held(&mut buf) {
            match frames.last_mut() {
                Some(Frame::Payload(prev)) => {
                    *prev = [prev.as_ref(), more.as_ref()].concat().into()
                }
                _ => frames.push(Frame::Payload(more)),
            }
        }
        frames
    }

    fn decode_all(input: &[u8]) -> Vec<Frame> {
        decode_reads(&[input])
    }

    fn payload(bytes: &[u8]) -> Frame {
        Frame::Payload(Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn beat_without_terminator() {
        assert_eq!(
            decode_all(b"beat;u-1;F0FE6B2A1C3D;plc-1;0"),
            vec![Frame::Beat(header(
                "u-1",
                "F0FE6B2A1C3D",
                "plc-1",
                Kind::Device
            ))]
        );
    }

    #[test]
    fn beat_with_line_terminators() {
        let beat = Frame::Beat(header("u", "m", "h", Kind::Device));
        assert_eq!(decode_all(b"beat;u;m;h;0\n"), vec![beat.clone()]);
        assert_eq!(
            decode_all(b"beat;u;m;h;0\r\nbeat;u;m;h;0\r\n"),
            vec![beat.clone(), beat]
        );
    }

    #[test]
    fn data_payload_is_raw_bytes_after_the_header() {
        let all: Vec<u8> = (0..=255).collect();
        let input = [b"data;u;T5000;T5000;1;".as_slice(), &all].concat();
        assert_eq!(
            decode_all(&input),
            vec![
                Frame::Data(header("u", "T5000", "T5000", Kind::Client)),
                payload(&all)
            ]
        );
    }

    #[test]
    fn coalesced_data_frames_split_at_the_next_header() {
        let frames = decode_all(b"data;u;m;h;0;AB;C\ndata;u;m;h;0;\x00data;x");
        assert_eq!(
            frames,
            vec![
                Frame::Data(header("u", "m", "h", Kind::Device)),
                payload(b"AB;C\n"),
                Frame::Data(header("u", "m", "h", Kind::Device)),
                payload(b"\x00data;x"),
            ]
        );
    }

    #[test]
    fn beat_then_data_in_one_read() {
        assert_eq!(
            decode_all(b"beat;u;m;h;0data;u;m;h;0;xyz"),
            vec![
                Frame::Beat(header("u", "m", "h", Kind::Device)),
                Frame::Data(header("u", "m", "h", Kind::Device)),
                payload(b"xyz"),
            ]
        );
    }

    #[test]
    fn data_then_beat_in_one_read() {
        assert_eq!(
            decode_all(b"data;u;m;h;0;xyzbeat;u;m;h;0"),
            vec![
                Frame::Data(header("u", "m", "h", Kind::Device)),
                payload(b"xyz"),
                Frame::Beat(header("u", "m", "h", Kind::Device)),
            ]
        );
    }

    #[test]
    fn large_payload_streams_across_reads() {
        let body: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let input = [b"data;u;m;h;0;".as_slice(), &body, b"data;u;m;h;0;end"].concat();
        let reads: Vec<&[u8]> = input.chunks(1000).collect();
        assert_eq!(
            decode_reads(&reads),
            vec![
                Frame::Data(header("u", "m", "h", Kind::Device)),
                payload(&body),
                Frame::Data(header("u", "m", "h", Kind::Device)),
                payload(b"end"),
            ]
        );
    }

    #[test]
    fn headers_split_at_every_position_still_parse() {
        let input = b"data;user-1;m;h;0;hello;world\r\ndata;user-1;m;h;0;again";
        let want = decode_all(input);
        let second = input.len() - b"data;user-1;m;h;0;again".len();
        for cut in 1..input.len() {
            let (a, b) = input.split_at(cut);
            let mut want = want.clone();
            if cut == second + 1 {
                // Cut right after the second header's first byte: that byte goes out
                // as payload (see `held_suffix`), the header itself is still found.
                want[1] = payload(b"hello;world\r\nd");
            }
            assert_eq!(decode_reads(&[a, b]), want, "cut at {cut}");
        }
    }

    #[test]
    fn payload_tail_looking_like_a_header_start_is_held_then_flushed() {
        let mut decoder = Decoder::new();
        let mut buf = BytesMut::from(&b"data;u;m;h;0;abcda"[..]);
        assert!(matches!(decoder.decode(&mut buf), Some(Frame::Data(_))));
        assert_eq!(decoder.decode(&mut buf), Some(payload(b"abc")));
        assert_eq!(decoder.decode(&mut buf), None);
        assert!(decoder.holding(&buf));
        assert_eq!(decoder.flush_held(&mut buf), Some(payload(b"da")));
        assert!(!decoder.holding(&buf));
    }

    #[test]
    fn a_single_trailing_keyword_byte_is_not_held() {
        let mut decoder = Decoder::new();
        let mut buf = BytesMut::from(&b"data;u;m;h;0;abcd"[..]);
        decoder.decode(&mut buf);
        assert_eq!(decoder.decode(&mut buf), Some(payload(b"abcd")));
        assert!(!decoder.holding(&buf));
    }

    #[test]
    fn a_query_right_after_a_data_frame_is_a_message() {
        assert_eq!(
            decode_reads(&[b"data;u;T1;T1;1;xyz", b"query;u"]),
            vec![
                Frame::Data(header("u", "T1", "T1", Kind::Client)),
                payload(b"xyz"),
                Frame::Query { uuid: "u".into() },
            ]
        );
    }

    #[test]
    fn control_messages_end_at_the_read_or_line_end() {
        assert_eq!(
            decode_all(b"connme;u;F0FE6B2A1C3D"),
            vec![Frame::Connme {
                uuid: "u".into(),
                mac: "F0FE6B2A1C3D".into(),
                priority: None
            }]
        );
        assert_eq!(
            decode_all(b"connme;u;m;1\r\nquery;u\n"),
            vec![
                Frame::Connme {
                    uuid: "u".into(),
                    mac: "m".into(),
                    priority: Some("1".into())
                },
                Frame::Query { uuid: "u".into() }
            ]
        );
        assert_eq!(
            decode_all(b"connthem;u;a;b"),
            vec![Frame::Connthem {
                uuid: "u".into(),
                mac1: "a".into(),
                mac2: "b".into()
            }]
        );
    }

    #[test]
    fn malformed_control_messages_are_rejected_with_a_reply() {
        for input in [
            &b"connme;u"[..],
            b"connme;u;m;1;2",
            b"connme;;m",
            b"connme;u;",
            b"connthem;u;a",
            b"query;u;x",
            b"query;",
            b"connme;u;\xff\xfe",
        ] {
            match decode_all(input).as_slice() {
                [Frame::Rejected { reply: true, .. }] => {}
                other => panic!("{:?} decoded as {other:?}", String::from_utf8_lossy(input)),
            }
        }
    }

    #[test]
    fn malformed_beats_are_rejected_without_reply() {
        for input in [
            &b"beat;u;m;h;0;extra"[..],
            b"beat;u;m;h;7",
            b"beat;u;m\n",
            b"beat;;m;h;0",
        ] {
            match decode_all(input).as_slice() {
                [Frame::Rejected { reply: false, .. }] => {}
                other => panic!("{:?} decoded as {other:?}", String::from_utf8_lossy(input)),
            }
        }
    }

    #[test]
    fn payload_of_a_rejected_data_header_is_dropped() {
        assert_eq!(
            decode_all(b"data;u;m;h;9;secretbeat;u;m;h;0"),
            vec![
                Frame::Rejected {
                    reply: false,
                    reason: "kind must be 0 or 1".into()
                },
                Frame::Garbage(6),
                Frame::Beat(header("u", "m", "h", Kind::Device)),
            ]
        );
    }

    #[test]
    fn garbage_is_dropped_up_to_the_next_line_or_keyword() {
        assert_eq!(
            decode_all(b"hello\nbeat;u;m;h;0"),
            vec![
                Frame::Garbage(6),
                Frame::Beat(header("u", "m", "h", Kind::Device))
            ]
        );
        assert_eq!(
            decode_all(b"xx query;u"),
            vec![Frame::Garbage(3), Frame::Query { uuid: "u".into() }]
        );
    }

    #[test]
    fn garbage_with_many_short_lines_is_dropped_in_linear_time() {
        let garbage: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let started = std::time::Instant::now();
        let frames = decode_all(&garbage);
        let dropped: usize = frames
            .iter()
            .map(|f| match f {
                Frame::Garbage(n) => *n,
                other => panic!("{other:?}"),
            })
            .sum();
        assert_eq!(dropped, garbage.len());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn endless_garbage_is_consumed_as_it_arrives() {
        let mut decoder = Decoder::new();
        let mut buf = BytesMut::new();
        for _ in 0..1000 {
            buf.extend_from_slice(&[b'x'; 4096]);
            while decoder.decode(&mut buf).is_some() {}
            assert!(buf.len() < 16);
        }
    }

    #[test]
    fn oversized_headers_are_rejected_not_buffered() {
        let mut input = b"beat;".to_vec();
        input.extend(std::iter::repeat_n(b'u', 10_000));
        let frames = decode_all(&input);
        assert!(matches!(frames[0], Frame::Rejected { reply: false, .. }));
    }

    #[test]
    fn header_cut_after_its_first_byte_is_recovered() {
        // The lone `d` goes out as payload (a one-byte tail is not held), but the
        // header it starts is still recognised when the rest arrives.
        let frames = decode_reads(&[b"data;u;m;h;0;abc", b"d", b"ata;u;m;h;0;xyz"]);
        assert_eq!(
            frames,
            vec![
                Frame::Data(header("u", "m", "h", Kind::Device)),
                payload(b"abcd"),
                Frame::Data(header("u", "m", "h", Kind::Device)),
                payload(b"xyz"),
            ]
        );
    }
}
