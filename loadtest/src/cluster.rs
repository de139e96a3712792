//! `--spawn-cluster K`: a throwaway cluster on loopback for one run.
//!
//! Starts `redis-server` on a free port (no persistence), or with `--redis-primaries N` an
//! N-primary Redis Cluster ([`crate::redis_cluster`]), then K `shardcast serve` processes
//! (`--dev --redis ... --shards 1`, `SHARDCAST_PIN_SHARDS=false` so they share the cores),
//! each on a free client port and a free API port, and waits for each node's `GET /readyz`
//! to answer 200. Free ports are found by binding port 0 and releasing it. Logs go to a
//! fresh directory under the temporary directory, named in errors.
//!
//! Dropping the [`Cluster`] stops it: SIGTERM to every node (they drain), SIGKILL to any
//! still running after [`STOP_GRACE`], then SIGTERM to every redis (SIGKILL likewise). Every
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
    /// Give the nodes a Redis Cluster of this many primaries instead of one `redis-server`.
    pub redis_primaries: Option<usize>,
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

/// One `redis-server` process.
struct Redis {
    child: Child,
    addr: SocketAddr,
}

/// A running cluster.
pub struct Cluster {
    /// The standalone server, or every Redis Cluster primary.
    redis: Vec<Redis>,
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
            redis: Vec::new(),
            nodes: Vec::new(),
            log_dir,
        };
        let redis_url = match (spec.without_redis, spec.redis_primaries) {
            (true, _) => None,
            (false, None) => {
                let port = free_port()?;
                let args = ["--port", &port.to_string(), "--bind", "127.0.0.1"];
                let args = args.into_iter().chain(["--save", "", "--appendonly", "no"]);
                cluster.start_redis(spec, port, args, "redis.log", deadline)?;
                Some(format!("redis://{}", cluster.redis[0].addr))
            }
            (false, Some(primaries)) => {
                let mut members = Vec::with_capacity(primaries);
                for i in 0..primaries {
                    let port = free_port()?;
                    // Probed one after the other, so the two may coincide.
                    let bus_port = loop {
                        let bus_port = free_port()?;
                        if bus_port != port {
                            break bus_port;
                        }
                    };
                    let dir = cluster.log_dir.join(format!("redis-{i}"));
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    let args = crate::redis_cluster::server_args(port, bus_port, &dir);
                    let log = format!("redis-{i}.log");
                    cluster.start_redis(
                        spec,
                        port,
                        args.iter().map(String::as_str),
                        &log,
                        deadline,
                    )?;
                    members.push((cluster.redis[i].addr, bus_port));
                }
                crate::redis_cluster::form(&members, Instant::now() + deadline.cap(READY_WAIT))
                    .with_context(|| {
                        format!(
                            "forming the Redis Cluster; see {}",
                            cluster.log_dir.display()
                        )
                    })?;
                let addrs: Vec<String> = members.iter().map(|(a, _)| a.to_string()).collect();
                Some(format!("redis+cluster://{}", addrs.join(",")))
            }
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

    /// Every redis process's pid and address (none if the nodes run without redis).
    pub fn redis(&self) -> Vec<(u32, SocketAddr)> {
        self.redis.iter().map(|r| (r.child.id(), r.addr)).collect()
    }

    /// The nodes' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|node| node.child.id()).collect()
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File> {
        let path = self.log_dir.join(name);
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
    }

    /// Starts `redis-server` with `args` (listening on `port`), logging to `log`, and waits
    /// until it listens.
    fn start_redis<'a>(
        &mut self,
        spec: &ClusterSpec<'_>,
        port: u16,
        args: impl IntoIterator<Item = &'a str>,
        log: &str,
        deadline: Deadline,
    ) -> Result<()> {
        let log_path = self.log_dir.join(log);
        let log = self.log_file(log)?;
        let mut command = Command::new(spec.redis_server);
        crate::die_with_parent(&mut command);
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", spec.redis_server.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.redis.push(Redis { child, addr });
        let redis = self.redis.last_mut().expect("just pushed");
        let until = Instant::now() + deadline.cap(READY_WAIT);
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = redis.child.try_wait()? {
                bail!("redis-server exited ({status}); see {}", log_path.display());
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
        let mut redis: Vec<&mut Child> = self.redis.iter_mut().map(|r| &mut r.child).collect();
        stop(&mut redis);
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
