//! RFC 6455 on our own buffers: the upgrade request, inbound frame decoding, outbound framing.
//!
//! httparse reads the upgrade request in place and tungstenite supplies the accept key and
//! the frame types ([`FrameHeader`], [`OpCode`]); this module supplies the handshake's checks
//! (those of tungstenite's server handshake, see [`parse_upgrade`]) and the buffer management
//! that lets a million idle connections hold no I/O buffer at all:
//!
//! * **Reading.** Sessions read into one scratch buffer per shard and hand it to
//!   [`Inbound::feed`], which decodes whole frames in place (unmasking the scratch bytes) and
//!   keeps only the bytes of an incomplete frame, or the fragments of an unfinished message,
//!   in the connection. An idle connection's [`Inbound`] holds two empty `Vec`s.
//! * **Writing.** Server frames are built as complete frames in a [`Bytes`] (header included)
//!   so the same buffer can be queued for every recipient. Server frames are never masked.
//!
//! Nothing here does I/O, so all of it is unit-tested and benchmarked without sockets.

use std::io::Cursor;

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Room reserved in front of a rendered payload for the largest unmasked server header.
pub const MAX_SERVER_HEADER: usize = 10;

/// Writes the header of a text frame in front of the payload that follows the first
/// [`MAX_SERVER_HEADER`] bytes of `out`, and returns the frame without the unused room.
pub fn seal_text_frame(out: Vec<u8>) -> Bytes {
    seal_frame(out, OpCode::Data(Data::Text))
}

fn seal_frame(mut out: Vec<u8>, opcode: OpCode) -> Bytes {
    let payload_len = (out.len() - MAX_SERVER_HEADER) as u64;
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    let mut head = [0u8; MAX_SERVER_HEADER];
    let head_len = header.len(payload_len);
    header
        .format(payload_len, &mut &mut head[..])
        .expect("an unmasked header fits in MAX_SERVER_HEADER bytes");
    let start = MAX_SERVER_HEADER - head_len;
    out[start..MAX_SERVER_HEADER].copy_from_slice(&head[..head_len]);
    Bytes::from(out).slice(start..)
}

/// A whole server frame of `opcode` carrying `payload`.
pub fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(MAX_SERVER_HEADER + payload.len());
    out.resize(MAX_SERVER_HEADER, 0);
    out.extend_from_slice(payload);
    seal_frame(out, opcode)
}

/// An empty ping frame, as sent by the heartbeat.
pub fn ping_frame() -> Bytes {
    Bytes::from_static(&[0x89, 0x00])
}

/// A close frame with `code` and a short `reason` (truncated to fit a control frame).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut reason_end = reason.len().min(123);
    while !reason.is_char_boundary(reason_end) {
        reason_end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + reason_end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..reason_end]);
    frame(OpCode::Control(Control::Close), &payload)
}

/// Length of the header of an unmasked server frame (tests read frames with it).
#[cfg(test)]
pub(crate) fn text_frame_header_len(frame: &[u8]) -> usize {
    match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    }
}

/// Close codes shardcast sends.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Node going away: reconnect elsewhere.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error (bad framing).
    pub const PROTOCOL: u16 = 1002;
    /// Invalid UTF-8 in a text message.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy: bad input, slow consumer, heartbeat timeout, an incomplete message held too
    /// long or past the shard's budget.
    pub const POLICY: u16 = 1008;
    /// Frame or message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Replaced: the user opened more devices than allowed and this was the oldest.
    pub const REPLACED: u16 = 4001;
    /// Kicked by the API.
    pub const KICKED: u16 = 4003;
    /// Missing or invalid credentials, for a client that offered the `shardcast.v1`
    /// subprotocol (a page cannot read an HTTP 401).
    pub const UNAUTHORIZED: u16 = 4401;
    /// The token expired: at the handshake (with `shardcast.v1`), or at its `exp` on an open
    /// connection that did not `refresh` it.
    pub const TOKEN_EXPIRED: u16 = 4402;
}

/// The subprotocol a node answers when a client offers it (`Sec-WebSocket-Protocol`).
/// Browsers abort a connection whose offered subprotocol is not answered; a client that
/// offers this one also learns credential failures as close codes 4401/4402 instead of an
/// HTTP 401 it cannot read.
pub const SUBPROTOCOL: &str = "shardcast.v1";

/// A complete inbound message or control frame.
#[derive(Debug, PartialEq)]
pub enum Event<'a> {
    /// A text message (UTF-8 already checked).
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
    /// A ping, to be answered with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong.
    Pong,
    /// The peer's close frame, with its code if it sent one.
    Close(Option<u16>),
}

/// What the event handler wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep decoding.
    Continue,
    /// Stop decoding (the connection is closing); the rest of the input is ignored.
    Stop,
}

/// Input that ends the connection, with the close code it earns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Framing that breaks RFC 6455 (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A frame or message over the configured limit (close 1009).
    #[error("frame or message too big")]
    TooBig,
    /// Invalid UTF-8 in a text message or close reason (close 1007).
    #[error("invalid UTF-8")]
    BadUtf8,
}

impl Violation {
    /// Close code to answer with.
    pub fn close_code(self) -> u16 {
        match self {
            Violation::Protocol(_) => close::PROTOCOL,
            Violation::TooBig => close::TOO_BIG,
            Violation::BadUtf8 => close::INVALID_PAYLOAD,
        }
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Violation::Protocol(_) => "protocol_error",
            Violation::TooBig => "too_big",
            Violation::BadUtf8 => "bad_utf8",
        }
    }
}

/// Size limits for inbound frames.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame payload.
    pub max_frame: usize,
    /// Largest message (sum of fragments).
    pub max_message: usize,
}

/// A connection's inbound decoding state: one empty pointer between messages; the state of
/// an incomplete frame or message is allocated only while there is one.
#[derive(Debug, Default)]
pub struct Inbound(Option<Box<Pending>>);

/// What an [`Inbound`] holds between reads.
#[derive(Debug, Default)]
struct Pending {
    /// Bytes of an incomplete frame.
    partial: Vec<u8>,
    /// Fragments of an unfinished message: the opcode of its first frame and its payload.
    fragments: Option<(Data, Vec<u8>)>,
    /// When the incomplete message began, on the caller's clock (see
    /// [`Inbound::incomplete_since`]).
    since_ms: u32,
}

impl Inbound {
    /// Decodes `input` (freshly read bytes; unmasked in place), calling `on_event` for every
    /// complete message and control frame. Keeps what is incomplete for the next call.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        limits: Limits,
        on_event: impl FnMut(Event<'_>) -> Flow,
    ) -> Result<Flow, Violation> {
        let mut fresh = Pending::default();
        let state = match self.0.as_deref_mut() {
            Some(pending) => pending,
            None => &mut fresh,
        };
        let result = state.feed(input, limits, on_event);
        match &self.0 {
            None if !fresh.is_empty() => self.0 = Some(Box::new(fresh)),
            Some(pending) if pending.is_empty() => self.0 = None,
            _ => {}
        }
        result
    }

    /// When the incomplete frame or message held now began, on the caller's clock, if one
    /// is held. The decoder has no clock: the caller stamps it with
    /// [`Inbound::set_incomplete_since`].
    pub fn incomplete_since(&self) -> Option<u32> {
        self.0.as_ref().map(|p| p.since_ms)
    }

    /// Records when the incomplete frame or message held now began (nothing if none is).
    pub fn set_incomplete_since(&mut self, now_ms: u32) {
        if let Some(pending) = self.0.as_deref_mut() {
            pending.since_ms = now_ms;
        }
    }

    /// Drops whatever is held (the connection is leaving); returns [`Inbound::buffered`]
    /// as it was.
    pub fn release(&mut self) -> usize {
        let held = self.buffered();
        self.0 = None;
        held
    }

    /// Bytes held for incomplete frames and messages (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.0.as_ref().map_or(0, |p| {
            p.partial.capacity() + p.fragments.as_ref().map_or(0, |(_, b)| b.capacity())
        })
    }
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.partial.is_empty() && self.fragments.is_none()
    }

    fn feed(
        &mut self,
        input: &mut [u8],
        limits: Limits,
        mut on_event: impl FnMut(Event<'_>) -> Flow,
    ) -> Result<Flow, Violation> {
        if self.partial.is_empty() {
            let (used, flow) = self.decode(input, limits, &mut on_event)?;
            if flow == Flow::Continue && used < input.len() {
                self.partial.extend_from_slice(&input[used..]);
            }
            Ok(flow)
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(input);
            let (used, flow) = self.decode(&mut buf, limits, &mut on_event)?;
            if used < buf.len() && flow == Flow::Continue {
                // `buf` has room for the whole read (up to the shard's scratch size): once
                // frames completed, keep only the incomplete tail, in a buffer its size.
                self.partial = if used == 0 { buf } else { buf[used..].to_vec() };
            }
            Ok(flow)
        }
    }

    fn decode(
        &mut self,
        buf: &mut [u8],
        limits: Limits,
        on_event: &mut impl FnMut(Event<'_>) -> Flow,
    ) -> Result<(usize, Flow), Violation> {
        let mut pos = 0;
        while pos < buf.len() {
            let mut cursor = Cursor::new(&buf[pos..]);
            let Some((header, len)) = FrameHeader::parse(&mut cursor)
                .map_err(|_| Violation::Protocol("malformed frame header"))?
            else {
                break;
            };
            if len > limits.max_frame as u64 {
                return Err(Violation::TooBig);
            }
            let start = pos + cursor.position() as usize;
            let end = start + len as usize;
            if end > buf.len() {
                break;
            }
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(Violation::Protocol("reserved bits set"));
            }
            let mask = header
                .mask
                .ok_or(Violation::Protocol("client frames must be masked"))?;
            let payload = &mut buf[start..end];
            unmask(payload, mask);
            pos = end;
            let flow = self.frame(header.opcode, header.is_final, payload, limits, on_event)?;
            if flow == Flow::Stop {
                return Ok((pos, Flow::Stop));
            }
        }
        Ok((pos, Flow::Continue))
    }

    fn frame(
        &mut self,
        opcode: OpCode,
        is_final: bool,
        payload: &[u8],
        limits: Limits,
        on_event: &mut impl FnMut(Event<'_>) -> Flow,
    ) -> Result<Flow, Violation> {
        match opcode {
            OpCode::Control(control) => {
                if !is_final || payload.len() > 125 {
                    return Err(Violation::Protocol(
                        "control frames must be final and short",
                    ));
                }
                match control {
                    Control::Ping => Ok(on_event(Event::Ping(payload))),
                    Control::Pong => Ok(on_event(Event::Pong)),
                    Control::Close => {
                        let code = parse_close(payload)?;
                        on_event(Event::Close(code));
                        Ok(Flow::Stop)
                    }
                    Control::Reserved(_) => Err(Violation::Protocol("reserved opcode")),
                }
            }
            OpCode::Data(Data::Continue) => {
                let (kind, mut message) = self
                    .fragments
                    .take()
                    .ok_or(Violation::Protocol("continuation without a message"))?;
                if message.len() + payload.len() > limits.max_message {
                    return Err(Violation::TooBig);
                }
                message.extend_from_slice(payload);
                if is_final {
                    deliver(kind, &message, on_event)
                } else {
                    self.fragments = Some((kind, message));
                    Ok(Flow::Continue)
                }
            }
            OpCode::Data(kind @ (Data::Text | Data::Binary)) => {
                if self.fragments.is_some() {
                    return Err(Violation::Protocol("new message inside a fragmented one"));
                }
                if payload.len() > limits.max_message {
                    return Err(Violation::TooBig);
                }
                if is_final {
                    deliver(kind, payload, on_event)
                } else {
                    self.fragments = Some((kind, payload.to_vec()));
                    Ok(Flow::Continue)
                }
            }
            OpCode::Data(Data::Reserved(_)) => Err(Violation::Protocol("reserved opcode")),
        }
    }
}

fn deliver(
    kind: Data,
    payload: &[u8],
    on_event: &mut impl FnMut(Event<'_>) -> Flow,
) -> Result<Flow, Violation> {
    Ok(match kind {
        Data::Text => on_event(Event::Text(
            std::str::from_utf8(payload).map_err(|_| Violation::BadUtf8)?,
        )),
        _ => on_event(Event::Binary(payload)),
    })
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::Protocol("one-byte close payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !CloseCode::from(code).is_allowed() {
                return Err(Violation::Protocol("close code not allowed"));
            }
            std::str::from_utf8(reason).map_err(|_| Violation::BadUtf8)?;
            Ok(Some(code))
        }
    }
}

/// XORs `payload` with the 4-byte mask, eight bytes at a time.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("chunk of 8")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Endpoints a client can upgrade on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws`: the push protocol.
    Push,
    /// `/echo` (dev mode only): echoes data messages, for conformance suites.
    Echo,
}

/// A parsed, valid upgrade request.
#[derive(Debug)]
pub struct Upgrade {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// Bearer token from the header or `?token=`.
    pub token: Option<String>,
    /// `?user=` (trusted only in dev mode).
    pub dev_user: Option<String>,
    /// The `101 Switching Protocols` response to send.
    pub response: Vec<u8>,
    /// The client offered [`SUBPROTOCOL`] (and the response names it).
    pub subprotocol: bool,
    /// Bytes of the buffer the request used; anything after is the client's first frames.
    pub consumed: usize,
}

/// An upgrade that is refused with an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpRefusal {
    /// HTTP status.
    pub status: u16,
    /// Error code for the JSON body and metric label.
    pub code: &'static str,
    /// Human-readable message.
    pub message: &'static str,
}

impl HttpRefusal {
    /// Request is not a valid WebSocket upgrade.
    pub const BAD_REQUEST: HttpRefusal = HttpRefusal {
        status: 400,
        code: "bad_request",
        message: "not a valid WebSocket upgrade request",
    };
    /// Request line and headers exceed the limit.
    pub const TOO_LARGE: HttpRefusal = HttpRefusal {
        status: 431,
        code: "headers_too_large",
        message: "upgrade request too large",
    };
    /// Unknown path.
    pub const NOT_FOUND: HttpRefusal = HttpRefusal {
        status: 404,
        code: "not_found",
        message: "no such endpoint; clients connect to /ws",
    };
    /// A WebSocket version other than 13; RFC 6455 §4.2.2 asks for 426 naming the version
    /// the server speaks (the response carries `Sec-WebSocket-Version: 13`).
    pub const BAD_VERSION: HttpRefusal = HttpRefusal {
        status: 426,
        code: "bad_version",
        message: "unsupported WebSocket version; this server speaks 13",
    };
    /// Node at its connection limit or draining.
    pub const UNAVAILABLE: HttpRefusal = HttpRefusal {
        status: 503,
        code: "unavailable",
        message: "node is at capacity or draining; try another node",
    };

    /// 401 with the reason credentials were refused.
    pub fn unauthorized(code: &'static str) -> HttpRefusal {
        HttpRefusal {
            status: 401,
            code,
            message: "missing or invalid credentials",
        }
    }

    /// The full HTTP response, closing the connection.
    pub fn response(&self) -> Vec<u8> {
        let reason = match self.status {
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            _ => "Service Unavailable",
        };
        let version = if self.status == 426 {
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        } else {
            ""
        };
        let body = format!(
            "{{\"error\":{{\"code\":\"{}\",\"message\":\"{}\"}}}}",
            self.code, self.message
        );
        format!(
            "HTTP/1.1 {} {reason}\r\n{version}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }
}

/// Most headers an upgrade request may carry (tungstenite's limit).
const MAX_HEADERS: usize = 124;

/// Parses the upgrade request in `buf`. `Ok(None)`: incomplete, read more.
///
/// httparse reads the request in place and the checks run on its borrowed headers: what
/// tungstenite's `Request::try_parse` and `create_response` check (GET, HTTP/1.1, a
/// `Connection` naming `Upgrade`, `Upgrade: websocket`, version 13, a key), without building
/// an `http::Request`, a `HeaderMap` and a `Response` per connect (7 % of a connect's CPU).
/// A unit test checks both agree on the fuzz corpus.
pub fn parse_upgrade(buf: &[u8], dev: bool) -> Result<Option<Upgrade>, HttpRefusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let consumed = match request.parse(buf) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HttpRefusal::BAD_REQUEST),
    };
    if request.method != Some("GET") || request.version != Some(1) {
        return Err(HttpRefusal::BAD_REQUEST);
    }
    // httparse refuses the header values `http::HeaderValue` refuses (control bytes but tab).
    let headers = Headers(request.headers);
    let uri: tungstenite::http::Uri = request
        .path
        .unwrap_or_default()
        .parse()
        .map_err(|_| HttpRefusal::BAD_REQUEST)?;
    let endpoint = match uri.path() {
        "/ws" => Endpoint::Push,
        "/echo" if dev => Endpoint::Echo,
        _ => return Err(HttpRefusal::NOT_FOUND),
    };
    let version = headers.first("sec-websocket-version");
    if version.is_some_and(|version| version != b"13") {
        return Err(HttpRefusal::BAD_VERSION);
    }
    let connection_upgrade = headers.first_text("connection").is_some_and(|value| {
        value
            .split([' ', ','])
            .any(|token| token.eq_ignore_ascii_case("upgrade"))
    });
    let upgrade_websocket = headers
        .first_text("upgrade")
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    let key = headers.first("sec-websocket-key");
    let (true, true, Some(_), Some(key)) = (connection_upgrade, upgrade_websocket, version, key)
    else {
        return Err(HttpRefusal::BAD_REQUEST);
    };
    let subprotocol = headers
        .all_text("sec-websocket-protocol")
        .flat_map(|value| value.split(','))
        .any(|offered| offered.trim() == SUBPROTOCOL);
    let accept = tungstenite::handshake::derive_accept_key(key);
    let mut response = Vec::with_capacity(160);
    response.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\n");
    response.extend_from_slice(b"upgrade: websocket\r\nsec-websocket-accept: ");
    response.extend_from_slice(accept.as_bytes());
    if subprotocol {
        response.extend_from_slice(b"\r\nsec-websocket-protocol: ");
        response.extend_from_slice(SUBPROTOCOL.as_bytes());
    }
    response.extend_from_slice(b"\r\n\r\n");

    let header_token = headers
        .first_text("authorization")
        .and_then(crate::auth::bearer);
    let (token, dev_user) = credentials(header_token, uri.query());
    Ok(Some(Upgrade {
        endpoint,
        token,
        dev_user,
        response,
        subprotocol,
        consumed,
    }))
}

/// The token (the `Authorization` header's, else `?token=`) and `?user=` of a request.
fn credentials(
    header_token: Option<&str>,
    query: Option<&str>,
) -> (Option<String>, Option<String>) {
    let mut token = header_token.map(str::to_owned);
    let mut dev_user = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "token" if token.is_none() => token = Some(value.into_owned()),
            "user" => dev_user = Some(value.into_owned()),
            _ => {}
        }
    }
    (token, dev_user)
}

/// The headers of a parsed request, looked up as `http::HeaderMap` does: names without
/// regard to case, the first of repeated ones, values as text only when they are visible
/// ASCII.
struct Headers<'h, 'b>(&'h [httparse::Header<'b>]);

impl<'b> Headers<'_, 'b> {
    fn all(&self, name: &'static str) -> impl Iterator<Item = &'b [u8]> + '_ {
        self.0
            .iter()
            .filter(move |header| header.name.eq_ignore_ascii_case(name))
            .map(|header| header.value)
    }

    fn first(&self, name: &'static str) -> Option<&'b [u8]> {
        self.all(name).next()
    }

    /// Values that are visible ASCII (`HeaderValue::to_str`), as text; others are skipped.
    fn all_text(&self, name: &'static str) -> impl Iterator<Item = &'b str> + '_ {
        self.all(name).filter_map(visible_text)
    }

    /// The first value, if it is visible ASCII.
    fn first_text(&self, name: &'static str) -> Option<&'b str> {
        self.first(name).and_then(visible_text)
    }
}

/// A header value as text if it is visible ASCII (or tab), as `HeaderValue::to_str` reads it.
fn visible_text(value: &[u8]) -> Option<&str> {
    let visible = value
        .iter()
        .all(|&byte| byte == b'\t' || (32..127).contains(&byte));
    visible.then(|| std::str::from_utf8(value).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_frame: 1024,
        max_message: 2048,
    };

    /// A masked client frame.
    fn client_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let header = FrameHeader {
            is_final: fin,
            opcode,
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        header
            .format(payload.len() as u64, &mut out)
            .expect("format");
        let mut body = payload.to_vec();
        unmask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    fn text(s: &str) -> Vec<u8> {
        client_frame(OpCode::Data(Data::Text), true, s.as_bytes())
    }

    fn collect(inbound: &mut Inbound, mut input: Vec<u8>) -> Result<Vec<String>, Violation> {
        let mut seen = Vec::new();
        inbound.feed(&mut input, LIMITS, |e| {
            seen.push(format!("{e:?}"));
            Flow::Continue
        })?;
        Ok(seen)
    }

    #[test]
    fn decodes_frames_split_at_every_byte() {
        let mut wire = text("hello");
        wire.extend(client_frame(OpCode::Control(Control::Ping), true, b"p"));
        wire.extend(text(&"x".repeat(300)));
        for split in 0..wire.len() {
            let mut inbound = Inbound::default();
            let mut seen = collect(&mut inbound, wire[..split].to_vec()).expect("first");
            seen.extend(collect(&mut inbound, wire[split..].to_vec()).expect("second"));
            assert_eq!(seen.len(), 3, "split at {split}: {seen:?}");
            assert_eq!(seen[0], "Text(\"hello\")");
            assert_eq!(
                inbound.buffered(),
                0,
                "nothing held once frames are complete"
            );
        }
    }

    /// Caught by the `ws_frames` fuzz check (fuzz/regressions/ws_frames/): a few bytes of a
    /// frame left over from a read full of complete frames kept the whole read's buffer.
    #[test]
    fn an_incomplete_frame_holds_its_size_not_the_read_size() {
        let ping = client_frame(OpCode::Control(Control::Ping), true, b"");
        let mut inbound = Inbound::default();
        collect(&mut inbound, ping[..1].to_vec()).expect("first byte");
        let mut read = ping[1..].to_vec();
        for _ in 0..1000 {
            read.extend_from_slice(&ping);
        }
        read.push(ping[0]);
        let seen = collect(&mut inbound, read).expect("pings");
        assert_eq!(seen.len(), 1001);
        assert!(inbound.buffered() < 14, "holds {}", inbound.buffered());
    }

    #[test]
    fn the_incomplete_stamp_lives_with_the_incomplete_state() {
        let mut inbound = Inbound::default();
        inbound.set_incomplete_since(7);
        assert_eq!(
            inbound.incomplete_since(),
            None,
            "nothing held, nothing stamped"
        );
        let wire = text("hello");
        collect(&mut inbound, wire[..3].to_vec()).expect("partial");
        inbound.set_incomplete_since(42);
        assert_eq!(inbound.incomplete_since(), Some(42));
        collect(&mut inbound, wire[3..4].to_vec()).expect("still partial");
        assert_eq!(
            inbound.incomplete_since(),
            Some(42),
            "kept while incomplete"
        );
        assert!(inbound.release() > 0);
        assert_eq!((inbound.incomplete_since(), inbound.buffered()), (None, 0));
        collect(&mut inbound, wire[..3].to_vec()).expect("partial");
        collect(&mut inbound, wire[3..].to_vec()).expect("complete");
        assert_eq!(inbound.incomplete_since(), None, "gone once complete");
    }

    #[test]
    fn reassembles_fragments_with_interleaved_control() {
        let mut wire = client_frame(OpCode::Data(Data::Text), false, b"he");
        wire.extend(client_frame(OpCode::Control(Control::Ping), true, b""));
        wire.extend(client_frame(OpCode::Data(Data::Continue), true, b"llo"));
        let seen = collect(&mut Inbound::default(), wire).expect("ok");
        assert_eq!(seen, vec!["Ping([])", "Text(\"hello\")"]);
    }

    #[test]
    fn rejects_bad_input_with_the_right_code() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (
                client_frame(OpCode::Data(Data::Text), true, &[0xff, 0xfe]),
                1007,
            ),
            (text(&"x".repeat(1025)), 1009),
            (client_frame(OpCode::Data(Data::Continue), true, b"x"), 1002),
            (
                client_frame(OpCode::Control(Control::Ping), false, b""),
                1002,
            ),
            (
                client_frame(OpCode::Data(Data::Reserved(3)), true, b""),
                1002,
            ),
            (
                client_frame(OpCode::Control(Control::Close), true, &[0x03, 0xe8, 0xc3]),
                1007,
            ),
            (
                client_frame(OpCode::Control(Control::Close), true, &[0x03]),
                1002,
            ),
            (vec![0x81, 0x02, b'h', b'i'], 1002),
        ];
        for (wire, code) in cases {
            let err = collect(&mut Inbound::default(), wire).unwrap_err();
            assert_eq!(err.close_code(), code, "{err:?}");
        }
        let mut too_long = client_frame(OpCode::Data(Data::Text), false, &[b'a'; 1000]);
        for _ in 0..2 {
            too_long.extend(client_frame(
                OpCode::Data(Data::Continue),
                false,
                &[b'a'; 1000],
            ));
        }
        assert_eq!(
            collect(&mut Inbound::default(), too_long).unwrap_err(),
            Violation::TooBig
        );
    }

    /// Arbitrary bytes, split arbitrarily, never panic the decoder: every input ends in
    /// events, a wait for more, or a violation.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let len = (next() % 300) as usize;
            let mut wire: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Often start from a plausible masked header so deeper paths are reached.
            if next() % 2 == 0 && wire.len() > 6 {
                wire[0] = [0x81, 0x01, 0x80, 0x88, 0x89, 0x8a, 0x02][(next() % 7) as usize];
                wire[1] = 0x80 | (next() % 126) as u8;
            }
            let split = (next() as usize) % (wire.len() + 1);
            let mut inbound = Inbound::default();
            let mut first = wire[..split].to_vec();
            let mut second = wire[split..].to_vec();
            let flow = inbound.feed(&mut first, LIMITS, |_| Flow::Continue);
            if flow == Ok(Flow::Continue) {
                let _ = inbound.feed(&mut second, LIMITS, |_| Flow::Continue);
            }
            assert!(inbound.buffered() <= LIMITS.max_frame + 14 + LIMITS.max_message);
        }
    }

    #[test]
    fn arbitrary_upgrade_requests_never_panic() {
        let valid = upgrade_request("/ws?user=a", "Authorization: Bearer t\r\n");
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..5000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut request = valid.clone();
            // Corrupt a few bytes of a valid request, or truncate it.
            for k in 0..(state % 4) {
                let at = ((state >> (8 * k)) as usize) % request.len();
                request[at] = (state >> (16 + k)) as u8;
            }
            request.truncate(request.len() - (state as usize % 8));
            let _ = parse_upgrade(&request, state % 2 == 0);
        }
    }

    #[test]
    fn close_stops_decoding() {
        let mut wire = client_frame(OpCode::Control(Control::Close), true, &[0x03, 0xe8]);
        wire.extend(text("after"));
        let seen = collect(&mut Inbound::default(), wire).expect("ok");
        assert_eq!(seen, vec!["Close(Some(1000))"]);
    }

    #[test]
    fn server_frames_have_correct_headers() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'a'; len];
            let frame = frame(OpCode::Data(Data::Text), &payload);
            let mut cursor = Cursor::new(&frame[..]);
            let (header, parsed_len) = FrameHeader::parse(&mut cursor).expect("ok").expect("some");
            assert_eq!(parsed_len as usize, len);
            assert!(header.is_final && header.mask.is_none());
            assert_eq!(cursor.position() as usize, text_frame_header_len(&frame));
        }
        let close = close_frame(1008, &"é".repeat(100));
        assert!(close.len() <= 2 + 125);
        assert_eq!(&close[2..4], &1008u16.to_be_bytes());
    }

    /// The handshake as tungstenite's server does it (what [`parse_upgrade`] did before it
    /// read httparse's headers itself): the oracle of the test below.
    fn parse_upgrade_with_tungstenite(
        buf: &[u8],
        dev: bool,
    ) -> Result<Option<Upgrade>, HttpRefusal> {
        use tungstenite::handshake::machine::TryParse;
        use tungstenite::handshake::server::{create_response, write_response, Request};
        let (consumed, request) = match Request::try_parse(buf) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(None),
            Err(_) => return Err(HttpRefusal::BAD_REQUEST),
        };
        let endpoint = match request.uri().path() {
            "/ws" => Endpoint::Push,
            "/echo" if dev => Endpoint::Echo,
            _ => return Err(HttpRefusal::NOT_FOUND),
        };
        if let Some(version) = request.headers().get("sec-websocket-version") {
            if version.as_bytes() != b"13" {
                return Err(HttpRefusal::BAD_VERSION);
            }
        }
        let mut response = create_response(&request).map_err(|_| HttpRefusal::BAD_REQUEST)?;
        let subprotocol = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|offered| offered.trim() == SUBPROTOCOL);
        if subprotocol {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                tungstenite::http::HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        let mut response_bytes = Vec::new();
        write_response(&mut response_bytes, &response).map_err(|_| HttpRefusal::BAD_REQUEST)?;
        let header_token = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer);
        let (token, dev_user) = credentials(header_token, request.uri().query());
        Ok(Some(Upgrade {
            endpoint,
            token,
            dev_user,
            response: response_bytes,
            subprotocol,
            consumed,
        }))
    }

    /// What a parse came to, comparable.
    fn outcome(parsed: Result<Option<Upgrade>, HttpRefusal>) -> String {
        format!("{parsed:?}")
    }

    #[test]
    fn upgrades_parse_as_tungstenite_parses_them() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/upgrade");
        let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&corpus)
            .expect("the upgrade fuzz corpus")
            .map(|entry| std::fs::read(entry.expect("entry").path()).expect("read"))
            .filter_map(|data| data.get(1..).map(<[u8]>::to_vec))
            .collect();
        assert!(inputs.len() > 100, "{} inputs", inputs.len());
        let subprotocols = "Sec-WebSocket-Protocol: chat, shardcast.v1\r\n";
        inputs.push(upgrade_request("/ws?user=a", subprotocols));
        inputs.push(upgrade_request("/ws", "Connection: keep-alive\r\n"));
        inputs.push(b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\n\r\n".to_vec());
        inputs.push(upgrade_request("/ws", "X-Bin: \x01\r\n"));
        inputs.push(upgrade_request("/ws", "X-Del: \x7f\r\n"));
        inputs.push(upgrade_request("/ws", "Authorization: Bearer é\r\n"));
        let mut upgraded = 0;
        for input in &inputs {
            for dev in [false, true] {
                let ours = parse_upgrade(input, dev);
                upgraded += usize::from(matches!(ours, Ok(Some(_))));
                assert_eq!(
                    outcome(ours),
                    outcome(parse_upgrade_with_tungstenite(input, dev)),
                    "{:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
        assert!(upgraded > 10, "only {upgraded} inputs upgraded");
    }

    fn upgrade_request(target: &str, extra: &str) -> Vec<u8> {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn parses_upgrades() {
        let req = upgrade_request("/ws?token=abc&user=b%20ob", "Authorization: Bearer hdr\r\n");
        let upgrade = parse_upgrade(&req, false).expect("ok").expect("complete");
        assert_eq!(upgrade.endpoint, Endpoint::Push);
        assert_eq!(
            upgrade.token.as_deref(),
            Some("hdr"),
            "header wins over query"
        );
        assert_eq!(upgrade.dev_user.as_deref(), Some("b ob"));
        assert_eq!(upgrade.consumed, req.len());
        let response = String::from_utf8(upgrade.response).expect("utf8");
        assert!(response.starts_with("HTTP/1.1 101"));
        assert!(response.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));

        let query_only = parse_upgrade(&upgrade_request("/ws?token=q", ""), false)
            .expect("ok")
            .expect("complete");
        assert_eq!(query_only.token.as_deref(), Some("q"));

        assert_eq!(
            parse_upgrade(&req[..20], false)
                .expect("ok")
                .map(|u| u.consumed),
            None
        );
        assert_eq!(
            parse_upgrade(&upgrade_request("/other", ""), false)
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            parse_upgrade(&upgrade_request("/echo", ""), false)
                .unwrap_err()
                .status,
            404
        );
        assert!(parse_upgrade(&upgrade_request("/echo", ""), true).is_ok());
        let v8 = String::from_utf8(upgrade_request("/ws", ""))
            .expect("utf8")
            .replace("Version: 13", "Version: 8");
        let refusal = parse_upgrade(v8.as_bytes(), false).unwrap_err();
        assert_eq!(refusal.status, 426);
        let response = String::from_utf8(refusal.response()).expect("utf8");
        assert!(response.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(response.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        let plain = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(parse_upgrade(plain, false).unwrap_err().status, 400);
        assert_eq!(
            parse_upgrade(b"\x16\x03garbage\r\n\r\n", false)
                .unwrap_err()
                .status,
            400
        );
    }
}
