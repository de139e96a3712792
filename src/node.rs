//! A running node: binds one `SO_REUSEPORT` listener per shard, starts the shards, and gives
//! the rest of the process (the HTTP API, the signal handler, tests) a way to push messages
//! and to stop it.
//!
//! Listeners are bound here, on the calling thread, before any shard starts, so a bad address
//! or a port in use fails `Node::start` with a clear error instead of a shard panicking.
//! The backlog is configurable (glommio's own `TcpListener::bind` hard-codes 1024).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use serde_json::value::RawValue;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::api::ApiServer;
use crate::auth::Authenticator;
use crate::cluster::{bridge, redis_layout, Bus, Outbound};
use crate::config::{Config, ConfigError, MAX_SHARDS};
use crate::metrics::{self, NodeMetrics};
use crate::protocol::{self, render, SharedMidGenerator};
use crate::router::{Envelope, Mesh, Message, Route, Template};
use crate::shard;

/// Bytes of glommio I/O memory per shard. Sockets do not use it (they are driven by the
/// shard's epoll set); keeping it small keeps many nodes per host under RLIMIT_MEMLOCK.
const IO_MEMORY_BYTES: usize = 512 * 1024;

/// Users per bus message of a multi-user publish: one route script each, so Redis never
/// runs one script over an unbounded number of keys.
const USERS_PER_BUS_MESSAGE: usize = 512;

/// What every shard of a node shares (read-mostly; counters are atomics).
pub struct NodeShared {
    /// The validated configuration.
    pub config: Config,
    /// This node's id.
    pub node_id: Arc<str>,
    /// The node's number in message ids (see [`crate::protocol::MidGenerator`]).
    pub node_number: u16,
    /// Handshake authentication.
    pub auth: Authenticator,
    /// Inboxes of every shard.
    pub mesh: Mesh,
    /// Every shard's metrics.
    pub metrics: NodeMetrics,
    /// Sockets past `accept`, upgraded or still handshaking (the `max_connections` count).
    pub connections: AtomicUsize,
    /// The effective `max_connections`: the configured value, or what `RLIMIT_NOFILE`
    /// allows after the reserve (see [`Config::connection_limit`]).
    pub max_connections: usize,
    /// Set once the node is stopping: new handshakes get 503.
    pub draining: AtomicBool,
    /// The client listener's bound address.
    pub client_addr: SocketAddr,
    /// The API listener's bound address.
    pub api_addr: SocketAddr,
    /// The cluster bus (with `redis` configured); `None` for a single node.
    pub bus: Option<Bus>,
}

impl NodeShared {
    /// Whether the cluster bus is configured and Redis is reachable.
    pub fn bus_up(&self) -> bool {
        self.bus.as_ref().is_some_and(Bus::is_up)
    }

    /// Hands a message to the bus for other nodes, if clustered; `false` if it was dropped.
    pub fn to_other_nodes(&self, outbound: impl FnOnce() -> Outbound) -> bool {
        self.bus.as_ref().is_none_or(|bus| bus.send(outbound()))
    }

    /// Subscribers of `topic` on this node; `None` if a shard's inbox was full.
    pub async fn topic_subscribers(&self, topic: &str) -> Option<usize> {
        let mesh = &self.mesh;
        let topic: Arc<str> = Arc::from(topic);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let home = mesh.home(&topic);
        let query = Envelope::QueryTopic {
            topic: topic.clone(),
            reply,
        };
        mesh.send(home, query, self.metrics.shard(home));
        let mut total = 0;
        for shard in answer.await.ok()?.iter() {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let count = Envelope::CountSubscribers {
                topic: topic.clone(),
                reply,
            };
            mesh.send(shard, count, self.metrics.shard(shard));
            total += answer.await.ok()?;
        }
        Some(total)
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The API server could not start.
    #[error("cannot start the API server: {0}")]
    Api(std::io::Error),
    /// The cluster bridge could not start.
    #[error("cannot start the cluster bridge: {0}")]
    Bridge(std::io::Error),
    /// The descriptor limit leaves no room for a single client.
    #[error("RLIMIT_NOFILE is {nofile}, which leaves no descriptor for clients after the {reserved} reserved for the node (raise `ulimit -n` or lower max_api_connections)")]
    Descriptors {
        /// The soft limit.
        nofile: u64,
        /// Descriptors reserved (see [`Config::reserved_descriptors`]).
        reserved: usize,
    },
    /// A shard executor could not start.
    #[error("cannot start shard {shard}: {message}")]
    Executor {
        /// The shard.
        shard: usize,
        /// glommio's error.
        message: String,
    },
}

/// A running node.
pub struct Node {
    shared: Arc<NodeShared>,
    executors: Vec<ExecutorJoinHandle<()>>,
    bridge: Option<std::thread::JoinHandle<()>>,
    api: ApiServer,
}

impl Node {
    /// Validates `config`, binds the listeners and starts every shard.
    pub fn start(config: Config) -> Result<Node, StartError> {
        config.validate()?;
        let nofile = open_files_limit();
        let connection_limit = config.connection_limit(nofile);
        if connection_limit.limit == 0 {
            return Err(StartError::Descriptors {
                nofile,
                reserved: connection_limit.reserved,
            });
        }
        if connection_limit.lowered {
            tracing::warn!(
                max_connections = config.max_connections,
                nofile,
                reserved = connection_limit.reserved,
                limit = connection_limit.limit,
                "max_connections is more than RLIMIT_NOFILE allows after the reserved descriptors; lowered (raise `ulimit -n` to hold more)"
            );
        }
        let shards = config.shard_count();
        let listeners = bind_listeners(config.listen, shards, config.backlog as i32)?;
        let client_addr = listeners[0]
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(config.listen);
        let api_listener =
            std::net::TcpListener::bind(config.api_listen).map_err(|source| StartError::Bind {
                addr: config.api_listen,
                source,
            })?;
        let api_addr = api_listener.local_addr().unwrap_or(config.api_listen);
        let node_id: Arc<str> = config
            .node_id
            .clone()
            .map_or_else(generate_node_id, Arc::from);
        let (mesh, inboxes) = Mesh::new(shards, config.shard_inbox_capacity);
        let (bus, bridge_ends) = match config.redis {
            Some(_) => {
                let (bus, ends) =
                    Bus::new(config.bridge_queue_capacity, config.bridge_queue_max_bytes);
                (Some(bus), Some(ends))
            }
            None => (None, None),
        };
        let node_number = lease_node_number(&config, &node_id);
        let shared = Arc::new(NodeShared {
            node_number,
            auth: Authenticator::new(config.secret.as_deref(), config.dev, config.max_name_bytes),
            metrics: NodeMetrics::new(shards),
            node_id,
            mesh,
            connections: AtomicUsize::new(0),
            max_connections: connection_limit.limit,
            draining: AtomicBool::new(false),
            client_addr,
            api_addr,
            bus,
            config,
        });
        let bridge = bridge_ends
            .map(|ends| bridge::spawn(shared.clone(), ends))
            .transpose()
            .map_err(StartError::Bridge)?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut executors = Vec::with_capacity(shards);
        for (index, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
            let placement = if shared.config.pin_shards {
                Placement::Fixed(index % cpus)
            } else {
                Placement::Unbound
            };
            let node = shared.clone();
            let listener: OwnedFd = listener.into();
            let executor = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{index}"))
                .io_memory(IO_MEMORY_BYTES)
                .spawn(move || shard::run(index, node, listener, inbox))
                .map_err(|e| StartError::Executor {
                    shard: index,
                    message: e.to_string(),
                })?;
            executors.push(executor);
        }
        let api = ApiServer::start(api_listener, shared.clone()).map_err(StartError::Api)?;
        if shared.config.api_key.is_none() && !shared.config.dev {
            tracing::warn!(
                "no api_key configured: the HTTP API refuses every call but /healthz and /readyz"
            );
        }
        tracing::info!(
            node_id = %shared.node_id,
            listen = %client_addr,
            api_listen = %api_addr,
            shards,
            max_connections = shared.max_connections,
            cluster = shared.config.redis.is_some(),
            "shardcast node started"
        );
        Ok(Node {
            shared,
            executors,
            bridge,
            api,
        })
    }

    /// The client listener's bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.client_addr
    }

    /// The API listener's bound address.
    pub fn api_addr(&self) -> SocketAddr {
        self.shared.api_addr
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &NodeMetrics {
        &self.shared.metrics
    }

    /// A handle that pushes messages into the node from any thread.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.shared.clone())
    }

    /// A handle that stops the node from any thread (e.g. a signal handler).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }

    /// Waits for every shard to finish (after [`Stopper::stop`]), then stops the bridge
    /// (which removes this node's last routes from Redis) and the API.
    pub fn join(self) {
        for executor in self.executors {
            if let Err(error) = executor.join() {
                tracing::error!(%error, "shard ended with an error");
            }
        }
        if let (Some(bus), Some(bridge)) = (&self.shared.bus, self.bridge) {
            bus.stop();
            if bridge.join().is_err() {
                tracing::error!("the cluster bridge panicked");
            }
        }
        drop(self.api);
        tracing::info!(node_id = %self.shared.node_id, "node stopped");
    }
}

/// Stops a node: stop accepting, close clients with 1001, exit within the grace period.
#[derive(Clone)]
pub struct Stopper(Arc<NodeShared>);

impl Stopper {
    /// Starts the graceful stop (idempotent).
    pub fn stop(&self) {
        if self.0.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::info!(node_id = %self.0.node_id, "stopping: closing clients with 1001");
        // A flag and a wake, not an envelope: nothing can drop it.
        self.0.mesh.wake_all();
        if let Some(bus) = &self.0.bus {
            bus.wake();
        }
    }
}

/// Who a message from outside the shards (API, bridge) is for.
#[derive(Debug, Default, Clone, Copy)]
pub struct Target<'a> {
    /// Users: every device of each.
    pub users: &'a [&'a str],
    /// Topics: every subscriber of each.
    pub topics: &'a [&'a str],
    /// Every user connection of the node.
    pub broadcast: bool,
}

/// What [`Publisher::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The message id.
    pub mid: u64,
    /// Routes that could not be queued (a shard's inbox or the cluster bus was full).
    pub dropped: usize,
}

/// Pushes server messages into the node from any thread. Frames are rendered once here
/// and handed to the home shards, exactly as a client's `send`/`pub` would be.
pub struct Publisher {
    node: Arc<NodeShared>,
    mids: SharedMidGenerator,
}

impl Publisher {
    pub(crate) fn new(node: Arc<NodeShared>) -> Self {
        // The shard number past the last shard is reserved for ids made outside the shards.
        let mids = SharedMidGenerator::new(node.node_number, MAX_SHARDS);
        Publisher { node, mids }
    }

    /// Pushes `data` to `target`, on this node and (clustered) through the bus to the others.
    /// The message id is the same for every recipient; `dropped` counts the routes (one to
    /// each user's and topic's home shard, one to the bus per topic and per bus message of
    /// users, one per shard and one to the bus for a broadcast) that could not be queued
    /// because a shard's inbox or the bus was full (also counted in `drops{inbox_full}` or
    /// `bus_drops{bus_full}`).
    pub fn publish(&self, target: Target<'_>, data: &RawValue) -> Published {
        let ts = protocol::now_ms();
        let mid = self.mids.next(ts);
        let mesh = &self.node.mesh;
        let mut dropped = 0;
        let node = &self.node;
        let direct = match target.users {
            [] => None,
            // One recipient: one frame, rendered here once for every device on every node.
            [user] => Some(Message::new(
                mid,
                render::msg(None, user, mid, ts, data.get()),
            )),
            // Each recipient's frame names it: carry `data` once and render per recipient
            // as its sockets are written (see `router::Body`).
            _ => Some(Message::per_user(mid, self.template(ts, data))),
        };
        if let Some(message) = direct {
            dropped += self.route_users(target.users, message);
        }
        let publication = match target.topics {
            [] => None,
            [topic] => Some(Message::new(
                mid,
                render::publication(Some(topic), mid, ts, data.get()),
            )),
            // Each topic's frame names it: render it on the topic's home shard, and only if
            // someone subscribes there (see `router::Body`).
            _ => Some(Message::per_topic(mid, self.template(ts, data))),
        };
        // Hand-offs that fail are counted on shard 0's metrics (the sum over shards is what
        // the exporter shows).
        let metrics = node.metrics.shard(0);
        if let Some(message) = publication {
            for topic in target.topics {
                let topic: Arc<str> = Arc::from(*topic);
                dropped += usize::from(!node.to_other_nodes(|| Outbound::Topic {
                    topic: topic.clone(),
                    message: message.clone(),
                }));
                dropped += mesh.route(Route::Topic(topic), message.clone(), None, metrics);
            }
        }
        if target.broadcast {
            let message = Message::new(mid, render::publication(None, mid, ts, data.get()));
            dropped += usize::from(!node.to_other_nodes(|| Outbound::Broadcast {
                message: message.clone(),
            }));
            dropped += mesh.route(Route::Broadcast, message, None, metrics);
        }
        Published { mid, dropped }
    }

    /// A message's `data` and time, to be rendered per target.
    fn template(&self, ts: u64, data: &RawValue) -> Template {
        Template {
            ts,
            from: None,
            data: Arc::from(data.get()),
        }
    }

    /// Routes `message` to every device of `users`: each user's home shard here, and the
    /// other nodes through the bus in messages of at most [`USERS_PER_BUS_MESSAGE`] users
    /// (one route script each). Returns the routes that could not be queued.
    fn route_users(&self, users: &[&str], message: Message) -> usize {
        let node = &self.node;
        let users: Vec<Arc<str>> = users.iter().map(|u| Arc::from(*u)).collect();
        let mut dropped = 0;
        for chunk in users.chunks(USERS_PER_BUS_MESSAGE) {
            dropped += usize::from(!node.to_other_nodes(|| Outbound::User {
                users: chunk.iter().cloned().collect(),
                message: message.clone(),
            }));
        }
        for user in users {
            let to = Route::User(user);
            dropped += node
                .mesh
                .route(to, message.clone(), None, node.metrics.shard(0));
        }
        dropped
    }

    /// How many connections `user` has on this node; `None` if the home shard's inbox is
    /// full (the query was dropped and counted).
    pub async fn user_connections(&self, user: &str) -> Option<usize> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let home = self.node.mesh.home(user);
        let envelope = Envelope::QueryUser {
            user: Arc::from(user),
            reply,
        };
        self.node
            .mesh
            .send(home, envelope, self.node.metrics.shard(home));
        answer.await.ok()
    }

    /// Closes every connection of `user` with 4003: on this node, and through the bus on
    /// every other node that holds one. `false` if the bus dropped the kick (lane full).
    pub fn disconnect_user(&self, user: &str) -> bool {
        let user: Arc<str> = Arc::from(user);
        let home = self.node.mesh.home(&user);
        let code = crate::ws::close::KICKED;
        let sent = self.node.to_other_nodes(|| Outbound::Kick {
            user: user.clone(),
            code,
        });
        let envelope = Envelope::CloseUser {
            user,
            code,
            reason: metrics::Close::Kicked,
        };
        self.node
            .mesh
            .send(home, envelope, self.node.metrics.shard(home));
        sent
    }
}

/// Binds `shards` listeners to `addr` with `SO_REUSEPORT`, so the kernel spreads incoming
/// connections over the shards. With port 0 the first socket picks the port for all.
fn bind_listeners(
    addr: SocketAddr,
    shards: usize,
    backlog: i32,
) -> Result<Vec<Socket>, StartError> {
    let mut listeners = Vec::with_capacity(shards);
    let mut bind_addr = addr;
    for _ in 0..shards {
        let bind = || -> std::io::Result<Socket> {
            let socket = Socket::new(
                Domain::for_address(bind_addr),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nodelay(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&SockAddr::from(bind_addr))?;
            socket.listen(backlog)?;
            Ok(socket)
        };
        let socket = bind().map_err(|source| StartError::Bind { addr, source })?;
        if bind_addr.port() == 0 {
            if let Some(bound) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
                bind_addr = bound;
            }
        }
        listeners.push(socket);
    }
    Ok(listeners)
}

/// The `RLIMIT_NOFILE` soft limit: descriptors this process may open (unlimited if unknown).
fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return u64::MAX;
    }
    limit.rlim_cur
}

/// `<hostname>-<8 hex digits>`: readable in logs, unique enough to never collide.
fn generate_node_id() -> Arc<str> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    let seed = ahash::RandomState::new().hash_one((std::process::id(), protocol::now_ms()));
    Arc::from(format!("{host}-{:08x}", seed as u32))
}

/// The 9-bit node number in message ids. Alone, a hash of the node id. In a cluster, a
/// number leased in Redis at start (the bridge keeps the lease alive), so no two live nodes
/// share one and message ids are unique cluster-wide. If Redis cannot be reached at start the
/// node still starts, on the hashed number, and says so: ids then collide only if another
/// node holds the same number and both make an id in the same millisecond on the same shard
/// with the same sequence number.
fn lease_node_number(config: &Config, node_id: &str) -> u16 {
    let hashed = (ahash::RandomState::with_seeds(1, 2, 3, 4).hash_one(node_id)
        % u64::from(redis_layout::NODE_NUMBERS)) as u16;
    let Some(url) = &config.redis else {
        return hashed;
    };
    let names = redis_layout::Names::new(&config.redis_prefix);
    let leased = redis::Client::open(url.as_str())
        .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
        .and_then(|mut conn| {
            conn.set_read_timeout(Some(Duration::from_secs(2)))?;
            redis_layout::lease_node_number(
                &mut conn,
                &names,
                node_id,
                hashed,
                config.cluster_node_ttl_ms,
            )
        });
    match leased {
        Ok(Some(number)) => number,
        Ok(None) => {
            tracing::warn!(
                number = hashed,
                "every message-id node number is leased; using the hashed one"
            );
            hashed
        }
        Err(error) => {
            tracing::warn!(%error, number = hashed, "cannot lease a message-id node number from Redis; using the hashed one");
            hashed
        }
    }
}
