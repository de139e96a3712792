//! Cluster mode over a real `redis-server`: nodes in this process (and `shardcast serve`
//! children where a node must die by SIGKILL) on loopback ports, real WebSocket clients.
//!
//! Covers cross-node direct messages and the sender's copies, directed delivery (a user
//! message is published only to the nodes holding the user, seen through Redis MONITOR),
//! topics (exactly once per subscriber, and a node's Redis subscription following its local
//! subscribers, also under sub/unsub churn), broadcast and API publish, the cluster-wide API
//! (presence, nodes, topics, kick), the cluster-wide device limit, a node killed with SIGKILL
//! falling out within the node TTL (also when it comes back under the same id), a cleanly
//! stopped node leaving at once, healing after Redis is killed and restarted empty, and the
//! Redis prefix keeping two clusters on one Redis apart.
//!
//! Each test starts its own Redis. Waits on Redis-side state (subscriptions, registry,
//! routes) poll with explicit bounds before a message is sent, so a lost message is a failure
//! and not a race.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use shardcast::Config;

/// How long a node killed with SIGKILL may linger: the default 10 s node TTL plus slack.
const TTL_BOUND: Duration = Duration::from_secs(15);

/// How long after Redis comes back the cluster must work again.
const HEAL_BOUND: Duration = Duration::from_secs(15);

/// How long a cleanly stopped node's routes and registry entry may linger.
const CLEAN_STOP_BOUND: Duration = Duration::from_secs(3);

/// How long to listen for a duplicate or a stray message.
const QUIET: Duration = Duration::from_millis(300);

fn listed_nodes(api: SocketAddr) -> Vec<String> {
    let (status, reply) = http_json(api, "GET", "/v1/nodes", b"");
    assert_eq!(status, 200, "{reply}");
    reply
        .as_array()
        .expect("array")
        .iter()
        .map(|n| n["node"].as_str().expect("node").to_owned())
        .collect()
}

fn topic_channel(topic: &str) -> String {
    format!("shardcast:topic:{topic}")
}

/// Waits until exactly `nodes` nodes are subscribed to `topic`'s channel.
fn await_numsub(redis: &RedisServer, topic: &str, nodes: u64) {
    await_numsub_within(WAIT, redis, topic, nodes);
}

fn await_numsub_within(bound: Duration, redis: &RedisServer, topic: &str, nodes: u64) {
    eventually_within(
        bound,
        &format!("{nodes} nodes subscribed to {topic}"),
        || redis.numsub(&topic_channel(topic)) == nodes,
    );
}

fn readyz(api: SocketAddr) -> (u16, Value) {
    http_json(api, "GET", "/readyz", b"")
}

/// The value of the unlabelled series `name` in the node's Prometheus text.
fn metric(api: SocketAddr, name: &str) -> Option<f64> {
    let (status, text) = http_text(api, "GET", "/metrics", None, b"");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Reads one direct message and checks who it is from and to, and its data.
fn expect_msg(client: &mut Client, from: &str, to: &str, data: &Value) -> Value {
    let msg = client.recv();
    assert_eq!(msg["op"], "msg", "{msg}");
    assert_eq!(msg["from"], from, "{msg}");
    assert_eq!(msg["to"], to, "{msg}");
    assert_eq!(&msg["data"], data, "{msg}");
    msg
}

/// Sends `data` from `client` to `to` and returns the ack's mid.
fn send(client: &mut Client, to: &str, data: Value) -> String {
    let ack = client.request(json!({"op":"send","to":to,"data":data,"id":1}));
    assert_eq!(ack["op"], "ack", "{ack}");
    ack["mid"].as_str().expect("mid").to_owned()
}

fn subscribe(client: &mut Client, topic: &str) {
    let ack = client.request(json!({"op":"sub","topic":topic,"id":1}));
    assert_eq!(ack["op"], "ack", "{ack}");
}

fn ping(client: &mut Client) {
    assert_eq!(client.request(json!({"op":"ping"}))["op"], "pong");
}

#[test]
fn send_reaches_a_user_on_another_node() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, |_| {});
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut alice = Client::dev(a, "alice");
    let mut bob = Client::dev(b, "bob");
    await_presence(api(a), "bob", 1, &[id(b)]);
    await_presence(api(b), "alice", 1, &[id(a)]);

    let mid = send(&mut alice, "bob", json!({"text":"hi bob"}));
    let msg = expect_msg(&mut bob, "alice", "bob", &json!({"text":"hi bob"}));
    assert_eq!(msg["mid"], mid.as_str());
    assert!(msg["ts"].as_u64().expect("ts") > 1_700_000_000_000);

    let mid = send(&mut bob, "alice", json!("hi alice"));
    assert_eq!(
        expect_msg(&mut alice, "bob", "alice", &json!("hi alice"))["mid"],
        mid.as_str()
    );
    alice.expect_silence(QUIET);
    bob.expect_silence(QUIET);
}

/// Runs `action` under Redis MONITOR and returns the channel of every PUBLISH (direct or from
/// a script) whose payload carries `token`: envelopes carry the rendered client frame, so a
/// unique string in a message's data marks that message's publications.
fn publishes_carrying(redis: &RedisServer, token: &str, action: impl FnOnce()) -> Vec<String> {
    monitored(redis, token, action)
        .into_iter()
        .map(|publish| publish.channel)
        .collect()
}

/// One PUBLISH seen by MONITOR.
#[derive(Debug)]
struct Publish {
    channel: String,
    /// Sent by a script rather than by a node's bridge directly.
    by_script: bool,
}

/// Runs `action` under Redis MONITOR; returns the PUBLISHes whose payload carries `token`.
fn monitored(redis: &RedisServer, token: &str, action: impl FnOnce()) -> Vec<Publish> {
    let mut monitor = redis.connection();
    monitor
        .send_packed_command(&redis::cmd("MONITOR").get_packed_command())
        .expect("MONITOR");
    let reply = monitor.recv_response().expect("MONITOR reply");
    assert!(
        matches!(&reply, redis::Value::Okay)
            || matches!(&reply, redis::Value::SimpleString(ok) if ok == "OK"),
        "{reply:?}"
    );
    action();
    // Everything the action made Redis run is in the stream before this command.
    let marker = "end-of-monitored-action";
    let _: String = redis::cmd("ECHO")
        .arg(marker)
        .query(&mut redis.connection())
        .expect("ECHO");
    let mut publishes = Vec::new();
    loop {
        let line = match monitor.recv_response().expect("MONITOR line") {
            redis::Value::SimpleString(line) => line,
            other => panic!("unexpected MONITOR output {other:?}"),
        };
        if line.contains(marker) {
            return publishes;
        }
        // `<time> [<db> <client or lua>] "PUBLISH" "<channel>" "<payload>"`
        let lower = line.to_ascii_lowercase();
        if let Some(at) = lower.find("\"publish\" \"") {
            if line.contains(token) {
                let rest = &line[at + "\"publish\" \"".len()..];
                let channel = rest.split('"').next().expect("channel");
                publishes.push(Publish {
                    channel: channel.to_owned(),
                    by_script: lower.contains(" lua]"),
                });
            }
        }
    }
}

/// The channel of the bridge instance `node` runs now (from its registry entry).
fn instance_channel(redis: &RedisServer, node: &str) -> String {
    let instance: String = redis::cmd("HGET")
        .arg(format!("shardcast:node:{node}"))
        .arg("instance")
        .query(&mut redis.connection())
        .expect("HGET instance");
    format!("shardcast:inst:{instance}")
}

/// Mailboxes off: with mailboxes, the sender's node gets its own copy through Redis too
/// (see tests/cluster_streams.rs).
#[test]
fn a_user_message_goes_only_to_the_nodes_holding_the_user() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |config| config.mailbox = false);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut alice = Client::dev(a, "alice");
    let mut dan = Client::dev(a, "dan");
    let mut bob_b = Client::dev(b, "bob");
    let mut bob_c = Client::dev(c, "bob");
    let mut carol = Client::dev(b, "carol");
    await_presence(api(a), "bob", 2, &[id(b), id(c)]);
    await_presence(api(a), "carol", 1, &[id(b)]);

    // Bob is on B and C: one publication to each, none to the broadcast channel.
    let to_bob = publishes_carrying(&redis, "token-to-bob", || {
        send(&mut alice, "bob", json!("token-to-bob"));
        for bob in [&mut bob_b, &mut bob_c] {
            expect_msg(bob, "alice", "bob", &json!("token-to-bob"));
        }
    });
    assert_eq!(to_bob.len(), 2, "{to_bob:?}");
    assert_ne!(to_bob[0], to_bob[1], "one channel per node: {to_bob:?}");
    assert!(!to_bob.iter().any(|c| c == "shardcast:broadcast"));

    // Carol is on B only: one publication, on one of the two channels above.
    let to_carol = publishes_carrying(&redis, "token-to-carol", || {
        send(&mut alice, "carol", json!("token-to-carol"));
        expect_msg(&mut carol, "alice", "carol", &json!("token-to-carol"));
    });
    assert_eq!(to_carol.len(), 1, "{to_carol:?}");
    assert!(to_bob.contains(&to_carol[0]), "{to_carol:?} {to_bob:?}");

    // Dan is on the sender's node only: nothing crosses Redis.
    let to_dan = publishes_carrying(&redis, "token-to-dan", || {
        send(&mut alice, "dan", json!("token-to-dan"));
        expect_msg(&mut dan, "alice", "dan", &json!("token-to-dan"));
    });
    assert_eq!(to_dan, Vec::<String>::new());
}

#[test]
fn every_device_on_every_node_gets_messages_and_the_senders_copies() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |_| {});
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut alice_a = Client::dev(a, "alice");
    let mut alice_b = Client::dev(b, "alice");
    let mut carol = Client::dev(c, "carol");
    await_presence(api(c), "alice", 2, &[id(a), id(b)]);
    await_presence(api(a), "carol", 1, &[id(c)]);

    // Carol on C reaches both of alice's devices, once each.
    let mid = send(&mut carol, "alice", json!(1));
    for alice in [&mut alice_a, &mut alice_b] {
        assert_eq!(
            expect_msg(alice, "carol", "alice", &json!(1))["mid"],
            mid.as_str()
        );
    }

    // Alice on A writes to carol on C: carol gets it, alice's device on B gets the copy,
    // the sending connection only its ack.
    let mid = send(&mut alice_a, "carol", json!(2));
    assert_eq!(
        expect_msg(&mut carol, "alice", "carol", &json!(2))["mid"],
        mid.as_str()
    );
    assert_eq!(
        expect_msg(&mut alice_b, "alice", "carol", &json!(2))["mid"],
        mid.as_str()
    );

    // A message to oneself reaches one's devices on other nodes only.
    send(&mut alice_b, "alice", json!(3));
    expect_msg(&mut alice_a, "alice", "alice", &json!(3));

    for client in [&mut alice_a, &mut alice_b, &mut carol] {
        client.expect_silence(QUIET);
    }
}

#[test]
fn topics_reach_every_node_once_and_unsubscribe_with_the_last_local_subscriber() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |_| {});
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut on_a = Client::dev(a, "viewer-a");
    let mut on_b1 = Client::dev(b, "viewer-b1");
    let mut on_b2 = Client::dev(b, "viewer-b2");
    let mut on_c = Client::dev(c, "viewer-c");
    assert_eq!(redis.numsub(&topic_channel("room")), 0);
    for client in [&mut on_a, &mut on_b1, &mut on_b2, &mut on_c] {
        subscribe(client, "room");
    }
    await_numsub(&redis, "room", 3);

    // A client publishing on A: each subscriber on each node, exactly once.
    let mut host = Client::dev(a, "host");
    let ack = host.request(json!({"op":"pub","topic":"room","data":{"n":1},"id":2}));
    assert_eq!(ack["op"], "ack", "{ack}");
    for client in [&mut on_a, &mut on_b1, &mut on_b2, &mut on_c] {
        let got = client.recv();
        assert_eq!(got["op"], "pub", "{got}");
        assert_eq!(got["topic"], "room");
        assert_eq!(got["data"], json!({"n":1}));
        assert_eq!(got["mid"], ack["mid"]);
    }
    // The API on C, likewise.
    let reply = publish(api(c), json!({"topics":["room"],"data":2}));
    for client in [&mut on_a, &mut on_b1, &mut on_b2, &mut on_c] {
        let got = client.recv();
        assert_eq!(
            (got["data"].as_i64(), &got["mid"]),
            (Some(2), &reply["mid"])
        );
    }
    for client in [&mut on_a, &mut on_b1, &mut on_b2, &mut on_c, &mut host] {
        client.expect_silence(QUIET);
    }

    // A's only subscriber leaves: A unsubscribes.
    assert_eq!(
        on_a.request(json!({"op":"unsub","topic":"room"}))["op"],
        "ack"
    );
    await_numsub(&redis, "room", 2);
    // One of B's two leaves: B stays subscribed and its other subscriber still gets messages.
    assert_eq!(
        on_b1.request(json!({"op":"unsub","topic":"room"}))["op"],
        "ack"
    );
    publish(api(a), json!({"topics":["room"],"data":3}));
    assert_eq!(on_b2.recv()["data"], 3);
    assert_eq!(on_c.recv()["data"], 3);
    assert_eq!(redis.numsub(&topic_channel("room")), 2);
    on_a.expect_silence(QUIET);
    on_b1.expect_silence(QUIET);
    // The last subscribers on B and C disconnect without unsubscribing.
    drop(on_b2);
    await_numsub(&redis, "room", 1);
    drop(on_c);
    await_numsub(&redis, "room", 0);
}

#[test]
fn a_nodes_topic_subscription_follows_churn_across_its_shards() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, |config| config.rate_limit_burst = 1000);
    let (a, b) = (&nodes[0], &nodes[1]);
    let (mut s0, mut s1) = one_per_shard(a, "churner");
    // The node's local count goes 0, 1, 2, 1, 0 many times over, on both shards at once;
    // requests are pipelined so subscribe and unsubscribe race in the bridge.
    let churn = |s0: &mut Client, s1: &mut Client| {
        let rounds = 30;
        for _ in 0..rounds {
            s0.send(json!({"op":"sub","topic":"flip"}));
            s1.send(json!({"op":"sub","topic":"flip"}));
            s0.send(json!({"op":"unsub","topic":"flip"}));
            s1.send(json!({"op":"unsub","topic":"flip"}));
        }
        for client in [s0, s1] {
            for _ in 0..2 * rounds {
                let reply = client.recv();
                assert_eq!(reply["op"], "ack", "{reply}");
            }
        }
    };
    churn(&mut s0, &mut s1);
    await_numsub(&redis, "flip", 0);
    publish(api(b), json!({"topics":["flip"],"data":"nobody"}));
    s0.expect_silence(QUIET);
    s1.expect_silence(QUIET);

    // The same burst, then one subscriber stays: A must end up subscribed.
    churn(&mut s0, &mut s1);
    subscribe(&mut s1, "flip");
    await_numsub(&redis, "flip", 1);
    let reply = publish(api(b), json!({"topics":["flip"],"data":"one"}));
    let got = s1.recv();
    assert_eq!((&got["data"], &got["mid"]), (&json!("one"), &reply["mid"]));
    s0.expect_silence(QUIET);
    s1.expect_silence(QUIET);
    assert_eq!(redis.numsub(&topic_channel("flip")), 1);
}

#[test]
fn broadcast_and_api_publish_reach_every_node_once() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |_| {});
    let mut clients: Vec<Client> = nodes
        .iter()
        .flat_map(|node| {
            let name = id(node).to_owned();
            [
                Client::dev(node, &format!("u-{name}")),
                Client::dev(node, &format!("u-{name}")),
                Client::dev(node, "everywhere"),
            ]
        })
        .collect();
    let node_ids: Vec<&str> = nodes.iter().map(id).collect();
    await_presence(api(&nodes[1]), "everywhere", 3, &node_ids);
    await_presence(api(&nodes[0]), "u-n2", 2, &[id(&nodes[2])]);

    let reply = publish(api(&nodes[1]), json!({"broadcast":true,"data":{"all":1}}));
    for client in &mut clients {
        let got = client.recv();
        assert_eq!(got["op"], "pub", "{got}");
        assert_eq!(got.get("topic"), None, "a broadcast has no topic: {got}");
        assert_eq!(got["data"], json!({"all":1}));
        assert_eq!(got["mid"], reply["mid"]);
    }
    for client in &mut clients {
        client.expect_silence(QUIET);
    }

    // The API on A to users on other nodes: every device of each named user, once.
    let reply = publish(
        api(&nodes[0]),
        json!({"users":["everywhere", "u-n2"],"data":"direct"}),
    );
    for (i, client) in clients.iter_mut().enumerate() {
        let (node, device) = (i / 3, i % 3);
        if device == 2 || node == 2 {
            let got = client.recv();
            assert_eq!(got["op"], "msg", "{got}");
            assert_eq!(got.get("from"), None, "from the server: {got}");
            let to = if device == 2 { "everywhere" } else { "u-n2" };
            assert_eq!(got["to"], to, "each user's frame names it: {got}");
            assert_eq!(
                (&got["data"], &got["mid"]),
                (&json!("direct"), &reply["mid"])
            );
        }
        client.expect_silence(QUIET);
    }

    // The API on B to several topics at once: each subscriber gets its topic's frame, once.
    subscribe(&mut clients[0], "t-a");
    subscribe(&mut clients[6], "t-a");
    subscribe(&mut clients[6], "t-b");
    await_numsub(&redis, "t-a", 2);
    await_numsub(&redis, "t-b", 1);
    let reply = publish(
        api(&nodes[1]),
        json!({"topics":["t-a","t-b","t-nobody"],"data":"topical"}),
    );
    let mut topics_of_6 = Vec::new();
    for _ in 0..2 {
        let got = clients[6].recv();
        assert_eq!((&got["op"], &got["mid"]), (&json!("pub"), &reply["mid"]));
        topics_of_6.push(got["topic"].as_str().expect("topic").to_owned());
    }
    topics_of_6.sort();
    assert_eq!(topics_of_6, ["t-a", "t-b"]);
    let got = clients[0].recv();
    assert_eq!(
        (&got["topic"], &got["data"]),
        (&json!("t-a"), &json!("topical"))
    );
    for client in &mut clients {
        client.expect_silence(QUIET);
    }
}

#[test]
fn presence_is_cluster_wide() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |_| {});
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    // Two devices on A's two shards: A holds pat until the last of them leaves.
    let (on_a0, on_a1) = one_per_shard(a, "pat");
    let _on_c = Client::dev(c, "pat");
    let mut sorted = [id(a), id(c)];
    sorted.sort_unstable();
    await_presence(api(b), "pat", 3, &sorted);
    assert_eq!(
        presence(api(b), "pat"),
        json!({"user":"pat","online":true,"connections":3,"nodes":sorted})
    );
    assert_eq!(
        presence(api(a), "nobody"),
        json!({"user":"nobody","online":false,"connections":0,"nodes":[]})
    );

    drop(on_a0);
    await_presence(api(b), "pat", 2, &sorted);
    drop(on_a1);
    await_presence(api(b), "pat", 1, &[id(c)]);
    assert_eq!(presence(api(a), "pat")["online"], true);
}

#[test]
fn nodes_lists_every_node_least_loaded_first() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |_| {});
    // A holds 3 connections, B 1, C 2: least-loaded first is B, C, A.
    let load = [3, 1, 2];
    let _clients: Vec<Client> = nodes
        .iter()
        .zip(load)
        .flat_map(|(node, n)| (0..n).map(|i| Client::dev(node, &format!("load{i}"))))
        .collect();
    let expected_order = [id(&nodes[1]), id(&nodes[2]), id(&nodes[0])];
    // Connection counts travel with the heartbeat (2 s by default).
    let mut listed = Value::Null;
    eventually_within(
        Duration::from_secs(10),
        "every node's connection count",
        || {
            let (status, reply) = http_json(api(&nodes[2]), "GET", "/v1/nodes", b"");
            assert_eq!(status, 200, "{reply}");
            listed = reply;
            listed.as_array().is_some_and(|a| {
                a.iter()
                    .map(|n| n["connections"].as_u64())
                    .eq([1, 2, 3].map(Some))
            })
        },
    );
    let listed = listed.as_array().expect("array");
    for (entry, id) in listed.iter().zip(expected_order) {
        let node = nodes
            .iter()
            .find(|n| n.node().node_id() == id)
            .expect("node");
        assert_eq!(entry["node"], id, "{listed:?}");
        assert_eq!(entry["ws"], node.addr.to_string());
        assert_eq!(entry["api"], api(node).to_string());
        assert_eq!(entry["shards"], 2);
    }
}

#[test]
fn topic_counts_are_cluster_wide() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |_| {});
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut subscribers: Vec<Client> = [a, a, c]
        .into_iter()
        .enumerate()
        .map(|(i, node)| Client::dev(node, &format!("fan{i}")))
        .collect();
    for client in &mut subscribers {
        subscribe(client, "live");
    }
    await_numsub(&redis, "live", 2);

    let mut expected = vec![
        json!({"node": id(a), "subscribers": 2}),
        json!({"node": id(c), "subscribers": 1}),
    ];
    expected.sort_by_key(|n| n["node"].to_string());
    let mut last = Value::Null;
    eventually("topic counts from every node", || {
        let (status, mut reply) = http_json(api(b), "GET", "/v1/topics/live", b"");
        assert_eq!(status, 200, "{reply}");
        if let Some(per_node) = reply["nodes"].as_array_mut() {
            per_node.sort_by_key(|n| n["node"].to_string());
        }
        last = reply;
        last == json!({"topic":"live","subscribers":3,"nodes":expected})
    });
    let (_, empty) = http_json(api(b), "GET", "/v1/topics/quiet", b"");
    assert_eq!(empty, json!({"topic":"quiet","subscribers":0,"nodes":[]}));

    subscribers.truncate(1);
    eventually("topic counts follow disconnects", || {
        http_json(api(c), "GET", "/v1/topics/live", b"").1
            == json!({"topic":"live","subscribers":1,"nodes":[{"node": id(a),"subscribers":1}]})
    });
}

#[test]
fn kick_closes_a_users_connections_on_every_node() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |_| {});
    let mut kicked: Vec<Client> = nodes.iter().map(|n| Client::dev(n, "troll")).collect();
    let mut bystander = Client::dev(&nodes[0], "bystander");
    let ids: Vec<&str> = nodes.iter().map(id).collect();
    await_presence(api(&nodes[1]), "troll", 3, &ids);

    let (status, reply) = http_json(api(&nodes[1]), "DELETE", "/v1/users/troll/connections", b"");
    assert_eq!(status, 202, "{reply}");
    for client in &mut kicked {
        assert_eq!(client.expect_close(), 4003);
    }
    ping(&mut bystander);
    await_presence(api(&nodes[1]), "troll", 0, &[]);
    assert_eq!(presence(api(&nodes[2]), "troll")["online"], false);
}

#[test]
fn device_limit_is_cluster_wide() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |config| config.max_devices_per_user = 2);
    assert_device_limit_of_two(&nodes);
}

#[test]
fn a_node_killed_with_sigkill_drops_out_within_the_node_ttl() {
    let redis = RedisServer::start();
    // Mailboxes off: with them, the survivor's own message to bob comes back through its
    // own channel (see tests/cluster_streams.rs).
    let survivor = TestNode::start(Config {
        mailbox: false,
        ..cluster_config(&redis.url(), "survivor")
    });
    await_ready(api(&survivor));
    let mut doomed = serve_doomed(&redis.url(), &["--shards", "2"], &[]);
    assert_eq!(doomed.node_id, "doomed");
    // bob's and dave's devices on the doomed node stay connected until it is killed.
    let Bystanders {
        mut bob_here,
        mut sender,
        bob_there: _bob_there,
        dave: _dave,
    } = Bystanders::connect(&survivor, &doomed);
    await_presence(doomed.api, "dave", 1, &["doomed"]);
    eventually("both nodes listed", || {
        listed_nodes(api(&survivor)).len() == 2
    });

    let killed = Instant::now();
    doomed.kill_abruptly();
    let left = || TTL_BOUND.saturating_sub(killed.elapsed());
    await_presence_within(left(), api(&survivor), "dave", 0, &[]);
    await_presence_within(left(), api(&survivor), "bob", 1, &["survivor"]);
    eventually_within(left(), "the dead node leaves /v1/nodes", || {
        listed_nodes(api(&survivor)) == ["survivor"]
    });

    // Bob's remaining device still gets messages, and none is routed to the dead node.
    let routed = publishes_carrying(&redis, "token-still-here", || {
        send(&mut sender, "bob", json!("token-still-here"));
        expect_msg(&mut bob_here, "sender", "bob", &json!("token-still-here"));
    });
    assert_eq!(routed, Vec::<String>::new());
}

#[test]
fn a_node_restarted_under_the_same_id_after_sigkill_forgets_its_old_users() {
    let redis = RedisServer::start();
    // Mailboxes off: with them, the survivor's own message to bob comes back through its
    // own channel (see tests/cluster_streams.rs).
    let survivor = TestNode::start(Config {
        mailbox: false,
        ..cluster_config(&redis.url(), "survivor")
    });
    await_ready(api(&survivor));
    let serve = || {
        let node = Process::serve(
            &[
                "--dev",
                "--shards",
                "2",
                "--redis",
                &redis.url(),
                "--node-id",
                "phoenix",
            ],
            &[],
        );
        await_ready(node.api);
        node
    };
    let mut first = serve();
    let _dave = first.client("dave");
    await_presence(api(&survivor), "dave", 1, &["phoenix"]);
    let killed = Instant::now();
    first.kill_abruptly();

    let second = serve();
    let mut erin = second.client("erin");
    let mut sender = Client::dev(&survivor, "sender");
    await_presence(api(&survivor), "erin", 1, &["phoenix"]);
    let left = || TTL_BOUND.saturating_sub(killed.elapsed());
    await_presence_within(left(), api(&survivor), "dave", 0, &[]);
    assert_eq!(listed_nodes(api(&survivor)).len(), 2);
    send(&mut sender, "erin", json!("welcome back"));
    expect_msg(&mut erin, "sender", "erin", &json!("welcome back"));
}

/// `stop` cleanly stops the node `stopped_id`, which holds the only connection of `leaver`
/// and is in a cluster with `observer`: from the moment `stop` is called, the user must
/// vanish from presence and the node from `/v1/nodes` well within the node TTL.
fn clean_stop_leaves_at_once(observer: &TestNode, stopped_id: &str, stop: impl FnOnce()) {
    await_presence(api(observer), "leaver", 1, &[stopped_id]);
    eventually("both nodes listed", || {
        listed_nodes(api(observer)).len() == 2
    });
    let stopping = Instant::now();
    stop();
    let left = || CLEAN_STOP_BOUND.saturating_sub(stopping.elapsed());
    await_presence_within(left(), api(observer), "leaver", 0, &[]);
    eventually_within(left(), "the stopped node leaves /v1/nodes", || {
        listed_nodes(api(observer)) == [id(observer)]
    });
}

#[test]
fn a_node_stopped_in_process_removes_its_routes_at_once() {
    let redis = RedisServer::start();
    let mut nodes = start_cluster(&redis, 2, |_| {});
    let mut leaver = Client::dev(&nodes[1], "leaver");
    let stopped = nodes.pop().expect("node");
    clean_stop_leaves_at_once(&nodes[0], id(&stopped), || {
        stopped.node().stopper().stop();
        assert_eq!(
            readyz(api(&stopped)),
            (503, json!({"ready":false,"reason":"draining"}))
        );
        assert_eq!(leaver.expect_close(), 1001);
    });
}

#[test]
fn a_node_stopped_by_sigterm_removes_its_routes_at_once() {
    let redis = RedisServer::start();
    let observer = TestNode::start(cluster_config(&redis.url(), "observer"));
    await_ready(api(&observer));
    let mut node = Process::serve(
        &["--dev", "--shards", "2", "--redis", &redis.url()],
        &[("SHARDCAST_DRAIN_WINDOW_MS", "0")],
    );
    await_ready(node.api);
    let mut leaver = node.client("leaver");
    let stopped_id = node.node_id.clone();
    clean_stop_leaves_at_once(&observer, &stopped_id, || {
        node.signal(libc::SIGTERM);
        assert_eq!(leaver.expect_close(), 1001);
    });
    assert!(node.wait_exit().success());
}

#[test]
fn the_cluster_heals_after_redis_restarts_empty() {
    let mut redis = RedisServer::start();
    let nodes = start_cluster(&redis, 2, |_| {});
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut alice = Client::dev(a, "alice");
    let mut carol = Client::dev(a, "carol");
    let mut bob = Client::dev(b, "bob");
    subscribe(&mut alice, "news");
    subscribe(&mut alice, "local");
    subscribe(&mut bob, "news");
    await_presence(api(a), "bob", 1, &[id(b)]);
    await_numsub(&redis, "news", 2);
    await_numsub(&redis, "local", 1);
    assert_eq!(readyz(api(a)), (200, json!({"ready":true})));
    assert_eq!(metric(api(a), "shardcast_redis_up"), Some(1.0));
    assert!(metric(api(a), "shardcast_bridge_queue_depth").is_some());
    send(&mut alice, "bob", json!("before"));
    expect_msg(&mut bob, "alice", "bob", &json!("before"));

    redis.kill();
    for node in [a, b] {
        eventually("readiness reports the Redis outage", || {
            readyz(api(node)) == (503, json!({"ready":false,"reason":"redis"}))
        });
        eventually("the Redis gauge drops", || {
            metric(api(node), "shardcast_redis_up") == Some(0.0)
        });
    }
    // Local delivery goes on: a direct message, a topic publication, a new connection.
    // (Whatever the bridge queued meanwhile may still go out once Redis is back, but must
    // not reach alice a second time: the silence checks at the end would catch it.)
    send(&mut carol, "alice", json!("local"));
    expect_msg(&mut alice, "carol", "alice", &json!("local"));
    let ack = carol.request(json!({"op":"pub","topic":"local","data":"local news"}));
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(alice.recv()["data"], "local news");
    let mut dan = Client::dev(b, "dan");
    ping(&mut dan);
    // A message for another node is held by the bridge meanwhile.
    send(&mut alice, "bob", json!("held"));
    eventually("the bridge holds the message for bob", || {
        metric(api(a), "shardcast_bridge_queue_depth").is_some_and(|depth| depth >= 1.0)
    });

    redis.restart();
    let back = Instant::now();
    let left = || HEAL_BOUND.saturating_sub(back.elapsed());
    for node in [a, b] {
        eventually_within(left(), "readiness once Redis is back", || {
            readyz(api(node)) == (200, json!({"ready":true}))
        });
    }
    // Routes, subscriptions and the registry are re-published into the empty Redis.
    await_presence_within(left(), api(a), "bob", 1, &[id(b)]);
    await_presence_within(left(), api(a), "dan", 1, &[id(b)]);
    await_numsub_within(left(), &redis, "news", 2);
    eventually_within(left(), "both nodes registered again", || {
        redis.numsub("shardcast:broadcast") == 2 && listed_nodes(api(a)).len() == 2
    });
    eventually("the Redis gauge is back", || {
        metric(api(a), "shardcast_redis_up") == Some(1.0)
    });
    eventually("the bridge queue drains", || {
        metric(api(a), "shardcast_bridge_queue_depth") == Some(0.0)
    });

    send(&mut alice, "dan", json!("after"));
    expect_msg(&mut dan, "alice", "dan", &json!("after"));
    // The held message reaches bob once, ahead of a later one from the same sender (or never,
    // had it waited past `bridge_hold_ms`).
    send(&mut alice, "bob", json!("after"));
    let mut got = bob.recv();
    if got["data"] == "held" {
        assert_eq!((&got["op"], &got["from"]), (&json!("msg"), &json!("alice")));
        got = bob.recv();
    }
    assert_eq!(
        (&got["from"], &got["data"]),
        (&json!("alice"), &json!("after"))
    );
    send(&mut bob, "alice", json!("after"));
    expect_msg(&mut alice, "bob", "alice", &json!("after"));
    let ack = carol.request(json!({"op":"pub","topic":"news","data":"cluster news"}));
    assert_eq!(ack["op"], "ack", "{ack}");
    for client in [&mut alice, &mut bob] {
        assert_eq!(client.recv()["data"], "cluster news");
    }
    let reply = publish(api(b), json!({"broadcast":true,"data":"all"}));
    for client in [&mut alice, &mut carol, &mut bob, &mut dan] {
        assert_eq!(client.recv()["mid"], reply["mid"]);
        client.expect_silence(QUIET);
    }
}

#[test]
fn the_redis_prefix_keeps_clusters_on_one_redis_apart() {
    let redis = RedisServer::start();
    let [one, two] = ["one", "two"].map(|prefix| {
        let mut config = cluster_config(&redis.url(), prefix);
        config.redis_prefix = prefix.into();
        let node = TestNode::start(config);
        await_ready(api(&node));
        node
    });
    for prefix in ["one", "two"] {
        eventually("each node subscribed under its own prefix", || {
            redis.numsub(&format!("{prefix}:broadcast")) == 1
        });
    }
    assert_eq!(redis.numsub("shardcast:broadcast"), 0);
    let mut bob = Client::dev(&two, "bob");
    subscribe(&mut bob, "t");
    await_presence(api(&two), "bob", 1, &["two"]);
    eventually("the topic channel is under the prefix", || {
        redis.numsub("two:topic:t") == 1
    });
    assert_eq!(redis.numsub(&topic_channel("t")), 0);

    assert_eq!(presence(api(&one), "bob")["online"], false);
    assert_eq!(listed_nodes(api(&one)), ["one"]);
    publish(api(&one), json!({"broadcast":true,"data":1}));
    publish(api(&one), json!({"users":["bob"],"topics":["t"],"data":2}));
    bob.expect_silence(QUIET);
}

#[test]
fn message_id_node_numbers_are_leased_one_per_node() {
    use shardcast::cluster::redis_layout::{lease_node_number, Names};
    let redis = RedisServer::start();
    let names = Names::new("shardcast");
    let mut conn = redis.connection();
    let mut lease = |node: &str, preferred| {
        lease_node_number(&mut conn, &names, node, preferred, 10_000).expect("redis")
    };
    assert_eq!(lease("a", 511), Some(511));
    assert_eq!(
        lease("b", 511),
        Some(0),
        "taken numbers are skipped, wrapping"
    );
    assert_eq!(
        lease("a", 511),
        Some(511),
        "a node restarted under its id takes its number back"
    );
    assert_eq!(lease("c", 511), Some(1));

    let nodes = start_cluster(&redis, 2, |_| {});
    let mut ids = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        // One user per node: a second device of one user could get the first one's
        // message (the sender's copy) before its own ack.
        let mut client = Client::dev(node, &format!("mids-{i}"));
        let mid: u64 = send(&mut client, "nobody", json!(1)).parse().expect("mid");
        ids.push((mid >> 14) & 511);
    }
    assert_ne!(ids[0], ids[1], "two live nodes never share a node number");
}

/// Mailboxes off (with them, the script appends and routes in one call): after one message
/// fills the route cache, a message to a known user is one PUBLISH per node holding it, sent
/// by the bridge, with no script.
#[test]
fn the_route_cache_reaches_a_known_user_with_one_publish_per_node_and_no_script() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |config| config.mailbox = false);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut alice = Client::dev(a, "alice");
    let mut bob_b = Client::dev(b, "bob");
    let mut bob_c = Client::dev(c, "bob");
    await_presence(api(a), "bob", 2, &[id(b), id(c)]);
    send(&mut alice, "bob", json!("first"));
    expect_msg(&mut bob_b, "alice", "bob", &json!("first"));
    expect_msg(&mut bob_c, "alice", "bob", &json!("first"));

    let publishes = monitored(&redis, "cached-token", || {
        send(&mut alice, "bob", json!("cached-token"));
        expect_msg(&mut bob_b, "alice", "bob", &json!("cached-token"));
        expect_msg(&mut bob_c, "alice", "bob", &json!("cached-token"));
    });
    let mut channels: Vec<&str> = publishes.iter().map(|p| p.channel.as_str()).collect();
    channels.sort_unstable();
    let mut expected = [
        instance_channel(&redis, id(b)),
        instance_channel(&redis, id(c)),
    ];
    expected.sort_unstable();
    assert_eq!(channels, expected);
    assert!(publishes.iter().all(|p| !p.by_script), "{publishes:?}");
    assert!(metric(api(a), "shardcast_route_cache_hits_total").unwrap_or(0.0) >= 1.0);
    bob_b.expect_silence(QUIET);
    bob_c.expect_silence(QUIET);
}

/// A user who moved is not routed to the node they left once the sender's node has seen the
/// move (here: its presence answer, which comes on the connection that carries the
/// invalidation, after it).
#[test]
fn the_route_cache_never_routes_to_the_node_a_user_left() {
    let redis = RedisServer::start();
    let nodes = start_cluster(&redis, 3, |config| config.mailbox = false);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut alice = Client::dev(a, "alice");
    let mut bob_b = Client::dev(b, "bob");
    await_presence(api(a), "bob", 1, &[id(b)]);
    send(&mut alice, "bob", json!("to b"));
    expect_msg(&mut bob_b, "alice", "bob", &json!("to b"));

    drop(bob_b);
    let mut bob_c = Client::dev(c, "bob");
    await_presence(api(a), "bob", 1, &[id(c)]);
    let publishes = monitored(&redis, "after-the-move", || {
        send(&mut alice, "bob", json!("after-the-move"));
        expect_msg(&mut bob_c, "alice", "bob", &json!("after-the-move"));
    });
    let channels: Vec<&str> = publishes.iter().map(|p| p.channel.as_str()).collect();
    assert_eq!(channels, [instance_channel(&redis, id(c))], "{publishes:?}");
    bob_c.expect_silence(QUIET);
    assert!(metric(api(a), "shardcast_route_cache_invalidations_total").unwrap_or(0.0) >= 1.0);
}

/// A cached route to a node killed with SIGKILL (its routes still in Redis, so nothing
/// invalidates them) is not heard: the message is routed by the script, which prunes the
/// dead node, and reaches the user's other device once.
#[test]
fn a_cached_route_to_a_killed_node_falls_back_to_the_script() {
    let redis = RedisServer::start();
    let survivor = TestNode::start(Config {
        mailbox: false,
        ..cluster_config(&redis.url(), "survivor")
    });
    let other = TestNode::start(Config {
        mailbox: false,
        ..cluster_config(&redis.url(), "other")
    });
    await_ready(api(&survivor));
    await_ready(api(&other));
    let mut doomed = serve_doomed(&redis.url(), &[], &[("SHARDCAST_MAILBOX", "false")]);
    let mut alice = Client::dev(&survivor, "alice");
    let _bob_there = doomed.client("bob");
    let mut bob_here = Client::dev(&other, "bob");
    let mut sorted = ["doomed", "other"];
    sorted.sort_unstable();
    await_presence(api(&survivor), "bob", 2, &sorted);
    send(&mut alice, "bob", json!("fill"));
    expect_msg(&mut bob_here, "alice", "bob", &json!("fill"));

    doomed.kill_abruptly();
    send(&mut alice, "bob", json!("after-the-kill"));
    expect_msg(&mut bob_here, "alice", "bob", &json!("after-the-kill"));
    bob_here.expect_silence(QUIET);
    assert!(
        metric(api(&survivor), "shardcast_bus_retries_total").unwrap_or(0.0) >= 1.0,
        "the unheard cached publish was routed again"
    );
    await_presence(api(&survivor), "bob", 1, &["other"]);
}
