//! One check per fuzz target, shared by the `cargo fuzz` targets (`fuzz/fuzz_targets/`, where
//! this file is the `shardcast_fuzz` library) and the corpus replay in the normal test suite
//! (`tests/fuzz_corpus.rs`, which includes it with `#[path]`). Each check panics when a
//! property fails; returning means the input was handled correctly, accepted or refused.
//!
//! Also here: the hand-written seeds of each corpus ([`seeds`]), so the replay test can keep
//! the committed seed files in step with the code that describes them.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use shardcast::cluster::{redis_layout, wire};
use shardcast::protocol::{self, render, ErrorCode, Request};
use shardcast::ws::{self, Endpoint, Event, Flow, Inbound, Limits, Violation};

/// A fuzz target: its name (the file name under `fuzz_targets/` and the corpus directory)
/// and its check.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, for the replay test.
pub const TARGETS: &[Target] = &[
    ("ws_frames", ws_frames),
    ("upgrade", upgrade),
    ("client_request", client_request),
    ("publish_body", publish_body),
    ("envelope", envelope),
];

// ---------------------------------------------------------------------------------------
// ws_frames: ws::Inbound::feed

/// Frame and message limits a `ws_frames` input picks with its first two bytes: tiny ones to
/// reach every "too big" path, 125/126 at the control-frame and 16-bit length boundaries,
/// the production default (64 KiB) and more.
const LIMIT_CHOICES: [usize; 8] = [0, 1, 16, 125, 126, 1000, 64 * 1024, 1 << 20];

/// Largest chunk for each choice of the third byte's low three bits (0: one read of all).
const CHUNK_CHOICES: [usize; 8] = [usize::MAX, 1, 2, 3, 7, 16, 64, 300];

/// What the decoder reported, owned, to compare two decodings of the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
}

/// How a decoding ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Every byte was taken; the decoder may hold an incomplete frame or message.
    Open,
    /// The handler (or a close frame) stopped decoding.
    Stopped,
    /// A violation closed the connection.
    Violated(Violation),
}

/// Feeds `wire` in reads of at most the sizes `chunks` yields, as a session would, until the
/// handler stops or a violation ends the connection.
fn decode_in_reads(
    wire: &[u8],
    limits: Limits,
    stop_after: usize,
    mut chunks: impl FnMut() -> usize,
) -> (Vec<Seen>, End, usize) {
    let mut inbound = Inbound::default();
    let mut seen = Vec::new();
    let mut rest = wire;
    // At least one read, even of nothing: an empty read must be harmless.
    loop {
        let take = chunks().clamp(1, rest.len().max(1)).min(rest.len());
        let mut read = rest[..take].to_vec();
        rest = &rest[take..];
        let result = inbound.feed(&mut read, limits, |event| {
            match event {
                Event::Text(text) => {
                    assert!(text.len() <= limits.max_message, "text over max_message");
                    seen.push(Seen::Text(text.to_owned()));
                }
                Event::Binary(bytes) => {
                    assert!(bytes.len() <= limits.max_message, "binary over max_message");
                    seen.push(Seen::Binary(bytes.to_vec()));
                }
                Event::Ping(payload) => {
                    assert!(payload.len() <= 125, "ping payload over 125 bytes");
                    seen.push(Seen::Ping(payload.to_vec()));
                }
                Event::Pong => seen.push(Seen::Pong),
                Event::Close(code) => {
                    if let Some(code) = code {
                        assert!(
                            (1000..5000).contains(&code) && ![1004, 1005, 1006].contains(&code),
                            "close code {code} reported as allowed"
                        );
                    }
                    seen.push(Seen::Close(code));
                }
            }
            if seen.len() == stop_after {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        // What an open connection may hold between reads: one incomplete frame (header of at
        // most 14 bytes, payload under max_frame) and one incomplete message, each allowed
        // the doubling of a growing Vec. Never the size of a read.
        let held_max = 2 * (limits.max_frame + 14) + 2 * limits.max_message;
        assert!(
            inbound.buffered() <= held_max,
            "holds {} bytes between reads, over {held_max} (limits {limits:?})",
            inbound.buffered()
        );
        match result {
            Err(violation) => return (seen, End::Violated(violation), inbound.buffered()),
            Ok(Flow::Stop) => {
                assert!(
                    seen.len() == stop_after || matches!(seen.last(), Some(Seen::Close(_))),
                    "stopped without being asked to"
                );
                return (seen, End::Stopped, inbound.buffered());
            }
            Ok(Flow::Continue) if rest.is_empty() => return (seen, End::Open, inbound.buffered()),
            Ok(Flow::Continue) => {}
        }
    }
}

/// Layout: `[max_frame choice, max_message choice, chunking, wire bytes...]`. The third byte:
/// low 3 bits pick the largest read, the high 4 bits the event after which the handler says
/// stop (0: never).
///
/// Asserts: no panic; reading the same bytes in arbitrary reads gives exactly the events and
/// the outcome of one read of everything (incomplete frames are resumed, never misread);
/// data messages fit `max_message`, pings 125 bytes, close codes are allowed ones, nothing
/// follows a close; a stop is honoured; between reads the decoder holds at most one
/// incomplete frame and message (bounded by the limits, not by the read size).
pub fn ws_frames(data: &[u8]) {
    let [f, m, chunking, wire @ ..] = data else {
        return;
    };
    let limits = Limits {
        max_frame: LIMIT_CHOICES[(f & 7) as usize],
        max_message: LIMIT_CHOICES[(m & 7) as usize],
    };
    let stop_after = (chunking >> 4) as usize;
    let max_chunk = CHUNK_CHOICES[(chunking & 7) as usize];
    let mut state = u64::from(*chunking) << 32 | wire.len() as u64 | 1;
    let reads = move || {
        // xorshift64: cheap, deterministic splits that vary with the input.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if max_chunk == usize::MAX {
            usize::MAX
        } else {
            1 + (state as usize) % max_chunk
        }
    };
    let (whole, whole_end, _) = decode_in_reads(wire, limits, stop_after, || usize::MAX);
    let (split, split_end, split_held) = decode_in_reads(wire, limits, stop_after, reads);
    assert_eq!(whole, split, "events depend on how the bytes were split");
    assert_eq!(
        whole_end, split_end,
        "outcome depends on how the bytes were split"
    );
    if let Some(close) = whole.iter().position(|e| matches!(e, Seen::Close(_))) {
        assert_eq!(close + 1, whole.len(), "events after a close");
        assert_eq!(whole_end, End::Stopped);
    }
    if whole_end == End::Open && wire.is_empty() {
        assert_eq!(split_held, 0, "an empty read left state behind");
    }
}

// ---------------------------------------------------------------------------------------
// upgrade: ws::parse_upgrade

/// Owned view of a parse result, to compare two parses.
#[derive(Debug, PartialEq)]
enum Parsed {
    Incomplete,
    Refused(u16),
    Upgraded {
        endpoint: Endpoint,
        token: Option<String>,
        dev_user: Option<String>,
        response: Vec<u8>,
        consumed: usize,
    },
}

fn parse_upgrade(buf: &[u8], dev: bool) -> Parsed {
    match ws::parse_upgrade(buf, dev) {
        Ok(None) => Parsed::Incomplete,
        Err(refusal) => Parsed::Refused(refusal.status),
        Ok(Some(up)) => Parsed::Upgraded {
            endpoint: up.endpoint,
            token: up.token,
            dev_user: up.dev_user,
            response: up.response,
            consumed: up.consumed,
        },
    }
}

/// Layout: `[flags, request bytes...]`; bit 0 of `flags` is `dev`.
///
/// Asserts: no panic; refusals are 400, 404 or 426 (another WebSocket version) only
/// (431/401/503 are decided by the caller);
/// an upgrade consumes at most what it was given, ending at the blank line, answers
/// `101` with an accept key, and picks `/echo` only in dev mode; the same request parses the
/// same with any trailing bytes cut off (the client's first frames) and reads as incomplete
/// with its last byte missing (a request split across reads is never refused); dev mode
/// changes nothing but `/echo`.
pub fn upgrade(data: &[u8]) {
    let [flags, request @ ..] = data else {
        return;
    };
    let dev = flags & 1 == 1;
    let parsed = parse_upgrade(request, dev);
    let other = parse_upgrade(request, !dev);
    match &parsed {
        Parsed::Incomplete => assert_eq!(other, Parsed::Incomplete, "dev changes completeness"),
        Parsed::Refused(status) => {
            assert!(
                matches!(status, 400 | 404 | 426),
                "parse_upgrade refused with {status}"
            );
            if let Parsed::Upgraded { endpoint, .. } = &other {
                assert!(
                    !dev && *endpoint == Endpoint::Echo,
                    "only /echo depends on dev"
                );
            }
        }
        Parsed::Upgraded {
            endpoint,
            response,
            consumed,
            ..
        } => {
            assert!(*consumed <= request.len(), "consumed more than given");
            assert!(*consumed > 0 && request[*consumed - 1] == b'\n');
            assert!(dev || *endpoint == Endpoint::Push, "/echo without dev");
            assert!(response.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
            assert!(response.ends_with(b"\r\n\r\n"));
            let text = String::from_utf8_lossy(response).to_ascii_lowercase();
            assert!(text.contains("\r\nsec-websocket-accept: "), "{text}");
            if *endpoint == Endpoint::Push {
                assert_eq!(parsed, other, "dev changes how /ws parses");
            } else {
                assert_eq!(other, Parsed::Refused(404), "/echo outside dev mode");
            }
            assert_eq!(
                parse_upgrade(&request[..*consumed], dev),
                parsed,
                "trailing bytes change the request"
            );
            assert_eq!(
                parse_upgrade(&request[..*consumed - 1], dev),
                Parsed::Incomplete,
                "a request missing its last byte is not incomplete"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// client_request: protocol::parse_request

/// A rendered server frame's JSON, with the fields the checks compare.
#[derive(Deserialize)]
struct Rendered<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
}

/// Keeps `"data":null` apart from a missing `data` (an `Option` alone reads null as `None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The JSON text of a rendered unmasked server text frame, checked to be exactly one frame.
fn frame_json(frame: &[u8]) -> &str {
    assert_eq!(frame[0], 0x81, "a final text frame");
    let (len, head) = match frame[1] {
        126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
        127 => (
            u64::from_be_bytes(frame[2..10].try_into().expect("8 bytes")) as usize,
            10,
        ),
        len => (len as usize, 2),
    };
    assert_eq!(head + len, frame.len(), "frame length field");
    std::str::from_utf8(&frame[head..]).expect("rendered frames are UTF-8")
}

/// Parses a rendered frame, asserting it is one valid JSON object with the `op` expected.
fn rendered<'a>(frame: &'a [u8], op: &str) -> Rendered<'a> {
    let json = frame_json(frame);
    // IgnoredAny checks the grammar without limits on what a Value could represent.
    serde_json::from_str::<IgnoredAny>(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let parsed: Rendered = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(parsed.op, op);
    parsed
}

fn same_raw(a: Option<&RawValue>, b: Option<&RawValue>) -> bool {
    a.map(RawValue::get) == b.map(RawValue::get)
}

fn check_id(id: Option<&RawValue>) {
    let Some(id) = id else { return };
    let text = id.get();
    let within = if text.starts_with('"') {
        serde_json::from_str::<String>(text).is_ok_and(|s| s.len() <= protocol::MAX_ID_BYTES)
    } else {
        assert!(
            text.starts_with('-') || text.starts_with(|c: char| c.is_ascii_digit()),
            "id {text} is neither a string nor a number"
        );
        text.len() <= protocol::MAX_ID_BYTES
    };
    assert!(within, "id over 64 bytes (a string's once decoded)");
    // Echoed ids must come back exactly as sent, in every reply that carries one.
    for (frame, op) in [
        (render::ack(Some(id), Some(1)), "ack"),
        (render::pong(Some(id)), "pong"),
        (render::err(Some(id), ErrorCode::BadRequest, "x"), "err"),
    ] {
        assert!(
            same_raw(rendered(&frame, op).id, Some(id)),
            "id echoed changed"
        );
    }
}

/// Input: any bytes, read as UTF-8 (lossily, so every input reaches the parser).
///
/// Asserts: no panic on any UTF-8; only JSON objects are accepted; an accepted id, and the
/// id of a refusal, is a JSON number of at most 64 characters or a JSON string of at most
/// 64 bytes once decoded, and comes back unchanged
/// in `ack`, `pong` and `err`
/// frames that are valid JSON; a parsed `pub` / `send` renders into a valid `pub` / `msg`
/// frame carrying the same topic / recipient and byte-identical `data`; a topic of `sub` /
/// `unsub` survives rendering unchanged.
pub fn client_request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match protocol::parse_request(&text) {
        Ok((id, request)) => {
            assert!(
                text.trim_start_matches([' ', '\t', '\n', '\r'])
                    .starts_with('{'),
                "accepted a request that is not a JSON object"
            );
            check_id(id);
            match request {
                Request::Sub { topic, .. } | Request::Unsub { topic } => {
                    let frame = render::publication(Some(&topic), 1, 2, "null");
                    assert_eq!(rendered(&frame, "pub").topic.as_deref(), Some(&*topic));
                }
                Request::Pub { topic, data } => {
                    let frame = render::publication(Some(&topic), 1, 2, data.get());
                    let out = rendered(&frame, "pub");
                    assert_eq!(out.topic.as_deref(), Some(&*topic));
                    assert!(same_raw(out.data, Some(data)), "pub data changed");
                }
                Request::Send { to, data } => {
                    let frame = render::msg(Some("sender"), &to, 1, 2, data.get());
                    let out = rendered(&frame, "msg");
                    assert_eq!(out.to.as_deref(), Some(&*to));
                    assert!(same_raw(out.data, Some(data)), "msg data changed");
                }
                Request::Ping
                | Request::Refresh { .. }
                | Request::Resume { .. }
                | Request::Up { .. } => {}
            }
        }
        Err(refusal) => {
            check_id(refusal.id);
            let frame = render::err(refusal.id, refusal.code, refusal.msg);
            rendered(&frame, "err");
        }
    }
}

// ---------------------------------------------------------------------------------------
// publish_body: api::parse_publish_body and api::parse_publish_batch

/// The fields of a JSON object in order, duplicates kept (a `Value` keeps the last one).
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// What the publish body's definition says about `body`, worked out independently of it:
/// whether it is a valid body.
fn publish_oracle(body: &[u8]) -> bool {
    publish_fields_valid(body).is_some()
}

fn publish_fields_valid(body: &[u8]) -> Option<()> {
    let Fields(fields) = serde_json::from_slice(body).ok()?;
    let mut seen = Vec::new();
    for (key, value) in fields {
        if seen.contains(&key) {
            return None; // duplicate field
        }
        match &*key {
            "users" | "topics" => {
                serde_json::from_str::<Vec<String>>(value.get()).ok()?;
            }
            "broadcast" => {
                serde_json::from_str::<bool>(value.get()).ok()?;
            }
            "data" => {}
            _ => return None, // unknown field
        }
        seen.push(key);
    }
    Some(())
}

/// Input: a request body.
///
/// Asserts: no panic; the body parses exactly when it is a JSON object of the four known
/// fields, each at most once, `users`/`topics` arrays of strings, `broadcast` a boolean,
/// `data` any JSON (checked against an independent reading of the same bytes), names
/// written with JSON escapes (`"\u0061lice"`) included.
pub fn publish_body(data: &[u8]) {
    let parsed = shardcast::api::parse_publish_body(data);
    match (&parsed, publish_oracle(data)) {
        (Ok(_), true) | (Err(_), false) => {}
        (Ok(_), false) => panic!("accepted a body the definition refuses"),
        (Err(e), true) => panic!("refused a valid body: {e}"),
    }
    // A batch: a JSON array whose every element is a valid body.
    let batch = shardcast::api::parse_publish_batch(data);
    let valid_batch = serde_json::from_slice::<Vec<&RawValue>>(data).is_ok_and(|items| {
        items
            .iter()
            .all(|item| publish_oracle(item.get().as_bytes()))
    });
    match (&batch, valid_batch) {
        (Ok(_), true) | (Err(_), false) => {}
        (Ok(_), false) => panic!("accepted a batch the definition refuses"),
        (Err(e), true) => panic!("refused a valid batch: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// envelope: cluster::wire::decode

/// The bytes the wire.rs constructors write for `envelope`.
fn encode(envelope: &wire::Decoded) -> Bytes {
    let origin = envelope.origin;
    match &envelope.body {
        wire::Body::User { mid, users, frame } => wire::user(origin, *mid, users, frame),
        wire::Body::Direct {
            mid,
            ts,
            from,
            users,
            data,
        } => wire::direct(origin, *mid, *ts, from.as_deref(), users, data),
        wire::Body::Mailboxes {
            mid,
            ts,
            except,
            from,
            to,
            users,
            data,
            positions,
        } => streamed(
            wire::mailboxes_head(
                origin,
                *mid,
                *ts,
                *except,
                from.as_deref(),
                to.as_deref(),
                users,
            ),
            data,
            positions,
        ),
        wire::Body::History {
            mid,
            ts,
            topic,
            data,
            position,
        } => streamed(
            wire::history_head(origin, *mid, *ts, topic),
            data,
            std::slice::from_ref(position),
        ),
        wire::Body::Topic { mid, topic, frame } => wire::topic(origin, *mid, topic, frame),
        wire::Body::Broadcast { mid, frame } => wire::broadcast(origin, *mid, frame),
        wire::Body::Kick { user, code } => wire::kick(origin, user, *code),
        wire::Body::Evict { conn } => wire::evict(origin, *conn),
        wire::Body::Probe { nonce } => wire::probe(origin, *nonce),
        wire::Body::TopicQuery { request, topic } => wire::topic_query(origin, *request, topic),
        wire::Body::TopicCount {
            request,
            count,
            node,
        } => wire::topic_count(origin, *request, *count, node),
    }
}

/// A streamed envelope as the Redis scripts publish it: head, `data`, positions trailer.
fn streamed(head: Bytes, data: &str, positions: &[shardcast::history::Position]) -> Bytes {
    let mut out = head.to_vec();
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(&redis_layout::positions_trailer(positions));
    out.into()
}

/// Input: an envelope as it comes off the bus.
///
/// Asserts: no panic; errors name the version or kind byte actually read; a decoded
/// envelope re-encodes with the wire.rs constructors to the same bytes (exactly, for the
/// kinds that end in a frame; as a prefix for the fixed-size kinds, whose decoder ignores
/// trailing bytes), and the re-encoding decodes to the same envelope; a frame is a slice of
/// the payload, not a copy.
pub fn envelope(data: &[u8]) {
    let payload = Bytes::copy_from_slice(data);
    match wire::decode(payload.clone()) {
        Err(wire::DecodeError::Version(v)) => {
            assert_eq!(data[0], v);
            assert_ne!(v, wire::VERSION);
        }
        Err(wire::DecodeError::Kind(k)) => {
            assert_eq!(data[0], wire::VERSION);
            assert_eq!(data[1], k);
        }
        Err(wire::DecodeError::Malformed) => {}
        Ok(envelope) => {
            let again = encode(&envelope);
            let ends_in_frame = match &envelope.body {
                wire::Body::User { frame, .. }
                | wire::Body::Topic { frame, .. }
                | wire::Body::Broadcast { frame, .. } => {
                    let base = payload.as_ptr() as usize;
                    assert_eq!(
                        frame.as_ptr() as usize,
                        base + payload.len() - frame.len(),
                        "the frame is the payload's tail, not a copy"
                    );
                    true
                }
                // Ends in `data`, copied out as a string (it must be valid UTF-8), or in
                // `data` and the positions trailer.
                wire::Body::Direct { .. }
                | wire::Body::Mailboxes { .. }
                | wire::Body::History { .. } => true,
                _ => false,
            };
            if ends_in_frame {
                assert_eq!(&again[..], data, "re-encoding differs");
            } else {
                assert!(data.starts_with(&again), "re-encoding is not a prefix");
            }
            assert_eq!(
                wire::decode(again),
                Ok(envelope),
                "re-encoding decodes differently"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Seeds

/// A stream position, for the seeds of streamed envelopes.
fn position(seq: u64, ep: &str) -> shardcast::history::Position {
    shardcast::history::Position { seq, ep: ep.into() }
}

/// A masked client frame (what a browser sends).
fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let mut body = payload.to_vec();
    ws::unmask(&mut body, mask);
    out.extend_from_slice(&body);
    out
}

fn upgrade_request(target: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// The hand-written seeds: `(target, name, bytes)`, committed as
/// `fuzz/corpus/<target>/seed-<name>`.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let text = |s: &str| client_frame(0x81, s.as_bytes(), mask);
    // ws_frames inputs: limits (64 KiB, 64 KiB), then reads of at most 7 bytes, no stop.
    let ws = |wire: Vec<u8>| [vec![6, 6, 4], wire].concat();
    let mut out = vec![
        ("ws_frames", "text", ws(text(r#"{"op":"ping","id":1}"#))),
        (
            "ws_frames",
            "unmasked",
            ws(vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o']),
        ),
        (
            "ws_frames",
            "binary-16bit-len",
            ws(client_frame(0x82, &[0xab; 300], mask)),
        ),
        (
            "ws_frames",
            "fragmented-with-ping",
            ws([
                client_frame(0x01, b"{\"op\":", mask),
                client_frame(0x89, b"hb", mask),
                client_frame(0x00, b"\"ping\"", mask),
                client_frame(0x80, b"}", mask),
            ]
            .concat()),
        ),
        (
            "ws_frames",
            "ping-pong-close",
            ws([
                client_frame(0x89, b"", mask),
                client_frame(0x8a, b"x", mask),
                client_frame(0x88, b"\x03\xe8bye", mask),
                text("after close"),
            ]
            .concat()),
        ),
        (
            "ws_frames",
            "close-empty",
            ws(client_frame(0x88, b"", mask)),
        ),
        (
            "ws_frames",
            "too-big",
            [vec![2, 2, 0x15], text("seventeen bytes!!"), text("x")].concat(),
        ),
        ("ws_frames", "utf8", ws(text("héllo → 世界 🎉"))),
        (
            "ws_frames",
            "64bit-len-header",
            ws(vec![0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4]),
        ),
    ];
    for (name, target, extra) in [
        ("plain", "/ws", ""),
        (
            "bearer",
            "/ws",
            "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig\r\n",
        ),
        ("query-token", "/ws?token=abc.def.ghi&x=1", ""),
        ("dev-user", "/ws?user=al%20ice", ""),
        (
            "subprotocol",
            "/ws",
            "Sec-WebSocket-Protocol: shardcast.v1, chat\r\n",
        ),
        ("echo", "/echo", ""),
        ("not-found", "/nope", ""),
    ] {
        let mut input = vec![u8::from(name == "echo" || name == "dev-user")];
        input.extend(upgrade_request(target, extra));
        out.push(("upgrade", name, input));
    }
    let mut early = vec![0];
    early.extend(upgrade_request("/ws", ""));
    early.extend(text(r#"{"op":"ping"}"#));
    out.push(("upgrade", "early-frame", early));
    out.push((
        "upgrade",
        "version-8",
        [
            vec![0],
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n".to_vec(),
        ]
        .concat(),
    ));
    for (name, request) in [
        ("sub", r#"{"op":"sub","topic":"room.1","id":1}"#),
        ("unsub", r#"{"op":"unsub","topic":"room.1","id":"a"}"#),
        (
            "pub",
            r#"{"op":"pub","topic":"room.1","data":{"text":"hi","n":[1,2.5e3,null,true]},"id":-3}"#,
        ),
        (
            "send",
            r#"{"id":"x","op":"send","to":"alice","data":"note"}"#,
        ),
        ("ping", r#"{"op":"ping"}"#),
        (
            "escaped",
            r#"{"op":"sub","topic":"r\u00f6om\n","id":"\u0031"}"#,
        ),
        ("unknown-op", r#"{"op":"dance","id":7}"#),
        ("data-null", r#"{"op":"send","to":"bob","data":null}"#),
        ("malformed", r#"{"op":"sub","topic":"#),
    ] {
        out.push(("client_request", name, request.as_bytes().to_vec()));
    }
    for (name, body) in [
        ("users", r#"{"users":["alice","bob"],"data":{"text":"hi"}}"#),
        ("topics", r#"{"topics":["room.1"],"data":[1,2,3]}"#),
        ("broadcast", r#"{"broadcast":true,"data":"all"}"#),
        (
            "all",
            r#"{"users":["a"],"topics":["t"],"broadcast":false,"data":null}"#,
        ),
        ("escaped", r#"{"users":["\u0061lice"],"data":1}"#),
        ("unknown-field", r#"{"users":["a"],"data":1,"extra":0}"#),
        ("no-data", r#"{"users":["a"]}"#),
    ] {
        out.push(("publish_body", name, body.as_bytes().to_vec()));
    }
    let frame = render::publication(Some("room"), 42, 1_700_000_000_000, r#"{"t":"hi"}"#);
    for (name, envelope) in [
        ("user", wire::user(7, 42, &["alice", "bob"], &frame)),
        (
            "direct",
            wire::direct(
                7,
                42,
                1_700_000_000_000,
                None,
                &["alice", "bob"],
                r#"{"t":"hi"}"#,
            ),
        ),
        (
            "mailboxes",
            streamed(
                wire::mailboxes_head(
                    7,
                    42,
                    1_700_000_000_000,
                    Some(3),
                    Some("alice"),
                    Some("bob"),
                    &["bob", "alice"],
                ),
                r#"{"t":"hi"}"#,
                &[position(4, "Ab3dE6gH"), position(17, "Zy9xW8vU")],
            ),
        ),
        (
            "history",
            streamed(
                wire::history_head(7, 42, 1_700_000_000_000, "room"),
                r#"{"t":"hi"}"#,
                &[position(5, "Ab3dE6gH")],
            ),
        ),
        ("topic", wire::topic(7, 42, "room", &frame)),
        ("broadcast", wire::broadcast(7, 42, &frame)),
        ("kick", wire::kick(7, "alice", 4003)),
        ("evict", wire::evict(7, 99)),
        ("probe", wire::probe(7, 5)),
        ("topic-query", wire::topic_query(7, 8, "room")),
        ("topic-count", wire::topic_count(7, 8, 12, "node-a")),
    ] {
        out.push(("envelope", name, envelope.to_vec()));
    }
    out
}
