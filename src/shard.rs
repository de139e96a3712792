//! One shard: a glommio executor pinned to a core that owns its listener, its connections
//! and its tables outright.
//!
//! A shard runs three tasks: the event loop (its `SO_REUSEPORT` listener and every socket,
//! through its epoll set, see [`crate::reactor`]), the inbox task (envelopes from other
//! shards, see [`crate::router`]) and the sweeper (heartbeats and deadlines). Connections are
//! not tasks: the event loop calls into [`crate::session`] when a socket is ready.
//! Everything is single-threaded, so tables are plain `RefCell`s; no borrow is held across an
//! `.await`, and a connection enters or leaves the tables only in the event loop.
//!
//! Deadlines (upgrade timeout, close timeout) are FIFO queues: every entry of a queue has the
//! same timeout, so the queue is sorted by construction and the sweeper pops only what expired.
//!
//! # Descriptors
//! Every client socket is a descriptor, counted node-wide from `accept` to close. Up to the
//! effective `max_connections` (by default what `RLIMIT_NOFILE` allows after the reserve for
//! the API, Redis and files, see [`crate::config::Config::connection_limit`]) a socket is
//! served; the next [`REFUSAL_SLOTS`] are read until their request is in and answered 503;
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

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use ahash::RandomState;
use bytes::Bytes;
use indexmap::IndexMap;
use smallvec::SmallVec;

use crate::auth::valid_name;
use crate::cluster::{Control, Outbound, Users};
use crate::config::REFUSAL_SLOTS;
use crate::metrics::{self, Delivery, HandshakeRefusal, LogLimiter, Rejection, ShardMetrics};
use crate::node::NodeShared;
use crate::protocol::{self, MidGenerator};
use crate::reactor::{self, Doorbell, Reactor, Ready};
use crate::router::{conn_id, shard_of, ConnId, Directory, Envelope, Inbox, Message, Route};
use crate::session::{Conn, Handshake, HandshakeOutcome, ReadOutcome};
use crate::ws::HttpRefusal;

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

/// Connections accepted per listener readiness before other sockets get a turn.
const ACCEPTS_PER_TURN: usize = 64;

/// How long a shard stops accepting after an accept failed and its spare descriptor could
/// not help (rounded up to the sweep interval).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// At most one accept-failure warning per shard per this interval.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The listener's epoll token (connection ids have a shard number below 64 in the top byte).
const LISTENER_TOKEN: u64 = u64::MAX - 1;

/// A socket of the shard, by phase.
enum Socket {
    /// In the HTTP upgrade.
    Handshake(Box<Handshake>),
    /// Upgraded and in the tables.
    Open(Rc<Conn>),
    /// Out of the tables, flushing its close frame and waiting for the peer.
    Closing(Rc<Conn>),
}

/// Which local connections belong to which user and topic (every connection is in
/// the shard's socket map).
#[derive(Default)]
struct LocalTables {
    users: HashMap<Arc<str>, SmallVec<[Rc<Conn>; 1]>, RandomState>,
    topics: HashMap<Arc<str>, IndexMap<ConnId, Rc<Conn>, RandomState>, RandomState>,
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
pub struct Shard {
    /// Shard number.
    pub index: usize,
    /// Node-wide settings and handles.
    pub node: Arc<NodeShared>,
    /// This shard's metrics.
    pub metrics: Arc<ShardMetrics>,
    /// Read buffer shared by every connection of the shard (see [`crate::ws`]).
    pub scratch: RefCell<Box<[u8]>>,
    tables: RefCell<LocalTables>,
    directory: RefCell<Directory>,
    /// Limits the warning about direct messages for users with no device online.
    no_route_log: LogLimiter,
    mids: RefCell<MidGenerator>,
    next_conn: Cell<u64>,
    started: Instant,
    /// Fires when the shard starts shutting down.
    pub stopping: Signal,
    reactor: Reactor,
    doorbell: Arc<Doorbell>,
    listener: RefCell<Option<OwnedFd>>,
    /// Every socket of the shard by token (its connection id), whatever its phase.
    sockets: RefCell<HashMap<ConnId, Socket, RandomState>>,
    /// Connections whose close was requested; the event loop takes them out of the tables.
    to_close: RefCell<Vec<ConnId>>,
    /// Connections whose read budget ran out with data left (edge-triggered: no new event).
    to_read: RefCell<Vec<ConnId>>,
    /// Upgrade deadlines in deadline order (every entry has the same timeout).
    handshake_deadlines: RefCell<VecDeque<(u64, ConnId)>>,
    /// Close deadlines in deadline order.
    close_deadlines: RefCell<VecDeque<(u64, ConnId)>>,
    /// The event loop's task, woken when local work is queued.
    event_loop: Cell<Option<Waker>>,
    /// When accepting resumes after an accept error (EMFILE), in shard milliseconds.
    accept_paused_until: Cell<Option<u64>>,
    /// A descriptor held only to be closed when `accept` fails with EMFILE, so one waiting
    /// client can be accepted and refused (`None` while it cannot be reopened).
    spare: RefCell<Option<OwnedFd>>,
    /// Rate limit of accept warnings.
    accept_warnings: LogLimiter,
    /// Connections still to close while draining, and how many to close per sweep.
    drain: RefCell<VecDeque<ConnId>>,
    drain_per_sweep: Cell<usize>,
}

impl Shard {
    fn new(index: usize, node: Arc<NodeShared>, listener: OwnedFd) -> std::io::Result<Self> {
        let doorbell = Arc::new(Doorbell::default());
        let reactor = Reactor::new(format!("shard-{index}-poll"), doorbell.clone())?;
        reactor.add_listener(listener.as_fd(), LISTENER_TOKEN)?;
        Ok(Shard {
            index,
            metrics: node.metrics.shard(index).clone(),
            scratch: RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice()),
            tables: RefCell::default(),
            directory: RefCell::default(),
            no_route_log: LogLimiter::default(),
            mids: RefCell::new(MidGenerator::new(node.node_number, index)),
            next_conn: Cell::new(1),
            started: Instant::now(),
            stopping: Signal::default(),
            reactor,
            doorbell,
            listener: RefCell::new(Some(listener)),
            sockets: RefCell::default(),
            to_close: RefCell::default(),
            to_read: RefCell::default(),
            handshake_deadlines: RefCell::default(),
            close_deadlines: RefCell::default(),
            event_loop: Cell::new(None),
            accept_paused_until: Cell::new(None),
            spare: RefCell::new(open_spare()),
            accept_warnings: LogLimiter::new(ACCEPT_WARN_INTERVAL),
            drain: RefCell::default(),
            drain_per_sweep: Cell::new(0),
            node,
        })
    }

    /// Seconds since the shard started: the coarse clock of heartbeats.
    pub fn clock(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    /// Milliseconds since the shard started: the clock of rate limiting.
    pub fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A fresh connection id.
    pub fn new_conn_id(&self) -> ConnId {
        let seq = self.next_conn.get();
        self.next_conn.set(seq + 1);
        conn_id(self.index, seq)
    }

    /// A message id and timestamp for a new message.
    pub fn stamp(&self) -> (u64, u64) {
        let ts = protocol::now_ms();
        (self.mids.borrow_mut().next(ts), ts)
    }

    fn send(&self, shard: usize, envelope: Envelope) {
        self.node.mesh.send(shard, envelope, &self.metrics);
    }

    /// Adds an upgraded connection to the tables and tells the user's home shard.
    fn register(&self, conn: &Rc<Conn>) {
        let mut tables = self.tables.borrow_mut();
        self.metrics.connections.add(1);
        if let Some(user) = conn.user() {
            let devices = tables.users.entry(user.clone()).or_default();
            if devices.is_empty() {
                self.metrics.users.add(1);
            }
            devices.push(conn.clone());
            self.send(
                self.node.mesh.home(user),
                Envelope::DeviceOnline {
                    user: user.clone(),
                    conn: conn.id,
                },
            );
            if let Some(bus) = &self.node.bus {
                bus.control(Control::DeviceOnline {
                    user: user.clone(),
                    conn: conn.id,
                    since_ms: protocol::now_ms(),
                });
            }
        }
    }

    /// Removes a connection from every table; the last subscriber of a topic leaving tells
    /// the topic's home shard, and the user's home shard forgets the device. Called exactly
    /// once, when its socket leaves the `Open` phase.
    fn unregister(&self, conn: &Conn) {
        conn.release_incomplete(self);
        let mut tables = self.tables.borrow_mut();
        self.metrics.connections.add(-1);
        for topic in conn.take_topics() {
            self.remove_subscriber(&mut tables, &topic, conn.id);
        }
        if let Some(user) = conn.user() {
            if let Some(devices) = tables.users.get_mut(user) {
                devices.retain(|c| c.id != conn.id);
                if devices.is_empty() {
                    tables.users.remove(user);
                    self.metrics.users.add(-1);
                }
            }
            self.send(
                self.node.mesh.home(user),
                Envelope::DeviceOffline {
                    user: user.clone(),
                    conn: conn.id,
                },
            );
            if let Some(bus) = &self.node.bus {
                bus.control(Control::DeviceOffline {
                    user: user.clone(),
                    conn: conn.id,
                });
            }
        }
    }

    /// Subscribes `conn` to `topic`. `Ok(false)` if it already was (still acknowledged).
    pub fn subscribe(&self, conn: &Rc<Conn>, topic: &str) -> Result<bool, Rejection> {
        if !valid_name(topic, self.node.config.max_name_bytes) {
            return Err(Rejection::BadName);
        }
        if conn.has_topic(topic) {
            return Ok(false);
        }
        if conn.topic_count() >= self.node.config.max_topics_per_connection {
            return Err(Rejection::TooManyTopics);
        }
        let mut tables = self.tables.borrow_mut();
        let key = match tables.topics.get_key_value(topic) {
            Some((key, _)) => key.clone(),
            None => {
                let key: Arc<str> = Arc::from(topic);
                self.metrics.topics.add(1);
                self.send(
                    self.node.mesh.home(topic),
                    Envelope::TopicInterest {
                        topic: key.clone(),
                        shard: self.index,
                        active: true,
                    },
                );
                key
            }
        };
        tables
            .topics
            .entry(key.clone())
            .or_default()
            .insert(conn.id, conn.clone());
        conn.add_topic(key);
        Ok(true)
    }

    /// Unsubscribes `conn` from `topic`.
    pub fn unsubscribe(&self, conn: &Conn, topic: &str) -> Result<(), Rejection> {
        if !conn.remove_topic(topic) {
            return Err(Rejection::NotSubscribed);
        }
        let mut tables = self.tables.borrow_mut();
        self.remove_subscriber(&mut tables, topic, conn.id);
        Ok(())
    }

    fn remove_subscriber(&self, tables: &mut LocalTables, topic: &str, conn: ConnId) {
        let Some(subscribers) = tables.topics.get_mut(topic) else {
            return;
        };
        subscribers.swap_remove(&conn);
        if subscribers.is_empty() {
            let (key, _) = tables
                .topics
                .remove_entry(topic)
                .expect("entry was just found");
            self.metrics.topics.add(-1);
            self.send(
                self.node.mesh.home(topic),
                Envelope::TopicInterest {
                    topic: key,
                    shard: self.index,
                    active: false,
                },
            );
        }
    }

    /// Routes a client's direct message from `from` (connection `sender`) to `to`: every
    /// device of `to` and every other device of `from`, on this node through their home
    /// shards and (clustered) on the other nodes through one bus message naming both users.
    pub fn route_direct(&self, to: Arc<str>, from: &Arc<str>, message: Message, sender: ConnId) {
        let users: Users = if to == *from {
            smallvec::smallvec![to.clone()]
        } else {
            smallvec::smallvec![to.clone(), from.clone()]
        };
        self.node.to_other_nodes(|| Outbound::User {
            users,
            message: message.clone(),
        });
        let mesh = &self.node.mesh;
        if to != *from {
            mesh.route(Route::User(to), message.clone(), None, &self.metrics);
        }
        mesh.route(
            Route::User(from.clone()),
            message,
            Some(sender),
            &self.metrics,
        );
    }

    /// Logs (at most once a second) a direct message that found no device of its user.
    fn log_no_route(&self, user: &str, mid: u64) {
        if let Some(suppressed) = self.no_route_log.allow(Instant::now()) {
            tracing::warn!(
                user,
                mid,
                suppressed,
                "direct message for a user with no device online dropped (logged at most once a second; shardcast_drops_total{{reason=\"no_route\"}} counts each)"
            );
        }
    }

    /// Sends a publication to the topic's home shard and (clustered) to the other nodes.
    pub fn route_topic(&self, topic: Arc<str>, message: Message) {
        self.node.to_other_nodes(|| Outbound::Topic {
            topic: topic.clone(),
            message: message.clone(),
        });
        self.node
            .mesh
            .route(Route::Topic(topic), message, None, &self.metrics);
    }

    /// Handles one envelope from the inbox.
    async fn handle(&self, envelope: Envelope) {
        self.metrics.envelopes_in.inc();
        match envelope {
            Envelope::RouteUser {
                user,
                message,
                except,
            } => {
                let shards = self.directory.borrow().user_shards(&user);
                if shards.is_empty() && except.is_none() && self.node.bus.is_none() {
                    self.metrics.dropped(metrics::Drop::NoRoute);
                    self.log_no_route(&user, message.mid);
                }
                self.node
                    .mesh
                    .send_to_mask(shards, &self.metrics, || Envelope::DeliverUser {
                        user: user.clone(),
                        message: message.clone(),
                        except,
                    });
            }
            Envelope::RouteTopic { topic, message } => {
                let shards = self.directory.borrow().topic_shards(&topic);
                if shards.is_empty() {
                    return;
                }
                // One frame for every subscriber on this node, rendered here at most once.
                let message = message.rendered_for(&topic);
                self.node
                    .mesh
                    .send_to_mask(shards, &self.metrics, || Envelope::DeliverTopic {
                        topic: topic.clone(),
                        message: message.clone(),
                    });
            }
            Envelope::DeliverUser {
                user,
                message,
                except,
            } => {
                let recipients: SmallVec<[Rc<Conn>; 4]> = self
                    .tables
                    .borrow()
                    .users
                    .get(&user)
                    .map(|devices| {
                        devices
                            .iter()
                            .filter(|c| Some(c.id) != except)
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                if !recipients.is_empty() {
                    let frame = message.frame_for(&user);
                    self.deliver(&recipients, &frame, &message, Delivery::Direct)
                        .await;
                }
            }
            Envelope::DeliverTopic { topic, message } => {
                let recipients: Vec<Rc<Conn>> = self
                    .tables
                    .borrow()
                    .topics
                    .get(&topic)
                    .map(|subs| subs.values().cloned().collect())
                    .unwrap_or_default();
                self.deliver(
                    &recipients,
                    &message.frame_for(&topic),
                    &message,
                    Delivery::Topic,
                )
                .await;
            }
            Envelope::Broadcast { message } => {
                let recipients: Vec<Rc<Conn>> = self
                    .tables
                    .borrow()
                    .users
                    .values()
                    .flatten()
                    .cloned()
                    .collect();
                self.deliver(
                    &recipients,
                    &message.shared_frame(),
                    &message,
                    Delivery::Broadcast,
                )
                .await;
            }
            Envelope::DeviceOnline { user, conn } => {
                // While the bus is up the cluster enforces the device limit (it knows the
                // oldest device on any node); this shard enforces it only as a fallback.
                let max = if self.node.bus_up() {
                    usize::MAX
                } else {
                    self.node.config.max_devices_per_user
                };
                let evicted = self.directory.borrow_mut().device_online(user, conn, max);
                if let Some(oldest) = evicted {
                    self.send(
                        shard_of(oldest),
                        Envelope::CloseConn {
                            conn: oldest,
                            code: crate::ws::close::REPLACED,
                            reason: metrics::Close::Replaced,
                        },
                    );
                }
            }
            Envelope::DeviceOffline { user, conn } => {
                self.directory.borrow_mut().device_offline(&user, conn);
            }
            Envelope::TopicInterest {
                topic,
                shard,
                active,
            } => {
                let changed =
                    self.directory
                        .borrow_mut()
                        .topic_interest(topic.clone(), shard, active);
                if let (Some(active), Some(bus)) = (changed, &self.node.bus) {
                    bus.control(Control::TopicActive { topic, active });
                }
            }
            Envelope::CloseUser { user, code, reason } => {
                let devices: SmallVec<[ConnId; 4]> = self
                    .directory
                    .borrow()
                    .devices(&user)
                    .iter()
                    .copied()
                    .collect();
                for conn in devices {
                    self.send(shard_of(conn), Envelope::CloseConn { conn, code, reason });
                }
            }
            Envelope::CloseConn { conn, code, reason } => {
                if let Some(conn) = self.open_conn(conn) {
                    conn.request_close(code, reason, self);
                }
            }
            Envelope::QueryUser { user, reply } => {
                let _ = reply.send(self.directory.borrow().devices(&user).len());
            }
            Envelope::QueryTopic { topic, reply } => {
                let _ = reply.send(self.directory.borrow().topic_shards(&topic));
            }
            Envelope::CountSubscribers { topic, reply } => {
                let count = self
                    .tables
                    .borrow()
                    .topics
                    .get(&topic)
                    .map_or(0, |s| s.len());
                let _ = reply.send(count);
            }
        }
    }

    /// Writes `frame` (of `message`) to every recipient, yielding every [`FANOUT_CHUNK`]
    /// sockets, and records how long the message took from entering the node to its last
    /// write here.
    async fn deliver(
        &self,
        recipients: &[Rc<Conn>],
        frame: &Bytes,
        message: &Message,
        kind: Delivery,
    ) {
        for chunk in recipients.chunks(FANOUT_CHUNK) {
            let mut delivered = 0;
            for conn in chunk {
                if conn.push(frame, self) {
                    delivered += 1;
                }
            }
            self.metrics.delivered(kind, delivered);
            if recipients.len() > FANOUT_CHUNK {
                glommio::yield_if_needed().await;
            }
        }
        if !recipients.is_empty() {
            let took = metrics::monotonic_ns().saturating_sub(message.entered_ns);
            self.metrics.delivery_latency.record(took);
        }
    }

    /// Queues a connection whose close was requested; the event loop takes it out of the
    /// tables (it may be in the middle of a fan-out over them right now).
    pub fn schedule_close(&self, id: ConnId) {
        self.to_close.borrow_mut().push(id);
        self.wake_event_loop();
    }

    fn wake_event_loop(&self) {
        if let Some(waker) = self.event_loop.take() {
            waker.wake_by_ref();
            self.event_loop.set(Some(waker));
        }
    }

    /// Whether a new connection must be refused with 503: the node is full or draining.
    /// (The socket asking is already counted.)
    pub fn over_capacity(&self) -> bool {
        self.node.draining.load(Ordering::Relaxed)
            || self.node.connections.load(Ordering::Relaxed) > self.node.max_connections
    }

    fn insert_socket(&self, id: ConnId, socket: Socket) {
        if self.sockets.borrow_mut().insert(id, socket).is_none() {
            self.node.connections.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remove_socket(&self, id: ConnId) -> Option<Socket> {
        let removed = self.sockets.borrow_mut().remove(&id);
        if removed.is_some() {
            self.node.connections.fetch_sub(1, Ordering::Relaxed);
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
            if let Some(conn) = self.open_conn(id) {
                self.read_conn(&conn);
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
    fn open_conns(&self) -> Vec<Rc<Conn>> {
        let sockets = self.sockets.borrow();
        let open = sockets.values().filter_map(|socket| match socket {
            Socket::Open(conn) => Some(conn.clone()),
            _ => None,
        });
        open.collect()
    }

    fn open_conn(&self, id: ConnId) -> Option<Rc<Conn>> {
        match self.sockets.borrow().get(&id) {
            Some(Socket::Open(conn)) => Some(conn.clone()),
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
                Some(Socket::Open(conn)) => Some(Socket::Open(conn.clone())),
                Some(Socket::Closing(conn)) => Some(Socket::Closing(conn.clone())),
                _ => None,
            }
        };
        match socket {
            Some(Socket::Handshake(handshake)) => self.on_handshake(token, handshake),
            Some(Socket::Open(conn)) => {
                if ready.writable() && conn.flush().is_err() {
                    self.metrics.closed(metrics::Close::IoError);
                    return self.finish(&conn);
                }
                if ready.readable() {
                    self.read_conn(&conn);
                }
            }
            Some(Socket::Closing(conn)) => {
                if ready.writable() {
                    self.flush_closing(&conn);
                }
                if ready.readable() && conn.read_discarding(self) {
                    self.remove_socket(conn.id);
                }
            }
            None => {}
        }
    }

    fn on_handshake(&self, id: ConnId, handshake: Box<Handshake>) {
        let (pending, outcome) = handshake.read(id, self);
        match outcome {
            HandshakeOutcome::Pending => {
                let handshake = pending.expect("a pending handshake is handed back");
                self.sockets
                    .borrow_mut()
                    .insert(id, Socket::Handshake(handshake));
            }
            HandshakeOutcome::Gone => {
                self.node.connections.fetch_sub(1, Ordering::Relaxed);
                self.metrics.refused(HandshakeRefusal::BadRequest);
            }
            HandshakeOutcome::Refused(refusal) => {
                self.node.connections.fetch_sub(1, Ordering::Relaxed);
                self.metrics.refused(refusal_reason(refusal));
            }
            HandshakeOutcome::Open(conn, mut early) => {
                self.sockets
                    .borrow_mut()
                    .insert(id, Socket::Open(conn.clone()));
                self.metrics.handshakes_accepted.inc();
                self.register(&conn);
                if let Some(user) = conn.user() {
                    let config = &self.node.config;
                    let hello = protocol::render::hello(
                        user,
                        conn.id,
                        &self.node.node_id,
                        config.heartbeat_secs,
                    );
                    conn.push(&hello, self);
                }
                if !early.is_empty() {
                    conn.on_bytes(&mut early, self);
                }
                if conn.close_request().is_none() {
                    // Edge-triggered: bytes that arrived with the request raise no new event.
                    self.read_conn(&conn);
                }
            }
        }
    }

    fn read_conn(&self, conn: &Rc<Conn>) {
        match conn.read(self) {
            ReadOutcome::Idle | ReadOutcome::CloseRequested => {}
            ReadOutcome::More => {
                self.to_read.borrow_mut().push(conn.id);
                self.wake_event_loop();
            }
            ReadOutcome::PeerClosed => {
                self.metrics.closed(metrics::Close::Peer);
                conn.answer_peer_close();
                self.start_closing(conn.id);
            }
            ReadOutcome::Eof => {
                self.metrics.closed(metrics::Close::Peer);
                self.finish(conn);
            }
            ReadOutcome::Failed => {
                self.metrics.closed(metrics::Close::IoError);
                self.finish(conn);
            }
        }
    }

    /// Takes an open connection out of the tables and starts its close handshake.
    fn start_closing(&self, id: ConnId) {
        let Some(conn) = self.open_conn(id) else {
            return;
        };
        self.unregister(&conn);
        self.sockets
            .borrow_mut()
            .insert(id, Socket::Closing(conn.clone()));
        let deadline = self.clock_ms() + self.node.config.close_timeout_ms;
        self.close_deadlines.borrow_mut().push_back((deadline, id));
        self.flush_closing(&conn);
    }

    fn flush_closing(&self, conn: &Conn) {
        match conn.flush() {
            Ok(true) => conn.shutdown_write(),
            Ok(false) => {}
            Err(_) => {
                self.remove_socket(conn.id);
            }
        }
    }

    /// Drops a connection at once (the peer is gone).
    fn finish(&self, conn: &Conn) {
        conn.mark_gone();
        if let Some(Socket::Open(_)) = self.remove_socket(conn.id) {
            self.unregister(conn);
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
        let _ = reactor::send(fd.as_fd(), &[std::io::IoSlice::new(&response)]);
        self.metrics.refused(HandshakeRefusal::Unavailable);
    }

    fn adopt(&self, fd: OwnedFd) {
        let connections = self.node.connections.load(Ordering::Relaxed);
        if connections >= self.node.max_connections.saturating_add(REFUSAL_SLOTS) {
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
        self.insert_socket(id, Socket::Handshake(Box::new(Handshake::new(fd))));
        let deadline = self.clock_ms() + self.node.config.handshake_timeout_ms;
        self.handshake_deadlines
            .borrow_mut()
            .push_back((deadline, id));
    }

    fn begin_stop(&self) {
        if self.stopping.fired() {
            return;
        }
        self.stopping.fire();
        if let Some(listener) = self.listener.take() {
            self.reactor.remove(listener.as_fd());
        }
        let drain: VecDeque<ConnId> = self.open_conns().iter().map(|c| c.id).collect();
        let window = self.node.config.drain_window_ms;
        let ticks = (window / SWEEP_INTERVAL.as_millis() as u64).max(1) as usize;
        self.drain_per_sweep.set(drain.len().div_ceil(ticks).max(1));
        if window == 0 {
            self.drain_per_sweep.set(usize::MAX);
        }
        *self.drain.borrow_mut() = drain;
        self.drain_some();
    }

    /// Closes the next batch of connections with 1001 while draining, so the clients'
    /// reconnects spread over `drain_window_ms` instead of stampeding the other nodes.
    fn drain_some(&self) {
        let batch: Vec<ConnId> = {
            let mut drain = self.drain.borrow_mut();
            let n = self.drain_per_sweep.get().min(drain.len());
            drain.drain(..n).collect()
        };
        for id in batch {
            if let Some(conn) = self.open_conn(id) {
                conn.request_close(crate::ws::close::GOING_AWAY, metrics::Close::Shutdown, self);
            }
        }
    }

    /// Expires upgrade and close deadlines; resumes accepting after a pause.
    fn sweep_deadlines(&self) {
        let now = self.clock_ms();
        while let Some(id) = pop_expired(&self.handshake_deadlines, now) {
            let handshaking = matches!(self.sockets.borrow().get(&id), Some(Socket::Handshake(_)));
            if handshaking {
                self.remove_socket(id);
                self.metrics.refused(HandshakeRefusal::Timeout);
            }
        }
        while let Some(id) = pop_expired(&self.close_deadlines, now) {
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

    /// Pings connections due a heartbeat and closes those silent for three intervals or
    /// holding an incomplete message too long.
    fn sweep_heartbeats(&self) {
        let now = self.clock();
        let now_ms = self.clock_ms();
        let interval = self.node.config.heartbeat_secs;
        for conn in self.open_conns() {
            conn.heartbeat(now, now_ms, interval, self);
        }
    }
}

/// The spare descriptor (see the module docs); `None` if even that cannot be opened now.
fn open_spare() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

/// Pops the front of a deadline queue if its deadline has passed.
fn pop_expired(queue: &RefCell<VecDeque<(u64, ConnId)>>, now: u64) -> Option<ConnId> {
    let mut queue = queue.borrow_mut();
    match queue.front() {
        Some(&(deadline, id)) if deadline <= now => {
            queue.pop_front();
            Some(id)
        }
        _ => None,
    }
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
pub async fn run(index: usize, node: Arc<NodeShared>, listener: OwnedFd, inbox: Inbox) {
    let shard = match Shard::new(index, node, listener) {
        Ok(shard) => Rc::new(shard),
        Err(error) => {
            tracing::error!(shard = index, %error, "cannot set up the shard's epoll set");
            return;
        }
    };
    glommio::spawn_local(event_loop(shard.clone())).detach();
    glommio::spawn_local(sweep_loop(shard.clone())).detach();
    glommio::spawn_local(inbox_loop(shard.clone(), inbox)).detach();

    shard.stopping.wait().await;
    let grace = Duration::from_millis(shard.node.config.grace_period_ms);
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
            futures_lite::future::poll_fn(|cx| {
                let current = shard.event_loop.take();
                match current {
                    Some(w) if w.will_wake(cx.waker()) => shard.event_loop.set(Some(w)),
                    _ => shard.event_loop.set(Some(cx.waker().clone())),
                }
                let rung = shard.doorbell.answer(cx);
                if rung || !shard.to_close.borrow().is_empty() || !shard.to_read.borrow().is_empty()
                {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
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
            Poll::Pending
                if shard.node.draining.load(Ordering::SeqCst) && !shard.stopping.fired() =>
            {
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
