//! The bridge: one thread that owns every Redis connection of the node.
//!
//! It runs a single-threaded tokio runtime with two Redis connections per session: a
//! multiplexed one for commands (pipelined) and a pub/sub one for what other nodes send. On
//! a Redis Cluster (`redis+cluster://`) one cluster connection (RESP3) does both: commands
//! are pipelined per primary (`link.rs`) and sharded subscriptions deliver as pushes.
//! Three loops share the thread and end the session together when any of them fails:
//!
//! - **writer**: woken by the bus doorbell, it takes every pending control change and up to
//!   `MAX_BATCH` (4,096) messages and sends them as one pipeline, so under load one Redis round
//!   trip carries thousands of messages and at idle a message waits for nothing. Topic
//!   interest becomes `SUBSCRIBE`/`UNSUBSCRIBE` on the pub/sub connection. It also beats
//!   the heartbeat: refresh the lease (`SET … XX`: a missing key means Redis restarted or
//!   was flushed, so the session is rebuilt), the registry entry and a slice of the route
//!   keys' TTLs, and publish a probe to its own channel.
//! - **reader**: decodes envelopes from pub/sub and hands them to the home shard of their
//!   user or topic (or every shard, for a broadcast), exactly as local messages travel. A
//!   probe not seen back within three heartbeats means the subscription is gone although
//!   the socket looks fine, and the session is rebuilt.
//! - **queries**: answers the API's presence, node and topic questions.
//!
//! This file holds the session: connecting, joining the epoch, registering, the writer's
//! loop, the heartbeat (with the presence reaper) and stall detection. `outbound.rs` turns
//! messages into pipelined commands and accounts for each one; `routes.rs` is the route
//! cache that lets a direct message skip the route script; `inbound.rs` dispatches what
//! other nodes send and answers the API's queries.
//!
//! On a Redis Cluster no script can read other slots, so some steps the scripts take on one
//! Redis are the bridge's there (see [`super::redis_layout`], "Redis Cluster"): a direct
//! message is routed from the route cache, a mailbox message is appended per user before it
//! is routed, a publish nobody heard is followed by a look at the instance's lease, and the
//! reaper prunes dead instances' devices user by user.
//!
//! `redis_up` and `/readyz` follow the round trips: one outstanding for more than half a
//! heartbeat marks the bus stalled at once (an idle bridge pings every quarter heartbeat
//! so a stall is seen within one heartbeat), while the session itself is only abandoned
//! after `RESPONSE_TIMEOUT` (3 s).
//!
//! A session starts with a fresh *instance* id (see [`super::redis_layout`]): it loads the
//! scripts, joins the cluster epoch, subscribes the node's channels and topics, registers
//! the node and re-publishes every device it holds, and only then retires its previous
//! instance, so its routes never disappear in between. So a Redis that came back empty,
//! or a connection blip during which devices came and went, heals the same way: within one
//! backoff plus one re-publish.
//! Between sessions control changes keep being folded into the bridge's tables, messages
//! wait in the bounded lane, and API queries are answered "down" at once.

mod inbound;
mod link;
mod outbound;
mod routes;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use ahash::RandomState;
use bytes::Bytes;
use futures_lite::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use smallvec::SmallVec;
use tokio::sync::mpsc;

use super::dedupe::{RecentEnvelopes, MAX_REMEMBERED};
use super::redis_layout::{
    self as layout, DeviceKey, HistoryPublished, MailboxRouted, Names, PresenceArgs, PresenceMode,
    Routed, Scripts, StreamAppend,
};
use super::wire::{self, Body};
use super::{
    BridgeEnds, BusError, BusState, Control, NodeInfo, Outbound, Pending, Presence, Query,
    StreamRead,
};
use crate::config::{Config, NodeIdentity};
use crate::history::{EpochSource, Position, Replay, StreamKey};
use crate::mailbox::Inbox;
use crate::metrics::{self, BusDrop, NodeMetrics};
use crate::protocol::{self, SharedMidGenerator};
use crate::router::{self, shard_of, ConnId, Envelope, Message, Reach, Route, Router, Template};
use crate::upstream::{EventKind, Happening, Sink, UpstreamEvent};
use crate::ws::close;
use inbound::answer_down;
use link::{ClusterLink, Endpoint, Link};
use outbound::{Answer, Batch};
use routes::RouteCache;

/// Route-key TTL refreshes sent per heartbeat at most (a full round is spread over
/// [`layout::ROUTE_REFRESH_ROUND_SECS`]; this caps a heartbeat's share on huge nodes).
const MAX_REFRESH_PER_BEAT: usize = 50_000;

/// Devices re-published per pipeline when a session starts.
const RESYNC_BATCH: usize = 1000;

/// First reconnect delay; it doubles up to `redis_backoff_max_ms`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// How long Redis may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one command or pipeline may take before the session is considered broken.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Heartbeats without our own probe coming back before the subscription counts as lost.
const PROBE_MISSES: u32 = 3;

/// Users one [`layout::REAP`] call takes at most (one event id each is sent with it).
const REAP_BUDGET: usize = 500;

/// [`layout::REAP`] calls per heartbeat at most: a killed node's 100,000 users are
/// announced offline within 20 heartbeats.
const REAPS_PER_BEAT: usize = 10;

/// Why a session with Redis ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("timed out talking to Redis")]
    Timeout,
    #[error("this node's registration vanished (Redis restarted or was flushed)")]
    RegistrationLost,
    #[error("the pub/sub subscription stopped delivering")]
    SubscriptionLost,
    #[error("Redis has lost the scripts (NOSCRIPT)")]
    ScriptsLost,
    #[error("Redis has lost the cluster epoch (restarted empty or flushed)")]
    EpochLost,
    #[error("a connection to Redis was lost (a primary failed or restarted)")]
    Disconnected,
}

/// What a node gives its bridge.
pub(crate) struct BridgeSetup {
    pub(crate) config: Arc<Config>,
    pub(crate) identity: Arc<NodeIdentity>,
    /// Where messages from other nodes enter this node's routing.
    pub(crate) router: Router,
    /// The node's metrics (connection count for the registry, drop counters).
    pub(crate) metrics: NodeMetrics,
    /// The node's upstream sink: where the `online`/`offline` events the scripts decide
    /// are counted (Redis Streams) or sent (webhook).
    pub(crate) upstream: Option<Sink>,
    /// Ids for those events.
    pub(crate) mids: Arc<SharedMidGenerator>,
}

/// Starts the bridge thread. It is pinned to the first core after the shards' when the
/// machine has one to spare, so Redis I/O never competes with a shard for its core.
pub(crate) fn spawn(
    setup: BridgeSetup,
    ends: BridgeEnds,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let BridgeSetup {
        config,
        identity,
        router,
        metrics,
        upstream,
        mids,
    } = setup;
    let endpoint = Endpoint::of(&config)?;
    std::thread::Builder::new()
        .name("bridge".into())
        .spawn(move || {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let shards = identity.shards;
            if config.pin_shards && cpus > shards {
                pin_to_cpu(shards);
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "cannot start the bridge runtime; cluster disabled");
                    return;
                }
            };
            let BridgeEnds {
                inbox,
                queries,
                state,
            } = ends;
            let dedupe_window_ms = config.bridge_hold_ms.saturating_mul(2);
            let names = match endpoint {
                Endpoint::Cluster { .. } => Names::cluster(&config.redis_prefix),
                Endpoint::Single { .. } => Names::new(&config.redis_prefix),
            };
            let routes = RouteCache::new(&names, config.route_cache_max);
            let bridge = Rc::new(Bridge {
                scripts: Scripts::new(names.clone()),
                names,
                config,
                identity,
                router,
                metrics,
                upstream,
                mids,
                routes: RefCell::new(routes),
                pushes: RefCell::default(),
                endpoint,
                known_dead: RefCell::default(),
                suspects: RefCell::default(),
                inbox,
                state,
                devices: RefCell::default(),
                topics: RefCell::default(),
                instance: Cell::new(0),
                instance_hex: RefCell::default(),
                deregistered: Cell::new(false),
                last_probe: Cell::new(Instant::now()),
                probe_nonce: Cell::new(0),
                refresh_queue: RefCell::default(),
                refresh_round_started: Cell::new(Instant::now()),
                topic_requests: RefCell::default(),
                commands: RefCell::default(),
                retry: RefCell::default(),
                in_flight: RefCell::default(),
                retry_due: Cell::new(None),
                epoch: RefCell::default(),
                settled_at: Cell::new(None),
                recent: RefCell::new(RecentEnvelopes::new(dedupe_window_ms, MAX_REMEMBERED)),
                outstanding_since: Cell::new(None),
                last_answer: Cell::new(Instant::now()),
                epochs: RefCell::new(EpochSource::new(rand_u64())),
                welcoming: RefCell::default(),
            });
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, bridge.clone().run(queries));
            bridge.abandon_leftovers();
        })
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // read and write that set, and pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, "could not pin the bridge thread");
        }
    }
}

/// A user's devices on this node: connection and connect time (ms), oldest first.
type Devices = SmallVec<[(ConnId, u64); 2]>;

struct Bridge {
    config: Arc<Config>,
    identity: Arc<NodeIdentity>,
    router: Router,
    metrics: NodeMetrics,
    upstream: Option<Sink>,
    mids: Arc<SharedMidGenerator>,
    /// Where each session connects.
    endpoint: Endpoint,
    /// User → instances, for direct messages without a script (see `routes`).
    routes: RefCell<RouteCache>,
    /// Redis's pushes on the current command connection: route invalidations, lost
    /// connections, and on a Redis Cluster the sharded pub/sub messages (see
    /// [`Bridge::on_push`]).
    pushes: RefCell<Option<mpsc::UnboundedReceiver<PushInfo>>>,
    /// Redis Cluster: the registered instances whose lease is gone, as of the last
    /// heartbeat (or found since by an unheard publish). The cluster scripts drop their
    /// members, and routes skip them.
    known_dead: RefCell<Vec<u64>>,
    /// Redis Cluster: instances a publish was not heard by, to ask about their lease.
    suspects: RefCell<Vec<u64>>,
    names: Names,
    scripts: Scripts,
    /// Messages and control changes from the shards and the API.
    inbox: Inbox<Pending, Control>,
    state: Arc<BusState>,
    /// Every device of this node by user: what a new session re-publishes.
    devices: RefCell<HashMap<Arc<str>, Devices, RandomState>>,
    /// Topics with local subscribers: what a new session subscribes.
    topics: RefCell<HashSet<Arc<str>, RandomState>>,
    /// This session's instance id (0 before the first).
    instance: Cell<u64>,
    /// The same in hex, as keys, members and script arguments spell it.
    instance_hex: RefCell<String>,
    /// The node is draining and its registration and lease are gone from Redis.
    deregistered: Cell<bool>,
    last_probe: Cell<Instant>,
    probe_nonce: Cell<u64>,
    /// Users whose route key TTL this round still has to refresh.
    refresh_queue: RefCell<Vec<Arc<str>>>,
    refresh_round_started: Cell<Instant>,
    /// Topic queries waiting for the nodes' counts, by request id.
    topic_requests: RefCell<HashMap<u64, mpsc::UnboundedSender<(String, u64)>>>,
    /// The current session's command connection, for spawned query tasks.
    commands: RefCell<Option<Link>>,
    /// Messages to route again before any new one, oldest first.
    retry: RefCell<VecDeque<Pending>>,
    /// Messages taken for the pipeline being built or sent, in order. They live here rather
    /// than in the writer's future because a session ends by dropping that future wherever
    /// it waits; whatever is left here then goes back to the front of `retry`.
    in_flight: RefCell<Vec<Pending>>,
    /// When the retry queue may be sent again (after an unheard publish).
    retry_due: Cell<Option<Instant>>,
    /// The cluster epoch this bridge joined (empty before the first session).
    epoch: RefCell<String>,
    /// Messages wait until then: the cluster is settling after Redis lost its state.
    settled_at: Cell<Option<Instant>>,
    /// Message envelopes received lately, to drop retried copies.
    recent: RefCell<RecentEnvelopes>,
    /// When the writer's outstanding round trip started (for stall detection).
    outstanding_since: Cell<Option<Instant>>,
    /// When the writer's last round trip ended (an idle bridge pings after a while).
    last_answer: Cell<Instant>,
    /// Candidate epochs for streams a script creates (one per call).
    epochs: RefCell<EpochSource>,
    /// Users with a new device waiting for its welcome, and the live mailbox messages held
    /// for them meanwhile (see [`Bridge::await_welcome`]).
    welcoming: RefCell<HashMap<Arc<str>, Welcoming, RandomState>>,
}

/// A user's devices waiting for their mailbox position, and what is held for the user.
#[derive(Default)]
struct Welcoming {
    conns: SmallVec<[ConnId; 1]>,
    /// Mailbox messages that arrived meanwhile: message, connection to skip, position.
    held: Vec<(Message, Option<ConnId>, Position)>,
}

/// A live session's pub/sub half and the topics it has subscribed.
struct Subscriptions {
    sink: Subscriber,
    topics: HashSet<Arc<str>, RandomState>,
}

/// Where a session subscribes: a standalone Redis's pub/sub connection, or a Redis
/// Cluster's connection (sharded pub/sub, on the primary that owns each channel's slot).
enum Subscriber {
    Single(PubSubSink),
    Cluster(ClusterConnection),
}

impl Subscriber {
    async fn subscribe(&mut self, channels: &[String]) -> Result<(), SessionError> {
        match self {
            Subscriber::Single(sink) => timed(sink.subscribe(channels)).await,
            Subscriber::Cluster(conn) => Self::sharded(conn, channels, true).await,
        }
    }

    async fn unsubscribe(&mut self, channels: &[String]) -> Result<(), SessionError> {
        match self {
            Subscriber::Single(sink) => timed(sink.unsubscribe(channels)).await,
            Subscriber::Cluster(conn) => Self::sharded(conn, channels, false).await,
        }
    }

    /// `SSUBSCRIBE` or `SUNSUBSCRIBE` of each channel on the primary of its slot (one call
    /// names channels of one slot only), all at once.
    async fn sharded(
        conn: &ClusterConnection,
        channels: &[String],
        subscribe: bool,
    ) -> Result<(), SessionError> {
        let calls: Vec<_> = channels
            .iter()
            .map(|channel| {
                let (mut conn, channel) = (conn.clone(), channel.clone());
                tokio::spawn(async move {
                    if subscribe {
                        conn.ssubscribe(channel).await
                    } else {
                        conn.sunsubscribe(channel).await
                    }
                })
            })
            .collect();
        for call in calls {
            timed(async { call.await.unwrap_or_else(|_| Err(lost_task())) }).await?;
        }
        Ok(())
    }
}

/// A Redis call's task ended without an answer (the runtime is stopping).
fn lost_task() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Client, "a Redis call's task was lost"))
}

/// Where a session's messages from other nodes arrive: a standalone Redis's pub/sub
/// stream, or on a Redis Cluster the command connection's pushes ([`Bridge::pushes`]).
enum Incoming {
    Single(PubSubStream),
    Cluster,
}

impl Bridge {
    async fn run(self: Rc<Self>, mut queries: mpsc::Receiver<Query>) {
        let mut backoff = MIN_BACKOFF;
        let max_backoff = Duration::from_millis(self.config.redis_backoff_max_ms);
        loop {
            if self.state.stopping() {
                return;
            }
            self.state.metrics.sessions.inc();
            match self.connect().await {
                Ok((conn, subscriptions, incoming)) => {
                    backoff = MIN_BACKOFF;
                    let ended = self
                        .serve(conn, subscriptions, incoming, &mut queries)
                        .await;
                    self.requeue_in_flight();
                    self.welcome_all_waiting();
                    self.state.set_up(false);
                    self.state.set_stalled(false);
                    self.outstanding_since.set(None);
                    *self.commands.borrow_mut() = None;
                    match ended {
                        Ok(()) => return,
                        Err(error) => {
                            self.state.metrics.errors.inc();
                            tracing::warn!(%error, "Redis bus down; cross-node delivery paused, reconnecting");
                        }
                    }
                }
                Err(error) => {
                    self.state.metrics.errors.inc();
                    tracing::warn!(%error, retry_ms = backoff.as_millis() as u64, "cannot reach Redis");
                }
            }
            if self.state.stopping() {
                return;
            }
            self.wait_down(backoff, &mut queries).await;
            backoff = (backoff * 2).min(max_backoff);
        }
    }

    /// The node stopped with messages still waiting for Redis: count them, never vanish.
    fn abandon_leftovers(&self) {
        let mut left = std::mem::take(&mut *self.retry.borrow_mut());
        left.extend(self.inbox.drain_messages());
        if !left.is_empty() {
            tracing::warn!(
                messages = left.len(),
                "stopping with cross-node messages Redis never took; counted as stale"
            );
        }
        for pending in left {
            self.drop_pending(pending, BusDrop::Stale);
        }
    }

    /// Resolves when the bus was rung since the last call.
    fn rung(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            if self.inbox.rung(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Between sessions: keep the tables current, answer queries "down", wait out `delay`.
    async fn wait_down(&self, delay: Duration, queries: &mut mpsc::Receiver<Query>) {
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            while let Some(change) = self.inbox.try_control() {
                self.apply(change, None, &mut Vec::new());
            }
            if self.state.stopping() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = self.rung() => {}
                Some(query) = queries.recv() => answer_down(query),
            }
        }
    }

    /// The session's connections: commands, subscriptions and what arrives from other
    /// nodes. With the route cache (and always on a Redis Cluster) commands speak RESP3 and
    /// Redis's pushes arrive in [`Bridge::pushes`].
    async fn open(&self) -> Result<(Link, Subscriber, Incoming), SessionError> {
        let (pushes, received) = mpsc::unbounded_channel();
        let (pubsub, commands) = match &self.endpoint {
            Endpoint::Single { pubsub, commands } => (pubsub, commands),
            Endpoint::Cluster { seeds, addresses } => {
                *self.pushes.borrow_mut() = Some(received);
                let client = ClusterClientBuilder::new(seeds.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(2)
                    .build()?;
                let conn = timed(client.get_async_connection()).await?;
                let link = timed(ClusterLink::new(conn, addresses.clone())).await?;
                let subscriber = Subscriber::Cluster(link.connection());
                tracing::debug!(primaries = link.primaries(), "Redis Cluster topology read");
                return Ok((Link::Cluster(link), subscriber, Incoming::Cluster));
            }
        };
        let mut config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        if self.routes.borrow().enabled() {
            config = config.set_push_sender(pushes);
            *self.pushes.borrow_mut() = Some(received);
        }
        let conn = commands
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let pubsub = timed(pubsub.get_async_pubsub()).await?;
        let (sink, stream) = pubsub.split();
        Ok((
            Link::Single(conn),
            Subscriber::Single(sink),
            Incoming::Single(stream),
        ))
    }

    async fn connect(&self) -> Result<(Link, Subscriptions, Incoming), SessionError> {
        // A new connection tracks nothing yet: whatever was cached may be stale.
        self.routes.borrow_mut().clear();
        self.known_dead.borrow_mut().clear();
        self.suspects.borrow_mut().clear();
        let (mut conn, mut sink, incoming) = self.open().await?;
        let hashes = timed(conn.on_every_primary(&self.scripts.load())).await?;
        let hashes: Vec<String> =
            redis::from_redis_value(Value::Array(hashes)).map_err(redis::RedisError::from)?;
        debug_assert!(self.scripts.loaded(&hashes));
        if self.routes.borrow().enabled() {
            let mut tracking = redis::pipe();
            tracking
                .cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("OPTIN");
            timed(conn.on_every_primary(&tracking)).await?;
        }
        self.join_epoch(&mut conn).await?;
        let previous = self.instance.get();
        let instance = loop {
            let candidate: u64 = rand_u64();
            if candidate != 0 && candidate != previous {
                break candidate;
            }
        };
        self.instance.set(instance);
        *self.instance_hex.borrow_mut() = layout::instance_hex(instance);
        sink.subscribe(&[
            self.names.broadcast(),
            self.names.instance_channel(instance),
        ])
        .await?;
        let topics: Vec<Arc<str>> = self.topics.borrow().iter().cloned().collect();
        for chunk in topics.chunks(RESYNC_BATCH) {
            let channels: Vec<String> = chunk.iter().map(|t| self.names.topic(t)).collect();
            sink.subscribe(&channels).await?;
        }
        if !self.deregistered.get() {
            let mut register = redis::pipe();
            register
                .cmd("SET")
                .arg(self.names.alive(instance))
                .arg(&*self.identity.id)
                .arg("PX")
                .arg(self.config.cluster_node_ttl_ms)
                .ignore();
            self.registry_update(&mut register, true);
            register
                .sadd(self.names.nodes(), &*self.identity.id)
                .ignore();
            if self.indexes_users() {
                register
                    .zadd(
                        self.names.instances(),
                        layout::instance_hex(instance),
                        protocol::now_ms(),
                    )
                    .ignore();
            }
            let mid_node = self.names.mid_node(self.identity.number);
            register
                .cmd("SET")
                .arg(&mid_node)
                .arg(&*self.identity.id)
                .arg("NX")
                .arg("PX")
                .arg(self.config.cluster_node_ttl_ms)
                .ignore()
                .get(&mid_node);
            let (holder,): (Option<String>,) = self.timed_query(&register, &mut conn).await?;
            if holder.as_deref() != Some(&*self.identity.id) {
                self.state.metrics.errors.inc();
                tracing::error!(
                    number = self.identity.number,
                    holder = holder.as_deref().unwrap_or("nobody"),
                    "another node holds this node's message-id number; message ids may collide until one of them restarts"
                );
            }
            self.republish_devices(&mut conn).await?;
            if previous != 0 {
                // Only now: until this node's devices were back under the new instance, the
                // old one was what routed to them.
                let mut retire = redis::pipe();
                retire.del(self.names.alive(previous)).ignore();
                let _: () = self.timed_query(&retire, &mut conn).await?;
            }
        }
        self.last_probe.set(Instant::now());
        tracing::info!(
            node_id = %self.identity.id,
            instance = %self.instance_hex.borrow(),
            devices = self.devices.borrow().values().map(|d| d.len()).sum::<usize>(),
            topics = topics.len(),
            "Redis bus up: node registered, routes and subscriptions published"
        );
        Ok((
            conn,
            Subscriptions {
                sink,
                topics: topics.into_iter().collect(),
            },
            incoming,
        ))
    }

    /// Whether this node's instances index their users (`P:insts`, `P:inst-users:INST`):
    /// for presence, and on a Redis Cluster always (the reaper prunes dead instances'
    /// devices by them, since no script there can read other nodes' leases).
    fn indexes_users(&self) -> bool {
        self.names.is_cluster() || self.presence().mode != PresenceMode::Off
    }

    /// Joins the cluster epoch (see [`layout::JOIN`]); holds messages while it settles.
    async fn join_epoch(&self, conn: &mut Link) -> Result<(), SessionError> {
        let candidate = layout::instance_hex(rand_u64());
        let previous = self.epoch.borrow().clone();
        let mut join = redis::pipe();
        join.add_command(
            self.scripts
                .join(&candidate, &previous, self.config.cluster_settle_ms),
        );
        let ((epoch, settling_ms),): ((String, i64),) = self.timed_query(&join, conn).await?;
        if !previous.is_empty() && previous != epoch {
            tracing::warn!(
                old = %previous,
                new = %epoch,
                settle_ms = settling_ms.max(0),
                "Redis lost the cluster's state; holding cross-node messages while every node re-publishes"
            );
            // Its streams too: they start again at seq 1 under new epochs. Told before this
            // session brings any message, so no new message meets an old floor.
            let mesh = self.router.mesh();
            for shard in 0..mesh.shards() {
                mesh.to_shard(shard, Envelope::StreamsLost, self.metrics.shard(shard));
            }
        }
        if settling_ms > 0 {
            let until = Instant::now() + Duration::from_millis(settling_ms as u64);
            self.settled_at.set(Some(until));
        }
        *self.epoch.borrow_mut() = epoch;
        Ok(())
    }

    /// Whether messages must wait for the cluster to settle.
    fn settling(&self) -> bool {
        match self.settled_at.get() {
            Some(at) if at > Instant::now() => true,
            Some(_) => {
                self.settled_at.set(None);
                false
            }
            None => false,
        }
    }

    /// Adds the registry hash update (and its TTL) to `pipe`.
    fn registry_update(&self, pipe: &mut redis::Pipeline, full: bool) {
        let key = self.names.node(&self.identity.id);
        let connections = self.metrics.connections().max(0);
        if full {
            pipe.hset_multiple(
                &key,
                &[
                    ("ws", self.identity.client_addr.to_string()),
                    ("api", self.identity.api_addr.to_string()),
                    ("shards", self.identity.shards.to_string()),
                    ("connections", connections.to_string()),
                    ("instance", self.instance_hex.borrow().clone()),
                ],
            )
            .ignore();
        } else {
            pipe.hset(&key, "connections", connections).ignore();
        }
        pipe.pexpire(&key, self.config.cluster_node_ttl_ms as i64)
            .ignore();
    }

    /// Writes every device this node holds under the current instance.
    async fn republish_devices(&self, conn: &mut Link) -> Result<(), SessionError> {
        let users: Vec<(Arc<str>, Devices)> = self
            .devices
            .borrow()
            .iter()
            .map(|(user, devices)| (user.clone(), devices.clone()))
            .collect();
        let instance = self.instance.get();
        let presence = self.presence();
        for chunk in users.chunks(RESYNC_BATCH) {
            let mut pipe = redis::pipe();
            for (user, devices) in chunk {
                if presence.mode == PresenceMode::Off {
                    let key = self.names.user(user);
                    for (conn_id, since) in devices {
                        pipe.zadd(&key, layout::device_member(instance, *conn_id), *since)
                            .ignore();
                    }
                    pipe.expire(&key, layout::ROUTE_KEY_TTL_SECS as i64)
                        .ignore();
                } else {
                    // The same devices are still routed under the old instance until it
                    // retires: no limit here, or they would evict themselves.
                    for (conn_id, since) in devices {
                        let device = DeviceKey {
                            user,
                            instance,
                            conn: *conn_id,
                        };
                        let add = self.device_online_cmd(device, *since, usize::MAX, &presence);
                        pipe.add_command(add);
                    }
                }
                if self.names.is_cluster() {
                    pipe.sadd(self.names.instance_users(instance), &**user)
                        .ignore();
                }
            }
            if self.names.is_cluster() {
                pipe.expire(
                    self.names.instance_users(instance),
                    layout::ROUTE_KEY_TTL_SECS as i64,
                )
                .ignore();
            }
            let answers: Vec<Value> = self.timed_query(&pipe, conn).await?;
            for answer in &answers {
                if let Some(added) = layout::DeviceAdded::of(answer) {
                    self.announce(added.events);
                }
            }
        }
        Ok(())
    }

    async fn serve(
        self: &Rc<Self>,
        conn: Link,
        mut subscriptions: Subscriptions,
        mut incoming: Incoming,
        queries: &mut mpsc::Receiver<Query>,
    ) -> Result<(), SessionError> {
        *self.commands.borrow_mut() = Some(conn.clone());
        self.state.set_up(true);
        tokio::select! {
            ended = self.write_loop(conn.clone(), &mut subscriptions) => ended,
            ended = self.read_loop(&mut incoming) => ended,
            ended = self.query_loop(conn, queries) => ended,
            never = self.watch_stalls() => never,
        }
    }

    /// Marks the bus stalled (`redis_up` 0, `/readyz` 503) while the writer's round trip
    /// has been outstanding for more than half a heartbeat, and ready again once it ends.
    async fn watch_stalls(&self) -> Result<(), SessionError> {
        let beat = Duration::from_millis(self.config.cluster_heartbeat_ms);
        let mut stalled = false;
        loop {
            tokio::time::sleep(beat / 8).await;
            let now = self
                .outstanding_since
                .get()
                .is_some_and(|since| since.elapsed() > beat / 2);
            if now != stalled {
                stalled = now;
                self.state.set_stalled(stalled);
                if stalled {
                    self.state.metrics.errors.inc();
                    tracing::warn!("Redis is not answering; marked not ready");
                } else {
                    tracing::info!("Redis answers again");
                }
            }
        }
    }

    async fn write_loop(
        &self,
        mut conn: Link,
        subscriptions: &mut Subscriptions,
    ) -> Result<(), SessionError> {
        let beat = Duration::from_millis(self.config.cluster_heartbeat_ms);
        let mut next_beat = tokio::time::Instant::now() + beat;
        loop {
            if self.state.draining() && !self.deregistered.get() {
                self.deregister(&mut conn).await?;
            }
            let stopping = self.state.stopping();
            let more = self.flush(&mut conn, subscriptions).await?;
            if stopping {
                // A drained node's lease is gone: its users are announced offline now,
                // even when no other node is left to do it.
                return self.reap(&mut conn).await;
            }
            if tokio::time::Instant::now() >= next_beat {
                self.heartbeat(&mut conn).await?;
                next_beat = tokio::time::Instant::now() + beat;
            } else if self.last_answer.get().elapsed() >= beat / 4 {
                let mut ping = redis::pipe();
                ping.cmd("PING");
                let _: () = self.timed_query(&ping, &mut conn).await?;
            }
            if more {
                continue;
            }
            let idle_ping = tokio::time::Instant::from_std(self.last_answer.get() + beat / 4);
            let wake = [self.settled_at.get(), self.retry_due.get()]
                .into_iter()
                .flatten()
                .map(tokio::time::Instant::from_std)
                .fold(next_beat.min(idle_ping), tokio::time::Instant::min);
            tokio::select! {
                _ = self.rung() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Folds one control change into the tables and, in a session, into `batch`.
    fn apply(&self, change: Control, batch: Option<&mut Batch>, touched: &mut Vec<Arc<str>>) {
        let instance = self.instance.get();
        match change {
            Control::DeviceOnline {
                user,
                conn,
                since_ms,
                welcome,
            } => {
                self.devices
                    .borrow_mut()
                    .entry(user.clone())
                    .or_default()
                    .push((conn, since_ms));
                let Some(batch) = batch else {
                    if welcome {
                        self.welcome(&user, conn, None);
                    }
                    return;
                };
                if !self.deregistered.get() {
                    let device = DeviceKey {
                        user: &user,
                        instance,
                        conn,
                    };
                    let cmd = self.device_online_cmd(
                        device,
                        since_ms,
                        self.config.max_devices_per_user,
                        &self.presence(),
                    );
                    batch.push(cmd, Answer::DeviceAdded);
                    if self.names.is_cluster() {
                        let mut index = redis::cmd("SADD");
                        index.arg(self.names.instance_users(instance)).arg(&*user);
                        batch.push(index, Answer::Ignore);
                    }
                }
                match self.config.mailbox_retention().filter(|_| welcome) {
                    Some(retention) => {
                        // Read after the registration, in the same pipeline: whatever is
                        // numbered after this read is routed to the device.
                        let key = StreamKey::Mailbox(user.clone());
                        let now = protocol::now_ms();
                        let read =
                            self.scripts
                                .history_range(&key, 0, None, 0, now, retention.ttl_secs);
                        batch.push(
                            read,
                            Answer::Welcome {
                                user: user.clone(),
                                conn,
                            },
                        );
                        self.await_welcome(user, conn);
                    }
                    None if welcome => self.welcome(&user, conn, None),
                    None => {}
                }
            }
            Control::DeviceOffline { user, conn } => {
                let mut devices = self.devices.borrow_mut();
                let mut last_here = false;
                if let Some(list) = devices.get_mut(&user) {
                    list.retain(|(c, _)| *c != conn);
                    if list.is_empty() {
                        devices.remove(&user);
                        last_here = true;
                    }
                }
                drop(devices);
                if let Some(batch) = batch {
                    let presence = self.presence();
                    if self.names.is_cluster() {
                        let member = layout::device_member(instance, conn);
                        let cmd = self.scripts.cluster_device_gone(
                            &user,
                            Some(&member),
                            &presence,
                            self.next_mid(),
                            &self.known_dead.borrow(),
                        );
                        batch.push(cmd, Answer::Presence);
                        if last_here {
                            let mut index = redis::cmd("SREM");
                            index.arg(self.names.instance_users(instance)).arg(&*user);
                            batch.push(index, Answer::Ignore);
                        }
                    } else if presence.mode == PresenceMode::Off {
                        let mut cmd = redis::cmd("ZREM");
                        cmd.arg(self.names.user(&user))
                            .arg(layout::device_member(instance, conn));
                        batch.push(cmd, Answer::Ignore);
                    } else {
                        let mid = self.next_mid();
                        let device = DeviceKey {
                            user: &user,
                            instance,
                            conn,
                        };
                        let cmd = self.scripts.device_offline(device, &presence, mid);
                        batch.push(cmd, Answer::Presence);
                    }
                }
            }
            Control::ReadStream { read, reply } => match batch {
                Some(batch) => batch.push(self.read_cmd(&read), Answer::Read(reply)),
                None => {
                    let _ = reply.send(Err(BusError::Down));
                }
            },
            Control::TopicActive { topic, active } => {
                let mut topics = self.topics.borrow_mut();
                if active {
                    topics.insert(topic.clone());
                } else {
                    topics.remove(&topic);
                }
                touched.push(topic);
            }
        }
    }

    /// The script call adding `device`: on a Redis Cluster the script without other
    /// slots' keys, given the instances known dead.
    fn device_online_cmd(
        &self,
        device: DeviceKey<'_>,
        since_ms: u64,
        max_devices: usize,
        presence: &PresenceArgs<'_>,
    ) -> redis::Cmd {
        let mid = self.next_mid();
        if self.names.is_cluster() {
            self.scripts.cluster_device_online(
                device,
                since_ms,
                max_devices,
                presence,
                mid,
                &self.known_dead.borrow(),
            )
        } else {
            self.scripts
                .device_online(device, since_ms, max_devices, presence, mid)
        }
    }

    /// The script call reading a stream as `read` asks (a resume, the history API).
    fn read_cmd(&self, read: &StreamRead) -> redis::Cmd {
        self.scripts.history_range(
            &read.key,
            read.since_seq,
            read.since_ep.as_deref(),
            read.limit,
            protocol::now_ms(),
            read.ttl_secs,
        )
    }

    /// Subscribes or unsubscribes the topics whose local interest changed.
    async fn sync_topics(
        &self,
        touched: &[Arc<str>],
        subscriptions: &mut Subscriptions,
    ) -> Result<(), SessionError> {
        if touched.is_empty() {
            return Ok(());
        }
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        {
            let wanted = self.topics.borrow();
            for topic in touched {
                let want = wanted.contains(topic);
                if want && subscriptions.topics.insert(topic.clone()) {
                    subscribe.push(self.names.topic(topic));
                } else if !want && subscriptions.topics.remove(topic) {
                    unsubscribe.push(self.names.topic(topic));
                }
            }
        }
        if !subscribe.is_empty() {
            self.state.metrics.commands.inc();
            subscriptions.sink.subscribe(&subscribe).await?;
        }
        if !unsubscribe.is_empty() {
            self.state.metrics.commands.inc();
            subscriptions.sink.unsubscribe(&unsubscribe).await?;
        }
        Ok(())
    }

    /// Holds the live mailbox messages of `user` until the welcome of its new device `conn`
    /// went out. Redis answers the position read on the command connection and brings live
    /// messages on the pub/sub one, so a message numbered after the read can reach the
    /// bridge before the read's answer; routed at once, it would reach the device before
    /// its welcome and be skipped there. Held, it follows the welcome.
    fn await_welcome(&self, user: Arc<str>, conn: ConnId) {
        self.welcoming
            .borrow_mut()
            .entry(user)
            .or_default()
            .conns
            .push(conn);
    }

    /// Sends device `conn` its welcome at `mailbox` (`None`: no mailbox, or Redis could not
    /// say: `seq` 0, no floor), then routes what was held for its user once no other device
    /// of the user waits.
    fn welcome(&self, user: &Arc<str>, conn: ConnId, mailbox: Option<Position>) {
        let shard = shard_of(conn);
        if shard < self.identity.shards {
            let welcome = Envelope::Welcome {
                user: user.clone(),
                conn,
                mailbox,
            };
            self.router
                .mesh()
                .to_shard(shard, welcome, self.metrics.shard(shard));
        }
        let held = {
            let mut welcoming = self.welcoming.borrow_mut();
            let Some(waiting) = welcoming.get_mut(user) else {
                return;
            };
            waiting.conns.retain(|c| *c != conn);
            if !waiting.conns.is_empty() {
                return;
            }
            welcoming.remove(user).map(|w| w.held).unwrap_or_default()
        };
        for (message, except, at) in held {
            self.route_to_mailbox(user.clone(), message, except, at);
        }
    }

    /// The session ended with welcomes unanswered: welcome those devices without a
    /// position (their reads were lost with the session).
    fn welcome_all_waiting(&self) {
        let waiting: Vec<(Arc<str>, SmallVec<[ConnId; 1]>)> = self
            .welcoming
            .borrow()
            .iter()
            .map(|(user, w)| (user.clone(), w.conns.clone()))
            .collect();
        for (user, conns) in waiting {
            for conn in conns {
                self.welcome(&user, conn, None);
            }
        }
    }

    /// Hands a mailbox message numbered by Redis to `user`'s home shard, or holds it while
    /// a device of the user waits for its welcome.
    fn route_to_mailbox(
        &self,
        user: Arc<str>,
        message: Message,
        except: Option<ConnId>,
        at: Position,
    ) {
        if let Some(waiting) = self.welcoming.borrow_mut().get_mut(&user) {
            waiting.held.push((message, except, at));
            return;
        }
        let mesh = self.router.mesh();
        let home = mesh.home(&user);
        let route = Envelope::RouteUser {
            user,
            message,
            except,
            at: Some(at),
        };
        mesh.to_shard(home, route, self.metrics.shard(home));
    }

    fn close_local(&self, conn: ConnId, code: u16, reason: metrics::Close) {
        let shard = shard_of(conn);
        if shard < self.identity.shards {
            self.router.mesh().to_shard(
                shard,
                Envelope::CloseConn { conn, code, reason },
                self.metrics.shard(shard),
            );
        }
    }

    /// Sends one pipeline, counting its commands and timing its round trip.
    async fn timed_query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        conn: &mut Link,
    ) -> Result<T, SessionError> {
        self.state.metrics.commands.add(pipe.len() as u64);
        let started = metrics::monotonic_ns();
        self.outstanding_since.set(Some(Instant::now()));
        let answer = timed(pipe.query_async(conn)).await;
        self.outstanding_since.set(None);
        let answer = answer?;
        self.last_answer.set(Instant::now());
        self.state
            .metrics
            .roundtrip
            .record(metrics::monotonic_ns().saturating_sub(started));
        Ok(answer)
    }

    /// Lease, registry, probe and a slice of route-key TTLs, in one pipeline.
    async fn heartbeat(&self, conn: &mut Link) -> Result<(), SessionError> {
        let beat = Duration::from_millis(self.config.cluster_heartbeat_ms);
        if self.last_probe.get().elapsed() > beat * PROBE_MISSES {
            return Err(SessionError::SubscriptionLost);
        }
        let instance = self.instance.get();
        let nonce = self.probe_nonce.get() + 1;
        self.probe_nonce.set(nonce);
        let mut pipe = redis::pipe();
        if !self.deregistered.get() {
            pipe.cmd("SET")
                .arg(self.names.alive(instance))
                .arg(&*self.identity.id)
                .arg("XX")
                .arg("PX")
                .arg(self.config.cluster_node_ttl_ms);
            self.registry_update(&mut pipe, false);
            pipe.pexpire(
                self.names.mid_node(self.identity.number),
                self.config.cluster_node_ttl_ms as i64,
            )
            .ignore();
        }
        pipe.add_command(self.names.publish(
            &self.names.instance_channel(instance),
            &wire::probe(instance, nonce),
        ));
        let tracked = self.presence().mode != PresenceMode::Off;
        let refreshed = self.next_refresh_slice();
        for user in &refreshed {
            pipe.expire(self.names.user(user), layout::ROUTE_KEY_TTL_SECS as i64)
                .ignore();
            if tracked {
                pipe.expire(
                    self.names.presence_flag(user),
                    layout::ROUTE_KEY_TTL_SECS as i64,
                )
                .ignore();
            }
        }
        if self.indexes_users() && !self.deregistered.get() {
            pipe.expire(
                self.names.instance_users(instance),
                layout::ROUTE_KEY_TTL_SECS as i64,
            )
            .ignore();
        }
        let answers: Vec<Value> = self.timed_query(&pipe, conn).await?;
        let (lease, receivers) = match answers.as_slice() {
            [lease, receivers] => (Some(lease), receivers),
            [receivers] => (None, receivers),
            _ => return Err(SessionError::RegistrationLost),
        };
        if matches!(lease, Some(Value::Nil)) {
            return Err(SessionError::RegistrationLost);
        }
        if matches!(receivers, Value::Int(0)) {
            return Err(SessionError::SubscriptionLost);
        }
        self.reap(conn).await
    }

    /// Announces `offline` for the users of instances whose lease is gone (see
    /// [`layout::REAP`]): up to [`REAPS_PER_BEAT`] calls of [`REAP_BUDGET`] users each.
    async fn reap(&self, conn: &mut Link) -> Result<(), SessionError> {
        if self.names.is_cluster() {
            return self.reap_cluster(conn).await;
        }
        let presence = self.presence();
        if presence.mode == PresenceMode::Off {
            return Ok(());
        }
        for _ in 0..REAPS_PER_BEAT {
            let mids: Vec<u64> = (0..REAP_BUDGET).map(|_| self.next_mid()).collect();
            let mut pipe = redis::pipe();
            pipe.add_command(self.scripts.reap(&presence, &mids));
            let (answer,): (Value,) = self.timed_query(&pipe, conn).await?;
            let reaped = layout::Reaped::of(&answer).unwrap_or_default();
            self.announce(reaped.events);
            if !reaped.more {
                break;
            }
        }
        Ok(())
    }

    /// [`Bridge::reap`] on a Redis Cluster, where no script can read other slots: learns
    /// the registered instances whose lease is gone ([`layout::DEAD_INSTANCES`], also what
    /// the cluster scripts and routes skip until the next heartbeat), pops their users from
    /// their indexes and runs [`layout::CLUSTER_DEVICE_GONE`] for each in the user's slot
    /// (dropping the dead devices, announcing `offline` for a user with none left), and
    /// forgets an instance once its index is empty. Presence or not, this is what prunes
    /// dead devices there. At most `REAP_BUDGET × REAPS_PER_BEAT` users per heartbeat.
    async fn reap_cluster(&self, conn: &mut Link) -> Result<(), SessionError> {
        let mut ask = redis::pipe();
        ask.add_command(self.scripts.dead_instances());
        let (listed,): (Vec<String>,) = self.timed_query(&ask, conn).await?;
        let dead: Vec<u64> = listed
            .iter()
            .filter_map(|inst| u64::from_str_radix(inst, 16).ok())
            .collect();
        self.known_dead.borrow_mut().clone_from(&dead);
        let presence = self.presence();
        let mut budget = REAP_BUDGET * REAPS_PER_BEAT;
        for &instance in &dead {
            let take = budget.min(REAP_BUDGET);
            if take == 0 {
                break;
            }
            let mut pop = redis::pipe();
            pop.cmd("SPOP")
                .arg(self.names.instance_users(instance))
                .arg(take);
            let (users,): (Vec<String>,) = self.timed_query(&pop, conn).await?;
            budget -= users.len();
            let mut prune = redis::pipe();
            for user in &users {
                let mid = self.next_mid();
                prune.add_command(
                    self.scripts
                        .cluster_device_gone(user, None, &presence, mid, &dead),
                );
            }
            if users.len() < take {
                prune
                    .zrem(self.names.instances(), layout::instance_hex(instance))
                    .ignore();
            }
            if !prune.is_empty() {
                let answers: Vec<Value> = self.timed_query(&prune, conn).await?;
                for answer in &answers {
                    self.announce(layout::presence_events(answer));
                }
            }
        }
        Ok(())
    }

    /// How the route scripts track presence on this node: on when its sink forwards
    /// `online` or `offline`.
    fn presence(&self) -> PresenceArgs<'_> {
        let events = self.config.upstream_events;
        let (online, offline) = (
            events.forwards(EventKind::Online),
            events.forwards(EventKind::Offline),
        );
        let mode = match &self.upstream {
            Some(_) if !online && !offline => PresenceMode::Off,
            // A cluster's scripts cannot append to `P:events` (another slot): the bridge does.
            Some(Sink::Redis(_)) if !self.names.is_cluster() => PresenceMode::Append,
            Some(Sink::Redis(_)) => PresenceMode::Return,
            Some(Sink::Webhook(_)) => PresenceMode::Return,
            None => PresenceMode::Off,
        };
        PresenceArgs {
            mode,
            online,
            offline,
            node: &self.identity.id,
            ts: protocol::now_ms(),
            maxlen: self.config.upstream_stream_maxlen,
        }
    }

    /// A message id for an event this bridge makes.
    fn next_mid(&self) -> u64 {
        self.mids.next(protocol::now_ms())
    }

    /// Hands the presence events a script decided to the sink: counted when the script
    /// appended them itself (Redis Streams on a standalone Redis), sent otherwise.
    fn announce(&self, events: Vec<layout::PresenceEvent>) {
        let Some(sink) = &self.upstream else {
            return;
        };
        let appended = self.presence().mode == PresenceMode::Append;
        for event in events {
            if let (Sink::Redis(redis), true) = (sink, appended) {
                redis.metrics().appended.inc();
                redis.metrics().delivered.inc();
                continue;
            }
            let user: Arc<str> = event.user.into();
            let what = match event.kind {
                EventKind::Online => Happening::Online { user },
                _ => Happening::Offline { user },
            };
            let record = UpstreamEvent {
                mid: event.mid,
                node: self.identity.id.clone(),
                ts: crate::protocol::MidGenerator::timestamp_ms(event.mid),
                what,
            };
            // Refusals (a full queue) are counted by the sink.
            let _ = sink.try_send_unacked(record);
        }
    }

    /// The users whose route-key TTL this heartbeat refreshes: a round over every user
    /// takes [`layout::ROUTE_REFRESH_ROUND_SECS`], a new round starts when one ends.
    fn next_refresh_slice(&self) -> Vec<Arc<str>> {
        let mut queue = self.refresh_queue.borrow_mut();
        let round = Duration::from_secs(layout::ROUTE_REFRESH_ROUND_SECS);
        if queue.is_empty() && self.refresh_round_started.get().elapsed() >= round {
            queue.extend(self.devices.borrow().keys().cloned());
            self.refresh_round_started.set(Instant::now());
        }
        let beats_per_round =
            (round.as_millis() as usize / self.config.cluster_heartbeat_ms.max(1) as usize).max(1);
        let per_beat = queue
            .len()
            .div_ceil(beats_per_round)
            .clamp(1, MAX_REFRESH_PER_BEAT)
            .min(queue.len());
        let at = queue.len() - per_beat;
        queue.split_off(at)
    }

    /// The node is draining: delete its lease and registry entry, so no node routes to it
    /// and presence stops counting it at once.
    async fn deregister(&self, conn: &mut Link) -> Result<(), SessionError> {
        let mut pipe = redis::pipe();
        pipe.del(self.names.alive(self.instance.get()))
            .ignore()
            .del(self.names.node(&self.identity.id))
            .ignore()
            .srem(self.names.nodes(), &*self.identity.id)
            .ignore()
            .del(self.names.mid_node(self.identity.number))
            .ignore();
        let _: () = self.timed_query(&pipe, conn).await?;
        self.deregistered.set(true);
        tracing::info!(node_id = %self.identity.id, "deregistered from the cluster");
        Ok(())
    }
}

/// A Redis future bounded by [`RESPONSE_TIMEOUT`].
async fn timed<T>(future: impl Future<Output = redis::RedisResult<T>>) -> Result<T, SessionError> {
    match tokio::time::timeout(RESPONSE_TIMEOUT, future).await {
        Ok(result) => result.map_err(SessionError::from),
        Err(_) => Err(SessionError::Timeout),
    }
}

/// 64 random bits (instance ids, request ids).
fn rand_u64() -> u64 {
    ahash::RandomState::new().hash_one((std::process::id(), metrics::monotonic_ns()))
}
