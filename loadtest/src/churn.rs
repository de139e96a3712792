//! Churn: a thread of a worker process that opens connections at a steady rate and closes
//! each after a fixed life, while the rest of the run's traffic flows.
//!
//! Churn user `c{worker}x{j}` is opened at `start + j / rate` (the handshake: connect,
//! upgrade, `hello`), held for `life_ms` without being read, then closed: even `j` with a
//! WebSocket close frame, odd `j` by dropping the socket (an abrupt TCP close). A failed
//! handshake is counted with its reason and the schedule goes on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::client::{self, Deadline, Spread, Ws};
use crate::traffic::{latency_histogram, mono_us};
use crate::wire;

/// Failure reasons kept for the report.
const REASONS_KEPT: usize = 5;

/// Longest sleep between checks for a stop.
const MAX_NAP: Duration = Duration::from_millis(20);

/// One worker's churn.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChurnPlan {
    /// Connections opened per second by this worker.
    pub rate: f64,
    /// Milliseconds each is held open.
    pub life_ms: u64,
}

/// What happened to the churn connections.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChurnReport {
    /// Handshakes that succeeded.
    pub opened: u64,
    /// Handshakes that failed.
    pub failed: u64,
    /// Why, for the first few.
    pub reasons: Vec<String>,
    /// Connections closed with a close frame.
    pub closed_clean: u64,
    /// Connections closed by dropping the socket.
    pub closed_abrupt: u64,
    /// Handshake times, microseconds ([`wire::encode`]); empty when none.
    pub handshake_us: String,
}

/// Runs churn until `stop` (or the deadline), starting at `start_us` once it is set; counts
/// each opened connection in `churned`.
pub fn run(
    plan: &ChurnPlan,
    spread: &Spread,
    worker: usize,
    start_us: &AtomicU64,
    stop: &AtomicBool,
    churned: &AtomicU64,
    deadline: Deadline,
) -> Result<ChurnReport> {
    let mut report = ChurnReport::default();
    let mut handshake_us = latency_histogram();
    let mut held: VecDeque<(u64, u64, Ws)> = VecDeque::new();
    let mut j = 0u64;
    while !stop.load(Ordering::Relaxed) && !deadline.expired() {
        let start = start_us.load(Ordering::Relaxed);
        let now = mono_us();
        if start == 0 || now < start {
            std::thread::sleep(MAX_NAP);
            continue;
        }
        while held
            .front()
            .is_some_and(|(close_at, _, _)| *close_at <= now)
        {
            if let Some((_, number, ws)) = held.pop_front() {
                close(number, ws, &mut report);
            }
        }
        let due = start + (j as f64 * 1e6 / plan.rate) as u64;
        if due <= now {
            let (url, source) = spread.route(j as usize);
            let user = format!("c{worker}x{j}");
            let began = mono_us();
            match client::open(url, source, &user, deadline) {
                Ok(ws) => {
                    let opened_at = mono_us();
                    handshake_us.saturating_record(opened_at - began);
                    report.opened += 1;
                    churned.fetch_add(1, Ordering::Relaxed);
                    held.push_back((opened_at + plan.life_ms * 1000, j, ws));
                }
                Err(e) => {
                    report.failed += 1;
                    if report.reasons.len() < REASONS_KEPT {
                        report.reasons.push(format!("{user} to {url}: {e:#}"));
                    }
                }
            }
            j += 1;
            continue;
        }
        let next_close = held.front().map_or(u64::MAX, |(at, _, _)| *at);
        let nap = Duration::from_micros(due.min(next_close).saturating_sub(now));
        std::thread::sleep(nap.min(MAX_NAP));
    }
    for (_, number, ws) in held {
        close(number, ws, &mut report);
    }
    if !handshake_us.is_empty() {
        report.handshake_us = wire::encode(&handshake_us)?;
    }
    Ok(report)
}

/// Closes churn connection `number`: cleanly when even, abruptly when odd.
fn close(number: u64, mut ws: Ws, report: &mut ChurnReport) {
    if number.is_multiple_of(2) {
        // A failed close frame is still a close: the socket is dropped right after.
        let _ = ws.close(None);
        let _ = ws.flush();
        report.closed_clean += 1;
    } else {
        report.closed_abrupt += 1;
    }
}
