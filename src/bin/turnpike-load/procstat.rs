//! What the generator reads about the server process and the kernel: CPU from /proc/PID/stat
//! (all threads, living and exited), RSS from /proc/PID/status, UDP socket memory from
//! /proc/net/sockstat.

use std::fs;

/// One reading of the server process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub cpu_us: u64,
    pub rss_kib: u64,
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

pub fn sample(pid: u32) -> Result<Sample, String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("/proc/{pid}/stat has no command field"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is the state (field 3 of proc(5)): utime is field 14, stime 15.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
        return Err(format!("/proc/{pid}/stat: no utime/stime"));
    };
    let cpu_us = (utime + stime) * 1_000_000 / clock_ticks();
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Sample { cpu_us, rss_kib })
}

/// Pages of memory the kernel holds for UDP sockets (the `mem` of the `UDP:` line), or 0.
pub fn udp_mem_pages() -> u64 {
    let Ok(text) = fs::read_to_string("/proc/net/sockstat") else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("UDP:"))
        .and_then(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words
                .windows(2)
                .find(|w| w[0] == "mem")
                .and_then(|w| w[1].parse().ok())
        })
        .unwrap_or(0)
}

/// The server process, when --server-pid names one: readings taken around each phase.
pub struct Server {
    pid: Option<u32>,
}

impl Server {
    pub fn new(pid: Option<u32>) -> Result<Server, String> {
        if let Some(p) = pid {
            sample(p).map_err(|e| format!("--server-pid {p}: {e}"))?;
        }
        Ok(Server { pid })
    }

    /// None without --server-pid, or when the process has gone.
    pub fn sample(&self) -> Option<Sample> {
        self.pid.and_then(|p| sample(p).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0);
    }

    #[test]
    fn a_missing_process_is_an_error() {
        assert!(sample(u32::MAX).is_err());
    }
}
