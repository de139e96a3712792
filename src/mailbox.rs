//! The two-lane mailbox every cross-thread hand-off in a node goes through: into each shard
//! (from other shards, the API and the bridge) and into the bridge (from the shards and the
//! API).
//!
//! **Messages** (traffic: routes, deliveries, messages for other nodes) go through a bounded
//! lane: when it is full the sender gets its message back, counts the drop and goes on,
//! rather than blocking a shard or growing without bound. **Control** (devices coming and
//! going, topic interest, closes, queries) must never be lost: a lost "device offline"
//! leaves a ghost route, a lost "topic interest" a topic nobody hears. It goes through an
//! unbounded lane, read first; its length is bounded by the events that produce it (one
//! per connection, subscription or API query, all of which are limited), not by traffic.
//! Which lane a value takes is decided by an exhaustive match in its type's [`Laned`]
//! implementation, so a new kind of envelope cannot land on the unbounded lane unnoticed.
//!
//! crossbeam's receivers are not awaitable, so each mailbox pairs its lanes with a
//! [`Doorbell`]: a sender wakes the owner only when the bell was not already rung, so a
//! burst costs one wake-up and an idle owner costs nothing.

use std::sync::Arc;
use std::task::{Context, Poll};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

use crate::reactor::Doorbell;

/// Which lane of a mailbox a value travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Bounded; dropped (and counted by the sender) when full.
    Message,
    /// Unbounded; never dropped while the owner runs.
    Control,
}

/// A value that knows its lane (for mailboxes whose two lanes carry one type).
pub trait Laned {
    /// The lane this value travels on.
    fn lane(&self) -> Lane;
}

/// Why a value could not be handed over.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused<T> {
    /// The message lane is full.
    Full(T),
    /// The owner has stopped.
    Gone(T),
}

/// The sending end of a mailbox: cheap to clone, usable from any thread.
pub struct Mailbox<M, C = M> {
    messages: Sender<M>,
    control: Sender<C>,
    doorbell: Arc<Doorbell>,
}

impl<M, C> Clone for Mailbox<M, C> {
    fn clone(&self) -> Self {
        Mailbox {
            messages: self.messages.clone(),
            control: self.control.clone(),
            doorbell: self.doorbell.clone(),
        }
    }
}

/// The owner's end of a mailbox.
pub struct Inbox<M, C = M> {
    messages: Receiver<M>,
    control: Receiver<C>,
    doorbell: Arc<Doorbell>,
}

/// A mailbox whose message lane holds `capacity` values, and its owner's end.
pub fn mailbox<M, C>(capacity: usize) -> (Mailbox<M, C>, Inbox<M, C>) {
    let (messages, messages_rx) = crossbeam_channel::bounded(capacity);
    let (control, control_rx) = crossbeam_channel::unbounded();
    let doorbell = Arc::new(Doorbell::default());
    let sender = Mailbox {
        messages,
        control,
        doorbell: doorbell.clone(),
    };
    let receiver = Inbox {
        messages: messages_rx,
        control: control_rx,
        doorbell,
    };
    (sender, receiver)
}

impl<M, C> Mailbox<M, C> {
    /// Hands over a message, waking the owner; never blocks.
    pub fn message(&self, message: M) -> Result<(), Refused<M>> {
        match self.messages.try_send(message) {
            Ok(()) => {
                self.doorbell.ring();
                Ok(())
            }
            Err(TrySendError::Full(message)) => Err(Refused::Full(message)),
            Err(TrySendError::Disconnected(message)) => Err(Refused::Gone(message)),
        }
    }

    /// Hands over a control value, waking the owner; never dropped while the owner runs.
    pub fn control(&self, control: C) -> Result<(), Refused<C>> {
        match self.control.send(control) {
            Ok(()) => {
                self.doorbell.ring();
                Ok(())
            }
            Err(error) => Err(Refused::Gone(error.into_inner())),
        }
    }

    /// Wakes the owner without handing anything over (after a shared flag changed).
    pub fn wake(&self) {
        self.doorbell.ring();
    }

    /// Messages waiting.
    pub fn pending_messages(&self) -> usize {
        self.messages.len()
    }
}

impl<T: Laned> Mailbox<T, T> {
    /// Hands over `value` on its lane.
    pub fn post(&self, value: T) -> Result<(), Refused<T>> {
        match value.lane() {
            Lane::Message => self.message(value),
            Lane::Control => self.control(value),
        }
    }
}

impl<M, C> Inbox<M, C> {
    /// The next control value, if one waits.
    pub fn try_control(&self) -> Option<C> {
        self.control.try_recv().ok()
    }

    /// The next message, if one waits.
    pub fn try_message(&self) -> Option<M> {
        self.messages.try_recv().ok()
    }

    /// Every message waiting now (used when the owner stops).
    pub fn drain_messages(&self) -> impl Iterator<Item = M> + '_ {
        self.messages.try_iter()
    }

    /// Ready once the bell was rung since the last call; registers `cx` otherwise.
    pub fn rung(&self, cx: &Context<'_>) -> bool {
        self.doorbell.answer(cx)
    }
}

impl<T> Inbox<T, T> {
    /// The next value, control first, or `Ready(None)` once every sender is gone.
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(value) = self.try_recv() {
            return Poll::Ready(Some(value));
        }
        // Answering clears the bell; a value sent after the check below rings it again.
        self.doorbell.answer(cx);
        if let Some(value) = self.try_recv() {
            return Poll::Ready(Some(value));
        }
        // The last look doubles as the end-of-senders check: what it finds is handed out,
        // never dropped (a control envelope arriving in between used to be).
        match self.control.try_recv() {
            Ok(value) => Poll::Ready(Some(value)),
            Err(TryRecvError::Disconnected) if self.messages.is_empty() => Poll::Ready(None),
            Err(_) => Poll::Pending,
        }
    }

    fn try_recv(&self) -> Option<T> {
        self.try_control().or_else(|| self.try_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Item {
        Traffic(u32),
        Admin(u32),
    }

    impl Laned for Item {
        fn lane(&self) -> Lane {
            match self {
                Item::Traffic(_) => Lane::Message,
                Item::Admin(_) => Lane::Control,
            }
        }
    }

    #[test]
    fn messages_are_bounded_control_is_not_and_comes_first() {
        let (mailbox, inbox) = mailbox::<Item, Item>(1);
        assert_eq!(mailbox.post(Item::Traffic(1)), Ok(()));
        assert_eq!(
            mailbox.post(Item::Traffic(2)),
            Err(Refused::Full(Item::Traffic(2)))
        );
        for n in 0..10 {
            assert_eq!(mailbox.post(Item::Admin(n)), Ok(()));
        }
        let waker = futures_lite::future::block_on(futures_lite::future::poll_fn(|cx| {
            Poll::Ready(cx.waker().clone())
        }));
        let mut cx = Context::from_waker(&waker);
        for n in 0..10 {
            assert_eq!(inbox.poll_recv(&mut cx), Poll::Ready(Some(Item::Admin(n))));
        }
        assert_eq!(
            inbox.poll_recv(&mut cx),
            Poll::Ready(Some(Item::Traffic(1)))
        );
        assert_eq!(inbox.poll_recv(&mut cx), Poll::Pending);
        drop(mailbox);
        assert_eq!(inbox.poll_recv(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_stopped_owner_refuses() {
        let (mailbox, inbox) = mailbox::<u32, &str>(4);
        drop(inbox);
        assert_eq!(mailbox.message(1), Err(Refused::Gone(1)));
        assert_eq!(mailbox.control("x"), Err(Refused::Gone("x")));
    }

    /// A control envelope posted while the receiver takes its last look must be handed out,
    /// not lost (found by a 3,000-connection load test: a lost `DeviceOnline` left a device
    /// without its `hello`).
    #[test]
    fn nothing_posted_during_a_poll_is_lost() {
        const SENT: u32 = 200_000;
        let (mailbox, inbox) = mailbox::<Item, Item>(16);
        let poster = std::thread::spawn(move || {
            for n in 0..SENT {
                mailbox.post(Item::Admin(n)).expect("receiver alive");
            }
        });
        let waker = futures_lite::future::block_on(futures_lite::future::poll_fn(|cx| {
            Poll::Ready(cx.waker().clone())
        }));
        let mut cx = Context::from_waker(&waker);
        let mut received = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match inbox.poll_recv(&mut cx) {
                Poll::Ready(Some(Item::Admin(n))) => {
                    assert_eq!(n, received, "in order, none skipped");
                    received += 1;
                }
                Poll::Ready(Some(Item::Traffic(_))) => unreachable!("only control was posted"),
                Poll::Ready(None) => break,
                Poll::Pending => assert!(std::time::Instant::now() < deadline, "stuck"),
            }
        }
        poster.join().expect("poster");
        assert_eq!(received, SENT);
    }
}
