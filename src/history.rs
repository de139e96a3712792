//! Streams (protocol v1.1): the ordered, bounded history of a user's mailbox or of a topic
//! with a history rule, kept in memory by a node that runs alone (no Redis).
//!
//! A stream lives on its key's home shard, so one [`Streams`] per shard owns its streams
//! outright: no locks, no I/O, no clock (every call takes `now_ms`). Clustered nodes keep
//! streams in Redis instead ([`crate::cluster::redis_layout`]); both answer a resume with
//! the same [`Replay`], decided by the same rule ([`plan_replay`]), so the core renders and
//! counts replays the same way in both modes.
//!
//! **Streams.** Each stream has an epoch `ep` (8 base62 characters, new whenever the stream
//! is created afresh) and numbers its messages `seq` 1, 2, 3, ... without gaps within the
//! epoch. It keeps its last `size` messages for at most `ttl` ([`Retention`]).
//!
//! **Memory.** All streams of a shard together stay under a byte budget (the node's
//! `history_max_bytes` split over its shards): past it, the oldest messages of the shard
//! are evicted first, whatever stream holds them. Finding them is cheap: every append also
//! goes to the back of one FIFO of `(stream, epoch, seq)` records, so the oldest
//! message is at its front. Records of messages already gone (trimmed by count or age, or
//! their stream forgotten) are skipped when they reach the front, and the FIFO is compacted
//! when it holds more than twice as many records as there are messages, so it stays
//! proportional to what is retained. A message's bytes count its `data`, `from`, `to`, its
//! entry and its record; a `data` shared by the mailboxes of one multi-user publish
//! ([`Arc<str>`]) is counted in each, so the figure is an upper bound.
//!
//! **Forgetting.** A stream is forgotten, epoch and all, once `ttl` has passed since its
//! last append (its newest message has then expired), so a million users who got one
//! message each do not hold memory forever. Streams expire lazily (an append or a read
//! meets an expired stream) and through [`Streams::sweep`], which the shard calls
//! periodically with a bound on how many streams it looks at per call. A client that
//! resumes a forgotten stream gets `recovered:false`: its position points into a stream
//! that no longer exists, even when nothing was published to it since (a reload after a
//! silence longer than `ttl`; Redis streams behave the same).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use indexmap::IndexMap;

use crate::protocol::{render, StreamPos};

/// Which stream: a user's mailbox or a topic's history. The two never share a stream even
/// when a user and a topic have the same name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StreamKey {
    /// The mailbox of a user: direct messages to them, and copies of what they sent.
    Mailbox(Arc<str>),
    /// The history of a topic that matches a `[[history.topics]]` rule.
    Topic(Arc<str>),
}

impl StreamKey {
    /// The user or topic name.
    pub fn name(&self) -> &str {
        match self {
            StreamKey::Mailbox(name) | StreamKey::Topic(name) => name,
        }
    }
}

/// How much a stream keeps: its last `size` messages, none older than `ttl_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Messages kept, at least 1.
    pub size: usize,
    /// Longest time a message is kept, and how long a stream outlives its last append, in
    /// seconds; at least 1.
    pub ttl_secs: u64,
}

impl Retention {
    /// The ttl in milliseconds.
    pub fn ttl_ms(self) -> u64 {
        self.ttl_secs.saturating_mul(1000)
    }
}

/// A message as it is appended to a stream. Replay renders its frame from these fields
/// (see [`frame`]) and the history API its JSON; a rendered frame is not kept because the
/// frame of a mailbox message differs per mailbox (`seq`, `ep`) while `data` is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Message id.
    pub mid: u64,
    /// Server time of the message, ms; also what its age counts from.
    pub ts: u64,
    /// The sending user (`None`: from the server, and for topic publications).
    pub from: Option<Arc<str>>,
    /// For a mailbox message, the user it was sent to when that is not the mailbox's owner
    /// (the sender's copy of a `send`); `None` otherwise.
    pub to: Option<Arc<str>>,
    /// The message's `data`, JSON text.
    pub data: Arc<str>,
}

/// A retained message and its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number within the stream's epoch.
    pub seq: u64,
    /// The message.
    pub message: Message,
}

/// A stream's position: the last sequence number given out and the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Sequence number.
    pub seq: u64,
    /// Epoch.
    pub ep: Arc<str>,
}

impl Position {
    /// The position as frames carry it.
    pub fn as_pos(&self) -> StreamPos<'_> {
        StreamPos {
            seq: self.seq,
            ep: &self.ep,
        }
    }
}

/// The answer to a resume (or a history read) from a client's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Retained messages after the client's position, oldest first, at most `limit`.
    pub messages: Vec<Entry>,
    /// Whether `messages` starts right after the client's position: `false` when the epoch
    /// changed, messages after the position are no longer retained, or the position is
    /// ahead of the stream (see [`plan_replay`]). `limit` does not affect it: a caller that
    /// pages reads again after the last message it got until it reaches `last_seq`.
    pub recovered: bool,
    /// The stream's last sequence number (0 when there is no stream).
    pub last_seq: u64,
    /// The stream's epoch (`None` when there is no stream yet, e.g. a user who never got a
    /// message or whose mailbox was forgotten).
    pub ep: Option<Arc<str>>,
}

/// Where a replay starts and whether it recovers the client's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayPlan {
    /// First sequence number to send (past `last` when there is nothing to send).
    pub start: u64,
    /// Whether nothing after the client's position is missing.
    pub recovered: bool,
}

/// The replay rule, shared by the in-memory store and (in Lua) the Redis range script.
/// The client says it has seen everything up to `since_seq` of epoch `since_ep`; the
/// stream has epoch `ep` (`None`: no stream) and retains `first..=last` (`first = last + 1`
/// when it retains nothing).
///
/// | case | replays | recovered |
/// |---|---|---|
/// | no stream | nothing | `since_seq == 0` |
/// | `since_seq == 0` (a fresh device: everything retained; `since_ep` ignored) | `first..` | `first == 1` |
/// | `since_ep` is another epoch | `first..` | false |
/// | `since_seq > last` (ahead of the stream: a client bug or a forged position) | nothing | false |
/// | `since_seq < first - 1` (messages after it were trimmed) | `first..` | false |
/// | otherwise | `since_seq + 1..` | true |
///
/// A position ahead of the stream is answered `recovered:false` with the current position
/// rather than `err bad_request`: the client can do nothing else useful with a refusal,
/// while `recovered:false` tells it to reload and gives it a position that works.
pub fn plan_replay(
    since_seq: u64,
    since_ep: &str,
    ep: Option<&str>,
    first: u64,
    last: u64,
) -> ReplayPlan {
    let Some(ep) = ep else {
        return ReplayPlan {
            start: 1,
            recovered: since_seq == 0,
        };
    };
    let (start, recovered) = if since_seq == 0 {
        (first, first == 1)
    } else if since_ep != ep {
        (first, false)
    } else if since_seq > last {
        (last + 1, false)
    } else if since_seq + 1 < first {
        (first, false)
    } else {
        (since_seq + 1, true)
    };
    ReplayPlan { start, recovered }
}

/// Renders a retained message as the client frame a replay sends: `msg` for a mailbox (to
/// its owner unless the entry says otherwise), `pub` for a topic, each with `seq` and `ep`.
pub fn frame(key: &StreamKey, ep: &str, entry: &Entry) -> Bytes {
    let m = &entry.message;
    let at = StreamPos { seq: entry.seq, ep };
    match key {
        StreamKey::Mailbox(owner) => render::msg_in_stream(
            m.from.as_deref(),
            m.to.as_deref().unwrap_or(owner),
            m.mid,
            m.ts,
            &m.data,
            at,
        ),
        StreamKey::Topic(topic) => render::publication_in_stream(topic, m.mid, m.ts, &m.data, at),
    }
}

/// Renders a replay as the history API answers it:
/// `{"ep":E,"seq":LAST,"recovered":B,"messages":[{"seq","mid","ts","from"?,"to"?,"data"}]}`
/// (`ep` is `""` when there is no stream; `mid` is a string, as in frames; `to` only on a
/// sender's copy; `data` is passed through as the JSON text it was sent as).
pub fn history_json(replay: &Replay) -> Vec<u8> {
    use std::io::Write;
    let data_len: usize = replay
        .messages
        .iter()
        .map(|e| e.message.data.len() + 96)
        .sum();
    let mut out = Vec::with_capacity(64 + data_len);
    let string = |out: &mut Vec<u8>, s: &str| {
        serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
    };
    out.extend_from_slice(b"{\"ep\":");
    string(&mut out, replay.ep.as_deref().unwrap_or(""));
    write!(
        out,
        ",\"seq\":{},\"recovered\":{},\"messages\":[",
        replay.last_seq, replay.recovered
    )
    .expect("Vec write");
    for (i, entry) in replay.messages.iter().enumerate() {
        let m = &entry.message;
        if i > 0 {
            out.push(b',');
        }
        write!(
            out,
            "{{\"seq\":{},\"mid\":\"{}\",\"ts\":{},",
            entry.seq, m.mid, m.ts
        )
        .expect("Vec write");
        for (key, value) in [("from", &m.from), ("to", &m.to)] {
            if let Some(value) = value {
                write!(out, "\"{key}\":").expect("Vec write");
                string(&mut out, value);
                out.push(b',');
            }
        }
        out.extend_from_slice(b"\"data\":");
        out.extend_from_slice(m.data.as_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// Makes epochs: 8 base62 characters (47.6 bits) from a splitmix64 sequence. The seed
/// comes from the caller (random at shard start), so the store stays deterministic under
/// test and a restarted shard makes epochs no earlier run made.
#[derive(Debug, Clone)]
pub struct EpochSource {
    state: u64,
}

/// Characters of an epoch.
pub const EPOCH_LEN: usize = 8;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

impl EpochSource {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        EpochSource { state: seed }
    }

    /// The next epoch.
    pub fn next_epoch(&mut self) -> Arc<str> {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let mut text = String::with_capacity(EPOCH_LEN);
        for _ in 0..EPOCH_LEN {
            text.push(BASE62[(z % 62) as usize] as char);
            z /= 62;
        }
        text.into()
    }
}

/// Counters and the byte gauge of one shard's streams, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes held (the `history_bytes` gauge): messages as described in the module docs,
    /// plus each stream's own overhead.
    pub bytes: usize,
    /// Streams held.
    pub streams: usize,
    /// Messages held.
    pub messages: usize,
    /// Messages appended.
    pub appends: u64,
    /// Messages dropped because their stream held `size` newer ones.
    pub trimmed: u64,
    /// Messages dropped because they were older than their stream's ttl.
    pub expired: u64,
    /// Messages dropped, oldest first, to stay under the byte budget.
    pub evicted: u64,
    /// Streams forgotten after their ttl.
    pub forgotten: u64,
    /// Replays answered (resumes and history reads).
    pub replays: u64,
    /// Messages those replays returned.
    pub replayed: u64,
    /// Replays answered `recovered:false`.
    pub unrecovered: u64,
}

#[derive(Debug)]
struct Stream {
    ep: Arc<str>,
    /// Retained messages, oldest first; `entries[i].seq == first_seq + i`.
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`, or `last_seq + 1` when empty.
    first_seq: u64,
    last_seq: u64,
    retention: Retention,
    last_append_ms: u64,
}

impl Stream {
    fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.last_append_ms.saturating_add(self.retention.ttl_ms())
    }
}

/// One append, in the order of every append on the shard (see the module docs).
#[derive(Debug)]
struct Record {
    key: StreamKey,
    ep: Arc<str>,
    seq: u64,
}

/// Bytes a stream costs besides its messages: its table slot, key and epoch.
fn stream_bytes(key: &StreamKey) -> usize {
    std::mem::size_of::<(StreamKey, Stream)>() + 16 + key.name().len() + EPOCH_LEN
}

/// Bytes one retained message costs: its entry, its record and its strings.
fn message_bytes(message: &Message) -> usize {
    let text = |s: &Option<Arc<str>>| s.as_ref().map_or(0, |s| s.len() + 16);
    std::mem::size_of::<Entry>()
        + std::mem::size_of::<Record>()
        + message.data.len()
        + 16
        + text(&message.from)
        + text(&message.to)
}

/// The streams whose home is one shard, under one byte budget.
#[derive(Debug)]
pub struct Streams {
    streams: IndexMap<StreamKey, Stream, ahash::RandomState>,
    order: VecDeque<Record>,
    max_bytes: usize,
    epochs: EpochSource,
    sweep_cursor: usize,
    stats: StreamStats,
}

impl Streams {
    /// An empty store that holds at most `max_bytes` (this shard's share of
    /// `history_max_bytes`), making epochs from `epoch_seed`.
    pub fn new(max_bytes: usize, epoch_seed: u64) -> Self {
        Streams {
            streams: IndexMap::default(),
            order: VecDeque::new(),
            max_bytes,
            epochs: EpochSource::new(epoch_seed),
            sweep_cursor: 0,
            stats: StreamStats::default(),
        }
    }

    /// Counters and gauges.
    pub fn stats(&self) -> StreamStats {
        StreamStats {
            streams: self.streams.len(),
            ..self.stats
        }
    }

    /// Appends `message` to the stream `key` (creating it, with a new epoch, if it does not
    /// exist or was forgotten) and answers its position. `retention` is the stream's rule
    /// (the caller resolves it from the config); the stream keeps the latest one given.
    /// The message is counted against the budget at once, so it may evict older ones.
    pub fn append(
        &mut self,
        key: &StreamKey,
        retention: Retention,
        now_ms: u64,
        message: Message,
    ) -> Position {
        self.forget_if_expired(key, now_ms);
        let epochs = &mut self.epochs;
        let stats = &mut self.stats;
        let stream = self.streams.entry(key.clone()).or_insert_with(|| {
            stats.bytes += stream_bytes(key);
            Stream {
                ep: epochs.next_epoch(),
                entries: VecDeque::new(),
                first_seq: 1,
                last_seq: 0,
                retention,
                last_append_ms: now_ms,
            }
        });
        stream.retention = retention;
        stream.last_append_ms = now_ms;
        stream.last_seq += 1;
        let seq = stream.last_seq;
        let bytes = message_bytes(&message);
        if stream.entries.is_empty() {
            stream.first_seq = seq;
        }
        stream.entries.push_back(Entry { seq, message });
        let mut trimmed = Dropped::default();
        while stream.entries.len() > retention.size {
            trimmed += pop_front(stream);
        }
        let ep = stream.ep.clone();
        self.order.push_back(Record {
            key: key.clone(),
            ep: ep.clone(),
            seq,
        });
        self.stats.appends += 1;
        self.stats.messages += 1;
        self.stats.bytes += bytes;
        self.release(trimmed, Removal::Trimmed);
        self.trim_expired(key, now_ms);
        self.evict_over_budget();
        self.compact_order();
        Position { seq, ep }
    }

    /// The stream's position (`None`: no stream), e.g. for `hello.mailbox`.
    pub fn position(&mut self, key: &StreamKey, now_ms: u64) -> Option<Position> {
        self.forget_if_expired(key, now_ms);
        self.streams.get(key).map(|s| Position {
            seq: s.last_seq,
            ep: s.ep.clone(),
        })
    }

    /// The retained messages after the client's position (`since_seq` of `since_ep`), at
    /// most `limit` of them, decided by [`plan_replay`]. Counted as one replay.
    pub fn since(
        &mut self,
        key: &StreamKey,
        since_seq: u64,
        since_ep: &str,
        limit: usize,
        now_ms: u64,
    ) -> Replay {
        self.forget_if_expired(key, now_ms);
        self.trim_expired(key, now_ms);
        let replay = match self.streams.get(key) {
            None => Replay {
                messages: Vec::new(),
                recovered: plan_replay(since_seq, since_ep, None, 1, 0).recovered,
                last_seq: 0,
                ep: None,
            },
            Some(stream) => {
                let plan = plan_replay(
                    since_seq,
                    since_ep,
                    Some(&stream.ep),
                    stream.first_seq,
                    stream.last_seq,
                );
                let skip = plan.start.saturating_sub(stream.first_seq);
                let skip = usize::try_from(skip)
                    .map_or(stream.entries.len(), |skip| skip.min(stream.entries.len()));
                Replay {
                    messages: stream.entries.range(skip..).take(limit).cloned().collect(),
                    recovered: plan.recovered,
                    last_seq: stream.last_seq,
                    ep: Some(stream.ep.clone()),
                }
            }
        };
        self.stats.replays += 1;
        self.stats.replayed += replay.messages.len() as u64;
        self.stats.unrecovered += (!replay.recovered) as u64;
        replay
    }

    /// The history API's read: the retained messages after `after_seq` of the stream's
    /// current epoch (the API names no epoch), at most `limit`. `recovered` then says
    /// whether messages after `after_seq` were trimmed. Counted as one replay.
    pub fn history(
        &mut self,
        key: &StreamKey,
        after_seq: u64,
        limit: usize,
        now_ms: u64,
    ) -> Replay {
        let ep = self.position(key, now_ms).map(|p| p.ep);
        self.since(key, after_seq, ep.as_deref().unwrap_or(""), limit, now_ms)
    }

    /// Expires messages and forgets expired streams among at most `max_streams` streams,
    /// continuing where the previous call stopped; answers how many it looked at. A shard
    /// calls it on a timer (e.g. every second with a few thousand) so expiry never costs
    /// one turn more than that.
    pub fn sweep(&mut self, now_ms: u64, max_streams: usize) -> usize {
        let mut looked = 0;
        let max_streams = max_streams.min(self.streams.len());
        while looked < max_streams && !self.streams.is_empty() {
            if self.sweep_cursor >= self.streams.len() {
                self.sweep_cursor = 0;
            }
            looked += 1;
            let index = self.sweep_cursor;
            let Some((key, stream)) = self.streams.get_index(index) else {
                break;
            };
            if stream.expired(now_ms) {
                let key = key.clone();
                self.forget(&key);
                // The last stream moved into `index`: look at it next.
            } else {
                let key = key.clone();
                self.trim_expired(&key, now_ms);
                self.sweep_cursor += 1;
            }
        }
        self.compact_order();
        looked
    }

    fn forget_if_expired(&mut self, key: &StreamKey, now_ms: u64) {
        if self.streams.get(key).is_some_and(|s| s.expired(now_ms)) {
            self.forget(key);
        }
    }

    fn forget(&mut self, key: &StreamKey) {
        let Some(index) = self.streams.get_index_of(key) else {
            return;
        };
        let (key, mut stream) = self
            .streams
            .swap_remove_index(index)
            .expect("index was just looked up");
        let mut dropped = Dropped::default();
        while !stream.entries.is_empty() {
            dropped += pop_front(&mut stream);
        }
        self.release(dropped, Removal::Expired);
        self.stats.bytes -= stream_bytes(&key);
        self.stats.forgotten += 1;
    }

    /// Drops the stream's messages older than its ttl (its messages are in time order).
    fn trim_expired(&mut self, key: &StreamKey, now_ms: u64) {
        let Some(stream) = self.streams.get_mut(key) else {
            return;
        };
        let ttl_ms = stream.retention.ttl_ms();
        let mut dropped = Dropped::default();
        while stream
            .entries
            .front()
            .is_some_and(|e| e.message.ts.saturating_add(ttl_ms) <= now_ms)
        {
            dropped += pop_front(stream);
        }
        self.release(dropped, Removal::Expired);
    }

    /// Evicts the shard's oldest messages until the bytes fit the budget (or only stream
    /// overheads are left).
    fn evict_over_budget(&mut self) {
        while self.stats.bytes > self.max_bytes {
            let Some(record) = self.order.pop_front() else {
                return;
            };
            let Some(stream) = self.streams.get_mut(&record.key) else {
                continue;
            };
            if !Arc::ptr_eq(&stream.ep, &record.ep) || record.seq < stream.first_seq {
                continue;
            }
            let mut dropped = Dropped::default();
            while stream.first_seq <= record.seq && !stream.entries.is_empty() {
                dropped += pop_front(stream);
            }
            self.release(dropped, Removal::Evicted);
        }
    }

    /// Drops the records of messages already gone once they outnumber the messages held.
    fn compact_order(&mut self) {
        if self.stats.messages == 0 {
            self.order.clear();
            return;
        }
        if self.order.len() <= 2 * self.stats.messages + 1024 {
            return;
        }
        let streams = &self.streams;
        self.order.retain(|record| {
            streams.get(&record.key).is_some_and(|stream| {
                Arc::ptr_eq(&stream.ep, &record.ep) && record.seq >= stream.first_seq
            })
        });
    }

    fn release(&mut self, dropped: Dropped, why: Removal) {
        self.stats.messages -= dropped.messages;
        self.stats.bytes -= dropped.bytes;
        let counter = match why {
            Removal::Trimmed => &mut self.stats.trimmed,
            Removal::Expired => &mut self.stats.expired,
            Removal::Evicted => &mut self.stats.evicted,
        };
        *counter += dropped.messages as u64;
    }
}

/// Why messages left a stream (which counter they go to).
#[derive(Debug, Clone, Copy)]
enum Removal {
    Trimmed,
    Expired,
    Evicted,
}

/// Messages and bytes removed from streams.
#[derive(Debug, Clone, Copy, Default)]
struct Dropped {
    messages: usize,
    bytes: usize,
}

impl std::ops::AddAssign for Dropped {
    fn add_assign(&mut self, other: Dropped) {
        self.messages += other.messages;
        self.bytes += other.bytes;
    }
}

/// Removes a stream's oldest message.
fn pop_front(stream: &mut Stream) -> Dropped {
    let Some(entry) = stream.entries.pop_front() else {
        return Dropped::default();
    };
    stream.first_seq = entry.seq + 1;
    Dropped {
        messages: 1,
        bytes: message_bytes(&entry.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP_5_FOR_1S: Retention = Retention {
        size: 5,
        ttl_secs: 1,
    };

    fn mailbox(user: &str) -> StreamKey {
        StreamKey::Mailbox(user.into())
    }

    fn message(mid: u64, ts: u64) -> Message {
        Message {
            mid,
            ts,
            from: None,
            to: None,
            data: format!("{{\"n\":{mid:>5}}}").into(),
        }
    }

    fn seqs(replay: &Replay) -> Vec<u64> {
        replay.messages.iter().map(|e| e.seq).collect()
    }

    /// The byte and message gauges equal what a recount from scratch finds.
    fn assert_accounted(streams: &Streams) {
        let mut bytes = 0;
        let mut messages = 0;
        for (key, stream) in &streams.streams {
            bytes += stream_bytes(key);
            for (i, entry) in stream.entries.iter().enumerate() {
                assert_eq!(entry.seq, stream.first_seq + i as u64, "gap-free");
                bytes += message_bytes(&entry.message);
                messages += 1;
            }
            assert!(stream.first_seq <= stream.last_seq + 1);
        }
        let stats = streams.stats();
        assert_eq!((stats.bytes, stats.messages), (bytes, messages));
        assert!(
            streams.order.len() <= 2 * messages + 1024,
            "order compacted"
        );
    }

    #[test]
    fn seq_is_gap_free_from_one_and_the_epoch_stays() {
        let mut streams = Streams::new(1 << 20, 7);
        let key = mailbox("alice");
        let first = streams.append(&key, KEEP_5_FOR_1S, 0, message(1, 0));
        assert_eq!(first.seq, 1);
        assert_eq!(first.ep.len(), EPOCH_LEN);
        assert!(first.ep.bytes().all(|b| b.is_ascii_alphanumeric()));
        for n in 2..=4 {
            let at = streams.append(&key, KEEP_5_FOR_1S, n, message(n, n));
            assert_eq!((at.seq, &at.ep), (n, &first.ep));
        }
        let other = streams.append(&mailbox("bob"), KEEP_5_FOR_1S, 5, message(5, 5));
        assert_eq!(other.seq, 1, "each stream counts on its own");
        assert_ne!(other.ep, first.ep);
        assert_eq!(
            streams.position(&key, 10),
            Some(Position {
                seq: 4,
                ep: first.ep.clone()
            })
        );
        assert_eq!(streams.position(&mailbox("carol"), 10), None);
        assert_eq!(streams.stats().appends, 5);
        assert_accounted(&streams);
    }

    #[test]
    fn a_mailbox_and_a_topic_of_one_name_are_two_streams() {
        let mut streams = Streams::new(1 << 20, 1);
        streams.append(&mailbox("x"), KEEP_5_FOR_1S, 0, message(1, 0));
        let topic = streams.append(
            &StreamKey::Topic("x".into()),
            KEEP_5_FOR_1S,
            0,
            message(2, 0),
        );
        assert_eq!(topic.seq, 1);
        assert_eq!(streams.stats().streams, 2);
    }

    #[test]
    fn resume_follows_the_replay_rule() {
        let mut streams = Streams::new(1 << 20, 3);
        let key = mailbox("alice");
        let retention = Retention {
            size: 3,
            ttl_secs: 60,
        };
        let mut ep = None;
        for n in 1..=5 {
            ep = Some(streams.append(&key, retention, n, message(n, n)).ep);
        }
        let ep = ep.expect("appended");
        let since = |streams: &mut Streams, seq, ep: &str| streams.since(&key, seq, ep, 100, 10);

        let r = since(&mut streams, 2, &ep);
        assert_eq!(
            (seqs(&r), r.recovered, r.last_seq),
            (vec![3, 4, 5], true, 5)
        );
        assert_eq!(r.ep.as_deref(), Some(&*ep));
        let r = since(&mut streams, 4, &ep);
        assert_eq!((seqs(&r), r.recovered), (vec![5], true));
        let r = since(&mut streams, 5, &ep);
        assert_eq!((seqs(&r), r.recovered), (vec![], true), "up to date");
        let r = since(&mut streams, 1, &ep);
        assert_eq!(
            (seqs(&r), r.recovered),
            (vec![3, 4, 5], false),
            "2 was trimmed"
        );
        let r = since(&mut streams, 0, "");
        assert_eq!(
            (seqs(&r), r.recovered),
            (vec![3, 4, 5], false),
            "1 and 2 are gone"
        );
        let r = since(&mut streams, 3, "OtherEp1");
        assert_eq!(
            (seqs(&r), r.recovered),
            (vec![3, 4, 5], false),
            "foreign epoch"
        );
        let r = since(&mut streams, 6, &ep);
        assert_eq!(
            (seqs(&r), r.recovered, r.last_seq),
            (vec![], false, 5),
            "ahead"
        );
        let r = since(&mut streams, u64::MAX, &ep);
        assert_eq!((seqs(&r), r.recovered), (vec![], false), "huge");

        let r = streams.since(&key, 2, &ep, 2, 10);
        assert_eq!((seqs(&r), r.recovered), (vec![3, 4], true), "limit pages");
        let r = streams.since(&key, 4, &ep, 0, 10);
        assert_eq!(
            (seqs(&r), r.recovered, r.last_seq),
            (vec![], true, 5),
            "position only"
        );

        let stats = streams.stats();
        assert_eq!((stats.replays, stats.unrecovered), (10, 5));
        assert_eq!(stats.replayed, 3 + 1 + 3 + 3 + 3 + 2);
        assert_eq!(stats.trimmed, 2);
    }

    #[test]
    fn the_history_api_reads_the_current_epoch() {
        let mut streams = Streams::new(1 << 20, 3);
        let key = StreamKey::Topic("room".into());
        let retention = Retention {
            size: 2,
            ttl_secs: 60,
        };
        for n in 1..=3 {
            streams.append(&key, retention, n, message(n, n));
        }
        let r = streams.history(&key, 1, 10, 5);
        assert_eq!((seqs(&r), r.recovered, r.last_seq), (vec![2, 3], true, 3));
        let r = streams.history(&key, 0, 1, 5);
        assert_eq!((seqs(&r), r.recovered), (vec![2], false), "1 was trimmed");
        let r = streams.history(&StreamKey::Topic("none".into()), 4, 10, 5);
        assert_eq!((seqs(&r), r.recovered, r.ep), (vec![], false, None));
    }

    #[test]
    fn a_fresh_device_gets_everything_retained() {
        let mut streams = Streams::new(1 << 20, 3);
        let key = mailbox("alice");
        let r = streams.since(&key, 0, "", 100, 0);
        assert_eq!(
            (seqs(&r), r.recovered, r.last_seq, r.ep),
            (vec![], true, 0, None)
        );
        let r = streams.since(&key, 3, "OldEpoch", 100, 0);
        assert!(!r.recovered, "a position in a stream that is gone");
        streams.append(&key, KEEP_5_FOR_1S, 0, message(1, 0));
        streams.append(&key, KEEP_5_FOR_1S, 0, message(2, 0));
        let r = streams.since(&key, 0, "whatever", 100, 0);
        assert_eq!((seqs(&r), r.recovered), (vec![1, 2], true));
        assert_eq!(r.messages[1].message, message(2, 0));
    }

    #[test]
    fn messages_expire_and_idle_streams_are_forgotten_with_their_epoch() {
        let mut streams = Streams::new(1 << 20, 5);
        let key = mailbox("alice");
        let old = streams.append(&key, KEEP_5_FOR_1S, 0, message(1, 0)).ep;
        streams.append(&key, KEEP_5_FOR_1S, 600, message(2, 600));
        let r = streams.since(&key, 0, "", 100, 1000);
        assert_eq!((seqs(&r), r.recovered), (vec![2], false), "seq 1 expired");
        assert_eq!(streams.stats().expired, 1);
        let r = streams.since(&key, 2, &old, 100, 1599);
        assert_eq!((seqs(&r), r.recovered), (vec![], true), "still there");
        let r = streams.since(&key, 2, &old, 100, 1600);
        assert_eq!(
            (r.ep, r.last_seq, r.recovered),
            (None, 0, false),
            "forgotten"
        );
        let fresh = streams.append(&key, KEEP_5_FOR_1S, 1700, message(3, 1700));
        assert_eq!(fresh.seq, 1);
        assert_ne!(fresh.ep, old, "created afresh: a new epoch");
        let r = streams.since(&key, 2, &old, 100, 1700);
        assert_eq!((seqs(&r), r.recovered), (vec![1], false));
        assert_eq!(streams.stats().forgotten, 1);
        assert_accounted(&streams);
    }

    #[test]
    fn sweep_forgets_idle_streams_a_bounded_number_at_a_time() {
        let mut streams = Streams::new(1 << 30, 9);
        for n in 0..1000 {
            let key = mailbox(&format!("user{n}"));
            streams.append(&key, KEEP_5_FOR_1S, n, message(n, n));
        }
        let busy = mailbox("busy");
        streams.append(&busy, KEEP_5_FOR_1S, 5000, message(1, 5000));
        assert!(streams.stats().bytes > 0);
        assert_eq!(streams.sweep(2000, 300), 300);
        // A forgotten stream's slot takes the last one ("busy"), looked at next.
        assert!(streams.stats().forgotten >= 299);
        assert_accounted(&streams);
        let mut calls = 0;
        while streams.stats().streams > 1 {
            calls += 1;
            assert!(calls <= 10, "bounded");
            streams.sweep(2000, 300);
        }
        assert!(streams.position(&busy, 2000).is_some(), "not idle: kept");
        assert_eq!(streams.stats().forgotten, 1000);
        streams.sweep(6000, 300);
        let stats = streams.stats();
        assert_eq!((stats.streams, stats.messages, stats.bytes), (0, 0, 0));
        assert!(streams.order.is_empty());
        assert_eq!(streams.sweep(6000, 300), 0, "nothing left to look at");
    }

    #[test]
    fn sweep_trims_expired_messages_of_live_streams() {
        let mut streams = Streams::new(1 << 20, 9);
        let key = mailbox("alice");
        streams.append(&key, KEEP_5_FOR_1S, 0, message(1, 0));
        streams.append(&key, KEEP_5_FOR_1S, 900, message(2, 900));
        streams.sweep(1000, 10);
        assert_eq!(streams.stats().messages, 1);
        assert_accounted(&streams);
    }

    #[test]
    fn the_budget_evicts_the_oldest_messages_across_streams() {
        let one = message_bytes(&message(1, 0));
        let stream = stream_bytes(&mailbox("u0"));
        // Room for the streams' overheads and 10 messages.
        let budget = 4 * stream + 10 * one;
        let mut streams = Streams::new(budget, 11);
        let retention = Retention {
            size: 100,
            ttl_secs: 3600,
        };
        let keys: Vec<StreamKey> = (0..4).map(|n| mailbox(&format!("u{n}"))).collect();
        let mut eps = Vec::new();
        for round in 0..5u64 {
            for (n, key) in keys.iter().enumerate() {
                let mid = round * 4 + n as u64 + 1;
                eps.push(streams.append(key, retention, mid, message(mid, mid)).ep);
            }
            assert!(streams.stats().bytes <= budget);
            assert_accounted(&streams);
        }
        let stats = streams.stats();
        assert_eq!((stats.messages, stats.evicted), (10, 10));
        // The oldest ten (rounds 0 and 1, then the first two of round 2) went first.
        let r = streams.since(&keys[0], 0, "", 100, 100);
        assert_eq!((seqs(&r), r.recovered), (vec![4, 5], false));
        let r = streams.since(&keys[3], 2, &eps[3], 100, 100);
        assert_eq!((seqs(&r), r.recovered), (vec![3, 4, 5], true));
        assert_eq!(r.ep.as_deref(), Some(&*eps[3]), "eviction keeps the epoch");
    }

    #[test]
    fn a_budget_smaller_than_one_message_keeps_streams_but_no_messages() {
        let mut streams = Streams::new(1, 1);
        let key = mailbox("alice");
        let at = streams.append(&key, KEEP_5_FOR_1S, 0, message(1, 0));
        let r = streams.since(&key, 0, "", 10, 1);
        assert_eq!((seqs(&r), r.recovered, r.last_seq), (vec![], false, 1));
        assert_eq!(r.ep, Some(at.ep));
        assert_accounted(&streams);
    }

    #[test]
    fn the_eviction_order_stays_proportional_to_what_is_kept() {
        let mut streams = Streams::new(1 << 30, 1);
        let key = mailbox("chatty");
        let retention = Retention {
            size: 2,
            ttl_secs: 3600,
        };
        for n in 0..20_000 {
            streams.append(&key, retention, n, message(n, n));
        }
        assert_eq!(streams.stats().messages, 2);
        assert_accounted(&streams);
    }

    #[test]
    fn replayed_frames_carry_seq_and_ep() {
        let mut streams = Streams::new(1 << 20, 2);
        let bob = mailbox("bob");
        let alice = mailbox("alice");
        let sent = Message {
            from: Some("alice".into()),
            ..message(7, 8)
        };
        let at = streams.append(&bob, KEEP_5_FOR_1S, 8, sent.clone());
        let copy = Message {
            to: Some("bob".into()),
            ..sent
        };
        let copy_at = streams.append(&alice, KEEP_5_FOR_1S, 8, copy);
        let text = |frame: Bytes| {
            let header = crate::ws::text_frame_header_len(&frame);
            String::from_utf8(frame[header..].to_vec()).expect("utf8")
        };
        let r = streams.since(&bob, 0, "", 10, 8);
        assert_eq!(
            text(frame(&bob, &at.ep, &r.messages[0])),
            format!(
                r#"{{"op":"msg","from":"alice","to":"bob","mid":"7","ts":8,"seq":1,"ep":"{}","data":{{"n":    7}}}}"#,
                at.ep
            )
        );
        let r = streams.since(&alice, 0, "", 10, 8);
        assert!(
            text(frame(&alice, &copy_at.ep, &r.messages[0])).contains(r#""to":"bob""#),
            "the sender's copy names the recipient"
        );
        let room = StreamKey::Topic("room".into());
        let at = streams.append(&room, KEEP_5_FOR_1S, 8, message(9, 8));
        let r = streams.since(&room, 0, "", 10, 8);
        assert_eq!(
            text(frame(&room, &at.ep, &r.messages[0])),
            format!(
                r#"{{"op":"pub","topic":"room","mid":"9","ts":8,"seq":1,"ep":"{}","data":{{"n":    9}}}}"#,
                at.ep
            )
        );
    }

    #[test]
    fn the_history_api_json_is_valid() {
        let mut streams = Streams::new(1 << 20, 2);
        let key = mailbox("alice");
        let copy = Message {
            from: Some("al\"ice".into()),
            to: Some("bob".into()),
            ..message(7, 8)
        };
        let at = streams.append(&key, KEEP_5_FOR_1S, 8, copy);
        streams.append(&key, KEEP_5_FOR_1S, 9, message(9, 9));
        let json: serde_json::Value =
            serde_json::from_slice(&history_json(&streams.since(&key, 0, "", 10, 9)))
                .expect("json");
        assert_eq!(
            json,
            serde_json::json!({"ep": &*at.ep, "seq": 2, "recovered": true, "messages": [
                {"seq": 1, "mid": "7", "ts": 8, "from": "al\"ice", "to": "bob", "data": {"n": 7}},
                {"seq": 2, "mid": "9", "ts": 9, "data": {"n": 9}},
            ]})
        );
        let none: serde_json::Value =
            serde_json::from_slice(&history_json(&streams.since(&mailbox("x"), 0, "", 10, 9)))
                .expect("json");
        assert_eq!(
            none,
            serde_json::json!({"ep": "", "seq": 0, "recovered": true, "messages": []})
        );
    }

    #[test]
    fn epochs_differ_across_seeds_and_calls() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..50 {
            let mut source = EpochSource::new(seed);
            for _ in 0..20 {
                let ep = source.next_epoch();
                assert_eq!(ep.len(), EPOCH_LEN);
                assert!(seen.insert(ep));
            }
        }
    }

    #[test]
    fn the_replay_rule_table() {
        let plan = |seq, ep, have: Option<&str>, first, last| {
            let p = plan_replay(seq, ep, have, first, last);
            (p.start, p.recovered)
        };
        assert_eq!(plan(0, "", None, 1, 0), (1, true));
        assert_eq!(plan(4, "E", None, 1, 0), (1, false));
        assert_eq!(plan(0, "X", Some("E"), 1, 9), (1, true));
        assert_eq!(plan(0, "E", Some("E"), 4, 9), (4, false));
        assert_eq!(plan(5, "X", Some("E"), 4, 9), (4, false));
        assert_eq!(plan(10, "E", Some("E"), 4, 9), (10, false));
        assert_eq!(plan(2, "E", Some("E"), 4, 9), (4, false));
        assert_eq!(plan(3, "E", Some("E"), 4, 9), (4, true));
        assert_eq!(plan(9, "E", Some("E"), 4, 9), (10, true));
        assert_eq!(
            plan(9, "E", Some("E"), 10, 9),
            (10, true),
            "empty, up to date"
        );
        assert_eq!(
            plan(8, "E", Some("E"), 10, 9),
            (10, false),
            "empty, 9 missed"
        );
    }
}
