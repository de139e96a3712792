//! What the load driver reads about a process from `/proc`.
//!
//! * RSS: `VmRSS` in `/proc/PID/status`, resident memory (anonymous, file-backed and shmem
//!   pages) in KiB. Kernel memory for sockets and epoll items is not in it.
//! * CPU: `utime` and `stime` (fields 14 and 15) of `/proc/PID/stat`, in clock ticks
//!   (`sysconf(_SC_CLK_TCK)`, normally 100 a second, so single readings are 10 ms coarse:
//!   scenarios measure over seconds).
//! * Context switches: `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of every
//!   thread, `/proc/PID/task/*/status` (the process's own status counts only its main
//!   thread).
//! * Descriptors: entries of `/proc/PID/fd`, to confirm the node holds the sockets.

use anyhow::{Context, Result};

/// CPU time a process has used so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    /// User-space seconds.
    pub user: f64,
    /// Kernel seconds.
    pub system: f64,
}

impl CpuTime {
    /// User plus kernel seconds.
    pub fn total(&self) -> f64 {
        self.user + self.system
    }

    /// The time used between `earlier` and `self`.
    pub fn since(&self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// Context switches a process's threads have made so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Switches {
    /// The thread gave up the CPU (it slept: waiting for I/O, a futex, a wake-up).
    pub voluntary: u64,
    /// The thread was preempted.
    pub nonvoluntary: u64,
}

impl Switches {
    /// The switches made between `earlier` and `self`.
    pub fn since(&self, earlier: Switches) -> Switches {
        Switches {
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            nonvoluntary: self.nonvoluntary.saturating_sub(earlier.nonvoluntary),
        }
    }
}

/// A process to observe.
#[derive(Clone, Debug)]
pub struct Probe {
    proc_dir: String,
}

impl Probe {
    /// Observes process `pid`.
    pub fn pid(pid: u32) -> Self {
        Probe {
            proc_dir: format!("/proc/{pid}"),
        }
    }

    /// Resident set size in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        let path = format!("{}/status", self.proc_dir);
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .with_context(|| format!("no VmRSS in {path}"))?
            .parse()
            .with_context(|| format!("VmRSS in {path}"))?;
        Ok(kib * 1024)
    }

    /// CPU time used so far.
    pub fn cpu(&self) -> Result<CpuTime> {
        let path = format!("{}/stat", self.proc_dir);
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // The command name (field 2) is in parentheses and may hold spaces: count from after it.
        let after_comm = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 1..))
            .with_context(|| format!("unexpected format of {path}"))?;
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // Field 3 (state) is fields[0], so field n is fields[n - 3].
        let ticks = |field: usize| -> Result<f64> {
            let value = fields
                .get(field - 3)
                .with_context(|| format!("{path} has no field {field}"))?;
            Ok(value.parse::<u64>()? as f64)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(CpuTime {
            user: ticks(14)? / hz,
            system: ticks(15)? / hz,
        })
    }

    /// Context switches of every thread alive now (a thread that ended took its counts).
    pub fn switches(&self) -> Result<Switches> {
        let dir = format!("{}/task", self.proc_dir);
        let mut total = Switches::default();
        for task in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
            let path = task?.path().join("status");
            // A thread may end between the listing and the read.
            let Ok(status) = std::fs::read_to_string(&path) else {
                continue;
            };
            for line in status.lines() {
                let count = |rest: &str| rest.trim().parse::<u64>().unwrap_or(0);
                if let Some(rest) = line.strip_prefix("voluntary_ctxt_switches:") {
                    total.voluntary += count(rest);
                } else if let Some(rest) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                    total.nonvoluntary += count(rest);
                }
            }
        }
        Ok(total)
    }

    /// Open file descriptors.
    pub fn fd_count(&self) -> Result<usize> {
        let path = format!("{}/fd", self.proc_dir);
        Ok(std::fs::read_dir(&path)
            .with_context(|| format!("listing {path}"))?
            .count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = Probe::pid(std::process::id());
        assert!(me.rss_bytes().expect("rss") > 0);
        let cpu = me.cpu().expect("cpu");
        assert!(cpu.user >= 0.0 && cpu.system >= 0.0);
        assert!(me.fd_count().expect("fds") >= 3);
        me.switches().expect("switches");
    }
}
