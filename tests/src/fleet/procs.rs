//! The services as real processes: spawned from their binaries, killed with SIGKILL,
//! restarted, and their CPU time read from `/proc`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) of one process, all its threads; `None` once it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) … utime(14) stime(15), so indexes 11 and 12 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Parent process id.
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every process whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| parent_pid(*pid) == Some(parent))
        .collect()
}

/// The whole machine's busy CPU time from `/proc/stat`, followed across calls.
#[derive(Debug, Default, Clone)]
pub struct MachineCpu {
    /// (busy, total) ticks at the previous call.
    last: Option<(u64, u64)>,
}

impl MachineCpu {
    /// Cores busy on average since the previous call (`None` on the first, or when
    /// `/proc/stat` cannot be read). Busy is every state but idle and iowait.
    pub fn busy_cores(&mut self) -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let (busy, total) = parse_proc_stat_busy(&stat)?;
        let cores = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count();
        let before = self.last.replace((busy, total));
        let (busy0, total0) = before?;
        let dt = total.checked_sub(total0).filter(|d| *d > 0)?;
        Some(busy.saturating_sub(busy0) as f64 / dt as f64 * cores as f64)
    }
}

/// (busy, total) ticks of the `cpu` line of `/proc/stat`: user nice system idle iowait irq
/// softirq steal (guest time is already in user).
pub fn parse_proc_stat_busy(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle, total))
}

/// CPU seconds accumulated by a changing set of processes: each pid's last reading counts,
/// so a process that exits keeps what it used up to its last sample.
#[derive(Debug, Default, Clone)]
pub struct CpuAccount {
    /// pid → (CPU seconds when first seen, latest CPU seconds).
    seen: HashMap<u32, (f64, f64)>,
}

impl CpuAccount {
    /// Records `pid`'s CPU time now. With `from_zero`, a process first seen here counts from
    /// its start (one this program started); otherwise from now (one already running).
    pub fn sample(&mut self, pid: u32, from_zero: bool) {
        if let Some(now) = cpu_seconds(pid) {
            let entry = self
                .seen
                .entry(pid)
                .or_insert((if from_zero { 0.0 } else { now }, now));
            entry.1 = now;
        }
    }

    /// CPU seconds used since each process was first seen.
    pub fn total(&self) -> f64 {
        self.seen.values().map(|(first, last)| last - first).sum()
    }
}

/// A service binary and how it is started.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Short name: `ingest`, `sink`, `evaluator`, `query-api`.
    pub name: &'static str,
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where `/readyz` answers.
    pub admin: SocketAddr,
    pub log: PathBuf,
}

/// A running service, restarted after a kill; killed when dropped.
#[derive(Debug)]
pub struct Service {
    pub spec: ServiceSpec,
    child: Option<Child>,
    pub cpu: CpuAccount,
    pub restarts: u32,
}

impl Service {
    /// Starts the process and waits until `/readyz` answers 200.
    pub async fn start(spec: ServiceSpec, ready_within: Duration) -> Result<Self> {
        let mut service = Service {
            spec,
            child: None,
            cpu: CpuAccount::default(),
            restarts: 0,
        };
        service.spawn()?;
        service.await_ready(ready_within).await?;
        Ok(service)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("opening {}", self.spec.log.display()))?;
        let child = Command::new(&self.spec.binary)
            .args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.spec.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until `/readyz` answers 200; fails early if the process exited.
    pub async fn await_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{} exited during start-up ({status}); log: {}\n{}",
                        self.spec.name,
                        self.spec.log.display(),
                        tail(&self.spec.log, 20)
                    );
                }
            }
            if let Ok((200, _)) = crate::http_get(self.spec.admin, "/readyz").await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} not ready within {within:?}; log: {}\n{}",
                    self.spec.name,
                    self.spec.log.display(),
                    tail(&self.spec.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Process id while running.
    pub fn pid(&mut self) -> Option<u32> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    /// Records the process's CPU time.
    pub fn sample_cpu(&mut self) {
        if let Some(pid) = self.pid() {
            self.cpu.sample(pid, true);
        }
    }

    /// SIGKILL, as a crash would: no flush, no goodbye to the group.
    pub fn kill(&mut self) {
        self.sample_cpu();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again after a kill and waits until it is ready.
    pub async fn restart(&mut self, within: Duration) -> Result<()> {
        self.kill();
        self.restarts += 1;
        self.spawn()?;
        self.await_ready(within).await
    }

    /// SIGTERM and a wait of at most `within` for the exit; SIGKILL after that. Returns
    /// whether it exited by itself.
    pub async fn terminate(&mut self, within: Duration) -> bool {
        self.sample_cpu();
        let Some(pid) = self.pid() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.pid().is_none() {
                self.child = None;
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        false
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `lines` lines of a file, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("({err})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_time_and_parent() {
        let me = std::process::id();
        // Burn a little CPU so the figure is not zero.
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_seconds(me).unwrap() > 0.0);
        let parent = parent_pid(me).unwrap();
        assert!(children_of(parent).contains(&me));
        assert_eq!(cpu_seconds(u32::MAX - 1), None);
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 20 800 50 3 2 0 0 0\ncpu0 50 2 10 400 25 1 1 0 0 0\n";
        assert_eq!(parse_proc_stat_busy(stat), Some((130, 980)));
        assert_eq!(parse_proc_stat_busy("cpu0 1 2 3\n"), None);
        assert_eq!(parse_proc_stat_busy("cpu  1 x 3 4 5 6 7 8\n"), None);
    }
}
