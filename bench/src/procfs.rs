//! What the kernel says about a target: its processes, their CPU time and their memory.
//!
//! CPU time is each thread's run time from `/proc/PID/task/TID/schedstat` (nanoseconds), summed
//! over every thread of every process of the target; memory is the proportional set size of anonymous and
//! shared memory from `/proc/PID/smaps_rollup` (file pages left out). Uses only std.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// `root` and every process below it (nginx's workers under its master, for instance).
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(&entry.path().join("stat")).and_then(|f| f.get(1)?.parse().ok()) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

/// The fields of a `stat` file after the command name (field 3, the state, comes first).
fn stat_fields(path: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// One thread's run time: schedstat's first field, or utime + stime from `stat` in clock
/// ticks (assumed 100 Hz) where the kernel has no schedstat.
fn thread_run_ns(task: &Path) -> Option<u64> {
    if let Ok(text) = std::fs::read_to_string(task.join("schedstat")) {
        return text.split_whitespace().next()?.parse().ok();
    }
    let f = stat_fields(&task.join("stat"))?;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000_000)
}

/// The run time of every thread of `pids` at one moment.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot(HashMap<u32, u64>);

impl CpuSnapshot {
    /// Reads every thread of every process in `pids`.
    pub fn take(pids: &[u32]) -> Self {
        let mut threads = HashMap::new();
        for pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let tid = task.file_name().to_str().and_then(|s| s.parse::<u32>().ok());
                if let (Some(tid), Some(ns)) = (tid, thread_run_ns(&task.path())) {
                    threads.insert(tid, ns);
                }
            }
        }
        Self(threads)
    }

    /// CPU time used since `earlier`: threads started in between count from zero; a thread
    /// that ended in between loses what it used (wsgate's and nginx's threads live as long as
    /// the process).
    pub fn since(&self, earlier: &CpuSnapshot) -> Duration {
        let ns = self
            .0
            .iter()
            .map(|(tid, now)| now.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum();
        Duration::from_nanos(ns)
    }
}

/// The whole machine's CPU time so far, in clock ticks: the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineCpu {
    /// Ticks spent running anything (user, nice, system, irq, softirq) or taken by the
    /// hypervisor (steal).
    pub busy: u64,
    /// Ticks the hypervisor gave to another guest while this one wanted to run.
    pub steal: u64,
    /// All ticks, idle and iowait included.
    pub total: u64,
}

impl MachineCpu {
    /// Reads `/proc/stat`; `None` where there is none.
    pub fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Reads each CPU's line of `/proc/stat` (`cpu0`, `cpu1`, …), in order; empty where there
    /// is none. Says which side of a run was saturated: the targets' CPU or the load's.
    pub fn read_each() -> Vec<Self> {
        std::fs::read_to_string("/proc/stat")
            .map(|text| Self::parse_each(&text))
            .unwrap_or_default()
    }

    /// The `cpu` line of a `/proc/stat` text: user nice system idle iowait irq softirq steal.
    fn parse(text: &str) -> Option<Self> {
        Self::parse_line(text.lines().find(|l| l.starts_with("cpu "))?)
    }

    /// The per-CPU lines of a `/proc/stat` text.
    fn parse_each(text: &str) -> Vec<Self> {
        text.lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .filter_map(Self::parse_line)
            .collect()
    }

    /// One `cpu…` line's ticks.
    fn parse_line(line: &str) -> Option<Self> {
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = <[u64; 8]>::try_from(f).ok()?;
        let busy = user + nice + system + irq + softirq + steal;
        Some(Self {
            busy,
            steal,
            total: busy + idle + iowait,
        })
    }

    /// Per cent of all CPU time since `earlier` that was busy, and that was stolen.
    pub fn since(&self, earlier: &MachineCpu) -> (f64, f64) {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        (
            100.0 * self.busy.saturating_sub(earlier.busy) as f64 / total,
            100.0 * self.steal.saturating_sub(earlier.steal) as f64 / total,
        )
    }
}

/// The proportional set size of `pids` together without file-backed pages, KiB: the anonymous
/// and shared-memory share (`Pss_Anon` + `Pss_Shmem` of `/proc/PID/smaps_rollup`).
///
/// File pages are left out because a binary's code is shared with every other process that
/// maps the same file: a test or a second target starting meanwhile halves its share and made
/// the growth over a few hundred connections come out as zero. Connection state is heap, i.e.
/// anonymous memory, in every target measured.
pub fn pss_kib(pids: &[u32]) -> Result<u64> {
    let mut total = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/smaps_rollup");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        total += rollup_field(&text, "Pss_Anon:").with_context(|| format!("no Pss_Anon line in {path}"))?;
        total += rollup_field(&text, "Pss_Shmem:").with_context(|| format!("no Pss_Shmem line in {path}"))?;
    }
    Ok(total)
}

/// The KiB value of the `smaps_rollup` line that starts with `key`.
fn rollup_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
}

/// This process's soft limit on open files.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_process_uses_cpu_and_memory() {
        let me = std::process::id();
        let before = CpuSnapshot::take(&[me]);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert_ne!(x, 1);
        assert!(CpuSnapshot::take(&[me]).since(&before) > Duration::ZERO);
        let before = pss_kib(&[me]).unwrap();
        let held = vec![1u8; 8 << 20];
        std::hint::black_box(&held);
        assert!(
            pss_kib(&[me]).unwrap() >= before + 7 * 1024,
            "8 MiB of heap not counted"
        );
        drop(held);
        assert_eq!(process_tree(me)[0], me);
    }

    #[test]
    fn the_machine_is_busy_while_this_test_spins() {
        let before = MachineCpu::read().unwrap();
        let each_before = MachineCpu::read_each();
        let until = std::time::Instant::now() + Duration::from_millis(300);
        let mut x = 0u64;
        while std::time::Instant::now() < until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let (busy, steal) = MachineCpu::read().unwrap().since(&before);
        // One of the machine's CPUs spun the whole time.
        let stat = std::fs::read_to_string("/proc/stat").unwrap();
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count() as f64;
        assert!(busy >= 80.0 / cpus && busy <= 100.0, "{busy} % busy");
        assert!((0.0..=busy).contains(&steal), "{steal} % stolen");
        // Each CPU read on its own: one of them or several in turn ran the spinning thread.
        let each: Vec<f64> = MachineCpu::read_each()
            .iter()
            .zip(&each_before)
            .map(|(now, then)| now.since(then).0)
            .collect();
        assert_eq!(each.len() as f64, cpus);
        let spun: f64 = each.iter().sum();
        assert!(spun >= 80.0, "the CPUs were {each:?} % busy");
    }

    #[test]
    fn a_proc_stat_line_is_read_field_by_field() {
        let text = "cpu  10 1 5 80 2 1 1 3 0 0\ncpu0 5 0 2 40 1 0 0 1 0 0\n";
        let m = MachineCpu::parse(text).unwrap();
        assert_eq!(
            m,
            MachineCpu {
                busy: 21,
                steal: 3,
                total: 103
            }
        );
        let later = MachineCpu {
            busy: 31,
            steal: 3,
            total: 123,
        };
        assert_eq!(later.since(&m), (50.0, 0.0));
        assert_eq!(MachineCpu::parse("cpu 1 2 3\n"), None);
        let each = MachineCpu::parse_each(text);
        assert_eq!(
            each,
            vec![MachineCpu {
                busy: 8,
                steal: 1,
                total: 49
            }]
        );
    }
}
