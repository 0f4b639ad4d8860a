//! The forensic dry-run report: what a guest's RAM holds, how much of its page cache
//! the destination could restore from disk, what that saves on a link, and (with a
//! disk image) whether every mapped run really matches the disk. Terminal text for
//! people, JSON for programs.

use crate::cachemap::{CacheMap, Exclusions};
use crate::walk::fs::CacheWalk;
use crate::walk::page::PageState;
use crate::walk::page_scan::{Census, FreeBlock};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Serialize)]
pub struct ScanReport {
    pub source: String,
    pub kernel: KernelSummary,
    pub ram_bytes: u64,
    pub census: Option<Census>,
    /// What the kernel makes of free pages' bytes (with the census).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_page_init: Option<crate::walk::buddy::FreePageInit>,
    /// Page cache found by the tree walk, by page state, in bytes.
    pub page_cache: BTreeMap<String, u64>,
    /// Large folios the walk found, by filesystem, order and state.
    pub large_folios: Vec<FolioCount>,
    pub restorable_bytes: u64,
    pub runs: usize,
    pub filesystems: Vec<FsSummary>,
    pub top_files: Vec<FileSummary>,
    pub savings: Vec<Saving>,
    pub excluded: Exclusions,
    /// Page-flag numbers the guest's VMCOREINFO gave differently from the profile (they
    /// were used).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pageflag_overrides: Vec<crate::kernel::overrides::PageflagOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_check: Option<CrossCheck>,
    pub problems: Vec<String>,
    pub timings_ms: BTreeMap<String, f64>,
    /// Anonymous memory of this process when the report was made (KiB): what pct
    /// itself uses beyond the mapped guest image.
    pub rss_anon_kib: Option<u64>,
}

/// `RssAnon` of this process, in KiB.
pub fn rss_anon_kib() -> Option<u64> {
    crate::selfstat::rss_anon().map(|b| b / 1024)
}

#[derive(Debug, Serialize)]
pub struct KernelSummary {
    pub release: Option<String>,
    pub build_id: Option<String>,
    pub located_by: crate::kernel::LocatedBy,
    pub kaslr_offset: String,
}

#[derive(Debug, Serialize)]
pub struct FsSummary {
    pub fs_type: String,
    pub dev: String,
    pub cached_bytes: u64,
    pub clean_bytes: u64,
    pub restorable_bytes: u64,
}

/// How many large folios of one order and state a filesystem's page cache holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct FolioCount {
    pub fs_type: String,
    pub dev: String,
    pub order: u8,
    pub state: String,
    pub folios: u64,
}

/// Counts the walk's large folios (each is reported once, at its first page).
pub fn large_folios(walk: &CacheWalk) -> Vec<FolioCount> {
    let mut n: BTreeMap<(usize, u8, &'static str), u64> = BTreeMap::new();
    for ic in &walk.inodes {
        for p in ic.pages.iter().filter(|p| p.order > 0) {
            if p.index % (1u64 << p.order) == 0 {
                *n.entry((ic.sb, p.order, p.state.name())).or_default() += 1;
            }
        }
    }
    n.into_iter()
        .map(|((sb, order, state), folios)| FolioCount {
            fs_type: walk.super_blocks[sb].fs_type.clone(),
            dev: walk.super_blocks[sb].id.clone(),
            order,
            state: state.to_owned(),
            folios,
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct FileSummary {
    pub dev: String,
    pub ino: Option<u64>,
    pub path: Option<String>,
    pub restorable_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Saving {
    pub mbit_per_s: u64,
    pub seconds_saved: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Verify {
    pub runs: u64,
    pub bytes: u64,
    pub matching_pages: u64,
    pub mismatching_pages: u64,
    pub unreadable_runs: u64,
    /// The first few mismatching pages: (gpa, disk offset).
    pub first_mismatches: Vec<(u64, u64)>,
}

#[derive(Debug, Serialize)]
pub struct CrossCheck {
    pub tree_pages: usize,
    pub linear_pages: usize,
    pub only_in_tree: usize,
    pub only_in_linear_scan: usize,
}

impl CrossCheck {
    pub fn agrees(&self) -> bool {
        self.only_in_tree == 0 && self.only_in_linear_scan == 0
    }
}

/// Summarises a walk and its map.
pub fn summarise(
    walk: &CacheWalk,
    map: &CacheMap,
) -> (BTreeMap<String, u64>, Vec<FsSummary>, Vec<FileSummary>) {
    let mut by_state = BTreeMap::new();
    let mut fs: Vec<FsSummary> = walk
        .super_blocks
        .iter()
        .map(|s| FsSummary {
            fs_type: s.fs_type.clone(),
            dev: s.id.clone(),
            cached_bytes: 0,
            clean_bytes: 0,
            restorable_bytes: 0,
        })
        .collect();
    for ic in &walk.inodes {
        for p in &ic.pages {
            *by_state.entry(p.state.name().to_owned()).or_insert(0) += 4096;
            fs[ic.sb].cached_bytes += 4096;
            if p.state == PageState::Clean {
                fs[ic.sb].clean_bytes += 4096;
            }
        }
    }
    let mut files: BTreeMap<(String, Option<u64>), (Option<String>, u64)> = BTreeMap::new();
    for r in &map.runs {
        if let Some(f) = walk
            .super_blocks
            .iter()
            .position(|s| s.id == r.dev && s.bdev != 0)
        {
            fs[f].restorable_bytes += r.len;
        }
        let e = files
            .entry((r.dev.clone(), r.ino))
            .or_insert((r.path.clone(), 0));
        e.1 += r.len;
    }
    fs.retain(|f| f.cached_bytes > 0);
    fs.sort_by_key(|f| std::cmp::Reverse(f.cached_bytes));
    let mut top: Vec<FileSummary> = files
        .into_iter()
        .map(|((dev, ino), (path, bytes))| FileSummary {
            dev,
            ino,
            path: if ino.is_none() {
                Some("(block device cache: metadata)".into())
            } else {
                path
            },
            restorable_bytes: bytes,
        })
        .collect();
    top.sort_by_key(|f| std::cmp::Reverse(f.restorable_bytes));
    top.truncate(10);
    (by_state, fs, top)
}

/// How many page frames of the free blocks `free` hold bytes other than zero (a frame
/// that cannot be read counts as not zero: it is not known to be).
pub fn free_not_zero(mem: &crate::memory::GuestMemory, free: &[FreeBlock]) -> u64 {
    free.iter()
        .flat_map(|b| b.pfn..b.pfn + (1 << b.order))
        .filter(|&pfn| mem.page(pfn).map_or(true, |p| p.iter().any(|&x| x != 0)))
        .count() as u64
}

/// Seconds that not sending `bytes` saves at each reference rate.
pub fn savings(bytes: u64) -> Vec<Saving> {
    [50, 100, 1000]
        .into_iter()
        .map(|mbit| Saving {
            mbit_per_s: mbit,
            seconds_saved: bytes as f64 * 8.0 / (mbit as f64 * 1e6),
        })
        .collect()
}

/// Byte-compares every run with the guest's disk.
pub fn verify(
    mem: &crate::memory::GuestMemory,
    map: &CacheMap,
    disk: &crate::disk::Disk,
) -> Verify {
    let mut v = Verify::default();
    let mut buf = vec![0u8; 1 << 20];
    for r in &map.runs {
        v.runs += 1;
        v.bytes += r.len;
        let mut done = 0;
        while done < r.len {
            let n = (r.len - done).min(buf.len() as u64) as usize;
            let (Ok(m), Ok(())) = (
                mem.slice(r.gpa + done, n as u64),
                disk.read_exact_at(&mut buf[..n], r.disk_offset + done),
            ) else {
                v.unreadable_runs += 1;
                break;
            };
            for (i, (a, b)) in m.chunks(4096).zip(buf[..n].chunks(4096)).enumerate() {
                if a == b {
                    v.matching_pages += 1;
                } else {
                    v.mismatching_pages += 1;
                    if v.first_mismatches.len() < 10 {
                        let o = done + i as u64 * 4096;
                        v.first_mismatches.push((r.gpa + o, r.disk_offset + o));
                    }
                }
            }
            done += n as u64;
        }
    }
    v
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

impl ScanReport {
    /// The terminal table.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "pct scan of {}", self.source);
        let _ = writeln!(
            s,
            "kernel {} (build-id {}), located by {:?}, KASLR offset {}",
            self.kernel.release.as_deref().unwrap_or("?"),
            self.kernel.build_id.as_deref().unwrap_or("?"),
            self.kernel.located_by,
            self.kernel.kaslr_offset
        );
        for o in &self.pageflag_overrides {
            let _ = writeln!(
                s,
                "page flag from the guest's VMCOREINFO overrides the profile: {o}"
            );
        }
        let _ = writeln!(s, "\nRAM {:>12}", human(self.ram_bytes));
        if let Some(c) = &self.census {
            let _ = match &c.free_unknown {
                Some(why) => writeln!(s, "  {:<12} {:>12}  ({why})", "free", "unknown"),
                None => writeln!(
                    s,
                    "  {:<12} {:>12}  ({} not zero: what eliding free pages saves)",
                    "free",
                    human(c.free * 4096),
                    human(c.free_not_zero * 4096)
                ),
            };
            if let Some(init) = &self.free_page_init {
                let _ = writeln!(s, "  {:<12} {}", "", init.describe());
            }
            for (name, n) in [
                ("anonymous", c.anon),
                ("file-backed", c.file),
                ("slab", c.slab),
                ("other", c.other),
            ] {
                let _ = writeln!(s, "  {name:<12} {:>12}", human(n * 4096));
            }
        }
        let _ = writeln!(s, "\npage cache (tree walk)");
        for (k, v) in &self.page_cache {
            let _ = writeln!(s, "  {k:<12} {:>12}", human(*v));
        }
        let _ = writeln!(
            s,
            "  restorable   {:>12}  in {} runs",
            human(self.restorable_bytes),
            self.runs
        );
        if !self.large_folios.is_empty() {
            let _ = writeln!(
                s,
                "\nlarge folios (filesystem, device, order, state: count)"
            );
            for f in &self.large_folios {
                let _ = writeln!(
                    s,
                    "  {:<12} {:<10} order {:<2} {:<14} {:>8}",
                    f.fs_type, f.dev, f.order, f.state, f.folios
                );
            }
        }
        let _ = writeln!(
            s,
            "\n{:<12} {:<10} {:>12} {:>12} {:>12}",
            "filesystem", "device", "cached", "clean", "restorable"
        );
        for f in &self.filesystems {
            let _ = writeln!(
                s,
                "{:<12} {:<10} {:>12} {:>12} {:>12}",
                f.fs_type,
                f.dev,
                human(f.cached_bytes),
                human(f.clean_bytes),
                human(f.restorable_bytes)
            );
        }
        let _ = writeln!(s, "\ntop files by restorable bytes");
        for f in &self.top_files {
            let name = f
                .path
                .clone()
                .unwrap_or_else(|| format!("inode {}", f.ino.unwrap_or(0)));
            let _ = writeln!(s, "  {:>12}  {}:{}", human(f.restorable_bytes), f.dev, name);
        }
        let mut ex: Vec<String> = self
            .excluded
            .by_state
            .iter()
            .map(|(k, v)| format!("{k} {}", human(v * 4096)))
            .collect();
        ex.extend(
            self.excluded
                .by_block_map
                .iter()
                .map(|(k, v)| format!("{k} {}", human(v * 4096))),
        );
        if self.excluded.unsupported_fs > 0 {
            ex.push(format!(
                "unsupported filesystem {}",
                human(self.excluded.unsupported_fs * 4096)
            ));
        }
        let _ = writeln!(
            s,
            "\nnot restorable: {}",
            if ex.is_empty() {
                "nothing".into()
            } else {
                ex.join(", ")
            }
        );
        let _ = writeln!(
            s,
            "\na migration would not send {}:",
            human(self.restorable_bytes)
        );
        for v in &self.savings {
            let _ = writeln!(
                s,
                "  {:>5} Mbit/s  {:>8.1} s less",
                v.mbit_per_s, v.seconds_saved
            );
        }
        if let Some(v) = &self.verify {
            let _ = writeln!(
                s,
                "\nverify against the disk: {} pages match, {} mismatch, {} runs unreadable{}",
                v.matching_pages,
                v.mismatching_pages,
                v.unreadable_runs,
                if v.mismatching_pages == 0 && v.unreadable_runs == 0 {
                    " — all runs match"
                } else {
                    ""
                }
            );
        }
        if let Some(c) = &self.cross_check {
            let _ = writeln!(
                s,
                "cross-check (linear struct page scan): {} pages vs {} from the tree walk{}",
                c.linear_pages,
                c.tree_pages,
                if c.agrees() {
                    " — agree".to_owned()
                } else {
                    format!(
                        " — {} only in tree, {} only in scan",
                        c.only_in_tree, c.only_in_linear_scan
                    )
                }
            );
        }
        for p in &self.problems {
            let _ = writeln!(s, "warning: {p}");
        }
        let order = ["locate", "walk", "map", "cross_check", "verify", "total"];
        let t: Vec<String> = order
            .iter()
            .filter_map(|k| Some(format!("{k} {:.1} ms", self.timings_ms.get(*k)?)))
            .collect();
        let _ = writeln!(s, "\ntime: {}", t.join(", "));
        if let Some(kib) = self.rss_anon_kib {
            let _ = writeln!(
                s,
                "memory: {} anonymous (beyond the mapped guest image)",
                human(kib * 1024)
            );
        }
        s
    }
}
