//! The `up` scenario: clients send `{"op":"up","id":..,"data":..}` frames at a rate, and the
//! nodes hand them to their upstream sink (Redis Streams or a webhook) and ack each with
//! its `mid` once the sink took it, or answer `err` (`unavailable` when the sink cannot).
//!
//! This module owns the scenario's options ([`UpArgs`]), its share of a worker's reader
//! threads ([`UpSender`]: the sends, and the `ack`/`err` answers matched to them by `id`),
//! the webhook receiver that `--sink webhook` runs in the coordinator ([`Hook`]), what is
//! read around the traffic phase ([`UpPlan::begin`]: Redis CPU and `XLEN`, the receiver's
//! counts) and the report. The run itself is [`crate::run`]'s, like every other scenario.
//!
//! Up message `k` (of `--msgs`, or `--rate` × `--seconds`) is due at `start + k / rate` and
//! is sent by worker `k % workers`, reader thread `(k / workers) % threads`, from that
//! thread's connections in turn, with `id` `k`. Its latency is from the send to its
//! answer on the same connection. Its `data` is a JSON string of `--size` bytes.
//!
//! With `--spawn-cluster`, `--sink` configures the nodes: `redis` sets
//! `SHARDCAST_UPSTREAM_SINK=redis` (and the report reads Redis's CPU and the stream's
//! `XLEN`); `webhook` starts [`Hook`] on a loopback port and points the nodes' `webhook_url`
//! at it. Other node settings (`SHARDCAST_WEBHOOK_BATCH_MAX`, ...) pass through this
//! process's environment to the spawned nodes. Against running nodes, they are configured
//! by whoever started them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::client::{Deadline, Population};
use crate::probe::{CpuTime, Probe};
use crate::redis_cluster::{self, Reply};
use crate::report::Report;
use crate::run::Plan;
use crate::traffic::{latency_histogram, Shared};
use crate::wire::{self, WorkerReport};
use crate::{Common, Endpoints};

/// The webhook secret the spawned nodes sign with (the receiver does not check it).
const HOOK_SECRET: &str = "shardcast-loadtest-webhook-secret";

/// Records per POST counted one by one; larger POSTs share the last bucket.
const BATCH_BUCKETS: usize = 4096;

/// Longest wait for a webhook request's next bytes before its connection is dropped.
const HOOK_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Which sink `--sink` sets up on spawned nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkArg {
    /// Redis Streams (`SHARDCAST_UPSTREAM_SINK=redis`).
    Redis,
    /// The built-in webhook receiver (`SHARDCAST_WEBHOOK_URL`, `SHARDCAST_WEBHOOK_SECRET`).
    Webhook,
}

/// `up`: client messages to the nodes' upstream sink.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Users online (one connection each); they take turns sending.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Up messages per second, all clients together.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Seconds of sending (`--rate` × this many messages), unless `--msgs` says how many.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Up messages in the run (instead of `--seconds`).
    #[arg(long)]
    msgs: Option<u64>,
    /// The `stream` every message names (none: the node's default, `up`).
    #[arg(long)]
    stream: Option<String>,
    /// Bytes of each message's `data` (a JSON string).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// With --spawn-cluster: the nodes' upstream sink.
    #[arg(long, value_enum, requires = "spawn_cluster")]
    sink: Option<SinkArg>,
    /// Seconds to wait for answers after the last send.
    #[arg(long, default_value_t = 10)]
    drain: u64,
}

/// The up messages a run sends (travels to the workers in their job).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpSends {
    /// Messages in the whole run.
    pub count: u64,
    /// Messages per second in the whole run.
    pub rate: f64,
    /// Bytes of `data`.
    pub size: usize,
    /// The `stream` field, if any.
    pub stream: Option<String>,
}

impl UpSends {
    /// The frame of message `id`.
    fn frame(&self, id: u64) -> String {
        let data = "x".repeat(self.size);
        match &self.stream {
            Some(stream) => json!({"op": "up", "id": id, "stream": stream, "data": data}),
            None => json!({"op": "up", "id": id, "data": data}),
        }
        .to_string()
    }
}

/// The coordinator's side of an `up` run: what it sends, and what it reads around it.
#[derive(Debug)]
pub struct UpPlan {
    /// The sends.
    pub sends: UpSends,
    /// The spawned redis processes (one, or every Redis Cluster primary): pid (CPU) and
    /// address (`XLEN`).
    redis: Vec<(u32, SocketAddr)>,
    /// The stream's key in Redis, for `XLEN`, when the sink is Redis.
    stream_key: Option<String>,
    /// The webhook receiver, when the loadtest runs it.
    hook: Option<Arc<Hook>>,
}

/// What was read when the traffic phase began.
pub struct UpPhase {
    began: Instant,
    /// Per redis process, in [`UpPlan::redis`]'s order.
    redis_cpu: Vec<CpuTime>,
    xlen: Option<u64>,
    hook: Option<HookCounts>,
}

/// What the traffic phase cost and made, beyond the node CPU [`crate::run`] reads.
pub struct UpMeasured {
    secs: f64,
    /// Per redis process, in [`UpPlan::redis`]'s order (empty without a spawned redis).
    redis_cpu: Vec<CpuTime>,
    entries: Option<u64>,
    hook: Option<(HookCounts, Vec<u64>)>,
}

/// Runs the `up` scenario.
pub fn run(args: &UpArgs, common: Common, deadline: Deadline) -> Result<()> {
    ensure!(args.users > 0, "--users must be positive");
    ensure!(
        args.rate > 0.0 && args.rate.is_finite(),
        "--rate must be a positive number"
    );
    let count = args
        .msgs
        .unwrap_or((args.rate * args.seconds).round() as u64);
    ensure!(count > 0, "no messages to send: raise --seconds or --msgs");
    ensure!(
        !(args.sink == Some(SinkArg::Redis) && common.without_redis),
        "--sink redis needs redis: drop --without-redis"
    );
    let hook = (args.sink == Some(SinkArg::Webhook))
        .then(Hook::start)
        .transpose()?;
    let mut node_env = Vec::new();
    if args.sink == Some(SinkArg::Redis) {
        node_env.push(("SHARDCAST_UPSTREAM_SINK", "redis".to_owned()));
    }
    if let Some(hook) = &hook {
        node_env.push(("SHARDCAST_UPSTREAM_SINK", "webhook".to_owned()));
        node_env.push(("SHARDCAST_WEBHOOK_URL", format!("http://{}/", hook.addr)));
        node_env.push(("SHARDCAST_WEBHOOK_SECRET", HOOK_SECRET.to_owned()));
    }
    let endpoints = Endpoints::resolve(common, &node_env, deadline)?;
    let redis = endpoints
        .cluster
        .as_ref()
        .map(|c| c.redis())
        .unwrap_or_default();
    let prefix = std::env::var("SHARDCAST_REDIS_PREFIX").unwrap_or_else(|_| "shardcast".into());
    let stream = args.stream.as_deref().unwrap_or("up");
    let plan = Plan {
        scenario: "up",
        population: Population {
            subs: 0,
            users: args.users,
            topic: "bench".to_owned(),
            user_topics: false,
        },
        connect_rate: 0.0,
        settle: Duration::from_secs(1),
        hold: Duration::ZERO,
        fanout: None,
        direct: None,
        churn: None,
        drain: Duration::from_secs(args.drain),
        up: Some(UpPlan {
            sends: UpSends {
                count,
                rate: args.rate,
                size: args.size,
                stream: args.stream.clone(),
            },
            redis,
            stream_key: (args.sink == Some(SinkArg::Redis))
                .then(|| format!("{prefix}:up:{stream}")),
            hook,
        }),
    };
    crate::run::run(&plan, &endpoints, deadline)
}

impl UpPlan {
    /// Reads Redis's CPU and the stream's length, and starts the receiver's count.
    pub fn begin(&self) -> Result<UpPhase> {
        let redis_cpu = self
            .redis
            .iter()
            .map(|&(pid, _)| Probe::pid(pid).cpu())
            .collect::<Result<_>>()?;
        let hook = self.hook.as_ref().map(|hook| {
            hook.measuring.store(true, Ordering::Relaxed);
            hook.counts()
        });
        Ok(UpPhase {
            began: Instant::now(),
            redis_cpu,
            xlen: self.xlen()?,
            hook,
        })
    }

    /// What the phase `begin` started cost and made.
    pub fn end(&self, phase: UpPhase) -> Result<UpMeasured> {
        let redis_cpu = self
            .redis
            .iter()
            .zip(phase.redis_cpu)
            .map(|(&(pid, _), before)| Ok(Probe::pid(pid).cpu()?.since(before)))
            .collect::<Result<_>>()?;
        let entries = self
            .xlen()?
            .zip(phase.xlen)
            .map(|(a, b)| a.saturating_sub(b));
        let hook = self.hook.as_ref().zip(phase.hook).map(|(hook, before)| {
            hook.measuring.store(false, Ordering::Relaxed);
            let batches = hook
                .batches
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            (hook.counts().since(&before), batches)
        });
        Ok(UpMeasured {
            secs: phase.began.elapsed().as_secs_f64(),
            redis_cpu,
            entries,
            hook,
        })
    }

    /// The stream's length, if the sink is the spawned redis (asked of the primary that
    /// serves the key, in a Redis Cluster).
    fn xlen(&self) -> Result<Option<u64>> {
        let Some(key) = &self.stream_key else {
            return Ok(None);
        };
        if self.redis.is_empty() {
            return Ok(None);
        }
        let addrs: Vec<SocketAddr> = self.redis.iter().map(|&(_, addr)| addr).collect();
        match redis_cluster::keyed_command(&addrs, &["XLEN", key])? {
            Reply::Int(n) => Ok(Some(n.try_into().context("XLEN answer")?)),
            other => bail!("XLEN {key} answered {other:?}"),
        }
    }
}

/// The sum of per-process CPU times.
fn sum_cpu(cpus: &[CpuTime]) -> CpuTime {
    cpus.iter().fold(CpuTime::default(), |sum, cpu| CpuTime {
        user: sum.user + cpu.user,
        system: sum.system + cpu.system,
    })
}

/// A reader thread's up messages: the ones it sends, and their answers.
pub struct UpSender {
    sends: UpSends,
    /// Next message number this thread sends.
    next: u64,
    /// This thread's first message number.
    first: u64,
    /// Distance between this thread's message numbers (workers × threads).
    stride: u64,
    /// This thread's connections, by position.
    senders: usize,
    /// Per message of this thread (`(k - first) / stride`): [`crate::traffic::mono_us`]
    /// when it was sent, 0 before it was and once it was answered.
    sent_at: Vec<u64>,
    report: UpCounts,
    latency_us: Histogram<u64>,
}

/// What a reader thread's or a worker's up messages came to.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpCounts {
    /// Sent.
    pub sent: u64,
    /// Answered `ack`.
    pub acked: u64,
    /// Answered `err`, by code.
    pub refused: BTreeMap<String, u64>,
    /// Answers whose `id` matched no message waiting for one.
    pub unmatched: u64,
    /// First send, last send and last answer, [`crate::traffic::mono_us`] (0: none).
    pub first_sent_us: u64,
    /// See `first_sent_us`.
    pub last_sent_us: u64,
    /// See `first_sent_us`.
    pub last_answer_us: u64,
}

/// A worker's up messages, as it reports them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpReport {
    /// The counts.
    pub counts: UpCounts,
    /// Send → answer latency of every answered message, microseconds ([`wire::encode`]).
    pub latency_us: String,
}

impl UpCounts {
    fn merge(&mut self, other: &UpCounts) {
        self.sent += other.sent;
        self.acked += other.acked;
        for (code, n) in &other.refused {
            *self.refused.entry(code.clone()).or_default() += n;
        }
        self.unmatched += other.unmatched;
        self.first_sent_us = match (self.first_sent_us, other.first_sent_us) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.last_sent_us = self.last_sent_us.max(other.last_sent_us);
        self.last_answer_us = self.last_answer_us.max(other.last_answer_us);
    }

    fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }
}

impl UpSender {
    /// The sender of reader thread `thread`, holding `connections` sockets; adds its share
    /// to the worker's sends still to make.
    pub fn new(sends: &UpSends, shared: &Shared, thread: usize, connections: usize) -> Self {
        let stride = (shared.workers * shared.threads) as u64;
        let first = (shared.worker + thread * shared.workers) as u64;
        let mine = sends.count.saturating_sub(first).div_ceil(stride);
        shared.sends_left.fetch_add(mine, Ordering::Relaxed);
        UpSender {
            sends: sends.clone(),
            next: first,
            first,
            stride,
            senders: connections,
            sent_at: vec![0; mine as usize],
            report: UpCounts::default(),
            latency_us: latency_histogram(),
        }
    }

    fn due_at(&self, start_us: u64) -> u64 {
        start_us + (self.next as f64 * 1e6 / self.sends.rate) as u64
    }

    /// Appends the messages due at `now_us`, given the common start time (0: not yet).
    pub fn due(
        &mut self,
        start_us: u64,
        now_us: u64,
        shared: &Shared,
        out: &mut Vec<(usize, String)>,
    ) {
        if start_us == 0 {
            return;
        }
        while self.next < self.sends.count && self.due_at(start_us) <= now_us {
            let k = self.next;
            self.next += self.stride;
            shared.sends_left.fetch_sub(1, Ordering::Relaxed);
            if self.senders == 0 {
                continue;
            }
            let j = ((k - self.first) / self.stride) as usize;
            let t = crate::traffic::mono_us();
            self.sent_at[j] = t;
            if self.report.first_sent_us == 0 {
                self.report.first_sent_us = t;
            }
            self.report.last_sent_us = t;
            out.push((j % self.senders, self.sends.frame(k)));
            self.report.sent += 1;
            shared.sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// When the next message falls due, if one is left.
    pub fn next_due_us(&self, start_us: u64) -> Option<u64> {
        (start_us != 0 && self.next < self.sends.count).then(|| self.due_at(start_us))
    }

    /// An answer arrived at `now_us`: `ack` (`code` none) or `err` with `code`.
    pub fn on_answer(&mut self, id: Option<u64>, code: Option<&str>, now_us: u64) {
        let waiting = id.and_then(|k| {
            let offset = k.checked_sub(self.first)?;
            (offset % self.stride == 0)
                .then(|| (offset / self.stride) as usize)
                .filter(|&j| self.sent_at.get(j).is_some_and(|&t| t != 0))
        });
        let Some(j) = waiting else {
            self.report.unmatched += 1;
            return;
        };
        let sent = std::mem::take(&mut self.sent_at[j]);
        self.latency_us
            .saturating_record(now_us.saturating_sub(sent));
        self.report.last_answer_us = self.report.last_answer_us.max(now_us);
        match code {
            None => self.report.acked += 1,
            Some(code) => *self.report.refused.entry(code.to_owned()).or_default() += 1,
        }
    }
}

/// A worker's up report, from its reader threads' senders.
pub fn gather<'a>(senders: impl Iterator<Item = &'a UpSender>) -> Result<Option<UpReport>> {
    let mut counts: Option<UpCounts> = None;
    let mut latency = latency_histogram();
    for sender in senders {
        counts
            .get_or_insert_with(UpCounts::default)
            .merge(&sender.report);
        latency.add(&sender.latency_us)?;
    }
    counts
        .map(|counts| {
            Ok(UpReport {
                counts,
                latency_us: wire::encode(&latency)?,
            })
        })
        .transpose()
}

/// The receiver's running counts.
#[derive(Clone, Copy, Debug, Default)]
struct HookCounts {
    posts: u64,
    records: u64,
    up_records: u64,
    bytes: u64,
    malformed: u64,
}

impl HookCounts {
    fn since(&self, before: &HookCounts) -> HookCounts {
        HookCounts {
            posts: self.posts - before.posts,
            records: self.records - before.records,
            up_records: self.up_records - before.up_records,
            bytes: self.bytes - before.bytes,
            malformed: self.malformed - before.malformed,
        }
    }
}

/// A webhook receiver for the nodes: an HTTP/1.1 server on a loopback port that answers
/// `200` to every request and counts POSTs and the records in their bodies (JSON arrays of
/// records; `up` ones apart from connection events). A thread per connection (the nodes
/// keep one each); the threads live as long as the process.
#[derive(Debug)]
pub struct Hook {
    addr: SocketAddr,
    posts: AtomicU64,
    records: AtomicU64,
    up_records: AtomicU64,
    bytes: AtomicU64,
    malformed: AtomicU64,
    /// Whether POSTs are counted in `batches` (the traffic phase).
    measuring: AtomicBool,
    /// POSTs by records per POST (the last bucket: that many or more), while measuring.
    batches: Vec<AtomicU64>,
}

/// What the receiver reads of a record.
#[derive(Deserialize)]
struct Record {
    #[serde(rename = "type")]
    kind: String,
}

impl Hook {
    /// Binds a loopback port and starts accepting.
    fn start() -> Result<Arc<Self>> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the webhook receiver")?;
        let hook = Arc::new(Hook {
            addr: listener.local_addr()?,
            posts: AtomicU64::new(0),
            records: AtomicU64::new(0),
            up_records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            measuring: AtomicBool::new(false),
            batches: (0..=BATCH_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        });
        let accepting = hook.clone();
        std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let hook = accepting.clone();
                    // A connection that fails just ends; the nodes open another.
                    let _ = std::thread::Builder::new()
                        .name("webhook-conn".into())
                        .spawn(move || hook.serve(stream));
                }
            })
            .context("starting the webhook receiver")?;
        Ok(hook)
    }

    fn counts(&self) -> HookCounts {
        HookCounts {
            posts: self.posts.load(Ordering::Relaxed),
            records: self.records.load(Ordering::Relaxed),
            up_records: self.up_records.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
        }
    }

    /// Answers the requests of one connection until it closes.
    fn serve(&self, stream: TcpStream) -> Result<()> {
        stream.set_read_timeout(Some(HOOK_READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut body = Vec::new();
        while let Some(length) = read_head(&mut reader)? {
            body.resize(length, 0);
            reader.read_exact(&mut body)?;
            self.count(&body);
            writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
        }
        Ok(())
    }

    /// Counts one POST's body.
    fn count(&self, body: &[u8]) {
        self.posts.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        let Ok(records) = serde_json::from_slice::<Vec<Record>>(body) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let ups = records.iter().filter(|r| r.kind == "up").count();
        self.records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        self.up_records.fetch_add(ups as u64, Ordering::Relaxed);
        if self.measuring.load(Ordering::Relaxed) {
            self.batches[records.len().min(BATCH_BUCKETS)].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads a request's head; returns its `content-length` (0 if none), or `None` at a clean
/// end of the connection.
fn read_head(reader: &mut impl BufRead) -> Result<Option<usize>> {
    let mut line = String::new();
    let mut length = 0;
    let mut first = true;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            ensure!(first, "connection closed inside a request head");
            return Ok(None);
        }
        first = false;
        let header = line.trim_end();
        if header.is_empty() {
            return Ok(Some(length));
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().context("content-length")?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                bail!("chunked bodies are not supported");
            }
        }
    }
}

/// The quantile `q` of a count-per-bucket distribution (bucket `i` holds value `i`).
fn bucket_quantile(buckets: &[u64], q: f64) -> usize {
    let total: u64 = buckets.iter().sum();
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (value, &n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return value;
        }
    }
    0
}

/// The `up` part of a run's report.
pub fn report(
    report: &mut Report,
    plan: &UpPlan,
    reports: &[WorkerReport],
    measured: &UpMeasured,
    node_cpu: Option<CpuTime>,
) -> Result<()> {
    let mut counts = UpCounts::default();
    let mut latency = latency_histogram();
    for up in reports.iter().filter_map(|r| r.up.as_ref()) {
        counts.merge(&up.counts);
        latency.add(wire::decode(&up.latency_us)?)?;
    }
    let sends = &plan.sends;
    let refused = counts.refused_total();
    let unanswered = counts.sent.saturating_sub(counts.acked + refused);
    // Seconds from the first send to `until_us` (at least a microsecond).
    let since_first_send =
        |until_us: u64| until_us.saturating_sub(counts.first_sent_us).max(1) as f64 / 1e6;
    let window = since_first_send(counts.last_answer_us);
    let send_secs = since_first_send(counts.last_sent_us);
    let acked_rate = counts.acked as f64 / window;
    let sent_rate = counts.sent as f64 / send_secs;
    report.row(
        "up messages sent / of",
        format!(
            "{} / {} ({:.0}/s asked, {} bytes of data, stream {})",
            counts.sent,
            sends.count,
            sends.rate,
            sends.size,
            sends.stream.as_deref().unwrap_or("up (default)")
        ),
    );
    report.row(
        "acked / refused / unanswered",
        format!("{} / {refused} / {unanswered}", counts.acked),
    );
    for (code, n) in &counts.refused {
        report.row(&format!("  err {code}"), n);
    }
    if counts.unmatched > 0 {
        report.row("  answers matching no message", counts.unmatched);
    }
    for oddity in reports.iter().flat_map(|r| &r.oddities).take(3) {
        report.row("  refused or unexpected", oddity);
    }
    report.row(
        "sent per second (first send to last)",
        format!("{sent_rate:.0} ({send_secs:.2} s)"),
    );
    report.row(
        "acked per second (first send to last answer)",
        format!("{acked_rate:.0} ({window:.2} s)"),
    );
    report.row(
        "ack latency p50 / p99 / p999 / max",
        crate::run::ms_quantiles(&latency),
    );
    let per_up = |cpu: CpuTime| cpu.total() * 1e6 / counts.acked.max(1) as f64;
    if let Some(cpu) = node_cpu {
        report.row(
            "node CPU per acked up (all nodes)",
            format!(
                "{:.1} µs (user {:.1}, system {:.1})",
                per_up(cpu),
                cpu.user * 1e6 / counts.acked.max(1) as f64,
                cpu.system * 1e6 / counts.acked.max(1) as f64
            ),
        );
    }
    let redis_cpu = (!measured.redis_cpu.is_empty()).then(|| sum_cpu(&measured.redis_cpu));
    if let Some(cpu) = redis_cpu {
        let label = if measured.redis_cpu.len() > 1 {
            "redis CPU per acked up (all primaries)"
        } else {
            "redis CPU per acked up"
        };
        report.row(
            label,
            format!(
                "{:.1} µs ({:.0} % of one core)",
                per_up(cpu),
                cpu.total() / measured.secs * 100.0
            ),
        );
    }
    if measured.redis_cpu.len() > 1 {
        let each: Vec<String> = plan
            .redis
            .iter()
            .zip(&measured.redis_cpu)
            .map(|((_, addr), cpu)| format!("{}: {:.1}", addr.port(), per_up(*cpu)))
            .collect();
        report.row("redis CPU per acked up by primary (µs)", each.join(", "));
    }
    if let Some(entries) = measured.entries {
        report.row(
            "stream entries added (XLEN)",
            format!(
                "{entries} ({})",
                plan.stream_key.as_deref().unwrap_or_default()
            ),
        );
    }
    let mut hook_json = serde_json::Value::Null;
    if let Some((hook, batches)) = &measured.hook {
        let per_post = hook.records as f64 / hook.posts.max(1) as f64;
        report.row(
            "webhook POSTs / records (up) / malformed",
            format!(
                "{} / {} ({}) / {}",
                hook.posts, hook.records, hook.up_records, hook.malformed
            ),
        );
        report.row(
            "records per POST mean / p50 / p99 / max",
            format!(
                "{per_post:.1} / {} / {} / {}",
                bucket_quantile(batches, 0.5),
                bucket_quantile(batches, 0.99),
                bucket_quantile(batches, 1.0)
            ),
        );
        report.row(
            "webhook POSTs per second",
            format!(
                "{:.0} ({:.0} bytes per record)",
                hook.posts as f64 / measured.secs,
                hook.bytes as f64 / hook.records.max(1) as f64
            ),
        );
        hook_json = json!({
            "posts": hook.posts, "records": hook.records, "up_records": hook.up_records,
            "malformed": hook.malformed, "bytes": hook.bytes, "records_per_post": per_post,
            "records_per_post_p50": bucket_quantile(batches, 0.5),
            "records_per_post_p99": bucket_quantile(batches, 0.99),
            "records_per_post_max": bucket_quantile(batches, 1.0),
            "posts_per_sec": hook.posts as f64 / measured.secs,
        });
    }
    report.field(
        "up",
        json!({
            "asked": sends.count, "rate": sends.rate, "size": sends.size,
            "stream": sends.stream, "sent": counts.sent, "acked": counts.acked,
            "refused": counts.refused, "unanswered": unanswered,
            "unmatched": counts.unmatched, "sent_per_sec": sent_rate,
            "acked_per_sec": acked_rate,
            "latency_us": crate::run::quantiles(&latency),
            "node_cpu_us_per_up": node_cpu.map(per_up),
            "redis_cpu_us_per_up": redis_cpu.map(per_up),
            "redis_cpu_us_per_up_by_process": measured.redis_cpu.iter().map(|cpu| per_up(*cpu)).collect::<Vec<_>>(),
            "stream_entries": measured.entries, "webhook": hook_json,
        }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Population;

    fn shared(workers: usize, threads: usize, worker: usize) -> Shared {
        let population = Population {
            subs: 0,
            users: 4,
            topic: "t".into(),
            user_topics: false,
        };
        Shared::new(population, worker, workers, threads, 0, 0, None)
    }

    #[test]
    fn sends_are_split_and_answers_matched() {
        let sends = UpSends {
            count: 10,
            rate: 1e6,
            size: 3,
            stream: Some("s".into()),
        };
        // Worker 1 of 2, thread 0 of 1: messages 1, 3, 5, 7, 9.
        let shared = shared(2, 1, 1);
        let mut sender = UpSender::new(&sends, &shared, 0, 2);
        assert_eq!(shared.sends_left.load(Ordering::Relaxed), 5);
        let mut out = Vec::new();
        sender.due(1, u64::MAX / 2, &shared, &mut out);
        assert_eq!(out.len(), 5);
        assert_eq!(shared.sends_left.load(Ordering::Relaxed), 0);
        assert_eq!(out[0].0, 0);
        assert_eq!(out[1].0, 1);
        let frame: serde_json::Value = serde_json::from_str(&out[1].1).unwrap();
        assert_eq!(frame, json!({"op":"up","id":3,"stream":"s","data":"xxx"}));

        let now = crate::traffic::mono_us();
        sender.on_answer(Some(1), None, now);
        sender.on_answer(Some(3), Some("unavailable"), now);
        sender.on_answer(Some(3), None, now); // answered already
        sender.on_answer(Some(2), None, now); // another worker's
        sender.on_answer(None, Some("bad_request"), now);
        let report = gather([&sender].into_iter()).unwrap().unwrap();
        assert_eq!(report.counts.sent, 5);
        assert_eq!(report.counts.acked, 1);
        assert_eq!(report.counts.refused.get("unavailable"), Some(&1));
        assert_eq!(report.counts.unmatched, 3);
        assert_eq!(wire::decode(&report.latency_us).unwrap().len(), 2);
    }

    #[test]
    fn the_receiver_counts_records_per_post() {
        let hook = Hook::start().unwrap();
        hook.measuring.store(true, Ordering::Relaxed);
        let mut conn = TcpStream::connect(hook.addr).unwrap();
        let mut answers = BufReader::new(conn.try_clone().unwrap());
        for body in [
            r#"[{"type":"up","mid":"1","data":{"a":[1]}},{"type":"connect","mid":"2"}]"#,
            r#"[{"type":"up","mid":"3","data":"x"}]"#,
        ] {
            write!(
                conn,
                "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            assert_eq!(read_head(&mut answers).unwrap(), Some(0));
        }
        let counts = hook.counts();
        assert_eq!((counts.posts, counts.records, counts.up_records), (2, 3, 2));
        let batches: Vec<u64> = hook
            .batches
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!((batches[1], batches[2]), (1, 1));
        assert_eq!(bucket_quantile(&batches, 0.5), 1);
        assert_eq!(bucket_quantile(&batches, 1.0), 2);
    }
}
