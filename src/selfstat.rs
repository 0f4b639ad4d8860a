//! This process's own memory, as the kernel counts it in `/proc/self/status`: for reports
//! that say what pct itself costs, apart from the guest RAM it maps.

/// Peak resident set size so far (`VmHWM`), in bytes. It counts the pages of guest RAM
/// files pct mapped and read, which the page cache holds anyway: [`rss_anon`] is pct's own
/// memory.
pub fn peak_rss() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Anonymous resident memory now (`RssAnon`), in bytes.
pub fn rss_anon() -> Option<u64> {
    status_bytes("RssAnon:")
}

/// A `kB` field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
