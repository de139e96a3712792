//! One client connection: the upgrade, the protocol v1 session, and the close.
//!
//! # Memory
//! A connection is a task (this module's [`serve`] future), a glommio `TcpStream` whose
//! pending read is a readiness poll (no buffer: glommio's non-buffered stream reads with a
//! plain `recv` into the buffer it is given, which is the shard's scratch buffer), and a
//! [`Conn`] shared with the shard's tables. Between messages nothing else is held: the
//! decoder keeps only an incomplete frame and the outbound queue is an empty `VecDeque`.
//!
//! # Writes
//! [`Conn::push`] writes through: when nothing is queued it `send`s the frame at once with
//! `MSG_DONTWAIT`, from whichever task is delivering, so a fan-out costs one syscall per
//! recipient and no task switch. Only what the socket does not take is queued, as shared
//! [`Bytes`] (never copied), and the connection's own task flushes it with `sendmsg` once the
//! socket is writable again. A queue over `max_outbound_bytes` marks a slow consumer: its
//! frames are dropped at once (memory released) and it is closed with 1008.
//!
//! # Close
//! A close requested by anyone (slow consumer, device limit, kick, shutdown, heartbeat, bad
//! input) is a flag plus a queued close frame; the connection's task notices it, leaves the
//! tables, flushes for at most `close_timeout_ms`, half-closes and waits for the peer to
//! finish, so a client reads every frame that was sent before the close frame.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use smallvec::SmallVec;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use crate::auth::{valid_name, Identity, PublishRights};
use crate::metrics::{self, Refusal, Rejection, ShardMetrics};
use crate::protocol::{self, render, ErrorCode, Request};
use crate::router::ConnId;
use crate::shard::Shard;
use crate::ws::{self, close, Endpoint, Event, Flow, HttpRefusal, Inbound, Limits, Violation};

/// Reads per task turn before a busy connection yields to the rest of the shard.
const READS_PER_TURN: usize = 16;

/// Frames per `sendmsg` call when flushing a queue.
const IOVECS_PER_WRITE: usize = 64;

/// A queue keeps at most this many slots of capacity once it drains.
const IDLE_QUEUE_CAPACITY: usize = 4;

/// Frames waiting for the socket.
#[derive(Default)]
struct Outbound {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// The front frame is partly written: dropping it would corrupt the stream.
    front_started: bool,
}

impl Outbound {
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
        if self.frames.is_empty() && self.frames.capacity() > IDLE_QUEUE_CAPACITY {
            self.frames = VecDeque::new();
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

/// The part of a connection the shard's tables and other tasks see.
pub struct Conn {
    /// Node-unique connection id.
    pub id: ConnId,
    /// The user, or `None` on the dev-mode `/echo` endpoint.
    user: Option<Arc<str>>,
    publish: PublishRights,
    fd: RawFd,
    out: RefCell<Outbound>,
    waker: Cell<Option<Waker>>,
    close: Cell<Option<(u16, metrics::Close)>>,
    last_seen: Cell<u32>,
    last_ping: Cell<u32>,
    topics: RefCell<Vec<Arc<str>>>,
}

impl Conn {
    fn new(id: ConnId, identity: Option<Identity>, fd: RawFd, now: u32) -> Self {
        let (user, publish) = match identity {
            Some(identity) => (Some(identity.user), identity.publish),
            None => (None, PublishRights::none()),
        };
        Conn {
            id,
            user,
            publish,
            fd,
            out: RefCell::default(),
            waker: Cell::new(None),
            close: Cell::new(None),
            last_seen: Cell::new(now),
            last_ping: Cell::new(now),
            topics: RefCell::default(),
        }
    }

    /// The connection's user (`None` for `/echo`).
    pub fn user(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    /// Queues (or writes at once) a frame. Returns whether it was accepted; a refused frame
    /// means the connection is closing, and a slow consumer is closed here with 1008.
    pub fn push(&self, frame: &Bytes, limit: usize, metrics: &ShardMetrics) -> bool {
        if self.close_requested() {
            return false;
        }
        let mut out = self.out.borrow_mut();
        if out.frames.is_empty() {
            match send_nonblocking(self.fd, &[IoSlice::new(frame)]) {
                Ok(n) if n == frame.len() => {
                    metrics.frames_out.inc();
                    return true;
                }
                Ok(n) => out.push_tail(frame.slice(n..)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => out.push(frame.clone()),
                Err(_) => {
                    drop(out);
                    self.request_close(close::GOING_AWAY, metrics::Close::IoError);
                    return false;
                }
            }
            drop(out);
            self.wake();
            metrics.frames_out.inc();
            return true;
        }
        if out.bytes + frame.len() > limit {
            drop(out);
            self.request_close(close::POLICY, metrics::Close::SlowConsumer);
            metrics.closed(metrics::Close::SlowConsumer);
            tracing::debug!(conn = self.id, "slow consumer closed");
            return false;
        }
        out.push(frame.clone());
        metrics.frames_out.inc();
        true
    }

    /// Asks the connection to close with `code`. The first request wins. A slow consumer's
    /// queue is dropped at once; otherwise queued frames go out before the close frame.
    pub fn request_close(&self, code: u16, reason: metrics::Close) {
        if self.close_requested() {
            return;
        }
        self.close.set(Some((code, reason)));
        let mut out = self.out.borrow_mut();
        if reason == metrics::Close::SlowConsumer {
            out.discard_unstarted();
        }
        out.push(ws::close_frame(code, reason.label()));
        drop(out);
        self.wake();
    }

    fn close_requested(&self) -> bool {
        self.close.get().is_some()
    }

    fn wake(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake_by_ref();
            self.waker.set(Some(waker));
        }
    }

    fn set_waker(&self, waker: &Waker) {
        let current = self.waker.take();
        match current {
            Some(w) if w.will_wake(waker) => self.waker.set(Some(w)),
            _ => self.waker.set(Some(waker.clone())),
        }
    }

    /// Called by the sweeper: pings when an interval has passed since the last ping, closes
    /// when nothing arrived for three intervals.
    pub fn heartbeat(&self, now: u32, interval: u32, limit: usize, metrics: &ShardMetrics) {
        if now.saturating_sub(self.last_seen.get()) >= 3 * interval {
            self.request_close(close::POLICY, metrics::Close::HeartbeatTimeout);
            metrics.closed(metrics::Close::HeartbeatTimeout);
        } else if now.saturating_sub(self.last_ping.get()) >= interval {
            self.last_ping.set(now);
            self.push(&ws::ping_frame(), limit, metrics);
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

    /// Takes every subscription (when the connection leaves).
    pub fn take_topics(&self) -> Vec<Arc<str>> {
        self.topics.take()
    }

    /// Flushes queued frames; registers for writability when the socket is full.
    fn poll_flush(&self, stream: &mut TcpStream, cx: &mut Context<'_>) -> io::Result<()> {
        let mut out = self.out.borrow_mut();
        while !out.frames.is_empty() {
            let sent = {
                let slices: SmallVec<[IoSlice<'_>; IOVECS_PER_WRITE]> = out
                    .frames
                    .iter()
                    .take(IOVECS_PER_WRITE)
                    .map(|f| IoSlice::new(f))
                    .collect();
                send_nonblocking(self.fd, &slices)
            };
            let written = match sent {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let front = out.frames.front().expect("not empty").clone();
                    match Pin::new(&mut *stream).poll_write(cx, &front) {
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            };
            out.consume(written);
        }
        Ok(())
    }

    fn is_flushed(&self) -> bool {
        self.out.borrow().frames.is_empty()
    }
}

/// `sendmsg` with `MSG_DONTWAIT | MSG_NOSIGNAL`: never blocks, never raises SIGPIPE.
fn send_nonblocking(fd: RawFd, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec on Unix.
    msg.msg_iov = slices.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = slices.len();
    loop {
        // SAFETY: fd is an open socket owned by the session; msg points at live slices.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Per-connection inbound token bucket (messages per second with a burst).
struct RateLimit {
    tokens: f32,
    refilled_ms: u64,
}

impl RateLimit {
    fn take(&mut self, now_ms: u64, per_sec: u32, burst: u32) -> bool {
        let elapsed = now_ms.saturating_sub(self.refilled_ms);
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

/// How the active part of a session ended.
enum End {
    /// Someone asked it to close; the close frame is queued.
    Requested,
    /// The peer sent a close frame (with its code).
    PeerClose(Option<u16>),
    /// The peer vanished (EOF).
    Eof,
    /// A socket error.
    Io,
}

/// Serves one accepted socket from upgrade to close.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let _session = shard.session_started();
    let node = shard.node.clone();
    let admission = node.admit();
    let _ = stream.set_nodelay(true);

    let timeout = Duration::from_millis(node.config.handshake_timeout_ms);
    let max_bytes = node.config.max_handshake_bytes;
    let dev = node.config.dev;
    let upgrade = glommio::timer::timeout(timeout, async {
        Ok(read_upgrade(&mut stream, max_bytes, dev).await)
    })
    .await;
    let (upgrade, request) = match upgrade {
        Ok(Ok(found)) => found,
        Ok(Err(Some(refusal))) => return refuse(&shard, &mut stream, refusal).await,
        Ok(Err(None)) => return shard.metrics.refused(Refusal::BadRequest),
        Err(_) => return shard.metrics.refused(Refusal::Timeout),
    };
    if admission.over_limit() || node.draining.load(Ordering::Relaxed) {
        return refuse(&shard, &mut stream, HttpRefusal::UNAVAILABLE).await;
    }
    let identity = match upgrade.endpoint {
        Endpoint::Echo => None,
        Endpoint::Push => {
            match node
                .auth
                .authenticate(upgrade.token.as_deref(), upgrade.dev_user.as_deref())
            {
                Ok(identity) => Some(identity),
                Err(e) => {
                    let refusal = HttpRefusal::unauthorized(e.label());
                    return refuse(&shard, &mut stream, refusal).await;
                }
            }
        }
    };
    if stream.write_all(&upgrade.response).await.is_err() {
        return;
    }
    shard.metrics.handshakes_accepted.inc();

    let conn = Rc::new(Conn::new(
        shard.new_conn_id(),
        identity,
        stream.as_raw_fd(),
        shard.clock(),
    ));
    shard.register(&conn);
    let limit = node.config.max_outbound_bytes;
    if let Some(user) = conn.user() {
        let hello = render::hello(user, conn.id, &node.node_id, node.config.heartbeat_secs);
        conn.push(&hello, limit, &shard.metrics);
    }
    let mut session = Session {
        stream,
        conn,
        shard,
        inbound: Inbound::default(),
        rate: RateLimit {
            tokens: node.config.rate_limit_burst as f32,
            refilled_ms: 0,
        },
        peer_close: Cell::new(None),
    };
    let mut leftover = request[upgrade.consumed..].to_vec();
    drop(request);
    let end = if !leftover.is_empty() && session.on_bytes(&mut leftover) == Flow::Stop {
        session.end_from_flags()
    } else {
        futures_lite::future::poll_fn(|cx| session.poll_active(cx)).await
    };
    drop(leftover);
    session.shard.unregister(&session.conn);
    session.finish(end).await;
}

/// Reads the upgrade request. `Err(None)`: the peer went away or sent nothing usable.
async fn read_upgrade(
    stream: &mut TcpStream,
    max_bytes: usize,
    dev: bool,
) -> Result<(ws::Upgrade, Vec<u8>), Option<HttpRefusal>> {
    let mut buf = vec![0u8; 1024.min(max_bytes)];
    let mut len = 0;
    loop {
        if len == buf.len() {
            if len >= max_bytes {
                return Err(Some(HttpRefusal::TOO_LARGE));
            }
            buf.resize((len * 2).min(max_bytes), 0);
        }
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(n) => len += n,
        }
        if let Some(upgrade) = ws::parse_upgrade(&buf[..len], dev)? {
            buf.truncate(len);
            return Ok((upgrade, buf));
        }
    }
}

async fn refuse(shard: &Shard, stream: &mut TcpStream, refusal: HttpRefusal) {
    let reason = match refusal.status {
        400 => Refusal::BadRequest,
        401 => Refusal::Unauthorized,
        404 => Refusal::NotFound,
        431 => Refusal::TooLarge,
        _ => Refusal::Unavailable,
    };
    shard.metrics.refused(reason);
    let response = refusal.response();
    let _ = glommio::timer::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&response).await;
        let _ = stream.close().await;
        Ok(())
    })
    .await;
}

struct Session {
    stream: TcpStream,
    conn: Rc<Conn>,
    shard: Rc<Shard>,
    inbound: Inbound,
    rate: RateLimit,
    /// Set when the peer's close frame arrived (with its code, if any).
    peer_close: Cell<Option<Option<u16>>>,
}

impl Session {
    /// Reads, handles and flushes until the session should end.
    fn poll_active(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        self.conn.set_waker(cx.waker());
        let shard = self.shard.clone();
        for turn in 0..=READS_PER_TURN {
            if self.conn.close_requested() {
                return Poll::Ready(End::Requested);
            }
            if turn == READS_PER_TURN {
                cx.waker().wake_by_ref();
                break;
            }
            let mut scratch = shard.scratch.borrow_mut();
            match Pin::new(&mut self.stream).poll_read(cx, &mut scratch[..]) {
                Poll::Pending => break,
                Poll::Ready(Ok(0)) => return Poll::Ready(End::Eof),
                Poll::Ready(Err(_)) => return Poll::Ready(End::Io),
                Poll::Ready(Ok(n)) => {
                    if self.on_bytes(&mut scratch[..n]) == Flow::Stop {
                        return Poll::Ready(self.end_from_flags());
                    }
                }
            }
        }
        match self.conn.poll_flush(&mut self.stream, cx) {
            Ok(()) => Poll::Pending,
            Err(_) => Poll::Ready(End::Io),
        }
    }

    /// After decoding stopped: the peer closed, or a close was requested.
    fn end_from_flags(&self) -> End {
        match self.peer_close.get() {
            Some(code) => End::PeerClose(code),
            None => End::Requested,
        }
    }

    /// Decodes freshly read bytes and handles every complete message.
    fn on_bytes(&mut self, input: &mut [u8]) -> Flow {
        let shard = &*self.shard;
        let conn = &self.conn;
        conn.last_seen.set(shard.clock());
        let config = &shard.node.config;
        let limits = Limits {
            max_frame: config.max_frame_bytes,
            max_message: config.max_message_bytes,
        };
        let rate = &mut self.rate;
        let peer_close = &self.peer_close;
        let result = self.inbound.feed(input, limits, |event| {
            shard.metrics.frames_in.inc();
            let limit = config.max_outbound_bytes;
            match event {
                Event::Close(code) => {
                    peer_close.set(Some(code));
                    return Flow::Stop;
                }
                Event::Pong => {}
                Event::Ping(_) | Event::Text(_) | Event::Binary(_)
                    if !rate.take(
                        shard.clock_ms(),
                        config.rate_limit_per_sec,
                        config.rate_limit_burst,
                    ) =>
                {
                    shard.metrics.rejected(Rejection::RateLimited);
                    if !matches!(event, Event::Ping(_)) {
                        let err = render::err(None, ErrorCode::TooMany, "rate limit exceeded");
                        conn.push(&err, limit, &shard.metrics);
                    }
                }
                Event::Ping(payload) => {
                    conn.push(
                        &ws::frame(OpCode::Control(Control::Pong), payload),
                        limit,
                        &shard.metrics,
                    );
                }
                Event::Text(text) if conn.user.is_none() => {
                    conn.push(
                        &ws::frame(OpCode::Data(Data::Text), text.as_bytes()),
                        limit,
                        &shard.metrics,
                    );
                }
                Event::Binary(bytes) if conn.user.is_none() => {
                    conn.push(
                        &ws::frame(OpCode::Data(Data::Binary), bytes),
                        limit,
                        &shard.metrics,
                    );
                }
                Event::Binary(_) => {
                    shard.metrics.rejected(Rejection::Binary);
                    let err = render::err(
                        None,
                        ErrorCode::BadRequest,
                        "binary frames are not supported; send JSON text",
                    );
                    conn.push(&err, limit, &shard.metrics);
                }
                Event::Text(text) => {
                    let reply = handle_request(shard, conn, text);
                    conn.push(&reply, limit, &shard.metrics);
                }
            }
            if conn.close_requested() {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        match result {
            Ok(flow) => flow,
            Err(violation) => {
                let reason = match violation {
                    Violation::Protocol(_) => metrics::Close::Protocol,
                    Violation::TooBig => metrics::Close::TooBig,
                    Violation::BadUtf8 => metrics::Close::BadUtf8,
                };
                shard.metrics.closed(reason);
                tracing::debug!(conn = conn.id, %violation, "closing on bad input");
                conn.request_close(violation.close_code(), reason);
                Flow::Stop
            }
        }
    }

    /// Leaves gracefully: flush (the close frame last), half-close, wait for the peer.
    async fn finish(mut self, end: End) {
        let metrics = &self.shard.metrics;
        let limit = self.shard.node.config.max_outbound_bytes;
        match end {
            End::Eof | End::Io => {
                metrics.closed(if matches!(end, End::Eof) {
                    metrics::Close::Peer
                } else {
                    metrics::Close::IoError
                });
                return;
            }
            End::PeerClose(code) => {
                metrics.closed(metrics::Close::Peer);
                if !self.conn.close_requested() {
                    let code = code.unwrap_or(close::NORMAL);
                    self.conn.push(&ws::close_frame(code, ""), limit, metrics);
                }
            }
            End::Requested => {
                if let Some((_, reason)) = self.conn.close.get() {
                    if !matches!(
                        reason,
                        metrics::Close::SlowConsumer
                            | metrics::Close::HeartbeatTimeout
                            | metrics::Close::Protocol
                            | metrics::Close::TooBig
                            | metrics::Close::BadUtf8
                    ) {
                        metrics.closed(reason);
                    }
                }
            }
        }
        let timeout = Duration::from_millis(self.shard.node.config.close_timeout_ms);
        let shard = self.shard.clone();
        let _ = glommio::timer::timeout(timeout, async {
            let flushed = futures_lite::future::poll_fn(|cx| {
                match self.conn.poll_flush(&mut self.stream, cx) {
                    Err(e) => Poll::Ready(Err(e)),
                    Ok(()) if self.conn.is_flushed() => Poll::Ready(Ok(())),
                    Ok(()) => Poll::Pending,
                }
            })
            .await;
            if flushed.is_ok()
                && self
                    .stream
                    .shutdown(std::net::Shutdown::Write)
                    .await
                    .is_ok()
            {
                drain_until_eof(&shard, &mut self.stream).await;
            }
            Ok(())
        })
        .await;
    }
}

/// Reads and discards until the peer closes (after our close frame, RFC 6455 §5.5.1).
fn drain_until_eof<'a>(
    shard: &'a Shard,
    stream: &'a mut TcpStream,
) -> impl Future<Output = ()> + 'a {
    futures_lite::future::poll_fn(move |cx| loop {
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(_)) => continue,
            Poll::Pending => return Poll::Pending,
        }
    })
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
            shard.route_topic(Arc::from(&*topic), frame);
            render::ack(id, Some(mid))
        }
        Request::Send { to, data } => {
            if !valid_name(&to, max_name) {
                return refuse(Rejection::BadName, ErrorCode::BadRequest, "invalid user id");
            }
            let from = conn.user().expect("only user sessions handle requests");
            let (mid, ts) = shard.stamp();
            let frame = render::msg(Some(from), &to, mid, ts, data.get());
            if *to != **from {
                shard.route_user(Arc::from(&*to), frame.clone(), None);
            }
            shard.route_user(from.clone(), frame, Some(conn.id));
            render::ack(id, Some(mid))
        }
    }
}
