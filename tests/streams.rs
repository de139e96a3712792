//! Protocol v1.1 streams on a lone node: mailboxes, topic history, `hello.mailbox`,
//! `resume`, `sub` with `since`, offline users and the history API, over real sockets.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use shardcast::config::TopicHistory;
use shardcast::{Config, Publisher, Target};

fn streaming_config() -> Config {
    let mut config = dev_config();
    config.mailbox_size = 50;
    config.history.topics = vec![TopicHistory {
        pattern: "chat.*".into(),
        size: 5,
        ttl_secs: 60,
    }];
    config
}

fn publish_to(publisher: &Publisher, user: &str, n: u64) -> u64 {
    let data = serde_json::value::to_raw_value(&json!({ "n": n })).expect("raw");
    let target = Target {
        users: &[user],
        ..Target::default()
    };
    let published = publisher.publish(target, &data);
    assert_eq!(published.dropped, 0);
    published.mid
}

/// Waits until `user`'s mailbox stands at `seq` (publishing is asynchronous).
fn await_mailbox(node: &TestNode, user: &str, seq: u64) {
    let api = node.node().api_addr();
    await_stream(api, &format!("/v1/users/{user}/history?limit=1"), seq);
}

#[test]
fn a_device_that_reconnects_resumes_exactly_what_it_missed() {
    let node = TestNode::start(streaming_config());
    let publisher = node.node().publisher();
    let mut alice = Client::dev(&node, "alice");
    assert_eq!(alice.hello["mailbox"], json!({"seq": 0, "ep": ""}));
    for n in 1..=5 {
        publish_to(&publisher, "alice", n);
    }
    let live: Vec<Value> = (0..5).map(|_| alice.recv()).collect();
    assert_eq!(seqs(&live), vec![1, 2, 3, 4, 5]);
    let ep = live[0]["ep"].as_str().expect("ep").to_owned();
    drop(alice);

    for n in 6..=10 {
        publish_to(&publisher, "alice", n);
    }
    await_mailbox(&node, "alice", 10);
    let mut again = Client::dev(&node, "alice");
    assert_eq!(again.hello["mailbox"], json!({"seq": 10, "ep": ep}));
    again.send(json!({"op":"resume","id":"r","since":{"seq":5,"ep":ep}}));
    let (replayed, ack) = until_ack(&mut again, "r");
    assert_eq!(seqs(&replayed), vec![6, 7, 8, 9, 10]);
    assert!(replayed
        .iter()
        .all(|m| m["op"] == "msg" && m["ep"] == ep.as_str()));
    assert_eq!(replayed[0]["data"], json!({"n": 6}));
    assert_eq!(
        ack,
        json!({"op":"ack","id":"r","recovered":true,"seq":10,"ep":ep})
    );
    publish_to(&publisher, "alice", 11);
    assert_eq!(again.recv()["seq"], 11, "then live");
}

#[test]
fn a_replay_racing_live_traffic_has_no_gap_and_no_duplicate() {
    let mut config = streaming_config();
    config.mailbox_size = 10_000;
    let node = TestNode::start(config);
    let publisher = node.node().publisher();
    for n in 1..=20 {
        publish_to(&publisher, "racer", n);
    }
    await_mailbox(&node, "racer", 20);
    let racer = Client::dev(&node, "racer");
    let ep = racer.hello["mailbox"]["ep"]
        .as_str()
        .expect("ep")
        .to_owned();
    race_replay_against_publisher(
        move |n| {
            publish_to(&publisher, "racer", n);
        },
        move || racer,
        json!({"op":"resume","id":"r","since":{"seq":3,"ep":ep}}),
        3,
        20,
        Duration::from_millis(200),
    );
}

#[test]
fn an_offline_users_messages_wait_and_the_api_says_who_was_offline() {
    let node = TestNode::start(streaming_config());
    let api = node.node().api_addr();
    let body = br#"{"users":["carol","dave"],"data":{"hi":1}}"#;
    let _dave = Client::dev(&node, "dave");
    let (status, answer) = http_json(api, "POST", "/v1/publish", body);
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["offline"], json!(["carol"]));
    // The answer comes from a query that can overtake the message itself on carol's home
    // shard (queries ride the control lane): wait until it is in her mailbox, or her
    // first device would get it live rather than in its `hello` position.
    await_stream(api, "/v1/users/carol/history?limit=1", 1);

    let mut carol = Client::dev(&node, "carol");
    assert_eq!(carol.hello["mailbox"]["seq"], 1);
    assert_resumes_one(&mut carol, json!({"hi": 1}), "carol");

    let (status, history) = http_json(api, "GET", "/v1/users/carol/history?since=0&limit=10", b"");
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["seq"], 1);
    assert_eq!(history["messages"][0]["data"], json!({"hi": 1}));
    let (status, _) = http_json(api, "GET", "/v1/users/carol/history?since=-1", b"");
    assert_eq!(status, 400);
    let (status, _) = http_json(api, "GET", "/v1/topics/plain/history", b"");
    assert_eq!(status, 404, "no rule covers it");
}

#[test]
fn retention_exceeded_and_foreign_positions_answer_recovered_false() {
    let mut config = streaming_config();
    config.mailbox_size = 3;
    let node = TestNode::start(config);
    let publisher = node.node().publisher();
    for n in 1..=6 {
        publish_to(&publisher, "erin", n);
    }
    await_mailbox(&node, "erin", 6);
    let mut erin = Client::dev(&node, "erin");
    let ep = erin.hello["mailbox"]["ep"].as_str().expect("ep").to_owned();
    erin.send(json!({"op":"resume","id":"a","since":{"seq":1,"ep":ep}}));
    let (replayed, ack) = until_ack(&mut erin, "a");
    assert_eq!(seqs(&replayed), vec![4, 5, 6], "what is left");
    assert_eq!(
        ack,
        json!({"op":"ack","id":"a","recovered":false,"seq":6,"ep":ep})
    );

    for since in [
        json!({"seq": 2, "ep": "elsewhere"}),
        json!({"seq": 999_999, "ep": ep}),
    ] {
        erin.send(json!({"op":"resume","id":"b","since":since}));
        let (_, ack) = until_ack(&mut erin, "b");
        assert_eq!(ack["recovered"], false, "{since}");
        assert_eq!(ack["seq"], 6);
    }
    for bad in [
        json!({"op":"resume","id":"c","since":{"seq":-4,"ep":ep}}),
        json!({"op":"resume","id":"c","since":{"seq":"4","ep":ep}}),
        json!({"op":"resume","id":"c","since":[4, ep]}),
        json!({"op":"resume","id":"c"}),
        json!({"op":"sub","id":"c","topic":"chat.x","since":{"seq":1,"ep":{"x":1}}}),
    ] {
        let reply = erin.request(bad.clone());
        assert_eq!(
            (reply["code"].as_str(), reply["id"].as_str()),
            (Some("bad_request"), Some("c")),
            "{bad}"
        );
    }
    assert_eq!(
        erin.request(json!({"op":"ping","id":"d"}))["op"],
        "pong",
        "still served"
    );
}

#[test]
fn a_topic_with_history_replays_to_late_subscribers() {
    let node = TestNode::start(streaming_config());
    let api = node.node().api_addr();
    for n in 1..=8 {
        let body = format!(r#"{{"topics":["chat.room"],"data":{n}}}"#);
        assert_eq!(
            http_json(api, "POST", "/v1/publish", body.as_bytes()).0,
            202
        );
    }
    await_stream(api, "/v1/topics/chat.room/history?limit=1", 8);
    let mut late = Client::dev(&node, "late");
    late.send(json!({"op":"sub","id":"s","topic":"chat.room","since":{"seq":0}}));
    let (replayed, ack) = until_ack(&mut late, "s");
    assert_eq!(seqs(&replayed), vec![4, 5, 6, 7, 8], "a history of 5");
    assert!(replayed
        .iter()
        .all(|m| m["op"] == "pub" && m["topic"] == "chat.room"));
    assert_eq!(ack["recovered"], false, "1 to 3 are gone");
    let ep = ack["ep"].as_str().expect("ep").to_owned();

    let body = br#"{"topics":["chat.room"],"data":9}"#;
    assert_eq!(http_json(api, "POST", "/v1/publish", body).0, 202);
    let live = late.recv();
    assert_eq!(
        (live["seq"].as_u64(), live["ep"].as_str()),
        (Some(9), Some(ep.as_str()))
    );

    let mut caught_up = Client::dev(&node, "caught-up");
    caught_up.send(json!({"op":"sub","id":"t","topic":"chat.room","since":{"seq":7,"ep":ep}}));
    let (replayed, ack) = until_ack(&mut caught_up, "t");
    assert_eq!(seqs(&replayed), vec![8, 9]);
    assert_eq!(ack["recovered"], true);

    let (status, history) = http_json(api, "GET", "/v1/topics/chat.room/history?since=7", b"");
    assert_eq!(status, 200);
    assert_eq!(
        seqs(history["messages"].as_array().expect("messages")),
        vec![8, 9]
    );
}

#[test]
fn mailboxes_off_keeps_v1_frames() {
    let mut config = dev_config();
    config.mailbox = false;
    let node = TestNode::start(config);
    let mut frank = Client::dev(&node, "frank");
    assert!(frank.hello.get("mailbox").is_none(), "{}", frank.hello);
    publish_to(&node.node().publisher(), "frank", 1);
    let message = frank.recv();
    assert!(message.get("seq").is_none(), "{message}");
    let reply = frank.request(json!({"op":"resume","id":1,"since":{"seq":0}}));
    assert_eq!(reply["code"], "not_found");
}

/// A device that missed 1,000 messages gets them all, in order; prints how long from its
/// `resume` to the ack after the last (BENCHMARKS.md: `MEASURE_SCALE=5 cargo test
/// --release --test streams -- --nocapture resume_of_a_thousand`, one resume per scale).
#[test]
fn resume_of_a_thousand_missed_messages() {
    let mut config = streaming_config();
    config.mailbox_size = 1_000;
    let node = TestNode::start(config);
    let publisher = node.node().publisher();
    for n in 1..=1_000 {
        publish_to(&publisher, "reader", n);
    }
    await_mailbox(&node, "reader", 1_000);
    let mut times = Vec::new();
    for _ in 0..measure_scale() {
        let mut reader = Client::dev(&node, "reader");
        let started = std::time::Instant::now();
        reader.send(json!({"op":"resume","id":"r","since":{"seq":0}}));
        let (replayed, _) = until_ack(&mut reader, "r");
        times.push(started.elapsed());
        assert_eq!(seqs(&replayed), (1..=1_000).collect::<Vec<u64>>());
    }
    times.sort();
    println!("resume of 1,000 missed messages, resume to ack after the last: {times:?}");
}
