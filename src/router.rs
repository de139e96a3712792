//! Cross-shard routing: the envelopes shards hand each other, the inboxes that carry them,
//! and the directory that says which shards hold a user's devices or a topic's subscribers.
//!
//! # Inboxes
//! Every shard has an inbox that any thread may send to: other shards, the HTTP API, the
//! Redis bridge. It is a two-lane [`crate::mailbox`]: routes and deliveries on the bounded
//! message lane (full: dropped and counted, `drops{reason=inbox_full}`), devices, topic
//! interest, closes and queries on the control lane that never drops. Stopping is a flag
//! plus a ring of every bell, so it cannot be lost either.
//!
//! # Directory
//! Each user and each topic has a *home shard*, a pure function of its name. The home shard
//! keeps the user's devices (connection ids, oldest first: this is where the device limit is
//! enforced) and the set of shards with subscribers of the topic. A message for a user or
//! topic goes to the home shard, which forwards the already-rendered frame only to the shards
//! that hold recipients. No locks and no shared maps: each entry lives on exactly one shard,
//! so a node with a million users holds a million entries, not one per shard.

use std::collections::HashMap;
use std::sync::Arc;

use ahash::RandomState;
use bytes::Bytes;
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::history::{Position, Replay, StreamKey};
use crate::mailbox::{self, Lane, Laned, Mailbox, Refused};
use crate::metrics::{self, Delivery, NodeMetrics, ShardMetrics};

/// A connection id, unique within a node: the shard in the top 8 bits, a per-shard sequence
/// below. Shown to clients in `hello` as `conn`.
pub type ConnId = u64;

const CONN_SHARD_SHIFT: u32 = 56;

/// The connection id for the `seq`-th connection of `shard`.
pub fn conn_id(shard: usize, seq: u64) -> ConnId {
    ((shard as u64) << CONN_SHARD_SHIFT) | (seq & ((1 << CONN_SHARD_SHIFT) - 1))
}

/// The shard a connection lives on.
pub fn shard_of(conn: ConnId) -> usize {
    (conn >> CONN_SHARD_SHIFT) as usize
}

/// A message on its way through the node: its id (for logs and drop accounting), when it
/// entered the node (for the delivery-latency histogram and the bus hold limit), and its
/// [`Body`].
#[derive(Debug, Clone)]
pub struct Message {
    /// Message id.
    pub mid: u64,
    /// [`metrics::monotonic_ns`] when the message entered the node.
    pub entered_ns: u64,
    /// What recipients get.
    pub body: Body,
}

/// What a message's recipients get.
///
/// Almost every message is one frame for every recipient, rendered once per node and
/// shared. A publish to many users or many topics at once is the exception: each user's
/// frame names that user (`to`), each topic's frame its topic, so rendering them all up
/// front would cost one copy of `data` per target before anything is written (a 256 KiB
/// publish to 1,000 users: 256 MB). Such a message travels as a [`Template`] instead: a
/// user's frame is rendered on the recipient's shard just before its sockets are written, a
/// topic's frame once on the topic's home shard, and only if someone there subscribes.
/// Memory stays one copy of `data` plus the frames being written.
#[derive(Debug, Clone)]
pub enum Body {
    /// The complete WebSocket frame, the same for every recipient.
    Frame(Bytes),
    /// A direct message rendered per recipient user (`msg` with `to`).
    PerUser(Arc<Template>),
    /// A publication rendered per topic (`pub` with `topic`).
    PerTopic(Arc<Template>),
}

/// A message to many users or topics, rendered per target (see [`Body`]).
#[derive(Debug)]
pub struct Template {
    /// Server time of the message, ms.
    pub ts: u64,
    /// The sending user (`None` from the server; always `None` for a publication).
    pub from: Option<Arc<str>>,
    /// The recipient every frame names (a client's `send`, whose sender's copies name the
    /// recipient too); `None`: each user's frame names that user.
    pub to: Option<Arc<str>>,
    /// The message's `data`, JSON text passed through untouched.
    pub data: Arc<str>,
}

impl Message {
    /// A message entering the node now.
    fn entering(mid: u64, body: Body) -> Self {
        Message {
            mid,
            entered_ns: metrics::monotonic_ns(),
            body,
        }
    }

    /// A message with one frame for every recipient, entering the node now.
    pub fn new(mid: u64, frame: Bytes) -> Self {
        Self::entering(mid, Body::Frame(frame))
    }

    /// A direct message rendered per recipient user, entering the node now.
    pub fn per_user(mid: u64, template: Template) -> Self {
        Self::entering(mid, Body::PerUser(Arc::new(template)))
    }

    /// A publication rendered per topic, entering the node now.
    pub fn per_topic(mid: u64, template: Template) -> Self {
        Self::entering(mid, Body::PerTopic(Arc::new(template)))
    }

    /// The frame the recipients of `target` get: the user of a direct message, the topic of
    /// a publication (ignored for a message that is one frame already).
    pub fn frame_for(&self, target: &str) -> Bytes {
        use crate::protocol::render;
        match &self.body {
            Body::Frame(frame) => frame.clone(),
            Body::PerUser(t) => {
                let to = t.to.as_deref().unwrap_or(target);
                render::msg(t.from.as_deref(), to, self.mid, t.ts, &t.data)
            }
            Body::PerTopic(t) => render::publication(Some(target), self.mid, t.ts, &t.data),
        }
    }

    /// This message as the one frame `target`'s recipients get, with the same id and entry
    /// time (a topic's home shard renders a publication once for all its subscribers).
    pub fn rendered_for(&self, target: &str) -> Message {
        Message {
            mid: self.mid,
            entered_ns: self.entered_ns,
            body: Body::Frame(self.frame_for(target)),
        }
    }

    /// The message as it is kept in `target`'s stream (the mailbox of user `target`, or
    /// topic `target`'s history); `None` for a message that is one frame already.
    pub fn stream_entry(&self, target: &str) -> Option<crate::history::Message> {
        let (Body::PerUser(t) | Body::PerTopic(t)) = &self.body else {
            return None;
        };
        Some(crate::history::Message {
            mid: self.mid,
            ts: t.ts,
            from: t.from.clone(),
            to: t.to.clone().filter(|to| **to != *target),
            data: t.data.clone(),
        })
    }

    /// The frame `target`'s recipients get when the message is number `at` of `target`'s
    /// stream (see [`Message::stream_entry`]): `msg` or `pub` with `seq` and `ep`. A message
    /// that is one frame already is never streamed and keeps its frame.
    pub fn frame_in_stream(&self, target: &str, at: crate::protocol::StreamPos<'_>) -> Bytes {
        use crate::protocol::render;
        match &self.body {
            Body::Frame(frame) => frame.clone(),
            Body::PerUser(t) => {
                let to = t.to.as_deref().unwrap_or(target);
                render::msg_in_stream(t.from.as_deref(), to, self.mid, t.ts, &t.data, at)
            }
            Body::PerTopic(t) => render::publication_in_stream(target, self.mid, t.ts, &t.data, at),
        }
    }

    /// This message as the one frame `frame` with the same id and entry time (a streamed
    /// message, rendered with its position on its stream's home shard).
    pub fn with_frame(&self, frame: Bytes) -> Message {
        Message {
            mid: self.mid,
            entered_ns: self.entered_ns,
            body: Body::Frame(frame),
        }
    }

    /// The template of a message rendered per target (`None`: one frame for everyone).
    pub fn template(&self) -> Option<&Arc<Template>> {
        match &self.body {
            Body::Frame(_) => None,
            Body::PerUser(t) | Body::PerTopic(t) => Some(t),
        }
    }

    /// The frame of a broadcast, which is always one [`Body::Frame`] for everyone.
    pub fn shared_frame(&self) -> Bytes {
        self.frame_for("")
    }

    /// Bytes this message holds (for the bus's byte budget).
    pub fn size(&self) -> usize {
        match &self.body {
            Body::Frame(frame) => frame.len(),
            Body::PerUser(t) | Body::PerTopic(t) => {
                t.data.len() + t.from.as_deref().map_or(0, str::len)
            }
        }
    }
}

/// What one shard hands another.
#[derive(Debug)]
pub enum Envelope {
    /// To the user's home shard: deliver to every device of `user` except `except`.
    RouteUser {
        /// Recipient.
        user: Arc<str>,
        /// The message.
        message: Message,
        /// The sending connection, which does not get its own message back.
        except: Option<ConnId>,
        /// Its position in the user's mailbox when Redis gave it one (clustered); `None`:
        /// the home shard appends a template to the mailbox it keeps, if any.
        at: Option<Position>,
    },
    /// To the topic's home shard: deliver to every subscriber.
    RouteTopic {
        /// Topic.
        topic: Arc<str>,
        /// The message.
        message: Message,
        /// Its position in the topic's history when Redis gave it one (clustered).
        at: Option<Position>,
    },
    /// Deliver to this shard's connections of `user` (from the home shard).
    DeliverUser {
        /// Recipient.
        user: Arc<str>,
        /// The message.
        message: Message,
        /// Connection to skip.
        except: Option<ConnId>,
        /// Its sequence number in the user's mailbox (0: not streamed).
        seq: u64,
    },
    /// Deliver to this shard's subscribers of `topic` (from the home shard).
    DeliverTopic {
        /// Topic.
        topic: Arc<str>,
        /// The message.
        message: Message,
        /// Its sequence number in the topic's history (0: not streamed).
        seq: u64,
    },
    /// To a connection's shard, from its user's home shard: the device is registered and
    /// the mailbox stands at `mailbox` (`None`: no mailbox yet), so its `hello` can go out.
    Welcome {
        /// User.
        user: Arc<str>,
        /// The new connection.
        conn: ConnId,
        /// The mailbox's last position.
        mailbox: Option<Position>,
    },
    /// To a stream's home shard: replay `key` after the client's position to `conn`.
    Resume {
        /// The stream.
        key: StreamKey,
        /// The asking connection.
        conn: ConnId,
        /// The client's last sequence number.
        since_seq: u64,
        /// The epoch it belongs to.
        since_ep: Box<str>,
        /// The request's id, echoed in the ack.
        id: Option<Box<RawValue>>,
    },
    /// To the asking connection's shard: the replay of a stream, then its ack. On the
    /// message lane, behind the live messages the home shard forwarded before it.
    Replay {
        /// The stream.
        key: StreamKey,
        /// The asking connection.
        conn: ConnId,
        /// Replayed frames with their sequence numbers, oldest first.
        frames: Vec<(u64, Bytes)>,
        /// The `ack` (`recovered`, `seq`, `ep`).
        ack: Bytes,
    },
    /// To a stream's home shard, from itself: what Redis answered to a resume (`None`:
    /// Redis could not be asked), to be sent on as an [`Envelope::Replay`].
    Replayed {
        /// The stream.
        key: StreamKey,
        /// The asking connection.
        conn: ConnId,
        /// Redis's answer.
        replay: Option<Replay>,
        /// The request's id, echoed in the ack.
        id: Option<Box<RawValue>>,
    },
    /// To every shard, from the bridge: Redis lost every stream (the cluster epoch changed),
    /// so streams start again at `seq` 1 under new epochs and the positions connections
    /// were welcomed at or shards last delivered mean nothing any more.
    StreamsLost,
    /// To a stream's home shard: the history API's read.
    ReadHistory {
        /// The stream.
        key: StreamKey,
        /// Messages after this sequence number of the current epoch.
        after_seq: u64,
        /// At most this many.
        limit: usize,
        /// Where the JSON answer goes.
        reply: Reply<Vec<u8>>,
    },
    /// Deliver to every user connection of this shard.
    Broadcast {
        /// The message.
        message: Message,
    },
    /// To the user's home shard: a device connected.
    DeviceOnline {
        /// User.
        user: Arc<str>,
        /// The new connection.
        conn: ConnId,
    },
    /// To the user's home shard: a device disconnected.
    DeviceOffline {
        /// User.
        user: Arc<str>,
        /// The closed connection.
        conn: ConnId,
    },
    /// To the topic's home shard: `shard` gained its first or lost its last subscriber.
    TopicInterest {
        /// Topic.
        topic: Arc<str>,
        /// The shard whose interest changed.
        shard: usize,
        /// Whether it now has subscribers.
        active: bool,
    },
    /// To the user's home shard: close every device of `user` with `code`.
    CloseUser {
        /// User.
        user: Arc<str>,
        /// WebSocket close code.
        code: u16,
        /// Metric label.
        reason: metrics::Close,
    },
    /// Close one connection of this shard with `code`.
    CloseConn {
        /// Connection.
        conn: ConnId,
        /// WebSocket close code.
        code: u16,
        /// Metric label.
        reason: metrics::Close,
    },
    /// To the user's home shard: how many devices `user` has on this node.
    QueryUser {
        /// User.
        user: Arc<str>,
        /// Where the count goes.
        reply: Reply<usize>,
    },
    /// To the topic's home shard: which shards have subscribers of `topic`.
    QueryTopic {
        /// Topic.
        topic: Arc<str>,
        /// Where the shard set goes.
        reply: Reply<ShardMask>,
    },
    /// How many subscribers of `topic` this shard has.
    CountSubscribers {
        /// Topic.
        topic: Arc<str>,
        /// Where the count goes.
        reply: Reply<usize>,
    },
}

impl Laned for Envelope {
    fn lane(&self) -> Lane {
        match self {
            Envelope::RouteUser { .. }
            | Envelope::RouteTopic { .. }
            | Envelope::DeliverUser { .. }
            | Envelope::DeliverTopic { .. }
            | Envelope::Replay { .. }
            | Envelope::Broadcast { .. } => Lane::Message,
            Envelope::DeviceOnline { .. }
            | Envelope::Welcome { .. }
            | Envelope::Resume { .. }
            | Envelope::Replayed { .. }
            | Envelope::StreamsLost
            | Envelope::ReadHistory { .. }
            | Envelope::DeviceOffline { .. }
            | Envelope::TopicInterest { .. }
            | Envelope::CloseUser { .. }
            | Envelope::CloseConn { .. }
            | Envelope::QueryUser { .. }
            | Envelope::QueryTopic { .. }
            | Envelope::CountSubscribers { .. } => Lane::Control,
        }
    }
}

/// Who a message is for (see [`Router::route`]).
#[derive(Debug, Clone)]
pub enum Route {
    /// Every device of each user: a direct message's recipient, and its sender for the
    /// copies its other devices get (one bus message for both).
    Users(Users),
    /// Every subscriber of a topic.
    Topic(Arc<str>),
    /// Every user connection.
    Broadcast,
}

/// The users a direct message goes to (usually one, or the recipient and the sender).
pub type Users = SmallVec<[Arc<str>; 2]>;

/// How far a message is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// This node and, clustered, the other nodes: a message entering here.
    Cluster,
    /// Only this node: a message another node already routed to the cluster.
    Node,
    /// Only the cluster bus: a streamed message on a clustered node (a mailbox message, a
    /// publication to a topic with history). Redis numbers it and publishes it to every
    /// node holding recipients, this one included, so every node delivers it in Redis's
    /// order and with its position. While Redis is down, this node delivers it at once
    /// without a position (a shard never waits for Redis) and the bus appends it later.
    Streamed,
}

/// Where messages for other nodes go (the cluster bus); implemented by
/// [`crate::cluster::Bus`], so routing needs no knowledge of Redis.
pub trait Uplink: Send + Sync {
    /// Hands `message` for `to` to the other nodes; returns how many hand-offs were dropped
    /// (counted by the uplink).
    fn forward(&self, to: &Route, message: &Message) -> usize;

    /// Hands a streamed message (see [`Reach::Streamed`]) for `to` to Redis, which appends
    /// it and routes it to every node with recipients, this one included unless
    /// `delivered_here`; `except` is the sending connection. Returns how many hand-offs
    /// were dropped (counted by the uplink).
    fn forward_streamed(
        &self,
        to: &Route,
        message: &Message,
        except: Option<ConnId>,
        delivered_here: bool,
    ) -> usize;

    /// Whether Redis is reachable now (streamed messages wait for it).
    fn is_up(&self) -> bool;
}

/// The one entry through which every message enters routing: the API's publisher, the
/// shards (client `pub` and `send`) and the bridge (messages from other nodes) all call
/// [`Router::route`]. Cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Router {
    mesh: Mesh,
    uplink: Option<Arc<dyn Uplink>>,
}

impl Router {
    /// Routing over `mesh`, and through `uplink` to the other nodes when clustered.
    pub fn new(mesh: Mesh, uplink: Option<Arc<dyn Uplink>>) -> Self {
        Router { mesh, uplink }
    }

    /// The shards' inboxes.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// Routes `message` to `to`, skipping connection `except`: within [`Reach::Cluster`],
    /// first to the other nodes (so a slow local fan-out never delays them), then into this
    /// node through each target's home shard (which forwards to the shards holding
    /// recipients), or to every shard for a broadcast. Returns how many hand-offs could not
    /// be queued (each counted: `metrics` for shard inboxes, the bus's own for the bus).
    /// Within [`Reach::Streamed`] on a clustered node, only to the bus: the message comes
    /// back through this node's own subscription, numbered (or, while Redis is down, to
    /// this node at once without a position, and to the bus for later).
    pub fn route(
        &self,
        to: Route,
        message: Message,
        except: Option<ConnId>,
        reach: Reach,
        metrics: &ShardMetrics,
    ) -> usize {
        let mut dropped = 0;
        match (reach, &self.uplink) {
            (Reach::Streamed, Some(uplink)) if uplink.is_up() => {
                return uplink.forward_streamed(&to, &message, except, false);
            }
            // Redis is down: local delivery goes on, without a position (as a v1 frame),
            // and Redis appends the message and routes it to the other nodes once back.
            (Reach::Streamed, Some(uplink)) => {
                dropped += uplink.forward_streamed(&to, &message, except, true);
            }
            (Reach::Cluster, Some(uplink)) => dropped += uplink.forward(&to, &message),
            _ => {}
        }
        dropped + self.mesh.route(to, message, except, metrics)
    }
}

/// The answer channel of a query envelope (the asker awaits the other end).
pub type Reply<T> = tokio::sync::oneshot::Sender<T>;

impl Envelope {
    /// The id of the message an envelope carries, if it carries one.
    pub fn mid(&self) -> Option<u64> {
        match self {
            Envelope::RouteUser { message, .. }
            | Envelope::RouteTopic { message, .. }
            | Envelope::DeliverUser { message, .. }
            | Envelope::DeliverTopic { message, .. }
            | Envelope::Broadcast { message } => Some(message.mid),
            _ => None,
        }
    }

    /// The kind of delivery a message envelope carries (for metrics).
    pub fn delivery_kind(&self) -> Option<Delivery> {
        match self {
            Envelope::RouteUser { .. } | Envelope::DeliverUser { .. } => Some(Delivery::Direct),
            Envelope::RouteTopic { .. } | Envelope::DeliverTopic { .. } => Some(Delivery::Topic),
            Envelope::Broadcast { .. } => Some(Delivery::Broadcast),
            _ => None,
        }
    }
}

/// The receiving end of one shard's inbox.
pub type Inbox = crate::mailbox::Inbox<Envelope>;

/// The home shard of every user and topic: a pure function of its name and the number of
/// shards, the same on every shard (fixed hash seeds).
#[derive(Clone)]
pub struct Homes {
    hasher: RandomState,
    shards: usize,
}

impl Homes {
    /// Homes over `shards` shards.
    pub fn new(shards: usize) -> Self {
        Homes {
            // Fixed seeds: every shard (and, later, every node) must agree on home shards.
            hasher: RandomState::with_seeds(0x5348_4152, 0x4443_4153, 0x5421_7a17, 0x0b5e_55ed),
            shards,
        }
    }

    /// The home shard of a user id or topic name.
    pub fn home(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) % self.shards as u64) as usize
    }
}

/// Senders to every shard's inbox. Cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Mesh {
    lanes: Arc<[Mailbox<Envelope>]>,
    homes: Homes,
}

impl Mesh {
    /// A mesh of `shards` inboxes holding `capacity` messages each, and their receivers in
    /// shard order.
    pub fn new(shards: usize, capacity: usize) -> (Mesh, Vec<Inbox>) {
        let (lanes, inboxes): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| mailbox::mailbox(capacity)).unzip();
        let mesh = Mesh {
            lanes: lanes.into(),
            homes: Homes::new(shards),
        };
        (mesh, inboxes)
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.lanes.len()
    }

    /// The home shards.
    pub fn homes(&self) -> &Homes {
        &self.homes
    }

    /// The home shard of a user id or topic name.
    pub fn home(&self, key: &str) -> usize {
        self.homes.home(key)
    }

    /// Hands `envelope` to `shard`, waking it if it sleeps. Never blocks. A message is
    /// dropped and counted on `metrics` (the sender's) when the shard's message lane is
    /// full; a control envelope is never dropped while the shard runs.
    pub fn to_shard(&self, shard: usize, envelope: Envelope, metrics: &ShardMetrics) -> bool {
        match self.lanes[shard].post(envelope) {
            Ok(()) => true,
            Err(Refused::Full(dropped)) => {
                metrics.dropped(metrics::Drop::InboxFull);
                tracing::warn!(
                    shard,
                    mid = dropped.mid(),
                    kind = ?dropped.delivery_kind(),
                    "shard inbox full, message dropped"
                );
                false
            }
            Err(Refused::Gone(_)) => {
                metrics.dropped(metrics::Drop::ShardGone);
                false
            }
        }
    }

    /// Wakes every shard (after a node-wide flag such as draining changed).
    pub fn wake_all(&self) {
        for lane in self.lanes.iter() {
            lane.wake();
        }
    }

    /// Routes `message` into this node (see [`Router::route`]); returns how many hand-offs
    /// could not be queued.
    fn route(
        &self,
        to: Route,
        message: Message,
        except: Option<ConnId>,
        metrics: &ShardMetrics,
    ) -> usize {
        match to {
            Route::Users(users) => users
                .into_iter()
                .filter(|user| {
                    let envelope = Envelope::RouteUser {
                        user: user.clone(),
                        message: message.clone(),
                        except,
                        at: None,
                    };
                    !self.to_shard(self.homes.home(user), envelope, metrics)
                })
                .count(),
            Route::Topic(topic) => {
                let home = self.homes.home(&topic);
                let route = Envelope::RouteTopic {
                    topic,
                    message,
                    at: None,
                };
                usize::from(!self.to_shard(home, route, metrics))
            }
            Route::Broadcast => self.send_to_all(metrics, || Envelope::Broadcast {
                message: message.clone(),
            }),
        }
    }

    /// The history API's read of stream `key` (after `after_seq`, at most `limit`) from its
    /// home shard, as JSON; `None` if the shard could not be asked.
    pub async fn read_history(
        &self,
        key: StreamKey,
        after_seq: u64,
        limit: usize,
        metrics: &NodeMetrics,
    ) -> Option<Vec<u8>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let home = self.homes.home(key.name());
        let read = Envelope::ReadHistory {
            key,
            after_seq,
            limit,
            reply,
        };
        self.to_shard(home, read, metrics.shard(home));
        answer.await.ok()
    }

    /// Subscribers of `topic` on this node: asks the topic's home shard which shards hold
    /// some, then each of those. `None` if a shard could not be asked (inbox gone).
    pub async fn topic_subscribers(&self, topic: &str, metrics: &NodeMetrics) -> Option<usize> {
        let topic: Arc<str> = Arc::from(topic);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let home = self.homes.home(&topic);
        let query = Envelope::QueryTopic {
            topic: topic.clone(),
            reply,
        };
        self.to_shard(home, query, metrics.shard(home));
        let mut total = 0;
        for shard in answer.await.ok()?.iter() {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let count = Envelope::CountSubscribers {
                topic: topic.clone(),
                reply,
            };
            self.to_shard(shard, count, metrics.shard(shard));
            total += answer.await.ok()?;
        }
        Some(total)
    }

    /// Sends `make()` to every shard; returns how many could not be queued.
    fn send_to_all(&self, metrics: &ShardMetrics, mut make: impl FnMut() -> Envelope) -> usize {
        (0..self.shards())
            .filter(|shard| !self.to_shard(*shard, make(), metrics))
            .count()
    }
}

/// A set of shards (at most 64, see [`crate::config::MAX_SHARDS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardMask(u64);

impl ShardMask {
    /// Adds a shard.
    pub fn insert(&mut self, shard: usize) {
        self.0 |= 1 << shard;
    }

    /// Removes a shard.
    pub fn remove(&mut self, shard: usize) {
        self.0 &= !(1 << shard);
    }

    /// Whether no shard is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The shards in ascending order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let shard = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                shard
            })
        })
    }
}

/// What [`Directory::device_online`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAdded {
    /// It is the user's only device (the user came online).
    pub first: bool,
    /// The oldest device, forgotten for the device limit: close it.
    pub evicted: Option<ConnId>,
}

/// The home-shard directory: which shards hold each user's devices and each topic's
/// subscribers, for the users and topics whose home is this shard. Pure data, no I/O.
#[derive(Debug, Default)]
pub struct Directory {
    users: HashMap<Arc<str>, SmallVec<[ConnId; 2]>, RandomState>,
    topics: HashMap<Arc<str>, ShardMask, RandomState>,
}

impl Directory {
    /// Records a new device; when the user now has more than `max_devices`, forgets the
    /// oldest so the caller closes it (4001).
    pub fn device_online(
        &mut self,
        user: Arc<str>,
        conn: ConnId,
        max_devices: usize,
    ) -> DeviceAdded {
        let devices = self.users.entry(user).or_default();
        devices.push(conn);
        DeviceAdded {
            first: devices.len() == 1,
            evicted: (devices.len() > max_devices).then(|| devices.remove(0)),
        }
    }

    /// Forgets a device (no-op if it was already evicted); `true` if it was the user's last.
    pub fn device_offline(&mut self, user: &str, conn: ConnId) -> bool {
        let Some(devices) = self.users.get_mut(user) else {
            return false;
        };
        devices.retain(|c| *c != conn);
        // (An entry is removed with its last device, so an empty one was just emptied.)
        let last = devices.is_empty();
        if last {
            self.users.remove(user);
        }
        last
    }

    /// The user's devices, oldest first.
    pub fn devices(&self, user: &str) -> &[ConnId] {
        self.users.get(user).map_or(&[], |d| d.as_slice())
    }

    /// Shards holding at least one device of `user`.
    pub fn user_shards(&self, user: &str) -> ShardMask {
        let mut mask = ShardMask::default();
        for conn in self.devices(user) {
            mask.insert(shard_of(*conn));
        }
        mask
    }

    /// Records that `shard` has (or no longer has) subscribers of `topic`. Returns whether
    /// the node as a whole just gained its first (`Some(true)`) or lost its last
    /// (`Some(false)`) subscribing shard: the moments the cluster bus (un)subscribes.
    pub fn topic_interest(&mut self, topic: Arc<str>, shard: usize, active: bool) -> Option<bool> {
        if active {
            let mask = self.topics.entry(topic).or_default();
            let was_empty = mask.is_empty();
            mask.insert(shard);
            was_empty.then_some(true)
        } else if let Some(mask) = self.topics.get_mut(&*topic) {
            mask.remove(shard);
            if mask.is_empty() {
                self.topics.remove(&*topic);
                return Some(false);
            }
            None
        } else {
            None
        }
    }

    /// Shards with subscribers of `topic`.
    pub fn topic_shards(&self, topic: &str) -> ShardMask {
        self.topics.get(topic).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Poll};

    #[test]
    fn conn_ids_carry_their_shard() {
        let id = conn_id(17, 123_456);
        assert_eq!(shard_of(id), 17);
        assert_ne!(conn_id(1, 5), conn_id(2, 5));
    }

    #[test]
    fn device_limit_evicts_oldest_and_online_offline_follow_the_count() {
        let mut dir = Directory::default();
        let alice: Arc<str> = "alice".into();
        let added = |first, evicted| DeviceAdded { first, evicted };
        assert_eq!(
            dir.device_online(alice.clone(), conn_id(0, 1), 2),
            added(true, None)
        );
        assert_eq!(
            dir.device_online(alice.clone(), conn_id(1, 1), 2),
            added(false, None)
        );
        assert_eq!(
            dir.device_online(alice.clone(), conn_id(0, 2), 2),
            added(false, Some(conn_id(0, 1)))
        );
        assert_eq!(dir.devices("alice"), &[conn_id(1, 1), conn_id(0, 2)]);
        assert!(!dir.device_offline("alice", conn_id(0, 1)));
        assert_eq!(
            dir.devices("alice").len(),
            2,
            "evicted device going offline is a no-op"
        );
        assert_eq!(
            dir.user_shards("alice").iter().collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert!(!dir.device_offline("alice", conn_id(1, 1)));
        assert!(
            dir.device_offline("alice", conn_id(0, 2)),
            "the last device"
        );
        assert!(!dir.device_offline("alice", conn_id(0, 2)), "only once");
        assert!(dir.users.is_empty());
    }

    #[test]
    fn topic_interest_tracks_shards() {
        let mut dir = Directory::default();
        assert_eq!(dir.topic_interest("t".into(), 3, true), Some(true));
        assert_eq!(dir.topic_interest("t".into(), 5, true), None);
        assert_eq!(dir.topic_shards("t").iter().collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(dir.topic_interest("t".into(), 3, false), None);
        assert_eq!(dir.topic_interest("t".into(), 5, false), Some(false));
        assert_eq!(dir.topic_interest("t".into(), 5, false), None);
        assert!(dir.topic_shards("t").is_empty());
        assert!(dir.topics.is_empty());
    }

    #[test]
    fn route_hands_a_message_to_the_home_shard_or_to_every_shard() {
        let (mesh, inboxes) = Mesh::new(4, 16);
        let metrics = ShardMetrics::default();
        let message = || Message::new(9, Bytes::from_static(b"m"));
        let waker = futures_lite::future::block_on(futures_lite::future::poll_fn(|cx| {
            Poll::Ready(cx.waker().clone())
        }));
        let mut cx = Context::from_waker(&waker);
        let mut taken = |shard: usize| match inboxes[shard].poll_recv(&mut cx) {
            Poll::Ready(Some(envelope)) => Some(envelope),
            _ => None,
        };

        let home = mesh.home("alice");
        assert_eq!(
            mesh.route(
                Route::Users(smallvec::smallvec!["alice".into()]),
                message(),
                Some(3),
                &metrics
            ),
            0
        );
        assert!(matches!(
            taken(home),
            Some(Envelope::RouteUser { ref user, except: Some(3), .. }) if &**user == "alice"
        ));

        let home = mesh.home("room");
        assert_eq!(
            mesh.route(Route::Topic("room".into()), message(), None, &metrics),
            0
        );
        assert!(
            matches!(taken(home), Some(Envelope::RouteTopic { ref topic, .. }) if &**topic == "room")
        );

        assert_eq!(mesh.route(Route::Broadcast, message(), None, &metrics), 0);
        for shard in 0..4 {
            assert!(matches!(taken(shard), Some(Envelope::Broadcast { .. })));
            assert!(taken(shard).is_none(), "once per shard");
        }
    }

    #[test]
    fn masks() {
        let mut mask = ShardMask::default();
        for shard in [63, 0, 5] {
            mask.insert(shard);
        }
        assert_eq!(mask.iter().collect::<Vec<_>>(), vec![0, 5, 63]);
        mask.remove(5);
        assert_eq!(mask.iter().collect::<Vec<_>>(), vec![0, 63]);
    }

    #[test]
    fn inbox_delivers_and_counts_overflow() {
        let (mesh, inboxes) = Mesh::new(2, 1);
        let metrics = ShardMetrics::default();
        let message = || Envelope::Broadcast {
            message: Message::new(7, Bytes::from_static(b"x")),
        };
        let control = || Envelope::CloseConn {
            conn: 1,
            code: 1000,
            reason: metrics::Close::Kicked,
        };
        assert!(mesh.to_shard(1, message(), &metrics));
        assert!(!mesh.to_shard(1, message(), &metrics), "message lane full");
        assert_eq!(metrics.drops[metrics::Drop::InboxFull as usize].get(), 1);
        for _ in 0..10 {
            assert!(
                mesh.to_shard(1, control(), &metrics),
                "control is never dropped"
            );
        }
        let waker = futures_lite::future::block_on(futures_lite::future::poll_fn(|cx| {
            Poll::Ready(cx.waker().clone())
        }));
        let mut cx = Context::from_waker(&waker);
        assert!(
            matches!(
                inboxes[1].poll_recv(&mut cx),
                Poll::Ready(Some(Envelope::CloseConn { .. }))
            ),
            "control comes first"
        );
        for _ in 0..9 {
            assert!(inboxes[1].poll_recv(&mut cx).is_ready());
        }
        assert!(matches!(
            inboxes[1].poll_recv(&mut cx),
            Poll::Ready(Some(Envelope::Broadcast { .. }))
        ));
        assert!(inboxes[1].poll_recv(&mut cx).is_pending());
        assert!(mesh.home("alice") < 2);
        assert_eq!(mesh.home("alice"), mesh.clone().home("alice"));
    }
}
