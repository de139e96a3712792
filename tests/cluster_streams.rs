//! Protocol v1.1 streams on clustered nodes, over a real `redis-server`: mailboxes and topic
//! histories live in Redis, numbered in the script that routes each message, and every node
//! delivers, welcomes, replays and answers the history API from there.
//!
//! Covers a device that reconnects to another node and resumes exactly what it missed, the
//! sender's copies numbered in the sender's mailbox across nodes, a topic's history shared
//! by the nodes, a replay racing live traffic across nodes, Redis restarted empty (new
//! epochs, `recovered:false`, no stale floor filtering new messages), an offline user's
//! messages and the API's `offline` list, and the history API on clustered nodes.
//!
//! Each test starts its own Redis; every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use shardcast::config::TopicHistory;
use shardcast::{Config, Publisher, Target};

/// How long to listen for a duplicate or a stray message.
const QUIET: Duration = Duration::from_millis(300);

/// How long after Redis comes back the cluster must work again.
const HEAL_BOUND: Duration = Duration::from_secs(15);

fn streaming(config: &mut Config) {
    config.mailbox_size = 10_000;
    config.history.topics = vec![
        TopicHistory {
            pattern: "chat.*".into(),
            size: 5,
            ttl_secs: 60,
        },
        TopicHistory {
            pattern: "race.*".into(),
            size: 10_000,
            ttl_secs: 60,
        },
    ];
}

fn publish_to(publisher: &Publisher, user: &str, n: u64) {
    let data = serde_json::value::to_raw_value(&json!({ "n": n })).expect("raw");
    let target = Target {
        users: &[user],
        ..Target::default()
    };
    assert_eq!(publisher.publish(target, &data).dropped, 0);
}

/// The `n` of each message, checking that the even ones came from carol and the odd ones
/// from the API. (A client's `send` is acked before it is queued for Redis, so a publish
/// made after the ack may still be numbered first: Redis's order is the order.)
fn sent_numbers(messages: &[Value]) -> BTreeSet<u64> {
    messages
        .iter()
        .map(|m| {
            let n = m["data"]["n"].as_u64().expect("n");
            let from = if n % 2 == 0 {
                json!("carol")
            } else {
                Value::Null
            };
            assert_eq!(m["from"], from, "{m}");
            n
        })
        .collect()
}

fn send(client: &mut Client, to: &str, data: Value) {
    let ack = client.request(json!({"op":"send","to":to,"data":data,"id":"s"}));
    assert_eq!(ack["op"], "ack", "{ack}");
}

#[test]
fn a_device_that_reconnects_to_another_node_resumes_exactly_what_it_missed() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, streaming);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut alice = Client::dev(b, "alice");
    assert_eq!(alice.hello["mailbox"], json!({"seq": 0, "ep": ""}));
    let mut carol = Client::dev(a, "carol");
    await_presence(api(a), "alice", 1, &[id(b)]);

    // Live across nodes, numbered, in Redis's order: from A's API and from a client on A.
    for n in 1..=4 {
        if n % 2 == 0 {
            send(&mut carol, "alice", json!({ "n": n }));
        } else {
            publish(api(a), json!({"users":["alice"],"data":{"n": n}}));
        }
    }
    let live: Vec<Value> = (0..4).map(|_| alice.recv()).collect();
    assert_eq!(seqs(&live), vec![1, 2, 3, 4]);
    assert_eq!(sent_numbers(&live), (1..=4).collect());
    let ep = live[0]["ep"].as_str().expect("ep").to_owned();
    assert!(live.iter().all(|m| m["ep"] == ep.as_str()));
    drop(alice);

    await_presence(api(a), "alice", 0, &[]);
    for n in 5..=10 {
        if n % 2 == 0 {
            send(&mut carol, "alice", json!({ "n": n }));
        } else {
            publish(api(a), json!({"users":["alice"],"data":{"n": n}}));
        }
    }
    await_stream(api(b), "/v1/users/alice/history?limit=1", 10);

    // Back, on the other node: welcomed at the mailbox's position, resumes the gap.
    let mut again = Client::dev(a, "alice");
    assert_eq!(again.hello["mailbox"], json!({"seq": 10, "ep": ep}));
    again.send(json!({"op":"resume","id":"r","since":{"seq":4,"ep":ep}}));
    let (replayed, ack) = until_ack(&mut again, "r");
    assert_eq!(seqs(&replayed), vec![5, 6, 7, 8, 9, 10]);
    assert_eq!(sent_numbers(&replayed), (5..=10).collect());
    assert_eq!(
        ack,
        json!({"op":"ack","id":"r","recovered":true,"seq":10,"ep":ep})
    );
    publish(api(b), json!({"users":["alice"],"data":{"n": 11}}));
    assert_eq!(again.recv()["seq"], 11, "then live");
    again.expect_silence(QUIET);
    carol.expect_silence(QUIET);
}

#[test]
fn the_senders_copy_is_numbered_in_the_senders_mailbox_across_nodes() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, streaming);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut carol_a = Client::dev(a, "carol");
    let mut carol_b = Client::dev(b, "carol");
    let mut bob = Client::dev(b, "bob");
    await_presence(api(a), "carol", 2, &[id(a), id(b)]);
    await_presence(api(a), "bob", 1, &[id(b)]);

    for n in 1..=2 {
        send(&mut carol_a, "bob", json!({ "n": n }));
        let to_bob = bob.recv();
        assert_eq!(
            (&to_bob["from"], &to_bob["to"], to_bob["seq"].as_u64()),
            (&json!("carol"), &json!("bob"), Some(n))
        );
        let copy = carol_b.recv();
        assert_eq!(
            (&copy["from"], &copy["to"], copy["seq"].as_u64()),
            (&json!("carol"), &json!("bob"), Some(n)),
            "numbered in carol's own mailbox"
        );
    }
    carol_a.expect_silence(QUIET);

    let (status, history) = http_json(api(a), "GET", "/v1/users/carol/history", b"");
    assert_eq!(status, 200, "{history}");
    let messages = history["messages"].as_array().expect("messages");
    assert_eq!(seqs(messages), vec![1, 2]);
    assert!(messages
        .iter()
        .all(|m| m["to"] == "bob" && m["from"] == "carol"));
}

#[test]
fn a_topics_history_is_one_stream_across_nodes() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, streaming);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut early = Client::dev(a, "early");
    let ack = early.request(json!({"op":"sub","topic":"chat.room","id":"s"}));
    assert_eq!(ack["op"], "ack", "{ack}");
    let mut poster = Client::dev(b, "poster");
    eventually("A subscribed to chat.room", || {
        redis.numsub("shardcast:topic:chat.room") == 1
    });
    for n in 1..=6 {
        if n % 2 == 0 {
            let ack = poster.request(json!({"op":"pub","topic":"chat.room","data":n,"id":"p"}));
            assert_eq!(ack["op"], "ack", "{ack}");
        } else {
            publish(api(a), json!({"topics":["chat.room"],"data":n}));
        }
    }
    let live: Vec<Value> = (0..6).map(|_| early.recv()).collect();
    assert_eq!(seqs(&live), vec![1, 2, 3, 4, 5, 6]);
    let ep = live[0]["ep"].as_str().expect("ep").to_owned();

    let mut late = Client::dev(b, "late");
    late.send(json!({"op":"sub","id":"t","topic":"chat.room","since":{"seq":0}}));
    let (replayed, ack) = until_ack(&mut late, "t");
    assert_eq!(seqs(&replayed), vec![2, 3, 4, 5, 6], "a history of 5");
    assert!(replayed
        .iter()
        .all(|m| m["op"] == "pub" && m["ep"] == ep.as_str()));
    assert_eq!(ack["recovered"], false, "1 is gone");
    publish(api(a), json!({"topics":["chat.room"],"data":7}));
    assert_eq!(late.recv()["seq"], 7);
    assert_eq!(early.recv()["seq"], 7);

    let (status, history) = http_json(api(b), "GET", "/v1/topics/chat.room/history?since=4", b"");
    assert_eq!(status, 200, "{history}");
    let messages = history["messages"].as_array().expect("messages");
    assert_eq!(seqs(messages), vec![5, 6, 7]);
    let (status, _) = http_json(api(b), "GET", "/v1/topics/plain/history", b"");
    assert_eq!(status, 404, "no rule covers it");
    late.expect_silence(QUIET);
    early.expect_silence(QUIET);
}

#[test]
fn a_replay_racing_live_traffic_across_nodes_has_no_gap_and_no_duplicate() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, streaming);
    let (a, b) = (&nodes[0], &nodes[1]);
    let publisher = a.node().publisher();
    for n in 1..=20 {
        publish_to(&publisher, "racer", n);
    }
    await_stream(api(b), "/v1/users/racer/history?limit=1", 20);
    let racer = Client::dev(b, "racer");
    let ep = racer.hello["mailbox"]["ep"]
        .as_str()
        .expect("ep")
        .to_owned();
    await_presence(api(a), "racer", 1, &[id(b)]);
    race_replay_against_publisher(
        move |n| publish_to(&publisher, "racer", n),
        move || racer,
        json!({"op":"resume","id":"r","since":{"seq":3,"ep":ep}}),
        3,
        20,
        QUIET,
    );
}

/// The subscriber's node is not yet subscribed to the topic when it asks for the history:
/// the read runs only once the subscription is in place, so what is published meanwhile
/// comes either in the replay or live.
#[test]
fn a_topic_subscription_with_since_racing_publications_has_no_gap_and_no_duplicate() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, streaming);
    let (a, b) = (&nodes[0], &nodes[1]);
    let publisher = a.node().publisher();
    let publish = |publisher: &Publisher, n: u64| {
        let data = serde_json::value::to_raw_value(&json!({ "n": n })).expect("raw");
        let target = Target {
            topics: &["race.t"],
            ..Target::default()
        };
        assert_eq!(publisher.publish(target, &data).dropped, 0);
    };
    for n in 1..=20 {
        publish(&publisher, n);
    }
    await_stream(api(b), "/v1/topics/race.t/history?limit=1", 20);
    race_replay_against_publisher(
        move |n| publish(&publisher, n),
        || Client::dev(b, "late"),
        json!({"op":"sub","id":"s","topic":"race.t","since":{"seq":0}}),
        0,
        20,
        QUIET,
    );
}

#[test]
fn redis_restarted_empty_starts_new_epochs_and_old_positions_are_not_recovered() {
    let mut redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, streaming);
    let (a, b) = (&nodes[0], &nodes[1]);
    for n in 1..=3 {
        publish(api(a), json!({"users":["alice"],"data":{"n": n}}));
    }
    await_stream(api(b), "/v1/users/alice/history?limit=1", 3);
    let mut alice = Client::dev(b, "alice");
    let old = alice.hello["mailbox"].clone();
    assert_eq!(old["seq"], 3, "{old}");

    redis.restart();
    eventually_within(HEAL_BOUND, "both nodes back", || {
        [api(a), api(b)]
            .iter()
            .all(|api| http_text(*api, "GET", "/readyz", None, b"").0 == 200)
    });
    await_presence(api(a), "alice", 1, &[id(b)]);

    // The mailbox starts again at 1 under a new epoch, and alice (welcomed at 3 of the
    // old one) gets it live.
    publish(api(a), json!({"users":["alice"],"data":{"n": 4}}));
    let live = alice.recv();
    assert_eq!(live["seq"], 1, "{live}");
    assert_ne!(live["ep"], old["ep"]);
    alice.send(json!({"op":"resume","id":"r","since":old}));
    let (replayed, ack) = until_ack(&mut alice, "r");
    assert_eq!(seqs(&replayed), Vec::<u64>::new(), "1 came live, not again");
    assert_eq!(
        ack,
        json!({"op":"ack","id":"r","recovered":false,"seq":1,"ep":live["ep"]})
    );
}

#[test]
fn an_offline_users_messages_wait_in_redis_and_the_api_says_who_was_offline() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, streaming);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut dave = Client::dev(b, "dave");
    await_presence(api(a), "dave", 1, &[id(b)]);
    let answer = publish(api(a), json!({"users":["carol","dave"],"data":{"hi":1}}));
    assert_eq!(answer["offline"], json!(["carol"]), "{answer}");
    assert_eq!(dave.recv()["seq"], 1);
    let answer = publish(api(a), json!({"users":["dave"],"data":{"hi":2}}));
    assert!(answer.get("offline").is_none(), "{answer}");

    let mut carol = Client::dev(b, "carol");
    assert_eq!(carol.hello["mailbox"]["seq"], 1);
    assert_resumes_one(&mut carol, json!({"hi": 1}), "carol");

    for node in [a, b] {
        let (status, history) = http_json(
            api(node),
            "GET",
            "/v1/users/carol/history?since=0&limit=10",
            b"",
        );
        assert_eq!(status, 200, "{history}");
        assert_eq!(history["seq"], 1);
        assert_eq!(history["messages"][0]["data"], json!({"hi": 1}));
    }
    let (status, _) = http_json(api(a), "GET", "/v1/users/carol/history?since=-1", b"");
    assert_eq!(status, 400);
}
