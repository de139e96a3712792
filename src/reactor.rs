//! Socket readiness for a shard: one edge-triggered epoll set per shard, and the doorbell that
//! wakes a sleeping glommio executor from another thread.
//!
//! # Why not glommio's `TcpStream`
//! glommio gives every socket a reactor `Source` (an `Rc<RefCell<..>>` sized for every kind
//! of io_uring request, about half a KiB) plus a task per connection with its own future.
//! At a million mostly idle connections that bookkeeping alone is over a gigabyte. Here a
//! connection is only its [`crate::session::Conn`]: the shard registers the socket once in
//! its epoll set (edge-triggered, in and out), and its event loop reads and writes with plain
//! non-blocking syscalls through the shard's scratch buffer. Kernel-side state (the epoll
//! item) is not in the process's RSS.
//!
//! # Sleeping and waking
//! glommio sleeps in `io_uring_enter` and offers no public way to wait for an arbitrary fd, so
//! each shard has a small poller thread that blocks in `poll(2)` on the epoll fd (which does
//! not consume events), rings the shard's [`Doorbell`] when events are ready, and parks until
//! the shard has drained them. The doorbell is an `AtomicWaker` plus a flag: ringing wakes the
//! shard's task through glommio's foreign-wake path only if it was not already rung. An idle
//! shard therefore costs no CPU: both threads sleep in the kernel.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Context;
use std::thread::JoinHandle;

use atomic_waker::AtomicWaker;

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

/// A shard's epoll set and its poller thread.
pub struct Reactor {
    epoll: OwnedFd,
    stop: OwnedFd,
    stopping: Arc<AtomicBool>,
    poller: Option<JoinHandle<()>>,
}

/// Token of the stop eventfd in the epoll set (never a connection id: those have a shard
/// number in the top byte below 64).
const STOP_TOKEN: u64 = u64::MAX;

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

impl Reactor {
    /// An epoll set whose poller thread (`name`) rings `doorbell` when events are ready.
    pub fn new(name: String, doorbell: Arc<Doorbell>) -> io::Result<Reactor> {
        // SAFETY: plain syscalls; the returned fds are owned right away.
        let epoll =
            unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let stop = unsafe {
            OwnedFd::from_raw_fd(check(libc::eventfd(
                0,
                libc::EFD_CLOEXEC | libc::EFD_NONBLOCK,
            ))?)
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let mut reactor = Reactor {
            epoll,
            stop,
            stopping: stopping.clone(),
            poller: None,
        };
        reactor.add(reactor.stop.as_fd(), STOP_TOKEN, libc::EPOLLIN as u32)?;
        let epoll_fd = reactor.epoll.as_raw_fd();
        reactor.poller = Some(
            std::thread::Builder::new()
                .name(name)
                .spawn(move || poll_loop(epoll_fd, &doorbell, &stopping))?,
        );
        Ok(reactor)
    }

    fn add(&self, fd: BorrowedFd<'_>, token: u64, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: both fds are open; event is a valid epoll_event.
        check(unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut event,
            )
        })
        .map(drop)
    }

    /// Watches a connection socket, edge-triggered for input, output and hang-up.
    pub fn add_socket(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        self.add(fd, token, events as u32)
    }

    /// Watches a listening socket, level-triggered (accepts are bounded per turn).
    pub fn add_listener(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        self.add(fd, token, libc::EPOLLIN as u32)
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

    /// Fetches ready events without blocking into `events`, returning `(token, readiness)`
    /// pairs, and lets the poller watch again once everything ready has been fetched.
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
        if n < events.len() {
            if let Some(poller) = &self.poller {
                poller.thread().unpark();
            }
        }
        events[..n]
            .iter()
            .map(|e| (e.u64, Ready(e.events)))
            .filter(|(token, _)| *token != STOP_TOKEN)
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to our own eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(poller) = self.poller.take() {
            poller.thread().unpark();
            let _ = poller.join();
        }
    }
}

/// The poller thread: sleep until the epoll set has events, ring, park until drained.
fn poll_loop(epoll: RawFd, doorbell: &Doorbell, stopping: &AtomicBool) {
    while !stopping.load(Ordering::SeqCst) {
        let mut fd = libc::pollfd {
            fd: epoll,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the epoll fd outlives this thread (joined in Drop).
        let ready = unsafe { libc::poll(&mut fd, 1, -1) };
        if ready > 0 && !stopping.load(Ordering::SeqCst) {
            doorbell.ring();
            std::thread::park();
        }
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
    use std::time::Duration;

    #[test]
    fn poller_rings_when_a_socket_is_readable() {
        let doorbell = Arc::new(Doorbell::default());
        let reactor = Reactor::new("test-poller".into(), doorbell.clone()).expect("reactor");
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        reactor.add_socket(a.as_fd(), 7).expect("add");
        let waker = futures_lite::future::block_on(futures_lite::future::poll_fn(|cx| {
            std::task::Poll::Ready(cx.waker().clone())
        }));
        let cx = Context::from_waker(&waker);
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let rings_within_a_second = || {
            (0..200).any(|_| {
                let rung = doorbell.answer(&cx);
                if !rung {
                    std::thread::sleep(Duration::from_millis(5));
                }
                rung
            })
        };
        // The socket starts writable: one edge.
        assert!(rings_within_a_second());
        let first: Vec<_> = reactor.drain(&mut events).collect();
        assert_eq!(first.len(), 1);
        assert!(first[0].1.writable() && !first[0].1.readable());

        b.write_all(b"x").expect("write");
        assert!(
            rings_within_a_second(),
            "poller rang after the drain let it watch again"
        );
        let second: Vec<_> = reactor.drain(&mut events).collect();
        assert_eq!(second[0].0, 7);
        assert!(second[0].1.readable());
        let mut buf = [0u8; 4];
        assert_eq!(recv(a.as_fd(), &mut buf).expect("recv"), 1);
        drop(reactor);
    }
}
