//! The codec's specification, case by case.

use super::*;

fn header(uuid: &str, mac: &str, host: &str, role: Role) -> Header {
    Header {
        uuid: uuid.into(),
        mac: mac.into(),
        host: host.into(),
        role,
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
            Some(Frame::Payload(prev)) => *prev = [prev.as_ref(), more.as_ref()].concat().into(),
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

fn request(request: Request, fields: &[&str]) -> Frame {
    Frame::Request {
        request,
        fields: fields.iter().map(|f| ByteString::from(*f)).collect(),
    }
}

#[test]
fn beat_without_terminator() {
    assert_eq!(
        decode_all(b"beat;u-1;F0FE6B2A1C3D;plc-1;0"),
        vec![Frame::Beat(header(
            "u-1",
            "F0FE6B2A1C3D",
            "plc-1",
            Role::Device
        ))]
    );
}

#[test]
fn beat_with_line_terminators() {
    let beat = Frame::Beat(header("u", "m", "h", Role::Device));
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
            Frame::Data(header("u", "T5000", "T5000", Role::Client)),
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
            Frame::Data(header("u", "m", "h", Role::Device)),
            payload(b"AB;C\n"),
            Frame::Data(header("u", "m", "h", Role::Device)),
            payload(b"\x00data;x"),
        ]
    );
}

#[test]
fn beat_then_data_in_one_read() {
    assert_eq!(
        decode_all(b"beat;u;m;h;0data;u;m;h;0;xyz"),
        vec![
            Frame::Beat(header("u", "m", "h", Role::Device)),
            Frame::Data(header("u", "m", "h", Role::Device)),
            payload(b"xyz"),
        ]
    );
}

#[test]
fn data_then_beat_in_one_read() {
    assert_eq!(
        decode_all(b"data;u;m;h;0;xyzbeat;u;m;h;0"),
        vec![
            Frame::Data(header("u", "m", "h", Role::Device)),
            payload(b"xyz"),
            Frame::Beat(header("u", "m", "h", Role::Device)),
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
            Frame::Data(header("u", "m", "h", Role::Device)),
            payload(&body),
            Frame::Data(header("u", "m", "h", Role::Device)),
            payload(b"end"),
        ]
    );
}

#[test]
fn headers_split_at_every_position_still_parse_and_no_byte_leaks() {
    let input = b"data;user-1;m;h;0;hello;world\r\ndata;user-1;m;h;0;again";
    let want = decode_all(input);
    for cut in 1..input.len() {
        let (a, b) = input.split_at(cut);
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
fn a_single_trailing_keyword_byte_is_held_too() {
    let mut decoder = Decoder::new();
    let mut buf = BytesMut::from(&b"data;u;m;h;0;abcd"[..]);
    decoder.decode(&mut buf);
    assert_eq!(decoder.decode(&mut buf), Some(payload(b"abc")));
    assert!(decoder.holding(&buf));
    // More input shows it was payload after all: it goes out in order, once.
    buf.extend_from_slice(b"ef");
    assert_eq!(decoder.decode(&mut buf), Some(payload(b"def")));
    assert!(!decoder.holding(&buf));
}

#[test]
fn a_tail_that_cannot_start_this_users_header_is_not_held() {
    let mut decoder = Decoder::new();
    let mut buf = BytesMut::from(&b"data;u;m;h;0;abcdata;x"[..]);
    decoder.decode(&mut buf);
    assert_eq!(decoder.decode(&mut buf), Some(payload(b"abcdata;x")));
    assert!(!decoder.holding(&buf));
}

/// What a tail of `payload` (after a data header of user `u`) the decoder holds back
/// for a connection that has shown itself to be `role`.
fn held_for(role: Option<Role>, payload: &[u8]) -> Vec<u8> {
    let mut decoder = Decoder::new();
    if let Some(role) = role {
        decoder.expect_from(role);
    }
    let mut buf = BytesMut::from(&b"data;u;m;h;0;"[..]);
    buf.extend_from_slice(payload);
    decoder.decode(&mut buf);
    while decoder.decode(&mut buf).is_some() {}
    assert_eq!(decoder.holding(&buf), !buf.is_empty());
    buf.to_vec()
}

#[test]
fn a_device_holds_only_what_can_start_its_own_beat_or_data() {
    let device = Some(Role::Device);
    assert_eq!(held_for(device, b"xyzb"), b"b");
    assert_eq!(held_for(device, b"xyzdata;u"), b"data;u");
    assert_eq!(held_for(device, b"xyzc"), b"");
    assert_eq!(held_for(device, b"xyzq"), b"");
    assert_eq!(held_for(device, b"xyzconnme;u"), b"");
    assert_eq!(held_for(device, b"xyzquery;"), b"");
}

#[test]
fn a_client_holds_what_can_start_data_or_a_request_but_not_a_beat() {
    let client = Some(Role::Client);
    assert_eq!(held_for(client, b"xyzd"), b"d");
    assert_eq!(held_for(client, b"xyzc"), b"c");
    assert_eq!(held_for(client, b"xyzconnthem;u"), b"connthem;u");
    assert_eq!(held_for(client, b"xyzq"), b"q");
    assert_eq!(held_for(client, b"xyzb"), b"");
    assert_eq!(held_for(client, b"xyzbeat;u"), b"");
}

#[test]
fn a_connection_of_unknown_role_holds_every_keyword_start() {
    for tail in [&b"b"[..], b"c", b"d", b"q", b"beat;u", b"query;"] {
        let mut payload = b"xyz".to_vec();
        payload.extend_from_slice(tail);
        assert_eq!(held_for(None, &payload), tail);
    }
}

#[test]
fn whole_messages_are_recognised_whatever_the_role() {
    // A device's `query` in one read is a query, held tails aside.
    let mut decoder = Decoder::new();
    decoder.expect_from(Role::Device);
    let mut buf = BytesMut::from(&b"data;u;m;h;0;abquery;u\n"[..]);
    decoder.decode(&mut buf);
    assert_eq!(decoder.decode(&mut buf), Some(payload(b"ab")));
    assert!(matches!(
        decoder.decode(&mut buf),
        Some(Frame::Request {
            request: Request::Query,
            ..
        })
    ));
}

#[test]
fn a_query_right_after_a_data_frame_is_a_message() {
    assert_eq!(
        decode_reads(&[b"data;u;T1;T1;1;xyz", b"query;u"]),
        vec![
            Frame::Data(header("u", "T1", "T1", Role::Client)),
            payload(b"xyz"),
            request(Request::Query, &["u"]),
        ]
    );
}

#[test]
fn requests_end_at_the_read_or_line_end() {
    assert_eq!(
        decode_all(b"connme;u;F0FE6B2A1C3D"),
        vec![request(Request::Connme, &["u", "F0FE6B2A1C3D"])]
    );
    assert_eq!(
        decode_all(b"connme;u;m;1\r\nquery;u\n"),
        vec![
            request(Request::Connme, &["u", "m", "1"]),
            request(Request::Query, &["u"])
        ]
    );
    assert_eq!(
        decode_all(b"connthem;u;a;b"),
        vec![request(Request::Connthem, &["u", "a", "b"])]
    );
    assert_eq!(
        decode_all(b"query;"),
        vec![request(Request::Query, &[""])],
        "the command checks what is missing"
    );
}

#[test]
fn requests_with_bad_fields_are_rejected_with_a_reply() {
    let long = [b"query;".as_slice(), &[b'u'; MAX_FIELD + 1]].concat();
    let huge = [b"connme;".as_slice(), &[b'u'; MAX_HEADER]].concat();
    for input in [&b"connme;u;\xff\xfe"[..], &long, &huge] {
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
                reason: Rejection::Kind
            },
            Frame::Garbage(6),
            Frame::Beat(header("u", "m", "h", Role::Device)),
        ]
    );
}

#[test]
fn garbage_is_dropped_up_to_the_next_line_or_keyword() {
    assert_eq!(
        decode_all(b"hello\nbeat;u;m;h;0"),
        vec![
            Frame::Garbage(6),
            Frame::Beat(header("u", "m", "h", Role::Device))
        ]
    );
    assert_eq!(
        decode_all(b"xx query;u"),
        vec![Frame::Garbage(3), request(Request::Query, &["u"])]
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
fn header_cut_after_its_first_byte_leaks_nothing() {
    let frames = decode_reads(&[b"data;u;T;T;1;\x01\x02\x03d", b"ata;u;T;T;1;\x04\x05"]);
    assert_eq!(
        frames,
        vec![
            Frame::Data(header("u", "T", "T", Role::Client)),
            payload(b"\x01\x02\x03"),
            Frame::Data(header("u", "T", "T", Role::Client)),
            payload(b"\x04\x05"),
        ]
    );
}

#[test]
fn replies_are_one_json_line() {
    assert_eq!(&Reply::Success.encode()[..], b"{\"status\":\"success\"}\n");
    assert_eq!(
        &Reply::Failed("device \"x\" is offline".into()).encode()[..],
        b"{\"status\":\"failed\",\"reason\":\"device \\\"x\\\" is offline\"}\n"
    );
    assert_eq!(&Reply::Devices(vec![]).encode()[..], b"[]\n");
    let row = QueryRow {
        hostname: "plc-1".into(),
        macaddress: "F0FE6B2A1C3D".into(),
        lastseendate: "2024. 03. 12. 14:05:33".into(),
        status: OnlineStatus::Online,
    };
    assert_eq!(
        &Reply::Devices(vec![row]).encode()[..],
        concat!(
            r#"[{"hostname":"plc-1","macaddress":"F0FE6B2A1C3D","#,
            r#""lastseendate":"2024. 03. 12. 14:05:33","status":"online"}]"#,
            "\n"
        )
        .as_bytes()
    );
}

#[test]
fn uuids_for_new_users_follow_the_header_rules() {
    assert!(check_uuid("3f1c9a0e-6a5b").is_ok());
    for bad in ["", "a;b", "a\nb", &"u".repeat(MAX_FIELD + 1)] {
        assert!(check_uuid(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_payload_ending_in_keyword_and_uuid_waits_for_the_next_byte() {
    // `data;u` at the end of a read could be payload or a header: the next byte
    // decides, and here it is the next header, so `data;u` was payload.
    let frames = decode_reads(&[b"data;u;T;T;1;xdata;u", b"data;u;T;T;1;y"]);
    assert_eq!(
        frames,
        vec![
            Frame::Data(header("u", "T", "T", Role::Client)),
            payload(b"xdata;u"),
            Frame::Data(header("u", "T", "T", Role::Client)),
            payload(b"y"),
        ]
    );
    // A query has nothing after the uuid, so it is a message where the read ends.
    assert_eq!(
        decode_reads(&[b"data;u;T;T;1;xquery;u"]),
        vec![
            Frame::Data(header("u", "T", "T", Role::Client)),
            payload(b"x"),
            request(Request::Query, &["u"]),
        ]
    );
}

#[test]
fn a_junk_byte_before_every_message_costs_linear_time() {
    let mut input = Vec::new();
    for _ in 0..200_000 {
        input.extend_from_slice(b"xbeat;u;m;h;0");
    }
    let started = std::time::Instant::now();
    let frames = decode_all(&input);
    let beats = frames
        .iter()
        .filter(|f| matches!(f, Frame::Beat(_)))
        .count();
    assert_eq!(beats, 200_000);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_rejection_says_why_in_words_and_counts_under_a_label() {
    let frames = decode_all(b"beat;ua;F0FE6B2A1C3D;plc;7\n");
    match &frames[..] {
        [Frame::Rejected { reason, .. }] => {
            assert_eq!(reason.to_string(), "kind must be 0 or 1");
            assert_eq!(reason.label(), "kind");
        }
        other => panic!("{other:?}"),
    }
}
