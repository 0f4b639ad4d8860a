//! `struct page`: `pfn_to_page`/`page_to_pfn` over the vmemmap array, the page-cache
//! state of a page as its flags, `mapping` and `index` tell it, and the size of a large
//! folio (`folio_nr_pages`), found from its tail pages and cross-checked.

use super::{at_va, need, FieldError, LeSlice, WalkError};
use crate::kernel::Kernel;

/// Bit numbers of the page flags pct reads, from the profile's `enum pageflags`.
#[derive(Debug, Clone, Copy)]
pub struct PageFlags {
    pub locked: u32,
    pub uptodate: u32,
    pub dirty: u32,
    pub writeback: u32,
    pub head: u32,
    pub swapbacked: u32,
}

impl PageFlags {
    pub fn from_profile(p: &crate::profile::Profile) -> Result<PageFlags, WalkError> {
        let bit = |n: &str| {
            p.pageflag(n)
                .ok_or_else(|| WalkError::ProfileLacks(format!("enum pageflags {n}")))
        };
        Ok(PageFlags {
            locked: bit("PG_locked")?,
            uptodate: bit("PG_uptodate")?,
            dirty: bit("PG_dirty")?,
            writeback: bit("PG_writeback")?,
            head: bit("PG_head")?,
            swapbacked: bit("PG_swapbacked")?,
        })
    }
}

/// What a page-cache page is, for migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PageState {
    /// Up to date, not dirty, not under writeback, not locked: the disk holds its bytes.
    Clean,
    Dirty,
    Writeback,
    Locked,
    NotUptodate,
    /// shmem/tmpfs: swap-backed, never on a disk.
    Shmem,
    /// `page->mapping`/`index` do not point back to where the tree holds it (torn read),
    /// or a large folio whose size its tail pages, its order and the tree do not agree on.
    Inconsistent,
    /// Block-device cache whose buffers are dirty, locked or held by the journal (jbd2
    /// changes metadata in memory before the page is marked dirty), or whose buffer
    /// state cannot be read: the disk may not hold these bytes.
    BuffersBusy,
}

impl PageState {
    /// snake_case name, as in JSON reports.
    pub fn name(self) -> &'static str {
        match self {
            PageState::Clean => "clean",
            PageState::Dirty => "dirty",
            PageState::Writeback => "writeback",
            PageState::Locked => "locked",
            PageState::NotUptodate => "not_uptodate",
            PageState::Shmem => "shmem",
            PageState::Inconsistent => "inconsistent",
            PageState::BuffersBusy => "bdev_buffers_unverified",
        }
    }
}

/// Reads `struct page` fields.
pub struct Pages {
    vmemmap: u64,
    size: u64,
    flags_off: u64,
    mapping_off: u64,
    index_off: u64,
    pub bits: PageFlags,
    max_pfn: u64,
    pub folio: FolioLayout,
}

/// Where a large folio's size is recorded besides its tail pages, as byte offsets from
/// the head's `struct page` (the first tail page's fields, as `struct folio` names them).
#[derive(Debug, Clone, Copy, Default)]
pub struct FolioLayout {
    /// `page.compound_head`: every tail page holds its head's address | 1.
    pub compound_head: Option<u64>,
    /// A byte holding the order: `folio._folio_order` (5.16–6.5), `page[1].compound_order`
    /// (older), the low byte of `folio._flags_1` (≥ 6.6).
    pub order: Option<u64>,
    /// `folio._folio_nr_pages` (u32, 64-bit kernels 5.18–6.14).
    pub nr_pages: Option<u64>,
}

impl FolioLayout {
    pub fn from_profile(p: &crate::profile::Profile) -> FolioLayout {
        let size = p.size_of("page").unwrap_or(0);
        FolioLayout {
            compound_head: p.offset("page", "compound_head"),
            order: p
                .offset("folio", "_folio_order")
                .or_else(|| p.offset("page", "compound_order").map(|o| size + o))
                .or_else(|| p.offset("folio", "_flags_1")),
            nr_pages: p.offset("folio", "_folio_nr_pages"),
        }
    }
}

/// `MAX_PAGECACHE_ORDER` on x86-64: a PMD (2 MiB) of 4 KiB pages. No page-cache folio is
/// larger, so a larger claim is corrupt.
pub const MAX_PAGECACHE_ORDER: u32 = 9;

/// What guest memory says about a large folio whose head page the tree holds.
#[derive(Debug, Clone, Default)]
pub struct FolioEvidence {
    /// The head's `struct page` address and page frame.
    pub head: u64,
    pub pfn: u64,
    /// The folio's first file index (the head's `index`).
    pub index: u64,
    /// The order byte and `_folio_nr_pages`, where the profile places them.
    pub order: Option<u8>,
    pub nr_pages: Option<u32>,
    /// Indices the tree's entry covers (its slot and sibling slots, shifted), where the
    /// tree records it (the XArray).
    pub span: Option<u64>,
    /// `compound_head` of the frames after the head, in order, as many as could be read
    /// (the claimed tails and one more).
    pub tails: Vec<u64>,
    /// Frames of guest RAM.
    pub max_pfn: u64,
    /// Pages of the file (`ceil(i_size / 4096)`).
    pub file_pages: u64,
}

/// `folio_nr_pages`: the number of pages of the large folio `e` describes, when every
/// witness agrees; otherwise why not. The tail pages are counted (each holds
/// `compound_head == head | 1`, and the frame after the last one does not), and the count
/// must be a power of two of order 1..=[`MAX_PAGECACHE_ORDER`], equal to the order field,
/// `_folio_nr_pages` and the tree's span where those are known, aligned in both page frame
/// and file index, inside guest RAM and inside the file.
pub fn folio_nr_pages(e: &FolioEvidence) -> Result<u64, String> {
    let claimed = folio_claim(e)?;
    let tail = e.head | 1;
    let counted = 1 + e.tails.iter().take_while(|&&h| h == tail).count() as u64;
    let n = match claimed {
        Some(n) => n,
        None => {
            check_folio(counted, e)?;
            counted
        }
    };
    if counted != n {
        return Err(format!(
            "{counted} pages point to the head {:#x} where the folio claims {n}",
            e.head
        ));
    }
    Ok(n)
}

/// The size the folio's fields claim (its order byte, else `_folio_nr_pages`, else the
/// tree's span), checked by [`check_folio`] before any tail page is read, so a hostile
/// claim costs no reads; `None` when only the tail pages can tell.
fn folio_claim(e: &FolioEvidence) -> Result<Option<u64>, String> {
    let n = match (e.order, e.nr_pages, e.span) {
        (Some(o), _, _) => {
            if u32::from(o) > MAX_PAGECACHE_ORDER || o == 0 {
                return Err(format!(
                    "folio order {o} is outside 1..={MAX_PAGECACHE_ORDER}"
                ));
            }
            1u64 << o
        }
        (None, Some(n), _) => u64::from(n),
        (None, None, Some(s)) => s,
        (None, None, None) => return Ok(None),
    };
    check_folio(n, e)?;
    Ok(Some(n))
}

/// Checks a folio of `n` pages against everything but its tail pages: a power of two of
/// order 1..=[`MAX_PAGECACHE_ORDER`], the same as `_folio_nr_pages` and the tree's span
/// where known, aligned in frame and index, inside guest RAM and inside the file.
fn check_folio(n: u64, e: &FolioEvidence) -> Result<(), String> {
    if !n.is_power_of_two() || !(2..=1 << MAX_PAGECACHE_ORDER).contains(&n) {
        return Err(format!(
            "folio of {n} pages is not a power of two in 2..=512"
        ));
    }
    if let Some(nr) = e.nr_pages.filter(|&nr| u64::from(nr) != n) {
        return Err(format!("_folio_nr_pages {nr} where the order gives {n}"));
    }
    if let Some(s) = e.span.filter(|&s| s != n) {
        return Err(format!(
            "the tree's entry covers {s} indices, the folio {n} pages"
        ));
    }
    if !e.pfn.is_multiple_of(n) || !e.index.is_multiple_of(n) {
        return Err(format!(
            "folio of {n} pages at frame {:#x}, index {} is not aligned to its size",
            e.pfn, e.index
        ));
    }
    if !matches!(e.pfn.checked_add(n), Some(end) if end <= e.max_pfn) {
        return Err(format!("folio at frame {:#x} runs past guest RAM", e.pfn));
    }
    if !matches!(e.index.checked_add(n), Some(end) if end <= e.file_pages) {
        return Err(format!(
            "folio at index {} of {n} pages runs past the file's {} pages",
            e.index, e.file_pages
        ));
    }
    Ok(())
}

impl Pages {
    pub fn new(k: &Kernel) -> Result<Pages, WalkError> {
        let p = k.profile;
        Ok(Pages {
            vmemmap: k.loc.vmemmap_base,
            size: p
                .size_of("page")
                .filter(|&s| s >= 32)
                .ok_or_else(|| WalkError::ProfileLacks("sizeof(struct page)".into()))?,
            flags_off: need(p, "page", "flags")?,
            mapping_off: need(p, "page", "mapping")?,
            index_off: need(p, "page", "index")?,
            bits: PageFlags::from_profile(p)?,
            max_pfn: k.mem.end_gpa() / 4096,
            folio: FolioLayout::from_profile(p),
        })
    }

    /// True when the page's flags say it heads a large folio (`PG_head`).
    pub fn is_head(&self, b: &LeSlice) -> Result<bool, FieldError> {
        Ok(b.u64(self.flags_off, "flags")? >> self.bits.head & 1 == 1)
    }

    /// `folio_nr_pages` of the large folio headed by the `struct page` at `head` (frame
    /// `pfn`, file `index`), read from guest memory and checked by [`folio_nr_pages`].
    /// `span` is what the tree's entry covers, `file_pages` the file's length in pages.
    pub fn folio_nr_pages(
        &self,
        k: &Kernel,
        head: u64,
        pfn: u64,
        index: u64,
        span: Option<u64>,
        file_pages: u64,
    ) -> Result<u64, String> {
        let Some(ch_off) = self.folio.compound_head else {
            return Err("the profile lacks page.compound_head".into());
        };
        let max = 1u64 << MAX_PAGECACHE_ORDER;
        // The head and the frames after it: its first tail's fields, then the tails.
        let frames = (max + 1).min(self.max_pfn.saturating_sub(pfn));
        let read = |n: u64| k.read(head, n * self.size, "struct page of a large folio");
        let first = read(2.min(frames)).map_err(|e| e.to_string())?;
        let r = at_va(&first, head, "folio");
        let order = match self.folio.order {
            Some(o) => Some(r.u8(o, "order").map_err(|e| e.to_string())?),
            None => None,
        };
        let nr_pages = match self.folio.nr_pages {
            Some(o) => Some(r.u32(o, "_folio_nr_pages").map_err(|e| e.to_string())?),
            None => None,
        };
        let mut e = FolioEvidence {
            head,
            pfn,
            index,
            order,
            nr_pages,
            span,
            tails: Vec::new(),
            max_pfn: self.max_pfn,
            file_pages,
        };
        // The claimed tails and the frame after them, read only for a plausible claim
        // (without one, as far as the largest folio goes).
        let claimed = folio_claim(&e)?.unwrap_or(max);
        let want = (claimed + 1).min(frames);
        let all = read(want).map_err(|e| e.to_string())?;
        let all = at_va(&all, head, "folio");
        e.tails = (1..want)
            .map(|i| all.u64(i * self.size + ch_off, "compound_head"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        folio_nr_pages(&e)
    }

    /// `page_to_pfn`: None when `page` is not a struct page inside guest RAM's vmemmap.
    pub fn page_to_pfn(&self, page: u64) -> Option<u64> {
        let rel = page.checked_sub(self.vmemmap)?;
        if rel % self.size != 0 {
            return None;
        }
        let pfn = rel / self.size;
        (pfn < self.max_pfn).then_some(pfn)
    }

    /// `pfn_to_page`.
    pub fn pfn_to_page(&self, pfn: u64) -> u64 {
        self.vmemmap + pfn * self.size
    }

    pub fn struct_size(&self) -> u64 {
        self.size
    }

    /// Classifies a page that the tree of `mapping` holds at `index`.
    pub fn state(
        &self,
        k: &Kernel,
        page: u64,
        mapping: u64,
        index: u64,
    ) -> Result<PageState, WalkError> {
        let b = k.read(page, self.size, "struct page")?;
        Ok(self.state_of(&at_va(&b, page, "page"), mapping, index)?)
    }

    /// Classifies from the bytes of a `struct page`. For the head page of a large folio
    /// this is the state of the whole folio (its flags live in the head).
    pub fn state_of(&self, b: &LeSlice, mapping: u64, index: u64) -> Result<PageState, FieldError> {
        let (flags, page_mapping, page_index) = self.fields(b)?;
        let bit = |n: u32| flags >> n & 1 == 1;
        let f = &self.bits;
        if page_mapping != mapping || page_index != index {
            return Ok(PageState::Inconsistent);
        }
        Ok(if bit(f.swapbacked) {
            PageState::Shmem
        } else if bit(f.locked) {
            PageState::Locked
        } else if bit(f.writeback) {
            PageState::Writeback
        } else if bit(f.dirty) {
            PageState::Dirty
        } else if !bit(f.uptodate) {
            PageState::NotUptodate
        } else {
            PageState::Clean
        })
    }

    /// `(flags, mapping, index)` of a page's bytes, for the linear scan.
    pub fn fields(&self, b: &LeSlice) -> Result<(u64, u64, u64), FieldError> {
        Ok((
            b.u64(self.flags_off, "flags")?,
            b.u64(self.mapping_off, "mapping")?,
            b.u64(self.index_off, "index")?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: u64 = 0xffff_ea00_0004_0000;

    /// An order-`order` folio at frame 0x1000, index 512 of a 1024-page file, with all its
    /// witnesses agreeing, and the frame after it a page of its own.
    fn good(order: u8) -> FolioEvidence {
        let n = 1u64 << order;
        let mut tails = vec![HEAD | 1; n as usize - 1];
        tails.push(0xffff_ea00_0009_0000);
        FolioEvidence {
            head: HEAD,
            pfn: 0x1000,
            index: 512,
            order: Some(order),
            nr_pages: Some(n as u32),
            span: Some(n),
            tails,
            max_pfn: 0x40000,
            file_pages: 1024,
        }
    }

    #[test]
    fn agreeing_folios_have_their_size() {
        for order in 1..=9 {
            assert_eq!(
                folio_nr_pages(&good(order)),
                Ok(1 << order),
                "order {order}"
            );
        }
        // Without order, _folio_nr_pages or span, the tails alone are counted.
        let mut e = good(4);
        (e.order, e.nr_pages, e.span) = (None, None, None);
        assert_eq!(folio_nr_pages(&e), Ok(16));
        // The order byte and the tails alone.
        let mut e = good(5);
        (e.nr_pages, e.span) = (None, None);
        assert_eq!(folio_nr_pages(&e), Ok(32));
    }

    #[test]
    fn hostile_orders_are_refused() {
        for bad in [0u8, 10, 12, 63, 255] {
            let mut e = good(2);
            e.order = Some(bad);
            assert!(folio_nr_pages(&e).is_err(), "order {bad}");
        }
        // _folio_nr_pages not a power of two, or over 512, without an order byte.
        for bad in [0u32, 1, 3, 6, 1024, u32::MAX] {
            let mut e = good(2);
            e.order = None;
            e.nr_pages = Some(bad);
            assert!(folio_nr_pages(&e).is_err(), "nr_pages {bad}");
        }
    }

    #[test]
    fn disagreeing_witnesses_are_refused() {
        // A tail pointing elsewhere (torn read, or a folio split meanwhile).
        let mut e = good(3);
        e.tails[4] = 0xffff_ea00_0005_0001;
        let why = folio_nr_pages(&e).unwrap_err();
        assert!(why.contains("5 pages point to the head"), "{why}");
        // A tail without the tail bit.
        let mut e = good(3);
        e.tails[0] = HEAD;
        assert!(folio_nr_pages(&e).is_err());
        // More tails than the order says: the frame after the folio is ours too.
        let mut e = good(3);
        e.tails[7] = HEAD | 1;
        assert!(folio_nr_pages(&e).is_err());
        // The order, _folio_nr_pages and the tree's span must agree.
        let mut e = good(3);
        e.nr_pages = Some(16);
        assert!(folio_nr_pages(&e).unwrap_err().contains("_folio_nr_pages"));
        let mut e = good(3);
        e.span = Some(1);
        assert!(folio_nr_pages(&e).unwrap_err().contains("tree"));
        // Tails could not all be read (the end of what was readable): too few counted.
        let mut e = good(4);
        e.tails.truncate(7);
        assert!(folio_nr_pages(&e).is_err());
    }

    #[test]
    fn hostile_claims_are_refused_before_any_tail_is_read() {
        let mut e = good(9);
        e.tails.clear();
        assert_eq!(folio_claim(&e), Ok(Some(512)));
        e.pfn += 256;
        assert!(folio_claim(&e).is_err());
        let mut e = good(9);
        e.tails.clear();
        e.file_pages = 600;
        assert!(folio_claim(&e).is_err());
        // Nothing claims a size: only the tails can tell.
        (e.order, e.nr_pages, e.span) = (None, None, None);
        assert_eq!(folio_claim(&e), Ok(None));
    }

    #[test]
    fn misplaced_folios_are_refused() {
        // Frame or index not aligned to the folio's size.
        let mut e = good(4);
        e.pfn += 8;
        assert!(folio_nr_pages(&e).unwrap_err().contains("aligned"));
        let mut e = good(4);
        e.index = 8;
        assert!(folio_nr_pages(&e).unwrap_err().contains("aligned"));
        // Past guest RAM, and at the very top of the address space.
        let mut e = good(4);
        e.max_pfn = e.pfn + 8;
        assert!(folio_nr_pages(&e).unwrap_err().contains("guest RAM"));
        let mut e = good(4);
        e.pfn = !15;
        assert!(folio_nr_pages(&e).is_err());
        // Past the file's last page, and an index at the end of the index space.
        let mut e = good(4);
        e.file_pages = 520;
        assert!(folio_nr_pages(&e).unwrap_err().contains("past the file"));
        let mut e = good(4);
        e.index = !15;
        assert!(folio_nr_pages(&e).is_err());
        // A folio that ends exactly at the file's last page and at the end of RAM is fine.
        let mut e = good(4);
        (e.file_pages, e.max_pfn) = (528, 0x1010);
        assert_eq!(folio_nr_pages(&e), Ok(16));
    }
}
