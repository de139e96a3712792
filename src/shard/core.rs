//! The shard's core: its tables, its share of the home-shard directory, its streams and the
//! protocol's request handling, with no sockets, no clock and no channels.
//!
//! Like quinn-proto, the core is deterministic: every call takes the time it needs as an
//! argument ([`Now`]) and says what should happen instead of doing it: frames to write to
//! local connections ([`Fanout`]), envelopes for other shards, messages to route, changes
//! for the cluster bus, frames for one connection and connections to close ([`Action`]).
//! The driver (the parent module) owns the sockets, the epoll set, the inbox and the
//! timers, and carries those out. So routing, the device limit, topic interest, streams
//! and request handling are tested here without a socket, and the driver holds no routing
//! logic.
//!
//! The core is generic over its connection handle ([`Peer`]): the driver's handle is the
//! connection itself (`Rc<Conn>`), so a fan-out writes to the recipients the tables hold
//! without looking each one up again; tests use a plain struct.
//!
//! # Tables
//! Local: which of this shard's connections belong to each user, and subscribe to each
//! topic. Home: the [`Directory`] entries of the users and topics whose home this shard is
//! (devices node-wide, oldest first; shards with subscribers), and their streams. A
//! connection's own topic list lives in its [`PeerState`], so unsubscribing on close needs
//! no search.
//!
//! # Streams (protocol v1.1, a lone node)
//! A user's mailbox and a topic's history live on its home shard ([`Streams`]), the one
//! place that numbers its messages, so a stream has one order. A streamed message reaches
//! its home shard as a template (`data` and its parts), is appended there and rendered
//! with its `seq`/`ep`, then forwarded like any other.
//!
//! # Streams (clustered)
//! Clustered nodes keep streams in Redis ([`crate::cluster::redis_layout`]), the one place
//! that numbers a stream's messages cluster-wide. A streamed message made here goes only to
//! the bus ([`Reach::Streamed`]); the script that appends it publishes it to every node with
//! recipients, this one included, and it arrives at the home shard with its position
//! ([`Envelope::RouteUser`]'s `at`), in the order Redis gave. The welcome position is read
//! by the bridge right after it registers the device (in the same pipeline, so no message
//! routed to the device can be numbered before it), and a resume's read comes back to the
//! home shard ([`Envelope::Replayed`]) to be sent on as the same [`Envelope::Replay`]. Redis
//! answers on a connection other than the one that brings live messages, so a live topic
//! message at or below a replay's end may arrive after the replay: a subscription replayed
//! without a floor skips those (`Subscribers::replayed`).
//!
//! The seams, where replayed and live messages meet, are decided by sequence numbers:
//! - *hello*: a user with a mailbox gets `hello` only once its home shard registered the
//!   device and answered the mailbox's position `P` ([`Envelope::Welcome`]). Until then the
//!   connection gets no message and none of its requests is read (the driver waits), and
//!   from then on it gets exactly the mailbox messages after `P` (its *floor*), whichever
//!   shard's inbox held them.
//! - *resume*: the home shard answers with what it retains after the client's position,
//!   on the message lane behind the live messages it forwarded earlier ([`Envelope::Replay`]),
//!   so when the replay arrives the connection has had every live message up to its end;
//!   only the replayed messages at or below the connection's floor are written, then the ack.
//!   Messages that arrived live between `hello` and the resume therefore come before the
//!   replay: every `seq` arrives exactly once, and a client orders by `seq`.
//! - *sub with since*: the same, with the topic's last `seq` this shard delivered when the
//!   subscription was made (or, for a shard new to the topic, the one before the first
//!   live message after it) as the floor.
//!
//! # Token lifetime
//! A connection whose token has `exp` carries it (`hello.exp`); the driver closes it with
//! 4402 once [`PeerState::expired`]. A `refresh` request with a valid token for the same
//! user moves the expiry (validated by jsonwebtoken against the system clock, the one
//! place the core reads a clock itself); the publish rights stay those of the handshake.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ahash::RandomState;
use bytes::Bytes;
use indexmap::IndexMap;
use serde_json::value::RawValue;
use smallvec::{smallvec, SmallVec};

use crate::auth::{
    valid_name, AuthError, Authenticator, Identity, PublishRights, CLOCK_LEEWAY_SECS,
};
use crate::cluster::Control;
use crate::config::History;
use crate::history::{self, Position, Retention, StreamKey, Streams};
use crate::metrics::{self, Delivery, LogLimiter, Rejection, ShardMetrics};
use crate::protocol::{self, render, ErrorCode, MidGenerator, Request, Since, StreamPos};
use crate::router::{
    shard_of, ConnId, Directory, Envelope, Homes, Message, Reach, Route, ShardMask, Template,
};
use crate::upstream::{Device, EventFilter, EventKind, Happening, UpstreamEvent};
use crate::ws::close;

/// Streams a shard looks at per sweep for expired messages and forgotten streams.
const STREAMS_PER_SWEEP: usize = 4096;

/// A connection whose `hello` waits for its mailbox's position: it gets no message yet.
const NOT_WELCOMED: u64 = u64::MAX;

/// The time a core call happens at: a monotonic instant (rate-limited logs) and the wall
/// clock in milliseconds (message ids and `ts`, device connect times, stream ages).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub(crate) instant: Instant,
    pub(crate) wall_ms: u64,
}

impl Now {
    /// The current time.
    pub(crate) fn read() -> Self {
        Now {
            instant: Instant::now(),
            wall_ms: protocol::now_ms(),
        }
    }
}

/// A connection as the core sees it: an id and its [`PeerState`]. Cloning must be cheap
/// (the tables hold clones).
pub(crate) trait Peer: Clone {
    /// The connection's node-unique id.
    fn id(&self) -> ConnId;
    /// Who it is and what it subscribes.
    fn state(&self) -> &PeerState;
}

/// What the core keeps per connection: its user and device, its rights, its topics, when its
/// token expires and where its mailbox stood when it was welcomed.
#[derive(Debug)]
pub(crate) struct PeerState {
    /// `None` on the dev-mode `/echo` endpoint.
    user: Option<Arc<str>>,
    /// The token's `dev` claim (in upstream records).
    device: Option<Arc<str>>,
    publish: PublishRights,
    /// Streams it may send `up` messages to.
    up: PublishRights,
    topics: RefCell<Vec<Arc<str>>>,
    /// The token's `exp`, seconds since the epoch (saturated to `u32`, enough until 2106);
    /// 0 for a token without one. A `refresh` moves it.
    expires: Cell<u32>,
    /// The mailbox's last `seq` when the connection was welcomed: it gets live mailbox
    /// messages after it, and a resume replays up to it ([`NOT_WELCOMED`] before).
    mailbox_floor: Cell<u64>,
}

impl PeerState {
    /// The state of a connection authenticated as `identity` (`None` for `/echo`).
    pub(crate) fn new(identity: Option<Identity>) -> Self {
        let Some(identity) = identity else {
            return PeerState {
                user: None,
                device: None,
                publish: PublishRights::none(),
                up: PublishRights::none(),
                topics: RefCell::default(),
                expires: Cell::new(0),
                mailbox_floor: Cell::new(0),
            };
        };
        let expires = identity.expires;
        PeerState {
            user: Some(identity.user),
            device: identity.device.map(Arc::from),
            publish: identity.publish,
            up: identity.up,
            topics: RefCell::default(),
            expires: Cell::new(expires_secs(expires)),
            mailbox_floor: Cell::new(0),
        }
    }

    /// The connection's user (`None` for `/echo`).
    pub(crate) fn user(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    /// When the token expires (seconds since the epoch), if it does.
    fn expires(&self) -> Option<u64> {
        Some(u64::from(self.expires.get())).filter(|&exp| exp != 0)
    }

    /// Whether the token has expired at `now` (with the clock leeway tokens get at the
    /// handshake, so a token accepted just past its `exp` is not closed at once).
    pub(crate) fn expired(&self, now: Now) -> bool {
        self.expires()
            .is_some_and(|exp| now.wall_ms / 1000 >= exp + CLOCK_LEEWAY_SECS)
    }

    /// Whether a mailbox message `seq` (0: not streamed) goes to this connection live.
    fn takes_mailbox(&self, seq: u64) -> bool {
        let floor = self.mailbox_floor.get();
        floor != NOT_WELCOMED && (seq == 0 || seq > floor)
    }

    fn welcomed(&self) -> bool {
        self.mailbox_floor.get() != NOT_WELCOMED
    }

    fn has_topic(&self, topic: &str) -> bool {
        self.topics.borrow().iter().any(|t| **t == *topic)
    }

    fn topic_count(&self) -> usize {
        self.topics.borrow().len()
    }

    /// Forgets a subscription; `false` if there was none.
    fn remove_topic(&self, topic: &str) -> bool {
        let mut topics = self.topics.borrow_mut();
        match topics.iter().position(|t| **t == *topic) {
            Some(index) => {
                topics.swap_remove(index);
                true
            }
            None => false,
        }
    }
}

/// A token's `exp` as a connection keeps it: seconds saturated to `u32`, 0 for none.
fn expires_secs(exp: Option<u64>) -> u32 {
    exp.map_or(0, |exp| exp.clamp(1, u64::from(u32::MAX)) as u32)
}

/// What the core needs of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// This node's id (in `hello`).
    pub(crate) node_id: Arc<str>,
    /// The node's number in message ids.
    pub(crate) node_number: u16,
    /// Heartbeat interval, seconds (in `hello`).
    pub(crate) heartbeat_secs: u32,
    /// Longest user id or topic name, bytes.
    pub(crate) max_name_bytes: usize,
    /// Subscriptions per connection.
    pub(crate) max_topics_per_connection: usize,
    /// Devices per user on this node while the cluster cannot enforce the limit.
    pub(crate) max_devices_per_user: usize,
    /// Whether the node has a cluster bus (changes go to [`Action::Bus`]).
    pub(crate) clustered: bool,
    /// Mailboxes (`None`: off): kept by this shard on a lone node, in Redis when clustered.
    pub(crate) mailbox: Option<Retention>,
    /// Topic history rules: kept by this shard on a lone node, in Redis when clustered.
    pub(crate) topic_history: Option<Arc<History>>,
    /// This shard's share of `history_max_bytes`.
    pub(crate) history_max_bytes: usize,
    /// The connection events an upstream sink gets (`None`: no sink, `up` is refused).
    pub(crate) upstream: Option<EventFilter>,
}

impl Settings {
    /// The retention of `topic`'s history kept here, if it has one.
    fn topic_retention(&self, topic: &str) -> Option<Retention> {
        self.topic_history.as_ref()?.rule_for(topic)
    }

    /// Whether direct messages must reach home shards as templates, to be appended to
    /// the mailbox and rendered with their position there.
    fn streams_mailboxes(&self) -> bool {
        self.mailbox.is_some()
    }

    /// Whether this shard keeps the streams of its users and topics (a lone node).
    fn keeps_streams(&self) -> bool {
        !self.clustered
    }

    /// How far a streamed message made here is routed: alone, like any other; clustered,
    /// only to Redis, which numbers it and brings it back (see the module docs).
    fn streamed_reach(&self) -> Reach {
        if self.clustered {
            Reach::Streamed
        } else {
            Reach::Cluster
        }
    }
}

/// Something for the driver to do after a core call.
#[derive(Debug)]
pub(crate) enum Action {
    /// Hand an envelope to a shard (possibly this one, which handles its own control
    /// envelopes at once).
    Send { shard: usize, envelope: Envelope },
    /// Route a message entering the node here (a client's `pub` or `send`) to the node and
    /// the cluster, skipping connection `except`.
    Route {
        to: Route,
        message: Message,
        except: Option<ConnId>,
        reach: Reach,
    },
    /// Read a stream from Redis for a resume (clustered); the answer comes back to this
    /// shard as [`Envelope::Replayed`].
    ReadStream {
        key: StreamKey,
        conn: ConnId,
        since_seq: u64,
        since_ep: Box<str>,
        retention: Retention,
        id: Option<Box<RawValue>>,
    },
    /// Tell the cluster bus what changed.
    Bus(Control),
    /// Write a frame to one connection of this shard (if still open): a replay, its ack.
    Write { conn: ConnId, frame: Bytes },
    /// A welcomed connection's `hello`: write it, then start reading the connection.
    Hello { conn: ConnId, frame: Bytes },
    /// Hand a client's `up` to the upstream sink; answer `conn` with the `ack` (`mid`) once
    /// the sink has delivered it, `err unavailable` if it cannot.
    Upstream {
        conn: ConnId,
        id: Option<Box<RawValue>>,
        event: UpstreamEvent,
    },
    /// Hand a connection event to the upstream sink (no answer).
    Event(UpstreamEvent),
    /// Close a connection of this shard (if still open) with `code`.
    Close {
        conn: ConnId,
        code: u16,
        reason: metrics::Close,
    },
}

/// Actions of one call; almost always none or one or two.
pub(crate) type Actions = SmallVec<[Action; 2]>;

/// One frame to write to local connections.
pub(crate) struct Fanout<P> {
    /// The recipients, in table order.
    pub(crate) to: Vec<P>,
    /// The complete WebSocket frame.
    pub(crate) frame: Bytes,
    /// When the message entered the node ([`metrics::monotonic_ns`]).
    pub(crate) entered_ns: u64,
    /// For the delivery counters.
    pub(crate) kind: Delivery,
}

/// What a connection gets once it is in the tables.
#[derive(Debug)]
pub(crate) enum Greeting {
    /// Its `hello`, now.
    Hello(Bytes),
    /// Its `hello` once the user's home shard answers the mailbox's position
    /// ([`Action::Hello`]); read none of its requests before.
    AfterWelcome,
    /// Nothing: an `/echo` connection.
    None,
}

/// A topic's subscribers on this shard.
struct Subscribers<P> {
    conns: IndexMap<ConnId, P, RandomState>,
    /// The last stream `seq` delivered here (0: none since the shard took an interest).
    last_seq: u64,
    /// Subscriptions replayed before any live message set their floor, with the last `seq`
    /// replayed: live messages up to it are skipped for them (clustered, a live message can
    /// come after the replay that already held it; see the module docs).
    replayed: SmallVec<[(ConnId, u64); 1]>,
}

impl<P> Default for Subscribers<P> {
    fn default() -> Self {
        Subscribers {
            conns: IndexMap::default(),
            last_seq: 0,
            replayed: SmallVec::new(),
        }
    }
}

/// A `sub` with `since` waiting for its replay: the floor of what the subscription got
/// live (`None` until the first live message says it).
type PendingResume = (ConnId, Option<u64>);

/// One shard's tables and protocol logic (see the module docs).
pub(crate) struct ShardCore<P: Peer> {
    index: usize,
    homes: Homes,
    settings: Settings,
    metrics: Arc<ShardMetrics>,
    users: HashMap<Arc<str>, SmallVec<[P; 1]>, RandomState>,
    topics: HashMap<Arc<str>, Subscribers<P>, RandomState>,
    directory: Directory,
    /// Streams of the users and topics whose home this shard is (a lone node).
    streams: Streams,
    /// Topic resumes waiting for their replay, by topic.
    topic_resumes: HashMap<Arc<str>, SmallVec<[PendingResume; 1]>, RandomState>,
    mids: MidGenerator,
    /// Limits the warning about direct messages for users with no device online.
    no_route_log: LogLimiter,
    /// Checks the tokens of `refresh` requests.
    auth: Arc<Authenticator>,
}

impl<P: Peer> ShardCore<P> {
    /// The core of shard `index`, counting on `metrics`; `epoch_seed` seeds its streams'
    /// epochs (random in production, fixed in tests).
    pub(crate) fn new(
        index: usize,
        homes: Homes,
        settings: Settings,
        metrics: Arc<ShardMetrics>,
        auth: Arc<Authenticator>,
        epoch_seed: u64,
    ) -> Self {
        ShardCore {
            auth,
            index,
            mids: MidGenerator::new(settings.node_number, index),
            streams: Streams::new(settings.history_max_bytes, epoch_seed),
            homes,
            settings,
            metrics,
            users: HashMap::default(),
            topics: HashMap::default(),
            directory: Directory::default(),
            topic_resumes: HashMap::default(),
            no_route_log: LogLimiter::default(),
        }
    }

    /// A connection was upgraded: enters the tables, tells its user's home shard and the
    /// bus, and says when it gets its `hello`.
    pub(crate) fn open(&mut self, peer: &P, now: Now, out: &mut Actions) -> Greeting {
        self.metrics.connections.add(1);
        let Some(user) = peer.state().user().cloned() else {
            return Greeting::None;
        };
        let devices = self.users.entry(user.clone()).or_default();
        if devices.is_empty() {
            self.metrics.users.add(1);
        }
        devices.push(peer.clone());
        let conn = peer.id();
        out.push(Action::Send {
            shard: self.homes.home(&user),
            envelope: Envelope::DeviceOnline {
                user: user.clone(),
                conn,
            },
        });
        if self.settings.clustered {
            out.push(Action::Bus(Control::DeviceOnline {
                user: user.clone(),
                conn,
                since_ms: now.wall_ms,
                welcome: self.settings.streams_mailboxes(),
            }));
        }
        let connected = Happening::Connect(self.device(peer, &user));
        self.upstream_event(EventKind::Connect, connected, now, out);
        if self.settings.streams_mailboxes() {
            peer.state().mailbox_floor.set(NOT_WELCOMED);
            return Greeting::AfterWelcome;
        }
        Greeting::Hello(self.hello(peer, &user, None))
    }

    /// The upstream records' view of a connection.
    fn device(&self, peer: &P, user: &Arc<str>) -> Device {
        Device {
            user: user.clone(),
            dev: peer.state().device.clone(),
            conn: peer.id(),
        }
    }

    /// An upstream record made now, stamped with a message id.
    fn upstream_record(&mut self, what: Happening, now: Now) -> UpstreamEvent {
        let (mid, ts) = self.stamp(now);
        UpstreamEvent {
            mid,
            node: self.settings.node_id.clone(),
            ts,
            what,
        }
    }

    /// A `sub` or `unsub` record, when the sink forwards them (`upstream_events`).
    fn topic_event(&mut self, kind: EventKind, peer: &P, topic: &str, now: Now, out: &mut Actions) {
        let forwarded = self
            .settings
            .upstream
            .is_some_and(|events| events.forwards(kind));
        let Some(user) = peer.state().user().filter(|_| forwarded) else {
            return;
        };
        let (device, topic) = (self.device(peer, user), Arc::from(topic));
        let what = match kind {
            EventKind::Sub => Happening::Sub { device, topic },
            _ => Happening::Unsub { device, topic },
        };
        self.upstream_event(kind, what, now, out);
    }

    /// Hands a connection event to the sink when there is one and it forwards `kind`.
    fn upstream_event(&mut self, kind: EventKind, what: Happening, now: Now, out: &mut Actions) {
        if self
            .settings
            .upstream
            .is_some_and(|events| events.forwards(kind))
        {
            let record = self.upstream_record(what, now);
            out.push(Action::Event(record));
        }
    }

    fn hello(&self, peer: &P, user: &str, mailbox: Option<StreamPos<'_>>) -> Bytes {
        let settings = &self.settings;
        render::hello(
            user,
            peer.id(),
            &settings.node_id,
            settings.heartbeat_secs,
            peer.state().expires(),
            mailbox,
        )
    }

    /// A connection left: out of every table; a topic's last local subscriber leaving tells
    /// the topic's home shard, and the user's home shard and the bus forget the device.
    /// Called exactly once per [`open`](Self::open).
    /// `closed` is the close code and reason the connection ended with (its `disconnect`
    /// record).
    pub(crate) fn close(
        &mut self,
        peer: &P,
        closed: (u16, &'static str),
        now: Now,
        out: &mut Actions,
    ) {
        self.metrics.connections.add(-1);
        let conn = peer.id();
        for topic in peer.state().topics.take() {
            self.remove_subscriber(&topic, conn, out);
        }
        let Some(user) = peer.state().user() else {
            return;
        };
        if let Some(devices) = self.users.get_mut(user) {
            devices.retain(|c| c.id() != conn);
            if devices.is_empty() {
                self.users.remove(user);
                self.metrics.users.add(-1);
            }
        }
        out.push(Action::Send {
            shard: self.homes.home(user),
            envelope: Envelope::DeviceOffline {
                user: user.clone(),
                conn,
            },
        });
        let (code, reason) = closed;
        let device = self.device(peer, &user.clone());
        let disconnected = Happening::Disconnect {
            device,
            code,
            reason: reason.into(),
        };
        self.upstream_event(EventKind::Disconnect, disconnected, now, out);
        if self.settings.clustered {
            out.push(Action::Bus(Control::DeviceOffline {
                user: user.clone(),
                conn,
            }));
        }
    }

    /// Handles one protocol request (a complete text message) from `peer` and returns the
    /// reply frame (`ack`, `err` or `pong`); `None` when the reply comes later (a resume's
    /// ack follows its replay).
    pub(crate) fn request(
        &mut self,
        peer: &P,
        text: &str,
        now: Now,
        out: &mut Actions,
    ) -> Option<Bytes> {
        let (id, request) = match protocol::parse_request(text) {
            Ok(parsed) => parsed,
            Err(refusal) => {
                self.metrics.rejected(if refusal.is_unknown_op() {
                    Rejection::UnknownOp
                } else {
                    Rejection::Malformed
                });
                return Some(render::err(refusal.id, refusal.code, refusal.msg));
            }
        };
        let refuse = |reason: Rejection, code: ErrorCode, msg: &str| {
            self.metrics.rejected(reason);
            Some(render::err(id, code, msg))
        };
        let max_name = self.settings.max_name_bytes;
        let state = peer.state();
        match request {
            Request::Ping => Some(render::pong(id)),
            Request::Refresh { token } => match self.auth.authenticate(Some(&token), None) {
                Ok(identity) if Some(&identity.user) == state.user() => {
                    state.expires.set(expires_secs(identity.expires));
                    Some(render::ack(id, None))
                }
                Ok(_) => refuse(
                    Rejection::Forbidden,
                    ErrorCode::Forbidden,
                    "the token is for another user",
                ),
                Err(error) => refuse(
                    Rejection::BadToken,
                    ErrorCode::Unauthorized,
                    match error {
                        AuthError::Expired => "token expired",
                        _ => "invalid token",
                    },
                ),
            },
            Request::Sub { topic, since } => {
                if !valid_name(&topic, max_name) {
                    return refuse(
                        Rejection::BadName,
                        ErrorCode::BadRequest,
                        "invalid topic name",
                    );
                }
                if !state.has_topic(&topic) {
                    if state.topic_count() >= self.settings.max_topics_per_connection {
                        return refuse(
                            Rejection::TooManyTopics,
                            ErrorCode::TooMany,
                            "too many topics on this connection",
                        );
                    }
                    self.add_subscriber(peer, &topic, out);
                    self.topic_event(EventKind::Sub, peer, &topic, now, out);
                }
                match since {
                    None => Some(render::ack(id, None)),
                    Some(since) => self.resume_topic(peer, &topic, since, id, out),
                }
            }
            Request::Unsub { topic } => {
                if !state.remove_topic(&topic) {
                    return refuse(
                        Rejection::NotSubscribed,
                        ErrorCode::NotFound,
                        "not subscribed to this topic",
                    );
                }
                self.remove_subscriber(&topic, peer.id(), out);
                self.topic_event(EventKind::Unsub, peer, &topic, now, out);
                Some(render::ack(id, None))
            }
            Request::Pub { topic, data } => {
                let named = Named {
                    name: &topic,
                    rights: &state.publish,
                    invalid: "invalid topic name",
                    forbidden: "token does not allow publishing to this topic",
                };
                if let Err((reason, code, msg)) = named.check(max_name) {
                    return refuse(reason, code, msg);
                }
                let (mid, ts) = self.stamp(now);
                tracing::debug!(mid, conn = peer.id(), topic = &*topic, "client publication");
                // A topic with history is appended and rendered on its home shard, or
                // clustered in Redis.
                let (message, reach) = if self.settings.topic_retention(&topic).is_some() {
                    let message = Message::per_topic(mid, template(ts, None, None, data));
                    (message, self.settings.streamed_reach())
                } else {
                    let frame = render::publication(Some(&topic), mid, ts, data.get());
                    (Message::new(mid, frame), Reach::Cluster)
                };
                out.push(Action::Route {
                    to: Route::Topic(Arc::from(&*topic)),
                    message,
                    except: None,
                    reach,
                });
                Some(render::ack(id, Some(mid)))
            }
            Request::Send { to, data } => {
                if !valid_name(&to, max_name) {
                    return refuse(Rejection::BadName, ErrorCode::BadRequest, "invalid user id");
                }
                let from = state.user().expect("only user sessions handle requests");
                let (mid, ts) = self.stamp(now);
                tracing::debug!(mid, conn = peer.id(), to = &*to, "client direct message");
                let to: Arc<str> = Arc::from(&*to);
                // Mailboxes append it on each user's home shard and render it there, or
                // clustered in Redis.
                let (message, reach) = if self.settings.streams_mailboxes() {
                    let template = template(ts, Some(from.clone()), Some(to.clone()), data);
                    (
                        Message::per_user(mid, template),
                        self.settings.streamed_reach(),
                    )
                } else {
                    let frame = render::msg(Some(from), &to, mid, ts, data.get());
                    (Message::new(mid, frame), Reach::Cluster)
                };
                // The recipient's devices, and the sender's other devices for the copy; the
                // sending connection is not one of the recipient's unless both are one user.
                let users = if to == *from {
                    smallvec![from.clone()]
                } else {
                    smallvec![to, from.clone()]
                };
                out.push(Action::Route {
                    to: Route::Users(users),
                    message,
                    except: Some(peer.id()),
                    reach,
                });
                Some(render::ack(id, Some(mid)))
            }
            Request::Up { data, stream } => {
                let stream = stream.unwrap_or(Cow::Borrowed("up"));
                let named = Named {
                    name: &stream,
                    rights: &state.up,
                    invalid: "invalid stream name",
                    forbidden: "token does not allow up messages to this stream",
                };
                if let Err((reason, code, msg)) = named.check(max_name) {
                    return refuse(reason, code, msg);
                }
                if self.settings.upstream.is_none() {
                    return refuse(
                        Rejection::UpUnavailable,
                        ErrorCode::Unavailable,
                        "no upstream sink is configured on this node",
                    );
                }
                let user = state.user().expect("only user sessions handle requests");
                let device = self.device(peer, user);
                let what = Happening::Up {
                    device,
                    stream: Arc::from(&*stream),
                    data: data.to_owned(),
                };
                let event = self.upstream_record(what, now);
                tracing::debug!(mid = event.mid, conn = peer.id(), "up message");
                out.push(Action::Upstream {
                    conn: peer.id(),
                    id: id.map(RawValue::to_owned),
                    event,
                });
                None
            }
            Request::Resume { since } => {
                let Some(user) = state.user().filter(|_| self.settings.mailbox.is_some()) else {
                    return refuse(
                        Rejection::NoStream,
                        ErrorCode::NotFound,
                        "this node keeps no mailboxes",
                    );
                };
                out.push(self.resume(StreamKey::Mailbox(user.clone()), peer, since, id));
                None
            }
        }
    }

    /// `sub` with `since`: asks the topic's home shard for its history after the client's
    /// position; a topic without history is acked `recovered:false` at once.
    fn resume_topic(
        &mut self,
        peer: &P,
        topic: &str,
        since: Since<'_>,
        id: Option<&RawValue>,
        out: &mut Actions,
    ) -> Option<Bytes> {
        if self.settings.topic_retention(topic).is_none() {
            let none = StreamPos { seq: 0, ep: "" };
            return Some(render::ack_replay(id, false, none));
        }
        let (key, subscribers) = self
            .topics
            .get_key_value(topic)
            .expect("the connection subscribes the topic");
        let floor = (subscribers.last_seq > 0).then_some(subscribers.last_seq);
        self.topic_resumes
            .entry(key.clone())
            .or_default()
            .push((peer.id(), floor));
        out.push(self.resume(StreamKey::Topic(key.clone()), peer, since, id));
        None
    }

    fn resume(&self, key: StreamKey, peer: &P, since: Since<'_>, id: Option<&RawValue>) -> Action {
        Action::Send {
            shard: self.homes.home(key.name()),
            envelope: Envelope::Resume {
                key,
                conn: peer.id(),
                since_seq: since.seq,
                since_ep: since.ep.into(),
                id: id.map(|id| id.to_owned()),
            },
        }
    }

    /// Handles one envelope from the inbox. `bus_up` says whether the cluster bus is
    /// enforcing the device limit right now. Returns what to write to local connections.
    pub(crate) fn envelope(
        &mut self,
        envelope: Envelope,
        bus_up: bool,
        now: Now,
        out: &mut Actions,
    ) -> Option<Fanout<P>> {
        self.metrics.envelopes_in.inc();
        match envelope {
            Envelope::RouteUser {
                user,
                message,
                except,
                at,
            } => {
                let shards = self.directory.user_shards(&user);
                let (message, seq) = match at {
                    // Nobody here (the device just left): nothing to render.
                    Some(at) if shards.is_empty() => (message, at.seq),
                    Some(at) => (positioned(&user, &message, &at), at.seq),
                    None => self.append(StreamKey::Mailbox(user.clone()), message, now),
                };
                if !self.settings.keeps_streams() {
                    // Clustered: Redis counted it, and routed it here for a device that
                    // may have just left.
                } else if shards.is_empty() && seq > 0 {
                    self.metrics.mailbox_offline.inc();
                } else if shards.is_empty() {
                    // A sender's copy always finds the sending device, unless it just left.
                    self.metrics.dropped(metrics::Drop::NoRoute);
                    self.log_no_route(&user, message.mid, now);
                }
                self.send_to_shards(shards, out, || Envelope::DeliverUser {
                    user: user.clone(),
                    message: message.clone(),
                    except,
                    seq,
                });
                None
            }
            Envelope::RouteTopic { topic, message, at } => {
                let shards = self.directory.topic_shards(&topic);
                let (message, seq) = match at {
                    Some(at) if shards.is_empty() => (message, at.seq),
                    Some(at) => (positioned(&topic, &message, &at), at.seq),
                    None => self.append(StreamKey::Topic(topic.clone()), message, now),
                };
                if !shards.is_empty() {
                    // One frame for every subscriber on this node, rendered here at most once.
                    let message = message.rendered_for(&topic);
                    self.send_to_shards(shards, out, || Envelope::DeliverTopic {
                        topic: topic.clone(),
                        message: message.clone(),
                        seq,
                    });
                }
                None
            }
            Envelope::DeliverUser {
                user,
                message,
                except,
                seq,
            } => {
                let devices = self.users.get(&user)?;
                let to: Vec<P> = devices
                    .iter()
                    .filter(|c| Some(c.id()) != except && c.state().takes_mailbox(seq))
                    .cloned()
                    .collect();
                (!to.is_empty()).then(|| Fanout {
                    frame: message.frame_for(&user),
                    to,
                    entered_ns: message.entered_ns,
                    kind: Delivery::Direct,
                })
            }
            Envelope::DeliverTopic {
                topic,
                message,
                seq,
            } => {
                let subscribers = self.topics.get_mut(&topic)?;
                let replayed = std::mem::take(&mut subscribers.replayed);
                let to = subscribers
                    .conns
                    .values()
                    .filter(|c| {
                        seq == 0 || !replayed.iter().any(|&(r, upto)| r == c.id() && seq <= upto)
                    })
                    .cloned()
                    .collect();
                if seq > 0 {
                    subscribers.last_seq = seq;
                    subscribers.replayed = replayed
                        .into_iter()
                        .filter(|&(_, upto)| seq < upto)
                        .collect();
                    if let Some(pending) = self.topic_resumes.get_mut(&topic) {
                        for (_, floor) in pending.iter_mut().filter(|(_, f)| f.is_none()) {
                            *floor = Some(seq - 1);
                        }
                    }
                } else {
                    subscribers.replayed = replayed;
                }
                Some(Fanout {
                    to,
                    frame: message.frame_for(&topic),
                    entered_ns: message.entered_ns,
                    kind: Delivery::Topic,
                })
            }
            Envelope::Broadcast { message } => Some(Fanout {
                to: self
                    .users
                    .values()
                    .flatten()
                    .filter(|c| c.state().welcomed())
                    .cloned()
                    .collect(),
                frame: message.shared_frame(),
                entered_ns: message.entered_ns,
                kind: Delivery::Broadcast,
            }),
            Envelope::DeviceOnline { user, conn } => {
                // While the bus is up the cluster enforces the device limit (it knows the
                // oldest device on any node); this shard enforces it only as a fallback.
                let max = if bus_up {
                    usize::MAX
                } else {
                    self.settings.max_devices_per_user
                };
                // Clustered, the bridge reads the position from Redis and welcomes.
                if self.settings.streams_mailboxes() && self.settings.keeps_streams() {
                    let key = StreamKey::Mailbox(user.clone());
                    let mailbox = self.streams.position(&key, now.wall_ms);
                    out.push(Action::Send {
                        shard: shard_of(conn),
                        envelope: Envelope::Welcome {
                            user: user.clone(),
                            conn,
                            mailbox,
                        },
                    });
                }
                let added = self.directory.device_online(user.clone(), conn, max);
                if added.first && !self.settings.clustered {
                    self.upstream_event(EventKind::Online, Happening::Online { user }, now, out);
                }
                if let Some(oldest) = added.evicted {
                    out.push(Action::Send {
                        shard: shard_of(oldest),
                        envelope: Envelope::CloseConn {
                            conn: oldest,
                            code: close::REPLACED,
                            reason: metrics::Close::Replaced,
                        },
                    });
                }
                None
            }
            Envelope::DeviceOffline { user, conn } => {
                let last = self.directory.device_offline(&user, conn);
                if last && !self.settings.clustered {
                    let offline = Happening::Offline { user };
                    self.upstream_event(EventKind::Offline, offline, now, out);
                }
                None
            }
            Envelope::Welcome {
                user,
                conn,
                mailbox,
            } => {
                let peer = self.users.get(&user)?.iter().find(|p| p.id() == conn)?;
                let at = mailbox
                    .as_ref()
                    .map_or(StreamPos { seq: 0, ep: "" }, Position::as_pos);
                peer.state().mailbox_floor.set(at.seq);
                let frame = self.hello(peer, &user, Some(at));
                out.push(Action::Hello { conn, frame });
                None
            }
            Envelope::TopicInterest {
                topic,
                shard,
                active,
            } => {
                let changed = self.directory.topic_interest(topic.clone(), shard, active);
                if let (Some(active), true) = (changed, self.settings.clustered) {
                    out.push(Action::Bus(Control::TopicActive { topic, active }));
                }
                None
            }
            Envelope::Resume {
                key,
                conn,
                since_seq,
                since_ep,
                id,
            } => {
                let retention = self.retention_of(&key);
                if let (false, Some(retention)) = (self.settings.keeps_streams(), retention) {
                    out.push(Action::ReadStream {
                        key,
                        conn,
                        since_seq,
                        since_ep,
                        retention,
                        id,
                    });
                    return None;
                }
                let limit = retention.map_or(0, |r| r.size);
                let replay = self
                    .streams
                    .since(&key, since_seq, &since_ep, limit, now.wall_ms);
                self.send_replay(key, conn, Some(replay), id, out);
                None
            }
            Envelope::Replayed {
                key,
                conn,
                replay,
                id,
            } => {
                self.send_replay(key, conn, replay, id, out);
                None
            }
            Envelope::StreamsLost => {
                for peer in self.users.values().flatten() {
                    if peer.state().welcomed() {
                        peer.state().mailbox_floor.set(0);
                    }
                }
                for subscribers in self.topics.values_mut() {
                    subscribers.last_seq = 0;
                    subscribers.replayed.clear();
                }
                None
            }
            Envelope::Replay {
                key,
                conn,
                frames,
                ack,
            } => {
                let floor = match &key {
                    StreamKey::Mailbox(user) => {
                        let peer = self.users.get(user)?.iter().find(|p| p.id() == conn)?;
                        Some(peer.state().mailbox_floor.get())
                    }
                    StreamKey::Topic(topic) => self.take_topic_resume(topic, conn)?,
                };
                if let (StreamKey::Topic(topic), None, Some((last, _))) =
                    (&key, floor, frames.last())
                {
                    if let Some(subscribers) = self.topics.get_mut(topic) {
                        subscribers.replayed.push((conn, *last));
                    }
                }
                let replayed = frames
                    .into_iter()
                    .filter(|(seq, _)| floor.is_none_or(|floor| *seq <= floor))
                    .map(|(_, frame)| Action::Write { conn, frame });
                out.extend(replayed);
                out.push(Action::Write { conn, frame: ack });
                None
            }
            Envelope::ReadHistory {
                key,
                after_seq,
                limit,
                reply,
            } => {
                let replay = self.streams.history(&key, after_seq, limit, now.wall_ms);
                self.count_replay(&replay);
                let _ = reply.send(history::history_json(&replay));
                None
            }
            Envelope::CloseUser { user, code, reason } => {
                for &conn in self.directory.devices(&user) {
                    out.push(Action::Send {
                        shard: shard_of(conn),
                        envelope: Envelope::CloseConn { conn, code, reason },
                    });
                }
                None
            }
            Envelope::CloseConn { conn, code, reason } => {
                out.push(Action::Close { conn, code, reason });
                None
            }
            Envelope::QueryUser { user, reply } => {
                let _ = reply.send(self.directory.devices(&user).len());
                None
            }
            Envelope::QueryTopic { topic, reply } => {
                let _ = reply.send(self.directory.topic_shards(&topic));
                None
            }
            Envelope::CountSubscribers { topic, reply } => {
                let _ = reply.send(self.topics.get(&topic).map_or(0, |s| s.conns.len()));
                None
            }
        }
    }

    /// Expires stream messages and forgets idle streams, a bounded number per call.
    pub(crate) fn sweep(&mut self, now: Now) {
        self.streams.sweep(now.wall_ms, STREAMS_PER_SWEEP);
        self.metrics
            .history_bytes
            .set(self.streams.stats().bytes as i64);
    }

    /// Renders a resume's answer (`None`: the stream could not be read, acked
    /// `recovered:false` at `seq` 0) and sends it to the asking connection's shard, on the
    /// message lane behind what this shard forwarded before.
    fn send_replay(
        &self,
        key: StreamKey,
        conn: ConnId,
        replay: Option<history::Replay>,
        id: Option<Box<RawValue>>,
        out: &mut Actions,
    ) {
        let replay = replay.unwrap_or(history::Replay {
            messages: Vec::new(),
            recovered: false,
            last_seq: 0,
            ep: None,
        });
        self.count_replay(&replay);
        let ep = replay.ep.as_deref().unwrap_or("");
        let frames = replay
            .messages
            .iter()
            .map(|entry| (entry.seq, history::frame(&key, ep, entry)))
            .collect();
        let at = StreamPos {
            seq: replay.last_seq,
            ep,
        };
        let ack = render::ack_replay(id.as_deref(), replay.recovered, at);
        out.push(Action::Send {
            shard: shard_of(conn),
            envelope: Envelope::Replay {
                key,
                conn,
                frames,
                ack,
            },
        });
    }

    /// Appends a message to stream `key` (`user`'s mailbox or `topic`'s history) when this
    /// shard keeps it, and answers the message as the stream's recipients get it (rendered
    /// with its position) and its `seq` (0: not streamed, the message unchanged).
    fn append(&mut self, key: StreamKey, message: Message, now: Now) -> (Message, u64) {
        let retention = self
            .retention_of(&key)
            .filter(|_| self.settings.keeps_streams());
        let (Some(retention), Some(entry)) = (retention, message.stream_entry(key.name())) else {
            return (message, 0);
        };
        let at = self.streams.append(&key, retention, now.wall_ms, entry);
        self.count_append();
        let frame = message.frame_in_stream(key.name(), at.as_pos());
        (message.with_frame(frame), at.seq)
    }

    fn retention_of(&self, key: &StreamKey) -> Option<Retention> {
        match key {
            StreamKey::Mailbox(_) => self.settings.mailbox,
            StreamKey::Topic(topic) => self.settings.topic_retention(topic),
        }
    }

    fn count_append(&self) {
        self.metrics.stream_appends.inc();
        self.metrics
            .history_bytes
            .set(self.streams.stats().bytes as i64);
    }

    fn count_replay(&self, replay: &history::Replay) {
        self.metrics.replays.inc();
        self.metrics.replayed.add(replay.messages.len() as u64);
        if !replay.recovered {
            self.metrics.replays_unrecovered.inc();
        }
    }

    /// The floor of a topic resume of `conn` waiting for its replay (`Some(None)`: no live
    /// message reached it yet); `None` if there is none (unsubscribed meanwhile).
    fn take_topic_resume(&mut self, topic: &str, conn: ConnId) -> Option<Option<u64>> {
        let pending = self.topic_resumes.get_mut(topic)?;
        let index = pending.iter().position(|(c, _)| *c == conn)?;
        let (_, floor) = pending.swap_remove(index);
        if pending.is_empty() {
            self.topic_resumes.remove(topic);
        }
        Some(floor)
    }

    /// A message id and timestamp for a message made now.
    fn stamp(&mut self, now: Now) -> (u64, u64) {
        (self.mids.next(now.wall_ms), now.wall_ms)
    }

    fn send_to_shards(
        &self,
        shards: ShardMask,
        out: &mut Actions,
        mut envelope: impl FnMut() -> Envelope,
    ) {
        out.extend(shards.iter().map(|shard| Action::Send {
            shard,
            envelope: envelope(),
        }));
    }

    /// Subscribes `peer` to `topic` (not yet subscribed); the topic's first local
    /// subscriber tells its home shard.
    fn add_subscriber(&mut self, peer: &P, topic: &str, out: &mut Actions) {
        let key = match self.topics.get_key_value(topic) {
            Some((key, _)) => key.clone(),
            None => {
                let key: Arc<str> = Arc::from(topic);
                self.metrics.topics.add(1);
                out.push(self.interest(key.clone(), true));
                key
            }
        };
        self.topics
            .entry(key.clone())
            .or_default()
            .conns
            .insert(peer.id(), peer.clone());
        peer.state().topics.borrow_mut().push(key);
    }

    fn remove_subscriber(&mut self, topic: &str, conn: ConnId, out: &mut Actions) {
        let Some(subscribers) = self.topics.get_mut(topic) else {
            return;
        };
        subscribers.conns.swap_remove(&conn);
        subscribers.replayed.retain(|(c, _)| *c != conn);
        if subscribers.conns.is_empty() {
            let (key, _) = self
                .topics
                .remove_entry(topic)
                .expect("entry was just found");
            self.metrics.topics.add(-1);
            self.topic_resumes.remove(topic);
            out.push(self.interest(key, false));
        }
    }

    /// Tells `topic`'s home shard that this shard gained or lost its interest.
    fn interest(&self, topic: Arc<str>, active: bool) -> Action {
        Action::Send {
            shard: self.homes.home(&topic),
            envelope: Envelope::TopicInterest {
                topic,
                shard: self.index,
                active,
            },
        }
    }

    /// Logs (at most once a second) a direct message that found no device of its user.
    fn log_no_route(&self, user: &str, mid: u64, now: Now) {
        if let Some(suppressed) = self.no_route_log.allow(now.instant) {
            tracing::warn!(
                user,
                mid,
                suppressed,
                "direct message for a user with no device online dropped (logged at most once a second; shardcast_drops_total{{reason=\"no_route\"}} counts each)"
            );
        }
    }
}

/// `message` as `target`'s recipients get it at position `at` of `target`'s stream.
fn positioned(target: &str, message: &Message, at: &Position) -> Message {
    message.with_frame(message.frame_in_stream(target, at.as_pos()))
}

/// A message's parts, to be rendered per target or with a stream position.
fn template(ts: u64, from: Option<Arc<str>>, to: Option<Arc<str>>, data: &RawValue) -> Template {
    Template {
        ts,
        from,
        to,
        data: Arc::from(data.get()),
    }
}
/// A name a request writes to (a topic to publish on, an upstream stream) and the token's
/// rights over such names: checked for its form first, then for the right.
struct Named<'a> {
    name: &'a str,
    rights: &'a PublishRights,
    /// The refusal of a malformed name.
    invalid: &'static str,
    /// The refusal of a name the token does not allow.
    forbidden: &'static str,
}

impl Named<'_> {
    /// `Ok` when the name is well formed and allowed; else the refusal's metric, code and
    /// message.
    fn check(&self, max_name: usize) -> Result<(), (Rejection, ErrorCode, &'static str)> {
        if !valid_name(self.name, max_name) {
            Err((Rejection::BadName, ErrorCode::BadRequest, self.invalid))
        } else if !self.rights.allows(self.name) {
            Err((Rejection::Forbidden, ErrorCode::Forbidden, self.forbidden))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    //! A node of several cores and no sockets: envelopes travel through one FIFO queue
    //! (as through the shards' inboxes), time is made up, and what the cores ask for is
    //! recorded.

    use std::collections::VecDeque;
    use std::rc::Rc;
    use std::time::Duration;

    use super::*;
    use crate::router::conn_id;

    const SECRET: &str = "core-test-secret";

    struct TestPeer {
        id: ConnId,
        state: PeerState,
    }

    type Handle = Rc<TestPeer>;

    impl Peer for Handle {
        fn id(&self) -> ConnId {
            self.id
        }

        fn state(&self) -> &PeerState {
            &self.state
        }
    }

    struct TestNode {
        cores: Vec<ShardCore<Handle>>,
        homes: Homes,
        queue: VecDeque<(usize, Envelope)>,
        /// Frames written, by connection.
        written: Vec<(ConnId, String)>,
        closed: Vec<(ConnId, u16)>,
        bus: Vec<Control>,
        /// Streamed messages routed only to the bus (clustered).
        streamed: Vec<(Route, Message, Option<ConnId>)>,
        /// Streams read from Redis for resumes (clustered).
        reads: Vec<(StreamKey, ConnId)>,
        /// Records handed to the upstream sink.
        upstream: Vec<UpstreamEvent>,
        bus_up: bool,
        now: Now,
        next_seq: u64,
    }

    fn settings(clustered: bool) -> Settings {
        Settings {
            node_id: "test-node".into(),
            node_number: 7,
            heartbeat_secs: 25,
            max_name_bytes: 64,
            max_topics_per_connection: 3,
            max_devices_per_user: 4,
            clustered,
            mailbox: None,
            topic_history: None,
            history_max_bytes: 1 << 20,
            upstream: None,
        }
    }

    /// A lone node's settings with mailboxes (10 messages) and history for `news.*` (2).
    fn streaming() -> Settings {
        let rule = crate::config::TopicHistory {
            pattern: "news.*".into(),
            size: 2,
            ttl_secs: 60,
        };
        Settings {
            mailbox: Some(Retention {
                size: 10,
                ttl_secs: 3_600,
            }),
            topic_history: Some(Arc::new(History { topics: vec![rule] })),
            ..settings(false)
        }
    }

    impl TestNode {
        fn new(shards: usize, clustered: bool) -> Self {
            Self::with(shards, settings(clustered))
        }

        fn with(shards: usize, settings: Settings) -> Self {
            let homes = Homes::new(shards);
            let cores = (0..shards)
                .map(|index| {
                    let metrics = Arc::new(ShardMetrics::default());
                    let auth = Arc::new(Authenticator::new(Some(SECRET), false, 64));
                    let settings = settings.clone();
                    ShardCore::new(index, homes.clone(), settings, metrics, auth, index as u64)
                })
                .collect();
            TestNode {
                cores,
                homes,
                queue: VecDeque::new(),
                written: Vec::new(),
                closed: Vec::new(),
                bus: Vec::new(),
                streamed: Vec::new(),
                reads: Vec::new(),
                upstream: Vec::new(),
                bus_up: false,
                now: Now {
                    instant: Instant::now(),
                    wall_ms: 1_700_000_000_000,
                },
                next_seq: 1,
            }
        }

        fn tick(&mut self, ms: u64) {
            self.now.instant += Duration::from_millis(ms);
            self.now.wall_ms += ms;
        }

        /// Does what the cores asked for; routes go where `Router::route` sends them
        /// within a node.
        fn apply(&mut self, actions: Actions) {
            for action in actions {
                match action {
                    Action::Send { shard, envelope } => self.queue.push_back((shard, envelope)),
                    Action::Route {
                        to,
                        message,
                        except,
                        reach: Reach::Streamed,
                    } => self.streamed.push((to, message, except)),
                    Action::ReadStream { key, conn, .. } => self.reads.push((key, conn)),
                    Action::Route {
                        to,
                        message,
                        except,
                        ..
                    } => match to {
                        Route::Users(users) => {
                            for user in users {
                                let home = self.homes.home(&user);
                                let envelope = Envelope::RouteUser {
                                    user,
                                    message: message.clone(),
                                    except,
                                    at: None,
                                };
                                self.queue.push_back((home, envelope));
                            }
                        }
                        Route::Topic(topic) => {
                            let home = self.homes.home(&topic);
                            let route = Envelope::RouteTopic {
                                topic,
                                message,
                                at: None,
                            };
                            self.queue.push_back((home, route));
                        }
                        Route::Broadcast => {
                            for shard in 0..self.cores.len() {
                                let message = message.clone();
                                self.queue
                                    .push_back((shard, Envelope::Broadcast { message }));
                            }
                        }
                    },
                    Action::Bus(control) => self.bus.push(control),
                    Action::Close { conn, code, .. } => self.closed.push((conn, code)),
                    Action::Write { conn, frame } | Action::Hello { conn, frame } => {
                        self.written.push((conn, frame_text(&frame)));
                    }
                    Action::Upstream { event, .. } | Action::Event(event) => {
                        self.upstream.push(event);
                    }
                }
            }
        }

        /// Hands every queued envelope to its shard, in order, until none is left.
        fn settle(&mut self) {
            for _ in 0..10_000 {
                let Some((shard, envelope)) = self.queue.pop_front() else {
                    return;
                };
                let mut actions = Actions::new();
                let fanout =
                    self.cores[shard].envelope(envelope, self.bus_up, self.now, &mut actions);
                self.apply(actions);
                if let Some(fanout) = fanout {
                    assert!(fanout.to.iter().all(|p| shard_of(p.id) == shard));
                    let frame = frame_text(&fanout.frame);
                    self.written
                        .extend(fanout.to.iter().map(|p| (p.id, frame.clone())));
                }
            }
            panic!("envelopes never settled");
        }

        fn connect(&mut self, shard: usize, user: &str) -> Handle {
            let peer = self.open(shard, user);
            let hello = &self.frames_of_id(peer.id)[0];
            assert!(hello.starts_with(r#"{"op":"hello""#), "{hello}");
            peer
        }

        /// A connection in the tables, greeted or not.
        fn open(&mut self, shard: usize, user: &str) -> Handle {
            let identity = Identity {
                user: user.into(),
                device: None,
                publish: PublishRights::from_patterns(vec!["news.*".into()]),
                up: PublishRights::from_patterns(vec!["up".into()]),
                expires: None,
            };
            let peer = Rc::new(TestPeer {
                id: conn_id(shard, self.next_seq),
                state: PeerState::new(Some(identity)),
            });
            self.next_seq += 1;
            let mut actions = Actions::new();
            let greeting = self.cores[shard].open(&peer, self.now, &mut actions);
            if let Greeting::Hello(hello) = greeting {
                self.written.push((peer.id, frame_text(&hello)));
            }
            self.apply(actions);
            self.settle();
            peer
        }

        fn disconnect(&mut self, peer: &Handle) {
            let mut actions = Actions::new();
            let closed = (close::NORMAL, "peer");
            self.cores[shard_of(peer.id)].close(peer, closed, self.now, &mut actions);
            self.apply(actions);
            self.settle();
        }

        fn request(&mut self, peer: &Handle, text: &str) -> String {
            self.ask(peer, text).expect("an immediate reply")
        }

        /// A request whose reply may come later (then `None`, and it is written to `peer`).
        fn ask(&mut self, peer: &Handle, text: &str) -> Option<String> {
            let mut actions = Actions::new();
            let reply = self.cores[shard_of(peer.id)].request(peer, text, self.now, &mut actions);
            self.apply(actions);
            self.settle();
            reply.map(|reply| frame_text(&reply))
        }

        /// Takes the frames written so far to `peer`.
        fn frames_of(&mut self, peer: &Handle) -> Vec<String> {
            self.frames_of_id(peer.id)
        }

        fn frames_of_id(&mut self, conn: ConnId) -> Vec<String> {
            let (mine, rest) = std::mem::take(&mut self.written)
                .into_iter()
                .partition(|(id, _)| *id == conn);
            self.written = rest;
            mine.into_iter().map(|(_, frame)| frame).collect()
        }

        fn metrics(&self, shard: usize) -> &ShardMetrics {
            &self.cores[shard].metrics
        }
    }

    /// The payload of an unmasked server text frame.
    fn frame_text(frame: &Bytes) -> String {
        let header = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        String::from_utf8(frame[header..].to_vec()).expect("text frame")
    }

    #[test]
    fn a_direct_message_reaches_every_device_on_every_shard_but_the_sender() {
        let mut node = TestNode::new(4, false);
        let alice = [
            node.connect(0, "alice"),
            node.connect(3, "alice"),
            node.connect(1, "alice"),
        ];
        let bob = [node.connect(2, "bob"), node.connect(1, "bob")];
        node.written.clear();

        let ack = node.request(
            &bob[0],
            r#"{"op":"send","id":5,"to":"alice","data":{"n":1}}"#,
        );
        assert!(ack.starts_with(r#"{"op":"ack","id":5,"mid":""#), "{ack}");
        for device in &alice {
            let frames = node.frames_of(device);
            assert_eq!(frames.len(), 1, "each device of alice once");
            assert!(
                frames[0].contains(r#""from":"bob","to":"alice""#),
                "{}",
                frames[0]
            );
        }
        assert!(
            node.frames_of(&bob[0]).is_empty(),
            "not back to the sending device"
        );
        assert_eq!(
            node.frames_of(&bob[1]).len(),
            1,
            "a copy to the sender's other device"
        );
        assert!(node.written.is_empty());

        // A user messaging itself reaches its other devices once each.
        node.request(&alice[0], r#"{"op":"send","to":"alice","data":1}"#);
        assert!(node.frames_of(&alice[0]).is_empty());
        assert_eq!(node.frames_of(&alice[1]).len(), 1);
        assert_eq!(node.frames_of(&alice[2]).len(), 1);
    }

    #[test]
    fn messages_carry_the_time_they_were_made() {
        let mut node = TestNode::new(2, false);
        let alice = node.connect(0, "alice");
        let bob = node.connect(1, "bob");
        node.tick(1_234);
        node.request(&alice, r#"{"op":"send","to":"bob","data":null}"#);
        let frame = node.frames_of(&bob).pop().expect("delivered");
        assert!(
            frame.contains(&format!("\"ts\":{}", node.now.wall_ms)),
            "{frame}"
        );
    }

    #[test]
    fn the_device_limit_closes_the_oldest_device_with_4001() {
        let mut node = TestNode::new(3, false);
        for core in &mut node.cores {
            core.settings.max_devices_per_user = 2;
        }
        let first = node.connect(0, "alice");
        let second = node.connect(1, "alice");
        assert!(node.closed.is_empty());
        let third = node.connect(2, "alice");
        assert_eq!(
            node.closed,
            vec![(first.id, close::REPLACED)],
            "limit 2: the oldest"
        );
        node.disconnect(&first);

        // While the bus is up the cluster enforces the limit, not the home shard.
        node.closed.clear();
        node.bus_up = true;
        node.connect(0, "alice");
        assert!(node.closed.is_empty());
        drop((second, third));
    }

    #[test]
    fn topic_interest_follows_the_first_and_last_subscriber_of_each_shard() {
        let mut node = TestNode::new(4, true);
        let a = node.connect(0, "a");
        let b = node.connect(1, "b");
        let c = node.connect(1, "c");
        node.bus.clear();

        assert!(node
            .request(&a, r#"{"op":"sub","topic":"room"}"#)
            .contains("ack"));
        assert!(node
            .request(&b, r#"{"op":"sub","topic":"room"}"#)
            .contains("ack"));
        assert!(node
            .request(&c, r#"{"op":"sub","topic":"room"}"#)
            .contains("ack"));
        let home = node.homes.home("room");
        assert_eq!(
            node.cores[home]
                .directory
                .topic_shards("room")
                .iter()
                .collect::<Vec<_>>(),
            vec![0, 1]
        );
        let active: Vec<bool> = node
            .bus
            .drain(..)
            .filter_map(|c| match c {
                Control::TopicActive { active, .. } => Some(active),
                _ => None,
            })
            .collect();
        assert_eq!(active, vec![true], "the node subscribes the bus once");

        // A publication reaches each subscriber once, rendered once per node.
        let pub_text = r#"{"op":"pub","topic":"room","data":"hi"}"#;
        let publisher = node.connect(2, "p");
        let refused = node.request(&publisher, pub_text);
        assert!(refused.contains(r#""code":"forbidden""#), "{refused}");
        node.request(
            &publisher,
            r#"{"op":"pub","topic":"news.today","data":"hi"}"#,
        );
        assert!(node.written.is_empty(), "no subscriber of news.today");

        let mut route = Actions::new();
        route.push(Action::Route {
            to: Route::Topic("room".into()),
            message: Message::new(1, Bytes::from_static(b"\x81\x02hi")),
            except: None,
            reach: Reach::Cluster,
        });
        node.apply(route);
        node.settle();
        assert_eq!(node.frames_of(&a), vec!["hi"]);
        assert_eq!(node.frames_of(&b), vec!["hi"]);
        assert_eq!(node.frames_of(&c), vec!["hi"]);

        // Shard 1 keeps its interest until its last subscriber leaves.
        node.request(&b, r#"{"op":"unsub","topic":"room"}"#);
        assert_eq!(
            node.cores[home]
                .directory
                .topic_shards("room")
                .iter()
                .collect::<Vec<_>>(),
            vec![0, 1]
        );
        node.disconnect(&c);
        assert_eq!(
            node.cores[home]
                .directory
                .topic_shards("room")
                .iter()
                .collect::<Vec<_>>(),
            vec![0]
        );
        node.disconnect(&a);
        assert!(node.cores[home].directory.topic_shards("room").is_empty());
        let inactive = node
            .bus
            .iter()
            .filter(|c| matches!(c, Control::TopicActive { active: false, .. }))
            .count();
        assert_eq!(inactive, 1, "the node unsubscribes the bus once");
        assert_eq!(
            node.metrics(0).topics.get() + node.metrics(1).topics.get(),
            0
        );
    }

    #[test]
    fn requests_are_refused_with_a_reason_and_counted() {
        let mut node = TestNode::new(1, false);
        let alice = node.connect(0, "alice");
        let cases = [
            (
                r#"{"op":"sub","id":1,"topic":""}"#,
                "bad_request",
                Rejection::BadName,
            ),
            (
                r#"{"op":"unsub","id":2,"topic":"x"}"#,
                "not_found",
                Rejection::NotSubscribed,
            ),
            (
                r#"{"op":"pub","id":3,"topic":"x","data":1}"#,
                "forbidden",
                Rejection::Forbidden,
            ),
            (
                r#"{"op":"dance","id":4}"#,
                "bad_request",
                Rejection::UnknownOp,
            ),
            (
                r#"{"op":"send","id":5,"to":"","data":1}"#,
                "bad_request",
                Rejection::BadName,
            ),
        ];
        for (text, code, reason) in cases {
            let before = node.metrics(0).rejections[reason as usize].get();
            let reply = node.request(&alice, text);
            assert!(
                reply.contains(&format!(r#""code":"{code}""#)),
                "{text}: {reply}"
            );
            let after = node.metrics(0).rejections[reason as usize].get();
            assert_eq!(after, before + 1, "{text}");
        }
        for topic in ["a", "b", "c"] {
            let reply = node.request(&alice, &format!(r#"{{"op":"sub","topic":"{topic}"}}"#));
            assert!(reply.contains("ack"));
        }
        assert!(
            node.request(&alice, r#"{"op":"sub","topic":"a"}"#)
                .contains("ack"),
            "again"
        );
        let reply = node.request(&alice, r#"{"op":"sub","topic":"d"}"#);
        assert!(reply.contains("too_many"), "{reply}");
        assert_eq!(
            node.request(&alice, r#"{"op":"ping","id":9}"#),
            r#"{"op":"pong","id":9}"#
        );
    }

    #[test]
    fn a_message_for_a_user_with_no_device_is_counted_on_a_single_node() {
        let mut node = TestNode::new(2, false);
        let alice = node.connect(0, "alice");
        node.disconnect(&alice);
        assert_eq!(node.metrics(0).users.get() + node.metrics(1).users.get(), 0);
        let bob = node.connect(1, "bob");
        node.request(&bob, r#"{"op":"send","to":"alice","data":1}"#);
        let home = node.homes.home("alice");
        assert_eq!(
            node.metrics(home).drops[metrics::Drop::NoRoute as usize].get(),
            1
        );
    }

    #[test]
    fn a_clustered_core_tells_the_bus_about_devices() {
        let mut node = TestNode::new(2, true);
        node.tick(5);
        let alice = node.connect(1, "alice");
        node.disconnect(&alice);
        match &node.bus[..] {
            [Control::DeviceOnline {
                user,
                conn,
                since_ms,
                welcome: false,
            }, Control::DeviceOffline { conn: gone, .. }] => {
                assert_eq!(&**user, "alice");
                assert_eq!((*conn, *gone), (alice.id, alice.id));
                assert_eq!(*since_ms, node.now.wall_ms);
            }
            other => panic!("{other:?}"),
        }
    }

    fn token(user: &str, exp: u64) -> String {
        let claims = serde_json::json!({"sub": user, "exp": exp});
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("encode")
    }

    #[test]
    fn a_token_expires_unless_refreshed_by_the_same_user() {
        let mut node = TestNode::new(1, false);
        let wall_now = protocol::now_ms() / 1000;
        let identity = Identity {
            user: "alice".into(),
            device: None,
            publish: PublishRights::none(),
            up: PublishRights::none(),
            expires: Some(wall_now + 60),
        };
        let alice = Rc::new(TestPeer {
            id: conn_id(0, 99),
            state: PeerState::new(Some(identity)),
        });
        let greeting = node.cores[0].open(&alice, node.now, &mut Actions::new());
        let Greeting::Hello(hello) = greeting else {
            panic!("without mailboxes, hello comes at once");
        };
        let hello = frame_text(&hello);
        assert!(
            hello.ends_with(&format!(r#""hb":25,"exp":{}}}"#, wall_now + 60)),
            "{hello}"
        );

        let at = |secs: u64| Now {
            instant: Instant::now(),
            wall_ms: secs * 1000,
        };
        assert!(!alice.state.expired(at(wall_now + 60)), "leeway");
        assert!(alice.state.expired(at(wall_now + 60 + CLOCK_LEEWAY_SECS)));

        let refresh = |t: &str| format!(r#"{{"op":"refresh","id":"r","token":"{t}"}}"#);
        let reply = node.request(&alice, &refresh(&token("bob", wall_now + 600)));
        assert!(reply.contains(r#""code":"forbidden""#), "{reply}");
        let reply = node.request(&alice, &refresh("not-a-token"));
        assert!(reply.contains(r#""code":"unauthorized""#), "{reply}");
        let reply = node.request(&alice, &refresh(&token("alice", wall_now - 3_600)));
        assert!(reply.contains("token expired"), "{reply}");
        assert!(
            alice.state.expired(at(wall_now + 65)),
            "refusals change nothing"
        );

        let reply = node.request(&alice, &refresh(&token("alice", wall_now + 600)));
        assert_eq!(reply, r#"{"op":"ack","id":"r"}"#);
        assert!(!alice.state.expired(at(wall_now + 65)));
        assert!(alice.state.expired(at(wall_now + 605)));
        assert_eq!(
            node.metrics(0).rejections[Rejection::BadToken as usize].get(),
            2
        );
    }

    #[test]
    fn a_kick_closes_every_device_of_the_user() {
        let mut node = TestNode::new(3, false);
        let devices = [node.connect(0, "eve"), node.connect(2, "eve")];
        let mut actions = Actions::new();
        actions.push(Action::Send {
            shard: node.homes.home("eve"),
            envelope: Envelope::CloseUser {
                user: "eve".into(),
                code: close::KICKED,
                reason: metrics::Close::Kicked,
            },
        });
        node.apply(actions);
        node.settle();
        let mut closed = node.closed.clone();
        closed.sort();
        assert_eq!(
            closed,
            vec![
                (devices[0].id, close::KICKED),
                (devices[1].id, close::KICKED)
            ]
        );
    }

    // Streams on a lone node: mailboxes, topic history, welcome, resume and their seams.

    fn json(frame: &str) -> serde_json::Value {
        serde_json::from_str(frame).expect("json")
    }

    fn seqs(frames: &[String]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| json(f)["seq"].as_u64().expect("seq"))
            .collect()
    }

    #[test]
    fn a_device_is_welcomed_at_its_mailboxs_position_and_gets_what_follows() {
        let mut node = TestNode::with(3, streaming());
        let alice = node.connect(0, "alice");
        let bob = node.connect(1, "bob");
        node.written.clear();
        for n in 0..3 {
            node.request(&bob, &format!(r#"{{"op":"send","to":"alice","data":{n}}}"#));
        }
        let frames = node.frames_of(&alice);
        assert_eq!(seqs(&frames), vec![1, 2, 3]);
        let ep = json(&frames[0])["ep"].clone();
        assert!(ep.as_str().is_some_and(|ep| ep.len() == 8), "{ep}");
        assert!(frames.iter().all(|f| json(f)["ep"] == ep));

        // More devices: each welcomed where the mailbox stands, then live from there.
        let phone = node.connect(2, "alice");
        let bob_phone = node.connect(0, "bob");
        node.written.clear();
        node.request(&bob, r#"{"op":"send","to":"alice","data":"x"}"#);
        assert_eq!(seqs(&node.frames_of(&alice)), vec![4]);
        assert_eq!(seqs(&node.frames_of(&phone)), vec![4]);
        let copy = node.frames_of(&bob_phone);
        assert_eq!(
            json(&copy[0])["to"],
            "alice",
            "the sender's copy names the recipient"
        );
        assert_eq!(seqs(&copy), vec![4], "numbered in bob's own mailbox");
    }

    #[test]
    fn hello_carries_the_mailbox_position() {
        let mut node = TestNode::with(2, streaming());
        let bob = node.connect(1, "bob");
        node.request(&bob, r#"{"op":"send","to":"dora","data":1}"#);
        node.request(&bob, r#"{"op":"send","to":"dora","data":2}"#);
        let identity = Identity {
            user: "dora".into(),
            device: None,
            publish: PublishRights::none(),
            up: PublishRights::none(),
            expires: None,
        };
        let dora = Rc::new(TestPeer {
            id: conn_id(0, 500),
            state: PeerState::new(Some(identity)),
        });
        let mut actions = Actions::new();
        let greeting = node.cores[0].open(&dora, node.now, &mut actions);
        assert!(matches!(greeting, Greeting::AfterWelcome));
        node.apply(actions);
        node.settle();
        let hello = json(&node.frames_of(&dora)[0]);
        assert_eq!(hello["mailbox"]["seq"], 2);
        assert_eq!(hello["mailbox"]["ep"].as_str().map(str::len), Some(8));
    }

    #[test]
    fn resume_replays_what_a_device_missed_exactly_once() {
        let mut node = TestNode::with(3, streaming());
        let bob = node.connect(1, "bob");
        let laptop = node.connect(0, "alice");
        for n in 1..=3 {
            node.request(&bob, &format!(r#"{{"op":"send","to":"alice","data":{n}}}"#));
        }
        let ep = json(&node.frames_of(&laptop)[0])["ep"]
            .as_str()
            .expect("ep")
            .to_owned();
        node.disconnect(&laptop);
        for n in 4..=6 {
            node.request(&bob, &format!(r#"{{"op":"send","to":"alice","data":{n}}}"#));
        }
        let home = node.homes.home("alice");
        assert_eq!(node.metrics(home).mailbox_offline.get(), 3);

        // Back on another shard: hello at 6; one message arrives live before the resume.
        let phone = node.connect(2, "alice");
        node.request(&bob, r#"{"op":"send","to":"alice","data":7}"#);
        assert_eq!(seqs(&node.frames_of(&phone)), vec![7]);
        let resume = format!(r#"{{"op":"resume","id":"r","since":{{"seq":3,"ep":"{ep}"}}}}"#);
        assert_eq!(
            node.ask(&phone, &resume),
            None,
            "the ack follows the replay"
        );
        let frames = node.frames_of(&phone);
        let (ack, replayed) = frames.split_last().expect("ack");
        assert_eq!(seqs(replayed), vec![4, 5, 6], "only what it missed, once");
        assert_eq!(
            json(ack),
            serde_json::json!({"op":"ack","id":"r","recovered":true,"seq":7,"ep":ep})
        );

        // Another epoch: everything retained up to the floor, not recovered.
        node.ask(&phone, r#"{"op":"resume","since":{"seq":2,"ep":"other"}}"#);
        let frames = node.frames_of(&phone);
        let (ack, replayed) = frames.split_last().expect("ack");
        assert_eq!(seqs(replayed), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(json(ack)["recovered"], false);
        assert_eq!(node.metrics(home).replays.get(), 2);
        assert_eq!(node.metrics(home).replays_unrecovered.get(), 1);
    }

    #[test]
    fn an_offline_users_messages_wait_for_its_first_device() {
        let mut node = TestNode::with(2, streaming());
        let bob = node.connect(0, "bob");
        for n in 1..=12 {
            node.request(&bob, &format!(r#"{{"op":"send","to":"carol","data":{n}}}"#));
        }
        let carol = node.connect(1, "carol");
        node.ask(&carol, r#"{"op":"resume","since":{"seq":0}}"#);
        let frames = node.frames_of(&carol);
        let (ack, replayed) = frames.split_last().expect("ack");
        assert_eq!(
            seqs(replayed),
            (3..=12).collect::<Vec<_>>(),
            "the last 10 kept"
        );
        assert_eq!(json(ack)["recovered"], false, "two were trimmed");
        assert_eq!(json(ack)["seq"], 12);
    }

    #[test]
    fn a_topic_history_replays_to_new_subscribers_without_a_seam() {
        let mut node = TestNode::with(2, streaming());
        let publisher = node.connect(0, "pat");
        for n in 1..=3 {
            node.request(
                &publisher,
                &format!(r#"{{"op":"pub","topic":"news.a","data":{n}}}"#),
            );
        }
        // The first subscriber of shard 1: history, then live.
        let first = node.connect(1, "s1");
        node.ask(
            &first,
            r#"{"op":"sub","id":1,"topic":"news.a","since":{"seq":0}}"#,
        );
        let frames = node.frames_of(&first);
        let (ack, replayed) = frames.split_last().expect("ack");
        assert_eq!(seqs(replayed), vec![2, 3], "a history of 2");
        assert_eq!(json(ack)["recovered"], false);
        node.request(&publisher, r#"{"op":"pub","topic":"news.a","data":4}"#);
        assert_eq!(seqs(&node.frames_of(&first)), vec![4]);

        // A second subscriber on the same shard, which already gets the topic live.
        let second = node.connect(1, "s2");
        node.ask(
            &second,
            r#"{"op":"sub","id":2,"topic":"news.a","since":{"seq":0}}"#,
        );
        let frames = node.frames_of(&second);
        let (_, replayed) = frames.split_last().expect("ack");
        assert_eq!(seqs(replayed), vec![3, 4]);
        node.request(&publisher, r#"{"op":"pub","topic":"news.a","data":5}"#);
        assert_eq!(seqs(&node.frames_of(&second)), vec![5]);
        assert_eq!(seqs(&node.frames_of(&first)), vec![5]);

        // A topic without history: subscribed, and told nothing can be recovered.
        let reply = node.request(
            &second,
            r#"{"op":"sub","id":3,"topic":"plain","since":{"seq":0}}"#,
        );
        assert_eq!(
            json(&reply),
            serde_json::json!({"op":"ack","id":3,"recovered":false,"seq":0,"ep":""})
        );
    }

    /// Clustered, Redis numbers streamed messages: the core hands them only to the bus and
    /// takes them back with their position, greets a device when the bridge welcomes it,
    /// and asks the bridge for replays, which it sends on as a lone node does.
    #[test]
    fn a_clustered_core_leaves_the_numbering_to_redis() {
        let mut node = TestNode::with(
            2,
            Settings {
                clustered: true,
                ..streaming()
            },
        );
        let alice = node.open(0, "alice");
        assert!(
            node.frames_of(&alice).is_empty(),
            "no hello before the welcome"
        );
        assert!(matches!(
            node.bus[..],
            [Control::DeviceOnline { welcome: true, .. }]
        ));
        let position = |seq: u64| Position {
            seq,
            ep: "E".into(),
        };
        let message = |seq: u64| Envelope::RouteUser {
            user: "alice".into(),
            message: Message::per_user(seq, template(1, None, None, &raw(seq))),
            except: None,
            at: Some(position(seq)),
        };
        // A message numbered before the welcome's read is not the device's to get live.
        node.queue.push_back((node.homes.home("alice"), message(3)));
        node.settle();
        assert!(node.frames_of(&alice).is_empty());
        let welcome = Envelope::Welcome {
            user: "alice".into(),
            conn: alice.id,
            mailbox: Some(position(3)),
        };
        node.queue.push_back((0, welcome));
        node.settle();
        let hello = json(&node.frames_of(&alice)[0]);
        assert_eq!(hello["mailbox"], serde_json::json!({"seq": 3, "ep": "E"}));
        node.queue.push_back((node.homes.home("alice"), message(4)));
        node.settle();
        let live = node.frames_of(&alice);
        assert_eq!(
            (seqs(&live), json(&live[0])["ep"].clone()),
            (vec![4], "E".into())
        );

        // Sent only to the bus, as a template; nothing is delivered here at once.
        node.request(&alice, r#"{"op":"send","to":"bob","data":1}"#);
        node.request(&alice, r#"{"op":"pub","topic":"news.a","data":2}"#);
        node.request(&alice, r#"{"op":"pub","topic":"plain","data":3}"#);
        assert_eq!(node.streamed.len(), 2, "the plain topic is not streamed");
        assert!(node.streamed.iter().all(|(_, m, _)| m.template().is_some()));
        assert_eq!(node.streamed[0].2, Some(alice.id), "the sender is skipped");

        // A resume reads Redis; the answer is replayed up to the floor, then acked.
        assert_eq!(
            node.ask(
                &alice,
                r#"{"op":"resume","id":9,"since":{"seq":1,"ep":"E"}}"#
            ),
            None
        );
        let (key, conn) = node.reads.pop().expect("a read");
        let entry = |seq: u64| crate::history::Entry {
            seq,
            message: crate::history::Message {
                mid: seq,
                ts: 1,
                from: None,
                to: None,
                data: seq.to_string().into(),
            },
        };
        let replayed = Envelope::Replayed {
            key,
            conn,
            replay: Some(history::Replay {
                messages: vec![entry(2), entry(3), entry(4)],
                recovered: true,
                last_seq: 4,
                ep: Some("E".into()),
            }),
            id: Some(raw(9)),
        };
        node.queue.push_back((node.homes.home("alice"), replayed));
        node.settle();
        let frames = node.frames_of(&alice);
        assert_eq!(seqs(&frames[..2]), vec![2, 3], "4 came live");
        assert_eq!(json(&frames[2])["recovered"], true);

        // A topic replayed before any live message: live ones it held are skipped.
        node.ask(
            &alice,
            r#"{"op":"sub","id":10,"topic":"news.a","since":{"seq":0}}"#,
        );
        let (key, conn) = node.reads.pop().expect("a read");
        let replayed = Envelope::Replayed {
            key,
            conn,
            replay: Some(history::Replay {
                messages: vec![entry(1), entry(2)],
                recovered: true,
                last_seq: 2,
                ep: Some("E".into()),
            }),
            id: Some(raw(10)),
        };
        node.queue.push_back((node.homes.home("news.a"), replayed));
        node.settle();
        assert_eq!(seqs(&node.frames_of(&alice)[..2]), vec![1, 2]);
        for seq in [2, 3] {
            let live = Envelope::RouteTopic {
                topic: "news.a".into(),
                message: Message::per_topic(seq, template(1, None, None, &raw(seq))),
                at: Some(position(seq)),
            };
            node.queue.push_back((node.homes.home("news.a"), live));
        }
        node.settle();
        assert_eq!(seqs(&node.frames_of(&alice)), vec![3], "2 was replayed");
    }

    fn raw(n: u64) -> Box<RawValue> {
        RawValue::from_string(n.to_string()).expect("a number is JSON")
    }

    #[test]
    fn bad_positions_are_refused_and_resume_needs_a_mailbox() {
        let mut node = TestNode::with(1, streaming());
        let alice = node.connect(0, "alice");
        for bad in [
            r#"{"op":"resume","id":1,"since":{"seq":-1}}"#,
            r#"{"op":"resume","id":1,"since":{"seq":1.5,"ep":"x"}}"#,
            r#"{"op":"resume","id":1,"since":"7"}"#,
            r#"{"op":"sub","id":1,"topic":"news.a","since":{"seq":1,"ep":7}}"#,
        ] {
            let reply = json(&node.request(&alice, bad));
            assert_eq!(reply["code"], "bad_request", "{bad}: {reply}");
            assert_eq!(reply["id"], 1);
        }
        node.ask(
            &alice,
            r#"{"op":"resume","since":{"seq":99999999999,"ep":"x"}}"#,
        );
        let ack = json(&node.frames_of(&alice).pop().expect("ack"));
        assert_eq!(ack["recovered"], false);
        assert_eq!(ack["seq"], 0);

        let mut plain = TestNode::new(1, false);
        let bob = plain.connect(0, "bob");
        let reply = json(&plain.request(&bob, r#"{"op":"resume","since":{"seq":0}}"#));
        assert_eq!(reply["code"], "not_found");
    }

    #[test]
    fn up_messages_and_connection_events_go_to_the_upstream_sink() {
        let mut node = TestNode::with(
            2,
            Settings {
                upstream: Some(EventFilter::default()),
                ..settings(false)
            },
        );
        let kinds = |node: &mut TestNode| -> Vec<EventKind> {
            let mut kinds: Vec<_> = node.upstream.drain(..).map(|e| e.kind()).collect();
            kinds.sort_by_key(|kind| *kind as u8);
            kinds
        };
        let alice = node.connect(1, "alice");
        assert!(node.upstream.iter().any(|e| matches!(
            e.what,
            Happening::Connect(Device { conn, .. }) if conn == alice.id
        )));
        assert_eq!(kinds(&mut node), [EventKind::Connect, EventKind::Online]);
        // A second device: connected, but the user was online already.
        let phone = node.connect(0, "alice");
        assert_eq!(kinds(&mut node), [EventKind::Connect]);
        node.disconnect(&phone);
        assert_eq!(kinds(&mut node), [EventKind::Disconnect], "one device left");
        assert_eq!(
            node.ask(&alice, r#"{"op":"up","id":7,"data":{"x":[1, 2]}}"#),
            None
        );
        match &node.upstream[..] {
            [UpstreamEvent {
                what:
                    Happening::Up {
                        stream,
                        data,
                        device,
                    },
                node: from,
                ..
            }] => {
                assert_eq!(
                    (&**stream, data.get(), &**from),
                    ("up", r#"{"x":[1, 2]}"#, "test-node")
                );
                assert_eq!(&*device.user, "alice");
            }
            other => panic!("{other:?}"),
        }
        let refused = node.request(&alice, r#"{"op":"up","id":8,"stream":"audit","data":1}"#);
        assert!(refused.contains(r#""code":"forbidden""#), "{refused}");
        let refused = node.request(&alice, r#"{"op":"up","id":9}"#);
        assert!(refused.contains(r#""code":"bad_request""#), "{refused}");
        node.upstream.clear();
        node.disconnect(&alice);
        assert!(node
            .upstream
            .iter()
            .any(|e| matches!(e.what, Happening::Disconnect { code: 1000, .. })));
        assert_eq!(
            kinds(&mut node),
            [EventKind::Disconnect, EventKind::Offline]
        );

        // sub and unsub records only when upstream_events asks for them.
        let carl = node.connect(0, "carl");
        node.upstream.clear();
        node.request(&carl, r#"{"op":"sub","topic":"news.x"}"#);
        assert!(node.upstream.is_empty(), "not forwarded by default");
        for core in &mut node.cores {
            let kinds = [EventKind::Sub, EventKind::Unsub];
            core.settings.upstream = Some(EventFilter::of(&kinds));
        }
        node.request(&carl, r#"{"op":"sub","topic":"news.y"}"#);
        node.request(&carl, r#"{"op":"sub","topic":"news.y"}"#);
        node.request(&carl, r#"{"op":"unsub","topic":"news.y"}"#);
        let topics: Vec<(EventKind, &str)> = node
            .upstream
            .iter()
            .map(|e| match &e.what {
                Happening::Sub { topic, .. } => (EventKind::Sub, &**topic),
                Happening::Unsub { topic, .. } => (EventKind::Unsub, &**topic),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            topics,
            [(EventKind::Sub, "news.y"), (EventKind::Unsub, "news.y")]
        );

        // Without a sink, up is refused at once and no events are made.
        let mut plain = TestNode::new(1, false);
        let bob = plain.connect(0, "bob");
        let reply = plain.request(&bob, r#"{"op":"up","id":1,"data":1}"#);
        assert!(reply.contains(r#""code":"unavailable""#), "{reply}");
        assert!(plain.upstream.is_empty());
    }
}
