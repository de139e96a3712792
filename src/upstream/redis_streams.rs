//! The Redis Streams sink: upstream records appended to Redis Streams by the cluster bridge,
//! for backends that read them with consumer groups.
//!
//! # Where records go
//! - A client's `up` to `P:up:NAME`, `NAME` being the stream it named (`up` by default).
//! - Connection events (`connect`, `disconnect`, `online`, `offline`, `sub`, `unsub`, as
//!   `upstream_events` says) to `P:events`.
//!
//! Each entry's fields are the record's fields in the order of [`crate::upstream`]'s table
//! (`type`, `mid`, `node`, `ts`, `user`, ...), each value the field's text: `data` is the
//! client's JSON as it wrote it, ids and numbers are decimal. Every `XADD` carries
//! `MAXLEN ~ upstream_stream_maxlen`, so a stream nobody reads stays bounded (Redis trims
//! whole listpack nodes, so it keeps a little more than that).
//!
//! # How a record travels
//! [`RedisStreamsSender`] hands the record to the bus's message lane like any cross-node
//! message ([`crate::cluster::Outbound::Upstream`]); the bridge adds its `XADD` to the next
//! pipeline, so under load one round trip carries thousands of appends together with the
//! messages. The `up` is acked once Redis answered the entry id. Everything the bridge
//! guarantees for messages holds: a pipeline whose session died is sent again (so an
//! entry may be appended twice; backends drop repeats by `mid`), at most `bridge_hold_ms`
//! after the record was made, then the record is dropped (`retries_exhausted`) and its `up`
//! answered `err unavailable`.
//!
//! A record offered while Redis is down (`redis_up` 0) is refused at once (`unavailable`),
//! and one that finds the lane full (`bridge_queue_capacity`, `bridge_queue_max_bytes`)
//! too (`queue_full`): the client is told to retry rather than left waiting for a Redis
//! that may not come back within the hold time.
//!
//! `online` and `offline` do not travel this way: they are decided in Redis by the route
//! scripts, which append them to `P:events` themselves, in the same atomic call that
//! decides them (see [`crate::cluster::redis_layout`], "Presence events"), so no crash
//! between deciding and appending can lose or double one.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{ticket, Delivery, Refused, Ticket, UpstreamEvent};
use crate::cluster::{Bus, Outbound};
use crate::metrics::{self, UpstreamMetrics};

/// The sink's handle for shards: appends through the node's bus.
#[derive(Clone)]
pub struct RedisStreamsSender {
    bus: Bus,
    metrics: Arc<UpstreamMetrics>,
}

impl std::fmt::Debug for RedisStreamsSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsSender")
            .field("held", &self.metrics.queue_depth.get())
            .finish()
    }
}

impl RedisStreamsSender {
    /// A sink appending through `bus`, counting into `metrics`.
    pub fn new(bus: Bus, metrics: Arc<UpstreamMetrics>) -> Self {
        RedisStreamsSender { bus, metrics }
    }

    /// The sink's metrics.
    pub fn metrics(&self) -> &Arc<UpstreamMetrics> {
        &self.metrics
    }

    /// Queues a record whose append the caller awaits (an `up`), or refuses it at once.
    pub fn try_send(&self, event: UpstreamEvent) -> Result<Ticket, Refused> {
        let (ack, ticket) = ticket();
        self.append(event, Some(ack))?;
        Ok(ticket)
    }

    /// Queues a record nobody waits for (a connection event), or refuses it at once.
    pub fn try_send_unacked(&self, event: UpstreamEvent) -> Result<(), Refused> {
        self.append(event, None)
    }

    fn append(
        &self,
        record: UpstreamEvent,
        ack: Option<oneshot::Sender<Delivery>>,
    ) -> Result<(), Refused> {
        if !self.bus.is_up() {
            self.metrics.dropped(Refused::Unavailable.reason(), 1);
            return Err(Refused::Unavailable);
        }
        let weight = record.weight();
        // Counted as held before the bridge can see it, so it is never settled first.
        self.metrics.queue_depth.add(1);
        self.metrics.queue_bytes.add(weight as i64);
        let append = UpstreamAppend {
            record,
            ack,
            weight,
            entered_ns: metrics::monotonic_ns(),
            metrics: self.metrics.clone(),
        };
        if self.bus.offer(Outbound::Upstream(append)) {
            self.metrics.appended.inc();
            Ok(())
        } else {
            self.metrics.queue_depth.add(-1);
            self.metrics.queue_bytes.add(-(weight as i64));
            self.metrics.dropped(Refused::Full.reason(), 1);
            Err(Refused::Full)
        }
    }
}

/// One record on its way through the bridge: settled exactly once, by [`UpstreamAppend::settle`].
#[derive(Debug)]
pub struct UpstreamAppend {
    /// The record.
    pub record: UpstreamEvent,
    /// Whom to tell (an `up`'s ticket).
    ack: Option<oneshot::Sender<Delivery>>,
    /// What it counts against the bus's byte budget and `upstream_queue_bytes`.
    pub weight: usize,
    /// When the sink took it ([`metrics::monotonic_ns`]): `bridge_hold_ms` counts from here.
    pub entered_ns: u64,
    /// The sink's metrics.
    pub metrics: Arc<UpstreamMetrics>,
}

impl UpstreamAppend {
    /// Counts what became of the record and tells its ticket.
    pub fn settle(self, delivery: Delivery) {
        match delivery {
            Ok(()) => self.metrics.delivered.inc(),
            Err(undelivered) => self.metrics.dropped(undelivered.reason(), 1),
        }
        self.metrics.queue_depth.add(-1);
        self.metrics.queue_bytes.add(-(self.weight as i64));
        if let Some(ack) = self.ack {
            let _ = ack.send(delivery);
        }
    }
}
