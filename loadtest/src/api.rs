//! `api`: HTTP publish to single users, and whether it delays clients.
//!
//! 1. Open `--users` dev-mode connections (users `p0` ..) to the first node, read by reader
//!    threads (`--threads`) that count every text frame, and one more client, the probe.
//! 2. For 2 s with no API load, the probe sends the application `{"op":"ping"}` every 20 ms
//!    and times each `pong`.
//! 3. `--conns` keep-alive HTTP/1.1 connections post `{"users":["p<i>"],"data":..}` to
//!    `/v1/publish` back to back for `--seconds`, each timing its requests, while the probe
//!    keeps pinging.
//! 4. Requests per second is requests over the load's wall time; every request must be
//!    answered 202 and every message read by its user within 10 s of the end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::client::{self, user_name, Deadline, Plan, Population, Spread, Ws};
use crate::http::Api;
use crate::readers::{Handler, Readers};
use crate::report::Report;
use crate::Endpoints;

/// Arguments of `api`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Users online (the recipients).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Concurrent keep-alive HTTP connections.
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// Seconds of probe pings before the load starts.
const IDLE_PROBE: Duration = Duration::from_secs(2);

/// Gap between probe pings.
const PROBE_GAP: Duration = Duration::from_millis(20);

/// Counts text frames.
struct Counter(Arc<AtomicUsize>);

impl Handler for Counter {
    fn on_text(&mut self, _conn: usize, _text: &str) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the scenario against the first node.
pub fn run(args: &Args, endpoints: &Endpoints, deadline: Deadline) -> Result<()> {
    let common = &endpoints.common;
    let (Some(url), Some(&api)) = (endpoints.urls.first(), endpoints.apis.first()) else {
        bail!("the api scenario needs --url and --api (or --spawn-cluster)");
    };
    ensure!(
        args.users > 0 && args.conns > 0,
        "--users and --conns must be positive"
    );
    client::raise_fd_limit(args.users + args.conns + 1)?;

    let spread = Spread {
        urls: vec![url.clone()],
        sources: common.sources.clone(),
    };
    let population = Population {
        subs: 0,
        users: args.users,
        topic: String::new(),
        user_topics: false,
    };
    let indices: Vec<usize> = (0..args.users).collect();
    let plan = Plan {
        spread: &spread,
        population: &population,
        indices: &indices,
        threads: common.threads,
        rate: 0.0,
    };
    let opened = client::open_many(&plan, &AtomicUsize::new(0), deadline)?;
    let delivered = Arc::new(AtomicUsize::new(0));
    let readers = Readers::spawn(opened.groups, deadline, |_, _| Counter(delivered.clone()))?;
    let mut probe = client::open(url, common.sources[0], "probe", deadline)?;
    let idle_rtt = ping_rtts(&mut probe, deadline.cap(IDLE_PROBE))?;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let posters: Vec<_> = (0..args.conns)
        .map(|c| {
            let stop = stop.clone();
            let (key, users, conns) = (common.api_key.clone(), args.users, args.conns);
            std::thread::spawn(move || {
                poster(api, key.as_deref(), c, users, conns, &stop, deadline)
            })
        })
        .collect();
    let loaded = ping_rtts(&mut probe, deadline.cap(Duration::from_secs(args.seconds)));
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut latency = Histogram::<u64>::new(3)?;
    let mut requests = 0;
    for poster in posters {
        let (histogram, sent) = poster
            .join()
            .map_err(|_| anyhow!("a poster thread panicked"))??;
        latency.add(histogram)?;
        requests += sent;
    }
    let loaded_rtt = loaded?;
    let until = Instant::now() + deadline.cap(Duration::from_secs(10));
    while delivered.load(Ordering::Relaxed) < requests && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, stats, _) = readers.stop()?;
    let delivered = delivered.load(Ordering::Relaxed);

    let rps = requests as f64 / elapsed;
    let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q);
    let mut report = Report::new("api");
    report.heading(format!(
        "api: {} keep-alive connections posting to {} users via {api}",
        args.conns, args.users
    ));
    report.row(
        "publish requests",
        format!("{requests} over {elapsed:.1} s = {rps:.0} req/s"),
    );
    report.row("delivered", format!("{delivered} of {requests}"));
    report.row(
        "publish latency p50 / p99 / p999",
        format!(
            "{} / {} / {} us",
            q(&latency, 0.5),
            q(&latency, 0.99),
            q(&latency, 0.999)
        ),
    );
    report.row(
        "client ping RTT, no load, p50 / p99",
        format!("{} / {} us", q(&idle_rtt, 0.5), q(&idle_rtt, 0.99)),
    );
    report.row(
        "client ping RTT, API load, p50 / p99",
        format!("{} / {} us", q(&loaded_rtt, 0.5), q(&loaded_rtt, 0.99)),
    );
    report.row("connections lost", stats.lost);
    for (key, value) in [
        ("requests", json!(requests)),
        ("rps", json!(rps)),
        ("delivered", json!(delivered)),
        ("latency_p50_us", json!(q(&latency, 0.5))),
        ("latency_p99_us", json!(q(&latency, 0.99))),
        ("latency_p999_us", json!(q(&latency, 0.999))),
        ("ping_idle_p50_us", json!(q(&idle_rtt, 0.5))),
        ("ping_idle_p99_us", json!(q(&idle_rtt, 0.99))),
        ("ping_loaded_p50_us", json!(q(&loaded_rtt, 0.5))),
        ("ping_loaded_p99_us", json!(q(&loaded_rtt, 0.99))),
        ("lost", json!(stats.lost)),
    ] {
        report.field(key, value);
    }
    report.print();
    Ok(())
}

/// One keep-alive HTTP connection posting until `stop`: its latency histogram and count.
fn poster(
    addr: SocketAddr,
    key: Option<&str>,
    index: usize,
    users: usize,
    conns: usize,
    stop: &AtomicBool,
    deadline: Deadline,
) -> Result<(Histogram<u64>, usize)> {
    let mut latency = Histogram::<u64>::new(3)?;
    let mut api = Api::connect(addr, key, deadline.left())?;
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) && !deadline.expired() {
        let user = (index + sent * conns) % users;
        let body = json!({"users": [user_name(user)], "data": {"n": sent}}).to_string();
        let started = Instant::now();
        let response = api.post("/v1/publish", &body)?;
        ensure!(
            response.status == 202,
            "publish answered {}: {}",
            response.status,
            response.body
        );
        latency.record(started.elapsed().as_micros() as u64)?;
        sent += 1;
    }
    Ok((latency, sent))
}

/// Round trips of the application `ping` on one connection, one every [`PROBE_GAP`], for
/// `duration`.
fn ping_rtts(ws: &mut Ws, duration: Duration) -> Result<Histogram<u64>> {
    let mut rtt = Histogram::<u64>::new(3)?;
    let until = Instant::now() + duration;
    let mut id = 0u64;
    while Instant::now() < until {
        id += 1;
        let sent = Instant::now();
        ws.send(tungstenite::Message::text(
            json!({"op": "ping", "id": id}).to_string(),
        ))?;
        let pong = loop {
            let reply = client::next_json(ws)?;
            if reply["id"] == id {
                break reply;
            }
            if sent.elapsed() > Duration::from_secs(10) {
                bail!("no pong for ping {id}");
            }
        };
        ensure!(pong["op"] == "pong", "ping {id} answered {pong}");
        rtt.record(sent.elapsed().as_micros() as u64)?;
        std::thread::sleep(PROBE_GAP);
    }
    Ok(rtt)
}
