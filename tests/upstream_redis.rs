//! The Redis Streams upstream sink and cluster-wide presence events, against a real
//! `redis-server`: clients' `up` messages read back by a consumer group, `err unavailable`
//! while Redis is down, `online`/`offline` decided once per transition across nodes and
//! after a node is killed, and bad `up` input answered. Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::{
    await_cluster, await_ready, cluster_config, connect_url, eventually, eventually_within,
    serve_doomed, token, Client, RedisServer, TestNode,
};
use redis::streams::{StreamReadOptions, StreamReadReply};
use serde_json::{json, Value};
use shardcast::config::SinkKind;
use shardcast::Config;

/// A cluster node with the Redis Streams sink.
fn streams_config(redis: &RedisServer, node_id: &str) -> Config {
    Config {
        upstream_sink: Some(SinkKind::Redis),
        ..cluster_config(&redis.url(), node_id)
    }
}

fn start_nodes(redis: &RedisServer, n: usize) -> Vec<TestNode> {
    let nodes: Vec<TestNode> = (0..n)
        .map(|i| TestNode::start(streams_config(redis, &format!("n{i}"))))
        .collect();
    await_cluster(redis, &nodes);
    nodes
}

/// One stream entry's fields, as text.
type Entry = Vec<(String, String)>;

fn field<'a>(entry: &'a Entry, name: &str) -> Option<&'a str> {
    entry
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Every entry of `key`, in order.
fn entries(redis: &RedisServer, key: &str) -> Vec<Entry> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(&mut redis.connection())
        .expect("XRANGE");
    reply.ids.into_iter().map(|id| text_fields(&id)).collect()
}

fn text_fields(id: &redis::streams::StreamId) -> Entry {
    // XADD keeps the fields in order; the reply's map does not, so order them as written.
    let order = [
        "type", "mid", "node", "ts", "user", "dev", "conn", "stream", "data", "code", "reason",
        "topic",
    ];
    let mut fields: Entry = id
        .map
        .iter()
        .map(|(name, value)| {
            let text: String = redis::from_redis_value(value.clone()).expect("text value");
            (name.clone(), text)
        })
        .collect();
    fields.sort_by_key(|(name, _)| order.iter().position(|n| n == name));
    fields
}

/// The `online`/`offline` events of `user` in `P:events`, in order.
fn presence_of(redis: &RedisServer, user: &str) -> Vec<String> {
    entries(redis, "shardcast:events")
        .iter()
        .filter(|e| field(e, "user") == Some(user))
        .filter_map(|e| field(e, "type").map(str::to_owned))
        .filter(|kind| kind == "online" || kind == "offline")
        .collect()
}

fn send_text(client: &mut Client, text: &str) {
    client
        .ws
        .send(tungstenite::Message::text(text))
        .expect("send");
}

fn up(client: &mut Client, id: &str, body: Value) -> Value {
    let mut request = json!({"op": "up", "id": id});
    if let (Some(request), Some(body)) = (request.as_object_mut(), body.as_object()) {
        request.extend(body.clone());
    }
    client.request(request)
}

#[test]
fn an_up_reaches_a_consumer_group_with_every_field_once_redis_has_it() {
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis, 2);
    let mut con = redis.connection();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("shardcast:up:up")
        .arg("backend")
        .arg("$")
        .arg("MKSTREAM")
        .query(&mut con)
        .expect("XGROUP CREATE");

    let mut ann = Client::dev(&nodes[1], "ann");
    // Data passes byte for byte: spacing, escapes and number forms kept.
    let data = r#"{ "text" : "h\u00e9", "n": 1.50 }"#;
    send_text(
        &mut ann,
        &format!(r#"{{"op":"up","id":"u1","data":{data}}}"#),
    );
    let ack = ann.recv();
    assert_eq!(
        (ack["op"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some("u1")),
        "{ack}"
    );
    let mid = ack["mid"].as_str().expect("mid").to_owned();

    // The ack came after XADD: the entry is there when the client learns of it.
    let options = StreamReadOptions::default()
        .group("backend", "worker-1")
        .count(10);
    let read: StreamReadReply =
        redis::Commands::xread_options(&mut con, &["shardcast:up:up"], &[">"], &options)
            .expect("XREADGROUP");
    let ids = &read.keys[0].ids;
    assert_eq!(ids.len(), 1, "{ids:?}");
    let entry = text_fields(&ids[0]);
    let names: Vec<&str> = entry.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["type", "mid", "node", "ts", "user", "conn", "stream", "data"]
    );
    assert_eq!(field(&entry, "type"), Some("up"));
    assert_eq!(field(&entry, "mid"), Some(mid.as_str()));
    assert_eq!(field(&entry, "node"), Some("n1"));
    assert_eq!(field(&entry, "user"), Some("ann"));
    assert_eq!(field(&entry, "stream"), Some("up"));
    assert_eq!(field(&entry, "data"), Some(data));
    let ts: u64 = field(&entry, "ts").expect("ts").parse().expect("ms");
    assert!(ts.abs_diff(common::unix_now_secs() * 1000) < 60_000);
    let acked: u64 = redis::cmd("XACK")
        .arg("shardcast:up:up")
        .arg("backend")
        .arg(&ids[0].id)
        .query(&mut con)
        .expect("XACK");
    assert_eq!(acked, 1);

    // A named stream is its own key.
    let ack = up(&mut ann, "u2", json!({"stream": "chat", "data": [1, 2]}));
    assert_eq!(ack["op"], "ack", "{ack}");
    let chat = entries(&redis, "shardcast:up:chat");
    assert_eq!(chat.len(), 1);
    assert_eq!(field(&chat[0], "data"), Some("[1,2]"));

    // Connection events went to the events stream.
    let kinds: Vec<String> = entries(&redis, "shardcast:events")
        .iter()
        .filter(|e| field(e, "user") == Some("ann"))
        .filter_map(|e| field(e, "type").map(str::to_owned))
        .collect();
    assert!(kinds.contains(&"connect".to_owned()), "{kinds:?}");
    let metrics = common::http_text(nodes[1].node().api_addr(), "GET", "/metrics", None, b"").1;
    assert!(
        metrics.contains("shardcast_upstream_delivered_total{sink=\"redis\"}"),
        "{metrics}"
    );
}

#[test]
fn redis_down_answers_unavailable_and_redis_back_takes_ups_again() {
    let mut redis = RedisServer::start();
    let nodes = start_nodes(&redis, 1);
    let api = nodes[0].node().api_addr();
    let mut bo = Client::dev(&nodes[0], "bo");
    assert_eq!(up(&mut bo, "a", json!({"data": 1}))["op"], "ack");

    redis.kill();
    eventually("the node notices Redis is gone", || {
        common::http_text(api, "GET", "/readyz", None, b"").0 == 503
    });
    let refused = up(&mut bo, "b", json!({"data": 2}));
    assert_eq!(
        (refused["op"].as_str(), refused["code"].as_str()),
        (Some("err"), Some("unavailable")),
        "{refused}"
    );
    assert_eq!(refused["id"], "b");

    redis.restart();
    await_ready(api);
    let mut answer = Value::Null;
    eventually("an up is taken again", || {
        answer = up(&mut bo, "c", json!({"data": 3}));
        answer["op"] == "ack"
    });
    let stored = entries(&redis, "shardcast:up:up");
    assert!(
        stored.iter().any(|e| field(e, "data") == Some("3")),
        "{stored:?}"
    );
    let metrics = common::http_text(api, "GET", "/metrics", None, b"").1;
    assert!(
        metrics.contains(r#"shardcast_upstream_dropped_total{sink="redis",reason="unavailable"}"#),
        "{metrics}"
    );
}

#[test]
fn online_and_offline_are_announced_once_per_transition_across_nodes() {
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis, 2);
    let first = Client::dev(&nodes[0], "alice");
    eventually("alice online", || {
        presence_of(&redis, "alice") == ["online"]
    });
    let second = Client::dev(&nodes[1], "alice");
    // Both devices are registered once the second's presence shows both nodes.
    eventually("two devices", || {
        let (_, presence) =
            common::http_json(nodes[0].node().api_addr(), "GET", "/v1/users/alice", b"");
        presence["connections"] == 2
    });
    drop(first);
    eventually("one device left", || {
        let (_, presence) =
            common::http_json(nodes[0].node().api_addr(), "GET", "/v1/users/alice", b"");
        presence["connections"] == 1
    });
    assert_eq!(presence_of(&redis, "alice"), ["online"], "still online");
    drop(second);
    eventually("alice offline", || {
        presence_of(&redis, "alice") == ["online", "offline"]
    });

    // And again: a new first device is a new transition.
    let back = Client::dev(&nodes[1], "alice");
    eventually("alice online again", || {
        presence_of(&redis, "alice") == ["online", "offline", "online"]
    });
    drop(back);
    eventually("alice offline again", || {
        presence_of(&redis, "alice").len() == 4
    });

    // Every record carries its node, time and a unique id.
    let events = entries(&redis, "shardcast:events");
    let mut mids: Vec<&str> = events.iter().filter_map(|e| field(e, "mid")).collect();
    let total = mids.len();
    mids.sort_unstable();
    mids.dedup();
    assert_eq!(mids.len(), total, "ids are unique");
    assert!(events
        .iter()
        .all(|e| field(e, "node").is_some() && field(e, "ts").is_some()));
}

#[test]
fn a_killed_nodes_users_go_offline_once_its_lease_expires() {
    let redis = RedisServer::start();
    let survivor = TestNode::start(Config {
        cluster_heartbeat_ms: 500,
        cluster_node_ttl_ms: 2000,
        ..streams_config(&redis, "survivor")
    });
    await_ready(survivor.node().api_addr());
    let mut doomed = serve_doomed(
        &redis.url(),
        &[],
        &[
            ("SHARDCAST_UPSTREAM_SINK", "redis"),
            ("SHARDCAST_CLUSTER_HEARTBEAT_MS", "500"),
            ("SHARDCAST_CLUSTER_NODE_TTL_MS", "2000"),
        ],
    );
    let _dave = doomed.client("dave");
    let _bob_there = doomed.client("bob");
    let _bob_here = Client::dev(&survivor, "bob");
    eventually("dave and bob online", || {
        presence_of(&redis, "dave") == ["online"] && presence_of(&redis, "bob") == ["online"]
    });

    doomed.kill_abruptly();
    // The lease (2 s) runs out, then the survivor's next heartbeat reaps.
    eventually_within(Duration::from_secs(10), "dave offline", || {
        presence_of(&redis, "dave") == ["online", "offline"]
    });
    let settled = Instant::now() + Duration::from_secs(1);
    while Instant::now() < settled {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(presence_of(&redis, "dave"), ["online", "offline"], "once");
    assert_eq!(
        presence_of(&redis, "bob"),
        ["online"],
        "bob still has a device"
    );
    let offline = entries(&redis, "shardcast:events")
        .into_iter()
        .find(|e| field(e, "type") == Some("offline"))
        .expect("offline");
    assert_eq!(
        field(&offline, "node"),
        Some("survivor"),
        "decided by the reaper"
    );
}

#[test]
fn bad_up_messages_are_answered() {
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis, 1);
    let node = &nodes[0];
    let mut dev = Client::dev(node, "dee");
    let missing = up(&mut dev, "1", json!({}));
    assert_eq!(missing["code"], "bad_request", "{missing}");
    let bad_name = up(&mut dev, "2", json!({"stream": "", "data": 1}));
    assert_eq!(bad_name["code"], "bad_request", "{bad_name}");

    // A token's `up` claim names the streams its user may send to.
    let claims = json!({"sub": "tia", "up": ["chat"], "exp": common::unix_now_secs() + 600});
    let ws = connect_url(&node.url(&format!("/ws?token={}", token(claims)))).expect("upgrade");
    let mut tia = Client::from_ws(ws);
    let allowed = up(&mut tia, "3", json!({"stream": "chat", "data": 1}));
    assert_eq!(allowed["op"], "ack", "{allowed}");
    let forbidden = up(&mut tia, "4", json!({"stream": "audit", "data": 1}));
    assert_eq!(forbidden["code"], "forbidden", "{forbidden}");
    let default_stream = up(&mut tia, "5", json!({"data": 1}));
    assert_eq!(default_stream["code"], "forbidden", "{default_stream}");

    // More than max_message_bytes closes the connection with 1009.
    let big = "x".repeat(Config::default().max_message_bytes + 1);
    send_text(
        &mut dev,
        &format!(r#"{{"op":"up","id":"6","data":"{big}"}}"#),
    );
    assert_eq!(dev.expect_close(), 1009);
    assert!(entries(&redis, "shardcast:up:up").is_empty());
}

#[test]
fn a_user_who_left_while_redis_stalled_goes_offline_once_redis_is_back() {
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis, 1);
    let api = nodes[0].node().api_addr();
    let kim = Client::dev(&nodes[0], "kim");
    eventually("kim online", || presence_of(&redis, "kim") == ["online"]);

    redis.signal(libc::SIGSTOP);
    eventually("the node notices Redis is stalled", || {
        common::http_text(api, "GET", "/readyz", None, b"").0 == 503
    });
    drop(kim);
    // Long enough for the node to give up on the stalled session.
    std::thread::sleep(Duration::from_secs(4));
    redis.signal(libc::SIGCONT);
    await_ready(api);
    eventually_within(Duration::from_secs(10), "kim offline", || {
        presence_of(&redis, "kim") == ["online", "offline"]
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(presence_of(&redis, "kim"), ["online", "offline"], "once");
}
