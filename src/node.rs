//! A running node: binds one `SO_REUSEPORT` listener per shard, starts the shards, and gives
//! the rest of the process (the HTTP API, the signal handler, tests) a way to push messages
//! and to stop it.
//!
//! Listeners are bound here, on the calling thread, before any shard starts, so a bad address
//! or a port in use fails `Node::start` with a clear error instead of a shard panicking.
//! The backlog is configurable (glommio's own `TcpListener::bind` hard-codes 1024).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::api::{ApiContext, ApiServer};
use crate::auth::Authenticator;
use crate::cluster::bridge::{self, BridgeSetup};
use crate::cluster::{redis_layout, Bus};
use crate::config::{Config, ConfigError, NodeIdentity, SinkKind, MAX_SHARDS};
use crate::metrics::NodeMetrics;
use crate::metrics::UpstreamMetrics;
use crate::protocol::{self, SharedMidGenerator};
use crate::publish::{Publisher, Streamed};
use crate::router::{Mesh, Router, Uplink};
use crate::session::Admission;
use crate::shard::{self, ShardSetup};
use crate::upstream::redis_streams::RedisStreamsSender;
use crate::upstream::webhook::{Webhook, WebhookConfig};
use crate::upstream::Sink;

/// Bytes of glommio I/O memory per shard. Sockets do not use it (they are driven by the
/// shard's epoll set); keeping it small keeps many nodes per host under RLIMIT_MEMLOCK.
const IO_MEMORY_BYTES: usize = 512 * 1024;

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
    /// The upstream sink could not start.
    #[error("cannot start the upstream webhook: {0}")]
    Upstream(std::io::Error),
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
    identity: Arc<NodeIdentity>,
    metrics: NodeMetrics,
    router: Router,
    bus: Option<Bus>,
    admission: Arc<Admission>,
    streamed: Streamed,
    /// Message ids made outside the shards: one generator for the whole node, so two
    /// publishers never make the same id.
    mids: Arc<SharedMidGenerator>,
    executors: Vec<ExecutorJoinHandle<()>>,
    bridge: Option<std::thread::JoinHandle<()>>,
    /// The upstream webhook sink, when configured.
    webhook: Option<Webhook>,
    /// How long the node may take to stop (what the webhook gets to deliver what it holds).
    grace: Duration,
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
        let identity = Arc::new(NodeIdentity {
            number: lease_node_number(&config, &node_id),
            id: node_id,
            client_addr,
            api_addr,
            shards,
        });
        let config = Arc::new(config);
        let (mesh, inboxes) = Mesh::new(shards, config.shard_inbox_capacity);
        let (bus, bridge_ends) = match config.redis {
            Some(_) => {
                let (bus, ends) =
                    Bus::new(config.bridge_queue_capacity, config.bridge_queue_max_bytes);
                (Some(bus), Some(ends))
            }
            None => (None, None),
        };
        let uplink = bus.clone().map(|bus| Arc::new(bus) as Arc<dyn Uplink>);
        let router = Router::new(mesh, uplink);
        // A lone node keeps streams in memory on its shards; clustered nodes in Redis.
        let streamed = Streamed {
            mailboxes: config.mailbox,
            topics: Some(Arc::new(config.history.clone())),
        };
        let metrics = NodeMetrics::new(shards);
        let admission = Arc::new(Admission::new(connection_limit.limit));
        let auth = Arc::new(Authenticator::new(
            config.secret.as_deref(),
            config.dev,
            config.max_name_bytes,
        ));
        let webhook = match config.sink() {
            SinkKind::Webhook => WebhookConfig::from_config(&config)
                .map_err(|error| StartError::Upstream(std::io::Error::other(error)))?
                .map(|sink| Webhook::start(sink, Arc::new(UpstreamMetrics::default())))
                .transpose()
                .map_err(StartError::Upstream)?,
            SinkKind::Redis | SinkKind::None => None,
        };
        let upstream = match (config.sink(), &webhook, &bus) {
            (SinkKind::Webhook, Some(webhook), _) => Some(Sink::Webhook(webhook.sender())),
            (SinkKind::Redis, _, Some(bus)) => Some(Sink::Redis(RedisStreamsSender::new(
                bus.clone(),
                Arc::new(UpstreamMetrics::default()),
            ))),
            _ => None,
        };
        // Message ids made outside the shards (the API's publications, the bridge's
        // presence events) take the shard number past the last shard's.
        let mids = Arc::new(SharedMidGenerator::new(identity.number, MAX_SHARDS));
        let bridge = bridge_ends
            .map(|ends| {
                let setup = BridgeSetup {
                    config: config.clone(),
                    identity: identity.clone(),
                    router: router.clone(),
                    metrics: metrics.clone(),
                    upstream: upstream.clone(),
                    mids: mids.clone(),
                };
                bridge::spawn(setup, ends)
            })
            .transpose()
            .map_err(StartError::Bridge)?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut executors = Vec::with_capacity(shards);
        for (index, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
            let placement = if config.pin_shards {
                Placement::Fixed(index % cpus)
            } else {
                Placement::Unbound
            };
            let setup = ShardSetup {
                config: config.clone(),
                identity: identity.clone(),
                auth: auth.clone(),
                router: router.clone(),
                bus: bus.clone(),
                admission: admission.clone(),
                metrics: metrics.shard(index).clone(),
                upstream: upstream.clone(),
            };
            let listener: OwnedFd = listener.into();
            let executor = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{index}"))
                .io_memory(IO_MEMORY_BYTES)
                .spawn(move || shard::run(index, setup, listener, inbox))
                .map_err(|e| StartError::Executor {
                    shard: index,
                    message: e.to_string(),
                })?;
            executors.push(executor);
        }
        let api = ApiServer::start(
            api_listener,
            ApiContext {
                config: config.clone(),
                identity: identity.clone(),
                publisher: Publisher::new(
                    router.clone(),
                    bus.clone(),
                    metrics.clone(),
                    mids.clone(),
                    streamed.clone(),
                ),
                router: router.clone(),
                bus: bus.clone(),
                admission: admission.clone(),
                metrics: metrics.clone(),
                upstream: upstream.clone(),
            },
        )
        .map_err(StartError::Api)?;
        if config.api_key.is_none() && !config.dev {
            tracing::warn!(
                "no api_key configured: the HTTP API refuses every call but /healthz and /readyz"
            );
        }
        tracing::info!(
            node_id = %identity.id,
            listen = %client_addr,
            api_listen = %api_addr,
            shards,
            max_connections = admission.max(),
            cluster = bus.is_some(),
            "shardcast node started"
        );
        Ok(Node {
            identity,
            metrics,
            router,
            bus,
            admission,
            streamed,
            mids,
            executors,
            bridge,
            webhook,
            grace: Duration::from_millis(config.grace_period_ms),
            api,
        })
    }

    /// The client listener's bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.identity.client_addr
    }

    /// The API listener's bound address.
    pub fn api_addr(&self) -> SocketAddr {
        self.identity.api_addr
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.identity.id
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &NodeMetrics {
        &self.metrics
    }

    /// A handle that pushes messages into the node from any thread.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(
            self.router.clone(),
            self.bus.clone(),
            self.metrics.clone(),
            self.mids.clone(),
            self.streamed.clone(),
        )
    }

    /// A handle that stops the node from any thread (e.g. a signal handler).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            node_id: self.identity.id.clone(),
            admission: self.admission.clone(),
            router: self.router.clone(),
            bus: self.bus.clone(),
        }
    }

    /// Waits for every shard to finish (after [`Stopper::stop`]), then stops the bridge
    /// (which removes this node's last routes from Redis) and the API.
    pub fn join(self) {
        for executor in self.executors {
            if let Err(error) = executor.join() {
                tracing::error!(%error, "shard ended with an error");
            }
        }
        if let (Some(bus), Some(bridge)) = (&self.bus, self.bridge) {
            bus.stop();
            if bridge.join().is_err() {
                tracing::error!("the cluster bridge panicked");
            }
        }
        if let Some(webhook) = self.webhook {
            // The shards queued their last records (disconnects) before they ended.
            webhook.stop(self.grace);
        }
        drop(self.api);
        tracing::info!(node_id = %self.identity.id, "node stopped");
    }
}

/// Stops a node: stop accepting, close clients with 1001, exit within the grace period.
#[derive(Clone)]
pub struct Stopper {
    node_id: Arc<str>,
    admission: Arc<Admission>,
    router: Router,
    bus: Option<Bus>,
}

impl Stopper {
    /// Starts the graceful stop (idempotent).
    pub fn stop(&self) {
        if !self.admission.start_draining() {
            return;
        }
        tracing::info!(node_id = %self.node_id, "stopping: closing clients with 1001");
        // A flag and a wake, not an envelope: nothing can drop it.
        self.router.mesh().wake_all();
        if let Some(bus) = &self.bus {
            bus.start_draining();
        }
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
    let timeout = Duration::from_secs(2);
    let ttl_ms = config.cluster_node_ttl_ms;
    let leased = match config.redis_cluster_seeds() {
        Some(seeds) => seeds
            .map_err(|problem| redis::RedisError::from(std::io::Error::other(problem)))
            .and_then(|seeds| {
                redis::cluster::ClusterClientBuilder::new(seeds)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
            })
            .and_then(|client| client.get_connection())
            .and_then(|mut conn| {
                let names = redis_layout::Names::cluster(&config.redis_prefix);
                redis_layout::lease_node_number(&mut conn, &names, node_id, hashed, ttl_ms)
            }),
        None => redis::Client::open(url.as_str())
            .and_then(|client| client.get_connection_with_timeout(timeout))
            .and_then(|mut conn| {
                conn.set_read_timeout(Some(timeout))?;
                let names = redis_layout::Names::new(&config.redis_prefix);
                redis_layout::lease_node_number(&mut conn, &names, node_id, hashed, ttl_ms)
            }),
    };
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
