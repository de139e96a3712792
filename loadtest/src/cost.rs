//! What the nodes spend per event: CPU (user and system, `/proc/PID/stat`), context switches
//! (every thread's, `/proc/PID/task/*/status`) and, with `--strace`, syscalls, each read
//! before and after a phase of the run and divided by the phase's events.
//!
//! Syscalls come from `strace -c -f -p PID...` attached for the phase only (all threads of
//! every node; the phase starts once strace reports every thread attached) and stopped with
//! SIGINT, after which it writes its summary; the `total` line and the largest counts are
//! read from it. strace stops the nodes at every syscall, so a traced phase runs slower and
//! its CPU and switch figures are strace's as much as the node's: use them from an untraced
//! run, and the syscall counts from a traced one.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::probe::{CpuTime, Probe, Switches};
use crate::report::Report;

/// Syscalls shown by name per event (the largest counts).
const TOP_SYSCALLS: usize = 6;

/// Measures phases of a run on a set of nodes.
pub struct Meter {
    nodes: Vec<Probe>,
    pids: Vec<u32>,
    strace: bool,
}

/// A phase being measured.
pub struct Phase {
    cpu: CpuTime,
    switches: Switches,
    tracer: Option<Tracer>,
}

/// What the nodes spent over one or more phases.
#[derive(Clone, Debug, Default)]
pub struct Cost {
    cpu: CpuTime,
    switches: Switches,
    /// Total syscalls and the counts by name, when traced.
    syscalls: Option<(u64, Vec<(String, u64)>)>,
}

impl Meter {
    /// A meter for nodes `pids` (none: every phase is `None`), tracing syscalls if `strace`.
    pub fn new(pids: &[u32], strace: bool) -> Self {
        Meter {
            nodes: pids.iter().copied().map(Probe::pid).collect(),
            pids: pids.to_vec(),
            strace,
        }
    }

    /// Starts a phase (once strace, if asked for, is attached).
    pub fn start(&self, deadline: Instant) -> Result<Option<Phase>> {
        if self.nodes.is_empty() {
            return Ok(None);
        }
        let tracer = if self.strace {
            Some(Tracer::attach(&self.pids, deadline)?)
        } else {
            None
        };
        let (cpu, switches) = self.read()?;
        Ok(Some(Phase {
            cpu,
            switches,
            tracer,
        }))
    }

    /// Ends a phase: what the nodes spent during it.
    pub fn stop(&self, phase: Option<Phase>) -> Result<Option<Cost>> {
        let Some(phase) = phase else {
            return Ok(None);
        };
        let (cpu, switches) = self.read()?;
        let syscalls = phase.tracer.map(Tracer::finish).transpose()?;
        Ok(Some(Cost {
            cpu: cpu.since(phase.cpu),
            switches: switches.since(phase.switches),
            syscalls,
        }))
    }

    fn read(&self) -> Result<(CpuTime, Switches)> {
        let mut cpu = CpuTime::default();
        let mut switches = Switches::default();
        for node in &self.nodes {
            let used = node.cpu()?;
            cpu.user += used.user;
            cpu.system += used.system;
            let made = node.switches()?;
            switches.voluntary += made.voluntary;
            switches.nonvoluntary += made.nonvoluntary;
        }
        Ok((cpu, switches))
    }
}

impl Cost {
    /// The sum of two phases' costs (a connect's: opening, then closing).
    pub fn plus(mut self, other: &Cost) -> Cost {
        self.cpu.user += other.cpu.user;
        self.cpu.system += other.cpu.system;
        self.switches.voluntary += other.switches.voluntary;
        self.switches.nonvoluntary += other.switches.nonvoluntary;
        self.syscalls = match (self.syscalls, &other.syscalls) {
            (Some((a, mut names)), Some((b, more))) => {
                for (name, calls) in more {
                    match names.iter_mut().find(|(n, _)| n == name) {
                        Some((_, c)) => *c += calls,
                        None => names.push((name.clone(), *calls)),
                    }
                }
                Some((a + b, names))
            }
            (mine, _) => mine,
        };
        self
    }

    /// Adds rows "node CPU / context switches / syscalls per `event`" and the JSON field
    /// `key`.
    pub fn report(&self, report: &mut Report, key: &str, event: &str, events: u64) {
        if events == 0 {
            return;
        }
        let per = |x: f64| x / events as f64;
        let (user_us, system_us) = (per(self.cpu.user * 1e6), per(self.cpu.system * 1e6));
        report.row(
            &format!("node CPU per {event}, user + system"),
            format!(
                "{user_us:.1} + {system_us:.1} = {:.1} µs",
                user_us + system_us
            ),
        );
        let (voluntary, nonvoluntary) = (
            per(self.switches.voluntary as f64),
            per(self.switches.nonvoluntary as f64),
        );
        report.row(
            &format!("context switches per {event}, vol + nonvol"),
            format!("{voluntary:.2} + {nonvoluntary:.2}"),
        );
        let mut field = json!({
            "events": events, "user_us": user_us, "system_us": system_us,
            "voluntary_switches": voluntary, "nonvoluntary_switches": nonvoluntary,
        });
        if let Some((total, names)) = &self.syscalls {
            let mut names = names.clone();
            names.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
            let top: Vec<String> = names
                .iter()
                .take(TOP_SYSCALLS)
                .map(|(name, calls)| format!("{name} {:.2}", per(*calls as f64)))
                .collect();
            report.row(
                &format!("syscalls per {event} (strace)"),
                format!("{:.1}: {}", per(*total as f64), top.join(", ")),
            );
            field["syscalls"] = json!(per(*total as f64));
            field["syscalls_by_name"] = Value::Object(
                names
                    .iter()
                    .map(|(name, calls)| (name.clone(), json!(per(*calls as f64))))
                    .collect(),
            );
        }
        report.field(key, field);
    }
}

/// `strace -c` attached to the nodes for one phase.
struct Tracer {
    child: Child,
    output: std::path::PathBuf,
}

impl Tracer {
    /// Starts strace on every thread of `pids` and waits until it reports them attached.
    fn attach(pids: &[u32], deadline: Instant) -> Result<Tracer> {
        static TRACES: AtomicUsize = AtomicUsize::new(0);
        let output = std::env::temp_dir().join(format!(
            "shardcast-loadtest-strace-{}-{}",
            std::process::id(),
            TRACES.fetch_add(1, Ordering::Relaxed)
        ));
        let mut command = Command::new("strace");
        command.args(["-c", "-f", "-o"]).arg(&output);
        for pid in pids {
            command.arg("-p").arg(pid.to_string());
        }
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        crate::die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .context("starting strace (is it installed? --strace needs it)")?;
        let stderr = child.stderr.take().context("strace's stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut attached = 0;
        while attached < pids.len() {
            ensure!(Instant::now() < deadline, "timed out attaching strace");
            match lines.next() {
                Some(line) => {
                    let line = line.context("reading strace's stderr")?;
                    if is_attached(&line) {
                        attached += 1;
                    } else {
                        eprintln!("{line}");
                    }
                }
                None => {
                    let _ = child.wait();
                    bail!("strace exited before attaching (ptrace allowed here?)");
                }
            }
        }
        // Keep reading (and dropping) what strace says about threads that come and go.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Tracer { child, output })
    }

    /// Detaches strace and reads its summary: total calls, and calls by name.
    fn finish(mut self) -> Result<(u64, Vec<(String, u64)>)> {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        self.child.wait().context("waiting for strace")?;
        let summary = std::fs::read_to_string(&self.output)
            .with_context(|| format!("reading {}", self.output.display()))?;
        let _ = std::fs::remove_file(&self.output);
        parse_summary(&summary)
    }
}

/// Whether an strace line reports a `-p` process attached: one line per process, for all
/// its threads at once (`Process N attached`, or `Process N attached with M threads`).
fn is_attached(line: &str) -> bool {
    line.ends_with(" attached") || line.contains(" attached with ")
}

/// The calls column of `strace -c` (`% time, seconds, usecs/call, calls, [errors], name`).
/// strace writes nothing at all when it counted no calls (a process asleep in `epoll_wait`
/// for the whole phase, such as `floor` while connections are held): zero calls.
fn parse_summary(summary: &str) -> Result<(u64, Vec<(String, u64)>)> {
    if summary.trim().is_empty() {
        return Ok((0, Vec::new()));
    }
    let mut names = Vec::new();
    for line in summary.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(calls)) = (fields.last(), fields.get(3)) else {
            continue;
        };
        let Ok(calls) = calls.parse::<u64>() else {
            continue;
        };
        if *name == "total" {
            return Ok((calls, names));
        }
        names.push((name.to_string(), calls));
    }
    bail!("no total line in strace's summary")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_attach_lines() {
        assert!(is_attached("strace: Process 12 attached"));
        assert!(is_attached("strace: Process 12 attached with 7 threads"));
        assert!(!is_attached("strace: Process 12 detached"));
    }

    #[test]
    fn an_empty_strace_summary_is_no_calls() {
        assert_eq!(parse_summary("").expect("parsed"), (0, Vec::new()));
        assert!(
            parse_summary("% time     seconds  usecs/call     calls    errors syscall\n").is_err()
        );
    }

    #[test]
    fn reads_an_strace_summary() {
        let summary = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 52.10    0.012000           5      2200           io_uring_enter
 30.00    0.007000           2      3000      1000 recvfrom
------ ----------- ----------- --------- --------- ----------------
100.00    0.019000           3      5200      1000 total
";
        let (total, names) = parse_summary(summary).expect("parsed");
        assert_eq!(total, 5200);
        assert_eq!(
            names,
            vec![
                ("io_uring_enter".to_owned(), 2200),
                ("recvfrom".to_owned(), 3000)
            ]
        );
    }
}
