//! `floor`: a reference WebSocket server that makes only the syscalls a connect needs, so
//! that `connect --pid` against it measures the kernel's share of a connect on this machine
//! with the same driver that measures shardcast.
//!
//! What it is for: `connect` reports the node's CPU and context switches per connect (opening
//! plus closing). Run against the floor, the same figures say what any server that accepts,
//! upgrades and closes a connection must spend on it here, most of it in the kernel: on
//! loopback the peer's TCP receive processing runs inside the sender's syscall, so the
//! floor's `sendto` also pays for the client receiving the response, and its `close` for the
//! client receiving the FIN (while the handshake's SYN/ACK processing and the request's
//! receive run in the client's `connect` and `send`, and are charged to the client in both
//! cases). shardcast's figure minus the floor's is what shardcast adds.
//!
//! The server: one thread, one non-blocking listening socket (`SO_REUSEADDR`, backlog 4096,
//! 127.0.0.0/8 only), one epoll set, every socket edge-triggered. It prints one line,
//! `floor listening on 127.0.0.1:PORT pid PID`, and serves until it is killed (SIGTERM or
//! SIGINT, default actions). Per connection:
//!
//! * the listener's readiness: `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)` in a loop until
//!   `EAGAIN`; each socket gets `TCP_NODELAY` and `epoll_ctl(EPOLL_CTL_ADD, EPOLLIN |
//!   EPOLLRDHUP | EPOLLET)`, its descriptor as token;
//! * readable: `recv` into the connection's buffer until the request holds `\r\n\r\n`, then
//!   ONE `send` of `101 Switching Protocols` (with `Sec-WebSocket-Accept`) followed by a text
//!   frame `{"op":"hello","conn":"c<n>","node":"floor","hb":25}` (the driver needs only
//!   `"op":"hello"`; the floor sends no heartbeat pings);
//! * afterwards, client frames (masked): a close frame is answered with an unmasked close
//!   frame echoing its code, then the descriptor is closed; a ping is answered with a pong
//!   carrying its payload; other frames are read and dropped. End of file closes the
//!   descriptor.
//!
//! A `recv` that returns less than the buffer had room for drained the socket (edge-triggered
//! epoll, a stream socket), so no `recv` is made just to see `EAGAIN`; if the event also
//! reported `EPOLLRDHUP`, the peer's FIN is already in, and the descriptor is closed without
//! a `recv` returning 0. `close` alone takes the socket out of the epoll set (no
//! `EPOLL_CTL_DEL`).
//!
//! So the syscalls of a connect that the driver opens, holds and drops (no close frame), as
//! `connect --strace` counts them: `accept4`, `setsockopt(TCP_NODELAY)`, `epoll_ctl(ADD)`,
//! `recvfrom` (the request; one more only if it arrives in pieces), `sendto` (response and
//! hello), `recvfrom` returning 0 (the client's FIN), `close`: 7; plus shared calls, each
//! serving every connection it handles at once: `epoll_wait` (up to 3 per connect: the
//! listener, the request, the FIN, each counted once however many sockets one call reports)
//! and the `accept4` that ends each accept loop with `EAGAIN`. Between 7 and 11 per connect,
//! fewer the more connects arrive together.
//!
//! Bounds: a connection buffers at most 8 KiB ([`LIMIT`]): a request (headers included) or
//! a frame that does not fit is refused by closing the descriptor, as are requests that are
//! not `GET` or lack `Sec-WebSocket-Key`, unmasked frames, and malformed control frames. A
//! reply that does not fit in the socket's send buffer in one `send` closes the connection
//! (a fresh connection's buffer holds the ~200-byte upgrade many times over; only a client
//! that sends pings and never reads can fill it). Partial requests and frames are kept per
//! connection between reads; whole ones are handled in a scratch buffer shared by all.

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{ensure, Context, Result};
use socket2::{Domain, Socket, Type};
use tungstenite::handshake::derive_accept_key;

/// Arguments of `floor`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on (127.0.0.0/8; port 0 picks a free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

/// Most bytes buffered per connection: the longest request, and the longest client frame.
const LIMIT: usize = 8192;

/// The listening socket's backlog.
const BACKLOG: i32 = 4096;

/// Events taken from one `epoll_wait`.
const EVENTS: usize = 1024;

/// The listener's epoll token (connections' tokens are their descriptors).
const LISTENER: u64 = u64::MAX;

/// The heartbeat announced in `hello`, seconds (the floor sends no pings itself).
const HEARTBEAT_SECS: u32 = 25;

const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Runs the floor server until the process is killed.
pub fn run(args: &Args) -> Result<()> {
    let (mut floor, local) = Floor::bind(args.listen)?;
    println!("floor listening on {local} pid {}", std::process::id());
    floor.serve()
}

/// One connection.
struct Conn {
    /// The socket (dropping it closes it, which also takes it out of the epoll set).
    fd: OwnedFd,
    /// Bytes of a request or frame that has not fully arrived (at most [`LIMIT`] - 1).
    pending: Vec<u8>,
    /// Whether the 101 and the hello were sent.
    upgraded: bool,
}

/// The server: its listener, its epoll set, its connections by descriptor.
struct Floor {
    listener: Socket,
    epoll: OwnedFd,
    conns: Vec<Option<Conn>>,
    /// Where each read lands, after the connection's pending bytes.
    scratch: Box<[u8]>,
    /// The reply being built.
    out: Vec<u8>,
    /// Connections upgraded so far (the hello's `conn` is `c` and this count).
    upgraded: u64,
}

impl Floor {
    /// Listens on `addr` (127.0.0.0/8 only); returns the server and the address it got.
    fn bind(addr: SocketAddr) -> Result<(Floor, SocketAddr)> {
        ensure!(
            matches!(addr, SocketAddr::V4(v4) if v4.ip().is_loopback()),
            "--listen {addr} is not in 127.0.0.0/8 (loopback only)"
        );
        raise_fd_limit()?;
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).context("socket")?;
        listener.set_reuse_address(true).context("SO_REUSEADDR")?;
        listener
            .bind(&addr.into())
            .with_context(|| format!("bind {addr}"))?;
        listener.listen(BACKLOG).context("listen")?;
        listener.set_nonblocking(true).context("O_NONBLOCK")?;
        let local = listener
            .local_addr()?
            .as_socket()
            .context("the listener has no IP address")?;
        // SAFETY: epoll_create1 has no memory preconditions; the result is checked.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        watch(&epoll, listener.as_raw_fd(), LISTENER).context("epoll_ctl(ADD) listener")?;
        let floor = Floor {
            listener,
            epoll,
            conns: Vec::new(),
            scratch: vec![0; LIMIT].into_boxed_slice(),
            out: Vec::with_capacity(256),
            upgraded: 0,
        };
        Ok((floor, local))
    }

    /// Waits for events and handles them, forever (or until epoll fails).
    fn serve(&mut self) -> Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        loop {
            // SAFETY: `events` is a live buffer of the length passed.
            let ready = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    EVENTS as i32,
                    -1,
                )
            };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error).context("epoll_wait");
            }
            for event in &events[..ready as usize] {
                let (token, flags) = (event.u64, event.events);
                if token == LISTENER {
                    self.accept_all()?;
                } else {
                    self.readable(token as RawFd, flags);
                }
            }
        }
    }

    /// Accepts until the backlog is empty.
    fn accept_all(&mut self) -> Result<()> {
        loop {
            // SAFETY: a valid listening socket; no peer address is asked for.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(()),
                    Some(libc::EINTR | libc::ECONNABORTED) => continue,
                    // Out of descriptors or memory: what is left in the backlog is accepted
                    // at the listener's next event (the next connection to arrive).
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        eprintln!("floor: accept4: {error}");
                        return Ok(());
                    }
                    _ => return Err(error).context("accept4"),
                }
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if set_nodelay(&fd).is_err()
                || watch(&self.epoll, fd.as_raw_fd(), fd.as_raw_fd() as u64).is_err()
            {
                continue; // dropping `fd` closes it
            }
            let slot = fd.as_raw_fd() as usize;
            if self.conns.len() <= slot {
                self.conns.resize_with(slot + 1, || None);
            }
            self.conns[slot] = Some(Conn {
                fd,
                pending: Vec::new(),
                upgraded: false,
            });
        }
    }

    /// Reads connection `fd` until it is drained, answering what arrived; closes it on end of
    /// file, an error, a close frame or anything refused.
    fn readable(&mut self, fd: RawFd, flags: u32) {
        let Some(slot) = self.conns.get_mut(fd as usize) else {
            return;
        };
        let Some(conn) = slot.as_mut() else {
            return;
        };
        let peer_done = flags & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0;
        let keep = loop {
            let have = conn.pending.len();
            self.scratch[..have].copy_from_slice(&conn.pending);
            let room = LIMIT - have;
            // SAFETY: `room` writable bytes start at `scratch[have]`.
            let got = unsafe {
                libc::recv(
                    conn.fd.as_raw_fd(),
                    self.scratch[have..].as_mut_ptr().cast(),
                    room,
                    0,
                )
            };
            if got < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => break true,
                    _ => break false,
                }
            }
            if got == 0 {
                break false;
            }
            let got = got as usize;
            let end = have + got;
            let Some(used) = answer(
                conn,
                &self.scratch[..end],
                &mut self.out,
                &mut self.upgraded,
            ) else {
                break false;
            };
            if end - used >= LIMIT {
                break false; // a request or frame larger than LIMIT
            }
            conn.pending.clear();
            conn.pending.extend_from_slice(&self.scratch[used..end]);
            if got < room {
                // Drained; with the peer's FIN already in, the next read would return 0.
                break !peer_done;
            }
        };
        if !keep {
            *slot = None;
        }
    }
}

/// Handles what `data` holds for `conn` (its pending bytes and the new ones): the upgrade
/// request, then frames. Returns how many bytes were used (the rest is an incomplete request
/// or frame), or `None` when the connection is to be closed.
fn answer(conn: &mut Conn, data: &[u8], out: &mut Vec<u8>, upgraded: &mut u64) -> Option<usize> {
    let fd = conn.fd.as_raw_fd();
    let mut used = 0;
    if !conn.upgraded {
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Some(0);
        };
        let end = end + 4;
        let key = websocket_key(&data[..end])?;
        *upgraded += 1;
        upgrade(out, key, *upgraded);
        send_once(fd, out)?;
        conn.upgraded = true;
        used = end;
    }
    loop {
        match parse_frame(&data[used..])? {
            Frame::Partial => return Some(used),
            Frame::Whole {
                opcode,
                mask,
                payload,
                len,
            } => {
                used += len;
                match opcode {
                    OP_CLOSE => {
                        // Echo the code (if any), then close: the connection is over.
                        let code = payload.get(..2).unwrap_or(&[]);
                        control(out, OP_CLOSE, code, mask);
                        let _ = send_once(fd, out);
                        return None;
                    }
                    OP_PING => {
                        control(out, OP_PONG, payload, mask);
                        send_once(fd, out)?;
                    }
                    _ => {} // text, binary, continuation, pong: nothing to answer
                }
            }
        }
    }
}

/// Writes into `out` the 101 response for `key` and the hello of connection number `n`.
fn upgrade(out: &mut Vec<u8>, key: &[u8], n: u64) {
    out.clear();
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: ",
    );
    out.extend_from_slice(derive_accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    let frame = out.len();
    out.extend_from_slice(&[0x80 | 0x1, 0]);
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        r#"{{"op":"hello","conn":"c{n}","node":"floor","hb":{HEARTBEAT_SECS}}}"#
    );
    // At most 67 bytes (a u64 has 20 digits): the 7-bit length form.
    out[frame + 1] = (out.len() - frame - 2) as u8;
}

/// Writes into `out` an unmasked, final control frame carrying `payload` unmasked with `mask`
/// (at most 125 bytes: [`parse_frame`] refuses longer control frames).
fn control(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.clear();
    out.extend_from_slice(&[0x80 | opcode, payload.len() as u8]);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// The `Sec-WebSocket-Key` of a `GET` request (header lines up to the empty one), or `None`.
fn websocket_key(request: &[u8]) -> Option<&[u8]> {
    let mut lines = request.split(|&b| b == b'\n');
    if !lines.next()?.starts_with(b"GET ") {
        return None;
    }
    lines
        .find_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let (name, value) = line.split_at(colon);
            name.eq_ignore_ascii_case(b"sec-websocket-key")
                .then(|| value[1..].trim_ascii())
        })
        .filter(|key| !key.is_empty())
}

/// A client frame at the start of a buffer.
#[derive(Debug, PartialEq)]
enum Frame<'a> {
    /// Not all of it has arrived.
    Partial,
    /// All of it: its opcode, masking key, payload (still masked) and length with header.
    Whole {
        opcode: u8,
        mask: [u8; 4],
        payload: &'a [u8],
        len: usize,
    },
}

/// Reads the frame `data` starts with; `None` for one the floor refuses: unmasked (a client
/// must mask), with reserved bits (no extension was agreed), a control frame that is
/// fragmented or over 125 bytes, or longer than [`LIMIT`] with its header.
fn parse_frame(data: &[u8]) -> Option<Frame<'_>> {
    let [b0, b1, ..] = *data else {
        return Some(Frame::Partial);
    };
    if b1 & 0x80 == 0 || b0 & 0x70 != 0 {
        return None;
    }
    let opcode = b0 & 0x0F;
    let (len, header) = match b1 & 0x7F {
        126 => match data.get(2..4) {
            Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4),
            None => return Some(Frame::Partial),
        },
        127 => match data.get(2..10) {
            Some(bytes) => (u64::from_be_bytes(bytes.try_into().ok()?), 10),
            None => return Some(Frame::Partial),
        },
        short => (u64::from(short), 2),
    };
    if opcode >= OP_CLOSE && (b0 & 0x80 == 0 || len > 125) {
        return None;
    }
    let total = (header as u64 + 4).checked_add(len)?;
    if total > LIMIT as u64 {
        return None;
    }
    let total = total as usize;
    if data.len() < total {
        return Some(Frame::Partial);
    }
    Some(Frame::Whole {
        opcode,
        mask: data[header..header + 4].try_into().ok()?,
        payload: &data[header + 4..total],
        len: total,
    })
}

/// Sends all of `bytes` with one `send`, or fails (nothing is kept to send later).
fn send_once(fd: RawFd, bytes: &[u8]) -> Option<()> {
    // SAFETY: `bytes` is a live buffer of the length passed.
    let sent = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
    (sent == bytes.len() as isize).then_some(())
}

/// Adds `fd` to the epoll set, readable and peer-closed, edge-triggered, with `token`.
fn watch(epoll: &OwnedFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        u64: token,
    };
    // SAFETY: valid epoll and socket descriptors and a valid event.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `TCP_NODELAY` on a connection.
fn set_nodelay(fd: &OwnedFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, option and int-sized value.
    let done = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: one descriptor per connection.
fn raise_fd_limit() -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: raising the soft limit up to the hard limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::protocol::CloseFrame;
    use tungstenite::Message;

    use super::*;

    /// A client frame: final, masked with `mask`.
    fn masked(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    #[test]
    fn finds_the_key_of_a_get_only() {
        let request = b"GET /ws?user=a HTTP/1.1\r\nHost: x\r\nsec-websocket-KEY:  abc== \r\n\r\n";
        assert_eq!(websocket_key(request), Some(&b"abc=="[..]));
        assert_eq!(
            websocket_key(b"POST /ws HTTP/1.1\r\nSec-WebSocket-Key: a\r\n\r\n"),
            None
        );
        assert_eq!(websocket_key(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"), None);
        assert_eq!(
            websocket_key(b"GET /ws HTTP/1.1\r\nSec-WebSocket-Key:\r\n\r\n"),
            None
        );
    }

    #[test]
    fn parses_masked_frames_and_refuses_the_rest() {
        let mask = [1, 2, 3, 4];
        let ping = masked(OP_PING, b"hi", mask);
        assert_eq!(parse_frame(&ping[..1]), Some(Frame::Partial));
        assert_eq!(parse_frame(&ping[..7]), Some(Frame::Partial));
        assert_eq!(
            parse_frame(&ping),
            Some(Frame::Whole {
                opcode: OP_PING,
                mask,
                payload: &ping[6..],
                len: 8
            })
        );
        // Unmasked.
        assert_eq!(parse_frame(&[0x89, 0x00]), None);
        // A fragmented control frame; a control frame over 125 bytes.
        assert_eq!(parse_frame(&[0x09, 0x80, 0, 0, 0, 0]), None);
        assert_eq!(parse_frame(&[0x89, 0xFE, 0, 126]), None);
        // A text frame of 16-bit length that fits, one that does not.
        let mut text = vec![0x81, 0xFE, 0x01, 0x00, 9, 9, 9, 9];
        assert_eq!(parse_frame(&text), Some(Frame::Partial));
        text.resize(8 + 256, 0);
        assert!(matches!(
            parse_frame(&text),
            Some(Frame::Whole { len: 264, .. })
        ));
        assert_eq!(parse_frame(&[0x81, 0xFE, 0x20, 0x00]), None);
        assert_eq!(
            parse_frame(&[0x82, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
            None
        );
    }

    #[test]
    fn refuses_addresses_off_loopback() {
        assert!(Floor::bind("0.0.0.0:0".parse().expect("addr")).is_err());
        assert!(Floor::bind("[::1]:0".parse().expect("addr")).is_err());
    }

    /// A floor on a free port, served by a thread that lives as long as the test process.
    fn spawn_floor() -> SocketAddr {
        let (mut floor, local) = Floor::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        std::thread::spawn(move || floor.serve());
        local
    }

    #[test]
    fn the_driver_connects_pings_and_closes() {
        let local = spawn_floor();
        let target = format!("ws://{local}/ws").parse().expect("target");
        let deadline = crate::client::Deadline::after(Duration::from_secs(10));
        let mut ws = crate::client::open(&target, "127.0.0.2".parse().expect("ip"), "u", deadline)
            .expect("upgrade and hello");
        ws.send(Message::Ping(b"p1".to_vec().into())).expect("ping");
        assert_eq!(
            ws.read().expect("pong"),
            Message::Pong(b"p1".to_vec().into())
        );
        ws.close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        }))
        .expect("close");
        match ws.read().expect("close reply") {
            Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("expected a close frame, got {other:?}"),
        }
        // The server closed its side after the reply.
        assert!(matches!(
            ws.read(),
            Err(tungstenite::Error::ConnectionClosed)
        ));
    }

    #[test]
    fn refuses_a_request_over_the_limit_and_a_second_connection_still_works() {
        use std::io::{Read, Write};
        let local = spawn_floor();
        let mut big = TcpStream::connect(local).expect("connect");
        big.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut request = b"GET /ws HTTP/1.1\r\nX-Pad: ".to_vec();
        request.resize(LIMIT + 100, b'a');
        // The server may close before all of it is written.
        let _ = big.write_all(&request);
        let mut rest = Vec::new();
        let _ = big.read_to_end(&mut rest);
        assert!(rest.is_empty(), "no answer to an oversized request");
        let mut ok = TcpStream::connect(local).expect("connect");
        ok.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        ok.write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .expect("request");
        let mut reply = [0u8; 512];
        let mut got = 0;
        while !reply[..got].ends_with(b"}") {
            let n = ok.read(&mut reply[got..]).expect("reply");
            assert!(n > 0, "closed early");
            got += n;
        }
        let text = String::from_utf8_lossy(&reply[..got]);
        assert!(
            text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{text}"
        );
        assert!(
            text.contains(r#"{"op":"hello","conn":"c1","node":"floor","hb":25}"#),
            "{text}"
        );
    }
}
