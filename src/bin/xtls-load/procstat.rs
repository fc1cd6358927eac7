//! CPU time and memory of another process, from `/proc` (Linux).

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ: 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

/// A snapshot of one process's resource use.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    /// User plus system CPU seconds since the process started.
    pub cpu_s: f64,
    /// Resident set size now, in KiB.
    pub rss_kib: u64,
    /// Peak resident set size, in KiB.
    pub peak_rss_kib: u64,
}

/// Reads the usage of `pid`; `None` when there is no such process (or no `/proc`).
pub fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Some(Usage {
        cpu_s: ticks as f64 / USER_HZ,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let u = usage(std::process::id()).expect("/proc is there");
        assert!(u.rss_kib > 0 && u.peak_rss_kib >= u.rss_kib);
        assert!(u.cpu_s >= 0.0);
    }
}
