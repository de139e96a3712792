//! Client protocol v1 end to end: every op and reply, multi-device users and topics that
//! span both shards, broadcast, and pushes from outside the shards (the `Publisher`).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, value::RawValue, Value};
use shardcast::Target;

fn raw(value: Value) -> Box<RawValue> {
    RawValue::from_string(value.to_string()).expect("raw")
}

#[test]
fn hello_ping_and_acks_echo_ids() {
    let node = TestNode::start(dev_config());
    let mut c = Client::dev(&node, "alice");
    assert_eq!(c.hello["user"], "alice");
    assert_eq!(c.hello["node"], node.node().node_id());
    assert_eq!(c.hello["hb"], 25);
    assert_eq!(
        c.request(json!({"op":"ping","id":1})),
        json!({"op":"pong","id":1})
    );
    assert_eq!(c.request(json!({"op":"ping"})), json!({"op":"pong"}));
    assert_eq!(
        c.request(json!({"op":"sub","topic":"news","id":"s1"})),
        json!({"op":"ack","id":"s1"})
    );
    assert_eq!(
        c.request(json!({"op":"sub","topic":"news","id":"again"})),
        json!({"op":"ack","id":"again"}),
        "subscribing twice is acknowledged"
    );
    assert_eq!(
        c.request(json!({"op":"unsub","topic":"news","id":2})),
        json!({"op":"ack","id":2})
    );
    let err = c.request(json!({"op":"unsub","topic":"news","id":3}));
    assert_eq!(err["op"], "err");
    assert_eq!(err["code"], "not_found");
    assert_eq!(err["id"], 3);
}

#[test]
fn topics_span_both_shards_and_stop_after_unsub() {
    let node = TestNode::start(dev_config());
    let (mut a, mut b) = one_per_shard(&node, "viewer");
    for c in [&mut a, &mut b] {
        assert_eq!(
            c.request(json!({"op":"sub","topic":"room","id":1}))["op"],
            "ack"
        );
    }
    let mut publisher = Client::dev(&node, "host");
    let ack = publisher.request(json!({"op":"pub","topic":"room","data":{"n":1},"id":9}));
    assert_eq!(ack["op"], "ack");
    let mid = ack["mid"].as_str().expect("mid").to_owned();
    for c in [&mut a, &mut b] {
        let got = c.recv();
        assert_eq!(got["op"], "pub");
        assert_eq!(got["topic"], "room");
        assert_eq!(got["data"], json!({"n":1}));
        assert_eq!(got["mid"], mid.as_str());
        assert!(got["ts"].as_u64().expect("ts") > 1_700_000_000_000);
    }
    publisher.expect_silence(Duration::from_millis(100));

    assert_eq!(a.request(json!({"op":"unsub","topic":"room"}))["op"], "ack");
    publisher.request(json!({"op":"pub","topic":"room","data":2}));
    assert_eq!(b.recv()["data"], 2);
    a.expect_silence(Duration::from_millis(200));
}

#[test]
fn direct_messages_reach_every_device_and_the_senders_other_devices() {
    let node = TestNode::start(dev_config());
    let (mut alice0, mut alice1) = one_per_shard(&node, "alice");
    let (mut bob0, mut bob1) = one_per_shard(&node, "bob");
    let ack = bob0.request(json!({"op":"send","to":"alice","data":"hi","id":"m"}));
    assert_eq!(ack["op"], "ack");
    assert_eq!(ack["id"], "m");
    for c in [&mut alice0, &mut alice1, &mut bob1] {
        let msg = c.recv();
        assert_eq!(msg["op"], "msg");
        assert_eq!(msg["from"], "bob");
        assert_eq!(msg["to"], "alice");
        assert_eq!(msg["data"], "hi");
        assert_eq!(msg["mid"], ack["mid"]);
    }
    bob0.expect_silence(Duration::from_millis(150));

    // A message to oneself reaches one's other devices only.
    bob0.request(json!({"op":"send","to":"bob","data":"note"}));
    assert_eq!(bob1.recv()["data"], "note");
    bob0.expect_silence(Duration::from_millis(150));

    // Nobody online: accepted; only the sender's other device sees the copy.
    assert_eq!(
        bob0.request(json!({"op":"send","to":"nobody","data":1}))["op"],
        "ack"
    );
    assert_eq!(bob1.recv()["to"], "nobody");
    alice0.expect_silence(Duration::from_millis(100));
}

#[test]
fn mids_are_unique_and_increasing() {
    let mut config = dev_config();
    config.rate_limit_burst = 1000;
    let node = TestNode::start(config);
    let mut c = Client::dev(&node, "m");
    let mut last = 0u64;
    for i in 0..300 {
        let ack = c.request(json!({"op":"pub","topic":"t","data":i}));
        let mid: u64 = ack["mid"].as_str().expect("mid").parse().expect("u64");
        assert!(mid > last, "mid {mid} after {last}");
        last = mid;
    }
}

#[test]
fn publisher_pushes_to_users_topics_and_everyone() {
    let node = TestNode::start(dev_config());
    let (mut a0, mut a1) = one_per_shard(&node, "ann");
    let mut sub = Client::dev(&node, "sub");
    sub.request(json!({"op":"sub","topic":"live"}));
    let publisher = node.node().publisher();

    let data = raw(json!({"k":"v"}));
    let published = publisher.publish(
        Target {
            users: &["ann"],
            ..Target::default()
        },
        &data,
    );
    assert_eq!(published.dropped, 0);
    let mid = published.mid;
    for c in [&mut a0, &mut a1] {
        let msg = c.recv();
        assert_eq!(msg["op"], "msg");
        assert!(
            msg.get("from").is_none(),
            "server messages have no from: {msg}"
        );
        assert_eq!(msg["to"], "ann");
        assert_eq!(msg["mid"], mid.to_string());
    }

    publisher.publish(
        Target {
            topics: &["live"],
            ..Target::default()
        },
        &data,
    );
    assert_eq!(sub.recv()["topic"], "live");

    let everyone = publisher.publish(
        Target {
            broadcast: true,
            ..Target::default()
        },
        &raw(json!([1, 2])),
    );
    for c in [&mut a0, &mut a1, &mut sub] {
        let msg = c.recv();
        assert_eq!(msg["op"], "pub");
        assert!(msg.get("topic").is_none(), "broadcast has no topic: {msg}");
        assert_eq!(msg["data"], json!([1, 2]));
        assert_eq!(msg["mid"], everyone.mid.to_string());
    }
}

#[test]
fn publisher_disconnects_a_user_everywhere_with_4003() {
    let node = TestNode::start(dev_config());
    let (mut a0, mut a1) = one_per_shard(&node, "kicked");
    let mut other = Client::dev(&node, "stays");
    node.node().publisher().disconnect_user("kicked");
    assert_eq!(a0.expect_close(), 4003);
    assert_eq!(a1.expect_close(), 4003);
    assert_eq!(other.request(json!({"op":"ping"}))["op"], "pong");
    eventually("kicks counted", || {
        node.node()
            .metrics()
            .closes(shardcast::metrics::Close::Kicked)
            == 2
    });
}

#[test]
fn tokens_authenticate_and_limit_publishing() {
    let mut config = dev_config();
    config.dev = false;
    let node = TestNode::start(config);
    let now = unix_now_secs();
    let t = token(json!({"sub":"tok","dev":"phone","pub":["chat.*"],"exp":now + 60}));
    let mut c =
        Client::from_ws(connect_url(&node.url(&format!("/ws?token={t}"))).expect("upgrade"));
    assert_eq!(c.hello["user"], "tok");
    assert_eq!(
        c.request(json!({"op":"pub","topic":"chat.1","data":1}))["op"],
        "ack"
    );
    let err = c.request(json!({"op":"pub","topic":"news","data":1,"id":4}));
    assert_eq!(
        err,
        json!({"op":"err","id":4,"code":"forbidden","msg":"token does not allow publishing to this topic"})
    );

    // The Authorization header works too.
    let request = tungstenite::http::Request::builder()
        .uri(node.url("/ws"))
        .header("Host", node.addr.to_string())
        .header("Authorization", format!("Bearer {t}"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tungstenite::handshake::client::generate_key(),
        )
        .body(())
        .expect("request");
    let stream = std::net::TcpStream::connect(node.addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let (ws, _) = tungstenite::client(request, stream).expect("header auth");
    assert_eq!(Client::from_ws(ws).hello["user"], "tok");
}

#[test]
fn tables_empty_out_when_everyone_leaves() {
    let node = TestNode::start(dev_config());
    let mut clients: Vec<Client> = (0..40)
        .map(|i| Client::dev(&node, &format!("p{}", i % 10)))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            c.request(json!({"op":"sub","topic":format!("t{}", i % 7)}))["op"],
            "ack"
        );
    }
    let metrics = node.node().metrics();
    let gauge = |pick: fn(&shardcast::metrics::ShardMetrics) -> i64| -> i64 {
        metrics.shards().iter().map(|s| pick(s)).sum()
    };
    assert_eq!(gauge(|s| s.connections.get()), 40);
    assert!(
        gauge(|s| s.users.get()) >= 10,
        "each user counted once per shard it is on"
    );
    // Half leave with a close handshake, half just drop the TCP connection.
    for (i, mut c) in clients.drain(..).enumerate() {
        if i % 2 == 0 {
            c.ws.close(None).expect("close");
            let _ = c.ws.read();
        }
    }
    eventually("every table empties", || {
        gauge(|s| s.connections.get()) == 0
            && gauge(|s| s.users.get()) == 0
            && gauge(|s| s.topics.get()) == 0
    });
    // A newcomer is served as usual, and topics left behind deliver to nobody.
    let mut late = Client::dev(&node, "late");
    assert_eq!(
        late.request(json!({"op":"pub","topic":"t1","data":1}))["op"],
        "ack"
    );
}

#[test]
fn frames_sent_with_the_upgrade_request_are_handled() {
    use std::io::{Read, Write};
    let node = TestNode::start(dev_config());
    let mut stream = std::net::TcpStream::connect(node.addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut wire =
        b"GET /ws?user=eager HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .to_vec();
    // A masked text frame with {"op":"ping","id":1}, in the same write as the request.
    let payload = br#"{"op":"ping","id":1}"#;
    let mask = [9u8, 8, 7, 6];
    wire.extend([0x81, 0x80 | payload.len() as u8]);
    wire.extend(mask);
    wire.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&wire).expect("write");
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while !String::from_utf8_lossy(&seen).contains(r#"{"op":"pong","id":1}"#) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&seen)
        );
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        text.find("\"hello\"") < text.find("\"pong\""),
        "hello comes first: {text}"
    );
}

#[test]
fn large_fanout_reaches_every_subscriber() {
    // More subscribers per shard than one fan-out chunk, so delivery yields part-way.
    let subscribers = 2 * shardcast::shard::FANOUT_CHUNK + 200;
    let mut config = dev_config();
    config.max_devices_per_user = subscribers;
    let node = TestNode::start(config);
    let mut clients: Vec<Client> = (0..subscribers)
        .map(|_| Client::dev(&node, "viewer"))
        .collect();
    for c in &mut clients {
        c.send(json!({"op":"sub","topic":"stage"}));
    }
    for c in &mut clients {
        assert_eq!(c.recv()["op"], "ack");
    }
    let mid = node
        .node()
        .publisher()
        .publish(
            Target {
                topics: &["stage"],
                ..Target::default()
            },
            &raw(json!("curtain")),
        )
        .mid;
    for c in &mut clients {
        let got = c.recv();
        assert_eq!(got["data"], "curtain");
        assert_eq!(got["mid"], mid.to_string());
    }
    assert_eq!(
        node.node()
            .metrics()
            .delivered(shardcast::metrics::Delivery::Topic),
        subscribers as u64
    );
}
