//! The [`common::RedisCluster`] fixture itself, against real `redis-server` processes:
//! forming, per-slot writes, sharded pub/sub, failover, live slot migration, restart, and a
//! one-primary cluster.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::RedisCluster;

/// Sends `command` on `con` without reading its answer (for `SSUBSCRIBE`, whose answers and
/// later pushes are read with [`next_push`]).
fn send(con: &mut redis::Connection, command: &redis::Cmd) {
    con.send_packed_command(&command.get_packed_command())
        .expect("send");
}

/// The next reply or push on a subscribed connection, as strings (RESP2: an array).
fn next_push(con: &mut redis::Connection) -> Vec<String> {
    let value = con.recv_response().expect("a push within the read timeout");
    redis::from_redis_value(value.clone()).unwrap_or_else(|e| panic!("{value:?}: {e}"))
}

fn get(cluster: &RedisCluster, port: u16, key: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut cluster.connection(port))
}

#[test]
fn three_primaries_with_replicas_fail_over_migrate_and_restart() {
    let began = Instant::now();
    let mut cluster = RedisCluster::start(3, 1);
    let primaries = cluster.primary_ports();
    assert_eq!(primaries.len(), 3);
    let url = cluster.url();
    assert!(url.starts_with("redis+cluster://127.0.0.1:"), "{url}");
    assert_eq!(url.split(',').count(), 6, "{url}");

    // Keys on many slots, each written on its owner and acknowledged by its replica.
    let keys: Vec<String> = (0..24).map(|i| format!("key{i}")).collect();
    let mut owners = BTreeSet::new();
    for key in &keys {
        let port = cluster.primary_of_key(key);
        owners.insert(port);
        let mut con = cluster.connection(port);
        redis::cmd("SET")
            .arg(key)
            .arg(format!("v-{key}"))
            .exec(&mut con)
            .expect("SET on the owner");
        let acked: u64 = redis::cmd("WAIT")
            .arg(1)
            .arg(1000)
            .query(&mut con)
            .expect("WAIT");
        assert_eq!(acked, 1, "{key}: the replica did not acknowledge");
    }
    assert_eq!(owners.len(), 3, "24 keys landed on {owners:?}");
    // A non-owner redirects.
    let key = &keys[0];
    let other = *primaries
        .iter()
        .find(|&&p| p != cluster.primary_of_key(key))
        .expect("another primary");
    let moved = get(&cluster, other, key).expect_err("MOVED");
    assert_eq!(
        moved.redirect_node().map(|(_, slot)| slot),
        Some(cluster.keyslot(key))
    );

    // Sharded pub/sub on the channel's owner.
    let channel = "news";
    let owner = cluster.primary_of_key(channel);
    let mut subscriber = cluster.connection(owner);
    send(&mut subscriber, redis::cmd("SSUBSCRIBE").arg(channel));
    assert_eq!(next_push(&mut subscriber), ["ssubscribe", channel, "1"]);
    assert_eq!(cluster.numsub_sharded(channel), 1);
    let receivers: u64 = redis::cmd("SPUBLISH")
        .arg(channel)
        .arg("hello")
        .query(&mut cluster.connection(owner))
        .expect("SPUBLISH");
    assert_eq!(receivers, 1);
    assert_eq!(next_push(&mut subscriber), ["smessage", channel, "hello"]);

    // Moving the channel's slot away unsubscribes the subscriber, by a push.
    let slot = cluster.keyslot(channel);
    let to = *primaries.iter().find(|&&p| p != owner).expect("target");
    cluster.migrate_slot(slot, to);
    assert_eq!(cluster.primary_of_slot(slot), to);
    assert_eq!(next_push(&mut subscriber), ["sunsubscribe", channel, "0"]);
    assert_eq!(cluster.numsub_sharded(channel), 0);

    // A key's slot moves with the key.
    let moving = keys
        .iter()
        .find(|k| cluster.primary_of_key(k) == owner)
        .expect("a key on the channel's old owner");
    let slot = cluster.keyslot(moving);
    let to = *primaries.iter().find(|&&p| p != owner).expect("target");
    cluster.migrate_slot(slot, to);
    assert_eq!(cluster.primary_of_key(moving), to);
    assert_eq!(
        get(&cluster, to, moving).expect("GET"),
        Some(format!("v-{moving}"))
    );
    assert!(
        get(&cluster, owner, moving).is_err(),
        "the old owner still serves {moving}"
    );

    // Kill the primary of a key: its replica takes over with the key.
    let victim_key = keys
        .iter()
        .find(|k| cluster.primary_of_key(k) != to)
        .expect("a key elsewhere");
    let dead = cluster.primary_of_key(victim_key);
    let killed = Instant::now();
    cluster.kill_primary(dead);
    cluster.await_failover(dead);
    eprintln!("failover took {:?}", killed.elapsed());
    let promoted = cluster.primary_of_key(victim_key);
    assert_ne!(promoted, dead);
    assert_eq!(cluster.primary_ports().len(), 3);
    assert_eq!(
        get(&cluster, promoted, victim_key).expect("GET"),
        Some(format!("v-{victim_key}"))
    );

    // Restart: the same cluster, healthy and empty.
    cluster.restart_all();
    assert_eq!(cluster.primary_ports().len(), 3);
    for port in cluster.ports() {
        let size: u64 = redis::cmd("DBSIZE")
            .query(&mut cluster.connection(port))
            .expect("DBSIZE");
        assert_eq!(size, 0, "{port} kept data");
    }
    let port = cluster.primary_of_key(victim_key);
    assert_eq!(get(&cluster, port, victim_key).expect("GET"), None);
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "{:?}",
        began.elapsed()
    );
}

#[test]
fn one_primary_cluster_serves_every_slot() {
    let cluster = RedisCluster::start(1, 0);
    let ports = cluster.primary_ports();
    assert_eq!(ports, cluster.ports());
    assert_eq!(
        cluster.url(),
        format!("redis+cluster://127.0.0.1:{}", ports[0])
    );
    for key in ["a", "b", "{user}x"] {
        assert_eq!(cluster.primary_of_key(key), ports[0]);
        let mut con = cluster.connection(ports[0]);
        redis::cmd("SET")
            .arg(key)
            .arg(1)
            .exec(&mut con)
            .expect("SET");
    }
    assert_eq!(cluster.primary_of_slot(0), ports[0]);
    assert_eq!(cluster.primary_of_slot(common::SLOTS - 1), ports[0]);
    assert_eq!(cluster.numsub_sharded("c"), 0);
}
