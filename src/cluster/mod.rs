//! The cluster: nodes made one gateway through Redis.
//!
//! This module owns the [`Bus`], the handle shards and the HTTP API use to reach other nodes,
//! and the bridge thread behind it ([`bridge`]), which owns every Redis connection. Nothing
//! else in the process talks to Redis, and nothing here ever blocks a shard:
//!
//! - **Messages** (direct, topic, broadcast, kick) go to the bridge over a lane bounded
//!   both in messages (`bridge_queue_capacity`) and in bytes (`bridge_queue_max_bytes`,
//!   counted until the bridge is done with a message, retries included). When it is full
//!   (Redis slow or down for long) the message is dropped and counted
//!   (`shardcast_bus_drops_total{reason="bus_full"}`), never waited for. While Redis is
//!   down the lane is the holding queue; messages older than `bridge_hold_ms` when Redis
//!   returns are dropped and counted (`reason="stale"`) rather than delivered late.
//! - **Control** (a device came or went, a topic gained its first or lost its last local
//!   subscriber) goes over an unbounded lane, because losing one would leave a ghost route or
//!   a deaf topic. It is bounded by connection and subscription events, not by traffic, and
//!   the bridge folds it into its own tables at once, Redis up or not: those tables are what
//!   it re-publishes when Redis comes back. Resumes' stream reads travel here too, behind
//!   the changes they depend on (bounded by clients' requests, which are rate-limited).
//! - **Queries** from the API (presence, nodes, topic counts) go over a small bounded tokio
//!   channel and are answered asynchronously; a full channel or a down bus answers 503.
//!
//! Messages and control reach the bridge through the same two-lane [`crate::mailbox`] as
//! shards use: a burst of sends costs one wake-up. Local delivery never waits for any of
//! this: shards deliver to their own sockets first and hand the bus a copy of the
//! already-rendered message for the other nodes.
//!
//! The Redis layout, and why routes are leased per node rather than per user, is in
//! [`redis_layout`]; the envelope format in [`wire`]; how retried messages are delivered once
//! in [`dedupe`].

pub(crate) mod bridge;
pub(crate) mod dedupe;
pub mod redis_layout;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::history::{Position, Replay, StreamKey};
use crate::mailbox::{self, Inbox, Mailbox};
use crate::metrics::{BusDrop, BusMetrics, BusReading, LogLimiter};
use crate::router::{ConnId, Message, Route, Template, Uplink, Users};
use crate::upstream::redis_streams::UpstreamAppend;

/// Users per bus message of a multi-user publish: one route script each, so Redis never
/// runs one script over an unbounded number of keys.
const USERS_PER_BUS_MESSAGE: usize = 512;

/// Queries the API may have waiting for the bridge at once; more are answered 503.
const QUERY_CAPACITY: usize = 1024;

/// A streamed message on its way to the bus (see [`Bus::to_mailboxes`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamedMessage<'a> {
    /// The message, a template.
    pub(crate) message: &'a Message,
    /// Its template.
    pub(crate) template: &'a Arc<Template>,
    /// The sending connection, which does not get its own message.
    pub(crate) except: Option<ConnId>,
    /// This node delivered it already (Redis was down): Redis does not route it back here.
    pub(crate) delivered_here: bool,
}

/// A message for other nodes.
#[derive(Debug)]
pub enum Outbound {
    /// To every device of each of `users` on other nodes: the recipient of a direct message,
    /// and its sender (whose other devices get a copy). One bus message, one Redis round-trip
    /// slot and at most one envelope per node, however many of the users a node holds.
    User {
        /// The users (one or two).
        users: Users,
        /// The rendered message.
        message: Message,
    },
    /// A direct message for the mailboxes of `users` in Redis (protocol v1.1): appended
    /// and routed to every node holding a device of any of them, this one included, in one
    /// script call ([`redis_layout::Scripts::route_to_mailboxes`]).
    Mailboxes {
        /// The users: the recipients, then a sender whose other devices get a copy (at
        /// most [`USERS_PER_BUS_MESSAGE`]).
        users: Users,
        /// The message, a template ([`crate::router::Body::PerUser`]).
        message: Message,
        /// The template it is rendered from.
        template: Arc<Template>,
        /// The sending connection, which does not get its own message.
        except: Option<ConnId>,
        /// This node delivered it already, without a position, because Redis was down when
        /// it was made: Redis routes it to the other nodes only.
        delivered_here: bool,
        /// Where the indexes of the recipients with no live device go (the API's publish
        /// answer waits for them).
        offline: Option<tokio::sync::oneshot::Sender<Vec<usize>>>,
        /// The mailbox positions Redis gave, once it appended the message: a retry only
        /// routes it again (with [`redis_layout::positions_trailer`]), never appends twice.
        positions: Option<Vec<Position>>,
    },
    /// A publication for `topic`'s history in Redis (a topic matching a history rule):
    /// appended and published in one script call
    /// ([`redis_layout::Scripts::publish_to_history`]).
    History {
        /// Topic.
        topic: Arc<str>,
        /// The message, a template ([`crate::router::Body::PerTopic`]).
        message: Message,
        /// The template it is rendered from.
        template: Arc<Template>,
        /// This node delivered it already (Redis was down): it skips its own copy.
        delivered_here: bool,
    },
    /// To every subscriber of `topic` on other nodes.
    Topic {
        /// Topic.
        topic: Arc<str>,
        /// The rendered message.
        message: Message,
    },
    /// To every user connection on other nodes.
    Broadcast {
        /// The rendered message.
        message: Message,
    },
    /// Close every connection of `user` on other nodes.
    Kick {
        /// User.
        user: Arc<str>,
        /// WebSocket close code.
        code: u16,
    },
    /// An upstream record for a Redis stream ([`crate::upstream::redis_streams`]): one
    /// `XADD` in the pipeline.
    Upstream(UpstreamAppend),
}

/// A message for other nodes on its way through the bridge, from [`Bus::queue`] until Redis
/// answered for it or it was dropped and counted.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) outbound: Outbound,
    /// Its share of `bridge_queue_max_bytes`, taken when it was queued and given back when
    /// it is finished.
    pub(crate) size: usize,
    /// It met a node whose subscription was gone: it is retried until it finds a route (or
    /// `bridge_hold_ms` runs out), since that node's devices come back under a new instance.
    pub(crate) lost_route: bool,
    /// A publish by the route cache was not heard (a dead instance): route it by the script.
    pub(crate) skip_cache: bool,
}

impl Outbound {
    /// Bytes this message holds while it waits for Redis (for `bridge_queue_max_bytes`).
    pub fn size(&self) -> usize {
        let names = |users: &Users| users.iter().map(|u| u.len()).sum::<usize>();
        match self {
            Outbound::User { users, message } | Outbound::Mailboxes { users, message, .. } => {
                names(users) + message.size()
            }
            Outbound::History { topic, message, .. } => topic.len() + message.size(),
            Outbound::Topic { topic, message } => topic.len() + message.size(),
            Outbound::Broadcast { message } => message.size(),
            Outbound::Kick { user, .. } => user.len(),
            Outbound::Upstream(append) => append.weight,
        }
    }

    /// When it entered the node ([`crate::metrics::monotonic_ns`]): it is dropped once it
    /// waited longer than `bridge_hold_ms`. A kick never expires.
    pub fn entered_ns(&self) -> Option<u64> {
        match self {
            Outbound::Upstream(append) => Some(append.entered_ns),
            _ => self.message().map(|message| message.entered_ns),
        }
    }

    /// The message carried (a kick carries none).
    pub fn message(&self) -> Option<&Message> {
        match self {
            Outbound::User { message, .. }
            | Outbound::Mailboxes { message, .. }
            | Outbound::History { message, .. }
            | Outbound::Topic { message, .. }
            | Outbound::Broadcast { message } => Some(message),
            Outbound::Kick { .. } | Outbound::Upstream(_) => None,
        }
    }
}

/// A change of what this node holds, which the bridge mirrors into Redis, or a read that
/// must follow such changes.
#[derive(Debug)]
pub enum Control {
    /// A device of `user` connected (from the connection's shard).
    DeviceOnline {
        /// User.
        user: Arc<str>,
        /// The connection.
        conn: ConnId,
        /// Connect time, ms since the epoch (orders devices for the cluster device limit).
        since_ms: u64,
        /// The device waits for its `hello` (mailboxes on): the bridge reads the mailbox's
        /// position right after registering the device and sends [`crate::router::Envelope::Welcome`].
        welcome: bool,
    },
    /// A device of `user` disconnected.
    DeviceOffline {
        /// User.
        user: Arc<str>,
        /// The connection.
        conn: ConnId,
    },
    /// The node gained its first (`active`) or lost its last subscriber of `topic` (from the
    /// topic's home shard, which sees every shard's interest).
    TopicActive {
        /// Topic.
        topic: Arc<str>,
        /// Whether the node now has subscribers.
        active: bool,
    },
    /// Read a stream for a resume, after the changes handed over before it (see
    /// [`Bus::read_stream`]).
    ReadStream {
        /// What to read.
        read: StreamRead,
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<Result<Replay, BusError>>,
    },
}

/// Why the bus could not answer a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// Redis is unreachable; the bridge is reconnecting.
    #[error("the Redis bus is down")]
    Down,
    /// Too many queries are waiting.
    #[error("too many cluster queries in flight")]
    Busy,
    /// Redis answered with an error or something unexpected.
    #[error("Redis answered with an error")]
    Redis,
}

/// A user's devices across the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// Live devices.
    pub connections: u64,
    /// Ids of the nodes holding them.
    pub nodes: Vec<String>,
}

/// One live node, as registered in Redis.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    /// Node id.
    pub node: String,
    /// Client WebSocket address.
    pub ws: String,
    /// HTTP API address.
    pub api: String,
    /// Shards.
    pub shards: u64,
    /// Open connections at its last heartbeat.
    pub connections: u64,
}

/// A read of a stream in Redis ([`redis_layout::Scripts::history_range`]).
#[derive(Debug, Clone)]
pub struct StreamRead {
    /// The stream.
    pub key: StreamKey,
    /// Messages after this sequence number...
    pub since_seq: u64,
    /// ...of this epoch (`None`: of the stream's current epoch, for the history API).
    pub since_ep: Option<Box<str>>,
    /// At most this many.
    pub limit: usize,
    /// The stream's ttl: older messages are dropped first.
    pub ttl_secs: u64,
}

/// A question from the API or a shard for the bridge.
#[derive(Debug)]
pub enum Query {
    /// A stream's messages after a position, for the history API.
    Stream {
        /// What to read.
        read: StreamRead,
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<Result<Replay, BusError>>,
    },
    /// A user's devices cluster-wide.
    Presence {
        /// User.
        user: String,
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<Result<Presence, BusError>>,
    },
    /// Live nodes.
    Nodes {
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<Result<Vec<NodeInfo>, BusError>>,
    },
    /// Subscribers of a topic per node (nodes without subscribers do not answer).
    Topic {
        /// Topic.
        topic: String,
        /// Where the answer goes: `(node id, subscribers)`.
        reply: tokio::sync::oneshot::Sender<Result<Vec<(String, u64)>, BusError>>,
    },
}

/// What the bus and its bridge share.
#[derive(Debug, Default)]
pub struct BusState {
    up: AtomicBool,
    /// A Redis round trip has been outstanding for longer than half a heartbeat.
    stalled: AtomicBool,
    /// Bytes of the messages handed to the bridge and not yet done with (queued, in a
    /// pipeline, or waiting for a retry): what `bridge_queue_max_bytes` bounds.
    queued_bytes: AtomicUsize,
    /// The node is draining: the bridge deregisters it, so no new route leads here.
    draining: AtomicBool,
    stopping: AtomicBool,
    /// The bridge's counters.
    pub metrics: BusMetrics,
    drop_log: LogLimiter,
}

impl BusState {
    /// Whether Redis is reachable, answering in time, and this node is registered.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire) && !self.stalled.load(Ordering::Acquire)
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    pub(crate) fn set_stalled(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::Release);
    }

    /// Bytes of messages the bridge holds (see `bridge_queue_max_bytes`).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// The bridge is done with a message of `size` bytes (sent, or dropped and counted).
    pub(crate) fn release(&self, size: usize) {
        self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Logs a dropped message, at most once a second: a Redis outage under load drops
    /// thousands a second, and the metric counts each of them.
    pub(crate) fn log_drop(&self, reason: BusDrop, mid: Option<u64>) {
        if let Some(suppressed) = self.drop_log.allow(std::time::Instant::now()) {
            tracing::warn!(
                reason = reason.label(),
                mid,
                suppressed,
                dropped_total = self.metrics.drops_total(),
                "cross-node message dropped (logged at most once a second)"
            );
        }
    }
}

impl Uplink for Bus {
    /// One bus message per topic or broadcast, and per [`USERS_PER_BUS_MESSAGE`] users.
    fn forward(&self, to: &Route, message: &Message) -> usize {
        match to {
            Route::Users(users) => users
                .chunks(USERS_PER_BUS_MESSAGE)
                .filter(|chunk| {
                    !self.queue(Outbound::User {
                        users: chunk.iter().cloned().collect(),
                        message: message.clone(),
                    })
                })
                .count(),
            Route::Topic(topic) => usize::from(!self.queue(Outbound::Topic {
                topic: topic.clone(),
                message: message.clone(),
            })),
            Route::Broadcast => usize::from(!self.queue(Outbound::Broadcast {
                message: message.clone(),
            })),
        }
    }

    /// A template to Redis's streams: one bus message per topic and per
    /// [`USERS_PER_BUS_MESSAGE`] users. A message that is one frame already (never made so)
    /// or a broadcast is forwarded as usual.
    fn forward_streamed(
        &self,
        to: &Route,
        message: &Message,
        except: Option<ConnId>,
        delivered_here: bool,
    ) -> usize {
        match (to, message.template()) {
            (Route::Users(users), Some(template)) => {
                let streamed = StreamedMessage {
                    message,
                    template,
                    except,
                    delivered_here,
                };
                self.to_mailboxes(users, streamed, |_| None)
            }
            (Route::Topic(topic), Some(template)) => usize::from(!self.queue(Outbound::History {
                topic: topic.clone(),
                message: message.clone(),
                template: template.clone(),
                delivered_here,
            })),
            _ => self.forward(to, message),
        }
    }

    fn is_up(&self) -> bool {
        self.state.is_up()
    }
}

/// The shards' and the API's handle to the bridge. Cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Bus {
    mailbox: Mailbox<Pending, Control>,
    max_bytes: usize,
    queries: tokio::sync::mpsc::Sender<Query>,
    state: Arc<BusState>,
}

/// The bridge's ends of the bus.
pub struct BridgeEnds {
    inbox: Inbox<Pending, Control>,
    queries: tokio::sync::mpsc::Receiver<Query>,
    state: Arc<BusState>,
}

impl Bus {
    /// A bus whose message lane holds `capacity` messages of at most `max_bytes` in all,
    /// and the bridge's ends of it.
    pub fn new(capacity: usize, max_bytes: usize) -> (Bus, BridgeEnds) {
        let (mailbox, inbox) = mailbox::mailbox(capacity);
        let (queries, queries_rx) = tokio::sync::mpsc::channel(QUERY_CAPACITY);
        let state = Arc::new(BusState::default());
        let bus = Bus {
            mailbox,
            max_bytes,
            queries,
            state: state.clone(),
        };
        let ends = BridgeEnds {
            inbox,
            queries: queries_rx,
            state,
        };
        (bus, ends)
    }

    /// What the bus and the bridge share (up flag, metrics).
    pub fn state(&self) -> &BusState {
        &self.state
    }

    /// Whether Redis is reachable and this node is registered.
    pub fn is_up(&self) -> bool {
        self.state.is_up()
    }

    /// The bus's counters and levels, for a metrics scrape.
    pub fn reading(&self) -> BusReading<'_> {
        BusReading {
            metrics: &self.state.metrics,
            up: self.is_up(),
            queue_depth: self.mailbox.pending_messages(),
            queued_bytes: self.state.queued_bytes(),
        }
    }

    /// Hands a message for other nodes to the bridge; `false` if it was dropped (lane full
    /// in messages or in bytes, counted and logged).
    pub fn queue(&self, outbound: Outbound) -> bool {
        let mid = outbound.message().map(|m| m.mid);
        if self.offer(outbound) {
            return true;
        }
        self.state.metrics.dropped(BusDrop::BusFull);
        self.state.log_drop(BusDrop::BusFull, mid);
        false
    }

    /// Hands something to the bridge if the lane has room for it, counting nothing: `false`
    /// if it was refused (the caller counts it where it belongs).
    pub(crate) fn offer(&self, outbound: Outbound) -> bool {
        let size = outbound.size();
        let before = self.state.queued_bytes.fetch_add(size, Ordering::Relaxed);
        let accepted = before + size <= self.max_bytes || before == 0;
        let pending = Pending {
            outbound,
            size,
            lost_route: false,
            skip_cache: false,
        };
        if accepted && self.mailbox.message(pending).is_ok() {
            return true;
        }
        self.state.release(size);
        false
    }

    /// Queues a direct message for the mailboxes of `users`, one bus message per
    /// [`USERS_PER_BUS_MESSAGE`] of them; `offline(chunk)` gives where each chunk's offline
    /// recipients go. Returns how many bus messages were dropped.
    pub(crate) fn to_mailboxes(
        &self,
        users: &[Arc<str>],
        streamed: StreamedMessage<'_>,
        mut offline: impl FnMut(&[Arc<str>]) -> Option<tokio::sync::oneshot::Sender<Vec<usize>>>,
    ) -> usize {
        users
            .chunks(USERS_PER_BUS_MESSAGE)
            .filter(|chunk| {
                !self.queue(Outbound::Mailboxes {
                    users: chunk.iter().cloned().collect(),
                    message: streamed.message.clone(),
                    template: streamed.template.clone(),
                    except: streamed.except,
                    delivered_here: streamed.delivered_here,
                    offline: offline(chunk),
                    positions: None,
                })
            })
            .count()
    }

    /// Tells the bridge what changed; never dropped while the bridge runs.
    pub fn control(&self, control: Control) {
        // Refused only once the bridge has stopped, when nothing mirrors into Redis anyway.
        let _ = self.mailbox.control(control);
    }

    /// Tells the bridge the node is draining, so it deregisters the node from the cluster.
    pub fn start_draining(&self) {
        self.state.draining.store(true, Ordering::Release);
        self.mailbox.wake();
    }

    /// Asks the bridge to finish: remove what it still holds from Redis and exit.
    pub fn stop(&self) {
        self.state.stopping.store(true, Ordering::Release);
        self.mailbox.wake();
    }

    /// Hands a query to the bridge; the answer comes on the returned receiver.
    fn send_query<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, BusError>>) -> Query,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<T, BusError>>, BusError> {
        if !self.is_up() {
            return Err(BusError::Down);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queries
            .try_send(make(reply))
            .map_err(|_| BusError::Busy)?;
        self.mailbox.wake();
        Ok(answer)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, BusError>>) -> Query,
    ) -> Result<T, BusError> {
        let answer = self.send_query(make)?;
        // The bridge answers every query it takes, within its Redis response timeout.
        match tokio::time::timeout(Duration::from_secs(10), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(BusError::Down),
        }
    }

    /// A user's devices across the cluster.
    pub async fn presence(&self, user: &str) -> Result<Presence, BusError> {
        let user = user.to_owned();
        self.ask(|reply| Query::Presence { user, reply }).await
    }

    /// Live nodes, least-loaded first.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, BusError> {
        let mut nodes = self.ask(|reply| Query::Nodes { reply }).await?;
        nodes.sort_by(|a, b| a.connections.cmp(&b.connections).then(a.node.cmp(&b.node)));
        Ok(nodes)
    }

    /// A stream read for a shard (a resume), asked at once on the control lane, so it runs
    /// after every change the shard handed the bus before (a topic subscription made for a
    /// `sub` with `since` is in place before its history is read: nothing published in
    /// between is missed). Awaitable off tokio (shards run no tokio timer): the bridge
    /// answers within its Redis response timeout, at once while Redis is down, and drops
    /// the reply (answered "down") when a session ends first.
    pub fn read_stream(
        &self,
        read: StreamRead,
    ) -> impl std::future::Future<Output = Result<Replay, BusError>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.control(Control::ReadStream { read, reply });
        async move { answer.await.unwrap_or(Err(BusError::Down)) }
    }

    /// A stream read for the history API.
    pub async fn history(&self, read: StreamRead) -> Result<Replay, BusError> {
        self.ask(|reply| Query::Stream { read, reply }).await
    }

    /// Subscribers of `topic` per node, across the cluster.
    pub async fn topic(&self, topic: &str) -> Result<Vec<(String, u64)>, BusError> {
        let topic = topic.to_owned();
        let mut counts = self.ask(|reply| Query::Topic { topic, reply }).await?;
        counts.sort();
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn broadcast(bytes: usize) -> Outbound {
        Outbound::Broadcast {
            message: Message::new(1, Bytes::from(vec![b'x'; bytes])),
        }
    }

    #[test]
    fn the_lane_is_bounded_in_bytes_as_well_as_messages() {
        let (bus, ends) = Bus::new(100, 1000);
        assert!(bus.queue(broadcast(600)));
        assert!(!bus.queue(broadcast(600)), "over the byte budget");
        assert!(bus.queue(broadcast(400)), "what fits is taken");
        assert_eq!(bus.state().queued_bytes(), 1000);
        assert_eq!(
            bus.state().metrics.drops[BusDrop::BusFull as usize].get(),
            1
        );
        let taken = ends.inbox.try_message().expect("queued");
        bus.state().release(taken.size);
        assert_eq!(bus.state().queued_bytes(), 400);

        let (bus, _ends) = Bus::new(100, 1000);
        assert!(
            bus.queue(broadcast(5000)),
            "a message larger than the budget still goes when nothing else waits"
        );
        assert!(!bus.queue(broadcast(1)));

        let (bus, _ends) = Bus::new(1, 1000);
        assert!(bus.queue(broadcast(1)));
        assert!(!bus.queue(broadcast(1)), "over the message count");
        assert_eq!(
            bus.state().queued_bytes(),
            1,
            "a refused message holds no bytes"
        );
    }
}
