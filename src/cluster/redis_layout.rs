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
//! The scripts read keys they are not passed (`alive` keys) and publish to channels, which
//! standalone Redis and replicated setups allow; Redis Cluster would need hash tags.

/// Seconds a user's device set lives without a refresh by one of its live owners.
pub const ROUTE_KEY_TTL_SECS: u64 = 3600;

/// How long a full round of route-key TTL refreshes takes (spread over heartbeats).
pub const ROUTE_REFRESH_ROUND_SECS: u64 = ROUTE_KEY_TTL_SECS / 4;

/// Key and channel names under one prefix.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix (scripts build `alive` and channel names from it).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Set of registered node ids.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// One node's registry hash.
    pub fn node(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}", self.prefix)
    }

    /// One instance's lease.
    pub fn alive(&self, instance: u64) -> String {
        format!("{}:alive:{}", self.prefix, instance_hex(instance))
    }

    /// One user's device set.
    pub fn user(&self, user: &str) -> String {
        format!("{}:user:{user}", self.prefix)
    }

    /// One instance's channel.
    pub fn instance_channel(&self, instance: u64) -> String {
        format!("{}:inst:{}", self.prefix, instance_hex(instance))
    }

    /// One topic's channel.
    pub fn topic(&self, topic: &str) -> String {
        format!("{}:topic:{topic}", self.prefix)
    }

    /// The lease of node number `number` in message ids.
    pub fn mid_node(&self, number: u16) -> String {
        format!("{}:mid-node:{number}", self.prefix)
    }

    /// The cluster epoch.
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    /// The broadcast channel.
    pub fn broadcast(&self) -> String {
        format!("{}:broadcast", self.prefix)
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
    presence: redis::Script,
    nodes: redis::Script,
}

impl Scripts {
    /// The scripts, for keys and channels under `names`.
    pub fn new(names: Names) -> Self {
        Scripts {
            names,
            join: redis::Script::new(JOIN),
            route: redis::Script::new(ROUTE),
            device_online: redis::Script::new(DEVICE_ONLINE),
            presence: redis::Script::new(PRESENCE),
            nodes: redis::Script::new(NODES),
        }
    }

    /// `SCRIPT LOAD` of every script, in one pipeline; it answers their SHA1s, which
    /// [`Scripts::loaded`] checks.
    pub fn load(&self) -> redis::Pipeline {
        let mut load = redis::pipe();
        for source in [JOIN, ROUTE, DEVICE_ONLINE, PRESENCE, NODES] {
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
            &self.presence,
            &self.nodes,
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
        let mut cmd = Self::call(&self.join, 0);
        cmd.arg(self.names.prefix())
            .arg(candidate)
            .arg(previous)
            .arg(settle_ms);
        cmd
    }

    /// [`ROUTE`]: publish `payload` once to every other node holding a device of any of
    /// `users`, the first `recipients` of which are the message's recipients; the answer
    /// reads with [`Routed::parse`].
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

    /// [`DEVICE_ONLINE`]: record device `conn` of `user` (connected at `since_ms`) under
    /// this instance; answers the device members evicted by the cluster-wide limit.
    pub fn device_online(
        &self,
        user: &str,
        instance: u64,
        conn: u64,
        since_ms: u64,
        max_devices: usize,
    ) -> redis::Cmd {
        let mut cmd = Self::call(&self.device_online, 1);
        cmd.arg(self.names.user(user))
            .arg(self.names.prefix())
            .arg(instance_hex(instance))
            .arg(device_member(instance, conn))
            .arg(since_ms)
            .arg(max_devices)
            .arg(ROUTE_KEY_TTL_SECS);
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
        let mut cmd = Self::call(&self.nodes, 0);
        cmd.arg(self.names.prefix());
        cmd
    }
}

/// How many node numbers message ids have room for (9 bits).
pub const NODE_NUMBERS: u16 = 512;

/// Claims a node number for message ids: the first of `preferred`, `preferred + 1`, ...
/// that is free or already this node's (a node restarted under its id takes its number
/// back). Blocking; runs once, at start, before any shard makes an id. `Ok(None)` when
/// every number is taken.
pub fn lease_node_number(
    conn: &mut redis::Connection,
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

/// `ARGV` prefix, candidate epoch, the epoch this bridge joined before (empty if none),
/// settle window (ms). Joins the cluster epoch, making it if missing; a bridge whose old
/// epoch is gone opens the settling window. Returns `{epoch, settling ms left (<= 0: none)}`.
pub const JOIN: &str = r#"
local key = ARGV[1] .. ':epoch'
local epoch = redis.call('GET', key)
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', key, epoch)
end
if ARGV[3] ~= '' and ARGV[3] ~= epoch then
  redis.call('SET', ARGV[1] .. ':settling', epoch, 'NX', 'PX', ARGV[4])
end
return {epoch, redis.call('PTTL', ARGV[1] .. ':settling')}
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

/// `KEYS` user keys; `ARGV` prefix, own instance, payload, epoch, recipients (how many of
/// the leading keys are recipients rather than a sender whose other devices get a copy).
/// Publishes the payload once to every other live instance holding a device of any of the
/// users (a node holding both a direct message's recipient and its sender gets one
/// envelope); prunes dead and unsubscribed instances' devices. Returns `{-1}` when the epoch
/// is gone, else `{nodes published to, recipients without a live device, unsubscribed
/// instances met}`.
pub const ROUTE: &str = r#"
if redis.call('GET', ARGV[1] .. ':epoch') ~= ARGV[4] then return {-1} end
local recipients = tonumber(ARGV[5])
local state = {}
local sent, no_route, unheard = 0, 0, 0
for i, key in ipairs(KEYS) do
  local dead = {}
  local found, missed = false, false
  for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local instance = string.match(member, '^([^/]+)/') or ''
    local s = state[instance]
    if s == nil then
      if instance == ARGV[2] then
        s = 'self'
      elseif instance ~= '' and redis.call('EXISTS', ARGV[1] .. ':alive:' .. instance) == 1 then
        if redis.call('PUBLISH', ARGV[1] .. ':inst:' .. instance, ARGV[3]) > 0 then
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
  if i <= recipients and not found and not missed then no_route = no_route + 1 end
end
return {sent, no_route, unheard}
"#;

/// `KEYS[1]` user key; `ARGV` prefix, own instance, member, connect time (ms), device limit,
/// key TTL (s). Adds the device; when the user's live devices exceed the limit, removes the
/// oldest and returns their members (the caller closes them with 4001). Dead instances'
/// devices are pruned first and never count.
pub const DEVICE_ONLINE: &str = r#"
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
local max = tonumber(ARGV[5])
if redis.call('ZCARD', KEYS[1]) <= max then return {} end
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
local evicted = {}
for i = 1, #live - max do
  evicted[#evicted + 1] = live[i]
  redis.call('ZREM', KEYS[1], live[i])
end
return evicted
"#;

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

/// `ARGV` prefix. Returns `{id, ws, api, shards, connections, …}` for every registered
/// node whose registry hash is still alive; prunes the others from the node set.
pub const NODES: &str = r#"
local set = ARGV[1] .. ':nodes'
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
