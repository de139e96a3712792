//! One client connection's I/O: the upgrade, WebSocket framing, the write queue, the
//! inbound rate limit, the heartbeat, and the close.
//!
//! Connections are not tasks. The shard's event loop ([`crate::shard`]) calls into this
//! module when a socket is ready; everything here is synchronous and non-blocking. This
//! module knows nothing of routing: complete text messages are handed to the caller's
//! request handler (the shard's core), and a close asked for here is reported back (a
//! `false` from [`Conn::push`], [`ReadOutcome::CloseRequested`], [`Conn::heartbeat`]'s
//! answer) for the shard to take the connection out of its tables.
//!
//! # Memory
//! An open connection is one [`Conn`] (80 bytes; with what the shard's core keeps of it,
//! 192) plus its entries in the shard's
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
//! `sendmsg` when epoll reports the socket writable again (it watches a socket's output only
//! from the first write the socket did not take: see [`crate::reactor`]). The upgrade's `101`
//! goes out with the `hello` in one `sendmsg` when the hello is ready in the same turn
//! ([`Conn::upgrade`]). A queue over `max_outbound_bytes`
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
//!
//! # Admission
//! [`Admission`] counts the node's client sockets against the effective `max_connections`
//! and holds the draining flag: a handshake completing while the node is full or stopping
//! is answered 503.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::{Buf, Bytes};
use smallvec::SmallVec;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use crate::auth::{AuthError, Authenticator, Identity};
use crate::config::{Config, REFUSAL_SLOTS};
use crate::metrics::{self, Rejection, ShardMetrics};
use crate::protocol::{self, render, ErrorCode};
use crate::reactor::{self, Reactor};
use crate::router::ConnId;
use crate::ws::{self, close, Endpoint, Event, Flow, HttpRefusal, Inbound, Limits, Violation};

/// What a connection's I/O needs from its shard: the settings and the metrics to count on.
#[derive(Clone, Copy)]
pub(crate) struct Env<'a> {
    pub(crate) config: &'a Config,
    pub(crate) metrics: &'a ShardMetrics,
    /// The shard's epoll set, which watches a socket's output while it has queued bytes.
    pub(crate) reactor: &'a Reactor,
}

/// The node's client sockets against its connection limit, and whether it is draining.
#[derive(Debug)]
pub(crate) struct Admission {
    /// Sockets past `accept`, upgraded or still handshaking (the `max_connections` count).
    sockets: AtomicUsize,
    /// The effective `max_connections` (see [`Config::connection_limit`]).
    max: usize,
    /// Set once the node is stopping: new handshakes get 503.
    draining: AtomicBool,
}

impl Admission {
    /// No sockets yet, at most `max` served.
    pub(crate) fn new(max: usize) -> Self {
        Admission {
            sockets: AtomicUsize::new(0),
            max,
            draining: AtomicBool::new(false),
        }
    }

    /// The effective `max_connections`.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// A socket was accepted.
    pub(crate) fn enter(&self) {
        self.sockets.fetch_add(1, Ordering::Relaxed);
    }

    /// A counted socket was closed.
    pub(crate) fn leave(&self) {
        self.sockets.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether a socket just accepted is past even the refusal slots, so it is answered
    /// 503 at once instead of being read (see [`crate::shard`]'s descriptor notes).
    pub(crate) fn refuse_at_accept(&self) -> bool {
        self.sockets.load(Ordering::Relaxed) >= self.max.saturating_add(REFUSAL_SLOTS)
    }

    /// Whether a completed handshake must be refused with 503: the node is full or
    /// draining (the socket asking is already counted).
    pub(crate) fn refuse_handshake(&self) -> bool {
        self.draining() || self.sockets.load(Ordering::Relaxed) > self.max
    }

    /// Whether the node is stopping.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts draining; `false` if it had already started.
    pub(crate) fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::SeqCst)
    }
}

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
    /// The socket is watched for output (see [`crate::reactor`]).
    watched: bool,
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

/// A connection's signs of life at one heartbeat sweep. Times are the shard's clock:
/// milliseconds for `now_ms`, seconds for the last complete frame and the last ping, and
/// wrapping milliseconds for the first byte of an incomplete message.
struct Pulse {
    now_ms: u64,
    last_seen: u32,
    last_ping: u32,
    incomplete_since: Option<u32>,
}

/// What the heartbeat sweep does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Quiet,
    Ping,
    Close(metrics::Close),
}

impl Pulse {
    /// Close a connection holding an incomplete message longer than
    /// `incomplete_message_timeout_ms`, or silent (no complete frame) for three heartbeat
    /// intervals; ping one an interval after the last ping.
    fn verdict(&self, config: &Config) -> Verdict {
        let now = (self.now_ms / 1000) as u32;
        let interval = config.heartbeat_secs;
        let incomplete_for = self
            .incomplete_since
            .map(|since| (self.now_ms as u32).wrapping_sub(since));
        if incomplete_for.is_some_and(|age| u64::from(age) >= config.incomplete_message_timeout_ms)
        {
            Verdict::Close(metrics::Close::IncompleteTimeout)
        } else if now.saturating_sub(self.last_seen) >= 3 * interval {
            Verdict::Close(metrics::Close::HeartbeatTimeout)
        } else if now.saturating_sub(self.last_ping) >= interval {
            Verdict::Ping
        } else {
            Verdict::Quiet
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
pub(crate) struct Conn {
    /// Node-unique connection id (also its epoll token).
    pub(crate) id: ConnId,
    fd: OwnedFd,
    /// On the dev-mode `/echo` endpoint: messages are echoed, not handled as requests.
    echo: bool,
    /// Frames the socket has not taken yet; allocated only while there are some.
    out: RefCell<Option<Box<WriteQueue>>>,
    inbound: RefCell<Inbound>,
    rate: Cell<RateLimit>,
    close: Cell<Option<(u16, metrics::Close)>>,
    peer_close: Cell<Option<Option<u16>>>,
    /// Shard clock, seconds: the last complete frame, and the last ping sent.
    last_seen: Cell<u32>,
    last_ping: Cell<u32>,
}

/// What became of a frame pushed to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Written or queued.
    Accepted,
    /// Refused: the connection was already closing.
    Refused,
    /// Refused, and the connection is now closing because of it (slow consumer, socket
    /// error): the shard must take it out of its tables.
    Closed,
}

impl Conn {
    /// A connection on `fd` (already upgraded; `echo` on `/echo`), opened at shard time
    /// `now_ms`.
    pub(crate) fn new(id: ConnId, fd: OwnedFd, echo: bool, env: Env<'_>, now_ms: u64) -> Self {
        let now = (now_ms / 1000) as u32;
        Conn {
            id,
            fd,
            echo,
            out: RefCell::default(),
            inbound: RefCell::default(),
            rate: Cell::new(RateLimit::new(env.config.rate_limit_burst, now_ms)),
            close: Cell::new(None),
            peer_close: Cell::new(None),
            last_seen: Cell::new(now),
            last_ping: Cell::new(now),
        }
    }

    /// The close code and reason requested, if any.
    pub(crate) fn close_request(&self) -> Option<(u16, metrics::Close)> {
        self.close.get()
    }

    /// Writes a frame at once, or queues what the socket does not take. A slow consumer is
    /// closed here with 1008, a failed socket with 1001.
    pub(crate) fn push(&self, frame: &Bytes, env: Env<'_>) -> Pushed {
        if self.close.get().is_some() {
            return Pushed::Refused;
        }
        let mut slot = self.out.borrow_mut();
        if let Some(out) = slot.as_deref_mut() {
            if out.bytes + frame.len() > env.config.max_outbound_bytes {
                drop(slot);
                self.request_close(close::POLICY, metrics::Close::SlowConsumer, env);
                tracing::debug!(conn = self.id, "slow consumer closed");
                return Pushed::Closed;
            }
            out.push(frame.clone());
            env.metrics.frames_out.inc();
            return Pushed::Accepted;
        }
        drop(slot);
        let Ok(written) = self.write_now(&[IoSlice::new(frame)]) else {
            return self.close_failed(env);
        };
        let mut unsent = WriteQueue::default();
        if written == 0 {
            unsent.push(frame.clone());
        } else if written < frame.len() {
            unsent.push_tail(frame.slice(written..));
        }
        let pushed = self.keep_unsent(unsent, env);
        if pushed == Pushed::Accepted {
            env.metrics.frames_out.inc();
        }
        pushed
    }

    /// Writes the `101` that upgrades the connection and, when it has one already, its
    /// `hello`, in one `sendmsg`; queues what the socket does not take. The `101` counts as
    /// started: a slow consumer's discard keeps it, so the close frame after it is framed.
    pub(crate) fn upgrade(&self, response: &[u8], hello: Option<&Bytes>, env: Env<'_>) -> Pushed {
        debug_assert!(
            self.out.borrow().is_none(),
            "the 101 is a connection's first write"
        );
        let hello_bytes = hello.map_or(&[][..], |hello| &hello[..]);
        let slices = [IoSlice::new(response), IoSlice::new(hello_bytes)];
        let Ok(written) = self.write_now(&slices) else {
            return self.close_failed(env);
        };
        let mut unsent = WriteQueue::default();
        if written < response.len() {
            unsent.push_tail(Bytes::copy_from_slice(&response[written..]));
            if let Some(hello) = hello {
                unsent.push(hello.clone());
            }
        } else if let Some(hello) = hello.filter(|hello| written - response.len() < hello.len()) {
            unsent.push_tail(hello.slice(written - response.len()..));
        }
        let pushed = self.keep_unsent(unsent, env);
        if pushed == Pushed::Accepted && hello.is_some() {
            env.metrics.frames_out.inc();
        }
        pushed
    }

    /// Writes `slices` now, as far as the socket takes them: the bytes written, 0 if it
    /// takes none now.
    fn write_now(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match reactor::sendmsg(self.fd.as_fd(), slices) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            written => written,
        }
    }

    /// Keeps what a write to an empty queue left unsent, and has epoll report when the
    /// socket takes more.
    fn keep_unsent(&self, mut unsent: WriteQueue, env: Env<'_>) -> Pushed {
        if !unsent.frames.is_empty() {
            if self.watch_output(&mut unsent, env).is_err() {
                return self.close_failed(env);
            }
            *self.out.borrow_mut() = Some(Box::new(unsent));
        }
        Pushed::Accepted
    }

    /// The socket failed: the connection closes with 1001.
    fn close_failed(&self, env: Env<'_>) -> Pushed {
        self.request_close(close::GOING_AWAY, metrics::Close::IoError, env);
        Pushed::Closed
    }

    /// Asks the connection to close with `code`; the first request wins (`true` if this
    /// was it: the shard must then take the connection out of its tables). A slow
    /// consumer's queue is dropped at once; otherwise queued frames go out before the close
    /// frame.
    pub(crate) fn request_close(&self, code: u16, reason: metrics::Close, env: Env<'_>) -> bool {
        if self.close.get().is_some() {
            return false;
        }
        self.close.set(Some((code, reason)));
        env.metrics.closed(reason);
        let mut slot = self.out.borrow_mut();
        let out = slot.get_or_insert_with(Box::default);
        if reason == metrics::Close::SlowConsumer {
            out.discard_unstarted();
        }
        out.push(ws::close_frame(code, reason.label()));
        true
    }

    /// Marks a connection whose socket is gone, so deliveries still holding it skip it.
    pub(crate) fn mark_gone(&self) {
        if self.close.get().is_none() {
            self.close
                .set(Some((close::GOING_AWAY, metrics::Close::Peer)));
        }
    }

    /// Answers the peer's close frame with the same code (RFC 6455 §5.5.1).
    pub(crate) fn answer_peer_close(&self) {
        if self.close.get().is_none() {
            let code = self.peer_close.get().flatten().unwrap_or(close::NORMAL);
            self.close.set(Some((code, metrics::Close::Peer)));
            self.out
                .borrow_mut()
                .get_or_insert_with(Box::default)
                .push(ws::close_frame(code, ""));
        }
    }

    /// Called by the sweeper at shard time `now_ms`: closes a connection whose incomplete
    /// message is older than `incomplete_message_timeout_ms`, or which sent no complete
    /// frame for three heartbeat intervals; pings when an interval has passed since the
    /// last ping. Returns whether the connection is now closing because of it.
    pub(crate) fn heartbeat(&self, now_ms: u64, env: Env<'_>) -> bool {
        let pulse = Pulse {
            now_ms,
            last_seen: self.last_seen.get(),
            last_ping: self.last_ping.get(),
            incomplete_since: self.inbound.borrow().incomplete_since(),
        };
        match pulse.verdict(env.config) {
            Verdict::Quiet => false,
            Verdict::Ping => {
                self.last_ping.set((now_ms / 1000) as u32);
                self.push(&ws::ping_frame(), env) == Pushed::Closed
            }
            Verdict::Close(reason) => {
                tracing::debug!(
                    conn = self.id,
                    reason = reason.label(),
                    "closing a silent connection"
                );
                self.request_close(close::POLICY, reason, env)
            }
        }
    }

    /// Drops what is held for an incomplete message (when the connection leaves the shard's
    /// tables) and takes it off the shard's budget.
    pub(crate) fn release_incomplete(&self, env: Env<'_>) {
        let held = self.inbound.borrow_mut().release();
        env.metrics.incomplete_bytes.add(-(held as i64));
    }

    /// Has epoll report the socket writable: `out` holds bytes it did not take.
    fn watch_output(&self, out: &mut WriteQueue, env: Env<'_>) -> io::Result<()> {
        if !out.watched {
            env.reactor.watch_output(self.fd.as_fd(), self.id)?;
            out.watched = true;
        }
        Ok(())
    }

    /// Writes queued frames until the socket is full. `Ok(true)` when nothing is left.
    pub(crate) fn flush(&self, env: Env<'_>) -> io::Result<bool> {
        let mut slot = self.out.borrow_mut();
        let Some(out) = slot.as_deref_mut() else {
            return Ok(true);
        };
        while !out.frames.is_empty() {
            let written = {
                let slices: SmallVec<[IoSlice<'_>; IOVECS_PER_WRITE]> = out
                    .frames
                    .iter()
                    .take(IOVECS_PER_WRITE)
                    .map(|f| IoSlice::new(f))
                    .collect();
                self.write_now(&slices)?
            };
            if written == 0 {
                self.watch_output(out, env)?;
                return Ok(false);
            }
            out.consume(written);
        }
        *slot = None;
        Ok(true)
    }

    /// Half-closes the socket once our close frame is out.
    pub(crate) fn shutdown_write(&self) {
        reactor::shutdown_write(self.fd.as_fd());
    }

    /// Reads and handles what the socket has, up to `READS_PER_TURN` reads through the
    /// shard's `scratch` buffer, at shard time `now_ms`; every complete text message of a
    /// user session goes to `requests`, whose answer frame (if it has one now) is written
    /// back.
    pub(crate) fn read(
        &self,
        scratch: &mut [u8],
        env: Env<'_>,
        now_ms: u64,
        requests: &mut dyn FnMut(&str) -> Option<Bytes>,
    ) -> ReadOutcome {
        for _ in 0..READS_PER_TURN {
            match reactor::recv(self.fd.as_fd(), scratch) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(n) => {
                    if self.on_bytes(&mut scratch[..n], env, now_ms, requests) == Flow::Stop {
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
    pub(crate) fn read_discarding(&self, scratch: &mut [u8]) -> bool {
        for _ in 0..READS_PER_TURN {
            match reactor::recv(self.fd.as_fd(), scratch) {
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

    /// Decodes freshly read bytes (arrived at shard time `now_ms`) and handles every
    /// complete message. Only complete frames count as signs of life for the heartbeat: a
    /// peer dripping one frame a byte at a time is as silent as one sending nothing.
    pub(crate) fn on_bytes(
        &self,
        input: &mut [u8],
        env: Env<'_>,
        now_ms: u64,
        requests: &mut dyn FnMut(&str) -> Option<Bytes>,
    ) -> Flow {
        let config = env.config;
        let metrics = env.metrics;
        let limits = Limits {
            max_frame: config.max_frame_bytes,
            max_message: config.max_message_bytes,
        };
        let mut rate = self.rate.get();
        let mut completed = false;
        let mut frames = false;
        let mut inbound = self.inbound.borrow_mut();
        let held_before = inbound.buffered();
        let fresh = inbound.incomplete_since().is_none();
        let result = inbound.feed(input, limits, |event| {
            metrics.frames_in.inc();
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
                    metrics.rejected(Rejection::RateLimited);
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
                        self.push(&err, env);
                    }
                }
                Event::Ping(payload) => {
                    self.push(&ws::frame(OpCode::Control(Control::Pong), payload), env);
                }
                Event::Text(text) if self.echo => {
                    self.push(&ws::frame(OpCode::Data(Data::Text), text.as_bytes()), env);
                }
                Event::Binary(bytes) if self.echo => {
                    self.push(&ws::frame(OpCode::Data(Data::Binary), bytes), env);
                }
                Event::Binary(_) => {
                    metrics.rejected(Rejection::Binary);
                    let err = render::err(
                        None,
                        ErrorCode::BadRequest,
                        "binary frames are not supported; send JSON text",
                    );
                    self.push(&err, env);
                }
                Event::Text(text) => {
                    if let Some(reply) = requests(text) {
                        self.push(&reply, env);
                    }
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
            // The heartbeat's clock is the same, in seconds.
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
            let shard_held = &metrics.incomplete_bytes;
            shard_held.add(held as i64 - held_before as i64);
            if held > held_before && shard_held.get() > config.shard_incomplete_bytes as i64 {
                tracing::debug!(
                    conn = self.id,
                    held,
                    "shard's incomplete-message budget full"
                );
                self.request_close(close::POLICY, metrics::Close::IncompleteBudget, env);
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
                self.request_close(violation.close_code(), reason, env);
                Flow::Stop
            }
        }
    }
}

/// A socket still in its HTTP upgrade.
pub(crate) struct Handshake {
    fd: OwnedFd,
    request: Vec<u8>,
}

/// What a handshake read came to.
pub(crate) enum HandshakeOutcome {
    /// Incomplete: wait for more.
    Pending,
    /// The peer left or the socket failed before a complete request.
    Gone,
    /// Refused (the answer is written, best effort): with an HTTP error, or, for credentials
    /// refused to a client that offered `shardcast.v1`, with an upgrade and a close frame
    /// 4401/4402 (a page can read those; an HTTP 401 it cannot). Close the socket.
    Refused(HttpRefusal),
    /// Upgraded: the 101 is for the shard to write, with the `hello` when it has one (one
    /// `sendmsg` and one TCP segment for both).
    Open(Upgraded),
    /// A `--dev` node's demo page or SDK was served (see [`crate::demo`]); close the socket.
    Served,
}

/// A socket that has just been upgraded.
pub(crate) struct Upgraded {
    pub(crate) fd: OwnedFd,
    /// Who it authenticated as (`None` for `/echo`).
    pub(crate) identity: Option<Identity>,
    /// The `101 Switching Protocols` answer, not written yet.
    pub(crate) response: Vec<u8>,
    /// What the client sent after its request.
    pub(crate) early: Vec<u8>,
    /// The last read was short: the socket had nothing more then, and what arrives later
    /// raises a new (edge-triggered) event, so serving needs no read before it.
    pub(crate) drained: bool,
}

/// What a handshake is checked against.
pub(crate) struct Gate<'a> {
    pub(crate) config: &'a Config,
    pub(crate) auth: &'a Authenticator,
    pub(crate) admission: &'a Admission,
}

impl Handshake {
    /// A socket that has just been accepted.
    pub(crate) fn new(fd: OwnedFd) -> Self {
        Handshake {
            fd,
            request: Vec::new(),
        }
    }

    /// Reads what arrived and, once the request is complete, answers it.
    pub(crate) fn read(
        mut self: Box<Self>,
        gate: &Gate<'_>,
    ) -> (Option<Box<Self>>, HandshakeOutcome) {
        let max = gate.config.max_handshake_bytes;
        let mut drained = false;
        let upgrade = loop {
            let len = self.request.len();
            if len >= max {
                break Err(HttpRefusal::TOO_LARGE);
            }
            self.request.resize((len * 2).clamp(1024, max), 0);
            match reactor::recv(self.fd.as_fd(), &mut self.request[len..]) {
                Ok(0) => return (None, HandshakeOutcome::Gone),
                Ok(n) => {
                    drained = len + n < self.request.len();
                    self.request.truncate(len + n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.request.truncate(len);
                    return (Some(self), HandshakeOutcome::Pending);
                }
                Err(_) => return (None, HandshakeOutcome::Gone),
            }
            match ws::parse_upgrade(&self.request, gate.config.dev) {
                Ok(None) if drained => {
                    return (Some(self), HandshakeOutcome::Pending);
                }
                Ok(None) => continue,
                Ok(Some(upgrade)) => break Ok(upgrade),
                Err(refusal) => {
                    // A --dev node serves its demo page to plain GETs of it.
                    let page = gate
                        .config
                        .dev
                        .then(|| crate::demo::response(&self.request));
                    if let Some(page) = page.flatten() {
                        let _ = reactor::sendmsg(self.fd.as_fd(), &[IoSlice::new(&page)]);
                        reactor::shutdown_write(self.fd.as_fd());
                        return (None, HandshakeOutcome::Served);
                    }
                    break Err(refusal);
                }
            }
        };
        let admitted = upgrade
            .map_err(Denial::Http)
            .and_then(|upgrade| admit(upgrade, gate));
        let outcome = match admitted {
            Ok((identity, response, consumed)) => {
                let early = self.request.split_off(consumed);
                let Handshake { fd, .. } = *self;
                HandshakeOutcome::Open(Upgraded {
                    fd,
                    identity,
                    response,
                    early,
                    drained,
                })
            }
            Err(Denial::Http(refusal)) => {
                let _ = reactor::sendmsg(self.fd.as_fd(), &[IoSlice::new(&refusal.response())]);
                HandshakeOutcome::Refused(refusal)
            }
            Err(Denial::Close { response, error }) => {
                let (code, reason) = match error {
                    AuthError::Expired => (close::TOKEN_EXPIRED, "token_expired"),
                    _ => (close::UNAUTHORIZED, "unauthorized"),
                };
                let frame = ws::close_frame(code, reason);
                let answer = [IoSlice::new(&response), IoSlice::new(&frame)];
                let _ = reactor::sendmsg(self.fd.as_fd(), &answer);
                reactor::shutdown_write(self.fd.as_fd());
                HandshakeOutcome::Refused(HttpRefusal::unauthorized(error.label()))
            }
        };
        (None, outcome)
    }
}

/// How a handshake is refused.
enum Denial {
    /// With an HTTP status.
    Http(HttpRefusal),
    /// Credentials refused to a `shardcast.v1` client: upgrade with `response`, then close.
    Close { response: Vec<u8>, error: AuthError },
}

/// Capacity and credentials, once the request parsed.
#[allow(clippy::type_complexity)]
fn admit(
    upgrade: ws::Upgrade,
    gate: &Gate<'_>,
) -> Result<(Option<Identity>, Vec<u8>, usize), Denial> {
    if gate.admission.refuse_handshake() {
        return Err(Denial::Http(HttpRefusal::UNAVAILABLE));
    }
    let identity = match upgrade.endpoint {
        Endpoint::Echo => None,
        Endpoint::Push => {
            let token = upgrade.token.as_deref();
            match gate.auth.authenticate(token, upgrade.dev_user.as_deref()) {
                Ok(identity) => Some(identity),
                Err(error) if upgrade.subprotocol => {
                    return Err(Denial::Close {
                        response: upgrade.response,
                        error,
                    })
                }
                Err(error) => return Err(Denial::Http(HttpRefusal::unauthorized(error.label()))),
            }
        }
    };
    Ok((identity, upgrade.response, upgrade.consumed))
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
    fn an_upgrade_the_socket_cannot_take_is_queued_in_order() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;

        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let config = Config::default();
        let metrics = ShardMetrics::default();
        let reactor = Reactor::new().unwrap();
        let env = Env {
            config: &config,
            metrics: &metrics,
            reactor: &reactor,
        };
        // Fill the socket so the upgrade's sendmsg takes nothing.
        let mut backlog = 0;
        while let Ok(n) = reactor::sendmsg(ours.as_fd(), &[IoSlice::new(&[7; 4096])]) {
            backlog += n;
        }
        reactor.add_socket(ours.as_fd(), 1).unwrap();
        let conn = Conn::new(1, OwnedFd::from(ours), false, env, 0);
        let hello = Bytes::from_static(b"HELLO");
        assert_eq!(conn.upgrade(b"101", Some(&hello), env), Pushed::Accepted);
        conn.request_close(close::POLICY, metrics::Close::SlowConsumer, env);
        let mut received = Vec::new();
        let mut chunk = [0; 8192];
        for _ in 0..10_000 {
            if conn.flush(env).unwrap() {
                break;
            }
            let n = theirs.read(&mut chunk).unwrap();
            received.extend_from_slice(&chunk[..n]);
        }
        drop(conn);
        theirs.read_to_end(&mut received).unwrap();
        assert_eq!(received[..backlog], vec![7; backlog][..]);
        let rest = &received[backlog..];
        assert!(
            rest.starts_with(b"101\x88"),
            "the 101 survives a slow consumer's discard, the hello does not: {rest:?}"
        );
    }

    #[test]
    fn an_idle_connection_stays_small() {
        // Every byte here is paid once per connection: a million connections, a megabyte
        // per byte. Grow it only on purpose.
        assert!(
            std::mem::size_of::<Conn>() <= 80,
            "{}",
            std::mem::size_of::<Conn>()
        );
        assert_eq!(std::mem::size_of::<Inbound>(), 8);
    }

    #[test]
    fn heartbeat_pings_each_interval_and_closes_the_silent_and_the_stuck() {
        let config = Config {
            heartbeat_secs: 10,
            incomplete_message_timeout_ms: 5_000,
            ..Config::default()
        };
        let at = |now_ms: u64, last_seen: u32, last_ping: u32, incomplete_since| {
            Pulse {
                now_ms,
                last_seen,
                last_ping,
                incomplete_since,
            }
            .verdict(&config)
        };
        assert_eq!(at(9_999, 0, 0, None), Verdict::Quiet);
        assert_eq!(at(10_000, 0, 0, None), Verdict::Ping);
        assert_eq!(at(19_999, 0, 10, None), Verdict::Quiet, "pinged at 10 s");
        assert_eq!(at(20_000, 15, 10, None), Verdict::Ping);
        assert_eq!(
            at(30_000, 0, 20, None),
            Verdict::Close(metrics::Close::HeartbeatTimeout),
            "nothing complete for three intervals"
        );
        assert_eq!(
            at(12_000, 12, 10, Some(8_000)),
            Verdict::Quiet,
            "4 s incomplete"
        );
        assert_eq!(
            at(13_000, 12, 10, Some(8_000)),
            Verdict::Close(metrics::Close::IncompleteTimeout)
        );
        // The millisecond clock of incomplete messages wraps; only differences count.
        let wrapped = u64::from(u32::MAX) + 3_000;
        assert_eq!(
            at(wrapped, 4_294_967, 4_294_967, Some(u32::MAX - 1_000)),
            Verdict::Quiet
        );
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
