//! The second, independent pass: a linear scan of the `struct page` array (vmemmap)
//! that finds page-cache pages from the other side — by their `mapping` pointer —
//! to cross-check the tree walk.

use super::buddy::{BuddyMark, MAX_ORDER};
use super::page::Pages;
use super::{at_va, FieldError, LeSlice, WalkError};
use crate::kernel::Kernel;
use std::collections::{BTreeSet, HashMap};

/// A page whose `mapping` is one of the address spaces asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ScannedPage {
    pub pfn: u64,
    pub mapping: u64,
    pub index: u64,
}

/// What guest RAM holds, page by page, as the `struct page` array tells it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Census {
    /// Page frames with a `struct page` (guest RAM the kernel manages).
    pub pages: u64,
    /// Free in the buddy allocator (`PageBuddy` heads and the rest of their blocks).
    pub free: u64,
    /// Anonymous memory (`mapping` tagged PAGE_MAPPING_ANON).
    pub anon: u64,
    /// Backed by an address_space: page cache of files, block devices and shmem.
    pub file: u64,
    pub slab: u64,
    /// Of the free frames, those whose bytes are not all zero: what stock QEMU sends in
    /// full, and eliding free pages would not send.
    pub free_not_zero: u64,
    /// Why free pages could not be told apart (then `free` is 0 and they count as other).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_unknown: Option<String>,
    /// Everything else (kernel image, page tables, vmalloc, reserved…).
    pub other: u64,
}

/// A free block of the buddy allocator: `2^order` page frames from `pfn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FreeBlock {
    pub pfn: u64,
    pub order: u32,
}

/// The result of a linear scan.
#[derive(Debug, Default)]
pub struct StructPageScan {
    pub pages: Vec<ScannedPage>,
    /// The buddy allocator's free blocks, in PFN order.
    pub free: Vec<FreeBlock>,
    pub census: Census,
}

#[derive(Clone, Copy)]
enum Kind {
    Free,
    Anon,
    File,
    Slab,
    Other,
}

/// How a tail page of a compound page is told: `compound_head` bit 0 (from 4.4), or the
/// `PG_tail` flag before (CONFIG_PAGEFLAGS_EXTENDED, always on x86_64).
#[derive(Clone, Copy)]
enum TailMark {
    CompoundHead(u64),
    Flag(u32),
}

struct Classifier {
    tail: TailMark,
    buddy: Option<BuddyMark>,
    /// `_mapcount`, which shares its word with `page_type` (from 4.17).
    mapcount_off: Option<u64>,
    private_off: Option<u64>,
    slab_bit: Option<u32>,
    last: Kind,
    /// The last page-cache page of a mapping asked for: (its `struct page` address, its
    /// frame, mapping, index). Its tail pages, if it heads a large folio, follow it.
    last_head: Option<(u64, u64, u64, u64)>,
    /// Remaining tail frames of a free buddy block.
    free_run: u64,
}

/// Scans every `struct page` of guest RAM, in PFN order like drgn's `for_each_page`
/// helper, and returns those whose `page->mapping` is in `mappings`, with a census of what
/// all of RAM holds. A tail page of a large folio (`compound_head` = head | 1) counts as its
/// head does: it is returned with its head's mapping and the head's index plus its offset
/// in the folio, as the tree walk reports it.
/// Fails when a field the scan reads lies outside `sizeof(struct page)` (a profile whose
/// offsets do not fit its sizes).
pub fn for_each_page(k: &Kernel, mappings: &BTreeSet<u64>) -> Result<StructPageScan, WalkError> {
    let pages = Pages::new(k)?;
    let size = pages.struct_size();
    let p = k.profile;
    let mut cls = Classifier {
        tail: match (p.offset("page", "compound_head"), p.pageflag("PG_tail")) {
            (Some(off), _) => TailMark::CompoundHead(off),
            (None, Some(bit)) => TailMark::Flag(bit),
            (None, None) => {
                return Err(WalkError::ProfileLacks(
                    "page.compound_head (or enum pageflags PG_tail)".into(),
                ))
            }
        },
        buddy: None,
        mapcount_off: p.offset("page", "_mapcount"),
        private_off: p.offset("page", "private"),
        slab_bit: p.pageflag("PG_slab"),
        last: Kind::Other,
        last_head: None,
        free_run: 0,
    };
    let max_pfn = k.mem.end_gpa() / 4096;
    let mut out = StructPageScan::default();
    match BuddyMark::from_profile(p) {
        Ok(b) => cls.buddy = Some(b),
        Err(e) => out.census.free_unknown = Some(e.to_string()),
    }
    // Walk the vmemmap a 4 KiB page at a time: one translation per 4096/size struct pages.
    let mut pfn = 0;
    let mut cache: HashMap<u64, Option<u64>> = HashMap::new();
    while pfn < max_pfn {
        let va = pages.pfn_to_page(pfn);
        let page_va = va & !4095;
        let pa = *cache.entry(page_va).or_insert_with(|| k.va_to_pa(page_va));
        let Some(pa) = pa else {
            // No struct pages here (a hole in guest RAM): skip to the next vmemmap page.
            pfn = (page_va + 4096 - pages.pfn_to_page(0)).div_ceil(size);
            continue;
        };
        let off = va & 4095;
        if off + size > 4096 {
            // A struct page straddling two vmemmap pages: read it through the kernel view.
            if let Ok(b) = k.read(va, size, "struct page") {
                cls.consider(&pages, &at_va(&b, va, "page"), pfn, mappings, &mut out)?;
            }
            pfn += 1;
            continue;
        }
        if let Ok(b) = k.mem.slice(pa + off, size) {
            cls.consider(&pages, &at_va(b, va, "page"), pfn, mappings, &mut out)?;
        }
        pfn += 1;
        if cache.len() > 1024 {
            cache.clear();
        }
    }
    Ok(out)
}

impl Classifier {
    fn consider(
        &mut self,
        pages: &Pages,
        b: &LeSlice,
        pfn: u64,
        mappings: &BTreeSet<u64>,
        out: &mut StructPageScan,
    ) -> Result<(), FieldError> {
        let c = &mut out.census;
        c.pages += 1;
        if self.free_run > 0 {
            self.free_run -= 1;
            c.free += 1;
            return Ok(());
        }
        // A tail page; with `compound_head`, also which head it belongs to (before 4.4 a
        // PG_tail page names its head elsewhere, and no page cache had large pages).
        let (tail, compound_head) = match self.tail {
            TailMark::CompoundHead(off) => {
                let ch = b.u64(off, "compound_head")?;
                (ch & 1 == 1, Some(ch))
            }
            TailMark::Flag(bit) => (pages.fields(b)?.0 >> bit & 1 == 1, None),
        };
        if tail {
            // Tail page of a compound page: counts as its head did.
            self.count(c, self.last);
            if let Some((head, head_pfn, mapping, index)) = self.last_head {
                if compound_head == Some(head | 1) {
                    out.pages.push(ScannedPage {
                        pfn,
                        mapping,
                        index: index.wrapping_add(pfn - head_pfn),
                    });
                }
            }
            return Ok(());
        }
        self.last_head = None;
        let (flags, mapping, index) = pages.fields(b)?;
        let page_type = match self.mapcount_off {
            Some(o) => b.u32(o, "_mapcount")?,
            None => u32::MAX,
        };
        let is_buddy = self.buddy.is_some_and(|b| b.page_buddy(flags, page_type));
        let buddy_order = match (is_buddy, self.private_off) {
            // `buddy_order`: a free block's order is in `private`; a block is aligned to
            // its size.
            (true, Some(o)) => Some(b.u64(o, "private")?)
                .filter(|&order| order <= u64::from(MAX_ORDER) && pfn.is_multiple_of(1 << order)),
            _ => None,
        };
        let kind = if let Some(order) = buddy_order {
            self.free_run = (1 << order) - 1;
            out.free.push(FreeBlock {
                pfn,
                order: order as u32,
            });
            Kind::Free
        } else if self.slab_bit.is_some_and(|bit| flags >> bit & 1 == 1) {
            // Before `mapping`: struct slab overlays struct page, that word is not a mapping there.
            Kind::Slab
        } else if mapping & 1 == 1 {
            Kind::Anon
        } else if mapping != 0 && mapping & 3 == 0 {
            if mappings.contains(&mapping) {
                out.pages.push(ScannedPage {
                    pfn,
                    mapping,
                    index,
                });
                self.last_head = Some((pages.pfn_to_page(pfn), pfn, mapping, index));
            }
            Kind::File
        } else {
            Kind::Other
        };
        self.last = kind;
        self.count(c, kind);
        Ok(())
    }

    fn count(&self, c: &mut Census, kind: Kind) {
        match kind {
            Kind::Free => c.free += 1,
            Kind::Anon => c.anon += 1,
            Kind::File => c.file += 1,
            Kind::Slab => c.slab += 1,
            Kind::Other => c.other += 1,
        }
    }
}
