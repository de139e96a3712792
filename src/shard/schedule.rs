//! The shard's timing decisions without a clock: deadline queues and the drain plan. The
//! driver reads the clock and acts; these only decide, so they are tested with made-up
//! times.

use std::collections::VecDeque;

use crate::router::ConnId;

/// Deadlines that all have the same timeout (upgrade, close): a FIFO queue is sorted by
/// construction, so expiring is popping the front. Times are the driver's milliseconds.
#[derive(Debug)]
pub(crate) struct Deadlines {
    timeout_ms: u64,
    queue: VecDeque<(u64, ConnId)>,
}

impl Deadlines {
    /// An empty queue of deadlines `timeout_ms` after their start.
    pub(crate) fn new(timeout_ms: u64) -> Self {
        Deadlines {
            timeout_ms,
            queue: VecDeque::new(),
        }
    }

    /// Starts `conn`'s deadline at `now_ms`.
    pub(crate) fn start(&mut self, conn: ConnId, now_ms: u64) {
        self.queue.push_back((now_ms + self.timeout_ms, conn));
    }

    /// The next connection whose deadline has passed at `now_ms`, oldest first. A
    /// connection that moved on meanwhile is still returned; the driver checks its phase.
    pub(crate) fn pop_expired(&mut self, now_ms: u64) -> Option<ConnId> {
        match self.queue.front() {
            Some(&(deadline, conn)) if deadline <= now_ms => {
                self.queue.pop_front();
                Some(conn)
            }
            _ => None,
        }
    }
}

/// Which connections to close with 1001 at each sweep of a graceful stop, so the clients'
/// reconnects spread over `drain_window_ms` instead of stampeding the other nodes.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    queue: VecDeque<ConnId>,
    per_sweep: usize,
}

impl Drain {
    /// A plan closing `conns` in order over `window_ms`, in equal batches, one per sweep of
    /// `sweep_ms`; everything in the first batch when the window is 0.
    pub(crate) fn new(
        conns: impl IntoIterator<Item = ConnId>,
        window_ms: u64,
        sweep_ms: u64,
    ) -> Self {
        let queue: VecDeque<ConnId> = conns.into_iter().collect();
        let per_sweep = if window_ms == 0 {
            usize::MAX
        } else {
            let sweeps = (window_ms / sweep_ms.max(1)).max(1) as usize;
            queue.len().div_ceil(sweeps).max(1)
        };
        Drain { queue, per_sweep }
    }

    /// The connections to close now (empty once all are).
    pub(crate) fn next_batch(&mut self) -> Vec<ConnId> {
        let n = self.per_sweep.min(self.queue.len());
        self.queue.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_expire_in_order_and_only_when_due() {
        let mut deadlines = Deadlines::new(5_000);
        deadlines.start(1, 0);
        deadlines.start(2, 1_000);
        deadlines.start(3, 1_000);
        assert_eq!(deadlines.pop_expired(4_999), None);
        assert_eq!(deadlines.pop_expired(5_000), Some(1));
        assert_eq!(deadlines.pop_expired(5_000), None, "2 is due at 6000");
        assert_eq!(deadlines.pop_expired(60_000), Some(2));
        assert_eq!(deadlines.pop_expired(60_000), Some(3));
        assert_eq!(deadlines.pop_expired(60_000), None);
    }

    #[test]
    fn drain_spreads_closes_over_the_window_in_order() {
        // 1,000 connections over 2 s with a 100 ms sweep: 20 batches of 50.
        let mut drain = Drain::new(0..1_000, 2_000, 100);
        let mut closed = Vec::new();
        for sweep in 0..20 {
            let batch = drain.next_batch();
            assert_eq!(batch.len(), 50, "sweep {sweep}");
            closed.extend(batch);
        }
        assert!(drain.next_batch().is_empty());
        assert_eq!(
            closed,
            (0..1_000).collect::<Vec<_>>(),
            "each once, in order"
        );

        // Fewer connections than sweeps: one per sweep, done early.
        let mut few = Drain::new([7, 8, 9], 2_000, 100);
        assert_eq!(few.next_batch(), vec![7]);
        assert_eq!(few.next_batch(), vec![8]);
        assert_eq!(few.next_batch(), vec![9]);
        assert!(few.next_batch().is_empty());

        // No window: everyone at once.
        let mut now = Drain::new(0..10, 0, 100);
        assert_eq!(now.next_batch().len(), 10);
    }
}
