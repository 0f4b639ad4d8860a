//! `struct page`: `pfn_to_page`/`page_to_pfn` over the vmemmap array, and the
//! page-cache state of a page as its flags, `mapping` and `index` tell it.

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
    /// A large folio: not mapped yet (the 6.1 ext4 page cache does not create them).
    LargeFolio,
    /// `page->mapping`/`index` do not point back to where the tree holds it (torn read).
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
            PageState::LargeFolio => "large_folio",
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
        })
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

    /// Classifies from the bytes of a `struct page`.
    pub fn state_of(&self, b: &LeSlice, mapping: u64, index: u64) -> Result<PageState, FieldError> {
        let (flags, page_mapping, page_index) = self.fields(b)?;
        let bit = |n: u32| flags >> n & 1 == 1;
        let f = &self.bits;
        if page_mapping != mapping || page_index != index {
            return Ok(PageState::Inconsistent);
        }
        Ok(if bit(f.swapbacked) {
            PageState::Shmem
        } else if bit(f.head) {
            PageState::LargeFolio
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
