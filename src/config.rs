//! Node configuration: one typed struct, layered and validated before anything binds.
//!
//! Precedence, lowest to highest: built-in defaults, a TOML file (`--config FILE`), environment
//! variables `SHARDCAST_<KEY>` (the field name in upper case, e.g. `SHARDCAST_MAX_CONNECTIONS`),
//! command-line flags. Layering is figment's job; [`Config::validate`] then reports every
//! problem at once so an operator fixes them in one go.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::history::Retention;
use crate::upstream::webhook::{tls_config_with_ca_file, WebhookUrl};
use crate::upstream::EventFilter;

/// The largest shard count a node accepts: a message id carries the shard in 6 bits (see
/// [`crate::protocol::MidGenerator`]) and the 64th value is reserved for ids made outside the
/// shards (the HTTP API). A bigger box runs one node per 63 cores, or per NUMA node.
pub const MAX_SHARDS: usize = 63;

/// Descriptors a node keeps for itself whatever its load: stdio, the API listener and its
/// runtime, the cluster bridge's two Redis connections and runtime, the start-up Redis
/// connection, a config file, `/proc` reads for metrics, log files a deployment may add.
/// About 20 are in use on a running node; the rest is headroom for what a library opens.
pub const BASE_RESERVED_DESCRIPTORS: usize = 64;

/// Descriptors each shard keeps: its listener, epoll set, stop eventfd, glommio's io_uring
/// rings and their eventfds, and the spare descriptor it frees to refuse a client at EMFILE.
pub const RESERVED_DESCRIPTORS_PER_SHARD: usize = 8;

/// Client sockets a node accepts past `max_connections` to answer them 503 once their
/// request has arrived (a 503 written before the request is read can be lost to a TCP
/// reset). Past these, an accepted socket is answered 503 and closed at once.
pub const REFUSAL_SLOTS: usize = 32;

/// Most messages one stream may keep (`mailbox_size`, a history rule's `size`): a resume
/// replays at most this many, and a stream this long costs a few MiB in memory or Redis.
pub const MAX_STREAM_SIZE: usize = 10_000;

/// Longest time a stream may keep a message (`mailbox_ttl_secs`, a history rule's
/// `ttl_secs`): 30 days. Longer-lived state belongs in a backend's database.
pub const MAX_STREAM_TTL_SECS: u64 = 30 * 24 * 3600;

/// The shortest `webhook_secret` accepted: a shorter HMAC key is guessable.
pub const WEBHOOK_SECRET_MIN_BYTES: usize = 16;

/// Every setting of a node. Field docs give the default and what a real deployment changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client WebSocket listener. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// HTTP API listener. Default `127.0.0.1:8081`: the API is for backends, not the internet.
    pub api_listen: SocketAddr,
    /// Number of shards (executors, one per core). `0`, the default, means one per available core.
    pub shards: usize,
    /// Pin each shard to its own CPU. Default `true`; turn off when several nodes share a box.
    pub pin_shards: bool,
    /// Redis URL of the cluster bus: a standalone Redis (`redis://host:port/db`) or a Redis
    /// Cluster (`redis+cluster://h1:p1,h2:p2,...`, any of its nodes as seeds; see
    /// [`Config::redis_cluster_seeds`]). `rediss://` for TLS is not built in. Default none:
    /// a single node that needs no Redis.
    #[serde(deserialize_with = "text")]
    pub redis: Option<String>,
    /// Namespace of every Redis key and channel, so several clusters can share one Redis.
    /// Default `shardcast`.
    pub redis_prefix: String,
    /// How often a node refreshes its lease and registry entry in Redis, in ms. Default 2000.
    pub cluster_heartbeat_ms: u64,
    /// How long a node's lease lives without a heartbeat, in ms: a node killed with
    /// `kill -9` stops receiving traffic and counting in presence after at most this long.
    /// Default 10000; at least three heartbeats.
    pub cluster_node_ttl_ms: u64,
    /// Longest wait between attempts to reach Redis, in ms (the delay starts at 100 ms and
    /// doubles). Default 2000.
    pub redis_backoff_max_ms: u64,
    /// Messages for other nodes the bridge's lane holds (while Redis is slow or down) before
    /// new ones are dropped and counted. Default 16384.
    pub bridge_queue_capacity: usize,
    /// Bytes of messages for other nodes the bridge may hold at once (queued, in flight or
    /// waiting for a retry) before new ones are dropped and counted; a message arriving at
    /// an empty queue is always taken. Bounds what a Redis outage or one huge publish can
    /// cost in memory. Default 64 MiB.
    pub bridge_queue_max_bytes: usize,
    /// How long a message for other nodes may wait for Redis, in ms, retries included;
    /// older ones are dropped and counted rather than delivered late. Default 5000.
    pub bridge_hold_ms: u64,
    /// After Redis lost the cluster's state (restarted empty, flushed), how long every node
    /// holds its messages for other nodes while the nodes re-publish their devices and
    /// topics, in ms: routing from a half-rebuilt table would lose messages. Default 2500,
    /// at least `redis_backoff_max_ms` (every node is back within one backoff) and less than
    /// `bridge_hold_ms`.
    pub cluster_settle_ms: u64,
    /// Unique node id. Default: generated from the host name and a random suffix.
    #[serde(deserialize_with = "text")]
    pub node_id: Option<String>,
    /// HS256 secret that client JWTs are signed with. Required unless `dev`.
    #[serde(deserialize_with = "text")]
    pub secret: Option<String>,
    /// Key backends present to the HTTP API (`Authorization: Bearer <key>`).
    #[serde(deserialize_with = "text")]
    pub api_key: Option<String>,
    /// Development mode: trust `?user=NAME`, serve `/echo`. Never the default in a file.
    pub dev: bool,
    /// Listen backlog per shard socket. Default 4096 (the kernel caps it at `net.core.somaxconn`).
    pub backlog: u32,
    /// Seconds between server pings; a connection silent for three intervals is closed. Default 25.
    pub heartbeat_secs: u32,
    /// Time a client has to complete the HTTP upgrade, in milliseconds. Default 5000.
    pub handshake_timeout_ms: u64,
    /// Largest HTTP upgrade request accepted, in bytes. Default 8192.
    pub max_handshake_bytes: usize,
    /// Client connections (including those still handshaking) one node holds; more get HTTP
    /// 503. Default `0`: what the process's `RLIMIT_NOFILE` soft limit allows once
    /// descriptors are reserved for the API, Redis, listeners and files (see
    /// [`Config::reserved_descriptors`]); a larger value is lowered to that, with a warning,
    /// since past it accepts would fail with EMFILE. Raise `ulimit -n` (`LimitNOFILE=` in
    /// systemd) to hold more.
    pub max_connections: usize,
    /// Devices one user may have online; a newer one closes the oldest with 4001. Default 8.
    pub max_devices_per_user: usize,
    /// Topics one connection may subscribe to. Default 64.
    pub max_topics_per_connection: usize,
    /// Longest topic name and user id, in bytes. Default 128.
    pub max_name_bytes: usize,
    /// Largest single inbound frame payload, in bytes; larger closes with 1009. Default 65536.
    pub max_frame_bytes: usize,
    /// Largest inbound message (all fragments), in bytes; larger closes with 1009. Default 65536.
    pub max_message_bytes: usize,
    /// How long a connection may hold an incomplete frame or message, in ms, before it is
    /// closed with 1008: a client that drips a frame a byte at a time would otherwise pin up
    /// to `max_frame_bytes + max_message_bytes` of memory forever. The age counts from the
    /// first byte after the last complete message, and is checked once a second. Default
    /// 10000: a 64 KiB message at 64 kbit/s takes 8 s.
    pub incomplete_message_timeout_ms: u64,
    /// Bytes of incomplete frames and messages one shard holds for all its connections; the
    /// connection whose data takes the shard past it is closed with 1008 (those already
    /// holding keep their data, each bounded by `incomplete_message_timeout_ms`). Default
    /// 67108864 (64 MiB): at least 512 connections each holding a whole 64 KiB frame and
    /// 64 KiB message, while an ordinary connection holds a few hundred bytes for a moment.
    pub shard_incomplete_bytes: usize,
    /// Inbound messages per second a connection may sustain (token bucket refill). Default 50.
    pub rate_limit_per_sec: u32,
    /// Inbound message burst a connection may send at once (token bucket size). Default 100.
    pub rate_limit_burst: u32,
    /// Bytes of frames queued for one connection before it counts as a slow consumer and is
    /// closed with 1008. Default 262144 (256 KiB); the kernel socket buffer comes on top.
    pub max_outbound_bytes: usize,
    /// Largest HTTP API request body, in bytes; larger is answered 413. Default 1048576.
    pub max_api_body_bytes: usize,
    /// Time an API client has to send a request's line and headers, in ms; the connection is
    /// then closed without an answer. It also bounds how long a keep-alive connection may sit
    /// idle between requests. Default 10000: a backend on a LAN sends its headers in
    /// microseconds, while a half-sent request would otherwise hold a descriptor forever.
    pub api_header_timeout_ms: u64,
    /// Time an API client has to send a request's body once its headers are in, in ms;
    /// slower is answered 408. Default 10000 (a 1 MiB body at 1 Mbit/s takes 8 s).
    pub api_body_timeout_ms: u64,
    /// API connections open at once; one more is answered 503 and closed at once. Default
    /// 256: backends keep a few pooled connections each. The descriptors are reserved out of
    /// `RLIMIT_NOFILE` (see `max_connections`), so a node full of clients still answers
    /// `/healthz` and `/metrics`.
    pub max_api_connections: usize,
    /// Messages one shard's inbox holds before senders drop and count them. Default 16384:
    /// a message costs at most one envelope per shard, and the ring is allocated up front
    /// (about 80 bytes a slot, 1.3 MiB per shard). Control envelopes are never dropped.
    pub shard_inbox_capacity: usize,
    /// On SIGTERM/SIGINT, how long clients get to close before the node exits, in ms. Default 10000.
    pub grace_period_ms: u64,
    /// On SIGTERM/SIGINT, the window over which clients are closed with 1001, in ms, so their
    /// reconnects do not stampede the other nodes. Default 3000; 0 closes all at once. Must
    /// be shorter than `grace_period_ms`.
    pub drain_window_ms: u64,
    /// How long a closing connection waits for the peer's close frame, in ms. Default 2000.
    pub close_timeout_ms: u64,
    /// Keep a mailbox stream per user (protocol v1.1): direct messages, and the sender's
    /// copies of what a user sends, are numbered and kept for `resume`, for devices that
    /// were offline and for the history API. Default `true`; `false` keeps direct messages
    /// live-only, as in v1.
    pub mailbox: bool,
    /// Messages a user's mailbox keeps. Default 100; at most [`MAX_STREAM_SIZE`].
    pub mailbox_size: usize,
    /// How long a mailbox keeps a message, in seconds; a mailbox with no message for this
    /// long is forgotten. Default 86400 (24 h); at most [`MAX_STREAM_TTL_SECS`].
    pub mailbox_ttl_secs: u64,
    /// Bytes of stream history a node keeps in memory when it runs alone (no `redis`),
    /// split evenly over its shards; past it the oldest messages are evicted first. Default
    /// 67108864 (64 MiB): a full mailbox of 100 messages of 100 bytes is about 25 KiB, so
    /// some 2,500 of them. Clustered nodes keep history in Redis, bounded by count and age
    /// (and Redis's own `maxmemory`).
    pub history_max_bytes: usize,
    /// Which topics keep a history (`[[history.topics]]`). Default none.
    pub history: History,
    /// `human` (default) or `json` log lines.
    pub log_format: LogFormat,
    /// Where upstream records (client `up` messages, connection events) are POSTed, in
    /// batches signed with `webhook_secret` (see [`crate::upstream::webhook`]): `http://` or
    /// `https://` (certificates checked against Mozilla's roots and `webhook_ca_file`).
    /// Default none: no webhook.
    #[serde(deserialize_with = "text")]
    pub webhook_url: Option<String>,
    /// A PEM file of CA certificates an `https://` webhook's certificate may also chain
    /// to (a private CA), besides Mozilla's roots. Default none.
    #[serde(deserialize_with = "text")]
    pub webhook_ca_file: Option<String>,
    /// Key of the `X-Shardcast-Signature` HMAC-SHA256 that backends check every body
    /// against. Required with `webhook_url`, at least [`WEBHOOK_SECRET_MIN_BYTES`] bytes.
    #[serde(deserialize_with = "text")]
    pub webhook_secret: Option<String>,
    /// Upstream records the webhook holds (queued or being sent) before new ones are
    /// refused (an `up` is answered `err unavailable`) and counted. Default 10000: at 64 KiB
    /// `up` messages the byte bound comes first.
    pub webhook_queue_max: usize,
    /// Bytes of upstream records the webhook holds before new ones are refused; a record
    /// arriving at an empty queue is always taken. Bounds what a dead backend costs in
    /// memory. Default 16777216 (16 MiB).
    pub webhook_queue_max_bytes: usize,
    /// Records per POST at most. Default 100.
    pub webhook_batch_max: usize,
    /// Bytes of records per POST at most (estimated from their fields); a larger record is
    /// sent alone. Default 1048576 (1 MiB), the body limit of many HTTP servers and
    /// proxies (nginx's `client_max_body_size`): a backend answering 413 loses the batch.
    pub webhook_batch_max_bytes: usize,
    /// How long a batch waits after its first record for more, in ms. Default 0: a batch is
    /// what queued while the previous POST was out, so batches grow with load and an idle
    /// node acks an `up` without delay. More linger means fewer, larger POSTs at a low rate,
    /// and that much more latency on every `up` ack.
    pub webhook_batch_linger_ms: u64,
    /// Time one POST has to connect and be answered, in ms; slower is retried. Default 5000.
    pub webhook_timeout_ms: u64,
    /// How long a record may wait to be delivered from when the node accepted it, in ms,
    /// retries (connect errors, timeouts, 429, 5xx) included; then it is dropped and
    /// counted, without a try if it queued that long behind a failing backend. Every `up`
    /// is answered within this plus one `webhook_timeout_ms`. Default 30000.
    pub webhook_retry_max_ms: u64,
    /// Users whose routes (the nodes holding their devices) the bridge caches, so that a
    /// direct message to them is one `PUBLISH` per target node instead of a script (see the
    /// bridge's `routes` module; kept exact by Redis's client-side-caching invalidations).
    /// It serves nodes with `mailbox = false` (with mailboxes the script appends and routes
    /// in one call anyway) and kicks. About 100 bytes per user. Default 100000; 0 turns it
    /// off (and the bridge's command connection speaks RESP2).
    pub route_cache_max: usize,
    /// Where upstream records go: `webhook` (POSTs to `webhook_url`, any mode), `redis`
    /// (Redis Streams `P:up:NAME` and `P:events`, clustered nodes only, see
    /// [`crate::upstream::redis_streams`]) or `none`. Default `webhook` when `webhook_url`
    /// is set, else `none`. Every node of a cluster should name the same sink: `online` and
    /// `offline` are decided in Redis, where each node's setting says what is tracked.
    pub upstream_sink: Option<SinkKind>,
    /// Entries each upstream Redis stream keeps about (`XADD … MAXLEN ~`): older ones are
    /// trimmed whether read or not, so a backend that stops reading costs Redis a bounded
    /// amount of memory. Default 1000000 (about 200 MB per stream at 200-byte records).
    pub upstream_stream_maxlen: u64,
    /// Connection events that go upstream: any of `connect`, `disconnect`, `online`,
    /// `offline`, `sub`, `unsub`, as a list, or comma-separated in
    /// `SHARDCAST_UPSTREAM_EVENTS`. Default `connect`, `disconnect`, `online`, `offline`:
    /// `sub`/`unsub` are off, as a busy live room makes many of them.
    pub upstream_events: EventFilter,
}

/// The `[history]` table: topic history rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct History {
    /// Rules tried in order; a topic keeps a history under the first rule whose pattern it
    /// matches (see [`Config::history_rule_for`]), and none when no rule matches.
    pub topics: Vec<TopicHistory>,
}

impl History {
    /// The retention of `topic`'s history: that of the first rule whose pattern matches it
    /// (so list specific patterns before broad ones), or `None` when no rule does and the
    /// topic keeps no history (its publications stay one PUBLISH).
    pub fn rule_for(&self, topic: &str) -> Option<Retention> {
        self.topics
            .iter()
            .find(|rule| glob_matches(&rule.pattern, topic))
            .map(|rule| Retention {
                size: rule.size,
                ttl_secs: rule.ttl_secs,
            })
    }
}

/// One `[[history.topics]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicHistory {
    /// Topic names the rule covers: `*` stands for any run of characters (none included),
    /// every other character for itself. `chat.*` covers `chat.1` and `chat.a.b`, not
    /// `chat`; `*` alone covers every topic.
    pub pattern: String,
    /// Messages the topic's stream keeps; at least 1, at most [`MAX_STREAM_SIZE`].
    pub size: usize,
    /// How long the stream keeps a message, in seconds; at least 1, at most
    /// [`MAX_STREAM_TTL_SECS`].
    pub ttl_secs: u64,
}

/// Whether `name` matches `pattern`, where `*` stands for any run of bytes (possibly
/// empty). Linear in practice: on a mismatch it resumes after the last `*` only.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (pattern.as_bytes(), name.as_bytes());
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and the name position it currently stands up to.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((star_p, star_n)) = star {
            // Let the last `*` take one more byte and try again after it.
            p = star_p + 1;
            n = star_n + 1;
            star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Reads an optional string that an environment variable may have turned into a number or a
/// boolean (`SHARDCAST_SECRET=12345`): text settings keep the text the operator wrote.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        String(String),
        Integer(i128),
        Float(f64),
        Bool(bool),
    }
    Ok(Option::<Text>::deserialize(d)?.map(|t| match t {
        Text::String(s) => s,
        Text::Integer(n) => n.to_string(),
        Text::Float(f) => f.to_string(),
        Text::Bool(b) => b.to_string(),
    }))
}

/// What [`Config::connection_limit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimit {
    /// Client connections the node will hold.
    pub limit: usize,
    /// What the descriptor limit allows after the reserve.
    pub fits: usize,
    /// Descriptors reserved (see [`Config::reserved_descriptors`]).
    pub reserved: usize,
    /// A configured `max_connections` was over `fits` and was lowered to it.
    pub lowered: bool,
}

/// An upstream sink (the `upstream_sink` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// No sink: `up` is refused, connection events go nowhere.
    None,
    /// The HTTP webhook ([`crate::upstream::webhook`]).
    Webhook,
    /// Redis Streams ([`crate::upstream::redis_streams`]).
    Redis,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Who a running node is: settled at start, then shared read-only by the shards, the API
/// and the bridge.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The node id (configured or generated).
    pub id: std::sync::Arc<str>,
    /// The node's number in message ids (see [`crate::protocol::MidGenerator`]).
    pub number: u16,
    /// The client listener's bound address.
    pub client_addr: SocketAddr,
    /// The API listener's bound address.
    pub api_addr: SocketAddr,
    /// Number of shards.
    pub shards: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ([0, 0, 0, 0], 8080).into(),
            api_listen: ([127, 0, 0, 1], 8081).into(),
            shards: 0,
            pin_shards: true,
            redis: None,
            redis_prefix: "shardcast".into(),
            cluster_heartbeat_ms: 2000,
            cluster_node_ttl_ms: 10_000,
            redis_backoff_max_ms: 2000,
            bridge_queue_capacity: 16384,
            bridge_queue_max_bytes: 64 * 1024 * 1024,
            bridge_hold_ms: 5000,
            cluster_settle_ms: 2500,
            node_id: None,
            secret: None,
            api_key: None,
            dev: false,
            backlog: 4096,
            heartbeat_secs: 25,
            handshake_timeout_ms: 5000,
            max_handshake_bytes: 8192,
            max_connections: 0,
            max_devices_per_user: 8,
            max_topics_per_connection: 64,
            max_name_bytes: 128,
            max_frame_bytes: 64 * 1024,
            max_message_bytes: 64 * 1024,
            incomplete_message_timeout_ms: 10_000,
            shard_incomplete_bytes: 64 * 1024 * 1024,
            rate_limit_per_sec: 50,
            rate_limit_burst: 100,
            max_outbound_bytes: 256 * 1024,
            shard_inbox_capacity: 16384,
            max_api_body_bytes: 1024 * 1024,
            api_header_timeout_ms: 10_000,
            api_body_timeout_ms: 10_000,
            max_api_connections: 256,
            grace_period_ms: 10_000,
            drain_window_ms: 3000,
            close_timeout_ms: 2000,
            mailbox: true,
            mailbox_size: 100,
            mailbox_ttl_secs: 86_400,
            history_max_bytes: 64 * 1024 * 1024,
            history: History::default(),
            log_format: LogFormat::Human,
            webhook_url: None,
            webhook_secret: None,
            webhook_ca_file: None,
            webhook_queue_max: 10_000,
            webhook_queue_max_bytes: 16 * 1024 * 1024,
            webhook_batch_max: 100,
            webhook_batch_max_bytes: 1024 * 1024,
            webhook_batch_linger_ms: 0,
            webhook_timeout_ms: 5000,
            webhook_retry_max_ms: 30_000,
            route_cache_max: 100_000,
            upstream_sink: None,
            upstream_stream_maxlen: 1_000_000,
            upstream_events: EventFilter::default(),
        }
    }
}

/// The flags of `shardcast serve`; each one, when given, overrides file and environment.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct ServeFlags {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Client WebSocket listener address.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// HTTP API listener address.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_listen: Option<SocketAddr>,
    /// Number of shards (0 = one per core).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<usize>,
    /// Redis URL: joins the cluster on that Redis.
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    /// Node id (default: generated).
    #[arg(long, value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// JWT HS256 secret for client tokens.
    #[arg(long, value_name = "S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// API key for the HTTP API.
    #[arg(long, value_name = "K")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Development mode: trusts `?user=NAME`; not for production.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dev: bool,
    /// Log format.
    #[arg(long, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

/// A configuration that could not be loaded or does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file, variable or flag could not be read into the typed config.
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// Values were read but are inconsistent; every problem is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Layers defaults, the file, `SHARDCAST_*` variables and flags, then validates.
    pub fn load(flags: &ServeFlags) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &flags.config {
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment
            .merge(Env::prefixed("SHARDCAST_"))
            .merge(Serialized::defaults(flags))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; lists all problems rather than stopping at the first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if !self.dev && self.secret.as_deref().is_none_or(str::is_empty) {
            problems.push(
                "`secret` is required unless --dev (clients authenticate with JWTs signed by it)"
                    .into(),
            );
        }
        if let Some(url) = &self.redis {
            if let Some(seeds) = self.redis_cluster_seeds() {
                match seeds {
                    Ok(_) if self.route_cache_max == 0 => {
                        problems.push(
                            "`route_cache_max` must be above 0 with a Redis Cluster: direct \
                             messages are routed from the route cache there"
                                .into(),
                        );
                    }
                    Ok(_) => {}
                    Err(problem) => problems.push(problem),
                }
            } else if let Err(error) = redis::Client::open(url.as_str()) {
                problems.push(format!("`redis` is not a usable Redis URL: {error}"));
            }
        }
        if self.redis_prefix.is_empty() || !self.redis_prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            problems.push("`redis_prefix` must be printable ASCII without spaces".into());
        }
        if self.redis_cluster_seeds().is_some() && self.redis_prefix.contains(['{', '}']) {
            problems.push(
                "`redis_prefix` must not contain `{` or `}` with a Redis Cluster (the keys' hash \
                 tags are built from it)"
                    .into(),
            );
        }
        if self.cluster_node_ttl_ms < 3 * self.cluster_heartbeat_ms {
            problems.push(format!(
                "`cluster_node_ttl_ms` ({}) must be at least three `cluster_heartbeat_ms` ({})",
                self.cluster_node_ttl_ms, self.cluster_heartbeat_ms
            ));
        }
        if self.redis.is_some()
            && (self.cluster_settle_ms < self.redis_backoff_max_ms
                || self.cluster_settle_ms >= self.bridge_hold_ms)
        {
            problems.push(format!(
                "`cluster_settle_ms` ({}) must be at least `redis_backoff_max_ms` ({}) and less than `bridge_hold_ms` ({})",
                self.cluster_settle_ms, self.redis_backoff_max_ms, self.bridge_hold_ms
            ));
        }
        if self.shards > MAX_SHARDS {
            problems.push(format!("`shards` is {}, at most {MAX_SHARDS}", self.shards));
        }
        let positive = [
            ("heartbeat_secs", self.heartbeat_secs as u64),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("max_handshake_bytes", self.max_handshake_bytes as u64),
            ("max_devices_per_user", self.max_devices_per_user as u64),
            (
                "max_topics_per_connection",
                self.max_topics_per_connection as u64,
            ),
            ("max_name_bytes", self.max_name_bytes as u64),
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("max_message_bytes", self.max_message_bytes as u64),
            (
                "incomplete_message_timeout_ms",
                self.incomplete_message_timeout_ms,
            ),
            ("shard_incomplete_bytes", self.shard_incomplete_bytes as u64),
            ("rate_limit_per_sec", self.rate_limit_per_sec as u64),
            ("rate_limit_burst", self.rate_limit_burst as u64),
            ("max_outbound_bytes", self.max_outbound_bytes as u64),
            ("shard_inbox_capacity", self.shard_inbox_capacity as u64),
            ("max_api_body_bytes", self.max_api_body_bytes as u64),
            ("api_header_timeout_ms", self.api_header_timeout_ms),
            ("api_body_timeout_ms", self.api_body_timeout_ms),
            ("max_api_connections", self.max_api_connections as u64),
            ("backlog", self.backlog as u64),
            ("cluster_heartbeat_ms", self.cluster_heartbeat_ms),
            ("redis_backoff_max_ms", self.redis_backoff_max_ms),
            ("bridge_queue_capacity", self.bridge_queue_capacity as u64),
            ("bridge_queue_max_bytes", self.bridge_queue_max_bytes as u64),
            ("bridge_hold_ms", self.bridge_hold_ms),
            ("history_max_bytes", self.history_max_bytes as u64),
            ("webhook_queue_max", self.webhook_queue_max as u64),
            (
                "webhook_queue_max_bytes",
                self.webhook_queue_max_bytes as u64,
            ),
            ("webhook_batch_max", self.webhook_batch_max as u64),
            (
                "webhook_batch_max_bytes",
                self.webhook_batch_max_bytes as u64,
            ),
            ("webhook_timeout_ms", self.webhook_timeout_ms),
            ("upstream_stream_maxlen", self.upstream_stream_maxlen),
            ("webhook_retry_max_ms", self.webhook_retry_max_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                problems.push(format!("`{name}` must be greater than 0"));
            }
        }
        if self.drain_window_ms >= self.grace_period_ms {
            problems.push(format!(
                "`drain_window_ms` ({}) must be shorter than `grace_period_ms` ({})",
                self.drain_window_ms, self.grace_period_ms
            ));
        }
        if self.max_handshake_bytes < 512 {
            problems.push("`max_handshake_bytes` must be at least 512".into());
        }
        let mut retention = |name: String, size: usize, ttl_secs: u64| {
            if !(1..=MAX_STREAM_SIZE).contains(&size) {
                problems.push(format!(
                    "`{name}size` is {size}, must be 1 to {MAX_STREAM_SIZE}"
                ));
            }
            if !(1..=MAX_STREAM_TTL_SECS).contains(&ttl_secs) {
                problems.push(format!(
                    "`{name}ttl_secs` is {ttl_secs}, must be 1 to {MAX_STREAM_TTL_SECS}"
                ));
            }
        };
        retention("mailbox_".into(), self.mailbox_size, self.mailbox_ttl_secs);
        for (i, rule) in self.history.topics.iter().enumerate() {
            retention(format!("history.topics[{i}]."), rule.size, rule.ttl_secs);
        }
        for (i, rule) in self.history.topics.iter().enumerate() {
            if !crate::auth::valid_name(&rule.pattern, self.max_name_bytes) {
                problems.push(format!(
                    "`history.topics[{i}].pattern` must be 1 to `max_name_bytes` ({}) bytes without control characters",
                    self.max_name_bytes
                ));
            }
        }
        if let Some(id) = &self.node_id {
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                problems.push("`node_id` must be 1 to 64 printable ASCII characters".into());
            }
        }
        if let Some(url) = &self.webhook_url {
            match (WebhookUrl::parse(url), &self.webhook_ca_file) {
                (Err(error), _) => problems.push(format!("`webhook_url`: {error}")),
                (Ok(url), Some(_)) if !url.is_https() => problems
                    .push("`webhook_ca_file` is set but `webhook_url` is not https://".into()),
                (Ok(_), Some(path)) => {
                    if let Err(error) = tls_config_with_ca_file(path) {
                        problems.push(error);
                    }
                }
                (Ok(_), None) => {}
            }
            if self
                .webhook_secret
                .as_ref()
                .is_none_or(|secret| secret.len() < WEBHOOK_SECRET_MIN_BYTES)
            {
                problems.push(format!(
                    "`webhook_secret` of at least {WEBHOOK_SECRET_MIN_BYTES} bytes is required with `webhook_url` (backends check each body's signature with it)"
                ));
            }
        }
        match self.upstream_sink {
            Some(SinkKind::Webhook) if self.webhook_url.is_none() => {
                problems.push("`upstream_sink` is `webhook` but no `webhook_url` is set".into())
            }
            Some(SinkKind::Redis) if self.redis.is_none() => problems.push(
                "`upstream_sink` is `redis` but no `redis` is set (a lone node has the webhook)"
                    .into(),
            ),
            _ => {}
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The seed nodes of a Redis Cluster `redis` names (`redis+cluster://h1:p1,h2:p2`), as
    /// `redis://` URLs: `None` when `redis` is unset or a standalone Redis, `Some(Err)` with
    /// the problem when the list is unusable.
    pub fn redis_cluster_seeds(&self) -> Option<Result<Vec<String>, String>> {
        let list = self.redis.as_deref()?.strip_prefix("redis+cluster://")?;
        let seeds: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|seed| !seed.is_empty())
            .map(|seed| format!("redis://{}", seed.trim_end_matches('/')))
            .collect();
        if seeds.is_empty() {
            return Some(Err(
                "`redis`: `redis+cluster://` names no node (`redis+cluster://h1:p1,h2:p2`)".into(),
            ));
        }
        for seed in &seeds {
            if let Err(error) = redis::Client::open(seed.as_str()) {
                return Some(Err(format!(
                    "`redis`: cluster node `{seed}` is not a usable address: {error}"
                )));
            }
        }
        Some(Ok(seeds))
    }

    /// The upstream sink this node runs: `upstream_sink`, or `webhook` when only
    /// `webhook_url` is set.
    pub fn sink(&self) -> SinkKind {
        match (self.upstream_sink, &self.webhook_url) {
            (Some(kind), _) => kind,
            (None, Some(_)) => SinkKind::Webhook,
            (None, None) => SinkKind::None,
        }
    }

    /// Shards to run: the configured count, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_SHARDS)
        }
    }

    /// Descriptors kept out of `max_connections`: [`BASE_RESERVED_DESCRIPTORS`], per shard
    /// [`RESERVED_DESCRIPTORS_PER_SHARD`], `max_api_connections`, and [`REFUSAL_SLOTS`].
    pub fn reserved_descriptors(&self) -> usize {
        BASE_RESERVED_DESCRIPTORS
            + RESERVED_DESCRIPTORS_PER_SHARD * self.shard_count()
            + self.max_api_connections
            + REFUSAL_SLOTS
    }

    /// The client connections a node may hold when it may open `nofile` descriptors (the
    /// `RLIMIT_NOFILE` soft limit): `max_connections` if set and it fits, else what fits.
    pub fn connection_limit(&self, nofile: u64) -> ConnectionLimit {
        let reserved = self.reserved_descriptors();
        let fits = usize::try_from(nofile)
            .unwrap_or(usize::MAX)
            .saturating_sub(reserved);
        match self.max_connections {
            0 => ConnectionLimit {
                limit: fits,
                fits,
                reserved,
                lowered: false,
            },
            configured => ConnectionLimit {
                limit: configured.min(fits),
                fits,
                reserved,
                lowered: configured > fits,
            },
        }
    }

    /// The retention of `topic`'s history (see [`History::rule_for`]).
    pub fn history_rule_for(&self, topic: &str) -> Option<Retention> {
        self.history.rule_for(topic)
    }

    /// The retention of every user's mailbox, or `None` when mailboxes are off.
    pub fn mailbox_retention(&self) -> Option<Retention> {
        self.mailbox.then_some(Retention {
            size: self.mailbox_size,
            ttl_secs: self.mailbox_ttl_secs,
        })
    }

    /// One shard's share of `history_max_bytes`.
    pub fn history_max_bytes_per_shard(&self) -> usize {
        self.history_max_bytes / self.shard_count()
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_a_secret_unless_dev() {
        assert!(Config::default().validate().is_err());
        let dev = Config {
            dev: true,
            ..Config::default()
        };
        assert!(dev.validate().is_ok());
    }

    #[test]
    fn every_problem_is_reported() {
        let bad = Config {
            shards: 64,
            max_api_connections: 0,
            heartbeat_secs: 0,
            ..Config::default()
        };
        match bad.validate() {
            Err(ConfigError::Invalid(problems)) => assert_eq!(problems.len(), 4, "{problems:?}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn max_connections_fits_the_descriptor_limit() {
        let config = Config {
            dev: true,
            shards: 2,
            max_api_connections: 16,
            ..Config::default()
        };
        let reserved =
            BASE_RESERVED_DESCRIPTORS + 2 * RESERVED_DESCRIPTORS_PER_SHARD + 16 + REFUSAL_SLOTS;
        assert_eq!(config.reserved_descriptors(), reserved);
        let auto = config.connection_limit(20_000);
        assert_eq!(auto.limit, 20_000 - reserved);
        assert!(!auto.lowered);
        let small = Config {
            max_connections: 100,
            ..config.clone()
        };
        assert_eq!(small.connection_limit(20_000).limit, 100);
        let big = Config {
            max_connections: 1_000_000,
            ..config.clone()
        };
        let lowered = big.connection_limit(20_000);
        assert_eq!((lowered.limit, lowered.lowered), (20_000 - reserved, true));
        assert_eq!(config.connection_limit(10).limit, 0, "nothing fits");
        assert_eq!(
            config.connection_limit(u64::MAX).limit,
            usize::MAX - reserved
        );
    }

    #[test]
    fn cluster_settings_are_checked() {
        let bad = Config {
            dev: true,
            redis: Some("not-a-url".into()),
            redis_prefix: "has space".into(),
            cluster_heartbeat_ms: 5000,
            cluster_node_ttl_ms: 10_000,
            ..Config::default()
        };
        match bad.validate() {
            Err(ConfigError::Invalid(problems)) => assert_eq!(problems.len(), 3, "{problems:?}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        let good = Config {
            dev: true,
            redis: Some("redis://127.0.0.1:6379/0".into()),
            ..Config::default()
        };
        assert!(good.validate().is_ok());
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn flags_override_environment_and_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "node.toml",
                "secret = \"from-file\"\nmax_devices_per_user = 3\nshards = 2",
            )?;
            jail.set_env("SHARDCAST_SHARDS", "4");
            jail.set_env("SHARDCAST_SECRET", "12345");
            let flags = ServeFlags {
                config: Some("node.toml".into()),
                shards: Some(1),
                ..ServeFlags::default()
            };
            let config = Config::load(&flags).map_err(|e| e.to_string())?;
            assert_eq!(config.shards, 1, "flag beats env");
            assert_eq!(
                config.secret.as_deref(),
                Some("12345"),
                "env beats file, numeric text stays text"
            );
            assert_eq!(config.max_devices_per_user, 3, "file beats default");
            Ok(())
        });
    }

    #[test]
    fn glob_patterns_match_whole_names() {
        let cases = [
            ("chat.*", "chat.1", true),
            ("chat.*", "chat.a.b", true),
            ("chat.*", "chat.", true),
            ("chat.*", "chat", false),
            ("chat.*", "xchat.1", false),
            ("*", "", true),
            ("*", "anything", true),
            ("room", "room", true),
            ("room", "rooms", false),
            ("room", "roo", false),
            ("*.live", "a.b.live", true),
            ("*.live", "a.live.x", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("a*b*c", "abcbc", true),
            ("**", "x", true),
            ("a*", "", false),
            ("é*", "été", true),
            ("*aab", "aaaab", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(glob_matches(pattern, name), expected, "{pattern} ~ {name}");
        }
        let long = "a".repeat(10_000);
        assert!(
            !glob_matches("*a*a*a*b", &long),
            "no exponential backtracking"
        );
    }

    #[test]
    fn the_first_matching_history_rule_wins() {
        let rule = |pattern: &str, size, ttl_secs| TopicHistory {
            pattern: pattern.into(),
            size,
            ttl_secs,
        };
        let config = Config {
            dev: true,
            history: History {
                topics: vec![rule("chat.vip.*", 1000, 3600), rule("chat.*", 100, 300)],
            },
            ..Config::default()
        };
        assert!(config.validate().is_ok());
        let retention = |size, ttl_secs| Some(Retention { size, ttl_secs });
        assert_eq!(config.history_rule_for("chat.vip.1"), retention(1000, 3600));
        assert_eq!(config.history_rule_for("chat.2"), retention(100, 300));
        assert_eq!(config.history_rule_for("news"), None);
        assert_eq!(config.mailbox_retention(), retention(100, 86_400));
        let off = Config {
            mailbox: false,
            ..config
        };
        assert_eq!(off.mailbox_retention(), None);
    }

    #[test]
    fn history_settings_are_checked() {
        let rule = |pattern: &str, size, ttl_secs| TopicHistory {
            pattern: pattern.into(),
            size,
            ttl_secs,
        };
        let bad = Config {
            dev: true,
            mailbox_size: 0,
            mailbox_ttl_secs: MAX_STREAM_TTL_SECS + 1,
            history_max_bytes: 0,
            history: History {
                topics: vec![
                    rule("", 10, 10),
                    rule("ok.*", MAX_STREAM_SIZE + 1, 0),
                    rule("tab\t*", 1, 1),
                    rule(&"x".repeat(129), 1, 1),
                ],
            },
            ..Config::default()
        };
        match bad.validate() {
            Err(ConfigError::Invalid(problems)) => {
                assert_eq!(problems.len(), 8, "{problems:?}");
                assert!(problems
                    .iter()
                    .any(|p| p.starts_with("`history.topics[1].size`")));
                assert!(problems.iter().any(|p| p.starts_with("`mailbox_size`")));
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn history_rules_and_mailbox_settings_load() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "node.toml",
                r#"
                    secret = "s"
                    mailbox_size = 50
                    history_max_bytes = 1048576

                    [[history.topics]]
                    pattern = "chat.*"
                    size = 100
                    ttl_secs = 300

                    [[history.topics]]
                    pattern = "news"
                    size = 10
                    ttl_secs = 60
                "#,
            )?;
            jail.set_env("SHARDCAST_MAILBOX_TTL_SECS", "3600");
            jail.set_env("SHARDCAST_MAILBOX", "false");
            let flags = ServeFlags {
                config: Some("node.toml".into()),
                ..ServeFlags::default()
            };
            let config = Config::load(&flags).map_err(|e| e.to_string())?;
            assert_eq!(config.history.topics.len(), 2);
            assert_eq!(config.history.topics[1].pattern, "news");
            assert_eq!(
                (config.mailbox, config.mailbox_size, config.mailbox_ttl_secs),
                (false, 50, 3600)
            );
            assert_eq!(config.history_max_bytes, 1 << 20);
            jail.create_file(
                "typo.toml",
                "secret = \"s\"\n[[history.topics]]\npattern = \"a\"\nsize = 1\nttl = 5",
            )?;
            let typo = ServeFlags {
                config: Some("typo.toml".into()),
                ..ServeFlags::default()
            };
            assert!(
                Config::load(&typo).is_err(),
                "unknown rule keys are refused"
            );
            Ok(())
        });
    }

    #[test]
    fn a_redis_cluster_url_names_its_seeds() {
        let mut config = Config {
            dev: true,
            redis: Some("redis+cluster://127.0.0.1:7000, 127.0.0.1:7001/".into()),
            ..Config::default()
        };
        assert_eq!(
            config.redis_cluster_seeds(),
            Some(Ok(vec![
                "redis://127.0.0.1:7000".to_owned(),
                "redis://127.0.0.1:7001".to_owned()
            ]))
        );
        assert!(config.validate().is_ok());
        config.route_cache_max = 0;
        match config.validate() {
            Err(ConfigError::Invalid(problems)) => {
                assert!(problems.iter().any(|p| p.contains("route_cache_max")));
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        config.redis = Some("redis+cluster://".into());
        assert!(matches!(config.redis_cluster_seeds(), Some(Err(_))));
        config.redis = Some("redis://127.0.0.1:6379".into());
        assert_eq!(config.redis_cluster_seeds(), None);
    }

    #[test]
    fn webhook_settings_are_checked() {
        let dev = Config {
            dev: true,
            ..Config::default()
        };
        assert!(dev.webhook_url.is_none(), "no webhook by default");
        let bad = Config {
            webhook_url: Some("ftp://hooks.example/in".into()),
            webhook_secret: Some("short".into()),
            webhook_batch_max: 0,
            webhook_timeout_ms: 0,
            ..dev.clone()
        };
        match bad.validate() {
            Err(ConfigError::Invalid(problems)) => {
                assert_eq!(problems.len(), 4, "{problems:?}");
                assert!(problems.iter().any(|p| p.contains("http:// or https://")));
                assert!(problems.iter().any(|p| p.contains("`webhook_secret`")));
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        let secret = Some("0123456789abcdef".to_owned());
        let missing_ca = Config {
            webhook_url: Some("https://hooks.example/in".into()),
            webhook_secret: secret.clone(),
            webhook_ca_file: Some("/nonexistent/ca.pem".into()),
            ..dev.clone()
        };
        match missing_ca.validate() {
            Err(ConfigError::Invalid(problems)) => {
                assert!(problems.iter().any(|p| p.contains("/nonexistent/ca.pem")));
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        let plain_with_ca = Config {
            webhook_url: Some("http://hooks.example/in".into()),
            ..missing_ca.clone()
        };
        assert!(plain_with_ca.validate().is_err(), "a CA file needs https");
        let tls = Config {
            webhook_ca_file: None,
            ..missing_ca
        };
        assert!(tls.validate().is_ok(), "https with the built-in roots");
        let unsigned = Config {
            webhook_url: Some("http://127.0.0.1:9000/in".into()),
            ..dev.clone()
        };
        assert!(unsigned.validate().is_err(), "a webhook needs a secret");
        let good = Config {
            webhook_secret: Some("0123456789abcdef".into()),
            ..unsigned
        };
        assert!(good.validate().is_ok());
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn webhook_and_events_come_from_file_and_environment() {
        use crate::upstream::EventKind;
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "node.toml",
                "dev = true\nupstream_events = [\"sub\", \"unsub\"]\nwebhook_batch_max = 7",
            )?;
            jail.set_env("SHARDCAST_WEBHOOK_URL", "http://127.0.0.1:9000/hook");
            jail.set_env("SHARDCAST_WEBHOOK_SECRET", "1234567890123456");
            let flags = ServeFlags {
                config: Some("node.toml".into()),
                ..ServeFlags::default()
            };
            let config = Config::load(&flags).map_err(|e| e.to_string())?;
            assert!(config.upstream_events.forwards(EventKind::Sub));
            assert!(!config.upstream_events.forwards(EventKind::Connect));
            assert_eq!(config.webhook_batch_max, 7);
            assert_eq!(
                config.webhook_secret.as_deref(),
                Some("1234567890123456"),
                "numeric text stays text"
            );
            let webhook = crate::upstream::webhook::WebhookConfig::from_config(&config)?
                .ok_or("a webhook is configured")?;
            assert_eq!(webhook.url.to_string(), "http://127.0.0.1:9000/hook");
            assert_eq!(webhook.batch_max, 7);

            jail.set_env("SHARDCAST_UPSTREAM_EVENTS", "online,offline");
            let config = Config::load(&flags).map_err(|e| e.to_string())?;
            let kinds: Vec<_> = config.upstream_events.kinds().collect();
            assert_eq!(
                kinds,
                [EventKind::Online, EventKind::Offline],
                "env beats file"
            );

            jail.set_env("SHARDCAST_UPSTREAM_EVENTS", "online,ofline");
            let error = Config::load(&flags).unwrap_err().to_string();
            assert!(error.contains("ofline"), "{error}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("node.toml", "secret = \"s\"\nmax_conections = 3")?;
            let flags = ServeFlags {
                config: Some("node.toml".into()),
                ..ServeFlags::default()
            };
            assert!(Config::load(&flags).is_err());
            Ok(())
        });
    }
}
