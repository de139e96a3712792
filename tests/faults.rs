//! Every message accounted for under Redis faults, over a real `redis-server`.
//!
//! Steady cross-node traffic (API publishes on one node to a user on another) runs while
//! Redis is stalled (SIGSTOP/SIGCONT), killed and restarted empty with the nodes coming
//! back at different times, or loses its scripts (`SCRIPT FLUSH`). Afterwards every
//! accepted message must be delivered exactly once or counted in a drop metric: zero
//! unaccounted, zero duplicates. Also: readiness follows a stall within one heartbeat, a
//! direct message nobody can receive is counted `no_route`, and a publish of 256 KiB to
//! 1,000 users costs memory and bus bytes of the order of its own size. The traffic goes
//! to mailboxes (the default), so the retries also must not append a message twice.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::Message;

/// Direct messages per second the traffic thread publishes.
const RATE: u64 = 100;

/// How long after the fault ends the cluster has to deliver or count everything.
const SETTLE_BOUND: Duration = Duration::from_secs(20);

/// One labelled series, e.g. `shardcast_bus_drops_total{reason="no_route"}`.
fn metric_series(api: SocketAddr, series: &str) -> f64 {
    let (_, text) = http_text(api, "GET", "/metrics", None, b"");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Publishes to `user` through `api` at [`RATE`] until `stop`; returns the accepted mids and
/// how many publishes were refused (an answer other than 202: the caller knows).
fn publish_steadily(
    api: SocketAddr,
    user: &'static str,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(Vec<String>, u64)> {
    std::thread::spawn(move || {
        let mut accepted = Vec::new();
        let mut refused = 0;
        let period = Duration::from_micros(1_000_000 / RATE);
        let started = Instant::now();
        let mut sent: u32 = 0;
        // Bounded: at most two minutes of traffic whatever happens to `stop`.
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
            let body = json!({"users":[user],"data":{"n":sent}}).to_string();
            let (status, reply) = http_json(api, "POST", "/v1/publish", body.as_bytes());
            if status == 202 {
                accepted.push(reply["mid"].as_str().expect("mid").to_owned());
            } else {
                refused += 1;
            }
            sent += 1;
            let next = started + period * sent;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        (accepted, refused)
    })
}

/// Reads every `msg` a client gets until `stop` and then a quiet second; returns the mids in
/// arrival order.
fn collect_messages(client: Client, stop: Arc<AtomicBool>) -> JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut ws = client.ws;
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut mids = Vec::new();
        let mut quiet_since = Instant::now();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(180) {
            match ws.read() {
                Ok(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(&text).expect("json");
                    if frame["op"] == "msg" {
                        mids.push(frame["mid"].as_str().expect("mid").to_owned());
                    }
                    quiet_since = Instant::now();
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if stop.load(Ordering::Relaxed)
                        && quiet_since.elapsed() > Duration::from_secs(1)
                    {
                        break;
                    }
                }
                Err(e) => panic!("receiver lost its connection: {e}"),
            }
        }
        mids
    })
}

/// What happened to the messages of one fault run.
#[derive(Debug)]
struct Ledger {
    accepted: usize,
    delivered: usize,
    duplicates: usize,
    dropped_and_counted: usize,
}

impl Ledger {
    fn unaccounted(&self) -> i64 {
        self.accepted as i64 - self.delivered as i64 - self.dropped_and_counted as i64
    }
}

/// Runs steady traffic from `nodes[0]`'s API to `bob` on `nodes[1]` while `fault` runs,
/// waits for the cluster to deliver or count everything, and settles the books.
fn traffic_through(nodes: &[TestNode], fault: impl FnOnce()) -> Ledger {
    let (sender, receiver) = (&nodes[0], &nodes[1]);
    let bob = Client::dev(receiver, "bob");
    eventually("bob's route is in Redis", || {
        let (_, reply) = http_json(api(sender), "GET", "/v1/users/bob", b"");
        reply["online"] == true
    });
    let stop_sending = Arc::new(AtomicBool::new(false));
    let stop_reading = Arc::new(AtomicBool::new(false));
    let reader = collect_messages(bob, stop_reading.clone());
    let publisher = publish_steadily(api(sender), "bob", stop_sending.clone());
    std::thread::sleep(Duration::from_secs(1));
    fault();
    eventually_within(SETTLE_BOUND, "both nodes ready again", || {
        nodes
            .iter()
            .all(|node| http_text(api(node), "GET", "/readyz", None, b"").0 == 200)
    });
    std::thread::sleep(Duration::from_secs(1));
    stop_sending.store(true, Ordering::Relaxed);
    let (accepted, _refused) = publisher.join().expect("publisher");
    eventually_within(SETTLE_BOUND, "the bridge holds nothing", || {
        metric_sum(api(sender), "shardcast_bridge_queue_bytes") == 0.0
    });
    stop_reading.store(true, Ordering::Relaxed);
    let received = reader.join().expect("reader");
    let unique: HashSet<&String> = received.iter().collect();
    let accepted_set: HashSet<&String> = accepted.iter().collect();
    assert!(
        unique.is_subset(&accepted_set),
        "bob got messages nobody published"
    );
    let dropped = nodes
        .iter()
        .map(|node| {
            metric_sum(api(node), "shardcast_bus_drops_total")
                + metric_sum(api(node), "shardcast_drops_total")
        })
        .sum::<f64>();
    Ledger {
        accepted: accepted.len(),
        delivered: unique.len(),
        duplicates: received.len() - unique.len(),
        dropped_and_counted: dropped as usize,
    }
}

/// Bob's mailbox after a fault run: its last `seq` (how many messages were appended; a
/// retry that appended again would push it past the messages accepted) and whether the
/// retained messages have distinct mids and gap-free seqs.
fn bobs_mailbox(node: &TestNode) -> (u64, bool) {
    let (status, history) = http_json(api(node), "GET", "/v1/users/bob/history?limit=10000", b"");
    assert_eq!(status, 200, "{history}");
    let messages = history["messages"].as_array().expect("messages");
    let mids: HashSet<&str> = messages.iter().filter_map(|m| m["mid"].as_str()).collect();
    let seqs: Vec<u64> = messages.iter().filter_map(|m| m["seq"].as_u64()).collect();
    let gap_free = seqs.windows(2).all(|pair| pair[1] == pair[0] + 1);
    let last = history["seq"].as_u64().expect("seq");
    (last, mids.len() == messages.len() && gap_free)
}

#[test]
fn a_stalled_redis_loses_nothing_unaccounted_and_readiness_follows_within_a_heartbeat() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, |_| {});
    let heartbeat = Duration::from_millis(shardcast::Config::default().cluster_heartbeat_ms);
    let ledger = traffic_through(&nodes, || {
        redis.signal(libc::SIGSTOP);
        let stalled = Instant::now();
        eventually_within(
            heartbeat + Duration::from_millis(500),
            "readyz turns 503 within a heartbeat of the stall",
            || http_text(api(&nodes[0]), "GET", "/readyz", None, b"").0 == 503,
        );
        std::thread::sleep(Duration::from_secs(5).saturating_sub(stalled.elapsed()));
        redis.signal(libc::SIGCONT);
    });
    println!("SIGSTOP 5 s: {ledger:?}");
    assert_eq!(ledger.unaccounted(), 0, "{ledger:?}");
    assert_eq!(ledger.duplicates, 0, "{ledger:?}");
    assert!(ledger.delivered > 0, "{ledger:?}");
    // Calls repeated after the stall appended nothing twice.
    let (appended, well_formed) = bobs_mailbox(&nodes[0]);
    assert!(well_formed, "bob's mailbox has a duplicate or a gap");
    assert!(
        appended as usize <= ledger.accepted,
        "{appended} {ledger:?}"
    );
    assert!(
        appended as usize >= ledger.delivered,
        "{appended} {ledger:?}"
    );
}

#[test]
fn a_node_back_first_after_redis_restarts_empty_waits_for_the_others_and_loses_nothing() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    // The sender comes back within 100 ms, the receiver up to 2 s later: without the settling
    // window the sender would route into a table that does not hold bob yet.
    let nodes: Vec<TestNode> = [100, 2000]
        .into_iter()
        .enumerate()
        .map(|(i, backoff_ms)| {
            let mut config = cluster_config(&url, &format!("n{i}"));
            config.redis_backoff_max_ms = backoff_ms;
            config.bridge_hold_ms = 15_000;
            TestNode::start(config)
        })
        .collect();
    await_cluster(&redis, &nodes);
    let ledger = traffic_through(&nodes, || {
        redis.kill();
        std::thread::sleep(Duration::from_secs(3));
        redis.restart();
    });
    println!("Redis killed, restarted empty 3 s later: {ledger:?}");
    assert_eq!(ledger.unaccounted(), 0, "{ledger:?}");
    assert_eq!(ledger.duplicates, 0, "{ledger:?}");
    assert_eq!(
        ledger.dropped_and_counted, 0,
        "held messages wait for the cluster to settle: {ledger:?}"
    );
}

#[test]
fn lost_scripts_are_reloaded_and_no_message_is_lost() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, |_| {});
    let sessions_before = metric_sum(api(&nodes[0]), "shardcast_redis_sessions_total");
    let ledger = traffic_through(&nodes, || {
        for _ in 0..3 {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query(&mut redis.connection())
                .expect("SCRIPT FLUSH");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    println!("SCRIPT FLUSH x3: {ledger:?}");
    assert_eq!(ledger.unaccounted(), 0, "{ledger:?}");
    assert_eq!(ledger.duplicates, 0, "{ledger:?}");
    assert_eq!(ledger.dropped_and_counted, 0, "{ledger:?}");
    let (appended, well_formed) = bobs_mailbox(&nodes[0]);
    assert!(well_formed, "bob's mailbox has a duplicate or a gap");
    assert_eq!(appended as usize, ledger.accepted, "each appended once");
    assert!(
        metric_sum(api(&nodes[0]), "shardcast_redis_sessions_total") > sessions_before,
        "NOSCRIPT rebuilt the session"
    );
}

#[test]
fn a_direct_message_nobody_can_receive_is_counted_no_route() {
    let mut config = dev_config();
    config.mailbox = false;
    let single = TestNode::start(config);
    let body = json!({"users":["nobody"],"data":1}).to_string();
    assert_eq!(
        http_json(api(&single), "POST", "/v1/publish", body.as_bytes()).0,
        202
    );
    eventually("single node: counted", || {
        metric_series(api(&single), r#"shardcast_drops_total{reason="no_route"}"#) == 1.0
    });
    // With mailboxes (the default) the message waits for the user instead.
    let keeping = TestNode::start(dev_config());
    assert_eq!(
        http_json(api(&keeping), "POST", "/v1/publish", body.as_bytes()).0,
        202
    );
    eventually("single node with mailboxes: kept", || {
        metric_series(api(&keeping), "shardcast_mailbox_offline_total") == 1.0
    });
    assert_eq!(
        metric_series(api(&keeping), r#"shardcast_drops_total{reason="no_route"}"#),
        0.0
    );

    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, |config| config.mailbox = false);
    let _bob = Client::dev(&nodes[1], "bob");
    eventually("bob's route is in Redis", || {
        let (_, reply) = http_json(api(&nodes[0]), "GET", "/v1/users/bob", b"");
        reply["online"] == true
    });
    let body = json!({"users":["nobody","bob"],"data":1}).to_string();
    assert_eq!(
        http_json(api(&nodes[0]), "POST", "/v1/publish", body.as_bytes()).0,
        202
    );
    eventually(
        "cluster: the route script counts the user nobody holds",
        || {
            metric_series(
                api(&nodes[0]),
                r#"shardcast_bus_drops_total{reason="no_route"}"#,
            ) == 1.0
        },
    );
    assert_eq!(
        metric_series(
            api(&nodes[0]),
            r#"shardcast_drops_total{reason="no_route"}"#
        ),
        0.0,
        "a cluster node does not count a user other nodes may hold"
    );

    // Clustered with mailboxes, the message waits in Redis: counted kept, not dropped.
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, |_| {});
    let body = json!({"users":["nobody"],"data":1}).to_string();
    let (status, reply) = http_json(api(&nodes[0]), "POST", "/v1/publish", body.as_bytes());
    assert_eq!((status, &reply["offline"]), (202, &json!(["nobody"])));
    eventually("cluster with mailboxes: kept", || {
        metric_series(api(&nodes[0]), "shardcast_mailbox_offline_total") == 1.0
    });
    assert_eq!(
        metric_series(
            api(&nodes[0]),
            r#"shardcast_bus_drops_total{reason="no_route"}"#
        ),
        0.0
    );
}

/// `VmHWM` (peak resident set) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

#[test]
fn a_256_kib_publish_to_1000_users_costs_about_its_own_size() {
    let redis = RedisServer::start();
    // Mailboxes off: this measures the per-recipient rendering of v1 messages. (With
    // mailboxes every recipient's mailbox in Redis keeps `data`, and a node holds a few
    // more copies: one script call per 512 users, and its own envelopes back from Redis.)
    let env = [
        ("SHARDCAST_MAX_OUTBOUND_BYTES", "1048576"),
        ("SHARDCAST_SHARDS", "2"),
        ("SHARDCAST_MAILBOX", "false"),
    ];
    let redis_url = redis.url();
    let start = |id: &str| Process::serve(&["--dev", "--redis", &redis_url, "--node-id", id], &env);
    let (a, b) = (start("a"), start("b"));
    for node in [&a, &b] {
        await_ready(node.api);
    }
    let users: Vec<String> = (0..1000).map(|i| format!("user{i}")).collect();
    // 20 of the users online on each node, reading.
    let mut online: Vec<(String, Client)> = Vec::new();
    for (i, user) in users.iter().take(40).enumerate() {
        let node = if i % 2 == 0 { &a } else { &b };
        online.push((user.clone(), node.client(user)));
    }
    eventually("every online user's route is in Redis", || {
        let (_, reply) = http_json(a.api, "GET", "/v1/users/user39", b"");
        reply["online"] == true
    });
    let before = [&a, &b].map(|node| peak_rss(node.child.id()));
    let data = "x".repeat(256 * 1024);
    let body = json!({"users": users, "data": data}).to_string();
    let (status, reply) = http_json(a.api, "POST", "/v1/publish", body.as_bytes());
    assert_eq!(status, 202, "{reply}");
    for (user, client) in &mut online {
        let got = client.recv();
        assert_eq!((&got["op"], &got["to"]), (&json!("msg"), &json!(user)));
        assert_eq!(got["data"].as_str().map(str::len), Some(data.len()));
    }
    let after = [&a, &b].map(|node| peak_rss(node.child.id()));
    let request = body.len() as u64;
    // What a node must hold: the request (or the envelopes) and a copy of `data`, plus each
    // local recipient's frame while it is written (20 online users per node), with room for
    // the allocator keeping freed pages. Before `data` was shared this was 1,000 frames.
    let online_here = 20;
    for ((before, after), node) in before.iter().zip(after).zip(["a", "b"]) {
        println!("node {node}: peak RSS {before} -> {after} bytes, request {request} bytes");
        assert!(
            after.saturating_sub(*before) < (8 + online_here) * request,
            "node {node}'s peak RSS grew by {} bytes for a {request}-byte request",
            after.saturating_sub(*before)
        );
    }
    let bus_bytes = metric_sum(a.api, "shardcast_bus_bytes_out_total") as u64;
    println!("bus bytes out: {bus_bytes}");
    assert!(
        bus_bytes < 3 * request,
        "{bus_bytes} bus bytes for a {request}-byte request"
    );
}
