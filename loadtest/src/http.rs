//! A minimal HTTP/1.1 client for the node's API: one keep-alive connection, one request at
//! a time, bodies read by `Content-Length` (the API always sends one).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

/// Longest response head or body accepted.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Longest wait for a connect or a response.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A keep-alive connection to one API address.
pub struct Api {
    stream: BufReader<TcpStream>,
    key: Option<String>,
}

/// A response: status and body.
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body text.
    pub body: String,
}

impl Api {
    /// Connects to `addr` (loopback only); `key` is sent as a bearer token when given.
    pub fn connect(addr: SocketAddr, key: Option<&str>, timeout: Duration) -> Result<Self> {
        ensure!(
            addr.ip().is_loopback(),
            "only loopback API addresses are allowed, not {addr}"
        );
        let stream = TcpStream::connect_timeout(&addr, timeout.min(IO_TIMEOUT))
            .with_context(|| format!("connecting to the API at {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Api {
            stream: BufReader::new(stream),
            key: key.map(str::to_owned),
        })
    }

    /// `POST path` with a JSON body.
    pub fn post(&mut self, path: &str, body: &str) -> Result<Response> {
        self.request("POST", path, body)
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.request("GET", path, "")
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> Result<Response> {
        let auth = self
            .key
            .as_ref()
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        write!(
            self.stream.get_mut(),
            "{method} {path} HTTP/1.1\r\nHost: api\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut status = None;
        let mut length = 0usize;
        let mut head_bytes = 0;
        loop {
            let mut line = String::new();
            let n = self.stream.read_line(&mut line)?;
            ensure!(n > 0, "the API closed the connection");
            head_bytes += n;
            ensure!(
                head_bytes <= MAX_RESPONSE_BYTES,
                "response head over {MAX_RESPONSE_BYTES} bytes"
            );
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if status.is_none() {
                status = Some(
                    line.split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse::<u16>().ok())
                        .with_context(|| format!("bad status line {line:?}"))?,
                );
            } else if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().context("content-length")?;
                }
            }
        }
        ensure!(
            length <= MAX_RESPONSE_BYTES,
            "response body of {length} bytes"
        );
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body)?;
        Ok(Response {
            status: status.context("no status line")?,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}
