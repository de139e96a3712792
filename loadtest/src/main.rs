//! `shardcast-loadtest`: a small load driver for the single-node benchmarks in BENCHMARKS.md.
//!
//! * `connect`: opens N idle dev-mode connections over several source addresses and reports
//!   handshakes per second, the node's RSS per connection (VmRSS from `/proc/PID/status`,
//!   after minus before, divided by N) and the node's CPU while they sit idle (utime + stime
//!   from `/proc/PID/stat`).
//! * `fanout`: N subscribers of one topic, then one publisher sends M publications one at a
//!   time; for each, the time from sending the `pub` to the last subscriber reading it, and
//!   the node's CPU time per delivery.
//! * `api`: K keep-alive HTTP connections post `/v1/publish` to single users (N users online,
//!   read by workers) for D seconds: requests per second and request latency; meanwhile one
//!   more client measures `ping` round trips, with and without the API load, to show whether
//!   API traffic stalls client delivery.
//!
//! Connections are spread over worker threads; each worker owns a slice of sockets and waits
//! on them with `poll(2)`, answering pings (tungstenite does) and reading publications.
//! Everything is bounded by `--timeout`.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

#[derive(Parser)]
#[command(about = "Load driver for shardcast")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Node address (loopback only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Source addresses to spread connections over (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.2,127.0.0.3,127.0.0.4"
    )]
    sources: Vec<std::net::IpAddr>,
    /// Worker threads.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// The node's pid, to read its RSS and CPU time.
    #[arg(long)]
    pid: Option<u32>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Subcommand)]
enum Scenario {
    /// N idle connections: handshake rate, RSS per connection, idle CPU.
    Connect {
        #[command(flatten)]
        common: Common,
        /// Connections to open.
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// Seconds to hold them idle while sampling the node's CPU.
        #[arg(long, default_value_t = 20)]
        hold: u64,
    },
    /// N subscribers of one topic; M publications; time to the last delivery.
    Fanout {
        #[command(flatten)]
        common: Common,
        /// Subscribers.
        #[arg(long, default_value_t = 10_000)]
        subs: usize,
        /// Publications.
        #[arg(long, default_value_t = 20)]
        pubs: usize,
        /// Topic name.
        #[arg(long, default_value = "bench")]
        topic: String,
    },
    /// HTTP publish throughput and latency to single users.
    Api {
        #[command(flatten)]
        common: Common,
        /// The node's API address.
        #[arg(long, default_value = "127.0.0.1:8081")]
        api: SocketAddr,
        /// Users online (recipients).
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Concurrent keep-alive HTTP connections.
        #[arg(long, default_value_t = 4)]
        conns: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

type Ws = WebSocket<TcpStream>;

fn main() -> Result<()> {
    match Cli::parse().scenario {
        Scenario::Connect {
            common,
            conns,
            hold,
        } => connect(&common, conns, hold),
        Scenario::Fanout {
            common,
            subs,
            pubs,
            topic,
        } => fanout(&common, subs, pubs, &topic),
        Scenario::Api {
            common,
            api,
            users,
            conns,
            seconds,
        } => api_publish(&common, api, users, conns, seconds),
    }
}

/// Opens one dev-mode connection from `source` and reads its hello.
fn open(addr: SocketAddr, source: std::net::IpAddr, user: &str) -> Result<Ws> {
    if !addr.ip().is_loopback() || !source.is_loopback() {
        bail!("only loopback addresses are allowed");
    }
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&addr.into())?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let url = format!("ws://{addr}/ws?user={user}");
    let (mut ws, _) = tungstenite::client(url, stream).map_err(|e| anyhow::anyhow!("{e}"))?;
    match ws.read()? {
        Message::Text(t) if t.contains("\"hello\"") => Ok(ws),
        other => bail!("expected hello, got {other:?}"),
    }
}

/// Opens `n` connections over `workers` threads; returns them per worker and the time taken.
fn open_all(common: &Common, n: usize, prefix: &str) -> Result<(Vec<Vec<Ws>>, Duration)> {
    let started = Instant::now();
    let handles: Vec<_> = (0..common.workers)
        .map(|w| {
            let common = common.clone();
            let prefix = prefix.to_owned();
            std::thread::spawn(move || -> Result<Vec<Ws>> {
                let mut mine = Vec::new();
                for i in (w..n).step_by(common.workers) {
                    let source = common.sources[i % common.sources.len()];
                    mine.push(
                        open(common.addr, source, &format!("{prefix}{i}"))
                            .with_context(|| format!("connection {i}"))?,
                    );
                }
                Ok(mine)
            })
        })
        .collect();
    let mut per_worker = Vec::new();
    for handle in handles {
        per_worker.push(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("worker panicked"))??,
        );
    }
    Ok((per_worker, started.elapsed()))
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kb * 1024)
}

/// The process's CPU time so far: (user, system) seconds.
fn cpu_times(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((
        fields[11].parse::<f64>()? / hz,
        fields[12].parse::<f64>()? / hz,
    ))
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    cpu_times(pid).map(|(user, system)| user + system)
}

/// Waits on every socket of a worker, handing each text message to `on_text`, until `stop`.
fn pump(sockets: &mut [Ws], stop: &AtomicBool, mut on_text: impl FnMut(&str)) -> Result<()> {
    for ws in sockets.iter_mut() {
        ws.get_mut().set_nonblocking(true)?;
    }
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|ws| libc::pollfd {
            fd: ws.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: fds is a live, correctly sized array of pollfd.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if ready <= 0 {
            continue;
        }
        for (fd, ws) in fds.iter_mut().zip(sockets.iter_mut()) {
            if fd.revents == 0 {
                continue;
            }
            fd.revents = 0;
            loop {
                match ws.read() {
                    Ok(Message::Text(t)) => on_text(&t),
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if e.kind() == std::io::ErrorKind::WouldBlock =>
                    {
                        break
                    }
                    Err(e) => bail!("connection failed: {e}"),
                }
            }
        }
    }
    Ok(())
}

fn connect(common: &Common, conns: usize, hold: u64) -> Result<()> {
    let rss_before = common.pid.map(rss_bytes).transpose()?;
    let (per_worker, took) = open_all(common, conns, "u")?;
    let rate = conns as f64 / took.as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = common.pid.map(rss_bytes).transpose()?;

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = per_worker
        .into_iter()
        .map(|mut sockets| {
            let stop = stop.clone();
            std::thread::spawn(move || pump(&mut sockets, &stop, |_| {}))
        })
        .collect();
    let cpu_before = common.pid.map(cpu_seconds).transpose()?;
    std::thread::sleep(Duration::from_secs(hold.min(common.timeout)));
    let cpu_after = common.pid.map(cpu_seconds).transpose()?;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }

    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / conns as f64),
        _ => None,
    };
    let idle_cpu = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => Some((a - b) / hold as f64 * 100.0),
        _ => None,
    };
    println!("connections          {conns}");
    println!(
        "handshakes/s         {rate:.0}  ({:.2} s for all)",
        took.as_secs_f64()
    );
    if let (Some(b), Some(a), Some(p)) = (rss_before, rss_after, per_conn) {
        println!(
            "node RSS             {:.1} MiB -> {:.1} MiB",
            b as f64 / 1048576.0,
            a as f64 / 1048576.0
        );
        println!("RSS per connection   {p:.0} bytes");
    }
    if let Some(cpu) = idle_cpu {
        println!("idle node CPU        {cpu:.2} % of one core over {hold} s");
    }
    println!(
        "{}",
        json!({"scenario":"connect","conns":conns,"handshakes_per_sec":rate,
               "rss_before":rss_before,"rss_after":rss_after,"rss_per_conn":per_conn,
               "idle_cpu_percent":idle_cpu})
    );
    Ok(())
}

fn fanout(common: &Common, subs: usize, pubs: usize, topic: &str) -> Result<()> {
    let (mut per_worker, took) = open_all(common, subs, "s")?;
    for sockets in &mut per_worker {
        for ws in sockets.iter_mut() {
            ws.send(Message::text(json!({"op":"sub","topic":topic}).to_string()))?;
            match ws.read()? {
                Message::Text(t) if t.contains("\"ack\"") => {}
                other => bail!("expected ack, got {other:?}"),
            }
        }
    }
    let mut publisher = open(common.addr, common.sources[0], "publisher")?;

    let base = Instant::now();
    let arrivals: Arc<Vec<AtomicUsize>> =
        Arc::new((0..pubs).map(|_| AtomicUsize::new(0)).collect());
    let last_us: Arc<Vec<AtomicU64>> = Arc::new((0..pubs).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(per_worker.len() + 1));
    let workers: Vec<_> = per_worker
        .into_iter()
        .map(|mut sockets| {
            let (arrivals, last_us, stop, ready) = (
                arrivals.clone(),
                last_us.clone(),
                stop.clone(),
                ready.clone(),
            );
            std::thread::spawn(move || -> Result<Histogram<u64>> {
                let mut latency = Histogram::<u64>::new(3)?;
                ready.wait();
                pump(&mut sockets, &stop, |text| {
                    let now = base.elapsed().as_micros() as u64;
                    let Ok(msg) = serde_json::from_str::<Value>(text) else {
                        return;
                    };
                    let (Some(seq), Some(sent)) =
                        (msg["data"]["seq"].as_u64(), msg["data"]["t"].as_u64())
                    else {
                        return;
                    };
                    let _ = latency.record(now.saturating_sub(sent));
                    last_us[seq as usize].fetch_max(now, Ordering::Relaxed);
                    arrivals[seq as usize].fetch_add(1, Ordering::Relaxed);
                })?;
                Ok(latency)
            })
        })
        .collect();
    ready.wait();

    let deadline = Instant::now() + Duration::from_secs(common.timeout);
    let cpu_before = common.pid.map(cpu_times).transpose()?;
    let mut to_last = Histogram::<u64>::new(3)?;
    for seq in 0..pubs {
        let sent = base.elapsed().as_micros() as u64;
        let request = json!({"op":"pub","topic":topic,"data":{"seq":seq,"t":sent}});
        publisher.send(Message::text(request.to_string()))?;
        while arrivals[seq].load(Ordering::Relaxed) < subs {
            if Instant::now() > deadline {
                bail!(
                    "publication {seq}: only {} of {subs} delivered",
                    arrivals[seq].load(Ordering::Relaxed)
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        to_last.record(last_us[seq].load(Ordering::Relaxed) - sent)?;
        // Drain the publisher's ack.
        publisher.read()?;
    }
    let cpu_after = common.pid.map(cpu_times).transpose()?;
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new(3)?;
    for worker in workers {
        latency.add(
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("worker panicked"))??,
        )?;
    }
    let deliveries = (subs * pubs) as f64;
    let (cpu_per_delivery_ns, user_per_delivery_ns) = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => (
            Some((a.0 + a.1 - b.0 - b.1) * 1e9 / deliveries),
            Some((a.0 - b.0) * 1e9 / deliveries),
        ),
        _ => (None, None),
    };
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "subscribers              {subs} (connected in {:.2} s)",
        took.as_secs_f64()
    );
    println!("publications             {pubs}");
    println!(
        "pub -> last subscriber   p50 {:.2} ms  max {:.2} ms",
        ms(to_last.value_at_quantile(0.5)),
        ms(to_last.max())
    );
    println!(
        "pub -> each subscriber   p50 {:.2} ms  p99 {:.2} ms",
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99))
    );
    if let (Some(ns), Some(user)) = (cpu_per_delivery_ns, user_per_delivery_ns) {
        println!(
            "node CPU per delivery    {ns:.0} ns (user {user:.0} ns, kernel {:.0} ns)",
            ns - user
        );
    }
    println!(
        "{}",
        json!({"scenario":"fanout","subs":subs,"pubs":pubs,
               "to_last_p50_us":to_last.value_at_quantile(0.5),"to_last_max_us":to_last.max(),
               "each_p50_us":latency.value_at_quantile(0.5),"each_p99_us":latency.value_at_quantile(0.99),
               "cpu_per_delivery_ns":cpu_per_delivery_ns,"user_cpu_per_delivery_ns":user_per_delivery_ns})
    );
    Ok(())
}

/// One keep-alive HTTP/1.1 POST; returns the status. Reads exactly one response.
fn post(stream: &mut TcpStream, path: &str, body: &str) -> Result<u16> {
    use std::io::{Read, Write};
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            bail!("API closed the connection");
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head.get(9..12).context("status line")?.parse()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .context("content-length")?
        .parse()?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(status)
}

/// Round trips of the application `ping` on one connection for `duration`.
fn ping_rtts(ws: &mut Ws, duration: Duration) -> Result<Histogram<u64>> {
    let mut rtt = Histogram::<u64>::new(3)?;
    let until = Instant::now() + duration;
    while Instant::now() < until {
        let sent = Instant::now();
        ws.send(Message::text(r#"{"op":"ping"}"#))?;
        loop {
            if let Message::Text(t) = ws.read()? {
                if t.contains("pong") {
                    break;
                }
            }
        }
        rtt.record(sent.elapsed().as_micros() as u64)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(rtt)
}

fn api_publish(
    common: &Common,
    api: SocketAddr,
    users: usize,
    conns: usize,
    seconds: u64,
) -> Result<()> {
    if !api.ip().is_loopback() {
        bail!("only loopback addresses are allowed");
    }
    let (per_worker, _) = open_all(common, users, "r")?;
    let delivered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = per_worker
        .into_iter()
        .map(|mut sockets| {
            let (delivered, stop) = (delivered.clone(), stop.clone());
            std::thread::spawn(move || {
                pump(&mut sockets, &stop, |_| {
                    delivered.fetch_add(1, Ordering::Relaxed);
                })
            })
        })
        .collect();
    let mut probe = open(common.addr, common.sources[0], "probe")?;
    let idle_rtt = ping_rtts(&mut probe, Duration::from_secs(2))?;

    let load_stop = Arc::new(AtomicBool::new(false));
    let posters: Vec<_> = (0..conns)
        .map(|c| {
            let load_stop = load_stop.clone();
            std::thread::spawn(move || -> Result<(Histogram<u64>, usize)> {
                let mut latency = Histogram::<u64>::new(3)?;
                let mut stream = TcpStream::connect(api)?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut sent = 0;
                while !load_stop.load(Ordering::Relaxed) {
                    let user = (c + sent * conns) % users;
                    let body = format!(r#"{{"users":["r{user}"],"data":{{"n":{sent}}}}}"#);
                    let started = Instant::now();
                    let status = post(&mut stream, "/v1/publish", &body)?;
                    if status != 202 {
                        bail!("publish answered {status}");
                    }
                    latency.record(started.elapsed().as_micros() as u64)?;
                    sent += 1;
                }
                Ok((latency, sent))
            })
        })
        .collect();
    let started = Instant::now();
    let loaded_rtt = ping_rtts(&mut probe, Duration::from_secs(seconds.min(common.timeout)))?;
    load_stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut latency = Histogram::<u64>::new(3)?;
    let mut requests = 0;
    for poster in posters {
        let (histogram, sent) = poster
            .join()
            .map_err(|_| anyhow::anyhow!("poster panicked"))??;
        latency.add(histogram)?;
        requests += sent;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < requests && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    }
    let rps = requests as f64 / elapsed;
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q);
    println!("publish requests         {requests} over {elapsed:.1} s = {rps:.0} req/s ({conns} keep-alive connections)");
    println!(
        "delivered                {} of {requests}",
        delivered.load(Ordering::Relaxed)
    );
    println!(
        "publish latency          p50 {} us  p99 {} us  p999 {} us",
        us(&latency, 0.5),
        us(&latency, 0.99),
        us(&latency, 0.999)
    );
    println!(
        "client ping RTT idle     p50 {} us  p99 {} us",
        us(&idle_rtt, 0.5),
        us(&idle_rtt, 0.99)
    );
    println!(
        "client ping RTT loaded   p50 {} us  p99 {} us",
        us(&loaded_rtt, 0.5),
        us(&loaded_rtt, 0.99)
    );
    println!(
        "{}",
        json!({"scenario":"api","requests":requests,"rps":rps,"delivered":delivered.load(Ordering::Relaxed),
               "latency_p50_us":us(&latency,0.5),"latency_p99_us":us(&latency,0.99),"latency_p999_us":us(&latency,0.999),
               "ping_idle_p50_us":us(&idle_rtt,0.5),"ping_idle_p99_us":us(&idle_rtt,0.99),
               "ping_loaded_p50_us":us(&loaded_rtt,0.5),"ping_loaded_p99_us":us(&loaded_rtt,0.99)})
    );
    Ok(())
}
