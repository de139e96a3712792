//! One shard: a glommio executor pinned to a core that owns its listener, its connections
//! and its tables outright.
//!
//! A shard runs four kinds of task: the acceptor (its own `SO_REUSEPORT` listener), one task
//! per connection ([`crate::session`]), the inbox task (envelopes from other shards, see
//! [`crate::router`]) and the heartbeat sweeper. Everything is single-threaded, so tables are
//! plain `RefCell`s; the rule that keeps them sound is that a connection's own task is the
//! only one that registers or unregisters it, and no borrow is held across an `.await`.
//!
//! Fan-out to many local recipients snapshots the recipient list and yields to the executor
//! every [`FANOUT_CHUNK`] sockets, so a publication to 50,000 subscribers does not stall the
//! shard's other connections for the whole loop.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::os::unix::io::FromRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use ahash::RandomState;
use bytes::Bytes;
use glommio::net::TcpListener;
use indexmap::IndexMap;
use smallvec::SmallVec;

use crate::auth::valid_name;
use crate::metrics::{self, Delivery, Rejection, ShardMetrics};
use crate::node::NodeShared;
use crate::protocol::{self, MidGenerator};
use crate::router::{conn_id, shard_of, ConnId, Directory, Envelope, Inbox};
use crate::session::{self, Conn};

/// Sockets written per fan-out turn before the shard yields to its other tasks.
pub const FANOUT_CHUNK: usize = 512;

/// Size of the per-shard read buffer every connection of the shard reads through.
pub const SCRATCH_BYTES: usize = 64 * 1024;

/// How often the sweeper runs (heartbeats are checked at this granularity).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Which local connections belong to which user and topic.
#[derive(Default)]
struct LocalTables {
    conns: HashMap<ConnId, Rc<Conn>, RandomState>,
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
    mids: RefCell<MidGenerator>,
    next_conn: Cell<u64>,
    started: Instant,
    /// Fires when the shard starts shutting down.
    pub stopping: Signal,
    sessions: Cell<usize>,
}

impl Shard {
    fn new(index: usize, node: Arc<NodeShared>) -> Self {
        Shard {
            index,
            metrics: node.metrics.shard(index).clone(),
            scratch: RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice()),
            tables: RefCell::default(),
            directory: RefCell::default(),
            mids: RefCell::new(MidGenerator::new(node.node_number, index)),
            next_conn: Cell::new(1),
            started: Instant::now(),
            stopping: Signal::default(),
            sessions: Cell::new(0),
            node,
        }
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

    /// Counts a session task; the returned guard uncounts it when the task ends.
    pub fn session_started(self: &Rc<Self>) -> SessionGuard {
        self.sessions.set(self.sessions.get() + 1);
        SessionGuard(self.clone())
    }

    /// Adds an upgraded connection to the tables and tells the user's home shard.
    pub fn register(&self, conn: &Rc<Conn>) {
        let mut tables = self.tables.borrow_mut();
        tables.conns.insert(conn.id, conn.clone());
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
        }
    }

    /// Removes a connection from every table; the last subscriber of a topic leaving tells
    /// the topic's home shard, and the user's home shard forgets the device.
    pub fn unregister(&self, conn: &Conn) {
        let mut tables = self.tables.borrow_mut();
        if tables.conns.remove(&conn.id).is_none() {
            return;
        }
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

    /// Sends a message for `user` to the user's home shard, which forwards it to the shards
    /// holding the user's devices.
    pub fn route_user(&self, user: Arc<str>, frame: Bytes, except: Option<ConnId>) {
        let home = self.node.mesh.home(&user);
        self.send(
            home,
            Envelope::RouteUser {
                user,
                frame,
                except,
            },
        );
    }

    /// Sends a publication to the topic's home shard.
    pub fn route_topic(&self, topic: Arc<str>, frame: Bytes) {
        let home = self.node.mesh.home(&topic);
        self.send(home, Envelope::RouteTopic { topic, frame });
    }

    /// Handles one envelope from the inbox.
    async fn handle(&self, envelope: Envelope) {
        self.metrics.envelopes_in.inc();
        match envelope {
            Envelope::RouteUser {
                user,
                frame,
                except,
            } => {
                let shards = self.directory.borrow().user_shards(&user);
                self.node
                    .mesh
                    .send_to_mask(shards, &self.metrics, || Envelope::DeliverUser {
                        user: user.clone(),
                        frame: frame.clone(),
                        except,
                    });
            }
            Envelope::RouteTopic { topic, frame } => {
                let shards = self.directory.borrow().topic_shards(&topic);
                self.node
                    .mesh
                    .send_to_mask(shards, &self.metrics, || Envelope::DeliverTopic {
                        topic: topic.clone(),
                        frame: frame.clone(),
                    });
            }
            Envelope::DeliverUser {
                user,
                frame,
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
                self.deliver(&recipients, &frame, Delivery::Direct).await;
            }
            Envelope::DeliverTopic { topic, frame } => {
                let recipients: Vec<Rc<Conn>> = self
                    .tables
                    .borrow()
                    .topics
                    .get(&topic)
                    .map(|subs| subs.values().cloned().collect())
                    .unwrap_or_default();
                self.deliver(&recipients, &frame, Delivery::Topic).await;
            }
            Envelope::Broadcast { frame } => {
                let recipients: Vec<Rc<Conn>> = self
                    .tables
                    .borrow()
                    .users
                    .values()
                    .flatten()
                    .cloned()
                    .collect();
                self.deliver(&recipients, &frame, Delivery::Broadcast).await;
            }
            Envelope::DeviceOnline { user, conn } => {
                let max = self.node.config.max_devices_per_user;
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
                self.directory
                    .borrow_mut()
                    .topic_interest(topic, shard, active);
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
                let conn = self.tables.borrow().conns.get(&conn).cloned();
                if let Some(conn) = conn {
                    conn.request_close(code, reason);
                }
            }
            Envelope::Shutdown => self.begin_stop(),
        }
    }

    /// Writes `frame` to every recipient, yielding every [`FANOUT_CHUNK`] sockets.
    async fn deliver(&self, recipients: &[Rc<Conn>], frame: &Bytes, kind: Delivery) {
        let limit = self.node.config.max_outbound_bytes;
        for chunk in recipients.chunks(FANOUT_CHUNK) {
            let mut delivered = 0;
            for conn in chunk {
                if conn.push(frame, limit, &self.metrics) {
                    delivered += 1;
                }
            }
            self.metrics.delivered(kind, delivered);
            if recipients.len() > FANOUT_CHUNK {
                glommio::yield_if_needed().await;
            }
        }
    }

    fn begin_stop(&self) {
        if self.stopping.fired() {
            return;
        }
        self.stopping.fire();
        let conns: Vec<Rc<Conn>> = self.tables.borrow().conns.values().cloned().collect();
        for conn in conns {
            conn.request_close(crate::ws::close::GOING_AWAY, metrics::Close::Shutdown);
        }
    }

    /// Pings connections due a heartbeat and closes those silent for three intervals.
    fn sweep(&self) {
        let now = self.clock();
        let interval = self.node.config.heartbeat_secs;
        let limit = self.node.config.max_outbound_bytes;
        for conn in self.tables.borrow().conns.values() {
            conn.heartbeat(now, interval, limit, &self.metrics);
        }
    }
}

/// Keeps a shard's session count; dropping it marks the session finished.
pub struct SessionGuard(Rc<Shard>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions.set(self.0.sessions.get() - 1);
    }
}

/// The shard's main future: runs until shutdown and the grace period are over.
pub async fn run(index: usize, node: Arc<NodeShared>, listener: OwnedFd, inbox: Inbox) {
    let shard = Rc::new(Shard::new(index, node));
    // SAFETY: `listener` is an owned, bound and listening TCP socket handed over whole.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    glommio::spawn_local(accept_loop(shard.clone(), listener)).detach();
    glommio::spawn_local(sweep_loop(shard.clone())).detach();
    glommio::spawn_local(inbox_loop(shard.clone(), inbox)).detach();

    shard.stopping.wait().await;
    let grace = Duration::from_millis(shard.node.config.grace_period_ms);
    let deadline = Instant::now() + grace;
    while shard.sessions.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if shard.sessions.get() > 0 {
        tracing::warn!(
            shard = index,
            open = shard.sessions.get(),
            "grace period over; dropping connections still open"
        );
    }
}

async fn inbox_loop(shard: Rc<Shard>, inbox: Inbox) {
    while let Some(envelope) = inbox.recv().await {
        shard.handle(envelope).await;
        glommio::yield_if_needed().await;
    }
}

async fn sweep_loop(shard: Rc<Shard>) {
    while !shard.stopping.fired() {
        glommio::timer::sleep(SWEEP_INTERVAL).await;
        shard.sweep();
    }
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.stopping.wait().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                backoff = Duration::from_millis(5);
                glommio::spawn_local(session::serve(shard.clone(), stream)).detach();
            }
            Some(Err(error)) => {
                // EMFILE/ENFILE/ENOBUFS: the failing accept would spin; back off instead.
                shard.metrics.accept_errors.inc();
                tracing::warn!(shard = shard.index, %error, ?backoff, "accept failed; backing off");
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
