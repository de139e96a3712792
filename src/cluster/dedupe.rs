//! Which message envelopes this node has already received, so a retried one is delivered
//! once. Pure data, no I/O: the caller passes the clock.
//!
//! The bridge retries a message when it cannot know whether Redis routed it: the session
//! died with the message's pipeline in flight, or the route met a node that was
//! reconnecting. A retry reaches again the nodes that did get the first copy, and they must
//! drop it. Each message envelope is identified by its message id, its kind and its first
//! user or topic name (one message id can legitimately arrive several times: a publish to
//! two topics, or to users and a topic, is one `mid` and several envelopes). Identities are
//! remembered for a window longer than any retry can come (twice `bridge_hold_ms`) and at
//! most [`MAX_REMEMBERED`] of them, the oldest forgotten first: memory stays bounded at any
//! traffic, and at traffic so high that the cap bites before the window the oldest retries
//! could be delivered twice (counted nowhere as loss, since nothing is lost).

use std::collections::{HashSet, VecDeque};

use ahash::RandomState;

/// Most envelope identities remembered (16 bytes of ring plus about 9 of set each: ~6 MiB).
pub const MAX_REMEMBERED: usize = 1 << 18;

/// Envelope identities seen recently.
#[derive(Debug)]
pub struct RecentEnvelopes {
    seen: HashSet<u64, RandomState>,
    order: VecDeque<(u64, u64)>,
    window_ms: u64,
    max: usize,
    hasher: RandomState,
}

impl RecentEnvelopes {
    /// Remembers identities for `window_ms`, at most `max` of them.
    pub fn new(window_ms: u64, max: usize) -> Self {
        RecentEnvelopes {
            seen: HashSet::default(),
            order: VecDeque::new(),
            window_ms,
            max,
            hasher: RandomState::new(),
        }
    }

    /// Whether the envelope of kind `kind` for message `mid` addressed to `name` (its first
    /// user, its topic, or empty) arrives for the first time; remembers it.
    pub fn first_time(&mut self, kind: u8, mid: u64, name: &str, now_ms: u64) -> bool {
        while let Some(&(key, at)) = self.order.front() {
            if self.order.len() < self.max && now_ms.saturating_sub(at) <= self.window_ms {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&key);
        }
        let key = self.hasher.hash_one((kind, mid, name));
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back((key, now_ms));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_is_refused_and_distinct_envelopes_of_one_mid_pass() {
        let mut recent = RecentEnvelopes::new(1000, 100);
        assert!(recent.first_time(1, 7, "bob", 0));
        assert!(!recent.first_time(1, 7, "bob", 10));
        assert!(recent.first_time(2, 7, "bob", 10), "another kind");
        assert!(recent.first_time(1, 7, "alice", 10), "another name");
        assert!(recent.first_time(1, 8, "bob", 10), "another mid");
    }

    #[test]
    fn memory_is_bounded_by_window_and_count() {
        let mut recent = RecentEnvelopes::new(1000, 100);
        assert!(recent.first_time(1, 1, "", 0));
        assert!(recent.first_time(1, 2, "", 2000));
        assert_eq!(recent.order.len(), 1, "the first aged out");
        assert!(recent.first_time(1, 1, "", 2000), "forgotten, so new again");
        for mid in 0..1000 {
            recent.first_time(1, 100 + mid, "", 2001);
        }
        assert!(recent.order.len() <= 100);
    }
}
