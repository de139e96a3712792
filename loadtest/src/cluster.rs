//! `--spawn-cluster K`: a throwaway cluster on loopback for one run.
//!
//! Starts `redis-server` on a free port (no persistence), then K `shardcast serve` processes
//! (`--dev --redis ... --shards 1`, `SHARDCAST_PIN_SHARDS=false` so they share the cores),
//! each on a free client port and a free API port, and waits for each node's `GET /readyz`
//! to answer 200. Free ports are found by binding port 0 and releasing it. Logs go to a
//! fresh directory under the temporary directory, named in errors.
//!
//! Dropping the [`Cluster`] stops it: SIGTERM to every node (they drain), SIGKILL to any
//! still running after [`STOP_GRACE`], then SIGTERM to redis (SIGKILL likewise). Every
//! process is signalled by its own pid.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::{Deadline, Target};
use crate::http::Api;

/// How long a node has to become ready.
const READY_WAIT: Duration = Duration::from_secs(30);

/// Pause after the last node is ready.
const SETTLE: Duration = Duration::from_secs(1);

/// How long stopping processes have before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// How the cluster is started.
pub struct ClusterSpec<'a> {
    /// Nodes.
    pub nodes: usize,
    /// The `shardcast` binary.
    pub shardcast: &'a Path,
    /// The `redis-server` binary.
    pub redis_server: &'a Path,
    /// Run the nodes without Redis (single, unconnected nodes; only sensible with one).
    pub without_redis: bool,
    /// Variables added to every node's environment (settings such as
    /// `SHARDCAST_UPSTREAM_SINK`).
    pub env: &'a [(&'a str, String)],
}

/// One node of the cluster.
struct Node {
    child: Child,
    ws: SocketAddr,
    api: SocketAddr,
}

/// A running cluster.
pub struct Cluster {
    redis: Option<Child>,
    redis_addr: Option<SocketAddr>,
    nodes: Vec<Node>,
    /// Where the logs are.
    pub log_dir: PathBuf,
}

impl Cluster {
    /// Starts redis (unless `without_redis`) and the nodes, and waits until all are ready.
    pub fn start(spec: &ClusterSpec<'_>, deadline: Deadline) -> Result<Self> {
        let log_dir =
            std::env::temp_dir().join(format!("shardcast-loadtest-{}", std::process::id()));
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let mut cluster = Cluster {
            redis: None,
            redis_addr: None,
            nodes: Vec::new(),
            log_dir,
        };
        let redis_url = if spec.without_redis {
            None
        } else {
            let port = free_port()?;
            let log = cluster.log_file("redis.log")?;
            let mut command = Command::new(spec.redis_server);
            crate::die_with_parent(&mut command);
            let child = command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", spec.redis_server.display()))?;
            cluster.redis = Some(child);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            cluster.wait_for_redis(addr, deadline)?;
            cluster.redis_addr = Some(addr);
            Some(format!("redis://{addr}"))
        };
        for n in 0..spec.nodes {
            let ws = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let log = cluster.log_file(&format!("node-{n}.log"))?;
            let mut command = Command::new(spec.shardcast);
            crate::die_with_parent(&mut command);
            command
                .args(["serve", "--dev", "--shards", "1"])
                .args([
                    "--listen",
                    &ws.to_string(),
                    "--api-listen",
                    &api.to_string(),
                ])
                .args(["--node-id", &format!("loadtest-{n}")])
                .env("SHARDCAST_PIN_SHARDS", "false")
                .envs(spec.env.iter().map(|(name, value)| (name, value)))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            if let Some(url) = &redis_url {
                command.args(["--redis", url]);
            }
            let child = command
                .spawn()
                .with_context(|| format!("starting {}", spec.shardcast.display()))?;
            cluster.nodes.push(Node { child, ws, api });
        }
        for n in 0..cluster.nodes.len() {
            cluster.wait_until_ready(n, deadline)?;
        }
        // Let the nodes close the readiness probes' connections before baselines are read.
        std::thread::sleep(deadline.cap(SETTLE));
        Ok(cluster)
    }

    /// The nodes' WebSocket endpoints.
    pub fn urls(&self) -> Vec<Target> {
        self.nodes
            .iter()
            .map(|node| Target {
                addr: node.ws,
                path: "/ws".to_owned(),
            })
            .collect()
    }

    /// The nodes' API addresses.
    pub fn apis(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|node| node.api).collect()
    }

    /// Redis's pid and address, unless the nodes run without it.
    pub fn redis(&self) -> Option<(u32, SocketAddr)> {
        Some((self.redis.as_ref()?.id(), self.redis_addr?))
    }

    /// The nodes' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|node| node.child.id()).collect()
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File> {
        let path = self.log_dir.join(name);
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
    }

    fn wait_for_redis(&mut self, addr: SocketAddr, deadline: Deadline) -> Result<()> {
        let until = Instant::now() + deadline.cap(READY_WAIT);
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(redis) = self.redis.as_mut() {
                if let Some(status) = redis.try_wait()? {
                    bail!(
                        "redis-server exited ({status}); see {}",
                        self.log_dir.join("redis.log").display()
                    );
                }
            }
            if Instant::now() >= until {
                bail!("redis-server did not listen on {addr} in time");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_until_ready(&mut self, n: usize, deadline: Deadline) -> Result<()> {
        let until = Instant::now() + deadline.cap(READY_WAIT);
        let log = self.log_dir.join(format!("node-{n}.log"));
        let node = &mut self.nodes[n];
        loop {
            if let Some(status) = node.child.try_wait()? {
                bail!(
                    "node {n} exited ({status}) before it was ready:\n{}",
                    tail(&log)
                );
            }
            let ready = Api::connect(node.api, None, Duration::from_millis(200))
                .and_then(|mut api| api.get("/readyz"))
                .is_ok_and(|response| response.status == 200);
            if ready {
                return Ok(());
            }
            if Instant::now() >= until {
                bail!("node {n} was not ready in time; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut nodes: Vec<&mut Child> = self.nodes.iter_mut().map(|n| &mut n.child).collect();
        stop(&mut nodes);
        if let Some(redis) = self.redis.as_mut() {
            stop(&mut [redis]);
        }
    }
}

/// SIGTERM to each process, then SIGKILL to those still running after [`STOP_GRACE`].
fn stop(children: &mut [&mut Child]) {
    for child in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            // SAFETY: signalling a child we started and have not reaped (so the pid is ours).
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    let until = Instant::now() + STOP_GRACE;
    for child in children.iter_mut() {
        while let Ok(None) = child.try_wait() {
            if Instant::now() >= until {
                eprintln!("process {} still running; SIGKILL", child.id());
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The last lines of a log file, indented.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(10);
    lines[from..]
        .iter()
        .map(|line| format!("    {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}
