//! Socket readiness for a shard: one edge-triggered epoll set per shard, and the doorbell that
//! wakes a sleeping glommio executor from another thread (the mailboxes' wake-up, see
//! [`crate::mailbox`]).
//!
//! # Why not glommio's `TcpStream`
//! glommio gives every socket a reactor `Source` (an `Rc<RefCell<..>>` sized for every kind
//! of io_uring request, about half a KiB) plus a task per connection with its own future.
//! At a million mostly idle connections that bookkeeping alone is over a gigabyte. Here a
//! connection is only its [`crate::session::Conn`]: the shard registers the socket once in
//! its epoll set (edge-triggered, for input; for output while it has queued bytes), and its event loop reads and writes with plain
//! non-blocking syscalls through the shard's scratch buffer. Kernel-side state (the epoll
//! item) is not in the process's RSS.
//!
//! A socket is watched for output only once a write leaves bytes it did not take
//! ([`Reactor::watch_output`], one `epoll_ctl` per such episode). A socket is writable from
//! the start: watching its output from the accept on would put every new socket on the ready
//! list at once and cost every connect a turn (and an arming of the poll, below) that finds
//! nothing to do. A socket just accepted is read at once, without waiting for epoll: its
//! upgrade request has usually arrived with the handshake's last packet.
//!
//! # Sleeping and waking
//! The shard sleeps where glommio sleeps, in `io_uring_enter`, with a one-shot io_uring poll
//! on its epoll fd among the requests it waits for: when the set has events, the poll
//! completes and the executor wakes up itself, with no other thread involved. A helper
//! thread blocking in `poll(2)` on the epoll fd and ringing a [`Doorbell`] (the design
//! before issue 15) costs every readiness event two thread hops, futexes and an eventfd
//! write: 2–4 context switches per connect where this needs none (BENCHMARKS.md).
//!
//! glommio has no public call to poll an arbitrary fd, but its own streams arm exactly
//! this poll when they are made: a [`glommio::net::UnixStream`] made with `from_raw_fd`
//! registers a `POLL_ADD` for readability of the fd it is given, and reading the stream
//! waits for it.
//! [`Reactor::poll_ready`] makes such a stream over a duplicate of the epoll fd (the
//! stream owns and closes what it is given), waits for that poll, and drops it once it
//! completed; reading the epoll fd itself fails at once (`ENOTSOCK`), which only tells that
//! the poll completed. The test below checks that this still holds when glommio changes.
//! Arming costs three cheap syscalls (the duplicate, the failed read, its close) and rides
//! on the `io_uring_enter` the executor makes anyway. While the shard is busy the poll
//! completes on submission (the set already has events), so a busy shard neither sleeps nor
//! involves another thread; an idle shard costs no CPU.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use futures_lite::AsyncRead;
use glommio::net::UnixStream;

/// Wakes a task on another thread; many rings before the task runs cost one wake.
#[derive(Default)]
pub struct Doorbell {
    waker: AtomicWaker,
    rung: AtomicBool,
}

impl Doorbell {
    /// Rings: wakes the registered task unless it was already rung.
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if !self.rung.swap(true, Ordering::SeqCst) {
            self.waker.wake();
        }
    }

    /// Registers the task to wake and clears the bell; `true` if it had been rung. A ring
    /// after this call wakes the task.
    pub fn answer(&self, cx: &Context<'_>) -> bool {
        self.waker.register(cx.waker());
        let rung = self.rung.swap(false, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        rung
    }
}

/// Readiness flags of one event (from `EPOLL*`).
#[derive(Debug, Clone, Copy)]
pub struct Ready(u32);

impl Ready {
    /// Data (or EOF, or an error) to read.
    pub fn readable(self) -> bool {
        self.0 & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }

    /// Room to write.
    pub fn writable(self) -> bool {
        self.0 & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }
}

/// A shard's epoll set and the io_uring poll on it that its executor sleeps on. Made and
/// used on the shard's executor.
pub struct Reactor {
    epoll: OwnedFd,
    /// The armed poll (see the module docs), kept until it completes.
    watch: RefCell<Option<UnixStream>>,
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

impl Reactor {
    /// An empty epoll set.
    pub fn new() -> io::Result<Reactor> {
        // SAFETY: plain syscall; the returned fd is owned right away.
        let epoll =
            unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        Ok(Reactor {
            epoll,
            watch: RefCell::default(),
        })
    }

    fn control(
        &self,
        op: libc::c_int,
        fd: BorrowedFd<'_>,
        token: u64,
        events: u32,
    ) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: both fds are open; event is a valid epoll_event.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd.as_raw_fd(), &mut event) })
            .map(drop)
    }

    /// Watches a connection socket, edge-triggered for input and hang-up; for output only
    /// once [`Reactor::watch_output`] asks (see the module docs).
    pub fn add_socket(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let events = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET;
        self.control(libc::EPOLL_CTL_ADD, fd, token, events as u32)
    }

    /// Also watches a connection socket for output: a write left bytes it did not take.
    pub fn watch_output(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        self.control(libc::EPOLL_CTL_MOD, fd, token, events as u32)
    }

    /// Watches a listening socket, level-triggered (accepts are bounded per turn).
    pub fn add_listener(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, token, libc::EPOLLIN as u32)
    }

    /// Stops watching `fd` (closing the fd does the same).
    pub fn remove(&self, fd: BorrowedFd<'_>) {
        // SAFETY: EPOLL_CTL_DEL ignores the event argument; errors (not registered) are moot.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
    }

    /// Ready once the epoll set may have events; otherwise registers `cx` to be woken when
    /// it does, arming the executor's poll on the set if none is armed. An error (no
    /// descriptor left to duplicate the set's) arms nothing: the caller waits some other way.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut watch = self.watch.borrow_mut();
        let stream = match watch.as_mut() {
            Some(stream) => stream,
            None => {
                // SAFETY: F_DUPFD_CLOEXEC on our open epoll fd; the duplicate is handed to
                // the stream at once, which owns and closes it.
                let fd =
                    check(unsafe { libc::fcntl(self.epoll.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) });
                let fd: RawFd = match fd {
                    Ok(fd) => fd,
                    Err(error) => return Poll::Ready(Err(error)),
                };
                // SAFETY: a fresh fd we own; the stream takes it over.
                watch.insert(unsafe { UnixStream::from_raw_fd(fd) })
            }
        };
        // Pending while the poll is armed; then the read fails (not a socket): it completed.
        match Pin::new(stream).poll_read(cx, &mut []) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => {
                *watch = None;
                Poll::Ready(Ok(()))
            }
        }
    }

    /// Fetches ready events without blocking into `events`, returning `(token, readiness)`
    /// pairs.
    pub fn drain<'a>(
        &self,
        events: &'a mut [libc::epoll_event],
    ) -> impl Iterator<Item = (u64, Ready)> + 'a {
        // SAFETY: events is a writable array of epoll_event of the given length.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                0,
            )
        };
        let n = n.max(0) as usize;
        events[..n].iter().map(|e| (e.u64, Ready(e.events)))
    }
}

/// Accepts one connection: non-blocking, close-on-exec. `Ok(None)` when none is waiting.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    loop {
        // SAFETY: accept4 with null address arguments is valid.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh fd we own.
            return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
            _ => return Err(error),
        }
    }
}

/// `recv` without blocking. `Ok(0)` is EOF; `WouldBlock` means nothing to read now.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// `sendmsg` with `MSG_DONTWAIT | MSG_NOSIGNAL`: never blocks, never raises SIGPIPE.
pub fn sendmsg(fd: BorrowedFd<'_>, slices: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec on Unix.
    msg.msg_iov = slices.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = slices.len();
    loop {
        // SAFETY: fd is an open socket; msg points at live slices.
        let n = unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Half-closes the write side (after our close frame).
pub fn shutdown_write(fd: BorrowedFd<'_>) {
    // SAFETY: plain syscall on an open socket; failure (already closed) is moot.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    /// The executor wakes for the epoll set by itself: no other thread rings it.
    #[test]
    fn the_executor_wakes_when_a_socket_is_ready() {
        let shard = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(1 << 20)
            .spawn(|| async {
                let reactor = Reactor::new().expect("reactor");
                let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
                a.set_nonblocking(true).expect("nonblocking");
                reactor.add_socket(a.as_fd(), 7).expect("add");
                let ready = || futures_lite::future::poll_fn(|cx| reactor.poll_ready(cx));
                let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];

                // Output is not watched: nothing is ready, and the wait sleeps until another
                // thread writes.
                let writer = std::thread::spawn(move || {
                    let mut b = b;
                    b.write_all(b"x").expect("write");
                    b
                });
                ready().await.expect("armed");
                let first: Vec<_> = reactor.drain(&mut events).collect();
                assert_eq!(first.len(), 1);
                assert_eq!(first[0].0, 7);
                assert!(first[0].1.readable() && !first[0].1.writable());
                let mut buf = [0u8; 4];
                assert_eq!(recv(a.as_fd(), &mut buf).expect("recv"), 1);

                // Watching its output: the socket has room, one edge at once.
                reactor.watch_output(a.as_fd(), 7).expect("watch");
                ready().await.expect("armed");
                let second: Vec<_> = reactor.drain(&mut events).collect();
                assert_eq!(second.len(), 1);
                assert!(second[0].1.writable() && !second[0].1.readable());
                drop(writer.join().expect("writer"));
            })
            .expect("executor");
        shard.join().expect("executor ran");
    }
}
