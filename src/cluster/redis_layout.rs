//! Where the cluster keeps things in Redis: key and channel names, the server-side scripts
//! that read and write them, and the typed commands that call those scripts. No I/O: the
//! bridge sends what is built here.
//!
//! Every name starts with the configured prefix `P` (default `shardcast`):
//!
//! | name | type | what |
//! |---|---|---|
//! | `P:nodes` | set | node ids that registered (dead ones are pruned when listed) |
//! | `P:node:ID` | hash, TTL | one node: `ws`, `api`, `shards`, `connections`, `instance` |
//! | `P:alive:INST` | string, TTL | the lease of one bridge instance; its value is the node id |
//! | `P:user:USER` | sorted set | the user's devices: member `INST/CONN`, score = connect time (ms) |
//! | `P:inst:INST` | channel | envelopes for one node: directed messages, kicks, evictions |
//! | `P:topic:TOPIC` | channel | a topic's publications; subscribed by nodes with subscribers |
//! | `P:broadcast` | channel | broadcasts; every node subscribes |
//! | `P:mid-node:N` | string, TTL | lease of node number `N` (0–511) in message ids; value = node id |
//! | `P:epoch` | string | the cluster epoch: random, made by the first bridge that finds it missing |
//! | `P:settling` | string, TTL | exists while the nodes re-publish after Redis lost the epoch |
//! | `P:mbox:USER` | stream, TTL | the user's mailbox: entry id `0-SEQ`, fields `t m [f] [o] d` |
//! | `P:mbox-meta:USER` | hash, TTL | the mailbox's `ep` (epoch), `seq` (last sequence number), `mid` (latest message) |
//! | `P:hist:TOPIC` | stream, TTL | a topic's history (topics matching a history rule) |
//! | `P:hist-meta:TOPIC` | hash, TTL | the topic history's `ep`, `seq` and `mid` |
//! | `P:up:NAME` | stream | clients' `up` messages naming stream `NAME` (Redis Streams sink) |
//! | `P:events` | stream | connection events (Redis Streams sink) |
//! | `P:on:USER` | string, TTL | exists while the cluster has announced the user `online` (presence tracked) |
//! | `P:inst-users:INST` | set, TTL | users with a device under instance `INST` (presence tracked) |
//! | `P:insts` | sorted set | instances that track presence, score = registration time (ms) |
//!
//! An *instance* is one connection session of a node's bridge (64 random bits, in hex). A
//! device entry is valid only while its instance's `alive` key exists. That key is the
//! per-node lease of every route the node holds: one `SET … XX PX` per heartbeat keeps a
//! million routes alive, a node killed with `kill -9` loses all of them when the lease runs
//! out (`cluster_node_ttl_ms`), and a node that stops cleanly deletes its lease and so its
//! routes at once. Entries of dead instances are skipped by every reader and removed by the
//! scripts that meet them; the user key itself also carries a long TTL
//! ([`ROUTE_KEY_TTL_SECS`]) that live owners refresh in batches, so keys whose every owner
//! died are collected too. A bridge that reconnects starts a new instance, deletes the old
//! lease and re-publishes its devices: whatever Redis still held or lost of the old one
//! stops mattering at once.
//!
//! **Epoch and settling.** A Redis that restarted empty (or was flushed) has lost every
//! route, and the nodes put theirs back one by one, each within one reconnect backoff. A
//! message routed in between finds an empty table and would vanish. So each bridge joins
//! the cluster epoch when its session starts ([`JOIN`]): the first to find `P:epoch` missing
//! makes a new one, and a bridge that had joined an older epoch opens a settling window
//! (`P:settling`, `cluster_settle_ms`) whose remaining time every bridge joining the new
//! epoch learns and waits out before it routes. [`ROUTE`] checks the epoch on every call (one
//! `GET`): a message routed under an epoch that is gone (Redis flushed under a live session)
//! is handed back, and the bridge rebuilds its session, joins, waits and routes it again.
//! Nothing is routed from a half-rebuilt table, and nothing is lost meanwhile. (A node that
//! starts for the first time exactly while the cluster settles does not wait: it has no
//! backlog, and what it routes to a user not yet re-published is counted `no_route`.)
//!
//! **Unheard publishes.** `PUBLISH` answers how many subscribers got a message. A bridge
//! subscribes its instance channel before it takes its lease and never reuses an instance,
//! so a leased instance with no subscriber is gone for good (killed, or reconnecting under a
//! new instance): [`ROUTE`] deletes its lease and its devices at the first message it
//! misses, and reports the miss so the bridge retries the message until the node's new
//! instance has re-published its devices (or counts it lost after `bridge_hold_ms`).
//!
//! **Streams (protocol v1.1).** A user's mailbox and a topic's history are each a Redis
//! Stream plus a small meta hash; [`crate::history`] describes what a stream is and
//! [`crate::history::plan_replay`] the replay rule, which [`HISTORY_RANGE`] follows in Lua.
//!
//! - *Streams rather than lists.* An entry's id is `0-SEQ`, so "after seq N" is one
//!   exclusive range read, `XRANGE key (0-N + COUNT L` (O(log n + L)), with no index
//!   arithmetic for a trimmed head to break; `XADD` refuses an id that is not above the
//!   last, so the meta's counter and the stream can never silently disagree (the script
//!   fails instead of storing a duplicate `seq`); `MAXLEN` trims by count in the same
//!   command; and backends can read a mailbox with `XRANGE`/`XREAD` for audits. A list plus
//!   a counter would do the same work with `LRANGE` offsets and `LTRIM`; per-entry memory
//!   is alike (both pack entries into listpacks).
//! - *The seq is given where the message is routed.* [`ROUTE_TO_MAILBOXES`] appends a
//!   direct message to every addressed mailbox and routes it in the same script call (one
//!   round trip, as [`ROUTE`]), and [`PUBLISH_TO_HISTORY`] appends and publishes a topic
//!   message in one call. Both publish `head .. data .. trailer`, where the trailer carries
//!   each stream's `(seq, ep)` ([`split_positions`]): the receiving node renders the frames
//!   with them. A delivery retried after an unheard publish must not append again: the
//!   bridge retries with [`ROUTE`] and the payload it built with [`positions_trailer`]. A
//!   call repeated because its reply was lost (the connection dropped) appends nothing
//!   either: a stream whose latest message has the call's `mid` answers that message's
//!   position, and the receivers drop the second delivery by `mid` as they do today.
//! - *Entries hold fields, not frames.* `t` (ts; first, so age trimming reads it by
//!   position), `m` (mid), `f` (from, if any), `o` (the recipient, in a sender's copy), `d`
//!   (data). A replay renders `msg`/`pub` with `seq`/`ep` from them, and the history API its
//!   JSON; a frame would be bigger by its framing and field names, differ per mailbox, and
//!   serve only one of the two.
//! - *Bounds.* Count: `XADD … MAXLEN size`. Age: the head entries older than ttl are
//!   trimmed (`XTRIM MINID`) on every append and read, so a read never returns an expired
//!   message. Both keys `EXPIRE` ttl after the last append: an idle stream is forgotten
//!   with its epoch, like in memory.
//! - *Epochs.* The meta hash's `ep` is set when the meta is missing: a new stream, one that
//!   expired, or a Redis that restarted empty. The caller passes a fresh random candidate
//!   per call (Lua has no good randomness). A missing meta with a stream left over (only a
//!   `maxmemory` eviction does that) drops the stream: it belongs to a lost epoch.
//!
//! **Presence events.** `online` (a user's first device anywhere) and `offline` (its last
//! gone) are decided in Redis, by the scripts that change the routes, so two nodes never
//! both announce one transition: a user's flag `P:on:USER` is set by the [`DEVICE_ONLINE`]
//! call that finds it missing (that call records `online`) and deleted by the call that
//! finds the user with no live device left (that call records `offline`): a
//! [`DEVICE_OFFLINE`] when a device closes, or a [`REAP`] when the node holding the user's
//! last devices lost its lease. Scripts run one at a time, so each transition is seen by
//! exactly one call. [`REAP`] is what makes a killed node's users go offline: each
//! instance that tracks presence is registered in `P:insts` and indexes its users in
//! `P:inst-users:INST`; every bridge calls [`REAP`] on its heartbeat, which takes the users
//! of instances whose lease is gone (within `cluster_node_ttl_ms` of a kill -9, at once
//! after a clean stop) and announces those with no live device left. With the Redis Streams
//! sink, the deciding script also appends the event to `P:events` in the same atomic call;
//! with the webhook it returns the event and the node's sink sends it (a node that dies
//! between the two loses that event). Tracking costs one `SADD` and one flag per online
//! user, and is on only on nodes whose sink forwards `online` or `offline`. A Redis that
//! lost its state announces every user `online` again as the nodes re-publish.
//!
//! **Redis Cluster.** The scripts above read keys they are not passed (`alive` keys), walk
//! users of many slots ([`REAP`]) and publish to other nodes' channels, which one Redis
//! allows and a Redis Cluster does not: there every key one call touches must share a slot,
//! and a sharded channel a script publishes to must be in that slot too. With
//! [`Names::cluster`] the names carry hash tags (`P:{u:USER}:user`, `P:{u:USER}:on`,
//! `P:{u:USER}:mbox`, `P:{u:USER}:mbox-meta`; `P:{t:TOPIC}:hist`, `…:hist-meta` and the
//! topic's channel `P:{t:TOPIC}:topic`; `P:{i:INST}:users`; the registry under `{P}:`), and
//! what needed another slot moves to the bridge:
//! - *Routing.* No script routes: the bridge reads a user's devices into its route cache
//!   (a tracked `ZRANGE`) and publishes once per instance (`SPUBLISH`). A mailbox message is
//!   appended per user by [`APPEND`] (its `seq`, in the user's slot), then routed with the
//!   positions. [`PUBLISH_TO_HISTORY`] stays one call: the topic's channel shares its
//!   history's slot.
//! - *Liveness.* A publish nobody heard makes the bridge `DEL` that instance's lease (`1`:
//!   it had lost its subscription and rebuilds, the message is retried; `0`: dead, skipped).
//!   [`DEAD_INSTANCES`] (registry slot) lists registered instances whose lease is gone; the
//!   bridge passes them to the user-slot scripts, which drop their members.
//! - *Presence and pruning.* Every instance indexes its users (`P:{i:INST}:users`, the
//!   bridge's `SADD`/`SREM`). The reaper pops the users of dead instances and runs
//!   [`CLUSTER_DEVICE_GONE`] per user: dead members dropped, `offline` decided by the flag
//!   as above. [`CLUSTER_DEVICE_ONLINE`] is [`DEVICE_ONLINE`] in one slot (dead instances
//!   named by the bridge, the index written by the bridge). Events are returned, never
//!   appended by the script (`P:events` is another slot): the bridge sends them to the sink.
//! - *Epoch.* [`JOIN`] and the registry share the registry's slot; a message is not checked
//!   against the epoch per call (no route script), and a registry that lost its data is
//!   noticed by the heartbeat's lease refresh.

use bytes::Bytes;

use crate::history::{Entry, Message, Position, Replay, Retention, StreamKey};
use crate::upstream::{EventKind, Field, Happening, UpstreamEvent};

/// Seconds a user's device set lives without a refresh by one of its live owners.
pub const ROUTE_KEY_TTL_SECS: u64 = 3600;

/// How long a full round of route-key TTL refreshes takes (spread over heartbeats).
pub const ROUTE_REFRESH_ROUND_SECS: u64 = ROUTE_KEY_TTL_SECS / 4;

/// Key and channel names under one prefix, for a standalone Redis or a Redis Cluster.
///
/// On a Redis Cluster every key one script call touches must share a hash slot, so the
/// names carry hash tags (see the module docs, "Redis Cluster"): a user's keys are
/// `P:{u:USER}:…`, a topic's `P:{t:TOPIC}:…`, an instance's user index `P:{i:INST}:users`,
/// and the cluster-wide registry lives in the prefix's own slot, `{P}:…`. Channels that no
/// script publishes to keep their standalone names (a sharded channel's slot is its whole
/// name's).
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
    /// `P` standalone, `{P}` on a Redis Cluster: the registry's keys (nodes, leases,
    /// epoch, node numbers, instances) start with it.
    registry: String,
    cluster: bool,
}

impl Names {
    /// Names under `prefix` on a standalone Redis.
    pub fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_owned(),
            registry: prefix.to_owned(),
            cluster: false,
        }
    }

    /// Names under `prefix` on a Redis Cluster (hash-tagged).
    pub fn cluster(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_owned(),
            registry: format!("{{{prefix}}}"),
            cluster: true,
        }
    }

    /// Whether these are a Redis Cluster's names.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The prefix (scripts build channel and stream names from it).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The registry's prefix (scripts build `alive` and node names from it): the prefix,
    /// or on a Redis Cluster the prefix as a hash tag.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The command that publishes on the bus's channels: `SPUBLISH` (sharded pub/sub) on
    /// a Redis Cluster, `PUBLISH` otherwise.
    pub fn publish_command(&self) -> &'static str {
        if self.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// A publication of `payload` on `channel`.
    pub fn publish(&self, channel: &str, payload: &[u8]) -> redis::Cmd {
        let mut cmd = redis::cmd(self.publish_command());
        cmd.arg(channel).arg(payload);
        cmd
    }

    /// Set of registered node ids.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.registry)
    }

    /// One node's registry hash.
    pub fn node(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}", self.registry)
    }

    /// One instance's lease.
    pub fn alive(&self, instance: u64) -> String {
        format!("{}:alive:{}", self.registry, instance_hex(instance))
    }

    /// One user's device set.
    pub fn user(&self, user: &str) -> String {
        self.user_scoped(user, "user")
    }

    /// The user whose device set `key` is (read back from an invalidated key).
    pub fn user_of_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        self.scoped_name(key, 'u', "user")
    }

    /// A key of `user` named `what`: `P:what:USER`, or `P:{u:USER}:what` on a cluster.
    fn user_scoped(&self, user: &str, what: &str) -> String {
        self.scoped('u', user, what)
    }

    /// The topic whose channel `channel` is (read back from a dropped subscription).
    pub fn topic_of_channel<'c>(&self, channel: &'c str) -> Option<&'c str> {
        self.scoped_name(channel, 't', "topic")
    }

    /// A key of `topic` named `what`: `P:what:TOPIC`, or `P:{t:TOPIC}:what` on a cluster.
    fn topic_scoped(&self, topic: &str, what: &str) -> String {
        self.scoped('t', topic, what)
    }

    /// A name of `name` (a user, `u`, or a topic, `t`) called `what`: `P:what:NAME`, or
    /// on a cluster `P:{scope:NAME}:what`, whose hash tag puts every name of `name` in one
    /// slot.
    fn scoped(&self, scope: char, name: &str, what: &str) -> String {
        if self.cluster {
            format!("{}:{{{scope}:{name}}}:{what}", self.prefix)
        } else {
            format!("{}:{what}:{name}", self.prefix)
        }
    }

    /// The `name` of a [`Names::scoped`] name `full` called `what`, if it is one.
    fn scoped_name<'k>(&self, full: &'k str, scope: char, what: &str) -> Option<&'k str> {
        let rest = full.strip_prefix(&self.prefix)?.strip_prefix(':')?;
        if self.cluster {
            let rest = rest
                .strip_prefix('{')?
                .strip_prefix(scope)?
                .strip_prefix(':')?;
            rest.strip_suffix(what)?.strip_suffix("}:")
        } else {
            rest.strip_prefix(what)?.strip_prefix(':')
        }
    }

    /// One instance's channel.
    pub fn instance_channel(&self, instance: u64) -> String {
        format!("{}:inst:{}", self.prefix, instance_hex(instance))
    }

    /// One topic's channel (in its history's slot on a cluster: the history script
    /// publishes on it).
    pub fn topic(&self, topic: &str) -> String {
        self.topic_scoped(topic, "topic")
    }

    /// The lease of node number `number` in message ids.
    pub fn mid_node(&self, number: u16) -> String {
        format!("{}:mid-node:{number}", self.registry)
    }

    /// The cluster epoch.
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.registry)
    }

    /// Exists while the nodes re-publish after Redis lost the epoch.
    pub fn settling(&self) -> String {
        format!("{}:settling", self.registry)
    }

    /// The broadcast channel.
    pub fn broadcast(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }

    /// A user's presence flag: set while the cluster has announced the user `online`.
    pub fn presence_flag(&self, user: &str) -> String {
        self.user_scoped(user, "on")
    }

    /// The users an instance holds devices of (while presence is tracked, and always on a
    /// cluster).
    pub fn instance_users(&self, instance: u64) -> String {
        if self.cluster {
            format!("{}:{{i:{}}}:users", self.prefix, instance_hex(instance))
        } else {
            format!("{}:inst-users:{}", self.prefix, instance_hex(instance))
        }
    }

    /// The instances that track presence (all of them on a cluster), for [`REAP`].
    pub fn instances(&self) -> String {
        format!("{}:insts", self.registry)
    }

    /// The upstream stream a client's `up` named: `P:up:NAME`.
    pub fn upstream(&self, stream: &str) -> String {
        format!("{}:up:{stream}", self.prefix)
    }

    /// The upstream stream of connection events.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// A stream's entries: `P:mbox:USER` or `P:hist:TOPIC`.
    pub fn stream(&self, key: &StreamKey) -> String {
        match key {
            StreamKey::Mailbox(user) => self.user_scoped(user, "mbox"),
            StreamKey::Topic(topic) => self.topic_scoped(topic, "hist"),
        }
    }

    /// A stream's epoch and last sequence number: `P:mbox-meta:USER` or `P:hist-meta:TOPIC`.
    pub fn stream_meta(&self, key: &StreamKey) -> String {
        match key {
            StreamKey::Mailbox(user) => self.user_scoped(user, "mbox-meta"),
            StreamKey::Topic(topic) => self.topic_scoped(topic, "hist-meta"),
        }
    }
}

/// The server-side scripts (loaded into Redis at every session start) and the typed
/// commands that call them, so a script's arguments are spelled in one place, next to it.
#[derive(Debug)]
pub struct Scripts {
    names: Names,
    join: redis::Script,
    route: redis::Script,
    device_online: redis::Script,
    device_offline: redis::Script,
    reap: redis::Script,
    presence: redis::Script,
    nodes: redis::Script,
    route_to_mailboxes: redis::Script,
    publish_to_history: redis::Script,
    history_range: redis::Script,
    cluster_device_online: redis::Script,
    cluster_device_gone: redis::Script,
    append: redis::Script,
    dead_instances: redis::Script,
}

impl Scripts {
    /// The scripts, for keys and channels under `names`.
    pub fn new(names: Names) -> Self {
        Scripts {
            names,
            join: redis::Script::new(JOIN),
            route: redis::Script::new(ROUTE),
            device_online: redis::Script::new(DEVICE_ONLINE),
            device_offline: redis::Script::new(DEVICE_OFFLINE),
            reap: redis::Script::new(REAP),
            presence: redis::Script::new(PRESENCE),
            nodes: redis::Script::new(NODES),
            route_to_mailboxes: redis::Script::new(ROUTE_TO_MAILBOXES),
            publish_to_history: redis::Script::new(PUBLISH_TO_HISTORY),
            history_range: redis::Script::new(HISTORY_RANGE),
            cluster_device_online: redis::Script::new(CLUSTER_DEVICE_ONLINE),
            cluster_device_gone: redis::Script::new(CLUSTER_DEVICE_GONE),
            append: redis::Script::new(APPEND),
            dead_instances: redis::Script::new(DEAD_INSTANCES),
        }
    }

    /// `SCRIPT LOAD` of every script, in one pipeline; it answers their SHA1s, which
    /// [`Scripts::loaded`] checks.
    pub fn load(&self) -> redis::Pipeline {
        let mut load = redis::pipe();
        for source in [
            JOIN,
            ROUTE,
            DEVICE_ONLINE,
            DEVICE_OFFLINE,
            REAP,
            PRESENCE,
            NODES,
            ROUTE_TO_MAILBOXES,
            PUBLISH_TO_HISTORY,
            HISTORY_RANGE,
            CLUSTER_DEVICE_ONLINE,
            CLUSTER_DEVICE_GONE,
            APPEND,
            DEAD_INSTANCES,
        ] {
            load.cmd("SCRIPT").arg("LOAD").arg(source);
        }
        load
    }

    /// Whether the SHA1s Redis answered to [`Scripts::load`] are the ones the commands use.
    pub fn loaded(&self, hashes: &[String]) -> bool {
        let ours = [
            &self.join,
            &self.route,
            &self.device_online,
            &self.device_offline,
            &self.reap,
            &self.presence,
            &self.nodes,
            &self.route_to_mailboxes,
            &self.publish_to_history,
            &self.history_range,
            &self.cluster_device_online,
            &self.cluster_device_gone,
            &self.append,
            &self.dead_instances,
        ];
        hashes.len() == ours.len()
            && ours
                .iter()
                .zip(hashes)
                .all(|(script, hash)| script.get_hash() == hash)
    }

    fn call(script: &redis::Script, keys: usize) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys);
        cmd
    }

    /// [`JOIN`]: join the cluster epoch; answers `(epoch, settling ms left)`.
    pub fn join(&self, candidate: &str, previous: &str, settle_ms: u64) -> redis::Cmd {
        let mut cmd = Self::call(&self.join, 2);
        cmd.arg(self.names.epoch())
            .arg(self.names.settling())
            .arg(candidate)
            .arg(previous)
            .arg(settle_ms);
        cmd
    }

    /// [`ROUTE`]: publish `payload` once to every other node holding a device of any of
    /// `users`, the first `recipients` of which are the message's recipients; the answer
    /// reads with [`Routed::parse`]. `instance_hex` is the calling instance, which gets
    /// nothing (it delivered locally); empty, every node gets it, the caller's included (a
    /// streamed message, which the caller delivers through its own subscription).
    pub fn route(
        &self,
        users: &[impl AsRef<str>],
        recipients: usize,
        instance_hex: &str,
        epoch: &str,
        payload: &[u8],
    ) -> redis::Cmd {
        let mut cmd = Self::call(&self.route, users.len());
        for user in users {
            cmd.arg(self.names.user(user.as_ref()));
        }
        cmd.arg(self.names.prefix())
            .arg(instance_hex)
            .arg(payload)
            .arg(epoch)
            .arg(recipients);
        cmd
    }

    /// [`DEVICE_ONLINE`]: record `device` (connected at `since_ms`) under its instance, and
    /// its user's presence when tracked (`online` with id `mid`); the answer reads with
    /// [`DeviceAdded::of`].
    pub fn device_online(
        &self,
        device: DeviceKey<'_>,
        since_ms: u64,
        max_devices: usize,
        presence: &PresenceArgs<'_>,
        mid: u64,
    ) -> redis::Cmd {
        let mut cmd = self.device_call(&self.device_online, device);
        online_args(&mut cmd, device, since_ms, max_devices);
        presence.decision_args(&mut cmd, mid, &[]);
        cmd
    }

    /// [`DEVICE_OFFLINE`]: remove `device` and, when presence is tracked, decide `offline`
    /// (with id `mid`); the answer reads with [`presence_events`].
    pub fn device_offline(
        &self,
        device: DeviceKey<'_>,
        presence: &PresenceArgs<'_>,
        mid: u64,
    ) -> redis::Cmd {
        let mut cmd = self.device_call(&self.device_offline, device);
        cmd.arg(device.user);
        presence.decision_args(&mut cmd, mid, &[]);
        cmd
    }

    /// A device script's call with its keys (user, presence flag, instance index) and first
    /// arguments (prefix, instance, member).
    fn device_call(&self, script: &redis::Script, device: DeviceKey<'_>) -> redis::Cmd {
        let mut cmd = Self::call(script, 3);
        cmd.arg(self.names.user(device.user))
            .arg(self.names.presence_flag(device.user))
            .arg(self.names.instance_users(device.instance))
            .arg(self.names.prefix())
            .arg(instance_hex(device.instance))
            .arg(device_member(device.instance, device.conn));
        cmd
    }

    /// [`REAP`]: `offline` for the users of instances whose lease is gone, at most one per
    /// id in `mids`; the answer reads with [`Reaped::of`].
    pub fn reap(&self, presence: &PresenceArgs<'_>, mids: &[u64]) -> redis::Cmd {
        let mut cmd = Self::call(&self.reap, 0);
        cmd.arg(self.names.prefix());
        presence.args(&mut cmd);
        cmd.arg(mids.len());
        for mid in mids {
            cmd.arg(*mid);
        }
        cmd
    }

    /// [`PRESENCE`] of `user`: answers `{live devices, node id, …}`.
    pub fn presence(&self, user: &str) -> redis::Cmd {
        let mut cmd = Self::call(&self.presence, 1);
        cmd.arg(self.names.user(user)).arg(self.names.prefix());
        cmd
    }

    /// [`NODES`]: answers `{id, ws, api, shards, connections, …}` of the live nodes.
    pub fn nodes(&self) -> redis::Cmd {
        let mut cmd = Self::call(&self.nodes, 1);
        cmd.arg(self.names.nodes()).arg(self.names.registry());
        cmd
    }

    /// [`ROUTE_TO_MAILBOXES`]: append `message` to the mailbox of each of `users` (the
    /// first `recipients` of them the recipients, the rest a sender whose copy records
    /// `message.to`), then route `head .. data .. positions` as [`ROUTE`] routes its
    /// payload (`instance_hex` as there); the answer reads with [`MailboxRouted::of`].
    pub fn route_to_mailboxes(
        &self,
        users: &[impl AsRef<str>],
        recipients: usize,
        instance_hex: &str,
        epoch: &str,
        head: &[u8],
        message: &StreamAppend<'_>,
    ) -> redis::Cmd {
        let mut cmd = Self::call(&self.route_to_mailboxes, 3 * users.len());
        for user in users {
            cmd.arg(self.names.user(user.as_ref()));
        }
        let keys = |user: &dyn AsRef<str>| StreamKey::Mailbox(user.as_ref().into());
        for user in users {
            cmd.arg(self.names.stream(&keys(user)));
        }
        for user in users {
            cmd.arg(self.names.stream_meta(&keys(user)));
        }
        cmd.arg(self.names.prefix())
            .arg(instance_hex)
            .arg(head)
            .arg(epoch)
            .arg(recipients);
        message.args(&mut cmd);
        cmd
    }

    /// [`PUBLISH_TO_HISTORY`]: append `message` to `topic`'s history and publish
    /// `head .. data .. position` on the topic's channel; the answer reads with
    /// [`HistoryPublished::of`].
    pub fn publish_to_history(
        &self,
        topic: &str,
        head: &[u8],
        message: &StreamAppend<'_>,
    ) -> redis::Cmd {
        let key = StreamKey::Topic(topic.into());
        let mut cmd = Self::call(&self.publish_to_history, 2);
        cmd.arg(self.names.stream(&key))
            .arg(self.names.stream_meta(&key))
            .arg(self.names.topic(topic))
            .arg(head);
        message.args(&mut cmd);
        cmd.arg(self.names.publish_command());
        cmd
    }

    /// [`HISTORY_RANGE`]: the retained messages of stream `key` after `since_seq` of epoch
    /// `since_ep` (`None`: of the stream's current epoch, for the history API, which names
    /// none), at most `limit` (0: the position only, e.g. for `hello.mailbox`), with
    /// messages older than `ttl_secs` at `now_ms` dropped first; the answer reads with
    /// [`replay_of`].
    pub fn history_range(
        &self,
        key: &StreamKey,
        since_seq: u64,
        since_ep: Option<&str>,
        limit: usize,
        now_ms: u64,
        ttl_secs: u64,
    ) -> redis::Cmd {
        let mut cmd = Self::call(&self.history_range, 2);
        cmd.arg(self.names.stream(key))
            .arg(self.names.stream_meta(key))
            .arg(since_seq)
            .arg(since_ep.unwrap_or(""))
            .arg(limit)
            .arg(now_ms)
            .arg(ttl_secs)
            .arg(u8::from(since_ep.is_none()));
        cmd
    }

    /// [`CLUSTER_DEVICE_ONLINE`]: [`Scripts::device_online`] on a Redis Cluster, where
    /// `dead` names the instances known dead (their members never count against the
    /// limit); the answer reads with [`DeviceAdded::of`].
    pub fn cluster_device_online(
        &self,
        device: DeviceKey<'_>,
        since_ms: u64,
        max_devices: usize,
        presence: &PresenceArgs<'_>,
        mid: u64,
        dead: &[u64],
    ) -> redis::Cmd {
        let mut cmd = Self::call(&self.cluster_device_online, 2);
        cmd.arg(self.names.user(device.user))
            .arg(self.names.presence_flag(device.user))
            .arg(device_member(device.instance, device.conn));
        online_args(&mut cmd, device, since_ms, max_devices);
        presence.decision_args(&mut cmd, mid, dead);
        cmd
    }

    /// [`CLUSTER_DEVICE_GONE`]: remove `member` (if any) and the dead instances' members
    /// of `user`, and decide `offline` (with id `mid`); the answer reads with
    /// [`presence_events`].
    pub fn cluster_device_gone(
        &self,
        user: &str,
        member: Option<&str>,
        presence: &PresenceArgs<'_>,
        mid: u64,
        dead: &[u64],
    ) -> redis::Cmd {
        let mut cmd = Self::call(&self.cluster_device_gone, 2);
        cmd.arg(self.names.user(user))
            .arg(self.names.presence_flag(user))
            .arg(member.unwrap_or(""))
            .arg(user);
        presence.decision_args(&mut cmd, mid, dead);
        cmd
    }

    /// [`APPEND`]: `message` appended to the mailbox of `user` (a sender's copy records
    /// `message.to` when `senders_copy`); answers `{seq, ep}`.
    pub fn append_to_mailbox(
        &self,
        user: &str,
        message: &StreamAppend<'_>,
        senders_copy: bool,
    ) -> redis::Cmd {
        let key = StreamKey::Mailbox(user.into());
        let mut cmd = Self::call(&self.append, 2);
        cmd.arg(self.names.stream(&key))
            .arg(self.names.stream_meta(&key))
            .arg(message.candidate_ep)
            .arg(message.retention.size)
            .arg(message.retention.ttl_secs)
            .arg(message.now_ms)
            .arg(message.mid)
            .arg("t")
            .arg(message.ts)
            .arg("m")
            .arg(message.mid);
        if let Some(from) = message.from {
            cmd.arg("f").arg(from);
        }
        if let Some(to) = message.to.filter(|_| senders_copy) {
            cmd.arg("o").arg(to);
        }
        cmd.arg("d").arg(message.data);
        cmd
    }

    /// [`DEAD_INSTANCES`]: the registered instances whose lease is gone.
    pub fn dead_instances(&self) -> redis::Cmd {
        let mut cmd = Self::call(&self.dead_instances, 1);
        cmd.arg(self.names.instances()).arg(self.names.registry());
        cmd
    }
}

/// One message appended to streams by [`Scripts::route_to_mailboxes`] or
/// [`Scripts::publish_to_history`].
#[derive(Debug, Clone, Copy)]
pub struct StreamAppend<'a> {
    /// The epoch a stream created by this call takes. Fresh per call (e.g.
    /// [`crate::history::EpochSource::next_epoch`] seeded at random), so a stream created
    /// afresh never takes an epoch it had before; streams created by the same call may
    /// share it.
    pub candidate_ep: &'a str,
    /// The streams' count and age bounds.
    pub retention: Retention,
    /// The sender's clock, ms: messages older than the ttl at this time are dropped.
    pub now_ms: u64,
    /// Message id.
    pub mid: u64,
    /// Server time of the message, ms.
    pub ts: u64,
    /// The sending user (`None`: from the server; topic histories do not keep it).
    pub from: Option<&'a str>,
    /// The recipient recorded in a sender's copy of a direct message.
    pub to: Option<&'a str>,
    /// The message's `data`, JSON text; also the part of the published payload between
    /// `head` and the trailer.
    pub data: &'a str,
}

impl StreamAppend<'_> {
    /// `ARGV` candidate epoch, size, ttl (s), now (ms), mid, ts, from, to, data.
    fn args(&self, cmd: &mut redis::Cmd) {
        cmd.arg(self.candidate_ep)
            .arg(self.retention.size)
            .arg(self.retention.ttl_secs)
            .arg(self.now_ms)
            .arg(self.mid)
            .arg(self.ts)
            .arg(self.from.unwrap_or(""))
            .arg(self.to.unwrap_or(""))
            .arg(self.data);
    }
}

/// `XADD` of one upstream record ([`crate::upstream::redis_streams`]): a client's `up` to
/// `P:up:NAME`, a connection event to `P:events`, trimmed to about `maxlen` entries; the
/// fields are the record's ([`UpstreamEvent::fields`]), each value as text.
pub fn xadd_record(names: &Names, record: &UpstreamEvent, maxlen: u64) -> redis::Cmd {
    let key = match &record.what {
        Happening::Up { stream, .. } => names.upstream(stream),
        _ => names.events(),
    };
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("MAXLEN").arg("~").arg(maxlen).arg("*");
    for (name, value) in record.fields() {
        cmd.arg(name);
        match value {
            Field::Text(text) | Field::Json(text) => cmd.arg(text),
            Field::Id(n) | Field::Number(n) => cmd.arg(n),
        };
    }
    cmd
}

/// The arguments both device-online scripts take after the device's member: when it
/// connected, the device limit, the route keys' TTL and its user.
fn online_args(cmd: &mut redis::Cmd, device: DeviceKey<'_>, since_ms: u64, max_devices: usize) {
    cmd.arg(since_ms)
        .arg(max_devices)
        .arg(ROUTE_KEY_TTL_SECS)
        .arg(device.user);
}

/// One device as the route scripts name it: its user, and the instance and connection
/// that make its member.
#[derive(Debug, Clone, Copy)]
pub struct DeviceKey<'a> {
    /// The user.
    pub user: &'a str,
    /// The bridge instance holding it.
    pub instance: u64,
    /// The connection id.
    pub conn: u64,
}

/// How the presence scripts track `online` and `offline` ([`DEVICE_ONLINE`],
/// [`DEVICE_OFFLINE`], [`REAP`]), from this node's upstream settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceMode {
    /// Not tracked: no upstream sink forwards `online` or `offline`.
    Off,
    /// Tracked, and the events returned to the caller (the webhook sink sends them).
    Return,
    /// Tracked, and the events appended to `P:events` by the script that decides them (the
    /// Redis Streams sink), as well as returned (for the metrics).
    Append,
}

/// The presence arguments of a script call.
#[derive(Debug, Clone, Copy)]
pub struct PresenceArgs<'a> {
    /// Whether and how presence is tracked.
    pub mode: PresenceMode,
    /// Record `online` events.
    pub online: bool,
    /// Record `offline` events.
    pub offline: bool,
    /// The id of the node making the events.
    pub node: &'a str,
    /// The events' time, ms since the Unix epoch.
    pub ts: u64,
    /// `MAXLEN ~` of `P:events`.
    pub maxlen: u64,
}

impl PresenceArgs<'_> {
    /// `ARGV` of a call that may decide one event: the presence arguments, the event's id,
    /// then the instances known dead (read by the Redis Cluster scripts; none otherwise).
    fn decision_args(&self, cmd: &mut redis::Cmd, mid: u64, dead: &[u64]) {
        self.args(cmd);
        cmd.arg(mid);
        for instance in dead {
            cmd.arg(instance_hex(*instance));
        }
    }

    /// `ARGV` mode, kinds, node, ts, maxlen (read by `presence_args` in the scripts).
    fn args(&self, cmd: &mut redis::Cmd) {
        let mode = match self.mode {
            PresenceMode::Off => "",
            PresenceMode::Return => "w",
            PresenceMode::Append => "r",
        };
        let kinds = u8::from(self.online) | (u8::from(self.offline) << 1);
        cmd.arg(mode)
            .arg(kinds)
            .arg(self.node)
            .arg(self.ts)
            .arg(self.maxlen);
    }
}

/// One presence event a script decided: its kind, user and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    /// `Online` or `Offline`.
    pub kind: EventKind,
    /// The user.
    pub user: String,
    /// The event's id.
    pub mid: u64,
}

/// Reads the `{kind, user, mid, …}` list of a presence script's answer.
pub fn presence_events(reply: &redis::Value) -> Vec<PresenceEvent> {
    let redis::Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .chunks_exact(3)
        .filter_map(|event| {
            let text = |value: &redis::Value| match value {
                redis::Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
                _ => None,
            };
            let kind = match text(&event[0])?.as_str() {
                "online" => EventKind::Online,
                "offline" => EventKind::Offline,
                _ => return None,
            };
            Some(PresenceEvent {
                kind,
                user: text(&event[1])?,
                mid: text(&event[2])?.parse().ok()?,
            })
        })
        .collect()
}

/// The bulk strings among `values`, as text (members, keys); anything else is skipped.
pub fn bulk_strings(values: &[redis::Value]) -> Vec<String> {
    values
        .iter()
        .filter_map(|value| match value {
            redis::Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
            _ => None,
        })
        .collect()
}

/// What [`DEVICE_ONLINE`] answered.
#[derive(Debug, Default)]
pub struct DeviceAdded {
    /// Device members the cluster device limit evicted: the caller closes them.
    pub evicted: Vec<String>,
    /// The `online` it decided, if any.
    pub events: Vec<PresenceEvent>,
}

impl DeviceAdded {
    /// Reads the script's reply (`None`: not an answer of [`DEVICE_ONLINE`]).
    pub fn of(reply: &redis::Value) -> Option<DeviceAdded> {
        let redis::Value::Array(parts) = reply else {
            return None;
        };
        let [redis::Value::Array(evicted), events] = parts.as_slice() else {
            return None;
        };
        Some(DeviceAdded {
            evicted: bulk_strings(evicted),
            events: presence_events(events),
        })
    }
}

/// What [`REAP`] answered.
#[derive(Debug, Default)]
pub struct Reaped {
    /// The `offline` events it decided.
    pub events: Vec<PresenceEvent>,
    /// It stopped at its budget: there may be more to reap.
    pub more: bool,
}

impl Reaped {
    /// Reads the script's reply (`None`: not an answer of [`REAP`]).
    pub fn of(reply: &redis::Value) -> Option<Reaped> {
        let redis::Value::Array(parts) = reply else {
            return None;
        };
        let [events, redis::Value::Int(more)] = parts.as_slice() else {
            return None;
        };
        Some(Reaped {
            events: presence_events(events),
            more: *more == 1,
        })
    }
}

/// How many node numbers message ids have room for (9 bits).
pub const NODE_NUMBERS: u16 = 512;

/// Claims a node number for message ids: the first of `preferred`, `preferred + 1`, ...
/// that is free or already this node's (a node restarted under its id takes its number
/// back). Blocking; runs once, at start, before any shard makes an id. `Ok(None)` when
/// every number is taken.
pub fn lease_node_number(
    conn: &mut impl redis::ConnectionLike,
    names: &Names,
    node_id: &str,
    preferred: u16,
    ttl_ms: u64,
) -> redis::RedisResult<Option<u16>> {
    for offset in 0..NODE_NUMBERS {
        let number = (preferred + offset) % NODE_NUMBERS;
        let key = names.mid_node(number);
        let claimed: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(node_id)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query(conn)?;
        if claimed.is_some() {
            return Ok(Some(number));
        }
        let holder: Option<String> = redis::cmd("GET").arg(&key).query(conn)?;
        if holder.as_deref() == Some(node_id) {
            let _: () = redis::cmd("PEXPIRE").arg(&key).arg(ttl_ms).query(conn)?;
            return Ok(Some(number));
        }
    }
    Ok(None)
}

/// An instance id as it appears in names and device members.
pub fn instance_hex(instance: u64) -> String {
    format!("{instance:016x}")
}

/// A device's member in its user's sorted set.
pub fn device_member(instance: u64, conn: u64) -> String {
    format!("{}/{conn}", instance_hex(instance))
}

/// Splits a device member into its instance and connection id.
pub fn parse_device_member(member: &str) -> Option<(u64, u64)> {
    let (instance, conn) = member.split_once('/')?;
    Some((u64::from_str_radix(instance, 16).ok()?, conn.parse().ok()?))
}

/// `KEYS` epoch, settling window; `ARGV` candidate epoch, the epoch this bridge joined
/// before (empty if none), settle window (ms). Joins the cluster epoch, making it if
/// missing; a bridge whose old epoch is gone opens the settling window. Returns
/// `{epoch, settling ms left (<= 0: none)}`.
pub const JOIN: &str = r#"
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
if ARGV[2] ~= '' and ARGV[2] ~= epoch then
  redis.call('SET', KEYS[2], epoch, 'NX', 'PX', ARGV[3])
end
return {epoch, redis.call('PTTL', KEYS[2])}
"#;

/// What [`ROUTE`] answered for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// The epoch the message was routed under is gone: rebuild the session, then retry.
    EpochLost,
    /// Routed.
    Done {
        /// Nodes it was published to.
        sent: u64,
        /// Recipients with no live device anywhere.
        no_route: u64,
        /// Nodes it was published to that were no longer subscribed.
        unheard: u64,
    },
}

impl Routed {
    /// Reads the script's reply as Redis sent it (`None`: not an answer of [`ROUTE`]).
    pub fn of(reply: &redis::Value) -> Option<Routed> {
        let redis::Value::Array(items) = reply else {
            return None;
        };
        let numbers = items
            .iter()
            .map(|item| match item {
                redis::Value::Int(n) => Some(*n),
                _ => None,
            })
            .collect::<Option<Vec<i64>>>()?;
        Routed::parse(&numbers)
    }

    /// Reads the script's answer (`None`: not an answer of [`ROUTE`]).
    pub fn parse(answer: &[i64]) -> Option<Routed> {
        match *answer {
            [-1] => Some(Routed::EpochLost),
            [sent, no_route, unheard] if sent >= 0 && no_route >= 0 && unheard >= 0 => {
                Some(Routed::Done {
                    sent: sent as u64,
                    no_route: no_route as u64,
                    unheard: unheard as u64,
                })
            }
            _ => None,
        }
    }
}

/// The routing loop of [`ROUTE`] and [`ROUTE_TO_MAILBOXES`], one Lua function:
/// `route(users, recipients, payload)` publishes `payload` once to every other live
/// instance holding a device of any user of `KEYS[1..users]` (a node holding both a direct
/// message's recipient and its sender gets one envelope) and prunes dead and unsubscribed
/// instances' devices. It returns `{nodes published to, recipients without a live device,
/// unsubscribed instances met}` and the 0-based indexes of those recipients (the first
/// `recipients` keys are recipients; the rest a sender whose other devices get a copy).
macro_rules! route_function {
    () => {
        r#"
local function route(users, recipients, payload)
  local state = {}
  local sent, no_route, unheard = 0, 0, 0
  local offline = {}
  for i = 1, users do
    local key = KEYS[i]
    local dead = {}
    local found, missed = false, false
    for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      local instance = string.match(member, '^([^/]+)/') or ''
      local s = state[instance]
      if s == nil then
        if instance == ARGV[2] then
          s = 'self'
        elseif instance ~= '' and redis.call('EXISTS', ARGV[1] .. ':alive:' .. instance) == 1 then
          if redis.call('PUBLISH', ARGV[1] .. ':inst:' .. instance, payload) > 0 then
            s = 'live'
            sent = sent + 1
          else
            redis.call('DEL', ARGV[1] .. ':alive:' .. instance)
            s = 'unheard'
            unheard = unheard + 1
          end
        else
          s = 'dead'
        end
        state[instance] = s
      end
      if s == 'self' or s == 'live' then
        found = true
      else
        if s == 'unheard' then missed = true end
        dead[#dead + 1] = member
      end
    end
    for first = 1, #dead, 1000 do
      redis.call('ZREM', key, unpack(dead, first, math.min(first + 999, #dead)))
    end
    if i <= recipients and not found and not missed then
      no_route = no_route + 1
      offline[#offline + 1] = i - 1
    end
  end
  return {sent, no_route, unheard}, offline
end
"#
    };
}

/// The stream functions of [`ROUTE_TO_MAILBOXES`], [`PUBLISH_TO_HISTORY`] and
/// [`HISTORY_RANGE`] (see the module docs, "Streams"):
/// - `stream_trim_expired(stream, cutoff)` drops the head entries whose `t` is at most
///   `cutoff` (entries are in time order; a few reads of at most 128 entries each);
/// - `stream_seq(id)` reads the seq of an entry id `0-SEQ`;
/// - `stream_append(stream, meta, candidate, size, ttl_secs, now_ms, mid, fields)` appends
///   one entry and answers its `seq, ep`, making the epoch from `candidate` when the meta is
///   missing, and refreshes both keys' TTL; when `mid` is the stream's latest message it
///   appends nothing and answers that message's position (a repeated call);
/// - `positions_trailer({seq, ep, seq, ep, …})` encodes positions as [`split_positions`]
///   reads them.
macro_rules! stream_functions {
    () => {
        r#"
local function stream_seq(id)
  return tonumber(string.match(id, '%-(%d+)$'))
end
local function stream_trim_expired(stream, cutoff)
  local count = 1
  while true do
    local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', count)
    for i, entry in ipairs(batch) do
      if tonumber(entry[2][2]) > cutoff then
        if i > 1 then redis.call('XTRIM', stream, 'MINID', entry[1]) end
        return
      end
    end
    if #batch == 0 then return end
    redis.call('XTRIM', stream, 'MINID', '0-' .. (stream_seq(batch[#batch][1]) + 1))
    if #batch < count then return end
    count = 128
  end
end
local function stream_append(stream, meta, candidate, size, ttl_secs, now_ms, mid, fields)
  local known = redis.call('HMGET', meta, 'ep', 'seq', 'mid')
  local ep = known[1]
  if ep and known[3] == mid then
    return tonumber(known[2]), ep
  end
  local seq = 1
  if ep then
    seq = tonumber(known[2] or '0') + 1
    redis.call('HSET', meta, 'seq', seq, 'mid', mid)
  else
    ep = candidate
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'ep', ep, 'seq', seq, 'mid', mid)
  end
  redis.call('XADD', stream, 'MAXLEN', size, '0-' .. seq, unpack(fields))
  stream_trim_expired(stream, now_ms - ttl_secs * 1000)
  redis.call('EXPIRE', stream, ttl_secs)
  redis.call('EXPIRE', meta, ttl_secs)
  return seq, ep
end
local function positions_trailer(positions)
  local parts = {}
  for i = 1, #positions, 2 do
    parts[#parts + 1] = struct.pack('<I8B', positions[i], #positions[i + 1]) .. positions[i + 1]
  end
  local body = table.concat(parts)
  return body .. struct.pack('<I4', #body)
end
"#
    };
}

/// `KEYS` user keys; `ARGV` prefix, own instance, payload, epoch, recipients (how many of
/// the leading keys are recipients rather than a sender whose other devices get a copy).
/// Routes the payload (see `route_function`). Returns `{-1}` when the epoch is gone, else
/// `{nodes published to, recipients without a live device, unsubscribed instances met}`.
pub const ROUTE: &str = concat!(
    route_function!(),
    r#"
if redis.call('GET', ARGV[1] .. ':epoch') ~= ARGV[4] then return {-1} end
local routed = route(#KEYS, tonumber(ARGV[5]), ARGV[3])
return routed
"#
);

/// `KEYS` n user keys, then their n mailbox streams, then their n mailbox metas; `ARGV`
/// prefix, own instance, head, epoch, recipients (as [`ROUTE`]), then candidate epoch,
/// size, ttl (s), now (ms), mid, ts, from (`''`: none), to, data ([`StreamAppend`]).
///
/// Checks the cluster epoch first and appends nothing when it is gone (the bridge retries
/// the whole call). Appends the message to each mailbox (a sender's copy, past the
/// recipients, records `to` as `o`), then routes `head .. data .. trailer` as [`ROUTE`]
/// does, the trailer holding each mailbox's `(seq, ep)` in `KEYS` order. Returns `{-1}`,
/// or `{{sent, no_route, unheard}, {offline recipient indexes}, {seq, ep, seq, ep, …}}`.
pub const ROUTE_TO_MAILBOXES: &str = concat!(
    route_function!(),
    stream_functions!(),
    r#"
if redis.call('GET', ARGV[1] .. ':epoch') ~= ARGV[4] then return {-1} end
local users = #KEYS / 3
local recipients = tonumber(ARGV[5])
local size, ttl, now = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local positions = {}
for i = 1, users do
  local fields = {'t', ARGV[11], 'm', ARGV[10]}
  if ARGV[12] ~= '' then
    fields[#fields + 1] = 'f'
    fields[#fields + 1] = ARGV[12]
  end
  if i > recipients and ARGV[13] ~= '' then
    fields[#fields + 1] = 'o'
    fields[#fields + 1] = ARGV[13]
  end
  fields[#fields + 1] = 'd'
  fields[#fields + 1] = ARGV[14]
  local seq, ep = stream_append(KEYS[users + i], KEYS[2 * users + i], ARGV[6], size, ttl, now,
    ARGV[10], fields)
  positions[#positions + 1] = seq
  positions[#positions + 1] = ep
end
local routed, offline = route(users, recipients, ARGV[3] .. ARGV[14] .. positions_trailer(positions))
return {routed, offline, positions}
"#
);

/// `KEYS` topic stream, its meta; `ARGV` channel, head, then candidate epoch, size, ttl (s),
/// now (ms), mid, ts, from, to, data ([`StreamAppend`]; `from` and `to` are not kept), then
/// the publish command (`PUBLISH`, or `SPUBLISH` on a Redis Cluster, where the topic's
/// channel shares its history's slot).
/// Appends the message and publishes `head .. data .. trailer` (the trailer holding its
/// `(seq, ep)`) on the channel. Returns `{seq, ep, subscribers that got it}`.
pub const PUBLISH_TO_HISTORY: &str = concat!(
    stream_functions!(),
    r#"
local seq, ep = stream_append(KEYS[1], KEYS[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6]), ARGV[7], {'t', ARGV[8], 'm', ARGV[7], 'd', ARGV[11]})
local heard = redis.call(ARGV[12], ARGV[1], ARGV[2] .. ARGV[11] .. positions_trailer({seq, ep}))
return {seq, ep, heard}
"#
);

/// `KEYS` stream, its meta; `ARGV` since seq, since epoch, limit, now (ms), ttl (s), any
/// epoch (`1`: take the since seq as one of the current epoch). Drops expired head
/// entries, then applies [`crate::history::plan_replay`]. Returns
/// `{ep ('' when there is no stream), last seq, recovered (1/0), {{id, {field, value, …}}, …}}`.
pub const HISTORY_RANGE: &str = concat!(
    stream_functions!(),
    r#"
local since = tonumber(ARGV[1])
local ep = redis.call('HGET', KEYS[2], 'ep')
if not ep then
  return {'', 0, since == 0 and 1 or 0, {}}
end
local since_ep = ARGV[6] == '1' and ep or ARGV[2]
local last = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
stream_trim_expired(KEYS[1], tonumber(ARGV[4]) - tonumber(ARGV[5]) * 1000)
local first = last + 1
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #head > 0 then first = stream_seq(head[1][1]) end
local start, recovered
if since == 0 then
  start, recovered = first, first == 1
elseif since_ep ~= ep then
  start, recovered = first, false
elseif since > last then
  start, recovered = last + 1, false
elseif since + 1 < first then
  start, recovered = first, false
else
  start, recovered = since + 1, true
end
local messages = {}
local limit = tonumber(ARGV[3])
if limit > 0 and start <= last then
  messages = redis.call('XRANGE', KEYS[1], '0-' .. start, '+', 'COUNT', limit)
end
return {ep, last, recovered and 1 or 0, messages}
"#
);

/// What [`ROUTE_TO_MAILBOXES`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxRouted {
    /// The routing answer, as [`ROUTE`] gives it. On [`Routed::EpochLost`] nothing was
    /// appended, and `offline` and `positions` are empty.
    pub routed: Routed,
    /// Indexes (into the users passed) of the recipients with no live device anywhere: the
    /// API's `offline` list. Their count is `no_route`.
    pub offline: Vec<usize>,
    /// Each user's mailbox position of the message, in the order the users were passed.
    pub positions: Vec<Position>,
}

impl MailboxRouted {
    /// Reads the script's reply as Redis sent it (`None`: not an answer of
    /// [`ROUTE_TO_MAILBOXES`]).
    pub fn of(reply: &redis::Value) -> Option<MailboxRouted> {
        let items = array(reply)?;
        if let [redis::Value::Int(-1)] = items {
            return Some(MailboxRouted {
                routed: Routed::EpochLost,
                offline: Vec::new(),
                positions: Vec::new(),
            });
        }
        let [routed, offline, positions] = items else {
            return None;
        };
        let routed = match Routed::of(routed)? {
            Routed::EpochLost => return None,
            done => done,
        };
        let offline = array(offline)?
            .iter()
            .map(|i| usize::try_from(int(i)?).ok())
            .collect::<Option<Vec<usize>>>()?;
        let positions = array(positions)?
            .chunks(2)
            .map(|pair| match pair {
                [seq, ep] => Some(Position {
                    seq: u64::try_from(int(seq)?).ok()?,
                    ep: text(ep)?.into(),
                }),
                _ => None,
            })
            .collect::<Option<Vec<Position>>>()?;
        Some(MailboxRouted {
            routed,
            offline,
            positions,
        })
    }
}

/// What [`PUBLISH_TO_HISTORY`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPublished {
    /// The message's place in the topic's history.
    pub position: Position,
    /// Subscribers (nodes) the publish reached.
    pub heard: u64,
}

impl HistoryPublished {
    /// Reads the script's reply (`None`: not an answer of [`PUBLISH_TO_HISTORY`]).
    pub fn of(reply: &redis::Value) -> Option<HistoryPublished> {
        let [seq, ep, heard] = array(reply)? else {
            return None;
        };
        Some(HistoryPublished {
            position: Position {
                seq: u64::try_from(int(seq)?).ok()?,
                ep: text(ep)?.into(),
            },
            heard: u64::try_from(int(heard)?).ok()?,
        })
    }
}

/// Reads [`HISTORY_RANGE`]'s reply into the [`Replay`] the in-memory store also answers
/// (`None`: not an answer of [`HISTORY_RANGE`]).
pub fn replay_of(reply: &redis::Value) -> Option<Replay> {
    let [ep, last, recovered, messages] = array(reply)? else {
        return None;
    };
    let ep = text(ep)?;
    let messages = array(messages)?
        .iter()
        .map(entry_of)
        .collect::<Option<Vec<Entry>>>()?;
    Some(Replay {
        messages,
        recovered: int(recovered)? == 1,
        last_seq: u64::try_from(int(last)?).ok()?,
        ep: (!ep.is_empty()).then(|| ep.into()),
    })
}

/// One stream entry, `{id, {field, value, …}}`.
/// Reads [`APPEND`]'s answer `{seq, ep}`.
pub fn position_of(reply: &redis::Value) -> Option<Position> {
    match array(reply)? {
        [seq, ep] => Some(Position {
            seq: u64::try_from(int(seq)?).ok()?,
            ep: text(ep)?.into(),
        }),
        _ => None,
    }
}

fn entry_of(value: &redis::Value) -> Option<Entry> {
    let [id, fields] = array(value)? else {
        return None;
    };
    let seq = text(id)?.strip_prefix("0-")?.parse().ok()?;
    let (mut mid, mut ts, mut from, mut to, mut data) = (None, None, None, None, None);
    for pair in array(fields)?.chunks(2) {
        let [field, value] = pair else {
            return None;
        };
        let value = text(value)?;
        match text(field)? {
            "t" => ts = value.parse().ok(),
            "m" => mid = value.parse().ok(),
            "f" => from = Some(value.into()),
            "o" => to = Some(value.into()),
            "d" => data = Some(value.into()),
            _ => {}
        }
    }
    Some(Entry {
        seq,
        message: Message {
            mid: mid?,
            ts: ts?,
            from,
            to,
            data: data?,
        },
    })
}

fn array(value: &redis::Value) -> Option<&[redis::Value]> {
    match value {
        redis::Value::Array(items) => Some(items),
        _ => None,
    }
}

fn int(value: &redis::Value) -> Option<i64> {
    match value {
        redis::Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn text(value: &redis::Value) -> Option<&str> {
    match value {
        redis::Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// The trailer [`ROUTE_TO_MAILBOXES`] and [`PUBLISH_TO_HISTORY`] append to what they
/// publish: each stream's position, then the positions' length, little-endian:
///
/// ```text
/// (seq u64 | ep_len u8 | ep)… | positions_len u32
/// ```
///
/// Built here for a retry of a delivery whose streams were already appended to (the bridge
/// then routes `head .. data .. trailer` with [`ROUTE`]).
pub fn positions_trailer(positions: &[Position]) -> Vec<u8> {
    let mut out = Vec::with_capacity(positions.len() * 17 + 4);
    for position in positions {
        let ep = &position.ep.as_bytes()[..position.ep.len().min(255)];
        out.extend_from_slice(&position.seq.to_le_bytes());
        out.push(ep.len() as u8);
        out.extend_from_slice(ep);
    }
    let len = out.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out
}

/// Splits a payload published by [`ROUTE_TO_MAILBOXES`] or [`PUBLISH_TO_HISTORY`] into
/// `head .. data` (a slice of the same buffer) and the positions of its trailer (`None`:
/// no well-formed trailer).
pub fn split_positions(payload: &Bytes) -> Option<(Bytes, Vec<Position>)> {
    let len_at = payload.len().checked_sub(4)?;
    let len = u32::from_le_bytes(payload[len_at..].try_into().ok()?) as usize;
    let start = len_at.checked_sub(len)?;
    let mut rest = &payload[start..len_at];
    let mut positions = Vec::new();
    while !rest.is_empty() {
        let seq = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
        let ep_len = *rest.get(8)? as usize;
        let ep = std::str::from_utf8(rest.get(9..9 + ep_len)?).ok()?;
        positions.push(Position { seq, ep: ep.into() });
        rest = &rest[9 + ep_len..];
    }
    Some((payload.slice(..start), positions))
}

/// The presence functions of [`DEVICE_ONLINE`], [`DEVICE_OFFLINE`] and [`REAP`] (see the
/// module docs, "Presence events"):
/// - `presence_args(at)` reads the five `ARGV` from `at` that [`PresenceArgs`] writes: mode
///   (`''` off, `w` return the events, `r` also append them to `P:events`), kinds (1
///   `online`, 2 `offline`, 3 both), node id, ts, stream maxlen;
/// - `live_devices(prefix, key)` counts a user's devices whose instance holds its lease and
///   removes the others;
/// - `evict_oldest(key, live, max)` removes the oldest of a user's `live` members (oldest
///   first) past `max` and answers them (the device limit);
/// - `presence_event(prefix, p, kind, bit, user, mid, events)` records one event the
///   settings forward: appended to `P:events` in mode `r`, and added to `events` as
///   `kind, user, mid` in both modes.
macro_rules! presence_functions {
    () => {
        r#"
local function presence_args(at)
  return {mode = ARGV[at], kinds = tonumber(ARGV[at + 1]), node = ARGV[at + 2],
    ts = ARGV[at + 3], maxlen = ARGV[at + 4]}
end
local function live_devices(prefix, key)
  local state, live = {}, 0
  for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local instance = string.match(member, '^([^/]+)/') or ''
    local alive = state[instance]
    if alive == nil then
      alive = instance ~= '' and redis.call('EXISTS', prefix .. ':alive:' .. instance) == 1
      state[instance] = alive
    end
    if alive then live = live + 1 else redis.call('ZREM', key, member) end
  end
  return live
end
local function evict_oldest(key, live, max)
  local evicted = {}
  for i = 1, #live - max do
    evicted[#evicted + 1] = live[i]
    redis.call('ZREM', key, live[i])
  end
  return evicted
end
local function presence_event(prefix, p, kind, bit, user, mid, events)
  if math.floor(p.kinds / bit) % 2 == 0 then return end
  if p.mode == 'r' then
    redis.call('XADD', prefix .. ':events', 'MAXLEN', '~', p.maxlen, '*',
      'type', kind, 'mid', mid, 'node', p.node, 'ts', p.ts, 'user', user)
  end
  events[#events + 1] = kind
  events[#events + 1] = user
  events[#events + 1] = mid
end
"#
    };
}

/// `KEYS` user key, the user's presence flag, this instance's user index; `ARGV` prefix,
/// own instance, member, connect time (ms), device limit, key TTL (s), user, then the
/// presence arguments ([`PresenceArgs`]) and the id of an `online` event. Adds the device;
/// when presence is tracked, indexes the user under this instance and, if the user's flag
/// was not set, sets it and records `online`. When the user's live devices exceed the
/// limit, removes the oldest. Dead instances' devices are pruned first and never count.
/// Returns `{{evicted members (the caller closes them with 4001)}, {kind, user, mid, …}}`.
pub const DEVICE_ONLINE: &str = concat!(
    presence_functions!(),
    r#"
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
local events = {}
local p = presence_args(8)
if p.mode ~= '' then
  redis.call('SADD', KEYS[3], ARGV[7])
  if redis.call('SET', KEYS[2], ARGV[13], 'NX') then
    presence_event(ARGV[1], p, 'online', 1, ARGV[7], ARGV[13], events)
  end
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
local max = tonumber(ARGV[5])
if redis.call('ZCARD', KEYS[1]) <= max then return {{}, events} end
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local state = {}
local live = {}
for _, member in ipairs(members) do
  local instance = string.match(member, '^([^/]+)/') or ''
  local alive = state[instance]
  if alive == nil then
    alive = instance == ARGV[2]
      or (instance ~= '' and redis.call('EXISTS', ARGV[1] .. ':alive:' .. instance) == 1)
    state[instance] = alive
  end
  if alive then live[#live + 1] = member else redis.call('ZREM', KEYS[1], member) end
end
return {evict_oldest(KEYS[1], live, max), events}
"#
);

/// `KEYS` user key, the user's presence flag, this instance's user index; `ARGV` prefix,
/// own instance, member, user, then the presence arguments ([`PresenceArgs`]) and the id of
/// an `offline` event. Removes the device (presence tracked only: plain `ZREM` otherwise);
/// drops the user from this instance's index when it was its last device here; when the
/// user has no live device left anywhere and its flag was set, clears it and records
/// `offline`. Returns `{kind, user, mid, …}`.
pub const DEVICE_OFFLINE: &str = concat!(
    presence_functions!(),
    r#"
redis.call('ZREM', KEYS[1], ARGV[3])
local events = {}
local p = presence_args(5)
local own = ARGV[2] .. '/'
local here = false
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(member, 1, #own) == own then
    here = true
    break
  end
end
if not here then redis.call('SREM', KEYS[3], ARGV[4]) end
if live_devices(ARGV[1], KEYS[1]) == 0 and redis.call('DEL', KEYS[2]) == 1 then
  presence_event(ARGV[1], p, 'offline', 2, ARGV[4], ARGV[10], events)
end
return events
"#
);

/// `ARGV` prefix, the presence arguments ([`PresenceArgs`]), budget, then `budget` event ids.
/// For every registered instance (`P:insts`) whose lease is gone (killed, stopped,
/// reconnected under a new instance): takes users from its index, and records `offline`
/// for each whose flag is set and who has no live device left anywhere; forgets the
/// instance once its index is empty. At most `budget` users per call. Returns
/// `{{kind, user, mid, …}, 1 if the budget ran out (call again) else 0}`.
pub const REAP: &str = concat!(
    presence_functions!(),
    r#"
local prefix = ARGV[1]
local p = presence_args(2)
local budget = tonumber(ARGV[7])
local used = 0
local events = {}
for _, inst in ipairs(redis.call('ZRANGE', prefix .. ':insts', 0, -1)) do
  if used >= budget then break end
  if redis.call('EXISTS', prefix .. ':alive:' .. inst) == 0 then
    local index = prefix .. ':inst-users:' .. inst
    for _, user in ipairs(redis.call('SPOP', index, budget - used)) do
      used = used + 1
      if live_devices(prefix, prefix .. ':user:' .. user) == 0
        and redis.call('DEL', prefix .. ':on:' .. user) == 1 then
        presence_event(prefix, p, 'offline', 2, user, ARGV[7 + used], events)
      end
    end
    if redis.call('EXISTS', index) == 0 then redis.call('ZREM', prefix .. ':insts', inst) end
  end
end
return {events, used >= budget and 1 or 0}
"#
);

/// `KEYS[1]` user key; `ARGV` prefix. Returns `{live devices, node id, node id, …}`.
pub const PRESENCE: &str = r#"
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local node_of = {}
local listed = {}
local result = {0}
for _, member in ipairs(members) do
  local instance = string.match(member, '^([^/]+)/') or ''
  local node = node_of[instance]
  if node == nil then
    node = instance ~= '' and redis.call('GET', ARGV[1] .. ':alive:' .. instance)
    node_of[instance] = node
  end
  if node then
    result[1] = result[1] + 1
    if not listed[node] then
      listed[node] = true
      result[#result + 1] = node
    end
  end
end
return result
"#;

/// `KEYS[1]` the node set; `ARGV` the registry prefix. Returns `{id, ws, api, shards,
/// connections, …}` for every registered node whose registry hash is still alive; prunes
/// the others from the node set.
pub const NODES: &str = r#"
local set = KEYS[1]
local result = {}
for _, id in ipairs(redis.call('SMEMBERS', set)) do
  local f = redis.call('HMGET', ARGV[1] .. ':node:' .. id, 'ws', 'api', 'shards', 'connections')
  if f[1] then
    result[#result + 1] = id
    result[#result + 1] = f[1]
    result[#result + 1] = f[2] or ''
    result[#result + 1] = f[3] or '0'
    result[#result + 1] = f[4] or '0'
  else
    redis.call('SREM', set, id)
  end
end
return result
"#;

/// The functions of the Redis Cluster scripts ([`CLUSTER_DEVICE_ONLINE`],
/// [`CLUSTER_DEVICE_GONE`]): `dead_set(from)` reads the dead instances the bridge passes
/// from `ARGV[from]` on; `drop_dead(key, dead)` removes the members of those instances from
/// a user's device set and answers the members left, oldest first.
macro_rules! cluster_functions {
    () => {
        r#"
local function dead_set(from)
  local dead = {}
  for i = from, #ARGV do dead[ARGV[i]] = true end
  return dead
end
local function drop_dead(key, dead)
  local left = {}
  for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local instance = string.match(member, '^([^/]+)/') or ''
    if dead[instance] then redis.call('ZREM', key, member) else left[#left + 1] = member end
  end
  return left
end
"#
    };
}

/// Redis Cluster: `KEYS` user key, the user's presence flag (one slot); `ARGV` member,
/// connect time (ms), device limit, key TTL (s), user, the presence arguments
/// ([`PresenceArgs`], never appending), the id of an `online` event, then the instances
/// the bridge knows are dead. [`DEVICE_ONLINE`] without what lives in other slots: no
/// lease is read (a member counts unless its instance is named dead; the reaper prunes
/// the rest within heartbeats) and the instance's user index is the bridge's `SADD`.
/// Returns `{{evicted members}, {kind, user, mid, …}}`.
pub const CLUSTER_DEVICE_ONLINE: &str = concat!(
    presence_functions!(),
    cluster_functions!(),
    r#"
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local events = {}
local p = presence_args(6)
if p.mode ~= '' then
  if redis.call('SET', KEYS[2], ARGV[11], 'NX') then
    presence_event('', p, 'online', 1, ARGV[5], ARGV[11], events)
  end
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
local max = tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[1]) <= max then return {{}, events} end
local live = drop_dead(KEYS[1], dead_set(12))
return {evict_oldest(KEYS[1], live, max), events}
"#
);

/// Redis Cluster: `KEYS` user key, the user's presence flag; `ARGV` a member to remove
/// (`''`: none), user, the presence arguments ([`PresenceArgs`], never appending), the id
/// of an `offline` event, then the instances the bridge knows are dead. Removes the
/// member and the dead instances' members; when presence is tracked, the user has no
/// member left and its flag was set, clears it and records `offline`. A device closing
/// calls it with its member, the reaper with none for each user of a dead instance.
/// Returns `{kind, user, mid, …}`.
pub const CLUSTER_DEVICE_GONE: &str = concat!(
    presence_functions!(),
    cluster_functions!(),
    r#"
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local events = {}
local p = presence_args(3)
local left = drop_dead(KEYS[1], dead_set(9))
if p.mode ~= '' and #left == 0 and redis.call('DEL', KEYS[2]) == 1 then
  presence_event('', p, 'offline', 2, ARGV[2], ARGV[8], events)
end
return events
"#
);

/// Redis Cluster: `KEYS` stream, its meta (one user's mailbox); `ARGV` candidate epoch,
/// size, ttl (s), now (ms), mid, then the entry's fields and values. Appends one entry as
/// [`ROUTE_TO_MAILBOXES`] does for each of its users (a repeated call appends nothing and
/// answers the position it gave). Returns `{seq, ep}`.
pub const APPEND: &str = concat!(
    stream_functions!(),
    r#"
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
local seq, ep = stream_append(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), ARGV[5], fields)
return {seq, ep}
"#
);

/// Redis Cluster: `KEYS[1]` the instance registry (`{P}:insts`); `ARGV` the registry
/// prefix. Returns the registered instances whose lease is gone: the reaper takes their
/// users from their indexes, and every script that meets their members drops them.
pub const DEAD_INSTANCES: &str = r#"
local dead = {}
for _, inst in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[1] .. ':alive:' .. inst) == 0 then dead[#dead + 1] = inst end
end
return dead
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_names_read_back_on_both_buses() {
        for names in [Names::new("sc"), Names::cluster("sc")] {
            assert_eq!(names.user_of_key(&names.user("a}b")), Some("a}b"));
            assert_eq!(
                names.topic_of_channel(&names.topic("room.1")),
                Some("room.1")
            );
            assert_eq!(names.user_of_key(&names.topic("room.1")), None);
            assert_eq!(names.topic_of_channel(&names.broadcast()), None);
        }
        assert_eq!(Names::cluster("sc").user("ann"), "sc:{u:ann}:user");
        assert_eq!(Names::new("sc").user("ann"), "sc:user:ann");
    }

    #[test]
    fn device_members_round_trip() {
        let member = device_member(0xdead_beef, 72_057_594_037_927_941);
        assert_eq!(member, "00000000deadbeef/72057594037927941");
        assert_eq!(
            parse_device_member(&member),
            Some((0xdead_beef, 72_057_594_037_927_941))
        );
        assert_eq!(parse_device_member("nope"), None);
        assert_eq!(parse_device_member("zz/1"), None);
    }

    #[test]
    fn route_answers_parse() {
        assert_eq!(Routed::parse(&[-1]), Some(Routed::EpochLost));
        assert_eq!(
            Routed::parse(&[2, 0, 1]),
            Some(Routed::Done {
                sent: 2,
                no_route: 0,
                unheard: 1
            })
        );
        assert_eq!(Routed::parse(&[]), None);
        let reply = redis::Value::Array(vec![
            redis::Value::Int(1),
            redis::Value::Int(0),
            redis::Value::Int(0),
        ]);
        assert_eq!(
            Routed::of(&reply),
            Some(Routed::Done {
                sent: 1,
                no_route: 0,
                unheard: 0
            })
        );
        assert_eq!(Routed::of(&redis::Value::Int(1)), None);
        assert_eq!(Routed::parse(&[1, 2]), None);
    }

    #[test]
    fn names_share_the_prefix() {
        let names = Names::new("sc");
        assert_eq!(names.user("alice"), "sc:user:alice");
        assert_eq!(names.topic("room"), "sc:topic:room");
        assert_eq!(names.alive(1), "sc:alive:0000000000000001");
        assert_eq!(names.instance_channel(1), "sc:inst:0000000000000001");
    }

    #[test]
    fn positions_trailer_round_trips() {
        let positions = vec![
            Position {
                seq: 1,
                ep: "abcdEFGH".into(),
            },
            Position {
                seq: u64::MAX,
                ep: "".into(),
            },
        ];
        let mut payload = b"head|data".to_vec();
        payload.extend_from_slice(&positions_trailer(&positions));
        let (rest, read) = split_positions(&Bytes::from(payload)).expect("well-formed");
        assert_eq!((&rest[..], read), (&b"head|data"[..], positions));
        let (rest, read) = split_positions(&Bytes::from(positions_trailer(&[]))).expect("empty");
        assert!(rest.is_empty() && read.is_empty());
        for bad in [
            &b""[..],
            b"abc",
            b"\x05\x00\x00\x00",
            b"\xaa\x01\x00\x00\x00",
        ] {
            assert_eq!(
                split_positions(&Bytes::copy_from_slice(bad)),
                None,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn stream_names_keep_mailboxes_and_topics_apart() {
        let names = Names::new("sc");
        let mailbox = StreamKey::Mailbox("x".into());
        let topic = StreamKey::Topic("x".into());
        assert_eq!(names.stream(&mailbox), "sc:mbox:x");
        assert_eq!(names.stream_meta(&mailbox), "sc:mbox-meta:x");
        assert_eq!(names.stream(&topic), "sc:hist:x");
        assert_eq!(names.stream_meta(&topic), "sc:hist-meta:x");
    }

    /// The stream scripts against a real `redis-server`.
    mod live {
        use std::net::TcpListener;
        use std::process::{Child, Command, Stdio};
        use std::time::{Duration, Instant};

        use super::*;
        use crate::history::{plan_replay, Streams};

        /// A throwaway `redis-server` on a free loopback port, saving nothing; killed (by its
        /// own pid) on drop.
        struct Server {
            child: Child,
            url: String,
        }

        impl Server {
            fn start() -> Server {
                for _ in 0..5 {
                    let port = TcpListener::bind("127.0.0.1:0")
                        .and_then(|l| l.local_addr())
                        .expect("free port")
                        .port();
                    let mut child = Command::new("redis-server")
                        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                        .args(["--save", "", "--appendonly", "no"])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("spawn redis-server (scripts/test installs it)");
                    let url = format!("redis://127.0.0.1:{port}/");
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while Instant::now() < deadline {
                        if child.try_wait().expect("try_wait").is_some() {
                            break; // the port was taken: try another
                        }
                        let ping = redis::Client::open(url.as_str())
                            .and_then(|c| c.get_connection())
                            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
                        if ping.is_ok() {
                            return Server { child, url };
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                }
                panic!("redis-server did not start on any of 5 free ports");
            }

            fn connect(&self) -> redis::Connection {
                let client = redis::Client::open(self.url.as_str()).expect("url");
                let conn = client.get_connection().expect("connect");
                conn.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                conn
            }
        }

        impl Drop for Server {
            fn drop(&mut self) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }

        const INSTANCE: &str = "00000000000000aa";
        const CLUSTER_EPOCH: &str = "cluster-epoch-1";

        struct Fixture {
            server: Server,
            conn: redis::Connection,
            scripts: Scripts,
            names: Names,
            epochs: crate::history::EpochSource,
        }

        impl Fixture {
            fn new() -> Fixture {
                let server = Server::start();
                let mut conn = server.connect();
                let names = Names::new("t");
                let scripts = Scripts::new(names.clone());
                let hashes: Vec<String> = scripts.load().query(&mut conn).expect("load");
                assert!(scripts.loaded(&hashes));
                let _: () = redis::cmd("SET")
                    .arg(names.epoch())
                    .arg(CLUSTER_EPOCH)
                    .query(&mut conn)
                    .expect("epoch");
                Fixture {
                    server,
                    conn,
                    scripts,
                    names,
                    epochs: crate::history::EpochSource::new(42),
                }
            }

            fn query(&mut self, cmd: &redis::Cmd) -> redis::Value {
                cmd.query(&mut self.conn).expect("script")
            }

            /// Sends `data` from `from` (or the server) to `users`, the first `recipients` of
            /// which are recipients, at `now_ms`.
            fn send(
                &mut self,
                users: &[&str],
                recipients: usize,
                from: Option<&str>,
                retention: Retention,
                now_ms: u64,
                data: &str,
            ) -> MailboxRouted {
                let candidate = self.epochs.next_epoch();
                let to = (users.len() > recipients).then_some(users[0]);
                let append = StreamAppend {
                    candidate_ep: &candidate,
                    retention,
                    now_ms,
                    mid: now_ms * 10,
                    ts: now_ms,
                    from,
                    to,
                    data,
                };
                let cmd = self.scripts.route_to_mailboxes(
                    users,
                    recipients,
                    INSTANCE,
                    CLUSTER_EPOCH,
                    b"head|",
                    &append,
                );
                let reply = self.query(&cmd);
                MailboxRouted::of(&reply).expect("a ROUTE_TO_MAILBOXES answer")
            }

            fn range(
                &mut self,
                key: &StreamKey,
                since: (u64, &str),
                limit: usize,
                now_ms: u64,
                ttl_secs: u64,
            ) -> Replay {
                let cmd = self.scripts.history_range(
                    key,
                    since.0,
                    Some(since.1),
                    limit,
                    now_ms,
                    ttl_secs,
                );
                let reply = self.query(&cmd);
                replay_of(&reply).expect("a HISTORY_RANGE answer")
            }

            fn device(&mut self, user: &str, instance: u64, alive: bool) {
                let _: () = redis::cmd("ZADD")
                    .arg(self.names.user(user))
                    .arg(1)
                    .arg(device_member(instance, 1))
                    .query(&mut self.conn)
                    .expect("zadd");
                if alive {
                    let _: () = redis::cmd("SET")
                        .arg(self.names.alive(instance))
                        .arg("node")
                        .query(&mut self.conn)
                        .expect("alive");
                }
            }
        }

        fn mailbox(user: &str) -> StreamKey {
            StreamKey::Mailbox(user.into())
        }

        fn seqs(replay: &Replay) -> Vec<u64> {
            replay.messages.iter().map(|e| e.seq).collect()
        }

        const DAY: Retention = Retention {
            size: 100,
            ttl_secs: 86_400,
        };

        #[test]
        fn mailbox_appends_are_gap_free_and_keep_their_epoch() {
            let mut f = Fixture::new();
            let first = f.send(&["bob"], 1, None, DAY, 1000, "1");
            assert_eq!(
                first.routed,
                Routed::Done {
                    sent: 0,
                    no_route: 1,
                    unheard: 0
                }
            );
            assert_eq!(first.offline, vec![0], "bob has no device");
            let ep = first.positions[0].ep.clone();
            assert_eq!(first.positions[0].seq, 1);
            for n in 2..=5 {
                let next = f.send(&["bob"], 1, None, DAY, 1000 + n, "{}");
                assert_eq!(
                    next.positions,
                    vec![Position {
                        seq: n,
                        ep: ep.clone()
                    }]
                );
            }
            let replay = f.range(&mailbox("bob"), (0, ""), 100, 2000, DAY.ttl_secs);
            assert_eq!(
                (seqs(&replay), replay.recovered),
                (vec![1, 2, 3, 4, 5], true)
            );
            assert_eq!((replay.last_seq, replay.ep), (5, Some(ep)));
            let first = &replay.messages[0].message;
            assert_eq!((first.mid, first.ts, &*first.data), (10_000, 1000, "1"));
            assert_eq!((first.from.clone(), first.to.clone()), (None, None));
            let ttl: i64 = redis::cmd("TTL")
                .arg(f.names.stream(&mailbox("bob")))
                .query(&mut f.conn)
                .expect("ttl");
            assert!((86_000..=86_400).contains(&ttl), "{ttl}");
            let meta_ttl: i64 = redis::cmd("TTL")
                .arg(f.names.stream_meta(&mailbox("bob")))
                .query(&mut f.conn)
                .expect("ttl");
            assert!((86_000..=86_400).contains(&meta_ttl), "{meta_ttl}");
        }

        #[test]
        fn a_senders_copy_records_the_recipient() {
            let mut f = Fixture::new();
            f.device("alice", 0xaa, true); // alice is on this very instance
            let sent = f.send(&["bob", "alice"], 1, Some("alice"), DAY, 1000, "\"hi\"");
            assert_eq!(sent.offline, vec![0], "bob is offline; alice is the sender");
            assert_eq!(
                sent.positions.iter().map(|p| p.seq).collect::<Vec<_>>(),
                [1, 1]
            );
            let bob = f.range(&mailbox("bob"), (0, ""), 10, 1000, DAY.ttl_secs);
            let copy = f.range(&mailbox("alice"), (0, ""), 10, 1000, DAY.ttl_secs);
            let (bob, copy) = (&bob.messages[0].message, &copy.messages[0].message);
            assert_eq!(
                (bob.from.as_deref(), bob.to.as_deref()),
                (Some("alice"), None)
            );
            assert_eq!(
                (copy.from.as_deref(), copy.to.as_deref()),
                (Some("alice"), Some("bob"))
            );
        }

        #[test]
        fn a_lost_cluster_epoch_appends_nothing() {
            let mut f = Fixture::new();
            let _: () = redis::cmd("SET")
                .arg(f.names.epoch())
                .arg("another")
                .query(&mut f.conn)
                .expect("set");
            let answer = f.send(&["bob"], 1, None, DAY, 1000, "1");
            assert_eq!(answer.routed, Routed::EpochLost);
            assert!(answer.positions.is_empty());
            let replay = f.range(&mailbox("bob"), (0, ""), 10, 1000, DAY.ttl_secs);
            assert_eq!(
                (replay.ep, replay.last_seq),
                (None, 0),
                "no stream was made"
            );
        }

        /// Both scripts route alike: a subscribed live instance gets the payload, a dead
        /// one's devices are pruned, a leased but unsubscribed one is reported unheard.
        #[test]
        fn routing_answers_are_those_of_route() {
            let mut f = Fixture::new();
            let mut subscriber = f.server.connect();
            let mut pubsub = subscriber.as_pubsub();
            pubsub
                .subscribe(f.names.instance_channel(0xbb))
                .expect("subscribe");
            pubsub
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let users = ["live", "dead", "unheard", "here", "nobody"];
            let setup = |f: &mut Fixture| {
                f.device("live", 0xbb, true);
                f.device("dead", 0xcc, false);
                f.device("unheard", 0xdd, true);
                f.device("here", 0xaa, false);
            };
            setup(&mut f);
            let route = f
                .scripts
                .route(&users, 5, INSTANCE, CLUSTER_EPOCH, b"plain");
            let plain = Routed::of(&f.query(&route)).expect("ROUTE answer");
            assert_eq!(
                plain,
                Routed::Done {
                    sent: 1,
                    no_route: 2,
                    unheard: 1
                }
            );
            let message = pubsub.get_message().expect("published");
            assert_eq!(message.get_payload_bytes(), b"plain");
            setup(&mut f);
            let streamed = f.send(&users, 5, None, DAY, 1000, "[1]");
            assert_eq!(streamed.routed, plain);
            assert_eq!(streamed.offline, vec![1, 4], "dead and nobody");
            let message = pubsub.get_message().expect("published");
            let payload = Bytes::copy_from_slice(message.get_payload_bytes());
            let (rest, positions) = split_positions(&payload).expect("trailer");
            assert_eq!(&rest[..], b"head|[1]");
            assert_eq!(positions, streamed.positions);
            assert_eq!(positions.len(), 5);
            let epoch_lost = f.scripts.route(&users, 5, INSTANCE, "old", b"plain");
            assert_eq!(Routed::of(&f.query(&epoch_lost)), Some(Routed::EpochLost));
        }

        #[test]
        fn a_topic_publish_appends_and_publishes_in_one_call() {
            let mut f = Fixture::new();
            let mut subscriber = f.server.connect();
            let mut pubsub = subscriber.as_pubsub();
            pubsub.subscribe(f.names.topic("room")).expect("subscribe");
            pubsub
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut last = None;
            for n in 1..=3u64 {
                let candidate = f.epochs.next_epoch();
                let data = format!("{{\"n\":{n}}}");
                let append = StreamAppend {
                    candidate_ep: &candidate,
                    retention: DAY,
                    now_ms: 1000 + n,
                    mid: n,
                    ts: 1000 + n,
                    from: Some("ignored"),
                    to: None,
                    data: &data,
                };
                let cmd = f.scripts.publish_to_history("room", b"H", &append);
                let reply = f.query(&cmd);
                let published = HistoryPublished::of(&reply).expect("answer");
                assert_eq!((published.position.seq, published.heard), (n, 1));
                let message = pubsub.get_message().expect("published");
                let payload = Bytes::copy_from_slice(message.get_payload_bytes());
                let (rest, positions) = split_positions(&payload).expect("trailer");
                assert_eq!(rest, format!("H{data}").as_bytes());
                assert_eq!(positions, vec![published.position.clone()]);
                last = Some(published.position);
            }
            let last = last.expect("published");
            let room = StreamKey::Topic("room".into());
            let replay = f.range(&room, (1, &last.ep), 10, 2000, DAY.ttl_secs);
            assert_eq!((seqs(&replay), replay.recovered), (vec![2, 3], true));
            let api = f
                .scripts
                .history_range(&room, 2, None, 10, 2000, DAY.ttl_secs);
            let api = replay_of(&f.query(&api)).expect("answer");
            assert_eq!((seqs(&api), api.recovered), (vec![3], true), "any epoch");
            assert_eq!(
                replay.messages[0].message.from, None,
                "topics keep no sender"
            );
        }

        #[test]
        fn a_redis_that_lost_everything_makes_new_epochs() {
            let mut f = Fixture::new();
            let before = f.send(&["bob"], 1, None, DAY, 1000, "1").positions[0].clone();
            f.send(&["bob"], 1, None, DAY, 1001, "2");
            let _: () = redis::cmd("FLUSHALL").query(&mut f.conn).expect("flush");
            let _: () = redis::cmd("SET")
                .arg(f.names.epoch())
                .arg(CLUSTER_EPOCH)
                .query(&mut f.conn)
                .expect("epoch");
            let after = f.send(&["bob"], 1, None, DAY, 1002, "3").positions[0].clone();
            assert_eq!(after.seq, 1);
            assert_ne!(after.ep, before.ep);
            let replay = f.range(&mailbox("bob"), (2, &before.ep), 10, 1002, DAY.ttl_secs);
            assert_eq!((seqs(&replay), replay.recovered), (vec![1], false));
            assert_eq!(replay.ep, Some(after.ep));
        }

        /// A call repeated because its reply was lost appends nothing and answers the
        /// same positions; the delivery itself is routed again.
        #[test]
        fn a_repeated_call_appends_nothing() {
            let mut f = Fixture::new();
            let first = f.send(&["bob", "alice"], 1, Some("alice"), DAY, 1000, "1");
            let again = f.send(&["bob", "alice"], 1, Some("alice"), DAY, 1000, "1");
            assert_eq!(again.positions, first.positions);
            let next = f.send(&["bob"], 1, None, DAY, 1001, "2");
            assert_eq!(next.positions[0].seq, 2);
            let replay = f.range(&mailbox("bob"), (0, ""), 10, 1001, DAY.ttl_secs);
            assert_eq!((seqs(&replay), replay.recovered), (vec![1, 2], true));
        }

        /// A stream whose meta hash is gone (a `maxmemory` eviction) belongs to a lost
        /// epoch: the next append starts the stream afresh instead of failing on `XADD`.
        #[test]
        fn a_stream_without_its_meta_starts_afresh() {
            let mut f = Fixture::new();
            let old = f.send(&["bob"], 1, None, DAY, 1000, "1").positions[0].clone();
            f.send(&["bob"], 1, None, DAY, 1001, "2");
            let _: () = redis::cmd("DEL")
                .arg(f.names.stream_meta(&mailbox("bob")))
                .query(&mut f.conn)
                .expect("del");
            let replay = f.range(&mailbox("bob"), (2, &old.ep), 10, 1001, DAY.ttl_secs);
            assert_eq!((replay.ep, replay.recovered), (None, false));
            let new = f.send(&["bob"], 1, None, DAY, 1002, "3").positions[0].clone();
            assert_eq!(new.seq, 1);
            assert_ne!(new.ep, old.ep);
            let replay = f.range(&mailbox("bob"), (0, ""), 10, 1002, DAY.ttl_secs);
            assert_eq!((seqs(&replay), replay.recovered), (vec![1], true));
            assert_eq!(&*replay.messages[0].message.data, "3");
        }

        /// The same appends and reads against Redis and the in-memory store answer alike
        /// (epochs aside): trimming by count and by age, and every case of the replay rule.
        #[test]
        fn redis_and_memory_streams_answer_alike() {
            let mut f = Fixture::new();
            let mut memory = Streams::new(usize::MAX, 1);
            let retention = Retention {
                size: 4,
                ttl_secs: 10,
            };
            let key = mailbox("bob");
            let mut redis_ep = String::new();
            let mut memory_ep = String::new();
            // Seven messages a second apart: count trims 1..3; at 14 s, age trims 4.
            for n in 1..=7u64 {
                let now = n * 1000;
                redis_ep = f.send(&["bob"], 1, None, retention, now, "{}").positions[0]
                    .ep
                    .to_string();
                let message = crate::history::Message {
                    mid: now * 10,
                    ts: now,
                    from: None,
                    to: None,
                    data: "{}".into(),
                };
                memory_ep = memory.append(&key, retention, now, message).ep.to_string();
            }
            for now in [7_000, 13_000, 14_500] {
                for since in [0, 1, 3, 4, 5, 7, 8, u64::MAX] {
                    for (foreign, limit) in [(false, 100), (true, 100), (false, 1), (false, 0)] {
                        let (r_ep, m_ep) = if foreign {
                            ("foreign", "foreign")
                        } else {
                            (redis_ep.as_str(), memory_ep.as_str())
                        };
                        let from_redis =
                            f.range(&key, (since, r_ep), limit, now, retention.ttl_secs);
                        let from_memory = memory.since(&key, since, m_ep, limit, now);
                        let case =
                            format!("now {now} since {since} foreign {foreign} limit {limit}");
                        assert_eq!(from_redis.messages, from_memory.messages, "{case}");
                        assert_eq!(from_redis.recovered, from_memory.recovered, "{case}");
                        assert_eq!(from_redis.last_seq, from_memory.last_seq, "{case}");
                    }
                    let api =
                        f.scripts
                            .history_range(&key, since, None, 100, now, retention.ttl_secs);
                    let from_redis = replay_of(&f.query(&api)).expect("answer");
                    let from_memory = memory.history(&key, since, 100, now);
                    let case = format!("history API: now {now} since {since}");
                    assert_eq!(from_redis.messages, from_memory.messages, "{case}");
                    assert_eq!(from_redis.recovered, from_memory.recovered, "{case}");
                }
            }
            let replay = f.range(&key, (0, ""), 100, 14_500, retention.ttl_secs);
            assert_eq!(seqs(&replay), vec![5, 6, 7], "4 aged out");
            let len: usize = redis::cmd("XLEN")
                .arg(f.names.stream(&key))
                .query(&mut f.conn)
                .expect("xlen");
            assert!(
                len <= 3,
                "expired entries are removed from Redis, not just hidden"
            );
            let plan = plan_replay(4, &redis_ep, Some(&redis_ep), 5, 7);
            assert!(plan.recovered, "the rule both follow");
        }

        /// Full 100-message mailboxes stay at 100; prints Redis memory per user. The figure
        /// BENCHMARKS.md reports is of 1,000 users: `MEASURE_SCALE=10 cargo test --lib
        /// mailbox_memory -- --nocapture` (100 users per scale).
        #[test]
        fn mailbox_memory() {
            let users: u64 = 100
                * std::env::var("MEASURE_SCALE")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1)
                    .max(1);
            let mut f = Fixture::new();
            let used = |conn: &mut redis::Connection| -> u64 {
                let info: String = redis::cmd("INFO").arg("memory").query(conn).expect("info");
                info.lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("used_memory")
            };
            let data = format!("{{\"text\":\"{}\"}}", "x".repeat(88)); // 100 bytes
            let before = used(&mut f.conn);
            for round in 0..100u64 {
                let mut pipe = redis::pipe();
                for user in 0..users {
                    let candidate = f.epochs.next_epoch();
                    let name = format!("user{user:04}");
                    let append = StreamAppend {
                        candidate_ep: &candidate,
                        retention: DAY,
                        now_ms: 1_750_000_000_000 + round,
                        mid: 1 << 50 | round << 10 | user,
                        ts: 1_750_000_000_000 + round,
                        from: Some("sender-user"),
                        to: None,
                        data: &data,
                    };
                    pipe.add_command(f.scripts.route_to_mailboxes(
                        &[name],
                        1,
                        INSTANCE,
                        CLUSTER_EPOCH,
                        b"",
                        &append,
                    ));
                }
                let _: Vec<redis::Value> = pipe.query(&mut f.conn).expect("pipeline");
            }
            let after = used(&mut f.conn);
            let kept: u64 = redis::cmd("XLEN")
                .arg(
                    f.scripts
                        .names
                        .stream(&StreamKey::Mailbox("user0000".into())),
                )
                .query(&mut f.conn)
                .expect("xlen");
            assert_eq!(kept, 100, "a mailbox keeps its last 100");
            let per_user = after.saturating_sub(before) as f64 / users as f64;
            println!(
                "{users} mailboxes x 100 messages of 100-byte data: {:.1} MiB, {per_user:.0} bytes per user, {:.1} GiB per 1M users",
                after.saturating_sub(before) as f64 / 1048576.0,
                per_user * 1e6 / 1073741824.0
            );
        }
    }
}
