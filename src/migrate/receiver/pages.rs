//! The pages of a reference run at the receiver: read from the guest's disk
//! ([`read_pages`]), written back into QEMU's stream as the `PAGE` records they replaced
//! ([`PageRefs::emit_records`]), and the benchmark of that restore path
//! ([`bench_restore`], `pct-migrate bench-restore`).

use super::super::stream::put_page;
use super::super::wire::{Hello, PageRefs, Role, RunBuilder, WireError, PAGE_SIZE};
use super::RecvError;
use crate::disk::Disk;
use std::time::Instant;

/// Reads `refs`' pages from `disk`; returns the bytes (zeros where unreadable) and, per
/// page, whether it could be read.
pub fn read_pages(disk: &Disk, refs: &PageRefs) -> (Vec<u8>, Vec<bool>) {
    let n = refs.pages.len();
    let mut data = vec![0u8; n * PAGE_SIZE];
    let mut ok = vec![true; n];
    let mut i = 0;
    while i < n {
        // The longest stretch of pages that are contiguous on disk.
        let mut j = i + 1;
        while j < n && refs.pages[j].disk_offset == refs.pages[j - 1].disk_offset + PAGE_SIZE as u64
        {
            j += 1;
        }
        let buf = &mut data[i * PAGE_SIZE..j * PAGE_SIZE];
        if disk.read_exact_at(buf, refs.pages[i].disk_offset).is_err() {
            // Page by page, to find out which ones fail.
            for k in i..j {
                let b = &mut data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
                if disk.read_exact_at(b, refs.pages[k].disk_offset).is_err() {
                    b.fill(0);
                    ok[k] = false;
                }
            }
        }
        i = j;
    }
    (data, ok)
}

pub(super) fn page_views(data: &[u8]) -> Vec<&[u8]> {
    data.chunks(PAGE_SIZE).collect()
}

impl PageRefs {
    /// Writes the run's `PAGE` records into a QEMU stream, as the source sent them: the
    /// first with the block name if `first_named`, the rest as `CONTINUE`. `pages` are the
    /// pages' bytes, in order.
    pub fn emit_records(
        &self,
        block_name: &str,
        pages: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        let malformed = |msg: String| WireError::Malformed {
            frame: "page refs",
            msg,
        };
        if pages.len() != self.pages.len() {
            return Err(malformed(format!(
                "{} pages for a run of {}",
                pages.len(),
                self.pages.len()
            )));
        }
        for (i, (p, data)) in self.pages.iter().zip(pages).enumerate() {
            let name = (i == 0 && self.first_named).then_some(block_name);
            put_page(out, name, p.offset, data).map_err(|e| malformed(e.to_string()))?;
        }
        Ok(())
    }
}

/// What [`bench_restore`] measured.
#[derive(Debug, Clone)]
pub struct RestoreBench {
    pub pages: u64,
    pub runs: usize,
    pub seconds: f64,
    /// Pages whose hash did not match (0 unless the image changed meanwhile).
    pub mismatches: usize,
}

/// The restorer's work for the first `pages` pages of `disk`, in runs of `run_pages` as
/// the sender builds them: read (contiguous ranges in one read), then check the run hash.
/// Only the reading and checking is timed.
pub fn bench_restore(disk: &Disk, pages: u64, run_pages: usize) -> Result<RestoreBench, RecvError> {
    let len = disk.size();
    let pages = pages.min(len / PAGE_SIZE as u64);
    let session = Hello::new(Role::Sender).negotiate(&Hello::new(Role::Receiver))?;
    // Build the runs (hashes of the real bytes), as the sender would.
    let mut b = RunBuilder::new(&session).with_max_pages(run_pages);
    let mut runs = Vec::new();
    let mut buf = vec![0u8; PAGE_SIZE];
    let page = PAGE_SIZE as u64;
    for p in 0..pages {
        disk.read_exact_at(&mut buf, p * page)
            .map_err(|e| RecvError::Io(e.into()))?;
        if let Some(r) = b.push(0, p * page, p > 0, p * page, &buf) {
            runs.push(r);
        }
    }
    runs.extend(b.flush());
    let t = Instant::now();
    let mut mismatches = 0;
    for r in &runs {
        let (data, _) = read_pages(disk, r);
        mismatches += r.verify(&page_views(&data)).len();
    }
    Ok(RestoreBench {
        pages,
        runs: runs.len(),
        seconds: t.elapsed().as_secs_f64(),
        mismatches,
    })
}

impl RestoreBench {
    /// One line, as `pct-migrate bench-restore` prints it.
    pub fn to_text(&self) -> String {
        let (pages, secs) = (self.pages as f64, self.seconds);
        format!(
            "restored {} pages ({:.1} MB) in {} runs in {secs:.3} s: {:.0} MB/s, {} mismatches\n",
            self.pages,
            pages * 4096.0 / 1e6,
            self.runs,
            pages * 4096.0 / secs / 1e6,
            self.mismatches
        )
    }
}
