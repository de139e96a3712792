//! A worker process (`shardcast-loadtest worker`, started by the coordinator, not by hand):
//! holds its slice of the connections, does its share of the traffic, and reports.
//!
//! 1. Reads its [`Job`] from the first line of stdin; later stdin lines are commands.
//! 2. Opens its connections (connection numbers `worker`, `worker + workers`, ...) over
//!    `threads` threads, reporting [`Progress`] every [`PROGRESS_EVERY`], then
//!    [`Line::Opened`] with its handshake histogram.
//! 3. Hands them to reader threads ([`Traffic`] handlers), starts the churn thread if any,
//!    and on [`wire::START`] sets the common start time: client sends and churn begin.
//! 4. Reports progress at once whenever one more topic publication reached all its
//!    subscribers (the coordinator waits for that in lock-step fan-out), otherwise every
//!    [`PROGRESS_EVERY`].
//! 5. On [`wire::STOP`], the deadline, or stdin closing: stops everything, closes its
//!    connections, writes one [`Line::Done`] and exits.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::churn;
use crate::client::{self, Deadline, Plan, Spread, Target};
use crate::readers::Readers;
use crate::traffic::{latency_histogram, Shared, Traffic};
use crate::wire::{self, Job, Line, Progress, WorkerReport};

/// How often progress is reported when nothing urgent happened.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// How often the worker looks at its counters and commands.
const TICK: Duration = Duration::from_millis(1);

/// Runs a worker process.
pub fn run() -> Result<()> {
    let (job, commands) = read_job()?;
    let deadline = Deadline::after(Duration::from_secs_f64(job.timeout_secs));
    let spread = Spread {
        urls: job
            .urls
            .iter()
            .map(|url| url.parse::<Target>())
            .collect::<Result<_>>()?,
        sources: job.sources.clone(),
    };
    client::check_sources(&spread.sources)?;
    let indices: Vec<usize> = (job.worker..job.population.total())
        .step_by(job.workers)
        .collect();
    let local_subs = indices.iter().filter(|&&i| i < job.population.subs).count();
    let churn_held = job.churn.as_ref().map_or(0, |c| {
        (c.rate * c.life_ms as f64 / 1000.0).ceil() as usize + 16
    });
    client::raise_fd_limit(indices.len() + churn_held)?;

    let opened = AtomicUsize::new(0);
    let opening_done = AtomicBool::new(false);
    let began_us = crate::traffic::mono_us();
    let open_result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !opening_done.load(Ordering::Relaxed) {
                std::thread::sleep(PROGRESS_EVERY);
                let opened = opened.load(Ordering::Relaxed);
                // A closed stdout shows up again when the worker reports at the end.
                let _ = emit(&Line::Progress(Progress {
                    opened,
                    ..Progress::default()
                }));
            }
        });
        let plan = Plan {
            spread: &spread,
            population: &job.population,
            indices: &indices,
            threads: job.threads,
            rate: job.connect_rate,
        };
        let result = client::open_many(&plan, &opened, deadline);
        opening_done.store(true, Ordering::Relaxed);
        result
    });
    let connections = open_result?;
    emit(&Line::Opened {
        began_us,
        ended_us: crate::traffic::mono_us(),
        handshake_us: wire::encode(&connections.handshake_us)?,
    })?;

    let shared = Arc::new(Shared::new(
        job.population.clone(),
        job.worker,
        job.workers,
        connections.groups.len(),
        job.pubs,
        job.direct,
        job.client_sends.clone(),
    ));
    let readers = Readers::spawn(connections.groups, deadline, |thread, numbers| {
        Traffic::new(shared.clone(), thread, numbers, job.up.as_ref())
    })?;
    let stop_churn = AtomicBool::new(false);
    let churned = AtomicU64::new(0);
    let (churn_report, watched) = std::thread::scope(|scope| {
        let churn_thread = job.churn.as_ref().map(|plan| {
            let (spread, shared, stop, churned) = (&spread, &shared, &stop_churn, &churned);
            scope.spawn(move || {
                churn::run(
                    plan,
                    spread,
                    job.worker,
                    &shared.start_us,
                    stop,
                    churned,
                    deadline,
                )
            })
        });
        let watched = watch(&shared, &commands, local_subs, &churned, deadline);
        stop_churn.store(true, Ordering::Relaxed);
        let churn_report = match churn_thread {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow!("the churn thread panicked"))?,
            None => Ok(churn::ChurnReport::default()),
        };
        Ok::<_, anyhow::Error>((churn_report?, watched))
    })?;
    watched?;

    let (handlers, stats, sockets) = readers.stop()?;
    drop(sockets);
    let mut direct_us = latency_histogram();
    let mut fanout_us = latency_histogram();
    let mut fanout_anomalies = 0;
    for handler in &handlers {
        direct_us.add(&handler.direct_us)?;
        fanout_us.add(&handler.fanout_us)?;
        fanout_anomalies += handler.fanout_anomalies;
    }
    let report = WorkerReport {
        progress: progress(
            &shared,
            local_subs,
            &churned,
            opened.load(Ordering::Relaxed),
        ),
        lost: stats.lost,
        lost_reasons: stats.reasons,
        pings: stats.pings,
        send_failures: stats.send_failures,
        acked: shared.acked.load(Ordering::Relaxed),
        refused: shared.refused.load(Ordering::Relaxed),
        unexpected: shared.unexpected.load(Ordering::Relaxed),
        oddities: handlers
            .iter()
            .flat_map(|h| h.oddities.iter().cloned())
            .take(5)
            .collect(),
        direct_duplicates: shared.direct_duplicates.load(Ordering::Relaxed),
        direct_us: wire::encode(&direct_us)?,
        fanout_arrivals: shared
            .fanout_arrivals
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect(),
        fanout_last_us: shared
            .fanout_last_us
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect(),
        fanout_anomalies,
        fanout_us: wire::encode(&fanout_us)?,
        churn: churn_report,
        up: crate::up::gather(handlers.iter().filter_map(|h| h.up.as_ref()))?,
    };
    emit(&Line::Done(Box::new(report)))
}

/// Reads the job line and starts a thread that forwards the later stdin lines.
fn read_job() -> Result<(Job, Receiver<String>)> {
    let mut first = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut first)
        .context("reading the job from stdin")?;
    let job: Job = serde_json::from_str(&first).context("the job line is not a valid job")?;
    let (sender, commands) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    Ok((job, commands))
}

/// Follows commands and reports progress until told to stop (or the deadline).
fn watch(
    shared: &Shared,
    commands: &Receiver<String>,
    local_subs: usize,
    churned: &AtomicU64,
    deadline: Deadline,
) -> Result<()> {
    let mut last_sent = Instant::now();
    let mut last_complete = 0;
    while !deadline.expired() {
        match commands.try_recv() {
            Ok(command) => {
                let mut words = command.split_whitespace();
                match (words.next(), words.next()) {
                    (Some(wire::START), Some(at)) => {
                        let at: u64 = at.parse().context("start time")?;
                        shared.start_us.store(at, Ordering::Relaxed);
                    }
                    (Some(wire::STOP), _) => return Ok(()),
                    _ => bail!("unknown command {command:?}"),
                }
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => return Ok(()),
        }
        let now = progress(shared, local_subs, churned, 0);
        if now.fanout_complete != last_complete || last_sent.elapsed() >= PROGRESS_EVERY {
            last_complete = now.fanout_complete;
            last_sent = Instant::now();
            emit(&Line::Progress(now))?;
        }
        std::thread::sleep(TICK);
    }
    Ok(())
}

/// The counters now (`opened` is only filled in by the caller that knows it).
fn progress(shared: &Shared, local_subs: usize, churned: &AtomicU64, opened: usize) -> Progress {
    let fanout_complete = shared
        .fanout_arrivals
        .iter()
        .take_while(|a| a.load(Ordering::Relaxed) as usize >= local_subs)
        .count();
    Progress {
        opened,
        fanout_complete,
        fanout_delivered: shared
            .fanout_arrivals
            .iter()
            .map(|a| u64::from(a.load(Ordering::Relaxed)))
            .sum(),
        direct_delivered: shared.direct_delivered.load(Ordering::Relaxed),
        sent: shared.sent.load(Ordering::Relaxed),
        sends_done: shared.sends_left.load(Ordering::Relaxed) == 0,
        churned: churned.load(Ordering::Relaxed),
        answered: shared.acked.load(Ordering::Relaxed) + shared.refused.load(Ordering::Relaxed),
    }
}

/// Writes one line to stdout for the coordinator.
fn emit(line: &Line) -> Result<()> {
    let text = serde_json::to_string(line)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}
