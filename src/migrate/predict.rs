//! `pct-migrate --dry-run`: the forensic report of the source guest as it is now, and a
//! prediction of what the first pass of a migration would put on the link, stock QEMU
//! against pct.
//!
//! The first pass of precopy sends every page once: QEMU as a `ZERO` record if the page is
//! all zeros, else as a `PAGE` record. pct sends references for the pages the cache map
//! covers and everything else zstd-compressed. The prediction compresses the rest as the
//! sender would; the other costs are the record and reference sizes below.

use super::refmap::RefMap;
use super::sender::SenderOptions;
use crate::disk::Disk;
use crate::introspect::{scan, ScanOptions};
use crate::memory::GuestMemory;
use crate::profile::Profile;
use crate::report::{savings, ScanReport};
use crate::walk::buddy::is_poisoned;
use anyhow::{anyhow, Result};
use serde::Serialize;
use std::fmt::Write;

const PAGE: u64 = 4096;
/// Header of a RAM record in QEMU's stream: `be64 offset | flags`.
const RECORD_HEADER: u64 = 8;
/// A `PAGE` record: its header and the page (4104 bytes).
const STOCK_PAGE_RECORD: u64 = RECORD_HEADER + PAGE;
/// A `ZERO` record: its header and the one fill byte (9 bytes).
const STOCK_ZERO_RECORD: u64 = RECORD_HEADER + 1;
/// pct's bytes per teleported page in a run of 32: about one byte of RAM offset delta, one
/// of disk offset delta, and its share of the run's header and 16-byte hash (measured:
/// 2.9–3.0 bytes, docs/migration.md).
const REF_BYTES_PER_PAGE: u64 = 3;
/// `ZERO` records travel in zstd-compressed data frames, where runs of them (9 bytes each,
/// nearly all alike) shrink to about one byte per hundred pages.
const ZERO_PAGES_PER_WIRE_BYTE: u64 = 100;
/// Bytes of the rest compressed at a time (the sender compresses 256 KiB batches; larger
/// chunks change the ratio by little and are faster).
const COMPRESS_CHUNK: usize = 1 << 20;

/// What the first pass of a migration would cost, by page census of the guest's RAM now.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub pages_nonzero: u64,
    pub pages_zero: u64,
    /// Non-zero pages the cache map covers.
    pub pages_teleportable: u64,
    /// Non-zero pages free in the guest's buddy allocator (not holding page poisoning's
    /// pattern): sent as zero pages with free-page elision.
    pub pages_elidable: u64,
    pub stock_first_pass_bytes: u64,
    pub pct_first_pass_bytes: u64,
    /// pct / stock.
    pub ratio: f64,
}

/// The forensic report and the prediction.
#[derive(Debug, Serialize)]
pub struct DryRun {
    pub report: ScanReport,
    pub prediction: Prediction,
}

fn compressed_len(data: &[u8], level: i32) -> u64 {
    zstd::bulk::compress(data, level).map_or(data.len(), |z| z.len()) as u64
}

/// Scans the guest (`block`: its main RAM block) and predicts the first pass, with free
/// pages elided if `free_elision`.
pub fn dry_run(
    mem: &GuestMemory,
    profile: &Profile,
    disk: Option<&Disk>,
    block: &str,
    free_elision: bool,
) -> Result<DryRun> {
    let opts = ScanOptions {
        cross_check: true,
        free_pages: true,
        ..ScanOptions::default()
    };
    let (map, report) = scan(mem, profile, disk, opts).map_err(|e| anyhow!("{e}"))?;
    let free = match (&map.free, free_elision) {
        (Some(f), true) => f.blocks.as_slice(),
        _ => &[],
    };
    let is_free = |pfn: u64| {
        let i = free.partition_point(|b| b.pfn <= pfn);
        i > 0 && pfn < free[i - 1].pfn + (1 << free[i - 1].order)
    };
    let mut elide = 0u64;
    let mut refmap = RefMap::new(block, &map, mem.regions());
    let level = SenderOptions::default().zstd_level.unwrap_or(1);
    let (mut nonzero, mut zero, mut teleport) = (0u64, 0u64, 0u64);
    let mut rest = Vec::with_capacity(COMPRESS_CHUNK);
    let mut rest_wire = 0u64;
    for r in mem.regions() {
        for p in 0..r.len / PAGE {
            let Ok(page) = mem.slice(r.gpa + p * PAGE, PAGE) else {
                continue;
            };
            if page.iter().all(|&b| b == 0) {
                zero += 1;
                continue;
            }
            nonzero += 1;
            if refmap.lookup(r.offset + p * PAGE).is_some() {
                teleport += 1;
            } else if is_free((r.gpa + p * PAGE) / PAGE) && !is_poisoned(page) {
                elide += 1;
            } else {
                rest.extend_from_slice(page);
                if rest.len() >= COMPRESS_CHUNK {
                    rest_wire += compressed_len(&rest, level);
                    rest.clear();
                }
            }
        }
    }
    rest_wire += compressed_len(&rest, level);
    let stock = nonzero * STOCK_PAGE_RECORD + zero * STOCK_ZERO_RECORD;
    let pct = rest_wire + teleport * REF_BYTES_PER_PAGE + (zero + elide) / ZERO_PAGES_PER_WIRE_BYTE;
    let prediction = Prediction {
        pages_nonzero: nonzero,
        pages_zero: zero,
        pages_teleportable: teleport,
        pages_elidable: elide,
        stock_first_pass_bytes: stock,
        pct_first_pass_bytes: pct,
        ratio: pct as f64 / stock.max(1) as f64,
    };
    Ok(DryRun { report, prediction })
}

impl DryRun {
    /// The report's JSON with the prediction under `prediction`.
    pub fn to_json(&self) -> serde_json::Result<serde_json::Value> {
        let mut v = serde_json::to_value(&self.report)?;
        v["prediction"] = serde_json::to_value(&self.prediction)?;
        Ok(v)
    }

    /// The report's text, then the prediction and the transfer times at the report's
    /// reference rates ([`savings`]: the time not sending the bytes saves is the time
    /// sending them takes).
    pub fn to_text(&self) -> String {
        let p = &self.prediction;
        let (stock, pct) = (p.stock_first_pass_bytes, p.pct_first_pass_bytes);
        let mut t = self.report.to_text();
        let _ = writeln!(t, "\npredicted migration (first pass, guest as it is now):");
        let _ = writeln!(
            t,
            "  stock QEMU   {:8.1} MB  ({} pages sent, {} zero)",
            stock as f64 / 1e6,
            p.pages_nonzero,
            p.pages_zero
        );
        let _ = writeln!(
            t,
            "  pct          {:8.1} MB  ({} pages teleported, {} free pages elided, the rest zstd-compressed): {:.3} x",
            pct as f64 / 1e6,
            p.pages_teleportable,
            p.pages_elidable,
            pct as f64 / stock.max(1) as f64
        );
        for (s, q) in savings(stock).iter().zip(savings(pct)) {
            let _ = writeln!(
                t,
                "  at {:>4} Mbit/s: {:6.1} s -> {:6.1} s",
                s.mbit_per_s, s.seconds_saved, q.seconds_saved
            );
        }
        t
    }
}
