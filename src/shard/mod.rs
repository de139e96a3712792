//! One shard: a glommio executor pinned to a core that owns its listener, its connections
//! and its tables outright.
//!
//! This module is the shard's *driver*: sockets, the epoll set, the inbox, timers, the
//! drain and the yielding fan-out. What the shard decides (its tables, its share of the
//! home-shard directory, protocol requests) is its [`core`], which does no I/O and answers
//! every call with what to do; the driver carries that out. Timing decisions (deadline
//! queues, the drain plan) are in [`schedule`], equally free of clocks.
//!
//! A shard runs three tasks: the event loop (its `SO_REUSEPORT` listener and every socket,
//! through its epoll set, see [`crate::reactor`]), the inbox task (envelopes from other
//! shards, see [`crate::router`]) and the sweeper (heartbeats and deadlines). Connections are
//! not tasks: the event loop calls into [`crate::session`] when a socket is ready.
//! Everything is single-threaded, so state is in `RefCell`s; no borrow is held across an
//! `.await`, and a connection enters or leaves the tables only in the event loop.
//!
//! # Descriptors
//! Every client socket is a descriptor, counted node-wide from `accept` to close. Up to the
//! effective `max_connections` (by default what `RLIMIT_NOFILE` allows after the reserve for
//! the API, Redis and files, see [`crate::config::Config::connection_limit`]) a socket is
//! served; the next [`REFUSAL_SLOTS`](crate::config::REFUSAL_SLOTS) are read until their request is in and answered 503;
//! past those, a socket is answered 503 as soon as it is accepted and closed. So a full node
//! refuses promptly, and client sockets never eat the descriptors the API and Redis need.
//! If `accept` still fails with EMFILE or ENFILE (another part of the process, or the whole
//! system, is out of descriptors), the shard closes its spare descriptor (a `/dev/null` it
//! keeps open for this), accepts one waiting client, answers it 503, closes it and reopens
//! the spare, so queued clients get an answer rather than hang; when that fails too, it
//! stops accepting for `ACCEPT_PAUSE` instead of spinning. Accept warnings are logged at
//! most once per `ACCEPT_WARN_INTERVAL` per shard, with the number held back.
//!
//! Fan-out to many local recipients snapshots the recipient list and yields to the executor
//! every [`FANOUT_CHUNK`] sockets, so a publication to 50,000 subscribers does not stall the
//! shard's other connections for the whole loop.

pub(crate) mod core;
pub(crate) mod schedule;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use ahash::RandomState;
use bytes::Bytes;
use serde_json::value::RawValue;
use smallvec::SmallVec;

use self::core::{Action, Actions, Fanout, Greeting, Now, Peer, PeerState, Settings, ShardCore};
use self::schedule::{Deadlines, Drain};
use crate::auth::Authenticator;
use crate::cluster::{Bus, StreamRead};
use crate::config::{Config, NodeIdentity};
use crate::history::{Retention, StreamKey};
use crate::mailbox::{Lane, Laned};
use crate::metrics::{self, HandshakeRefusal, LogLimiter, Rejection, ShardMetrics};
use crate::protocol::{render, ErrorCode};
use crate::reactor::{self, Reactor, Ready};
use crate::router::{conn_id, ConnId, Envelope, Inbox, Router};
use crate::session::{
    Admission, Conn, Env, Gate, Handshake, HandshakeOutcome, Pushed, ReadOutcome,
};
use crate::upstream::{Sink, Ticket, UpstreamEvent};
use crate::ws::{close, HttpRefusal};

/// Sockets written per fan-out turn before the shard yields to its other tasks.
pub const FANOUT_CHUNK: usize = 512;

/// Size of the per-shard read buffer every connection of the shard reads through.
pub const SCRATCH_BYTES: usize = 64 * 1024;

/// How often the sweeper checks deadlines (upgrade and close timeouts).
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Sweeps between heartbeat checks (heartbeats are whole seconds).
const SWEEPS_PER_HEARTBEAT_CHECK: u32 = 10;

/// Events fetched from epoll per call.
const EVENTS_PER_TURN: usize = 1024;

/// How long the event loop waits before looking at its epoll set again when it could not
/// arm the executor's poll on it (no descriptor left to duplicate the set's).
const REARM_RETRY: Duration = Duration::from_millis(1);

/// Connections accepted per listener readiness before other sockets get a turn.
const ACCEPTS_PER_TURN: usize = 64;

/// How long a shard stops accepting after an accept failed and its spare descriptor could
/// not help (rounded up to the sweep interval).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// At most one accept-failure warning per shard per this interval.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The listener's epoll token (connection ids have a shard number below 64 in the top byte).
const LISTENER_TOKEN: u64 = u64::MAX - 1;

/// What a node gives each shard: the handles it uses, and nothing node-wide besides.
pub(crate) struct ShardSetup {
    pub(crate) config: Arc<Config>,
    pub(crate) identity: Arc<NodeIdentity>,
    pub(crate) auth: Arc<Authenticator>,
    /// Where client `pub`/`send` messages enter routing, and the shards' inboxes.
    pub(crate) router: Router,
    /// The cluster bus (device and topic changes; whether Redis is up).
    pub(crate) bus: Option<Bus>,
    pub(crate) admission: Arc<Admission>,
    /// This shard's metrics.
    pub(crate) metrics: Arc<ShardMetrics>,
    /// The upstream sink (`up` messages, connection events), when one is configured.
    pub(crate) upstream: Option<Sink>,
}

/// A client's `up` waiting for its sink's answer.
struct PendingUp {
    conn: ConnId,
    id: Option<Box<RawValue>>,
    mid: u64,
    ticket: Ticket,
}

/// A client connection as the shard holds it: its socket and what the core keeps of it.
pub(crate) struct Client {
    conn: Conn,
    peer: PeerState,
}

/// The core's handle on a connection: the connection itself, so a fan-out writes to what
/// the tables hold without looking it up.
type Handle = Rc<Client>;

impl Peer for Handle {
    fn id(&self) -> ConnId {
        self.conn.id
    }

    fn state(&self) -> &PeerState {
        &self.peer
    }
}

/// An upgraded connection waiting for its `hello` (see [`Greeting::AfterWelcome`]).
struct AwaitingHello {
    /// What it sent after its upgrade request.
    early: Vec<u8>,
    /// Its `101`, while held back to go out with the `hello` (see [`Shard::await_hello`]).
    response: Option<Vec<u8>>,
    /// No readable event was set aside since the handshake's last read, which was short:
    /// serving it needs no read first (see [`crate::session::Upgraded::drained`]).
    drained: bool,
}

/// A socket of the shard, by phase.
enum Socket {
    /// In the HTTP upgrade.
    Handshake(Box<Handshake>),
    /// Upgraded and in the tables.
    Open(Handle),
    /// Out of the tables, flushing its close frame and waiting for the peer.
    Closing(Handle),
}

/// A one-shot, shard-local signal that any number of tasks can wait for.
#[derive(Default)]
pub struct Signal {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl Signal {
    /// Fires the signal and wakes every waiter.
    pub fn fire(&self) {
        self.fired.set(true);
        for waker in self.waiters.take() {
            waker.wake();
        }
    }

    /// Whether it has fired.
    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    /// Waits until it fires.
    pub async fn wait(&self) {
        futures_lite::future::poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// A shard's state, shared by its tasks through `Rc`.
struct Shard {
    index: usize,
    config: Arc<Config>,
    auth: Arc<Authenticator>,
    router: Router,
    bus: Option<Bus>,
    admission: Arc<Admission>,
    metrics: Arc<ShardMetrics>,
    /// Read buffer shared by every connection of the shard (see [`crate::ws`]).
    scratch: RefCell<Box<[u8]>>,
    core: RefCell<ShardCore<Handle>>,
    next_conn: Cell<u64>,
    started: Instant,
    /// Fires when the shard starts shutting down.
    stopping: Signal,
    reactor: Reactor,
    listener: RefCell<Option<OwnedFd>>,
    /// Every socket of the shard by token (its connection id), whatever its phase.
    sockets: RefCell<HashMap<ConnId, Socket, RandomState>>,
    /// Connections whose close was requested; the event loop takes them out of the tables.
    to_close: RefCell<Vec<ConnId>>,
    /// Connections whose read budget ran out with data left (edge-triggered: no new event).
    to_read: RefCell<Vec<ConnId>>,
    /// Connections waiting for their `hello` (see [`Greeting::AfterWelcome`]); they are not
    /// read until it goes out.
    awaiting_hello: RefCell<HashMap<ConnId, AwaitingHello, RandomState>>,
    handshake_deadlines: RefCell<Deadlines>,
    close_deadlines: RefCell<Deadlines>,
    /// The event loop's task, woken when local work is queued.
    event_loop: Cell<Option<Waker>>,
    /// When accepting resumes after an accept error (EMFILE), in shard milliseconds.
    accept_paused_until: Cell<Option<u64>>,
    /// A descriptor held only to be closed when `accept` fails with EMFILE, so one waiting
    /// client can be accepted and refused (`None` while it cannot be reopened).
    spare: RefCell<Option<OwnedFd>>,
    /// Rate limit of accept warnings.
    accept_warnings: LogLimiter,
    /// Connections still to close while draining.
    drain: RefCell<Drain>,
    upstream: Option<Sink>,
    /// `up` messages waiting for their sink's answer, oldest first (the sink answers in
    /// order); bounded by the sink's queue.
    pending_up: RefCell<VecDeque<PendingUp>>,
    /// The task that answers them, woken when one is queued.
    up_answerer: Cell<Option<Waker>>,
}

impl Shard {
    fn new(index: usize, setup: ShardSetup, listener: OwnedFd) -> std::io::Result<Self> {
        let reactor = Reactor::new()?;
        reactor.add_listener(listener.as_fd(), LISTENER_TOKEN)?;
        let ShardSetup {
            config,
            identity,
            auth,
            router,
            bus,
            admission,
            metrics,
            upstream,
        } = setup;
        let settings = Settings {
            node_id: identity.id.clone(),
            node_number: identity.number,
            heartbeat_secs: config.heartbeat_secs,
            max_name_bytes: config.max_name_bytes,
            max_topics_per_connection: config.max_topics_per_connection,
            max_devices_per_user: config.max_devices_per_user,
            clustered: bus.is_some(),
            // Kept here on a lone node, in Redis when clustered.
            mailbox: config.mailbox_retention(),
            topic_history: Some(Arc::new(config.history.clone())),
            history_max_bytes: config.history_max_bytes_per_shard(),
            upstream: upstream.is_some().then_some(config.upstream_events),
        };
        let homes = router.mesh().homes().clone();
        let epoch_seed = ahash::RandomState::new().hash_one(index);
        let core = ShardCore::new(
            index,
            homes,
            settings,
            metrics.clone(),
            auth.clone(),
            epoch_seed,
        );
        Ok(Shard {
            index,
            scratch: RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice()),
            core: RefCell::new(core),
            next_conn: Cell::new(1),
            started: Instant::now(),
            stopping: Signal::default(),
            reactor,
            listener: RefCell::new(Some(listener)),
            sockets: RefCell::default(),
            to_close: RefCell::default(),
            to_read: RefCell::default(),
            awaiting_hello: RefCell::default(),
            handshake_deadlines: RefCell::new(Deadlines::new(config.handshake_timeout_ms)),
            close_deadlines: RefCell::new(Deadlines::new(config.close_timeout_ms)),
            event_loop: Cell::new(None),
            accept_paused_until: Cell::new(None),
            spare: RefCell::new(open_spare()),
            accept_warnings: LogLimiter::new(ACCEPT_WARN_INTERVAL),
            drain: RefCell::default(),
            upstream,
            pending_up: RefCell::default(),
            up_answerer: Cell::new(None),
            config,
            auth,
            router,
            bus,
            admission,
            metrics,
        })
    }

    /// Milliseconds since the shard started: the clock of deadlines, rate limits and
    /// heartbeats.
    fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// What a connection's I/O needs.
    fn env(&self) -> Env<'_> {
        Env {
            config: &self.config,
            metrics: &self.metrics,
            reactor: &self.reactor,
        }
    }

    /// A fresh connection id.
    fn new_conn_id(&self) -> ConnId {
        let seq = self.next_conn.get();
        self.next_conn.set(seq + 1);
        conn_id(self.index, seq)
    }

    /// Carries out what the core asked for.
    fn apply(&self, actions: Actions) {
        for action in actions {
            match action {
                Action::Send { shard, envelope } if shard == self.index => {
                    self.handle_own(envelope)
                }
                Action::Send { shard, envelope } => {
                    self.router.mesh().to_shard(shard, envelope, &self.metrics);
                }
                Action::Route {
                    to,
                    message,
                    except,
                    reach,
                } => {
                    self.router.route(to, message, except, reach, &self.metrics);
                }
                Action::ReadStream {
                    key,
                    conn,
                    since_seq,
                    since_ep,
                    retention,
                    id,
                } => self.read_stream(key, conn, since_seq, since_ep, retention, id),
                Action::Bus(control) => {
                    if let Some(bus) = &self.bus {
                        bus.control(control);
                    }
                }
                Action::Write { conn, frame } => {
                    if let Some(client) = self.open_conn(conn) {
                        self.push(&client, &frame);
                    }
                }
                Action::Hello { conn, frame } => self.greet(conn, &frame),
                Action::Upstream { conn, id, event } => self.hand_up(conn, id, event),
                Action::Event(event) => {
                    if let Some(sink) = &self.upstream {
                        // Refusals (a full queue) are counted by the sink.
                        let _ = sink.try_send_unacked(event);
                    }
                }
                Action::Close { conn, code, reason } => self.close_conn(conn, code, reason),
            }
        }
    }

    /// Reads a stream from Redis for a resume, off the event loop, and hands the answer back
    /// to this shard's core ([`Envelope::Replayed`]; `None` when Redis could not be asked).
    fn read_stream(
        &self,
        key: StreamKey,
        conn: ConnId,
        since_seq: u64,
        since_ep: Box<str>,
        retention: Retention,
        id: Option<Box<serde_json::value::RawValue>>,
    ) {
        let Some(bus) = &self.bus else {
            return;
        };
        let read = StreamRead {
            key: key.clone(),
            since_seq,
            since_ep: Some(since_ep),
            limit: retention.size,
            ttl_secs: retention.ttl_secs,
        };
        // Asked now, behind the bus changes this shard made before (see `Bus::read_stream`).
        let answer = bus.read_stream(read);
        let mesh = self.router.mesh().clone();
        let (index, metrics) = (self.index, self.metrics.clone());
        glommio::spawn_local(async move {
            let replay = answer.await.ok();
            let answer = Envelope::Replayed {
                key,
                conn,
                replay,
                id,
            };
            mesh.to_shard(index, answer, &metrics);
        })
        .detach();
    }

    /// Hands a client's `up` to the sink; its answer comes from [`upstream_loop`] once the
    /// sink has delivered it, or at once when the sink refuses it.
    fn hand_up(&self, conn: ConnId, id: Option<Box<RawValue>>, event: UpstreamEvent) {
        let mid = event.mid;
        let accepted = self.upstream.as_ref().map(|sink| sink.try_send(event));
        match accepted {
            Some(Ok(ticket)) => {
                let pending = PendingUp {
                    conn,
                    id,
                    mid,
                    ticket,
                };
                self.pending_up.borrow_mut().push_back(pending);
                if let Some(waker) = self.up_answerer.take() {
                    waker.wake();
                }
            }
            _ => {
                self.metrics.rejected(Rejection::UpUnavailable);
                let refusal = "the upstream sink is full or stopped; retry";
                let err = render::err(id.as_deref(), ErrorCode::Unavailable, refusal);
                if let Some(client) = self.open_conn(conn) {
                    self.push(&client, &err);
                }
            }
        }
    }

    /// Asks an open connection of this shard to close with `code`.
    fn close_conn(&self, id: ConnId, code: u16, reason: metrics::Close) {
        if let Some(client) = self.open_conn(id) {
            if client.conn.request_close(code, reason, self.env()) {
                self.schedule_close(id);
            }
        }
    }

    /// Handles an envelope this shard addressed to itself (a lone shard's, or its own
    /// users' home's) at once: through its own inbox it would only cost a wake-up and a turn.
    /// Control envelopes fan nothing out; a message goes through the inbox, where a turn
    /// delivers it in chunks.
    fn handle_own(&self, envelope: Envelope) {
        if envelope.lane() == Lane::Message {
            self.router
                .mesh()
                .to_shard(self.index, envelope, &self.metrics);
            return;
        }
        let fanout = self.to_core(envelope);
        debug_assert!(fanout.is_none(), "a control envelope fans nothing out");
    }

    /// Handles one envelope from the inbox.
    async fn handle(&self, envelope: Envelope) {
        if let Some(fanout) = self.to_core(envelope) {
            self.deliver(fanout).await;
        }
    }

    /// Hands an envelope to the core and carries out what it asks, but the fan-out.
    fn to_core(&self, envelope: Envelope) -> Option<Fanout<Handle>> {
        let bus_up = self.bus.as_ref().is_some_and(Bus::is_up);
        let mut actions = Actions::new();
        let fanout = self
            .core
            .borrow_mut()
            .envelope(envelope, bus_up, Now::read(), &mut actions);
        self.apply(actions);
        fanout
    }

    /// Writes a fan-out's frame to every recipient, yielding every [`FANOUT_CHUNK`]
    /// sockets, and records how long the message took from entering the node to its last
    /// write here.
    async fn deliver(&self, fanout: Fanout<Handle>) {
        let env = self.env();
        for chunk in fanout.to.chunks(FANOUT_CHUNK) {
            let mut delivered = 0;
            for client in chunk {
                match client.conn.push(&fanout.frame, env) {
                    Pushed::Accepted => delivered += 1,
                    Pushed::Refused => {}
                    Pushed::Closed => self.schedule_close(client.conn.id),
                }
            }
            self.metrics.delivered(fanout.kind, delivered);
            if fanout.to.len() > FANOUT_CHUNK {
                glommio::yield_if_needed().await;
            }
        }
        if !fanout.to.is_empty() {
            let took = metrics::monotonic_ns().saturating_sub(fanout.entered_ns);
            self.metrics.delivery_latency.record(took);
        }
    }

    /// Writes one frame to a connection outside a fan-out.
    fn push(&self, client: &Client, frame: &Bytes) {
        if client.conn.push(frame, self.env()) == Pushed::Closed {
            self.schedule_close(client.conn.id);
        }
    }

    /// Queues a connection whose close was requested; the event loop takes it out of the
    /// tables (it may be in the middle of a fan-out over them right now).
    fn schedule_close(&self, id: ConnId) {
        self.to_close.borrow_mut().push(id);
        self.wake_event_loop();
    }

    fn wake_event_loop(&self) {
        if let Some(waker) = self.event_loop.take() {
            waker.wake_by_ref();
            self.event_loop.set(Some(waker));
        }
    }

    fn remove_socket(&self, id: ConnId) -> Option<Socket> {
        let removed = self.sockets.borrow_mut().remove(&id);
        if removed.is_some() {
            self.admission.leave();
        }
        removed
    }

    /// One turn of the event loop: ready sockets, then retried reads, then closes.
    /// Returns whether epoll may have more events right away.
    fn turn(&self, events: &mut [libc::epoll_event]) -> bool {
        let ready: SmallVec<[(u64, Ready); 64]> = self.reactor.drain(events).collect();
        let full = ready.len() == events.len();
        for (token, ready) in ready {
            self.on_ready(token, ready);
        }
        let retry = self.to_read.take();
        for id in retry {
            if let Some(client) = self.open_conn(id) {
                self.read_conn(&client);
            }
        }
        loop {
            let closing = self.to_close.take();
            if closing.is_empty() {
                break;
            }
            for id in closing {
                self.start_closing(id);
            }
        }
        full
    }

    /// Every upgraded connection still in the tables.
    fn open_conns(&self) -> Vec<Handle> {
        let sockets = self.sockets.borrow();
        let open = sockets.values().filter_map(|socket| match socket {
            Socket::Open(client) => Some(client.clone()),
            _ => None,
        });
        open.collect()
    }

    fn open_conn(&self, id: ConnId) -> Option<Handle> {
        match self.sockets.borrow().get(&id) {
            Some(Socket::Open(client)) => Some(client.clone()),
            _ => None,
        }
    }

    fn on_ready(&self, token: u64, ready: Ready) {
        if token == LISTENER_TOKEN {
            return self.accept_some();
        }
        let socket = {
            let mut sockets = self.sockets.borrow_mut();
            match sockets.get(&token) {
                Some(Socket::Handshake(_)) if ready.readable() => sockets.remove(&token),
                Some(Socket::Open(client)) => Some(Socket::Open(client.clone())),
                Some(Socket::Closing(client)) => Some(Socket::Closing(client.clone())),
                _ => None,
            }
        };
        match socket {
            Some(Socket::Handshake(handshake)) => self.on_handshake(token, handshake),
            Some(Socket::Open(client)) => {
                if ready.writable() && client.conn.flush(self.env()).is_err() {
                    self.metrics.closed(metrics::Close::IoError);
                    return self.finish(&client);
                }
                if ready.readable() {
                    let mut awaiting = self.awaiting_hello.borrow_mut();
                    match awaiting.get_mut(&token) {
                        Some(waiting) => waiting.drained = false,
                        None => {
                            drop(awaiting);
                            self.read_conn(&client);
                        }
                    }
                }
            }
            Some(Socket::Closing(client)) => {
                if ready.writable() {
                    self.flush_closing(&client.conn);
                }
                if ready.readable() && client.conn.read_discarding(&mut self.scratch.borrow_mut()) {
                    self.remove_socket(token);
                }
            }
            None => {}
        }
    }

    fn on_handshake(&self, id: ConnId, handshake: Box<Handshake>) {
        let gate = Gate {
            config: &self.config,
            auth: &self.auth,
            admission: &self.admission,
        };
        let (pending, outcome) = handshake.read(&gate);
        match outcome {
            HandshakeOutcome::Pending => {
                let handshake = pending.expect("a pending handshake is handed back");
                self.sockets
                    .borrow_mut()
                    .insert(id, Socket::Handshake(handshake));
            }
            HandshakeOutcome::Gone => {
                self.admission.leave();
                self.metrics.refused(HandshakeRefusal::BadRequest);
            }
            HandshakeOutcome::Served => self.admission.leave(),
            HandshakeOutcome::Refused(refusal) => {
                self.admission.leave();
                self.metrics.refused(refusal_reason(refusal));
            }
            HandshakeOutcome::Open(upgraded) => {
                let echo = upgraded.identity.is_none();
                let conn = Conn::new(id, upgraded.fd, echo, self.env(), self.clock_ms());
                let client = Rc::new(Client {
                    conn,
                    peer: PeerState::new(upgraded.identity),
                });
                self.sockets
                    .borrow_mut()
                    .insert(id, Socket::Open(client.clone()));
                self.metrics.handshakes_accepted.inc();
                let mut actions = Actions::new();
                let greeting = self
                    .core
                    .borrow_mut()
                    .open(&client, Now::read(), &mut actions);
                let hello = match greeting {
                    Greeting::Hello(hello) => Some(hello),
                    Greeting::None => None,
                    Greeting::AfterWelcome => {
                        let waiting = AwaitingHello {
                            early: upgraded.early,
                            response: Some(upgraded.response),
                            drained: upgraded.drained,
                        };
                        return self.await_hello(&client, waiting, actions);
                    }
                };
                let upgrade = client
                    .conn
                    .upgrade(&upgraded.response, hello.as_ref(), self.env());
                self.apply(actions);
                if upgrade == Pushed::Closed {
                    self.schedule_close(id);
                } else {
                    self.serve(&client, upgraded.early, upgraded.drained);
                }
            }
        }
    }

    /// Holds an upgraded connection until its `hello`. A welcome from this very shard (a
    /// lone shard's, or when it is the user's home) comes while `actions` are applied: the
    /// `101` is held back until then, to go out with the `hello` in one `sendmsg`. A welcome
    /// from elsewhere takes a hop or a Redis round trip: the `101` goes out alone at once.
    fn await_hello(&self, client: &Handle, waiting: AwaitingHello, actions: Actions) {
        let id = client.conn.id;
        self.awaiting_hello.borrow_mut().insert(id, waiting);
        self.apply(actions);
        let response = self
            .awaiting_hello
            .borrow_mut()
            .get_mut(&id)
            .and_then(|waiting| waiting.response.take());
        if let Some(response) = response {
            if client.conn.upgrade(&response, None, self.env()) == Pushed::Closed {
                self.schedule_close(id);
            }
        }
    }

    /// Sends a welcomed connection its `hello` (with its `101` if that is still held back),
    /// then starts serving it.
    fn greet(&self, id: ConnId, hello: &Bytes) {
        let Some(waiting) = self.awaiting_hello.borrow_mut().remove(&id) else {
            return;
        };
        let Some(client) = self.open_conn(id) else {
            return;
        };
        let written = match &waiting.response {
            Some(response) => client.conn.upgrade(response, Some(hello), self.env()),
            None => client.conn.push(hello, self.env()),
        };
        if written == Pushed::Closed {
            self.schedule_close(id);
        } else {
            self.serve(&client, waiting.early, waiting.drained);
        }
    }

    /// Handles what a connection sent with its upgrade request, then reads what it sent
    /// since (edge-triggered: those bytes raise no new event), unless the socket was
    /// `drained` by the handshake's last read (what came later raises its own event).
    fn serve(&self, client: &Handle, mut early: Vec<u8>, drained: bool) {
        if !early.is_empty() {
            let now_ms = self.clock_ms();
            self.with_requests(client, |requests| {
                client
                    .conn
                    .on_bytes(&mut early, self.env(), now_ms, requests)
            });
        }
        if client.conn.close_request().is_some() {
            self.schedule_close(client.conn.id);
        } else if !drained {
            self.read_conn(client);
        }
    }

    /// Runs `io` with a request handler for `client` that hands each request to the core,
    /// then carries out what the core asked for.
    fn with_requests<T>(
        &self,
        client: &Handle,
        io: impl FnOnce(&mut dyn FnMut(&str) -> Option<Bytes>) -> T,
    ) -> T {
        let mut actions = Actions::new();
        let result = io(&mut |text| {
            self.core
                .borrow_mut()
                .request(client, text, Now::read(), &mut actions)
        });
        self.apply(actions);
        result
    }

    fn read_conn(&self, client: &Handle) {
        let now_ms = self.clock_ms();
        let outcome = self.with_requests(client, |requests| {
            let mut scratch = self.scratch.borrow_mut();
            client.conn.read(&mut scratch, self.env(), now_ms, requests)
        });
        let id = client.conn.id;
        match outcome {
            ReadOutcome::Idle => {}
            ReadOutcome::CloseRequested => self.schedule_close(id),
            ReadOutcome::More => {
                self.to_read.borrow_mut().push(id);
                self.wake_event_loop();
            }
            ReadOutcome::PeerClosed => {
                self.metrics.closed(metrics::Close::Peer);
                client.conn.answer_peer_close();
                self.start_closing(id);
            }
            ReadOutcome::Eof => {
                self.metrics.closed(metrics::Close::Peer);
                self.finish(client);
            }
            ReadOutcome::Failed => {
                self.metrics.closed(metrics::Close::IoError);
                self.finish(client);
            }
        }
    }

    /// Takes a connection out of the core's tables (once, when it leaves the `Open` phase).
    fn unregister(&self, client: &Handle) {
        self.awaiting_hello.borrow_mut().remove(&client.conn.id);
        client.conn.release_incomplete(self.env());
        let (code, reason) = client
            .conn
            .close_request()
            .unwrap_or((close::GOING_AWAY, metrics::Close::Peer));
        let mut actions = Actions::new();
        let closed = (code, reason.label());
        self.core
            .borrow_mut()
            .close(client, closed, Now::read(), &mut actions);
        self.apply(actions);
    }

    /// Takes an open connection out of the tables and starts its close handshake.
    fn start_closing(&self, id: ConnId) {
        let Some(client) = self.open_conn(id) else {
            return;
        };
        self.unregister(&client);
        self.sockets
            .borrow_mut()
            .insert(id, Socket::Closing(client.clone()));
        self.close_deadlines.borrow_mut().start(id, self.clock_ms());
        self.flush_closing(&client.conn);
    }

    fn flush_closing(&self, conn: &Conn) {
        match conn.flush(self.env()) {
            Ok(true) => conn.shutdown_write(),
            Ok(false) => {}
            Err(_) => {
                self.remove_socket(conn.id);
            }
        }
    }

    /// Drops a connection at once (the peer is gone).
    fn finish(&self, client: &Handle) {
        client.conn.mark_gone();
        if let Some(Socket::Open(_)) = self.remove_socket(client.conn.id) {
            self.unregister(client);
        }
    }

    fn accept_some(&self) {
        let listener = self.listener.borrow();
        let Some(listener) = listener.as_ref() else {
            return;
        };
        for _ in 0..ACCEPTS_PER_TURN {
            match reactor::accept(listener.as_fd()) {
                Ok(Some(fd)) => self.adopt(fd),
                Ok(None) => return,
                Err(error) => {
                    self.metrics.accept_errors.inc();
                    let out_of_descriptors =
                        matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    if out_of_descriptors {
                        match self.refuse_with_spare(listener.as_fd()) {
                            Some(true) => continue,
                            Some(false) => return,
                            None => {}
                        }
                    }
                    // Accepting again at once would fail again and spin: pause.
                    if let Some(suppressed) = self.accept_warnings.allow(Instant::now()) {
                        tracing::warn!(
                            shard = self.index,
                            %error,
                            suppressed,
                            "accept failed; pausing accepts for 100 ms"
                        );
                    }
                    self.reactor.remove(listener.as_fd());
                    self.accept_paused_until
                        .set(Some(self.clock_ms() + ACCEPT_PAUSE.as_millis() as u64));
                    return;
                }
            }
        }
    }

    /// Out of descriptors: frees the spare to accept one waiting client and answer it 503.
    /// `Some(true)`: one was refused; `Some(false)`: none was waiting; `None`: no spare, or
    /// accepting failed even so.
    fn refuse_with_spare(&self, listener: BorrowedFd<'_>) -> Option<bool> {
        drop(self.spare.take()?);
        let outcome = match reactor::accept(listener) {
            Ok(Some(fd)) => {
                self.refuse_at_once(fd);
                Some(true)
            }
            Ok(None) => Some(false),
            Err(_) => None,
        };
        *self.spare.borrow_mut() = open_spare();
        outcome
    }

    /// Answers a socket 503 at once, without waiting for its request, and closes it.
    fn refuse_at_once(&self, fd: OwnedFd) {
        // Take what the request already sent, so closing is less likely to reset the
        // connection under the answer; never wait for more.
        let mut scratch = self.scratch.borrow_mut();
        let _ = reactor::recv(fd.as_fd(), &mut scratch[..]);
        let response = HttpRefusal::UNAVAILABLE.response();
        let _ = reactor::sendmsg(fd.as_fd(), &[std::io::IoSlice::new(&response)]);
        self.metrics.refused(HandshakeRefusal::Unavailable);
    }

    fn adopt(&self, fd: OwnedFd) {
        if self.admission.refuse_at_accept() {
            return self.refuse_at_once(fd);
        }
        let _ = socket2::SockRef::from(&fd).set_nodelay(true);
        let id = self.new_conn_id();
        if let Err(error) = self.reactor.add_socket(fd.as_fd(), id) {
            self.metrics.accept_errors.inc();
            if let Some(suppressed) = self.accept_warnings.allow(Instant::now()) {
                tracing::warn!(shard = self.index, %error, suppressed, "cannot watch an accepted socket");
            }
            return;
        }
        self.admission.enter();
        self.handshake_deadlines
            .borrow_mut()
            .start(id, self.clock_ms());
        // Its request has usually arrived with the handshake's last packet (see
        // `crate::reactor`): read it now rather than in another turn. A request still on
        // its way leaves the socket in the tables as a pending handshake.
        self.on_handshake(id, Box::new(Handshake::new(fd)));
    }

    fn begin_stop(&self) {
        if self.stopping.fired() {
            return;
        }
        self.stopping.fire();
        if let Some(listener) = self.listener.take() {
            self.reactor.remove(listener.as_fd());
        }
        let open = self.open_conns().into_iter().map(|client| client.conn.id);
        let sweep_ms = SWEEP_INTERVAL.as_millis() as u64;
        *self.drain.borrow_mut() = Drain::new(open, self.config.drain_window_ms, sweep_ms);
        self.drain_some();
    }

    /// Closes the drain plan's next batch with 1001.
    fn drain_some(&self) {
        let batch = self.drain.borrow_mut().next_batch();
        for id in batch {
            self.close_conn(id, close::GOING_AWAY, metrics::Close::Shutdown);
        }
    }

    /// Expires upgrade and close deadlines; resumes accepting after a pause.
    fn sweep_deadlines(&self) {
        let now = self.clock_ms();
        let expired = |deadlines: &RefCell<Deadlines>| deadlines.borrow_mut().pop_expired(now);
        while let Some(id) = expired(&self.handshake_deadlines) {
            let handshaking = matches!(self.sockets.borrow().get(&id), Some(Socket::Handshake(_)));
            if handshaking {
                self.remove_socket(id);
                self.metrics.refused(HandshakeRefusal::Timeout);
            }
        }
        while let Some(id) = expired(&self.close_deadlines) {
            let closing = matches!(self.sockets.borrow().get(&id), Some(Socket::Closing(_)));
            if closing {
                self.remove_socket(id);
            }
        }
        if self.accept_paused_until.get().is_some_and(|t| t <= now) {
            self.accept_paused_until.set(None);
            let mut spare = self.spare.borrow_mut();
            if spare.is_none() {
                *spare = open_spare();
            }
            drop(spare);
            if let Some(listener) = self.listener.borrow().as_ref() {
                let _ = self.reactor.add_listener(listener.as_fd(), LISTENER_TOKEN);
            }
        }
    }

    /// Expires stream history; closes connections whose token expired (4402); pings
    /// connections due a heartbeat and closes those silent for three intervals or holding
    /// an incomplete message too long.
    fn sweep_heartbeats(&self) {
        let now_ms = self.clock_ms();
        let now = Now::read();
        self.core.borrow_mut().sweep(now);
        for client in self.open_conns() {
            let id = client.conn.id;
            if client.peer.expired(now) {
                self.close_conn(id, close::TOKEN_EXPIRED, metrics::Close::TokenExpired);
            } else if client.conn.heartbeat(now_ms, self.env()) {
                self.schedule_close(id);
            }
        }
    }
}

/// The spare descriptor (see the module docs); `None` if even that cannot be opened now.
fn open_spare() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

fn refusal_reason(refusal: HttpRefusal) -> HandshakeRefusal {
    match refusal.status {
        400 => HandshakeRefusal::BadRequest,
        401 => HandshakeRefusal::Unauthorized,
        404 => HandshakeRefusal::NotFound,
        426 => HandshakeRefusal::BadVersion,
        431 => HandshakeRefusal::TooLarge,
        _ => HandshakeRefusal::Unavailable,
    }
}

/// The shard's main future: runs until shutdown and the grace period are over.
pub(crate) async fn run(index: usize, setup: ShardSetup, listener: OwnedFd, inbox: Inbox) {
    let shard = match Shard::new(index, setup, listener) {
        Ok(shard) => Rc::new(shard),
        Err(error) => {
            tracing::error!(shard = index, %error, "cannot set up the shard's epoll set");
            return;
        }
    };
    glommio::spawn_local(event_loop(shard.clone())).detach();
    glommio::spawn_local(sweep_loop(shard.clone())).detach();
    glommio::spawn_local(inbox_loop(shard.clone(), inbox)).detach();
    if shard.upstream.is_some() {
        glommio::spawn_local(upstream_loop(shard.clone())).detach();
    }

    shard.stopping.wait().await;
    let grace = Duration::from_millis(shard.config.grace_period_ms);
    let deadline = Instant::now() + grace;
    while !shard.sockets.borrow().is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    let open = shard.sockets.borrow().len();
    if open > 0 {
        tracing::warn!(
            shard = index,
            open,
            "grace period over; dropping sockets still open"
        );
    }
}

async fn event_loop(shard: Rc<Shard>) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_TURN];
    let mut more = false;
    loop {
        if !more {
            let armed = futures_lite::future::poll_fn(|cx| {
                let current = shard.event_loop.take();
                match current {
                    Some(w) if w.will_wake(cx.waker()) => shard.event_loop.set(Some(w)),
                    _ => shard.event_loop.set(Some(cx.waker().clone())),
                }
                if !shard.to_close.borrow().is_empty() || !shard.to_read.borrow().is_empty() {
                    Poll::Ready(Ok(()))
                } else {
                    shard.reactor.poll_ready(cx)
                }
            })
            .await;
            if armed.is_err() {
                glommio::timer::sleep(REARM_RETRY).await;
            }
        }
        more = shard.turn(&mut events);
        glommio::yield_if_needed().await;
    }
}

/// Handles envelopes until every sender is gone; starts the stop when the node drains
/// (the stopper sets the flag and rings every shard's bell).
async fn inbox_loop(shard: Rc<Shard>, inbox: Inbox) {
    loop {
        let next = futures_lite::future::poll_fn(|cx| match inbox.poll_recv(cx) {
            Poll::Ready(envelope) => Poll::Ready(envelope.map(Some)),
            Poll::Pending if shard.admission.draining() && !shard.stopping.fired() => {
                Poll::Ready(Some(None))
            }
            Poll::Pending => Poll::Pending,
        })
        .await;
        match next {
            Some(Some(envelope)) => shard.handle(envelope).await,
            Some(None) => shard.begin_stop(),
            None => break,
        }
        glommio::yield_if_needed().await;
    }
}

/// Answers `up` messages as their sink answers them: `ack` with the `mid` once delivered,
/// `err unavailable` when the sink gave up (retries exhausted, refused, stopped).
async fn upstream_loop(shard: Rc<Shard>) {
    loop {
        let next =
            futures_lite::future::poll_fn(|cx| match shard.pending_up.borrow_mut().pop_front() {
                Some(pending) => Poll::Ready(pending),
                None => {
                    shard.up_answerer.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
        let PendingUp {
            conn,
            id,
            mid,
            ticket,
        } = next;
        let frame = match ticket.await {
            Ok(()) => render::ack(id.as_deref(), Some(mid)),
            Err(undelivered) => {
                shard.metrics.rejected(Rejection::UpUnavailable);
                let msg =
                    format!("the upstream sink could not deliver it ({undelivered:?}); retry");
                render::err(id.as_deref(), ErrorCode::Unavailable, &msg)
            }
        };
        if let Some(client) = shard.open_conn(conn) {
            shard.push(&client, &frame);
        }
    }
}

async fn sweep_loop(shard: Rc<Shard>) {
    let mut sweeps = 0u32;
    loop {
        glommio::timer::sleep(SWEEP_INTERVAL).await;
        shard.sweep_deadlines();
        shard.drain_some();
        sweeps += 1;
        if sweeps % SWEEPS_PER_HEARTBEAT_CHECK == 0 && !shard.stopping.fired() {
            shard.sweep_heartbeats();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_client_stays_small() {
        // The connection (see session.rs) plus what the core keeps: every byte here is paid
        // once per connection.
        let size = std::mem::size_of::<Client>();
        assert!(size <= 192, "{size}");
    }
}
