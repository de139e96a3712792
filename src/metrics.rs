//! Counters and gauges, one set per shard.
//!
//! Each shard writes only its own [`ShardMetrics`] (its cache lines stay local to its core);
//! readers (tests, and the Prometheus endpoint of the API) sum across shards when asked.
//! Labelled families are fixed arrays indexed by an enum, so incrementing never allocates
//! or hashes. Relaxed atomics: a scrape may see counters a few increments apart, never torn.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds `n` (may be negative).
    #[inline]
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the value (a level one owner measures, such as bytes held).
    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }
}

macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vdoc])* $variant,)+ }

        impl $name {
            /// Every value, in index order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// Every value's label, in index order.
            pub const LABELS: &'static [&'static str] = &[$($label,)+];

            /// The Prometheus label value.
            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label,)+ }
            }
        }
    };
}

label_enum! {
    /// Why a handshake was refused.
    HandshakeRefusal {
        /// Not a valid upgrade request.
        BadRequest => "bad_request",
        /// Path other than /ws (or /echo in dev mode).
        NotFound => "not_found",
        /// Request too large.
        TooLarge => "too_large",
        /// Did not finish in time.
        Timeout => "timeout",
        /// Missing or invalid credentials.
        Unauthorized => "unauthorized",
        /// Node at max_connections or draining.
        Unavailable => "unavailable",
        /// `Sec-WebSocket-Version` other than 13 (answered 426).
        BadVersion => "bad_version",
    }
}

label_enum! {
    /// What kind of message a delivery carried.
    Delivery {
        /// Direct message to a user.
        Direct => "direct",
        /// Topic publication.
        Topic => "topic",
        /// Broadcast.
        Broadcast => "broadcast",
    }
}

label_enum! {
    /// Why the server closed a connection (peer-initiated closes are `peer`).
    Close {
        /// The peer closed or vanished.
        Peer => "peer",
        /// Framing error (1002).
        Protocol => "protocol_error",
        /// Frame or message too big (1009).
        TooBig => "too_big",
        /// Invalid UTF-8 (1007).
        BadUtf8 => "bad_utf8",
        /// Outbound queue over its limit (1008).
        SlowConsumer => "slow_consumer",
        /// No complete frame for three heartbeat intervals (1008).
        HeartbeatTimeout => "heartbeat_timeout",
        /// An incomplete frame or message held past `incomplete_message_timeout_ms` (1008).
        IncompleteTimeout => "incomplete_timeout",
        /// Incomplete data that took the shard past `shard_incomplete_bytes` (1008).
        IncompleteBudget => "incomplete_budget",
        /// Replaced by a newer device of the same user (4001).
        Replaced => "replaced",
        /// The token's `exp` passed without a `refresh` (4402).
        TokenExpired => "token_expired",
        /// Kicked through the API (4003).
        Kicked => "kicked",
        /// Node shutting down (1001).
        Shutdown => "shutdown",
        /// Socket error.
        IoError => "io_error",
    }
}

label_enum! {
    /// Why an inbound request was refused (connection kept) or a message was dropped.
    Rejection {
        /// Not JSON, not an object, missing field.
        Malformed => "malformed",
        /// Unknown op.
        UnknownOp => "unknown_op",
        /// Binary message on /ws.
        Binary => "binary",
        /// Topic or user name invalid.
        BadName => "bad_name",
        /// Token does not allow publishing to the topic.
        Forbidden => "forbidden",
        /// Over max_topics_per_connection.
        TooManyTopics => "too_many_topics",
        /// Over the inbound rate limit.
        RateLimited => "rate_limited",
        /// Unsubscribing from a topic not subscribed.
        NotSubscribed => "not_subscribed",
        /// A `refresh` with an invalid or expired token.
        BadToken => "bad_token",
        /// A `resume` on a node that keeps no mailboxes.
        NoStream => "no_stream",
        /// An `up` the node could not hand to a sink (none configured, or full).
        UpUnavailable => "up_unavailable",
    }
}

label_enum! {
    /// Why a message inside the node was dropped.
    Drop {
        /// The target shard's inbox was full.
        InboxFull => "inbox_full",
        /// The target shard has stopped.
        ShardGone => "shard_gone",
        /// A direct message for a user with no device online (single node; a cluster
        /// counts these in [`BusDrop::NoRoute`], where every node's devices are known).
        NoRoute => "no_route",
    }
}

label_enum! {
    /// Why a message for other nodes was dropped.
    BusDrop {
        /// The bridge's message lane was full (Redis slow or down for long).
        BusFull => "bus_full",
        /// Held longer than `bridge_hold_ms` (Redis down or stalled, retries included), or
        /// still waiting for Redis when the node stopped.
        Stale => "stale",
        /// Redis refused the command that carried it.
        RedisError => "redis_error",
        /// A direct message for a user with no device online anywhere in the cluster.
        NoRoute => "no_route",
        /// Published to a node whose subscription was gone (it died or was reconnecting),
        /// and still not delivered when retries ran out after `bridge_hold_ms`.
        Unheard => "unheard",
    }
}

label_enum! {
    /// Which part of an API request took too long.
    ApiTimeout {
        /// Request line and headers not in within `api_header_timeout_ms` (or an idle
        /// keep-alive connection): closed without an answer.
        Header => "header",
        /// Body not in within `api_body_timeout_ms`: answered 408.
        Body => "body",
    }
}

/// The HTTP API's counters (one per node: the API has one thread).
#[derive(Debug, Default)]
pub struct ApiMetrics {
    /// API connections open now.
    pub connections: Gauge,
    /// API connections refused with 503 at `max_api_connections`.
    pub connections_refused: Counter,
    /// Accept calls on the API listener that failed (e.g. EMFILE); the loop backs off.
    pub accept_errors: Counter,
    /// Requests that timed out, by [`ApiTimeout`].
    pub timeouts: [Counter; ApiTimeout::ALL.len()],
}

impl ApiMetrics {
    /// Counts a timeout.
    pub fn timed_out(&self, phase: ApiTimeout) {
        self.timeouts[phase as usize].inc();
    }
}

label_enum! {
    /// Why an upstream record (a client's `up`, a connection event) was not delivered.
    UpstreamDrop {
        /// The sink's queue was at its bound: refused at once (the `up` was answered
        /// `err unavailable`).
        QueueFull => "queue_full",
        /// The backend was known to be unreachable (Redis down): refused at once, as
        /// `queue_full`.
        Unavailable => "unavailable",
        /// The backend refused it: the webhook answered a status other than 2xx, 429 and
        /// 5xx (sending the same batch again would get the same answer), or Redis answered
        /// the append with an error.
        Rejected => "rejected",
        /// Not delivered within the retry time of being accepted: the backend kept failing
        /// (connect errors, timeouts, 429, 5xx), or the record queued behind batches that did.
        RetriesExhausted => "retries_exhausted",
        /// Queued or in flight when the sink stopped, or offered after it stopped.
        Shutdown => "shutdown",
    }
}

/// One upstream sink's counters and levels (one per sink per node; the webhook's thread
/// writes them, and the callers count what they were refused).
///
/// Every record accepted is settled once: `appended = delivered + dropped (all reasons but
/// queue_full and unavailable) + queue_depth`.
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    /// Records accepted into the queue.
    pub appended: Counter,
    /// Records the backend accepted (2xx); an `up` is acked when its record is counted here.
    pub delivered: Counter,
    /// Records not delivered, by [`UpstreamDrop`].
    pub drops: [Counter; UpstreamDrop::ALL.len()],
    /// Requests to the backend, retries included.
    pub requests: Counter,
    /// Requests sent again after a failure (connect error, timeout, 429, 5xx).
    pub retries: Counter,
    /// Records accepted and not yet settled (queued, or in a batch in flight or waiting
    /// for a retry).
    pub queue_depth: Gauge,
    /// Bytes of those records (the `webhook_queue_max_bytes` budget).
    pub queue_bytes: Gauge,
    /// Batches being sent or waiting for a retry.
    pub in_flight: Gauge,
    /// From sending a request to having its whole answer, for requests that got one.
    pub latency: LatencyHistogram,
}

impl UpstreamMetrics {
    /// Counts `n` records not delivered.
    pub fn dropped(&self, reason: UpstreamDrop, n: u64) {
        self.drops[reason as usize].add(n);
    }

    /// Records not delivered for `reason`.
    pub fn drops(&self, reason: UpstreamDrop) -> u64 {
        self.drops[reason as usize].get()
    }

    /// Records accepted and then given up (all drops but `queue_full` and `unavailable`).
    pub fn failed(&self) -> u64 {
        UpstreamDrop::ALL
            .iter()
            .filter(|reason| !matches!(reason, UpstreamDrop::QueueFull | UpstreamDrop::Unavailable))
            .map(|reason| self.drops(*reason))
            .sum()
    }
}

/// One upstream sink at a scrape: its name (the `sink` label) and its metrics.
#[derive(Clone, Copy)]
pub struct UpstreamReading<'a> {
    /// The `sink` label: `webhook`, `redis`.
    pub sink: &'static str,
    /// The sink's metrics.
    pub metrics: &'a UpstreamMetrics,
}

/// The cluster bridge's counters (one per node).
#[derive(Debug, Default)]
pub struct BusMetrics {
    /// Redis commands sent (pipelined commands counted one by one).
    pub commands: Counter,
    /// Envelope bytes handed to Redis (publish payloads, script arguments).
    pub bytes_out: Counter,
    /// Envelope bytes received from Redis pub/sub.
    pub bytes_in: Counter,
    /// Envelopes sent to other nodes (one per message, however many nodes get it).
    pub envelopes_out: Counter,
    /// Envelopes received from other nodes.
    pub envelopes_in: Counter,
    /// Envelopes received that could not be read (other version, malformed).
    pub envelopes_invalid: Counter,
    /// Envelopes received a second time (a retried message) and dropped.
    pub duplicates: Counter,
    /// Messages routed again (after a lost session, an unheard publish or while settling).
    pub retries: Counter,
    /// Messages for other nodes dropped, by [`BusDrop`].
    pub drops: [Counter; BusDrop::ALL.len()],
    /// Redis errors: failed connections, commands refused, lost subscriptions.
    pub errors: Counter,
    /// Sessions with Redis started (the first connection included).
    pub sessions: Counter,
    /// Round trip of one pipelined batch of commands.
    pub roundtrip: LatencyHistogram,
    /// Direct messages and kicks routed by the route cache, without a script.
    pub route_cache_hits: Counter,
    /// Direct messages and kicks the route cache could not route (a user not cached).
    pub route_cache_misses: Counter,
    /// Route cache entries dropped because Redis said their user's devices changed.
    pub route_cache_invalidations: Counter,
}

impl BusMetrics {
    /// Counts a dropped message.
    pub fn dropped(&self, reason: BusDrop) {
        self.drops[reason as usize].inc();
    }

    /// Messages dropped for any reason.
    pub fn drops_total(&self) -> u64 {
        self.drops.iter().map(Counter::get).sum()
    }
}

/// Lets a warning that can repeat many times a second (a failing accept, a Redis outage
/// under load, a flood of messages for offline users) through at most once per interval,
/// and says how many it held back, so a node under a flood logs a line every few seconds
/// rather than flooding its own disk; the metric beside each warning counts every
/// occurrence. Safe to share between threads (the bus's drop warnings come from every
/// shard and the bridge).
#[derive(Debug)]
pub struct LogLimiter {
    interval_ns: u64,
    /// When the limiter was made: the origin of `next_ns`.
    base: std::time::Instant,
    /// Nanoseconds after `base` before which nothing is logged.
    next_ns: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimiter {
    /// At most one line a second.
    fn default() -> Self {
        LogLimiter::new(std::time::Duration::from_secs(1))
    }
}

impl LogLimiter {
    /// At most one line per `interval`.
    pub fn new(interval: std::time::Duration) -> Self {
        LogLimiter {
            interval_ns: interval.as_nanos() as u64,
            base: std::time::Instant::now(),
            next_ns: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last line)` if this occurrence may be logged at `now`.
    pub fn allow(&self, now: std::time::Instant) -> Option<u64> {
        let now_ns = now.saturating_duration_since(self.base).as_nanos() as u64;
        let next = self.next_ns.load(Ordering::Relaxed);
        let won = now_ns >= next
            && self
                .next_ns
                .compare_exchange(
                    next,
                    now_ns + self.interval_ns,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if won {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Nanoseconds on a process-wide monotonic clock (comparable across threads).
pub fn monotonic_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// Upper bounds, in seconds, of the latency histogram's buckets (10 µs to 1 s).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A fixed-bucket latency histogram written by one shard without locks.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per-bucket counts ([`LATENCY_BUCKETS`], then +Inf).
    buckets: [Counter; 17],
    sum_ns: Counter,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn record(&self, ns: u64) {
        let seconds = ns as f64 / 1e9;
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].inc();
        self.sum_ns.add(ns);
    }
}

/// Several shards' histograms summed, in the shape the exporter wants.
#[derive(Debug)]
struct MergedHistogram {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl MergedHistogram {
    fn of<'a>(histograms: impl Iterator<Item = &'a LatencyHistogram>) -> Self {
        let mut counts = [0u64; 17];
        let mut sum_ns = 0;
        for histogram in histograms {
            for (total, bucket) in counts.iter_mut().zip(&histogram.buckets) {
                *total += bucket.get();
            }
            sum_ns += histogram.sum_ns.get();
        }
        let bounds = LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]);
        MergedHistogram {
            buckets: bounds.zip(counts).collect(),
            sum: sum_ns as f64 / 1e9,
            count: counts.iter().sum(),
        }
    }
}

impl prometheus_client::encoding::EncodeMetric for MergedHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            self.count,
            &self.buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// One histogram per value of a label (the upstream sinks' request latency).
#[derive(Debug)]
struct LabelledHistograms {
    label: &'static str,
    histograms: Vec<(&'static str, MergedHistogram)>,
}

impl prometheus_client::encoding::EncodeMetric for LabelledHistograms {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        for (value, histogram) in &self.histograms {
            let labels = [(self.label, *value)];
            histogram.encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// One shard's metrics.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Open WebSocket connections (after the upgrade).
    pub connections: Gauge,
    /// Distinct users with a connection on this shard.
    pub users: Gauge,
    /// Distinct topics with a subscriber on this shard.
    pub topics: Gauge,
    /// Bytes held for incomplete inbound frames and messages (the
    /// `shard_incomplete_bytes` budget).
    pub incomplete_bytes: Gauge,
    /// Handshakes that upgraded.
    pub handshakes_accepted: Counter,
    /// Handshakes refused, by [`HandshakeRefusal`].
    pub handshakes_refused: [Counter; HandshakeRefusal::ALL.len()],
    /// Accept calls that failed (e.g. EMFILE); the accept loop backs off.
    pub accept_errors: Counter,
    /// WebSocket frames received.
    pub frames_in: Counter,
    /// WebSocket frames written or queued to clients (replies, deliveries, pings, closes).
    pub frames_out: Counter,
    /// Messages handed to client sockets, by [`Delivery`].
    pub delivered: [Counter; Delivery::ALL.len()],
    /// Connections closed, by [`Close`].
    pub closes: [Counter; Close::ALL.len()],
    /// Requests refused with an `err` frame, by [`Rejection`].
    pub rejections: [Counter; Rejection::ALL.len()],
    /// Cross-shard messages dropped, by [`Drop`].
    pub drops: [Counter; Drop::ALL.len()],
    /// Envelopes this shard received from other shards.
    pub envelopes_in: Counter,
    /// Bytes of stream history this shard holds in memory (a lone node's mailboxes and
    /// topic histories).
    pub history_bytes: Gauge,
    /// Messages appended to streams (mailboxes and topic histories) on this shard.
    pub stream_appends: Counter,
    /// Direct messages kept for a user with no device online (they wait in the mailbox).
    pub mailbox_offline: Counter,
    /// Resumes (`resume`, `sub` with `since`) and history reads answered.
    pub replays: Counter,
    /// Messages those replays returned.
    pub replayed: Counter,
    /// Replays answered `recovered:false`.
    pub replays_unrecovered: Counter,
    /// From a message entering the node (client request or API call) to its last socket
    /// write on this shard.
    pub delivery_latency: LatencyHistogram,
}

impl ShardMetrics {
    /// Counts a refused handshake.
    pub fn refused(&self, reason: HandshakeRefusal) {
        self.handshakes_refused[reason as usize].inc();
    }

    /// Counts a server-side close.
    pub fn closed(&self, reason: Close) {
        self.closes[reason as usize].inc();
    }

    /// Counts a refused request.
    pub fn rejected(&self, reason: Rejection) {
        self.rejections[reason as usize].inc();
    }

    /// Counts a dropped cross-shard message.
    pub fn dropped(&self, reason: Drop) {
        self.drops[reason as usize].inc();
    }

    /// Counts `n` deliveries of `kind`.
    pub fn delivered(&self, kind: Delivery, n: u64) {
        self.delivered[kind as usize].add(n);
    }
}

/// Every shard's metrics of one node, and the API's.
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    shards: Arc<[Arc<ShardMetrics>]>,
    api: Arc<ApiMetrics>,
}

impl NodeMetrics {
    /// Metrics for `shards` shards, all zero.
    pub fn new(shards: usize) -> Self {
        NodeMetrics {
            shards: (0..shards)
                .map(|_| Arc::new(ShardMetrics::default()))
                .collect(),
            api: Arc::default(),
        }
    }

    /// The HTTP API's metrics.
    pub fn api(&self) -> &ApiMetrics {
        &self.api
    }

    /// One shard's metrics.
    pub fn shard(&self, shard: usize) -> &Arc<ShardMetrics> {
        &self.shards[shard]
    }

    /// All shards.
    pub fn shards(&self) -> &[Arc<ShardMetrics>] {
        &self.shards
    }

    /// Sums a counter over all shards.
    pub fn sum(&self, pick: impl Fn(&ShardMetrics) -> u64) -> u64 {
        self.shards.iter().map(|s| pick(s)).sum()
    }

    /// Open connections on the node.
    pub fn connections(&self) -> i64 {
        self.shards.iter().map(|s| s.connections.get()).sum()
    }

    /// Handshakes refused for `reason`, all shards.
    pub fn refused(&self, reason: HandshakeRefusal) -> u64 {
        self.sum(|s| s.handshakes_refused[reason as usize].get())
    }

    /// Server closes for `reason`, all shards.
    pub fn closes(&self, reason: Close) -> u64 {
        self.sum(|s| s.closes[reason as usize].get())
    }

    /// Requests refused for `reason`, all shards.
    pub fn rejections(&self, reason: Rejection) -> u64 {
        self.sum(|s| s.rejections[reason as usize].get())
    }

    /// Deliveries of `kind`, all shards.
    pub fn delivered(&self, kind: Delivery) -> u64 {
        self.sum(|s| s.delivered[kind as usize].get())
    }
}

/// A gauge per shard: name, help, value.
type ShardGauge = (&'static str, &'static str, fn(&ShardMetrics) -> i64);

/// A counter summed over the shards, or one of the API's or the bus's: name, help, value.
type Total<M> = (&'static str, &'static str, fn(&M) -> u64);

/// A counter family with one label, summed over the shards, or one of the API's or the
/// bus's: name, help, label name, label values, value of the label value at an index.
type Labelled<M> = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    fn(&M, usize) -> u64,
);

const SHARD_GAUGES: &[ShardGauge] = &[
    ("connections", "Open WebSocket connections", |s| {
        s.connections.get()
    }),
    (
        "users",
        "Distinct users with a connection, counted per shard",
        |s| s.users.get(),
    ),
    (
        "topics",
        "Distinct topics with a subscriber, counted per shard",
        |s| s.topics.get(),
    ),
    (
        "incomplete_bytes",
        "Bytes held for incomplete inbound frames and messages",
        |s| s.incomplete_bytes.get(),
    ),
    (
        "history_bytes",
        "Bytes of stream history held in memory (lone node)",
        |s| s.history_bytes.get(),
    ),
];

const SHARD_TOTALS: &[Total<ShardMetrics>] = &[
    ("handshakes_accepted", "WebSocket upgrades accepted", |s| {
        s.handshakes_accepted.get()
    }),
    ("accept_errors", "Failed accept calls (e.g. EMFILE)", |s| {
        s.accept_errors.get()
    }),
    ("frames_in", "WebSocket frames received", |s| {
        s.frames_in.get()
    }),
    ("frames_out", "WebSocket frames written or queued", |s| {
        s.frames_out.get()
    }),
    ("envelopes", "Envelopes handed between shards", |s| {
        s.envelopes_in.get()
    }),
    (
        "stream_appends",
        "Messages appended to mailboxes and topic histories",
        |s| s.stream_appends.get(),
    ),
    (
        "mailbox_offline",
        "Direct messages kept for users with no device online",
        |s| s.mailbox_offline.get(),
    ),
    ("replays", "Resumes and history reads answered", |s| {
        s.replays.get()
    }),
    (
        "replayed_messages",
        "Messages returned by resumes and history reads",
        |s| s.replayed.get(),
    ),
    (
        "replays_unrecovered",
        "Resumes and history reads answered recovered:false",
        |s| s.replays_unrecovered.get(),
    ),
];

const SHARD_FAMILIES: &[Labelled<ShardMetrics>] = &[
    (
        "handshakes_refused",
        "Upgrades refused, by reason",
        "reason",
        HandshakeRefusal::LABELS,
        |s, i| s.handshakes_refused[i].get(),
    ),
    (
        "messages_delivered",
        "Messages written to client sockets, by kind",
        "kind",
        Delivery::LABELS,
        |s, i| s.delivered[i].get(),
    ),
    (
        "closes",
        "Connections closed, by reason (slow_consumer included)",
        "reason",
        Close::LABELS,
        |s, i| s.closes[i].get(),
    ),
    (
        "rejections",
        "Requests answered with err, by reason",
        "reason",
        Rejection::LABELS,
        |s, i| s.rejections[i].get(),
    ),
    (
        "drops",
        "Messages dropped inside the node, by reason",
        "reason",
        Drop::LABELS,
        |s, i| s.drops[i].get(),
    ),
];

const API_TOTALS: &[Total<ApiMetrics>] = &[
    (
        "api_connections_refused",
        "HTTP API connections refused with 503 at max_api_connections",
        |a| a.connections_refused.get(),
    ),
    (
        "api_accept_errors",
        "Failed accept calls on the HTTP API listener (e.g. EMFILE)",
        |a| a.accept_errors.get(),
    ),
];

const API_FAMILIES: &[Labelled<ApiMetrics>] = &[(
    "api_timeouts",
    "HTTP API requests that took too long, by phase",
    "phase",
    ApiTimeout::LABELS,
    |a, i| a.timeouts[i].get(),
)];

const BUS_TOTALS: &[Total<BusMetrics>] = &[
    ("redis_commands", "Redis commands sent", |b| {
        b.commands.get()
    }),
    (
        "redis_errors",
        "Redis failures: connections, refused commands, lost subscriptions, stalls",
        |b| b.errors.get(),
    ),
    (
        "redis_sessions",
        "Sessions with Redis started (reconnects plus one)",
        |b| b.sessions.get(),
    ),
    ("bus_bytes_out", "Envelope bytes sent to Redis", |b| {
        b.bytes_out.get()
    }),
    ("bus_bytes_in", "Envelope bytes received from Redis", |b| {
        b.bytes_in.get()
    }),
    ("bus_envelopes_out", "Messages sent to other nodes", |b| {
        b.envelopes_out.get()
    }),
    (
        "bus_envelopes_in",
        "Envelopes received from other nodes",
        |b| b.envelopes_in.get(),
    ),
    (
        "bus_envelopes_invalid",
        "Envelopes received that could not be read (version, format)",
        |b| b.envelopes_invalid.get(),
    ),
    (
        "bus_duplicates",
        "Envelopes received again (a retried message) and dropped",
        |b| b.duplicates.get(),
    ),
    (
        "bus_retries",
        "Messages for other nodes routed again (lost session, reconnecting node, epoch lost)",
        |b| b.retries.get(),
    ),
    (
        "route_cache_hits",
        "Direct messages and kicks routed by the route cache, without a script",
        |b| b.route_cache_hits.get(),
    ),
    (
        "route_cache_misses",
        "Direct messages and kicks routed by the script because a user was not cached",
        |b| b.route_cache_misses.get(),
    ),
    (
        "route_cache_invalidations",
        "Route cache entries dropped because Redis said their user's devices changed",
        |b| b.route_cache_invalidations.get(),
    ),
];

const BUS_FAMILIES: &[Labelled<BusMetrics>] = &[(
    "bus_drops",
    "Messages for other nodes dropped, by reason",
    "reason",
    BusDrop::LABELS,
    |b, i| b.drops[i].get(),
)];

/// A gauge of one upstream sink: name, help, value.
type Level<M> = (&'static str, &'static str, fn(&M) -> i64);

const UPSTREAM_TOTALS: &[Total<UpstreamMetrics>] = &[
    (
        "upstream_appended",
        "Upstream records (client up messages, connection events) accepted by a sink's queue",
        |u| u.appended.get(),
    ),
    (
        "upstream_delivered",
        "Upstream records the backend accepted (up messages are acked then)",
        |u| u.delivered.get(),
    ),
    (
        "upstream_requests",
        "Requests a sink made to its backend, retries included",
        |u| u.requests.get(),
    ),
    (
        "upstream_retries",
        "Requests a sink sent again after a connect error, timeout, 429 or 5xx",
        |u| u.retries.get(),
    ),
];

const UPSTREAM_FAMILIES: &[Labelled<UpstreamMetrics>] = &[(
    "upstream_dropped",
    "Upstream records not delivered, by reason (all but queue_full and unavailable were accepted first)",
    "reason",
    UpstreamDrop::LABELS,
    |u, i| u.drops[i].get(),
)];

const UPSTREAM_LEVELS: &[Level<UpstreamMetrics>] = &[
    (
        "upstream_queue_depth",
        "Upstream records accepted and not yet delivered or dropped",
        |u| u.queue_depth.get(),
    ),
    (
        "upstream_queue_bytes",
        "Bytes of upstream records accepted and not yet delivered or dropped",
        |u| u.queue_bytes.get(),
    ),
    (
        "upstream_in_flight",
        "Batches of upstream records being sent or waiting for a retry",
        |u| u.in_flight.get(),
    ),
];

/// The cluster bus at one scrape: its counters and its levels.
#[derive(Clone, Copy)]
pub struct BusReading<'a> {
    /// The bridge's counters.
    pub metrics: &'a BusMetrics,
    /// Whether Redis is up (`redis_up`).
    pub up: bool,
    /// Messages waiting in the bridge's lane.
    pub queue_depth: usize,
    /// Bytes of messages the bridge holds.
    pub queued_bytes: usize,
}

/// Renders every metric of the node in the Prometheus/OpenMetrics text format
/// (`shardcast_` prefix, `_total` counters, units in names). A fresh registry per scrape
/// reads the shards' atomics, so the hot paths never touch the exporter. What is exported
/// is the tables above; this function only walks them. Each upstream sink's metrics carry
/// its name in a `sink` label.
pub fn render_prometheus(
    node: &NodeMetrics,
    bus: Option<BusReading<'_>>,
    upstream: &[UpstreamReading<'_>],
) -> String {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter as PromCounter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge as PromGauge;
    use prometheus_client::registry::{Registry, Unit};

    type Labels = Vec<(&'static str, String)>;
    let mut registry = Registry::with_prefix("shardcast");
    let mut total = |name: &str, help: &str, value: u64| {
        let counter = PromCounter::<u64>::default();
        counter.inc_by(value);
        registry.register(name, help, counter);
    };
    for (name, help, pick) in SHARD_TOTALS {
        total(name, help, node.sum(pick));
    }
    for (name, help, pick) in API_TOTALS {
        total(name, help, pick(node.api()));
    }
    if let Some(bus) = bus {
        for (name, help, pick) in BUS_TOTALS {
            total(name, help, pick(bus.metrics));
        }
    }

    for (name, help, pick) in UPSTREAM_TOTALS.iter().filter(|_| !upstream.is_empty()) {
        let family = Family::<Labels, PromCounter<u64>>::default();
        for sink in upstream {
            family
                .get_or_create(&vec![("sink", sink.sink.to_owned())])
                .inc_by(pick(sink.metrics));
        }
        registry.register(*name, *help, family);
    }
    for (name, help, label, values, pick) in
        UPSTREAM_FAMILIES.iter().filter(|_| !upstream.is_empty())
    {
        let family = Family::<Labels, PromCounter<u64>>::default();
        for sink in upstream {
            for (index, value) in values.iter().enumerate() {
                family
                    .get_or_create(&vec![
                        ("sink", sink.sink.to_owned()),
                        (*label, (*value).to_owned()),
                    ])
                    .inc_by(pick(sink.metrics, index));
            }
        }
        registry.register(*name, *help, family);
    }
    for (name, help, pick) in UPSTREAM_LEVELS.iter().filter(|_| !upstream.is_empty()) {
        let family = Family::<Labels, PromGauge>::default();
        for sink in upstream {
            family
                .get_or_create(&vec![("sink", sink.sink.to_owned())])
                .set(pick(sink.metrics));
        }
        registry.register(*name, *help, family);
    }

    let mut family = |name: &str,
                      help: &str,
                      label: &'static str,
                      values: &[&str],
                      count: &dyn Fn(usize) -> u64| {
        let family = Family::<Labels, PromCounter<u64>>::default();
        for (index, value) in values.iter().enumerate() {
            family
                .get_or_create(&vec![(label, (*value).to_owned())])
                .inc_by(count(index));
        }
        registry.register(name, help, family);
    };
    for (name, help, label, values, pick) in SHARD_FAMILIES {
        family(name, help, label, values, &|i| node.sum(|s| pick(s, i)));
    }
    for (name, help, label, values, pick) in API_FAMILIES {
        family(name, help, label, values, &|i| pick(node.api(), i));
    }
    if let Some(bus) = bus {
        for (name, help, label, values, pick) in BUS_FAMILIES {
            family(name, help, label, values, &|i| pick(bus.metrics, i));
        }
    }

    for (name, help, pick) in SHARD_GAUGES {
        let family = Family::<Labels, PromGauge>::default();
        for (index, shard) in node.shards().iter().enumerate() {
            family
                .get_or_create(&vec![("shard", index.to_string())])
                .set(pick(shard));
        }
        registry.register(*name, *help, family);
    }
    let mut level = |name: &str, help: &str, value: i64| {
        let gauge = PromGauge::<i64>::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    };
    level(
        "api_connections",
        "HTTP API connections open",
        node.api().connections.get(),
    );
    if let Some(bus) = bus {
        level(
            "redis_up",
            "1 while Redis is reachable, answering in time, and this node is registered",
            i64::from(bus.up),
        );
        level(
            "bridge_queue_depth",
            "Messages for other nodes waiting in the bridge's lane",
            bus.queue_depth as i64,
        );
        level(
            "bridge_queue_bytes",
            "Bytes of messages for other nodes the bridge holds (queued, in flight, to retry)",
            bus.queued_bytes as i64,
        );
    }
    level(
        "process_resident_memory_bytes",
        "Resident set size of the process",
        resident_bytes() as i64,
    );

    registry.register_with_unit(
        "delivery_latency",
        "From a message entering the node to its last socket write on a shard",
        Unit::Seconds,
        MergedHistogram::of(node.shards().iter().map(|s| &s.delivery_latency)),
    );
    if let Some(bus) = bus {
        registry.register_with_unit(
            "redis_roundtrip",
            "Round trip of one pipelined batch of Redis commands",
            Unit::Seconds,
            MergedHistogram::of(std::iter::once(&bus.metrics.roundtrip)),
        );
    }

    if !upstream.is_empty() {
        registry.register_with_unit(
            "upstream_request_duration",
            "From a sink's request to its backend to the whole answer, for requests answered",
            Unit::Seconds,
            LabelledHistograms {
                label: "sink",
                histograms: upstream
                    .iter()
                    .map(|sink| {
                        let histogram = std::iter::once(&sink.metrics.latency);
                        (sink.sink, MergedHistogram::of(histogram))
                    })
                    .collect(),
            },
        );
    }

    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

/// The process's resident set size, from `/proc/self/statm` (0 where unavailable).
pub fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_arrays_fit_their_enums() {
        let m = ShardMetrics::default();
        assert_eq!(m.handshakes_refused.len(), HandshakeRefusal::ALL.len());
        assert_eq!(m.delivered.len(), Delivery::ALL.len());
        assert_eq!(m.closes.len(), Close::ALL.len());
        assert_eq!(m.rejections.len(), Rejection::ALL.len());
        assert_eq!(m.drops.len(), Drop::ALL.len());
        assert_eq!(ApiMetrics::default().timeouts.len(), ApiTimeout::ALL.len());
    }

    #[test]
    fn renders_prometheus_text() {
        let node = NodeMetrics::new(2);
        node.shard(1).connections.add(5);
        node.shard(0).closed(Close::SlowConsumer);
        node.shard(1).delivered(Delivery::Topic, 7);
        let text = render_prometheus(&node, None, &[]);
        assert!(
            text.contains("shardcast_connections{shard=\"1\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("shardcast_closes_total{reason=\"slow_consumer\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("shardcast_messages_delivered_total{kind=\"topic\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("shardcast_process_resident_memory_bytes "),
            "{text}"
        );
    }

    #[test]
    fn renders_upstream_sinks_with_their_label() {
        let node = NodeMetrics::new(1);
        let webhook = UpstreamMetrics::default();
        webhook.appended.add(3);
        webhook.dropped(UpstreamDrop::QueueFull, 2);
        webhook.queue_depth.add(1);
        webhook.latency.record(2_000_000);
        let reading = UpstreamReading {
            sink: "webhook",
            metrics: &webhook,
        };
        let text = render_prometheus(&node, None, &[reading]);
        for line in [
            "shardcast_upstream_appended_total{sink=\"webhook\"} 3",
            "shardcast_upstream_dropped_total{sink=\"webhook\",reason=\"queue_full\"} 2",
            "shardcast_upstream_dropped_total{sink=\"webhook\",reason=\"shutdown\"} 0",
            "shardcast_upstream_queue_depth{sink=\"webhook\"} 1",
            "shardcast_upstream_request_duration_seconds_count{sink=\"webhook\"} 1",
            "shardcast_upstream_request_duration_seconds_bucket{le=\"0.0025\",sink=\"webhook\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        let without = render_prometheus(&node, None, &[]);
        assert!(!without.contains("upstream"), "{without}");
        assert_eq!(webhook.failed(), 0, "queue_full was never accepted");
    }

    #[test]
    fn log_limiter_lets_one_line_per_interval_through() {
        let limiter = LogLimiter::new(std::time::Duration::from_secs(10));
        let start = std::time::Instant::now();
        assert_eq!(limiter.allow(start), Some(0));
        for ms in 1..=40 {
            assert_eq!(
                limiter.allow(start + std::time::Duration::from_millis(ms * 25)),
                None
            );
        }
        assert_eq!(
            limiter.allow(start + std::time::Duration::from_secs(10)),
            Some(40),
            "the next line says how many were held back"
        );
    }

    #[test]
    fn sums_across_shards() {
        let node = NodeMetrics::new(2);
        node.shard(0).closed(Close::Kicked);
        node.shard(1).closed(Close::Kicked);
        node.shard(1).connections.add(3);
        assert_eq!(node.closes(Close::Kicked), 2);
        assert_eq!(node.connections(), 3);
    }
}
