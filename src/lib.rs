//! shardcast: a clustered WebSocket push gateway, thread-per-core.
//!
//! # Layout
//! - [`config`]: the typed configuration; defaults, TOML, `SHARDCAST_*` env, flags; validation;
//!   the identity a started node settles on.
//! - [`history`]: streams (protocol v1.1): mailbox and topic history in memory on a lone node,
//!   the replay rule shared with the Redis streams.
//! - [`node`]: starts a node (listeners, shards, bridge, API), hands each part the narrow
//!   handles it uses, and stops it.
//! - [`publish`]: messages from outside the shards (the API, embedders) entering routing.
//! - [`api`]: the HTTP API for backends (hyper on its own thread).
//! - [`router`]: the one routing entry ([`router::Router::route`]: API, shards and bridge),
//!   envelopes between shards, their inboxes, home shards and the home-shard directory.
//! - [`cluster`]: the Redis bus between nodes: the bridge thread (session, outbound accounting,
//!   inbound dispatch), the Redis layout and scripts, envelopes, duplicate suppression.
//! - [`shard`]: one glommio executor per core: the driver (listener, sockets, epoll, inbox,
//!   timers, fan-out) around an I/O-free core ([`shard::core`]: tables, directory, requests)
//!   and clock-free schedules ([`shard::schedule`]: deadlines, drain).
//! - [`session`]: one client connection's I/O: upgrade, framing, write queue, rate limit,
//!   heartbeat, close; node admission.
//! - [`reactor`]: socket readiness (a per-shard epoll set) and cross-thread wake-ups.
//! - [`ws`]: RFC 6455 framing on shard-owned buffers; the upgrade request.
//! - [`demo`]: the live-room page (on the JavaScript SDK) a `--dev` node serves at `/`.
//! - [`protocol`]: client protocol v1 requests, rendered server frames, message ids.
//! - [`auth`]: JWT (HS256) and dev-mode credentials.
//! - [`mailbox`]: the two-lane (bounded messages, never-dropped control) hand-off between
//!   threads, used by the shards' inboxes and the bus.
//! - [`upstream`]: what clients say (`up`) and do (connection events) as records for the
//!   backends, their JSON shape, and the sinks that carry them ([`upstream::webhook`],
//!   [`upstream::redis_streams`]).
//! - [`metrics`]: per-shard counters and gauges, and their Prometheus export.
//!
//! Dependencies point one way: `node` builds everything; `shard` drives `session` and its
//! core; the core, `router`, `cluster` and `publish` never reach back into a driver, and
//! routing knows the cluster only as an [`router::Uplink`].
//!
//! A message is rendered once per node into a complete WebSocket frame (`bytes::Bytes`),
//! routed to the shards that hold recipients, and the same buffer is written to each socket;
//! a publish to many users or topics at once is rendered per target where it is delivered
//! ([`router::Body`]), so its `data` is held once.

// The module map links internal modules: the docs are built with --document-private-items.
#![allow(rustdoc::private_intra_doc_links)]

pub mod api;
pub(crate) mod auth;
pub mod cluster;
pub mod config;
pub(crate) mod demo;
pub mod history;
pub(crate) mod mailbox;
pub mod metrics;
pub(crate) mod node;
pub mod protocol;
pub mod publish;
pub(crate) mod reactor;
pub mod router;
pub(crate) mod session;
pub mod shard;
pub mod upstream;
pub mod ws;

pub use config::Config;
pub use node::{Node, Stopper};
pub use publish::{Published, Publisher, Target};
