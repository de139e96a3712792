//! The HTTP API end to end: publish, disconnect, nodes, health, readiness, authentication
//! and every error status, against a real node with real WebSocket clients.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// One HTTP/1.1 request; returns the status and the JSON body (`null` if none).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let (status, text) = http_text(addr, method, path, key, body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn post(node: &TestNode, body: Value) -> (u16, Value) {
    http(
        node.node().api_addr(),
        "POST",
        "/v1/publish",
        None,
        body.to_string().as_bytes(),
    )
}

#[test]
fn publish_reaches_users_topics_and_everyone() {
    let node = TestNode::start(dev_config());
    let (mut a0, mut a1) = one_per_shard(&node, "ann");
    let mut fan = Client::dev(&node, "fan");
    fan.request(json!({"op":"sub","topic":"scores"}));

    let (status, body) = post(&node, json!({"users":["ann"],"data":{"hi":1}}));
    assert_eq!(status, 202, "{body}");
    let mid = body["mid"].as_str().expect("mid").to_owned();
    for c in [&mut a0, &mut a1] {
        let msg = c.recv();
        assert_eq!(
            (msg["op"].as_str(), msg["mid"].as_str()),
            (Some("msg"), Some(mid.as_str()))
        );
        assert_eq!(msg["data"], json!({"hi":1}));
    }

    let (status, _) = post(&node, json!({"topics":["scores"],"data":"goal"}));
    assert_eq!(status, 202);
    assert_eq!(fan.recv()["data"], "goal");

    let (status, body) = post(&node, json!({"broadcast":true,"data":null}));
    assert_eq!(status, 202);
    for c in [&mut a0, &mut a1, &mut fan] {
        let msg = c.recv();
        assert_eq!(msg["op"], "pub");
        assert_eq!(msg["mid"], body["mid"]);
    }
}

#[test]
fn publish_errors_have_status_and_json() {
    let mut config = dev_config();
    config.max_api_body_bytes = 4096;
    let node = TestNode::start(config);
    let api = node.node().api_addr();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "bad_request"),
        (json!({"data":1}).to_string().into_bytes(), 400, "no_target"),
        (
            json!({"users":["a"]}).to_string().into_bytes(),
            400,
            "bad_request",
        ),
        (
            json!({"users":[""],"data":1}).to_string().into_bytes(),
            400,
            "bad_name",
        ),
        (
            json!({"user":["typo"],"data":1}).to_string().into_bytes(),
            400,
            "bad_request",
        ),
        (vec![b' '; 4097], 413, "too_large"),
    ];
    for (body, status, code) in cases {
        let (got, reply) = http(api, "POST", "/v1/publish", None, &body);
        assert_eq!(got, status, "{reply}");
        assert_eq!(reply["error"]["code"], code, "{reply}");
        assert!(reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let (status, reply) = http(api, "GET", "/v1/nowhere", None, b"");
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}

/// A node out of dev mode whose API wants `key`.
fn production_node_with_api_key(key: &str) -> TestNode {
    let mut config = dev_config();
    config.dev = false;
    config.api_key = Some(key.into());
    TestNode::start(config)
}

#[test]
fn api_key_is_required_when_configured() {
    let node = production_node_with_api_key("k3y");
    let api = node.node().api_addr();
    let body = json!({"broadcast":true,"data":1}).to_string();
    assert_eq!(
        http(api, "POST", "/v1/publish", None, body.as_bytes()).0,
        401
    );
    assert_eq!(
        http(api, "POST", "/v1/publish", Some("wrong"), body.as_bytes()).0,
        401
    );
    assert_eq!(
        http(api, "POST", "/v1/publish", Some("k3y"), body.as_bytes()).0,
        202
    );
    assert_eq!(
        http(api, "GET", "/healthz", None, b"").0,
        200,
        "probes need no key"
    );
    assert_eq!(http(api, "GET", "/readyz", None, b"").0, 200);
}

#[test]
fn production_node_without_api_key_refuses_api_calls() {
    let mut config = dev_config();
    config.dev = false;
    let node = TestNode::start(config);
    let (status, reply) = http(node.node().api_addr(), "GET", "/v1/nodes", None, b"");
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
}

#[test]
fn disconnect_closes_every_device_with_4003() {
    let node = TestNode::start(dev_config());
    let (mut a, mut b) = one_per_shard(&node, "gone.user");
    let (status, reply) = http(
        node.node().api_addr(),
        "DELETE",
        "/v1/users/gone%2Euser/connections",
        None,
        b"",
    );
    assert_eq!(status, 202, "{reply}");
    assert_eq!(
        reply["user"], "gone.user",
        "the path segment is percent-decoded"
    );
    assert_eq!(a.expect_close(), 4003);
    assert_eq!(b.expect_close(), 4003);
}

#[test]
fn nodes_lists_this_node_with_its_connections() {
    let node = TestNode::start(dev_config());
    let _c = Client::dev(&node, "x");
    let (status, nodes) = http(node.node().api_addr(), "GET", "/v1/nodes", None, b"");
    assert_eq!(status, 200);
    assert_eq!(nodes[0]["node"], node.node().node_id());
    assert_eq!(nodes[0]["ws"], node.addr.to_string());
    assert_eq!(nodes[0]["shards"], 2);
    assert_eq!(nodes[0]["connections"], 1);
}

#[test]
fn readiness_turns_503_while_draining() {
    let node = TestNode::start(dev_config());
    let api = node.node().api_addr();
    assert_eq!(
        http(api, "GET", "/readyz", None, b""),
        (200, json!({"ready": true}))
    );
    assert_eq!(
        http(api, "GET", "/healthz", None, b""),
        (200, json!({"status": "ok"}))
    );
    node.node().stopper().stop();
    let (status, reply) = http(api, "GET", "/readyz", None, b"");
    assert_eq!((status, reply["ready"].as_bool()), (503, Some(false)));
    let (status, reply) = http(
        api,
        "POST",
        "/v1/publish",
        None,
        br#"{"broadcast":true,"data":1}"#,
    );
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (503, Some("draining"))
    );
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let node = TestNode::start(dev_config());
    let mut stream = TcpStream::connect(node.node().api_addr()).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    for _ in 0..3 {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
            .expect("write");
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
}

#[test]
fn presence_and_topic_counts() {
    let node = TestNode::start(dev_config());
    let api = node.node().api_addr();
    let (mut a, mut b) = one_per_shard(&node, "pat");
    for c in [&mut a, &mut b] {
        c.request(json!({"op":"sub","topic":"live"}));
    }
    let (status, user) = http(api, "GET", "/v1/users/pat", None, b"");
    assert_eq!(status, 200);
    assert_eq!(
        user,
        json!({"user":"pat","online":true,"connections":2,"nodes":[node.node().node_id()]})
    );
    let (_, nobody) = http(api, "GET", "/v1/users/nobody", None, b"");
    assert_eq!(
        nobody,
        json!({"user":"nobody","online":false,"connections":0,"nodes":[]})
    );

    let (status, topic) = http(api, "GET", "/v1/topics/live", None, b"");
    assert_eq!(status, 200);
    assert_eq!(topic["subscribers"], 2);
    assert_eq!(topic["nodes"][0]["node"], node.node().node_id());
    let (_, empty) = http(api, "GET", "/v1/topics/quiet", None, b"");
    assert_eq!(empty, json!({"topic":"quiet","subscribers":0,"nodes":[]}));

    drop(a);
    eventually("presence follows disconnects", || {
        http(api, "GET", "/v1/users/pat", None, b"").1["connections"] == 1
    });
}

#[test]
fn metrics_move_when_traffic_flows() {
    let node = TestNode::start(dev_config());
    let api = node.node().api_addr();
    let scrape = || {
        let (status, text) = http_text(api, "GET", "/metrics", None, b"");
        assert_eq!(status, 200);
        text
    };
    let value = |text: &str, series: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = scrape();
    assert_eq!(value(&before, "shardcast_handshakes_accepted_total"), 0);

    let mut c = Client::dev(&node, "m");
    c.request(json!({"op":"sub","topic":"t"}));
    c.request(json!({"op":"dance"}));
    post(&node, json!({"topics":["t"],"data":1}));
    assert_eq!(c.recv()["op"], "pub");

    // Counters move right after the socket write the client just read: poll briefly.
    eventually("delivery counted", || {
        value(&scrape(), "shardcast_delivery_latency_seconds_count") == 1
    });
    let after = scrape();
    assert_eq!(value(&after, "shardcast_handshakes_accepted_total"), 1);
    assert_eq!(
        value(&after, "shardcast_messages_delivered_total{kind=\"topic\"}"),
        1
    );
    assert_eq!(
        value(&after, "shardcast_rejections_total{reason=\"unknown_op\"}"),
        1
    );
    assert!(value(&after, "shardcast_frames_in_total") >= 2);
    assert!(value(&after, "shardcast_process_resident_memory_bytes") > 1_000_000);
    assert_eq!(value(&after, "shardcast_delivery_latency_seconds_count"), 1);
    let connections: u64 = (0..2)
        .map(|s| value(&after, &format!("shardcast_connections{{shard=\"{s}\"}}")))
        .sum();
    assert_eq!(connections, 1);
}

#[test]
fn full_shard_inboxes_answer_503_and_count_drops() {
    let mut config = dev_config();
    config.shard_inbox_capacity = 1;
    let node = TestNode::start(config);
    let users: Vec<String> = (0..200).map(|i| format!("u{i}")).collect();
    let (status, reply) = post(&node, json!({"users": users, "data": 1}));
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (503, Some("busy")),
        "{reply}"
    );
    assert!(
        node.node().metrics().sum(|s| s.drops[0].get()) > 0,
        "inbox_full drops counted"
    );
}

#[test]
fn escaped_names_publish() {
    let node = TestNode::start(dev_config());
    let mut alice = Client::dev(&node, "alice");
    let mut fan = Client::dev(&node, "fan");
    assert_eq!(fan.request(json!({"op":"sub","topic":"café"}))["op"], "ack");
    // What Python's json.dumps sends for any non-ASCII name: escapes, not raw UTF-8.
    let body = br#"{"users":["\u0061lice"],"topics":["caf\u00e9"],"data":"esc"}"#;
    let (status, reply) = http(node.node().api_addr(), "POST", "/v1/publish", None, body);
    assert_eq!(status, 202, "{reply}");
    assert_eq!(alice.recv()["data"], "esc");
    let publication = fan.recv();
    assert_eq!(
        (publication["topic"].as_str(), publication["data"].as_str()),
        (Some("café"), Some("esc"))
    );
    let bad = br#"{"users":["a\u0000b"],"data":1}"#;
    let (status, reply) = http(node.node().api_addr(), "POST", "/v1/publish", None, bad);
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("bad_name")),
        "an escaped control character is still refused"
    );
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let node = production_node_with_api_key("k3y");
    let api = node.node().api_addr();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let response = raw_exchange(
            api,
            format!("GET /v1/nodes HTTP/1.1\r\nHost: api\r\nAuthorization: {scheme} k3y\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(response.starts_with("HTTP/1.1 200"), "{scheme}: {response}");
    }
    let response = raw_exchange(
        api,
        b"GET /v1/nodes HTTP/1.1\r\nHost: api\r\nAuthorization: Basic k3y\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
}

#[test]
fn half_sent_requests_are_closed_after_the_header_timeout() {
    let mut config = dev_config();
    config.api_header_timeout_ms = 500;
    config.max_api_connections = 600;
    let node = TestNode::start(config);
    let api = node.node().api_addr();
    let started = Instant::now();
    let mut streams: Vec<TcpStream> = (0..500)
        .map(|_| {
            let mut stream = TcpStream::connect(api).expect("connect");
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: a")
                .expect("half a request");
            stream
        })
        .collect();
    eventually("every half-sent request holds a connection", || {
        node.node().metrics().api().connections.get() > 0
    });
    for stream in &mut streams {
        let left = (WAIT + Duration::from_secs(1)).saturating_sub(started.elapsed());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("unexpected answer {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("not closed in time: {e}"),
        }
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(450), "closed early: {took:?}");
    let api_metrics = node.node().metrics().api();
    eventually("every timeout counted and every slot freed", || {
        api_metrics.timeouts[0].get() == 500 && api_metrics.connections.get() == 0
    });
    assert_eq!(http(api, "GET", "/healthz", None, b"").0, 200);
}

#[test]
fn a_slow_body_is_answered_408() {
    let mut config = dev_config();
    config.api_body_timeout_ms = 300;
    let node = TestNode::start(config);
    let started = Instant::now();
    let response = raw_exchange(
        node.node().api_addr(),
        b"POST /v1/publish HTTP/1.1\r\nHost: api\r\nContent-Length: 100\r\n\r\n{\"broadcast\":",
    );
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("\"timeout\""), "{response}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(node.node().metrics().api().timeouts[1].get(), 1);
}

#[test]
fn api_connections_are_capped() {
    let mut config = dev_config();
    config.max_api_connections = 4;
    let node = TestNode::start(config);
    let api = node.node().api_addr();
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = TcpStream::connect(api).expect("connect");
            stream.set_read_timeout(Some(WAIT)).expect("timeout");
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
                .expect("write");
            let mut buf = [0u8; 512];
            let n = stream.read(&mut buf).expect("read");
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            stream
        })
        .collect();
    let started = Instant::now();
    let response = raw_exchange(api, b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("max_api_connections"), "{response}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    let metrics = node.node().metrics();
    assert_eq!(metrics.api().connections_refused.get(), 1);
    assert_eq!(metrics.api().connections.get(), 4);
    held.pop();
    eventually("a slot frees up", || {
        http(api, "GET", "/healthz", None, b"").0 == 200
    });
    let (_, text) = http_text(api, "GET", "/metrics", None, b"");
    let refused = metrics.api().connections_refused.get();
    assert!(
        text.contains(&format!(
            "shardcast_api_connections_refused_total {refused}"
        )),
        "{text}"
    );
}

/// Every series the Grafana dashboard plots is one a node exports (a renamed metric would
/// leave a panel silently empty); the cluster's and the upstream sink's own series are
/// checked on a clustered node with a sink.
#[test]
fn the_dashboard_plots_only_exported_metrics() {
    let dashboard: Value =
        serde_json::from_str(include_str!("../deploy/grafana/shardcast.json")).expect("json");
    let redis = RedisServer::start();
    // With an upstream sink, so its series are exported too.
    let nodes = start_cluster(&redis, 1, |config| {
        config.upstream_sink = Some(shardcast::config::SinkKind::Redis)
    });
    let (_, text) = http_text(nodes[0].node().api_addr(), "GET", "/metrics", None, b"");
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let mut plotted = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            for (start, _) in expr.match_indices("shardcast_") {
                let name: String = expr[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let series = ["", "_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| exported.contains(format!("{name}{suffix}").as_str()));
                assert!(
                    series,
                    "panel {:?} plots {name}, which no node exports",
                    panel["title"]
                );
                plotted += 1;
            }
        }
    }
    assert!(plotted > 20, "{plotted}");
}

#[test]
fn a_batch_publishes_each_with_its_own_mid_or_nothing_when_one_is_bad() {
    let node = TestNode::start(dev_config());
    let mut ann = Client::dev(&node, "ann");
    let mut fan = Client::dev(&node, "fan");
    fan.request(json!({"op":"sub","topic":"scores"}));

    let batch = json!([
        {"users":["ann"],"data":1},
        {"topics":["scores"],"data":2},
        {"users":["ann"],"topics":["scores"],"data":3},
        {"users":["nobody"],"data":4},
    ]);
    let (status, answers) = post(&node, batch);
    assert_eq!(status, 202, "{answers}");
    let answers = answers.as_array().expect("one answer per publication");
    assert_eq!(answers.len(), 4);
    let mids: Vec<&str> = answers
        .iter()
        .map(|a| a["mid"].as_str().expect("mid"))
        .collect();
    assert_eq!(
        mids.iter().collect::<std::collections::HashSet<_>>().len(),
        4
    );
    assert_eq!(answers[3]["offline"], json!(["nobody"]));
    for (n, mid) in [(1, mids[0]), (3, mids[2])] {
        let msg = ann.recv();
        assert_eq!(
            (msg["data"].as_u64(), msg["mid"].as_str()),
            (Some(n), Some(mid))
        );
    }
    for (n, mid) in [(2, mids[1]), (3, mids[2])] {
        let msg = fan.recv();
        assert_eq!(
            (msg["data"].as_u64(), msg["mid"].as_str()),
            (Some(n), Some(mid))
        );
    }

    // One bad publication refuses the whole batch, naming it; nothing goes out.
    let (status, body) = post(
        &node,
        json!([{"users":["ann"],"data":5}, {"users":["ann"]}]),
    );
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("publication 1:")),
        "{body}"
    );
    let (status, _) = post(&node, json!([]));
    assert_eq!(status, 400, "an empty batch");
    let (status, _) = post(&node, json!([["ann"], 1]));
    assert_eq!(status, 400, "elements are objects");
    ann.expect_silence(Duration::from_millis(200));
}
