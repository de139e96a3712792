//! `connect`: N idle connections; handshake rate, node RSS per connection, idle node CPU.
//!
//! 1. With `--pid`, read the node's RSS and descriptor count (the baseline).
//! 2. Open N dev-mode connections, users `u0` .. `u{N-1}`, over `--workers` threads
//!    (optionally paced to `--rate` handshakes a second). Handshakes per second is N over the
//!    wall time from the first connect to the last `hello`.
//! 3. Hand the sockets to reader threads, which stay idle except for answering the server's
//!    heartbeat pings, and wait `--settle` seconds for the node to finish its bookkeeping.
//! 4. Read RSS again: RSS per connection is (after - baseline) / N. This includes everything
//!    the node allocates per connection in user space and the allocator's overhead for it,
//!    not kernel socket memory.
//! 5. Over `--hold` seconds, read the node's CPU time (utime + stime) once a second. Idle CPU
//!    is the CPU time used over the wall time, in % of one core. The node pings every
//!    connection once per heartbeat interval (25 s by default); the report says how many pings
//!    arrived during the hold, so a reader can tell whether a heartbeat round was inside it.
//! 6. Close every connection and check that the node's descriptor count returns to the
//!    baseline (a leak check), then report RSS after the close.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use crate::client::{self, Deadline, Plan};
use crate::probe::{CpuTime, Probe};
use crate::readers::{Ignore, Readers};
use crate::Common;

/// Arguments of `connect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Seconds to hold them idle while sampling the node's CPU.
    #[arg(long, default_value_t = 20)]
    hold: u64,
    /// Handshakes per second to stay under (0: as fast as the workers go).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds to wait after the last handshake before reading RSS.
    #[arg(long, default_value_t = 2)]
    settle: u64,
}

/// Longest wait for the node to close its side after the clients left.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// The node's memory and descriptors at one moment.
#[derive(Clone, Copy)]
struct Snapshot {
    rss: u64,
    fds: usize,
}

fn snapshot(node: &Probe) -> Result<Snapshot> {
    Ok(Snapshot {
        rss: node.rss_bytes()?,
        fds: node.fd_count()?,
    })
}

/// Runs the scenario.
pub fn run(args: &Args) -> Result<()> {
    let common = &args.common;
    client::preflight(common, args.conns)?;
    let deadline = Deadline::after(common.timeout);
    let node = common.pid.map(Probe::pid);
    let before = node.as_ref().map(snapshot).transpose()?;

    let plan = Plan {
        count: args.conns,
        prefix: "u",
        rate: args.rate,
        subscribe: None,
    };
    let opened = client::open_many(common, &plan, deadline)?;
    let rate = args.conns as f64 / opened.elapsed.as_secs_f64();
    let handshake = opened.handshake_us;
    // Idle connections get no text; count any that arrives.
    let readers = Readers::spawn(opened.groups, deadline, |_| Ignore)?;

    std::thread::sleep(deadline.cap(Duration::from_secs(args.settle)));
    let after = node.as_ref().map(snapshot).transpose()?;

    // Idle CPU, sampled once a second.
    let pings_before = readers.pings();
    let mut samples: Vec<CpuTime> = Vec::new();
    if let Some(node) = &node {
        samples.push(node.cpu()?);
    }
    let hold_started = Instant::now();
    for second in 1..=args.hold {
        let due = hold_started + Duration::from_secs(second);
        std::thread::sleep(deadline.cap(due.saturating_duration_since(Instant::now())));
        if deadline.expired() {
            break;
        }
        if let Some(node) = &node {
            samples.push(node.cpu()?);
        }
    }
    let held = hold_started.elapsed().as_secs_f64();
    let pings_during_hold = readers.pings() - pings_before;
    let end_of_hold = node.as_ref().map(snapshot).transpose()?;

    let (_, stats, sockets) = readers.stop()?;
    let still_open = sockets.len();
    drop(sockets);
    let after_close = match (&node, before) {
        (Some(node), Some(before)) => Some(wait_for_close(node, before.fds, deadline)?),
        _ => None,
    };

    // Report.
    let cpu_pct = |cpu: CpuTime, secs: f64| (cpu.total() / secs * 100.0, cpu.user / secs * 100.0);
    let idle = match (samples.first(), samples.last()) {
        (Some(first), Some(last)) if samples.len() > 1 => Some(cpu_pct(last.since(*first), held)),
        _ => None,
    };
    let peak_second = samples
        .windows(2)
        .map(|w| w[1].since(w[0]).total() * 100.0)
        .fold(None, |peak: Option<f64>, x| {
            Some(peak.map_or(x, |p| p.max(x)))
        });
    let per_conn = match (before, after) {
        (Some(b), Some(a)) => Some((a.rss as f64 - b.rss as f64) / args.conns as f64),
        _ => None,
    };
    let mib = |bytes: u64| bytes as f64 / 1_048_576.0;

    println!("connect: {} idle connections to {}", args.conns, common.url);
    crate::row(
        "handshakes per second",
        format!(
            "{rate:.0}  ({:.2} s for all, {} workers{})",
            opened.elapsed.as_secs_f64(),
            common.workers,
            if args.rate > 0.0 {
                format!(", paced at {:.0}/s", args.rate)
            } else {
                String::new()
            }
        ),
    );
    crate::row(
        "handshake time p50 / p99 / max",
        format!(
            "{} / {} / {} us",
            handshake.value_at_quantile(0.5),
            handshake.value_at_quantile(0.99),
            handshake.max()
        ),
    );
    if let (Some(b), Some(a), Some(p)) = (before, after, per_conn) {
        crate::row(
            "node RSS before -> connected",
            format!("{:.1} MiB -> {:.1} MiB", mib(b.rss), mib(a.rss)),
        );
        crate::row("RSS per connection", format!("{p:.0} bytes"));
        crate::row("node descriptors", format!("{} -> {}", b.fds, a.fds));
    }
    if let Some((total, user)) = idle {
        crate::row(
            "idle node CPU",
            format!(
                "{total:.2} % of one core over {held:.1} s (user {user:.2} %, peak second {:.1} %)",
                peak_second.unwrap_or(0.0)
            ),
        );
    }
    crate::row(
        "server pings during the hold",
        format!("{pings_during_hold} (of {} connections)", args.conns),
    );
    if let Some(e) = end_of_hold {
        crate::row("node RSS at end of hold", format!("{:.1} MiB", mib(e.rss)));
    }
    crate::row(
        "connections lost / texts received",
        format!("{} / {}", stats.lost, stats.texts),
    );
    for reason in &stats.reasons {
        crate::row("  lost", reason);
    }
    if let Some(closed) = after_close {
        crate::row(
            "after closing all: fds, RSS",
            format!(
                "{} fds ({}), {:.1} MiB",
                closed.fds,
                if before.is_some_and(|b| b.fds == closed.fds) {
                    "back to baseline"
                } else {
                    "NOT back to baseline"
                },
                mib(closed.rss)
            ),
        );
    }
    println!(
        "{}",
        json!({
            "scenario": "connect",
            "conns": args.conns,
            "workers": common.workers,
            "sources": common.sources.len(),
            "rate_limit": args.rate,
            "connect_secs": opened.elapsed.as_secs_f64(),
            "handshakes_per_sec": rate,
            "handshake_p50_us": handshake.value_at_quantile(0.5),
            "handshake_p99_us": handshake.value_at_quantile(0.99),
            "handshake_max_us": handshake.max(),
            "rss_before": before.map(|s| s.rss),
            "rss_after": after.map(|s| s.rss),
            "rss_per_conn": per_conn,
            "rss_end_of_hold": end_of_hold.map(|s| s.rss),
            "fds_before": before.map(|s| s.fds),
            "fds_after": after.map(|s| s.fds),
            "hold_secs": held,
            "idle_cpu_percent": idle.map(|i| i.0),
            "idle_cpu_user_percent": idle.map(|i| i.1),
            "idle_cpu_peak_second_percent": peak_second,
            "pings_during_hold": pings_during_hold,
            "lost": stats.lost,
            "texts": stats.texts,
            "open_at_end": still_open,
            "fds_after_close": after_close.map(|s| s.fds),
            "rss_after_close": after_close.map(|s| s.rss),
        })
    );
    Ok(())
}

/// Waits until the node's descriptor count is back to `baseline` (or [`CLOSE_WAIT`] passed).
fn wait_for_close(node: &Probe, baseline: usize, deadline: Deadline) -> Result<Snapshot> {
    let until = Instant::now() + deadline.cap(CLOSE_WAIT);
    loop {
        let now = snapshot(node)?;
        if now.fds <= baseline || Instant::now() >= until {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
