//! The webhook sink against a real HTTP server: a small HTTP/1.1 backend on `127.0.0.1:0`
//! that records each request and answers as the test scripts it (a status, or never).
//! The sink alone through the public API of `shardcast::upstream`, then a node feeding it
//! (`up` messages and connection events). Every wait is bounded.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::Sha256;
use shardcast::metrics::{UpstreamDrop, UpstreamMetrics};
use shardcast::upstream::webhook::{Webhook, WebhookConfig, WebhookUrl};
use shardcast::upstream::{
    Delivery, Device, Happening, Refused, Ticket, Undelivered, UpstreamEvent,
};

const SECRET: &[u8] = b"a-webhook-secret-of-some-length";

/// How the backend answers a request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Status(u16),
    /// Read the request, answer nothing, keep the connection open.
    Hang,
}

/// One request as the backend read it.
#[derive(Debug)]
struct Received {
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn records(&self) -> Vec<Value> {
        match serde_json::from_slice(&self.body).expect("the body is JSON") {
            Value::Array(records) => records,
            other => panic!("the body is not an array: {other}"),
        }
    }
}

/// A scripted HTTP/1.1 backend: `reply(n)` answers the n-th request (from 0).
struct Backend {
    addr: SocketAddr,
    received: mpsc::Receiver<Received>,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(reply: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Backend {
        Self::start_with(None, reply)
    }

    /// A backend serving HTTPS with `tls`.
    fn start_with(
        tls: Option<Arc<rustls::ServerConfig>>,
        reply: impl Fn(usize) -> Reply + Send + Sync + 'static,
    ) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("bound");
        let (sink, received) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let reply = Arc::new(reply);
        let requests = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stop, connections) = (stop.clone(), connections.clone());
            std::thread::spawn(move || {
                let mut handlers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            connections.fetch_add(1, Ordering::Relaxed);
                            let (sink, stop) = (sink.clone(), stop.clone());
                            let (reply, requests) = (reply.clone(), requests.clone());
                            let tls = tls.clone();
                            handlers.push(std::thread::spawn(move || {
                                stream.set_nonblocking(false).expect("blocking");
                                stream
                                    .set_read_timeout(Some(Duration::from_millis(20)))
                                    .expect("read timeout");
                                match tls {
                                    None => serve(stream, &sink, &stop, &*reply, &requests),
                                    Some(tls) => {
                                        let session =
                                            rustls::ServerConnection::new(tls).expect("session");
                                        let stream = rustls::StreamOwned::new(session, stream);
                                        serve(stream, &sink, &stop, &*reply, &requests)
                                    }
                                }
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                for handler in handlers {
                    let _ = handler.join();
                }
            })
        };
        Backend {
            addr,
            received,
            connections,
            stop,
            acceptor: Some(acceptor),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook?x=1", self.addr)
    }

    /// The requests received within `within`, stopping early once there are `n`.
    fn take(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.received.recv_timeout(left) {
                Ok(request) => out.push(request),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Serves one connection: requests one after another (keep-alive) until EOF or stop.
fn serve(
    mut stream: impl Read + Write,
    sink: &mpsc::Sender<Received>,
    stop: &AtomicBool,
    reply: &(dyn Fn(usize) -> Reply + Send + Sync),
    requests: &AtomicUsize,
) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some((request, used)) = parse(&buffer) {
            buffer.drain(..used);
            let answer = reply(requests.fetch_add(1, Ordering::Relaxed));
            let _ = sink.send(request);
            match answer {
                Reply::Status(code) => {
                    let head = format!("HTTP/1.1 {code} Scripted\r\ncontent-length: 0\r\n\r\n");
                    if stream.write_all(head.as_bytes()).is_err() || stream.flush().is_err() {
                        return;
                    }
                }
                Reply::Hang => {}
            }
            continue;
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A whole request at the start of `buffer`, and its length.
fn parse(buffer: &[u8]) -> Option<(Received, usize)> {
    let head_end = buffer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buffer[..head_end]).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let request_line = lines.next().expect("a request line");
    let mut parts = request_line.split(' ');
    assert_eq!(parts.next(), Some("POST"), "{request_line}");
    let target = parts.next().expect("a target").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line.split_once(':').expect("name: value");
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map_or(0, |(_, value)| value.parse().expect("a length"));
    if buffer.len() < head_end + length {
        return None;
    }
    let body = buffer[head_end..head_end + length].to_vec();
    Some((
        Received {
            target,
            headers,
            body,
        },
        head_end + length,
    ))
}

fn config(url: &str) -> WebhookConfig {
    WebhookConfig {
        url: WebhookUrl::parse(url).expect("an http URL"),
        tls: None,
        secret: SECRET.to_vec(),
        queue_max: 1000,
        queue_max_bytes: 1 << 20,
        batch_max: 10,
        batch_max_bytes: 1 << 20,
        batch_linger: Duration::from_millis(20),
        timeout: Duration::from_secs(2),
        retry_max: Duration::from_secs(3),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    }
}

fn device(conn: u64) -> Device {
    Device {
        user: "alice".into(),
        dev: Some("phone".into()),
        conn,
    }
}

/// The `data` every `up` of these tests carries: odd spacing and an escape, to see that it
/// arrives byte for byte.
const DATA: &str = r#"{ "text" : "h\u00e9llo",  "n": [1, 2.50] }"#;

fn record(mid: u64) -> UpstreamEvent {
    let what = match mid % 7 {
        0 => Happening::Up {
            device: device(mid),
            stream: "up".into(),
            data: RawValue::from_string(DATA.into()).expect("JSON"),
        },
        1 => Happening::Connect(device(mid)),
        2 => Happening::Disconnect {
            device: device(mid),
            code: 1008,
            reason: "slow_consumer".into(),
        },
        3 => Happening::Online {
            user: "alice".into(),
        },
        4 => Happening::Offline {
            user: "alice".into(),
        },
        5 => Happening::Sub {
            device: device(mid),
            topic: "room.1".into(),
        },
        _ => Happening::Unsub {
            device: device(mid),
            topic: "room.1".into(),
        },
    };
    UpstreamEvent {
        mid,
        node: "n1".into(),
        ts: 1_764_590_000_000 + mid,
        what,
    }
}

fn up(mid: u64) -> UpstreamEvent {
    record(mid * 7)
}

/// The ticket's outcome, failing the test if it takes longer than `within`.
fn outcome(mut ticket: Ticket, within: Duration) -> Delivery {
    let deadline = Instant::now() + within;
    loop {
        if let Some(delivery) = ticket.try_outcome() {
            return delivery;
        }
        assert!(Instant::now() < deadline, "no outcome within {within:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every accepted record is settled once or still held.
fn assert_balanced(metrics: &UpstreamMetrics) {
    assert_eq!(
        metrics.appended.get(),
        metrics.delivered.get() + metrics.failed() + metrics.queue_depth.get() as u64,
        "appended = delivered + failed + held: {metrics:?}"
    );
}

fn verify(body: &[u8], header: &str, secret: &[u8]) -> bool {
    let hex = header.strip_prefix("sha256=").expect("sha256= prefix");
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

#[test]
fn batches_are_signed_json_arrays_of_every_field() {
    let backend = Backend::start(|_| Reply::Status(200));
    let metrics = Arc::new(UpstreamMetrics::default());
    let webhook = Webhook::start(
        WebhookConfig {
            batch_linger: Duration::from_millis(200),
            ..config(&backend.url())
        },
        metrics.clone(),
    )
    .unwrap();
    let sender = webhook.sender();
    let mut tickets = Vec::new();
    for mid in 0..25 {
        let record = record(mid);
        if mid % 7 == 0 {
            tickets.push(sender.try_send(record).unwrap());
        } else {
            sender.try_send_unacked(record).unwrap();
        }
    }
    for ticket in tickets {
        assert_eq!(outcome(ticket, Duration::from_secs(5)), Ok(()));
    }
    let requests = backend.take(3, Duration::from_secs(5));
    assert!(
        backend.take(1, Duration::from_millis(100)).is_empty(),
        "25 records in batches of 10 take at most 3 POSTs"
    );
    let mut records = Vec::new();
    for request in &requests {
        assert_eq!(request.target, "/hook?x=1");
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(
            request.header("host"),
            Some(backend.addr.to_string().as_str())
        );
        assert!(request
            .header("user-agent")
            .unwrap()
            .starts_with("shardcast/"));
        let signature = request.header("x-shardcast-signature").unwrap();
        assert!(verify(&request.body, signature, SECRET), "signed");
        assert!(!verify(&request.body, signature, b"another secret"));
        let body = std::str::from_utf8(&request.body).unwrap();
        assert_eq!(
            body.matches(DATA).count(),
            request
                .records()
                .iter()
                .filter(|r| r["type"] == "up")
                .count(),
            "data byte for byte"
        );
        assert!(request.records().len() <= 10);
        records.extend(request.records());
    }
    assert_eq!(records.len(), 25);
    let keys =
        |record: &Value| -> Vec<String> { record.as_object().unwrap().keys().cloned().collect() };
    for (mid, record) in records.iter().enumerate() {
        assert_eq!(record["mid"], mid.to_string(), "in order, ids as strings");
        assert_eq!(record["node"], "n1");
        assert_eq!(record["ts"], 1_764_590_000_000u64 + mid as u64);
        assert_eq!(record["user"], "alice");
        let mut fields = keys(record);
        fields.sort();
        let expected: &[&str] = match mid % 7 {
            0 => &[
                "conn", "data", "dev", "mid", "node", "stream", "ts", "type", "user",
            ],
            1 => &["conn", "dev", "mid", "node", "ts", "type", "user"],
            2 => &[
                "code", "conn", "dev", "mid", "node", "reason", "ts", "type", "user",
            ],
            3 | 4 => &["mid", "node", "ts", "type", "user"],
            _ => &["conn", "dev", "mid", "node", "topic", "ts", "type", "user"],
        };
        assert_eq!(fields, expected, "{record}");
    }
    assert_eq!(records[0]["type"], "up");
    assert_eq!(records[0]["data"]["text"], "héllo");
    assert_eq!(records[0]["conn"], "0");
    assert_eq!(records[0]["dev"], "phone");
    assert_eq!(records[2]["type"], "disconnect");
    assert_eq!(records[2]["code"], 1008);
    assert_eq!(records[2]["reason"], "slow_consumer");
    assert_eq!(records[5]["topic"], "room.1");

    assert_eq!(metrics.appended.get(), 25);
    assert_eq!(metrics.delivered.get(), 25);
    assert_eq!(metrics.requests.get(), requests.len() as u64);
    assert_eq!(metrics.retries.get(), 0);
    assert_eq!(metrics.queue_depth.get(), 0);
    assert_eq!(metrics.queue_bytes.get(), 0);
    assert_eq!(metrics.in_flight.get(), 0);
    assert_balanced(&metrics);
    assert_eq!(
        backend.connections.load(Ordering::Relaxed),
        1,
        "one kept-alive connection"
    );
}

#[test]
fn batches_keep_within_their_bytes_and_a_larger_record_goes_alone() {
    let backend = Backend::start(|_| Reply::Status(200));
    let weight = up(1).weight();
    let webhook = Webhook::start(
        WebhookConfig {
            batch_max_bytes: weight * 5 / 2,
            batch_linger: Duration::from_millis(200),
            ..config(&backend.url())
        },
        Arc::default(),
    )
    .unwrap();
    let sender = webhook.sender();
    let big = UpstreamEvent {
        what: Happening::Up {
            device: device(99),
            stream: "up".into(),
            data: RawValue::from_string(format!("\"{}\"", "x".repeat(weight * 3))).unwrap(),
        },
        ..up(99)
    };
    let mut tickets: Vec<Ticket> = (0..5).map(|n| sender.try_send(up(n)).unwrap()).collect();
    tickets.push(sender.try_send(big).unwrap());
    tickets.push(sender.try_send(up(6)).unwrap());
    for ticket in tickets {
        assert_eq!(outcome(ticket, Duration::from_secs(5)), Ok(()));
    }
    let sizes: Vec<usize> = backend
        .take(10, Duration::from_millis(300))
        .iter()
        .map(|r| r.records().len())
        .collect();
    assert_eq!(sizes, [2, 2, 1, 1, 1], "two fit; the big one alone");
    assert_eq!(webhook.metrics().delivered.get(), 7);
}

#[test]
fn a_5xx_or_429_is_retried_and_the_up_acked_once() {
    let backend = Backend::start(|n| match n {
        0 => Reply::Status(500),
        1 => Reply::Status(429),
        _ => Reply::Status(204),
    });
    let webhook = Webhook::start(config(&backend.url()), Arc::default()).unwrap();
    let ticket = webhook.sender().try_send(up(1)).unwrap();
    // The ticket needs no tokio runtime: any executor polls it. The sink resolves it within
    // its retry time, so this wait is bounded.
    assert_eq!(futures_lite::future::block_on(ticket), Ok(()));
    let requests = backend.take(3, Duration::from_secs(5));
    assert_eq!(requests.len(), 3);
    assert!(
        backend.take(1, Duration::from_millis(100)).is_empty(),
        "nothing after the 2xx"
    );
    assert!(
        requests.iter().all(|r| r.body == requests[0].body),
        "same batch"
    );
    let metrics = webhook.metrics();
    assert_eq!(metrics.requests.get(), 3);
    assert_eq!(metrics.retries.get(), 2);
    assert_eq!(metrics.delivered.get(), 1, "acked once");
    assert_eq!(metrics.failed(), 0);
    assert_balanced(metrics);
}

#[test]
fn a_glommio_task_awaits_its_ticket() {
    // What a shard does: the sink's thread wakes the task through glommio's foreign-wake
    // path, so the executor sleeps while it waits.
    let backend = Backend::start(|_| Reply::Status(200));
    let webhook = Webhook::start(config(&backend.url()), Arc::default()).unwrap();
    let sender = webhook.sender();
    let shard = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(1 << 20)
        .spawn(move || async move {
            let ticket = sender.try_send(up(1)).expect("room in the queue");
            ticket.await
        })
        .unwrap();
    // The sink settles every record within its retry time: this join is bounded.
    assert_eq!(shard.join().unwrap(), Ok(()));
    assert_eq!(webhook.metrics().delivered.get(), 1);
}

#[test]
fn a_4xx_drops_the_batch_and_counts_it() {
    let backend = Backend::start(|_| Reply::Status(400));
    let webhook = Webhook::start(config(&backend.url()), Arc::default()).unwrap();
    let sender = webhook.sender();
    let ticket = sender.try_send(up(1)).unwrap();
    assert_eq!(
        outcome(ticket, Duration::from_secs(5)),
        Err(Undelivered::Rejected(400))
    );
    assert_eq!(
        backend.take(2, Duration::from_millis(200)).len(),
        1,
        "no retry"
    );
    let metrics = webhook.metrics();
    assert_eq!(metrics.drops(UpstreamDrop::Rejected), 1);
    assert_eq!(metrics.retries.get(), 0);
    assert_eq!(metrics.delivered.get(), 0);
    assert_eq!(metrics.queue_depth.get(), 0);
    assert_balanced(metrics);
}

#[test]
fn a_hanging_webhook_times_out_then_the_batch_is_dropped() {
    let backend = Backend::start(|_| Reply::Hang);
    let webhook = Webhook::start(
        WebhookConfig {
            timeout: Duration::from_millis(100),
            retry_max: Duration::from_millis(600),
            ..config(&backend.url())
        },
        Arc::default(),
    )
    .unwrap();
    let started = Instant::now();
    let ticket = webhook.sender().try_send(up(1)).unwrap();
    assert_eq!(
        outcome(ticket, Duration::from_secs(5)),
        Err(Undelivered::RetriesExhausted)
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "retried for about retry_max, then gave up: {took:?}"
    );
    let metrics = webhook.metrics();
    let requests = metrics.requests.get();
    assert!(requests >= 3, "timed out and retried: {requests} requests");
    assert_eq!(metrics.retries.get(), requests - 1);
    assert_eq!(metrics.drops(UpstreamDrop::RetriesExhausted), 1);
    assert_eq!(
        backend.connections.load(Ordering::Relaxed) as u64,
        requests,
        "a connection that timed out is not reused"
    );
    assert_eq!(metrics.in_flight.get(), 0);
    assert_balanced(metrics);
}

#[test]
fn records_queued_behind_a_failing_backend_expire_together() {
    let backend = Backend::start(|_| Reply::Hang);
    let webhook = Webhook::start(
        WebhookConfig {
            batch_max: 1,
            batch_linger: Duration::ZERO,
            timeout: Duration::from_millis(100),
            retry_max: Duration::from_millis(400),
            ..config(&backend.url())
        },
        Arc::default(),
    )
    .unwrap();
    let sender = webhook.sender();
    let started = Instant::now();
    let tickets: Vec<Ticket> = (0..20).map(|n| sender.try_send(up(n)).unwrap()).collect();
    for ticket in tickets {
        assert_eq!(
            outcome(ticket, Duration::from_secs(5)),
            Err(Undelivered::RetriesExhausted)
        );
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "within about one retry time, not one per batch: {took:?}"
    );
    let metrics = webhook.metrics();
    assert_eq!(metrics.drops(UpstreamDrop::RetriesExhausted), 20);
    assert!(
        metrics.requests.get() <= 8,
        "the first batch's tries only: {}",
        metrics.requests.get()
    );
    assert_balanced(metrics);
}

#[test]
fn a_dead_webhook_is_retried_then_the_batch_is_dropped() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let webhook = Webhook::start(
        WebhookConfig {
            retry_max: Duration::from_millis(300),
            ..config(&url)
        },
        Arc::default(),
    )
    .unwrap();
    let ticket = webhook.sender().try_send(up(1)).unwrap();
    assert_eq!(
        outcome(ticket, Duration::from_secs(5)),
        Err(Undelivered::RetriesExhausted)
    );
    let metrics = webhook.metrics();
    assert!(metrics.retries.get() >= 1, "{metrics:?}");
    assert_eq!(metrics.drops(UpstreamDrop::RetriesExhausted), 1);
    assert_balanced(metrics);
}

#[test]
fn a_full_queue_refuses_at_once_and_counts() {
    let backend = Backend::start(|_| Reply::Hang);
    let webhook = Webhook::start(
        WebhookConfig {
            queue_max: 4,
            batch_max: 2,
            batch_linger: Duration::ZERO,
            timeout: Duration::from_secs(30),
            retry_max: Duration::from_secs(60),
            ..config(&backend.url())
        },
        Arc::default(),
    )
    .unwrap();
    let sender = webhook.sender();
    let tickets: Vec<Ticket> = (0..4).map(|n| sender.try_send(up(n)).unwrap()).collect();
    assert_eq!(
        backend.take(1, Duration::from_secs(5)).len(),
        1,
        "in flight"
    );
    // A refusal takes microseconds; the bounds leave room for a busy machine and are far
    // below the 30 s a caller waiting on the hanging backend would take.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for n in 0..1000 {
        let call = Instant::now();
        assert_eq!(sender.try_send(up(n)).unwrap_err(), Refused::Full);
        slowest = slowest.max(call.elapsed());
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "1000 refusals took {took:?}");
    assert!(
        slowest < Duration::from_millis(250),
        "slowest refusal {slowest:?}"
    );
    let metrics = webhook.metrics();
    assert_eq!(metrics.drops(UpstreamDrop::QueueFull), 1000);
    assert_eq!(metrics.appended.get(), 4);
    assert_eq!(metrics.queue_depth.get(), 4);
    assert_eq!(metrics.in_flight.get(), 1);
    assert_balanced(metrics);
    for mut ticket in tickets {
        assert_eq!(ticket.try_outcome(), None, "still held");
    }
}

#[test]
fn the_byte_bound_refuses_but_an_empty_queue_takes_any_record() {
    let backend = Backend::start(|_| Reply::Hang);
    let weight = up(1).weight();
    let webhook = Webhook::start(
        WebhookConfig {
            queue_max_bytes: weight / 2,
            timeout: Duration::from_secs(30),
            retry_max: Duration::from_secs(60),
            ..config(&backend.url())
        },
        Arc::default(),
    )
    .unwrap();
    let sender = webhook.sender();
    sender.try_send_unacked(up(1)).unwrap();
    assert_eq!(sender.try_send_unacked(up(2)), Err(Refused::Full));
    assert_eq!(webhook.metrics().queue_bytes.get(), weight as i64);
}

#[test]
fn dropping_the_sink_stops_it_at_once_and_counts_what_it_held() {
    let backend = Backend::start(|_| Reply::Hang);
    let webhook = Webhook::start(
        WebhookConfig {
            batch_max: 2,
            batch_linger: Duration::ZERO,
            timeout: Duration::from_secs(30),
            retry_max: Duration::from_secs(60),
            ..config(&backend.url())
        },
        Arc::default(),
    )
    .unwrap();
    let sender = webhook.sender();
    let metrics = webhook.metrics().clone();
    let tickets: Vec<Ticket> = (0..5).map(|n| sender.try_send(up(n)).unwrap()).collect();
    assert_eq!(
        backend.take(1, Duration::from_secs(5)).len(),
        1,
        "in flight"
    );
    let started = Instant::now();
    drop(webhook);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "stopping took {took:?}");
    for ticket in tickets {
        assert_eq!(
            outcome(ticket, Duration::from_secs(1)),
            Err(Undelivered::Stopped)
        );
    }
    assert_eq!(metrics.drops(UpstreamDrop::Shutdown), 5);
    assert_eq!(metrics.queue_depth.get(), 0);
    assert_eq!(metrics.in_flight.get(), 0);
    assert_balanced(&metrics);
    assert_eq!(sender.try_send(up(9)).unwrap_err(), Refused::Stopped);
    assert_eq!(metrics.drops(UpstreamDrop::Shutdown), 6, "counted too");
    assert_eq!(metrics.appended.get(), 5);
}

#[test]
fn stopping_with_grace_delivers_what_is_queued() {
    let backend = Backend::start(|_| Reply::Status(200));
    let webhook = Webhook::start(
        WebhookConfig {
            batch_max: 3,
            batch_linger: Duration::ZERO,
            ..config(&backend.url())
        },
        Arc::default(),
    )
    .unwrap();
    let sender = webhook.sender();
    let metrics = webhook.metrics().clone();
    for mid in 0..50 {
        sender.try_send_unacked(record(mid)).unwrap();
    }
    webhook.stop(Duration::from_secs(5));
    assert_eq!(metrics.delivered.get(), 50);
    assert_eq!(metrics.failed(), 0);
    let received: usize = backend
        .take(50, Duration::from_secs(1))
        .iter()
        .map(|r| r.records().len())
        .sum();
    assert_eq!(received, 50);
    assert_eq!(sender.try_send_unacked(record(50)), Err(Refused::Stopped));
}

/// Every record delivered, one per POST and 100 per POST; prints the throughput. Measured
/// at the scale BENCHMARKS.md names: `MEASURE_SCALE=25 cargo test --release --test webhook
/// -- --nocapture --test-threads=1 throughput` (about a second per run).
#[test]
fn throughput() {
    let scale = common::measure_scale();
    for (batch_max, records) in [(1, 800 * scale), (100, 20_000 * scale)] {
        let backend = Backend::start(|_| Reply::Status(200));
        let webhook = Webhook::start(
            WebhookConfig {
                queue_max: 10_000,
                queue_max_bytes: 64 << 20,
                batch_max,
                batch_linger: Duration::ZERO,
                ..config(&backend.url())
            },
            Arc::default(),
        )
        .unwrap();
        let sender = webhook.sender();
        let metrics = webhook.metrics().clone();
        let started = Instant::now();
        let mut sent = 0;
        while sent < records {
            match sender.try_send_unacked(up(sent)) {
                Ok(()) => sent += 1,
                Err(_) => std::thread::yield_now(),
            }
            assert!(started.elapsed() < Duration::from_secs(120), "too slow");
        }
        while metrics.delivered.get() < records {
            assert!(started.elapsed() < Duration::from_secs(120), "too slow");
            std::thread::sleep(Duration::from_micros(200));
        }
        let took = started.elapsed();
        println!(
            "batch_max {batch_max:>3}: {records} records in {took:.2?} = {:>8.0} records/s, \
             {} POSTs, {} bytes per record",
            records as f64 / took.as_secs_f64(),
            metrics.requests.get(),
            up(1).to_json().len(),
        );
    }
}

/// Every `up` acked, one at a time, with no linger (the default) and with 5 ms; prints how
/// long each waited: `MEASURE_SCALE=10 cargo test --release --test webhook -- --nocapture
/// --test-threads=1 ack_latency`.
#[test]
fn ack_latency() {
    let ups = 200 * common::measure_scale();
    for linger_ms in [0, 5] {
        let backend = Backend::start(|_| Reply::Status(200));
        let webhook = Webhook::start(
            WebhookConfig {
                batch_linger: Duration::from_millis(linger_ms),
                ..config(&backend.url())
            },
            Arc::default(),
        )
        .unwrap();
        let sender = webhook.sender();
        let mut waits: Vec<Duration> = (0..ups)
            .map(|n| {
                let started = Instant::now();
                let ticket = sender.try_send(up(n)).unwrap();
                assert_eq!(outcome_spinning(ticket), Ok(()));
                started.elapsed()
            })
            .collect();
        waits.sort();
        let at = |q: f64| waits[((ups - 1) as f64 * q) as usize];
        println!(
            "linger {linger_ms} ms: ack p50 {:.2?}, p99 {:.2?}, max {:.2?} ({ups} ups one at a time)",
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
}

/// The ticket's outcome, asked for without sleeping (a sleep would dwarf what is measured);
/// bounded like [`outcome`].
fn outcome_spinning(mut ticket: Ticket) -> Delivery {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(delivery) = ticket.try_outcome() {
            return delivery;
        }
        assert!(Instant::now() < deadline, "no outcome within 10 s");
        std::thread::yield_now();
    }
}

/// A dev node whose webhook is `backend`.
fn node_with_webhook(
    backend: &Backend,
    tweak: impl FnOnce(&mut shardcast::Config),
) -> common::TestNode {
    let mut config = common::dev_config();
    config.webhook_url = Some(backend.url());
    config.webhook_secret = Some(String::from_utf8(SECRET.to_vec()).expect("ascii"));
    tweak(&mut config);
    common::TestNode::start(config)
}

/// Records the backend received, by `type`, until `done` holds or the wait is over.
fn records_until(backend: &Backend, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + common::WAIT;
    let mut records = Vec::new();
    while !done(&records) && Instant::now() < deadline {
        for request in backend.take(1, Duration::from_millis(100)) {
            let signed = request.header("x-shardcast-signature").expect("signed");
            assert!(verify(&request.body, signed, SECRET));
            records.extend(request.records());
        }
    }
    records
}

#[test]
fn a_node_hands_up_messages_and_connection_events_to_its_webhook() {
    let backend = Backend::start(|_| Reply::Status(200));
    let node = node_with_webhook(&backend, |_| {});
    let mut ann = common::Client::dev(&node, "ann");
    let ack = ann.request(serde_json::json!({"op":"up","id":"u1","data":{"text": "hi"}}));
    assert_eq!(
        (ack["op"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some("u1")),
        "{ack}"
    );
    let mid = ack["mid"].as_str().expect("mid").to_owned();
    drop(ann);
    let kinds = |records: &[Value]| -> Vec<String> {
        records
            .iter()
            .map(|r| r["type"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let records = records_until(&backend, |records| kinds(records).len() >= 5);
    // `online` and `offline` come from the user's home shard, so they may be sent before
    // or after the connection's own records.
    let (presence, records): (Vec<Value>, Vec<Value>) = records
        .into_iter()
        .partition(|r| matches!(r["type"].as_str(), Some("online" | "offline")));
    assert_eq!(kinds(&presence), ["online", "offline"], "{presence:?}");
    assert!(presence
        .iter()
        .all(|r| r["user"] == "ann" && r.get("conn").is_none()));
    assert_eq!(
        kinds(&records),
        ["connect", "up", "disconnect"],
        "{records:?}"
    );
    let up = &records[1];
    assert_eq!(up["mid"], mid.as_str());
    assert_eq!(
        (up["user"].as_str(), up["stream"].as_str()),
        (Some("ann"), Some("up"))
    );
    assert_eq!(up["data"], serde_json::json!({"text": "hi"}));
    assert_eq!(records[2]["conn"], records[0]["conn"]);
    assert!(records[2]["code"].is_u64());
}

#[test]
fn an_up_the_webhook_cannot_take_is_answered_unavailable() {
    let failing = Backend::start(|_| Reply::Status(503));
    let node = node_with_webhook(&failing, |config| {
        config.webhook_retry_max_ms = 300;
        config.webhook_timeout_ms = 200;
    });
    let mut bo = common::Client::dev(&node, "bo");
    let reply = bo.request(serde_json::json!({"op":"up","id":2,"data":1}));
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_u64()),
        (Some("unavailable"), Some(2)),
        "{reply}"
    );

    let plain = common::TestNode::start(common::dev_config());
    let mut cy = common::Client::dev(&plain, "cy");
    let reply = cy.request(serde_json::json!({"op":"up","id":3,"data":1}));
    assert_eq!(reply["code"], "unavailable", "no webhook configured");
}

#[test]
fn clustered_nodes_announce_online_and_offline_once_through_their_webhooks() {
    let redis = common::RedisServer::start();
    let backend = Backend::start(|_| Reply::Status(200));
    let nodes: Vec<common::TestNode> = ["n0", "n1"]
        .iter()
        .map(|id| {
            let mut config = common::cluster_config(&redis.url(), id);
            config.webhook_url = Some(backend.url());
            config.webhook_secret = Some(String::from_utf8(SECRET.to_vec()).expect("ascii"));
            common::TestNode::start(config)
        })
        .collect();
    common::await_cluster(&redis, &nodes);
    let presence = |records: &[Value]| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["user"] == "eve")
            .filter_map(|r| r["type"].as_str())
            .filter(|kind| matches!(*kind, "online" | "offline"))
            .map(str::to_owned)
            .collect()
    };
    let mut records = Vec::new();
    let first = common::Client::dev(&nodes[0], "eve");
    let second = common::Client::dev(&nodes[1], "eve");
    records.extend(records_until(&backend, |seen| {
        seen.iter().filter(|r| r["type"] == "connect").count() >= 2
    }));
    drop(first);
    drop(second);
    records.extend(records_until(&backend, |seen| {
        presence(seen).contains(&"offline".to_owned())
    }));
    assert_eq!(presence(&records), ["online", "offline"], "{records:?}");
    let online = records
        .iter()
        .find(|r| r["type"] == "online")
        .expect("online");
    assert!(online["mid"].is_string() && online["ts"].is_u64());
}

/// A throwaway CA and a certificate it signed for 127.0.0.1: the server's settings, and the
/// CA's certificate as PEM.
fn test_pki() -> (Arc<rustls::ServerConfig>, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "shardcast test CA");
    let ca = ca.self_signed(&ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("server key");
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("server params")
        .signed_by(&key, &ca, &ca_key)
        .expect("server certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![server.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server TLS config");
    (Arc::new(config), ca.pem())
}

#[test]
fn an_https_webhook_is_posted_to_when_its_certificate_checks() {
    let (tls, ca_pem) = test_pki();
    let backend = Backend::start_with(Some(tls), |_| Reply::Status(200));
    let url = format!("https://127.0.0.1:{}/hook", backend.addr.port());
    let ca_file = std::env::temp_dir().join(format!(
        "shardcast-webhook-ca-{}-{}.pem",
        std::process::id(),
        backend.addr.port()
    ));
    std::fs::write(&ca_file, ca_pem).expect("write the CA file");
    let node = node_with_webhook(&backend, |config| {
        config.webhook_url = Some(url.clone());
        config.webhook_ca_file = Some(ca_file.to_string_lossy().into_owned());
    });
    let mut ivy = common::Client::dev(&node, "ivy");
    let ack = ivy.request(serde_json::json!({"op":"up","id":1,"data":"over tls"}));
    assert_eq!(ack["op"], "ack", "{ack}");
    let records = records_until(&backend, |records| {
        records.iter().any(|r| r["type"] == "up")
    });
    let up = records.iter().find(|r| r["type"] == "up").expect("up");
    assert_eq!(up["data"], "over tls");
    drop(node);
    let _ = std::fs::remove_file(&ca_file);

    // Trusting only the built-in roots, the same server's certificate does not check: the
    // batch is retried, then given up, and the up answered unavailable.
    let untrusted = node_with_webhook(&backend, |config| {
        config.webhook_url = Some(url.clone());
        config.webhook_retry_max_ms = 300;
        config.webhook_timeout_ms = 200;
    });
    let mut jo = common::Client::dev(&untrusted, "jo");
    let refused = jo.request(serde_json::json!({"op":"up","id":2,"data":1}));
    assert_eq!(refused["code"], "unavailable", "{refused}");
}
