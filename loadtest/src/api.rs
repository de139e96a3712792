//! `api`: HTTP publish to single users, and whether it delays clients.
//!
//! 1. Open `--users` dev-mode connections (users `r0` ..), read by reader threads that count
//!    every text frame, and one more client, the probe.
//! 2. For 2 s with no API load, the probe sends the application `{"op":"ping"}` every 20 ms
//!    and times each `pong`.
//! 3. `--conns` keep-alive HTTP/1.1 connections post `{"users":["r<i>"],"data":..}` to
//!    `/v1/publish` back to back for `--seconds`, each timing its requests, while the probe
//!    keeps pinging.
//! 4. Requests per second is requests over the load's wall time; every request must be
//!    answered 202 and every message read by its user within 10 s of the end.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::client::{self, Deadline, Plan, Ws};
use crate::readers::{OnText, Readers};
use crate::Common;

/// Arguments of `api`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// The node's HTTP API address (loopback only).
    #[arg(long, default_value = "127.0.0.1:8081")]
    api: SocketAddr,
    /// API key, if the node has one.
    #[arg(long)]
    api_key: Option<String>,
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

/// Longest HTTP response head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Counts text frames.
struct Counter(Arc<AtomicUsize>);

impl OnText for Counter {
    fn on_text(&mut self, _conn: usize, _text: &str) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the scenario.
pub fn run(args: &Args) -> Result<()> {
    let common = &args.common;
    ensure!(
        args.api.ip().is_loopback(),
        "only loopback API addresses are allowed"
    );
    ensure!(
        args.users > 0 && args.conns > 0,
        "--users and --conns must be positive"
    );
    client::preflight(common, args.users + args.conns + 1)?;
    let deadline = Deadline::after(common.timeout);

    let plan = Plan {
        count: args.users,
        prefix: "r",
        rate: 0.0,
        subscribe: None,
    };
    let opened = client::open_many(common, &plan, deadline)?;
    let delivered = Arc::new(AtomicUsize::new(0));
    let readers = Readers::spawn(opened.groups, deadline, |_| Counter(delivered.clone()))?;
    let mut probe = client::open(&common.url, common.sources[0], "probe", deadline)?;
    let idle_rtt = ping_rtts(&mut probe, deadline.cap(IDLE_PROBE))?;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let posters: Vec<_> = (0..args.conns)
        .map(|c| {
            let stop = stop.clone();
            let (api, key, users, conns) = (args.api, args.api_key.clone(), args.users, args.conns);
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
    println!(
        "api: {} keep-alive connections posting to {} users via {}",
        args.conns, args.users, args.api
    );
    crate::row(
        "publish requests",
        format!("{requests} over {elapsed:.1} s = {rps:.0} req/s"),
    );
    crate::row("delivered", format!("{delivered} of {requests}"));
    crate::row(
        "publish latency p50 / p99 / p999",
        format!(
            "{} / {} / {} us",
            q(&latency, 0.5),
            q(&latency, 0.99),
            q(&latency, 0.999)
        ),
    );
    crate::row(
        "client ping RTT, no load, p50 / p99",
        format!("{} / {} us", q(&idle_rtt, 0.5), q(&idle_rtt, 0.99)),
    );
    crate::row(
        "client ping RTT, API load, p50 / p99",
        format!("{} / {} us", q(&loaded_rtt, 0.5), q(&loaded_rtt, 0.99)),
    );
    crate::row("connections lost", stats.lost);
    println!(
        "{}",
        json!({
            "scenario": "api", "requests": requests, "rps": rps, "delivered": delivered,
            "latency_p50_us": q(&latency, 0.5), "latency_p99_us": q(&latency, 0.99),
            "latency_p999_us": q(&latency, 0.999),
            "ping_idle_p50_us": q(&idle_rtt, 0.5), "ping_idle_p99_us": q(&idle_rtt, 0.99),
            "ping_loaded_p50_us": q(&loaded_rtt, 0.5), "ping_loaded_p99_us": q(&loaded_rtt, 0.99),
            "lost": stats.lost,
        })
    );
    Ok(())
}

/// One keep-alive HTTP connection posting until `stop`: its latency histogram and count.
fn poster(
    api: SocketAddr,
    key: Option<&str>,
    index: usize,
    users: usize,
    conns: usize,
    stop: &AtomicBool,
    deadline: Deadline,
) -> Result<(Histogram<u64>, usize)> {
    let mut latency = Histogram::<u64>::new(3)?;
    let stream = TcpStream::connect_timeout(&api, deadline.cap(Duration::from_secs(10)))
        .with_context(|| format!("connecting to the API at {api}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut stream = BufReader::new(stream);
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) && !deadline.expired() {
        let user = (index + sent * conns) % users;
        let body = json!({"users": [format!("r{user}")], "data": {"n": sent}}).to_string();
        let started = Instant::now();
        let status = post(&mut stream, key, "/v1/publish", &body)?;
        ensure!(status == 202, "publish answered {status}");
        latency.record(started.elapsed().as_micros() as u64)?;
        sent += 1;
    }
    Ok((latency, sent))
}

/// One HTTP/1.1 POST on a keep-alive connection; reads exactly one response, returns its status.
fn post(
    stream: &mut BufReader<TcpStream>,
    key: Option<&str>,
    path: &str,
    body: &str,
) -> Result<u16> {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        stream.get_mut(),
        "POST {path} HTTP/1.1\r\nHost: api\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut status = None;
    let mut length = 0usize;
    let mut head_bytes = 0;
    loop {
        let mut line = String::new();
        let n = stream.read_line(&mut line)?;
        ensure!(n > 0, "the API closed the connection");
        head_bytes += n;
        ensure!(
            head_bytes <= MAX_HEAD_BYTES,
            "response head over {MAX_HEAD_BYTES} bytes"
        );
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if status.is_none() {
            status = Some(
                line.split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse::<u16>().ok())
                    .with_context(|| format!("bad status line {line:?}"))?,
            );
        } else if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().context("content-length")?;
            }
        }
    }
    ensure!(length <= MAX_HEAD_BYTES, "response body of {length} bytes");
    let mut discard = vec![0u8; length];
    stream.read_exact(&mut discard)?;
    status.context("no status line")
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
