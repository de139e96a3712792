//! `fanout`: N subscribers of one topic; one publisher; time to the last delivery.
//!
//! 1. Open N dev-mode connections (users `s0` .. `s{N-1}`) and subscribe each to `--topic`
//!    (waiting for its `ack`); hand them to reader threads.
//! 2. Open one more connection, the publisher (user `publisher`, not subscribed).
//! 3. M times, one at a time: take the send time `t` (microseconds since the run started),
//!    send `{"op":"pub","topic":T,"data":{"seq":k,"t":t},"id":..}`, check the `ack`, and
//!    wait until every subscriber has read publication `k` before sending the next.
//!    A reader stamps each arrival when it reads the frame; a delivery's latency is that
//!    stamp minus `t` (same process, same clock).
//! 4. Per publication: the latency of the last subscriber to get it (the fan-out time) and
//!    of the median subscriber. Across publications: the median and maximum of each.
//! 5. With `--pid`: the node's CPU time (utime + stime) over all publications divided by N×M
//!    is the CPU time per delivery. Heartbeat pings in the window are included (a few per
//!    second at 10,000 connections; negligible next to the deliveries).
//!
//! Every subscriber must get every publication exactly once and in order; the report counts
//! any that did not.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::json;

use crate::client::{self, Deadline, Plan};
use crate::probe::{CpuTime, Probe};
use crate::readers::{OnText, Readers, Stats};
use crate::Common;

/// Arguments of `fanout`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// Subscribers.
    #[arg(long, default_value_t = 10_000)]
    subs: usize,
    /// Publications, sent one at a time.
    #[arg(long, default_value_t = 20)]
    pubs: usize,
    /// Topic name.
    #[arg(long, default_value = "bench")]
    topic: String,
}

/// Largest subscribers × publications (every delivery's latency is kept, 4 bytes each).
const MAX_DELIVERIES: usize = 50_000_000;

/// The part of a publication frame the readers look at.
#[derive(Deserialize)]
struct Publication {
    data: Stamp,
}

#[derive(Deserialize)]
struct Stamp {
    seq: usize,
    t: u64,
}

/// What one reader thread records.
struct Recorder {
    base: Instant,
    arrivals: Arc<Vec<AtomicUsize>>,
    /// Latency of every delivery, microseconds, per publication.
    latency_us: Vec<Vec<u32>>,
    /// Per socket of the group: the next publication it should get.
    next: Vec<usize>,
    /// Deliveries that were duplicated, out of order, or not a publication of this run.
    anomalies: usize,
}

impl OnText for Recorder {
    fn on_text(&mut self, conn: usize, text: &str) {
        let now = self.base.elapsed().as_micros() as u64;
        let Ok(Publication { data }) = serde_json::from_str::<Publication>(text) else {
            self.anomalies += 1;
            return;
        };
        let (Some(latencies), Some(next)) =
            (self.latency_us.get_mut(data.seq), self.next.get_mut(conn))
        else {
            self.anomalies += 1;
            return;
        };
        if data.seq != *next {
            self.anomalies += 1;
        }
        *next = data.seq + 1;
        latencies.push(now.saturating_sub(data.t).min(u32::MAX as u64) as u32);
        self.arrivals[data.seq].fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the scenario.
pub fn run(args: &Args) -> Result<()> {
    let common = &args.common;
    ensure!(
        args.subs > 0 && args.pubs > 0,
        "--subs and --pubs must be positive"
    );
    ensure!(
        args.subs.saturating_mul(args.pubs) <= MAX_DELIVERIES,
        "--subs × --pubs is limited to {MAX_DELIVERIES}"
    );
    client::preflight(common, args.subs + 1)?;
    let deadline = Deadline::after(common.timeout);
    let node = common.pid.map(Probe::pid);
    let me = Probe::this_process();

    let plan = Plan {
        count: args.subs,
        prefix: "s",
        rate: 0.0,
        subscribe: Some(&args.topic),
    };
    let opened = client::open_many(common, &plan, deadline)?;
    let connect_secs = opened.elapsed.as_secs_f64();
    let mut publisher = client::open(&common.url, common.sources[0], "publisher", deadline)
        .context("opening the publisher")?;

    let base = Instant::now();
    let arrivals: Arc<Vec<AtomicUsize>> =
        Arc::new((0..args.pubs).map(|_| AtomicUsize::new(0)).collect());
    let sizes: Vec<usize> = opened.groups.iter().map(Vec::len).collect();
    let readers = Readers::spawn(opened.groups, deadline, |group| Recorder {
        base,
        arrivals: arrivals.clone(),
        latency_us: (0..args.pubs)
            .map(|_| Vec::with_capacity(sizes[group]))
            .collect(),
        next: vec![0; sizes[group]],
        anomalies: 0,
    })?;

    let node_before = node.as_ref().map(Probe::cpu).transpose()?;
    let me_before = me.cpu()?;
    let started = Instant::now();
    for seq in 0..args.pubs {
        let sent = base.elapsed().as_micros() as u64;
        let request = json!({
            "op": "pub", "topic": args.topic, "id": seq + 1,
            "data": {"seq": seq, "t": sent},
        });
        client::request(&mut publisher, &request).with_context(|| format!("publication {seq}"))?;
        while arrivals[seq].load(Ordering::Relaxed) < args.subs {
            if deadline.expired() {
                let got = arrivals[seq].load(Ordering::Relaxed);
                let (_, stats, _) = readers.stop()?;
                bail!(
                    "publication {seq}: {got} of {} subscribers got it before the timeout \
                     ({} connections lost: {:?})",
                    args.subs,
                    stats.lost,
                    stats.reasons
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let node_after = node.as_ref().map(Probe::cpu).transpose()?;
    let me_used = me.cpu()?.since(me_before);
    // Give duplicates a moment to show up before counting.
    std::thread::sleep(Duration::from_millis(200));
    let (recorders, stats, sockets) = readers.stop()?;
    drop(sockets);
    drop(publisher);

    let node_used = node_after.zip(node_before).map(|(a, b)| a.since(b));
    let result = Results::collect(args, recorders)?;
    report(
        args,
        connect_secs,
        wall,
        &result,
        &stats,
        node_used,
        me_used,
    );
    Ok(())
}

/// The run's figures.
struct Results {
    /// Per publication, microseconds to the last subscriber.
    to_last: Histogram<u64>,
    /// Per publication, microseconds to the median subscriber.
    to_median: Histogram<u64>,
    /// Every delivery, microseconds.
    each: Histogram<u64>,
    /// Deliveries beyond one per subscriber and publication.
    duplicates: usize,
    /// Deliveries out of order, repeated or unparseable.
    anomalies: usize,
    /// Subscribers that did not end with the last publication.
    incomplete: usize,
}

impl Results {
    fn collect(args: &Args, recorders: Vec<Recorder>) -> Result<Self> {
        let mut results = Results {
            to_last: Histogram::new(3)?,
            to_median: Histogram::new(3)?,
            each: Histogram::new(3)?,
            duplicates: 0,
            anomalies: recorders.iter().map(|r| r.anomalies).sum(),
            incomplete: recorders
                .iter()
                .flat_map(|r| &r.next)
                .filter(|&&next| next != args.pubs)
                .count(),
        };
        for seq in 0..args.pubs {
            let mut all: Vec<u32> = recorders
                .iter()
                .flat_map(|r| r.latency_us[seq].iter().copied())
                .collect();
            all.sort_unstable();
            results.duplicates += all.len().saturating_sub(args.subs);
            for &us in &all {
                results.each.record(us as u64)?;
            }
            // The publisher waited for `subs` arrivals, so `all` is not empty.
            results.to_last.record(all[all.len() - 1] as u64)?;
            results.to_median.record(all[all.len() / 2] as u64)?;
        }
        Ok(results)
    }
}

fn report(
    args: &Args,
    connect_secs: f64,
    wall: f64,
    r: &Results,
    stats: &Stats,
    node_used: Option<CpuTime>,
    me_used: CpuTime,
) {
    let ms = |us: u64| us as f64 / 1000.0;
    let deliveries = (args.subs * args.pubs) as f64;
    println!(
        "fanout: {} subscribers of {:?}, {} publications to {}",
        args.subs, args.topic, args.pubs, args.common.url
    );
    crate::row(
        "subscribers connected + subscribed",
        format!(
            "in {connect_secs:.2} s ({:.0}/s)",
            args.subs as f64 / connect_secs
        ),
    );
    crate::row(
        "pub -> last subscriber",
        format!(
            "median {:.1} ms, min {:.1} ms, max {:.1} ms",
            ms(r.to_last.value_at_quantile(0.5)),
            ms(r.to_last.min()),
            ms(r.to_last.max())
        ),
    );
    crate::row(
        "pub -> median subscriber",
        format!(
            "median {:.1} ms, max {:.1} ms",
            ms(r.to_median.value_at_quantile(0.5)),
            ms(r.to_median.max())
        ),
    );
    crate::row(
        "every delivery p50 / p99 / max",
        format!(
            "{:.1} / {:.1} / {:.1} ms",
            ms(r.each.value_at_quantile(0.5)),
            ms(r.each.value_at_quantile(0.99)),
            ms(r.each.max())
        ),
    );
    crate::row(
        "deliveries per second",
        format!("{:.0} ({wall:.2} s for all)", deliveries / wall),
    );
    let per_delivery = node_used.map(|cpu| {
        (
            cpu.total() * 1e9 / deliveries,
            cpu.user * 1e9 / deliveries,
            cpu.system * 1e9 / deliveries,
        )
    });
    if let (Some((total, user, system)), Some(cpu)) = (per_delivery, node_used) {
        crate::row(
            "node CPU per delivery",
            format!("{total:.0} ns (user {user:.0} ns, kernel {system:.0} ns)"),
        );
        crate::row(
            "node CPU during publications",
            format!(
                "{:.2} s ({:.0} % of one core)",
                cpu.total(),
                cpu.total() / wall * 100.0
            ),
        );
    }
    crate::row(
        "load generator CPU, same window",
        format!(
            "{:.2} s ({:.0} % of one core)",
            me_used.total(),
            me_used.total() / wall * 100.0
        ),
    );
    crate::row(
        "duplicates / out of order / incomplete",
        format!("{} / {} / {}", r.duplicates, r.anomalies, r.incomplete),
    );
    crate::row("subscriber connections lost", stats.lost);
    for reason in &stats.reasons {
        crate::row("  lost", reason);
    }
    println!(
        "{}",
        json!({
            "scenario": "fanout",
            "subs": args.subs,
            "pubs": args.pubs,
            "workers": args.common.workers,
            "connect_secs": connect_secs,
            "to_last_median_us": r.to_last.value_at_quantile(0.5),
            "to_last_min_us": r.to_last.min(),
            "to_last_max_us": r.to_last.max(),
            "to_median_median_us": r.to_median.value_at_quantile(0.5),
            "to_median_max_us": r.to_median.max(),
            "each_p50_us": r.each.value_at_quantile(0.5),
            "each_p99_us": r.each.value_at_quantile(0.99),
            "each_max_us": r.each.max(),
            "publish_secs": wall,
            "node_cpu_per_delivery_ns": per_delivery.map(|p| p.0),
            "node_user_cpu_per_delivery_ns": per_delivery.map(|p| p.1),
            "node_kernel_cpu_per_delivery_ns": per_delivery.map(|p| p.2),
            "node_cpu_secs": node_used.map(|c| c.total()),
            "loadgen_cpu_secs": me_used.total(),
            "duplicates": r.duplicates,
            "out_of_order": r.anomalies,
            "incomplete": r.incomplete,
            "lost": stats.lost,
        })
    );
}
