//! The server's CPU and memory, read from /proc (with `--server-pid`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// CPU time (user + system) of a process so far, µs.
pub fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000 / hz)
}

/// Resident memory of a process now, KiB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Samples a process's RSS every 100 ms and keeps the maximum.
pub struct RssWatch {
    pub max_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssWatch {
    pub fn start(pid: u32) -> RssWatch {
        let max_kb = Arc::new(AtomicU64::new(rss_kb(pid).unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (max_kb.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Relaxed) {
                if let Some(kb) = rss_kb(pid) {
                    m.fetch_max(kb, Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssWatch { max_kb, stop }
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}
