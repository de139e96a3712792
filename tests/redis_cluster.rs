//! Cluster mode over a real Redis Cluster (`redis+cluster://`): three primaries and three
//! replicas started by the test (see `RedisCluster` in `common`), shardcast nodes in this
//! process (and a `shardcast serve` child where a node must die by SIGKILL).
//!
//! Covers the cluster suite's essentials on sharded pub/sub and hash-tagged keys:
//! cross-node direct messages to users spread over every primary, topics, broadcast,
//! presence, the cluster-wide device limit, mailboxes; a node killed with SIGKILL; a primary
//! killed under traffic (delivery resumes after its replica is promoted, and every message
//! is delivered or counted); a slot migrated live; the whole Redis Cluster restarted empty;
//! and the route cache never delivering to a node a user left.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use shardcast::Config;

/// How long to listen for a duplicate or a stray message.
const QUIET: Duration = Duration::from_millis(300);

/// How long after Redis comes back (restart, failover) the cluster must work again.
const HEAL_BOUND: Duration = Duration::from_secs(30);

/// A node on `cluster`, with a short heartbeat so failures are seen quickly.
fn config(cluster: &RedisCluster, node_id: &str) -> Config {
    Config {
        cluster_heartbeat_ms: 500,
        cluster_node_ttl_ms: 2000,
        ..cluster_config(&cluster.url(), node_id)
    }
}

/// Starts `n` nodes `n0`, `n1`, ... on `cluster` and waits until each lists all of them.
fn start_nodes(cluster: &RedisCluster, n: usize, tweak: impl Fn(&mut Config)) -> Vec<TestNode> {
    let nodes: Vec<TestNode> = (0..n)
        .map(|i| {
            let mut config = config(cluster, &format!("n{i}"));
            tweak(&mut config);
            TestNode::start(config)
        })
        .collect();
    for node in &nodes {
        await_ready(api(node));
        eventually("every node listed", || listed_nodes(api(node)).len() == n);
    }
    nodes
}

fn listed_nodes(api: SocketAddr) -> Vec<String> {
    let (status, reply) = http_json(api, "GET", "/v1/nodes", b"");
    if status != 200 {
        return Vec::new();
    }
    let mut ids: Vec<String> = reply
        .as_array()
        .expect("array")
        .iter()
        .map(|n| n["node"].as_str().expect("node").to_owned())
        .collect();
    ids.sort();
    ids
}

fn send(client: &mut Client, to: &str, data: Value) -> String {
    let ack = client.request(json!({"op":"send","to":to,"data":data,"id":1}));
    assert_eq!(ack["op"], "ack", "{ack}");
    ack["mid"].as_str().expect("mid").to_owned()
}

fn expect_msg(client: &mut Client, from: &str, data: &Value) -> Value {
    let msg = client.recv();
    assert_eq!(msg["op"], "msg", "{msg}");
    assert_eq!(msg["from"], from, "{msg}");
    assert_eq!(&msg["data"], data, "{msg}");
    msg
}

#[test]
fn the_essentials_work_over_a_redis_cluster() {
    let redis = RedisCluster::start(3, 1);
    let nodes = start_nodes(&redis, 2, |_| {});
    let (a, b) = (&nodes[0], &nodes[1]);

    // Direct messages both ways, to users whose keys live on every primary.
    let names: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let primaries: BTreeSet<u16> = names
        .iter()
        .map(|name| redis.primary_of_key(&format!("shardcast:{{u:{name}}}:user")))
        .collect();
    assert_eq!(primaries.len(), 3, "the users span every primary");
    let mut far: Vec<Client> = names.iter().map(|name| Client::dev(b, name)).collect();
    let mut alice = Client::dev(a, "alice");
    for name in &names {
        await_presence(api(a), name, 1, &[id(b)]);
    }
    for (name, client) in names.iter().zip(&mut far) {
        let mid = send(&mut alice, name, json!({"to": name}));
        let msg = expect_msg(client, "alice", &json!({"to": name}));
        assert_eq!(msg["mid"], mid.as_str());
    }
    send(&mut far[0], "alice", json!("back"));
    expect_msg(&mut alice, "user0", &json!("back"));

    // A topic with subscribers on both nodes, published from each: once per subscriber.
    let mut watchers = [Client::dev(a, "w1"), Client::dev(b, "w2")];
    for watcher in &mut watchers {
        let ack = watcher.request(json!({"op":"sub","topic":"room","id":1}));
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    eventually("both nodes subscribed to the topic", || {
        redis.numsub_sharded("shardcast:{t:room}:topic") == 2
    });
    for (from, node) in [("a", a), ("b", b)] {
        let reply = publish(api(node), json!({"topics":["room"],"data":from}));
        for watcher in &mut watchers {
            let got = watcher.recv();
            assert_eq!(got["op"], "pub", "{got}");
            assert_eq!(got["data"], from);
            assert_eq!(got["mid"], reply["mid"]);
        }
    }

    // Broadcast reaches every connection on every node once.
    let reply = publish(api(b), json!({"broadcast":true,"data":"all"}));
    for client in watchers.iter_mut().chain([&mut alice]) {
        let got = client.recv();
        assert_eq!(got["op"], "pub", "{got}");
        assert_eq!(got["mid"], reply["mid"]);
    }
    for client in watchers.iter_mut().chain([&mut alice]) {
        client.expect_silence(QUIET);
    }

    // Presence and topic counts are cluster-wide.
    let _second = Client::dev(a, "user0");
    let mut both = [id(a), id(b)];
    both.sort_unstable();
    await_presence(api(b), "user0", 2, &both);
    let (status, counts) = http_json(api(a), "GET", "/v1/topics/room", b"");
    assert_eq!(status, 200, "{counts}");
    assert_eq!(counts["subscribers"], 2, "{counts}");
    assert_eq!(metric_sum(api(a), "shardcast_bus_drops_total"), 0.0);
}

#[test]
fn the_device_limit_is_cluster_wide_over_a_redis_cluster() {
    let redis = RedisCluster::start(3, 0);
    let nodes = start_nodes(&redis, 3, |config| config.max_devices_per_user = 2);
    assert_device_limit_of_two(&nodes);
}

#[test]
fn mailboxes_number_messages_in_the_users_slot() {
    let redis = RedisCluster::start(3, 0);
    let nodes = start_nodes(&redis, 2, |config| config.mailbox_size = 100);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut dave = Client::dev(b, "dave");
    let mut carol_sender = Client::dev(a, "carol");
    let mut carol_elsewhere = Client::dev(b, "carol");
    await_presence(api(a), "dave", 1, &[id(b)]);
    let mut both = [id(a), id(b)];
    both.sort_unstable();
    await_presence(api(a), "carol", 2, &both);
    let answer = publish(api(a), json!({"users":["erin","dave"],"data":{"n":1}}));
    assert_eq!(answer["offline"], json!(["erin"]), "{answer}");
    assert_eq!(dave.recv()["seq"], 1);
    send(&mut carol_sender, "dave", json!({"n":2}));
    let live = dave.recv();
    assert_eq!(live["seq"], 2, "{live}");
    assert_eq!(live["from"], "carol");
    let copy = carol_elsewhere.recv();
    assert_eq!(copy["to"], "dave", "the sender's copy: {copy}");
    assert_eq!(copy["seq"], 1, "numbered in the sender's mailbox: {copy}");
    carol_sender.expect_silence(QUIET);

    let mut erin = Client::dev(a, "erin");
    assert_eq!(erin.hello["mailbox"]["seq"], 1);
    assert_resumes_one(&mut erin, json!({"n": 1}), "erin");
    let key = "shardcast:{u:dave}:mbox";
    let mut owner = redis.connection(redis.primary_of_key(key));
    let entries: u64 = redis::cmd("XLEN").arg(key).query(&mut owner).expect("XLEN");
    assert_eq!(entries, 2);
}

#[test]
fn a_node_killed_with_sigkill_drops_out_and_its_users_go_offline() {
    let redis = RedisCluster::start(3, 0);
    let survivor = TestNode::start(config(&redis, "survivor"));
    await_ready(api(&survivor));
    let mut doomed = serve_doomed(
        &redis.url(),
        &["--shards", "1"],
        &[
            ("SHARDCAST_CLUSTER_HEARTBEAT_MS", "500"),
            ("SHARDCAST_CLUSTER_NODE_TTL_MS", "2000"),
        ],
    );
    // bob's and dave's devices on the doomed node stay connected until it is killed.
    let Bystanders {
        mut bob_here,
        mut sender,
        bob_there: _bob_there,
        dave: _dave,
    } = Bystanders::connect(&survivor, &doomed);
    // The sender's route cache learns both of bob's nodes.
    send(&mut sender, "bob", json!("before"));
    expect_msg(&mut bob_here, "sender", &json!("before"));

    doomed.kill_abruptly();
    let bound = Duration::from_secs(10);
    await_presence_within(bound, api(&survivor), "dave", 0, &[]);
    await_presence_within(bound, api(&survivor), "bob", 1, &["survivor"]);
    eventually_within(bound, "the dead node leaves /v1/nodes", || {
        listed_nodes(api(&survivor)) == ["survivor"]
    });
    // The reaper pruned the dead node's devices from the users' keys.
    let key = "shardcast:{u:dave}:user";
    let mut owner = redis.connection(redis.primary_of_key(key));
    eventually_within(bound, "dave's dead device pruned", || {
        redis::cmd("ZCARD")
            .arg(key)
            .query::<u64>(&mut owner)
            .is_ok_and(|n| n == 0)
    });
    send(&mut sender, "bob", json!("after"));
    expect_msg(&mut bob_here, "sender", &json!("after"));
    assert_eq!(
        metric_sum(api(&survivor), "shardcast_bus_drops_total"),
        0.0,
        "nothing was lost on the way to the survivor"
    );
}

#[test]
fn a_killed_primary_fails_over_and_every_message_is_delivered_or_counted() {
    let mut redis = RedisCluster::start(3, 1);
    let nodes = start_nodes(&redis, 2, |config| config.mailbox = false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut bob = Client::dev(b, "bob");
    await_presence(api(a), "bob", 1, &[id(b)]);

    let doomed = redis.primary_of_key("shardcast:{u:bob}:user");
    redis.kill_primary(doomed);
    let killed = Instant::now();
    let mut accepted = BTreeSet::new();
    let mut refused = 0;
    let mut n = 0;
    // Publish through the failover (and a little after), every 50 ms.
    while killed.elapsed() < Duration::from_secs(6) {
        n += 1;
        let body = json!({"users":["bob"],"data":{"n":n}});
        let (status, reply) = http_json(api(a), "POST", "/v1/publish", body.to_string().as_bytes());
        if status == 200 {
            accepted.insert(reply["mid"].as_str().expect("mid").to_owned());
        } else {
            refused += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    redis.await_failover(doomed);
    await_ready(api(a));
    await_ready(api(b));
    await_presence_within(HEAL_BOUND, api(a), "bob", 1, &[id(b)]);

    // Delivery resumes after the failover.
    let deadline = Instant::now() + HEAL_BOUND;
    let mut after = None;
    while after.is_none() && Instant::now() < deadline {
        let reply = publish(api(a), json!({"users":["bob"],"data":"after"}));
        after = Some(reply["mid"].as_str().expect("mid").to_owned());
    }
    let after = after.expect("publish after the failover");
    let mut delivered = BTreeSet::new();
    let bound = Instant::now() + HEAL_BOUND;
    while !delivered.contains(&after) && Instant::now() < bound {
        let msg = bob.recv();
        delivered.insert(msg["mid"].as_str().expect("mid").to_owned());
    }
    assert!(delivered.contains(&after), "delivery resumed");
    let lost = metric_sum(api(a), "shardcast_bus_drops_total");
    let arrived = accepted.intersection(&delivered).count();
    assert_eq!(
        arrived as f64 + lost,
        accepted.len() as f64,
        "{} accepted ({refused} refused): {arrived} delivered, {lost} counted lost",
        accepted.len()
    );
}

#[test]
fn a_slot_migrated_live_keeps_routing() {
    let redis = RedisCluster::start(3, 0);
    let nodes = start_nodes(&redis, 2, |config| config.mailbox = false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut bob = Client::dev(b, "bob");
    let mut alice = Client::dev(a, "alice");
    await_presence(api(a), "bob", 1, &[id(b)]);
    send(&mut alice, "bob", json!(1));
    expect_msg(&mut bob, "alice", &json!(1));

    let key = "shardcast:{u:bob}:user";
    let from = redis.primary_of_key(key);
    let to = *redis
        .primary_ports()
        .iter()
        .find(|&&port| port != from)
        .expect("another primary");
    redis.migrate_slot(redis.keyslot(key), to);
    assert_eq!(redis.primary_of_key(key), to);

    // A new device (written where the slot is now) and messages to both.
    let mut bob_again = Client::dev(a, "bob");
    let mut both = [id(a), id(b)];
    both.sort_unstable();
    await_presence(api(b), "bob", 2, &both);
    send(&mut alice, "bob", json!(2));
    expect_msg(&mut bob, "alice", &json!(2));
    expect_msg(&mut bob_again, "alice", &json!(2));
}

#[test]
fn the_cluster_heals_after_the_redis_cluster_restarts_empty() {
    let mut redis = RedisCluster::start(3, 0);
    let nodes = start_nodes(&redis, 2, |config| config.mailbox = false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut bob = Client::dev(b, "bob");
    let mut alice = Client::dev(a, "alice");
    await_presence(api(a), "bob", 1, &[id(b)]);

    redis.restart_all();
    await_presence_within(HEAL_BOUND, api(a), "bob", 1, &[id(b)]);
    await_presence_within(HEAL_BOUND, api(b), "alice", 1, &[id(a)]);
    send(&mut alice, "bob", json!("healed"));
    expect_msg(&mut bob, "alice", &json!("healed"));
}

#[test]
fn the_route_cache_never_routes_to_the_node_a_user_left() {
    let redis = RedisCluster::start(3, 0);
    let nodes = start_nodes(&redis, 3, |config| config.mailbox = false);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut alice = Client::dev(a, "alice");
    let bob = Client::dev(b, "bob");
    await_presence(api(a), "bob", 1, &[id(b)]);
    send(&mut alice, "bob", json!("fill"));
    let mut bob = bob;
    expect_msg(&mut bob, "alice", &json!("fill"));
    let hits = metric_sum(api(a), "shardcast_route_cache_hits_total");
    send(&mut alice, "bob", json!("cached"));
    expect_msg(&mut bob, "alice", &json!("cached"));
    assert!(
        metric_sum(api(a), "shardcast_route_cache_hits_total") > hits,
        "the second message took the cache"
    );

    // Bob moves from B to C; A's cached route to B must not be acted on.
    drop(bob);
    let mut moved = Client::dev(c, "bob");
    await_presence(api(a), "bob", 1, &[id(c)]);
    let at_b = metric_sum(api(b), "shardcast_bus_envelopes_in_total");
    for n in 0..5 {
        send(&mut alice, "bob", json!(n));
        expect_msg(&mut moved, "alice", &json!(n));
    }
    moved.expect_silence(QUIET);
    assert_eq!(
        metric_sum(api(b), "shardcast_bus_envelopes_in_total"),
        at_b,
        "nothing reached the node bob left"
    );
}

/// The `online`/`offline` events of `user` in `P:events`, read from the primary holding it.
fn presence_events(redis: &RedisCluster, user: &str) -> Vec<String> {
    let key = "shardcast:events";
    let mut owner = redis.connection(redis.primary_of_key(key));
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(&mut owner)
        .expect("XRANGE");
    let text = |id: &redis::streams::StreamId, name: &str| -> Option<String> {
        redis::from_redis_value(id.map.get(name)?.clone()).ok()
    };
    reply
        .ids
        .iter()
        .filter(|id| text(id, "user").as_deref() == Some(user))
        .filter_map(|id| text(id, "type"))
        .filter(|kind| kind == "online" || kind == "offline")
        .collect()
}

#[test]
fn online_and_offline_are_announced_once_over_a_redis_cluster() {
    let redis = RedisCluster::start(3, 0);
    let nodes = start_nodes(&redis, 2, |config| {
        config.upstream_sink = Some(shardcast::config::SinkKind::Redis);
    });
    let (a, b) = (&nodes[0], &nodes[1]);
    let first = Client::dev(a, "alice");
    eventually("alice online", || {
        presence_events(&redis, "alice") == ["online"]
    });
    let second = Client::dev(b, "alice");
    let mut both = [id(a), id(b)];
    both.sort_unstable();
    await_presence(api(a), "alice", 2, &both);
    drop(first);
    await_presence(api(a), "alice", 1, &[id(b)]);
    assert_eq!(presence_events(&redis, "alice"), ["online"], "still online");
    drop(second);
    eventually("alice offline", || {
        presence_events(&redis, "alice") == ["online", "offline"]
    });
}
