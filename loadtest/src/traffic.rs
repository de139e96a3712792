//! Measured traffic: the stamp every message carries, and the reader-thread [`Traffic`]
//! handler of a worker process, which records what arrives and sends the direct messages
//! that are its share.
//!
//! Every message's `data` is a [`Stamp`]: its sequence number `n` and the sender's
//! `CLOCK_MONOTONIC` time `t` in microseconds. The monotonic clock is one clock for every
//! process on the machine, so a receiver in another process subtracts `t` from its own
//! reading to get the delivery latency.
//!
//! * Topic publications (`pub` frames) are numbered `0..pubs`. Per publication, a worker
//!   counts arrivals and keeps the latest arrival's latency (the coordinator takes the
//!   largest over workers: the time until the last subscriber had it). Each subscriber must
//!   see them in order, once.
//! * Direct messages (`msg` frames) are numbered `0..count`; message `k` goes to user
//!   [`target_of`]`(k)`, so exactly one worker receives it, and a bit set per worker tells
//!   a first delivery from a duplicate. With `p2p --to topics` they are topic publications
//!   to the recipient's own topic ([`user_topic`](crate::client::user_topic)): a `pub`
//!   frame on a connection's own user topic counts as the direct message it carries, never
//!   as a fan-out publication.
//! * When clients send the direct messages (`send` frames), message `k` is due at
//!   `start + k / rate` and is sent by worker `k % workers`, reader thread
//!   `(k / workers) % threads`, from one of that thread's user connections in turn.
//! * Up messages (the `up` scenario) are spread the same way; [`crate::up::UpSender`] sends
//!   them and matches their `ack`/`err` answers by `id`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::client::{user_name, Population};
use crate::readers::Handler;
use crate::up::{UpSender, UpSends};

/// Latency histograms cover 1 µs to 10 minutes at 3 significant digits.
pub const MAX_LATENCY_US: u64 = 600_000_000;

/// Refusals and unexpected frames kept for the report, per reader thread.
const ODDITIES_KEPT: usize = 5;

/// `CLOCK_MONOTONIC` in microseconds: the same clock in every process on the machine.
pub fn mono_us() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000
}

/// A latency histogram in microseconds.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// The `data` of every measured message.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Stamp {
    /// Sequence number.
    pub n: u64,
    /// Sender's [`mono_us`] when it sent the message.
    pub t: u64,
}

/// The recipient user of direct message `k` among `users`: spread evenly, not in order.
pub fn target_of(k: u64, users: usize) -> usize {
    // splitmix64 finalizer
    let mut x = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x % users as u64) as usize
}

/// Direct messages sent by clients: how many, how fast, when they start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientSends {
    /// Messages in the whole run.
    pub count: u64,
    /// Messages per second in the whole run.
    pub rate: f64,
}

/// What every reader thread of one worker process shares.
pub struct Shared {
    /// The connections' roles.
    pub population: Population,
    /// This worker's number and how many there are.
    pub worker: usize,
    /// Worker processes in the run.
    pub workers: usize,
    /// Reader threads in this worker.
    pub threads: usize,
    /// Direct messages this worker's clients send, if they send any.
    pub sends: Option<ClientSends>,
    /// [`mono_us`] when sending starts; 0 until the coordinator says so.
    pub start_us: AtomicU64,
    /// One bit per direct message: delivered at least once.
    direct_seen: Vec<AtomicU64>,
    /// Direct messages delivered (first copies).
    pub direct_delivered: AtomicU64,
    /// Further copies of direct messages.
    pub direct_duplicates: AtomicU64,
    /// Per topic publication: arrivals at this worker's subscribers.
    pub fanout_arrivals: Vec<AtomicU32>,
    /// Per topic publication: latency of the latest arrival here, microseconds.
    pub fanout_last_us: Vec<AtomicU64>,
    /// Direct messages this worker's clients sent.
    pub sent: AtomicU64,
    /// Sends this worker's clients still have to make (0 once done).
    pub sends_left: AtomicU64,
    /// `ack`s to sends.
    pub acked: AtomicU64,
    /// `err`s to sends.
    pub refused: AtomicU64,
    /// Text frames that were none of the above.
    pub unexpected: AtomicU64,
}

impl Shared {
    /// State for a worker whose clients expect `pubs` publications and `direct` direct
    /// messages in all.
    pub fn new(
        population: Population,
        worker: usize,
        workers: usize,
        threads: usize,
        pubs: usize,
        direct: u64,
        sends: Option<ClientSends>,
    ) -> Self {
        let words = direct.div_ceil(64) as usize;
        Shared {
            population,
            worker,
            workers,
            threads,
            sends_left: AtomicU64::new(0),
            sends,
            start_us: AtomicU64::new(0),
            direct_seen: (0..words).map(|_| AtomicU64::new(0)).collect(),
            direct_delivered: AtomicU64::new(0),
            direct_duplicates: AtomicU64::new(0),
            fanout_arrivals: (0..pubs).map(|_| AtomicU32::new(0)).collect(),
            fanout_last_us: (0..pubs).map(|_| AtomicU64::new(0)).collect(),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
        }
    }
}

/// A server frame, as far as the measurement needs it.
#[derive(Deserialize)]
struct Incoming<'a> {
    op: String,
    /// The topic of a `pub` (borrowed unless it has escapes).
    #[serde(default, borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(default)]
    data: Option<Stamp>,
    /// The request's `id`, in `ack` and `err`.
    #[serde(default)]
    id: Option<u64>,
    /// Why a request was refused, in `err`.
    #[serde(default)]
    code: Option<String>,
}

/// The sends one reader thread makes.
struct SendQueue {
    /// Next message number this thread sends.
    next: u64,
    /// Distance between this thread's message numbers (workers × threads).
    stride: u64,
    count: u64,
    rate: f64,
    /// This thread's user connections: (socket position, user number).
    senders: Vec<(usize, usize)>,
}

/// The reader-thread handler of a worker process.
pub struct Traffic {
    shared: Arc<Shared>,
    /// Per socket: its user's own topic, if users subscribe to theirs (`p2p --to topics`).
    own_topics: Vec<Option<String>>,
    /// Per socket: the next publication it should get.
    fanout_next: Vec<u64>,
    /// Topic deliveries out of order or repeated.
    pub fanout_anomalies: u64,
    /// Latency of every topic delivery, microseconds.
    pub fanout_us: Histogram<u64>,
    /// Latency of every first direct delivery, microseconds.
    pub direct_us: Histogram<u64>,
    /// The first few refusals and unexpected frames.
    pub oddities: Vec<String>,
    sends: Option<SendQueue>,
    /// The up messages this thread sends (the `up` scenario), and their answers.
    pub up: Option<UpSender>,
}

impl Traffic {
    /// The handler of reader thread `thread`, whose sockets are connections `numbers`;
    /// `up`: the up messages of the run, if it sends any.
    pub fn new(
        shared: Arc<Shared>,
        thread: usize,
        numbers: &[usize],
        up: Option<&UpSends>,
    ) -> Self {
        let population = &shared.population;
        let sends = shared.sends.as_ref().map(|plan| {
            let stride = (shared.workers * shared.threads) as u64;
            let first = (shared.worker + thread * shared.workers) as u64;
            let senders: Vec<(usize, usize)> = numbers
                .iter()
                .enumerate()
                .filter(|&(_, &i)| i >= population.subs)
                .map(|(position, &i)| (position, i - population.subs))
                .collect();
            let mine = plan.count.saturating_sub(first).div_ceil(stride);
            shared.sends_left.fetch_add(mine, Ordering::Relaxed);
            SendQueue {
                next: first,
                stride,
                count: plan.count,
                rate: plan.rate,
                senders,
            }
        });
        Traffic {
            own_topics: numbers.iter().map(|&i| population.own_topic(i)).collect(),
            fanout_next: vec![0; numbers.len()],
            fanout_anomalies: 0,
            fanout_us: latency_histogram(),
            direct_us: latency_histogram(),
            oddities: Vec::new(),
            sends,
            up: up.map(|up| UpSender::new(up, &shared, thread, numbers.len())),
            shared,
        }
    }

    fn note(&mut self, what: String) {
        if self.oddities.len() < ODDITIES_KEPT {
            self.oddities.push(what);
        }
    }

    /// Whether `topic` is the own user topic of socket `conn`.
    fn is_own_topic(&self, conn: usize, topic: Option<&str>) -> bool {
        match (self.own_topics.get(conn), topic) {
            (Some(Some(own)), Some(topic)) => own == topic,
            _ => false,
        }
    }

    fn on_publication(&mut self, conn: usize, stamp: Stamp, latency: u64) {
        let (Some(arrivals), Some(last), Some(next)) = (
            self.shared.fanout_arrivals.get(stamp.n as usize),
            self.shared.fanout_last_us.get(stamp.n as usize),
            self.fanout_next.get_mut(conn),
        ) else {
            self.fanout_anomalies += 1;
            return;
        };
        if stamp.n != *next {
            self.fanout_anomalies += 1;
        }
        *next = stamp.n + 1;
        arrivals.fetch_add(1, Ordering::Relaxed);
        last.fetch_max(latency, Ordering::Relaxed);
        self.fanout_us.saturating_record(latency);
    }

    fn on_direct(&mut self, stamp: Stamp, latency: u64) {
        let Some(word) = self.shared.direct_seen.get((stamp.n / 64) as usize) else {
            self.shared.unexpected.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let bit = 1u64 << (stamp.n % 64);
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            self.shared
                .direct_duplicates
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared.direct_delivered.fetch_add(1, Ordering::Relaxed);
            self.direct_us.saturating_record(latency);
        }
    }
}

impl Handler for Traffic {
    fn on_text(&mut self, conn: usize, text: &str) {
        let now = mono_us();
        let incoming: Incoming = match serde_json::from_str(text) {
            Ok(incoming) => incoming,
            Err(_) => {
                self.shared.unexpected.fetch_add(1, Ordering::Relaxed);
                self.note(format!("unexpected frame: {text}"));
                return;
            }
        };
        match (incoming.op.as_str(), incoming.data) {
            ("pub", Some(stamp)) if self.is_own_topic(conn, incoming.topic.as_deref()) => {
                self.on_direct(stamp, now.saturating_sub(stamp.t))
            }
            ("pub", Some(stamp)) => self.on_publication(conn, stamp, now.saturating_sub(stamp.t)),
            ("msg", Some(stamp)) => self.on_direct(stamp, now.saturating_sub(stamp.t)),
            ("ack", _) => {
                self.shared.acked.fetch_add(1, Ordering::Relaxed);
                if let Some(up) = self.up.as_mut() {
                    up.on_answer(incoming.id, None, now);
                }
            }
            ("err", _) => {
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(up) = self.up.as_mut() {
                    let code = incoming.code.as_deref().unwrap_or("(none)");
                    up.on_answer(incoming.id, Some(code), now);
                }
                self.note(format!("refused: {text}"));
            }
            ("pong", _) => {}
            _ => {
                self.shared.unexpected.fetch_add(1, Ordering::Relaxed);
                self.note(format!("unexpected frame: {text}"));
            }
        }
    }

    fn due(&mut self, now_us: u64, out: &mut Vec<(usize, String)>) {
        let start = self.shared.start_us.load(Ordering::Relaxed);
        if let Some(up) = self.up.as_mut() {
            up.due(start, now_us, &self.shared, out);
        }
        let Some(queue) = self.sends.as_mut() else {
            return;
        };
        if start == 0 || start > now_us {
            return;
        }
        let users = self.shared.population.users;
        while queue.next < queue.count {
            let due = start + (queue.next as f64 * 1e6 / queue.rate) as u64;
            if due > now_us {
                break;
            }
            let k = queue.next;
            queue.next += queue.stride;
            self.shared.sends_left.fetch_sub(1, Ordering::Relaxed);
            if queue.senders.is_empty() {
                continue;
            }
            let turn = (k / queue.stride) as usize % queue.senders.len();
            let (position, sender) = queue.senders[turn];
            let mut to = target_of(k, users);
            if to == sender {
                to = (to + 1) % users;
            }
            let stamp = Stamp { n: k, t: mono_us() };
            let frame = serde_json::json!({
                "op": "send", "to": user_name(to), "id": k, "data": stamp,
            });
            out.push((position, frame.to_string()));
            self.shared.sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn next_due_us(&self) -> Option<u64> {
        let start = self.shared.start_us.load(Ordering::Relaxed);
        let up = self.up.as_ref().and_then(|up| up.next_due_us(start));
        let direct = self.sends.as_ref().and_then(|queue| {
            (start != 0 && queue.next < queue.count)
                .then(|| start + (queue.next as f64 * 1e6 / queue.rate) as u64)
        });
        up.into_iter().chain(direct).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_spread_over_every_user() {
        let users = 10;
        let mut hits = vec![0; users];
        for k in 0..10_000 {
            hits[target_of(k, users)] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
    }

    /// A reader thread of one worker holding `numbers`, expecting `pubs` fan-out
    /// publications and `direct` direct messages.
    fn traffic(population: Population, numbers: &[usize], pubs: usize, direct: u64) -> Traffic {
        let shared = Arc::new(Shared::new(population, 0, 1, 1, pubs, direct, None));
        Traffic::new(shared, 0, numbers, None)
    }

    fn frame(op: &str, topic: &str, n: u64) -> String {
        let stamp = Stamp { n, t: mono_us() };
        serde_json::json!({"op": op, "topic": topic, "mid": "1", "ts": 1, "data": stamp})
            .to_string()
    }

    #[test]
    fn own_topic_publications_count_as_direct_messages() {
        let population = Population {
            subs: 1,
            users: 2,
            topic: "bench".into(),
            user_topics: true,
        };
        // Socket 0 is subscriber s0, socket 1 user p0 (t-p0), socket 2 user p1 (t-p1).
        let mut t = traffic(population, &[0, 1, 2], 1, 4);
        t.on_text(1, &frame("pub", "t-p0", 0));
        t.on_text(2, &frame("pub", "t-p1", 3));
        t.on_text(2, &frame("pub", "t-p1", 3));
        t.on_text(0, &frame("pub", "bench", 0));
        let shared = &t.shared;
        assert_eq!(shared.direct_delivered.load(Ordering::Relaxed), 2);
        assert_eq!(shared.direct_duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(t.direct_us.len(), 2);
        assert_eq!(shared.fanout_arrivals[0].load(Ordering::Relaxed), 1);
        assert_eq!(t.fanout_anomalies, 0);
        assert_eq!(t.fanout_us.len(), 1);
        // Another user's topic is not this socket's message.
        t.on_text(1, &frame("pub", "t-p1", 1));
        assert_eq!(t.shared.direct_delivered.load(Ordering::Relaxed), 2);
        assert_eq!(t.fanout_anomalies, 1);
    }

    #[test]
    fn without_user_topics_publications_are_fanout() {
        let population = Population {
            subs: 1,
            users: 1,
            topic: "t-p0".into(),
            user_topics: false,
        };
        let mut t = traffic(population, &[0, 1], 1, 1);
        t.on_text(0, &frame("pub", "t-p0", 0));
        t.on_text(1, &frame("msg", "", 0));
        assert_eq!(t.shared.fanout_arrivals[0].load(Ordering::Relaxed), 1);
        assert_eq!(t.shared.direct_delivered.load(Ordering::Relaxed), 1);
        assert_eq!(t.fanout_anomalies, 0);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = mono_us();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(mono_us() >= a + 2000);
    }
}
