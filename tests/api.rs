//! The HTTP API end to end: publish, disconnect, nodes, health, readiness, authentication
//! and every error status, against a real node with real WebSocket clients.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

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

#[test]
fn api_key_is_required_when_configured() {
    let mut config = dev_config();
    config.dev = false;
    config.api_key = Some("k3y".into());
    let node = TestNode::start(config);
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
