//! The coordinator: runs one [`Plan`] over worker processes and reports it.
//!
//! 1. Splits the connections over `ceil(total / --per-process)` workers (each holds at most
//!    `--per-process` sockets: `RLIMIT_NOFILE` caps a process) and starts them ([`Fleet`]).
//! 2. Waits until every worker has opened its connections (a progress bar counts them).
//!    Connect time is from the first worker's first connect to the last worker's last.
//! 3. With node pids, reads their RSS and descriptors before and after (summed over nodes):
//!    RSS per connection is the growth over the connection count.
//! 4. Sends every worker the same start time, then drives the traffic the coordinator owns:
//!    topic publications over the API (lock-step: publication `f + 1` only once every worker
//!    reported publication `f` complete; or at a rate), direct messages over the API
//!    (`--api-conns` keep-alive connections, message `k` due at `start + k / rate`; with
//!    `p2p --to topics` published to the recipient's own topic, which it subscribed to
//!    while connecting).
//!    Workers send client `send` frames and churn on their own from the start time.
//! 5. The traffic phase ends once everything was sent and delivered, or `--drain` seconds
//!    after the last send; `connect` instead holds for `--hold` seconds, sampling node CPU.
//! 6. Stops the workers, merges their reports (histograms exactly), prints a table and one
//!    JSON line.
//!
//! With node pids, what the nodes spend ([`cost`](crate::cost)) is measured over the
//! connects (opening, then closing once the workers stop: a connect's cost is both) and
//! over the traffic phase: per connect, and per delivery (`fanout`) or per message (`p2p`).
//!
//! Every wait is bounded by `--timeout`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::churn::ChurnPlan;
use crate::client::{user_name, user_topic, Deadline, Population};
use crate::cost::{Cost, Meter};
use crate::fleet::Fleet;
use crate::http::Api;
use crate::probe::{CpuTime, Probe};
use crate::report::Report;
use crate::traffic::{latency_histogram, mono_us, ClientSends, Stamp};
use crate::wire::{self, Job, Line, Progress, WorkerReport};
use crate::Endpoints;

/// Delay between the start command and the common start time, so every worker has it.
const START_LEAD: Duration = Duration::from_millis(200);

/// Longest wait for the nodes to close their side after the clients left.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Who sends direct messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// `POST /v1/publish` with `{"users":[u],"data":..}`.
    Api,
    /// Client `{"op":"send","to":u,"data":..}` frames.
    Frames,
}

/// Whom the API senders address direct messages to (`p2p --to`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum To {
    /// The user: `{"users":[u],"data":..}`, delivered as a `msg` frame.
    Users,
    /// The user's own topic `t-<user>`, to which every user's connection subscribes once
    /// connected: `{"topics":["t-<user>"],"data":..}`, delivered as a `pub` frame.
    Topics,
}

impl To {
    /// How the report names the messages.
    pub fn messages(self) -> &'static str {
        match self {
            To::Users => "direct messages",
            To::Topics => "topic publications",
        }
    }
}

/// How topic publications are paced.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// One at a time: the next once every subscriber has the previous.
    Lockstep,
    /// So many a second.
    Rate(f64),
}

/// Topic publications of a run.
#[derive(Clone, Copy, Debug)]
pub struct Fanout {
    /// How many.
    pub pubs: usize,
    /// How they are paced.
    pub pace: Pace,
}

/// Direct messages of a run.
#[derive(Clone, Copy, Debug)]
pub struct Direct {
    /// How many.
    pub count: u64,
    /// Per second.
    pub rate: f64,
    /// Who sends them.
    pub via: Via,
    /// Keep-alive API connections when sent over the API.
    pub api_conns: usize,
    /// Messages per API request (more than 1: batch publishes).
    pub batch: usize,
    /// Whom the API addresses them to: the user, or the user's own topic.
    pub to: To,
}

/// One run.
#[derive(Debug)]
pub struct Plan {
    /// Scenario name, for the report.
    pub scenario: &'static str,
    /// The connections.
    pub population: Population,
    /// Handshakes per second, all workers (0: unpaced).
    pub connect_rate: f64,
    /// Wait after the last handshake before reading RSS.
    pub settle: Duration,
    /// Idle hold while sampling node CPU (`connect`).
    pub hold: Duration,
    /// Topic publications.
    pub fanout: Option<Fanout>,
    /// Direct messages.
    pub direct: Option<Direct>,
    /// Churn: connections per second (all workers) and milliseconds each lives.
    pub churn: Option<(f64, u64)>,
    /// Wait for deliveries after the last send.
    pub drain: Duration,
    /// Up messages sent by clients ([`crate::up`]).
    pub up: Option<crate::up::UpPlan>,
}

/// The nodes' memory and descriptors (summed) at one moment.
#[derive(Clone, Copy, Debug)]
struct Snapshot {
    rss: u64,
    fds: usize,
}

fn snapshot(nodes: &[Probe]) -> Result<Option<Snapshot>> {
    if nodes.is_empty() {
        return Ok(None);
    }
    let mut total = Snapshot { rss: 0, fds: 0 };
    for node in nodes {
        total.rss += node.rss_bytes()?;
        total.fds += node.fd_count()?;
    }
    Ok(Some(total))
}

fn cpu(nodes: &[Probe]) -> Result<Option<CpuTime>> {
    if nodes.is_empty() {
        return Ok(None);
    }
    let mut total = CpuTime::default();
    for node in nodes {
        let used = node.cpu()?;
        total.user += used.user;
        total.system += used.system;
    }
    Ok(Some(total))
}

/// What the coordinator's own API senders did.
#[derive(Default)]
struct ApiSent {
    accepted: u64,
    refused: u64,
    refusals: Vec<String>,
    latency_us: Option<Histogram<u64>>,
}

impl ApiSent {
    fn merge(&mut self, other: ApiSent) -> Result<()> {
        self.accepted += other.accepted;
        self.refused += other.refused;
        let room = 5usize.saturating_sub(self.refusals.len());
        self.refusals.extend(other.refusals.into_iter().take(room));
        if let Some(h) = other.latency_us {
            self.latency_us
                .get_or_insert_with(latency_histogram)
                .add(&h)?;
        }
        Ok(())
    }
}

/// Runs `plan` against `endpoints`.
pub fn run(plan: &Plan, endpoints: &Endpoints, deadline: Deadline) -> Result<()> {
    let common = &endpoints.common;
    let total = plan.population.total();
    ensure!(common.threads > 0, "--threads must be at least 1");
    ensure!(
        common.per_process >= 1 && common.per_process <= 19_000,
        "--per-process must be between 1 and 19000 (RLIMIT_NOFILE is capped per process)"
    );
    let workers = total.div_ceil(common.per_process).max(1);
    let needs_api =
        plan.fanout.is_some() || plan.direct.is_some_and(|direct| direct.via == Via::Api);
    ensure!(
        !needs_api || !endpoints.apis.is_empty(),
        "this scenario publishes through the HTTP API: give --api (or use --spawn-cluster)"
    );
    if let Some(direct) = plan.direct.filter(|d| d.via == Via::Frames) {
        ensure!(
            plan.population.users >= 2 * workers * common.threads,
            "--via frames needs at least 2 users per reader thread ({} here)",
            2 * workers * common.threads
        );
        ensure!(direct.count > 0, "--msgs must be positive");
    }
    let nodes: Vec<Probe> = endpoints.pids.iter().copied().map(Probe::pid).collect();
    let before = snapshot(&nodes)?;

    let jobs: Vec<Job> = (0..workers)
        .map(|worker| Job {
            worker,
            workers,
            urls: endpoints.urls.iter().map(|u| u.to_string()).collect(),
            sources: common.sources.clone(),
            threads: common.threads,
            population: plan.population.clone(),
            connect_rate: plan.connect_rate / workers as f64,
            pubs: plan.fanout.map_or(0, |f| f.pubs),
            direct: plan.direct.map_or(0, |d| d.count),
            client_sends: plan
                .direct
                .filter(|d| d.via == Via::Frames)
                .map(|d| ClientSends {
                    count: d.count,
                    rate: d.rate,
                }),
            churn: plan.churn.map(|(rate, life_ms)| ChurnPlan {
                rate: rate / workers as f64,
                life_ms,
            }),
            timeout_secs: deadline.left().as_secs_f64(),
            up: plan.up.as_ref().map(|up| up.sends.clone()),
        })
        .collect();

    let meter = Meter::new(&endpoints.pids, common.strace);
    let opening = meter.start(deadline.at())?;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        )
        .context("progress bar template")?,
    );
    bar.set_prefix("connecting");
    let mut fleet = Fleet::spawn(&jobs)?;
    let mut progress = vec![Progress::default(); workers];
    let mut handshake_us: Histogram<u64> = Histogram::new(3)?;
    let (mut first_began, mut last_ended) = (u64::MAX, 0u64);
    let mut opened = 0;
    while opened < workers {
        let Some((w, line)) = fleet.next(deadline.at())? else {
            bail!(
                "timed out (--timeout) with {} of {total} connections open",
                progress.iter().map(|p| p.opened).sum::<usize>()
            );
        };
        match line {
            Line::Progress(p) => progress[w] = p,
            Line::Opened {
                began_us,
                ended_us,
                handshake_us: encoded,
            } => {
                handshake_us.add(wire::decode(&encoded)?)?;
                first_began = first_began.min(began_us);
                last_ended = last_ended.max(ended_us);
                progress[w].opened = (total - w).div_ceil(workers);
                opened += 1;
            }
            Line::Done(_) => bail!("worker {w} finished before it was told to start"),
        }
        bar.set_position(progress.iter().map(|p| p.opened).sum::<usize>() as u64);
    }
    bar.set_position(total as u64);
    let opened_cost = meter.stop(opening)?;
    let connect_secs = last_ended.saturating_sub(first_began) as f64 / 1e6;
    std::thread::sleep(deadline.cap(plan.settle));
    let after = snapshot(&nodes)?;

    // Traffic.
    let traffic_phase = meter.start(deadline.at())?;
    let cpu_before = cpu(&nodes)?;
    let up_phase = plan.up.as_ref().map(|up| up.begin()).transpose()?;
    let start_us = mono_us() + START_LEAD.as_micros() as u64;
    fleet.command(&format!("{} {start_us}", wire::START))?;
    let traffic_started = Instant::now();
    let expected_deliveries = plan.fanout.map_or(0, |f| f.pubs * plan.population.subs) as u64
        + plan.direct.map_or(0, |d| d.count);
    bar.reset();
    bar.set_prefix(if plan.hold.is_zero() {
        "delivering"
    } else {
        "holding"
    });
    bar.set_length(if plan.hold.is_zero() {
        expected_deliveries
    } else {
        plan.hold.as_secs()
    });

    let api_senders = spawn_api_senders(plan, endpoints, start_us, deadline)?;
    let mut fanout_sent = 0usize;
    let mut cpu_samples = Vec::new();
    let mut watcher = Watcher {
        fleet: &mut fleet,
        progress: &mut progress,
        bar: &bar,
        deadline,
    };
    if let Some(Fanout {
        pubs,
        pace: Pace::Lockstep,
    }) = plan.fanout
    {
        let mut api = Api::connect(
            endpoints.apis[0],
            common.api_key.as_deref(),
            deadline.left(),
        )?;
        for f in 0..pubs {
            publish(&mut api, &plan.population.topic, f as u64)?;
            fanout_sent += 1;
            let until = Instant::now() + deadline.cap(plan.drain);
            watcher.until(until, |p| p.iter().all(|p| p.fanout_complete > f))?;
            watcher.update_bar();
        }
    }
    if !plan.hold.is_zero() {
        cpu_samples.extend(cpu(&nodes)?);
        for second in 1..=plan.hold.as_secs() {
            let until = traffic_started + Duration::from_secs(second);
            watcher.until(until, |_| false)?;
            bar.set_position(second);
            cpu_samples.extend(cpu(&nodes)?);
        }
    }
    // Everything else runs until sent and delivered, or the drain after the last send.
    let all_sent = |p: &[Progress]| p.iter().all(|p| p.sends_done);
    let mut api_sent = ApiSent::default();
    let mut publisher_sent = 0u64;
    for sender in api_senders {
        while !sender.is_finished() {
            watcher.until(Instant::now() + Duration::from_millis(100), |_| false)?;
            watcher.update_bar();
        }
        let (sent, published) = sender
            .join()
            .map_err(|_| anyhow::anyhow!("an API sender panicked"))??;
        api_sent.merge(sent)?;
        publisher_sent += published;
    }
    watcher.until(deadline.at(), all_sent)?;
    fanout_sent += publisher_sent as usize;
    let expected_now = (fanout_sent * plan.population.subs) as u64
        + match plan.direct {
            Some(d) if d.via == Via::Api => api_sent.accepted,
            Some(_) => watcher.progress.iter().map(|p| p.sent).sum(),
            None => 0,
        };
    let drain_until = Instant::now() + deadline.cap(plan.drain);
    let wait_answers = plan.up.is_some();
    watcher.until(drain_until, |p| {
        p.iter()
            .map(|p| p.fanout_delivered + p.direct_delivered)
            .sum::<u64>()
            >= expected_now
            && (!wait_answers || p.iter().all(|p| p.answered >= p.sent))
    })?;
    let up_measured = plan
        .up
        .as_ref()
        .zip(up_phase)
        .map(|(up, phase)| up.end(phase));
    let traffic_secs = traffic_started.elapsed().as_secs_f64();
    let cpu_used = cpu(&nodes)?.zip(cpu_before).map(|(a, b)| a.since(b));
    let traffic_cost = meter.stop(traffic_phase)?;

    // Stop and gather.
    bar.set_prefix("closing");
    let closing = meter.start(deadline.at())?;
    fleet.command(wire::STOP)?;
    let mut reports: Vec<Option<WorkerReport>> = (0..workers).map(|_| None).collect();
    while reports.iter().any(Option::is_none) {
        let Some((w, line)) = fleet.next(deadline.at() + CLOSE_WAIT)? else {
            bail!("timed out waiting for the workers' reports");
        };
        if let Line::Done(report) = line {
            reports[w] = Some(*report);
        }
    }
    fleet.finish();
    bar.finish_and_clear();
    let reports: Vec<WorkerReport> = reports.into_iter().flatten().collect();
    let after_close = match before {
        Some(b) => wait_for_close(&nodes, b.fds, deadline)?,
        None => None,
    };
    let closed_cost = meter.stop(closing)?;

    let mut report = Report::new(plan.scenario);
    report.heading(format!(
        "{}: {total} connections ({} subscribers, {} users) to {} node(s) from {} source \
         address(es), {workers} worker process(es) x {} threads",
        plan.scenario,
        plan.population.subs,
        plan.population.users,
        endpoints.urls.len(),
        common.sources.len(),
        common.threads
    ));
    report.field("conns", json!(total));
    report.field("nodes", json!(endpoints.urls.len()));
    report.field("workers", json!(workers));
    report.field("threads", json!(common.threads));
    report.field("sources", json!(common.sources.len()));
    report_connect(&mut report, total, connect_secs, &handshake_us, plan);
    report_memory(&mut report, total, before, after, after_close);
    if !plan.hold.is_zero() {
        report_idle_cpu(&mut report, &cpu_samples, plan.hold);
    } else if let Some(cpu) = cpu_used {
        report.row(
            "node CPU during traffic",
            format!(
                "{:.2} s ({:.0} % of one core)",
                cpu.total(),
                cpu.total() / traffic_secs * 100.0
            ),
        );
        report.field("node_cpu_secs", json!(cpu.total()));
    }
    report.field("traffic_secs", json!(traffic_secs));
    if plan.fanout.is_some() {
        report_fanout(&mut report, &reports, plan, fanout_sent)?;
    }
    if let Some(direct) = plan.direct {
        report_direct(&mut report, &reports, direct, &api_sent, traffic_secs)?;
    }
    if let (Some(up), Some(measured)) = (&plan.up, up_measured) {
        crate::up::report(&mut report, up, &reports, &measured?, cpu_used)?;
    }
    if plan.churn.is_some() {
        report_churn(&mut report, &reports)?;
    }
    report_connections(&mut report, &reports);
    if let (Some(opened), Some(closed)) = (opened_cost, closed_cost) {
        opened
            .plus(&closed)
            .report(&mut report, "per_connect", "connect", total as u64);
    }
    report_traffic_cost(
        &mut report,
        traffic_cost,
        plan,
        fanout_sent,
        &api_sent,
        &reports,
    );
    report.print();
    Ok(())
}

/// What the nodes spent per delivery (`fanout`) or per message (`p2p`) during the traffic.
fn report_traffic_cost(
    report: &mut Report,
    cost: Option<Cost>,
    plan: &Plan,
    fanout_sent: usize,
    api_sent: &ApiSent,
    reports: &[WorkerReport],
) {
    let Some(cost) = cost else {
        return;
    };
    match (plan.scenario, plan.fanout, plan.direct) {
        ("fanout", Some(_), _) => {
            let deliveries = reports.iter().map(|r| r.progress.fanout_delivered).sum();
            cost.report(report, "per_delivery", "delivery", deliveries);
            cost.report(report, "per_publication", "publication", fanout_sent as u64);
        }
        ("p2p", _, Some(direct)) => {
            let messages = match direct.via {
                Via::Api => api_sent.accepted,
                Via::Frames => reports.iter().map(|r| r.progress.sent).sum(),
            };
            cost.report(report, "per_message", "message", messages);
        }
        _ => {}
    }
}

/// Follows the workers' progress lines.
struct Watcher<'a> {
    fleet: &'a mut Fleet,
    progress: &'a mut Vec<Progress>,
    bar: &'a ProgressBar,
    deadline: Deadline,
}

impl Watcher<'_> {
    /// Reads progress until `done(progress)` holds or `until` passes (not an error); the
    /// deadline passing is.
    fn until(&mut self, until: Instant, done: impl Fn(&[Progress]) -> bool) -> Result<()> {
        while !done(self.progress) {
            if self.deadline.expired() {
                bail!("timed out (--timeout) during the traffic phase");
            }
            let Some((w, line)) = self.fleet.next(until.min(self.deadline.at()))? else {
                return Ok(());
            };
            match line {
                Line::Progress(p) => self.progress[w] = p,
                other => bail!("worker {w} said {other:?} during the traffic phase"),
            }
        }
        Ok(())
    }

    /// Shows deliveries (and churn) so far on the progress bar.
    fn update_bar(&self) {
        let delivered: u64 = self
            .progress
            .iter()
            .map(|p| p.fanout_delivered + p.direct_delivered)
            .sum();
        let churned: u64 = self.progress.iter().map(|p| p.churned).sum();
        self.bar.set_position(delivered);
        if churned > 0 {
            self.bar.set_message(format!("churned {churned}"));
        }
    }
}

/// One topic publication over the API.
fn publish(api: &mut Api, topic: &str, f: u64) -> Result<()> {
    let body = json!({"topics": [topic], "data": Stamp { n: f, t: mono_us() }}).to_string();
    let response = api.post("/v1/publish", &body)?;
    ensure!(
        response.status == 202,
        "publication {f} answered {}: {}",
        response.status,
        response.body
    );
    Ok(())
}

/// An API sender thread: what it sent, and how many topic publications.
type ApiSender = std::thread::JoinHandle<Result<(ApiSent, u64)>>;

/// Starts the coordinator's rate-paced API senders: direct messages (`--api-conns` threads)
/// and rate-paced topic publications (one thread).
fn spawn_api_senders(
    plan: &Plan,
    endpoints: &Endpoints,
    start_us: u64,
    deadline: Deadline,
) -> Result<Vec<ApiSender>> {
    let mut senders = Vec::new();
    let key = endpoints.common.api_key.clone();
    if let Some(direct) = plan.direct.filter(|d| d.via == Via::Api) {
        let conns = direct.api_conns.max(1) as u64;
        for c in 0..conns {
            let (apis, key, users) = (endpoints.apis.clone(), key.clone(), plan.population.users);
            senders.push(std::thread::spawn(move || {
                let mut sent = ApiSent {
                    latency_us: Some(latency_histogram()),
                    ..ApiSent::default()
                };
                let addr = apis[c as usize % apis.len()];
                let mut api = Api::connect(addr, key.as_deref(), deadline.left())?;
                let mine: Vec<u64> = (c..direct.count).step_by(conns as usize).collect();
                for batch in mine.chunks(direct.batch) {
                    let mut items = Vec::with_capacity(batch.len());
                    let mut first_t = 0;
                    for &k in batch {
                        wait_until(start_us + (k as f64 * 1e6 / direct.rate) as u64, deadline)?;
                        let to = crate::traffic::target_of(k, users);
                        let stamp = Stamp { n: k, t: mono_us() };
                        if items.is_empty() {
                            first_t = stamp.t;
                        }
                        items.push(match direct.to {
                            To::Users => json!({"users": [user_name(to)], "data": stamp}),
                            To::Topics => json!({"topics": [user_topic(to)], "data": stamp}),
                        });
                    }
                    let body = if direct.batch > 1 {
                        serde_json::Value::Array(items).to_string()
                    } else {
                        items.pop().expect("one message").to_string()
                    };
                    let response = api.post("/v1/publish", &body)?;
                    if let Some(h) = sent.latency_us.as_mut() {
                        h.saturating_record(mono_us().saturating_sub(first_t));
                    }
                    let refused = match response.status {
                        202 if direct.batch > 1 => {
                            serde_json::from_str::<serde_json::Value>(&response.body)
                                .ok()
                                .and_then(|answers| answers.as_array().cloned())
                                .map_or(batch.len(), |answers| {
                                    answers.iter().filter(|a| a.get("mid").is_none()).count()
                                })
                        }
                        202 => 0,
                        _ => batch.len(),
                    };
                    sent.accepted += (batch.len() - refused) as u64;
                    sent.refused += refused as u64;
                    if refused > 0 && sent.refusals.len() < 5 {
                        sent.refusals
                            .push(format!("{}: {}", response.status, response.body));
                    }
                }
                Ok((sent, 0))
            }));
        }
    }
    if let Some(Fanout {
        pubs,
        pace: Pace::Rate(rate),
    }) = plan.fanout
    {
        let (apis, key, topic) = (
            endpoints.apis.clone(),
            key.clone(),
            plan.population.topic.clone(),
        );
        senders.push(std::thread::spawn(move || {
            let mut conns: Vec<Api> = apis
                .iter()
                .map(|&addr| Api::connect(addr, key.as_deref(), deadline.left()))
                .collect::<Result<_>>()?;
            let count = conns.len();
            for f in 0..pubs as u64 {
                wait_until(start_us + (f as f64 * 1e6 / rate) as u64, deadline)?;
                publish(&mut conns[f as usize % count], &topic, f)?;
            }
            Ok((ApiSent::default(), pubs as u64))
        }));
    }
    Ok(senders)
}

/// Sleeps until [`mono_us`] reaches `due_us`.
fn wait_until(due_us: u64, deadline: Deadline) -> Result<()> {
    deadline.remaining()?;
    let now = mono_us();
    if due_us > now {
        std::thread::sleep(deadline.cap(Duration::from_micros(due_us - now)));
    }
    Ok(())
}

/// Waits until the nodes' descriptor count is back to `baseline` (or [`CLOSE_WAIT`] passed).
fn wait_for_close(
    nodes: &[Probe],
    baseline: usize,
    deadline: Deadline,
) -> Result<Option<Snapshot>> {
    let until = Instant::now() + deadline.cap(CLOSE_WAIT);
    loop {
        let now = snapshot(nodes)?;
        if now.is_none_or(|s| s.fds <= baseline) || Instant::now() >= until {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A latency histogram's quantiles, for the JSON line.
pub fn quantiles(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

/// A latency histogram's p50 / p99 / p999 / max in milliseconds, for the table.
pub fn ms_quantiles(h: &Histogram<u64>) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

fn report_connect(
    report: &mut Report,
    total: usize,
    connect_secs: f64,
    handshake_us: &Histogram<u64>,
    plan: &Plan,
) {
    let rate = total as f64 / connect_secs.max(1e-6);
    report.row(
        "connections per second",
        format!(
            "{rate:.0}  ({connect_secs:.2} s for all{})",
            if plan.connect_rate > 0.0 {
                format!(", paced at {:.0}/s", plan.connect_rate)
            } else {
                String::new()
            }
        ),
    );
    report.row(
        "handshake p50 / p99 / p999 / max",
        ms_quantiles(handshake_us),
    );
    report.field("connect_secs", json!(connect_secs));
    report.field("connects_per_sec", json!(rate));
    report.field("handshake_us", quantiles(handshake_us));
}

fn report_memory(
    report: &mut Report,
    total: usize,
    before: Option<Snapshot>,
    after: Option<Snapshot>,
    after_close: Option<Snapshot>,
) {
    let (Some(b), Some(a)) = (before, after) else {
        return;
    };
    let mib = |bytes: u64| bytes as f64 / 1_048_576.0;
    let per_conn = (a.rss as f64 - b.rss as f64) / total as f64;
    report.row(
        "node RSS before -> connected (all nodes)",
        format!("{:.1} MiB -> {:.1} MiB", mib(b.rss), mib(a.rss)),
    );
    report.row("RSS per connection", format!("{per_conn:.0} bytes"));
    report.row("node descriptors", format!("{} -> {}", b.fds, a.fds));
    report.field("rss_before", json!(b.rss));
    report.field("rss_after", json!(a.rss));
    report.field("rss_per_conn", json!(per_conn));
    report.field("fds_before", json!(b.fds));
    report.field("fds_after", json!(a.fds));
    if let Some(c) = after_close {
        report.row(
            "after closing all: fds, RSS",
            format!(
                "{} fds ({}), {:.1} MiB",
                c.fds,
                if c.fds <= b.fds {
                    "back to baseline"
                } else {
                    "NOT back to baseline"
                },
                mib(c.rss)
            ),
        );
        report.field("fds_after_close", json!(c.fds));
        report.field("rss_after_close", json!(c.rss));
    }
}

fn report_idle_cpu(report: &mut Report, samples: &[CpuTime], hold: Duration) {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return;
    };
    let secs = hold.as_secs_f64();
    let used = last.since(*first);
    let peak = samples
        .windows(2)
        .map(|w| w[1].since(w[0]).total() * 100.0)
        .fold(0.0f64, f64::max);
    report.row(
        "idle node CPU (all nodes)",
        format!(
            "{:.2} % of one core over {secs:.0} s (user {:.2} %, peak second {peak:.1} %)",
            used.total() / secs * 100.0,
            used.user / secs * 100.0
        ),
    );
    report.field("hold_secs", json!(secs));
    report.field("idle_cpu_percent", json!(used.total() / secs * 100.0));
    report.field("idle_cpu_peak_second_percent", json!(peak));
}

fn report_fanout(
    report: &mut Report,
    reports: &[WorkerReport],
    plan: &Plan,
    published: usize,
) -> Result<()> {
    let pubs = plan.fanout.map_or(0, |f| f.pubs);
    let subs = plan.population.subs as u64;
    let mut each = latency_histogram();
    let mut to_last = latency_histogram();
    let mut delivered = 0u64;
    let mut incomplete = 0usize;
    let mut anomalies = 0u64;
    for r in reports {
        each.add(wire::decode(&r.fanout_us)?)?;
        anomalies += r.fanout_anomalies;
    }
    for f in 0..pubs.min(published) {
        let arrivals: u64 = reports
            .iter()
            .filter_map(|r| r.fanout_arrivals.get(f))
            .map(|&a| u64::from(a))
            .sum();
        delivered += arrivals;
        if arrivals >= subs {
            let last = reports
                .iter()
                .filter_map(|r| r.fanout_last_us.get(f))
                .max()
                .copied()
                .unwrap_or(0);
            to_last.saturating_record(last);
        } else {
            incomplete += 1;
        }
    }
    let expected = published as u64 * subs;
    report.row(
        "publications sent / reached everyone",
        format!("{published} / {}", published - incomplete),
    );
    report.row(
        "pub -> last subscriber p50 / p99 / p999 / max",
        ms_quantiles(&to_last),
    );
    report.row("every delivery p50 / p99 / p999 / max", ms_quantiles(&each));
    report.row(
        "topic deliveries / expected / out of order",
        format!("{delivered} / {expected} / {anomalies}"),
    );
    report.field(
        "fanout",
        json!({
            "pubs": published, "incomplete_pubs": incomplete,
            "delivered": delivered, "expected": expected,
            "lost": expected.saturating_sub(delivered), "out_of_order": anomalies,
            "to_last_us": quantiles(&to_last), "each_us": quantiles(&each),
        }),
    );
    Ok(())
}

fn report_direct(
    report: &mut Report,
    reports: &[WorkerReport],
    direct: Direct,
    api_sent: &ApiSent,
    traffic_secs: f64,
) -> Result<()> {
    let mut latency = latency_histogram();
    let mut oddities = Vec::new();
    for r in reports {
        latency.add(wire::decode(&r.direct_us)?)?;
        oddities.extend(r.oddities.iter().cloned());
    }
    let sum = |f: fn(&WorkerReport) -> u64| reports.iter().map(f).sum::<u64>();
    let delivered = sum(|r| r.progress.direct_delivered);
    let duplicates = sum(|r| r.direct_duplicates);
    let (sent, refused) = match direct.via {
        Via::Api => (api_sent.accepted + api_sent.refused, api_sent.refused),
        Via::Frames => (
            sum(|r| r.progress.sent).saturating_sub(sum(|r| r.send_failures)),
            sum(|r| r.refused),
        ),
    };
    oddities.extend(api_sent.refusals.iter().cloned());
    let accepted = sent.saturating_sub(refused);
    let lost = accepted.saturating_sub(delivered);
    report.row(
        &format!("{} sent / refused / of", direct.to.messages()),
        format!(
            "{sent} / {refused} / {} (via {:?}, to {:?}, {:.0}/s asked, {:.0}/s achieved)",
            direct.count,
            direct.via,
            direct.to,
            direct.rate,
            sent as f64 / traffic_secs
        ),
    );
    report.row(
        "delivered / lost / duplicated",
        format!("{delivered} / {lost} / {duplicates}"),
    );
    report.row(
        "delivery latency p50 / p99 / p999 / max",
        ms_quantiles(&latency),
    );
    if let Some(h) = &api_sent.latency_us {
        report.row("API request p50 / p99 / p999 / max", ms_quantiles(h));
    }
    for oddity in oddities.iter().take(5) {
        report.row("  refused or unexpected", oddity);
    }
    report.field(
        "direct",
        json!({
            "via": format!("{:?}", direct.via).to_lowercase(),
            "to": format!("{:?}", direct.to).to_lowercase(), "asked": direct.count,
            "rate": direct.rate, "sent": sent, "refused": refused, "delivered": delivered,
            "lost": lost, "duplicated": duplicates, "latency_us": quantiles(&latency),
            "api_request_us": api_sent.latency_us.as_ref().map(quantiles),
        }),
    );
    Ok(())
}

fn report_churn(report: &mut Report, reports: &[WorkerReport]) -> Result<()> {
    let mut handshake = latency_histogram();
    let (mut opened, mut failed, mut clean, mut abrupt) = (0, 0, 0, 0);
    let mut reasons = Vec::new();
    for r in reports {
        let c = &r.churn;
        if !c.handshake_us.is_empty() {
            handshake.add(wire::decode(&c.handshake_us)?)?;
        }
        opened += c.opened;
        failed += c.failed;
        clean += c.closed_clean;
        abrupt += c.closed_abrupt;
        reasons.extend(c.reasons.iter().cloned());
    }
    report.row(
        "churn connections opened / failed",
        format!("{opened} / {failed} (closed: {clean} with a close frame, {abrupt} abruptly)"),
    );
    report.row(
        "churn handshake p50 / p99 / p999 / max",
        ms_quantiles(&handshake),
    );
    for reason in reasons.iter().take(5) {
        report.row("  churn failure", reason);
    }
    report.field(
        "churn",
        json!({
            "opened": opened, "failed": failed, "closed_clean": clean,
            "closed_abrupt": abrupt, "handshake_us": quantiles(&handshake),
            "failures": reasons.iter().take(5).collect::<Vec<_>>(),
        }),
    );
    Ok(())
}

fn report_connections(report: &mut Report, reports: &[WorkerReport]) {
    let lost: usize = reports.iter().map(|r| r.lost).sum();
    let pings: u64 = reports.iter().map(|r| r.pings).sum();
    let unexpected: u64 = reports.iter().map(|r| r.unexpected).sum();
    report.row(
        "connections lost / server pings answered",
        format!("{lost} / {pings}"),
    );
    for reason in reports.iter().flat_map(|r| &r.lost_reasons).take(5) {
        report.row("  lost", reason);
    }
    report.field("lost", json!(lost));
    report.field("pings", json!(pings));
    report.field("unexpected_frames", json!(unexpected));
}

/// The API addresses given, checked.
pub fn check_apis(apis: &[SocketAddr]) -> Result<()> {
    for api in apis {
        ensure!(
            api.ip().is_loopback(),
            "API address {api} is not in 127.0.0.0/8"
        );
    }
    Ok(())
}
