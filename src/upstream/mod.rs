//! Upstream: what clients say (`up`) and do (connect, disconnect, online, offline, sub, unsub),
//! handed to backends.
//!
//! This module owns the record, [`UpstreamEvent`], and its external shape, which backends
//! parse and which every sink writes the same way ([`UpstreamEvent::fields`]); which
//! connection events a node forwards ([`EventFilter`], the `upstream_events` setting); the
//! handle callers hold ([`Sink`]) with its outcomes ([`Ticket`], [`Refused`],
//! [`Undelivered`]); and the sinks: [`webhook`] (batched, signed HTTP POSTs, in any mode)
//! and [`redis_streams`] (`XADD` through the cluster bridge). It decides nothing about who
//! may send what: the shards build the records (taking the id from their message-id
//! generator) and hand them to the sink, which never blocks them.
//!
//! Who makes which record: a connection's shard makes `up`, `connect`, `disconnect`, `sub`
//! and `unsub`. `online` and `offline` are decided where a user's devices are counted: on
//! the user's home shard when the node runs alone (its directory of the user's devices
//! goes from none to one, or from one to none), and in Redis when clustered (see
//! [`crate::cluster::redis_layout`], "Presence events"), by the bridge's scripts.
//!
//! # The record
//! One JSON object per record, fields in this order, optional ones left out when absent:
//!
//! | field | JSON type | in | meaning |
//! |---|---|---|---|
//! | `type` | string | all | `up`, `connect`, `disconnect`, `online`, `offline`, `sub`, `unsub` |
//! | `mid` | string (decimal u64) | all | unique across the cluster, time-ordered: the key to drop a record delivered twice |
//! | `node` | string | all | id of the node that made the record |
//! | `ts` | number | all | the node's clock, ms since the Unix epoch |
//! | `user` | string | all | the user |
//! | `dev` | string | all but `online`/`offline` | the device, when the token named one |
//! | `conn` | string (decimal u64) | all but `online`/`offline` | the connection, unique on its node |
//! | `stream` | string | `up` | the stream the client named (default `up`) |
//! | `data` | any JSON | `up` | the client's `data`, byte for byte as it sent it |
//! | `code` | number | `disconnect` | the WebSocket close code |
//! | `reason` | string | `disconnect` | why it closed (`peer`, `slow_consumer`, `replaced`, ...) |
//! | `topic` | string | `sub`, `unsub` | the topic |
//!
//! ```json
//! {"type":"up","mid":"1234567890123","node":"n1","ts":1764590000000,"user":"alice","dev":"phone","conn":"17","stream":"up","data":{"text":"hi"}}
//! {"type":"disconnect","mid":"1234567890124","node":"n1","ts":1764590000100,"user":"alice","conn":"17","code":1000,"reason":"peer"}
//! {"type":"online","mid":"1234567890125","node":"n1","ts":1764590000200,"user":"bob"}
//! ```
//!
//! Delivery is at least once: a sink may hand a record over twice (a retry after an answer
//! was lost), never in a changed form; backends drop repeats by `mid`.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::de::{Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use smallvec::SmallVec;
use tokio::sync::oneshot;

use crate::metrics::{UpstreamDrop, UpstreamMetrics, UpstreamReading};

pub mod redis_streams;
pub mod webhook;

/// A node's upstream sink, as shards and the bridge hand it records: cheap to clone, usable
/// from any thread, never blocking.
#[derive(Debug, Clone)]
pub enum Sink {
    /// Batched, signed HTTP POSTs ([`webhook`]).
    Webhook(webhook::WebhookSender),
    /// Redis Streams, appended by the cluster bridge ([`redis_streams`]).
    Redis(redis_streams::RedisStreamsSender),
}

impl Sink {
    /// Hands over a record whose delivery the caller awaits (an `up`), or refuses it at once.
    pub fn try_send(&self, event: UpstreamEvent) -> Result<Ticket, Refused> {
        match self {
            Sink::Webhook(sender) => sender.try_send(event),
            Sink::Redis(sender) => sender.try_send(event),
        }
    }

    /// Hands over a record nobody waits for (a connection event), or refuses it at once.
    /// Refusals are counted by the sink.
    pub fn try_send_unacked(&self, event: UpstreamEvent) -> Result<(), Refused> {
        match self {
            Sink::Webhook(sender) => sender.try_send_unacked(event),
            Sink::Redis(sender) => sender.try_send_unacked(event),
        }
    }

    /// The sink's name: its `sink` label in the metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Sink::Webhook(_) => "webhook",
            Sink::Redis(_) => "redis",
        }
    }

    /// The sink's metrics.
    pub fn metrics(&self) -> &Arc<UpstreamMetrics> {
        match self {
            Sink::Webhook(sender) => sender.metrics(),
            Sink::Redis(sender) => sender.metrics(),
        }
    }

    /// The sink's metrics for the Prometheus export.
    pub fn reading(&self) -> UpstreamReading<'_> {
        UpstreamReading {
            sink: self.name(),
            metrics: self.metrics(),
        }
    }
}

/// Why a sink refused a record at once: it is not queued, and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The sink's queue is at its bound (records or bytes).
    #[error("the upstream queue is full")]
    Full,
    /// The backend is known to be down (Redis unreachable): the record would only wait.
    #[error("the upstream backend is unreachable")]
    Unavailable,
    /// The sink has stopped.
    #[error("the upstream sink has stopped")]
    Stopped,
}

impl Refused {
    /// Its drop reason in the metrics.
    pub fn reason(self) -> UpstreamDrop {
        match self {
            Refused::Full => UpstreamDrop::QueueFull,
            Refused::Unavailable => UpstreamDrop::Unavailable,
            Refused::Stopped => UpstreamDrop::Shutdown,
        }
    }
}

/// Why an accepted record was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Undelivered {
    /// The webhook answered this status (not 2xx, 429 or 5xx).
    #[error("the webhook answered {0}")]
    Rejected(u16),
    /// Redis answered the append with an error (a key of another type, out of memory).
    #[error("Redis refused the append")]
    RedisRefused,
    /// Not delivered within the sink's retry time of being accepted (`webhook_retry_max_ms`,
    /// `bridge_hold_ms`): the backend kept failing, or the record queued behind ones that did.
    #[error("the backend kept failing until the record's retry time ran out")]
    RetriesExhausted,
    /// The sink stopped before delivering it.
    #[error("the upstream sink stopped")]
    Stopped,
}

impl Undelivered {
    /// Its drop reason in the metrics.
    pub fn reason(self) -> UpstreamDrop {
        match self {
            Undelivered::Rejected(_) | Undelivered::RedisRefused => UpstreamDrop::Rejected,
            Undelivered::RetriesExhausted => UpstreamDrop::RetriesExhausted,
            Undelivered::Stopped => UpstreamDrop::Shutdown,
        }
    }
}

/// What became of an accepted record.
pub type Delivery = Result<(), Undelivered>;

/// Resolves once with what became of one accepted record: `Ok` when the backend took it
/// (answer the `up` with `ack`), else why not. Works on any executor (glommio, tokio, a
/// plain `block_on`), or by asking [`Ticket::try_outcome`].
#[derive(Debug)]
#[must_use = "a ticket tells whether the record was delivered"]
pub struct Ticket(oneshot::Receiver<Delivery>);

/// A ticket and the sender that resolves it (the sink keeps it with the record).
pub(crate) fn ticket() -> (oneshot::Sender<Delivery>, Ticket) {
    let (ack, ticket) = oneshot::channel();
    (ack, Ticket(ticket))
}

impl Ticket {
    /// The outcome if it is known, without waiting; ask until it is `Some`, not after.
    pub fn try_outcome(&mut self) -> Option<Delivery> {
        match self.0.try_recv() {
            Ok(delivery) => Some(delivery),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(Undelivered::Stopped)),
        }
    }
}

impl Future for Ticket {
    type Output = Delivery;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Delivery> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|received| received.unwrap_or(Err(Undelivered::Stopped)))
    }
}

/// One record for the backends: a client's `up` message or a connection event.
#[derive(Debug, Clone)]
pub struct UpstreamEvent {
    /// Unique id, from the making shard's (or the node's shared) message-id generator.
    pub mid: u64,
    /// Id of the node that made it.
    pub node: Arc<str>,
    /// When it happened: the node's clock, ms since the Unix epoch.
    pub ts: u64,
    /// What happened.
    pub what: Happening,
}

/// The device a record is about: one connection of one user.
#[derive(Debug, Clone)]
pub struct Device {
    /// The user (the token's `sub`).
    pub user: Arc<str>,
    /// The device name, when the token carried one (`dev`).
    pub dev: Option<Arc<str>>,
    /// The connection id, unique on its node.
    pub conn: u64,
}

/// What a record says happened.
#[derive(Debug, Clone)]
pub enum Happening {
    /// A client's `up` message.
    Up {
        /// Who sent it.
        device: Device,
        /// The stream it named (`up` when it named none).
        stream: Arc<str>,
        /// Its `data`, kept as the client wrote it.
        data: Box<RawValue>,
    },
    /// A connection completed its upgrade.
    Connect(Device),
    /// A connection closed.
    Disconnect {
        /// The connection that closed.
        device: Device,
        /// The WebSocket close code.
        code: u16,
        /// Why: a close label of [`crate::metrics::Close`] or the peer's reason.
        reason: Cow<'static, str>,
    },
    /// A user's first device came online anywhere in the cluster.
    Online {
        /// The user.
        user: Arc<str>,
    },
    /// A user's last device went offline anywhere in the cluster.
    Offline {
        /// The user.
        user: Arc<str>,
    },
    /// A connection subscribed to a topic.
    Sub {
        /// The subscriber.
        device: Device,
        /// The topic.
        topic: Arc<str>,
    },
    /// A connection unsubscribed from a topic. A connection that closes leaves its topics
    /// without an `unsub` each: its `disconnect` says so.
    Unsub {
        /// The subscriber.
        device: Device,
        /// The topic.
        topic: Arc<str>,
    },
}

/// A record's kind: its `type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A client's `up` message.
    Up,
    /// A connection opened.
    Connect,
    /// A connection closed.
    Disconnect,
    /// A user's first device anywhere.
    Online,
    /// A user's last device gone.
    Offline,
    /// A topic subscription.
    Sub,
    /// A topic unsubscription.
    Unsub,
}

impl EventKind {
    /// The connection events, the kinds [`EventFilter`] chooses among.
    pub const CONNECTION_EVENTS: [EventKind; 6] = [
        EventKind::Connect,
        EventKind::Disconnect,
        EventKind::Online,
        EventKind::Offline,
        EventKind::Sub,
        EventKind::Unsub,
    ];

    /// The `type` field's value.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Up => "up",
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::Online => "online",
            EventKind::Offline => "offline",
            EventKind::Sub => "sub",
            EventKind::Unsub => "unsub",
        }
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// One field's value, as each sink writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    /// Text: a JSON string.
    Text(&'a str),
    /// A 64-bit id: a JSON string of its decimal digits (JavaScript numbers lose ids' low
    /// bits, as in the client protocol).
    Id(u64),
    /// A small number: a JSON number.
    Number(u64),
    /// Any JSON value, written as it is.
    Json(&'a str),
}

/// A record's fields in order; ten fit every kind without allocating.
pub type Fields<'a> = SmallVec<[(&'static str, Field<'a>); 10]>;

impl UpstreamEvent {
    /// The record's kind.
    pub fn kind(&self) -> EventKind {
        match &self.what {
            Happening::Up { .. } => EventKind::Up,
            Happening::Connect(_) => EventKind::Connect,
            Happening::Disconnect { .. } => EventKind::Disconnect,
            Happening::Online { .. } => EventKind::Online,
            Happening::Offline { .. } => EventKind::Offline,
            Happening::Sub { .. } => EventKind::Sub,
            Happening::Unsub { .. } => EventKind::Unsub,
        }
    }

    /// The record's fields, in the order of the table in the module docs: the one place its
    /// shape is defined, for every sink.
    pub fn fields(&self) -> Fields<'_> {
        let mut fields = Fields::new();
        fields.push(("type", Field::Text(self.kind().as_str())));
        fields.push(("mid", Field::Id(self.mid)));
        fields.push(("node", Field::Text(&self.node)));
        fields.push(("ts", Field::Number(self.ts)));
        fn with_device<'a>(fields: &mut Fields<'a>, device: &'a Device) {
            fields.push(("user", Field::Text(&device.user)));
            if let Some(dev) = &device.dev {
                fields.push(("dev", Field::Text(dev)));
            }
            fields.push(("conn", Field::Id(device.conn)));
        }
        match &self.what {
            Happening::Up {
                device,
                stream,
                data,
            } => {
                with_device(&mut fields, device);
                fields.push(("stream", Field::Text(stream)));
                fields.push(("data", Field::Json(data.get())));
            }
            Happening::Connect(device) => with_device(&mut fields, device),
            Happening::Disconnect {
                device,
                code,
                reason,
            } => {
                with_device(&mut fields, device);
                fields.push(("code", Field::Number(u64::from(*code))));
                fields.push(("reason", Field::Text(reason)));
            }
            Happening::Online { user } | Happening::Offline { user } => {
                fields.push(("user", Field::Text(user)));
            }
            Happening::Sub { device, topic } | Happening::Unsub { device, topic } => {
                with_device(&mut fields, device);
                fields.push(("topic", Field::Text(topic)));
            }
        }
        fields
    }

    /// Appends the record as one JSON object.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (index, (name, value)) in self.fields().into_iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            match value {
                Field::Text(text) => {
                    serde_json::to_writer(&mut *out, text).expect("writing to a Vec cannot fail")
                }
                Field::Id(id) => {
                    out.push(b'"');
                    out.extend_from_slice(id.to_string().as_bytes());
                    out.push(b'"');
                }
                Field::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
                Field::Json(json) => out.extend_from_slice(json.as_bytes()),
            }
        }
        out.push(b'}');
    }

    /// The record as one JSON object.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.weight());
        self.write_json(&mut out);
        out
    }

    /// About how many bytes the record takes as JSON (escapes aside): what it counts
    /// against a sink's byte bound.
    pub fn weight(&self) -> usize {
        self.fields()
            .iter()
            .map(|(name, value)| {
                name.len()
                    + 4
                    + match value {
                        Field::Text(text) | Field::Json(text) => text.len() + 2,
                        Field::Id(_) | Field::Number(_) => 22,
                    }
            })
            .sum::<usize>()
            + 2
    }
}

/// Which connection events a node forwards upstream (the `upstream_events` setting). `up`
/// messages are not among them: a client's `up` always goes to the sink, when there is one.
///
/// Written as a list of kinds (`["connect", "disconnect"]`) or, for an environment variable,
/// as comma-separated text (`SHARDCAST_UPSTREAM_EVENTS=connect,disconnect`); `[]` or `""`
/// forwards none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventFilter(u8);

impl Default for EventFilter {
    /// `connect`, `disconnect`, `online`, `offline`: `sub` and `unsub` are off, since a busy
    /// live room makes far more of them than backends usually want.
    fn default() -> Self {
        EventFilter::of(&[
            EventKind::Connect,
            EventKind::Disconnect,
            EventKind::Online,
            EventKind::Offline,
        ])
    }
}

impl EventFilter {
    /// Forwards none.
    pub const NONE: EventFilter = EventFilter(0);

    /// Forwards the connection events in `kinds` (an `up` among them is ignored).
    pub fn of(kinds: &[EventKind]) -> Self {
        EventFilter(
            kinds
                .iter()
                .filter(|kind| **kind != EventKind::Up)
                .fold(0, |bits, kind| bits | kind.bit()),
        )
    }

    /// Whether events of `kind` go upstream.
    pub fn forwards(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// The kinds it forwards, in [`EventKind::CONNECTION_EVENTS`] order.
    pub fn kinds(self) -> impl Iterator<Item = EventKind> {
        EventKind::CONNECTION_EVENTS
            .into_iter()
            .filter(move |kind| self.forwards(*kind))
    }

    fn parse_kind(name: &str) -> Result<EventKind, String> {
        EventKind::CONNECTION_EVENTS
            .into_iter()
            .find(|kind| kind.as_str() == name)
            .ok_or_else(|| {
                let known: Vec<_> = EventKind::CONNECTION_EVENTS
                    .iter()
                    .map(|kind| kind.as_str())
                    .collect();
                if name == "up" {
                    "`up` is not a connection event: client messages always go to the sink"
                        .to_owned()
                } else {
                    format!(
                        "unknown upstream event `{name}` (known: {})",
                        known.join(", ")
                    )
                }
            })
    }
}

impl Serialize for EventFilter {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.kinds().map(EventKind::as_str))
    }
}

impl<'de> Deserialize<'de> for EventFilter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Kinds;
        impl<'de> Visitor<'de> for Kinds {
            type Value = EventFilter;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of connection events, or them comma-separated")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<EventFilter, E> {
                let mut kinds = Vec::new();
                for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    kinds.push(EventFilter::parse_kind(name).map_err(E::custom)?);
                }
                Ok(EventFilter::of(&kinds))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EventFilter, A::Error> {
                let mut kinds = Vec::new();
                while let Some(name) = seq.next_element::<Cow<'de, str>>()? {
                    kinds.push(EventFilter::parse_kind(&name).map_err(A::Error::custom)?);
                }
                Ok(EventFilter::of(&kinds))
            }
        }
        deserializer.deserialize_any(Kinds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(dev: Option<&str>) -> Device {
        Device {
            user: "alice".into(),
            dev: dev.map(Into::into),
            conn: 17,
        }
    }

    fn event(what: Happening) -> UpstreamEvent {
        UpstreamEvent {
            mid: 1234567890123,
            node: "n1".into(),
            ts: 1764590000000,
            what,
        }
    }

    fn json(what: Happening) -> String {
        String::from_utf8(event(what).to_json()).unwrap()
    }

    #[test]
    fn up_keeps_data_byte_for_byte() {
        let data = RawValue::from_string(r#"{ "text" : "h\u00e9", "n": 1.50 }"#.into()).unwrap();
        let text = json(Happening::Up {
            device: device(Some("phone")),
            stream: "up".into(),
            data,
        });
        assert_eq!(
            text,
            r#"{"type":"up","mid":"1234567890123","node":"n1","ts":1764590000000,"user":"alice","dev":"phone","conn":"17","stream":"up","data":{ "text" : "h\u00e9", "n": 1.50 }}"#
        );
        serde_json::from_str::<serde_json::Value>(&text).unwrap();
    }

    #[test]
    fn every_kind_has_its_documented_shape() {
        assert_eq!(
            json(Happening::Disconnect {
                device: device(None),
                code: 1000,
                reason: "peer".into(),
            }),
            r#"{"type":"disconnect","mid":"1234567890123","node":"n1","ts":1764590000000,"user":"alice","conn":"17","code":1000,"reason":"peer"}"#
        );
        assert_eq!(
            json(Happening::Online { user: "bob".into() }),
            r#"{"type":"online","mid":"1234567890123","node":"n1","ts":1764590000000,"user":"bob"}"#
        );
        assert_eq!(
            json(Happening::Unsub {
                device: device(None),
                topic: "room \"1\"".into(),
            }),
            r#"{"type":"unsub","mid":"1234567890123","node":"n1","ts":1764590000000,"user":"alice","conn":"17","topic":"room \"1\""}"#
        );
        for what in [
            Happening::Connect(device(Some("d"))),
            Happening::Offline { user: "u".into() },
            Happening::Sub {
                device: device(None),
                topic: "t".into(),
            },
        ] {
            let record = event(what);
            let value: serde_json::Value = serde_json::from_slice(&record.to_json()).unwrap();
            assert_eq!(value["type"], record.kind().as_str());
            assert_eq!(value["mid"], "1234567890123");
            assert!(record.weight() >= record.to_json().len() - 8);
        }
    }

    #[test]
    fn filter_reads_lists_and_comma_text() {
        let filter: EventFilter = serde_json::from_str(r#"["connect","sub"]"#).unwrap();
        assert!(filter.forwards(EventKind::Connect) && filter.forwards(EventKind::Sub));
        assert!(!filter.forwards(EventKind::Online));
        let text: EventFilter = serde_json::from_str(r#"" connect , sub""#).unwrap();
        assert_eq!(text, filter);
        assert_eq!(
            serde_json::to_string(&filter).unwrap(),
            r#"["connect","sub"]"#
        );
        assert_eq!(
            serde_json::from_str::<EventFilter>(r#""""#).unwrap(),
            EventFilter::NONE
        );
        let default = EventFilter::default();
        assert!(!default.forwards(EventKind::Sub) && !default.forwards(EventKind::Unsub));
        assert_eq!(default.kinds().count(), 4);
        let unknown = serde_json::from_str::<EventFilter>(r#"["connect","conect"]"#);
        assert!(unknown.unwrap_err().to_string().contains("conect"));
        let up = serde_json::from_str::<EventFilter>(r#""up""#);
        assert!(up
            .unwrap_err()
            .to_string()
            .contains("not a connection event"));
    }
}
