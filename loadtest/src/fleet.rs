//! The coordinator's side of the worker processes: starting them, commanding them, and
//! gathering what they say.
//!
//! Each worker is this same executable (`std::env::current_exe`) run as `worker`, with its
//! [`Job`] on stdin. A thread per worker reads its stdout into one channel; another keeps
//! the last lines of its stderr, to explain a worker that fails. Workers still running when
//! the [`Fleet`] is dropped are killed (each by its own handle) and reaped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::wire::{Job, Line};

/// Lines of a worker's stderr kept to explain its failure.
const STDERR_KEPT: usize = 20;

/// What arrives from a worker.
enum Event {
    /// A line it wrote.
    Line(Line),
    /// Its stdout closed (it exited).
    Gone,
}

/// One worker process.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Whether its final report arrived.
    reported: bool,
    /// Reads its stderr and returns the last lines at its end of file.
    stderr_reader: Option<JoinHandle<VecDeque<String>>>,
}

/// Running worker processes.
pub struct Fleet {
    workers: Vec<Worker>,
    events: Receiver<(usize, Event)>,
}

impl Fleet {
    /// Starts one worker per job.
    pub fn spawn(jobs: &[Job]) -> Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let (sender, events) = mpsc::channel();
        let mut workers = Vec::with_capacity(jobs.len());
        for (w, job) in jobs.iter().enumerate() {
            let mut command = Command::new(&exe);
            crate::die_with_parent(&mut command);
            let mut child = command
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting worker {w} ({})", exe.display()))?;
            let (Some(mut stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                bail!("worker {w} has no pipes");
            };
            writeln!(stdin, "{}", serde_json::to_string(job)?)
                .with_context(|| format!("giving worker {w} its job"))?;
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let event = match serde_json::from_str::<Line>(&line) {
                        Ok(parsed) => Event::Line(parsed),
                        // A worker only writes lines; anything else means it is broken.
                        Err(_) => break,
                    };
                    if sender.send((w, event)).is_err() {
                        return;
                    }
                }
                let _ = sender.send((w, Event::Gone));
            });
            let stderr_reader = std::thread::spawn(move || {
                let mut tail = VecDeque::with_capacity(STDERR_KEPT);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if tail.len() == STDERR_KEPT {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                tail
            });
            workers.push(Worker {
                child,
                stdin: Some(stdin),
                reported: false,
                stderr_reader: Some(stderr_reader),
            });
        }
        Ok(Fleet { workers, events })
    }

    /// Sends `command` to every worker.
    pub fn command(&mut self, command: &str) -> Result<()> {
        for (w, worker) in self.workers.iter_mut().enumerate() {
            if let Some(stdin) = worker.stdin.as_mut() {
                writeln!(stdin, "{command}")
                    .and_then(|()| stdin.flush())
                    .with_context(|| format!("commanding worker {w}"))?;
            }
        }
        Ok(())
    }

    /// The next line from any worker, or `None` if none came by `until`. A worker that
    /// exits without its final report is an error that carries its stderr.
    pub fn next(&mut self, until: Instant) -> Result<Option<(usize, Line)>> {
        loop {
            let wait = until.saturating_duration_since(Instant::now());
            return match self.events.recv_timeout(wait) {
                Ok((w, Event::Line(line))) => {
                    if matches!(line, Line::Done(_)) {
                        self.workers[w].reported = true;
                    }
                    Ok(Some((w, line)))
                }
                Ok((w, Event::Gone)) if self.workers[w].reported => continue,
                Ok((w, Event::Gone)) => Err(self.failure(w)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(anyhow!("every worker is gone")),
            };
        }
    }

    /// Describes worker `w`'s failure from its exit status and stderr.
    fn failure(&mut self, w: usize) -> anyhow::Error {
        let worker = &mut self.workers[w];
        let status = worker
            .child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        // The reader ends at the stderr's end of file, which the exit brought.
        let tail = worker
            .stderr_reader
            .take()
            .and_then(|reader| reader.join().ok())
            .map(|tail| Vec::from(tail).join("\n    "))
            .unwrap_or_default();
        anyhow!("worker {w} stopped before reporting ({status}):\n    {tail}")
    }

    /// Closes the workers' stdin and waits for them to exit.
    pub fn finish(mut self) {
        for worker in &mut self.workers {
            worker.stdin = None;
            let _ = worker.child.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            worker.stdin = None;
            if let Ok(None) = worker.child.try_wait() {
                let _ = worker.child.kill();
                let _ = worker.child.wait();
            }
        }
    }
}
