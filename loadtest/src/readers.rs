//! Reader threads: each owns a group of open client sockets, reads them until stopped, and
//! sends on them what its [`Handler`] schedules.
//!
//! A reader puts its sockets in non-blocking mode and in its own epoll set (level-triggered),
//! and reads every ready socket until it would block, handing each text frame to the
//! scenario's handler with the socket's index in its group. Reading is what answers the
//! server's heartbeat pings (tungstenite queues the pong and writes it on the next read). A
//! socket the server closes or that fails is dropped from the set and counted as lost, with
//! the first few reasons kept.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use tungstenite::Message;

use crate::client::{Deadline, Ws};
use crate::traffic::mono_us;

/// Frames read from one socket before the others get a turn.
const READS_PER_TURN: usize = 256;

/// Longest epoll wait, so a stop is noticed quickly.
const WAIT_MS: i32 = 50;

/// Lost-connection reasons kept for the report.
const REASONS_KEPT: usize = 5;

/// What the readers saw.
#[derive(Debug, Default)]
pub struct Stats {
    /// Text frames read.
    pub texts: u64,
    /// Server pings read (and answered).
    pub pings: u64,
    /// Connections the server closed or that failed.
    pub lost: usize,
    /// Why, for the first few of them.
    pub reasons: Vec<String>,
    /// Frames the handler wanted sent on a connection that was already lost, or whose send
    /// failed.
    pub send_failures: u64,
}

impl Stats {
    /// Adds `other`'s counts to these (keeping at most a few reasons).
    pub fn merge(&mut self, other: Stats) {
        self.texts += other.texts;
        self.pings += other.pings;
        self.lost += other.lost;
        self.send_failures += other.send_failures;
        let room = REASONS_KEPT.saturating_sub(self.reasons.len());
        self.reasons.extend(other.reasons.into_iter().take(room));
    }
}

/// What a scenario does on a reader thread: read text frames, and send frames when they fall
/// due. Sockets are named by their position in the thread's group.
pub trait Handler: Send + 'static {
    /// Called with the socket's position in the group and the frame's text.
    fn on_text(&mut self, conn: usize, text: &str);

    /// Appends the frames due at `now_us` ([`crate::traffic::mono_us`]) as
    /// `(socket position, text)`.
    fn due(&mut self, _now_us: u64, _out: &mut Vec<(usize, String)>) {}

    /// When the next frame falls due ([`crate::traffic::mono_us`]), if one is scheduled.
    fn next_due_us(&self) -> Option<u64> {
        None
    }
}

/// What a reader thread hands back: its handler, its counts, its sockets still open.
type Outcome<H> = Result<(H, Stats, Vec<Ws>)>;

/// Running reader threads.
pub struct Readers<H> {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Outcome<H>>>,
}

impl<H: Handler> Readers<H> {
    /// Starts one reader thread per group; `handler(i, numbers)` makes group `i`'s handler,
    /// given the connection numbers of its sockets in order.
    pub fn spawn(
        groups: Vec<Vec<(usize, Ws)>>,
        deadline: Deadline,
        mut handler: impl FnMut(usize, &[usize]) -> H,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(groups.len());
        for (i, group) in groups.into_iter().enumerate() {
            let (numbers, sockets): (Vec<usize>, Vec<Ws>) = group.into_iter().unzip();
            let stop = stop.clone();
            let mut on_text = handler(i, &numbers);
            let thread = std::thread::Builder::new()
                .name(format!("reader-{i}"))
                .spawn(move || {
                    let (stats, sockets) = pump(sockets, &stop, deadline, &mut on_text)?;
                    Ok((on_text, stats, sockets))
                })
                .context("spawning a reader thread")?;
            threads.push(thread);
        }
        Ok(Readers { stop, threads })
    }

    /// Stops the readers; returns their handlers, their merged counts and the open sockets.
    pub fn stop(self) -> Result<(Vec<H>, Stats, Vec<Ws>)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut handlers = Vec::with_capacity(self.threads.len());
        let mut stats = Stats::default();
        let mut sockets = Vec::new();
        for thread in self.threads {
            let (handler, s, open) = thread
                .join()
                .map_err(|_| anyhow!("a reader thread panicked"))??;
            handlers.push(handler);
            stats.merge(s);
            sockets.extend(open);
        }
        Ok((handlers, stats, sockets))
    }
}

/// Reads `sockets` and sends what the handler schedules, until `stop` or the deadline.
fn pump(
    sockets: Vec<Ws>,
    stop: &AtomicBool,
    deadline: Deadline,
    handler: &mut impl Handler,
) -> Result<(Stats, Vec<Ws>)> {
    let epoll = Epoll::new()?;
    let mut slots: Vec<Option<Ws>> = Vec::with_capacity(sockets.len());
    for (i, ws) in sockets.into_iter().enumerate() {
        ws.get_ref().set_nonblocking(true)?;
        epoll.add(ws.get_ref().as_raw_fd(), i as u64)?;
        slots.push(Some(ws));
    }
    let mut stats = Stats::default();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut outgoing = Vec::new();
    // Sockets whose last send did not fit in the socket buffer: flushed again every turn.
    let mut unflushed: Vec<usize> = Vec::new();
    // Read every socket once first: bytes tungstenite buffered while the socket was blocking
    // raise no epoll event.
    let mut again: Vec<usize> = (0..slots.len()).collect();
    while !stop.load(Ordering::Relaxed) && !deadline.expired() {
        let wait = if again.is_empty() && unflushed.is_empty() {
            let until_due = handler
                .next_due_us()
                .map(|due| due.saturating_sub(mono_us()).div_ceil(1000) as i32);
            until_due.map_or(WAIT_MS, |ms| ms.min(WAIT_MS))
        } else {
            0
        };
        let ready = epoll.wait(&mut events, wait)?;
        let mut turn = std::mem::take(&mut again);
        turn.extend(events[..ready].iter().map(|e| e.u64 as usize));
        for i in turn {
            let Some(ws) = slots.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            let outcome = drain(ws, &mut stats, &mut |text| handler.on_text(i, text));
            match outcome {
                Drained::Empty => {}
                Drained::More => again.push(i),
                Drained::Lost(reason) => lose(&epoll, &mut slots, i, &mut stats, reason),
            }
        }
        handler.due(mono_us(), &mut outgoing);
        for (i, text) in outgoing.drain(..) {
            let Some(ws) = slots.get_mut(i).and_then(Option::as_mut) else {
                stats.send_failures += 1;
                continue;
            };
            match ws.send(Message::text(text)) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    unflushed.push(i)
                }
                Err(e) => {
                    stats.send_failures += 1;
                    lose(&epoll, &mut slots, i, &mut stats, format!("send: {e}"));
                }
            }
        }
        for i in std::mem::take(&mut unflushed) {
            let Some(ws) = slots.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            match ws.flush() {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    unflushed.push(i)
                }
                Err(e) => lose(&epoll, &mut slots, i, &mut stats, format!("send: {e}")),
            }
        }
        unflushed.dedup();
    }
    Ok((stats, slots.into_iter().flatten().collect()))
}

/// Drops socket `i` from the set and counts it as lost.
fn lose(epoll: &Epoll, slots: &mut [Option<Ws>], i: usize, stats: &mut Stats, reason: String) {
    if let Some(ws) = slots[i].take() {
        epoll.remove(ws.get_ref().as_raw_fd());
        stats.lost += 1;
        if stats.reasons.len() < REASONS_KEPT {
            stats.reasons.push(reason);
        }
    }
}

enum Drained {
    /// Read until it would block.
    Empty,
    /// The read budget ran out; there may be more.
    More,
    /// Closed by the server or failed.
    Lost(String),
}

fn drain(ws: &mut Ws, stats: &mut Stats, on_text: &mut impl FnMut(&str)) -> Drained {
    for _ in 0..READS_PER_TURN {
        match ws.read() {
            Ok(Message::Text(text)) => {
                stats.texts += 1;
                on_text(&text);
            }
            Ok(Message::Ping(_)) => stats.pings += 1,
            Ok(Message::Close(frame)) => {
                return Drained::Lost(format!("closed by the server: {frame:?}"))
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Drained::Empty
            }
            Err(e) => return Drained::Lost(e.to_string()),
        }
    }
    Drained::More
}

/// A level-triggered epoll set of readable sockets.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> Result<Self> {
        // SAFETY: epoll_create1 has no memory preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn add(&self, fd: RawFd, token: u64) -> Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: valid epoll and socket descriptors and a valid event.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) } != 0
        {
            return Err(std::io::Error::last_os_error()).context("epoll_ctl(ADD)");
        }
        Ok(())
    }

    fn remove(&self, fd: RawFd) {
        // SAFETY: as in `add`; a failure (already gone) needs no handling.
        unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Waits up to `timeout_ms` and returns how many events were stored in `events`.
    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> Result<usize> {
        // SAFETY: `events` is a live buffer of the length passed.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(error).context("epoll_wait");
        }
        Ok(n as usize)
    }
}
