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

/// How this kernel marks a `struct page` as the head of a free block in the buddy
/// allocator (`PageBuddy`): the encoding changed four times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuddyMark {
    /// Up to 2.6.37: a page flag, `PG_buddy`.
    Flag { bit: u32 },
    /// 2.6.38 to 4.16: `_mapcount` holds `PAGE_BUDDY_MAPCOUNT_VALUE` (-128).
    MapcountValue { value: u32 },
    /// 4.17 to 6.11: in the word `_mapcount` shares with `page_type`, a type is a bit
    /// *cleared* under a base: `(page_type & (base | flag)) == base` (up to 6.8 base
    /// 0xf0000000 and `PG_buddy` 0x80, `#define`s; from 6.9 `enum pagetype`).
    ClearedBit { base: u32, flag: u32 },
    /// From 6.12: the top byte of `page_type` is the type, `PGTY_buddy` (`enum pagetype`).
    TopByte { buddy: u32 },
}

impl BuddyMark {
    /// From the profile: its `enum pagetype` or `enum pageflags` where they say, else the
    /// `#define`s of kernels up to 6.8 (told apart by the profile's release).
    pub fn from_profile(p: &crate::profile::Profile) -> Result<BuddyMark, WalkError> {
        let pagetype = |n: &str| {
            p.enum_value("pagetype", n)
                .and_then(|v| u32::try_from(v & 0xffff_ffff).ok())
        };
        if let Some(buddy) = pagetype("PGTY_buddy") {
            return Ok(BuddyMark::TopByte { buddy });
        }
        if let Some(flag) = pagetype("PG_buddy") {
            let base = pagetype("PAGE_TYPE_BASE").ok_or_else(|| {
                WalkError::ProfileLacks("enum pagetype PAGE_TYPE_BASE (beside PG_buddy)".into())
            })?;
            return Ok(BuddyMark::ClearedBit { base, flag });
        }
        if let Some(bit) = p.pageflag("PG_buddy") {
            return Ok(BuddyMark::Flag { bit });
        }
        let release = p.kernel.release.as_deref().unwrap_or("");
        match kernel_version(release) {
            Some(v) if v < (2, 6, 38) => Err(WalkError::ProfileLacks(format!(
                "enum pageflags PG_buddy, which kernel {release:?} marks free pages with"
            ))),
            Some(v) if v < (4, 17, 0) => Ok(BuddyMark::MapcountValue {
                value: -128i32 as u32,
            }),
            Some(v) if v < (6, 9, 0) => Ok(BuddyMark::ClearedBit {
                base: 0xf000_0000,
                flag: 0x80,
            }),
            _ => Err(WalkError::ProfileLacks(format!(
                "enum pagetype, which kernel {release:?} marks free pages with                  (rebuild the profile with this pct: `pct-introspect build-profile`)"
            ))),
        }
    }

    /// `PageBuddy`, from a page's `flags` and the `_mapcount`/`page_type` word.
    pub fn page_buddy(self, flags: u64, page_type: u32) -> bool {
        match self {
            BuddyMark::Flag { bit } => flags >> bit & 1 == 1,
            BuddyMark::MapcountValue { value } => page_type == value,
            BuddyMark::ClearedBit { base, flag } => page_type & (base | flag) == base,
            BuddyMark::TopByte { buddy } => page_type >> 24 == buddy,
        }
    }
}

/// (version, patchlevel, sublevel) of a kernel release string such as "6.1.0-57-amd64".
fn kernel_version(release: &str) -> Option<(u32, u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || it.next()?.parse().ok();
    Some((next()?, next()?, next()?))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buddy_marks() {
        // 6.1: a free head has bit 0x80 cleared under 0xf0000000; a page never mapped has
        // _mapcount -1, a mapped one 0 and up.
        let old = BuddyMark::ClearedBit {
            base: 0xf000_0000,
            flag: 0x80,
        };
        assert!(old.page_buddy(0, 0xffff_ff7f));
        assert!(!old.page_buddy(0, 0xffff_ffff));
        assert!(!old.page_buddy(0, 0));
        assert!(!old.page_buddy(0, 0xffff_feff), "PG_offline, not buddy");
        // 6.12: the top byte is the type.
        let new = BuddyMark::TopByte { buddy: 0xf0 };
        assert!(new.page_buddy(0, 0xf000_0000));
        assert!(!new.page_buddy(0, 0xf100_0000));
        assert!(!new.page_buddy(0, 0xffff_ffff));
        assert!(BuddyMark::Flag { bit: 19 }.page_buddy(1 << 19, 0));
        // 4.9: _mapcount -128 exactly.
        let v49 = BuddyMark::MapcountValue {
            value: -128i32 as u32,
        };
        assert!(v49.page_buddy(0, 0xffff_ff80));
        assert!(!v49.page_buddy(0, 0xffff_ff7f));
        assert_eq!(kernel_version("6.1.0-57-amd64"), Some((6, 1, 0)));
        assert_eq!(kernel_version("2.6.32-5-amd64"), Some((2, 6, 32)));
        assert_eq!(kernel_version("junk"), None);
    }
}
