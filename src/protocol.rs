//! Client protocol v1: parsing what clients send, rendering what the server sends, and
//! message ids.
//!
//! Server frames are rendered straight into complete WebSocket text frames ([`Bytes`] with
//! the header in front), so a message is serialized and framed once per node and the same
//! buffer is written to every local recipient. `data` is carried as raw JSON text: parsed
//! only to be validated and never re-serialized.

use std::borrow::Cow;
use std::io::Write;

use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::ws;

/// Longest request `id` echoed back, in bytes of JSON text.
pub const MAX_ID_BYTES: usize = 64;

/// A client request, borrowed from the frame it came in.
#[derive(Debug)]
pub enum Request<'a> {
    /// Subscribe to a topic; with `since` (v1.1), first replay its history after that
    /// position.
    Sub {
        /// Topic name.
        topic: Cow<'a, str>,
        /// The client's last position in the topic's stream.
        since: Option<Since<'a>>,
    },
    /// Unsubscribe from a topic.
    Unsub {
        /// Topic name.
        topic: Cow<'a, str>,
    },
    /// Publish to a topic.
    Pub {
        /// Topic name.
        topic: Cow<'a, str>,
        /// Payload, raw JSON.
        data: &'a RawValue,
    },
    /// Message a user on all their devices.
    Send {
        /// Recipient user id.
        to: Cow<'a, str>,
        /// Payload, raw JSON.
        data: &'a RawValue,
    },
    /// Application ping.
    Ping,
    /// A fresher token for the same user, before the connection's token expires (v1.1).
    Refresh {
        /// The token (JWT).
        token: Cow<'a, str>,
    },
    /// A message for the backends (v1.1), on `stream` (default `up`).
    Up {
        /// Payload, raw JSON.
        data: &'a RawValue,
        /// The stream named, if any.
        stream: Option<Cow<'a, str>>,
    },
    /// Replay the user's mailbox after the client's last position (v1.1).
    Resume {
        /// The client's last position.
        since: Since<'a>,
    },
}

/// A request that could not be understood; answered with an `err` frame.
#[derive(Debug)]
pub struct RequestError<'a> {
    /// The request's id, if one could be read.
    pub id: Option<&'a RawValue>,
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub msg: &'static str,
}

impl RequestError<'_> {
    /// Whether the request named an op this protocol does not have.
    pub fn is_unknown_op(&self) -> bool {
        self.msg == UNKNOWN_OP
    }
}

const UNKNOWN_OP: &str = "unknown op";

/// The `code` of an `err` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Malformed JSON, unknown op, missing or invalid field.
    BadRequest,
    /// Not allowed by the token.
    Forbidden,
    /// A limit was hit (rate, topics per connection).
    TooMany,
    /// The thing named does not exist (e.g. unsubscribing from a topic not subscribed).
    NotFound,
    /// A credential was refused (a `refresh` with an invalid or expired token).
    Unauthorized,
    /// The node cannot do it now (an `up` with no sink, or one that is full or failing).
    Unavailable,
}

impl ErrorCode {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooMany => "too_many",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

#[derive(Deserialize)]
struct RawRequest<'a> {
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
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<Cow<'a, str>>,
}

/// Keeps an explicit `"data": null` apart from a missing `data`.
pub(crate) fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Whether `json` starts as an object. Checked before a derived struct reads it: serde
/// would also read an array by position (`["sub",1,"room"]`), which the protocol and the
/// API do not speak.
pub(crate) fn is_object(json: &[u8]) -> bool {
    json.trim_ascii_start().first() == Some(&b'{')
}

/// An id is a number of at most [`MAX_ID_BYTES`] characters, or a string whose decoded
/// value is at most [`MAX_ID_BYTES`] bytes (its quotes and escapes do not count).
fn valid_id(id: &RawValue) -> bool {
    let text = id.get();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<Cow<'_, str>>(text)
            .is_ok_and(|decoded| decoded.len() <= MAX_ID_BYTES),
        Some(b'-' | b'0'..=b'9') => text.len() <= MAX_ID_BYTES,
        _ => false,
    }
}

/// Longest stream epoch a client may name in `since`, in bytes (the server makes 8).
pub const MAX_EP_BYTES: usize = 64;

/// A client's position in a stream (protocol v1.1): the `since` of `resume` and of `sub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since<'a> {
    /// The last sequence number the client has; 0 asks for everything retained.
    pub seq: u64,
    /// The epoch that number belongs to (`""` when the client names none, as a fresh
    /// device asking with `seq: 0` may).
    pub ep: Cow<'a, str>,
}

#[derive(Deserialize)]
struct RawSince<'a> {
    seq: u64,
    #[serde(borrow, default)]
    ep: Option<Cow<'a, str>>,
}

/// Reads a `since` value: `{"seq": N, "ep": "E"}` with `N` an integer from 0 to 2^64 - 1
/// and `E` a string of at most [`MAX_EP_BYTES`]. A malformed one (not an object, a
/// negative, fractional, too large or quoted `seq`, an `ep` that is not a string or too
/// long) is refused with the reason, for an `err bad_request`. A well-formed position the
/// stream does not have (ahead of it, another epoch) is not refused here: the replay answers
/// it `recovered:false` ([`crate::history::plan_replay`]).
pub fn parse_since(raw: &RawValue) -> Result<Since<'_>, &'static str> {
    const MALFORMED: &str =
        "since must be {\"seq\": a non-negative integer, \"ep\": a string of at most 64 bytes}";
    if !is_object(raw.get().as_bytes()) {
        return Err(MALFORMED);
    }
    let since: RawSince = serde_json::from_str(raw.get()).map_err(|_| MALFORMED)?;
    let ep = since.ep.unwrap_or_default();
    if ep.len() > MAX_EP_BYTES {
        return Err(MALFORMED);
    }
    Ok(Since { seq: since.seq, ep })
}

/// Parses one text message. The `id`, when usable, is returned on both paths so the reply
/// can echo it.
#[allow(clippy::type_complexity)]
pub fn parse_request(text: &str) -> Result<(Option<&RawValue>, Request<'_>), RequestError<'_>> {
    let raw: RawRequest = serde_json::from_str(text)
        .ok()
        .filter(|_| is_object(text.as_bytes()))
        .ok_or(RequestError {
            id: None,
            code: ErrorCode::BadRequest,
            msg: "malformed request: expected a JSON object with an op",
        })?;
    let refuse = |id, msg| RequestError {
        id,
        code: ErrorCode::BadRequest,
        msg,
    };
    if let Some(id) = raw.id {
        if !valid_id(id) {
            return Err(refuse(
                None,
                "id must be a number or a string of at most 64 bytes",
            ));
        }
    }
    let id = raw.id;
    let request = match &*raw.op {
        "sub" => Request::Sub {
            topic: raw.topic.ok_or_else(|| refuse(id, "sub needs a topic"))?,
            since: raw
                .since
                .map(|since| parse_since(since).map_err(|msg| refuse(id, msg)))
                .transpose()?,
        },
        "unsub" => Request::Unsub {
            topic: raw.topic.ok_or_else(|| refuse(id, "unsub needs a topic"))?,
        },
        "pub" => Request::Pub {
            topic: raw.topic.ok_or_else(|| refuse(id, "pub needs a topic"))?,
            data: raw.data.ok_or_else(|| refuse(id, "pub needs data"))?,
        },
        "send" => Request::Send {
            to: raw.to.ok_or_else(|| refuse(id, "send needs to"))?,
            data: raw.data.ok_or_else(|| refuse(id, "send needs data"))?,
        },
        "ping" => Request::Ping,
        "up" => Request::Up {
            data: raw.data.ok_or_else(|| refuse(id, "up needs data"))?,
            stream: raw.stream,
        },
        "resume" => Request::Resume {
            since: parse_since(raw.since.ok_or_else(|| refuse(id, "resume needs since"))?)
                .map_err(|msg| refuse(id, msg))?,
        },
        "refresh" => Request::Refresh {
            token: raw
                .token
                .ok_or_else(|| refuse(id, "refresh needs a token"))?,
        },
        _ => return Err(refuse(id, UNKNOWN_OP)),
    };
    Ok((id, request))
}

/// A message's place in its stream (protocol v1.1): its sequence number and the stream's
/// epoch, as `msg`, `pub` and replay acks carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPos<'a> {
    /// Sequence number, gap-free from 1 within an epoch.
    pub seq: u64,
    /// The stream's epoch.
    pub ep: &'a str,
}

/// Renders server frames. Each function returns one complete WebSocket text frame.
pub mod render {
    use super::*;

    /// Writes `"key":` followed by `value` as a JSON string.
    fn string_field(out: &mut Vec<u8>, key: &str, value: &str) {
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        serde_json::to_writer(&mut *out, value).expect("writing to a Vec cannot fail");
        out.push(b',');
    }

    fn raw_field(out: &mut Vec<u8>, key: &str, value: &str) {
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(value.as_bytes());
        out.push(b',');
    }

    fn mid_ts(out: &mut Vec<u8>, mid: u64, ts: u64) {
        write!(out, "\"mid\":\"{mid}\",\"ts\":{ts},").expect("writing to a Vec cannot fail");
    }

    /// Starts a frame: header room, then `{"op":"<op>",`.
    fn open(op: &str, capacity: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(ws::MAX_SERVER_HEADER + capacity + 16 + op.len());
        out.resize(ws::MAX_SERVER_HEADER, 0);
        out.extend_from_slice(b"{\"op\":\"");
        out.extend_from_slice(op.as_bytes());
        out.extend_from_slice(b"\",");
        out
    }

    /// Replaces the trailing comma with `}` and frames it.
    fn close(mut out: Vec<u8>) -> Bytes {
        *out.last_mut().expect("open() wrote the op") = b'}';
        ws::seal_text_frame(out)
    }

    /// `hello`: the first frame after the upgrade. v1.1 adds `exp` when the token expires
    /// and `mailbox` (`{"seq":N,"ep":"E"}`, the mailbox's last position) when the user has
    /// one.
    pub fn hello(
        user: &str,
        conn: u64,
        node: &str,
        hb_secs: u32,
        exp: Option<u64>,
        mailbox: Option<StreamPos<'_>>,
    ) -> Bytes {
        let capacity = user.len() + node.len() + 72 + stream_capacity(mailbox);
        let mut out = open("hello", capacity);
        string_field(&mut out, "user", user);
        write!(out, "\"conn\":\"{conn}\",").expect("Vec write");
        string_field(&mut out, "node", node);
        write!(out, "\"hb\":{hb_secs},").expect("Vec write");
        if let Some(exp) = exp {
            write!(out, "\"exp\":{exp},").expect("Vec write");
        }
        if let Some(mailbox) = mailbox {
            out.extend_from_slice(b"\"mailbox\":{");
            stream_fields(&mut out, Some(mailbox));
            *out.last_mut().expect("stream_fields wrote") = b'}';
            out.push(b',');
        }
        close(out)
    }

    /// `ack`, with the request's id and the message id where one was made.
    pub fn ack(id: Option<&RawValue>, mid: Option<u64>) -> Bytes {
        let mut out = open("ack", 64);
        if let Some(id) = id {
            raw_field(&mut out, "id", id.get());
        }
        if let Some(mid) = mid {
            write!(out, "\"mid\":\"{mid}\",").expect("Vec write");
        }
        close(out)
    }

    /// `err`: a refused request.
    pub fn err(id: Option<&RawValue>, code: ErrorCode, msg: &str) -> Bytes {
        let mut out = open("err", 64 + msg.len());
        if let Some(id) = id {
            raw_field(&mut out, "id", id.get());
        }
        string_field(&mut out, "code", code.as_str());
        string_field(&mut out, "msg", msg);
        close(out)
    }

    /// `pong`: answer to an application ping.
    pub fn pong(id: Option<&RawValue>) -> Bytes {
        let mut out = open("pong", 16);
        if let Some(id) = id {
            raw_field(&mut out, "id", id.get());
        }
        close(out)
    }

    /// Writes `"seq":N,"ep":"E",` when the message belongs to a stream.
    fn stream_fields(out: &mut Vec<u8>, at: Option<StreamPos<'_>>) {
        if let Some(at) = at {
            write!(out, "\"seq\":{},", at.seq).expect("Vec write");
            string_field(out, "ep", at.ep);
        }
    }

    fn stream_capacity(at: Option<StreamPos<'_>>) -> usize {
        at.map_or(0, |at| 40 + at.ep.len())
    }

    /// `msg`: a direct message; `from` is absent when the server sends it.
    pub fn msg(from: Option<&str>, to: &str, mid: u64, ts: u64, data: &str) -> Bytes {
        msg_frame(from, to, mid, ts, data, None)
    }

    /// `msg` of a message kept in a mailbox stream (protocol v1.1): `msg` with `seq` and `ep`
    /// between `ts` and `data`.
    pub fn msg_in_stream(
        from: Option<&str>,
        to: &str,
        mid: u64,
        ts: u64,
        data: &str,
        at: StreamPos<'_>,
    ) -> Bytes {
        msg_frame(from, to, mid, ts, data, Some(at))
    }

    fn msg_frame(
        from: Option<&str>,
        to: &str,
        mid: u64,
        ts: u64,
        data: &str,
        at: Option<StreamPos<'_>>,
    ) -> Bytes {
        let capacity = 64 + to.len() + from.map_or(0, str::len) + data.len();
        let mut out = open("msg", capacity + stream_capacity(at));
        if let Some(from) = from {
            string_field(&mut out, "from", from);
        }
        string_field(&mut out, "to", to);
        mid_ts(&mut out, mid, ts);
        stream_fields(&mut out, at);
        raw_field(&mut out, "data", data);
        close(out)
    }

    /// `pub`: a topic publication, or a broadcast when `topic` is `None`.
    pub fn publication(topic: Option<&str>, mid: u64, ts: u64, data: &str) -> Bytes {
        publication_frame(topic, mid, ts, data, None)
    }

    /// `pub` of a publication kept in its topic's stream (protocol v1.1): `pub` with `seq`
    /// and `ep` between `ts` and `data`.
    pub fn publication_in_stream(
        topic: &str,
        mid: u64,
        ts: u64,
        data: &str,
        at: StreamPos<'_>,
    ) -> Bytes {
        publication_frame(Some(topic), mid, ts, data, Some(at))
    }

    fn publication_frame(
        topic: Option<&str>,
        mid: u64,
        ts: u64,
        data: &str,
        at: Option<StreamPos<'_>>,
    ) -> Bytes {
        let capacity = 64 + topic.map_or(0, str::len) + data.len();
        let mut out = open("pub", capacity + stream_capacity(at));
        if let Some(topic) = topic {
            string_field(&mut out, "topic", topic);
        }
        mid_ts(&mut out, mid, ts);
        stream_fields(&mut out, at);
        raw_field(&mut out, "data", data);
        close(out)
    }

    /// `ack` of a `resume`, or of a `sub` with `since` (protocol v1.1): whether every message
    /// after the client's position was replayed, and the stream's position now.
    pub fn ack_replay(id: Option<&RawValue>, recovered: bool, now_at: StreamPos<'_>) -> Bytes {
        let mut out = open("ack", 64 + now_at.ep.len());
        if let Some(id) = id {
            raw_field(&mut out, "id", id.get());
        }
        write!(out, "\"recovered\":{recovered},").expect("Vec write");
        stream_fields(&mut out, Some(now_at));
        close(out)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Makes 64-bit message ids, unique across the cluster and ordered by time.
///
/// Layout, high to low: 41 bits of milliseconds since 2025-01-01 (good until 2094), 9 bits of
/// node number, 6 bits of shard, 8 bits of sequence. A generator makes 256 ids per millisecond
/// before it borrows the next millisecond: ids stay unique and ordered, and run ahead of the
/// wall clock only while one generator sustains more than 256,000 messages per second,
/// catching up as soon as the rate drops. Each shard owns one (no synchronization); code
/// outside the shards shares a [`SharedMidGenerator`].
#[derive(Debug)]
pub struct MidGenerator {
    prefix: u64,
    last: u64,
}

const SEQ_BITS: u32 = 8;
const SHARD_BITS: u32 = 6;
const NODE_BITS: u32 = 9;
const TIME_SHIFT: u32 = SEQ_BITS + SHARD_BITS + NODE_BITS;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// Start of the id clock: 2025-01-01T00:00:00Z, in Unix milliseconds.
pub const MID_EPOCH_MS: u64 = 1_735_689_600_000;

fn mid_prefix(node_number: u16, shard: usize) -> u64 {
    let node = (node_number as u64) & ((1 << NODE_BITS) - 1);
    let shard = (shard as u64) & ((1 << SHARD_BITS) - 1);
    (node << (SEQ_BITS + SHARD_BITS)) | (shard << SEQ_BITS)
}

/// The id that follows `last` for a generator with `prefix`, at wall clock `now_unix_ms`.
fn successor(last: u64, prefix: u64, now_unix_ms: u64) -> u64 {
    let now = (now_unix_ms.saturating_sub(MID_EPOCH_MS) << TIME_SHIFT) | prefix;
    if now > last {
        now
    } else if last & SEQ_MASK < SEQ_MASK {
        last + 1
    } else {
        (((last >> TIME_SHIFT) + 1) << TIME_SHIFT) | prefix
    }
}

impl MidGenerator {
    /// A generator for one shard of one node. Both numbers are masked to their bit widths.
    pub fn new(node_number: u16, shard: usize) -> Self {
        MidGenerator {
            prefix: mid_prefix(node_number, shard),
            last: 0,
        }
    }

    /// The next id, given the wall clock in Unix milliseconds.
    pub fn next(&mut self, now_unix_ms: u64) -> u64 {
        self.last = successor(self.last, self.prefix, now_unix_ms);
        self.last
    }

    /// The Unix millisecond a message id was made at.
    pub fn timestamp_ms(mid: u64) -> u64 {
        (mid >> TIME_SHIFT) + MID_EPOCH_MS
    }
}

/// A lock-free [`MidGenerator`] for threads outside the shards (the HTTP API).
#[derive(Debug)]
pub struct SharedMidGenerator {
    prefix: u64,
    last: std::sync::atomic::AtomicU64,
}

impl SharedMidGenerator {
    /// A generator with its own shard number (one no shard uses).
    pub fn new(node_number: u16, shard: usize) -> Self {
        SharedMidGenerator {
            prefix: mid_prefix(node_number, shard),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The next id, given the wall clock in Unix milliseconds.
    pub fn next(&self, now_unix_ms: u64) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let mut last = self.last.load(Relaxed);
        loop {
            let next = successor(last, self.prefix, now_unix_ms);
            match self
                .last
                .compare_exchange_weak(last, next, Relaxed, Relaxed)
            {
                Ok(_) => return next,
                Err(current) => last = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(frame: &Bytes) -> &str {
        std::str::from_utf8(&frame[ws::text_frame_header_len(frame)..]).expect("utf8")
    }

    fn json_of(frame: &Bytes) -> serde_json::Value {
        serde_json::from_str(text_of(frame)).expect("json")
    }

    #[test]
    fn parses_every_op() {
        let (id, req) = parse_request(r#"{"op":"sub","id":1,"topic":"a"}"#).expect("sub");
        assert_eq!(id.map(RawValue::get), Some("1"));
        assert!(matches!(req, Request::Sub { topic, since: None } if topic == "a"));
        let (_, req) = parse_request(r#"{"op":"sub","topic":"a","since":{"seq":4,"ep":"e"}}"#)
            .expect("sub since");
        assert!(matches!(req, Request::Sub { since: Some(Since { seq: 4, ep }), .. } if ep == "e"));
        let (_, req) = parse_request(r#"{"op":"resume","since":{"seq":0}}"#).expect("resume");
        assert!(matches!(req, Request::Resume { since: Since { seq: 0, ep } } if ep.is_empty()));
        for bad in [
            r#"{"op":"resume","id":1}"#,
            r#"{"op":"resume","id":1,"since":{"seq":-1,"ep":"e"}}"#,
            r#"{"op":"resume","id":1,"since":{"seq":"4","ep":"e"}}"#,
            r#"{"op":"sub","id":1,"topic":"a","since":7}"#,
        ] {
            let refusal = parse_request(bad).expect_err(bad);
            assert_eq!(refusal.code, ErrorCode::BadRequest, "{bad}");
            assert_eq!(refusal.id.map(RawValue::get), Some("1"), "{bad}");
        }
        let (_, req) = parse_request(r#"{"op":"unsub","topic":"a"}"#).expect("unsub");
        assert!(matches!(req, Request::Unsub { topic } if topic == "a"));
        let (id, req) =
            parse_request(r#"{"op":"pub","id":"x","topic":"t","data":{"k":[1,2]}}"#).expect("pub");
        assert_eq!(id.map(RawValue::get), Some("\"x\""));
        match req {
            Request::Pub { topic, data } => {
                assert_eq!(topic, "t");
                assert_eq!(data.get(), r#"{"k":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        let (_, req) = parse_request(r#"{"op":"send","to":"bob","data":null}"#).expect("send");
        assert!(matches!(req, Request::Send { to, data } if to == "bob" && data.get() == "null"));
        assert!(matches!(
            parse_request(r#"{"op":"ping"}"#).expect("ping").1,
            Request::Ping
        ));
    }

    /// Caught by the `client_request` fuzz check that only objects parse
    /// (fuzz/regressions/client_request/): serde reads a struct from an array by position.
    #[test]
    fn requests_are_objects_not_arrays() {
        for text in [
            r#"["ping"]"#,
            r#"["sub",1,"room.1"]"#,
            r#" ["pub",null,"t",null,1]"#,
        ] {
            assert_eq!(parse_request(text).unwrap_err().code, ErrorCode::BadRequest);
        }
        assert!(parse_request(" \r\n\t{\"op\":\"ping\"}").is_ok());
    }

    #[test]
    fn refuses_bad_requests_keeping_the_id() {
        assert_eq!(
            parse_request("{not json").unwrap_err().code,
            ErrorCode::BadRequest
        );
        let refusal = parse_request(r#"{"op":"dance","id":7}"#).unwrap_err();
        assert_eq!(refusal.msg, "unknown op");
        assert_eq!(refusal.id.map(RawValue::get), Some("7"));
        assert_eq!(
            parse_request(r#"{"op":"pub","topic":"t"}"#)
                .unwrap_err()
                .msg,
            "pub needs data"
        );
        assert_eq!(
            parse_request(r#"{"op":"send","data":1}"#).unwrap_err().msg,
            "send needs to"
        );
        assert!(parse_request(r#"{"op":"sub","id":{"a":1},"topic":"t"}"#)
            .unwrap_err()
            .id
            .is_none());
        assert!(parse_request(r#"[1,2]"#).is_err());
    }

    #[test]
    fn renders_frames_as_valid_json() {
        let id = RawValue::from_string("\"r1\"".into()).expect("raw");
        assert_eq!(
            json_of(&render::ack(Some(&id), Some(42))),
            serde_json::json!({"op":"ack","id":"r1","mid":"42"})
        );
        assert_eq!(
            json_of(&render::ack(None, None)),
            serde_json::json!({"op":"ack"})
        );
        assert_eq!(
            json_of(&render::err(None, ErrorCode::TooMany, "slow \"down\"")),
            serde_json::json!({"op":"err","code":"too_many","msg":"slow \"down\""})
        );
        assert_eq!(
            json_of(&render::msg(Some("al\nice"), "bob", 7, 8, r#"{"x":1}"#)),
            serde_json::json!({"op":"msg","from":"al\nice","to":"bob","mid":"7","ts":8,"data":{"x":1}})
        );
        assert_eq!(
            json_of(&render::publication(None, 7, 8, "[1]")),
            serde_json::json!({"op":"pub","mid":"7","ts":8,"data":[1]})
        );
        assert_eq!(
            json_of(&render::hello("u", 5, "n1", 25, None, None)),
            serde_json::json!({"op":"hello","user":"u","conn":"5","node":"n1","hb":25})
        );
        assert_eq!(
            json_of(&render::pong(None)),
            serde_json::json!({"op":"pong"})
        );
    }

    #[test]
    fn streamed_frames_carry_seq_and_ep() {
        let at = StreamPos {
            seq: 12,
            ep: "aZ09",
        };
        assert_eq!(
            text_of(&render::msg_in_stream(Some("al"), "bob", 7, 8, "{}", at)),
            r#"{"op":"msg","from":"al","to":"bob","mid":"7","ts":8,"seq":12,"ep":"aZ09","data":{}}"#
        );
        assert_eq!(
            text_of(&render::publication_in_stream("room", 7, 8, "1", at)),
            r#"{"op":"pub","topic":"room","mid":"7","ts":8,"seq":12,"ep":"aZ09","data":1}"#
        );
        assert_eq!(
            text_of(&render::hello("u", 5, "n1", 25, None, Some(at))),
            r#"{"op":"hello","user":"u","conn":"5","node":"n1","hb":25,"mailbox":{"seq":12,"ep":"aZ09"}}"#
        );
        let id = RawValue::from_string("3".into()).expect("raw");
        assert_eq!(
            json_of(&render::ack_replay(Some(&id), false, at)),
            serde_json::json!({"op":"ack","id":3,"recovered":false,"seq":12,"ep":"aZ09"})
        );
    }

    #[test]
    fn v1_frames_keep_their_bytes() {
        assert_eq!(
            text_of(&render::msg(None, "bob", 7, 8, "{}")),
            r#"{"op":"msg","to":"bob","mid":"7","ts":8,"data":{}}"#
        );
        assert_eq!(
            text_of(&render::publication(Some("t"), 7, 8, "1")),
            r#"{"op":"pub","topic":"t","mid":"7","ts":8,"data":1}"#
        );
    }

    #[test]
    fn since_reads_a_position_and_refuses_malformed_ones() {
        let since = |text: &str| {
            let raw = RawValue::from_string(text.into()).expect("json");
            parse_since(&raw).map(|s| (s.seq, s.ep.into_owned()))
        };
        assert_eq!(since(r#"{"seq":5,"ep":"aZ09"}"#), Ok((5, "aZ09".into())));
        assert_eq!(since(r#"{"seq":0}"#), Ok((0, String::new())));
        assert_eq!(
            since(r#"{"ep":"x","seq":18446744073709551615,"more":1}"#),
            Ok((u64::MAX, "x".into())),
            "the largest position is well-formed; the replay answers it"
        );
        assert_eq!(since(r#"{"seq":1,"ep":"\u00e9"}"#), Ok((1, "é".into())));
        for bad in [
            r#"{"seq":-1,"ep":"x"}"#,
            r#"{"seq":1.5,"ep":"x"}"#,
            r#"{"seq":1e3,"ep":"x"}"#,
            r#"{"seq":18446744073709551616,"ep":"x"}"#,
            r#"{"seq":"5","ep":"x"}"#,
            r#"{"seq":null}"#,
            r#"{"ep":"x"}"#,
            r#"{"seq":1,"ep":7}"#,
            r#"[1,"x"]"#,
            r#"5"#,
            r#"null"#,
        ] {
            assert!(since(bad).is_err(), "{bad}");
        }
        let long = format!(r#"{{"seq":1,"ep":"{}"}}"#, "e".repeat(MAX_EP_BYTES + 1));
        assert!(since(&long).is_err());
    }

    #[test]
    fn data_passes_through_untouched() {
        let data = r#"{ "spaced" : 1.50, "u":"\u00e9" }"#;
        let frame = render::publication(Some("t"), 1, 2, data);
        assert!(text_of(&frame).contains(data));
    }

    #[test]
    fn mids_are_unique_ordered_and_carry_time() {
        let mut a = MidGenerator::new(3, 1);
        let mut b = MidGenerator::new(3, 2);
        let t = MID_EPOCH_MS + 1_000_000;
        let mut seen = std::collections::HashSet::new();
        let mut last = 0;
        for _ in 0..2000 {
            let id = a.next(t);
            assert!(id > last, "ordered");
            last = id;
            assert!(seen.insert(id));
            assert!(seen.insert(b.next(t)));
        }
        assert_eq!(MidGenerator::timestamp_ms(a.next(t + 50)), t + 50);
        assert!(MidGenerator::timestamp_ms(last) >= t);
        assert_eq!(
            last & !SEQ_MASK & ((1 << TIME_SHIFT) - 1),
            mid_prefix(3, 1),
            "prefix kept"
        );
    }

    #[test]
    fn shared_generator_is_unique_across_threads() {
        let shared = std::sync::Arc::new(SharedMidGenerator::new(1, 63));
        let t = MID_EPOCH_MS + 5;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || (0..1000).map(|_| shared.next(t)).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4000);
    }
}
