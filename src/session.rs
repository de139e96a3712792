//! One client connection: the upgrade, the protocol v1 session, and the close.
//!
//! Connections are not tasks. The shard's event loop ([`crate::shard`]) calls into this
//! module when a socket is ready; everything here is synchronous and non-blocking.
//!
//! # Memory
//! An open connection is one [`Conn`] (about 160 bytes) plus its entries in the shard's
//! tables. Reads go through the shard's scratch buffer; the decoder keeps only an incomplete
//! frame, and the outbound queue exists only while the socket is refusing data. The upgrade's request
//! buffer lives in a [`Handshake`] that is gone once the connection is open.
//!
//! What a connection holds for an incomplete frame or message is bounded three ways: in size
//! (`max_frame_bytes`, `max_message_bytes`), in time (`incomplete_message_timeout_ms`, from
//! the first byte after the last complete message; checked by the heartbeat sweep, close
//! 1008) and per shard (`shard_incomplete_bytes`: the connection whose data crosses it is
//! closed 1008, so a crowd of dripping clients cannot take a shard's memory; the gauge
//! `incomplete_bytes` shows the sum). Only complete frames count as signs of life for the
//! heartbeat, so a peer dripping a frame forever is closed as silent too.
//!
//! # Writes
//! [`Conn::push`] writes through: when nothing is queued it `send`s the frame at once from
//! whichever task is delivering, so a fan-out costs one syscall per recipient. Only what the
//! socket does not take is queued, as shared [`Bytes`] (never copied), and flushed with
//! `sendmsg` when epoll reports the socket writable again. A queue over `max_outbound_bytes`
//! marks a slow consumer: its frames are dropped at once (memory released; a partly written
//! frame is finished so the close frame stays well-framed) and it is closed with 1008.
//!
//! # Rate limit
//! Inbound data messages and pings spend a token of a per-connection bucket
//! (`rate_limit_per_sec`, `rate_limit_burst`). A message without a token is dropped and
//! counted; the first such refusal in each second (`RATE_ERR_WINDOW_MS`) is answered with
//! one `err too_many` carrying that request's `id`, the others get no reply, so a flood
//! never makes the server write as much as it reads.
//!
//! # Close
//! A close requested by anyone (slow consumer, device limit, kick, shutdown, heartbeat, bad
//! input) is a flag plus a queued close frame; the shard takes the connection out of its
//! tables, flushes, half-closes and waits up to `close_timeout_ms` for the peer to finish, so
//! a client reads every frame sent before the close frame.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use smallvec::SmallVec;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use crate::auth::{valid_name, Identity, PublishRights};
use crate::metrics::{self, Rejection};
use crate::protocol::{self, render, ErrorCode, Request};
use crate::reactor;
use crate::router::{ConnId, Message};
use crate::shard::Shard;
use crate::ws::{self, close, Endpoint, Event, Flow, HttpRefusal, Inbound, Limits, Violation};

/// Reads per readiness event before a busy connection lets the others of the shard go first.
const READS_PER_TURN: usize = 16;

/// Frames per `sendmsg` call when flushing a queue.
const IOVECS_PER_WRITE: usize = 64;

/// Frames waiting for the socket.
#[derive(Default)]
struct WriteQueue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// The front frame is partly written: dropping it would corrupt the stream.
    front_started: bool,
}

impl WriteQueue {
    fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Queues the unwritten tail of a frame whose head went out already.
    fn push_tail(&mut self, tail: Bytes) {
        debug_assert!(self.frames.is_empty());
        self.push(tail);
        self.front_started = true;
    }

    /// Forgets `written` bytes from the front.
    fn consume(&mut self, mut written: usize) {
        self.bytes -= written;
        while written > 0 {
            let front = self.frames.front_mut().expect("written bytes were queued");
            if written >= front.len() {
                written -= front.len();
                self.frames.pop_front();
                self.front_started = false;
            } else {
                front.advance(written);
                self.front_started = true;
                written = 0;
            }
        }
    }

    /// Drops every frame not yet started (a started one must finish to keep framing intact).
    fn discard_unstarted(&mut self) {
        let keep = if self.front_started {
            self.frames.pop_front()
        } else {
            None
        };
        self.frames = VecDeque::new();
        self.bytes = 0;
        if let Some(front) = keep {
            self.push(front);
        }
    }
}

/// The window in which a connection over its rate limit gets at most one `err`: one
/// second, the unit of `rate_limit_per_sec`. Answering every refused message would let a
/// flooding client turn its input into as much output (the refusals are still counted).
const RATE_ERR_WINDOW_MS: u32 = 1000;

/// Per-connection inbound token bucket (messages per second with a burst).
#[derive(Clone, Copy)]
struct RateLimit {
    tokens: f32,
    /// Shard clock in milliseconds, wrapping (every 49 days; only differences matter).
    refilled_ms: u32,
    /// When the last rate-limit `err` was sent (same clock).
    answered_ms: u32,
}

impl RateLimit {
    fn new(burst: u32, now_ms: u64) -> Self {
        let now_ms = now_ms as u32;
        RateLimit {
            tokens: burst as f32,
            refilled_ms: now_ms,
            answered_ms: now_ms.wrapping_sub(RATE_ERR_WINDOW_MS),
        }
    }

    /// Whether a refusal now gets an `err`: the first one of each window does.
    fn answer_refusal(&mut self, now_ms: u64) -> bool {
        let now_ms = now_ms as u32;
        if now_ms.wrapping_sub(self.answered_ms) >= RATE_ERR_WINDOW_MS {
            self.answered_ms = now_ms;
            true
        } else {
            false
        }
    }

    fn take(&mut self, now_ms: u64, per_sec: u32, burst: u32) -> bool {
        let now_ms = now_ms as u32;
        let elapsed = now_ms.wrapping_sub(self.refilled_ms);
        if elapsed > 0 {
            self.tokens =
                (self.tokens + elapsed as f32 * per_sec as f32 / 1000.0).min(burst as f32);
            self.refilled_ms = now_ms;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the shard should do with a connection after it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Nothing more to read now.
    Idle,
    /// The read budget ran out with data possibly left: read again next turn.
    More,
    /// The peer sent its close frame: answer it and close.
    PeerClosed,
    /// A close was requested (bad input, or by another part of the shard).
    CloseRequested,
    /// The peer went away (EOF).
    Eof,
    /// A socket error.
    Failed,
}

/// An upgraded connection.
pub struct Conn {
    /// Node-unique connection id (also its epoll token).
    pub id: ConnId,
    fd: OwnedFd,
    /// The user, or `None` on the dev-mode `/echo` endpoint.
    user: Option<Arc<str>>,
    publish: PublishRights,
    /// Frames the socket has not taken yet; allocated only while there are some.
    out: RefCell<Option<Box<WriteQueue>>>,
    inbound: RefCell<Inbound>,
    rate: Cell<RateLimit>,
    close: Cell<Option<(u16, metrics::Close)>>,
    peer_close: Cell<Option<Option<u16>>>,
    last_seen: Cell<u32>,
    last_ping: Cell<u32>,
    topics: RefCell<Vec<Arc<str>>>,
}

impl Conn {
    /// A connection on `fd` (already upgraded) for `identity` (`None` for `/echo`).
    pub fn new(id: ConnId, fd: OwnedFd, identity: Option<Identity>, shard: &Shard) -> Self {
        let (user, publish) = match identity {
            Some(identity) => (Some(identity.user), identity.publish),
            None => (None, PublishRights::none()),
        };
        let now = shard.clock();
        Conn {
            id,
            fd,
            user,
            publish,
            out: RefCell::default(),
            inbound: RefCell::default(),
            rate: Cell::new(RateLimit::new(
                shard.node.config.rate_limit_burst,
                shard.clock_ms(),
            )),
            close: Cell::new(None),
            peer_close: Cell::new(None),
            last_seen: Cell::new(now),
            last_ping: Cell::new(now),
            topics: RefCell::default(),
        }
    }

    /// The connection's user (`None` for `/echo`).
    pub fn user(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    /// The close code and reason requested, if any.
    pub fn close_request(&self) -> Option<(u16, metrics::Close)> {
        self.close.get()
    }

    /// Queues (or writes at once) a frame. Returns whether it was accepted; a refused frame
    /// means the connection is closing, and a slow consumer is closed here with 1008.
    pub fn push(&self, frame: &Bytes, shard: &Shard) -> bool {
        if self.close.get().is_some() {
            return false;
        }
        let metrics = &shard.metrics;
        let mut slot = self.out.borrow_mut();
        let Some(out) = slot.as_deref_mut() else {
            let mut queued = WriteQueue::default();
            match reactor::send(self.fd.as_fd(), &[IoSlice::new(frame)]) {
                Ok(n) if n == frame.len() => {}
                Ok(n) => queued.push_tail(frame.slice(n..)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => queued.push(frame.clone()),
                Err(_) => {
                    drop(slot);
                    self.request_close(close::GOING_AWAY, metrics::Close::IoError, shard);
                    return false;
                }
            }
            if !queued.frames.is_empty() {
                *slot = Some(Box::new(queued));
            }
            metrics.frames_out.inc();
            return true;
        };
        if out.bytes + frame.len() > shard.node.config.max_outbound_bytes {
            drop(slot);
            self.request_close(close::POLICY, metrics::Close::SlowConsumer, shard);
            tracing::debug!(conn = self.id, "slow consumer closed");
            return false;
        }
        out.push(frame.clone());
        metrics.frames_out.inc();
        true
    }

    /// Asks the connection to close with `code`; the first request wins. A slow consumer's
    /// queue is dropped at once; otherwise queued frames go out before the close frame.
    pub fn request_close(&self, code: u16, reason: metrics::Close, shard: &Shard) {
        if self.close.get().is_some() {
            return;
        }
        self.close.set(Some((code, reason)));
        shard.metrics.closed(reason);
        let mut slot = self.out.borrow_mut();
        let out = slot.get_or_insert_with(Box::default);
        if reason == metrics::Close::SlowConsumer {
            out.discard_unstarted();
        }
        out.push(ws::close_frame(code, reason.label()));
        drop(slot);
        shard.schedule_close(self.id);
    }

    /// Marks a connection whose socket is gone, so deliveries still holding it skip it.
    pub fn mark_gone(&self) {
        if self.close.get().is_none() {
            self.close
                .set(Some((close::GOING_AWAY, metrics::Close::Peer)));
        }
    }

    /// Answers the peer's close frame with the same code (RFC 6455 §5.5.1).
    pub fn answer_peer_close(&self) {
        if self.close.get().is_none() {
            let code = self.peer_close.get().flatten().unwrap_or(close::NORMAL);
            self.close.set(Some((code, metrics::Close::Peer)));
            self.out
                .borrow_mut()
                .get_or_insert_with(Box::default)
                .push(ws::close_frame(code, ""));
        }
    }

    /// Called by the sweeper: closes a connection whose incomplete message is older than
    /// `incomplete_message_timeout_ms`, or which sent no complete frame for three
    /// intervals; pings when an interval has passed since the last ping.
    /// `now` is the shard's clock in seconds, `now_ms` in milliseconds.
    pub fn heartbeat(&self, now: u32, now_ms: u64, interval: u32, shard: &Shard) {
        let now_ms = now_ms as u32;
        let incomplete_for = self
            .inbound
            .borrow()
            .incomplete_since()
            .map(|since| now_ms.wrapping_sub(since));
        if incomplete_for
            .is_some_and(|age| u64::from(age) >= shard.node.config.incomplete_message_timeout_ms)
        {
            tracing::debug!(conn = self.id, "incomplete message held too long");
            self.request_close(close::POLICY, metrics::Close::IncompleteTimeout, shard);
        } else if now.saturating_sub(self.last_seen.get()) >= 3 * interval {
            self.request_close(close::POLICY, metrics::Close::HeartbeatTimeout, shard);
        } else if now.saturating_sub(self.last_ping.get()) >= interval {
            self.last_ping.set(now);
            self.push(&ws::ping_frame(), shard);
        }
    }

    /// Whether subscribed to `topic`.
    pub fn has_topic(&self, topic: &str) -> bool {
        self.topics.borrow().iter().any(|t| **t == *topic)
    }

    /// Number of topics subscribed.
    pub fn topic_count(&self) -> usize {
        self.topics.borrow().len()
    }

    /// Records a subscription (the shard's tables hold the other side).
    pub fn add_topic(&self, topic: Arc<str>) {
        self.topics.borrow_mut().push(topic);
    }

    /// Forgets a subscription; `false` if there was none.
    pub fn remove_topic(&self, topic: &str) -> bool {
        let mut topics = self.topics.borrow_mut();
        match topics.iter().position(|t| **t == *topic) {
            Some(index) => {
                topics.swap_remove(index);
                true
            }
            None => false,
        }
    }

    /// Drops what is held for an incomplete message (when the connection leaves the shard's
    /// tables) and takes it off the shard's budget.
    pub fn release_incomplete(&self, shard: &Shard) {
        let held = self.inbound.borrow_mut().release();
        shard.metrics.incomplete_bytes.add(-(held as i64));
    }

    /// Takes every subscription (when the connection leaves).
    pub fn take_topics(&self) -> Vec<Arc<str>> {
        self.topics.take()
    }

    /// Writes queued frames until the socket is full. `Ok(true)` when nothing is left.
    pub fn flush(&self) -> io::Result<bool> {
        let mut slot = self.out.borrow_mut();
        let Some(out) = slot.as_deref_mut() else {
            return Ok(true);
        };
        while !out.frames.is_empty() {
            let sent = {
                let slices: SmallVec<[IoSlice<'_>; IOVECS_PER_WRITE]> = out
                    .frames
                    .iter()
                    .take(IOVECS_PER_WRITE)
                    .map(|f| IoSlice::new(f))
                    .collect();
                reactor::send(self.fd.as_fd(), &slices)
            };
            match sent {
                Ok(n) => out.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        *slot = None;
        Ok(true)
    }

    /// Half-closes the socket once our close frame is out.
    pub fn shutdown_write(&self) {
        reactor::shutdown_write(self.fd.as_fd());
    }

    /// Reads and handles what the socket has, up to `READS_PER_TURN` reads.
    pub fn read(self: &Rc<Self>, shard: &Shard) -> ReadOutcome {
        for _ in 0..READS_PER_TURN {
            let mut scratch = shard.scratch.borrow_mut();
            match reactor::recv(self.fd.as_fd(), &mut scratch[..]) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(n) => {
                    if self.on_bytes(&mut scratch[..n], shard) == Flow::Stop {
                        return self.stop_reason();
                    }
                    if n < scratch.len() {
                        return ReadOutcome::Idle;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Idle,
                Err(_) => return ReadOutcome::Failed,
            }
        }
        ReadOutcome::More
    }

    /// Reads and discards after our close frame, until EOF. `true` once the peer is done.
    pub fn read_discarding(&self, shard: &Shard) -> bool {
        for _ in 0..READS_PER_TURN {
            let mut scratch = shard.scratch.borrow_mut();
            match reactor::recv(self.fd.as_fd(), &mut scratch[..]) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
        false
    }

    fn stop_reason(&self) -> ReadOutcome {
        if self.peer_close.get().is_some() && self.close.get().is_none() {
            ReadOutcome::PeerClosed
        } else {
            ReadOutcome::CloseRequested
        }
    }

    /// Decodes freshly read bytes and handles every complete message. Only complete frames
    /// count as signs of life for the heartbeat: a peer dripping one frame a byte at a time
    /// is as silent as one sending nothing.
    pub fn on_bytes(self: &Rc<Self>, input: &mut [u8], shard: &Shard) -> Flow {
        let config = &shard.node.config;
        let limits = Limits {
            max_frame: config.max_frame_bytes,
            max_message: config.max_message_bytes,
        };
        // One clock read per read: every message of it arrived at once.
        let now_ms = shard.clock_ms();
        let mut rate = self.rate.get();
        let mut completed = false;
        let mut frames = false;
        let mut inbound = self.inbound.borrow_mut();
        let held_before = inbound.buffered();
        let fresh = inbound.incomplete_since().is_none();
        let result = inbound.feed(input, limits, |event| {
            shard.metrics.frames_in.inc();
            frames = true;
            completed |= matches!(event, Event::Text(_) | Event::Binary(_));
            match event {
                Event::Close(code) => {
                    self.peer_close.set(Some(code));
                    return Flow::Stop;
                }
                Event::Pong => {}
                Event::Ping(_) | Event::Text(_) | Event::Binary(_)
                    if !rate.take(now_ms, config.rate_limit_per_sec, config.rate_limit_burst) =>
                {
                    shard.metrics.rejected(Rejection::RateLimited);
                    let answer = !matches!(event, Event::Ping(_)) && rate.answer_refusal(now_ms);
                    if answer {
                        // Parsed only for its id, once per window at most.
                        let id = match event {
                            Event::Text(text) => match protocol::parse_request(text) {
                                Ok((id, _)) => id,
                                Err(refusal) => refusal.id,
                            },
                            _ => None,
                        };
                        let err = render::err(
                            id,
                            ErrorCode::TooMany,
                            "rate limit exceeded; further messages dropped without reply for 1 s",
                        );
                        self.push(&err, shard);
                    }
                }
                Event::Ping(payload) => {
                    self.push(&ws::frame(OpCode::Control(Control::Pong), payload), shard);
                }
                Event::Text(text) if self.user.is_none() => {
                    self.push(&ws::frame(OpCode::Data(Data::Text), text.as_bytes()), shard);
                }
                Event::Binary(bytes) if self.user.is_none() => {
                    self.push(&ws::frame(OpCode::Data(Data::Binary), bytes), shard);
                }
                Event::Binary(_) => {
                    shard.metrics.rejected(Rejection::Binary);
                    let err = render::err(
                        None,
                        ErrorCode::BadRequest,
                        "binary frames are not supported; send JSON text",
                    );
                    self.push(&err, shard);
                }
                Event::Text(text) => {
                    let reply = handle_request(shard, self, text);
                    self.push(&reply, shard);
                }
            }
            if self.close.get().is_some() {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        self.rate.set(rate);
        if frames {
            // `Shard::clock` is the same clock in seconds.
            self.last_seen.set((now_ms / 1000) as u32);
        }
        // The incomplete message's age counts from its first byte: from now if it is new
        // (nothing held before) or follows a message that just completed.
        if fresh || completed {
            inbound.set_incomplete_since(now_ms as u32);
        }
        let held = inbound.buffered();
        drop(inbound);
        if held != held_before {
            let shard_held = &shard.metrics.incomplete_bytes;
            shard_held.add(held as i64 - held_before as i64);
            if held > held_before && shard_held.get() > config.shard_incomplete_bytes as i64 {
                tracing::debug!(
                    conn = self.id,
                    held,
                    "shard's incomplete-message budget full"
                );
                self.request_close(close::POLICY, metrics::Close::IncompleteBudget, shard);
                return Flow::Stop;
            }
        }
        match result {
            Ok(flow) => flow,
            Err(violation) => {
                let reason = match violation {
                    Violation::Protocol(_) => metrics::Close::Protocol,
                    Violation::TooBig => metrics::Close::TooBig,
                    Violation::BadUtf8 => metrics::Close::BadUtf8,
                };
                tracing::debug!(conn = self.id, %violation, "closing on bad input");
                self.request_close(violation.close_code(), reason, shard);
                Flow::Stop
            }
        }
    }
}

/// A socket still in its HTTP upgrade.
pub struct Handshake {
    fd: OwnedFd,
    request: Vec<u8>,
}

/// What a handshake read came to.
pub enum HandshakeOutcome {
    /// Incomplete: wait for more.
    Pending,
    /// The peer left or the socket failed before a complete request.
    Gone,
    /// Refused with an HTTP error (already written, best effort); close the socket.
    Refused(HttpRefusal),
    /// Upgraded: the connection and the bytes the client sent after its request.
    Open(Rc<Conn>, Vec<u8>),
}

impl Handshake {
    /// A socket that has just been accepted.
    pub fn new(fd: OwnedFd) -> Self {
        Handshake {
            fd,
            request: Vec::new(),
        }
    }

    /// Reads what arrived and, once the request is complete, answers it.
    pub fn read(
        mut self: Box<Self>,
        id: ConnId,
        shard: &Shard,
    ) -> (Option<Box<Self>>, HandshakeOutcome) {
        let max = shard.node.config.max_handshake_bytes;
        let upgrade = loop {
            let len = self.request.len();
            if len >= max {
                break Err(HttpRefusal::TOO_LARGE);
            }
            self.request.resize((len * 2).clamp(1024, max), 0);
            match reactor::recv(self.fd.as_fd(), &mut self.request[len..]) {
                Ok(0) => return (None, HandshakeOutcome::Gone),
                Ok(n) => self.request.truncate(len + n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.request.truncate(len);
                    return (Some(self), HandshakeOutcome::Pending);
                }
                Err(_) => return (None, HandshakeOutcome::Gone),
            }
            match ws::parse_upgrade(&self.request, shard.node.config.dev) {
                Ok(None) => continue,
                Ok(Some(upgrade)) => break Ok(upgrade),
                Err(refusal) => break Err(refusal),
            }
        };
        let outcome = match upgrade.and_then(|upgrade| self.admit(upgrade, shard)) {
            Ok((identity, response, consumed)) => {
                if reactor::send(self.fd.as_fd(), &[IoSlice::new(&response)]).ok()
                    != Some(response.len())
                {
                    return (None, HandshakeOutcome::Gone);
                }
                let early = self.request.split_off(consumed);
                let Handshake { fd, .. } = *self;
                HandshakeOutcome::Open(Rc::new(Conn::new(id, fd, identity, shard)), early)
            }
            Err(refusal) => {
                let _ = reactor::send(self.fd.as_fd(), &[IoSlice::new(&refusal.response())]);
                HandshakeOutcome::Refused(refusal)
            }
        };
        (None, outcome)
    }

    /// Capacity and credentials, once the request parsed.
    #[allow(clippy::type_complexity)]
    fn admit(
        &self,
        upgrade: ws::Upgrade,
        shard: &Shard,
    ) -> Result<(Option<Identity>, Vec<u8>, usize), HttpRefusal> {
        if shard.over_capacity() {
            return Err(HttpRefusal::UNAVAILABLE);
        }
        let identity = match upgrade.endpoint {
            Endpoint::Echo => None,
            Endpoint::Push => Some(
                shard
                    .node
                    .auth
                    .authenticate(upgrade.token.as_deref(), upgrade.dev_user.as_deref())
                    .map_err(|e| HttpRefusal::unauthorized(e.label()))?,
            ),
        };
        Ok((identity, upgrade.response, upgrade.consumed))
    }
}

/// Handles one protocol request and returns the reply frame (`ack`, `err` or `pong`).
fn handle_request(shard: &Shard, conn: &Rc<Conn>, text: &str) -> Bytes {
    let (id, request) = match protocol::parse_request(text) {
        Ok(parsed) => parsed,
        Err(refusal) => {
            shard.metrics.rejected(if refusal.is_unknown_op() {
                Rejection::UnknownOp
            } else {
                Rejection::Malformed
            });
            return render::err(refusal.id, refusal.code, refusal.msg);
        }
    };
    let refuse = |reason: Rejection, code: ErrorCode, msg: &str| {
        shard.metrics.rejected(reason);
        render::err(id, code, msg)
    };
    let max_name = shard.node.config.max_name_bytes;
    match request {
        Request::Ping => render::pong(id),
        Request::Sub { topic } => match shard.subscribe(conn, &topic) {
            Ok(_) => render::ack(id, None),
            Err(Rejection::TooManyTopics) => refuse(
                Rejection::TooManyTopics,
                ErrorCode::TooMany,
                "too many topics on this connection",
            ),
            Err(reason) => refuse(reason, ErrorCode::BadRequest, "invalid topic name"),
        },
        Request::Unsub { topic } => match shard.unsubscribe(conn, &topic) {
            Ok(()) => render::ack(id, None),
            Err(reason) => refuse(reason, ErrorCode::NotFound, "not subscribed to this topic"),
        },
        Request::Pub { topic, data } => {
            if !valid_name(&topic, max_name) {
                return refuse(
                    Rejection::BadName,
                    ErrorCode::BadRequest,
                    "invalid topic name",
                );
            }
            if !conn.publish.allows(&topic) {
                return refuse(
                    Rejection::Forbidden,
                    ErrorCode::Forbidden,
                    "token does not allow publishing to this topic",
                );
            }
            let (mid, ts) = shard.stamp();
            let frame = render::publication(Some(&topic), mid, ts, data.get());
            tracing::debug!(mid, conn = conn.id, topic = &*topic, "client publication");
            shard.route_topic(Arc::from(&*topic), Message::new(mid, frame));
            render::ack(id, Some(mid))
        }
        Request::Send { to, data } => {
            if !valid_name(&to, max_name) {
                return refuse(Rejection::BadName, ErrorCode::BadRequest, "invalid user id");
            }
            let from = conn.user().expect("only user sessions handle requests");
            let (mid, ts) = shard.stamp();
            let frame = render::msg(Some(from), &to, mid, ts, data.get());
            tracing::debug!(mid, conn = conn.id, to = &*to, "client direct message");
            shard.route_direct(Arc::from(&*to), from, Message::new(mid, frame), conn.id);
            render::ack(id, Some(mid))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_keeps_a_started_frame_when_discarding() {
        let mut out = WriteQueue::default();
        out.push(Bytes::from_static(b"abcdef"));
        out.push(Bytes::from_static(b"ghij"));
        out.consume(2);
        assert_eq!(out.bytes, 8);
        out.discard_unstarted();
        assert_eq!(out.frames.len(), 1);
        assert_eq!(&out.frames[0][..], b"cdef");
        assert_eq!(out.bytes, 4);
        out.consume(4);
        out.push(Bytes::from_static(b"x"));
        out.discard_unstarted();
        assert!(out.frames.is_empty(), "an unstarted frame is dropped");
    }

    #[test]
    fn consume_spans_frames() {
        let mut out = WriteQueue::default();
        for _ in 0..32 {
            out.push(Bytes::from_static(b"0123456789"));
        }
        out.consume(315);
        assert_eq!(out.frames.len(), 1);
        assert_eq!(&out.frames[0][..], b"56789");
        out.consume(5);
        assert_eq!(out.bytes, 0);
        assert!(out.frames.is_empty());
    }

    #[test]
    fn an_idle_connection_stays_small() {
        // Every byte here is paid once per connection: a million connections, a megabyte
        // per byte. Grow it only on purpose.
        assert!(
            std::mem::size_of::<Conn>() <= 160,
            "{}",
            std::mem::size_of::<Conn>()
        );
        assert_eq!(std::mem::size_of::<Inbound>(), 8);
    }

    #[test]
    fn rate_limit_answers_one_refusal_per_window() {
        let mut rate = RateLimit::new(1, 5_000);
        assert!(rate.answer_refusal(5_000), "the first refusal is answered");
        assert!(!rate.answer_refusal(5_001));
        assert!(!rate.answer_refusal(5_999));
        assert!(rate.answer_refusal(6_000), "one per window");
        assert!(!rate.answer_refusal(6_500));
        let mut wrapped = RateLimit::new(1, u64::from(u32::MAX) - 10);
        assert!(wrapped.answer_refusal(u64::from(u32::MAX) - 10));
        assert!(!wrapped.answer_refusal(u64::from(u32::MAX) + 100));
        assert!(wrapped.answer_refusal(u64::from(u32::MAX) + 1000));
    }

    #[test]
    fn rate_limit_refills_over_time() {
        let mut rate = RateLimit::new(2, 0);
        assert!(rate.take(0, 10, 2));
        assert!(rate.take(0, 10, 2));
        assert!(!rate.take(0, 10, 2));
        assert!(rate.take(100, 10, 2), "10/s refills one token per 100 ms");
        assert!(!rate.take(100, 10, 2));
        assert!(rate.take(10_000, 10, 2));
        assert!(rate.take(10_000, 10, 2));
        assert!(!rate.take(10_000, 10, 2), "never more than the burst");
    }
}
