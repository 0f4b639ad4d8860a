//! Free-page elision seen from the migration stream: which pages of the mapped RAM block
//! were free in the guest's buddy allocator when the map was taken, which of them the sender
//! elided (sent as `ZERO` records instead of their stale bytes), and the re-check with the
//! guest stopped that sends those no longer free (docs/migration.md, "Free-page elision").
//!
//! Only a page's first record is elided: QEMU sends a page again only after the guest
//! wrote it, so it is in use. Any later record of an elided page forwards its real bytes
//! and ends the elision. At the switchover, every page still elided is looked up in the
//! stopped guest's `struct page` array (`is_free_buddy_page`); the ones not free any more are
//! re-sent from the RAM as it is, so the destination differs from the source only in pages
//! free in the stopped source, whose bytes the kernel never reads.

use crate::cachemap::FreePages;
use crate::kernel::Kernel;
use crate::memory::{GuestMemory, Region};
use crate::profile::Profile;
use crate::walk::buddy::{is_poisoned, Buddy};
use crate::walk::WalkError;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

/// One bit per page of the block.
#[derive(Debug, Clone, Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(pages: usize) -> Bits {
        Bits(vec![0; pages.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
    /// Clears bit `i`; returns whether it was set.
    fn take(&mut self, i: usize) -> bool {
        match self.0.get_mut(i / 64) {
            Some(w) => {
                let was = *w >> (i % 64) & 1 == 1;
                *w &= !(1 << (i % 64));
                was
            }
            None => false,
        }
    }
    fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(wi, &w)| {
            (0..64)
                .filter(move |b| w >> b & 1 == 1)
                .map(move |b| wi * 64 + b)
        })
    }
}

/// What elision did, for the summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ElisionReport {
    /// Pages free in the guest when the map was taken.
    pub free_at_map: u64,
    /// Pages whose stale bytes were replaced by a zero page.
    pub pages_elided: u64,
    /// Free pages not elided because they held page poisoning's pattern.
    pub pages_poisoned: u64,
    /// Elided pages that QEMU sent again (the guest wrote them).
    pub pages_sent_again: u64,
    /// Elided pages that the stopped guest no longer had free, re-sent at the switchover.
    pub pages_resent: u64,
    /// Elided pages still free in the stopped guest: the destination holds zeros there.
    pub pages_left_zero: u64,
    /// Time the re-check took, in the downtime.
    #[serde(serialize_with = "as_ms")]
    pub recheck_time: Duration,
    /// The guest's free-page setup, as its kernel says.
    pub init: String,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// Free pages of one RAM block, by block offset.
pub struct FreeMap<'a> {
    kernel: Kernel<'a>,
    regions: Vec<Region>,
    /// Free when the map was taken, and not sent yet.
    free: Bits,
    /// Elided, and not sent since.
    elided: Bits,
    report: ElisionReport,
}

impl<'a> FreeMap<'a> {
    /// The free pages of `free` that lie in the RAM block `mem` maps (through its flat
    /// memory map), `block_len` bytes long.
    pub fn new(
        mem: &'a GuestMemory,
        profile: &'a Profile,
        free: &FreePages,
        block_len: u64,
    ) -> FreeMap<'a> {
        let pages = usize::try_from(block_len / PAGE).unwrap_or(0);
        let regions = mem.regions().to_vec();
        let mut bits = Bits::new(pages);
        let mut count = 0;
        for b in &free.blocks {
            let (first, n) = (b.pfn, 1u64 << b.order);
            for pfn in first..first + n {
                if let Some(i) = gpa_to_offset(&regions, pfn * PAGE)
                    .and_then(|o| usize::try_from(o / PAGE).ok())
                    .filter(|&i| i < pages)
                {
                    bits.set(i);
                    count += 1;
                }
            }
        }
        FreeMap {
            kernel: Kernel {
                mem,
                profile,
                loc: free.loc.clone(),
            },
            regions,
            free: bits,
            elided: Bits::new(pages),
            report: ElisionReport {
                free_at_map: count,
                init: free.init.describe(),
                ..ElisionReport::default()
            },
        }
    }

    /// A `PAGE` record of the block at `offset` holding `data`: whether to send it as a zero
    /// page instead (its first record, free when the map was taken, not poisoned).
    pub fn elide(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some(i) = index(offset) else { return false };
        if self.elided.take(i) {
            self.report.pages_sent_again += 1;
            return false;
        }
        if !self.free.take(i) {
            return false;
        }
        if is_poisoned(data) {
            self.report.pages_poisoned += 1;
            return false;
        }
        self.elided.set(i);
        self.report.pages_elided += 1;
        true
    }

    /// Any other record of the page at `offset` (a `ZERO` record, a reference): the
    /// destination will hold what the record says.
    pub fn forwarded(&mut self, offset: u64) {
        if let Some(i) = index(offset) {
            self.free.take(i);
            if self.elided.take(i) {
                self.report.pages_sent_again += 1;
            }
        }
    }

    /// With the guest stopped: the block offsets of the pages still elided that its buddy
    /// allocator no longer holds free, to be re-sent. An elided page whose frame cannot be
    /// looked up (outside the memory map, a struct page that cannot be read) is re-sent too.
    pub fn recheck(&mut self) -> Result<Vec<u64>, WalkError> {
        let t = Instant::now();
        if self.report.pages_elided == 0 {
            return Ok(Vec::new());
        }
        let buddy = Buddy::new(&self.kernel)?;
        let mut resend = Vec::new();
        let mut left = 0;
        // The free block the last page was found in: the pages come in order, and most
        // of a block's pages are elided together.
        let mut block = 0..0;
        for i in self.elided.ones() {
            let offset = i as u64 * PAGE;
            let Some(pfn) = offset_to_gpa(&self.regions, offset).map(|gpa| gpa / PAGE) else {
                resend.push(offset);
                continue;
            };
            if !block.contains(&pfn) {
                block = match buddy.free_block_of(pfn) {
                    Ok(Some((head, order))) => head..head + (1 << order),
                    // Not free, or unreadable: re-sent.
                    Ok(None) | Err(_) => 0..0,
                };
            }
            if block.contains(&pfn) {
                left += 1;
            } else {
                resend.push(offset);
            }
        }
        self.report.pages_resent = resend.len() as u64;
        self.report.pages_left_zero = left;
        self.report.recheck_time = t.elapsed();
        Ok(resend)
    }

    /// The page at block offset `offset` as the guest's RAM holds it now.
    pub fn page(&self, offset: u64) -> Option<&'a [u8]> {
        self.kernel.mem.live_block_page(offset)
    }

    pub fn report(&self) -> &ElisionReport {
        &self.report
    }
}

fn index(offset: u64) -> Option<usize> {
    usize::try_from(offset / PAGE).ok()
}

fn gpa_to_offset(regions: &[Region], gpa: u64) -> Option<u64> {
    regions
        .iter()
        .find(|r| (r.gpa..r.gpa.saturating_add(r.len)).contains(&gpa))
        .map(|r| r.offset + (gpa - r.gpa))
}

fn offset_to_gpa(regions: &[Region], offset: u64) -> Option<u64> {
    regions
        .iter()
        .find(|r| (r.offset..r.offset.saturating_add(r.len)).contains(&offset))
        .map(|r| r.gpa + (offset - r.offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_regions() {
        let mut b = Bits::new(130);
        b.set(0);
        b.set(129);
        b.set(500); // past the end: ignored
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 129]);
        assert!(b.take(129));
        assert!(!b.take(129));
        let regions = [
            Region {
                gpa: 0,
                offset: 0,
                len: 0xa0000,
            },
            Region {
                gpa: 0x1_0000_0000,
                offset: 0xc000_0000,
                len: 0x4000_0000,
            },
        ];
        assert_eq!(gpa_to_offset(&regions, 0x1_0000_1000), Some(0xc000_1000));
        assert_eq!(offset_to_gpa(&regions, 0xc000_1000), Some(0x1_0000_1000));
        assert_eq!(gpa_to_offset(&regions, 0xa0000), None);
    }
}
