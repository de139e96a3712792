//! The route cache: which bridge instances hold a device of a user, remembered between
//! messages so that a cross-node direct message to a cached user is one `PUBLISH` per
//! target node and no script.
//!
//! # Filling and invalidating
//! The bridge's command connection speaks RESP3 and has `CLIENT TRACKING ON OPTIN`: a
//! user's entry is filled from a `ZRANGE` of its key right after `CLIENT CACHING YES`, sent
//! in the same pipeline as the message that missed (which is routed by the script as
//! before), and Redis remembers that this connection read that key. When any client changes
//! it (a device connects or disconnects anywhere, a script prunes a dead instance's
//! devices, the device limit evicts), Redis pushes an `invalidate` for it on this same
//! connection, once (the key is tracked again only when read again). Opt-in keeps the keys
//! the route scripts read out of Redis's tracking table: only cached users cost Redis a
//! tracking entry and an invalidation.
//!
//! # How stale an entry can be
//! Redis sends the invalidation while it executes the change, on the connection the cached
//! reply came on, so it reaches the bridge before the answer to any command sent after the
//! change. The bridge applies every invalidation it has received before it builds a
//! pipeline ([`RouteCache::invalidate`] from the connection's push channel, drained at the
//! start of each flush; redis-rs hands a push over before it resolves a later reply). So a
//! route is acted on after a change for at most one round trip: the pipeline that was
//! already being built or sent when the change happened. A message in that window reaches
//! the nodes the user had a moment before, as it would have if it had been sent a moment
//! earlier; it is not retried.
//!
//! An entry lists instances whether or not they still hold their lease (a `ZRANGE` does
//! not look). A publish to a dead instance is heard by nobody: the message is then routed
//! by the script, which prunes the dead devices (whose change invalidates the entry) and
//! finds the user's live ones. A new session starts with an empty cache: tracking belongs
//! to the connection that read the keys.
//!
//! Only what mailboxes do not need is cached: with mailboxes on, a direct message is
//! appended to each recipient's mailbox by the script that routes it, and the script
//! already knows the routes. The cache serves direct messages of nodes with `mailbox =
//! false`, and kicks.
//!
//! On a Redis Cluster the cache is the only router (no script can read other slots): every
//! direct message, kick and mailbox message (after its appends) is published to the
//! instances it names, a miss is read in one round trip and routed in the next, and an
//! instance a publish was not heard by is looked up by its lease (dead ones are skipped
//! until the reaper has pruned their devices, which invalidates the entries). A fill is
//! kept only when Redis accepted the `CLIENT CACHING YES` before it: an untracked read
//! would never be invalidated.

use std::collections::HashMap;
use std::sync::Arc;

use ahash::RandomState;
use smallvec::SmallVec;

use crate::cluster::redis_layout::{parse_device_member, Names};

/// The instances holding a user's devices, at most a few.
pub(super) type Instances = SmallVec<[u64; 2]>;

/// User → instances, bounded in entries.
pub(super) struct RouteCache {
    entries: HashMap<Arc<str>, Instances, RandomState>,
    max_entries: usize,
    /// To read invalidated keys back into users.
    names: Names,
}

impl RouteCache {
    /// An empty cache of at most `max_entries` users (0: nothing is cached).
    pub(super) fn new(names: &Names, max_entries: usize) -> Self {
        RouteCache {
            entries: HashMap::default(),
            max_entries,
            names: names.clone(),
        }
    }

    /// Whether the cache is on.
    pub(super) fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    /// The instances of `user`, if cached.
    pub(super) fn get(&self, user: &str) -> Option<&Instances> {
        self.entries.get(user)
    }

    /// Caches `user`'s instances from the members of its key (as `ZRANGE` answered them).
    /// When full, an arbitrary entry makes room: a miss costs one script call.
    pub(super) fn fill(&mut self, user: Arc<str>, members: &[String]) {
        if !self.enabled() {
            return;
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&user) {
            if let Some(victim) = self.entries.keys().next().cloned() {
                self.entries.remove(&victim);
            }
        }
        let mut instances = Instances::new();
        for (instance, _) in members.iter().filter_map(|m| parse_device_member(m)) {
            if !instances.contains(&instance) {
                instances.push(instance);
            }
        }
        self.entries.insert(user, instances);
    }

    /// Forgets the users of the invalidated keys; `None` (Redis flushed its tracking
    /// table) forgets everyone. Returns how many entries were dropped.
    pub(super) fn invalidate(&mut self, keys: Option<&[String]>) -> usize {
        match keys {
            None => {
                let dropped = self.entries.len();
                self.entries.clear();
                dropped
            }
            Some(keys) => keys
                .iter()
                .filter_map(|key| self.names.user_of_key(key))
                .filter(|user| self.entries.remove(*user).is_some())
                .count(),
        }
    }

    /// Forgets everything (a new session: tracking starts afresh).
    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::redis_layout::device_member;

    #[test]
    fn fills_from_members_and_forgets_what_redis_invalidates() {
        let names = Names::new("P");
        let mut cache = RouteCache::new(&names, 2);
        let members = [
            device_member(7, 1),
            device_member(7, 2),
            device_member(9, 1),
        ];
        cache.fill("alice".into(), &members);
        assert_eq!(cache.get("alice").map(|i| i.as_slice()), Some(&[7, 9][..]));
        cache.fill("bob".into(), &[]);
        assert_eq!(
            cache.get("bob").map(|i| i.len()),
            Some(0),
            "cached as nowhere"
        );
        assert_eq!(
            cache.invalidate(Some(&[names.user("alice"), "P:other".into()])),
            1
        );
        assert!(cache.get("alice").is_none());
        cache.fill("carl".into(), &[]);
        cache.fill("dora".into(), &[]);
        assert_eq!(cache.entries.len(), 2, "bounded");
        assert_eq!(cache.invalidate(None), 2);
        let off = RouteCache::new(&names, 0);
        assert!(!off.enabled());
    }

    #[test]
    fn a_redis_clusters_hash_tagged_keys_invalidate_too() {
        let names = Names::cluster("P");
        let mut cache = RouteCache::new(&names, 2);
        cache.fill("a}b".into(), &[device_member(7, 1)]);
        assert_eq!(names.user("a}b"), "P:{u:a}b}:user");
        assert_eq!(cache.invalidate(Some(&[names.user("a}b")])), 1);
    }
}
